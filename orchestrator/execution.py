"""One invocation of ``baton run``: static checks for every flow, then every run at once.

``prepare`` reads and checks everything before a request is sent; ``execute`` opens the
event store, runs every (flow, row) pair concurrently within the concurrency limit, and
closes what it opened.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx

from events import types as ev
from events.settings import Settings
from orchestrator import templating
from orchestrator.errors import InfrastructureError, Problem, UsageError
from orchestrator.inputs import environment_file, read_mapping, read_rows, read_secrets
from orchestrator.loader import LoadedFlow, find_flows, load_flow, with_services
from orchestrator.planner import Plan, Scope, plan
from orchestrator.results import RunResult
from orchestrator.runner import Observer, Resume, RunInputs, Runner, initial_namespace
from orchestrator.services import Clock, Health, ResolvedService, resolve
from orchestrator.services import check as check_service
from orchestrator.targets import TargetPolicy

if TYPE_CHECKING:
    from events.store import EventStore
    from orchestrator.setups import Setup, SetupRuns
    from orchestrator.shards import ShardRun

LIVE_RUNS = 500
"""Runs of ``baton run`` live at once, at least (see ``execute``)."""


@dataclass(frozen=True)
class Options:
    paths: Sequence[Path]
    environment: str | None = None
    variables: Mapping[str, str] = field(default_factory=dict)
    secrets_file: Path | None = None
    data_file: Path | None = None
    tags: Sequence[str] = ()
    concurrency: int = 10


@dataclass(frozen=True)
class Job:
    """A flow and the runs to make of it: one, or one per data row (a batch)."""

    plan: Plan
    runs: list[RunInputs]
    batch_id: str = ""
    data: str = ""
    """The data file of a batch, as given (BatchStarted.data)."""
    continues: str = ""
    """The batch whose failed rows this one reruns (BatchStarted.continues)."""
    row_plans: tuple[Plan, ...] = ()
    """Each run's own plan (a rerun's rows each run again what failed in them); empty:
    every run runs ``plan``."""

    setups: tuple[Setup, ...] = ()
    """The shared setups (``use:``) its flow uses: run once, before its runs."""

    def plan_of(self, index: int) -> Plan:
        return self.row_plans[index] if self.row_plans else self.plan


def prepare(options: Options, environ: Mapping[str, str] = os.environ) -> list[Job]:
    """Every static check of every flow; raises UsageError listing all problems."""
    from orchestrator.setups import SetupResolver, shared_names

    secrets = read_secrets(options.secrets_file, environ)
    rows: list[dict[str, Any]] = (
        read_rows(options.data_file) if options.data_file is not None else [{}]
    )

    def load(path: Path) -> tuple[LoadedFlow, dict[str, Any]]:
        loaded = load_flow(path)
        env_vars: dict[str, Any] = {}
        if options.environment:
            env_file = environment_file(options.environment, loaded.base_dir)
            env_vars = read_mapping(env_file, "the environment file")
            if "services" in env_vars:
                loaded = with_services(loaded, env_vars.pop("services"), str(env_file))
        return loaded, env_vars

    def plan_flow(
        loaded: LoadedFlow,
        env_vars: dict[str, Any],
        shared: dict[str, str],
        columns: Collection[str],
        tags: Collection[str] = (),
    ) -> Plan:
        names = {*loaded.flow.variables, *env_vars, *columns, *options.variables}
        return plan(loaded, Scope(names, environ, secrets, shared), tags)

    def inputs_of(loaded: LoadedFlow, env_vars: dict[str, Any]) -> RunInputs:
        return RunInputs(
            variables={**loaded.flow.variables, **env_vars, **options.variables},
            env=environ,
            secrets=secrets,
            environment=options.environment or "",
            tags=tuple(options.tags),
        )

    def plan_rows(loaded: LoadedFlow, env_vars: dict[str, Any], shared: dict[str, str]) -> Plan:
        """The plan of the first row's columns, checked against every row's: a JSON row may
        lack a column another has, and what the flow reads must be there in each."""
        kinds = _column_sets(rows)
        plans = []
        for number, columns in kinds:
            try:
                plans.append(plan_flow(loaded, env_vars, shared, columns, options.tags))
            except UsageError as exc:
                if len(kinds) == 1:
                    raise
                where = f"data row {number} of {options.data_file}"
                raise UsageError(
                    [
                        replace(p, where=", ".join(filter(None, (p.where, where))))
                        for p in exc.problems
                    ]
                    or str(exc)
                ) from None
        return plans[0]

    # a setup runs whole, whatever --tag selects of the flows using it
    resolver = SetupResolver(load, plan_flow, inputs_of, rows[0])
    jobs: list[Job] = []
    problems: list[Problem] = []
    for path in find_flows(list(options.paths)):
        try:
            loaded, env_vars = load(path)
            setups = resolver.uses(loaded)
            flow_plan = plan_rows(loaded, env_vars, shared_names(setups))
        except UsageError as exc:
            problems.extend(exc.problems or [Problem(str(path), "", str(exc))])
            continue
        batch_id = str(ev.new_id()) if options.data_file is not None else ""
        runs = [
            RunInputs(
                variables={**loaded.flow.variables, **env_vars, **row, **options.variables},
                env=environ,
                secrets=secrets,
                environment=options.environment or "",
                row=index + 1 if batch_id else -1,
                batch_id=batch_id,
                tags=tuple(options.tags),
            )
            for index, row in enumerate(rows)
        ]
        data = str(options.data_file) if batch_id else ""
        jobs.append(Job(flow_plan, runs, batch_id, data, setups=setups))
    if problems:
        raise UsageError(_unique(problems))
    return jobs


def _column_sets(rows: list[dict[str, Any]]) -> list[tuple[int, frozenset[str]]]:
    """Each set of columns the rows have, with the first row (from 1) that has it."""
    seen: dict[frozenset[str], int] = {}
    for number, row in enumerate(rows, start=1):
        seen.setdefault(frozenset(row), number)
    return [(number, columns) for columns, number in seen.items()]


def _unique(problems: list[Problem]) -> list[Problem]:
    """A setup's file used by several flows reports its problems once."""
    return list(dict.fromkeys(problems))


