"""The dashboard: server-rendered pages of an organization's runs, and of one run, live.

Pages read the read tables under row-level security, as the API does, so another
organization's run is absent (404). A browser cannot add an Authorization header, so
``/login`` checks a key and keeps it in an HttpOnly, SameSite=Strict cookie
(``auth.KEY_COOKIE``) that the API-key middleware accepts on HTTP reads.

A run page is rendered from one statement over the read tables (one snapshot, however far
the projector has got), at the log position its run's context reflects; its script then
follows the run's SSE stream from that position, so no event is shown twice or missed.
"""

from __future__ import annotations

import json
import secrets
import uuid
from datetime import datetime
from typing import Any
from urllib.parse import quote

import msgspec
from jinja2 import Environment, PackageLoader, StrictUndefined
from litestar import Request, Response, Router, get, post
from litestar.datastructures import Cookie
from litestar.params import FromPath, FromQuery
from litestar.response import Redirect
from markupsafe import Markup

from context_service.api.common import PrincipalDep, ServicesDep
from context_service.api.runs import RUNS, Run, fetch_run
from context_service.auth import EXCLUDE_OPT, KEY_COOKIE
from context_service.charts import bars, waterfall
from context_service.database import stream_of
from context_service.errors import ServiceError, Unauthorized
from context_service.keys import Principal
from context_service.runs import run_started
from context_service.services import Services
from events import types as ev
from events.context import Context, redacted
from events.secrets import MASK, masked_event
from orchestrator.known_failures import describe

STATUSES = ("queued", "running", "passed", "failed", "cancelled", "error")
LIVE = ("queued", "running")
RUNS_SHOWN = 100
EVENTS_SHOWN = 300

_env = Environment(
    loader=PackageLoader("context_service", "templates"),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)

_LIST = (
    f"SELECT * FROM ({RUNS.base}) AS r"
    " WHERE ($1::text IS NULL OR r.status = $1) AND ($2::text IS NULL OR r.suite = $2)"
    " AND ($3::text IS NULL OR r.environment = $3) ORDER BY r.started_at DESC LIMIT $4"
)
_CHOICES = (
    "SELECT coalesce(array_agg(DISTINCT r.suite), '{}'),"
    f" coalesce(array_agg(DISTINCT r.environment), '{{}}') FROM ({RUNS.base}) AS r"
)
# the run a run page offers to compare with: the same suite's run started just before it.
# Both must have started (a row in test_runs): a queued run, or one that never started, has
# no events to compare and its diff is a 404.
_PREVIOUS = (
    f"{RUNS.base} WHERE runs.suite = $1 AND runs.project_id IS NOT DISTINCT FROM $2"
    " AND runs.started_at < $3 AND runs.id <> $4"
    " AND EXISTS (SELECT FROM test_runs t WHERE t.id = runs.id)"
    " AND EXISTS (SELECT FROM test_runs t WHERE t.id = $4)"
    " ORDER BY runs.started_at DESC LIMIT 1"
)
# one statement: the context, the results and the failures of one snapshot
_SNAPSHOT = """
SELECT
  (SELECT row_to_json(c)::text FROM (
     SELECT status, shared_auth_tokens AS auth, shared_variables AS variables, secret_names,
            captured_data AS captured, test_order AS "order", statuses, attempts, version,
            position
     FROM test_execution_context WHERE run_id = $1) AS c),
  (SELECT coalesce(json_agg(r), '[]')::text FROM (
     SELECT test_name AS name, status, attempts, duration_ms, response_status, category, message,
            started_at, ended_at
     FROM test_results WHERE run_id = $1 ORDER BY started_at NULLS LAST, test_name) AS r),
  (SELECT coalesce(json_agg(f), '[]')::text FROM (
     SELECT t.test_name AS test, d.data FROM test_result_details d
     JOIN test_results t ON t.id = d.result_id
     WHERE t.run_id = $1 AND d.kind = 'assertion' AND NOT d.passed ORDER BY d.position) AS f)
"""


class TestRow(msgspec.Struct, frozen=True):
    __test__ = False  # not a pytest class
    name: str
    status: str
    attempts: int = 0
    duration_ms: float | None = None
    response_status: int | None = None
    category: str | None = None
    message: str = ""
    started_at: datetime | None = None
    """Its first TestStarted, as the log recorded it."""
    ended_at: datetime | None = None


class FailedAssertion(msgspec.Struct, frozen=True):
    test: str
    data: dict[str, Any]


class LogLine(msgspec.Struct, frozen=True):
    position: int
    at: datetime
    type: str
    test: str
    summary: str


class RunView(msgspec.Struct, frozen=True):
    run: Run
    live: bool
    position: int
    """The log position the page reflects: the stream is followed from after it."""
    tests: list[TestRow]
    failures: dict[str, list[dict[str, Any]]]
    """Failed assertions by test, in log order."""
    context: Context
    events: list[LogLine]
    omitted: int
    """Events before the ones shown (the API has them all)."""
    needs: dict[str, list[str]]
    """Each planned test's dependencies (the plan's depends_on, inferred ones included)."""

    def waterfall(self) -> Markup:
        rows = [(t.name, t.status, t.started_at, t.ended_at) for t in self.tests]
        return waterfall(bars(self.run.started_at, rows, self.needs), total_ms=self.run.duration_ms)


