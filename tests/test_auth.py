"""``auth:``: HTTP Basic and Digest, OAuth2 client credentials and AWS SigV4, each against
a small aiohttp server in the test that checks the credentials as a real one would; and
no credential in any output Baton writes."""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from orchestrator.auth import AwsSigV4, TokenCache, TokenRequest
from tests.cli import baton
from tests.flows import events_of, run_flow

PASSWORD = "pw-" + secrets.token_hex(8)
CLIENT_SECRET = "cs-" + secrets.token_hex(8)
AWS_KEY_ID = "AKIDEXAMPLE"
AWS_SECRET = "aws-" + secrets.token_hex(12)
AWS_SESSION = "sess-" + secrets.token_hex(8)
REALM = "baton-test"


@dataclass
class Server:
    url: str = ""
    expires_in: int | None = 3600
    tokens: list[str] = field(default_factory=list)
    """Every token issued, in order."""
    valid: set[str] = field(default_factory=set)
    revoke_after_use: bool = False
    refuse_every_token: bool = False
    digest_requests: int = 0
    seen_tokens: list[str] = field(default_factory=list)


STATE = web.AppKey("state", Server)


def _basic(request: web.Request) -> tuple[str, str] | None:
    header = request.headers.get("Authorization", "")
    if not header.startswith("Basic "):
        return None
    user, _, password = base64.b64decode(header[6:]).decode().partition(":")
    return user, password


async def _basic_endpoint(request: web.Request) -> web.Response:
    if _basic(request) != ("alice", PASSWORD):
        return web.json_response(
            {"error": "unauthorized"}, status=401, headers={"WWW-Authenticate": "Basic"}
        )
    # an echo of the header, under a name no redaction rule knows
    return web.json_response({"user": "alice", "seen": request.headers["Authorization"]})


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


async def _digest_endpoint(request: web.Request) -> web.Response:
    """RFC 7616 with qop=auth and MD5: a challenge, then the response checked."""
    server: Server = request.app[STATE]
    server.digest_requests += 1
    header = request.headers.get("Authorization", "")
    nonce = "n-" + secrets.token_hex(8)
    challenge = {
        "WWW-Authenticate": f'Digest realm="{REALM}", qop="auth", nonce="{nonce}", '
        'algorithm=MD5, opaque="op"'
    }
    if not header.startswith("Digest "):
        return web.Response(status=401, headers=challenge)
    parts = dict(
        (key.strip(), value.strip().strip('"'))
        for key, _, value in (item.partition("=") for item in header[7:].split(","))
    )
    ha1 = _md5(f"{parts['username']}:{REALM}:{PASSWORD}")
    ha2 = _md5(f"{request.method}:{parts['uri']}")
    expected = _md5(f"{ha1}:{parts['nonce']}:{parts['nc']}:{parts['cnonce']}:auth:{ha2}")
    if parts["username"] != "alice" or parts["response"] != expected:
        return web.Response(status=401, headers=challenge)
    return web.json_response({"user": "alice", "scheme": "digest"})


async def _token_endpoint(request: web.Request) -> web.Response:
    server: Server = request.app[STATE]
    form = await request.post()
    if form.get("grant_type") != "client_credentials":
        return web.json_response({"error": "unsupported_grant_type"}, status=400)
    client = _basic(request) or (form.get("client_id"), form.get("client_secret"))
    if client != ("baton", CLIENT_SECRET):
        return web.json_response({"error": "invalid_client"}, status=401)
    token = f"at-{len(server.tokens) + 1}-{secrets.token_hex(8)}"
    server.tokens.append(token)
    server.valid.add(token)
    body: dict[str, Any] = {
        "access_token": token,
        "token_type": "Bearer",
        "scope": form.get("scope"),
    }
    if server.expires_in is not None:
        body["expires_in"] = server.expires_in
    return web.json_response(body)


async def _api_endpoint(request: web.Request) -> web.Response:
    server: Server = request.app[STATE]
    token = request.headers.get("Authorization", "").removeprefix("Bearer ")
    server.seen_tokens.append(token)
    if token not in server.valid or server.refuse_every_token:
        return web.json_response({"error": "invalid_token"}, status=401)
    if server.revoke_after_use:
        server.valid.discard(token)
    # an API that echoes what it was given: the token must still not reach an output
    return web.json_response({"ok": True, "echo": token})


