"""The dashboard: pages behind a key (a login cookie for browsers), scoped to the key's
organization, secrets masked; and a run page in headless Chromium that follows a run in
progress through the SSE stream, without a reload."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from aiohttp import web
from websockets.asyncio.client import ClientConnection, connect

from context_service.keys import create_key
from examples.shop.server import STATE, serve
from tests.conftest import LiveService, Org

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    *("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"),
    *("--disable-background-networking", "--disable-component-update", "--disable-sync"),
    "--remote-debugging-port=0",
]
PASSWORD = "secret-alice"
FLOW = """
name: dashboard demo
base_url: "{{ env.SHOP_URL }}"
variables: {nap_ms: 2500}
tests:
  login:
    request:
      method: POST
      url: /auth/login
      json: {username: alice, password: "{{ secrets.SHOP_PASSWORD }}"}
    capture: {auth.token: {json: "$.access_token"}, user_id: {json: "$.user_id"}}
  nap:
    depends_on: [login]
    request: {url: /slow, params: {ms: "{{ nap_ms }}"}}
  profile:
    depends_on: [nap]
    request: {url: /me, headers: {Authorization: "Bearer {{ auth.token }}"}}
    expect: {status: 200, json: {"$.user_id": "{{ user_id }}"}}
  impostor:
    depends_on: [nap]
    request: {url: /me, headers: {Authorization: "Bearer {{ auth.token }}"}}
    expect: {json: {"$.username": mallory}}
  echo:
    depends_on: [nap]
    request: {method: POST, url: /echo, json: {password: "{{ secrets.SHOP_PASSWORD }}"}}
    capture: {echoed: {json: "$.body", secret: true}}
"""
SMOKE = 'name: smoke\nbase_url: "{{ env.SHOP_URL }}"\ntests: {health: {request: {url: /health}}}'
FINAL = {"passed", "failed", "skipped"}


Shop = tuple[web.AppRunner, str]
"""The demo shop's runner (its state holds every token it issued) and its URL."""


@pytest.fixture(scope="module")
async def shop() -> AsyncIterator[Shop]:
    runner, url = await serve("127.0.0.1", 0)
    yield runner, url
    await runner.cleanup()


@pytest.fixture(scope="module")
async def orgs(live_service: LiveService) -> AsyncIterator[dict[str, Org]]:
    """Two organizations, each with a key of every scope."""
    made = {}
    for slug in ("acme", "globex"):
        key = await create_key(
            live_service.settings, organization=slug, scopes=["read", "run", "admin"], name="t"
        )
        made[slug] = Org(live_service, key)
    yield made
    for org in made.values():
        await org.http.aclose()


@pytest.fixture(scope="module")
def acme(orgs: dict[str, Org]) -> Org:
    return orgs["acme"]


@pytest.fixture(scope="module")
def globex(orgs: dict[str, Org]) -> Org:
    return orgs["globex"]


@pytest.fixture(scope="module")
async def setup(acme: Org, shop: Shop) -> dict[str, str]:
    """Suites "dashboard demo" (in environment local) and "smoke" (in staging)."""
    project = await acme.ok("POST", "/api/v1/projects", 201, json={"name": "shop"})
    ids = {"project": project["id"]}
    for name in ("local", "staging"):
        env = [
            {"name": "SHOP_URL", "value": shop[1]},
            {"name": "SHOP_PASSWORD", "value": PASSWORD, "secret": True},
        ]
        body = {"project_id": project["id"], "name": name, "variables": env}
        ids[name] = (await acme.ok("POST", "/api/v1/environments", 201, json=body))["id"]
    for name, content in (("demo", FLOW), ("smoke", SMOKE)):
        body = {"project_id": project["id"], "content": content}
        ids[name] = (await acme.ok("POST", "/api/v1/suites", 201, json=body))["id"]
    return ids


@pytest.fixture(scope="module")
async def runs(acme: Org, setup: dict[str, str]) -> dict[str, dict[str, Any]]:
    """A failed run of the demo (a short nap) in local, a passed smoke run in staging."""
    demo = await acme.start(setup["demo"], setup["local"], nap_ms="10")
    smoke = await acme.start(setup["smoke"], setup["staging"])
    return {"demo": await acme.finished(demo), "smoke": await acme.finished(smoke)}


