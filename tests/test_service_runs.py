"""Runs through the service: started over HTTP, run in the background against the demo shop,
their context and events served, reruns that reuse what passed tests captured, cancels, and
one organization never reaching another's runs (row-level security in force)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from context_service.keys import create_key
from context_service.watch import sse_messages
from events.secrets import Cipher
from examples.shop.server import serve as serve_shop
from tests.cli import baton
from tests.conftest import LiveService, Org
from tests.test_run import AUTHOR_FLOW

CHECKOUT = (Path(__file__).parent.parent / "examples" / "shop" / "checkout.yaml").read_text()
RERUN_FLOW = """
name: rerun demo
base_url: "{{ env.SHOP_URL }}"
tests:
  login:
    request:
      method: POST
      url: /auth/login
      json: {username: alice, password: "{{ secrets.SHOP_PASSWORD }}"}
    expect: {status: 200}
    capture:
      auth.token: {json: "$.access_token"}
      user_id: {json: "$.user_id"}
  profile:
    request:
      url: /me
      headers: {Authorization: "Bearer {{ auth.token }}"}
    expect:
      status: 200
      json: {"$.username": "{{ env.EXPECTED_USER }}", "$.user_id": "{{ user_id }}"}
  echo:
    depends_on: [profile]
    request:
      url: /echo
      params: {seen: "{{ auth.token }}"}
    expect: {status: 200}
"""
SLOW_FLOW = """
name: slow
base_url: "{{ env.SHOP_URL }}"
tests:
  nap:
    request: {url: /slow, params: {ms: 8000}}
  after_nap:
    depends_on: [nap]
    request: {url: /health}
