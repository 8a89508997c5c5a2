"""Findings about a test's history, recorded as events when a run completes.

Flaky tests and performance degradation (DESIGN.md, "Analytics and retention"; seed 002).
For every run whose RunCompleted is in a page, once the page's read tables are written, each
test the run executed is judged on test_run_history as it stood at that RunCompleted: the
executions of the same test case in the same environment that were decided at or before its
log position. A finding is recorded when the run's execution crosses a rule (below), so a
test is reported once, when it crosses the line, not on every run after. Only logged facts
enter (positions, recorded times, never the clock), so a rebuild, or pages that begin
elsewhere, decide the same.

The rules (the constants below; docs/analytics.md gives them with the why):

- ``failure_rate`` (seed 002): failed executions / executions over the 7 days up to the
  execution judged, above 10% by more than 1.5 standard errors (the Wilson interval's lower
  end), with at least 30 executions spanning at least 3 days, and not all of them failed
  (a test that always fails is broken, not flaky).
- ``flip_rate``: status changes between consecutive executions / (n - 1) over the last 100
  executions of those 7 days, at least 0.2 by more than 1.5 standard errors, with the same
  minimums.
- ``performance_degradation``: see ``slowdown``: the newest two batches against a baseline
  of the 30 days before them, with a gap, by median, 20%, 10 ms and 3 robust standard
  deviations of the baseline's batches.

A flaky rule is crossed at an execution when it holds on the test's history up to and
with it and, at the test's executions of the 30 days before (``MEMORY``), it never held or
was shown clear after it last held: the test was judged on at least 30 executions over 3
days and the Wilson interval's upper end was under the line (``MARGIN`` standard errors
up), so the test was shown not to be flaky at that rate. A rate that hovers about its line
(15% failing reads 10 to 20% from week to week) is one finding however long it hovers
under the line by chance, and a test that recovered (passed for a week) and turns flaky
again is a second one. The slowdown rule is crossed when it holds and held at none of the
test's passed executions of the 7 days before (``QUIET``): a slowdown that is over ends
when the slow batches leave the recent window, so its quiet week starts at a recovery.

An execution is a test that passed or failed: a skipped test (for a failed dependency or
any other reason) sent nothing, and counts as neither a failure nor a flip.

The ``Detector`` does this behind the read-model projector, with a checkpoint of its own
(``findings``) that never passes the projector's: the history it reads is written up to
there. It is not part of the projector because judging history costs time that grows with
it (each window is read per test and run), and ``baton run``, which waits for the read
tables, must not wait for that: measured on 500 runs of a 6-test flow, detection in the
projector's pages took ``baton run`` from 5.6 to 10.2 s. ``baton serve`` runs the Detector
after each catch-up of its projector; ``baton projections rebuild`` runs it after the
rebuild.

Findings go to the stream ``analytics-<project id>`` in the Detector's page transaction,
together with its checkpoint, with ids derived from (run, test case, rule): a page judged
again, a rebuild or a second Detector re-sends the same ids, and the store answers a re-sent
id with its original position. That append cannot deadlock with the appends of runs:
baton_append takes the store's commit-order lock (a transaction-scoped advisory lock) before
anything else and keeps it until commit, so an ordinary append holds nothing while it waits
for it, and once it has it waits for nothing a Detector holds (it touches only events and
baton_streams, which no one writes without the lock). The Detector's page holds only its
checkpoint row when it asks for the lock, and after getting it only advances that
checkpoint and commits. The cost: appends wait for that commit on a page that finds
something.
"""

from __future__ import annotations

import math
import statistics
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from fractions import Fraction

import asyncpg
import msgspec

from events.postgres import PostgresEventStore, driver_errors
from events.projections.catalog import derive
from events.projections.page import RUN_PREFIX
from events.projections.projector import ADVANCE, DEFAULT_NAME, lock_checkpoint
from events.store import NewEvent, StreamAppend
from events.types import (
    Finding,
    FlakyRule,
    FlakyTestDetected,
    PerformanceDegraded,
    RunCompleted,
    analytics_stream,
)

