"""examples/ci: the GitHub Actions workflow's ``run:`` steps run here, in order, as GitHub
would run them (matrix values and env substituted, one bash per step, later steps skipped
after a failure unless ``if: always()``), the shards sharing one private database; and the
GitLab job runs the same commands."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.conftest import SHOP, private_database

CI = SHOP.parent / "ci"
CTRF_SCHEMA = json.loads((Path(__file__).parent / "data" / "ctrf.schema.json").read_text())
BIN = str(Path(sys.executable).parent)
EXPRESSION = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")
BROKEN = """
name: broken on purpose
base_url: "{{ env.SHOP_URL }}"
tests:
  teapot:
    request: {url: /health}
    expect: {status: 418}
"""


def workflow() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((CI / "github-actions.yml").read_text())
    return loaded


def gitlab() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((CI / "gitlab-ci.yml").read_text())
    return loaded


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Runner:
    """What GitHub gives a job: the contexts its expressions read, and a workspace."""

    workspace: Path
    contexts: dict[str, Any]
    document: dict[str, Any] = field(default_factory=workflow)
    """The workflow: examples/ci/github-actions.yml unless told."""
    overrides: dict[str, str] = field(default_factory=dict)
    """Env values a shared machine needs instead (a free port in place of 8765)."""
    log: list[str] = field(default_factory=list)

    def expand(self, text: str, matrix: dict[str, Any]) -> str:
        def value(match: re.Match[str]) -> str:
            expression = match.group(1)
            context, _, name = expression.partition(".")
            scope = {**self.contexts, "matrix": matrix}.get(context)
            assert isinstance(scope, dict) and name in scope, f"unknown ${{{{ {expression} }}}}"
            return str(scope[name])

        return EXPRESSION.sub(value, text)

    def job(self, name: str, matrix: dict[str, Any] | None = None) -> bool:
        """Run the job's ``run:`` steps; True if the job succeeded."""
        matrix = matrix or {}
        document = self.document
        job = document["jobs"][name]
        env = {**document.get("env", {}), **job.get("env", {})}
        ok = True
        for step in job["steps"]:
            if "run" not in step:
                continue  # actions (checkout, cache, upload): GitHub's, not ours to run
            if not ok and step.get("if") != "always()":
                continue
            command = self.expand(step["run"], matrix)
            if command.startswith("pip install "):
                continue  # this test's environment has installed this checkout already
            values = {
                k: self.expand(str(v), matrix) for k, v in {**env, **step.get("env", {})}.items()
            }
            done = subprocess.run(
                ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", command],
                cwd=self.workspace,
                env={
                    # a runner's environment has no BATON_* but what the workflow sets
                    **{k: v for k, v in os.environ.items() if not k.startswith("BATON_")},
                    "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                    **values,
                    **self.overrides,
                },
                capture_output=True,
                text=True,
                timeout=180,
            )
            self.log.append(f"$ {command}\n{done.stdout}{done.stderr}(exit {done.returncode})")
            ok = ok and done.returncode == 0
        return ok


def run_pipeline(workspace: Path, dsn: str) -> tuple[list[bool], bool, Runner]:
    port = free_port()
    runner = Runner(
        workspace,
        contexts={
            "github": {"run_id": str(uuid.uuid4())},
            "runner": {"os": "Linux"},
            "secrets": {
                "BATON_DATABASE_URL": dsn,
                "BATON_SECRET_KEY": base64.urlsafe_b64encode(os.urandom(32)).decode(),
            },
        },
        overrides={"SHOP_PORT": str(port), "SHOP_URL": f"http://127.0.0.1:{port}"},
    )
    shards = [
        runner.job("shard", {"shard": shard})
        for shard in workflow()["jobs"]["shard"]["strategy"]["matrix"]["shard"]
    ]
    return shards, runner.job("report"), runner


