"""The event writer's group commit (the service's runs share it): one writer's conflict
fails that writer only, the others' events are stored, in one append when they coincide.
The writer is what is tested: its store is the in-memory one."""

from __future__ import annotations

import asyncio

import pytest

from events.memory import MemoryEventStore
from events.store import NewEvent, StreamAppend, WrongExpectedVersion
from events.types import TestStarted
from events.writer import BatchingWriter, GroupAppends


async def test_a_conflict_fails_its_writer_only() -> None:
    store = MemoryEventStore()
    # someone else wrote to the stream the first writer believes it owns
    await store.append([StreamAppend("run-taken", [NewEvent(TestStarted(test="x"))])])
    group = GroupAppends(store)
    taken, fine = BatchingWriter(group), BatchingWriter(group)
    for index in range(3):
        taken.emit("run-taken", TestStarted(test=f"t{index}"))
        fine.emit("run-fine", TestStarted(test=f"f{index}"))
    results = await asyncio.gather(taken.flush(), fine.flush(), return_exceptions=True)
    assert isinstance(results[0], WrongExpectedVersion) and results[1] is None
    stored = await store.read_stream("run-fine")
    assert [r.event for r in stored] == [TestStarted(test=f"f{i}") for i in range(3)]
    assert fine.position == stored[-1].position
    with pytest.raises(WrongExpectedVersion):
        taken.emit("run-taken", TestStarted(test="again"))


async def test_writers_at_once_share_appends() -> None:
    store = MemoryEventStore()
    calls = 0

    class Counting:
        async def append(self, appends: list[StreamAppend]) -> list[list[int]]:
            nonlocal calls
            calls += 1
            return await store.append(appends)

    group = GroupAppends(Counting())
    writers = [BatchingWriter(group) for _ in range(20)]
    for index, writer in enumerate(writers):
        writer.emit(f"run-{index}", TestStarted(test="t"))
    await asyncio.gather(*(writer.flush() for writer in writers))
    assert calls < 20
    assert len(await store.read_all()) == 20
