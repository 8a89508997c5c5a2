"""What a tenant's key may do to the service and through it: no secrets sent where a run key
points them, no stream left open after its key is revoked, nothing but up or down told
without a key, no request to a target the service does not allow."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from aiohttp import web
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from context_service.database import KEY_TTL
from context_service.keys import create_key
from context_service.realtime import KEY_CHECK, REVOKED_CODE
from examples.shop.server import serve as serve_shop
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
    """An HTTP server on 127.0.0.1 that answers 200 to anything and keeps what it was sent."""

    def __init__(self) -> None:
        self.received: list[str] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        async def anything(request: web.Request) -> web.Response:
            self.received.append(f"{request.method} {request.path_qs} {await request.text()}")
            return web.json_response({"ok": True})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", anything)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

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
