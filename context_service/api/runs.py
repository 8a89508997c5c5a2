"""/api/v1/runs: start a run of a suite in an environment, cancel it, rerun what failed;
a run's results, its context (now or at a log position) and its events.

Starting, cancelling and rerunning need the ``run`` scope; reading needs ``read``. A run
started here runs in the background: the answer (202) comes before its first request.

Starting a run with ``variables`` needs the ``admin`` scope too: a variable can say where
the run's requests go (``base_url: "{{ BASE_URL }}"``), and with them the environment's
secrets, so only who may change the environment may change them for one run.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Controller, Response, get, post
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter

from context_service import runs
from context_service.api.common import PageDep, PrincipalDep, ServicesDep
from context_service.database import stream_of
from context_service.errors import Conflict, Forbidden, NotFound, Unavailable
from context_service.keys import Principal
from context_service.listing import Listing, Page, page_of
from context_service.services import Services
from events import types as ev
from events.context import Context, redacted
from events.secrets import masked_event
from orchestrator.queue import QueueUnavailable
from orchestrator.run_diff import RunDiff, UnknownRun, diff

VariableName = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
Value = Annotated[str, msgspec.Meta(max_length=64 * 1024)]
Tag = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
_CANCEL_WAIT = 10.0


class RunCreate(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    suite_id: uuid.UUID
    environment_id: uuid.UUID | None = None
    variables: Annotated[dict[VariableName, Value], msgspec.Meta(max_length=200)] = {}
    """Override the flow's and the environment's variables (as ``--var`` does); needs the
    ``admin`` scope."""
    tags: Annotated[list[Tag], msgspec.Meta(max_length=50)] = []
    """Run only the tests with one of these tags, and what they need."""
    session_id: uuid.UUID | None = None
    """Start it in this test session: 409 while the session is paused, completed or failed."""


class Run(msgspec.Struct, frozen=True):
    id: uuid.UUID
    project_id: uuid.UUID | None
    suite_id: uuid.UUID | None
    environment_id: uuid.UUID | None
    suite: str
    environment: str
    status: str
    """queued, running, passed, failed, cancelled or error."""
    total_tests: int
    passed_tests: int
    failed_tests: int
    skipped_tests: int
    duration_ms: float | None
    started_at: datetime
    ended_at: datetime | None
    tags: list[str]
    rerun_of: uuid.UUID | None
    message: str
    """Why it was cancelled, or what went wrong."""


class Result(msgspec.Struct, frozen=True):
    id: uuid.UUID
    test_case_id: uuid.UUID
    test: str
    status: str
    attempts: int
    requests: int
    duration_ms: float | None
    response_status: int | None
    response_time_ms: float | None
    category: str | None
    message: str
    started_at: datetime | None
    ended_at: datetime | None


class RecordedEventOut(msgspec.Struct, frozen=True):
    position: int
    version: int
    id: uuid.UUID
    type: str
    recorded_at: datetime
    data: dict[str, Any]


class EventPage(msgspec.Struct, frozen=True):
    items: list[RecordedEventOut]
    next_after: int | None
    """Pass as ``after`` for the next page; None when this page reached the end."""


_RUNS = """
SELECT r.id, r.project_id, r.suite_id, r.environment_id, s.name AS suite, e.name AS environment,
       r.status, r.total_tests, r.passed_tests, r.failed_tests, r.skipped_tests, r.duration_ms,
       r.started_at, r.ended_at, ARRAY(SELECT jsonb_array_elements_text(r.tags)) AS tags,
       sr.rerun_of, coalesce(r.cancel_reason, sr.error, '') AS message
FROM test_runs r
JOIN test_suites s ON s.id = r.suite_id
JOIN environments e ON e.id = r.environment_id
LEFT JOIN service_runs sr ON sr.id = r.id
UNION ALL
SELECT sr.id, ss.project_id, sr.suite_id, sr.environment_id, coalesce(ss.name, ''),
       coalesce(se.name, 'default'),
       CASE WHEN sr.state IN ('error', 'cancelled') THEN sr.state ELSE 'queued' END,
       cardinality(sr.tests), 0, 0, 0, NULL::float8, sr.created_at,
       CASE WHEN sr.state IN ('error', 'cancelled') THEN sr.updated_at END, sr.tags,
       sr.rerun_of, sr.error
