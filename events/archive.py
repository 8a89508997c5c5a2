"""A run's event log archived to gzip JSON lines and restored (DESIGN.md, retention).

Layout: ``<archive dir>/<project>/<YYYY-MM of the run's first event>/events/<run id>.jsonl.gz``,
one RecordedEvent a line as the store holds it: payloads stay masked exactly as stored.
Archives written before the project level (``<archive dir>/<YYYY-MM>/events/...``) are
still found by a restore.
"""

from __future__ import annotations

import gzip
import os
import re
from collections.abc import Iterable
from pathlib import Path

import msgspec

from events.errors import ArchiveError, ArchiveUnwritable
from events.store import EventStore
from events.types import RecordedEvent, RunCancelled, RunCompleted, RunStarted, run_stream

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(RecordedEvent).decode
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def archive_dir(home: Path, configured: Path | str | None) -> Path:
    """BATON_ARCHIVE_DIR when set, else ``archive`` under BATON_HOME."""
    return Path(configured).expanduser() if configured else home / "archive"


def project_dir(directory: Path, project: str) -> Path:
    """A project's folder: its name with what a path cannot hold safely made ``_`` (a name
    like ``../x`` or ``a/b`` stays one folder inside the archive)."""
    name = _UNSAFE.sub("_", project).strip(".") or "_"
    return directory / name


def write_lines(path: Path, lines: Iterable[bytes], *, sync: bool = True) -> Path:
    """Write gzip JSON lines to ``path`` whole before it gets its name.

    A side file renamed, so a crash never leaves a half archive under the real name. With
    ``sync`` the file and its folder are fsynced before this returns; without, the caller
    calls ``durable`` on a batch of files before it removes what they hold.
    """
    partial = path.with_name(path.name + ".partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "wb") as raw:
            with gzip.GzipFile(fileobj=raw, mode="wb") as out:
                for line in lines:
                    out.write(line + b"\n")
            if sync:
                raw.flush()
                os.fsync(raw.fileno())
        partial.replace(path)
        if sync:
            _fsync_folder(path.parent)
    except OSError as exc:
        raise ArchiveUnwritable(
            f"cannot write the archive file {path}: {exc.strerror or exc}; make"
            " BATON_ARCHIVE_DIR a writable folder with free space (nothing was removed)"
        ) from None
    return path


def durable(paths: Iterable[Path]) -> None:
    """Every file of ``paths`` and its folder on disk: what removes rows after this returns
    can rely on the files surviving a crash. One sync() of the machine's filesystems where
    the platform has it (measured: a fsync of each file and folder took half of an apply's
    time), else a fsync of each."""
    if hasattr(os, "sync"):
        os.sync()
        return
    for path in paths:
        with open(path, "rb") as written:
            os.fsync(written.fileno())
    for folder in {path.parent for path in paths}:
        _fsync_folder(folder)


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def events_path(directory: Path, recorded: list[RecordedEvent]) -> Path:
    first = recorded[0]
    project = first.event.project if isinstance(first.event, RunStarted) else "default"
    month = first.recorded_at.strftime("%Y-%m")
    run_id = first.stream.removeprefix("run-")
    return project_dir(directory, project) / month / "events" / f"{run_id}.jsonl.gz"


async def archive_run(store: EventStore, run_id: str, directory: Path) -> Path:
    """Write the run's events to the archive, then remove them from the log."""
    recorded = list(await store.read_stream(run_stream(run_id)))
    if not recorded:
        raise ArchiveError(f"no run {run_id} in the event log to archive (see `baton runs`)")
    if not isinstance(recorded[-1].event, RunCompleted | RunCancelled):
        raise ArchiveError(f"run {run_id} has not ended: archive it once it has")
    path = write_lines(events_path(directory, recorded), (_encode(e) for e in recorded))
    await store.remove_stream(run_stream(run_id))
    return path


def archived(run_id: str, directory: Path) -> Path:
    found = sorted(
        [
            *directory.glob(f"*/*/events/{run_id}.jsonl.gz"),
            *directory.glob(f"*/events/{run_id}.jsonl.gz"),  # before the project level
        ]
    )
    if not found:
        raise ArchiveError(
            f"run {run_id} is not in the archive {directory} "
            "(set BATON_ARCHIVE_DIR to where it was archived)"
        )
    return found[-1]


def read_archived(run_id: str, directory: Path) -> list[RecordedEvent]:
    path = archived(run_id, directory)
    damaged = f"the archive file {path} is damaged"
    try:
        with gzip.open(path, "rb") as lines:
            recorded = [_decode(line) for line in lines if line.strip()]
    except OSError as exc:  # BadGzipFile is one, and so is a folder or a file not ours to read
        reason = "not gzip" if isinstance(exc, gzip.BadGzipFile) else exc.strerror or str(exc)
        raise ArchiveError(f"{damaged} or unreadable ({reason}): restore it from a backup") from exc
    except EOFError as exc:
        raise ArchiveError(f"{damaged} (cut short): restore it from a backup") from exc
    except msgspec.DecodeError as exc:
        raise ArchiveError(
            f"{damaged} (a line is not a recorded event): restore it from a backup"
        ) from exc
    if not recorded:
        raise ArchiveError(f"{damaged} (it holds no event): restore it from a backup")
    # a restore must never put back another run's events, or under this run's name
    if any(event.stream != run_stream(run_id) for event in recorded):
        raise ArchiveError(
            f"the archive file {path} holds events of another run than {run_id}: put that"
            " run's own file there"
        )
    return recorded


async def restore_run(store: EventStore, run_id: str, directory: Path) -> int:
    """Put an archived run's events back with their positions; return how many."""
    if await store.stream_version(run_stream(run_id)):
        raise ArchiveError(f"run {run_id} is in the event log already: nothing to restore")
    recorded = read_archived(run_id, directory)
    await store.restore_stream(recorded)
    return len(recorded)
