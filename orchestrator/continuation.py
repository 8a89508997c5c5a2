"""``baton rerun``: the jobs that continue a recorded run, or the failed rows of a batch.

The run's log says which flow file it ran (RunStarted.source), with which environment and
tags; a batch's says its data file (BatchStarted.data). The flow is read again as it is
now (a fixed assertion counts), and ``orchestrator.rerun`` decides what runs again.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

from events import types as ev
from events.secrets import Cipher
from events.store import EventStore
from orchestrator.errors import UsageError
from orchestrator.execution import Job, Options, prepare
from orchestrator.planner import Plan
from orchestrator.rerun import (
    Prior,
    RerunPlan,
    Selection,
    capture_ttls,
    first_made,
    read_prior,
    reused_namespace,
    select,
)
from orchestrator.runner import RunInputs


@dataclass(frozen=True)
class Continuation:
    jobs: list[Job]
    notes: list[str] = field(default_factory=list)
    """What the command says before the runs begin, besides what runs again."""


async def rerun_jobs(
    store: EventStore,
    cipher: Cipher,
    target: str,
    selection: Selection,
    options: Options,
    *,
    flow: Path | None,
    now: datetime,
) -> Continuation:
    """The job that reruns run ``target``. ``options``: what the command line gives
    (its environment, tags and data file stand in for the recorded ones)."""
    events = await store.read_stream(ev.run_stream(target))
    if not events:
        if await store.read_stream(ev.batch_stream(target)):
            raise UsageError(f"{target} is a batch: rerun the rows that failed with --failed-rows")
        raise UsageError(f"no run {target!r} in the event store (see `baton runs`)")
    started = _started(events, target)
    prior = await _ended(store, events, target)
    job, inputs = await run_again(store, options, flow, started)
    chosen = _selected(job.plan, prior, selection, now, f"run {target}")
    if not chosen.tests:
        raise UsageError(f"every test of run {target} passed: there is nothing to rerun")
    inputs = _continuing(inputs, chosen, cipher, target, prior)
    # a shared setup whose captures the log holds is reused like any test's; one that
    # failed (nothing captured) runs again first
    again = tuple(
        setup
        for setup in job.setups
        if not any(event.test == setup.label for event in inputs.reused)
    )
    rerun = Job(job.plan.only(chosen.tests), [inputs], setups=again)
    return Continuation([rerun], _expired_notes(chosen, f"run {target}"))


async def run_again(
    store: EventStore, options: Options, flow: Path | None, started: ev.RunStarted
) -> tuple[Job, RunInputs]:
    """The flow of a recorded run as it is now, and the inputs of one run like it: a
    batch row's read from its row of the data file."""
    data = options.data_file
    if data is None and started.batch_id:
        data = await _data_of(store, started.batch_id)
    job = prepared(options, flow_path(flow, started.source, f"run {started.run_id}"), started, data)
    inputs = job.runs[_row_index(job, started, started.run_id)] if data is not None else job.runs[0]
    return job, replace(inputs, batch_id="", row=-1)


async def failed_rows_jobs(
    store: EventStore,
    cipher: Cipher,
    target: str,
    options: Options,
    *,
    flow: Path | None,
    now: datetime,
) -> Continuation:
    """One job, a new batch that continues batch ``target``: a run for each row whose run
    did not pass, each running again its failed tests and what they made skip."""
    recorded = await store.read_stream(ev.batch_stream(target))
    began = next((r.event for r in recorded if isinstance(r.event, ev.BatchStarted)), None)
    if began is None:
        if any(isinstance(r.event, ev.ShardStarted) for r in recorded):
            raise UsageError(
                f"batch {target} ran in shards (--shard K/N), and --failed-rows reruns a "
                "batch of baton run --data: run the failed shard again with the same "
                f"--shard K/N --batch {target}, or a failed run with baton rerun RUN_ID --failed"
            )
        if events := await store.read_stream(ev.run_stream(target)):
            batch = _started(events, target).batch_id
            hint = f"baton rerun {batch} --failed-rows (its batch), or " if batch else ""
            raise UsageError(
                f"--failed-rows is for a batch, and {target} is a run: "
                f"use {hint}--failed or --from TEST"
            )
        raise UsageError(f"no batch {target!r} in the event store (see `baton runs`)")
    data = options.data_file or await _data_of(store, target)
    path = flow_path(flow, began.source, f"batch {target}")
    runs: list[RunInputs] = []
    plans: list[Plan] = []
    notes: list[str] = []
    job: Job | None = None
    for run_id in began.runs:
        events = await store.read_stream(ev.run_stream(run_id))
        if not events:
            continue  # never started (the batch was interrupted): not a failed row
        started = _started(events, run_id)
        prior = await _ended(store, events, run_id)
        if prior.context.status == "passed":
            continue
        if job is None:
            job = prepared(options, path, started, data)
        chosen = _selected(job.plan, prior, Selection(failed=True), now, f"run {run_id}")
        if not chosen.tests:
            continue
        inputs = job.runs[_row_index(job, started, run_id)]
        inputs = replace(inputs, batch_id=job.batch_id, row=started.row)
        runs.append(_continuing(inputs, chosen, cipher, run_id, prior))
        plans.append(job.plan.only(chosen.tests))
        notes += _expired_notes(chosen, f"run {run_id}")
    if job is None or not runs:
        raise UsageError(f"every row of batch {target} passed: there is nothing to rerun")
    return Continuation([replace(job, runs=runs, continues=target, row_plans=tuple(plans))], notes)


