"""``baton plan PATH... --json``: the plan as data, on the demo shop's flows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.cli import baton
from tests.conftest import SHOP


def plan_of(*args: str) -> dict[str, Any]:
    code, out, err = baton("plan", *args, "--json")
    assert code == 0, out + err
    document: dict[str, Any] = json.loads(out)
    return document


def test_plan_json_lists_tests_dependencies_kinds_and_needs() -> None:
    document = plan_of(str(SHOP / "checkout.yaml"))
    assert document["version"] == 1
    [flow] = document["flows"]
    assert flow["file"] == str(SHOP / "checkout.yaml")
    assert flow["name"] == "shop checkout"
    assert flow["runs"] == 1
    assert flow["order"][:3] == ["health", "login", "profile"]
    assert [test["name"] for test in flow["tests"]] == flow["order"]
    tests = {test["name"]: test for test in flow["tests"]}
    assert tests["login"]["depends_on"] == [{"test": "health", "kind": "order"}]
    assert tests["login"]["captures"] == ["auth.token", "auth.refresh_token", "user_id"]
    assert tests["login"]["tags"] == ["smoke", "auth"]
    assert tests["profile"]["depends_on"] == [{"test": "login", "kind": "token"}]
    assert tests["profile"]["needs"] == ["auth.token", "user_id", "username"]
    assert {"test": "catalog", "kind": "data"} in tests["product"]["depends_on"]
    assert tests["health"] == {
        "name": "health",
        "depends_on": [],
        "needs": [],
        "captures": [],
        "tags": ["smoke"],
    }


def test_plan_json_takes_the_flow_options_and_every_flow_of_a_directory() -> None:
    document = plan_of(str(SHOP), "--data", str(SHOP / "users.csv"), "--tag", "smoke")
    flows = {Path(flow["file"]).name: flow for flow in document["flows"]}
    assert "checkout.yaml" in flows and "batch.yaml" in flows
    rows = len((SHOP / "users.csv").read_text().strip().splitlines()) - 1
    assert flows["checkout.yaml"]["runs"] == rows
    # --tag smoke keeps the smoke tests and what they need
    assert flows["checkout.yaml"]["order"] == ["health", "login", "catalog"]


def test_plan_json_of_a_broken_flow_is_one_line_and_exit_2(tmp_path: Path) -> None:
    flow = tmp_path / "broken.yaml"
    flow.write_text(
        "name: broken\nbase_url: http://x\ntests:\n  a:\n    request: {url: '/{{ nope }}'}\n"
    )
    code, out, err = baton("plan", str(flow), "--json")
    assert code == 2
    assert out == ""
    assert "broken.yaml" in err and "nope" in err
    assert "Traceback" not in err


def test_plan_without_json_prints_the_text_of_graph() -> None:
    flow = str(SHOP / "checkout.yaml")
    code, text, err = baton("plan", flow)
    assert code == 0, err
    assert text == baton("graph", flow)[1]
    assert "  3. profile  <- login (token)\n" in text
