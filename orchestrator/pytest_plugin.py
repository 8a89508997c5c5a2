"""Flow files as pytest tests: ``pytest flows/`` collects each flow and each test in it.

Which files: a YAML file named on the command line, or one directly in a directory named
there (or in ``testpaths``) that is a mapping with ``tests`` -- the files ``baton run
PATH...`` reads. Nothing deeper, so a suite's data directories are never collected.

One run per flow file, as ``baton run`` records it: the first of its tests to run runs the
file's selected tests (and what they depend on) through the same runner and event store;
each test then reports its own result. docs/pytest.md is the user's guide.

This module is loaded by every pytest session of an environment where Baton is
installed: it imports only pytest and the standard library until a flow file is found.
"""

from __future__ import annotations

import os
import re
import signal
import threading
from collections.abc import Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

if TYPE_CHECKING:
    from orchestrator.loader import LoadedFlow
    from orchestrator.results import RunResult, TestResult

FLOW_SUFFIXES = (".yaml", ".yml")
_RUNS = pytest.StashKey[list["RunResult"]]()
_VARS = pytest.StashKey[dict[str, str]]()
_TAGS = pytest.StashKey[set[str]]()
ACTING_MARKERS = frozenset(
    {"skip", "skipif", "xfail", "parametrize", "usefixtures", "filterwarnings"}
    | {"asyncio", "anyio", "timeout", "flaky", "xdist_group"}
)
"""Markers that pytest or a common plugin acts on: a tag with one of these names would
skip its test or change how it runs, so it is a keyword (``-k``) and not a marker."""


@pytest.fixture
def baton_variables() -> Mapping[str, Any]:
    """Variables of every flow run, over the flow's own ``variables``: override it in a
    conftest.py. The first selected test of a file to run decides its run's values."""
    return {}


@pytest.fixture
def baton_secrets() -> Mapping[str, str]:
    """``secrets.NAME`` of every flow run, over the process environment: masked in every
    event and report like the secrets of ``baton run --secrets``."""
    return {}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("baton", "Baton flow files")
    group.addoption(
        "--baton-env",
        dest="baton_env",
        metavar="NAME",
        help="Environment of every flow run: env/NAME.yaml beside the flow, or a file "
        "(as baton run --env).",
    )
    group.addoption(
        "--baton-var",
        dest="baton_vars",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="Set a variable of every flow run, over the baton_variables fixture's "
        "(as baton run --var); repeatable.",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_RUNS] = []
    config.stash[_TAGS] = set()
    config.stash[_VARS] = {}
    pairs: list[str] = config.getoption("baton_vars", None) or []
    if pairs:  # Baton's modules only when asked: every pytest session loads this one
        from orchestrator.errors import UsageError
        from orchestrator.inputs import parse_vars

        try:
            config.stash[_VARS] = parse_vars(pairs, option="--baton-var")
        except UsageError as exc:
            raise pytest.UsageError(str(exc)) from None


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> FlowFile | None:
    if file_path.suffix not in FLOW_SUFFIXES:
        return None
    session = parent.session
    if session.isinitpath(file_path):
        return FlowFile.from_parent(parent, path=file_path)
    if session.isinitpath(file_path.parent) and _looks_like_flow(file_path):
        return FlowFile.from_parent(parent, path=file_path)
    return None


_TOP_LEVEL_KEYS = re.compile(rb"^(name|tests):", re.MULTILINE)


def _looks_like_flow(path: Path) -> bool:
    """A YAML mapping with ``name`` and ``tests``, as a flow file is. One that cannot be
    decoded counts if its top level names both, so that a broken flow beside the others is
    reported instead of passed over, while another project's YAML that Baton cannot read
    (a template, a file over the flow size limit) is left to pytest."""
    from orchestrator.errors import UsageError
    from orchestrator.loader import decode_yaml

    try:
        data = path.read_bytes()
    except OSError:
        return False
    try:
        raw = decode_yaml(data, str(path))
    except UsageError:
        return {m.group(1) for m in _TOP_LEVEL_KEYS.finditer(data)} == {b"name", b"tests"}
    return isinstance(raw, dict) and "tests" in raw and "name" in raw


@dataclass
class _Outcome:
    """What the run of a flow file gave: each test's result, or why it could not run."""

    results: dict[str, TestResult] = field(default_factory=dict)
    run_id: str = ""
    problem: str = ""