def _no_secret(html: str, shop: Shop) -> None:
    assert PASSWORD not in html and "enc:v1:" not in html  # no secret, clear or ciphertext
    state = shop[0].app[STATE]
    leaked = [token for token in [*state.access, *state.refresh] if token in html]
    assert not leaked, "a token the shop issued is on the page"


async def test_pages_need_a_key_and_send_a_browser_to_the_login_form(
    live_service: LiveService, runs: dict[str, dict[str, Any]]
) -> None:
    run_id = runs["demo"]["id"]
    async with live_service.client() as anonymous:
        for path in ("/runs", f"/runs/{run_id}"):
            response = await anonymous.get(path)
            expected = (303, f"/login?next={path.replace('/', '%2F')}")
            assert (response.status_code, response.headers["location"]) == expected
        assert (await anonymous.get("/")).headers["location"] == "/login?next=%2F"
        form = await anonymous.get("/login")
        assert form.status_code == 200 and 'name="key"' in form.text
        assert (await anonymous.get(f"/api/v1/runs/{run_id}/stream")).status_code == 401


async def test_login_keeps_the_key_in_an_httponly_strict_cookie_good_for_reads_only(
    live_service: LiveService, acme: Org, runs: dict[str, dict[str, Any]]
) -> None:
    async with live_service.client() as browser:
        refused = await browser.post("/login", data={"key": "bk_nope", "next": "/runs"})
        assert refused.status_code == 401 and "not valid" in refused.text
        assert "set-cookie" not in refused.headers
        # only a path of this site is a place to go after logging in
        response = await browser.post("/login", data={"key": acme.key, "next": "//evil.example"})
        assert response.status_code == 303 and response.headers["location"] == "/runs"
        cookie = response.headers["set-cookie"]
        assert cookie.startswith("baton_key=") and "HttpOnly" in cookie
        assert "samesite=strict" in cookie.lower() and "Path=/;" in cookie
        listed = await browser.get("/runs")
        assert listed.status_code == 200 and runs["demo"]["id"] in listed.text
        # a forged form post from another page carries the cookie at most: not enough
        body = {"suite_id": runs["smoke"]["suite_id"]}
        assert (await browser.post("/api/v1/runs", json=body)).status_code == 401
        await browser.post("/logout")
        assert (await browser.get("/runs")).status_code == 303


async def test_the_runs_list_filters_by_status_suite_and_environment(
    acme: Org, runs: dict[str, dict[str, Any]]
) -> None:
    demo, smoke = runs["demo"]["id"], runs["smoke"]["id"]
    assert (runs["demo"]["status"], runs["smoke"]["status"]) == ("failed", "passed")

    async def listed(query: str) -> set[str]:
        response = await acme.http.get(f"/runs?{query}")
        assert response.status_code == 200
        return {run for run in (demo, smoke) if f'href="/runs/{run}"' in response.text}

    assert await listed("") == {demo, smoke}
    assert await listed("status=failed") == {demo}
    assert await listed("status=passed") == {smoke}
    assert await listed("suite=smoke") == {smoke}
    assert await listed("environment=local") == {demo}
    assert await listed("suite=dashboard+demo&environment=staging") == set()
    page = (await acme.http.get("/runs")).text
    assert "<option>dashboard demo</option>" in page and "<option>staging</option>" in page


async def test_the_run_page_shows_results_failures_context_and_log_without_secrets(
    acme: Org, runs: dict[str, dict[str, Any]], shop: Shop
) -> None:
    response = await acme.http.get(f"/runs/{runs['demo']['id']}")
    assert response.status_code == 200
    assert "script-src 'nonce-" in response.headers["content-security-policy"]
    html = response.text

    def part(start: str, end: str = "</tr>") -> str:
        return html.split(start, 1)[1].split(end, 1)[0]

    for test, status in [("login", "passed"), ("profile", "passed"), ("impostor", "failed")]:
        assert f'<td class="status">{status}</td>' in part(f'<tr data-test="{test}"')
    failure = part('<div class="failure" data-test="impostor">', "</div>")
    assert '<td class="expected">mallory</td>' in failure
    assert '<td class="actual">alice</td>' in failure
    assert '<td class="value">***</td>' in part('data-name="auth.token"')
    assert '<td class="value">***</td>' in part('data-name="echoed"')
    assert '<td class="value">1</td>' in part('data-name="user_id"')
    assert html.count("<li data-position=") > 20 and "RunCompleted" in html
    assert 'data-live="no"' in html  # an ended run: nothing to follow
    _no_secret(html, shop)


