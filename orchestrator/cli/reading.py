"""Commands that read recorded runs: runs, show, events, context, diff, report."""

from __future__ import annotations

import os
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from orchestrator.cli.app import cli
from orchestrator.cli.options import report_options
from orchestrator.cli.stores import _with_store

if TYPE_CHECKING:
    from orchestrator.batch_report import BatchReport
    from orchestrator.results import RunResult


def _reported(
    results: list[RunResult],
    *,
    junit: Path | None,
    json_path: Path | None,
    html: Path | None,
    ctrf: Path | None = None,
    color: bool,
    err: bool = False,
) -> bool:
    """Write the reports asked for and print the summary; True if every run passed."""
    from orchestrator.reporters import (
        render_summary,
        write_ctrf,
        write_html,
        write_json,
        write_junit,
    )

    writers = (
        (junit, write_junit),
        (json_path, write_json),
        (html, write_html),
        (ctrf, write_ctrf),
    )
    for path, write in writers:
        if path is not None:
            write(results, path)
    click.echo(render_summary(results, color=color), err=err)
    return all(result.status == "passed" for result in results)


@cli.group(invoke_without_command=True)
@click.option(
    "--batch",
    "batch_id",
    metavar="ID",
    help="The batch: the --batch ID its shards were run with.",
)
@report_options
@click.pass_context
def report(
    ctx: click.Context,
    batch_id: str | None,
    junit: Path | None,
    json_path: Path | None,
    html: Path | None,
    ctrf: Path | None,
) -> None:
    """Reports from the event store. With --batch: merge the shards of a batch into one
    summary, the reports and the exit code of one run of the whole batch (a missing or
    unfinished shard fails it). `baton report issue RUN_ID TEST`: a failed test as a
    Markdown issue."""
    if ctx.invoked_subcommand is not None:
        if batch_id is not None or junit or json_path or html or ctrf:
            raise click.UsageError("--batch and the report files are not for a subcommand")
        return
    if batch_id is None:
        raise click.UsageError("give --batch ID, or a subcommand: baton report issue RUN_ID TEST")
    from orchestrator.batch_report import batch_report

    found = _with_store(lambda store: batch_report(store, batch_id))
    color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    _batch_reported(found, junit=junit, json_path=json_path, html=html, ctrf=ctrf, color=color)


@report.command("issue")
@click.argument("run_id")
@click.argument("test")
def report_issue(run_id: str, test: str) -> None:
    """Print a ready-to-file Markdown report of the failed TEST of run RUN_ID: its request,
    the response, expected against actual, the run's context; secrets redacted."""
    from orchestrator.issue_report import issue_markdown

    async def read(store: Any) -> str:
        from events import types as ev

        return issue_markdown(await store.read_stream(ev.run_stream(run_id)), test, run_id)

    click.echo(_with_store(read), nl=False)


def _batch_reported(found: BatchReport, **reports: Any) -> None:
    """A batch's reports and summary (``_reported``), what could not be merged, and exit 1
    unless every run passed."""
    passed = _reported(found.results, **reports)
    for problem in found.problems:
        click.echo(f"error: {problem}", err=True)
    if found.problems or not passed:
        sys.exit(1)


@cli.command()
@click.argument("run_id")
def show(run_id: str) -> None:
    """Show a recorded run: its status and every test's result."""
    from orchestrator import inspect

    click.echo(_with_store(lambda store: inspect.show(store, run_id)))


@cli.command()
@click.argument("run_id")
@click.option("--at", "position", type=int, help="The context as it was at this log position.")
def context(run_id: str, position: int | None) -> None:
    """Show a run's context: variables, tokens, captures, order, statuses."""
    from events.settings import Settings
    from orchestrator import inspect

    settings = Settings.from_env()
    click.echo(_with_store(lambda store: inspect.context(store, settings, run_id, position)))


@cli.command()
@click.argument("run_a")
@click.argument("run_b")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@click.option(
    "--exit-code",
    is_flag=True,
    help="Exit 1 when a test that passed in RUN_A does not pass in RUN_B.",
)
def diff(run_a: str, run_b: str, as_json: bool, exit_code: bool) -> None:
    """Compare two runs test by test: status, response status and body shape, captures
    (secrets only as changed or unchanged) and duration, flagging large changes."""
    import msgspec

    from events import types as ev
    from events.secrets import KEY_FILE, Cipher, load_key
    from events.settings import Settings
    from orchestrator.reporters.diff_text import diff_text
    from orchestrator.run_diff import RunDiff
    from orchestrator.run_diff import diff as run_diff

    settings = Settings.from_env()
    cipher = None
    # a read: no key is made where there is none (then no run here has secrets to open)
    if settings.secret_key or (settings.home / KEY_FILE).exists():
        cipher = Cipher(load_key(settings.secret_key, settings.home))

    async def read(store: Any) -> RunDiff:
        events_a = await store.read_stream(ev.run_stream(run_a))
        events_b = await store.read_stream(ev.run_stream(run_b))
        return run_diff(events_a, events_b, run_a, run_b, cipher)

    found = _with_store(read)
    if as_json:
        click.echo(msgspec.json.format(msgspec.json.encode(found)).decode())
    else:
        click.echo(diff_text(found))
    if exit_code and found.regressions:
        sys.exit(1)


@cli.command()
@click.argument("run_id")
def events(run_id: str) -> None:
    """Show a run's event log."""
    from orchestrator import inspect

    click.echo(_with_store(lambda store: inspect.event_log(store, run_id)))


@cli.command()
@click.option("--status", type=click.Choice(["running", "passed", "failed", "cancelled", "error"]))
@click.option("--suite", help="The suite's name.")
@click.option("--tag", help="Runs started with this --tag.")
@click.option("--env", "environment", help="The environment's name (default: default).")
@click.option("--since", type=click.DateTime(), help="Started at or after (local time).")
@click.option("--until", type=click.DateTime(), help="Started before (local time).")
@click.option("-n", "--limit", default=20, show_default=True, type=click.IntRange(1, 10000))
def runs(
    status: str | None,
    suite: str | None,
    tag: str | None,
    environment: str | None,
    since: datetime | None,
    until: datetime | None,
    limit: int,
) -> None:
    """List recent runs, newest first."""
    from events.projections.queries import RunFilter
    from orchestrator import inspect

    where = RunFilter(
        status=status,
        suite=suite,
        tag=tag,
        environment=environment,
        since=since.astimezone() if since else None,
        until=until.astimezone() if until else None,
        limit=limit,
    )
    click.echo(_with_store(lambda store: inspect.runs(store, where)))
