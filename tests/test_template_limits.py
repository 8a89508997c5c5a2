"""What a template may cost, and what happens when one fails: a test failure in the category
``template`` with Baton's message, never a crash, on the CLI and through the service; and a
tenant's costly templates never hold up the service (``/health`` answers within 1 s)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from context_service.keys import create_key
from examples.shop.server import serve as serve_shop
from orchestrator import templating
from tests.cli import baton
from tests.conftest import LiveService, Org

# Each payload, what the service's limits make of it (Baton's words), and the CLI's
PAYLOADS = {
    "repeat": ("{{ 'a' * 10**9 }}", "'*' of the template would have 1,000,000,000 characters"),
    "huge_range": ("{{ range(10**9) | list }}", "range() of 1,000,000,000 numbers"),
    "nested_loops": (
        "{% for a in range(10**4) %}{% for b in range(10**4) %}{% endfor %}{% endfor %}",
        "the template's loops turn more than",
    ),
    "lipsum": ("{{ lipsum(10**6) }}", "lipsum() of the template would have"),
    "big_integer": ("{{ 10 ** 100000 }}", "an integer of more than 4096 bits"),
    "center": ("{{ 'a' | center(10**9) }}", "center(): 1,000,000,000 is more than the limit"),
    "format_width": ("{{ '%*d' % (10**9, 1) }}", "a width or precision of a format"),
    "doubling": (
        "{% set ns = namespace(s='ab') %}{% for i in range(40) %}"
        "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}",
        "characters or items; the limit is",
    ),
    "recursion": (
        "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
        "the template calls itself too deeply",
    ),
    "type_error": ("{{ 1 + 'a' }}", "TypeError"),
}
TIMES_OUT = (
    # 100 x 1 MB strings a turn: far more than a second of work within the loop limit
    "{% for i in range(99000) %}{{ ((s * 100) | length) and '' }}{% endfor %}",
    "the template ran for more than 1 s",
)


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_each_costly_payload_is_refused_quickly_with_a_template_error(name: str) -> None:
    text, message = PAYLOADS[name]
    for limits in (templating.SERVICE_LIMITS, templating.CLI_LIMITS):
        token = templating.LIMITS.set(limits)
        start = time.monotonic()
        try:
            with pytest.raises(templating.TemplateError) as failure:
                templating.render(text, {})
        finally:
            templating.LIMITS.reset(token)
        assert time.monotonic() - start < limits.seconds + 0.5, name
        assert message in str(failure.value), (name, str(failure.value))


def test_a_render_stops_at_its_time_limit() -> None:
    token = templating.LIMITS.set(templating.SERVICE_LIMITS)
    try:
        start = time.monotonic()
        with pytest.raises(templating.TemplateCostError, match="ran for more than 1 s"):
            templating.render(TIMES_OUT[0], {"s": "a" * 10_000})
        assert time.monotonic() - start < 1.5
    finally:
        templating.LIMITS.reset(token)


def test_ordinary_templates_are_not_limited() -> None:
    namespace: dict[str, Any] = {"items": list(range(1000)), "name": "alice", "ts": 1_700_000_000}
    assert templating.render("{{ items | sum }}", namespace) == 499500
    assert templating.render("{{ '{}-{}'.format(name, ts) }}", namespace) == "alice-1700000000"
    assert templating.render("{{ '%08d' % ts }}", namespace) == "1700000000"
    assert len(templating.render("{% for i in items %}{{ i }},{% endfor %}", namespace)) == 3890
    assert templating.render("{{ 2 ** 64 }}", namespace) == 2**64


@pytest.mark.parametrize("tag", ["{% include 'x.j2' %}", "{% import 'x.j2' as x %}"])
def test_include_and_import_do_not_parse(tag: str) -> None:
    with pytest.raises(templating.TemplateError, match="cannot be used in a flow file"):
        templating.references(tag)


# ---- the corpus, on the CLI and through the service ----------------------------------------


def _corpus_flow(base_url: str) -> str:
    tests: dict[str, Any] = {
        name: {"request": {"url": "/health", "params": {"p": text}}}
        for name, (text, _) in PAYLOADS.items()
    }
    tests["still_runs"] = {"request": {"url": "/health"}, "expect": {"status": 200}}
    flow = {"name": "template corpus", "base_url": base_url, "tests": tests}
    return json.dumps(flow)  # JSON is YAML


BAD_VARIABLES = textwrap.dedent("""
    name: bad variables
    base_url: "{{ env.SHOP_URL }}"
    variables:
      huge: "{{ range(10**9) | list }}"
    tests:
      first: {request: {url: "/health", params: {h: "{{ huge }}"}}}
