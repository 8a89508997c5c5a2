"""A run's event log archived to gzip JSON lines and restored (DESIGN.md, retention).

Layout: ``<archive dir>/<YYYY-MM of the run's first event>/events/<run id>.jsonl.gz``,
one RecordedEvent a line as the store holds it: payloads stay masked exactly as stored.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import msgspec

from events.errors import ArchiveError
from events.store import EventStore
from events.types import RecordedEvent, RunCancelled, RunCompleted, run_stream

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(RecordedEvent).decode


def archive_dir(home: Path, environ_value: str | None) -> Path:
    """BATON_ARCHIVE_DIR when set, else ``archive`` under BATON_HOME."""
    return Path(environ_value).expanduser() if environ_value else home / "archive"


async def archive_run(store: EventStore, run_id: str, directory: Path) -> Path:
    """Write the run's events to the archive, then remove them from the log."""
    recorded = list(await store.read_stream(run_stream(run_id)))
    if not recorded:
        raise ArchiveError(f"no run {run_id} in the event log to archive (see `baton runs`)")
    if not isinstance(recorded[-1].event, RunCompleted | RunCancelled):
        raise ArchiveError(f"run {run_id} has not ended: archive it once it has")
    path = directory / recorded[0].recorded_at.strftime("%Y-%m") / "events" / f"{run_id}.jsonl.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written to a side file and renamed so a crash never leaves a half archive to restore.
    partial = path.with_suffix(".partial")
    with gzip.open(partial, "wb") as out:
        for event in recorded:
            out.write(_encode(event) + b"\n")
    partial.replace(path)
    await store.remove_stream(run_stream(run_id))
    return path


def archived(run_id: str, directory: Path) -> Path:
    found = sorted(directory.glob(f"*/events/{run_id}.jsonl.gz"))
    if not found:
        raise ArchiveError(
            f"run {run_id} is not in the archive {directory} "
            "(set BATON_ARCHIVE_DIR to where it was archived)"
        )
    return found[-1]


async def restore_run(store: EventStore, run_id: str, directory: Path) -> int:
    """Put an archived run's events back with their positions; return how many."""
    if await store.stream_version(run_stream(run_id)):
        raise ArchiveError(f"run {run_id} is in the event log already: nothing to restore")
    with gzip.open(archived(run_id, directory), "rb") as lines:
        recorded = [_decode(line) for line in lines if line.strip()]
    await store.restore_stream(recorded)
    return len(recorded)