FINDINGS = "findings"
"""The Detector's checkpoint."""
MIN_SAMPLES = 30
"""Executions a flaky rule needs before it may hold: 1 failure in 5 runs is not news."""
MIN_DAYS = 3
"""UTC days a flaky rule's window spans (first to last): one batch, or one bad hour, is no
history."""
FAILURE_RATE_WINDOW = timedelta(days=7)
FAILURE_RATE_ABOVE = Fraction(1, 10)
FLIP_WINDOW = 100
"""The last executions (of the failure rate's 7 days) the flip rate looks at."""
FLIP_RATE_AT_LEAST = Fraction(1, 5)
MARGIN = 1.5
"""Standard errors a flaky rate must clear its line by (bench/FINDINGS.md: at 1.0, a test
failing 5% of the time was reported in 3 of 15 histories)."""
MEMORY = timedelta(days=30)
"""How far back a flaky rule looks for the last time it held, and for a recovery after it:
a test that hovers about its line for a month without once being shown clear is reported
again then, a reminder, rather than the detector reading the whole history of every test
it judges."""
QUIET = timedelta(days=7)
"""The slowdown rule is crossed when it holds and held at none of the test's passed
executions of this long before: a slowdown that lasts is one finding, not one a batch."""
RECENT_WINDOW = timedelta(days=7)
"""How far back the slowdown rule looks for its recent batches."""
MIN_RECENT_RUNS = 5
BASELINE_WINDOW = timedelta(days=30)
BASELINE_GAP = timedelta(hours=1)
"""The baseline ends this long before the recent window's oldest execution, so runs started
together (a batch, or runs that were not given one) never judge each other."""
MIN_BASELINE_RUNS = 10
MIN_BASELINE_DAYS = 3
"""Distinct UTC days with passed executions in the baseline: a test's first days, or one
busy day, are no baseline."""
MIN_BASELINE_SPAN = 7
"""UTC days the baseline spans (its oldest execution's to its newest's, both counted): the
batch-to-batch spread a slowdown must clear is measured on the baseline's batches, and a
few days' batches (4 to 6) understate it as often as not (a noisy test read 1.2x slower
on its third day); a week also holds each weekday once, whatever load follows the week."""
SLOWDOWN_ABOVE = Fraction(6, 5)
"""The recent median must exceed the baseline median times this (20% slower)..."""
SLOWER_BY_AT_LEAST_MS = 10.0
"""...and by at least this much: 2 ms to 3 ms is noise, not a slowdown."""
MIN_RECENT_BATCHES = 2
MIN_BATCH_RUNS = 3
"""The recent window's batches (of at least this many runs) that must each be slower."""
SPREADS = 3
"""...each by more than this many robust standard deviations (1.4826 x the median absolute
deviation) of the baseline's batch medians: where batches vary by 12%, two batches 25%
over are the variation, not a slowdown."""

# A history row h that is an execution, decided at or before the RunCompleted of key k. A
# row written before schema step 7 has no position: it is older than any run judged since.
_EXECUTED_BY_THEN = """
    h.status IN ('passed', 'failed') AND h.category IS DISTINCT FROM 'dependency_skipped'
    AND coalesce(h.position, 0) <= k.position
"""
# The tests each completed run executed, with what a finding names.
_EXECUTED = f"""
SELECT r.id AS run_id, r.project_id, h.test_case_id, h.environment_id, h.status,
       s.name AS suite, c.name AS test, e.name AS environment, k.position, k.completed_at
FROM unnest($1::text[], $2::bigint[], $3::timestamptz[]) AS k(stream, position, completed_at)
JOIN test_runs r ON r.stream = k.stream
JOIN test_run_history h ON h.run_id = r.id
JOIN test_cases c ON c.id = h.test_case_id
JOIN test_suites s ON s.id = c.suite_id
JOIN environments e ON e.id = h.environment_id
WHERE {_EXECUTED_BY_THEN}
"""


