"""Pagination with ``until``: ``until.next`` and ``{{ poll.next }}``, ``{{ poll.attempt }}``,
``collect: true``, the ``link:`` capture; against the demo shop's /products (the next page in
the body) and /stock (in the Link header), with the real CLI and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import textwrap
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from examples.shop.state import PRODUCTS
from orchestrator.captures import CaptureError, capture, links
from orchestrator.model import Capture
from orchestrator.results import ResponseView
from tests.cli import baton

NAMES = [product["name"] for product in PRODUCTS]
STOCK = [product["stock"] for product in PRODUCTS]


async def run_flow(tmp_path: Path, tests: str) -> tuple[int, str, dict[str, dict[str, Any]], str]:
    """Run a flow of these tests: (exit code, console, {test: its JSON report}, run id)."""
    flow = tmp_path / "pages.yaml"
    flow.write_text(
        'name: pages\nbase_url: "{{ env.SHOP_URL }}"\ntests:\n'
        + textwrap.indent(textwrap.dedent(tests), "  ")
    )
    # baton() runs an event loop of its own: keep it off the test's
    code, out, err = await asyncio.to_thread(
        baton, "run", str(flow), "--json", str(tmp_path / "r.json")
    )
    assert "Traceback" not in out + err
    run = json.loads((tmp_path / "r.json").read_text())["runs"][0]
    return code, out + err, {test["name"]: test for test in run["tests"]}, run["run_id"]


async def sent_urls(dsn: str, run_id: str, test: str) -> list[str]:
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch(
            "SELECT data->>'url' FROM events WHERE stream = $1 AND type = 'RequestSent'"
            " AND data->>'test' = $2 ORDER BY version",
            f"run-{run_id}",
            test,
        )
    finally:
        await connection.close()
    return [row[0] for row in rows]


async def test_follows_the_next_link_in_the_body_and_collects_every_page(
    env: dict[str, str], tmp_path: Path, pg_server_dsn: str
) -> None:
    code, out, tests, run_id = await run_flow(
        tmp_path,
        """
        all_products:
          request:
            url: "{{ poll.next | default('/products') }}"
            params: {per_page: 2}
          until:
            next: {json: "$.next"}
          expect:
            status: 200
            json: {"$.next": null}
          capture:
            products: {json: "$.items[*].name", collect: true}
            pages: {json: "$.page", collect: true}
            last_page: {json: "$.page"}
        """,
    )
    assert code == 0, out
    captures = tests["all_products"]["captures"]
    assert captures == {"products": NAMES, "pages": [1, 2, 3, 4], "last_page": 4}
    # following next waits for nothing between pages (polling's default is 500 ms each)
    assert tests["all_products"]["duration_ms"] < 1000
    shop = env["SHOP_URL"]
    assert await sent_urls(pg_server_dsn, run_id, "all_products") == [
        f"{shop}/products?per_page=2",
        *(f"{shop}/products?page={page}&per_page=2" for page in (2, 3, 4)),
    ]


async def test_follows_the_link_header_until_there_is_no_next(
    env: dict[str, str], tmp_path: Path, pg_server_dsn: str
) -> None:
    code, out, tests, run_id = await run_flow(
        tmp_path,
        """
        stock:
          request:
            url: "{{ poll.next | default('/stock?per_page=3') }}"
          until:
            next: {link: next}
          expect: {status: 200}
          capture:
            levels: {json: "$[*].stock", collect: true}
            first: {link: first}
        """,
    )
    assert code == 0, out
    shop = env["SHOP_URL"]
    assert tests["stock"]["captures"] == {
        "levels": STOCK,
        "first": f"{shop}/stock?page=1&per_page=3",
    }
    assert await sent_urls(pg_server_dsn, run_id, "stock") == [
        f"{shop}/stock?per_page=3",
        f"{shop}/stock?page=2&per_page=3",
        f"{shop}/stock?page=3&per_page=3",
    ]


async def test_poll_attempt_numbers_the_requests_of_a_poll(
    env: dict[str, str], tmp_path: Path
) -> None:
    code, out, tests, _ = await run_flow(
        tmp_path,
        """
        numbered:
          request:
            url: /products
            params: {page: "{{ poll.attempt }}", per_page: 3}
          until:
            json: {"$.next": null}
            interval: 0s
          expect:
            json: {"$.page": "{{ poll.attempt }}"}
          capture:
            names: {json: "$.items[*].name", collect: true}
        without_until:
          request: {url: "/echo?n={{ poll.attempt }}"}
          expect:
            json: {"$.query.n": "1"}
        """,
    )
    assert code == 0, out
    assert tests["numbered"]["captures"] == {"names": NAMES}
    assert tests["without_until"]["status"] == "passed"


async def test_until_checks_end_the_pages_early(env: dict[str, str], tmp_path: Path) -> None:
    code, out, tests, _ = await run_flow(
        tmp_path,
        """
        find_hardware:
          request:
            url: "{{ poll.next | default('/products?per_page=2') }}"
          until:
            next: {json: "$.next"}
            json: {"$.items[*].category": {contains: hardware}}
          capture:
            seen: {json: "$.items[*].id", collect: true}
            page: {json: "$.page"}
        """,
    )
    assert code == 0, out
    assert tests["find_hardware"]["captures"] == {"seen": [1, 2, 3, 4], "page": 2}


async def test_pages_that_outlast_max_attempts_or_never_meet_the_condition_fail(
    env: dict[str, str], tmp_path: Path
) -> None:
    code, out, tests, _ = await run_flow(
        tmp_path,
        """
        too_many:
          request:
            url: "{{ poll.next | default('/products?per_page=2') }}"
          until:
            next: {json: "$.next"}
            max_attempts: 2
        never_found:
          request:
            url: "{{ poll.next | default('/products?per_page=3') }}"
          until:
            next: {json: "$.next"}
            json: {"$.items[*].category": {contains: garden}}
        """,
    )
    assert code == 1, out
    too_many, never = tests["too_many"], tests["never_found"]
    assert (too_many["status"], too_many["category"]) == ("failed", "assertion")
    assert too_many["message"] == (
        "until: still a next page after 2 requests; raise until.max_attempts to follow more"
    )
    assert too_many["exchange"]["url"].endswith("/products?page=2&per_page=2")
    assert never["message"] == (
        "until: no next page after 3 requests, and the condition still failed"
    )
    assert never["assertions"][0]["subject"] == "until json $.items[*].category"


def test_the_static_checks_know_the_polling_names(env: dict[str, str], tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(
        textwrap.dedent("""
        name: good
        base_url: http://127.0.0.1:1
        tests:
          pages:
            request:
              url: "{{ poll.next | default('/stock') }}"
              params: {n: "{{ poll.attempt }}"}
            until: {next: {link: next}}
            capture: {levels: {json: "$[*].stock", collect: true}}
    """)
    )
    code, out, err = baton("validate", str(good))
    assert code == 0, out + err

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        textwrap.dedent("""
        name: bad
        base_url: "http://127.0.0.1:1/{{ poll.attempt }}"
        tests:
          typos:
            request: {url: "/p?page={{ poll.atempt }}&x={{ attempt }}"}
            capture: {poll.x: {json: "$.a"}}
          no_default:
            request: {url: "{{ poll.next }}"}
            until: {next: {json: "$.next"}}
          no_next:
            request: {url: "{{ poll.next | default('/x') }}"}
    """)
    )
    code, _, err = baton("validate", str(bad))
    assert code == 2
    assert err.splitlines() == [
        f"error: {bad}: tests.typos.capture.poll.x: 'poll' is a reserved name "
        "(give it another name: poll.* holds the values of until polling)",
        f"error: {bad}: tests.typos.request: variable 'attempt' is not defined "
        "(did you mean 'poll.attempt'?)",
        f"error: {bad}: tests.typos.request: 'poll.atempt' is not a polling value "
        "(did you mean 'poll.attempt'?)",
        f"error: {bad}: tests.no_default.request: poll.next has no value for the first "
        "request (write {{ poll.next | default('...') }} with what the first request sends)",
        f"error: {bad}: tests.no_next.request: poll.next is set only by until.next, which "
        "this test has not (add until: {next: ...} naming where each response gives the next)",
        f"error: {bad}: base_url: poll.attempt has a value only inside a test "
        "(read it in a test's request, expect or until)",
    ]

    two_sources = tmp_path / "two.yaml"
    two_sources.write_text(
        textwrap.dedent("""
        name: two
        tests:
          t:
            request: {url: http://127.0.0.1:1/}
            until: {next: {json: "$.next", link: next}}
    """)
    )
    code, _, err = baton("validate", str(two_sources))
    assert code == 2
    assert err.strip() == (
        f"error: {two_sources}: tests.t.until.next: a capture takes exactly one of json, "
        "header, cookie, regex, link, status"
    )


def view(link: str, url: str = "https://api.example/v1/items?page=2") -> ResponseView:
    return ResponseView(status=200, headers={"link": link}, text="[]", duration_ms=1, url=url)


def test_link_targets_are_read_as_rfc_8288_says() -> None:
    response = view(
        '</v1/items?page=3>; rel="next", <?page=1>; rel="first prev"; title="a, b; c",'
        " <https://other.example/x>; REL=Last"
    )
    assert links(response) == {
        "next": "https://api.example/v1/items?page=3",
        "first": "https://api.example/v1/items?page=1",
        "prev": "https://api.example/v1/items?page=1",
        "last": "https://other.example/x",
    }
    assert capture("n", Capture(link="Next"), response) == "https://api.example/v1/items?page=3"
    with pytest.raises(CaptureError) as missing:
        capture("n", Capture(link="up"), response)
    assert str(missing.value) == (
        'capture n: the Link header has no rel="up" (rels: first, last, next, prev)'
    )
