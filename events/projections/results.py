"""test_results, test_result_details, test_run_history and failure_analysis.

A run's planned tests get a 'pending' result at RunStarted; their events move it on
(running, then passed, failed or skipped) and each request, response, assertion and
capture becomes a detail row. A decided result also writes the test case's history row and,
when it failed or was skipped for a reason, its failure analysis. Everything a later page
needs is in the row itself (the last response, the number of requests), so the outcome
does not depend on where pages begin.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime

import asyncpg
import msgspec

from events.projections._sql import Column, delete, upsert
from events.projections.catalog import Identity, derive
from events.projections.runs import RunRow
from events.secrets import masked_event
from events.types import (
    AssertionEvaluated,
    AuthTokenUpdated,
    RecordedEvent,
    RequestSent,
    ResponseReceived,
    TestFailed,
    TestPassed,
    TestSkipped,
    TestStarted,
    VariableCaptured,
    encode,
)

FINAL = frozenset({"passed", "failed", "skipped"})
EXECUTED = frozenset({"passed", "failed"})
"""What counts as an execution in the metrics: a skipped test sent nothing."""

MetricKey = tuple[uuid.UUID, uuid.UUID, date]
"""(test case, environment, UTC day) of a performance_metrics row."""


class ResultRow(msgspec.Struct, kw_only=True):
    id: uuid.UUID
    organization_id: uuid.UUID
    run_id: uuid.UUID
    test_case_id: uuid.UUID
    environment_id: uuid.UUID
    test_name: str
    status: str = "pending"
    attempts: int = 0
    requests: int = 0
    duration_ms: float | None = None
    response_status: int | None = None
    response_time_ms: float | None = None
    category: str | None = None
    message: str = ""
    started_at: datetime | None = None
    ended_at: datetime | None = None
    decided_position: int | None = None
    """The log position of the event that decided it, for test_run_history; not a column of
    test_results, so None on a row loaded from there (the history row keeps its own)."""

    def metric_key(self) -> MetricKey | None:
        if self.status not in EXECUTED or self.ended_at is None:
            return None
        return (self.test_case_id, self.environment_id, self.ended_at.astimezone(UTC).date())


_RESULTS: list[Column] = [
    ("id", "uuid"),
    ("organization_id", "uuid"),
    ("run_id", "uuid"),
    ("test_case_id", "uuid"),
    ("environment_id", "uuid"),
    ("test_name", "text"),
    ("status", "text"),
    ("attempts", "int"),
    ("requests", "int"),
    ("duration_ms", "float8"),
    ("response_status", "int"),
    ("response_time_ms", "float8"),
    ("category", "text"),
    ("message", "text"),
    ("started_at", "timestamptz"),
    ("ended_at", "timestamptz"),
]
_RESULT_NAMES = [name for name, _ in _RESULTS]
_RESULT_UPDATES = [f"{name} = excluded.{name}" for name in _RESULT_NAMES[6:]]
_DETAILS: list[Column] = [
    ("event_id", "uuid"),
    ("organization_id", "uuid"),
    ("result_id", "uuid"),
    ("position", "bigint"),
    ("attempt", "int"),
    ("kind", "text"),
    ("passed", "bool"),
    ("data", "jsonb"),
    ("recorded_at", "timestamptz"),
]
_HISTORY: list[Column] = [
    ("organization_id", "uuid"),
    ("test_case_id", "uuid"),
    ("environment_id", "uuid"),
    ("run_id", "uuid"),
    ("status", "text"),
    ("category", "text"),
    ("attempts", "int"),
    ("duration_ms", "float8"),
    ("executed_at", "timestamptz"),
    ("position", "bigint"),
]
_HISTORY_UPDATES = [
    *(f"{name} = excluded.{name}" for name, _ in _HISTORY[4:-1]),
    # a row decided on an earlier page and changed on this one without a new verdict
    # comes without a position: the stored one stands
    "position = coalesce(excluded.position, test_run_history.position)",
]
_HISTORY_KEY: list[Column] = [("run_id", "uuid"), ("test_case_id", "uuid")]
_FAILURES: list[Column] = [
    ("result_id", "uuid"),
    ("organization_id", "uuid"),
    ("test_case_id", "uuid"),
    ("run_id", "uuid"),
    ("category", "text"),
    ("message", "text"),
    ("fingerprint", "text"),
    ("occurred_at", "timestamptz"),
]

# what varies between occurrences of one failure: ids, numbers, quoted values
_VARIABLE = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{16,}|\d+(?:\.\d+)?",
    re.IGNORECASE,
)


def fingerprint(test_case_id: uuid.UUID, category: str, message: str) -> str:
    """Groups a failure with the same failure in other runs: same case, category and
    message once ids and numbers are blanked."""
    shape = _VARIABLE.sub("#", message)
    text = f"{test_case_id}\x00{category}\x00{shape}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class Results:
    """The result rows of the runs a page touches: loaded, moved on by events, written."""

    def __init__(self, loaded: Iterable[ResultRow]) -> None:
        self.rows: dict[tuple[uuid.UUID, str], ResultRow] = {}
        self._before: dict[tuple[uuid.UUID, str], ResultRow] = {}
        self._by_run: dict[uuid.UUID, list[ResultRow]] = {}
        for row in loaded:
            key = (row.run_id, row.test_name)
            self.rows[key] = row
            self._before[key] = msgspec.structs.replace(row)
            self._by_run.setdefault(row.run_id, []).append(row)
        self._details: list[tuple[object, ...]] = []
        self.failure_days: set[MetricKey] = set()
        """After write: the failure_metrics days whose categorised results changed."""

    def start(self, run: RunRow, identity: Identity) -> None:
        for name, case in identity.cases.items():
            key = (run.id, name)
            if key in self.rows:
                continue
            row = ResultRow(
                id=derive("result", run.id, name),
                organization_id=run.organization_id,
                run_id=run.id,
                test_case_id=case,
                environment_id=run.environment_id,
                test_name=name,
            )
            self.rows[key] = row
            self._by_run.setdefault(run.id, []).append(row)

    def statuses(self, run_id: uuid.UUID) -> list[str]:
        return [row.status for row in self._by_run.get(run_id, ())]

    def apply(self, run: RunRow, recorded: RecordedEvent) -> None:
        event = recorded.event
        at = recorded.recorded_at
        if not isinstance(
            event,
            TestStarted
            | RequestSent
            | ResponseReceived
            | AssertionEvaluated
            | VariableCaptured
            | AuthTokenUpdated
            | TestPassed
            | TestFailed
            | TestSkipped,
        ):
            return
        row = self.rows.get((run.id, event.test))
        if row is None:
            return  # not in the run's plan: nothing to attach it to
        match event:
            case TestStarted():
                if row.status in FINAL:  # decided before, run again: a fresh verdict
                    row.duration_ms = row.category = row.ended_at = None
                    row.decided_position = None
                    row.message = ""
                    row.started_at = None
                row.status = "running"
                row.attempts = event.attempt
                row.started_at = row.started_at or at
            case RequestSent():
                row.requests = max(row.requests, event.attempt)
                self._detail(row, recorded, event.attempt, "request", None, encode(event))
            case ResponseReceived():
                row.response_status = event.status
                row.response_time_ms = event.timings.total_ms
                self._detail(row, recorded, event.attempt, "response", None, encode(event))
            case AssertionEvaluated():
                self._detail(row, recorded, event.attempt, "assertion", event.passed, encode(event))
            case VariableCaptured() | AuthTokenUpdated():
                shown = masked_event(event)
                self._detail(row, recorded, row.requests, "capture", None, encode(shown))
            case TestPassed():
                self._decide(row, recorded, "passed", event.attempts, event.duration_ms, None, "")
            case TestFailed():
                self._decide(
                    row, recorded, "failed", event.attempts, event.duration_ms, event.category,
                    event.message,
                )  # fmt: skip
            case TestSkipped():
                self._decide(
                    row, recorded, "skipped", row.attempts, None, event.category, event.reason
                )

    @staticmethod
    def _decide(
        row: ResultRow,
        recorded: RecordedEvent,
        status: str,
        attempts: int,
        duration_ms: float | None,
        category: str | None,
        message: str,
    ) -> None:
        row.status = status
        row.attempts = attempts
        row.duration_ms = duration_ms
        row.category = category
        row.message = message
        row.ended_at = recorded.recorded_at
        row.decided_position = recorded.position

    def _detail(
        self,
        row: ResultRow,
        recorded: RecordedEvent,
        attempt: int,
        kind: str,
        passed: bool | None,
        data: bytes,
    ) -> None:
        self._details.append(
            (
                recorded.id,
                row.organization_id,
                row.id,
                recorded.position,
                attempt,
                kind,
                passed,
                data,
                recorded.recorded_at,
            )
        )

    async def write(self, conn: asyncpg.Connection) -> set[MetricKey]:
        """Write what changed; return the metric days whose executions changed."""
        changed = [row for key, row in self.rows.items() if self._before.get(key) != row]
        await upsert(
            conn,
            "test_results",
            _RESULTS,
            [tuple(getattr(row, name) for name in _RESULT_NAMES) for row in changed],
            key=["id"],
            update=_RESULT_UPDATES,
        )
        await upsert(conn, "test_result_details", _DETAILS, self._details, key=["event_id"])
        history, unhistory, failures, unfailures = [], [], [], []
        days: set[MetricKey] = set()
        for row in changed:
            before = self._before.get((row.run_id, row.test_name))
            if row.status in FINAL and row.ended_at is not None:
                history.append(
                    (
                        row.organization_id, row.test_case_id, row.environment_id, row.run_id,
                        row.status, row.category, row.attempts, row.duration_ms, row.ended_at,
                        row.decided_position,
                    )
                )  # fmt: skip
            elif before is not None and before.status in FINAL:
                unhistory.append((row.run_id, row.test_case_id))
            if row.status in FINAL and row.category is not None and row.ended_at is not None:
                failures.append(
                    (
                        row.id, row.organization_id, row.test_case_id, row.run_id, row.category,
                        row.message, fingerprint(row.test_case_id, row.category, row.message),
                        row.ended_at,
                    )
                )  # fmt: skip
            elif before is not None and before.category is not None:
                unfailures.append((row.id,))
            for day in (before.metric_key() if before else None, row.metric_key()):
                if day is not None:
                    days.add(day)
            for had in (before, row):
                if had is not None and had.category is not None and had.ended_at is not None:
                    at = had.ended_at.astimezone(UTC).date()
                    self.failure_days.add((had.test_case_id, had.environment_id, at))
        await upsert(
            conn,
            "test_run_history",
            _HISTORY,
            history,
            key=["run_id", "test_case_id"],
            update=_HISTORY_UPDATES,
        )
        await delete(conn, "test_run_history", _HISTORY_KEY, unhistory)
        await upsert(
            conn,
            "failure_analysis",
            _FAILURES,
            failures,
            key=["result_id"],
            update=[f"{name} = excluded.{name}" for name, _ in _FAILURES[4:]],
        )
        await delete(conn, "failure_analysis", [("result_id", "uuid")], unfailures)
        return days


async def load_results(conn: asyncpg.Connection, run_ids: Sequence[uuid.UUID]) -> list[ResultRow]:
    if not run_ids:
        return []
    rows = await conn.fetch(
        f"SELECT {', '.join(_RESULT_NAMES)} FROM test_results WHERE run_id = ANY($1)", run_ids
    )
    return [ResultRow(**dict(row)) for row in rows]
