"""The ``baton`` command. Exit codes: 0 all passed, 1 a test failed, 2 usage or validation
error, 3 infrastructure error, 128 + the signal's number when interrupted (130 SIGINT, 143
SIGTERM). A user's mistake is one readable line, never a traceback.

Errors are mapped to exit codes once, in ``main``; commands raise and let them through.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from events.errors import (
    ArchiveError,
    EventsError,
    SecretError,
    SessionError,
    SettingsError,
    StoreError,
    StoreUnavailable,
)
from orchestrator.errors import BatonError, InfrastructureError, UsageError

if TYPE_CHECKING:
    from orchestrator.batch_report import BatchReport
    from orchestrator.results import RunResult
    from orchestrator.shards import Shard

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised as Python raises KeyboardInterrupt for SIGINT.

    SIGTERM is how systemd, Docker and Kubernetes stop a process; left to its default it
    kills the process on the spot, so no ``finally`` and no atexit handler runs: the runs in
    flight never record their end and the embedded PostgreSQL is left running.
    """

    def __init__(self, signum: int) -> None:
        self.signal = signal.Signals(signum)
        super().__init__(self.signal.name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signal.value


class _Signals:
    """SIGINT and SIGTERM alike: outside an event loop each raises Interrupted at once.

    While ``_run`` runs an event loop, the first one cancels its main task instead, as
    asyncio.run does for SIGINT alone: runs in flight end with RunCancelled, their events
    are stored and what was opened is closed; ``_run`` then raises Interrupted. A second one
    (the cleaning up hangs) raises it at once.
    """

    def __init__(self) -> None:
        self.handled: tuple[signal.Signals, ...] = ()
        self.received = 0

    def __call__(self, signum: int, frame: object) -> None:
        raise Interrupted(signum)

    def cancel_on_signal(self, task: asyncio.Task[Any], signum: int) -> None:
        if self.received:
            raise Interrupted(signum)
        self.received = signum
        task.cancel()


_signals = _Signals()


@contextmanager
def _handled_signals() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # the in-process tests call main() from threads, where no handler can be set
        return
    previous = {}
    for signum, default in (
        (signal.SIGINT, signal.default_int_handler),
        (signal.SIGTERM, signal.SIG_DFL),
    ):
        # a signal the parent made us ignore (`cmd &` in a script ignores SIGINT) stays so
        if signal.getsignal(signum) is default:
            previous[signum] = signal.signal(signum, _signals)
    _signals.handled = tuple(previous)
    try:
        yield
    finally:
        _signals.handled = ()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, where SIGTERM cancels the main task as SIGINT does (see ``_Signals``)."""

    async def cancellable() -> T:
        # through the loop, not signal.signal: a signal that lands in another thread (the
        # embedded PostgreSQL starts in one) still wakes the loop at once
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        watched = _signals.handled if threading.current_thread() is threading.main_thread() else ()
        for signum in watched:
            loop.add_signal_handler(signum, _signals.cancel_on_signal, task, signum)
        try:
            return await main
        finally:
            for signum in watched:
                loop.remove_signal_handler(signum)
                signal.signal(signum, _signals)

    _signals.received = 0
    try:
        result = asyncio.run(cancellable())
    except asyncio.CancelledError:
        if _signals.received:
            raise Interrupted(_signals.received) from None
        raise
    if _signals.received:  # it came as the work ended: still the user's stop
        raise Interrupted(_signals.received)
    return result


def main() -> None:
    with _handled_signals():
        try:
            cli.main(standalone_mode=False, prog_name="baton")
        except click.exceptions.Abort as exc:
            # click turns a KeyboardInterrupt into Abort
            _interrupted(exc.__cause__)
        except click.ClickException as exc:
            exc.show()
            sys.exit(2)
        except (BatonError, EventsError) as exc:
            code, message = _failure(exc)
            for line in message.splitlines():
                click.echo(f"error: {line}", err=True)
            sys.exit(code)
        except KeyboardInterrupt as exc:
            _interrupted(exc)


def _failure(exc: BatonError | EventsError) -> tuple[int, str]:
    """The exit code and message of an error that ends a command: 2 for what the user gave
    (flows, options, a BATON_* variable, the secret key), 3 for what failed outside the
    flows (the event store, the cache, a server); a BatonError says which it is."""
    if isinstance(exc, BatonError):
        return exc.exit_code, str(exc)
    if isinstance(exc, SettingsError | SecretError | SessionError | ArchiveError):
        return 2, str(exc)
    if isinstance(exc, StoreUnavailable):
        return 3, f"event store unavailable: {exc}"
    if isinstance(exc, StoreError):
        return 3, f"event store failed: {exc}"
    return 3, str(exc)


def _interrupted(cause: BaseException | None) -> None:
    if isinstance(cause, Interrupted):
        click.echo(f"interrupted by {cause.signal.name}", err=True)
        sys.exit(cause.exit_code)
    click.echo("interrupted", err=True)
    sys.exit(128 + signal.SIGINT)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="baton")
def cli() -> None:
    """Run chains of dependent HTTP API tests, recording every step as events."""


def _environment_names(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[click.shell_completion.CompletionItem]:
    """``--env`` completes the environments of env/ in the working directory (where
    ``baton init`` puts them; the flows named before it are not parsed yet when an
    option's value is completed, so env/ beside them is out of reach)."""
    names = {found.stem for pattern in ("*.yaml", "*.yml") for found in Path("env").glob(pattern)}
    return [
        click.shell_completion.CompletionItem(name)
        for name in sorted(names)
        if name.startswith(incomplete)
    ]


def _variable_options() -> list[Callable[[F], F]]:
    """--var and --secrets: what a run reads besides its files."""
    return [
        click.option("--var", "variables", multiple=True, help="Set a variable: name=value."),
        click.option(
            "--secrets",
            "secrets_file",
            type=click.Path(path_type=Path),
            help="YAML file of secrets (read as secrets.NAME).",
        ),
    ]


def flow_options(function: F) -> F:
    options = [
        click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path)),
        click.option(
            "--env",
            "environment",
            help="Environment: env/NAME.yaml or a file.",
            shell_complete=_environment_names,
        ),
        *_variable_options(),
        click.option(
            "--data",
            "data_file",
            type=click.Path(path_type=Path),
            help="CSV or JSON rows: one run per row.",
        ),
        click.option(
            "--tag", "tags", multiple=True, help="Only tests with this tag, and what they need."
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def report_options(function: F) -> F:
    options = [
        click.option("--junit", type=click.Path(path_type=Path), help="Write a JUnit XML report."),
        click.option(
            "--json", "json_path", type=click.Path(path_type=Path), help="Write a JSON report."
        ),
        click.option("--html", type=click.Path(path_type=Path), help="Write an HTML report."),
        click.option(
            "--ctrf",
            type=click.Path(path_type=Path),
            help="Write a CTRF JSON report (Common Test Report Format).",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _options(**kwargs: Any) -> Any:
    from orchestrator.execution import Options
    from orchestrator.inputs import parse_vars

    kwargs["variables"] = parse_vars(kwargs["variables"])
    return Options(**kwargs)


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
    from orchestrator import execution

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
        _queued(queue_url, options, jobs, batch_id, quiet=quiet, serve=serve, **reports)
        return
    ndjson = events_format is not None
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
    from orchestrator.reporters import ConsoleProgress, RunTally

    human = sys.stderr if ndjson else sys.stdout
    color = human.isatty() and "NO_COLOR" not in os.environ
    progress = ConsoleProgress(stream=human, quiet=quiet, color=color)
    tally = RunTally()
    stream_event = _ndjson_writer() if ndjson else None

    def observe(run_id: str, event: Any) -> None:
        progress(run_id, event)
        tally(run_id, event)

    try:
        with _served(serve, jobs):
            results = _run(
                execution.execute(
                    jobs,
                    Settings.from_env(),
                    concurrency=concurrency,
                    observer=observe,
                    placed=stream_event,
                    shard=shard,
                    session_id=session_id or "",
                )
            )
    except KeyboardInterrupt:
        progress.close()
        click.echo(tally.render(color=color), err=ndjson)
        raise
    progress.close()
    if not _reported(results, color=color, err=ndjson, **reports):
        sys.exit(1)


def _rerun_inputs(function: F) -> F:
    """What a rerun or a replay may give again instead of what the run recorded."""
    options = [
        click.option(
            "--flow",
            type=click.Path(path_type=Path),
            help="The flow file (default: the one the run recorded, as given then).",
        ),
        click.option("--env", "environment", help="Environment (default: the run's)."),
        *_variable_options(),
        click.option(
            "--data",
            "data_file",
            type=click.Path(path_type=Path),
            help="A batch's data file (default: the one it recorded).",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


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
    from datetime import UTC, datetime

    from events.secrets import Cipher, load_key
    from events.settings import Settings
    from orchestrator import continuation
    from orchestrator.rerun import Selection

    if sum((failed, start is not None, failed_rows)) != 1:
        raise UsageError("baton rerun: give one of --failed, --from TEST or --failed-rows")
    reports = {name: kwargs.pop(name) for name in ("junit", "json_path", "html", "ctrf")}
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
    _execute(jobs, concurrency, quiet, reports)


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


def _queued(
    url: str,
    options: Any,
    jobs: list[Any],
    batch_id: str | None,
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
    from orchestrator.reporters import ConsoleProgress, RunTally
    from orchestrator.shards import Shard, ShardRun
    from orchestrator.submit import submit

    batch = ShardRun.of(jobs, Shard(1, 1), batch_id or str(uuid.uuid4()))
    color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    progress = ConsoleProgress(stream=sys.stdout, quiet=quiet, color=color)
    tally = RunTally()

    def ended(run_id: str, recorded: list[Any]) -> None:
        for item in recorded:
            progress(run_id, item.event)
            tally(run_id, item.event)

    async def go() -> BatchReport:
        queue = JobQueue(url)
        settings = Settings.from_env()
        store = await open_store(settings)
        cipher = Cipher(load_key(settings.secret_key, settings.home))
        try:
            return await submit(
                store, queue, options, batch, ended, store_wait=settings.store_wait, cipher=cipher
            )
        finally:
            await store.aclose()
            await queue.aclose()

    click.echo(f"batch {batch.batch_id}: {len(batch.units)} units queued on {mask_dsn(url)}")
    try:
        with _served(serve, jobs):
            found = _run(go())
    except KeyboardInterrupt:
        progress.close()
        click.echo(tally.render(color=color))
        raise
    progress.close()
    _batch_reported(found, color=color, **reports)


@cli.command()
@click.option(
    "--queue",
    "queue_url",
    required=True,
    envvar="BATON_QUEUE_URL",
    metavar="URL",
    help="The queue baton run --queue and the service (BATON_QUEUE_URL) submit to:"
    " redis://HOST:PORT/DB.",
)
@click.option(
    "-c",
    "--concurrency",
    default=4,
    show_default=True,
    type=click.IntRange(1, 1000),
    help="Jobs (runs) at once.",
)
@click.option(
    "--drain-timeout",
    default=30.0,
    show_default=True,
    type=click.FloatRange(0),
    help="Seconds a stopped worker gives its jobs to finish before handing them back.",
)
@click.option(
    "--claim-after",
    default=30.0,
    show_default=True,
    type=click.FloatRange(0.1),
    help="Seconds after which a job its worker stopped touching is claimed by another.",
)
@click.option(
    "--max-deliveries",
    default=3,
    show_default=True,
    type=click.IntRange(1),
    help="Handed out more often than this, a job ends its run as failed.",
)
def worker(
    queue_url: str,
    concurrency: int,
    drain_timeout: float,
    claim_after: float,
    max_deliveries: int,
) -> None:
    """Run the jobs of baton run --queue and of the service's runs (BATON_QUEUE_URL), each
    run's events in the one event store (BATON_DATABASE_URL). Start it in the root of the
    same checkout. SIGTERM or SIGINT: no new jobs, those in flight finish (up to
    --drain-timeout), then it exits."""
    import logging

    from events.settings import Settings
    from orchestrator.worker import WorkerOptions, work

    logging.basicConfig(stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("baton").setLevel(logging.INFO)
    options = WorkerOptions(concurrency, drain_timeout, claim_after, max_deliveries)
    settings = Settings.from_env()
    _run(_until_stopped(lambda stop: work(queue_url, settings, options, stop)))


async def _until_stopped(main: Callable[[asyncio.Event], Awaitable[T]]) -> T:
    """``main(stop)``, where the first SIGINT or SIGTERM sets ``stop`` instead of cancelling
    (a worker drains) and a second one stops at once; either way the command then exits as
    interrupted by the first (128 + its number)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    stop = asyncio.Event()

    def stopping(signum: int) -> None:
        if stop.is_set():
            _signals.cancel_on_signal(task, signum)
            return
        _signals.received = signum
        stop.set()

    if threading.current_thread() is threading.main_thread():
        for signum in _signals.handled:
            loop.add_signal_handler(signum, stopping, signum)
    return await main(stop)


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


@cli.command()
@flow_options
def validate(**kwargs: Any) -> None:
    """Check flow files without sending a request."""
    from orchestrator import execution

    jobs = execution.prepare(_options(**kwargs))
    for job in jobs:
        tests = len(job.plan.order)
        setups = "".join(f", setup {setup.label}" for setup in job.setups)
        click.echo(f"{job.plan.loaded.label}: ok ({tests} tests, {len(job.runs)} run(s){setups})")


@cli.command()
@flow_options
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "mermaid", "dot"]),
    default="text",
    show_default=True,
)
def graph(fmt: str, **kwargs: Any) -> None:
    """Print the dependency plan of flow files (checked as baton validate checks them)."""
    from orchestrator import execution
    from orchestrator.graphs import render_graph

    for job in execution.prepare(_options(**kwargs)):
        click.echo(render_graph(job.plan, fmt, [setup.label for setup in job.setups]))


@cli.command("plan")
@flow_options
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the plan as JSON: tests, dependencies and their kind, what each needs.",
)
def plan_command(as_json: bool, **kwargs: Any) -> None:
    """Print the plan of flow files (checked as baton validate checks them); with --json
    as data for tools and coding agents (docs/ci.md)."""
    from orchestrator import execution
    from orchestrator.graphs import render_graph
    from orchestrator.plan_export import encode_plans

    jobs = execution.prepare(_options(**kwargs))
    if as_json:
        click.echo(encode_plans((job.plan, len(job.runs)) for job in jobs).decode())
        return
    for job in jobs:
        click.echo(render_graph(job.plan, "text", [setup.label for setup in job.setups]))


@cli.command()
@click.argument("directory", default=".", type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", help="The flow's name (its file: flows/NAME.yaml).  [default: api]")
@click.option(
    "--base-url",
    help="The API's address, for env/local.yaml; asked on a terminal.  "
    "[default: http://127.0.0.1:8765]",
)
@click.option(
    "--ci",
    type=click.Choice(["github", "gitlab", "none"]),
    default="github",
    show_default=True,
    help="The CI file: .github/workflows/baton.yml or .gitlab-ci.yml.",
)
@click.option("--force", is_flag=True, help="Overwrite files that exist.")
def init(directory: Path, name: str | None, base_url: str | None, ci: str, force: bool) -> None:
    """Scaffold a project in DIRECTORY: a login-then-use flow, env/local.yaml and a CI
    file. On a terminal it asks for what the options do not give; elsewhere it asks
    nothing. It refuses to overwrite a file unless --force."""
    from orchestrator.scaffold import DEFAULT_BASE_URL, Scaffold

    if base_url is None:
        base_url = DEFAULT_BASE_URL
        # a pipe, CI or a closed standard input (None) has nobody to answer
        if sys.stdin is not None and sys.stdin.isatty():
            base_url = click.prompt("Base URL of the API", default=DEFAULT_BASE_URL)
    scaffold = Scaffold(directory, name or "api", base_url, ci)  # type: ignore[arg-type]
    for path in scaffold.write(force=force):
        click.echo(f"wrote {path}")
    where = "" if directory == Path(".") else f"cd {directory} && "
    click.echo(f"next: {where}baton validate flows/ && baton run flows/ --env local")


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

    async def apply(store: Any) -> list[str]:
        cache = open_cache(Settings.from_env())
        try:
            report = await apply_retention(store, _archive_dir(), now, dry_run=dry_run, cache=cache)
        finally:
            await cache.aclose()
        return report.lines()

    click.echo("\n".join(_with_store(apply)))


@retention.command("set")
@click.argument("project")
@click.option("--passed-days", type=click.IntRange(min=1), help="Keep passed runs this long.")
@click.option("--failed-days", type=click.IntRange(min=1), help="Keep other ended runs this long.")
@click.option("--metrics-days", type=click.IntRange(min=1), help="Keep monthly metrics this long.")
@click.option("--context-hours", type=click.IntRange(min=1), help="Keep run contexts this long.")
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


@cli.command()
@click.argument("run_id")
@click.option(
    "--supabase",
    is_flag=True,
    help="Follow through Supabase Realtime (SUPABASE_URL, SUPABASE_KEY).",
)
@click.option(
    "--url",
    envvar="BATON_URL",
    default="http://127.0.0.1:8000",
    show_default=True,
    help="The Baton service (BATON_URL).",
)
@click.option(
    "--key", envvar="BATON_API_KEY", help="An API key with the read scope (BATON_API_KEY)."
)
def watch(run_id: str, supabase: bool, url: str, key: str | None) -> None:
    """Follow a run live until it ends, one line per change."""
    # the service's client side: imported only by the command that needs it
    if supabase:
        from context_service.supabase import format_change, watch_supabase

        supabase_url, supabase_key = os.environ.get("SUPABASE_URL"), os.environ.get("SUPABASE_KEY")
        if not supabase_url or not supabase_key:
            raise UsageError("--supabase needs SUPABASE_URL and SUPABASE_KEY in the environment")
        try:
            _run(
                watch_supabase(
                    supabase_url,
                    supabase_key,
                    run_id,
                    lambda change: click.echo(format_change(change)),
                )
            )
        except ValueError as exc:  # the run id is not a UUID
            raise UsageError(str(exc)) from exc
        return
    from context_service.watch import watch_stream
    from orchestrator.inspect import format_event

    if not key:
        raise UsageError("watch needs an API key: --key or BATON_API_KEY (baton keys create)")
    _run(
        watch_stream(
            url,
            key,
            run_id,
            lambda position, kind, event: click.echo(format_event(position, kind, event)),
        )
    )


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
def serve(host: str, port: int) -> None:
    """Start the service: REST API, realtime streams, dashboard (OpenAPI at /schema).
    SIGINT or SIGTERM stops it: runs in flight end as cancelled."""
    from context_service.server import serve as run_service
    from events.settings import Settings

    run_service(host, port, Settings.from_env())


@cli.group()
def keys() -> None:
    """API keys of the service."""


@keys.command("create")
@click.option(
    "--org",
    "organization",
    default="default",
    show_default=True,
    help="The organization (a slug; created if missing).",
)
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    default=["read", "run"],
    show_default=True,
    type=click.Choice(["read", "run", "admin"]),
    help="Repeat for several.",
)
@click.option("--name", default="", help="What the key is for.")
def create_key(organization: str, scopes: tuple[str, ...], name: str) -> None:
    """Create a key and print it, once: it is stored only as a hash."""
    from context_service.keys import create_key as create
    from events.settings import Settings

    settings = Settings.from_env()
    click.echo(_run(create(settings, organization=organization, scopes=list(scopes), name=name)))


@cli.group()
def batch() -> None:
    """Batches on a queue (baton run --queue)."""


@batch.command("requeue")
@click.argument("batch_id")
@click.option(
    "--queue", "queue_url", required=True, metavar="URL", help="The queue: redis://HOST:PORT/DB."
)
def requeue_batch(batch_id: str, queue_url: str) -> None:
    """Queue the runs of BATCH_ID that have not ended again, from the event log alone:
    after Redis lost the jobs and the submitter is gone. Workers resume each run from its
    events; follow it with baton report --batch BATCH_ID."""
    from events import open_store
    from events.secrets import Cipher, load_key
    from events.settings import Settings, mask_dsn
    from orchestrator.queue import JobQueue
    from orchestrator.submit import requeue

    async def go() -> tuple[int, int]:
        settings = Settings.from_env()
        cipher = Cipher(load_key(settings.secret_key, settings.home))
        queue = JobQueue(queue_url)
        store = await open_store(settings)
        try:
            return await requeue(store, queue, cipher, batch_id)
        finally:
            await store.aclose()
            await queue.aclose()

    queued, ended = _run(go())
    click.echo(
        f"batch {batch_id}: {queued} runs queued again on {mask_dsn(queue_url)} ({ended} had ended)"
    )


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


def _with_dsn(action: Callable[[str], Any]) -> str:
    from events.embedded import start_embedded
    from events.settings import Settings

    async def go() -> str:
        settings = Settings.from_env()
        dsn = settings.database_url or await start_embedded(settings.home)
        return str(await action(dsn))

    return _run(go())


def _with_store(action: Callable[[Any], Awaitable[T]]) -> T:
    from events import open_store
    from events.settings import Settings

    async def go() -> T:
        store = await open_store(Settings.from_env())
        try:
            return await action(store)
        finally:
            await store.aclose()

    return _run(go())


@cli.command()
def mcp() -> None:
    """Serve Baton's tools to a coding agent over MCP on standard input and output
    (validate_flow, run_flow, run_failures, run_context; docs/agents.md)."""
    from orchestrator.mcp_server import serve as serve_mcp

    serve_mcp()


@cli.command()
@click.argument("kind", type=click.Choice(["flow", "events"]))
def schema(kind: str) -> None:
    """Print the JSON Schema of flow files or of the event stream (docs/agents.md); the
    same as docs/flow.schema.json and docs/events.schema.json."""
    from orchestrator.schemas import schema_text

    click.echo(schema_text(kind), nl=False)


@cli.command("import")
@click.argument("kind", type=click.Choice(["openapi", "postman", "curl", "har"]))
@click.argument("source", metavar="SOURCE")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the flow to this file (default: standard output).",
)
@click.option(
    "--host",
    "hosts",
    multiple=True,
    metavar="HOST",
    help="har: keep only the requests to this host (repeatable).",
)
def import_(kind: str, source: str, output: Path | None, hosts: tuple[str, ...]) -> None:
    """Write a flow file from an OpenAPI document, a Postman collection, curl commands or a
    HAR file (SOURCE; - for standard input). What cannot be translated is listed on
    standard error, each with its place in SOURCE."""
    from orchestrator.importers import Imported, converter

    if hosts and kind != "har":
        raise UsageError(f"--host filters the requests of a HAR file, not of {kind}: remove it")
    if source == "-":
        text, name = sys.stdin.read(), "<stdin>"
    else:
        try:
            text, name = Path(source).read_text(encoding="utf-8"), source
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"{source}: cannot read it ({exc.__class__.__name__})") from None
    imported: Imported
    try:
        if hosts:
            from orchestrator.importers.har import convert as convert_har

            imported = convert_har(text, name, hosts=hosts)
        else:
            imported = converter(kind)(text, name)
        flow_text = imported.yaml()
    except RecursionError:
        # JSON nested thousands deep: no collection or recording is shaped so
        raise UsageError(f"{name}: nested too deeply to import (split or flatten it)") from None
    for part in imported.untranslated:
        click.echo(f"not translated: {name}: {part}", err=True)
    for secret, where in imported.secrets.items():
        click.echo(
            f"secret to provide: {secret} (the value found at {name}: {where}); "
            f"export {secret}=... or put it in the file given with --secrets",
            err=True,
        )
    if output is None:
        click.echo(flow_text, nl=False)
    else:
        try:
            output.write_text(flow_text, encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"{output}: cannot write the flow ({exc.strerror})") from None
    tests = len(imported.flow.get("tests", {}))
    left = f"; {len(imported.untranslated)} part(s) not translated" if imported.untranslated else ""
    click.echo(f"imported {tests} test(s) from {name}{left}", err=True)


__all__ = ["UsageError", "cli", "main"]


if __name__ == "__main__":
    main()
