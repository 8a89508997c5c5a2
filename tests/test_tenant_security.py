"""What a tenant's key may do to the service and through it: no secrets sent where a run key
points them, no stream left open after its key is revoked, nothing but up or down told
without a key, no request to a target the service does not allow."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import msgspec
import pytest
from aiohttp import web
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from context_service.database import KEY_TTL
from context_service.keys import create_key
from context_service.realtime import KEY_CHECK, REVOKED_CODE
from examples.shop.server import serve as serve_shop
from orchestrator.targets import TargetPolicy
from tests.cli import baton
from tests.conftest import LiveService, Org

PASSWORD = "secret-alice"  # the demo shop's, so that the run passes against it
FLOW = """
name: login
base_url: "{{ BASE_URL }}"
tests:
  login:
    request:
      method: POST
      url: /auth/login
      json: {username: alice, password: "{{ secrets.SHOP_PASSWORD }}"}
    expect: {status: 200}
"""


class Listener:
    """An HTTP server that answers 200 to anything (or redirects everything to
    ``redirect_to``) and keeps what it was sent."""

    def __init__(self, host: str = "127.0.0.1", redirect_to: str = "") -> None:
        self.received: list[str] = []
        self.url = ""
        self._host = host
        self._redirect_to = redirect_to
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        async def anything(request: web.Request) -> web.Response:
            self.received.append(f"{request.method} {request.path_qs} {await request.text()}")
            if self._redirect_to:
                raise web.HTTPFound(self._redirect_to)
            return web.json_response({"ok": True})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", anything)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://{self._host}:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def listener() -> AsyncIterator[Listener]:
    server = Listener()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(scope="module")
async def shop() -> AsyncIterator[str]:
    runner, url = await serve_shop("127.0.0.1", 0)
    yield url
    await runner.cleanup()


@pytest.fixture(scope="module")
async def admin(live_service: LiveService) -> AsyncIterator[Org]:
    key = await create_key(
        live_service.settings, organization="tenant", scopes=["read", "run", "admin"], name="a"
    )
    org = Org(live_service, key)
    yield org
    await org.http.aclose()


@pytest.fixture(scope="module")
async def runner_key(live_service: LiveService) -> AsyncIterator[Org]:
    key = await create_key(
        live_service.settings, organization="tenant", scopes=["read", "run"], name="ci"
    )
    org = Org(live_service, key)
    yield org
    await org.http.aclose()


@pytest.fixture(scope="module")
async def login_suite(admin: Org, shop: str) -> dict[str, str]:
    """A suite whose base_url is a plain variable of its environment, which has a secret."""
    project = await admin.ok("POST", "/api/v1/projects", 201, json={"name": "login"})
    environment = await admin.ok(
        "POST",
        "/api/v1/environments",
        201,
        json={
            "project_id": project["id"],
            "name": "prod",
            "variables": [
                {"name": "BASE_URL", "value": shop},
                {"name": "SHOP_PASSWORD", "value": PASSWORD, "secret": True},
            ],
        },
    )
    suite = await admin.ok(
        "POST", "/api/v1/suites", 201, json={"project_id": project["id"], "content": FLOW}
    )
    return {"project": project["id"], "environment": environment["id"], "suite": suite["id"]}


async def test_a_run_key_cannot_point_the_environments_secrets_elsewhere(
    runner_key: Org, admin: Org, login_suite: dict[str, str], listener: Listener
) -> None:
    attack = {
        "suite_id": login_suite["suite"],
        "environment_id": login_suite["environment"],
        "variables": {"BASE_URL": listener.url},
    }
    response = await runner_key.http.post("/api/v1/runs", json=attack)
    assert response.status_code == 403, response.text
    assert "variables in a run need the 'admin' scope" in response.json()["detail"]
    # without variables the same key runs the suite as its environment says, against the shop
    plain = {k: v for k, v in attack.items() if k != "variables"}
    run = await runner_key.ok("POST", "/api/v1/runs", 202, json=plain)
    assert (await runner_key.finished(run["id"]))["status"] == "passed"
    await asyncio.sleep(0.2)
    assert listener.received == []
    # who may change the environment may override it for one run
    run = await admin.ok("POST", "/api/v1/runs", 202, json=attack)
    await admin.finished(run["id"])
    (received,) = listener.received
    assert received.startswith("POST /auth/login") and PASSWORD in received


SLOW = """
name: slow
base_url: "{{ BASE_URL }}"
tests:
  nap: {request: {url: /slow, params: {ms: 6000}}}
