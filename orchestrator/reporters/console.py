"""The console: live progress while runs execute, and the summary printed at the end.

Progress is an observer the runner calls with ``(run_id, event)``. Without a terminal (CI,
a pipe) it writes plain lines that read well in a log: one line per finished test of a
single run; for batch rows one line per run, with the failed and skipped tests of failed
runs only, so fifty rows of six tests stay about fifty lines. Runs of several flow files
go at once, but a log is read top to bottom: each single run is one block, its name then
its lines, in the order the runs started; the first streams as it goes, the others are
held until the blocks before theirs are written. On a terminal the same lines scroll
above a small live panel of the runs in progress, drawn with ``rich``; rich is imported
only then, because start-up time matters to every non-interactive run.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from events.types import (
    BatchStarted,
    Event,
    RunCancelled,
    RunCompleted,
    RunStarted,
    TestFailed,
    TestPassed,
    TestSkipped,
    TestStarted,
)
from orchestrator.known_failures import describe
from orchestrator.reporters import _format as fmt
from orchestrator.reporters.json_report import summarize
from orchestrator.results import RunResult

_STYLES = {
    "passed": "32",
    "failed": "31",
    "skipped": "33",
    "bold": "1",
    "dim": "2",
    "expected": "32",
    "actual": "31",
    "title": "1;31",
}
_MARKS = {"passed": "✓", "failed": "✗", "skipped": "-"}
_LIVE_REFRESH_S = 0.1
_LIVE_ROWS = 8
_SHOWN: frozenset[type[Event]] = frozenset(
    {BatchStarted, RunStarted, TestFailed, TestSkipped, RunCancelled, RunCompleted}
)
_TRACKED = _SHOWN | {TestStarted, TestPassed}


def color_enabled(stream: TextIO) -> bool:
    """Colour when writing to a terminal, unless NO_COLOR is set (https://no-color.org)."""
    if os.environ.get("NO_COLOR"):
        return False
    return _isatty(stream) and os.environ.get("TERM") != "dumb"


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or file-like stream without a terminal
        return False


def painter(color: bool) -> fmt.Paint:
    if not color:
        return fmt.plain
    return lambda style, text: f"\x1b[{_STYLES[style]}m{text}\x1b[0m" if text else text


@dataclass
class _RunState:
    label: str
    batch: bool
    planned: int = 0
    tally: dict[str, int] = field(default_factory=lambda: {"passed": 0, "failed": 0, "skipped": 0})
    running: dict[str, int] = field(default_factory=dict)
    """Test name -> attempt, for the live panel."""
    held: list[str] = field(default_factory=list)
    """A batch row's failure lines, printed only if the row fails; a single run's lines
    while an earlier run's block is still being written."""
    ended: bool = False
    headed: bool = False
    """Whether the run's name has been written above its lines."""


class ConsoleProgress:
    """Observer for the runner: ``progress(run_id, event)``. Call ``close()`` when done."""

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        quiet: bool = False,
        color: bool | None = None,
        live: bool | None = None,
    ) -> None:
        self._stream = stream if stream is not None else sys.stdout
        self._quiet = quiet
        self._color = color_enabled(self._stream) if color is None else color
        self._paint = painter(self._color)
        self._want_live = _isatty(self._stream) if live is None else live
        self._runs: dict[str, _RunState] = {}
        # most events (requests, responses, assertions, captures) change no line printed
        # here, and -q prints only failures and the ends of runs; the live panel (which
        # redraws at most every 0.1 s, on any event) still sees them all
        self._wanted = _SHOWN if quiet else _TRACKED
        self._blocks: list[tuple[str, _RunState]] = []
        """Single runs whose block is not written whole yet, in the order they started;
        the first one's lines are written as they come."""
        self._live: _LivePanel | None = None
        # the runner may report from worker threads; lines must not interleave
        self._lock = threading.Lock()

    def __call__(self, run_id: str, event: Event) -> None:
        if type(event) not in self._wanted and not self._want_live:
            return
        with self._lock:
            self._handle(run_id, event)
            if self._want_live:
                self._refresh()

    def close(self) -> None:
        with self._lock:
            while self._blocks:  # runs that never ended (interrupted): what they did
                self._next_block()
            if self._live is not None:
                self._live.stop()
                self._live = None
            self._stream.flush()

    def __enter__(self) -> ConsoleProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _handle(self, run_id: str, event: Event) -> None:
        if isinstance(event, BatchStarted):
            if not self._quiet:
                what = f"{event.suite}: {len(event.runs)} runs"
                self._emit(
                    self._paint("bold", what) + (f" from {event.source}" if event.source else "")
                )
            return
        if isinstance(event, RunStarted):
            label = f"{event.suite} [row {event.row}]" if event.row >= 0 else event.suite
            batch = event.row >= 0 or bool(event.batch_id)
            self._track(run_id, _RunState(label=label, batch=batch, planned=len(event.plan)))
            return
        run = self._runs.get(run_id)
        if run is None:  # joined mid-run: still report, under the id
            run = self._track(run_id, _RunState(label=run_id, batch=False))
        if isinstance(event, TestStarted):
            run.running[event.test] = event.attempt
        elif isinstance(event, TestPassed | TestFailed | TestSkipped):
            self._finished(run_id, run, event)
        elif isinstance(event, RunCancelled):
            self._run_line(run_id, run, f"  ! cancelled: {fmt.first_line(event.reason)}")
            self._ended(run_id, run)
        elif isinstance(event, RunCompleted):
            self._completed(run_id, run, event)

    def _finished(
        self, run_id: str, run: _RunState, event: TestPassed | TestFailed | TestSkipped
    ) -> None:
        run.running.pop(event.test, None)
        paint = self._paint
        if isinstance(event, TestPassed):
            run.tally["passed"] += 1
            if self._quiet or run.batch:
                return
            retried = f"  after {event.attempts} attempts" if event.attempts > 1 else ""
            took = paint("dim", fmt.duration(event.duration_ms))
            line = f"  {paint('passed', '✓')} {event.test}  {took}{retried}"
            if event.known_failure is not None:
                note = fmt.printable(describe(event.known_failure, "passed"))
                line += "  " + paint("skipped", note)
        elif isinstance(event, TestFailed):
            run.tally["failed"] += 1
            why = fmt.first_line(fmt.printable(event.message))
            line = f"  {paint('failed', '✗')} {event.test}  [{event.category}] {why}"
            if event.known_failure is not None:
                line += "  " + paint(
                    "skipped", f"({fmt.printable(describe(event.known_failure, 'failed'))})"
                )
        else:
            run.tally["skipped"] += 1
            if self._quiet:
                return
            why = fmt.first_line(fmt.printable(event.reason))
            line = f"  {paint('skipped', '-')} {event.test}  {paint('dim', 'skipped: ' + why)}"
        self._run_line(run_id, run, line)

    def _completed(self, run_id: str, run: _RunState, event: RunCompleted) -> None:
        self._runs.pop(run_id, None)
        took = fmt.duration(event.duration_ms)
        known = event.known_failures
        tally = fmt.counts(event.passed, event.failed - known, event.skipped, known)
        if not run.batch:
            if event.status not in ("passed", "failed"):
                self._run_line(run_id, run, f"  ! the run ended: {event.status}")
            self._ended(run_id, run)
            return
        if event.status == "passed":
            if not self._quiet:
                self._emit(f"{self._paint('passed', '✓')} {run.label}  {tally}  {took}")
            return
        status = "" if event.status == "failed" else f"  ({event.status})"
        self._emit(f"{self._paint('failed', '✗')} {run.label}  {tally}  {took}{status}")
        for line in run.held:
            self._emit("  " + line)

    def _track(self, run_id: str, run: _RunState) -> _RunState:
        self._runs[run_id] = run
        if not run.batch:
            self._blocks.append((run_id, run))
        return run

    def _run_line(self, run_id: str, run: _RunState, line: str) -> None:
        waiting = any(other is run for _, other in self._blocks[1:])
        if run.batch or waiting:
            run.held.append(line)
            return
        self._write_block(run, [line])

    def _write_block(self, run: _RunState, lines: list[str]) -> None:
        if lines and not run.headed:
            run.headed = True
            self._emit(self._paint("bold", run.label))
        for line in lines:
            self._emit(line)

    def _ended(self, run_id: str, run: _RunState) -> None:
        run.ended = True
        while self._blocks and self._blocks[0][1].ended:
            self._next_block()

    def _next_block(self) -> None:
        """The first block is whole: write what the next run held, which then streams."""
        self._blocks.pop(0)
        if self._blocks:
            run = self._blocks[0][1]
            self._write_block(run, run.held)
            run.held = []

    def _emit(self, line: str) -> None:
        if self._live is not None:
            self._live.print(line)
        else:
            self._stream.write(line + "\n")

    def _refresh(self) -> None:
        if not self._runs:
            if self._live is not None:
                self._live.stop()
                self._live = None
            return
        if self._live is None:
            self._live = _LivePanel(self._stream, self._color)
        self._live.show(list(self._runs.values()))