async def _aws_endpoint(request: web.Request) -> web.Response:
    """Recomputes the signature with botocore from the request as received."""
    header = request.headers.get("Authorization", "")
    if not header.startswith("AWS4-HMAC-SHA256 "):
        return web.json_response({"error": "unsigned"}, status=403)
    fields = dict(item.strip().split("=", 1) for item in header[17:].split(","))
    key_id, _date, region, service, _ = fields["Credential"].split("/")
    signed = fields["SignedHeaders"].split(";")
    body = await request.read()
    received = AWSRequest(
        method=request.method,
        url=str(request.url),
        data=body,
        headers={name: request.headers[name] for name in signed},
    )
    received.context["timestamp"] = request.headers["X-Amz-Date"]
    token = request.headers.get("X-Amz-Security-Token")
    signer = SigV4Auth(Credentials(key_id, AWS_SECRET, token), service, region)
    expected = signer.signature(
        signer.string_to_sign(received, signer.canonical_request(received)), received
    )
    if key_id != AWS_KEY_ID or token != AWS_SESSION or fields["Signature"] != expected:
        return web.json_response({"error": "SignatureDoesNotMatch"}, status=403)
    return web.json_response({"service": service, "region": region, "size": len(body)})


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    state = Server()
    app = web.Application()
    app[STATE] = state
    app.router.add_get("/basic", _basic_endpoint)
    app.router.add_get("/digest", _digest_endpoint)
    app.router.add_post("/token", _token_endpoint)
    app.router.add_get("/api", _api_endpoint)
    app.router.add_route("*", "/aws/{tail:.*}", _aws_endpoint)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    state.url = f"http://127.0.0.1:{port}"
    yield state
    await runner.cleanup()


def _flow(directory: Path, server: Server, tests: str, defaults: str = "") -> Path:
    (directory / "secrets.yaml").write_text(
        f"PASSWORD: {PASSWORD}\nCLIENT_SECRET: {CLIENT_SECRET}\n"
        f"AWS_SECRET: {AWS_SECRET}\nAWS_SESSION: {AWS_SESSION}\n"
    )
    flow = directory / "auth.yaml"
    flow.write_text(
        f"name: auth\nbase_url: {server.url}\n"
        + textwrap.dedent(defaults)
        + "tests:\n"
        + textwrap.indent(textwrap.dedent(tests), "  ")
    )
    return flow


async def _run(flow: Path) -> tuple[int, str, str, dict[str, Any]]:
    junit = flow.parent / "report.xml"
    return await run_flow(
        flow, "--secrets", str(flow.parent / "secrets.yaml"), "--junit", str(junit)
    )


async def _everything_written(dsn: str, run_id: str, flow: Path, out: str, err: str) -> str:
    """Every output of a run: stdout, stderr, its events, its JSON and JUnit reports."""
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch(
            "SELECT data::text FROM events WHERE stream = $1", f"run-{run_id}"
        )
    finally:
        await connection.close()
    reports = [(flow.parent / name).read_text() for name in ("report.json", "report.xml")]
    return "\n".join([out, err, *reports, *(row[0] for row in rows)])


def _assert_absent(written: str, *values: str) -> None:
    for value in values:
        assert value not in written
        assert base64.b64encode(value.encode()).decode() not in written


async def test_basic_auth_passes_and_a_wrong_password_fails_the_test(
    env: dict[str, str], tmp_path: Path, server: Server, pg_server_dsn: str
) -> None:
    flow = _flow(
        tmp_path,
        server,
        """
        right:
          request:
            url: /basic
            auth: {basic: {username: alice, password: "{{ secrets.PASSWORD }}"}}
          expect: {status: 200, json: {"$.user": alice}}
        wrong:
          request:
            url: /basic
            auth: {basic: {username: alice, password: not-the-password}}
          expect: {status: 200}
        """,
    )
    code, out, err, tests = await _run(flow)
    assert code == 1, out + err
    assert tests["right"]["status"] == "passed"
    assert tests["wrong"]["status"] == "failed"
    assert "expected 200, got 401" in tests["wrong"]["message"]
    written = await _everything_written(pg_server_dsn, tests["_run_id"], flow, out, err)
    # a literal credential is a secret by kind too, not only one from secrets.*
    _assert_absent(written, PASSWORD, "not-the-password", f"alice:{PASSWORD}")