"""


@pytest.fixture(scope="module")
async def shop_url() -> AsyncIterator[str]:
    runner, url = await serve_shop("127.0.0.1", 0)
    yield url
    await runner.cleanup()


@pytest.fixture(scope="module")
async def acme(live_service: LiveService) -> AsyncIterator[Org]:
    key = await create_key(
        live_service.settings, organization="acme", scopes=["read", "run", "admin"], name="ci"
    )
    org = Org(live_service, key)
    yield org
    await org.http.aclose()


@pytest.fixture(scope="module")
async def globex(live_service: LiveService) -> AsyncIterator[Org]:
    key = await create_key(
        live_service.settings, organization="globex", scopes=["read", "run", "admin"], name="ci"
    )
    org = Org(live_service, key)
    yield org
    await org.http.aclose()


async def _project(org: Org, name: str, shop_url: str, **variables: str) -> dict[str, str]:
    """A project with an environment pointing at the shop: {project, environment} ids."""
    project = await org.ok("POST", "/api/v1/projects", 201, json={"name": name})
    env_vars = [
        {"name": "SHOP_URL", "value": shop_url},
        {"name": "SHOP_PASSWORD", "value": "secret-alice", "secret": True},
        *({"name": k, "value": v} for k, v in variables.items()),
    ]
    environment = await org.ok(
        "POST",
        "/api/v1/environments",
        201,
        json={"project_id": project["id"], "name": "local", "variables": env_vars},
    )
    return {"project": project["id"], "environment": environment["id"]}


async def _suite(org: Org, project: str, content: str) -> str:
    suite = await org.ok(
        "POST", "/api/v1/suites", 201, json={"project_id": project, "content": content}
    )
    return str(suite["id"])


async def _all_events(org: Org, run_id: str, page: int = 7) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    after = 0
    while True:
        found = await org.ok("GET", f"/api/v1/runs/{run_id}/events?after={after}&limit={page}")
        events.extend(found["items"])
        if found["next_after"] is None:
            return events
        after = found["next_after"]


@pytest.fixture(scope="module")
async def checkout_run(acme: Org, shop_url: str) -> dict[str, Any]:
    ids = await _project(acme, "shop", shop_url)
    suite = await _suite(acme, ids["project"], CHECKOUT)
    started = await acme.ok(
        "POST",
        "/api/v1/runs",
        202,
        json={"suite_id": suite, "environment_id": ids["environment"]},
    )
    assert started["status"] in ("queued", "running")
    return await acme.finished(started["id"], within=30)


async def test_a_run_started_through_the_api_runs_the_suite_against_the_shop(
    acme: Org, checkout_run: dict[str, Any]
) -> None:
    assert checkout_run["status"] == "passed", checkout_run
    assert checkout_run["total_tests"] == checkout_run["passed_tests"] == 10
    assert (checkout_run["suite"], checkout_run["environment"]) == ("shop checkout", "local")
    results = await acme.ok("GET", f"/api/v1/runs/{checkout_run['id']}/results?limit=100")
    assert {r["test"]: r["status"] for r in results["items"]} == dict.fromkeys(
        ["health", "login", "profile", "catalog", "product", "add_to_cart", "get_cart",
         "checkout", "order_shipped", "order_history"], "passed",
    )  # fmt: skip
    listed = await acme.ok("GET", "/api/v1/runs?status=passed,failed&fields=id,status")
    assert {"id": checkout_run["id"], "status": "passed"} in listed["items"]
    tests = await acme.ok("GET", f"/api/v1/tests?suite_id={checkout_run['suite_id']}&limit=100")
    assert len(tests["items"]) == 10
    assert {t["last_status"] for t in tests["items"]} == {"passed"}


async def test_its_context_is_served_now_and_at_an_earlier_position(
    acme: Org, checkout_run: dict[str, Any]
) -> None:
    run_id = checkout_run["id"]
    context = await acme.ok("GET", f"/api/v1/runs/{run_id}/context")
    assert context["status"] == "passed"
    assert context["auth"] == {"token": "***", "refresh_token": "***"}
    assert isinstance(context["variables"]["product_id"], int)
    assert context["statuses"]["order_history"] == "passed"
    events = await _all_events(acme, run_id)
    captured = next(
        e for e in events if e["type"] == "VariableCaptured" and e["data"]["name"] == "product_id"
    )
    before = await acme.ok("GET", f"/api/v1/runs/{run_id}/context?at={captured['position'] - 1}")
    assert "product_id" not in before["variables"] and before["status"] == "running"
    at = await acme.ok("GET", f"/api/v1/runs/{run_id}/context?at={captured['position']}")
    assert at["variables"]["product_id"] == context["variables"]["product_id"]


async def test_its_events_are_paged_by_position_in_order_without_a_secret(
    acme: Org, checkout_run: dict[str, Any], live_service: LiveService
) -> None:
    events = await _all_events(acme, checkout_run["id"], page=7)
    positions = [e["position"] for e in events]
    assert positions == sorted(set(positions))
    assert [e["version"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["type"] == "RunStarted" and events[-1]["type"] == "RunCompleted"
    organization = events[0]["data"]["organization"]
    conn = await asyncpg.connect(live_service.settings.database_url)
    try:
        slug = await conn.fetchval(
            "SELECT slug FROM organizations WHERE id = $1::uuid", organization
        )
    finally:
        await conn.close()
    assert slug == "acme"
    text = json.dumps(events)
    assert "secret-alice" not in text
    tokens = [e for e in events if e["type"] == "AuthTokenUpdated"]
    assert tokens and all(e["data"]["value"] == "***" for e in tokens)


async def _clear_token(service: LiveService, run_id: str) -> str:
    """The auth token a run captured, decrypted with the service's key."""
    conn = await asyncpg.connect(service.settings.database_url)
    try:
        sealed = await conn.fetchval(
            "SELECT data->>'value' FROM events WHERE stream = $1 AND type = 'AuthTokenUpdated'",
            f"run-{run_id}",
        )
    finally:
        await conn.close()
    assert service.settings.secret_key is not None
    return Cipher(service.settings.secret_key).decrypt(sealed)


