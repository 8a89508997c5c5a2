"""A run's event log archived to gzip JSON lines, removed, and restored with its positions."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from events.archive import archive_run, restore_run
from events.errors import StoreError
from events.memory import MemoryEventStore
from events.store import NewEvent, StreamAppend
from events.types import TestStarted, run_stream


async def test_an_archived_run_leaves_the_log_and_comes_back_with_its_positions(
    tmp_path: Path,
) -> None:
    store = MemoryEventStore()
    stream = run_stream("r1")
    await store.append([StreamAppend(stream, [NewEvent(TestStarted(test=t)) for t in "ab"])])
    await store.append([StreamAppend(run_stream("kept"), [NewEvent(TestStarted(test="c"))])])
    original = await store.read_stream(stream)

    path = await archive_run(store, "r1", tmp_path)

    assert path == tmp_path / original[0].recorded_at.strftime("%Y-%m") / "events" / "r1.jsonl.gz"
    with gzip.open(path, "rt") as lines:
        assert len(lines.readlines()) == 2
    assert await store.read_stream(stream) == []
    assert [r.stream for r in await store.read_all(0)] == [run_stream("kept")]

    assert await restore_run(store, "r1", tmp_path) == 2
    assert await store.read_stream(stream) == original


async def test_restoring_a_run_not_in_the_archive_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=f"run gone is not in the archive {tmp_path}"):
        await restore_run(MemoryEventStore(), "gone", tmp_path)
