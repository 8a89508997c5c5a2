"""Commands that keep the event store: db, projections, archive, retention, session."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from events.retention import LONGEST_DAYS
from orchestrator.cli.app import cli
from orchestrator.cli.stores import _with_dsn, _with_store
from orchestrator.errors import UsageError


@cli.group()
def session() -> None:
    """Test sessions: runs grouped over a period (create, show, pause, resume, complete,
    fail). `baton run --session ID` runs in one; a paused session refuses new runs."""


def _session_line(found: Any) -> str:
    reason = f" ({found.reason})" if found.reason else ""
    return (
        f"{found.id} {found.name}: {found.status}{reason}, {len(found.run_ids)} runs, "
        f"project {found.project}"
    )


@session.command("create")
@click.argument("name")
@click.option("--description", default="", help="What the session is for.")
@click.option("--project", default="default", show_default=True, help="The project's name.")
@click.option("--tester", default="", help="Who tests.")
def session_create(name: str, description: str, project: str, tester: str) -> None:
    """Create a test session; prints its id first."""
    from events import sessions

    found = _with_store(
        lambda store: sessions.create(
            store, name, description=description, project=project, tester=tester
        )
    )
    click.echo(_session_line(found))


@session.command("show")
@click.argument("session_id")
def session_show(session_id: str) -> None:
    """A session's state and its runs."""
    from events import sessions

    found = _with_store(lambda store: sessions.read(store, session_id))
    click.echo(_session_line(found))
    for run_id in found.run_ids:
        click.echo(f"  run {run_id}")


def _session_change(to: Any) -> Callable[..., None]:
    def command(session_id: str, reason: str = "") -> None:
        from events import sessions

        found = _with_store(lambda store: sessions.change(store, session_id, to, reason))
        click.echo(_session_line(found))

    command.__doc__ = {
        "pause": "Pause a session: no new run starts in it until it is resumed.",
        "resume": "Resume a paused session.",
        "complete": "Complete an active session.",
        "fail": "End an active or paused session as failed.",
    }[to]
    return command


for _change in ("pause", "resume", "complete", "fail"):
    _command = _session_change(_change)
    if _change in ("pause", "fail"):
        _command = click.option("--reason", default="", help="Why.")(_command)
    session.command(_change)(click.argument("session_id")(_command))


@cli.group()
def archive() -> None:
    """A run's event log moved to the archive (gzip JSON lines) and back (docs/retention.md)."""


def _archive_dir() -> Path:
    from events.archive import archive_dir
    from events.settings import Settings

    settings = Settings.from_env()
    return archive_dir(settings.home, settings.archive_dir)


@archive.command("run")
@click.argument("run_id")
def archive_run(run_id: str) -> None:
    """Archive a run's events, then remove them from the event log."""
    from events import archive as archival

    path = _with_store(lambda store: archival.archive_run(store, run_id, _archive_dir()))
    click.echo(f"archived run {run_id} to {path}")


@archive.command("restore")
@click.argument("run_id")
def archive_restore(run_id: str) -> None:
    """Bring an archived run's events back, with their positions, for show and events."""
    from events.retention_apply import restore_for_inspection

    count = _with_store(lambda store: restore_for_inspection(store, run_id, _archive_dir()))
    click.echo(f"restored run {run_id}: {count} events")


@cli.group()
def retention() -> None:
    """What is kept how long, archived then removed (docs/retention.md)."""


@retention.command("apply")
@click.option("--dry-run", is_flag=True, help="Say what is due; change nothing.")
@click.option("--now", "now_text", metavar="ISO", help="Apply as of this time (default: now).")
def retention_apply(dry_run: bool, now_text: str | None) -> None:
    """Archive what the retention policy says is due, then remove it."""
    from events.cache import open_cache
    from events.retention_apply import apply_retention, parse_now
    from events.settings import Settings

    try:
        now = parse_now(now_text) if now_text else datetime.now().astimezone()
    except ValueError:
        raise UsageError(
            f"--now {now_text!r} is not an ISO 8601 time: give e.g. 2026-03-01T00:00:00Z"
        ) from None
    if now.year < 1970:  # a century's window before it would leave the calendar
        raise UsageError(f"--now {now_text!r} is before 1970: give a time from 1970 on")

    async def apply(store: Any) -> list[str]:
        cache = open_cache(Settings.from_env())
        try:
            report = await apply_retention(store, _archive_dir(), now, dry_run=dry_run, cache=cache)
        finally:
            await cache.aclose()
        return report.lines()

    click.echo("\n".join(_with_store(apply)))


_DAYS = click.IntRange(1, LONGEST_DAYS)
_HOURS = click.IntRange(1, LONGEST_DAYS * 24)


@retention.command("set")
@click.argument("project")
@click.option("--passed-days", type=_DAYS, help="Keep passed runs this long.")
@click.option("--failed-days", type=_DAYS, help="Keep other ended runs this long.")
@click.option("--metrics-days", type=_DAYS, help="Keep monthly metrics this long.")
@click.option("--context-hours", type=_HOURS, help="Keep run contexts this long.")
@click.option("--reset", is_flag=True, help="Back to the defaults for this project.")
def retention_set(
    project: str,
    passed_days: int | None,
    failed_days: int | None,
    metrics_days: int | None,
    context_hours: int | None,
    reset: bool,
) -> None:
    """Set a project's own retention windows (the others keep theirs or the default)."""
    from events.retention_apply import policy_of, set_policy

    windows = (passed_days, failed_days, metrics_days, context_hours)
    if not reset and all(value is None for value in windows):
        raise UsageError(
            "baton retention set: give a window to change (--passed-days, --failed-days,"
            " --metrics-days, --context-hours) or --reset"
        )

    async def change(store: Any) -> str:
        await set_policy(store, project, *windows, reset=reset)
        return await policy_of(store, project)

    click.echo(_with_store(change))


@cli.group()
def db() -> None:
    """The PostgreSQL schema: migrate, status."""


@db.command()
def migrate() -> None:
    """Apply every pending schema step (idempotent)."""
    from orchestrator import inspect

    click.echo(_with_dsn(inspect.migrate))


@db.command()
def status() -> None:
    """Show the applied and pending schema steps."""
    from orchestrator import inspect

    click.echo(_with_dsn(inspect.db_status))


@cli.group()
def projections() -> None:
    """The read tables kept from the event log."""


@projections.command("rebuild")
def rebuild_projections() -> None:
    """Empty every read table and rebuild it from the whole log."""
    from orchestrator import inspect

    click.echo(_with_store(inspect.rebuild_projections))