async def execute(
    jobs: list[Job],
    settings: Settings,
    *,
    concurrency: int = 10,
    observer: Observer | None = None,
    placed: PlacedObserver | None = None,
    shard: ShardRun | None = None,
    clock: Clock | None = None,
    session_id: str = "",
) -> list[RunResult]:
    """Run every job; with ``shard``, the jobs are its units', and its start and end are
    recorded on the batch's stream around them. Before any run, each declared service with
    a health path is checked (``check_health``). ``clock``: what rate limits and health
    checks wait with (tests pass one that does not wait). ``session_id``: the runs start in
    that test session, admitted all at once before any health check or request (a paused
    session refuses them: SessionRefused)."""
    from events import open_store
    from events.owners import Owner
    from events.secrets import Cipher, load_key
    from events.store import StoreError
    from events.writer import BatchingWriter
    from orchestrator.setups import SetupRuns

    await _check_reachable([*jobs, *setup_jobs(jobs)])
    cipher = Cipher(load_key(settings.secret_key, settings.home))
    store = await open_store(settings)
    # this process owns the runs it writes: it beats, and ends the runs of owners that
    # stopped beating (a baton run or service killed mid-run) before its own begin
    owner = Owner(store, timeout=settings.owner_timeout)
    try:
        await owner.start()
    except BaseException:
        await store.aclose()
        raise
    writer = BatchingWriter(
        owner, max_wait=settings.store_wait, on_stored=_observe(observer, placed)
    )
    transport = make_transport(concurrency)
    runner = Runner(
        writer=writer,
        cipher=cipher,
        transport=transport,
        concurrency=concurrency,
        clock=clock,
        excerpt_limit=settings.excerpt_limit,
    )
    # The read tables follow the run live (realtime subscribers watch them), projected in
    # this process as appends commit; when the run ends only the tail is left to project.
    # One projector: its page's transaction reads and writes on its own connection only.
    from events.projections import Projector

    projector = Projector(store)
    stop = asyncio.Event()
    following = asyncio.create_task(projector.serve(stop=stop))
    try:
        if session_id:
            jobs = await _admitted(store, session_id, jobs)
        refusal = await check_health([*jobs, *setup_jobs(jobs)], runner)
        if refusal:
            await writer.aclose()
            await projector.catch_up()
            raise InfrastructureError(refusal)
        start = time.perf_counter()
        if shard is not None:
            await append_shared(store, ev.batch_stream(shard.batch_id), shard.started())
        # At most LIVE_RUNS runs (or twice the requests in flight, if more) at once, each
        # lane taking the next data row as its run ends: a run holds its client, redactor,
        # namespace and prepared request while it lives, and 5,000 rows started together
        # held 5,000 of them (peak RSS 224 MB against 94 MB on 500 rows). Fewer live runs
        # cost wall time here: 20 lanes took 11.1 s on 500 rows at -c 10, against 7.7 s
        # for all 500 at once (bench/README.md).
        lanes = max(LIVE_RUNS, 2 * concurrency)
        live = asyncio.Semaphore(lanes)
        setups = SetupRuns(runner)
        batches = [_run_job(runner, writer, job, live, lanes, setups) for job in jobs]
        try:
            results = [result for group in await asyncio.gather(*batches) for result in group]
            # each setup once, before the runs using it: a CI user whose login failed
            # sees that failure, not only the tests it skipped
            results = [*setups.results(), *results]
        finally:
            # interrupted too (cancelled): what the runs emitted, RunCancelled included,
            # is stored before the store closes
            await writer.aclose()
        if shard is not None:
            duration = (time.perf_counter() - start) * 1000
            await append_shared(
                store, ev.batch_stream(shard.batch_id), shard.completed(results, duration)
            )
        stop.set()
        await following
        await projector.catch_up()
    except StoreError as exc:
        # not left to the CLI's mapping: the message says that the runs had begun
        raise InfrastructureError(f"event store failed during the run: {exc}") from exc
    finally:
        stop.set()
        following.cancel()
        await asyncio.gather(following, return_exceptions=True)
        await transport.aclose()
        await owner.aclose()
        await store.aclose()
    return results


