"""Flow files from disk into typed Structs, with every problem reported by file and path.

The loader does no network I/O and renders nothing: it checks what can be checked on one
file alone. Checks that need all tests at once (dependencies, cycles, undefined
variables) belong to the planner.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import jsonpath_rfc9535
import msgspec

from orchestrator import templating
from orchestrator.errors import Problem, UsageError
from orchestrator.model import Capture, Expect, Flow, Predicate, Test, seconds

_STATUS = re.compile(r"^([1-5]xx|[1-5]\d\d)$", re.IGNORECASE)
_MSGSPEC_PATH = re.compile(r"^(?P<message>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
FLOW_SUFFIXES = (".yaml", ".yml")
T = TypeVar("T")


@dataclass(frozen=True)
class LoadedFlow:
    path: Path
    flow: Flow
    digest: str
    """sha256 of the file's bytes: which version of the suite a run ran."""

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    @property
    def label(self) -> str:
        return str(self.path)


def find_flows(paths: list[Path]) -> list[Path]:
    """Flow files named on the command line; a directory means the flow files directly in it."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.iterdir() if p.suffix in FLOW_SUFFIXES))
        elif path.exists():
            found.append(path)
        else:
            raise UsageError([Problem(str(path), "", "no such file or directory")])
    if not found:
        raise UsageError([Problem(", ".join(map(str, paths)), "", "no flow files (*.yaml) here")])
    return found


def load_flow(path: Path) -> LoadedFlow:
    """Decode and check one flow file; raises UsageError listing every problem found."""
    label = str(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError([Problem(label, "", f"cannot read: {exc.strerror}")]) from None
    try:
        raw = msgspec.yaml.decode(data)
    except msgspec.DecodeError as exc:
        message = " ".join(str(exc).replace('in "<byte string>", ', "").split())
        raise UsageError([Problem(label, "", f"not valid YAML: {message}")]) from None
    if not isinstance(raw, dict):
        raise UsageError([Problem(label, "", "a flow file is a mapping with name and tests")])

    problems: list[Problem] = []
    raw_tests = raw.get("tests")
    tests: dict[str, Test] = {}
    if isinstance(raw_tests, dict) and raw_tests:
        for name, raw_test in raw_tests.items():
            test = _convert(_yaml_on(raw_test), Test, label, f"tests.{name}", problems)
            if test is not None:
                tests[str(name)] = test
    else:
        problems.append(Problem(label, "tests", "expected a mapping of test names to tests"))
    flow = _convert(_yaml_on({**raw, "tests": {}}), Flow, label, "", problems)
    if flow is not None:
        flow = msgspec.structs.replace(flow, tests=tests)
        problems.extend(_check(flow, label))
    if flow is None or problems:
        raise UsageError(problems)
    return LoadedFlow(path, flow, hashlib.sha256(data).hexdigest())


def _yaml_on(raw: Any) -> Any:
    """YAML 1.1 reads a bare ``on`` key as true: give ``retries: {on: [5xx]}`` its key back."""
    if not isinstance(raw, dict):
        return raw
    fixed = dict(raw)
    parent = fixed.get("defaults") if "defaults" in fixed else fixed
    if isinstance(parent, dict) and isinstance(parent.get("retries"), dict):
        retries = parent["retries"]
        if True in retries:
            parent = dict(parent)
            parent["retries"] = {("on" if k is True else k): v for k, v in retries.items()}
            if "defaults" in fixed:
                fixed["defaults"] = parent
            else:
                fixed = parent
    return fixed


def _convert(raw: Any, kind: type[T], label: str, where: str, problems: list[Problem]) -> T | None:
    try:
        return msgspec.convert(raw, kind)
    except msgspec.ValidationError as exc:
        match = _MSGSPEC_PATH.match(str(exc))
        assert match is not None
        path = (where + (match.group("path") or "")).lstrip(".")
        message = match.group("message")
        problems.append(Problem(label, path, message[0].lower() + message[1:].replace("`", "")))
        return None


def _check(flow: Flow, label: str) -> Iterator[Problem]:
    def problem(where: str, message: str, hint: str = "") -> Problem:
        return Problem(label, where, message, hint)

    for where, value in _durations(flow):
        try:
            seconds(value)
        except ValueError as exc:
            yield problem(where, str(exc))
    for where, text in _templates(flow):
        try:
            templating.references(text)
        except templating.TemplateError as exc:
            yield problem(where, f"template does not parse: {exc}", f"in {text!r}")
    for name, test in flow.tests.items():
        at = f"tests.{name}"
        for expect_at, expect in (("expect", test.expect), ("until", test.until)):
            if expect is not None:
                yield from (problem(f"{at}.{expect_at}.{w}", m) for w, m in _check_expect(expect))
        for capture_name, capture in test.capture.items():
            yield from (problem(f"{at}.capture.{capture_name}", m) for m in _check_capture(capture))
        if test.until is not None and test.until.max_attempts < 1:
            yield problem(f"{at}.until.max_attempts", "must be at least 1")


def _check_expect(expect: Expect) -> Iterator[tuple[str, str]]:
    statuses = expect.status if isinstance(expect.status, list) else [expect.status]
    for status in statuses:
        if status is not None and not _STATUS.match(str(status)):
            yield "status", f'expected a status code or class like 200 or "2xx", got {status!r}'
    for path in expect.json:
        if not templating.has_template(path):
            error = _jsonpath_error(path)
            if error:
                yield f"json.{path}", error
    checks = [*expect.json.values(), *expect.headers.values(), expect.duration_ms]
    for check in checks:
        if isinstance(check, Predicate) and check.matches is not None:
            yield from (("matches", e) for e in _regex_error(check.matches))
    if expect.body is not None and expect.body.matches is not None:
        yield from (("body.matches", e) for e in _regex_error(expect.body.matches))


def _check_capture(capture: Capture) -> Iterator[str]:
    try:
        kind, value = capture.source()
    except ValueError as exc:
        yield str(exc)
        return
    if kind == "json":
        error = _jsonpath_error(value)
        if error:
            yield error
    elif kind == "regex":
        yield from _regex_error(value)


def _jsonpath_error(path: str) -> str | None:
    try:
        jsonpath_rfc9535.compile(path)
    except jsonpath_rfc9535.JSONPathError as exc:
        return f"JSONPath {path!r} does not parse: {exc}"
    return None


def _regex_error(pattern: str) -> Iterator[str]:
    if templating.has_template(pattern):
        return
    try:
        re.compile(pattern)
    except re.error as exc:
        yield f"regular expression {pattern!r} does not compile: {exc}"


def _durations(flow: Flow) -> Iterator[tuple[str, Any]]:
    yield "defaults.timeout", flow.defaults.timeout
    retry_specs: list[tuple[str, Any]] = [("defaults.retries", flow.defaults.retries)]
    for name, test in flow.tests.items():
        if test.request.timeout is not None:
            yield f"tests.{name}.request.timeout", test.request.timeout
        if test.until is not None:
            yield f"tests.{name}.until.interval", test.until.interval
        retry_specs.append((f"tests.{name}.retries", test.retries))
    for where, retry in retry_specs:
        if retry is not None and not isinstance(retry, int):
            yield f"{where}.delay", retry.delay
            yield f"{where}.max_delay", retry.max_delay


def _templates(flow: Flow) -> Iterator[tuple[str, str]]:
    for text in templating.template_strings(flow.base_url):
        yield "base_url", text
    for text in templating.template_strings(flow.defaults.headers):
        yield "defaults.headers", text
    for key, value in flow.variables.items():
        for text in templating.template_strings(value):
            yield f"variables.{key}", text
    for name, test in flow.tests.items():
        for part, value in test_parts(test):
            for text in templating.template_strings(value):
                yield f"tests.{name}.{part}", text


def test_parts(test: Test) -> Iterator[tuple[str, Any]]:
    """The parts of a test that may hold templates, as plain data."""
    yield "request", msgspec.to_builtins(test.request)
    if test.expect is not None:
        yield "expect", msgspec.to_builtins(test.expect)
    if test.until is not None:
        yield "until", msgspec.to_builtins(test.until)