async def test_the_run_page_shows_the_last_events_of_a_long_run_and_counts_the_others(
    acme: Org, setup: dict[str, str], shop: Shop
) -> None:
    checks = {f"check_{n}": {"request": {"url": "/health"}} for n in range(80)}
    flow = {"name": "many checks", "base_url": "{{ env.SHOP_URL }}", "tests": checks}
    body = {"project_id": setup["project"], "content": json.dumps(flow)}
    suite = (await acme.ok("POST", "/api/v1/suites", 201, json=body))["id"]
    run_id = await acme.start(suite, setup["local"])
    assert (await acme.finished(run_id))["status"] == "passed"
    logged = await acme.ok("GET", f"/api/v1/runs/{run_id}/events?limit=1000")
    positions = [item["position"] for item in logged["items"]]
    assert len(positions) > 300

    html = (await acme.http.get(f"/runs/{run_id}")).text
    shown = [int(at) for at in re.findall(r'<li data-position="(\d+)"', html)]
    assert shown == positions[-300:]  # the newest 300, oldest first
    assert f"{len(positions) - 300} earlier events are not shown here" in html


async def test_the_run_page_log_shows_a_known_failure_that_did_not_fail_the_run(
    acme: Org, setup: dict[str, str], shop: Shop
) -> None:
    mark = {"reason": "bug 12: health is no teapot", "until": "2999-12-31"}
    tests = {
        "teapot": {"request": {"url": "/health"}, "expect": {"status": 418}, "known_failure": mark}
    }
    flow = {"name": "known failure", "base_url": "{{ env.SHOP_URL }}", "tests": tests}
    body = {"project_id": setup["project"], "content": json.dumps(flow)}
    suite = (await acme.ok("POST", "/api/v1/suites", 201, json=body))["id"]
    run_id = await acme.start(suite, setup["local"])
    assert (await acme.finished(run_id))["status"] == "passed"
    html = (await acme.http.get(f"/runs/{run_id}")).text
    assert "(known failure: bug 12: health is no teapot, until 2999-12-31)" in html
    assert "passed: 0 passed, 1 failed (1 known), 0 skipped" in html


async def test_another_organizations_run_is_not_found(
    globex: Org, runs: dict[str, dict[str, Any]]
) -> None:
    response = await globex.http.get(f"/runs/{runs['demo']['id']}")
    assert response.status_code == 404 and "text/html" in response.headers["content-type"]
    listed = await globex.http.get("/runs")
    assert listed.status_code == 200 and runs["demo"]["id"] not in listed.text


# ---- in a browser -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium (.ci/run installs it too)."""
    if not os.path.exists(CHROMIUM):
        install = ["apt-get", "install", "-y", "chromium", "chromium-driver"]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if subprocess.run(install, env=env, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, capture_output=True)
            subprocess.run(install, env=env, capture_output=True)
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing and apt-get could not install it")
    return CHROMIUM


class Page:
    """One tab of headless Chromium, driven over the DevTools protocol."""

    def __init__(self, socket: ClientConnection) -> None:
        self._socket = socket
        self._ids = 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._ids += 1
        await self._socket.send(json.dumps({"id": self._ids, "method": method, "params": params}))
        while True:  # events (no id) are not asked for, and skipped if one comes
            message = json.loads(await self._socket.recv())
            if message.get("id") == self._ids:
                assert "error" not in message, message
                result: dict[str, Any] = message["result"]
                return result

    async def js(self, expression: str) -> Any:
        found = await self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        assert "exceptionDetails" not in found, found["exceptionDetails"]
        return found["result"].get("value")

    async def until(self, expression: str) -> Any:
        for _ in range(300):
            with contextlib.suppress(AssertionError):  # a page between two documents
                if value := await self.js(expression):
                    return value
            await asyncio.sleep(0.05)
        raise AssertionError(f"never true: {expression}")

    async def open(self, url: str, lands_on: str | None = None) -> None:
        """Go to ``url`` and wait for the page it ends on (``lands_on`` if it redirects)."""
        await self.call("Page.navigate", url=url)
        path = json.dumps(lands_on or urlsplit(url).path)
        await self.until(f"location.pathname === {path} && document.readyState === 'complete'")


