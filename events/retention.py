"""Retention (seed 002): what is due for the archive at a given time, decided without I/O.

Passed runs are kept 90 days after they end, other ended runs (failed, cancelled, error)
180 days; a run's context 24 hours after it ends; monthly metrics 730 days (2 years) after
their month ends. A project may set its own windows (table retention_policies). The
clock is an argument: ``due(..., now)`` never reads one, so a test sets the time.
``events.retention_apply`` reads the facts, archives what is due and removes it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from datetime import date, datetime, timedelta

import msgspec


class Policy(msgspec.Struct, frozen=True, kw_only=True):
    passed_days: int = 90
    failed_days: int = 180
    metrics_days: int = 730
    context_hours: int = 24

    def overridden(self, **values: int | None) -> Policy:
        """This policy with the given windows replaced (None keeps a window)."""
        given = {name: value for name, value in values.items() if value is not None}
        return msgspec.structs.replace(self, **given)

    def run_window(self, status: str) -> timedelta:
        return timedelta(days=self.passed_days if status == "passed" else self.failed_days)


DEFAULT = Policy()

LONGEST_DAYS = 36_500
"""The longest window a project may set, a century: a longer one overflows the dates
retention works out from it (``now`` less the window)."""


class RunFacts(msgspec.Struct, frozen=True, kw_only=True):
    """An ended run of the read tables, as retention sees it."""

    run_id: uuid.UUID
    stream: str
    organization_id: uuid.UUID
    project: str
    status: str
    started_at: datetime
    ended_at: datetime
    has_context: bool


class MonthFacts(msgspec.Struct, frozen=True, kw_only=True):
    """The monthly metric rows of one project, organization and month."""

    organization_id: uuid.UUID
    project: str
    month: date
    rows: int


class Due(msgspec.Struct, frozen=True, kw_only=True):
    runs: list[RunFacts]
    """Runs whose results leave: their events, read rows and context."""
    contexts: list[RunFacts]
    """Runs that stay but whose context leaves (not listed in ``runs``)."""
    months: list[MonthFacts]
    """Monthly metric rows past the metrics window."""

    def empty(self) -> bool:
        return not (self.runs or self.contexts or self.months)


def month_end(month: date) -> date:
    """The first day of the month after ``month``."""
    return date(month.year + month.month // 12, month.month % 12 + 1, 1)


def due(
    runs: Iterable[RunFacts],
    months: Iterable[MonthFacts],
    policies: Mapping[str, Policy],
    now: datetime,
) -> Due:
    """What retention removes at ``now`` (an aware datetime): a run once its window after it
    ended has passed, its context once ``context_hours`` have, a month's metrics once
    ``metrics_days`` have passed since the month ended."""
    gone: list[RunFacts] = []
    contexts: list[RunFacts] = []
    for run in runs:
        policy = policies.get(run.project, DEFAULT)
        if run.ended_at + policy.run_window(run.status) <= now:
            gone.append(run)
        elif run.has_context and run.ended_at + timedelta(hours=policy.context_hours) <= now:
            contexts.append(run)

    def window(month: MonthFacts) -> timedelta:
        return timedelta(days=policies.get(month.project, DEFAULT).metrics_days)

    expired = [month for month in months if month_end(month.month) + window(month) <= now.date()]
    return Due(runs=gone, contexts=contexts, months=expired)


def earliest_window(policies: Mapping[str, Policy]) -> tuple[timedelta, timedelta]:
    """The shortest context window and the shortest run window of any policy: nothing that
    ended more recently is ever due, so the facts read can stop there."""
    every = [DEFAULT, *policies.values()]
    context = min(timedelta(hours=p.context_hours) for p in every)
    run = min(min(timedelta(days=p.passed_days), timedelta(days=p.failed_days)) for p in every)
    return min(context, run), run
