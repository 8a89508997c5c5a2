"""What a tenant's key may do to the service and through it: no secrets sent where a run key
points them, no stream left open after its key is revoked, nothing but up or down told
without a key, no request to a target the service does not allow."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from context_service.keys import create_key
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


async def _sse_lines(response: Any, into: list[str]) -> None:
    async for line in response.aiter_lines():
        into.append(line)


def _json(text: str) -> Any:
    return json.loads(text)
