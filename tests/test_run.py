"""``baton run`` end to end: the demo API on 127.0.0.1, real PostgreSQL, the real CLI."""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, quote_plus

import asyncpg
import pytest

from events.embedded import stop_embedded
from tests.cli import baton
from tests.conftest import SHOP, free_port, start_shop, stop
from tests.test_reporters import assert_valid_junit

ROOT = Path(__file__).resolve().parent.parent


def report(path: Path) -> dict[str, dict[str, str]]:
    """{run label: {test: status}} from a JSON report."""
    data = json.loads(path.read_text())
    runs: dict[str, dict[str, str]] = {}
    for run in data["runs"]:
        label = run["suite"] + (f" [row {run['row']}]" if run.get("row", -1) >= 0 else "")
        runs[label] = {test["name"]: test["status"] for test in run["tests"]}
    return runs


@pytest.fixture(params=["server", "embedded"])
def any_store_env(
    request: pytest.FixtureRequest,
    env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    fresh_baton_home: Path,
) -> Iterator[str]:
    """The PostgreSQL server, then the embedded default in a fresh BATON_HOME."""
    if request.param == "embedded":
        monkeypatch.delenv("BATON_DATABASE_URL")
        monkeypatch.setenv("BATON_HOME", str(fresh_baton_home))
    yield str(request.param)
    if request.param == "embedded":
        asyncio.run(stop_embedded(fresh_baton_home))


def test_every_example_flow_passes(any_store_env: str, tmp_path: Path) -> None:
    code, out, err = baton("run", str(SHOP), "--json", str(tmp_path / "r.json"))
    assert code == 0, out + err
    runs = report(tmp_path / "r.json")
    assert set(runs) == {"shop checkout", "shop resilience", "shop features", "shop batch checkout"}
    statuses = [status for tests in runs.values() for status in tests.values()]
    assert statuses.count("failed") == 0
    assert runs["shop features"]["wishlist"] == "skipped"  # skip: in the flow
    assert "4 runs: 4 passed" in out
    # four runs at once, without a terminal: one block per run, its name written once
    # (lines interleaved under a header repeated at every switch)
    progress = out.splitlines()[:-1]  # the last line is the summary
    headers = [line for line in progress if not line.startswith(" ")]
    assert sorted(headers) == sorted(runs)
    suite = ""
    for line in progress:
        if not line.startswith(" "):
            suite = line
            continue
        test = line.split()[1]
        assert test in runs[suite], f"{line!r} under {suite!r}"
    assert len(progress) == len(headers) + sum(len(tests) for tests in runs.values())


def test_data_driven_batch_runs_once_per_row(env: dict[str, str], tmp_path: Path) -> None:
    code, out, err = baton(
        "run",
        str(SHOP / "batch.yaml"),
        "--data",
        str(SHOP / "users.csv"),
        "--json",
        str(tmp_path / "r.json"),
        "--concurrency",
        "20",
    )
    assert code == 0, out + err
    runs = report(tmp_path / "r.json")
    assert len(runs) == 50
    assert all(set(tests.values()) == {"passed"} for tests in runs.values())


