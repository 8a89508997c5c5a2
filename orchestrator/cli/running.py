"""Commands that run flows: run, rerun, replay."""

from __future__ import annotations

import asyncio
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import click

from orchestrator.cli.app import cli
from orchestrator.cli.options import _options, _rerun_inputs, flow_options, report_options
from orchestrator.cli.reading import _batch_reported, _reported
from orchestrator.cli.signals import _run, stdout_closed
from orchestrator.cli.stores import _with_store
from orchestrator.errors import InfrastructureError, UsageError

if TYPE_CHECKING:
    from orchestrator.batch_report import BatchReport
    from orchestrator.reporters import RunTally
    from orchestrator.shards import Shard


@cli.command()
@flow_options
@click.option(
    "-c",
    "--concurrency",
    default=10,
    show_default=True,
    type=click.IntRange(1, 1000),
    help="Requests in flight at once.",
)
@report_options
@click.option("-q", "--quiet", is_flag=True, help="Only failures and the summary.")
@click.option(
    "--serve",
    metavar="COMMAND",
    help="Start this server first, wait for base_url to answer, stop it after.",
)
@click.option(
    "--shard",
    "shard_text",
    metavar="K/N",
    help="Run the K-th of N shares of the batch's units (a CI matrix); needs --batch.",
)
@click.option(
    "--batch",
    "batch_id",
    metavar="ID",
    help="Record the runs under this batch (the CI pipeline's id); see baton report.",
)
@click.option(
    "--queue",
    "queue_url",
    metavar="URL",
    help="Queue the batch's units for baton worker processes (redis://HOST:PORT/DB) and "
    "follow it from the event store.",
)
@click.option(
    "--session",
    "session_id",
    metavar="ID",
    help="Run in this test session (baton session create); refused while it is paused.",
)
@click.option(
    "--events",
    "events_format",
    type=click.Choice(["ndjson"]),
    help="Write every event to standard output as one JSON line (docs/agents.md); progress "
    "and the summary go to standard error.",
)
def run(
    concurrency: int,
    junit: Path | None,
    json_path: Path | None,
    html: Path | None,
    ctrf: Path | None,
    quiet: bool,
    serve: str | None,
    shard_text: str | None,
    batch_id: str | None,
    queue_url: str | None,
    session_id: str | None,
    events_format: str | None,
    **kwargs: Any,
) -> None:
    """Run flow files (or directories of them). Interrupted (Ctrl-C, SIGTERM), the runs in
    flight end as cancelled and what passed, failed and was cancelled is printed."""
    if queue_url is not None and shard_text is not None:
        raise UsageError(
            "--queue and --shard: the queue shares the batch among its workers; use one"
        )
    if queue_url is not None and session_id is not None:
        raise UsageError("--queue and --session: a queued batch does not join a session yet")
    if queue_url is not None and events_format is not None:
        raise UsageError(
            "--queue and --events: the workers record the events; follow them with "
            "baton watch, or run without --queue"
        )
    ndjson = events_format is not None
    with _summary_on_interrupt(err=ndjson) as tally:
        from orchestrator import execution

        shard = _shard(shard_text, batch_id)

        options = _options(concurrency=concurrency, **kwargs)
        jobs = execution.prepare(options)
        _warn_insecure(jobs)
        used = next((job for job in jobs if job.setups), None)
        if used is not None and (queue_url is not None or shard is not None):
            raise UsageError(
                f"{used.plan.loaded.label}: use: a shared setup runs in one baton run; "
                "--queue and --shard split the flows among processes (run it without them)"
            )
        reports = {"junit": junit, "json_path": json_path, "html": html, "ctrf": ctrf}
        if queue_url is not None:
            _queued(queue_url, options, jobs, batch_id, tally, quiet=quiet, serve=serve, **reports)
            return
        shard_run = None
        if shard is not None and batch_id:
            from orchestrator.shards import ShardRun

            shard_run = ShardRun.of(jobs, shard, batch_id)
            jobs = shard_run.jobs()
            click.echo(shard_run.describe(), err=ndjson)
        _execute(
            jobs,
            concurrency,
            quiet,
            reports,
            tally,
            serve=serve,
            shard=shard_run,
            session_id=session_id,
            ndjson=ndjson,
        )


