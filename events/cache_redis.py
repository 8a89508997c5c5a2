"""The Redis context cache (redis-py asyncio): one msgpack value per run, with its TTL.

This module is the one boundary where redis errors become CacheError. A cache must never
make Baton slower than having none: sockets time out after a quarter of a second, the
client does not retry, and after a connection failure the backend stops calling Redis for
``retry_after`` seconds, failing at once, rather than pay a timeout on every read.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from events.cache import DEFAULT_PREFIX, CacheError, CacheUnavailable, ContextCache
from events.context import Context
from events.errors import scrubbed
from events.settings import mask_dsn, scrub_dsn

DEFAULT_TIMEOUT = 0.25
DEFAULT_RETRY_AFTER = 5.0


class RedisContextCache:
    """ContextCache on Redis. Build it with ``RedisContextCache.from_url(url)``."""

    def __init__(
        self,
        client: Redis,
        *,
        url: str,
        prefix: str = DEFAULT_PREFIX,
        op_timeout: float = 4 * DEFAULT_TIMEOUT,
        retry_after: float = DEFAULT_RETRY_AFTER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._url = url
        self._where = mask_dsn(url)
        self._prefix = prefix
        self._op_timeout = op_timeout
        self._retry_after = retry_after
        self._clock = clock
        self._down_until = 0.0
        self._down_reason = ""
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(Context)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = DEFAULT_TIMEOUT,
        retry_after: float = DEFAULT_RETRY_AFTER,
    ) -> RedisContextCache:
        """A cache on the Redis at ``url`` (``redis://``, ``rediss://``, ``unix://``).

        No connection is made here. ``timeout`` bounds connecting and each reply; a call
        as a whole is bounded by four times that. Raises CacheError for an invalid URL.
        """
        try:
            client = Redis.from_url(
                url,
                socket_connect_timeout=timeout,
                socket_timeout=timeout,
                # one attempt: the reader falls back to the log, which beats waiting again
                retry=Retry(NoBackoff(), 0),
            )
        except ValueError as exc:
            reason = scrub_dsn(str(exc), url)
            raise CacheError(f"invalid Redis URL {mask_dsn(url)}: {reason}") from scrubbed(
                exc, lambda text: scrub_dsn(text, url)
            )
        return cls(client, url=url, prefix=prefix, op_timeout=4 * timeout, retry_after=retry_after)

    def key(self, run_id: str) -> str:
        """The Redis key of the run's context."""
        return f"{self._prefix}context:{run_id}"

    async def get(self, run_id: str) -> Context | None:
        key = self.key(run_id)
        data: bytes | None = await self._call(lambda: self._client.get(key))
        if data is None:
            return None
        try:
            context: Context = self._decoder.decode(data)
        except msgspec.DecodeError as exc:
            # written by another version of Baton, or not by Baton at all
            raise CacheError(f"undecodable context at {key!r}: {exc}") from exc
        return context

    async def put(self, context: Context, *, ttl: float | None) -> None:
        if not context.run_id:
            raise ValueError("a context without a run_id (no RunStarted folded) cannot be cached")
        if ttl is not None and ttl <= 0:
            await self.delete(context.run_id)
            return
        try:
            data = self._encoder.encode(context)
        except (msgspec.EncodeError, TypeError, OverflowError) as exc:
            # e.g. a captured integer wider than msgpack's 64 bits
            raise CacheError(f"context of {context.run_id!r} cannot be encoded: {exc}") from exc
        key = self.key(context.run_id)
        # SET without PX also clears an earlier entry's expiry, as an overwrite should
        px = None if ttl is None else max(1, math.ceil(ttl * 1000))
        await self._call(lambda: self._client.set(key, data, px=px))

    async def delete(self, run_id: str) -> None:
        key = self.key(run_id)
        await self._call(lambda: self._client.delete(key))

    async def expires_in(self, run_id: str) -> float | None:
        key = self.key(run_id)
        millis: int = await self._call(lambda: self._client.pttl(key))
        if millis == -2:
            return None
        return math.inf if millis == -1 else millis / 1000

    async def aclose(self) -> None:
        # closing connections to a dead server: nothing is left to release
        with contextlib.suppress(RedisError, OSError):
            await self._client.aclose()

    async def _call(self, command: Callable[[], Awaitable[Any]]) -> Any:
        # ``command`` builds the coroutine only when Redis is to be called: while backing
        # off, no coroutine is created and left un-awaited
        if self._clock() < self._down_until:
            raise CacheUnavailable(
                f"Redis at {self._where} is unavailable, not tried again for up to "
                f"{self._retry_after:g} s: {self._down_reason}"
            )
        try:
            async with asyncio.timeout(self._op_timeout):
                return await command()
        except (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError) as exc:
            self._down_until = self._clock() + self._retry_after
            self._down_reason = self._scrub(str(exc)) or type(exc).__name__
            raise CacheUnavailable(
                f"Redis at {self._where} is unavailable: {self._down_reason}"
            ) from scrubbed(exc, self._scrub)
        except RedisError as exc:
            reason = self._scrub(str(exc))
            raise CacheError(f"Redis at {self._where} failed: {reason}") from scrubbed(
                exc, self._scrub
            )

    def _scrub(self, text: str) -> str:
        return scrub_dsn(text, self._url)


def _conforms(cache: RedisContextCache) -> ContextCache:
    # never called: makes mypy check RedisContextCache against the ContextCache protocol
    return cache
