"""``baton report --batch ID``: the shards of a batch merged into one set of results.

The batch's stream holds each shard's ShardStarted (which runs it made, of which units,
and K and N). A shard run again (a CI retry) appends another: the latest ShardStarted of
each shard is that shard, and the runs of its earlier attempts are left out, so a retry
replaces what it retries and never doubles a result. What cannot be merged is said, one
line each: a shard that recorded nothing, a run that has not ended (its shard is still
running, or died before its owner's sweep ended it), shards that disagree on N.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from events import types as ev
from events.store import EventStore
from orchestrator.errors import UsageError
from orchestrator.recorded import run_result
from orchestrator.results import RunResult

_READS = 8
"""Runs read at once."""


@dataclass(frozen=True)
class BatchReport:
    results: list[RunResult]
    """In the batch's unit order."""
    problems: list[str] = field(default_factory=list)


async def batch_report(store: EventStore, batch_id: str) -> BatchReport:
    recorded = await store.read_stream(ev.batch_stream(batch_id))
    latest: dict[int, ev.ShardStarted] = {}
    for item in recorded:
        if isinstance(item.event, ev.ShardStarted):
            latest[item.event.shard] = item.event
    if not latest:
        raise UsageError(
            f"no shards of batch {batch_id!r} in the event store: it is the --batch ID "
            "that `baton run --shard K/N --batch ID` was given"
        )
    counts = sorted({shard.shards for shard in latest.values()})
    problems: list[str] = []
    if len(counts) > 1:
        problems.append(
            f"batch {batch_id}: its shards split it into different numbers of shards "
            f"({', '.join(map(str, counts))}); run every shard with the same --shard K/N"
        )
    missing = [k for k in range(1, max(counts) + 1) if k not in latest]
    for k in missing:
        problems.append(
            f"batch {batch_id}: shard {k}/{max(counts)} recorded nothing: it did not run, "
            "or failed before its first run; run it (baton run --shard "
            f"{k}/{max(counts)} --batch {batch_id})"
        )
    # the batch's unit order: the j-th unit of shard K is unit K - 1 + j * N
    placed = [
        (k - 1 + j * shard.shards, k, run_id, unit)
        for k, shard in latest.items()
        for j, (run_id, unit) in enumerate(zip(shard.runs, shard.units, strict=True))
    ]
    placed.sort()
    slots = asyncio.Semaphore(_READS)

    async def read(run_id: str) -> RunResult | None:
        async with slots:
            return run_result(await store.read_stream(ev.run_stream(run_id)))

    found = await asyncio.gather(*(read(run_id) for _, _, run_id, _ in placed))
    results: list[RunResult] = []
    for (_, k, run_id, unit), result in zip(placed, found, strict=True):
        if result is None:
            problems.append(
                f"batch {batch_id}: run {run_id} ({unit}) of shard {k}/{latest[k].shards} has "
                "not ended: the shard is still running, or it died; run the shard again"
            )
        else:
            results.append(result)
    return BatchReport(results, problems)
