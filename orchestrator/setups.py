"""Shared setup: a test of another flow file that flows ``use:``, run once per ``baton run``.

A setup is the used test and what it depends on in its own flow, run as a run of its own
(its events, its RunStarted, its source). Each run of a flow using it starts with its
captures: recorded as reused captures (ciphertext stays ciphertext) under the setup's
label, the setup's run id in RunStarted.setup_runs. A setup that fails skips the tests that
read its captures, with the reason ``setup login.yaml::login failed``.
"""

from __future__ import annotations

import asyncio
import difflib
import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import msgspec
import networkx as nx

from events import types as ev
from orchestrator import templating
from orchestrator.errors import Problem, UsageError
from orchestrator.loader import LoadedFlow, test_parts
from orchestrator.planner import Plan
from orchestrator.results import RunResult
from orchestrator.runner import RunExecution, RunInputs, Runner

Captured = ev.VariableCaptured | ev.AuthTokenUpdated


@dataclass(frozen=True, eq=False)
class Setup:
    label: str
    """``login.yaml::login``: how messages and skip reasons name it."""
    plan: Plan
    """The used test and the tests it depends on in its own flow."""
    inputs: RunInputs
    uses: tuple[Setup, ...]
    """The setups its own flow uses: they run before it."""

    @property
    def captures(self) -> list[str]:
        tests = self.plan.loaded.flow.tests
        return [name for test in self.plan.order for name in tests[test].capture]


def shared_names(setups: Collection[Setup]) -> dict[str, str]:
    """Each name the setups capture -> the label of the setup capturing it."""
    return {name: setup.label for setup in setups for name in setup.captures}


LoadFlow = Callable[[Path], tuple[LoadedFlow, dict[str, Any]]]
"""A flow file -> the flow (with its environment's services) and its environment's values."""
PlanFlow = Callable[[LoadedFlow, dict[str, Any], dict[str, str], Collection[str]], Plan]
"""The plan of a flow, given its environment's values, what its setups capture and the
data rows' columns."""
InputsOf = Callable[[LoadedFlow, dict[str, Any]], RunInputs]


class SetupResolver:
    """Finds the setups flows use, each file loaded and planned once for every flow."""

    def __init__(
        self, load: LoadFlow, plan_flow: PlanFlow, inputs_of: InputsOf, row_names: Collection[str]
    ) -> None:
        self._load = load
        self._plan = plan_flow
        self._inputs_of = inputs_of
        self._row_names = set(row_names)
        self._flows: dict[Path, tuple[LoadedFlow, Plan, RunInputs, tuple[Setup, ...]]] = {}
        self._setups: dict[tuple[Path, str], Setup] = {}
        self._visiting: list[Path] = []

    def uses(self, loaded: LoadedFlow) -> tuple[Setup, ...]:
        """The setups ``loaded`` uses. Raises UsageError naming the file and the place."""
        label = loaded.label
        here = loaded.path.resolve()
        found: list[Setup] = []
        problems: list[Problem] = []
        self._visiting.append(here)
        try:
            for index, use in enumerate(loaded.flow.use):
                where = f"use[{index}]"
                # shown as the user would write it from here; known by its real path
                shown = Path(os.path.normpath(loaded.base_dir / use.flow))
                target = shown.resolve()
                if target == here:
                    problems.append(
                        Problem(
                            label,
                            f"{where}.flow",
                            "a flow cannot use a test of its own file as a shared setup",
                            f"write depends_on: [{use.test}] in the tests that need it",
                        )
                    )
                elif target in self._visiting:
                    chain = [*self._visiting[self._visiting.index(target) :], target]
                    problems.append(
                        Problem(
                            label,
                            f"{where}.flow",
                            "use cycle: " + " -> ".join(path.name for path in chain),
                            "break one of these links",
                        )
                    )
                elif not target.is_file():
                    problems.append(
                        Problem(
                            label,
                            f"{where}.flow",
                            f"no flow file {use.flow} (looked for {target})",
                            "give the used flow's path relative to this file",
                        )
                    )
                else:
                    setup = self._setup(shown, use.test, label, where, problems)
                    if setup is not None:
                        found.append(setup)
        finally:
            self._visiting.pop()
        problems.extend(_overlaps(found, label))
        if problems:
            raise UsageError(problems)
        return tuple(found)

    def _setup(
        self, path: Path, test: str, label: str, where: str, problems: list[Problem]
    ) -> Setup | None:
        known = self._setups.get((path.resolve(), test))
        if known is not None:
            return known
        loaded, full, inputs, uses = self._flow(path)
        if test not in loaded.flow.tests:
            close = difflib.get_close_matches(test, list(loaded.flow.tests), n=1)
            problems.append(
                Problem(
                    label,
                    f"{where}.test",
                    f"{path.name} has no test {test!r}",
                    f"did you mean {close[0]!r}?" if close else "name a test of that file",
                )
            )
            return None
        needed = {test, *nx.ancestors(full.graph, test)}
        setup = Setup(f"{path.name}::{test}", full.only(needed), inputs, uses)
        row_reads = sorted(self._row_reads(setup))
        if row_reads:
            problems.append(
                Problem(
                    label,
                    where,
                    f"the shared setup {setup.label} reads the data-row variable "
                    f"{row_reads[0]!r}, but a setup runs once for the whole batch",
                    "give it the value with variables or --var, or keep that test in this flow",
                )
            )
            return None
        self._setups[(path.resolve(), test)] = setup
        return setup

    def _flow(self, path: Path) -> tuple[LoadedFlow, Plan, RunInputs, tuple[Setup, ...]]:
        known = self._flows.get(path.resolve())
        if known is None:
            loaded, env_vars = self._load(path)
            uses = self.uses(loaded)
            # planned knowing the rows' columns: reading one is refused by name below
            full = self._plan(loaded, env_vars, shared_names(uses), self._row_names)
            known = (loaded, full, self._inputs_of(loaded, env_vars), uses)
            self._flows[path.resolve()] = known
        return known

    def _row_reads(self, setup: Setup) -> set[str]:
        """The data-row columns the setup reads that nothing else of its run defines."""
        defined = set(setup.inputs.variables)
        flow = setup.plan.loaded.flow
        parts = [part for name in setup.plan.order for part in test_parts(flow.tests[name])]
        parts += [("variables", flow.variables), ("base_url", flow.base_url)]
        parts += [("defaults.headers", flow.defaults.headers)]
        return {
            reference.split(".")[0]
            for _, value in parts
            for text in templating.template_strings(value)
            for reference in templating.references(text)
            if reference.split(".")[0] in self._row_names - defined
        }