"""


async def _slow_run(admin: Org, login_suite: dict[str, str]) -> str:
    """A run of the login project that lasts 6 s."""
    suites = await admin.ok("GET", f"/api/v1/suites?project_id={login_suite['project']}")
    known = {suite["name"]: suite["id"] for suite in suites["items"]}
    if "slow" not in known:
        suite = await admin.ok(
            "POST",
            "/api/v1/suites",
            201,
            json={"project_id": login_suite["project"], "content": SLOW},
        )
        known["slow"] = suite["id"]
    return await admin.start(known["slow"], login_suite["environment"])


async def _read_key(admin: Org) -> tuple[str, str]:
    created = await admin.ok(
        "POST", "/api/v1/keys", 201, json={"name": "viewer", "scopes": ["read"]}
    )
    return created["id"], created["key"]


@pytest.mark.parametrize("where", ["this process", "another process"])
async def test_revoking_a_key_ends_its_open_streams(
    live_service: LiveService, admin: Org, login_suite: dict[str, str], where: str
) -> None:
    """Revoked through this process's API (its key cache forgets it at once) or elsewhere
    (the database alone: the key cache holds it up to KEY_TTL), an SSE stream and a
    WebSocket opened before end within KEY_TTL and one check."""
    run_id = await _slow_run(admin, login_suite)
    key_id, key = await _read_key(admin)
    auth = {"Authorization": f"Bearer {key}"}
    ws_url = live_service.url.replace("http://", "ws://") + f"/api/v1/runs/{run_id}/ws"
    lines: list[str] = []
    async with live_service.client(key) as http, ws_connect(ws_url, additional_headers=auth) as ws:

        async def read_sse() -> None:
            async with http.stream("GET", f"/api/v1/runs/{run_id}/stream") as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    lines.append(line)

        async def read_ws() -> int | None:
            with contextlib.suppress(ConnectionClosed):
                async for _ in ws:
                    pass
            return ws.close_code

        sse, socket = asyncio.create_task(read_sse()), asyncio.create_task(read_ws())
        await asyncio.sleep(0.5)
        assert not sse.done() and not socket.done()  # the run naps: both are open
        revoked_at = time.monotonic()
        if where == "this process":
            await admin.ok("DELETE", f"/api/v1/keys/{key_id}", 204)
            bound = KEY_CHECK + 0.5
        else:
            conn = await asyncpg.connect(live_service.settings.database_url)
            try:
                await conn.execute(
                    "UPDATE api_credentials SET revoked_at = now() WHERE id = $1",
                    uuid.UUID(key_id),
                )
            finally:
                await conn.close()
            bound = KEY_TTL + KEY_CHECK + 0.5
        await asyncio.wait_for(asyncio.gather(sse, socket), bound)
        took = time.monotonic() - revoked_at
        assert socket.result() == REVOKED_CODE
        assert "event: revoked" in lines
        print(f"revoked {where}: both streams ended {took:.2f} s later")
        assert (await http.get(f"/api/v1/runs/{run_id}/stream")).status_code == 401
    await admin.finished(run_id)


async def test_health_tells_only_up_or_down_without_a_key(
    live_service: LiveService, admin: Org
) -> None:
    async with live_service.client() as anonymous:
        response = await anonymous.get("/health")
        assert response.status_code == 200 and response.json() == {"status": "ok"}
        assert "127.0.0.1" not in response.text and "position" not in response.text
        wrong = await anonymous.get("/health", headers={"Authorization": "Bearer bk_nope"})
        assert wrong.json() == {"status": "ok"}
    detailed = await admin.ok("GET", "/health")
    assert detailed["status"] == "ok"
    names = {dependency["name"] for dependency in detailed["dependencies"]}
    assert names == {"postgresql", "redis", "projector"}


# ---- targets ------------------------------------------------------------------------------


def test_the_default_policy_refuses_loopback_link_local_private_and_reserved() -> None:
    default = TargetPolicy.parse(None)
    for address in (
        "127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
        "0.0.0.0", "::1", "fe80::1%eth0", "fd00::1", "::ffff:127.0.0.1",
    ):  # fmt: skip
        refusal = default.refusal(address, [address])
        assert refusal is not None and "BATON_ALLOWED_TARGETS" in refusal, address
    assert "a link-local address" in (default.refusal("169.254.169.254", ["169.254.169.254"]) or "")
    assert default.refusal("example.com", ["93.184.216.34", "2606:2800:220:1::1"]) is None
    # every address of a name must be allowed
    assert default.refusal("rebound.example", ["93.184.216.34", "127.0.0.1"]) is not None


def test_an_explicit_policy_allows_what_it_lists_and_nothing_else() -> None:
    policy = TargetPolicy.parse("10.1.0.0/16, api.internal ,::1")
    assert policy.refusal("10.1.2.3", ["10.1.2.3"]) is None
    assert policy.refusal("api.internal", ["10.9.9.9"]) is None  # a listed name, wherever
    assert policy.refusal("::1", ["::1"]) is None
    assert policy.refusal("10.2.0.1", ["10.2.0.1"]) is not None
    assert policy.refusal("example.com", ["93.184.216.34"]) is not None  # not "public"
    assert TargetPolicy.parse("public").refusal("example.com", ["93.184.216.34"]) is None
    with pytest.raises(ValueError, match="BATON_ALLOWED_TARGETS: 'x/y' is not a host name"):
        TargetPolicy.parse("10.0.0.0/8,x/y")


@pytest.fixture
async def strict_service(live_service: LiveService) -> AsyncIterator[LiveService]:
    """A second service on the same database with the default policy (nothing set)."""
    service = LiveService(msgspec.structs.replace(live_service.settings, allowed_targets=None))
    service.start()
    yield service
    service.stop()


async def test_by_default_tenant_runs_reach_no_address_of_the_service_host(
    strict_service: LiveService, admin: Org, login_suite: dict[str, str], listener: Listener
) -> None:
    pg = urlsplit(strict_service.settings.database_url or "")
    targets = {
        "listener": f"{listener.url}/anything",
        "postgres": f"http://{pg.hostname}:{pg.port}/",
        "the_service": f"{strict_service.url}/health",
        "metadata": "http://169.254.169.254/latest/meta-data/",
        "localhost": f"http://localhost:{listener.url.rsplit(':', 1)[1]}/",
    }
    flow = {
        "name": "reach in",
        "base_url": "{{ BASE_URL }}",
        "tests": {name: {"request": {"url": url}} for name, url in targets.items()},
    }
    suite = await admin.ok(
        "POST",
        "/api/v1/suites",
        201,
        json={"project_id": login_suite["project"], "content": json.dumps(flow)},
    )
    org = Org(strict_service, admin.key)
    try:
        run_id = await org.start(suite["id"], login_suite["environment"])
        assert (await org.finished(run_id))["status"] == "failed"
        results = (await org.ok("GET", f"/api/v1/runs/{run_id}/results"))["items"]
    finally:
        await org.http.aclose()
    assert {r["test"] for r in results} == set(targets)
    for result in results:
        assert (result["status"], result["category"]) == ("failed", "connection"), result
        assert "refused target: " in result["message"], result
        assert "which runs started through the service may not reach" in result["message"]
    assert listener.received == []


async def test_a_redirect_to_a_refused_target_is_refused(
    live_service: LiveService, admin: Org, login_suite: dict[str, str]
) -> None:
    inner = Listener("127.0.0.2")  # loopback too, but not on the list
    await inner.start()
    outer = Listener("127.0.0.1", redirect_to=f"{inner.url}/inside")
    await outer.start()
    service = LiveService(
        msgspec.structs.replace(live_service.settings, allowed_targets="127.0.0.1")
    )
    service.start()
    org = Org(service, admin.key)
    try:
        flow = {
            "name": "redirected",
            "base_url": "{{ BASE_URL }}",
            "tests": {"hop": {"request": {"url": f"{outer.url}/go", "follow_redirects": True}}},
        }
        suite = await org.ok(
            "POST",
            "/api/v1/suites",
            201,
            json={"project_id": login_suite["project"], "content": json.dumps(flow)},
        )
        run_id = await org.start(suite["id"], login_suite["environment"])
        await org.finished(run_id)
        (result,) = (await org.ok("GET", f"/api/v1/runs/{run_id}/results"))["items"]
    finally:
        await org.http.aclose()
        service.stop()
        await outer.stop()
        await inner.stop()
    assert result["category"] == "connection" and "refused target: 127.0.0.2" in result["message"]
    assert len(outer.received) == 1 and inner.received == []


def test_a_wrong_allowed_targets_value_stops_baton_serve_with_exit_2(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BATON_ALLOWED_TARGETS", "10.0.0.0/8,x/y")
    code, _, err = baton("serve", "--port", "0")
    assert code == 2 and "Traceback" not in err
    assert "error: BATON_ALLOWED_TARGETS: 'x/y' is not a host name" in err


# ---- tenancy: every route, with another organization's ids ----------------------------------

TENANT_FLOW = """
name: tenancy
base_url: "{{ BASE_URL }}"
services:
  shop: {base_url: "{{ BASE_URL }}", health: /health, retries: 0}