@pytest.fixture
async def page(chromium: str) -> AsyncIterator[Page]:
    profile = Path(tempfile.mkdtemp(prefix="baton-chromium-"))
    args = [*CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"]
    quiet = asyncio.subprocess.DEVNULL
    process = await asyncio.create_subprocess_exec(chromium, *args, stdout=quiet, stderr=quiet)
    try:
        port_file = profile / "DevToolsActivePort"  # written once it listens
        for _ in range(400):
            if port_file.exists() and "\n" in port_file.read_text():
                break
            await asyncio.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        async with httpx.AsyncClient() as client:
            targets = (await client.get(f"http://127.0.0.1:{port}/json/list")).json()
        tab = next(t for t in targets if t["type"] == "page")
        async with connect(tab["webSocketDebuggerUrl"], max_size=None) as socket:
            yield Page(socket)
    finally:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()
        shutil.rmtree(profile, ignore_errors=True)


_SNAPSHOT = """(() => ({
  status: document.getElementById("run-status").textContent,
  rows: Object.fromEntries([...document.querySelectorAll("#timeline tbody tr")].map(
    (tr) => [tr.dataset.test, tr.querySelector(".status").textContent])),
  durations: Object.fromEntries([...document.querySelectorAll("#timeline tbody tr")].map(
    (tr) => [tr.dataset.test, tr.querySelector(".duration").textContent])),
  events: [...document.querySelectorAll("#events li")].map((li) => Number(li.dataset.position)),
  failures: Object.fromEntries([...document.querySelectorAll("#failures .failure")].map(
    (f) => [f.dataset.test, [...f.querySelectorAll("tbody tr")].map((tr) => [
      tr.querySelector(".expected").textContent, tr.querySelector(".actual").textContent])])),
  context: Object.fromEntries([...document.querySelectorAll("#context tbody tr")].map(
    (tr) => [tr.dataset.name, tr.querySelector(".value").textContent])),
  marker: window.batonMarker || null,
  html: document.documentElement.outerHTML,
}))()"""


async def test_a_run_page_in_chromium_follows_a_run_in_progress(
    page: Page, live_service: LiveService, acme: Org, setup: dict[str, str], shop: Shop
) -> None:
    await page.open(f"{live_service.url}/runs", lands_on="/login")  # no cookie yet
    await page.js(f"document.getElementById('key').value = {json.dumps(acme.key)}")
    await page.js("document.getElementById('login').click()")
    await page.until("location.pathname === '/runs' && document.getElementById('runs') !== null")

    run_id = await acme.start(setup["demo"], setup["local"])  # its nap: 2.5 s
    await acme.poll(  # until the nap is under way
        f"/api/v1/runs/{run_id}/events?limit=1000",
        lambda found: any(e["data"].get("test") == "nap" for e in found["items"]),
    )
    await page.open(f"{live_service.url}/runs/{run_id}")
    await page.js("window.batonMarker = 'no reload since'")
    first = await page.js(_SNAPSHOT)
    assert first["status"] in ("queued", "running")
    assert first["rows"]["profile"] == first["rows"]["impostor"] == "pending", first["rows"]

    seen: dict[str, list[str]] = {}
    last = first
    for _ in range(300):
        last = await page.js(_SNAPSHOT)
        for test, status in last["rows"].items():
            if not seen.get(test) or seen[test][-1] != status:
                seen.setdefault(test, []).append(status)
        if last["status"] in ("passed", "failed"):
            break
        await asyncio.sleep(0.05)
    assert last["marker"] == "no reload since"
    assert last["status"] == "failed"
    passed = dict.fromkeys(["login", "nap", "profile", "echo"], "passed")
    assert last["rows"] == {**passed, "impostor": "failed"}
    # the tests after the nap were shown waiting or running before their verdict came in
    for test in ("profile", "impostor", "echo"):
        assert seen[test][0] in ("pending", "running") and seen[test][-1] in FINAL, seen
    assert int(last["durations"]["nap"].split()[0]) >= 2500
    # the log: what the page was rendered with, then the stream's events, each once, in order
    logged = await acme.ok("GET", f"/api/v1/runs/{run_id}/events?limit=1000")
    assert last["events"] == [event["position"] for event in logged["items"]]
    assert len(last["events"]) > len(first["events"])
    assert last["failures"]["impostor"] == [["mallory", "alice"]]
    assert last["context"]["auth.token"] == "***" and last["context"]["echoed"] == "***"
    assert last["context"]["user_id"] == "1"
    _no_secret(last["html"], shop)
