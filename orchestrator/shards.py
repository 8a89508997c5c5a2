"""A batch's independent units, and the share of them one shard of a CI matrix runs.

A unit is one run: a flow file's weakly connected component of the dependency graph
(tests that share nothing run apart), for one data row. Units are listed in one order on
every machine (by flow path relative to the working directory, then component, then
row), and ``--shard K/N`` takes those whose index ``i`` has ``i % N == K - 1``: round
robin, so shards differ by at most one unit and need no coordination.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import networkx as nx

from events import types as ev
from orchestrator.errors import UsageError
from orchestrator.execution import Job
from orchestrator.planner import Plan
from orchestrator.results import RunResult
from orchestrator.runner import RunInputs


@dataclass(frozen=True)
class Unit:
    """One run of a batch: ``plan`` (a component of a flow's plan) with one row's inputs."""

    key: str
    """``flows/shop.yaml::login`` (the component's first test in plan order), ``[3]`` after
    it for data row 3: the same on every machine the batch runs on."""
    plan: Plan
    inputs: RunInputs

    def in_batch(self, batch_id: str) -> RunInputs:
        """The unit's inputs as a run of the batch: a data row's run says which batch and
        row it is, as a local ``--data`` run's does; a flow's run says neither."""
        if self.inputs.row > 0:
            return dataclasses.replace(self.inputs, batch_id=batch_id)
        return self.inputs


def components(plan: Plan) -> list[Plan]:
    """The plan's weakly connected components, each a plan of its own, ordered by where
    their first test comes in the plan's order."""
    position = {name: index for index, name in enumerate(plan.order)}
    groups = sorted(
        (
            sorted(group, key=position.__getitem__)
            for group in nx.weakly_connected_components(plan.graph)
        ),
        key=lambda names: position[names[0]],
    )
    if len(groups) == 1:
        return [plan]
    return [plan.only(names) for names in groups]


def units(jobs: Sequence[Job], cwd: Path | None = None) -> list[Unit]:
    """Every unit of the jobs ``execution.prepare`` made, in the batch's order; each with
    a run id of its own."""
    base = Path.cwd() if cwd is None else cwd
    found: list[tuple[tuple[str, int, int], Unit]] = []
    for job in jobs:
        path = Path(os.path.relpath(job.plan.loaded.path.absolute(), base)).as_posix()
        for index, component in enumerate(components(job.plan)):
            for inputs in job.runs:
                key = f"{path}::{component.order[0]}" + (
                    f"[{inputs.row}]" if inputs.row > 0 else ""
                )
                run = dataclasses.replace(inputs, run_id=str(ev.new_id()))
                found.append(((path, index, inputs.row), Unit(key, component, run)))
    found.sort(key=lambda item: item[0])
    return [unit for _, unit in found]


_SHARD = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


@dataclass(frozen=True)
class Shard:
    index: int
    """K: 1 to ``count``."""
    count: int
    """N: how many shards the batch is split into."""

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``K/N``; raises UsageError naming the option and what to write."""
        match = _SHARD.fullmatch(text)
        if match:
            index, count = int(match[1]), int(match[2])
            if 1 <= index <= count:
                return cls(index, count)
        raise UsageError(
            f"--shard {text!r}: write K/N with 1 <= K <= N, e.g. --shard 1/3 for the first "
            "of three shards"
        )

    def take(self, batch: Sequence[Unit]) -> list[Unit]:
        return list(batch[self.index - 1 :: self.count])

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass(frozen=True)
class ShardRun:
    """What one process runs of a batch, and what it records of that on the batch's stream."""

    batch_id: str
    shard: Shard
    units: list[Unit]
    total: int
    """How many units the whole batch has."""

    @classmethod
    def of(cls, jobs: Sequence[Job], shard: Shard, batch_id: str) -> ShardRun:
        batch = units(jobs)
        return cls(batch_id, shard, shard.take(batch), len(batch))

    def jobs(self) -> list[Job]:
        """One job per unit (``Unit.in_batch``); the batch's stream says which shard ran it."""
        return [Job(unit.plan, [unit.in_batch(self.batch_id)]) for unit in self.units]

    def started(self) -> ev.ShardStarted:
        return ev.ShardStarted(
            batch_id=self.batch_id,
            shard=self.shard.index,
            shards=self.shard.count,
            runs=[unit.inputs.run_id for unit in self.units],
            units=[unit.key for unit in self.units],
        )

    def completed(self, results: Sequence[RunResult], duration_ms: float) -> ev.ShardCompleted:
        passed = sum(1 for result in results if result.status == "passed")
        return ev.ShardCompleted(
            batch_id=self.batch_id,
            shard=self.shard.index,
            shards=self.shard.count,
            passed=passed,
            failed=len(self.units) - passed,
            duration_ms=round(duration_ms, 3),
        )

    def describe(self) -> str:
        return (
            f"shard {self.shard} of batch {self.batch_id}: {len(self.units)} of {self.total} units"
        )
