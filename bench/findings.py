"""Precision and recall of the detector's findings on a generated history (issue 12).

One private database on the PostgreSQL server (created, dropped at the end). A history of
--days days is generated and appended through the EventStore as runs' events, each event
stamped with a generated time (``NewEvent.at``: the clock; nothing waits for real time).
Every day each case runs in two batches (``batch_id``; 09:00 and 15:00 UTC) of
--runs-per-batch runs started 2 s apart. Then ``baton projections rebuild`` as the CLI runs
it: the projector writes the read tables and the detector (events.projections.Detector, the
rules' own code) judges every run of the log in order. The findings are read back from the
project's analytics stream and scored.

Cases, each --replicates times as suites of their own (one test, ``call``, except
``blocked``), durations in ms:

- ``steady``: passes, 100 x uniform(0.97, 1.03);
- ``noisy``: passes, 100 x a batch's own factor uniform(0.85, 1.15) x uniform(0.7, 1.3),
  and 5% of executions a scheduling hiccup of 3.5x;
- ``slowdown``: passes, 100 x uniform(0.9, 1.1), 30% slower from day --slow-from on;
- ``flaky5``, ``flaky15``, ``flaky30``: fails (an assertion) with that probability;
- ``always_failing``: fails every time;
- ``blocked``: ``login`` fails every time (status 503) and ``call``, which needs its token,
  is skipped for the failed dependency.

Which are positives (what a finding should say), per (case, rule):

- ``failure_rate`` (> 10% failed over 7 days): flaky15, flaky30;
- ``flip_rate`` (>= 0.2 status changes over the last 30): flaky15 (expected 2 x 0.15 x 0.85
  = 0.255), flaky30 (0.42);
- ``performance_degradation``: slowdown, found on or after its first slow day.

Everything else is a negative for every rule: flaky5 fails at half the failure-rate line
and changes status 0.095 of the time, under the flip-rate line; a test that always fails
is broken, not flaky; a skip sent nothing.

A finding is correct when its (case, rule) is a positive and it is the first finding of
that pair (for a slowdown, the first on or after the slow day); every other finding,
repeats included, is a false positive. Precision: correct findings / findings. Recall:
positive pairs with a correct finding / positive pairs.

    python bench/findings.py [--pg DSN] [--days 21] [--runs-per-batch 6] [--replicates 3]
        [--slow-from 14] [--seed 12] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cache_bench import private_database

from events import types as ev
from events.postgres import PostgresEventStore
from events.projections import DEFAULT_ORGANIZATION_ID, Detector, Projector, derive
from events.store import NewEvent, StreamAppend

HERE = Path(__file__).parent
T0 = datetime(2026, 1, 5, tzinfo=UTC)
CASES = ("steady", "noisy", "slowdown", "flaky5", "flaky15", "flaky30", "always_failing",
         "blocked")  # fmt: skip
FAIL_PROBABILITY = {"flaky5": 0.05, "flaky15": 0.15, "flaky30": 0.30, "always_failing": 1.0}
POSITIVES = {
    "failure_rate": {"flaky15", "flaky30"},
    "flip_rate": {"flaky15", "flaky30"},
    "performance_degradation": {"slowdown"},
}
PROJECT = derive("project", DEFAULT_ORGANIZATION_ID, "default")


def run(case: str, suite: str, ms: float, fails: bool) -> list[ev.Event]:
    run_id = str(uuid.uuid4())
    if case == "blocked":
        plan = [ev.PlannedTest("login"), ev.PlannedTest("call", {"login": "token"})]
        return [
            ev.RunStarted(run_id, suite, "bench", plan),
            ev.TestStarted("login"),
            ev.TestFailed("login", 1, ms, "server_error", "status 503"),
            ev.TestSkipped("call", "login failed", "dependency_skipped"),
            ev.RunCompleted("failed", 0, 1, 1, ms),
        ]
    events: list[ev.Event] = [
        ev.RunStarted(run_id, suite, "bench", [ev.PlannedTest("call")]),
        ev.TestStarted("call"),
    ]
    if fails:
        events.append(ev.TestFailed("call", 1, ms, "assertion", "expected 200, got 409"))
        return [*events, ev.RunCompleted("failed", 0, 1, 0, ms)]
    return [*events, ev.TestPassed("call", 1, ms), ev.RunCompleted("passed", 1, 0, 0, ms)]


def history(args: argparse.Namespace) -> Runs:
    """(started, suite, events) of every run, in time order."""
    rng = random.Random(args.seed)
    runs = []
    for day in range(args.days):
        for hour in (9, 15):
            for case in CASES:
                for replicate in range(args.replicates):
                    suite = f"{case}-{replicate}"
                    batch = str(uuid.uuid4())
                    factor = rng.uniform(0.85, 1.15)
                    for n in range(args.runs_per_batch):
                        started = T0 + timedelta(days=day, hours=hour, seconds=2 * n)
                        ms = duration(case, day, factor, rng, args.slow_from)
                        fails = rng.random() < FAIL_PROBABILITY.get(case, 0.0)
                        events = run(case, suite, ms, fails)
                        started_event = events[0]
                        assert isinstance(started_event, ev.RunStarted)
                        events[0] = ev.RunStarted(
                            started_event.run_id, suite, "bench", started_event.plan,
                            batch_id=batch, row=n + 1,
                        )  # fmt: skip
                        runs.append((started, suite, events))
    runs.sort(key=lambda r: r[0])
    return runs


def duration(case: str, day: int, factor: float, rng: random.Random, slow_from: int) -> float:
    if case == "steady":
        return 100 * rng.uniform(0.97, 1.03)
    if case == "noisy":
        hiccup = 3.5 if rng.random() < 0.05 else 1.0
        return 100 * factor * rng.uniform(0.7, 1.3) * hiccup
    if case == "slowdown":
        return 100 * rng.uniform(0.9, 1.1) * (1.3 if day >= slow_from else 1.0)
    return 100 * rng.uniform(0.9, 1.1)


Runs = list[tuple[datetime, str, list[ev.Event]]]


async def append(store: PostgresEventStore, runs: Runs) -> None:
    for started, _, events in runs:
        at = int(started.timestamp() * 1_000_000)
        started_event = events[0]
        assert isinstance(started_event, ev.RunStarted)
        new = [NewEvent(event, at=at + 1000 * i) for i, event in enumerate(events)]
        await store.append([StreamAppend(ev.run_stream(started_event.run_id), new)])


def score(
    found: list[ev.RecordedEvent], slow_day: datetime, started: dict[str, datetime]
) -> dict[str, Any]:
    findings = []
    for recorded in found:
        event = recorded.event
        assert isinstance(event, ev.Finding)
        rule = event.rule if isinstance(event, ev.FlakyTestDetected) else "performance_degradation"
        value = event.rate if isinstance(event, ev.FlakyTestDetected) else event.ratio
        findings.append((event.suite, rule, started[event.run_id], value))
    findings.sort(key=lambda f: f[2])
    correct, wrong = Counter[str](), Counter[str]()
    wrong_by_case = Counter[str]()
    credited: set[tuple[str, str]] = set()
    false = []
    for suite, rule, at, value in findings:
        case = suite.rpartition("-")[0]
        right = case in POSITIVES.get(rule, set()) and (suite, rule) not in credited
        if right and rule == "performance_degradation" and at < slow_day:
            right = False
        if right:
            credited.add((suite, rule))
            correct[rule] += 1
        else:
            wrong[rule] += 1
            wrong_by_case[f"{case} {rule}"] += 1
            false.append(f"{suite} {rule} {at:%Y-%m-%d %H:%M:%S} {value}")
    positives = {rule: len(cases) for rule, cases in POSITIVES.items()}
    return {"correct": dict(correct), "wrong": dict(wrong), "wrong_by": dict(wrong_by_case),
            "credited": sorted(f"{s} {r}" for s, r in credited), "positives": positives,
            "findings": len(findings), "false_positives": false}  # fmt: skip


async def main(args: argparse.Namespace) -> dict[str, Any]:
    runs = history(args)
    started = {e[0].run_id: at for at, _, e in runs if isinstance(e[0], ev.RunStarted)}
    async with private_database(args.pg) as dsn:
        store = await PostgresEventStore.connect(dsn, max_size=4)
        try:
            clock = time.perf_counter()
            await append(store, runs)
            appended = time.perf_counter() - clock
            clock = time.perf_counter()
            await Projector(store).rebuild()
            projected = time.perf_counter() - clock
            clock = time.perf_counter()
            await Detector(store).rebuild()
            detected = time.perf_counter() - clock
            found = await store.read_stream(ev.analytics_stream(PROJECT))
        finally:
            await store.aclose()
    scored = score(found, T0 + timedelta(days=args.slow_from), started)
    positive_pairs = sum(scored["positives"].values()) * args.replicates
    correct = sum(scored["correct"].values())
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": {key: value for key, value in vars(args).items() if key not in ("pg", "json")},
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "runs": len(runs),
        "seconds": {
            "append": round(appended, 1),
            "projector_rebuild": round(projected, 1),
            "detector_rebuild": round(detected, 1),
        },
        "precision": round(correct / scored["findings"], 4) if scored["findings"] else None,
        "recall": round(len(scored["credited"]) / positive_pairs, 4),
        **scored,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--days", type=int, default=21)
    parser.add_argument("--runs-per-batch", type=int, default=6)
    parser.add_argument("--replicates", type=int, default=3)
    parser.add_argument("--slow-from", type=int, default=14)
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--json", type=Path)
    options = parser.parse_args()
    outcome = asyncio.run(main(options))
    print(json.dumps(outcome, indent=2))
    target = (
        options.json or HERE / "results" / f"findings-{outcome['date'][:19].replace(':', '')}.json"
    )
    target.write_text(json.dumps(outcome, indent=2) + "\n")
    print(f"written {target}")