def _execute(
    jobs: list[Any],
    concurrency: int,
    quiet: bool,
    reports: dict[str, Path | None],
    tally: RunTally,
    *,
    serve: str | None = None,
    shard: Any = None,
    session_id: str | None = None,
    ndjson: bool = False,
) -> None:
    """Run the jobs with live progress, write the reports, print the summary; exit 1 if a
    run did not pass. With ``ndjson``, standard output carries only the events, one JSON
    line each, and what a person reads goes to standard error."""
    from events.settings import Settings
    from orchestrator import execution
    from orchestrator.reporters import ConsoleProgress

    human = sys.stderr if ndjson else sys.stdout
    color = _color(human)
    progress = ConsoleProgress(stream=human, quiet=quiet, color=color)
    for job in [*execution.setup_jobs(jobs), *jobs]:
        for index, inputs in enumerate(job.runs):
            name = job.plan.loaded.flow.name
            tally.expect(inputs.run_id, name, inputs.row, job.plan_of(index).order)
    stream_event = _ndjson_writer() if ndjson else None

    def observe(run_id: str, event: Any) -> None:
        tally(run_id, event)
        progress(run_id, event)

    try:
        with _served(serve, jobs):
            results = _run(
                execution.execute(
                    jobs,
                    Settings.from_env(),
                    concurrency=concurrency,
                    observer=_until_stdout_closed(observe),
                    placed=stream_event and _until_stdout_closed(stream_event),
                    shard=shard,
                    session_id=session_id or "",
                )
            )
    except KeyboardInterrupt:
        progress.close()
        raise
    progress.close()
    if not _reported(results, color=color, err=ndjson, **reports):
        if shard is None:
            _failed_rows_hint(results, err=ndjson)
        sys.exit(1)


@contextmanager
def _summary_on_interrupt(*, err: bool = False) -> Iterator[RunTally]:
    """The tally of a command that runs flows; interrupted (SIGINT, SIGTERM), the command
    prints it whenever the signal came: while the flows, their inputs or a rerun's record
    are read, or the store opens, it says that no test had started."""
    from orchestrator.reporters import RunTally

    tally = RunTally()
    try:
        yield tally
    except KeyboardInterrupt:
        click.echo(tally.render(color=_color(sys.stderr if err else sys.stdout)), err=err)
        raise


def _color(stream: TextIO) -> bool:
    return stream.isatty() and "NO_COLOR" not in os.environ


def _failed_rows_hint(results: list[Any], *, err: bool) -> None:
    """A --data batch's id is in no other line a person reads, and --failed-rows needs it."""
    batches = dict.fromkeys(
        run.batch_id for run in results if run.batch_id and run.row >= 0 and run.status != "passed"
    )
    for batch_id in batches:
        click.echo(f"rerun the failed rows: baton rerun {batch_id} --failed-rows", err=err)


@cli.command()
@click.argument("target", metavar="ID")
@click.option("--failed", is_flag=True, help="Rerun the tests that failed and those they skipped.")
@click.option("--from", "start", metavar="TEST", help="Rerun TEST and every test that needs it.")
@click.option(
    "--failed-rows", is_flag=True, help="ID is a batch: rerun its failed rows in a new batch."
)
@_rerun_inputs
@click.option("--tag", "tags", multiple=True, help="Tag selection (default: the run's).")
@click.option("-c", "--concurrency", default=10, show_default=True, type=click.IntRange(1, 1000))
@report_options
@click.option("-q", "--quiet", is_flag=True, help="Only failures and the summary.")
def rerun(
    target: str,
    failed: bool,
    start: str | None,
    failed_rows: bool,
    flow: Path | None,
    concurrency: int,
    quiet: bool,
    **kwargs: Any,
) -> None:
    """Run a recorded run again, aware of the graph: --failed (the failed tests and the
    dependents they made skip), --from TEST (that test onwards), or for a batch
    --failed-rows. The other tests' captures come from the log (login is not sent again),
    unless a capture's ttl has passed. The new run records which run it continues."""
    if sum((failed, start is not None, failed_rows)) != 1:
        raise UsageError("baton rerun: give one of --failed, --from TEST or --failed-rows")
    reports = {name: kwargs.pop(name) for name in ("junit", "json_path", "html", "ctrf")}
    with _summary_on_interrupt() as tally:
        jobs = _rerun_plan(target, failed, start, failed_rows, flow, concurrency, **kwargs)
        _execute(jobs, concurrency, quiet, reports, tally)