""")


def _include_flow(tag: str) -> str:
    return textwrap.dedent(f"""
        name: includes
        base_url: "{{{{ env.SHOP_URL }}}}"
        tests:
          first: {{request: {{url: "/health", params: {{p: "{tag}"}}}}}}
    """)


@pytest.fixture
def cli_env(
    monkeypatch: pytest.MonkeyPatch, pg_server_dsn: str, shop_url: str, tmp_path: Path
) -> None:
    monkeypatch.setenv("SHOP_URL", shop_url)
    monkeypatch.setenv("BATON_DATABASE_URL", pg_server_dsn)
    monkeypatch.setenv("BATON_HOME", str(tmp_path / "home"))


def test_the_cli_fails_each_template_test_and_writes_its_report(
    cli_env: None, tmp_path: Path
) -> None:
    flow = tmp_path / "corpus.yaml"
    flow.write_text(_corpus_flow("{{ env.SHOP_URL }}"))
    code, out, err = baton("run", str(flow), "--json", str(tmp_path / "r.json"))
    assert code == 1, out + err
    assert "Traceback" not in out + err
    (run,) = json.loads((tmp_path / "r.json").read_text())["runs"]
    results = {test["name"]: test for test in run["tests"]}
    assert results.pop("still_runs")["status"] == "passed"
    for name, result in results.items():
        assert (result["status"], result["category"]) == ("failed", "template"), name
        assert result["message"].startswith("template error: "), result
    assert "TypeError" in results["type_error"]["message"]
    assert "range() of 1,000,000,000 numbers" in results["huge_range"]["message"]


def test_the_cli_skips_every_test_when_the_variables_fail_and_exits_1(
    cli_env: None, tmp_path: Path
) -> None:
    flow = tmp_path / "variables.yaml"
    flow.write_text(BAD_VARIABLES)
    code, out, err = baton("run", str(flow), "--json", str(tmp_path / "r.json"))
    assert code == 1, out + err
    assert "Traceback" not in out + err
    (run,) = json.loads((tmp_path / "r.json").read_text())["runs"]
    (test,) = run["tests"]
    assert (test["status"], test["category"]) == ("skipped", "template")
    assert "range() of 1,000,000,000 numbers" in test["message"]


@pytest.mark.parametrize("tag", ["{% include 'x.j2' %}", "{% import 'x.j2' as x %}"])
def test_the_cli_refuses_include_and_import_before_any_request(
    cli_env: None, tmp_path: Path, tag: str
) -> None:
    flow = tmp_path / "includes.yaml"
    flow.write_text(_include_flow(tag))
    code, out, err = baton("run", str(flow))
    assert code == 2, out + err
    assert "includes.yaml: tests.first.request" in err
    assert "cannot be used in a flow file" in err and "Traceback" not in out + err


@pytest.fixture(scope="module")
async def shop() -> AsyncIterator[str]:
    runner, url = await serve_shop("127.0.0.1", 0)
    yield url
    await runner.cleanup()


@pytest.fixture(scope="module")
async def tenant(live_service: LiveService, shop: str) -> AsyncIterator[tuple[Org, str, str]]:
    """An organization's client, its project and its environment (SHOP_URL)."""
    key = await create_key(
        live_service.settings, organization="templates", scopes=["read", "run", "admin"], name="t"
    )
    org = Org(live_service, key)
    project = await org.ok("POST", "/api/v1/projects", 201, json={"name": "corpus"})
    environment = await org.ok(
        "POST",
        "/api/v1/environments",
        201,
        json={
            "project_id": project["id"],
            "name": "local",
            "variables": [{"name": "SHOP_URL", "value": shop}],
        },
    )
    yield org, project["id"], environment["id"]
    await org.http.aclose()


_SUITES: dict[str, str] = {}
"""Suite ids by content: each flow is uploaded once (a second would be a conflict)."""


@contextlib.asynccontextmanager
async def health_latencies(live_service: LiveService) -> AsyncIterator[list[float]]:
    """How long each /health took, asked every 50 ms (without a key) while the block runs;
    every answer must be 200."""
    latencies: list[float] = []
    polling = True

    async def poll() -> None:
        async with live_service.client() as anonymous:
            while polling:
                start = time.monotonic()
                response = await anonymous.get("/health", timeout=30)
                latencies.append(time.monotonic() - start)
                assert response.status_code == 200
                await asyncio.sleep(0.05)

    poller = asyncio.create_task(poll())
    try:
        yield latencies
    finally:
        polling = False
        await poller


async def _run(org: Org, project: str, environment: str, content: str) -> str:
    if content not in _SUITES:
        suite = await org.ok(
            "POST", "/api/v1/suites", 201, json={"project_id": project, "content": content}
        )
        _SUITES[content] = suite["id"]
    return await org.start(_SUITES[content], environment)