async def append_shared(store: EventStore, stream: str, event: ev.Event) -> None:
    """Append to a stream other processes append to as well (a batch's, which every shard
    writes): at whatever version it has reached. No shard's event depends on another's,
    so there is nothing for an expected version to protect; it would only make shards
    that start at once conflict. The store gives each append the stream's next version."""
    from events.store import ANY_VERSION, NewEvent, StreamAppend

    await store.append([StreamAppend(stream, [NewEvent(event)], ANY_VERSION)])


async def _admitted(store: EventStore, session_id: str, jobs: list[Job]) -> list[Job]:
    """The jobs with their runs in the session, once it has admitted them all."""
    from events import sessions

    await sessions.admit(store, session_id, [run.run_id for job in jobs for run in job.runs])
    return [
        replace(job, runs=[replace(run, session_id=session_id) for run in job.runs]) for job in jobs
    ]


def _services(job: Job) -> dict[str, ResolvedService]:
    """The job's services as its first run renders them (rows of a batch that send one to
    another host are not checked: their tests run)."""
    try:
        return resolve(job.plan.loaded.flow, initial_namespace(job.runs[0]))
    except templating.TemplateError:
        return {}  # the run itself reports it, test by test


async def health_checked(runner: Runner, plan: Plan, inputs: RunInputs) -> RunInputs:
    """A run's inputs once its services' health is checked (docs/flow-format.md#services),
    for a run with no exit code to give (the service's, on its process or a worker): an
    unhealthy service's tests are skipped by the runner; with ``on_unhealthy: abort``,
    every test is skipped with the reason and the run fails."""
    refusal = await check_health([Job(plan, [inputs])], runner)
    if not refusal:
        return inputs
    return replace(inputs, resume=Resume(0, {}, {}, failure=refusal))