def _rerun_plan(
    target: str,
    failed: bool,
    start: str | None,
    failed_rows: bool,
    flow: Path | None,
    concurrency: int,
    **kwargs: Any,
) -> list[Any]:
    """The jobs of ``baton rerun``, read from the record of TARGET; says what each run
    continues."""
    from datetime import UTC, datetime

    from events.secrets import Cipher, load_key
    from events.settings import Settings
    from orchestrator import continuation
    from orchestrator.rerun import Selection

    options = _options(paths=[], concurrency=concurrency, **kwargs)
    settings = Settings.from_env()
    cipher = Cipher(load_key(settings.secret_key, settings.home))
    now = datetime.now(UTC)

    async def plan(store: Any) -> continuation.Continuation:
        if failed_rows:
            return await continuation.failed_rows_jobs(
                store, cipher, target, options, flow=flow, now=now
            )
        selection = Selection(failed=failed, start=start)
        return await continuation.rerun_jobs(
            store, cipher, target, selection, options, flow=flow, now=now
        )

    planned = _with_store(plan)
    jobs = planned.jobs
    for note in planned.notes:
        click.echo(note)
    for job in jobs:
        if job.continues:
            click.echo(f"batch {job.batch_id} continues batch {job.continues}")
        for index, inputs in enumerate(job.runs):
            again = ", ".join(job.plan_of(index).order)
            click.echo(f"run {inputs.run_id} continues run {inputs.continues}: again {again}")
    return jobs


@cli.command()
@click.argument("run_id")
@click.argument("flow_file", metavar="[FLOW]", required=False, type=click.Path(path_type=Path))
@_rerun_inputs
def replay(run_id: str, flow_file: Path | None, flow: Path | None, **kwargs: Any) -> None:
    """Check the flow's current expect and capture sections against the responses stored
    in run RUN_ID, as a run would report them. No request is sent, nothing is recorded."""
    from events.secrets import Cipher, load_key
    from events.settings import Settings
    from orchestrator.replay import replay as replayed
    from orchestrator.reporters import render_summary
    from orchestrator.reporters.console import test_lines

    settings = Settings.from_env()
    cipher = Cipher(load_key(settings.secret_key, settings.home))
    options = _options(paths=[], **kwargs)
    limit = settings.excerpt_limit

    async def go(store: Any) -> Any:
        return await replayed(
            store, cipher, run_id, options, flow=flow_file or flow, excerpt_limit=limit
        )

    result = _with_store(go)
    color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    click.echo(f"replay of run {run_id} with {result.file}: no request sent, nothing recorded")
    click.echo(test_lines(result, color=color))
    click.echo(render_summary([result], color=color))
    if result.status != "passed":
        sys.exit(1)


def _until_stdout_closed(observer: Callable[..., None]) -> Callable[..., None]:
    """The observer, stopping the command (``stdout_closed``) when standard output's reader
    has gone: raised in the event writer, the error would end the writer, and the runs
    could not record their end."""

    def observe(*args: Any) -> None:
        try:
            observer(*args)
        except BrokenPipeError:
            stdout_closed()

    return observe


def _ndjson_writer() -> Callable[[str, Any, int], None]:
    """Writes each stored event as its line, flushed at once: a consumer reads it live."""
    from events.wire import ndjson_line

    def write(run_id: str, event: Any, position: int) -> None:
        click.echo(ndjson_line(run_id, event, position).decode(), nl=False)
        sys.stdout.flush()

    return write


