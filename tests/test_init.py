"""``baton init``: the scaffold validates and runs; on a terminal it asks for the base URL,
elsewhere it asks nothing; it never overwrites a file without --force."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pexpect
import pytest
import yaml

from tests.cli import baton
from tests.test_ci_examples import Runner

BATON = str(Path(sys.executable).parent / "baton")


def init(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``baton init`` as CI runs it: no terminal, standard input closed."""
    return subprocess.run(
        [BATON, "init", *args],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.usefixtures("env")
async def test_without_a_terminal_init_asks_nothing_and_the_flow_runs(
    tmp_path: Path, shop_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    done = await asyncio.to_thread(init, "project", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Base URL" not in done.stdout
    project = tmp_path / "project"
    written = sorted(str(p.relative_to(project)) for p in project.rglob("*") if p.is_file())
    assert written == [".github/workflows/baton.yml", "env/local.yaml", "flows/api.yaml"]
    assert 'base_url: "http://127.0.0.1:8765"' in (project / "env/local.yaml").read_text()
    monkeypatch.chdir(project)
    code, out, err = await asyncio.to_thread(baton, "validate", "flows/", "--env", "local")
    assert (code, out) == (0, "flows/api.yaml: ok (2 tests, 1 run(s))\n"), err
    # the demo shop answers the scaffolded login-then-use flow as written
    code, out, err = await asyncio.to_thread(
        baton, "run", "flows/", "--env", "local", "--var", f"base_url={shop_url}"
    )
    assert code == 0, out + err
    assert "2 passed" in out


async def test_the_scaffolded_github_workflow_runs_and_keeps_its_reports(
    fresh_baton_home: Path, shop_url: str
) -> None:
    """Its run: steps, run as GitHub would (tests/test_ci_examples.py), against the demo
    shop as the base URL given to init, on the embedded PostgreSQL under .baton/ (the
    workflow sets no BATON_DATABASE_URL)."""
    # not pytest's tmp_path: the embedded server must reach its data directory (conftest)
    tmp_path = fresh_baton_home
    assert init("--base-url", shop_url, cwd=tmp_path).returncode == 0
    document = yaml.safe_load((tmp_path / ".github" / "workflows" / "baton.yml").read_text())
    runner = Runner(tmp_path, contexts={"runner": {"os": "Linux"}}, document=document)
    ok = await asyncio.to_thread(runner.job, "baton")
    log = "\n".join(runner.log)
    assert ok, log
    junit = ET.parse(tmp_path / "reports" / "junit.xml").getroot()
    assert (junit.get("tests"), junit.get("failures")) == ("2", "0"), log
    ctrf = json.loads((tmp_path / "reports" / "ctrf.json").read_text())
    assert [t["status"] for t in ctrf["results"]["tests"]] == ["passed", "passed"]


def test_init_with_standard_input_closed_asks_nothing(tmp_path: Path) -> None:
    done = subprocess.run(
        [BATON, "init", "--ci", "none"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=lambda: os.close(0),
    )
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.rglob("*.yaml")) == ["api.yaml", "local.yaml"]


def test_init_refuses_to_overwrite_and_force_does(tmp_path: Path) -> None:
    assert init("--name", "Shop API", cwd=tmp_path).returncode == 0
    flow = tmp_path / "flows" / "shop-api.yaml"
    assert 'name: "Shop API"' in flow.read_text()
    flow.write_text("mine\n")
    again = init("--name", "Shop API", "--ci", "gitlab", cwd=tmp_path)
    assert again.returncode == 2
    assert again.stderr == (
        "error: flows/shop-api.yaml: already exists; pass --force to overwrite it\n"
    )
    assert flow.read_text() == "mine\n"
    assert not (tmp_path / ".gitlab-ci.yml").exists()  # nothing written at all
    forced = init("--name", "Shop API", "--force", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert flow.read_text().startswith("# A first flow")


def test_init_writes_a_gitlab_job_that_runs_the_flows(tmp_path: Path) -> None:
    done = init("--ci", "gitlab", "--base-url", "https://api.example.test: 8443", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / ".github").exists()
    job = yaml.safe_load((tmp_path / ".gitlab-ci.yml").read_text())["api-tests"]
    assert job["artifacts"]["reports"]["junit"] == "reports/junit.xml"
    assert any(line.startswith("baton run flows/ --env local") for line in job["script"])
    env = yaml.safe_load((tmp_path / "env" / "local.yaml").read_text())
    assert env == {"base_url": "https://api.example.test: 8443"}  # one value, quoted


def test_on_a_terminal_init_asks_for_the_base_url(tmp_path: Path) -> None:
    child = pexpect.spawn(
        BATON,
        ["init", str(tmp_path)],
        cwd=str(tmp_path),
        env=dict(os.environ),
        timeout=30,
        encoding="utf-8",
    )
    child.expect(r"Base URL of the API \[http://127\.0\.0\.1:8765\]: ")
    child.sendline("https://staging.example.test")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    env = yaml.safe_load((tmp_path / "env" / "local.yaml").read_text())
    assert env == {"base_url": "https://staging.example.test"}
    workflow = yaml.safe_load((tmp_path / ".github" / "workflows" / "baton.yml").read_text())
    steps = [step.get("run", "") for step in workflow["jobs"]["baton"]["steps"]]
    command = "baton run flows/ --env local --junit reports/junit.xml --ctrf reports/ctrf.json"
    assert command in steps