async def test_digest_auth_answers_the_challenge(
    env: dict[str, str], tmp_path: Path, server: Server, pg_server_dsn: str
) -> None:
    flow = _flow(
        tmp_path,
        server,
        """
        digest:
          request: {url: /digest}
          expect: {status: 200, json: {"$.scheme": digest}}
        """,
        'defaults:\n  auth: {digest: {username: alice, password: "{{ secrets.PASSWORD }}"}}\n',
    )
    code, out, err, tests = await _run(flow)
    assert code == 0, out + err
    assert server.digest_requests == 2  # the challenge, then the answer
    written = await _everything_written(pg_server_dsn, tests["_run_id"], flow, out, err)
    _assert_absent(written, PASSWORD)


def _oauth(extra: str = "") -> str:
    # a relative token_url is under base_url, like a request's url
    return (
        "defaults:\n  auth:\n    oauth2:\n      token_url: /token\n"
        "      client_id: baton\n"
        '      client_secret: "{{ secrets.CLIENT_SECRET }}"\n'
        f"      scope: read{extra}\n"
    )


def _api_tests(count: int, *, chained: bool = False) -> str:
    tests = []
    for number in range(count):
        depends = f"  depends_on: [t{number - 1}]\n" if chained and number else ""
        tests.append(
            f"t{number}:\n  request: {{url: /api}}\n{depends}"
            '  expect: {status: 200, json: {"$.ok": true}}\n'
        )
    return "".join(tests)


def _oauth_flow(directory: Path, server: Server, tests: str, extra: str = "") -> Path:
    return _flow(directory, server, tests, _oauth(extra))


async def test_oauth2_fetches_one_token_for_every_test(
    env: dict[str, str], tmp_path: Path, server: Server, pg_server_dsn: str
) -> None:
    flow = _oauth_flow(tmp_path, server, _api_tests(6))
    code, out, err, tests = await _run(flow)
    assert code == 0, out + err
    assert len(server.tokens) == 1  # six tests in parallel, one fetch
    assert server.seen_tokens == server.tokens * 6
    fetches = await events_of(pg_server_dsn, tests["_run_id"], "AuthTokenUpdated")
    assert [event["name"] for event in fetches] == ["auth.oauth2"]
    assert fetches[0]["value"].startswith("enc:v1:")
    written = await _everything_written(pg_server_dsn, tests["_run_id"], flow, out, err)
    _assert_absent(written, CLIENT_SECRET, server.tokens[0])


async def test_oauth2_fetches_again_when_the_token_expires_within_refresh_before(
    env: dict[str, str], tmp_path: Path, server: Server
) -> None:
    server.expires_in = 20  # less than refresh_before: each test finds it about to expire
    flow = _oauth_flow(tmp_path, server, _api_tests(3, chained=True))
    code, out, err, _ = await _run(flow)
    assert code == 0, out + err
    assert len(server.tokens) == 3
    assert server.seen_tokens == server.tokens


async def test_the_token_cache_refreshes_on_its_clock(server: Server) -> None:
    now = [1000.0]
    cache = TokenCache(clock=lambda: now[0])
    spec = TokenRequest(f"{server.url}/token", "baton", CLIENT_SECRET, "read", None, 30.0, "body")
    async with httpx.AsyncClient() as client:
        first, fetched = await cache.token(spec, client, {})
        assert fetched
        now[0] += 3600 - 31  # 31 s left: still good
        assert await cache.token(spec, client, {}) == (first, False)
        now[0] += 2  # 29 s left: within refresh_before
        second, fetched = await cache.token(spec, client, {})
    assert fetched and second != first
    assert server.tokens == [first, second]