def _overlaps(setups: list[Setup], label: str) -> list[Problem]:
    problems = []
    seen: dict[str, str] = {}
    for index, setup in enumerate(setups):
        for name in setup.captures:
            other = seen.setdefault(name, setup.label)
            if other != setup.label:
                problems.append(
                    Problem(
                        label,
                        f"use[{index}]",
                        f"{name!r} is captured by both shared setups {other} and {setup.label}",
                        "use one of them, or rename the capture in one",
                    )
                )
    return problems


@dataclass(frozen=True)
class Outcome:
    """A setup's run as the runs using it see it."""

    label: str
    run_id: str
    passed: bool
    shared: Mapping[str, Any]
    """Its captures by dotted name, in clear."""
    recorded: tuple[Captured, ...]
    """Its capture events, under the setup's label; secrets as ciphertext."""
    hidden: tuple[str, ...]
    """Its secret captures in clear: what the using runs mask."""


def with_outcomes(inputs: RunInputs, outcomes: Collection[Outcome]) -> RunInputs:
    """``inputs`` starting with what the setups captured."""
    if not outcomes:
        return inputs
    shared: dict[str, Any] = {}
    for outcome in outcomes:
        shared.update(outcome.shared)
    return replace(
        inputs,
        shared={**inputs.shared, **shared},
        reused=(*inputs.reused, *(event for o in outcomes for event in o.recorded)),
        hidden=(*inputs.hidden, *(text for o in outcomes for text in o.hidden)),
        failed_setups=inputs.failed_setups | {o.label for o in outcomes if not o.passed},
        setup_runs=(*inputs.setup_runs, *(o.run_id for o in outcomes)),
    )


class SetupRuns:
    """Each setup of one invocation run once, when the first run needing it asks."""

    def __init__(self, runner: Runner) -> None:
        self._runner = runner
        self._tasks: dict[int, asyncio.Task[Outcome]] = {}
        self._results: dict[int, RunResult] = {}

    def results(self) -> list[RunResult]:
        """The setups' runs that ended, each once, in the order they ended (a setup after
        those it uses): what the reports list besides the runs using them."""
        return list(self._results.values())

    async def inputs(self, inputs: RunInputs, setups: Collection[Setup]) -> RunInputs:
        outcomes = await asyncio.gather(*(self.outcome(setup) for setup in setups))
        return with_outcomes(inputs, outcomes)

    def outcome(self, setup: Setup) -> asyncio.Task[Outcome]:
        task = self._tasks.get(id(setup))
        if task is None:
            task = asyncio.ensure_future(self._run(setup))
            self._tasks[id(setup)] = task
        return task

    async def _run(self, setup: Setup) -> Outcome:
        inputs = await self.inputs(setup.inputs, setup.uses)
        execution = _SetupExecution(self._runner, setup.plan, inputs)
        result = msgspec.structs.replace(await execution.execute(), setup=setup.label)
        self._results[id(setup)] = result
        shared = {event.name: _lookup(execution.namespace, event.name) for event in execution.own}
        recorded = tuple(
            msgspec.structs.replace(event, test=setup.label) for event in execution.own
        )
        hidden = tuple(
            self._runner.cipher.decrypt(event.value)
            for event in execution.own
            if isinstance(event, ev.AuthTokenUpdated) or event.secret
        )
        return Outcome(
            setup.label, inputs.run_id, result.status == "passed", shared, recorded, hidden
        )


class _SetupExecution(RunExecution):
    """A setup's run, keeping the capture events of its own tests for the runs using it."""

    def __init__(self, runner: Runner, plan: Plan, inputs: RunInputs) -> None:
        super().__init__(runner, plan, inputs)
        self.own: list[Captured] = []

    def emit(self, event: ev.Event, at: int | None = None) -> None:
        super().emit(event, at)
        reused = any(event is earlier for earlier in self.inputs.reused)
        if isinstance(event, Captured) and not reused:
            self.own.append(event)


def _lookup(namespace: Mapping[str, Any], dotted: str) -> Any:
    value: Any = namespace
    for part in dotted.split("."):
        value = value[part]
    return value