def as_text(value: Any) -> str:
    """A value as one line of text: strings as they are, anything else as compact JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


_env.filters["shown"] = as_text
_env.filters["ms"] = lambda value: "-" if value is None else f"{value:.0f} ms"
_env.filters["when"] = lambda at: at.strftime("%Y-%m-%d %H:%M:%S")
_env.filters["clock"] = lambda at: at.strftime("%H:%M:%S.%f")[:12]


def summary(event: ev.Event) -> str:
    """One line about an event for the log; the page's script says the same of live ones."""
    match event:
        case ev.RunStarted(plan=plan):
            return f"{len(plan)} tests planned: {', '.join(test.name for test in plan)}"
        case ev.TestStarted(attempt=attempt):
            return f"attempt {attempt}"
        case ev.RequestSent(method=method, url=url):
            return f"{method} {url}"
        case ev.ResponseReceived(status=status, timings=timings):
            return f"{status} in {timings.total_ms:.0f} ms"
        case ev.AssertionEvaluated():
            verdict = "passed" if event.passed else "FAILED"
            return (
                f"{event.subject} {event.predicate}: expected {as_text(event.expected)},"
                f" actual {as_text(event.actual)}, {verdict}"
            )
        case (
            ev.VariableCaptured(name=name, value=value)
            | ev.AuthTokenUpdated(name=name, value=value)
        ):
            return f"{name} = {as_text(value)}"
        case ev.TestPassed(attempts=attempts, duration_ms=duration, known_failure=known):
            note = f"; {describe(known, 'passed')}" if known is not None else ""
            return f"{attempts} attempt(s), {duration:.0f} ms{note}"
        case ev.TestFailed(category=category, message=message, known_failure=known):
            note = f" ({describe(known, 'failed')})" if known is not None else ""
            return f"{category}: {message}{note}"
        case ev.TestSkipped(reason=reason) | ev.RunCancelled(reason=reason):
            return reason
        case ev.RunCompleted():
            return (
                f"{event.status}: {event.passed} passed, {event.failed} failed"
                + (f" ({event.known_failures} known)" if event.known_failures else "")
                + f", {event.skipped} skipped in {event.duration_ms:.0f} ms"
            )
    return ""


def _log_line(recorded: ev.RecordedEvent) -> LogLine:
    event = masked_event(recorded.event)  # no secret's ciphertext either
    test = getattr(event, "test", "")
    return LogLine(recorded.position, recorded.recorded_at, recorded.type, test, summary(event))


def _planned(tests: list[TestRow], plan: list[str]) -> list[TestRow]:
    """The rows in the plan's order, a planned test the read tables lack yet as pending
    (the stream's TestStarted finds its row)."""
    known = {row.name for row in tests}
    rows = tests + [TestRow(name, "pending") for name in plan if name not in known]
    rank = {name: index for index, name in enumerate(plan)}
    return sorted(rows, key=lambda row: rank.get(row.name, len(rank)))


def _settled(tests: list[TestRow], run_status: str) -> list[TestRow]:
    """The rows of an ended run: a test it left without a verdict (still running or pending
    in the read tables, which no later event changes) shows what became of it."""
    if run_status in LIVE:
        return tests
    left = "cancelled" if run_status == "cancelled" else "unfinished"
    return [
        msgspec.structs.replace(row, status=left) if row.status in ("running", "pending") else row
        for row in tests
    ]


async def run_view(services: Services, principal: Principal, run_id: uuid.UUID) -> RunView:
    """What a run page shows of ``run_id``; NotFound unless it is the caller's."""
    run = await fetch_run(services, principal, run_id)
    async with services.db.tenant(principal.organization_id) as conn:
        stream = await stream_of(conn, run_id)
        context_json, results_json, failures_json = await conn.fetchrow(_SNAPSHOT, run_id)
    context = Context() if context_json is None else msgspec.json.decode(context_json, type=Context)
    tests = msgspec.json.decode(results_json, type=list[TestRow])
    failures: dict[str, list[dict[str, Any]]] = {}
    for failed in msgspec.json.decode(failures_json, type=list[FailedAssertion]):
        failures.setdefault(failed.test, []).append(failed.data)
    position = context.position
    # the stream's versions count its events: the last EVENTS_SHOWN up to the snapshot
    total = await services.store.stream_version(stream, through_position=position)
    recorded = await services.store.read_stream(
        stream, max(0, total - EVENTS_SHOWN), through_position=position
    )
    # the plan, even if RunStarted is newer than the snapshot: its rows are idempotent
    started = await run_started(services.store, stream)
    needs: dict[str, list[str]] = {}
    if started is not None:
        tests = _planned(tests, [planned.name for planned in started.plan])
        needs = {planned.name: list(planned.depends_on) for planned in started.plan}
    tests = _settled(tests, run.status)
    events = [_log_line(item) for item in recorded]
    live = run.status in LIVE and context.status == "running"
    return RunView(
        run, live, position, tests, failures, redacted(context), events, total - len(events), needs
    )