async def test_oauth2_fetches_a_new_token_once_after_a_401(
    env: dict[str, str], tmp_path: Path, server: Server
) -> None:
    server.revoke_after_use = True  # every token works once
    flow = _oauth_flow(tmp_path, server, _api_tests(3, chained=True))
    code, out, err, _ = await _run(flow)
    assert code == 0, out + err
    assert len(server.tokens) == 3
    # t1 and t2 each sent the revoked token, had a 401, and passed with a new one
    first, second, third = server.tokens
    assert server.seen_tokens == [first, first, second, second, third]


async def test_oauth2_fetches_again_only_once_when_the_api_keeps_answering_401(
    env: dict[str, str], tmp_path: Path, server: Server
) -> None:
    server.refuse_every_token = True
    flow = _oauth_flow(tmp_path, server, _api_tests(1))
    code, out, err, tests = await _run(flow)
    assert code == 1, out + err
    assert "expected 200, got 401" in tests["t0"]["message"]
    assert len(server.tokens) == 2
    assert server.seen_tokens == server.tokens


async def test_oauth2_a_refused_client_fails_the_test_naming_the_token_endpoint(
    env: dict[str, str], tmp_path: Path, server: Server, pg_server_dsn: str
) -> None:
    flow = _oauth_flow(tmp_path, server, _api_tests(1), extra="\n      client_auth: body")
    wrong = "wrong-" + secrets.token_hex(6)
    (tmp_path / "wrong.yaml").write_text(f"CLIENT_SECRET: {wrong}\n")
    code, out, err, tests = await run_flow(flow, "--secrets", str(tmp_path / "wrong.yaml"))
    assert code == 1
    message = tests["t0"]["message"]
    assert f"the token endpoint {server.url}/token answered 401: invalid_client" in message
    assert "check client_id and client_secret" in message
    assert server.seen_tokens == []  # the API was never called without a token
    assert wrong not in out + err + (tmp_path / "report.json").read_text()


AWS = (
    "defaults:\n  auth:\n    aws_sigv4:\n      access_key_id: AKIDEXAMPLE\n"
    '      secret_access_key: "{{ secrets.AWS_SECRET }}"\n'
    '      session_token: "{{ secrets.AWS_SESSION }}"\n'
    "      region: eu-west-1\n      service: execute-api\n"
)


async def test_aws_sigv4_signs_the_final_request(
    env: dict[str, str], tmp_path: Path, server: Server, pg_server_dsn: str
) -> None:
    flow = _flow(
        tmp_path,
        server,
        """
        put:
          request:
            method: PUT
            url: /aws/items/a b
            params: {version: "2", tag: [x, y]}
            headers: {x-custom: kept}
            json: {name: widget, price: 3}
          expect: {status: 200, json: {"$.service": execute-api, "$.region": eu-west-1}}
        get:
          request: {url: /aws/items}
          expect: {status: 200}
        """,
        AWS,
    )
    code, out, err, tests = await _run(flow)
    assert code == 0, out + err
    written = await _everything_written(pg_server_dsn, tests["_run_id"], flow, out, err)
    _assert_absent(written, AWS_SECRET, AWS_SESSION)


async def test_the_sigv4_verifier_rejects_a_tampered_or_wrongly_signed_request(
    server: Server,
) -> None:
    settings = {
        "access_key_id": AWS_KEY_ID,
        "secret_access_key": AWS_SECRET,
        "session_token": AWS_SESSION,
        "region": "eu-west-1",
        "service": "execute-api",
    }
    async with httpx.AsyncClient() as client:
        signed = client.build_request("POST", f"{server.url}/aws/x", content=b"amount=10")
        flow = AwsSigV4(settings).auth_flow(signed)
        request = next(flow)
        assert (await client.send(request)).status_code == 200
        request.stream = httpx.ByteStream(b"amount=99")  # the body changed after signing
        assert (await client.send(request)).status_code == 403
        wrong = AwsSigV4({**settings, "secret_access_key": "not-the-key"})
        other = next(wrong.auth_flow(client.build_request("GET", f"{server.url}/aws/x")))
        assert (await client.send(other)).status_code == 403