def _shard(text: str | None, batch_id: str | None) -> Shard | None:
    """The shard ``--shard`` names; with ``--batch`` alone the whole batch (1/1); None
    for a plain local run."""
    from orchestrator.shards import Shard

    if text is None:
        return Shard(1, 1) if batch_id else None
    shard = Shard.parse(text)
    if not batch_id:
        raise UsageError(
            f"--shard {text} needs --batch ID: one id that every shard of the job shares "
            "(the CI pipeline's id), so that baton report --batch ID can merge them"
        )
    return shard


def _queued(
    url: str,
    options: Any,
    jobs: list[Any],
    batch_id: str | None,
    tally: RunTally,
    *,
    quiet: bool,
    serve: str | None,
    **reports: Path | None,
) -> None:
    """``baton run --queue``: see orchestrator.submit."""
    import uuid

    from events import open_store
    from events.secrets import Cipher, load_key
    from events.settings import Settings, mask_dsn
    from orchestrator.queue import JobQueue
    from orchestrator.reporters import ConsoleProgress
    from orchestrator.shards import Shard, ShardRun
    from orchestrator.submit import submit

    batch = ShardRun.of(jobs, Shard(1, 1), batch_id or str(uuid.uuid4()))
    color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    progress = ConsoleProgress(stream=sys.stdout, quiet=quiet, color=color)

    @_until_stdout_closed
    def ended(run_id: str, recorded: list[Any]) -> None:
        for item in recorded:
            tally(run_id, item.event)
            progress(run_id, item.event)

    async def go() -> BatchReport:
        settings = Settings.from_env()
        cipher = Cipher(load_key(settings.secret_key, settings.home))
        queue = JobQueue(url)
        try:
            # both reached before the line that says the batch is queued
            await queue.ensure_group()
            store = await open_store(settings)
        except BaseException:
            await queue.aclose()
            raise
        click.echo(f"batch {batch.batch_id}: {len(batch.units)} units queued on {mask_dsn(url)}")
        try:
            return await submit(
                store, queue, options, batch, ended, store_wait=settings.store_wait, cipher=cipher
            )
        finally:
            await store.aclose()
            await queue.aclose()

    try:
        with _served(serve, jobs):
            found = _run(go())
    except KeyboardInterrupt:
        progress.close()
        raise
    progress.close()
    _batch_reported(found, color=color, **reports)


@contextmanager
def _served(command: str | None, jobs: list[Any]) -> Iterator[None]:
    if command is None:
        yield
        return
    process = subprocess.Popen(shlex.split(command), stdout=subprocess.DEVNULL)
    try:
        _run(_answering(command, process, jobs))
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()


async def _answering(command: str, process: subprocess.Popen[bytes], jobs: list[Any]) -> None:
    """Wait until the API of ``--serve`` answers. A refused connection returns at once, so
    the probes back off (to 0.25 s apart) rather than spin a CPU for up to 30 s."""
    from orchestrator.execution import is_reachable

    deadline = time.monotonic() + 30
    pause = 0.01
    while not await is_reachable(jobs, wait=0.5):
        if process.poll() is not None:
            raise InfrastructureError(
                f"--serve: {command!r} exited with code {process.returncode} before "
                "the API answered"
            )
        if time.monotonic() > deadline:
            raise InfrastructureError(f"--serve: the API did not answer within 30 s of {command!r}")
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.25)


def _warn_insecure(jobs: list[Any]) -> None:
    """One line on stderr per flow whose tests send with ``tls.verify: false``."""
    from orchestrator.compiled import merged_tls

    for job in jobs:
        flow = job.plan.loaded.flow
        insecure = [
            name
            for name in job.plan.order
            if (tls := merged_tls(flow.defaults.tls, flow.tests[name].tls)) is not None
            and tls.verify is False
        ]
        if insecure:
            click.echo(
                f"warning: {job.plan.loaded.label}: TLS certificates are not verified "
                f"(tls.verify: false) for {', '.join(insecure)}; use tls.ca_bundle outside "
                "a test server",
                err=True,
            )
