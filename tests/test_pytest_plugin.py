"""The pytest plugin: `pytest DIR` on a directory of flows, run as a user runs it (a pytest
process of its own) against the demo shop, its events in a private database."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cli import baton
from tests.conftest import private_database

PASSWORD = "secret-alice"

SHOP_FLOW = """\
name: shop via pytest
base_url: "{{ shop }}"
variables:
  username: nobody            # the conftest's baton_variables says alice
tests:
  health:
    tags: [smoke, skip]       # skip: a tag, not pytest's skip marker
    request: {url: /health}
    expect: {status: 200}
  login:
    tags: [auth]
    request:
      method: POST
      url: /auth/login
      json: {username: "{{ username }}", password: "{{ secrets.SHOP_PASSWORD }}"}
    expect: {status: 200}
    capture:
      auth.token: {json: "$.access_token"}
  profile:
    tags: [auth]
    request:
      url: /me
      headers: {Authorization: "Bearer {{ auth.token }}"}
    expect:
      json: {"$.username": "{{ username }}"}
  teapot:
    depends_on: [health]
    request: {url: "/echo?note={{ secrets.SHOP_PASSWORD }}&also=hush-hush-1234"}
    expect: {status: 418}
  after_teapot:
    depends_on: [teapot]
    request: {url: /health}
  known:
    known_failure: {reason: "bug 7: the shop is no teapot", until: 2099-12-31}
    request: {url: /health}
    expect: {status: 418}
"""

CONFTEST = f"""\
import os

import pytest


@pytest.fixture
def baton_variables():
    return {{"shop": os.environ["TEST_SHOP_URL"], "username": "alice"}}


@pytest.fixture
def baton_secrets():
    return {{"SHOP_PASSWORD": "{PASSWORD}", "UNNAMED": "hush-hush-1234"}}