def test_validate_names_an_auth_block_with_two_kinds_or_a_missing_field(
    tmp_path: Path,
) -> None:
    flow = tmp_path / "bad.yaml"
    flow.write_text(
        "name: bad\nbase_url: http://127.0.0.1:1\ntests:\n"
        "  both:\n    request:\n      url: /x\n"
        "      auth: {basic: {username: a, password: b}, digest: {username: a, password: b}}\n"
        "  none:\n    request: {url: /x, auth: {}}\n"
    )
    code, _, err = baton("validate", str(flow))
    assert code == 2
    assert "tests.both.request.auth: auth takes exactly one of basic, digest, oauth2" in err
    assert "this one gives basic and digest" in err
    assert "tests.none.request.auth" in err and "gives none" in err
    flow.write_text(
        "name: bad\nbase_url: http://127.0.0.1:1\ndefaults:\n"
        "  auth: {oauth2: {token_url: /t, client_id: c, refresh_before: soon}}\n"
        "tests:\n  t:\n    request: {url: /x}\n"
    )
    code, _, err = baton("validate", str(flow))
    assert code == 2
    assert "Traceback" not in err
    assert "defaults.auth.oauth2" in err and "client_secret" in err
    flow.write_text(
        "name: bad\nbase_url: http://127.0.0.1:1\ndefaults:\n"
        '  auth: {basic: {username: a, password: "{{ secrets.UNSET_PASSWORD }}"}}\n'
        "tests:\n  t:\n    request: {url: /x}\n"
    )
    code, _, err = baton("validate", str(flow))
    assert code == 2
    assert "defaults.auth" in err and "UNSET_PASSWORD" in err


def test_without_botocore_sigv4_is_a_usage_error_naming_the_extra(tmp_path: Path) -> None:
    # a botocore that cannot be imported, first on the path: as if it were not installed
    (tmp_path / "shadow" / "botocore").mkdir(parents=True)
    (tmp_path / "shadow" / "botocore" / "__init__.py").write_text("raise ImportError('absent')\n")
    flow = tmp_path / "aws.yaml"
    flow.write_text(
        "name: aws\nbase_url: http://127.0.0.1:1\n"
        + AWS.replace("{{ secrets.AWS_SECRET }}", "k").replace("{{ secrets.AWS_SESSION }}", "s")
        + "tests:\n  t:\n    request: {url: /x}\n"
    )
    path = os.pathsep.join([str(tmp_path / "shadow"), *sys.path])
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "validate", str(flow)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": path},
        timeout=60,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "defaults.auth.aws_sigv4: AWS SigV4 signing needs botocore" in done.stderr
    assert "pip install 'baton[aws]'" in done.stderr
    assert "Traceback" not in done.stderr


async def test_auth_none_sends_a_request_without_the_default_auth(
    env: dict[str, str], tmp_path: Path, server: Server, pg_server_dsn: str
) -> None:
    flow = _flow(
        tmp_path,
        server,
        """
        with_default:
          request: {url: /basic}
          expect: {status: 200, json: {"$.user": alice}}
        login:
          request: {url: /basic, auth: none}
          expect: {status: 401}
        """,
        'defaults:\n  auth: {basic: {username: alice, password: "{{ secrets.PASSWORD }}"}}\n',
    )
    code, out, err, tests = await _run(flow)
    assert code == 0, out + err
    assert tests["login"]["status"] == "passed"


def test_validate_refuses_auth_none_in_defaults_and_an_unknown_word(tmp_path: Path) -> None:
    flow = tmp_path / "bad.yaml"
    flow.write_text(
        "name: bad\nbase_url: http://127.0.0.1:1\ndefaults: {auth: none}\n"
        "tests:\n  t:\n    request: {url: /x, auth: none}\n"
    )
    code, _, err = baton("validate", str(flow))
    assert code == 2
    assert "defaults.auth: auth: none switches off defaults.auth for one request" in err
    assert "tests.t" not in err
    flow.write_text(
        "name: bad\nbase_url: http://127.0.0.1:1\n"
        "tests:\n  t:\n    request: {url: /x, auth: 'off'}\n"
    )
    code, _, err = baton("validate", str(flow))
    assert code == 2
    assert "tests.t.request.auth: 'off' is not known here (write none, or a mapping)" in err
    assert "Traceback" not in err
