"""Starting, rerunning and cancelling runs, and reading a run's log: the rules, not the HTTP.

A run is the caller's if row-level security lets ``tenant`` find it, in test_runs (the
projector's) or service_runs (started here, perhaps not projected yet). Only then is its
event log read, as the owner: the log itself has no organization column.

A rerun is a new run of the same suite and environment that runs only the tests that did
not pass, with the values the passed ones captured: they are decrypted into the new run's
variables, appended to its stream right after RunStarted (so its context holds them, and a
rerun of the rerun finds them again), and the secrets among them are masked in its events.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec

from context_service.api.suites import fetch_suite
from context_service.database import stream_of
from context_service.errors import Conflict, NotFound, Unavailable, Unprocessable
from context_service.flows import check_run, load_text
from context_service.keys import Principal
from context_service.launcher import RunSpec
from context_service.services import Services
from events import types as ev
from events.cache import UnknownRun
from events.context import Context, decrypted_variables, hidden_values
from events.secrets import SecretError
from events.store import EventStore
from orchestrator.queue import QueueUnavailable
from orchestrator.rerun import Prior, Selection, capture_ttls, first_made, read_prior, select
from orchestrator.runner import RunInputs
from orchestrator.runner import run_started as first_event

_ORIGIN = """
SELECT coalesce(sr.suite_id, t.suite_id), coalesce(sr.environment_id, t.environment_id),
       coalesce(sr.variables, '{}'),
       coalesce(sr.tags, ARRAY(SELECT jsonb_array_elements_text(t.tags)))
FROM (SELECT $1::uuid AS id) AS wanted
LEFT JOIN service_runs sr ON sr.id = wanted.id
LEFT JOIN test_runs t ON t.id = wanted.id
WHERE sr.id IS NOT NULL OR t.id IS NOT NULL
"""
_RECORD = (
    "INSERT INTO service_runs (id, organization_id, suite_id, environment_id, rerun_of, tests,"
    " tags, variables, job, state)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'queued')"
)


class StartRequest(msgspec.Struct, frozen=True):
    suite_id: uuid.UUID
    environment_id: uuid.UUID | None = None
    variables: Mapping[str, str] = {}
    tags: Sequence[str] = ()
    session_id: uuid.UUID | None = None


class _Environment(msgspec.Struct, frozen=True):
    id: uuid.UUID | None
    name: str
    plain: dict[str, str]
    secrets: dict[str, str]


async def _environment(
    conn: asyncpg.Connection, services: Services, environment_id: uuid.UUID | None, project: Any
) -> _Environment:
    if environment_id is None:
        return _Environment(None, "", {}, {})
    row = await conn.fetchrow(
        "SELECT name, project_id FROM service_environments WHERE id = $1", environment_id
    )
    if row is None:
        raise NotFound(f"no environment {environment_id}")
    if row["project_id"] != project:
        raise Unprocessable("the environment belongs to another project than the suite")
    rows = await conn.fetch(
        "SELECT name, value, secret FROM environment_variables WHERE environment_id = $1",
        environment_id,
    )
    try:
        secrets = {r["name"]: services.cipher.decrypt(r["value"]) for r in rows if r["secret"]}
    except SecretError as exc:
        raise Conflict(f"the environment's secrets cannot be read: {exc}") from None
    plain = {r["name"]: r["value"] for r in rows if not r["secret"]}
    return _Environment(environment_id, row["name"], plain, secrets)


async def start(
    services: Services,
    principal: Principal,
    request: StartRequest,
    *,
    rerun_of: uuid.UUID | None = None,
    prior: Prior | None = None,
) -> uuid.UUID:
    """Check everything, record the run, start its task; return its id. ``prior``: for a
    rerun of ``rerun_of``, that run's log: its tests that did not pass, the dependents
    they made skip and the producers of expired captures run again (orchestrator.rerun),
    the others' captures are reused."""
    org = principal.organization_id
    async with services.db.tenant(org) as conn:
        suite = await fetch_suite(conn, request.suite_id)
        project: str = await conn.fetchval(
            "SELECT name FROM service_projects WHERE id = $1", suite.project_id
        )
        environment = await _environment(conn, services, request.environment_id, suite.project_id)
    loaded = load_text(suite.content, suite.filename)
    names = {*environment.plain, *request.variables}
    plan = check_run(loaded, names, environment.plain, environment.secrets, request.tags)
    captured: dict[str, Any] = {}
    reused: list[ev.VariableCaptured | ev.AuthTokenUpdated] = []
    reused_at: dict[tuple[str, str], int] = {}
    hidden: list[str] = []
    if prior is not None:
        ttls = capture_ttls(loaded.flow, plan.order)
        now = datetime.now(UTC)
        chosen = select(plan.order, plan.graph, prior, Selection(failed=True), ttls=ttls, now=now)
        if not chosen.tests:
            raise Conflict("every test of the run passed: there is nothing to rerun")
        # what the tests need of the others is in the context: the plan of these alone
        plan = plan.only(chosen.tests)
        try:
            captured = decrypted_variables(prior.context, services.cipher)
            hidden = hidden_values(prior.context, services.cipher)
        except SecretError as exc:
            raise Conflict(f"the run's captured secrets cannot be read: {exc}") from None
        reused, reused_at = chosen.reused, first_made(chosen, prior)
    if not plan.order:
        raise Unprocessable("no test of the suite is selected by these tags")
    inputs = RunInputs(
        variables={**loaded.flow.variables, **environment.plain, **request.variables, **captured},
        env=environment.plain,
        secrets=environment.secrets,
        environment=environment.name,
        tags=tuple(request.tags),
        # every secret of the run is the runner's to mask: the environment's, even those
        # the flow does not name, and a rerun's reused ones (a capture equal to one is one)
        hidden=(*environment.secrets.values(), *hidden),
        organization=str(org),
        project=project,
        reused=tuple(reused),
        reused_at=reused_at,
        continues=str(rerun_of) if rerun_of is not None else "",
    )
    if request.session_id is not None:
        from context_service.api.sessions import admit

        await admit(services, principal, request.session_id, inputs.run_id)
        inputs = dataclasses.replace(inputs, session_id=str(request.session_id))
    run_id = uuid.UUID(inputs.run_id)
    started = first_event(plan, inputs)
    # kept before it is queued, for any instance to queue it if this one dies in between
    job = services.queued.job(suite.content, plan, inputs, started) if services.queued else ""
    async with services.db.tenant(org) as conn:
        await conn.execute(
            _RECORD,
            run_id,
            org,
            suite.id,
            environment.id,
            rerun_of,
            plan.order,
            list(request.tags),
            msgspec.json.encode(dict(request.variables)),
            job,
        )

    async def done(state: str, error: str) -> None:
        await services.db.record_run_end(org, run_id, state, error)

    if services.queued is None:
        services.launcher.start(RunSpec(plan, inputs, on_done=done))
        return run_id
    try:
        await services.queued.start(inputs.run_id, org, job)
    except QueueUnavailable:
        await done("error", "the worker queue was unreachable: the run did not start")
        raise Unavailable("the worker queue is unreachable; try again later") from None
    return run_id


