"""Known failures: a test the flow marks as failing for now (``known_failure: {reason,
until}``) runs and is reported, but its failure fails the run only once the mark expires.

The day is a parameter (``RunInputs.today``), so that what a mark means on a given day
can be checked without waiting for that day.
"""

from __future__ import annotations

from datetime import date

from events import types as ev
from orchestrator.model import KnownFailure


def judged(spec: KnownFailure | None, today: date) -> ev.KnownFailureMark | None:
    """The mark as a test that runs on ``today`` records it; None for an unmarked test.
    ``until`` is the mark's last day: it has expired from the day after."""
    if spec is None:
        return None
    return ev.KnownFailureMark(
        reason=spec.reason, until=spec.until.isoformat(), expired=today > spec.until
    )


def describe(mark: ev.KnownFailureMark, status: ev.TestStatus) -> str:
    """What a report says of a marked test that ``status``: the same words everywhere."""
    if status == "passed":
        return (
            f"known failure passed: {mark.reason} (marked until {mark.until}); "
            "remove the known_failure mark"
        )
    if mark.expired:
        return f"the known-failure mark expired on {mark.until}: {mark.reason}"
    return f"known failure: {mark.reason}, until {mark.until}"
