"""The changes a Supabase watch hands on: plain dicts, one line each when printed.

Every change has ``kind`` ("run", "result" or "broadcast"), ``run_id``, ``source`` (how it
came: "snapshot" for a read through PostgREST, "INSERT"/"UPDATE" for a Realtime change,
"broadcast") and ``at`` (the commit time Realtime reports, else None). Then, by kind:

- run: ``status``, ``final`` (the status is one a run ends with), ``total_tests``,
  ``passed_tests``, ``failed_tests``, ``skipped_tests``, ``duration_ms``,
  ``cancel_reason``;
- result: ``test_name``, ``status``, ``attempts``, ``duration_ms``, ``response_status``,
  ``category``, ``message``;
- broadcast: ``event``, ``payload``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

FINAL_RUN_STATUSES = frozenset({"passed", "failed", "cancelled", "error"})
FINAL_RESULT_STATUSES = frozenset({"passed", "failed", "skipped"})
_RESULT_RANK = {"pending": 0, "running": 1}  # every final status ranks 2


Change = dict[str, Any]


def run_change(row: dict[str, Any], source: str, at: str | None) -> Change:
    return {
        "kind": "run",
        "run_id": str(row["id"]),
        "status": row["status"],
        "final": row["status"] in FINAL_RUN_STATUSES,
        "total_tests": row.get("total_tests"),
        "passed_tests": row.get("passed_tests"),
        "failed_tests": row.get("failed_tests"),
        "skipped_tests": row.get("skipped_tests"),
        "duration_ms": row.get("duration_ms"),
        "cancel_reason": row.get("cancel_reason"),
        "source": source,
        "at": at,
    }


def result_change(row: dict[str, Any], source: str, at: str | None) -> Change:
    return {
        "kind": "result",
        "run_id": str(row["run_id"]),
        "test_name": row["test_name"],
        "status": row["status"],
        "attempts": row.get("attempts"),
        "duration_ms": row.get("duration_ms"),
        "response_status": row.get("response_status"),
        "category": row.get("category"),
        "message": row.get("message") or "",
        "source": source,
        "at": at,
    }


def broadcast_change(run_id: str, event: str | None, payload: Any) -> Change:
    return {
        "kind": "broadcast",
        "run_id": run_id,
        "event": event,
        "payload": payload,
        "source": "broadcast",
        "at": None,
    }


class Tracker:
    """What the caller has seen: drops repeats and changes older than one shown."""

    def __init__(self, on_change: Callable[[Change], None]) -> None:
        self._on_change = on_change
        self._results: dict[str, Change] = {}
        self._run: Change | None = None
        self.started = False

    @property
    def run_seen(self) -> bool:
        return self._run is not None

    def offer(self, change: Change) -> None:
        if change["kind"] == "result":
            last = self._results.get(change["test_name"])
            if last is not None and (
                rank(change["status"]) < rank(last["status"]) or _same(change, last)
            ):
                return
            self._results[change["test_name"]] = change
        elif change["kind"] == "run":
            if self._run is not None and (
                (self._run["final"] and not change["final"]) or _same(change, self._run)
            ):
                return
            self._run = change
        self._on_change(change)

    def snapshot(self, run: Change | None, results: list[Change]) -> bool:
        """Offer what a read found; True when the run is over already."""
        self.started = True
        if run is not None and run["final"]:
            self.finish(run, results)
            return True
        if run is not None:
            self.offer(run)
        for result in results:
            self.offer(result)
        return False

    def finish(self, run: Change, results: list[Change]) -> None:
        for result in results:
            self.offer(result)
        self.offer(run)


def rank(status: str) -> int:
    """A result's progress: pending 0, running 1, any final status 2."""
    return _RESULT_RANK.get(status, 2)


def _same(one: Change, other: Change) -> bool:
    ignored = {"source", "at"}
    return {k: v for k, v in one.items() if k not in ignored} == {
        k: v for k, v in other.items() if k not in ignored
    }


def format_change(change: Change) -> str:
    """One line for a change, as ``baton watch`` prints it."""
    if change["kind"] == "broadcast":
        payload = json.dumps(change.get("payload"), sort_keys=True, default=str)
        return f"broadcast {change.get('event')}: {payload}"
    if change["kind"] == "run":
        counts = (
            f"{change['passed_tests'] or 0} passed, {change['failed_tests'] or 0} failed, "
            f"{change['skipped_tests'] or 0} skipped of {change['total_tests'] or 0}"
        )
        line = f"run {change['run_id']} {change['status']}: {counts}"
        if change["final"] and change.get("duration_ms") is not None:
            line += f" in {_duration(change['duration_ms'])}"
        if change.get("cancel_reason"):
            line += f" ({change['cancel_reason']})"
        return line
    line = f"test {change['test_name']} {change['status']}"
    if change["status"] in FINAL_RESULT_STATUSES and change.get("duration_ms") is not None:
        line += f" in {_duration(change['duration_ms'])}"
    if (change.get("attempts") or 0) > 1:
        line += f" (attempt {change['attempts']})"
    if change.get("category"):
        line += f" [{change['category']}]"
    message = (change.get("message") or "").strip().splitlines()
    if message and change["status"] in ("failed", "skipped"):
        line += f": {message[0]}"
    return line


def _duration(ms: float) -> str:
    return f"{ms:.0f} ms" if ms < 1000 else f"{ms / 1000:.2f} s"
