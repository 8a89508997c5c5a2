"""Nothing leaks: a token the flow never names (the login's refresh_token), a secret a
target echoes into an ordinary capture, and a secret in a query string, looked for in
every form (clear, URL-encoded, base64, JSON-escaped) everywhere Baton writes: console,
reports, the whole BATON_HOME after a CHECKPOINT, PostgreSQL's tables, Redis, the API,
both streams, the dashboard, a rerun and the service's log."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import asyncpg
import httpx
import pytest
from aiohttp import web
from redis.asyncio import Redis
from websockets.asyncio.client import connect as ws_connect

from context_service.keys import create_key
from events.embedded import start_embedded, stop_embedded
from events.secrets import MASK
from examples.shop.server import STATE
from examples.shop.server import serve as serve_shop
from tests.cli import baton
from tests.conftest import (
    LOOPBACK,
    LiveService,
    Org,
    RedisServer,
    _private_home,
    private_database,
)

pytestmark = pytest.mark.timeout(120)

PASSWORD = "secret-alice"
FLOW = textwrap.dedent("""
    name: canary
    base_url: "{{ env.SHOP_URL }}"
    tests:
      login:
        request:
          method: POST
          url: /auth/login
          json: {username: alice, password: "{{ secrets.SHOP_PASSWORD }}"}
        expect:
          status: 200
          json: {"$.refresh_token": {type: string}}
        capture:
          auth.token: {json: "$.access_token"}
      echo:
        request:
          method: POST
          url: /echo
          params: {q: "{{ secrets.SHOP_PASSWORD }}"}
          json: {note: "{{ secrets.SHOP_PASSWORD }}"}
        capture:
          echoed: {json: "$.query.q"}       # an ordinary variable holding the password
          echoed_body: {json: "$.body"}
      uses_echo:
        request:
          method: POST
          url: /echo
          json: {again: "{{ echoed }}", body: "{{ echoed_body }}"}
        expect:
          json: {"$.method": GET}           # fails on purpose: its exchange is reported
""")


def forms(value: str) -> set[str]:
    raw = value.encode()
    found = {
        value,
        quote(value),
        quote(value, safe=""),
        quote_plus(value),
        json.dumps(value)[1:-1],
        base64.b64encode(raw).decode().rstrip("="),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
    }
    return {form for form in found if len(form) >= 4}


def issued(shop: web.AppRunner) -> dict[str, str]:
    """Every credential the shop handed out, by what it is, and the password."""
    state = shop.app[STATE]
    secrets = {f"refresh token {i}": token for i, token in enumerate(state.refresh)}
    secrets |= {f"access token {i}": token for i, token in enumerate(state.access)}
    secrets |= {f"session cookie {i}": cookie for i, cookie in enumerate(state.cookies)}
    assert any(name.startswith("refresh") for name in secrets)
    return {**secrets, "password": PASSWORD}


def assert_nothing_leaks(secrets: dict[str, str], places: dict[str, str | bytes]) -> None:
    leaks = [
        f"{what} ({form!r}) in {where}"
        for what, secret in secrets.items()
        for form in forms(secret)
        for where, text in places.items()
        if (form.encode() in text if isinstance(text, bytes) else form in text)
    ]
    assert not leaks, "\n".join(leaks[:20])


async def redis_dump(url: str) -> str:
    """Every key and value of a Redis of the test's own, as text."""
    client = Redis.from_url(url)
    parts: list[str] = []
    try:
        async for key in client.scan_iter(count=1000):
            found_type = await client.type(key)
            kind = found_type.decode() if isinstance(found_type, bytes) else found_type
            if kind == "string":
                value: Any = await client.get(key)
            elif kind == "hash":
                value = await client.hgetall(key)
            elif kind == "stream":
                value = await client.xrange(key)
            elif kind == "list":
                value = await client.lrange(key, 0, -1)
            else:
                value = await client.smembers(key) if kind == "set" else kind
            parts.append(f"{key!r} {value!r}")
    finally:
        await client.aclose()
    assert parts, "nothing in Redis: the cache was not used"
    return "\n".join(parts)


async def table_dump(dsn: str) -> str:
    """Every row of every table of the database, as text (decompressed, unlike the files)."""
    connection = await asyncpg.connect(dsn)
    try:
        tables = await connection.fetch(
            "SELECT schemaname, tablename FROM pg_tables"
            " WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
        )
        rows = []
        for schema, table in tables:
            rows += await connection.fetch(f'SELECT t::text FROM "{schema}"."{table}" t')
    finally:
        await connection.close()
    return "\n".join(row[0] for row in rows)