class FlowFile(pytest.File):
    """A flow file: its tests are the items; it runs them once, for all of them."""

    loaded: LoadedFlow
    outcome: _Outcome | None = None

    def collect(self) -> Iterator[pytest.Item]:
        from orchestrator.errors import UsageError
        from orchestrator.loader import load_flow

        try:
            self.loaded = load_flow(_shown(self.path))
        except UsageError as exc:
            raise self.CollectError(str(exc)) from None
        if self.loaded.flow.use:
            raise self.CollectError(
                f"{self.loaded.label}: use: shared setups run with baton run only (the "
                "pytest plugin runs each file alone); put the setup's tests in this file"
            )
        lines = _test_lines(self.path)
        for name, test in self.loaded.flow.tests.items():
            item = FlowTest.from_parent(self, name=name, callobj=_flow_test)
            item.line = lines.get(name)
            item.extra_keyword_matches.add(self.loaded.flow.name)
            for tag in test.tags:
                if tag in ACTING_MARKERS:
                    item.extra_keyword_matches.add(tag)
                    continue
                registered = self.config.stash[_TAGS]
                if tag not in registered:
                    # registered as they are met, so that --strict-markers accepts them
                    self.config.addinivalue_line("markers", f"{tag}: a Baton tag")
                    registered.add(tag)
                item.add_marker(tag)
            yield item

    def run(self, variables: Mapping[str, Any], secrets: Mapping[str, Any]) -> _Outcome:
        if self.outcome is None and _split_by_xdist(self.config):
            self.outcome = _Outcome(
                problem=f"{self.loaded.label}: pytest-xdist sends this file's tests to "
                "several workers, and a flow file is one run (pass --dist loadfile)"
            )
        if self.outcome is None:
            selected = [
                item.name
                for item in self.session.items
                if isinstance(item, FlowTest) and item.parent is self
            ]
            self.outcome = _run_flow(self.config, self.loaded, selected, variables, secrets)
        return self.outcome


class FlowTest(pytest.Function):
    """One test of a flow file. Its fixtures are those of ``_flow_test``."""

    result: TestResult | None = None
    line: int | None = None
    """Where the test begins in its file (0-based), as pytest reports a location."""

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, self.line, self.name


def _test_lines(path: Path) -> dict[str, int]:
    """Each test's line in the file, for pytest's locations (the file alone if not found)."""
    import yaml

    try:
        root = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (OSError, UnicodeError, yaml.YAMLError):
        return {}
    for key, value in getattr(root, "value", ()):
        if getattr(key, "value", None) == "tests" and isinstance(value, yaml.MappingNode):
            return {str(name.value): name.start_mark.line for name, _ in value.value}
    return {}


def _flow_test(
    request: pytest.FixtureRequest,
    baton_variables: Mapping[str, Any],
    baton_secrets: Mapping[str, Any],
) -> None:
    item = request.node
    assert isinstance(item, FlowTest) and isinstance(item.parent, FlowFile)
    outcome = item.parent.run(baton_variables, baton_secrets)
    if outcome.problem:
        pytest.fail(outcome.problem, pytrace=False)
    item.user_properties.append(("baton_run_id", outcome.run_id))
    result = outcome.results[item.name]
    item.result = result
    _report(result)