def _started(events: list[ev.RecordedEvent], run_id: str) -> ev.RunStarted:
    first = events[0].event
    if not isinstance(first, ev.RunStarted):
        raise UsageError(f"run {run_id}: its log does not begin with RunStarted; it cannot rerun")
    return first


async def _ended(store: EventStore, events: list[ev.RecordedEvent], run_id: str) -> Prior:
    prior = await read_prior(store, events)
    if prior.context.status == "running":
        raise UsageError(f"run {run_id} has not ended: wait for it to end, then rerun it")
    return prior


def flow_path(flow: Path | None, source: str, what: str) -> Path:
    if flow is not None:
        return flow
    if not source:
        raise UsageError(f"{what} recorded no flow file: give it with --flow PATH")
    path = Path(source)
    if not path.exists():
        raise UsageError(
            f"{source}: the flow file of {what} is not there; run baton rerun in the "
            "directory the run was started in, or give --flow PATH"
        )
    return path


async def _data_of(store: EventStore, batch_id: str) -> Path:
    recorded = await store.read_stream(ev.batch_stream(batch_id))
    began = next((r.event for r in recorded if isinstance(r.event, ev.BatchStarted)), None)
    if began is None or not began.data:
        raise UsageError(f"batch {batch_id} recorded no data file: give it with --data FILE")
    return Path(began.data)


def prepared(options: Options, path: Path, started: ev.RunStarted, data: Path | None) -> Job:
    """The flow as it is now, with the recorded environment and tags unless given again."""
    given = replace(
        options,
        paths=[path],
        environment=options.environment or started.environment or None,
        tags=options.tags or tuple(started.tags),
        data_file=data,
    )
    jobs = prepare(given)
    if len(jobs) != 1:
        raise UsageError(f"{path}: give one flow file to rerun, not a directory")
    return jobs[0]


def _row_index(job: Job, started: ev.RunStarted, run_id: str) -> int:
    if not 1 <= started.row <= len(job.runs):
        raise UsageError(
            f"run {run_id} was row {started.row} of its batch, and {job.data} has "
            f"{len(job.runs)} rows now: give the data file it ran with (--data FILE)"
        )
    return started.row - 1


def _selected(
    plan: Plan, prior: Prior, selection: Selection, now: datetime, what: str
) -> RerunPlan:
    if selection.start is not None and selection.start not in plan.order:
        tests = ", ".join(plan.order)
        raise UsageError(
            f"--from {selection.start}: {plan.loaded.label} has no test of that name "
            f"(selected for {what}: {tests})"
        )
    ttls = capture_ttls(plan.loaded.flow, plan.order)
    return select(plan.order, plan.graph, prior, selection, ttls=ttls, now=now)


def _expired_notes(chosen: RerunPlan, what: str) -> list[str]:
    note = "runs again: a capture it made outlived its ttl"
    return [f"{test} of {what} {note}" for test in chosen.expired]


def _continuing(
    inputs: RunInputs, chosen: RerunPlan, cipher: Cipher, run_id: str, prior: Prior
) -> RunInputs:
    namespace, hidden = reused_namespace(chosen.reused, cipher)
    return replace(
        inputs,
        reused_at=first_made(chosen, prior),
        variables={**inputs.variables, **namespace},
        hidden=(*inputs.hidden, *hidden),
        reused=tuple(chosen.reused),
        continues=run_id,
    )
