"""The service's REST resources over HTTP: API keys and scopes, projects, suites (checked as
the CLI checks flow files), environments with write-only secrets, list conventions, bulk
requests, and bad input answered with problem details (400, 413, 422), never a 500."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest

from context_service.app import MAX_BODY_BYTES
from context_service.database import KEY_TTL, Database
from context_service.flows import MAX_FLOW_BYTES
from context_service.keys import create_key
from events.postgres import PostgresEventStore
from tests.cli import baton
from tests.conftest import LiveService

FLOW = """
name: {name}
base_url: http://127.0.0.1:9
tests:
  ping:
    request: {{url: /health}}
    capture: {{token: {{json: $.token}}}}
  pong:
    request: {{url: "/echo/{{{{ token }}}}"}}
"""
BROKEN_FLOW = """
name: broken
base_url: http://127.0.0.1:9
tests:
  first:
    request: {url: "/items/{{ item_id }}"}
    expect: {status: 700}
    capture: {token: {json: $.token}}
  second:
    depends_on: [frist]
    request: {url: /health}
    capture: {token: {json: $.other}}
"""


@pytest.fixture(scope="module")
async def admin(live_service: LiveService) -> AsyncIterator[httpx.AsyncClient]:
    key = await create_key(
        live_service.settings, organization="initech", scopes=["read", "run", "admin"], name="a"
    )
    async with live_service.client(key) as client:
        yield client


async def _json(response: httpx.Response, status: int) -> Any:
    assert response.status_code == status, response.text
    return response.json() if response.content else None


def _problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["title"] and body["detail"]
    return body


async def test_health_needs_no_key_and_reports_each_dependency_to_a_key(
    live_service: LiveService, admin: httpx.AsyncClient
) -> None:
    async with live_service.client() as client:
        assert await _json(await client.get("/health"), 200) == {"status": "ok"}
    health = await _json(await admin.get("/health"), 200)
    assert health["status"] == "ok"
    states = {d["name"]: d["status"] for d in health["dependencies"]}
    assert states == {"postgresql": "ok", "redis": "ok", "projector": "ok"}
    projector = next(d for d in health["dependencies"] if d["name"] == "projector")
    assert "behind" in projector["detail"] and "findings judged to" in projector["detail"]


async def test_health_shows_a_dead_redis_as_degraded(
    live_service: LiveService, redis_url: str
) -> None:
    """The context cache is only a cache: without Redis the service answers from the log."""
    key = await create_key(live_service.settings, organization="initech", scopes=["read"], name="h")
    for url, state in (("redis://127.0.0.1:1/0", "degraded"), (redis_url, "ok")):
        settings = msgspec.structs.replace(live_service.settings, redis_url=url)
        other = LiveService(settings)
        other.start()
        try:
            async with other.client(key) as client:
                health = await _json(await client.get("/health"), 200)
        finally:
            other.stop()
        assert health["status"] == state
        redis = next(d for d in health["dependencies"] if d["name"] == "redis")
        assert redis["status"] == state, redis


async def test_every_api_route_needs_a_valid_key(live_service: LiveService) -> None:
    async with live_service.client() as client:
        problem = _problem(await client.get("/api/v1/projects"), 401)
        assert "API key" in problem["detail"]
        response = await client.get("/api/v1/runs", headers={"Authorization": "Bearer bk_nope"})
        assert "not valid" in _problem(response, 401)["detail"]
        assert response.headers["www-authenticate"].startswith("Bearer")
        schema = await _json(await client.get("/schema/openapi.json"), 200)
    assert "/api/v1/runs/{run_id}/context" in schema["paths"]


async def test_scopes_limit_what_a_key_may_do(live_service: LiveService) -> None:
    settings = live_service.settings
    reader = await create_key(settings, organization="initech", scopes=["read"], name="r")
    runner = await create_key(settings, organization="initech", scopes=["run"], name="x")
    async with live_service.client(reader) as client:
        await _json(await client.get("/api/v1/projects"), 200)
        problem = _problem(await client.post("/api/v1/projects", json={"name": "p"}), 403)
        assert "'admin' scope" in problem["detail"]
    # the key can also come as X-API-Key
    async with live_service.client(None, **{"X-API-Key": runner}) as client:
        assert "'read' scope" in _problem(await client.get("/api/v1/runs"), 403)["detail"]
        _problem(await client.post("/api/v1/projects", json={"name": "p"}), 403)


async def test_keys_are_shown_once_stored_hashed_and_revocable(
    live_service: LiveService, admin: httpx.AsyncClient
) -> None:
    created = await _json(
        await admin.post("/api/v1/keys", json={"name": "deploy", "scopes": ["run", "read"]}), 201
    )
    key = created["key"]
    assert key.startswith("bk_") and len(key) > 40 and created["scopes"] == ["read", "run"]
    listed = await _json(await admin.get("/api/v1/keys?name=deploy"), 200)
    assert [k["prefix"] for k in listed["items"]] == [key[:11]]
    assert key not in str(listed)
    conn = await asyncpg.connect(live_service.settings.database_url)
    try:
        row = await conn.fetchrow(
            "SELECT key_hash, row_to_json(c)::text AS everything FROM api_credentials c"
            " WHERE id = $1::uuid",
            created["id"],
        )
    finally:
        await conn.close()
    assert row["key_hash"] == hashlib.sha256(key.encode()).digest()
    assert key not in row["everything"]
    async with live_service.client(key) as client:
        await _json(await client.get("/api/v1/runs"), 200)
        await _json(await admin.delete(f"/api/v1/keys/{created['id']}"), 204)
        _problem(await client.get("/api/v1/runs"), 401)
    body = _problem(await admin.post("/api/v1/keys", json={"name": "k", "scopes": ["root"]}), 400)
    assert any("scopes" in error["location"] for error in body["errors"])


async def test_a_pooled_connection_comes_back_from_a_tenant_as_the_owner(
    live_service: LiveService,
) -> None:
    # the pool skips asyncpg's reset query: what a request's transaction set must end with it
    store = await PostgresEventStore.connect(
        live_service.settings.database_url, min_size=1, max_size=1
    )
    try:
        owner = await store.pool.fetchval("SELECT current_user")
        async with Database(store.pool, store.dsn).tenant(uuid.uuid4()) as conn:
            assert await conn.fetchval("SELECT current_user") == "baton_service"
        role, organization = await store.pool.fetchrow(
            "SELECT current_user, current_setting('baton.organization_id', true)"
        )
        assert role == owner != "baton_service"
        assert not organization
    finally:
        await store.aclose()


async def test_a_key_revoked_elsewhere_stops_working_within_the_key_ttl(
    live_service: LiveService, admin: httpx.AsyncClient
) -> None:
    # another service process revokes it: this one reuses what it knew for KEY_TTL, no longer
    created = await _json(
        await admin.post("/api/v1/keys", json={"name": "ci", "scopes": ["read"]}), 201
    )
    now = [1000.0]
    store = await PostgresEventStore.connect(live_service.settings.database_url)
    try:
        database = Database(store.pool, store.dsn, clock=lambda: now[0])
        principal = await database.principal(created["key"])
        assert principal is not None and principal.scopes == {"read"}
        await store.pool.execute(
            "UPDATE api_credentials SET revoked_at = now() WHERE id = $1::uuid", created["id"]
        )
        now[0] += KEY_TTL - 0.1
        assert await database.principal(created["key"]) == principal
        now[0] += 0.2
        assert await database.principal(created["key"]) is None
        assert await database.principal("bk_" + "x" * 43) is None
    finally:
        await store.aclose()


async def test_projects_crud_and_list_conventions(admin: httpx.AsyncClient) -> None:
    names = [f"list-{n}" for n in "edcba"]
    created = await _json(
        await admin.post("/api/v1/projects/bulk", json=[{"name": n} for n in names]), 201
    )
    assert [p["name"] for p in created] == names
    page = await _json(
        await admin.get("/api/v1/projects?name=list-a,list-b,list-c&sort=-name&limit=2"), 200
    )
    assert [p["name"] for p in page["items"]] == ["list-c", "list-b"]
    assert (page["total"], page["next_offset"]) == (3, 2)
    page = await _json(
        await admin.get("/api/v1/projects?name=list-a,list-b,list-c&sort=-name&limit=2&offset=2"),
        200,
    )
    assert [p["name"] for p in page["items"]] == ["list-a"] and page["next_offset"] is None
    page = await _json(await admin.get("/api/v1/projects?name=list-e&fields=id,name"), 200)
    assert list(page["items"][0]) == ["id", "name"]
    assert "sortable" in _problem(await admin.get("/api/v1/projects?sort=-secret"), 400)["detail"]
    assert "unknown field" in _problem(await admin.get("/api/v1/projects?fields=x"), 400)["detail"]

    project_id = created[0]["id"]
    updated = await _json(
        await admin.patch(f"/api/v1/projects/{project_id}", json={"description": "the shop"}), 200
    )
    assert updated["description"] == "the shop" and updated["name"] == "list-e"
    assert (await _json(await admin.get(f"/api/v1/projects/{project_id}"), 200)) == updated
    duplicate = _problem(await admin.post("/api/v1/projects", json={"name": "list-e"}), 409)
    assert "exists already" in duplicate["detail"]
    await _json(await admin.delete(f"/api/v1/projects/{project_id}"), 204)
    _problem(await admin.get(f"/api/v1/projects/{project_id}"), 404)


async def test_bulk_requests_are_all_or_nothing_with_an_error_per_item(
    admin: httpx.AsyncClient,
) -> None:
    await _json(await admin.post("/api/v1/projects", json={"name": "taken"}), 201)
    items = [{"name": "bulk-1"}, {"name": "taken"}, {"name": "bulk-2"}, {"name": "taken"}]
    problem = _problem(await admin.post("/api/v1/projects/bulk", json=items), 422)
    assert "none was" in problem["detail"]
    assert sorted({(e["index"], e["status"]) for e in problem["errors"]}) == [(1, 409), (3, 409)]
    found = await _json(await admin.get("/api/v1/projects?name=bulk-1,bulk-2"), 200)
    assert found["total"] == 0
    projects = await _json(
        await admin.post("/api/v1/projects/bulk", json=[{"name": "bulk-1"}, {"name": "bulk-2"}]),
        201,
    )
    changes = [{"id": p["id"], "description": f"d{i}"} for i, p in enumerate(projects)]
    updated = await _json(await admin.patch("/api/v1/projects/bulk", json=changes), 200)
    assert [p["description"] for p in updated] == ["d0", "d1"]
    _problem(await admin.post("/api/v1/projects/bulk", json=[]), 400)


async def test_suites_are_checked_as_the_cli_checks_flow_files(
    admin: httpx.AsyncClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = await _json(await admin.post("/api/v1/projects", json={"name": "flows"}), 201)
    body = {"project_id": project["id"], "content": BROKEN_FLOW, "filename": "broken.yaml"}
    problem = _problem(await admin.post("/api/v1/suites", json=body), 422)
    (tmp_path / "broken.yaml").write_text(BROKEN_FLOW)
    monkeypatch.chdir(tmp_path)
    code, _, err = baton("validate", "broken.yaml")
    assert code == 2
    cli_lines = [line.removeprefix("error: ") for line in err.splitlines() if line.strip()]
    api_lines = problem["detail"].splitlines()[1:]
    assert api_lines == cli_lines and len(api_lines) >= 1
    assert all(error["location"] for error in problem["errors"])

    good = {"project_id": project["id"], "content": FLOW.format(name="ping pong")}
    suite = await _json(await admin.post("/api/v1/suites", json=good), 201)
    assert suite["tests"] == ["ping", "pong"] and suite["name"] == "ping pong"
    assert suite["content"] == good["content"]
    again = _problem(await admin.post("/api/v1/suites", json=good), 409)
    assert "replace it instead" in again["detail"]
    replaced = await _json(
        await admin.put(
            f"/api/v1/suites/{suite['id']}",
            json={"content": good["content"] + "  # edited\n", "filename": "ping.yaml"},
        ),
        200,
    )
    assert replaced["digest"] != suite["digest"] and replaced["filename"] == "ping.yaml"
    renamed = {"content": FLOW.format(name="other")}
    assert (
        "another suite"
        in _problem(await admin.put(f"/api/v1/suites/{suite['id']}", json=renamed), 409)["detail"]
    )
    listed = await _json(await admin.get(f"/api/v1/suites?project_id={project['id']}"), 200)
    assert [s["name"] for s in listed["items"]] == ["ping pong"]
    schema_file = FLOW.format(name="s").replace(
        "request: {url: /health}", "request: {url: /}\n    expect: {schema: ../../etc/passwd}"
    )
    refused = _problem(
        await admin.post(
            "/api/v1/suites", json={"project_id": project["id"], "content": schema_file}
        ),
        422,
    )
    assert "inline" in refused["detail"]


async def test_flow_files_that_would_hurt_the_service_are_refused(
    admin: httpx.AsyncClient,
) -> None:
    """Brackets nested deep enough to crash the YAML library's C code (the whole process),
    and aliases that expand a few lines into billions of values: refused before decoding."""
    project = await _json(await admin.post("/api/v1/projects", json={"name": "hostile"}), 201)
    base = FLOW.format(name="hostile")
    deep = base + "variables:\n  a: " + "[" * 100_000 + "]" * 100_000 + "\n"
    laughs = (
        base
        + "variables:\n  l0: &l0 [a, a, a, a, a, a, a, a, a, a]\n"
        + "".join(f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n" for i in range(1, 10))
    )
    for content, says in ((deep, "nested more than"), (laughs, "aliases are expanded")):
        body = {"project_id": project["id"], "content": content}
        assert says in _problem(await admin.post("/api/v1/suites", json=body), 422)["detail"]
    async with httpx.AsyncClient(base_url=str(admin.base_url)) as probe:
        assert (await probe.get("/health")).status_code == 200  # still alive


async def test_environment_secrets_are_write_only_and_encrypted(
    live_service: LiveService, admin: httpx.AsyncClient
) -> None:
    project = await _json(await admin.post("/api/v1/projects", json={"name": "envs"}), 201)
    body = {
        "project_id": project["id"],
        "name": "staging",
        "variables": [
            {"name": "BASE", "value": "https://staging.example"},
            {"name": "TOKEN", "value": "s3cr3t-value-123", "secret": True},
        ],
    }
    env = await _json(await admin.post("/api/v1/environments", json=body), 201)
    assert env["variables"] == [
        {"name": "BASE", "value": "https://staging.example", "secret": False},
        {"name": "TOKEN", "value": None, "secret": True},
    ]
    for path in (f"/api/v1/environments/{env['id']}", "/api/v1/environments"):
        assert "s3cr3t-value-123" not in (await admin.get(path)).text
    conn = await asyncpg.connect(live_service.settings.database_url)
    try:
        stored = await conn.fetchval(
            "SELECT value FROM environment_variables"
            " WHERE name = 'TOKEN' AND environment_id = $1::uuid",
            env["id"],
        )
    finally:
        await conn.close()
    assert stored.startswith("enc:v1:") and "s3cr3t" not in stored
    changed = await _json(
        await admin.patch(
            f"/api/v1/environments/{env['id']}",
            json={"variables": [{"name": "REGION", "value": "eu"}], "remove": ["BASE"]},
        ),
        200,
    )
    assert [v["name"] for v in changed["variables"]] == ["REGION", "TOKEN"]
    twice = {"variables": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]}
    assert (
        "twice"
        in _problem(await admin.patch(f"/api/v1/environments/{env['id']}", json=twice), 422)[
            "detail"
        ]
    )


# Baton's own words and the place the caller got wrong; the decoder's wording after them
# is the library's and changes between releases (msgspec 0.20 reworded UTF-8 errors).
@pytest.mark.parametrize(
    ("body", "says", "where"),
    [
        (b'{"name": ', "the body is not valid JSON", ""),
        (b'{"name": 42}', "the request is not valid", "body.name"),
        (b'{"nmae": "x"}', "the request is not valid", "nmae"),
        (b"[]", "the request is not valid", "body"),
        (b'{"name": ""}', "the request is not valid", "body.name"),
        (b'{"name": "x", "description": null}', "the request is not valid", "body.description"),
        # JSON text is UTF-8 (RFC 8259): other bytes make it invalid JSON
        (b'{"name": "\xff\xfe"}', "the body is not valid JSON", ""),
    ],
)
async def test_a_malformed_body_is_a_400_that_says_what_is_wrong(
    admin: httpx.AsyncClient, body: bytes, says: str, where: str
) -> None:
    response = await admin.post(
        "/api/v1/projects", content=body, headers={"Content-Type": "application/json"}
    )
    problem = _problem(response, 400)
    assert problem["detail"].startswith(says)
    assert where in problem["detail"]


async def test_text_with_a_nul_character_is_refused_with_a_422(admin: httpx.AsyncClient) -> None:
    response = await admin.post("/api/v1/projects", json={"name": "a\u0000b"})
    assert "NUL" in _problem(response, 422)["detail"]
    assert "NUL" in _problem(await admin.get("/api/v1/runs?status=a%00"), 422)["detail"]


async def test_oversized_bodies_and_flow_files_are_refused_with_413(
    admin: httpx.AsyncClient,
) -> None:
    project = await _json(await admin.post("/api/v1/projects", json={"name": "big"}), 201)
    huge = "#" * (MAX_FLOW_BYTES + 10) + "\n" + FLOW.format(name="big")
    body = {"project_id": project["id"], "content": huge}
    problem = _problem(await admin.post("/api/v1/suites", json=body), 413)
    assert f"limit is {MAX_FLOW_BYTES} bytes" in problem["detail"]
    response = await admin.post(
        "/api/v1/projects",
        content=b'{"name": "' + b"x" * MAX_BODY_BYTES + b'"}',
        headers={"Content-Type": "application/json"},
    )
    assert f"limit of {MAX_BODY_BYTES} bytes" in _problem(response, 413)["detail"]


async def test_a_suite_with_a_shared_setup_is_refused_with_a_422_saying_why(
    admin: httpx.AsyncClient,
) -> None:
    project = await _json(await admin.post("/api/v1/projects", json={"name": "uses"}), 201)
    content = FLOW.format(name="uses") + "use: [{flow: login.yaml, test: login}]\n"
    body = {"project_id": project["id"], "content": content, "filename": "uses.yaml"}
    problem = _problem(await admin.post("/api/v1/suites", json=body), 422)
    assert "use: an uploaded suite cannot use a test of another file" in problem["detail"]