async def check_health(jobs: list[Job], runner: Runner) -> str:
    """Check every service with a health path once, record each check as a
    ServiceHealthChecked and keep it in ``runner.health``. Returns why the runs must not
    start (a service with ``on_unhealthy: abort`` failed), or "" to go on."""
    from events.secrets import Redactor

    checks: dict[tuple[str, str], tuple[Job, asyncio.Task[Health]]] = {}
    for job in jobs:
        for service in _services(job).values():
            if service.spec.health is not None and service.key not in checks:
                task = asyncio.create_task(
                    check_service(service, runner.transport, runner.limiters.clock)
                )
                checks[service.key] = (job, task)
    if not checks:
        return ""
    await asyncio.gather(*(task for _, task in checks.values()))
    stream = ev.health_stream(str(ev.new_id()))
    refusals = []
    for key, (job, task) in checks.items():
        health = task.result()
        runner.health[key] = health
        inputs = job.runs[0]
        # what a run of the job masks: the secrets its flow reads, not every variable
        # of the environment that secrets.* could read
        read = [inputs.secrets[name] for name in job.plan.secret_names if name in inputs.secrets]
        redactor = Redactor([*read, *inputs.hidden])
        flow = job.plan.loaded.flow
        project = flow.project if inputs.project is None else inputs.project
        runner.writer.emit(
            stream,
            health.event(
                redactor,
                project=project,
                organization=inputs.organization,
                suite=flow.name,
                session_id=inputs.session_id,
            ),
        )
        if not health.usable and health.service.spec.on_unhealthy == "abort":
            refusals.append(
                f"{redactor.redact(health.reason)}; no test was run (on_unhealthy: abort)"
            )
    return "\n".join(refusals)


PlacedObserver = Callable[[str, ev.Event, int], None]
"""Called with (run id, event, its log position) once the event is stored."""


def _observe(
    observer: Observer | None, placed: PlacedObserver | None = None
) -> Callable[[str, ev.Event, int], None] | None:
    """The writer's on_stored for the observers: a run's events, by run id, once stored
    (and with their log position for ``placed``)."""
    if observer is None and placed is None:
        return None
    prefix = ev.run_stream("")

    def stored(stream: str, event: ev.Event, position: int) -> None:
        if stream.startswith(prefix):
            run_id = stream[len(prefix) :]
            if placed is not None:
                placed(run_id, event, position)
            if observer is not None:
                observer(run_id, event)

    return stored


def setup_jobs(jobs: list[Job]) -> list[Job]:
    """The setups the jobs use, each once (theirs too), as jobs of one run: what is
    checked before any run (reachable, healthy) as the jobs are."""
    seen: dict[int, Job] = {}
    pending = [setup for job in jobs for setup in job.setups]
    while pending:
        setup = pending.pop()
        if id(setup) not in seen:
            seen[id(setup)] = Job(setup.plan, [setup.inputs], setups=setup.uses)
            pending.extend(setup.uses)
    return list(seen.values())


async def _run_all(
    runner: Runner, job: Job, live: asyncio.Semaphore, lanes: int, setups: SetupRuns
) -> list[RunResult]:
    """The job's runs in row order, each lane taking the next row as its run ends: a task
    per lane, not per row (5,000 rows waiting held 5,000 tasks). ``live`` bounds the runs
    of every job together."""
    results: dict[int, RunResult] = {}
    rows = iter(enumerate(job.runs))

    async def lane() -> None:
        for index, inputs in rows:
            inputs = await setups.inputs(inputs, job.setups)
            async with live:
                results[index] = await runner.run(job.plan_of(index), inputs)

    await asyncio.gather(*(lane() for _ in range(min(lanes, len(job.runs)))))
    return [results[index] for index in range(len(job.runs))]