# The executions of some tests, as the flaky rules read them, in log order. $1, $2: test
# case and environment ids; $3: the oldest time any key of the page looks back to; $4: the
# newest position any key of the page is judged at.
_EXECUTED_HISTORY = f"""
SELECT h.test_case_id, h.environment_id, h.run_id, h.status, h.executed_at
FROM unnest($1::uuid[], $2::uuid[]) AS k(test_case_id, environment_id)
JOIN test_run_history h
  ON h.test_case_id = k.test_case_id AND h.environment_id = k.environment_id
WHERE {_EXECUTED_BY_THEN.replace("k.position", "$4")} AND h.executed_at >= $3
ORDER BY h.test_case_id, h.environment_id, coalesce(h.position, 0), h.executed_at, h.run_id
"""


# The passed executions of some tests, as the slowdown rule reads them: in log order, with
# the batch of their run. $1, $2: test case and environment ids; $3: the oldest time any
# key of the page can look back to; $4: the newest position any key of the page is judged at.
_PASSED_HISTORY = """
SELECT h.test_case_id, h.environment_id, h.run_id, h.duration_ms, h.executed_at,
       coalesce(h.position, 0) AS position, r.batch_id
FROM unnest($1::uuid[], $2::uuid[]) AS k(test_case_id, environment_id)
JOIN test_run_history h
  ON h.test_case_id = k.test_case_id AND h.environment_id = k.environment_id
LEFT JOIN test_runs r ON r.id = h.run_id
WHERE h.status = 'passed' AND h.duration_ms IS NOT NULL
  AND h.executed_at >= $3 AND coalesce(h.position, 0) <= $4
ORDER BY h.test_case_id, h.environment_id, coalesce(h.position, 0), h.executed_at, h.run_id
"""


class Execution(msgspec.Struct, frozen=True):
    """One test a completed run executed, and where the run sits in the log."""

    run_id: uuid.UUID
    project_id: uuid.UUID
    test_case_id: uuid.UUID
    environment_id: uuid.UUID
    status: str
    suite: str
    test: str
    environment: str
    position: int
    """The run's RunCompleted."""
    completed_at: datetime

    @property
    def key(self) -> tuple[uuid.UUID, uuid.UUID]:
        return (self.run_id, self.test_case_id)


# ---- the rules: pure functions of the numbers ---------------------------------------------


def lower_bound(successes: int, trials: int) -> float:
    """The Wilson score interval's lower end, ``MARGIN`` standard errors down: a rate
    observed on a few dozen executions is not taken for more than it shows."""
    z = MARGIN
    p = successes / trials
    centre = p + z * z / (2 * trials)
    margin = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return (centre - margin) / (1 + z * z / trials)


def failure_rate_holds(samples: int, failures: int, days: int) -> bool:
    return (
        samples >= MIN_SAMPLES
        and days >= MIN_DAYS
        and failures < samples
        and lower_bound(failures, samples) > FAILURE_RATE_ABOVE
    )


def flip_rate_holds(samples: int, flips: int, days: int) -> bool:
    return (
        samples >= MIN_SAMPLES
        and days >= MIN_DAYS
        and lower_bound(flips, samples - 1) >= FLIP_RATE_AT_LEAST
    )


def upper_bound(successes: int, trials: int) -> float:
    """The Wilson score interval's upper end, ``MARGIN`` standard errors up."""
    return 1 - lower_bound(trials - successes, trials)


def failure_rate_clear(samples: int, failures: int, days: int) -> bool:
    """Shown not to fail more than the line, on as much history as holding takes."""
    return (
        samples >= MIN_SAMPLES
        and days >= MIN_DAYS
        and upper_bound(failures, samples) <= FAILURE_RATE_ABOVE
    )


def flip_rate_clear(samples: int, flips: int, days: int) -> bool:
    return (
        samples >= MIN_SAMPLES
        and days >= MIN_DAYS
        and upper_bound(flips, samples - 1) < FLIP_RATE_AT_LEAST
    )


class Executed(msgspec.Struct, frozen=True):
    """An execution as the flaky rules read it."""

    run_id: uuid.UUID
    status: str
    executed_at: datetime


class FlakyState(msgspec.Struct, frozen=True):
    """Both flaky rules' numbers as of one execution, and whether each was crossed there."""

    samples: int
    failures: int
    flip_samples: int
    flips: int
    failure_rate_crossed: bool
    flip_rate_crossed: bool