FROM service_runs sr
LEFT JOIN service_suites ss ON ss.id = sr.suite_id
LEFT JOIN service_environments se ON se.id = sr.environment_id
WHERE NOT EXISTS (SELECT FROM test_runs t WHERE t.id = sr.id)
"""
RUNS = Listing(
    base=f"SELECT * FROM ({_RUNS}) AS runs",
    item=Run,
    id_column="runs.id",
    sortable={
        "started_at": "runs.started_at",
        "ended_at": "runs.ended_at",
        "status": "runs.status",
        "duration_ms": "runs.duration_ms",
        "suite": "runs.suite",
    },
    default_sort="-started_at",
    filters={
        "status": "runs.status",
        "project_id": "runs.project_id",
        "suite_id": "runs.suite_id",
        "environment_id": "runs.environment_id",
        "rerun_of": "runs.rerun_of",
        "tag": "runs.tags @> ARRAY[{}]::text[]",
        "started_after": "runs.started_at >= {}",
        "started_before": "runs.started_at < {}",
    },
)
RESULTS = Listing(
    base="SELECT id, test_case_id, test_name, status, attempts, requests, duration_ms,"
    " response_status, response_time_ms, category, message, started_at, ended_at"
    " FROM test_results",
    item=Result,
    id_column="id",
    sortable={"test": "test_name", "started_at": "started_at", "duration_ms": "duration_ms"},
    default_sort="started_at",
    filters={"status": "status", "category": "category"},
    where=["run_id = $1"],
)


async def fetch_run(services: Services, principal: Principal, run_id: uuid.UUID) -> Run:
    async with services.db.tenant(principal.organization_id) as conn:
        row = await conn.fetchrow(f"{RUNS.base} WHERE runs.id = $1", run_id)
    if row is None:
        raise NotFound(f"no run {run_id}")
    return Run(*row)


async def _cancel_queued(services: Services, principal: Principal, run_id: uuid.UUID) -> Run:
    """Cancel a run of the worker queue (context_service.queued), whichever instance queued
    it; the answer shows it ended unless its worker takes long to stop it."""
    assert services.queued is not None
    try:
        await services.queued.cancel(str(run_id), principal.organization_id)
    except QueueUnavailable:
        raise Unavailable("the worker queue is unreachable; try the cancel again later") from None
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(services.queued.wait(str(run_id)), _CANCEL_WAIT)
    return await fetch_run(services, principal, run_id)


async def run_diff(
    services: Services, principal: Principal, run_a: uuid.UUID, run_b: uuid.UUID
) -> RunDiff:
    """Two of the organization's runs compared; NotFound for a run it does not have."""
    streams = [await services.db.run_stream(principal.organization_id, r) for r in (run_a, run_b)]
    events_a, events_b = [await services.store.read_stream(stream) for stream in streams]
    try:
        return diff(events_a, events_b, str(run_a), str(run_b), services.cipher)
    except UnknownRun as exc:  # queued, not started yet: nothing to compare
        raise NotFound(str(exc)) from None


def _shown(event: ev.Event) -> dict[str, Any]:
    """An event for an answer, masked as every reader of the service sees it."""
    data: dict[str, Any] = msgspec.to_builtins(masked_event(event))
    return data