async def test_rerun_runs_only_what_did_not_pass_with_the_captured_token(
    acme: Org, shop_url: str, live_service: LiveService
) -> None:
    ids = await _project(acme, "rerun", shop_url, EXPECTED_USER="bob")
    suite = await _suite(acme, ids["project"], RERUN_FLOW)
    first = await acme.ok(
        "POST", "/api/v1/runs", 202, json={"suite_id": suite, "environment_id": ids["environment"]}
    )
    first = await acme.finished(first["id"], within=30)
    assert (first["status"], first["passed_tests"], first["failed_tests"]) == ("failed", 1, 1)
    assert first["skipped_tests"] == 1
    # the environment is fixed; login is not run again: the token it captured is reused
    await acme.ok(
        "PATCH",
        f"/api/v1/environments/{ids['environment']}",
        json={"variables": [{"name": "EXPECTED_USER", "value": "alice"}]},
    )
    again = await acme.ok("POST", f"/api/v1/runs/{first['id']}/rerun", 202)
    assert again["rerun_of"] == first["id"] and again["id"] != first["id"]
    again = await acme.finished(again["id"], within=30)
    assert (again["status"], again["total_tests"], again["passed_tests"]) == ("passed", 2, 2)
    events = await _all_events(acme, again["id"])
    # the rerun's log says which run it continues, as baton rerun's does
    assert events[0]["type"] == "RunStarted" and events[0]["data"]["continues"] == first["id"]
    urls = [e["data"]["url"] for e in events if e["type"] == "RequestSent"]
    assert urls and not any(url.endswith("/auth/login") for url in urls)
    context = await acme.ok("GET", f"/api/v1/runs/{again['id']}/context")
    assert context["auth"] == {"token": "***"}
    assert context["captured"]["login"] == {"auth.token": "***", "user_id": 1}
    assert context["statuses"] == {"profile": "passed", "echo": "passed"}
    # the reused token is a secret the runner did not capture itself: masked all the same
    token = await _clear_token(live_service, first["id"])
    echoed = next(
        e["data"]["body_excerpt"]
        for e in events
        if e["type"] == "ResponseReceived" and e["data"]["test"] == "echo"
    )
    assert "***" in echoed
    assert token not in json.dumps(events)
    conn = await asyncpg.connect(live_service.settings.database_url)
    try:
        stored = await conn.fetch(
            "SELECT data::text FROM events WHERE stream = $1", f"run-{again['id']}"
        )
    finally:
        await conn.close()
    assert stored and not any(token in row[0] for row in stored)
    # a run whose every test passed has nothing to rerun
    response = await acme.http.post(f"/api/v1/runs/{again['id']}/rerun")
    assert response.status_code == 409
    assert "nothing to rerun" in response.json()["detail"]


async def test_a_rerun_logs_in_again_once_the_token_capture_outlived_its_ttl(
    acme: Org, shop_url: str
) -> None:
    """The service's rerun is baton rerun's (orchestrator.rerun): a reused capture whose
    ttl has passed makes its producer run again."""
    ids = await _project(acme, "ttl", shop_url, EXPECTED_USER="bob")
    flow = RERUN_FLOW.replace(
        'auth.token: {json: "$.access_token"}', 'auth.token: {json: "$.access_token", ttl: 1s}'
    )
    suite = await _suite(acme, ids["project"], flow)
    first = await acme.ok(
        "POST", "/api/v1/runs", 202, json={"suite_id": suite, "environment_id": ids["environment"]}
    )
    first = await acme.finished(first["id"], within=30)
    assert first["status"] == "failed"
    await acme.ok(
        "PATCH",
        f"/api/v1/environments/{ids['environment']}",
        json={"variables": [{"name": "EXPECTED_USER", "value": "alice"}]},
    )
    await asyncio.sleep(1.2)  # the token's ttl passes
    again = await acme.ok("POST", f"/api/v1/runs/{first['id']}/rerun", 202)
    again = await acme.finished(again["id"], within=30)
    assert (again["status"], again["total_tests"], again["passed_tests"]) == ("passed", 3, 3)
    urls = [
        e["data"]["url"] for e in await _all_events(acme, again["id"]) if e["type"] == "RequestSent"
    ]
    assert sum(url.endswith("/auth/login") for url in urls) == 1


