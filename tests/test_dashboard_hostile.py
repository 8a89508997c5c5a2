"""The dashboard with hostile and edge data: names and messages that are markup show as
text on every page (HTML, SVG charts, titles, data attributes), every link resolves, a
secret capture is nowhere in clear, and edge runs (cancelled, never started, long and
non-ASCII names) render. The served HTML is read with an HTML parser; one Chromium test
checks that no script of a name runs and that long names do not widen a page."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from html import unescape
from html.parser import HTMLParser
from typing import Any

import asyncpg
import pytest
from markupsafe import escape

from context_service.keys import create_key
from tests.conftest import LiveService, Org
from tests.test_dashboard import Page, Shop, chromium, page, shop

__all__ = ["chromium", "page", "shop"]  # the browser and the demo shop, as fixtures

# each sets window.pwned if it ever runs (an alert() would stall the browser under test)
SCRIPT = "<script>window.pwned = 1</script>"
IMG = '"><img src=x onerror="window.pwned = 2">'
SVG = "</svg><svg onload=window.pwned=3>"
HOSTILE = f"{SCRIPT} {IMG} {SVG}"
SECRET = "hunter2-very-secret"
LONG = "t" * 300
WIDE = "prüfung-日本語-✓"


class Markup(HTMLParser):
    """What a page's markup holds: elements, attributes, links and text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    @property
    def links(self) -> set[str]:
        return {str(a["href"]) for tag, a in self.tags if tag == "a" and a.get("href")}


def parsed(html: str) -> Markup:
    found = Markup()
    found.feed(html)
    found.close()
    return found


def assert_inert(html: str) -> Markup:
    """No element, attribute or script that a hostile name could have added."""
    found = parsed(html)
    scripts = [a for tag, a in found.tags if tag == "script"]
    assert all(a.get("nonce") for a in scripts), "a script without the page's nonce"
    assert len(scripts) <= 1
    assert not [tag for tag, _ in found.tags if tag == "img"], "an injected <img>"
    handlers = [(tag, name) for tag, a in found.tags for name in a if name.startswith("on")]
    assert not handlers, f"an event handler attribute: {handlers}"
    assert SECRET not in html and "enc:v1:" not in html
    return found


@pytest.fixture(scope="module")
async def org(live_service: LiveService) -> AsyncIterator[Org]:
    key = await create_key(
        live_service.settings, organization="hostile", scopes=["read", "run", "admin"], name="t"
    )
    made = Org(live_service, key)
    yield made
    await made.http.aclose()


def _flow(name: str, tests: dict[str, Any]) -> str:
    return json.dumps({"name": name, "base_url": "{{ env.SHOP_URL }}", "tests": tests})


@pytest.fixture(scope="module")
async def ids(org: Org, shop: Shop) -> dict[str, str]:
    """A project, environment, suite, tests and captures named with markup. ``kept`` is a
    secret capture of a secret; ``plain`` captures the same value without ``secret``."""
    project = await org.ok("POST", "/api/v1/projects", 201, json={"name": f"p {HOSTILE}"})
    env = {
        "project_id": project["id"],
        "name": f"env {HOSTILE}",
        "variables": [
            {"name": "SHOP_URL", "value": shop[1]},
            {"name": "TOKEN", "value": SECRET, "secret": True},
        ],
    }
    made = {"project": project["id"]}
    made["env"] = (await org.ok("POST", "/api/v1/environments", 201, json=env))["id"]
    hostile_tests = {
        f"t {HOSTILE}": {
            "request": {"url": "/echo", "params": {"v": HOSTILE, "k": "{{ secrets.TOKEN }}"}},
            "capture": {
                "echoed": {"json": "$.query.v"},
                "kept": {"json": "$.query.k", "secret": True},
                "plain": {"json": "$.query.k"},
            },
        },
        f"f {HOSTILE}": {
            "request": {"url": "/echo", "params": {"v": "{{ echoed }}", "k": "{{ kept }}"}},
            "expect": {"json": {"$.query.v": f"not {HOSTILE}", "$.query.k": "x{{ kept }}"}},
        },
        LONG: {"request": {"url": "/health"}},
        WIDE: {"request": {"url": "/health"}},
    }
    body = {"project_id": project["id"], "content": _flow(f"s {HOSTILE}", hostile_tests)}
    made["hostile"] = (await org.ok("POST", "/api/v1/suites", 201, json=body))["id"]
    return made


def _status(html: str, test: str) -> str:
    row = html.split(f'<tr data-test="{escape(test)}"', 1)[1].split("</tr>", 1)[0]
    return row.split('<td class="status">', 1)[1].split("<", 1)[0]