def flaky_states(history: Sequence[Executed]) -> list[FlakyState]:
    """The flaky rules as of each of ``history`` (a test's executions in log order): the
    window of each is the executions of the 7 days up to it (the flip rate: the last 100 of
    them). A rule is crossed where it holds and, over the ``MEMORY`` before, it never held
    or was clear after it last held. Prefix sums keep it linear in the history."""
    failed = [0]
    changed = [0]
    for i, e in enumerate(history):
        failed.append(failed[-1] + (e.status == "failed"))
        flip = i > 0 and e.status != history[i - 1].status
        changed.append(changed[-1] + flip)
    states: list[FlakyState] = []
    # per rule, the newest execution before the one judged where it held (-1: none), and
    # the oldest execution of the window of the newest where it was clear (-1: none)
    last_held = {"failure_rate": -1, "flip_rate": -1}
    clear_since = {"failure_rate": -1, "flip_rate": -1}
    start = 0  # the oldest execution of the window (log order; times follow it)
    remembered = 0  # the oldest execution of the MEMORY before the one judged
    for i, e in enumerate(history):
        while history[start].executed_at <= e.executed_at - FAILURE_RATE_WINDOW:
            start += 1
        while history[remembered].executed_at <= e.executed_at - MEMORY:
            remembered += 1
        days = (e.executed_at.date() - history[start].executed_at.date()).days + 1
        samples, failures = i + 1 - start, failed[i + 1] - failed[start]
        flip_start = max(start, i + 1 - FLIP_WINDOW)
        flip_samples, flips = i + 1 - flip_start, changed[i + 1] - changed[flip_start + 1]
        holds = {
            "failure_rate": failure_rate_holds(samples, failures, days),
            "flip_rate": flip_rate_holds(flip_samples, flips, days),
        }
        clear = {
            "failure_rate": failure_rate_clear(samples, failures, days),
            "flip_rate": flip_rate_clear(flip_samples, flips, days),
        }
        crossed = {
            rule: now and (last_held[rule] < remembered or clear_since[rule] > last_held[rule])
            for rule, now in holds.items()
        }
        window_start = {"failure_rate": start, "flip_rate": flip_start}
        for rule in holds:
            if holds[rule]:
                last_held[rule] = i
            if clear[rule]:
                clear_since[rule] = window_start[rule]
        states.append(FlakyState(samples, failures, flip_samples, flips,
                                 crossed["failure_rate"], crossed["flip_rate"]))  # fmt: skip
    return states


class Passed(msgspec.Struct, frozen=True):
    """A passed execution as the slowdown rule reads it."""

    run_id: uuid.UUID
    duration_ms: float
    executed_at: datetime
    position: int
    batch_id: uuid.UUID | None


class Slowdown(msgspec.Struct, frozen=True):
    recent_median_ms: float
    baseline_median_ms: float
    recent_runs: int
    baseline_runs: int


def slowdown(history: Sequence[Passed]) -> Slowdown | None:
    """The slowdown the last of ``history`` (passed executions in log order) shows, if any.

    Recent: the executions of the newest 2 batches of at least 3 runs (and of the batch
    under way), within 7 days, at least 5 runs; its level is their median.
    Baseline: the 30 days before the recent window, ending an hour before its oldest
    execution and leaving out every batch the recent window holds, with at least 10 runs on
    at least 3 distinct days spanning at least 7; its level is the median of the daily
    medians, so a busy day weighs no more than a quiet one. The recent level must be 20%
    and 10 ms over the baseline's, and so must the median of each of the recent window's
    batches of at least 3 runs, of which there must be 2: the runs of a batch share the
    machine's and the API's moment, so one slow batch is one sample, not a slowdown.
    """
    if not history:
        return None
    now = history[-1].executed_at
    recent = _recent(history)
    if len(recent) < MIN_RECENT_RUNS:
        return None
    recent_batches = {p.batch_id for p in recent if p.batch_id is not None}
    baseline_end = min(p.executed_at for p in recent) - BASELINE_GAP
    baseline = [
        p
        for p in history
        if now - BASELINE_WINDOW <= p.executed_at < baseline_end
        and (p.batch_id is None or p.batch_id not in recent_batches)
    ]
    days = _medians(baseline, lambda p: p.executed_at.date(), 1)
    if len(baseline) < MIN_BASELINE_RUNS or len(days) < MIN_BASELINE_DAYS:
        return None
    first, last = min(p.executed_at for p in baseline), max(p.executed_at for p in baseline)
    if (last.date() - first.date()).days + 1 < MIN_BASELINE_SPAN:
        return None
    baseline_level = statistics.median(days)
    if baseline_level <= 0:
        return None  # no slowdown can be a ratio of it
    level = statistics.median(p.duration_ms for p in recent)
    batches = _medians(recent, _batch, MIN_BATCH_RUNS)
    usual = _medians(baseline, _batch, MIN_BATCH_RUNS)
    centre = statistics.median(usual) if usual else baseline_level
    spread = 1.4826 * statistics.median(abs(m - centre) for m in usual) if usual else 0.0
    if len(batches) >= MIN_RECENT_BATCHES and all(
        _slower(median, baseline_level) and median - baseline_level > SPREADS * spread
        for median in [level, *batches]
    ):
        return Slowdown(level, baseline_level, len(recent), len(baseline))
    return None


