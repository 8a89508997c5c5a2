"""The plan of a flow: which tests a selection keeps and in what order, and each test as
the run sends it (the flow's defaults resolved once)."""

from __future__ import annotations

import textwrap
from pathlib import Path

from orchestrator.loader import load_flow
from orchestrator.planner import Plan, Scope, plan

FLOW = """
name: selections
variables: {host: shop.test}
defaults:
  timeout: 3s
  retries: {attempts: 2, delay: 100ms, max_delay: 1s, on: [5xx, timeout]}
  headers: {X-Host: "{{ host }}"}
  follow_redirects: true
tests:
  report:
    tags: [smoke]
    request: {url: "/reports/{{ cart_id }}"}
  health:
    request: {url: /health}
  login:
    request: {method: POST, url: /login}
    capture: {auth.token: {json: $.token}}
  cart:
    request:
      url: /cart
      headers: {Authorization: "Bearer {{ auth.token }}"}
      timeout: 250ms
      follow_redirects: false
    retries: 0
    capture: {cart_id: {json: $.id}}
"""


def _plan(tmp_path: Path, tags: tuple[str, ...] = ()) -> Plan:
    path = tmp_path / "flow.yaml"
    path.write_text(textwrap.dedent(FLOW))
    loaded = load_flow(path)
    return plan(loaded, Scope(set(loaded.flow.variables), {}, {}), tags)


def test_a_tag_selects_its_tests_and_what_they_need_in_dependency_order(
    tmp_path: Path,
) -> None:
    selected = _plan(tmp_path, ("smoke",))
    # report comes first in the file but needs cart, which needs login's token
    assert selected.order == ["login", "cart", "report"]
    assert selected.dependencies("cart") == {"login": "token"}
    assert selected.dependencies("report") == {"cart": "data"}
    assert [test.name for test in selected.planned] == selected.order


def test_only_keeps_exactly_the_named_tests_in_the_plan_order(tmp_path: Path) -> None:
    full = _plan(tmp_path)
    assert full.order == ["health", "login", "cart", "report"]
    # a rerun of what failed: the captures of the others are reused, not re-run
    rerun = full.only({"report", "cart"})
    assert rerun.order == ["cart", "report"]
    assert rerun.dependencies("cart") == {}
    assert rerun.dependencies("report") == {"cart": "data"}
    assert full.only([]).order == []


def test_each_test_is_compiled_with_the_flows_defaults_or_its_own(tmp_path: Path) -> None:
    compiled = _plan(tmp_path).compiled
    assert list(compiled) == ["health", "login", "cart", "report"]
    health, cart = compiled["health"], compiled["cart"]
    assert (health.timeout, health.follow_redirects) == (3.0, True)
    assert (cart.timeout, cart.follow_redirects) == (0.25, False)
    assert (health.retry.attempts, health.retry.statuses) == (2, frozenset({"5xx"}))
    assert health.retry.failures == frozenset({"timeout"})
    assert [health.retry.backoff_after(n) for n in range(5)] == [0.1, 0.2, 0.4, 0.8, 1.0]
    assert cart.retry.attempts == 0
    namespace = {"host": "shop.test", "auth": {"token": "t0k"}}
    assert cart.request.headers(namespace) == {"X-Host": "shop.test", "Authorization": "Bearer t0k"}
    assert cart.request.json is None and cart.request.body is None