def planned_tests(workspace: Path) -> int:
    done = subprocess.run(
        [f"{BIN}/baton", "plan", "examples/shop/", "--json"],
        cwd=workspace,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SHOP_URL": "http://127.0.0.1:1"},
    )
    assert done.returncode == 0, done.stderr
    return sum(len(flow["order"]) for flow in json.loads(done.stdout)["flows"])


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A checkout's examples/ in a directory of its own (what actions/checkout leaves)."""
    shutil.copytree(
        SHOP, tmp_path / "examples" / "shop", ignore=shutil.ignore_patterns("__pycache__")
    )
    return tmp_path


@pytest.mark.timeout(600)
@pytest.mark.parametrize("broken", [False, True], ids=["green", "one-failing-flow"])
async def test_the_github_workflow_runs_shards_and_merges_their_reports(
    workspace: Path, broken: bool
) -> None:
    if broken:
        (workspace / "examples" / "shop" / "broken.yaml").write_text(BROKEN)
    async with private_database() as dsn:
        shards, report, runner = await asyncio.to_thread(run_pipeline, workspace, dsn)
    log = "\n".join(runner.log)
    reports = workspace / "reports"
    assert sorted(p.name for p in reports.glob("junit-*.xml")) == [
        "junit-1.xml",
        "junit-2.xml",
        "junit-3.xml",
    ], log
    assert report is not broken, log  # the merged exit code
    assert shards.count(False) == (1 if broken else 0), log
    merged = ET.parse(reports / "junit.xml").getroot()
    expected = planned_tests(workspace)
    assert int(merged.get("tests", "0")) == expected, log
    assert int(merged.get("failures", "0")) == (1 if broken else 0)
    shard_totals = sum(
        int(ET.parse(reports / f"junit-{k}.xml").getroot().get("tests", "0")) for k in (1, 2, 3)
    )
    assert shard_totals == expected  # each test in exactly one shard
    if broken:
        [failure] = merged.iter("failure")
        assert "418" in (failure.get("message") or "")
    ctrf = json.loads((reports / "ctrf.json").read_text())
    jsonschema.validate(ctrf, CTRF_SCHEMA)
    assert ctrf["results"]["summary"]["tests"] == expected
    assert (reports / "report.html").is_file()


def test_the_gitlab_jobs_run_the_same_commands_as_the_github_jobs() -> None:
    github, lab = workflow(), gitlab()
    for job in ("shard", "report"):
        steps = [step["run"] for step in github["jobs"][job]["steps"] if "run" in step]
        assert lab[job]["script"] == steps, job
    shards = github["jobs"]["shard"]["strategy"]["matrix"]["shard"]
    assert lab["shard"]["parallel"] == len(shards) == int(github["env"]["SHARDS"])
    assert lab["variables"]["SHARDS"] == github["env"]["SHARDS"]
    assert lab["shard"]["variables"]["SHARD"] == "$CI_NODE_INDEX"
    assert lab["report"]["artifacts"]["reports"]["junit"] == "reports/junit.xml"
    assert lab["shard"]["cache"]["paths"] == [".baton/"]
    assert lab["report"]["when"] == "always" and lab["report"]["needs"] == ["shard"]


def test_the_github_workflow_uploads_junit_and_caches_baton_home() -> None:
    jobs = workflow()["jobs"]
    uses = {job: [step.get("uses", "") for step in jobs[job]["steps"]] for job in jobs}
    assert (
        "actions/upload-artifact@v4" in uses["shard"]
        and "actions/upload-artifact@v4" in uses["report"]
    )
    [cache] = [s for s in jobs["shard"]["steps"] if s.get("uses") == "actions/cache@v4"]
    assert cache["with"]["path"] == ".baton"
    assert jobs["shard"]["strategy"]["fail-fast"] is False
    assert jobs["report"]["needs"] == "shard" and jobs["report"]["if"] == "always()"
    assert any("--junit" in step.get("run", "") for step in jobs["shard"]["steps"])