# ---- responses ----------------------------------------------------------------------------


def page(template: str, status: int = 200, **values: Any) -> Response[str]:
    """A rendered page; its scripts and styles run only with this response's nonce."""
    nonce = secrets.token_urlsafe(16)
    html = _env.get_template(template).render(nonce=nonce, **values)
    policy = (
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}';"
        " connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    )
    headers = {
        "Content-Security-Policy": policy,
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }
    return Response(html, status_code=status, media_type="text/html", headers=headers)


def _local(target: str | None) -> str:
    """Where to go after logging in: a path of this site only, never another site."""
    if target and target.startswith("/") and not target.startswith(("//", "/\\")):
        return target
    return "/runs"


def to_login(request: Request[Any, Any, Any], exc: Unauthorized) -> Response[Any]:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return Redirect(f"/login?next={quote(target, safe='')}", status_code=303)


def error_page(request: Request[Any, Any, Any], exc: ServiceError) -> Response[str]:
    return page("error.html", int(exc.status), code=int(exc.status), detail=exc.detail)


# ---- pages --------------------------------------------------------------------------------


@get("/", name="dashboard:home")
async def home() -> Redirect:
    return Redirect("/runs", status_code=303)


@get("/runs", name="dashboard:runs")
async def runs_page(
    services: ServicesDep,
    principal: PrincipalDep,
    status: FromQuery[str | None] = None,
    suite: FromQuery[str | None] = None,
    environment: FromQuery[str | None] = None,
) -> Response[str]:
    """The organization's latest runs, filtered by status, suite and environment."""
    chosen = {"status": status or None, "suite": suite or None, "environment": environment or None}
    async with services.db.tenant(principal.organization_id) as conn:
        rows = await conn.fetch(
            _LIST, chosen["status"], chosen["suite"], chosen["environment"], RUNS_SHOWN
        )
        suites, environments = await conn.fetchrow(_CHOICES)
    return page(
        "runs.html",
        runs=[Run(*row) for row in rows],
        chosen=chosen,
        choices={"status": STATUSES, "suite": sorted(suites), "environment": sorted(environments)},
        limit=RUNS_SHOWN,
    )


@get("/runs/{run_id:uuid}", name="dashboard:run")
async def run_page(
    services: ServicesDep,
    principal: PrincipalDep,
    run_id: FromPath[uuid.UUID],
) -> Response[str]:
    """One run: its timeline, context, failures and event log, followed live."""
    view = await run_view(services, principal, run_id)
    captured_by = {name: test for test, values in view.context.captured.items() for name in values}
    run = view.run
    async with services.db.tenant(principal.organization_id) as conn:
        previous = await conn.fetchval(_PREVIOUS, run.suite, run.project_id, run.started_at, run.id)
    return page(
        "run.html",
        view=view,
        mask=MASK,
        waterfall=view.waterfall(),
        failed=[t for t in view.tests if t.status == "failed" or t.name in view.failures],
        captured_by=captured_by,
        previous=previous,
    )


@get("/runs/{run_id:uuid}/waterfall", name="dashboard:waterfall")
async def waterfall_part(
    services: ServicesDep, principal: PrincipalDep, run_id: FromPath[uuid.UUID]
) -> Response[str]:
    """The run page's waterfall alone: its script draws it again as verdicts come in."""
    view = await run_view(services, principal, run_id)
    return Response(
        str(view.waterfall()),
        media_type="text/html",
        headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
    )


@get("/login", name="dashboard:login", opt={EXCLUDE_OPT: True})
async def login_form(next: FromQuery[str | None] = None) -> Response[str]:
    return page("login.html", target=_local(next), message="")


@post("/login", name="dashboard:login-check", opt={EXCLUDE_OPT: True}, status_code=303)
async def login(request: Request[Any, Any, Any], services: ServicesDep) -> Response[Any]:
    """Check the key; if it may read, keep it in the session's cookie and go on."""
    form = await request.form()
    key, target = str(form.get("key", "")).strip(), _local(str(form.get("next", "")))
    principal = await services.db.principal(key) if key else None
    if principal is None or not principal.allows("read"):
        why = "that key lacks the read scope" if principal else "that key is not valid"
        return page("login.html", 401, target=target, message=why)
    cookie = Cookie(
        key=KEY_COOKIE,
        value=key,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return Redirect(target, status_code=303, cookies=[cookie])


@post("/logout", name="dashboard:logout", opt={EXCLUDE_OPT: True}, status_code=303)
async def logout() -> Response[Any]:
    gone = Cookie(key=KEY_COOKIE, value="", path="/", max_age=0, httponly=True, samesite="strict")
    return Redirect("/login", status_code=303, cookies=[gone])


router = Router(
    "/",
    route_handlers=[home, runs_page, run_page, waterfall_part, login_form, login, logout],
    exception_handlers={Unauthorized: to_login, ServiceError: error_page},
    include_in_schema=False,
)
"""The dashboard's pages, for ``create_app``."""