async def test_markup_in_names_and_messages_is_text_on_every_page_and_every_link_resolves(
    org: Org, ids: dict[str, str]
) -> None:
    first, second = [await org.start(ids["hostile"], ids["env"]) for _ in range(2)]
    for run_id in (first, second):
        assert (await org.finished(run_id))["status"] == "failed"
    pages = [
        "/runs",
        f"/runs/{first}",
        f"/runs/{second}",
        f"/runs/{first}/waterfall",
        f"/runs/{first}/diff/{second}",
        f"/analytics?project={ids['project']}",
    ]
    links: set[str] = set()
    for path in pages:
        response = await org.http.get(path)
        assert response.status_code == 200, (path, response.text)
        found = assert_inert(response.text)
        assert HOSTILE in "".join(found.text), path  # shown, as text
        links |= found.links
    assert f"/runs/{first}/diff/{second}" in links  # the run page's compare link
    for link in links:
        assert (await org.http.get(link)).status_code == 200, link

    html = (await org.http.get(f"/runs/{second}")).text
    assert _status(html, f"t {HOSTILE}") == "passed" and _status(html, WIDE) == "passed"
    text = "".join(parsed(html).text)
    assert f"not {HOSTILE}" in text  # the failed assertion's expected value, as written
    assert WIDE in text and LONG in text
    # in the waterfall a long name is cut to fit left of its bar; its title has it whole
    chart = (await org.http.get(f"/runs/{second}/waterfall")).text
    labels = [unescape(name) for name in re.findall(r'<text class="name"[^>]*>([^<]*)<', chart)]
    assert LONG[:21] + "…" in labels and WIDE in labels
    assert all(len(label) <= 22 for label in labels)
    assert f"{LONG}: starts at" in "".join(parsed(chart).text)


async def test_a_cancelled_run_shows_no_test_as_still_running(
    org: Org, ids: dict[str, str]
) -> None:
    tests = {
        "nap": {"request": {"url": "/slow", "params": {"ms": "5000"}}},
        "after": {"depends_on": ["nap"], "request": {"url": "/health"}},
    }
    body = {"project_id": ids["project"], "content": _flow("cancelled", tests)}
    suite = (await org.ok("POST", "/api/v1/suites", 201, json=body))["id"]
    run_id = await org.start(suite, ids["env"])
    await org.poll(
        f"/api/v1/runs/{run_id}/events?limit=100",
        lambda found: any(e["type"] == "RequestSent" for e in found["items"]),
    )
    await org.ok("POST", f"/api/v1/runs/{run_id}/cancel", 202)
    assert (await org.finished(run_id))["status"] == "cancelled"

    html = (await org.http.get(f"/runs/{run_id}")).text
    assert (_status(html, "nap"), _status(html, "after")) == ("cancelled", "cancelled")
    assert 'data-live="no"' in html
    chart = (await org.http.get(f"/runs/{run_id}/waterfall")).text
    assert "running" not in chart and 'data-status="cancelled"' in chart


async def test_the_compare_link_skips_runs_that_never_started(
    org: Org, ids: dict[str, str], live_service: LiveService
) -> None:
    before = await org.start(ids["hostile"], ids["env"])
    await org.finished(before)
    # runs the service took but that never started: one still queued, one whose start failed
    conn = await asyncpg.connect(live_service.settings.database_url)
    try:
        organization = await conn.fetchval(
            "SELECT organization_id FROM service_runs WHERE id = $1", uuid.UUID(before)
        )
        never = []
        for state, error in (("queued", ""), ("error", "the run did not start")):
            never.append(uuid.uuid4())
            await conn.execute(
                "INSERT INTO service_runs (id, organization_id, suite_id, environment_id, state,"
                " error) VALUES ($1, $2, $3, $4, $5, $6)",
                never[-1],
                organization,
                uuid.UUID(ids["hostile"]),
                uuid.UUID(ids["env"]),
                state,
                error,
            )
    finally:
        await conn.close()
    after = await org.start(ids["hostile"], ids["env"])
    await org.finished(after)

    html = (await org.http.get(f"/runs/{after}")).text
    assert f'href="/runs/{before}/diff/{after}"' in html  # over the runs that never started
    for run_id in never:
        page = await org.http.get(f"/runs/{run_id}")
        assert page.status_code == 200 and 'id="compare"' not in page.text
        for link in parsed(page.text).links:
            assert (await org.http.get(link)).status_code == 200, link


async def test_no_script_of_a_name_runs_in_chromium(
    page: Page, live_service: LiveService, org: Org, ids: dict[str, str]
) -> None:
    first, second = [await org.start(ids["hostile"], ids["env"]) for _ in range(2)]
    for run_id in (first, second):
        await org.finished(run_id)
    await page.open(f"{live_service.url}/runs", lands_on="/login")
    await page.js(f"document.getElementById('key').value = {json.dumps(org.key)}")
    await page.js("document.getElementById('login').click()")
    await page.until("location.pathname === '/runs' && document.getElementById('runs') !== null")
    injected = (
        "[document.querySelectorAll('img, [onload], [onerror]').length,"
        " document.querySelectorAll('script').length, window.pwned || null]"
    )
    # a 300-character name wraps: the page never gets wider than the window
    wider = "document.documentElement.scrollWidth > window.innerWidth"
    for path in ("/runs", f"/runs/{second}", f"/runs/{first}/diff/{second}", "/analytics"):
        await page.open(f"{live_service.url}{path}")
        assert await page.js(injected) == [0, 1 if path == f"/runs/{second}" else 0, None], path
        assert await page.js(wider) is False, path
    await page.open(f"{live_service.url}/runs/{second}")
    shown = await page.js("document.querySelector('#timeline td.name').textContent")
    assert shown == f"t {HOSTILE}"


async def test_a_bad_query_on_the_analytics_page_is_a_page_that_says_what_is_wrong(
    org: Org, ids: dict[str, str]
) -> None:
    for query, detail in [
        ("days=abc", "days must be a whole number of days between 1 and 730, not &#39;abc&#39;"),
        ("days=0", "days must be a whole number of days between 1 and 730, not &#39;0&#39;"),
    ]:
        response = await org.http.get(f"/analytics?project={ids['project']}&{query}")
        assert response.status_code == 400 and "text/html" in response.headers["content-type"]
        assert f'<p id="detail">{detail}</p>' in response.text