def _recent(history: Sequence[Passed]) -> list[Passed]:
    """The newest batches of ``history``, back to the ``MIN_RECENT_BATCHES``-th with at
    least ``MIN_BATCH_RUNS`` runs (the newest, still running, may have fewer)."""
    groups: dict[object, int] = {}
    full = 0
    since = history[-1].executed_at - RECENT_WINDOW
    for i in range(len(history) - 1, -1, -1):
        group = _batch(history[i])
        if history[i].executed_at <= since or (group not in groups and full >= MIN_RECENT_BATCHES):
            return list(history[i + 1 :])
        groups[group] = groups.get(group, 0) + 1
        if groups[group] == MIN_BATCH_RUNS:
            full += 1
    return list(history)


def _slower(level: float, baseline: float) -> bool:
    return (
        Fraction(level) > SLOWDOWN_ABOVE * Fraction(baseline)
        and level - baseline >= SLOWER_BY_AT_LEAST_MS
    )


def _slow_before(history: Sequence[Passed], mine: int) -> bool:
    """Whether the slowdown held at any of the test's passed executions of the ``QUIET``
    before ``history[mine]``: the newest first, as a test that stays slow held just now."""
    since = history[mine].executed_at - QUIET
    for i in range(mine - 1, -1, -1):
        if history[i].executed_at <= since:
            return False
        if slowdown(history[: i + 1]) is not None:
            return True
    return False


def _batch(passed: Passed) -> object:
    """The batch of a run, or for a run outside one, the UTC hour it was decided in."""
    if passed.batch_id is not None:
        return passed.batch_id
    return passed.executed_at.replace(minute=0, second=0, microsecond=0)


def _medians(
    passed: Sequence[Passed], group: Callable[[Passed], object], at_least: int
) -> list[float]:
    """The median duration of each group of ``passed`` with ``at_least`` executions."""
    groups: dict[object, list[float]] = {}
    for p in passed:
        groups.setdefault(group(p), []).append(p.duration_ms)
    return [statistics.median(d) for d in groups.values() if len(d) >= at_least]


# ---- from the page to the findings --------------------------------------------------------

Found = tuple[tuple[int, str, str], str, NewEvent]
"""(the run's position, test, rule: the order they are appended in), the stream, and the
event with its id derived from (run, test case, rule)."""


Completion = tuple[str, int, datetime]
"""A run's RunCompleted: its stream, log position and recorded time."""


async def record_findings(
    store: PostgresEventStore, conn: asyncpg.Connection, completed: Sequence[Completion]
) -> None:
    """Judge the tests of the runs that ``completed`` and append what crossed a line, in
    ``conn``'s transaction (the Detector's)."""
    if not completed:
        return
    rows = await conn.fetch(_EXECUTED, *(list(column) for column in zip(*completed, strict=True)))
    executions = [Execution(**dict(row)) for row in rows]
    if not executions:
        return
    findings = await _flaky(conn, executions)
    findings += await _slowdowns(conn, [e for e in executions if e.status == "passed"])
    findings.sort(key=lambda found: found[0])
    # one append per finding: baton_append refuses an append that mixes ids it holds with
    # new ones, and a rebuild after a change of rules could find a new one beside old ones
    await store.append_in_transaction(
        conn, [StreamAppend(stream, [event]) for _, stream, event in findings]
    )