class _LivePanel:
    """The runs in progress, redrawn in place below the lines already printed."""

    def __init__(self, stream: TextIO, color: bool) -> None:
        from rich.console import Console
        from rich.live import Live

        console = Console(file=stream, force_terminal=True, no_color=not color, highlight=False)
        self._live: Any = Live(console=console, auto_refresh=False, transient=True)
        self._live.start()
        self._last = 0.0

    def print(self, line: str) -> None:
        from rich.text import Text

        self._live.console.print(Text.from_ansi(line), soft_wrap=True)

    def show(self, runs: list[_RunState]) -> None:
        from rich.text import Text

        lines = []
        for run in runs[:_LIVE_ROWS]:
            done = sum(run.tally.values())
            text = Text(f"⋯ {run.label}  ", style="bold")
            text.append(f"{done}/{run.planned or '?'}  ")
            text.append(f"✓{run.tally['passed']} ", style="green")
            text.append(f"✗{run.tally['failed']} ", style="red")
            text.append(f"-{run.tally['skipped']}", style="yellow")
            if run.running:
                names = ", ".join(
                    name if attempt == 1 else f"{name} (attempt {attempt})"
                    for name, attempt in run.running.items()
                )
                text.append(f"  {fmt.clip(names, 60)}", style="dim")
            lines.append(text)
        if len(runs) > _LIVE_ROWS:
            lines.append(Text(f"  … and {len(runs) - _LIVE_ROWS} more runs", style="dim"))
        now = time.monotonic()
        due = now - self._last >= _LIVE_REFRESH_S
        if due:
            self._last = now
        self._live.update(Text("\n").join(lines), refresh=due)

    def stop(self) -> None:
        self._live.stop()


