"""docs/recipes.md: every recipe is a file under examples/recipes/, shown on the page
exactly as it is, and every one runs green against the demo shop."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import httpx
import pytest

from tests.cli import baton

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "examples" / "recipes"
PAGE = ROOT / "docs" / "recipes.md"
SHOWN = re.compile(
    r"^File: \[examples/recipes/(?P<name>[\w.-]+)\]\(\.\./examples/recipes/(?P=name)\)\n\n"
    r"```(?:yaml|csv)\n(?P<text>.*?)^```$",
    re.MULTILINE | re.DOTALL,
)


def test_the_page_shows_every_recipe_file_exactly() -> None:
    shown = {match["name"]: match["text"] for match in SHOWN.finditer(PAGE.read_text())}
    files = {path.name for path in RECIPES.iterdir() if path.is_file()}
    assert set(shown) == files
    for name, text in shown.items():
        assert text == (RECIPES / name).read_text(), f"docs/recipes.md shows an old {name}"


def _token(shop_url: str) -> str:
    answer = httpx.post(
        f"{shop_url}/auth/login", json={"username": "bob", "password": "secret-bob"}
    )
    token: str = answer.json()["access_token"]
    return token


def test_validate_names_the_secret_a_recipe_needs(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SHOP_TOKEN", raising=False)
    code, _out, err = baton("validate", str(RECIPES))
    assert code == 2
    assert "token-from-ci.yaml: defaults.headers: secret SHOP_TOKEN is not set" in err
    monkeypatch.setenv("SHOP_TOKEN", "anything")
    code, out, err = baton("validate", str(RECIPES))
    assert code == 0, err
    assert len(out.splitlines()) == len(list(RECIPES.glob("*.yaml")))


async def test_every_recipe_runs_green_against_the_demo_shop(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    token = _token(env["SHOP_URL"])
    monkeypatch.setenv("SHOP_TOKEN", token)
    report = tmp_path / "report.json"
    code, out, err = await asyncio.to_thread(baton, "run", str(RECIPES), "--json", str(report))
    assert code == 0, out + err
    runs = json.loads(report.read_text())["runs"]
    assert {run["suite"] for run in runs} >= {
        "recipe login once",
        "recipe token refresh",
        "recipe polling",
        "recipe upload",
        "recipe graphql",
    }
    assert all(run["status"] == "passed" for run in runs)
    assert token not in out + err + report.read_text()


async def test_the_data_driven_recipe_runs_once_per_row(env: dict[str, str]) -> None:
    code, out, err = await asyncio.to_thread(
        baton,
        "run",
        str(RECIPES / "data-driven.yaml"),
        "--data",
        str(RECIPES / "customers.csv"),
    )
    assert code == 0, out + err
    rows = len((RECIPES / "customers.csv").read_text().splitlines()) - 1
    assert f"{rows} runs: {rows} passed" in out


async def test_the_baton_flow_of_the_comparison_page_runs_green(
    env: dict[str, str], tmp_path: Path
) -> None:
    page = (ROOT / "docs" / "comparison.md").read_text()
    section = page.split("## Baton\n", 1)[1]
    flow = tmp_path / "checkout.yaml"
    flow.write_text(section.split("```yaml\n", 1)[1].split("```", 1)[0])
    report = tmp_path / "report.json"
    code, out, err = await asyncio.to_thread(baton, "run", str(flow), "--json", str(report))
    assert code == 0, out + err
    (run,) = json.loads(report.read_text())["runs"]
    assert [test["name"] for test in run["tests"]] == ["login", "cart", "checkout"]
    assert all(test["status"] == "passed" for test in run["tests"])
