"""The in-process context cache: an LRU bounded by entries, honouring each entry's TTL.

The default when ``BATON_REDIS_URL`` is not set. It keeps the Context objects themselves,
not an encoding of them: a hit costs a dict lookup, and Contexts are immutable by contract
(``fold`` copies before it changes anything), so sharing one is safe.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable

from events.cache import ContextCache
from events.context import Context

DEFAULT_MAX_ENTRIES = 10_000


class MemoryContextCache:
    """ContextCache in this process. ``clock`` is monotonic seconds (tests pass their own)."""

    def __init__(
        self,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, not {max_entries}")
        self._max_entries = max_entries
        self._clock = clock
        # run id -> (expiry on the clock, context); least recently used first
        self._entries: OrderedDict[str, tuple[float, Context]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, run_id: str) -> Context | None:
        entry = self._entries.get(run_id)
        if entry is None:
            return None
        expires, context = entry
        if expires <= self._clock():
            del self._entries[run_id]
            return None
        self._entries.move_to_end(run_id)
        return context

    async def put(self, context: Context, *, ttl: float | None) -> None:
        run_id = _key(context)
        if ttl is not None and ttl <= 0:
            self._entries.pop(run_id, None)
            return
        expires = math.inf if ttl is None else self._clock() + ttl
        self._entries[run_id] = (expires, context)
        self._entries.move_to_end(run_id)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    async def delete(self, run_id: str) -> None:
        self._entries.pop(run_id, None)

    async def expires_in(self, run_id: str) -> float | None:
        entry = self._entries.get(run_id)
        if entry is None:
            return None
        left = entry[0] - self._clock()
        if left <= 0:
            del self._entries[run_id]
            return None
        return left

    async def aclose(self) -> None:
        self._entries.clear()


def _key(context: Context) -> str:
    if not context.run_id:
        raise ValueError("a context without a run_id (no RunStarted folded) cannot be cached")
    return context.run_id


def _conforms(cache: MemoryContextCache) -> ContextCache:
    # never called: makes mypy check MemoryContextCache against the ContextCache protocol
    return cache