def render_summary(results: list[RunResult], *, color: bool, max_failures: int = 20) -> str:
    """The final report: each failure in detail (up to ``max_failures``), then the totals."""
    paint = painter(color)
    lines: list[str] = []
    budget = max_failures
    hidden = 0
    for run in results:
        failed = sum(1 for test in run.tests if test.status == "failed" and not test.excused)
        lines += _run_failures(run, paint, budget)
        hidden += max(failed - budget, 0)
        budget = max(budget - failed, 0)
    if lines:
        lines.insert(0, paint("title", "FAILURES"))
    if hidden:
        lines += ["", f"… and {hidden} more failed tests (see the JUnit, JSON or HTML report)"]
    lines += _known_failures(results, paint)
    continued = [
        f"run {run.run_id} continues run {run.continues}" for run in results if run.continues
    ]
    if continued:
        lines += ["", *continued]
    summary = summarize(results)
    totals = fmt.counts(summary.passed, summary.failed, summary.skipped, summary.known_failures)
    if summary.runs > 1:
        runs = f"{summary.runs} runs: {summary.runs_passed} passed"
        runs += f", {summary.runs_failed} failed" if summary.runs_failed else ""
        totals = f"{runs}; tests: {totals}"
    totals += f" in {summary.duration_ms / 1000:.2f} s"
    style = "passed" if summary.status == "passed" else "failed"
    lines += ["", paint(style, totals) if results else "no tests ran"]
    return "\n".join(lines).lstrip("\n")


def _run_failures(run: RunResult, paint: fmt.Paint, budget: int) -> list[str]:
    """A run's failed tests in detail, at most ``budget`` of them."""
    lines: list[str] = []
    problem = fmt.run_problem(run)
    if problem:
        lines += ["", f"{paint('failed', '✗')} {paint('bold', fmt.run_label(run))}: {problem}"]
    failed = [test for test in run.tests if test.status == "failed" and not test.excused]
    for test in failed[:budget]:
        title = paint("bold", f"{fmt.run_label(run)} / {test.name}")
        lines += ["", f"{paint('failed', '✗')} {title}  {paint('dim', run.file)}"]
        lines += fmt.indent(fmt.failure_detail(test, paint), "    ")
    if lines:
        lines += _skipped_lines(run, paint)
    return lines


def test_lines(run: RunResult, *, color: bool) -> str:
    """One line per test of ``run``: its mark, its name, why it did not pass (or what a
    passed test's message adds)."""
    paint = painter(color)
    lines = []
    for test in run.tests:
        line = f"{paint(test.status, _MARKS[test.status])} {test.name}"
        if test.message:
            line += f"  {fmt.first_line(test.message)}"
        lines.append(line)
    return "\n".join(lines)


