"""Two runs compared test by test: ``baton diff RUN_A RUN_B``, the service's
``GET /api/v1/runs/{a}/diff/{b}`` and the dashboard's ``/runs/{a}/diff/{b}``.

A pure function of the two runs' events. Per test (the union of both plans): the status,
the duration (flagged when it changes a lot), the response status, the shape of the
response body (JSON paths added, removed or of another type) and the captures. A secret
capture is only ever said to be changed or unchanged: its clear values are compared (each
encryption of the same value is a different ciphertext), never shown.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from events import types as ev
from events.context import fold
from events.errors import SecretError
from events.secrets import AUTH_PREFIX, Cipher
from orchestrator.errors import UsageError

LARGE_RATIO = 1.5
"""A duration is flagged when one side is at least this many times the other..."""
LARGE_MS = 50.0
"""...and the two differ by at least this many milliseconds (so 2 ms -> 4 ms is not)."""

Presence = Literal["both", "only in A", "only in B", "carried over into A", "carried over into B"]
"""``carried over into B``: B is a rerun, and the test, not in its plan, kept its result
from the run B continues: not sent again, so not a change and not a regression."""
CaptureChange = Literal["changed", "unchanged", "added", "removed", "unknown"]
ShapeKind = Literal["added", "removed", "type changed"]


class UnknownRun(UsageError):
    """No events of that run in the store (the service's 404)."""


class RunSide(msgspec.Struct, frozen=True):
    run_id: str
    suite: str
    environment: str
    status: str
    """running, passed, failed, cancelled or error."""
    continues: str = ""
    """The run this one reruns, or ""."""


class ShapeDifference(msgspec.Struct, frozen=True):
    path: str
    """A JSONPath; array items are ``[*]``."""
    change: ShapeKind
    type_a: str | None
    type_b: str | None


class CaptureDifference(msgspec.Struct, frozen=True):
    name: str
    change: CaptureChange
    """``unknown``: a secret that this key cannot decrypt (recorded with another key)."""
    secret: bool
    a: Any = None
    """The value in A; always null for a secret."""
    b: Any = None


class TestDifference(msgspec.Struct, frozen=True):
    __test__ = False  # not a pytest class
    name: str
    presence: Presence
    status_a: str | None
    status_b: str | None
    duration_a_ms: float | None
    duration_b_ms: float | None
    duration_ratio: float | None
    """B's duration over A's."""
    duration_flag: Literal["slower", "faster", ""]
    response_a: int | None
    response_b: int | None
    shape: list[ShapeDifference]
    shape_notes: list[str]
    """Why a body's shape could not be compared (not JSON, or cut short)."""
    captures: list[CaptureDifference]

    @property
    def changed(self) -> bool:
        if self.presence.startswith("carried over"):
            return False
        return (
            self.presence != "both"
            or self.status_a != self.status_b
            or self.response_a != self.response_b
            or bool(self.duration_flag or self.shape or self.shape_notes)
            or any(c.change != "unchanged" for c in self.captures)
        )

    @property
    def regressed(self) -> bool:
        """It passed in A and does not pass in B."""
        carried = self.presence == "carried over into B"
        return self.status_a == "passed" and self.status_b != "passed" and not carried


class RunDiff(msgspec.Struct, frozen=True):
    a: RunSide
    b: RunSide
    tests: list[TestDifference]
    regressions: list[str]
    """Tests that passed in A and did not pass in B."""


@dataclass
class _Test:
    status: str = "not run"
    duration_ms: float | None = None
    response: ev.ResponseReceived | None = None


@dataclass
class _Run:
    side: RunSide
    plan: list[str]
    tests: dict[str, _Test] = field(default_factory=dict)
    captured: dict[str, dict[str, Any]] = field(default_factory=dict)
    secret: set[str] = field(default_factory=set)


def _read(recorded: Sequence[ev.RecordedEvent], run_id: str) -> _Run:
    started = next((item.event for item in recorded if isinstance(item.event, ev.RunStarted)), None)
    if started is None:
        raise UnknownRun(f"no run {run_id!r} in the event store (see `baton runs`)")
    context = fold(recorded)
    run = _Run(
        RunSide(run_id, started.suite, started.environment, context.status, started.continues),
        [planned.name for planned in started.plan],
        captured=context.captured,
        secret=set(context.secret_names),
    )
    for item in recorded:
        event = item.event
        test = getattr(event, "test", None)
        if not isinstance(test, str):
            continue
        seen = run.tests.setdefault(test, _Test())
        if isinstance(event, ev.TestStarted):
            seen.status = "running"
        elif isinstance(event, ev.ResponseReceived):
            seen.response = event
        elif isinstance(event, ev.TestPassed | ev.TestFailed):
            seen.status = "passed" if isinstance(event, ev.TestPassed) else "failed"
            seen.duration_ms = event.duration_ms
        elif isinstance(event, ev.TestSkipped):
            seen.status, seen.duration_ms = "skipped", None
    return run


def diff(
    events_a: Sequence[ev.RecordedEvent],
    events_b: Sequence[ev.RecordedEvent],
    run_a: str,
    run_b: str,
    cipher: Cipher | None = None,
) -> RunDiff:
    """Run ``run_a`` (whose stream is ``events_a``) against ``run_b``. ``cipher`` opens the
    secret captures to compare them; without it (or with another key) they are ``unknown``.
    Raises UnknownRun."""
    a, b = _read(events_a, run_a), _read(events_b, run_b)
    names = a.plan + [name for name in b.plan if name not in a.plan]
    tests = [_test(name, a, b, cipher) for name in names]
    return RunDiff(a.side, b.side, tests, [t.name for t in tests if t.regressed])


def _test(name: str, a: _Run, b: _Run, cipher: Cipher | None) -> TestDifference:
    in_a, in_b = name in a.plan, name in b.plan
    presence: Presence = "both"
    if in_a and not in_b:
        presence = "carried over into B" if b.side.continues else "only in A"
    elif in_b and not in_a:
        presence = "carried over into A" if a.side.continues else "only in B"
    ta, tb = a.tests.get(name, _Test()), b.tests.get(name, _Test())
    ratio, flag = _durations(ta.duration_ms, tb.duration_ms) if presence == "both" else (None, "")
    shape: list[ShapeDifference] = []
    notes: list[str] = []
    if presence == "both" and ta.response is not None and tb.response is not None:
        shape, notes = _shape(ta.response, tb.response)
    return TestDifference(
        name=name,
        presence=presence,
        status_a=ta.status if in_a else None,
        status_b=tb.status if in_b else None,
        duration_a_ms=ta.duration_ms,
        duration_b_ms=tb.duration_ms,
        duration_ratio=ratio,
        duration_flag=flag,
        response_a=ta.response.status if ta.response else None,
        response_b=tb.response.status if tb.response else None,
        shape=shape,
        shape_notes=notes,
        captures=_captures(name, a, b, cipher) if presence == "both" else [],
    )


def _durations(
    a: float | None, b: float | None
) -> tuple[float | None, Literal["slower", "faster", ""]]:
    if a is None or b is None:
        return None, ""
    ratio = round(b / a, 2) if a > 0 else None
    if abs(b - a) < LARGE_MS or min(a, b) * LARGE_RATIO > max(a, b):
        return ratio, ""
    return ratio, "slower" if b > a else "faster"


# ---- captures -----------------------------------------------------------------------------


def _is_secret(name: str, run: _Run) -> bool:
    return name.startswith(AUTH_PREFIX) or name in run.secret


def _captures(test: str, a: _Run, b: _Run, cipher: Cipher | None) -> list[CaptureDifference]:
    values_a, values_b = a.captured.get(test, {}), b.captured.get(test, {})
    names = list(values_a) + [name for name in values_b if name not in values_a]
    found = []
    for name in names:
        secret = _is_secret(name, a) or _is_secret(name, b)
        change: CaptureChange
        if name not in values_b:
            change = "removed"
        elif name not in values_a:
            change = "added"
        elif secret:
            clear_a = _opened(values_a[name], _is_secret(name, a), cipher)
            clear_b = _opened(values_b[name], _is_secret(name, b), cipher)
            if clear_a is None or clear_b is None:
                change = "unknown"
            else:
                change = "unchanged" if clear_a == clear_b else "changed"
        else:
            change = "unchanged" if values_a[name] == values_b[name] else "changed"
        shown_a = None if secret else values_a.get(name)
        shown_b = None if secret else values_b.get(name)
        found.append(CaptureDifference(name, change, secret, shown_a, shown_b))
    return found


def _opened(value: Any, encrypted: bool, cipher: Cipher | None) -> str | None:
    """A secret's clear text, to compare (a capture secret in one run only is plain in the
    other: compared as the JSON text it would have been encrypted in)."""
    if not encrypted:
        return value if isinstance(value, str) else msgspec.json.encode(value).decode()
    if cipher is None:
        return None
    try:
        return cipher.decrypt(value)
    except SecretError:
        return None


# ---- shapes -------------------------------------------------------------------------------

_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _shape(
    response_a: ev.ResponseReceived, response_b: ev.ResponseReceived
) -> tuple[list[ShapeDifference], list[str]]:
    notes = []
    parsed = []
    for side, response in (("A", response_a), ("B", response_b)):
        paths = _paths_of(response)
        if isinstance(paths, str):
            notes.append(f"{side}: {paths}")
        parsed.append(paths)
    paths_a, paths_b = parsed
    if isinstance(paths_a, str) or isinstance(paths_b, str):
        # neither is JSON (an HTML page, no body): there is no shape to compare
        neither = all(note.endswith(("not JSON", "no body")) for note in notes) and len(notes) == 2
        return [], [] if neither else notes
    return _compared(paths_a, paths_b), []


def _paths_of(response: ev.ResponseReceived) -> dict[str, str] | str:
    """Each JSON path of the body and its type, or why there are none."""
    excerpt = response.body_excerpt
    if not excerpt.strip():
        return "no body"
    try:
        body = msgspec.json.decode(excerpt)
    except msgspec.DecodeError:
        kind = next((v for k, v in response.headers.items() if k.lower() == "content-type"), "")
        if "json" in kind.lower():
            # what replay says too: the excerpt kept (BATON_EXCERPT_LIMIT) ends mid-body
            return "the recorded body is cut short (BATON_EXCERPT_LIMIT) and does not parse"
        return "not JSON"
    types: dict[str, set[str]] = {}
    for path, kind in _walk(body, "$"):
        types.setdefault(path, set()).add(kind)
    return {path: "|".join(sorted(kinds)) for path, kinds in types.items()}


def _walk(value: Any, path: str) -> Iterator[tuple[str, str]]:
    yield path, _type_name(value)
    if isinstance(value, dict):
        for key, child in value.items():
            step = f".{key}" if _PLAIN_KEY.match(key) else f"[{msgspec.json.encode(key).decode()}]"
            yield from _walk(child, path + step)
    elif isinstance(value, list):
        for item in value:
            yield from _walk(item, path + "[*]")


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _compared(a: dict[str, str], b: dict[str, str]) -> list[ShapeDifference]:
    found: list[ShapeDifference] = []
    reported: set[str] = set()
    for path in sorted(a.keys() | b.keys(), key=_path_order):
        if any(path.startswith(parent) and path[len(parent)] in ".[" for parent in reported):
            continue  # under a path already added, removed or retyped: its children follow
        if path not in b:
            found.append(ShapeDifference(path, "removed", a[path], None))
        elif path not in a:
            found.append(ShapeDifference(path, "added", None, b[path]))
        elif a[path] != b[path]:
            found.append(ShapeDifference(path, "type changed", a[path], b[path]))
        else:
            continue
        reported.add(path)
    return found


def _path_order(path: str) -> tuple[int, str]:
    return len(re.findall(r"\.|\[", path)), path