def _finding(execution: Execution, rule: str, event: Finding) -> Found:
    event_id = derive("finding", execution.run_id, execution.test_case_id, rule)
    return (
        (execution.position, execution.test, rule),
        analytics_stream(execution.project_id),
        NewEvent(event, id=event_id),
    )


async def _flaky(conn: asyncpg.Connection, executions: Sequence[Execution]) -> list[Found]:
    tests = sorted({(e.test_case_id, e.environment_id) for e in executions})
    oldest = min(e.completed_at for e in executions) - FAILURE_RATE_WINDOW - MEMORY
    rows = await conn.fetch(
        _EXECUTED_HISTORY,
        [t for t, _ in tests],
        [env for _, env in tests],
        oldest,
        max(e.position for e in executions),
    )
    histories: dict[tuple[uuid.UUID, uuid.UUID], list[Executed]] = {}
    for row in rows:
        history = histories.setdefault((row["test_case_id"], row["environment_id"]), [])
        history.append(Executed(row["run_id"], row["status"], row["executed_at"]))
    states = {test: flaky_states(history) for test, history in histories.items()}
    findings = []
    for execution in executions:
        history = histories.get((execution.test_case_id, execution.environment_id), [])
        mine = next((i for i, e in enumerate(history) if e.run_id == execution.run_id), None)
        if mine is None:
            continue
        state = states[(execution.test_case_id, execution.environment_id)][mine]
        if state.failure_rate_crossed:
            event = _flaky_event(
                execution,
                "failure_rate",
                rate=Fraction(state.failures, state.samples),
                threshold=FAILURE_RATE_ABOVE,
                samples=state.samples,
                window=f"{FAILURE_RATE_WINDOW.days} days",
                failures=state.failures,
            )
            findings.append(_finding(execution, "failure_rate", event))
        if state.flip_rate_crossed:
            event = _flaky_event(
                execution,
                "flip_rate",
                rate=Fraction(state.flips, state.flip_samples - 1),
                threshold=FLIP_RATE_AT_LEAST,
                samples=state.flip_samples,
                window=f"last {FLIP_WINDOW} executions",
                flips=state.flips,
            )
            findings.append(_finding(execution, "flip_rate", event))
    return findings


def _flaky_event(
    execution: Execution,
    rule: FlakyRule,
    *,
    rate: Fraction,
    threshold: Fraction,
    samples: int,
    window: str,
    failures: int = 0,
    flips: int = 0,
) -> FlakyTestDetected:
    return FlakyTestDetected(
        run_id=str(execution.run_id),
        suite=execution.suite,
        test=execution.test,
        test_case_id=str(execution.test_case_id),
        environment=execution.environment,
        environment_id=str(execution.environment_id),
        rule=rule,
        rate=round(float(rate), 4),
        threshold=float(threshold),
        samples=samples,
        window=window,
        failures=failures,
        flips=flips,
    )


async def _slowdowns(conn: asyncpg.Connection, passed: Sequence[Execution]) -> list[Found]:
    """A slowdown crossed by each run's execution: the rule holds on the history up to
    and with it, and did not on the history up to the test's previous passed execution."""
    if not passed:
        return []
    tests = sorted({(e.test_case_id, e.environment_id) for e in passed})
    oldest = min(e.completed_at for e in passed) - BASELINE_WINDOW - RECENT_WINDOW - QUIET
    rows = await conn.fetch(
        _PASSED_HISTORY,
        [t for t, _ in tests],
        [env for _, env in tests],
        oldest,
        max(e.position for e in passed),
    )
    histories: dict[tuple[uuid.UUID, uuid.UUID], list[Passed]] = {}
    for row in rows:
        history = histories.setdefault((row["test_case_id"], row["environment_id"]), [])
        history.append(
            Passed(row["run_id"], row["duration_ms"], row["executed_at"], row["position"],
                   row["batch_id"])
        )  # fmt: skip
    findings = []
    for execution in passed:
        history = histories.get((execution.test_case_id, execution.environment_id), [])
        mine = next((i for i, p in enumerate(history) if p.run_id == execution.run_id), None)
        if mine is None:
            continue
        found = slowdown(history[: mine + 1])
        if found is None or _slow_before(history, mine):
            continue
        event = PerformanceDegraded(
            run_id=str(execution.run_id),
            suite=execution.suite,
            test=execution.test,
            test_case_id=str(execution.test_case_id),
            environment=execution.environment,
            environment_id=str(execution.environment_id),
            recent_median_ms=round(found.recent_median_ms, 3),
            baseline_median_ms=round(found.baseline_median_ms, 3),
            ratio=round(found.recent_median_ms / found.baseline_median_ms, 4),
            threshold=float(SLOWDOWN_ABOVE),
            recent_samples=found.recent_runs,
            baseline_samples=found.baseline_runs,
            baseline_days=BASELINE_WINDOW.days,
        )
        findings.append(_finding(execution, "performance_degradation", event))
    return findings