async def test_a_running_run_is_cancelled_through_the_api(acme: Org, shop_url: str) -> None:
    ids = await _project(acme, "slow", shop_url)
    suite = await _suite(acme, ids["project"], SLOW_FLOW)
    run = await acme.ok(
        "POST", "/api/v1/runs", 202, json={"suite_id": suite, "environment_id": ids["environment"]}
    )
    for _ in range(100):  # until the slow request is under way
        page = await acme.ok("GET", f"/api/v1/runs/{run['id']}/events")
        if any(e["type"] == "RequestSent" for e in page["items"]):
            break
        await asyncio.sleep(0.05)
    early = await acme.http.post(f"/api/v1/runs/{run['id']}/rerun")
    assert early.status_code == 409 and "has not ended" in early.json()["detail"]
    cancelled = await acme.ok("POST", f"/api/v1/runs/{run['id']}/cancel", 202)
    assert cancelled["status"] == "cancelled"
    assert cancelled["message"] == "cancelled through the API"
    events = await _all_events(acme, run["id"])
    assert events[-1]["type"] == "RunCancelled"
    assert not any(e["type"] == "TestPassed" for e in events)
    again = await acme.http.post(f"/api/v1/runs/{run['id']}/cancel")
    assert again.status_code == 409 and "ended" in again.json()["detail"]


async def test_a_run_is_checked_before_it_starts(acme: Org, shop_url: str) -> None:
    ids = await _project(acme, "checked", shop_url)
    flow = RERUN_FLOW.replace("secrets.SHOP_PASSWORD", "secrets.MISSING")
    suite = await _suite(acme, ids["project"], flow)  # secrets are the run's business
    response = await acme.http.post(
        "/api/v1/runs", json={"suite_id": suite, "environment_id": ids["environment"]}
    )
    assert response.status_code == 422
    assert "secret MISSING is not set" in response.json()["detail"]
    other = await _project(acme, "other", shop_url)
    response = await acme.http.post(
        "/api/v1/runs", json={"suite_id": suite, "environment_id": other["environment"]}
    )
    assert response.status_code == 422 and "another project" in response.json()["detail"]
    response = await acme.http.post("/api/v1/runs", json={"suite_id": str(uuid.uuid4())})
    assert response.status_code == 404
    # a run reads its environment's variables, never the service's process environment
    nosy = await _suite(
        acme,
        ids["project"],
        SLOW_FLOW.replace("slow", "nosy").replace(
            "{url: /health}", '{url: /health, params: {p: "{{ env.PATH }}"}}'
        ),
    )
    response = await acme.http.post(
        "/api/v1/runs", json={"suite_id": nosy, "environment_id": ids["environment"]}
    )
    assert response.status_code == 422
    assert "environment variable PATH is not set" in response.json()["detail"]


async def test_another_organization_gets_404_on_every_part_of_a_run(
    globex: Org, acme: Org, checkout_run: dict[str, Any]
) -> None:
    run_id = checkout_run["id"]
    for path in ("", "/context", "/context?at=1", "/events", "/results"):
        response = await globex.http.get(f"/api/v1/runs/{run_id}{path}")
        assert response.status_code == 404, path
        assert response.headers["content-type"] == "application/problem+json"
    for action in ("cancel", "rerun"):
        assert (await globex.http.post(f"/api/v1/runs/{run_id}/{action}")).status_code == 404
    listed = await globex.ok("GET", "/api/v1/runs")
    assert listed["total"] == 0
    # the queries name no organization: row-level security is what hides acme's rows
    for path in (
        f"/api/v1/projects/{checkout_run['project_id']}",
        f"/api/v1/suites/{checkout_run['suite_id']}",
        f"/api/v1/environments/{checkout_run['environment_id']}",
    ):
        assert (await globex.http.get(path)).status_code == 404, path
        assert (await acme.http.get(path)).status_code == 200, path
    tests = await acme.ok("GET", f"/api/v1/tests?suite_id={checkout_run['suite_id']}")
    test_id = tests["items"][0]["id"]
    assert (await globex.http.get(f"/api/v1/tests/{test_id}")).status_code == 404