async def rerun(services: Services, principal: Principal, run_id: uuid.UUID) -> uuid.UUID:
    """Start a rerun of the tests of ``run_id`` that did not pass; return its id."""
    async with services.db.tenant(principal.organization_id) as conn:
        stream = await stream_of(conn, run_id)
        origin = await conn.fetchrow(_ORIGIN, run_id)
        if origin is None:  # pragma: no cover - stream_of found it a moment ago
            raise NotFound(f"no run {run_id}")
        suite_known = await conn.fetchval(
            "SELECT EXISTS (SELECT FROM service_suites WHERE id = $1)", origin[0]
        )
        environment_known = await conn.fetchval(
            "SELECT EXISTS (SELECT FROM service_environments WHERE id = $1)", origin[1]
        )
    if not suite_known:
        raise Conflict("the suite of this run is not (or no longer) uploaded to the service")
    # the log, not the launcher, says whether the run ended: the launcher keeps a run a
    # moment longer, while it records the end, after the log (and GET /runs) says so
    context = await _context(services, run_id)
    if context.status == "running":
        raise Conflict("the run has not ended: wait for it to end, or cancel it")
    recorded = await services.store.read_stream(stream)
    if not recorded or not isinstance(recorded[0].event, ev.RunStarted):
        raise Conflict("the run's log does not begin with RunStarted")
    request = StartRequest(
        suite_id=origin[0],
        environment_id=origin[1] if environment_known else None,
        variables=msgspec.json.decode(origin[2]),
        tags=list(origin[3]),
    )
    prior = await read_prior(services.store, recorded)
    return await start(services, principal, request, rerun_of=run_id, prior=prior)


async def _context(services: Services, run_id: uuid.UUID, at: int | None = None) -> Context:
    try:
        return await services.reader.context(str(run_id), at=at)
    except UnknownRun:
        raise NotFound(f"the run {run_id} has no events yet") from None


async def run_started(store: EventStore, stream: str) -> ev.RunStarted | None:
    """The RunStarted a run's stream begins with (its plan), None if it does not (yet)."""
    first = (await store.first_events([stream])).get(stream)
    return first.event if first is not None and isinstance(first.event, ev.RunStarted) else None


async def context_of(
    services: Services, principal: Principal, run_id: uuid.UUID, at: int | None
) -> Context:
    await services.db.run_stream(principal.organization_id, run_id)
    return await _context(services, run_id, at)