async def test_the_service_fails_each_template_test_and_ends_the_run(
    tenant: tuple[Org, str, str],
) -> None:
    org, project, environment = tenant
    run_id = await _run(org, project, environment, _corpus_flow("{{ env.SHOP_URL }}"))
    run = await org.finished(run_id, within=30)
    assert run["status"] == "failed", run
    results = await org.ok("GET", f"/api/v1/runs/{run_id}/results?limit=100")
    found = {item["test"]: item for item in results["items"]}
    assert found.pop("still_runs")["status"] == "passed"
    for name, (_, message) in PAYLOADS.items():
        assert (found[name]["status"], found[name]["category"]) == ("failed", "template")
        assert message in found[name]["message"], (name, found[name]["message"])

    skipped = await _run(org, project, environment, BAD_VARIABLES)
    assert (await org.finished(skipped))["status"] == "failed"
    (result,) = (await org.ok("GET", f"/api/v1/runs/{skipped}/results"))["items"]
    assert (result["status"], result["category"]) == ("skipped", "template")


@pytest.mark.parametrize("tag", ["{% include 'x.j2' %}", "{% import 'x.j2' as x %}"])
async def test_the_service_refuses_include_and_import_at_upload(
    tenant: tuple[Org, str, str], tag: str
) -> None:
    org, project, _ = tenant
    response = await org.http.post(
        "/api/v1/suites", json={"project_id": project, "content": _include_flow(tag)}
    )
    assert response.status_code == 422
    assert "cannot be used in a flow file" in response.json()["detail"]


async def test_costly_templates_never_hold_up_the_service(
    tenant: tuple[Org, str, str], live_service: LiveService
) -> None:
    """Two runs of four templates that each work until the 1 s limit, and the corpus, at
    once: /health, asked every 50 ms meanwhile, answers each time within 1 s."""
    org, project, environment = tenant
    tests = {
        f"slow_{n}": {"request": {"url": "/health", "params": {"p": TIMES_OUT[0]}}}
        for n in range(4)
    }
    heavy = {
        "name": "heavy",
        "base_url": "{{ env.SHOP_URL }}",
        "variables": {"s": "{{ 'a' * 10000 }}"},
        "tests": tests,
    }
    began = time.monotonic()
    async with health_latencies(live_service) as latencies:  # from before the first run
        runs = [await _run(org, project, environment, json.dumps(heavy)) for _ in range(2)]
        runs.append(await _run(org, project, environment, _corpus_flow("{{ env.SHOP_URL }}")))
        finished = [await org.finished(run_id, within=120) for run_id in runs]
    took = time.monotonic() - began
    assert all(run["status"] == "failed" for run in finished)
    results = await org.ok("GET", f"/api/v1/runs/{runs[0]}/results?limit=100")
    for item in results["items"]:
        assert item["category"] == "template" and TIMES_OUT[1] in item["message"], item
    print(
        f"/health: {len(latencies)} answers in {took:.1f} s, slowest {max(latencies) * 1000:.0f} ms"
    )
    assert len(latencies) > 20 and max(latencies) < 1.0, max(latencies)


BACKTRACKS = "(a|aa)+c"
"""No match on a run of a's, found only after trying every way to split it: without a
bound, hours of backtracking on 60 characters."""


def test_a_pattern_that_backtracks_without_end_stops_at_the_run_s_limit() -> None:
    from orchestrator.captures import PatternTimeout, compile_regex, search

    token = templating.LIMITS.set(templating.SERVICE_LIMITS)
    try:
        # CPU time, not wall time: what a pattern that never stops would burn, and what other
        # work on a busy machine (tests in parallel) cannot stretch past the bound
        start = time.thread_time()
        with pytest.raises(PatternTimeout, match=r"took longer than 0\.25 s"):
            search(compile_regex(BACKTRACKS), "a" * 60)
        assert time.thread_time() - start < 1.0
        assert search(compile_regex("a+c"), "aaac") is not None  # an ordinary one matches
    finally:
        templating.LIMITS.reset(token)


async def test_patterns_that_backtrack_never_hold_up_the_service(
    tenant: tuple[Org, str, str], live_service: LiveService
) -> None:
    """Checks and a capture whose patterns backtrack without end fail their tests, each
    within the service's limit of one match, while /health answers within 1 s."""
    org, project, environment = tenant
    request = {"url": "/echo", "params": {"q": "a" * 60}}
    tests: dict[str, Any] = {
        f"check_{n}": {"request": request, "expect": {"body": {"matches": BACKTRACKS}}}
        for n in range(4)
    }
    tests["capture"] = {"request": request, "capture": {"found": {"regex": BACKTRACKS}}}
    flow = {"name": "backtracking", "base_url": "{{ env.SHOP_URL }}", "tests": tests}
    async with health_latencies(live_service) as latencies:
        run_id = await _run(org, project, environment, json.dumps(flow))
        finished = await org.finished(run_id, within=60)
    assert finished["status"] == "failed"
    results = await org.ok("GET", f"/api/v1/runs/{run_id}/results?limit=100")
    assert len(results["items"]) == 5
    for item in results["items"]:
        assert "took longer than 0.25 s" in item["message"], item
    print(f"/health: {len(latencies)} answers, slowest {max(latencies) * 1000:.0f} ms")
    assert len(latencies) > 5 and max(latencies) < 1.0, max(latencies)