tests:
  login:
    request:
      method: POST
      url: /auth/login
      json: {username: alice, password: "{{ secrets.SHOP_PASSWORD }}"}
    expect: {status: 200}
  broken: {request: {url: /health}, expect: {status: 418}}
"""
Route = tuple[str, str, str, Any]
"""(method, the app's route path, the URL requested, the JSON body), ids as {placeholders}."""
FOREIGN: list[Route] = [
    ("GET", "/api/v1/projects/{project_id:uuid}", "/api/v1/projects/{project}", None),
    ("PATCH", "/api/v1/projects/{project_id:uuid}", "/api/v1/projects/{project}", {}),
    ("DELETE", "/api/v1/projects/{project_id:uuid}", "/api/v1/projects/{project}", None),
    ("PATCH", "/api/v1/projects/bulk", "/api/v1/projects/bulk", [{"id": "{project}"}]),
    (
        "GET",
        "/api/v1/projects/{project_id:uuid}/analytics",
        "/api/v1/projects/{project}/analytics",
        None,
    ),
    (
        "GET",
        "/api/v1/projects/{project_id:uuid}/services/health",
        "/api/v1/projects/{project}/services/health",
        None,
    ),
    (
        "GET",
        "/api/v1/projects/{project_id:uuid}/stream",
        "/api/v1/projects/{project}/stream",
        None,
    ),
    ("WS", "/api/v1/projects/{project_id:uuid}/ws", "/api/v1/projects/{project}/ws", None),
    ("GET", "/api/v1/suites", "/api/v1/suites?project_id={project}", None),
    ("POST", "/api/v1/suites", "/api/v1/suites", {"project_id": "{project}", "content": "{flow}"}),
    (
        "POST",
        "/api/v1/suites/bulk",
        "/api/v1/suites/bulk",
        [{"project_id": "{project}", "content": "{flow}"}],
    ),
    (
        "PATCH",
        "/api/v1/suites/bulk",
        "/api/v1/suites/bulk",
        [{"id": "{suite}", "content": "{flow}"}],
    ),
    ("GET", "/api/v1/suites/{suite_id:uuid}", "/api/v1/suites/{suite}", None),
    ("PUT", "/api/v1/suites/{suite_id:uuid}", "/api/v1/suites/{suite}", {"content": "{flow}"}),
    ("DELETE", "/api/v1/suites/{suite_id:uuid}", "/api/v1/suites/{suite}", None),
    ("GET", "/api/v1/tests", "/api/v1/tests?suite_id={suite}", None),
    ("GET", "/api/v1/tests", "/api/v1/tests?project_id={project}", None),
    ("GET", "/api/v1/tests/{test_id:uuid}", "/api/v1/tests/{test}", None),
    ("GET", "/api/v1/environments", "/api/v1/environments?project_id={project}", None),
    (
        "POST",
        "/api/v1/environments",
        "/api/v1/environments",
        {"project_id": "{project}", "name": "x"},
    ),
    (
        "POST",
        "/api/v1/environments/bulk",
        "/api/v1/environments/bulk",
        [{"project_id": "{project}", "name": "x"}],
    ),
    ("PATCH", "/api/v1/environments/bulk", "/api/v1/environments/bulk", [{"id": "{environment}"}]),
    (
        "GET",
        "/api/v1/environments/{environment_id:uuid}",
        "/api/v1/environments/{environment}",
        None,
    ),
    (
        "PATCH",
        "/api/v1/environments/{environment_id:uuid}",
        "/api/v1/environments/{environment}",
        {"remove": ["SHOP_PASSWORD"]},
    ),
    (
        "DELETE",
        "/api/v1/environments/{environment_id:uuid}",
        "/api/v1/environments/{environment}",
        None,
    ),
    ("GET", "/api/v1/runs", "/api/v1/runs?project_id={project}", None),
    ("GET", "/api/v1/runs", "/api/v1/runs?suite_id={suite}&environment_id={environment}", None),
    ("GET", "/api/v1/runs", "/api/v1/runs?rerun_of={run}", None),
    ("POST", "/api/v1/runs", "/api/v1/runs", {"suite_id": "{suite}"}),
    (
        "POST",
        "/api/v1/runs",
        "/api/v1/runs",
        {"suite_id": "{own_suite}", "environment_id": "{environment}"},
    ),
    (
        "POST",
        "/api/v1/runs",
        "/api/v1/runs",
        {
            "suite_id": "{own_suite}",
            "environment_id": "{own_environment}",
            "session_id": "{session}",
        },
    ),
    ("GET", "/api/v1/runs/{run_id:uuid}", "/api/v1/runs/{run}", None),
    ("GET", "/api/v1/runs/{run_id:uuid}/context", "/api/v1/runs/{run}/context?at=1", None),
    ("GET", "/api/v1/runs/{run_id:uuid}/events", "/api/v1/runs/{run}/events", None),
    ("GET", "/api/v1/runs/{run_id:uuid}/results", "/api/v1/runs/{run}/results", None),
    (
        "GET",
        "/api/v1/runs/{run_id:uuid}/tests/{test:str}/issue",
        "/api/v1/runs/{run}/tests/broken/issue",
        None,
    ),
    (
        "GET",
        "/api/v1/runs/{run_id:uuid}/diff/{other:uuid}",
        "/api/v1/runs/{run}/diff/{own_run}",
        None,
    ),
    (
        "GET",
        "/api/v1/runs/{run_id:uuid}/diff/{other:uuid}",
        "/api/v1/runs/{own_run}/diff/{run}",
        None,
    ),
    ("GET", "/api/v1/runs/{run_id:uuid}/stream", "/api/v1/runs/{run}/stream", None),
    ("WS", "/api/v1/runs/{run_id:uuid}/ws", "/api/v1/runs/{run}/ws", None),
    ("POST", "/api/v1/runs/{run_id:uuid}/cancel", "/api/v1/runs/{run}/cancel", None),
    ("POST", "/api/v1/runs/{run_id:uuid}/rerun", "/api/v1/runs/{run}/rerun", None),
    ("GET", "/api/v1/sessions/{session_id:uuid}", "/api/v1/sessions/{session}", None),
    ("GET", "/api/v1/sessions/{session_id:uuid}/runs", "/api/v1/sessions/{session}/runs", None),
    *(
        (
            "POST",
            f"/api/v1/sessions/{{session_id:uuid}}/{change}",
            f"/api/v1/sessions/{{session}}/{change}",
            None,
        )
        for change in ("pause", "resume", "complete", "fail")
    ),
    ("DELETE", "/api/v1/keys/{key_id:uuid}", "/api/v1/keys/{key}", None),
    # the dashboard's pages, with the login cookie as a browser sends it
    ("GET", "/runs/{run_id:uuid}", "/runs/{run}", None),
    ("GET", "/runs/{run_id:uuid}/waterfall", "/runs/{run}/waterfall", None),
    ("GET", "/runs/{run_id:uuid}/diff/{other:uuid}", "/runs/{run}/diff/{own_run}", None),
    ("GET", "/runs/{run_id:uuid}/diff/{other:uuid}", "/runs/{own_run}/diff/{run}", None),
    ("GET", "/analytics", "/analytics?project={project}", None),
]
"""Every route that names a resource: another organization's ids get what ids of nothing
get, so its resources can be neither reached nor told from absent ones."""
OWN: dict[tuple[str, str], str] = {
    ("GET", "/api/v1/projects"): "lists the caller's (checked: none of the other's ids)",
    ("GET", "/api/v1/keys"): "lists the caller's (checked)",
    ("GET", "/runs"): "lists the caller's (checked)",
    ("GET", "/api/v1/runs"): "lists the caller's (checked)",
    ("GET", "/api/v1/suites"): "lists the caller's (checked)",
    ("GET", "/api/v1/environments"): "lists the caller's (checked)",
    ("GET", "/api/v1/tests"): "lists the caller's (checked)",
    ("GET", "/analytics"): "the caller's first project (checked)",
    ("POST", "/api/v1/projects"): "creates in the caller's organization; names are per org",
    ("POST", "/api/v1/projects/bulk"): "creates in the caller's organization",
    ("POST", "/api/v1/keys"): "creates in the caller's organization",
    ("POST", "/api/v1/sessions"): "creates in the caller's organization (a project by name)",
    ("GET", "/"): "a redirect to /runs",
}
PUBLIC = {("GET", "/health"), ("GET", "/login"), ("POST", "/login"), ("POST", "/logout")}
"""Routes that need no key; /schema (the OpenAPI document) is public too."""


def _app_routes() -> set[tuple[str, str]]:
    from litestar.routes import HTTPRoute, WebSocketRoute

    from context_service.app import create_app
    from events.settings import Settings

    found: set[tuple[str, str]] = set()
    for route in create_app(Settings(allowed_targets="public")).routes:
        if isinstance(route, WebSocketRoute):
            found.add(("WS", route.path))
        elif isinstance(route, HTTPRoute) and not route.path.startswith("/schema"):
            found.update((method, route.path) for method in route.methods - {"OPTIONS"})
    return found


def test_every_route_is_checked_for_tenancy_or_public() -> None:
    """A route added later fails here until it joins FOREIGN (with the ids it takes), OWN
    or PUBLIC."""
    listed = {(method, path) for method, path, _, _ in FOREIGN} | set(OWN) | PUBLIC
    routes = _app_routes()
    assert routes - listed == set(), "routes no tenancy check covers"
    assert listed - routes == set(), "listed routes the app does not have"


@pytest.fixture(scope="module")
async def tenants(live_service: LiveService, shop: str) -> AsyncIterator[dict[str, Any]]:
    """Two organizations with a project of the same name each: acme's with a run (in a
    session, with a failed test and a health check), a read key; globex's with a run."""
    orgs = {}
    for slug in ("acme", "globex"):
        key = await create_key(
            live_service.settings, organization=slug, scopes=["read", "run", "admin"], name="t"
        )
        orgs[slug] = Org(live_service, key)
    ids: dict[str, dict[str, str]] = {}
    for slug, org in orgs.items():
        project = await org.ok("POST", "/api/v1/projects", 201, json={"name": "tenancy"})
        variables = [
            {"name": "BASE_URL", "value": shop},
            {"name": "SHOP_PASSWORD", "value": PASSWORD, "secret": True},
        ]
        body = {"project_id": project["id"], "name": "local", "variables": variables}
        environment = await org.ok("POST", "/api/v1/environments", 201, json=body)
        body = {"project_id": project["id"], "content": TENANT_FLOW}
        suite = await org.ok("POST", "/api/v1/suites", 201, json=body)
        body = {"name": "exploratory", "project": "tenancy"}
        session = await org.ok("POST", "/api/v1/sessions", 201, json=body)
        body = {"suite_id": suite["id"], "environment_id": environment["id"]}
        run = await org.ok("POST", "/api/v1/runs", 202, json={**body, "session_id": session["id"]})
        assert (await org.finished(run["id"], within=30))["status"] == "failed"
        key = await org.ok("POST", "/api/v1/keys", 201, json={"name": "ro", "scopes": ["read"]})
        tests = await org.poll(f"/api/v1/tests?suite_id={suite['id']}", lambda t: t["total"] == 2)
        ids[slug] = {
            "project": project["id"],
            "environment": environment["id"],
            "suite": suite["id"],
            "session": session["id"],
            "run": run["id"],
            "key": key["id"],
            "read_key": key["key"],
            "test": tests["items"][0]["id"],
        }
    health = f"/api/v1/projects/{ids['acme']['project']}/services/health"
    await orgs["acme"].poll(health, lambda found: len(found["services"]) == 1)
    yield {"orgs": orgs, "ids": ids}
    for org in orgs.values():
        await org.http.aclose()


_NONCE = re.compile(r"nonce(=\"|-)[A-Za-z0-9_-]+")


async def _answer(
    service: LiveService, key: str, method: str, url: str, body: Any, cookie: bool
) -> tuple[Any, ...]:
    """What a request answers: its status, type and text (for a WebSocket: its close)."""
    if method == "WS":
        ws_url = service.url.replace("http://", "ws://") + url
        headers = {"Authorization": f"Bearer {key}"}
        async with ws_connect(ws_url, additional_headers=headers) as ws:
            try:
                await asyncio.wait_for(ws.recv(), 2)
            except ConnectionClosed:
                return ("WS", ws.close_code, ws.close_reason)
            except TimeoutError:
                pass
            return ("WS", "open", "")
    headers, cookies = ({}, {"baton_key": key}) if cookie else ({"X-API-Key": key}, {})
    client = httpx.AsyncClient(base_url=service.url, headers=headers, cookies=cookies)
    async with client as http, http.stream(method, url, json=body) as response:
        kind = response.headers.get("content-type", "")
        if kind.startswith("text/event-stream"):  # a stream that follows a run: opened
            return (response.status_code, kind, "")
        text = (await response.aread()).decode()
    return (response.status_code, kind, _NONCE.sub("nonce", text))


def _filled(template: Any, values: dict[str, str]) -> Any:
    return json.loads(_substituted(json.dumps(template), values)) if template is not None else None


def _substituted(text: str, values: dict[str, str]) -> str:
    for name, value in values.items():
        text = text.replace("{" + name + "}", value)
    return text


async def test_another_organizations_ids_get_what_ids_of_nothing_get(
    live_service: LiveService, tenants: dict[str, Any]
) -> None:
    acme, globex = tenants["ids"]["acme"], tenants["ids"]["globex"]
    flow = json.dumps(TENANT_FLOW)[1:-1]  # the flow as a JSON string's content
    own = {"own_run": globex["run"], "own_suite": globex["suite"], "flow": flow}
    theirs = {name: acme[name] for name in ("project", "suite", "environment", "test")}
    theirs |= {name: acme[name] for name in ("session", "run", "key")}
    nothing = {name: str(uuid.uuid4()) for name in theirs}
    own["own_environment"] = globex["environment"]
    blank = re.compile("|".join(map(re.escape, (*theirs.values(), *nothing.values()))))
    key = tenants["orgs"]["globex"].key
    differ = []
    for method, route, url, body in FOREIGN:
        cookie = not url.startswith("/api/")
        answers = []
        for ids in (theirs, nothing):
            values = {**ids, **own}
            found = await _answer(
                live_service, key, method, _substituted(url, values), _filled(body, values), cookie
            )
            answers.append(tuple(blank.sub("<id>", str(part)) for part in found))
        status = answers[0][1] if method == "WS" else answers[0][0]
        listing = "?" in url or route.endswith("/services/health")  # an empty list, as for none
        if answers[0] != answers[1] or not (listing or status in ("404", "4404", "422")):
            differ.append((method, url, answers[0][:3], answers[1][:3]))
    assert differ == [], "another organization's resources are not absent (A's ids, none)"
    # none of it changed anything of acme's: everything is there as it was
    org = tenants["orgs"]["acme"]
    for path in (
        f"/api/v1/projects/{acme['project']}",
        f"/api/v1/suites/{acme['suite']}",
        f"/api/v1/runs/{acme['run']}",
    ):
        await org.ok("GET", path)
    environment = await org.ok("GET", f"/api/v1/environments/{acme['environment']}")
    assert [v["name"] for v in environment["variables"]] == ["BASE_URL", "SHOP_PASSWORD"]
    session = await org.ok("GET", f"/api/v1/sessions/{acme['session']}")
    assert session["status"] in ("created", "active") and session["runs"] == 1
    async with live_service.client(acme["read_key"]) as reader:
        assert (await reader.get("/api/v1/runs")).json()["total"] == 1
    # what globex lists holds nothing of acme's
    everything = set(theirs.values())
    for path in [route for method, route in OWN if method == "GET"]:
        found = await _answer(live_service, key, "GET", path, None, not path.startswith("/api/"))
        assert found[0] in (200, 303), (path, found)
        assert not [name for name in everything if name in found[2]], path
    globex_runs = await tenants["orgs"]["globex"].ok("GET", "/api/v1/runs")
    assert globex_runs["total"] == 1  # no run was started with acme's suite or session


async def test_a_revoked_key_gets_401_everywhere_and_a_read_key_403_on_every_change(
    live_service: LiveService, tenants: dict[str, Any]
) -> None:
    acme = tenants["ids"]["acme"]
    globex = tenants["orgs"]["globex"]
    created = await globex.ok(
        "POST", "/api/v1/keys", 201, json={"name": "gone", "scopes": ["read"]}
    )
    await globex.ok("DELETE", f"/api/v1/keys/{created['id']}", 204)
    values = {**acme, "own_run": acme["run"], "own_suite": acme["suite"], "flow": "x"}
    values["own_environment"] = acme["environment"]
    for method, _, url, body in FOREIGN:
        target, data = _substituted(url, values), _filled(body, values)
        cookie = not url.startswith("/api/")
        if method == "WS":
            with pytest.raises(InvalidStatus):  # its handshake is refused
                await _answer(live_service, created["key"], method, target, data, cookie)
            continue
        status, _, text = await _answer(live_service, created["key"], method, target, data, cookie)
        if cookie:  # a page sends a browser with a stale cookie to the login form
            assert status == 303, (url, status)
        else:
            assert status == 401 and "this API key is not valid" in text, (url, status)
        if method != "GET":  # acme's own key without the scope: refused before any lookup
            status, _, text = await _answer(
                live_service, acme["read_key"], method, target, data, cookie
            )
            assert status == 403 and "lacks the" in text, (url, status)


async def test_a_websocket_takes_no_key_from_the_dashboards_cookie(
    live_service: LiveService, tenants: dict[str, Any]
) -> None:
    """A page of the same site (another subdomain) can open a WebSocket to the service,
    and the browser would send the login cookie along: no CORS stops that page from reading
    the messages, so a socket needs the key in a header (the dashboard uses EventSource)."""
    acme = tenants["ids"]["acme"]
    ws_url = live_service.url.replace("http://", "ws://") + f"/api/v1/runs/{acme['run']}/ws"
    cookie = {"Cookie": f"baton_key={acme['read_key']}"}
    with pytest.raises(InvalidStatus):  # the handshake is refused: no key
        async with ws_connect(ws_url, additional_headers=cookie):
            pass
    # the header opens it, and the cookie keeps working for the page's EventSource
    header = {"Authorization": f"Bearer {acme['read_key']}"}
    async with ws_connect(ws_url, additional_headers=header) as ws:
        assert "RunStarted" in str(await asyncio.wait_for(ws.recv(), 5))
    browser = httpx.AsyncClient(base_url=live_service.url, cookies={"baton_key": acme["read_key"]})
    async with browser, browser.stream("GET", f"/api/v1/runs/{acme['run']}/stream") as response:
        assert response.status_code == 200
