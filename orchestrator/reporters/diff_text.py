"""``baton diff`` as text: one line per test (status, response, duration), then what
changed under it (shape, captures). Unchanged tests stay one quiet line."""

from __future__ import annotations

from orchestrator.reporters._format import duration, show
from orchestrator.run_diff import RunDiff, RunSide, TestDifference

_ARROW = " -> "


def diff_text(found: RunDiff) -> str:
    lines = [_side("A", found.a), _side("B", found.b), ""]
    rows = [("test", "status", "response", "duration")]
    rows += [_row(test) for test in found.tests]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for index, row in enumerate(rows):
        cells = [cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)]
        lines.append("  ".join([*cells, row[3]]).rstrip())
        if index:
            lines += _details(found.tests[index - 1])
    changed = sum(test.changed for test in found.tests)
    summary = f"{changed} of {len(found.tests)} test(s) changed"
    if found.regressions:
        summary += f"; passed in A, not in B: {', '.join(found.regressions)}"
    lines += ["", summary]
    return "\n".join(lines)


def _side(label: str, side: RunSide) -> str:
    where = f" in {side.environment}" if side.environment else ""
    continues = f", continues run {side.continues}" if side.continues else ""
    return f"{label}: run {side.run_id} ({side.suite}{where}, {side.status}){continues}"


def _pair(a: object, b: object) -> str:
    shown_a = "-" if a is None else str(a)
    shown_b = "-" if b is None else str(b)
    return shown_a if shown_a == shown_b else shown_a + _ARROW + shown_b


def _row(test: TestDifference) -> tuple[str, str, str, str]:
    if test.presence != "both":
        status = test.status_a or test.status_b
        return test.name, f"{test.presence} ({status})", "", ""
    return (
        test.name,
        _pair(test.status_a, test.status_b),
        _pair(test.response_a, test.response_b),
        _durations(test),
    )


def _durations(test: TestDifference) -> str:
    a = None if test.duration_a_ms is None else duration(test.duration_a_ms)
    b = None if test.duration_b_ms is None else duration(test.duration_b_ms)
    text = a or "-" if a == b else f"{a or '-'}{_ARROW}{b or '-'}"
    if test.duration_flag:
        ratio = f"{test.duration_ratio:.1f}x " if test.duration_ratio is not None else ""
        text += f"  !! {ratio}{test.duration_flag}"
    return text


def _details(test: TestDifference) -> list[str]:
    lines = [f"    shape: {note}" for note in test.shape_notes]
    for change in test.shape:
        if change.change == "type changed":
            what = f"type {change.type_a}{_ARROW}{change.type_b}"
        else:
            what = f"{change.change} ({change.type_b or change.type_a})"
        lines.append(f"    shape: {change.path} {what}")
    for capture in test.captures:
        if capture.change == "unchanged":
            continue
        if capture.secret:
            what = (
                "unknown (secret, recorded with another key)"
                if capture.change == "unknown"
                else f"{capture.change} (secret)"
            )
        elif capture.change == "changed":
            what = f"{show(capture.a)}{_ARROW}{show(capture.b)}"
        elif capture.change == "added":
            what = f"added: {show(capture.b)}"
        else:
            what = f"removed (was {show(capture.a)})"
        lines.append(f"    capture {capture.name}: {what}")
    return lines