def _known_failures(results: list[RunResult], paint: fmt.Paint) -> list[str]:
    """The marked tests that did not fail the run: those still failing, and those that pass
    now (their mark can go)."""
    lines = [
        f"  {paint('skipped', '✗' if test.status == 'failed' else '✓')} "
        f"{fmt.run_label(run)} / {test.name}  {fmt.printable(fmt.known_failure_note(test))}"
        for run in results
        for test in run.tests
        if test.excused or (test.status == "passed" and test.known_failure is not None)
    ]
    return ["", paint("title", "KNOWN FAILURES"), *lines] if lines else []


def _skipped_lines(run: RunResult, paint: fmt.Paint) -> list[str]:
    """The tests a failure kept from running, so the skipped count is explained."""
    skipped = [test for test in run.tests if test.status == "skipped"]
    lines = [
        f"  {paint('skipped', '-')} {t.name}  skipped: {fmt.first_line(t.message)}" for t in skipped
    ]
    return ["", f"{paint('skipped', 'skipped')} in {fmt.run_label(run)}:", *lines] if lines else []


@dataclass
class _Tally:
    label: str
    plan: list[str]
    ended: bool = False
    started: bool = True
    """False for a run expected (``RunTally.expect``) whose RunStarted has not come."""
    statuses: dict[str, str] = field(default_factory=dict)
    """Test name -> passed, failed or skipped, for the tests that finished."""

    def names(self, status: str) -> list[str]:
        return [name for name, seen in self.statuses.items() if seen == status]

    def cancelled(self) -> list[str]:
        return [name for name in self.plan if name not in self.statuses]


class RunTally:
    """Observer for the runner that keeps what every run has done so far, for the summary of
    an interrupted ``baton run``: the runs never return their results then."""

    def __init__(self) -> None:
        self._runs: dict[str, _Tally] = {}

    def expect(self, run_id: str, suite: str, row: int, plan: list[str]) -> None:
        """A run the command will start: interrupted before it starts (the flows using a
        shared setup wait for it), its tests count as cancelled, not as absent."""
        self._runs[run_id] = _Tally(_label(suite, row), plan, started=False)

    def __call__(self, run_id: str, event: Event) -> None:
        if isinstance(event, RunStarted):
            plan = [step.name for step in event.plan]
            self._runs[run_id] = _Tally(_label(event.suite, event.row), plan)
            return
        run = self._runs.get(run_id)
        if run is None:
            return
        if isinstance(event, TestPassed):
            run.statuses[event.test] = "passed"
        elif isinstance(event, TestFailed):
            run.statuses[event.test] = "failed"
        elif isinstance(event, TestSkipped):
            run.statuses[event.test] = "skipped"
        elif isinstance(event, RunCompleted):
            run.ended = True

    def render(self, *, color: bool, max_runs: int = 20) -> str:
        """What passed, failed, was skipped and was cancelled (stopped in flight or never
        started): per run that did not pass whole, then the totals."""
        paint = painter(color)
        title = paint("title", "INTERRUPTED")
        runs = list(self._runs.values())
        if not any(run.started for run in runs):
            return f"{title} before any test started"
        lines = ["", title]
        unfinished = [run for run in runs if run.cancelled() or run.names("failed")]
        for run in unfinished[:max_runs]:
            lines.append(f"{paint('bold', run.label)}: {_counts([run])}")
            for status in ("failed", "skipped"):
                if names := run.names(status):
                    lines.append(f"  {paint(status, status)}: {fmt.clip(', '.join(names), 100)}")
            if cancelled := run.cancelled():
                lines.append(f"  cancelled: {fmt.clip(', '.join(cancelled), 100)}")
        if len(unfinished) > max_runs:
            lines.append(f"… and {len(unfinished) - max_runs} more runs")
        totals = _counts(runs)
        if len(runs) > 1:
            ended = sum(1 for run in runs if run.ended)
            totals = f"{len(runs)} runs, {ended} finished; tests: {totals}"
        lines += ["", totals]
        return "\n".join(lines)


def _label(suite: str, row: int) -> str:
    return f"{suite} [row {row}]" if row >= 0 else suite


def _counts(runs: list[_Tally]) -> str:
    def total(status: str) -> int:
        return sum(len(run.names(status)) for run in runs)

    cancelled = sum(len(run.cancelled()) for run in runs)
    tally = fmt.counts(total("passed"), total("failed"), total("skipped"))
    return f"{tally}, {cancelled} cancelled"