_CHECKPOINTS = (
    "SELECT coalesce(max(position) FILTER (WHERE name = $1), 0),"
    " coalesce(max(position) FILTER (WHERE name = $2), 0)"
    " FROM baton_projection_checkpoints WHERE name IN ($1, $2)"
)


class Detector:
    """Records the findings of the runs that completed, behind the projector named
    ``follows`` (see the module's docstring), ``page_size`` completed runs a transaction.
    It reads only the RunCompleted events of the log: every position up to the
    projector's checkpoint is committed (it never passes one that commits later), so a
    read up to there skips nothing.

    As the projector does, it reads a page before its transaction takes the checkpoint's
    lock, never while holding it, and under the lock applies it only if the checkpoint is
    still where the page begins; otherwise another Detector judged it meanwhile, and the
    next page is read from where that one stopped."""

    def __init__(
        self, store: PostgresEventStore, *, follows: str = DEFAULT_NAME, page_size: int = 100
    ) -> None:
        self._store = store
        self._follows = follows
        self._page_size = page_size

    async def position(self) -> int:
        """The checkpoint: the last log position judged (0 before the first)."""
        position, _ = await self._checkpoints()
        return position

    async def _checkpoints(self) -> tuple[int, int]:
        """This Detector's checkpoint and the projector's it follows."""
        with driver_errors(self._store.dsn):
            row = await self._store.pool.fetchrow(_CHECKPOINTS, FINDINGS, self._follows)
        return int(row[0]), int(row[1])

    async def catch_up(self) -> int:
        """Judge every run completed after the checkpoint, up to the projector's; return how
        many log positions that covered. Raises StoreUnavailable/StoreError."""
        covered = 0
        while (count := await self._step()) is not None:
            covered += count
        return covered

    async def rebuild(self) -> int:
        """Judge the whole log again (after a rebuild of the read tables): what was found
        already is found again and not recorded twice."""
        with driver_errors(self._store.dsn):
            async with self._store.pool.acquire() as conn, conn.transaction():
                await lock_checkpoint(conn, FINDINGS)
                await conn.execute(ADVANCE, FINDINGS, 0)
        return await self.catch_up()

    async def _step(self) -> int | None:
        """Judge the next page: the log positions it covered (0 if another Detector moved
        the checkpoint first), None when the projector's checkpoint is reached."""
        position, ceiling = await self._checkpoints()
        if ceiling <= position:
            return None
        page = await self._store.read_all(
            position, self._page_size, through_position=ceiling, types=[RunCompleted.__name__]
        )
        # a full page may stop short of the ceiling; otherwise the ceiling is reached
        reached = page[-1].position if len(page) == self._page_size else ceiling
        completed = [
            (r.stream, r.position, r.recorded_at) for r in page if r.stream.startswith(RUN_PREFIX)
        ]
        with driver_errors(self._store.dsn):
            async with self._store.pool.acquire() as conn, conn.transaction():
                if await lock_checkpoint(conn, FINDINGS) != position:
                    return 0
                # last: its append holds every other append back until this commit
                await record_findings(self._store, conn, completed)
                await conn.execute(ADVANCE, FINDINGS, reached)
        return reached - position