async def test_the_service_role_sees_no_other_organizations_rows(
    live_service: LiveService, checkout_run: dict[str, Any]
) -> None:
    conn = await asyncpg.connect(live_service.settings.database_url)
    try:
        acme_id = await conn.fetchval("SELECT id FROM organizations WHERE slug = 'acme'")
        globex_id = await conn.fetchval("SELECT id FROM organizations WHERE slug = 'globex'")

        async def as_service(org: uuid.UUID | None, query: str) -> int:
            async with conn.transaction():
                await conn.execute("SET LOCAL ROLE baton_service")
                if org is not None:
                    await conn.execute(
                        "SELECT set_config('baton.organization_id', $1, true)", str(org)
                    )
                count: int = await conn.fetchval(query, uuid.UUID(checkout_run["id"]))
                return count

        runs = "SELECT count(*) FROM test_runs WHERE id = $1"
        assert await as_service(acme_id, runs) == 1
        assert await as_service(globex_id, runs) == 0
        assert await as_service(None, runs) == 0
        context = "SELECT count(*) FROM test_execution_context WHERE run_id = $1"
        assert await as_service(globex_id, context) == 0
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await as_service(acme_id, "SELECT count(*) FROM events WHERE $1::uuid IS NOT NULL")
    finally:
        await conn.close()


async def test_a_key_without_the_run_scope_cannot_start_runs(
    live_service: LiveService, checkout_run: dict[str, Any]
) -> None:
    key = await create_key(live_service.settings, organization="acme", scopes=["read"], name="ro")
    async with live_service.client(key) as http:
        assert (await http.get(f"/api/v1/runs/{checkout_run['id']}")).status_code == 200
        response = await http.post("/api/v1/runs", json={"suite_id": checkout_run["suite_id"]})
        assert response.status_code == 403
        assert "'run' scope" in response.json()["detail"]
        response = await http.post(f"/api/v1/runs/{checkout_run['id']}/rerun")
        assert response.status_code == 403


def _masked_in_events(events: list[tuple[str, dict[str, Any]]]) -> dict[str, bool]:
    """{captured name: whether its value is masked}, from (type, payload) pairs."""
    kinds = ("VariableCaptured", "AuthTokenUpdated")
    return {data["name"]: data["value"] == "***" for kind, data in events if kind in kinds}


async def test_the_api_the_stream_and_the_cli_mask_the_same_names(
    acme: Org,
    shop_url: str,
    live_service: LiveService,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """A token, a capture marked secret and an ordinary ``author``: the API's events, the
    SSE stream and ``baton context`` on the service's database mask exactly the first two."""
    ids = await _project(acme, "masked", shop_url)
    suite = await _suite(acme, ids["project"], AUTHOR_FLOW)
    run_id = await acme.start(suite, ids["environment"])
    assert (await acme.finished(run_id))["status"] == "passed"
    expected = {"auth.token": True, "pin": True, "author": False}
    api = [(e["type"], e["data"]) for e in await _all_events(acme, run_id)]
    assert _masked_in_events(api) == expected
    async with acme.http.stream("GET", f"/api/v1/runs/{run_id}/stream") as response:
        assert response.status_code == 200
        stream = [(m.event, json.loads(m.data)) async for m in sse_messages(response.aiter_lines())]
    assert _masked_in_events(stream) == expected
    assert live_service.settings.database_url and live_service.settings.secret_key
    monkeypatch.setenv("BATON_DATABASE_URL", live_service.settings.database_url)
    monkeypatch.setenv("BATON_SECRET_KEY", live_service.settings.secret_key)
    monkeypatch.setenv("BATON_HOME", str(tmp_path))
    monkeypatch.delenv("BATON_REDIS_URL", raising=False)
    code, out, err = await asyncio.to_thread(baton, "context", run_id)
    assert code == 0, out + err
    captured = json.loads(out)["captured"]
    cli = {name: value == "***" for values in captured.values() for name, value in values.items()}
    assert cli == expected
    assert captured["profile"]["author"] == "ada-lovelace"
