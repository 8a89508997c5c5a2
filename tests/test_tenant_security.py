"""What a tenant's key may do to the service and through it: no secrets sent where a run key
points them, no stream left open after its key is revoked, nothing but up or down told
without a key, no request to a target the service does not allow."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import asyncpg
import msgspec
import pytest
from aiohttp import web
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

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