def _report(result: TestResult) -> None:
    """The test's result as pytest's outcome, with Baton's own words."""
    from orchestrator.reporters._format import failure_detail, known_failure_note

    if result.status == "skipped":
        # located at the test in its flow file, not at this line
        raise pytest.skip.Exception(result.message, _use_item_location=True)
    if result.excused:
        pytest.xfail(known_failure_note(result))
    if result.status == "failed":
        pytest.fail("\n".join(failure_detail(result)), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if isinstance(item, FlowTest) and call.when == "call" and item.result is not None:
        result = item.result
        # the test's own time, not the whole run's that its file's first test waited for
        report.duration = result.duration_ms / 1000
        mark = result.known_failure
        if report.passed and result.status == "passed" and mark and not mark.expired:
            from orchestrator.reporters._format import known_failure_note

            # pytest's XPASS, not strict (the run passes, as in baton run): what pytest's
            # skipping plugin sets on a passing test marked xfail
            report.wasxfail = known_failure_note(result)
    return report


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    runs = config.stash.get(_RUNS, [])
    if not runs:
        return
    terminalreporter.write_sep("-", "baton runs (baton show RUN_ID)")
    for run in runs:
        terminalreporter.write_line(f"{run.run_id}  {run.status:<9} {run.file}")


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """pytest-xdist: tell each worker how tests are dealt out (a worker's own ``dist`` is
    always "no")."""
    node.workerinput["baton_dist"] = node.config.getoption("dist")


def _split_by_xdist(config: pytest.Config) -> bool:
    """In a pytest-xdist worker whose tests are dealt out one by one, not file by file."""
    workerinput: dict[str, Any] = getattr(config, "workerinput", {})
    return bool(workerinput.get("baton_dist", "loadfile") != "loadfile")


def _environment_file(name: str, flow_dir: Path) -> Path:
    """``baton run --env``'s file, its problem named after this plugin's option."""
    from dataclasses import replace

    from orchestrator.errors import UsageError
    from orchestrator.inputs import environment_file

    try:
        return environment_file(name, flow_dir)
    except UsageError as exc:
        option = f"--baton-env {name}"
        problems = [replace(problem, file=option) for problem in exc.problems]
        raise UsageError(problems or str(exc).replace(f"--env {name}", option)) from None


def _shown(path: Path) -> Path:
    """The path as the runs record it: relative to the working directory when under it."""
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


def _run_flow(
    config: pytest.Config,
    loaded: LoadedFlow,
    selected: list[str],
    variables: Mapping[str, Any],
    secrets: Mapping[str, Any],
) -> _Outcome:
    """Plan and run the selected tests and what they need; a problem with the flow or its
    variables is the outcome of every test, a problem with the store ends the session."""
    import asyncio

    import networkx as nx

    from events.errors import EventsError
    from events.settings import Settings
    from orchestrator.errors import BatonError, UsageError
    from orchestrator.execution import Job, execute
    from orchestrator.inputs import read_mapping
    from orchestrator.loader import with_services
    from orchestrator.planner import Scope, plan
    from orchestrator.runner import RunInputs

    environ = dict(os.environ)
    given = {name: str(value) for name, value in secrets.items()}
    all_secrets = {**environ, **given}
    environment: str = config.getoption("baton_env") or ""
    try:
        env_vars: dict[str, Any] = {}
        if environment:
            env_file = _environment_file(environment, loaded.base_dir)
            env_vars = read_mapping(env_file, "the environment file")
            if "services" in env_vars:
                loaded = with_services(loaded, env_vars.pop("services"), str(env_file))
        # lowest precedence first, as baton run merges them: the fixture's, then the
        # command line's (--baton-var, as --var has the last word in baton run)
        given_vars: dict[str, str] = config.stash[_VARS]
        merged = {**loaded.flow.variables, **env_vars, **variables, **given_vars}
        full = plan(loaded, Scope(merged, environ, all_secrets))
        needed = set(selected)
        for name in selected:
            needed |= nx.ancestors(full.graph, name)
        # the fixture's secrets are known secrets even where the flow does not name them
        inputs = RunInputs(
            variables=merged,
            env=environ,
            secrets=all_secrets,
            environment=environment,
            hidden=tuple(given.values()),
        )
        job = Job(full.only(needed), [inputs])
        # a loop of its own, not made the thread's current one: asyncio.run would leave
        # none behind for the async tests of the session that come after
        with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
            results = runner.run(_stopped_by_sigterm(execute([job], Settings.from_env())))
    except _Terminated:
        pytest.exit("interrupted by SIGTERM", returncode=128 + signal.SIGTERM)
    except UsageError as exc:
        return _Outcome(problem=str(exc))
    except (BatonError, EventsError) as exc:
        from orchestrator.cli import _failure

        code, message = _failure(exc)
        pytest.exit(f"baton: {message}", returncode=code)
    run = results[0]
    config.stash[_RUNS].append(run)
    return _Outcome({test.name: test for test in run.tests}, run.run_id)


T = TypeVar("T")


class _Terminated(Exception):
    """SIGTERM stopped the run: its tests in flight ended as cancelled."""


async def _stopped_by_sigterm(work: Coroutine[Any, Any, T]) -> T:
    """``work``, cancelled by SIGTERM as asyncio.Runner cancels it on SIGINT: the run in
    flight ends with RunCancelled and its events are stored. Left to its default, SIGTERM
    (CI's timeout, ``docker stop``) kills pytest on the spot and the run stays ``running``
    until another Baton process sweeps it. A second SIGTERM kills as the default does."""
    import asyncio

    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    ours = (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    )
    received = False

    def terminated() -> None:
        nonlocal received
        received = True
        loop.remove_signal_handler(signal.SIGTERM)
        assert task is not None
        task.cancel()

    if ours:
        loop.add_signal_handler(signal.SIGTERM, terminated)
    try:
        return await work
    except asyncio.CancelledError:
        if received:
            raise _Terminated from None
        raise
    finally:
        if ours and not received:
            loop.remove_signal_handler(signal.SIGTERM)