class RunController(Controller):
    path = "/api/v1/runs"
    tags = ("runs",)

    @get("/")
    async def list_runs(
        self,
        services: ServicesDep,
        principal: PrincipalDep,
        page: PageDep,
        status: Annotated[str | None, QueryParameter(description="a,b for either")] = None,
        project_id: FromQuery[uuid.UUID | None] = None,
        suite_id: FromQuery[uuid.UUID | None] = None,
        environment_id: FromQuery[uuid.UUID | None] = None,
        rerun_of: FromQuery[uuid.UUID | None] = None,
        tag: FromQuery[str | None] = None,
        started_after: FromQuery[datetime | None] = None,
        started_before: FromQuery[datetime | None] = None,
    ) -> Page[Run]:
        filters = {
            "status": status,
            "project_id": project_id,
            "suite_id": suite_id,
            "environment_id": environment_id,
            "rerun_of": rerun_of,
            "tag": tag,
            "started_after": started_after,
            "started_before": started_before,
        }
        async with services.db.tenant(principal.organization_id) as conn:
            return page_of(await RUNS.fetch(conn, page, filters), Run)

    @post("/", status_code=202, opt={"scope": "run"})
    async def start_run(
        self, services: ServicesDep, principal: PrincipalDep, data: JSONBody[RunCreate]
    ) -> Response[Run]:
        """Start a run of a suite, in an environment if given; it runs in the background.
        ``variables`` need the admin scope (they can redirect the environment's secrets)."""
        if data.variables and not principal.allows("admin"):
            raise Forbidden(
                "variables in a run need the 'admin' scope: they can change where the run's "
                "requests, and the environment's secrets, go; change the environment instead"
            )
        request = runs.StartRequest(
            data.suite_id, data.environment_id, data.variables, data.tags, data.session_id
        )
        run_id = await runs.start(services, principal, request)
        return _accepted(await fetch_run(services, principal, run_id))

    @get("/{run_id:uuid}")
    async def get_run(
        self, services: ServicesDep, principal: PrincipalDep, run_id: FromPath[uuid.UUID]
    ) -> Run:
        return await fetch_run(services, principal, run_id)

    @post("/{run_id:uuid}/cancel", status_code=202, opt={"scope": "run"})
    async def cancel_run(
        self, services: ServicesDep, principal: PrincipalDep, run_id: FromPath[uuid.UUID]
    ) -> Run:
        """Cancel a run this service is running, or put on the worker queue; answers once
        it is cancelled."""
        run = await fetch_run(services, principal, run_id)
        if services.queued is not None and run.status in ("queued", "running"):
            return await _cancel_queued(services, principal, run_id)
        if not services.launcher.cancel(str(run_id)):
            if run.status in ("queued", "running"):
                raise Conflict("the run is not running in this service (started elsewhere)")
            raise Conflict(f"the run has ended ({run.status}): there is nothing to cancel")
        # a run ends at its next await; the answer shows it ended unless that takes long
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(services.launcher.wait(str(run_id)), _CANCEL_WAIT)
        return await fetch_run(services, principal, run_id)

    @post("/{run_id:uuid}/rerun", status_code=202, opt={"scope": "run"})
    async def rerun(
        self, services: ServicesDep, principal: PrincipalDep, run_id: FromPath[uuid.UUID]
    ) -> Response[Run]:
        """Run again the tests that failed or were skipped, with what the passed ones
        captured; a new run (its ``rerun_of`` names this one)."""
        new_id = await runs.rerun(services, principal, run_id)
        return _accepted(await fetch_run(services, principal, new_id))

    @get("/{run_id:uuid}/results")
    async def list_results(
        self,
        services: ServicesDep,
        principal: PrincipalDep,
        page: PageDep,
        run_id: FromPath[uuid.UUID],
        status: FromQuery[str | None] = None,
        category: FromQuery[str | None] = None,
    ) -> Page[Result]:
        async with services.db.tenant(principal.organization_id) as conn:
            await stream_of(conn, run_id)
            found = await RESULTS.fetch(
                conn, page, {"status": status, "category": category}, [run_id]
            )
        return page_of(found, Result)

    @get("/{run_id:uuid}/context")
    async def get_context(
        self,
        services: ServicesDep,
        principal: PrincipalDep,
        run_id: FromPath[uuid.UUID],
        at: Annotated[
            int | None,
            QueryParameter(ge=0, le=2**62, description="a log position: the context then"),
        ] = None,
    ) -> Context:
        """The run's context (secrets masked), now or right after log position ``at``."""
        return redacted(await runs.context_of(services, principal, run_id, at))

    @get("/{run_id:uuid}/events")
    async def list_events(
        self,
        services: ServicesDep,
        principal: PrincipalDep,
        run_id: FromPath[uuid.UUID],
        after: Annotated[int, QueryParameter(ge=0, le=2**62, description="a log position")] = 0,
        limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
    ) -> EventPage:
        """The run's events after position ``after``, in log order (secrets masked)."""
        stream = await services.db.run_stream(principal.organization_id, run_id)
        records = await services.store.read_stream(stream, after_position=after, limit=limit)
        items = [
            RecordedEventOut(r.position, r.version, r.id, r.type, r.recorded_at, _shown(r.event))
            for r in records
        ]
        more = len(items) == limit
        return EventPage(items, items[-1].position if more else None)

    @get("/{run_id:uuid}/tests/{test:str}/issue", media_type="text/markdown")
    async def issue_report(
        self,
        services: ServicesDep,
        principal: PrincipalDep,
        run_id: FromPath[uuid.UUID],
        test: FromPath[str],
    ) -> str:
        """A ready-to-file Markdown report of the test's failure (``baton report issue``):
        404 for no such test, 409 for a test that did not fail."""
        from orchestrator.issue_report import NotReportable, issue_markdown

        stream = await services.db.run_stream(principal.organization_id, run_id)
        recorded = await services.store.read_stream(stream)
        try:
            return issue_markdown(recorded, test, str(run_id))
        except NotReportable as exc:
            raise (NotFound if exc.missing else Conflict)(str(exc)) from None

    @get("/{run_id:uuid}/diff/{other:uuid}")
    async def diff(
        self,
        services: ServicesDep,
        principal: PrincipalDep,
        run_id: FromPath[uuid.UUID],
        other: FromPath[uuid.UUID],
    ) -> RunDiff:
        """The run (A) compared with ``other`` (B) test by test, as ``baton diff A B
        --json``: 404 unless both are the caller's organization's."""
        return await run_diff(services, principal, run_id, other)


def _accepted(run: Run) -> Response[Run]:
    return Response(run, status_code=202, headers={"Location": f"/api/v1/runs/{run.id}"})