"""


@dataclass(frozen=True)
class Pytest:
    code: int
    out: str


@dataclass(frozen=True)
class Project:
    """A user's directory: flows/ and a conftest.py, and the environment pytest runs in."""

    root: Path
    env: dict[str, str]

    def pytest(
        self, *args: str, env: dict[str, str] | None = None, autoload: bool = False
    ) -> Pytest:
        """``pytest *args`` here. Without ``autoload`` only Baton's plugin is loaded (named
        with -p): this environment's other plugins (hypothesis, schemathesis...) take 3 s
        of CPU to import in every pytest process."""
        environ, command = self.command(args, env, autoload)
        done = subprocess.run(
            command, cwd=self.root, env=environ, capture_output=True, text=True, timeout=120
        )
        return Pytest(done.returncode, done.stdout + done.stderr)

    def command(
        self, args: tuple[str, ...], env: dict[str, str] | None = None, autoload: bool = False
    ) -> tuple[dict[str, str], list[str]]:
        """The environment and the command line of ``pytest *args`` here."""
        environ = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
        environ.pop("BATON_SECRET_KEY", None)
        environ.update(self.env)
        environ.update(env or {})
        environ["COLUMNS"] = "200"  # whole lines: pytest cuts them to the terminal's width
        plugins = ["-p", "no:cacheprovider"]
        if not autoload:
            environ["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
            plugins += ["-p", "orchestrator.pytest_plugin"]
        return environ, [sys.executable, "-m", "pytest", *plugins, *args]

    def baton(self, monkeypatch: pytest.MonkeyPatch, *args: str) -> str:
        """What ``baton *args`` says on the same store."""
        for key, value in self.env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.delenv("BATON_SECRET_KEY", raising=False)
        code, out, err = baton(*args)
        assert code == 0, err
        return out


def make_project(root: Path, database: str, shop_url: str) -> Project:
    (root / "flows").mkdir(parents=True)
    (root / "flows" / "shop.yaml").write_text(SHOP_FLOW)
    (root / "conftest.py").write_text(CONFTEST)
    env = {
        "BATON_DATABASE_URL": database,
        "BATON_HOME": str(root / "home"),
        "TEST_SHOP_URL": shop_url,
    }
    return Project(root, env)


@pytest.fixture(scope="module")
async def module_database() -> AsyncIterator[str]:
    async with private_database() as dsn:
        yield dsn


@pytest.fixture(scope="module")
def project(
    tmp_path_factory: pytest.TempPathFactory, module_database: str, shop_url: str
) -> Project:
    return make_project(tmp_path_factory.mktemp("user"), module_database, shop_url)


@pytest.fixture(scope="module")
def whole_run(project: Project) -> Iterator[Pytest]:
    # as a user runs it: the plugin loaded through its entry point
    yield project.pytest("flows", "-v", "-rsx", "--junitxml=report.xml", autoload=True)


def run_id_of(report: Path) -> str:
    ids = {
        prop.get("value")
        for prop in ET.parse(report).iter("property")
        if prop.get("name") == "baton_run_id"
    }
    assert len(ids) == 1, ids
    return str(ids.pop())


def test_each_test_of_a_flow_is_a_pytest_test_with_its_own_outcome(whole_run: Pytest) -> None:
    assert whole_run.code == 1, whole_run.out
    for line in (
        "flows/shop.yaml::health PASSED",
        "flows/shop.yaml::login PASSED",  # the fixtures' username and secret reached it
        "flows/shop.yaml::profile PASSED",
        "flows/shop.yaml::teapot FAILED",
        "flows/shop.yaml::after_teapot SKIPPED (depends on teapot, which failed)",
        "flows/shop.yaml::known XFAIL (known failure: bug 7: the shop is no teapot, until 2099",
    ):
        assert line in whole_run.out, whole_run.out
    # Baton's expected/actual, not a traceback of the plugin
    failure = whole_run.out.split("_ teapot _")[1]
    assert "expected: 418" in failure and "actual:   200" in failure
    assert "Traceback" not in whole_run.out and "pytest_plugin.py" not in whole_run.out
    # the skip is located at the test in the flow file
    assert "SKIPPED [1] flows/shop.yaml:" in whole_run.out
    assert "1 failed, 3 passed, 1 skipped, 1 xfailed" in whole_run.out
    assert PASSWORD not in whole_run.out


def test_the_junit_report_has_every_test_and_its_run(whole_run: Pytest, project: Project) -> None:
    suite = ET.parse(project.root / "report.xml").getroot().find("testsuite")
    assert suite is not None
    cases = {case.get("name"): case for case in suite.iter("testcase")}
    assert set(cases) == {"health", "login", "profile", "teapot", "after_teapot", "known"}
    assert cases["teapot"].find("failure") is not None
    skipped = cases["after_teapot"].find("skipped")
    assert skipped is not None and skipped.get("message") == "depends on teapot, which failed"
    assert cases["login"].find("failure") is None and cases["login"].find("skipped") is None
    assert PASSWORD not in (project.root / "report.xml").read_text()


def test_a_flow_file_is_one_run_in_the_store(
    whole_run: Pytest, project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = run_id_of(project.root / "report.xml")
    assert f"{run_id}  failed    flows/shop.yaml" in whole_run.out
    shown = project.baton(monkeypatch, "show", run_id)
    assert "shop via pytest" in shown
    assert "depends on teapot, which failed" in shown
    assert run_id in project.baton(monkeypatch, "runs")
    # baton_secrets are secrets: masked in the log, also one the flow does not name
    events = project.baton(monkeypatch, "events", run_id)
    assert "note=***&also=***" in events
    assert PASSWORD not in events and "hush-hush-1234" not in events


def test_k_selects_a_test_and_what_it_needs_runs_unreported(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    found = project.pytest("flows", "-k", "profile", "--junitxml=k.xml")
    assert found.code == 0, found.out
    assert "1 passed, 5 deselected" in found.out
    shown = project.baton(monkeypatch, "show", run_id_of(project.root / "k.xml"))
    # login captured the token profile reads: it ran, in the same run; the rest did not
    assert "login" in shown and "profile" in shown
    assert "teapot" not in shown and "health" not in shown


def test_m_selects_by_tag_under_strict_markers(project: Project) -> None:
    found = project.pytest("flows", "-m", "smoke", "--strict-markers", "-v")
    assert found.code == 0, found.out
    assert "flows/shop.yaml::health PASSED" in found.out
    assert "1 passed, 5 deselected" in found.out


def test_a_tag_named_like_a_pytest_marker_is_a_keyword(project: Project) -> None:
    found = project.pytest("flows", "-k", "skip", "--strict-markers", "-v")
    assert found.code == 0, found.out
    assert "flows/shop.yaml::health PASSED" in found.out
    assert "1 passed, 5 deselected" in found.out


def test_nothing_selected_is_pytests_exit_5(project: Project) -> None:
    assert project.pytest("flows", "-k", "no_such_test").code == 5


def test_a_broken_flow_is_a_collection_error_naming_the_place(project: Project) -> None:
    broken = project.root / "broken"
    broken.mkdir(exist_ok=True)
    (broken / "bad.yaml").write_text("name: bad\ntests:\n  one:\n    request: {url: 5}\n")
    found = project.pytest("broken")
    assert found.code == 2, found.out
    assert "broken/bad.yaml: tests.one.request.url" in found.out
    assert "Traceback" not in found.out


def test_a_static_problem_fails_every_test_of_the_file(project: Project) -> None:
    undefined = project.root / "undefined"
    undefined.mkdir(exist_ok=True)
    (undefined / "flow.yaml").write_text(
        'name: typo\nbase_url: "{{ shop }}"\ntests:\n'
        '  one:\n    request: {url: "/x/{{ usernme }}"}\n  two:\n    request: {url: /health}\n'
    )
    found = project.pytest("undefined")
    assert found.code == 1, found.out
    assert found.out.count("variable 'usernme' is not defined") >= 2
    assert "2 failed" in found.out


def test_flows_are_collected_only_directly_in_the_paths_given(project: Project) -> None:
    """A suite's own data directories are not collected: only what ``baton run`` reads."""
    suite = project.root / "suite"
    (suite / "data").mkdir(parents=True, exist_ok=True)
    (suite / "data" / "flow.yaml").write_text(SHOP_FLOW)
    (suite / "settings.yaml").write_text("name: not a flow\nretries: 3\n")
    # another tool's files beside them: a mapping with tests but no name, a Helm-like
    # template Baton's YAML reader refuses; neither is Baton's to collect
    (suite / "tox.yaml").write_text("tests:\n  unit: pytest\n")
    (suite / "chart.yaml").write_text("name: x\nvalues: {{ .Values }}\n")
    assert project.pytest("suite", "--collect-only", "-q").code == 5
    named = project.pytest("suite/data/flow.yaml", "--collect-only", "-q")
    assert named.code == 0, named.out
    assert "6 tests collected" in named.out


def test_under_xdist_a_flow_file_goes_to_one_worker(project: Project) -> None:
    dealt = project.pytest("flows", "-p", "xdist", "-n", "2", "-k", "health or login")
    assert dealt.code == 1, dealt.out
    assert "a flow file is one run (pass --dist loadfile)" in dealt.out
    by_file = project.pytest(
        "flows", "-p", "xdist", "-n", "2", "--dist", "loadfile", "-k", "health or login"
    )
    assert by_file.code == 0, by_file.out
    assert "2 passed" in by_file.out


def test_an_unreachable_store_is_exit_3_in_one_line(project: Project, unused_port: int) -> None:
    found = project.pytest(
        "flows",
        "-k",
        "health",
        env={
            "BATON_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{unused_port}/none",
            "BATON_STORE_WAIT": "1",
        },
    )
    assert found.code == 3, found.out
    assert "baton: event store unavailable" in found.out
    assert "Traceback" not in found.out


def test_a_wrong_baton_setting_is_exit_2_in_one_line(project: Project) -> None:
    found = project.pytest("flows", "-k", "health", env={"BATON_STORE_WAIT": "soon"})
    assert found.code == 2, found.out
    assert "baton: BATON_STORE_WAIT='soon'" in found.out
    assert "Traceback" not in found.out


@pytest.fixture
def unused_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_each_test_reports_its_own_duration(project: Project) -> None:
    """Not the run's: the file's first test waits for the whole run."""
    timed = project.root / "timed"
    timed.mkdir(exist_ok=True)
    (timed / "flow.yaml").write_text(
        'name: timed\nbase_url: "{{ shop }}"\ntests:\n'
        "  quick:\n    request: {url: /health}\n"
        "  slow:\n    request: {url: /slow?ms=800}\n"
    )
    found = project.pytest("timed", "--junitxml=timed.xml")
    assert found.code == 0, found.out
    times = {
        case.get("name"): float(case.get("time") or 0)
        for case in ET.parse(project.root / "timed.xml").iter("testcase")
    }
    assert times["slow"] >= 0.8
    assert times["quick"] < times["slow"] / 2


def test_baton_env_reads_the_environment_file_beside_the_flow(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    envs = project.root / "envs"
    (envs / "env").mkdir(parents=True, exist_ok=True)
    (envs / "env" / "staging.yaml").write_text("greeting: hello\n")
    (envs / "flow.yaml").write_text(
        'name: greet\nbase_url: "{{ shop }}"\ntests:\n'
        '  greet:\n    request: {url: "/echo?g={{ greeting }}"}\n'
        '    expect: {json: {"$.query.g": hello}}\n'
    )
    found = project.pytest("envs", "--baton-env", "staging", "--junitxml=env.xml")
    assert found.code == 0, found.out
    assert "1 passed" in found.out  # env/ beside the flow is not collected
    run_id = run_id_of(project.root / "env.xml")
    assert run_id in project.baton(monkeypatch, "runs", "--env", "staging")
    missing = project.pytest("envs", "--baton-env", "nowhere")
    assert missing.code == 1, missing.out
    assert "--baton-env nowhere: no such environment (create envs/env/nowhere.yaml" in missing.out
    assert "Traceback" not in missing.out


def test_a_flow_with_a_shared_setup_is_a_collection_error_saying_why(project: Project) -> None:
    using = project.root / "using"
    using.mkdir(exist_ok=True)
    (using / "login.yaml").write_text(SHOP_FLOW)
    (using / "cart.yaml").write_text(
        "name: cart\nuse: [{flow: login.yaml, test: login}]\n"
        "tests:\n  one:\n    request: {url: 'http://127.0.0.1:1/'}\n"
    )
    found = project.pytest("using/cart.yaml")
    assert found.code == 2, found.out
    assert "using/cart.yaml: use: shared setups run with baton run only" in found.out
    assert "Traceback" not in found.out


SLOW_FLOW = """\
name: pytest slow
base_url: "{{ shop }}"
tests:
  quick:
    request: {url: /health}
  slow:
    depends_on: [quick]
    request: {url: /slow, params: {ms: 10000}}
"""


def test_sigterm_mid_run_ends_the_run_as_cancelled(
    tmp_path: Path, module_database: str, shop_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CI's timeout or ``docker stop`` ends pytest with SIGTERM: the run in flight records
    its end, as on Ctrl-C; before, it stayed ``running`` until another process swept it."""
    project = make_project(tmp_path, module_database, shop_url)
    (project.root / "flows" / "shop.yaml").write_text(SLOW_FLOW)
    environ, command = project.command(("flows",))
    with subprocess.Popen(
        command,
        cwd=project.root,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as process:
        try:
            deadline = time.monotonic() + 60
            while "running" not in project.baton(monkeypatch, "runs", "--suite", "pytest slow"):
                assert time.monotonic() < deadline, "pytest never started the run"
                time.sleep(0.2)
            process.send_signal(signal.SIGTERM)
            out, _ = process.communicate(timeout=30)
        finally:
            process.kill()

    assert process.returncode == 128 + signal.SIGTERM
    assert "interrupted by SIGTERM" in out
    assert "Traceback" not in out
    listed = project.baton(monkeypatch, "runs", "--suite", "pytest slow").splitlines()
    run_id, status = listed[1].split()[:2]
    assert status == "cancelled"
    events = project.baton(monkeypatch, "events", run_id).splitlines()
    assert events[-1].split()[3:] == ["RunCancelled", "reason=interrupted"]


MARKS_FLOW = """\
name: marks
base_url: "{{ shop }}"
tests:
  still_broken:
    known_failure: {reason: "bug 7: no teapot", until: 2099-12-31}
    request: {url: /health}
    expect: {status: 418}
  fixed:
    known_failure: {reason: "bug 8", until: 2099-12-31}
    request: {url: /health}
    expect: {status: 200}
  overdue:
    known_failure: {reason: "bug 9", until: 2020-01-01}
    request: {url: /health}
    expect: {status: 418}
"""


def test_a_known_failure_is_xfail_its_pass_xpass_and_once_expired_a_failure(
    project: Project,
) -> None:
    marks = project.root / "marks"
    marks.mkdir(exist_ok=True)
    (marks / "flow.yaml").write_text(MARKS_FLOW)
    found = project.pytest("marks", "-v", "-rfX", "--junitxml=marks.xml")
    assert found.code == 1, found.out  # only the expired mark fails the session
    expired = "the known-failure mark expired on 2020-01-01: bug 9"
    for line in (
        "marks/flow.yaml::still_broken XFAIL (known failure: bug 7: no teapot, until 2099-12-31)",
        "marks/flow.yaml::fixed XPASS (known failure passed: bug 8 (marked until 2099-12-31); "
        "remove the known_failure mark)",
        "marks/flow.yaml::overdue FAILED",
    ):
        assert line in found.out, found.out
    [summary] = [line for line in found.out.splitlines() if line.startswith("FAILED ")]
    assert summary.startswith("FAILED marks/flow.yaml::overdue - ") and expired in summary
    assert "1 failed, 1 xfailed, 1 xpassed" in found.out
    cases = {
        case.get("name"): case for case in ET.parse(project.root / "marks.xml").iter("testcase")
    }
    xfailed = cases["still_broken"].find("skipped")
    assert xfailed is not None and xfailed.get("type") == "pytest.xfail"
    assert xfailed.get("message") == "known failure: bug 7: no teapot, until 2099-12-31"
    # not strict: a pass in CI, as baton run's exit code has it
    assert cases["fixed"].find("failure") is None and cases["fixed"].find("skipped") is None
    failure = cases["overdue"].find("failure")
    assert failure is not None and expired in (failure.get("message") or "")


def test_baton_var_sets_a_variable_over_the_fixtures(project: Project) -> None:
    given = project.root / "given"
    given.mkdir(exist_ok=True)
    (given / "flow.yaml").write_text(
        'name: given\nbase_url: "{{ shop }}"\nvariables: {greeting: hi}\ntests:\n'
        '  greet:\n    request: {url: "/echo?g={{ greeting }}&u={{ username }}"}\n'
        '    expect: {json: {"$.query.g": "a=b", "$.query.u": bob}}\n'
    )
    # over the flow's variables and the conftest's baton_variables (username: alice)
    found = project.pytest("given", "--baton-var", "greeting=a=b", "--baton-var=username=bob")
    assert found.code == 0, found.out
    assert "1 passed" in found.out
    wrong = project.pytest("given", "--baton-var", "greeting")
    assert wrong.code == 4, wrong.out  # pytest's usage error
    assert "--baton-var 'greeting': write --baton-var name=value" in wrong.out
    assert "Traceback" not in wrong.out