def test_broken_api_fails_exactly_the_right_tests(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    process, url = start_shop("--broken", "catalog")
    try:
        monkeypatch.setenv("SHOP_URL", url)
        code, out, _ = baton(
            "run",
            str(SHOP / "checkout.yaml"),
            "--json",
            str(tmp_path / "r.json"),
            "--junit",
            str(tmp_path / "junit.xml"),
        )
    finally:
        stop(process)
    assert code == 1
    tests = report(tmp_path / "r.json")["shop checkout"]
    assert {name for name, status in tests.items() if status == "failed"} == {"catalog"}
    passed = {name for name, status in tests.items() if status == "passed"}
    assert passed == {"health", "login", "profile"}
    skipped = {name for name, status in tests.items() if status == "skipped"}
    assert skipped == set(tests) - passed - {"catalog"}
    assert "skipped: depends on catalog, which failed" in out
    data = json.loads((tmp_path / "r.json").read_text())
    catalog = next(t for t in data["runs"][0]["tests"] if t["name"] == "catalog")
    assert catalog["category"] == "server_error"
    assert catalog["exchange"]["status"] == 500
    assert 'failures="1"' in (tmp_path / "junit.xml").read_text()
    assert_valid_junit(tmp_path / "junit.xml")


def test_tag_selection_runs_the_tagged_tests_and_what_they_need(
    env: dict[str, str], tmp_path: Path
) -> None:
    code, out, err = baton(
        "run", str(SHOP / "checkout.yaml"), "--tag", "smoke", "--json", str(tmp_path / "r.json")
    )
    assert code == 0, out + err
    assert set(report(tmp_path / "r.json")["shop checkout"]) == {"health", "login", "catalog"}


def test_sandbox_refuses_python_internals(env: dict[str, str], tmp_path: Path) -> None:
    flow = tmp_path / "evil.yaml"
    flow.write_text(
        textwrap.dedent("""
        name: evil
        base_url: "{{ env.SHOP_URL }}"
        tests:
          escape:
            request:
              url: "/echo?x={{ ''.__class__.__mro__[1].__subclasses__() }}"
    """)
    )
    code, out, _ = baton("run", str(flow))
    assert code == 1
    assert "[template]" in out or "template error" in out
    assert "access to attribute '__class__' of 'str' object is unsafe" in out


def test_unreachable_database_is_an_infrastructure_error(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BATON_DATABASE_URL", "postgresql://baton:hunter22@127.0.0.1:1/baton")
    code, out, err = baton("run", str(SHOP / "checkout.yaml"))
    assert code == 3
    assert "event store unavailable" in err
    assert "hunter22" not in out + err
    assert "Traceback" not in out + err
    assert len(err.strip().splitlines()) == 1


def test_api_down_is_an_infrastructure_error(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHOP_URL", "http://127.0.0.1:1")
    code, _, err = baton("run", str(SHOP / "checkout.yaml"))
    assert code == 3
    assert err.strip() == (
        "error: cannot reach http://127.0.0.1:1: connection refused; is the API running?"
    )


def test_context_events_and_runs_read_back_a_run(env: dict[str, str], tmp_path: Path) -> None:
    code, _, _ = baton("run", str(SHOP / "checkout.yaml"), "--json", str(tmp_path / "r.json"))
    assert code == 0
    run_id = json.loads((tmp_path / "r.json").read_text())["runs"][0]["run_id"]
    code, out, _ = baton("runs")
    assert code == 0 and run_id in out
    code, out, _ = baton("events", run_id)
    assert code == 0
    header, *lines = out.splitlines()
    assert header.split() == ["position", "version", "time", "type", "fields"]
    assert "RunStarted" in lines[0] and "RunCompleted" in lines[-1]
    assert sum("TestPassed" in line for line in lines) == 10
    code, out, _ = baton("context", run_id)
    context = json.loads(out)
    assert context["status"] == "passed"
    assert context["auth"]["token"] == "***"
    assert isinstance(context["variables"]["user_id"], int)
    assert len(context["order"]) == 10
    first_position = int(lines[2].split()[0])
    code, out, _ = baton("context", run_id, "--at", str(first_position))
    early = json.loads(out)
    assert early["status"] == "running" and early["variables"] == {}
    code, _, err = baton("context", "no-such-run")
    assert code == 2 and "no run 'no-such-run'" in err


AUTHOR_FLOW = """
name: authors
base_url: "{{ env.SHOP_URL }}"
tests:
  login:
    request:
      method: POST
      url: /auth/login
      json: {username: alice, password: secret-alice}
    capture:
      auth.token: {json: "$.access_token"}
  profile:
    request: {url: /echo, params: {author: ada-lovelace, pin: 4321-8765}}
    capture:
      author: {json: "$.query.author"}
      pin: {json: "$.query.pin", secret: true}
  post:
    request:
      url: /echo
      params: {by: "{{ author }}"}
      headers: {Authorization: "Bearer {{ auth.token }}"}
    expect:
      json: {"$.query.by": ada-lovelace}
"""


def test_a_capture_named_author_is_data_not_a_token(env: dict[str, str], tmp_path: Path) -> None:
    """``author`` only begins like ``auth.``: the test that reads it depends on it for data,
    not for a token, and its value is shown, while the token and a secret stay masked."""
    flow = tmp_path / "authors.yaml"
    flow.write_text(AUTHOR_FLOW)
    code, out, err = baton("graph", str(flow))
    assert code == 0, out + err
    post = out.splitlines()[-1]
    assert post.startswith("  3. post  <- ")
    assert set(post.split("<- ")[1].split(", ")) == {"login (token)", "profile (data)"}
    code, out, err = baton("run", str(flow), "--json", str(tmp_path / "r.json"))
    assert code == 0, out + err
    run = json.loads((tmp_path / "r.json").read_text())["runs"][0]
    captures = {test["name"]: test.get("captures", {}) for test in run["tests"]}
    assert captures["profile"] == {"author": "ada-lovelace", "pin": "***"}
    assert captures["login"] == {"auth.token": "***"}
    code, out, _ = baton("context", run["run_id"])
    context = json.loads(out)
    assert context["variables"]["author"] == "ada-lovelace"
    assert context["secret_names"] == ["pin"] and context["auth"] == {"token": "***"}


def encodings(value: str) -> set[str]:
    raw = value.encode()
    forms = {
        value,
        quote(value),
        quote(value, safe=""),
        quote_plus(value),
        json.dumps(value)[1:-1],
        base64.b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode(),
        base64.b64encode(raw).decode().rstrip("="),
    }
    return {form for form in forms if len(form) >= 4}


async def test_a_secret_never_appears_in_clear(
    env: dict[str, str], tmp_path: Path, pg_server_dsn: str
) -> None:
    password = "secret-canaryzq"
    (tmp_path / "secrets.yaml").write_text(f"SHOP_PASSWORD: {password}\n")
    flow = tmp_path / "leaky.yaml"
    flow.write_text(
        textwrap.dedent("""
        name: leaky
        base_url: "{{ env.SHOP_URL }}"
        tests:
          login:
            request:
              method: POST
              url: /auth/login
              json: {username: canaryzq, password: "{{ secrets.SHOP_PASSWORD }}"}
            capture:
              auth.token: {json: "$.access_token"}
          echo_everything:
            request:
              method: POST
              url: /echo
              params: {pw: "{{ secrets.SHOP_PASSWORD }} and more", token: "{{ auth.token }}"}
              headers:
                Authorization: "Bearer {{ auth.token }}"
                X-Note: "{{ secrets.SHOP_PASSWORD }}"
              json: {pw: "{{ secrets.SHOP_PASSWORD }}", token: "{{ auth.token }}"}
            expect:
              status: 200
              json: {"$.body.pw": "not what it is"}
    """)
    )
    reports = tmp_path / "reports"
    code, out, err = await _in_thread(
        "run",
        str(flow),
        "--secrets",
        str(tmp_path / "secrets.yaml"),
        "--junit",
        str(reports / "j.xml"),
        "--json",
        str(reports / "r.json"),
        "--html",
        str(reports / "r.html"),
    )
    assert code == 1, out + err  # echo_everything fails on purpose, so its exchange is shown
    run_id = json.loads((reports / "r.json").read_text())["runs"][0]["run_id"]
    connection = await asyncpg.connect(pg_server_dsn)
    try:
        rows = await connection.fetch(
            "SELECT data::text FROM events WHERE stream = $1", f"run-{run_id}"
        )
        token_event = await connection.fetchval(
            "SELECT data->>'value' FROM events WHERE stream = $1 AND type = 'AuthTokenUpdated'",
            f"run-{run_id}",
        )
    finally:
        await connection.close()
    from events.secrets import Cipher, load_key

    token = Cipher(load_key(None, Path(env["BATON_HOME"]))).decrypt(token_event)
    _, context, _ = await _in_thread("context", run_id)
    _, log, _ = await _in_thread("events", run_id)
    everything = {
        "console": out + err,
        "context": context,
        "events command": log,
        "events table": "\n".join(row[0] for row in rows),
        **{path.name: path.read_text() for path in reports.iterdir()},
    }
    assert "echo_everything" in everything["console"]
    for secret in (password, token):
        for form in encodings(secret):
            for where, text in everything.items():
                assert form not in text, f"{form!r} in {where}"
    assert "***" in everything["events table"]


async def _in_thread(*args: str) -> tuple[int, str, str]:
    # baton() runs its own event loop; keep it off this test's loop
    return await asyncio.to_thread(baton, *args)


def test_console_output_is_plain_without_a_terminal(env: dict[str, str]) -> None:
    code, out, _ = baton("run", str(SHOP / "checkout.yaml"))
    assert code == 0
    assert "\x1b[" not in out
    assert "✓ order_shipped" in out
    assert "10 passed" in out.splitlines()[-1]


def test_environment_file_and_var_override(env: dict[str, str], tmp_path: Path) -> None:
    code, out, err = baton(
        "run",
        str(SHOP / "checkout.yaml"),
        "--env",
        "local",
        "--var",
        "quantity=3",
        "--json",
        str(tmp_path / "r.json"),
    )
    assert code == 0, out + err
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["runs"][0]["environment"] == "local"


def test_serve_starts_and_stops_the_api(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    monkeypatch.setenv("SHOP_URL", f"http://127.0.0.1:{port}")
    code, out, err = baton(
        "run",
        str(SHOP / "checkout.yaml"),
        "--serve",
        f"{sys.executable} {SHOP / 'server.py'} --port {port}",
    )
    assert code == 0, out + err
    code, _, err = baton("run", str(SHOP / "checkout.yaml"))
    assert code == 3 and f"cannot reach http://127.0.0.1:{port}" in err


def test_each_run_of_a_batch_has_a_cookie_jar_of_its_own(
    env: dict[str, str], tmp_path: Path
) -> None:
    """docs/flow-format.md, Cookies: the login's session cookie goes back on the run's
    later requests by itself, and rows running at once never see each other's."""
    flow = tmp_path / "cookies.yaml"
    flow.write_text(
        textwrap.dedent(
            """
            name: cookie jar
            base_url: "{{ env.SHOP_URL }}"
            tests:
              login:
                request:
                  method: POST
                  url: /auth/login
                  json: {username: "{{ username }}", password: "{{ password }}"}
                expect: {status: 200}
              whoami:
                depends_on: [login]
                request: {url: /session}
                expect:
                  status: 200
                  json: {"$.username": "{{ username }}"}
            """
        )
    )
    rows = tmp_path / "rows.csv"
    rows.write_text(
        "username,password\n" + "".join(f"user00{n},pw-user00{n}\n" for n in range(1, 9))
    )
    code, out, err = baton(
        "run",
        str(flow),
        "--data",
        str(rows),
        "--concurrency",
        "8",
        "--json",
        str(tmp_path / "r.json"),
    )
    assert code == 0, out + err
    runs = report(tmp_path / "r.json")
    assert len(runs) == 8
    assert all(tests == {"login": "passed", "whoami": "passed"} for tests in runs.values())