async def _run_job(
    runner: Runner,
    writer: Any,
    job: Job,
    live: asyncio.Semaphore,
    lanes: int,
    setups: SetupRuns,
) -> list[RunResult]:
    if not job.batch_id:
        return await _run_all(runner, job, live, lanes, setups)
    stream = ev.batch_stream(job.batch_id)
    source = str(job.plan.loaded.path)
    writer.emit(
        stream,
        ev.BatchStarted(
            batch_id=job.batch_id,
            suite=job.plan.loaded.flow.name,
            source=source,
            runs=[run.run_id for run in job.runs],
            continues=job.continues,
            data=job.data,
        ),
    )
    start = time.perf_counter()
    results = await _run_all(runner, job, live, lanes, setups)
    passed = sum(1 for result in results if result.status == "passed")
    writer.emit(
        stream,
        ev.BatchCompleted(
            batch_id=job.batch_id,
            passed=passed,
            failed=len(results) - passed,
            duration_ms=round((time.perf_counter() - start) * 1000, 3),
        ),
    )
    return results


def make_transport(
    concurrency: int, targets: TargetPolicy | None = None
) -> httpx.AsyncBaseTransport:
    """aiohttp under httpx's API: the same client code, far less overhead per request
    (bench/README.md). Cookies live in each run's httpx client, never in the shared pool.
    A test's ``tls:`` settings get a pool of their own (orchestrator.tls).
    ``targets``: the hosts requests may go to (the service's runs); None: any (the CLI)."""
    import ssl

    import aiohttp
    from httpx_aiohttp import AiohttpTransport

    from orchestrator.tls import TlsTransports

    def pool(context: ssl.SSLContext | None) -> httpx.AsyncBaseTransport:
        def session() -> aiohttp.ClientSession:
            connector = aiohttp.TCPConnector(
                limit=max(concurrency, 10),
                ttl_dns_cache=300,
                resolver=targets.resolver() if targets is not None else None,
                ssl=context if context is not None else True,
            )
            return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())

        return AiohttpTransport(client=session)

    transport = TlsTransports(pool)
    return targets.transport(transport) if targets is not None else transport


def _targets(jobs: list[Job], *, unchecked: bool = False) -> dict[tuple[str, int], str]:
    """The flows' base URLs by host and port; ``unchecked``: leaving out those a service's
    health check covers (it says more, and may only skip the service's tests)."""
    targets: dict[tuple[str, int], str] = {}
    for job in jobs:
        base = _base_url(job)
        checked = {s.base_url for s in _services(job).values() if s.spec.health is not None}
        if unchecked and base.rstrip("/") in checked:
            continue
        parts = urlsplit(base)
        if parts.hostname:
            port = parts.port or (443 if parts.scheme == "https" else 80)
            targets[(parts.hostname, port)] = base
    return targets


async def _unreachable(
    jobs: list[Job], wait: float, *, unchecked: bool = False
) -> tuple[str, str] | None:
    """The first base URL nobody answers, with the reason; None if all answer."""
    for (host, port), base in _targets(jobs, unchecked=unchecked).items():
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), wait)
        except (OSError, TimeoutError) as exc:
            reason = os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else ""
            return base, (reason or "no answer").lower()
        writer.close()
    return None


async def is_reachable(jobs: list[Job], wait: float) -> bool:
    return await _unreachable(jobs, wait) is None


async def _check_reachable(jobs: list[Job]) -> None:
    """A base URL that nobody answers is an infrastructure problem, not N test failures."""
    failure = await _unreachable(jobs, wait=5, unchecked=True)
    if failure is not None:
        base, reason = failure
        raise InfrastructureError(f"cannot reach {base}: {reason}; is the API running?")


def _base_url(job: Job) -> str:
    try:
        namespace = initial_namespace(job.runs[0])
        return str(templating.render(job.plan.loaded.flow.base_url, namespace))
    except templating.TemplateError:
        return ""  # the run itself reports it, test by test
