"""A run's event log archived to gzip JSON lines, removed, and restored with its positions."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from events.archive import archive_run, restore_run
from events.errors import ArchiveError
from events.memory import MemoryEventStore
from events.store import NewEvent, StreamAppend
from events.types import RunCompleted, TestStarted, run_stream
from tests.cli import baton
from tests.conftest import SHOP, start_shop, stop


async def test_an_archived_run_leaves_the_log_and_comes_back_with_its_positions(
    tmp_path: Path,
) -> None:
    store = MemoryEventStore()
    stream = run_stream("r1")
    ended = [NewEvent(TestStarted(test="a")), NewEvent(RunCompleted("passed", 1, 0, 0, 1.0))]
    await store.append([StreamAppend(stream, ended)])
    await store.append([StreamAppend(run_stream("kept"), [NewEvent(TestStarted(test="c"))])])
    original = await store.read_stream(stream)

    path = await archive_run(store, "r1", tmp_path)

    month = original[0].recorded_at.strftime("%Y-%m")
    assert path == tmp_path / "default" / month / "events" / "r1.jsonl.gz"
    with gzip.open(path, "rt") as lines:
        assert len(lines.readlines()) == 2
    assert await store.read_stream(stream) == []
    assert [r.stream for r in await store.read_all(0)] == [run_stream("kept")]

    assert await restore_run(store, "r1", tmp_path) == 2
    assert await store.read_stream(stream) == original


async def test_restoring_a_run_not_in_the_archive_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match=f"run gone is not in the archive {tmp_path}"):
        await restore_run(MemoryEventStore(), "gone", tmp_path)


def test_a_recorded_run_is_archived_and_restored_through_the_cli(
    pg_server_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the PostgreSQL server, as a user types it: `baton events` loses the run to the
    archive's file and gets it back, the same lines, from `baton archive restore`."""
    process, url = start_shop()
    try:
        monkeypatch.setenv("BATON_DATABASE_URL", pg_server_dsn)
        monkeypatch.setenv("BATON_HOME", str(tmp_path / "home"))
        monkeypatch.setenv("BATON_ARCHIVE_DIR", str(tmp_path / "archive"))
        monkeypatch.setenv("SHOP_URL", url)
        report = tmp_path / "run.json"
        code, out, err = baton("run", str(SHOP / "checkout.yaml"), "--json", str(report))
        assert code == 0, out + err
        run_id = json.loads(report.read_text())["runs"][0]["run_id"]
        code, before, err = baton("events", run_id)
        assert code == 0, err
        code, out, err = baton("archive", "run", run_id)
        assert code == 0, err
        [archived] = (tmp_path / "archive").glob(f"default/*/events/{run_id}.jsonl.gz")
        assert f"archived run {run_id} to {archived}" in out
        assert baton("events", run_id)[0] == 2  # gone from the log
        code, out, err = baton("archive", "restore", run_id)
        assert code == 0, err
        assert baton("events", run_id) == (0, before, "")  # positions and all
        code, out, err = baton("archive", "restore", run_id)
        assert code == 2
        assert f"error: run {run_id} is in the event log already" in err
    finally:
        stop(process)