def files(root: Path) -> Iterable[tuple[str, bytes]]:
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            yield str(path.relative_to(root)), path.read_bytes()


@pytest.fixture
async def shop() -> AsyncIterator[tuple[web.AppRunner, str]]:
    runner, url = await serve_shop("127.0.0.1", 0)
    yield runner, url
    await runner.cleanup()


async def test_baton_run_leaks_no_token_and_no_echoed_secret(
    shop: tuple[web.AppRunner, str],
    fresh_baton_home: Path,
    private_redis: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """The CLI on the embedded default with Redis: console, reports, commands, the whole
    BATON_HOME after a CHECKPOINT, every table and Redis."""
    monkeypatch.setenv("SHOP_URL", shop[1])
    monkeypatch.setenv("BATON_HOME", str(fresh_baton_home))
    monkeypatch.setenv("BATON_REDIS_URL", private_redis.url)
    monkeypatch.delenv("BATON_DATABASE_URL", raising=False)
    monkeypatch.delenv("BATON_SECRET_KEY", raising=False)
    (tmp_path / "flow.yaml").write_text(FLOW)
    (tmp_path / "secrets.yaml").write_text(f"SHOP_PASSWORD: {PASSWORD}\n")
    reports = tmp_path / "reports"
    code, out, err = await asyncio.to_thread(
        baton,
        "run",
        str(tmp_path / "flow.yaml"),
        "--secrets",
        str(tmp_path / "secrets.yaml"),
        *("--junit", str(reports / "j.xml"), "--json", str(reports / "r.json")),
        *("--html", str(reports / "r.html"), "--ctrf", str(reports / "ctrf.json")),
    )
    assert code == 1, out + err  # uses_echo fails on purpose
    run = json.loads((reports / "r.json").read_text())["runs"][0]
    assert [t["status"] for t in run["tests"]] == ["passed", "passed", "failed"], run
    echo = run["tests"][1]
    assert echo["captures"] == {"echoed": "***", "echoed_body": "***"}
    places: dict[str, str | bytes] = {"console": out + err}
    for command in (("context", run["run_id"]), ("events", run["run_id"])):
        code, shown, problem = await asyncio.to_thread(baton, *command)
        assert code == 0, shown + problem
        places[command[0]] = shown + problem
    places |= {path.name: path.read_text() for path in reports.iterdir()}
    assert "ctrf.json" in places and "uses_echo" in places["ctrf.json"]
    assert "refresh_token" in places["events"]  # the canary's place is there, masked
    dsn = await start_embedded(fresh_baton_home)
    try:
        connection = await asyncpg.connect(dsn)
        try:
            await connection.execute("CHECKPOINT")
        finally:
            await connection.close()
        places["every table"] = await table_dump(dsn)
    finally:
        await stop_embedded(fresh_baton_home)
    places |= dict(files(fresh_baton_home))
    assert any(name.startswith("pgdata") or "base/" in name for name in places), list(places)
    places["redis"] = await redis_dump(private_redis.url)
    assert_nothing_leaks(issued(shop[0]), places)


# ---- the service --------------------------------------------------------------------------


@pytest.fixture
async def redis_service(private_redis: RedisServer) -> AsyncIterator[LiveService]:
    """The service with a database and a Redis of this test's own."""
    from events.settings import Settings

    home = _private_home()
    async with private_database() as dsn:
        settings = Settings(
            database_url=dsn,
            redis_url=private_redis.url,
            home=home,
            allowed_targets=LOOPBACK,  # the demo shop
            secret_key=base64.urlsafe_b64encode(os.urandom(32)).decode(),
        )
        service = LiveService(settings)
        await asyncio.to_thread(service.start)
        try:
            yield service
        finally:
            await asyncio.to_thread(service.stop)
            shutil.rmtree(home, ignore_errors=True)


async def _streams(service: LiveService, org: Org, run_id: str) -> tuple[str, str]:
    """The run's whole SSE and WebSocket streams (each ends after the run's last event)."""
    async with org.http.stream("GET", f"/api/v1/runs/{run_id}/stream") as response:
        assert response.status_code == 200
        sse = "\n".join([line async for line in response.aiter_lines()])
    url = service.url.replace("http", "ws", 1) + f"/api/v1/runs/{run_id}/ws"
    async with ws_connect(url, additional_headers={"Authorization": f"Bearer {org.key}"}) as ws:
        frames = [str(raw) async for raw in ws]
    assert "RunCompleted" in sse and "RunCompleted" in frames[-1]
    return sse, "\n".join(frames)


async def _dashboard(service: LiveService, key: str, run_id: str) -> str:
    async with httpx.AsyncClient(base_url=service.url, follow_redirects=True) as browser:
        login = await browser.post("/login", data={"key": key, "next": f"/runs/{run_id}"})
        assert login.status_code == 200, login.text
        return login.text


async def test_the_service_leaks_no_token_and_no_echoed_secret_even_in_a_rerun(
    shop: tuple[web.AppRunner, str], redis_service: LiveService
) -> None:
    """Through the API with Redis: every answer, both streams, the dashboard, a rerun that
    reuses the echoed capture, Redis and every table of the service's database."""
    service = redis_service
    key = await create_key(service.settings, organization="acme", scopes=["read", "run"], name="t")
    admin = await create_key(service.settings, organization="acme", scopes=["admin"], name="t")
    org, owner = Org(service, key), Org(service, admin)
    try:
        project = await owner.ok("POST", "/api/v1/projects", 201, json={"name": "canary"})
        variables = [
            {"name": "SHOP_URL", "value": shop[1]},
            {"name": "SHOP_PASSWORD", "value": PASSWORD, "secret": True},
        ]
        body = {"project_id": project["id"], "name": "local", "variables": variables}
        environment = await owner.ok("POST", "/api/v1/environments", 201, json=body)
        body = {"project_id": project["id"], "content": FLOW}
        suite = await owner.ok("POST", "/api/v1/suites", 201, json=body)
        first = await org.start(suite["id"], environment["id"])
        assert (await org.finished(first))["status"] == "failed"
        results = await org.ok("GET", f"/api/v1/runs/{first}/results")
        statuses = {item["test"]: item["status"] for item in results["items"]}
        assert statuses == {"login": "passed", "echo": "passed", "uses_echo": "failed"}
        again = (await org.ok("POST", f"/api/v1/runs/{first}/rerun", 202))["id"]
        assert (await org.finished(again))["status"] == "failed"
        places: dict[str, str | bytes] = {}
        for run_id in (first, again):
            for part in ("", "/results", "/context", "/events?limit=1000"):
                response = await org.http.get(f"/api/v1/runs/{run_id}{part}")
                assert response.status_code == 200, response.text
                places[f"GET {run_id}{part}"] = response.text
            sse, ws = await _streams(service, org, run_id)
            places[f"SSE {run_id}"], places[f"WebSocket {run_id}"] = sse, ws
            places[f"dashboard {run_id}"] = await _dashboard(service, key, run_id)
        places["GET /runs"] = (await org.http.get("/api/v1/runs")).text
        context = json.loads(places[f"GET {first}/context"])
        assert context["variables"]["echoed"] == "***"
        assert "echoed" in context["secret_names"]
        # the rerun ran uses_echo again with the reused capture, masked as its own
        rerun_events = places[f"GET {again}/events?limit=1000"]
        assert isinstance(rerun_events, str) and '"test":"uses_echo"' in rerun_events
        places["redis"] = await redis_dump(str(service.settings.redis_url))
        assert service.settings.database_url is not None
        places["every table"] = await table_dump(service.settings.database_url)
        assert_nothing_leaks(issued(shop[0]), places)
    finally:
        await org.http.aclose()
        await owner.http.aclose()


# ---- the service's log --------------------------------------------------------------------


async def test_the_service_log_shows_no_secret_from_a_query_string(
    shop: tuple[web.AppRunner, str], tmp_path: Path
) -> None:
    """``baton serve`` as an operator runs it, its log in a file: a run sends the password
    in a query parameter; a client sends a token in one to the service itself."""
    canary = "qs-canary-5d1e7a9c"
    async with private_database() as dsn:
        env = {
            **os.environ,
            "BATON_DATABASE_URL": dsn,
            "BATON_HOME": str(tmp_path / "home"),
            "BATON_ALLOWED_TARGETS": LOOPBACK,
            "BATON_SECRET_KEY": base64.urlsafe_b64encode(os.urandom(32)).decode(),
        }
        env.pop("BATON_REDIS_URL", None)
        from events.settings import Settings

        key = await create_key(
            Settings.from_env(env), organization="acme", scopes=["read", "run", "admin"], name="t"
        )
        port = _free_port()
        log = (tmp_path / "service.log").open("w")
        command = [str(Path(sys.executable).with_name("baton")), "serve", "--port", str(port)]
        process = await asyncio.create_subprocess_exec(
            *command, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            org = Org(_Running(f"http://127.0.0.1:{port}"), key)  # type: ignore[arg-type]
            await _until_up(org.http)
            project = await org.ok("POST", "/api/v1/projects", 201, json={"name": "log"})
            variables = [
                {"name": "SHOP_URL", "value": shop[1]},
                {"name": "SHOP_PASSWORD", "value": PASSWORD, "secret": True},
            ]
            body = {"project_id": project["id"], "name": "local", "variables": variables}
            environment = await org.ok("POST", "/api/v1/environments", 201, json=body)
            body = {"project_id": project["id"], "content": FLOW}
            suite = await org.ok("POST", "/api/v1/suites", 201, json=body)
            run_id = await org.start(suite["id"], environment["id"])
            assert (await org.finished(run_id))["status"] == "failed"  # uses_echo, on purpose
            # a client that puts a credential in the URL: the access log writes the URL
            await org.http.get(f"/api/v1/runs/{run_id}?access_token={canary}")
            await org.http.aclose()
        finally:
            process.terminate()
            await asyncio.wait_for(process.wait(), 30)
            log.close()
    text = (tmp_path / "service.log").read_text()
    assert f"/api/v1/runs/{run_id}?access_token=***" in text, text[-3000:]
    assert "HTTP Request:" not in text  # httpx's per-request INFO line
    assert_nothing_leaks(
        {**issued(shop[0]), "token in a URL": canary, "key": key}, {"service log": text}
    )


class _Running:
    """What ``Org`` needs of a service: its client."""

    def __init__(self, url: str) -> None:
        self.url = url

    def client(self, key: str | None = None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=30)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def _until_up(http: httpx.AsyncClient) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if (await http.get("/health")).status_code in (200, 503):
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError("baton serve did not answer within 60 s")


async def test_a_flow_adds_names_to_redact_and_keeps_others(
    shop: tuple[web.AppRunner, str],
    pg_server_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """``redact:`` in defaults and in a test, read from the flow file into the events."""
    monkeypatch.setenv("SHOP_URL", shop[1])
    monkeypatch.setenv("BATON_DATABASE_URL", pg_server_dsn)
    monkeypatch.setenv("BATON_HOME", str(tmp_path / "home"))
    flow = tmp_path / "flow.yaml"
    flow.write_text(
        textwrap.dedent("""
        name: redact options
        base_url: "{{ env.SHOP_URL }}"
        defaults: {redact: {keys: [user_id], keep: [token_type]}}
        tests:
          login:
            request:
              method: POST
              url: /auth/login
              json: {username: alice, password: secret-alice}
          echo:
            redact: {keys: ["*note*"], keep: [user_id]}
            request: {method: POST, url: /echo, json: {my_note: hello, user_id: 7}}
    """)
    )
    report = str(tmp_path / "r.json")
    code, out, err = await asyncio.to_thread(baton, "run", str(flow), "--json", report)
    assert code == 0, out + err
    run_id = json.loads((tmp_path / "r.json").read_text())["runs"][0]["run_id"]
    connection = await asyncpg.connect(pg_server_dsn)
    try:
        bodies = dict(
            await connection.fetch(
                "SELECT data->>'test', data->>'body_excerpt' FROM events"
                " WHERE stream = $1 AND type = 'ResponseReceived'",
                f"run-{run_id}",
            )
        )
    finally:
        await connection.close()
    login = json.loads(bodies["login"])
    assert login["token_type"] == "Bearer"  # kept
    assert login["user_id"] == MASK and login["refresh_token"] == MASK  # added; built in
    echoed = json.loads(bodies["echo"])
    assert json.loads(echoed["body"]) == {"my_note": MASK, "user_id": 7}  # the test's own
    code, _, err = await asyncio.to_thread(
        baton, "validate", str(_write(tmp_path / "bad.yaml", "defaults: {redact: {names: [x]}}"))
    )
    assert code == 2 and "redact" in err and "names" in err, err


def _write(path: Path, extra: str) -> Path:
    path.write_text(f"name: bad\n{extra}\ntests: {{t: {{request: {{url: /health}}}}}}\n")
    return path


# ---- credentials only their form gives away, in the newer outputs -------------------------

UNNAMED = {
    "AWS access key id": "AKIAZ7QWERTYUIOP1234",
    "GitHub token": "ghp_LeakLeakLeak1234567890abcdefABCDEF12",
    "password of a URL": "u1pw-9a8b7c6d",
    "literal bearer echoed": "literal-bearer-tok-77",
    "session cookie": "sess-7f3a9c2e1b4d",
    "JWT signature": "c2lnbmF0dXJlLWxlYWs",
}


async def _unnamed(request: web.Request) -> web.Response:
    """Credentials under names that say nothing, the request's bearer token echoed too."""
    body = {
        "data": {"AccessKeyId": UNNAMED["AWS access key id"], "value": UNNAMED["GitHub token"]},
        "link": f"https://admin:{UNNAMED['password of a URL']}@db.example.com/x",
        "seen": request.headers.get("Authorization", "").partition(" ")[2],
        "blob": f"eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJsZWFrIn0.{UNNAMED['JWT signature']}",
    }
    response = web.json_response(body, status=int(request.query.get("status", "200")))
    response.set_cookie("sid", UNNAMED["session cookie"])
    return response


UNNAMED_FLOW = textwrap.dedent("""
    name: unnamed credentials
    base_url: "{{ env.LEAK_URL }}"
    tests:
      fetch:
        request: {url: /creds, headers: {Authorization: "Bearer literal-bearer-tok-77"}}
        capture: {key_id: {json: "$.data.AccessKeyId"}}
      broken:
        request: {url: /creds, params: {status: 500}}
        expect: {status: 200, json: {"$.data.value": {equals: x}, "$.link": {equals: x}}}
""")


async def test_credentials_known_only_by_their_form_leak_into_no_newer_output(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A response shows credentials the flow never names: every report of ``baton run``
    (``--events ndjson``, CTRF, JUnit, JSON, HTML), ``baton diff`` (text and JSON),
    ``baton report issue``, ``baton replay``, the retention archive files read back, and
    ``baton events`` of the run ``baton archive restore`` brings back."""
    app = web.Application()
    app.router.add_get("/creds", _unnamed)
    server = web.AppRunner(app)
    await server.setup()
    site = web.TCPSite(server, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    home = tmp_path / "home"
    (tmp_path / "flow.yaml").write_text(UNNAMED_FLOW)
    reports = tmp_path / "reports"
    try:
        async with private_database() as dsn:
            monkeypatch.setenv("LEAK_URL", f"http://127.0.0.1:{port}")
            monkeypatch.setenv("BATON_DATABASE_URL", dsn)
            monkeypatch.setenv("BATON_HOME", str(home))
            monkeypatch.delenv("BATON_REDIS_URL", raising=False)
            places: dict[str, str | bytes] = {}
            runs = []
            for number in (1, 2):
                code, out, err = await asyncio.to_thread(
                    baton,
                    *("run", str(tmp_path / "flow.yaml"), "--events", "ndjson"),
                    *("--junit", str(reports / f"{number}.xml")),
                    *("--json", str(reports / f"{number}.json")),
                    *("--html", str(reports / f"{number}.html")),
                    *("--ctrf", str(reports / f"{number}.ctrf.json")),
                )
                assert code == 1, out + err  # broken fails on purpose
                places[f"run {number}"] = out + err
                runs.append(json.loads((reports / f"{number}.json").read_text())["runs"][0])
            first, second = (run["run_id"] for run in runs)
            assert runs[0]["tests"][0]["captures"] == {"key_id": MASK}
            places |= {path.name: path.read_text() for path in reports.iterdir()}
            commands = {
                "diff": ("diff", first, second),
                "diff --json": ("diff", first, second, "--json"),
                "report issue": ("report", "issue", first, "broken"),
                "replay": ("replay", first),
            }
            for where, command in commands.items():
                code, out, err = await asyncio.to_thread(baton, *command)
                assert code in (0, 1), out + err
                places[where] = out + err
            assert "$.data.value" in places["report issue"]  # the check is there, masked
            code, out, err = await asyncio.to_thread(
                baton, "retention", "apply", "--now", "2100-01-01T00:00:00"
            )
            assert code == 0, out + err
            archived = sorted((home / "archive").rglob("*.jsonl.gz"))
            assert archived, out
            places |= {str(path): gzip.decompress(path.read_bytes()) for path in archived}
            code, out, err = await asyncio.to_thread(baton, "archive", "restore", first)
            assert code == 0, out + err
            code, out, err = await asyncio.to_thread(baton, "events", first)
            assert code == 0 and "ResponseReceived" in out, out + err
            places["events after restore"] = out + err
    finally:
        await server.cleanup()
    assert_nothing_leaks(UNNAMED, places)
