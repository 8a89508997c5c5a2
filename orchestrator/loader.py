"""Flow files from disk into typed Structs, with every problem reported by file and path.

The loader does no network I/O and renders nothing: it checks what can be checked on one
file alone. Checks that need all tests at once (dependencies, cycles, undefined
variables) belong to the planner.
"""

from __future__ import annotations

import difflib
import hashlib
import re
import tempfile
import types
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

import jsonpath_rfc9535
import msgspec
import regex
import yaml

from orchestrator import templating
from orchestrator.errors import Problem, UsageError
from orchestrator.model import Auth, Capture, Expect, Flow, Predicate, Service, Test, seconds
from orchestrator.requests_check import request_problems

_STATUS = re.compile(r"^([1-5]xx|[1-5]\d\d)$", re.IGNORECASE)
_MSGSPEC_PATH = re.compile(r"^(?P<message>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
FLOW_SUFFIXES = (".yaml", ".yml")


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


MAX_FLOW_BYTES = 1024 * 1024
"""The largest flow file read (about 12,000 tests; the shop's biggest example is ~6 KB)."""
MAX_DEPTH = 64
"""How deep ``[`` and ``{`` may nest (the shop's examples: 6)."""
MAX_VALUES = 1_000_000
"""How many values a flow file may hold with its YAML aliases expanded: more than a file
of MAX_FLOW_BYTES can hold without aliases."""
_BASE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_BASE_LOADER):  # type: ignore[misc, valid-type]
    """YAML without its implicit timestamps: ``2026-12-31`` stays text, so that the schema
    checks a date where the flow uses one and names the place; YAML itself would refuse
    ``2026-13-01`` with no line and no field."""

    yaml_implicit_resolvers: ClassVar[dict[str, list[tuple[str, Any]]]] = {
        first: [pair for pair in pairs if pair[0] != "tag:yaml.org,2002:timestamp"]
        for first, pairs in _BASE_LOADER.yaml_implicit_resolvers.items()
    }


_LOADER = _Loader
_NOT_BRACKETS = bytes(set(range(256)) - set(b"[]{}"))


def load_flow(path: Path) -> LoadedFlow:
    """Decode and check one flow file; raises UsageError listing every problem found."""
    label = str(path)
    try:
        size = path.stat().st_size
        if size > MAX_FLOW_BYTES:
            raise UsageError([_too_large(label, size)])
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError([Problem(label, "", f"cannot read: {exc.strerror}")]) from None
    raw = decode_yaml(data, label)
    if not isinstance(raw, dict):
        raise UsageError([Problem(label, "", "a flow file is a mapping with name and tests")])
    raw = _yaml_on(raw)
    raw_tests = raw.get("tests")
    if not isinstance(raw_tests, dict) or not raw_tests:
        problems = [Problem(label, "tests", "expected a mapping of test names to tests")]
        problems += _schema_problems({**raw, "tests": {}}, Flow, label)
        raise UsageError(problems)
    raw = {**raw, "tests": {str(name): _yaml_on(test) for name, test in raw_tests.items()}}
    try:
        flow = msgspec.convert(raw, Flow)
    except msgspec.ValidationError:
        problems = _schema_problems(raw, Flow, label)
        # the other checks still run on the parts that are valid, so that one pass lists
        # every problem of the file
        problems += _check(_valid_part(raw), label)
        raise UsageError(problems) from None
    problems = [*_check(flow, label), *request_problems(flow, label, path.parent)]
    if problems:
        raise UsageError(problems)
    return LoadedFlow(path, flow, hashlib.sha256(data).hexdigest())


def load_text(content: str, name: str) -> LoadedFlow:
    """A flow file's text, checked as ``load_flow`` checks a file, labelled ``name`` (a bare
    file name): a flow uploaded to the service, loaded by the service and by the worker
    that runs it. Raises UsageError."""
    with tempfile.TemporaryDirectory(prefix="baton-flow-") as folder:
        path = Path(folder) / name
        path.write_bytes(content.encode("utf-8", "surrogatepass"))
        loaded = load_flow(path)
    # the label runs record as their source, and no folder to read schema files from
    return replace(loaded, path=Path(name))


def with_services(loaded: LoadedFlow, declared: Any, label: str) -> LoadedFlow:
    """The flow with the services an environment file (``label``) declares under
    ``services:``, each replacing the flow's of the same name. Raises UsageError."""
    try:
        services = msgspec.convert(declared, dict[str, Service])
    except msgspec.ValidationError:
        raise UsageError(
            _schema_problems(declared, dict[str, Service], label, "services")
        ) from None
    problems = []
    for name, service in services.items():
        for field in ("timeout", "degraded_after"):
            try:
                seconds(getattr(service, field))
            except ValueError as exc:
                problems.append(Problem(label, f"services.{name}.{field}", str(exc)))
        for text in templating.template_strings(service.base_url):
            try:
                templating.references(text)
            except templating.TemplateError as exc:
                problems.append(
                    Problem(label, f"services.{name}.base_url", f"template does not parse: {exc}")
                )
    if problems:
        raise UsageError(problems)
    flow = msgspec.structs.replace(loaded.flow, services={**loaded.flow.services, **services})
    return LoadedFlow(loaded.path, flow, loaded.digest)


def _valid_part(raw: dict[str, Any]) -> Flow:
    """The flow with only its valid tests, and the defaults if the rest is invalid."""
    tests = {}
    for name, test in raw["tests"].items():
        try:
            tests[name] = msgspec.convert(test, Test)
        except msgspec.ValidationError:
            continue
    try:
        flow = msgspec.convert({**raw, "tests": {}}, Flow)
    except msgspec.ValidationError:
        flow = Flow(name="", tests={})
    return msgspec.structs.replace(flow, tests=tests)


def _too_large(label: str, size: int) -> Problem:
    return Problem(
        label,
        "",
        f"the file is {size} bytes; the limit is {MAX_FLOW_BYTES} bytes (1 MiB)",
        "split it into several flow files",
    )


def decode_yaml(data: bytes, label: str) -> Any:
    """A YAML document as plain data, refusing first what would make decoding itself a
    danger: more than MAX_FLOW_BYTES, brackets nested so deep that the YAML library's C
    code overflows its stack, or aliases (``*name``) that expand a few lines into billions
    of values (each would hang or kill the process long before a schema check); then a
    key given twice in one mapping, which YAML would resolve silently. Raises UsageError."""
    if len(data) > MAX_FLOW_BYTES:
        raise UsageError([_too_large(label, len(data))])
    if b"\0" in data:
        raise UsageError([Problem(label, "", "not a text file (it holds NUL bytes)")])
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        where = f"byte {exc.start}"
        raise UsageError([Problem(label, "", f"not a UTF-8 text file (at {where})")]) from None
    if _flow_depth(data) > MAX_DEPTH:
        raise UsageError(
            [Problem(label, "", f"values are nested more than {MAX_DEPTH} levels deep")]
        )
    loader = _LOADER(data)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        # without an anchor (&name) there is no alias, and nothing to count
        if b"&" in data and _expanded_size(root, MAX_VALUES) > MAX_VALUES:
            raise UsageError(
                [
                    Problem(
                        label,
                        "",
                        f"the file holds more than {MAX_VALUES} values once its YAML aliases "
                        "are expanded",
                        "use fewer aliases (*name), or none",
                    )
                ]
            )
        duplicates = list(_duplicate_keys(root, label))
        if duplicates:
            raise UsageError(duplicates)
        return loader.construct_document(root)
    except yaml.YAMLError as exc:
        raise UsageError([_yaml_problem(exc, data, label)]) from None
    except (ValueError, LookupError, AttributeError) as exc:  # a constructor's refusal
        raise UsageError([Problem(label, "", f"not valid YAML: {exc}")]) from None
    finally:
        loader.dispose()


def _yaml_problem(exc: yaml.YAMLError, data: bytes, label: str) -> Problem:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    what = " ".join(str(getattr(exc, "problem", None) or exc).split())
    if mark is None:
        return Problem(label, "", f"not valid YAML: {what}")
    where = f"line {mark.line + 1}, column {mark.column + 1}"
    lines = data.decode("utf-8").splitlines()
    line = lines[mark.line] if mark.line < len(lines) else ""
    # libyaml's message for a tab ("found character that cannot start any token") does
    # not name the character; a tab is by far the commonest cause
    indent = line[: len(line) - len(line.lstrip(" \t"))]
    if "\t" in indent or line[mark.column : mark.column + 1] == "\t":
        column = (indent.index("\t") if "\t" in indent else mark.column) + 1
        return Problem(
            label,
            "",
            f"line {mark.line + 1}, column {column}: a tab character; YAML indents with "
            "spaces only",
            "replace the tab with spaces",
        )
    return Problem(label, "", f"not valid YAML at {where}: {what}")


def _flow_depth(data: bytes) -> int:
    """How deep ``[`` and ``{`` nest: an upper bound, counting those inside quoted strings
    and comments too (telling those apart takes a YAML parser, the thing to protect)."""
    depth = deepest = 0
    for char in data.translate(None, _NOT_BRACKETS):
        if char in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif depth:
            depth -= 1
    return deepest


def _expanded_size(root: yaml.Node, limit: int) -> int:
    """How many values the document holds once its aliases are expanded, counted without
    expanding them (each node once); more than ``limit`` for a recursive alias."""
    sizes: dict[int, int] = {}
    expanding: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        children = _children(node)
        if children_done:
            sizes[key] = 1 + sum(sizes[id(child)] for child in children)
            expanding.discard(key)
            if sizes[key] > limit:
                return sizes[key]
            continue
        if key in sizes:
            continue
        if key in expanding:
            return limit + 1
        expanding.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in children if id(child) not in sizes)
    return sizes[id(root)]


def _duplicate_keys(root: yaml.Node, label: str) -> Iterator[Problem]:
    """A key given twice in one mapping: YAML keeps the last one silently, so a second
    test of the same name would replace the first without a word."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys: set[tuple[str, str]] = set()
            for key, _ in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value != "<<":
                    if (key.tag, key.value) in keys:
                        line = key.start_mark.line + 1
                        yield Problem(
                            label,
                            f"line {line}",
                            f"{key.value!r} is given twice in one mapping; the second would "
                            "replace the first",
                            "rename or remove one",
                        )
                    keys.add((key.tag, key.value))
        stack.extend(_children(node))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


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


def _schema_problems(raw: Any, kind: Any, label: str, where: str = "") -> list[Problem]:
    """Every schema problem in ``raw`` read as ``kind``, not only msgspec's first: the
    conversion is retried part by part, down to the values that fail. Only called once a
    conversion has failed, so a valid file pays nothing for it."""
    try:
        msgspec.convert(raw, kind)
    except msgspec.ValidationError as exc:
        failure = str(exc)
    else:
        return []
    struct = _struct_of(kind)
    if struct is not None and isinstance(raw, dict):
        found = _struct_problems(raw, struct, label, where)
    elif get_origin(kind) is dict and isinstance(raw, dict):
        value_type = get_args(kind)[1]
        found = [
            problem
            for key, value in raw.items()
            for problem in _schema_problems(value, value_type, label, _join(where, key))
        ]
    elif get_origin(kind) is list and isinstance(raw, list):
        found = [
            problem
            for index, item in enumerate(raw)
            for problem in _schema_problems(item, get_args(kind)[0], label, f"{where}[{index}]")
        ]
    else:
        found = []
    return found or [_leaf_problem(raw, kind, failure, label, where)]


def _struct_problems(raw: dict[Any, Any], struct: Any, label: str, where: str) -> list[Problem]:
    fields = {field.encode_name: field for field in msgspec.structs.fields(struct)}
    problems = []
    suggested = set()
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"did you mean {close[0]!r}?" if close else "known: " + ", ".join(fields)
            problems.append(Problem(label, where, f"unknown field {str(key)!r}", hint))
            suggested.update(close)
    for name, field in fields.items():
        if name in raw:
            problems += _schema_problems(raw[name], field.type, label, _join(where, name))
        elif field.required and name not in suggested:  # a misspelt field says it once
            problems.append(Problem(label, where, f"the field {name!r} is required"))
    return problems


def _struct_of(kind: Any) -> Any:
    """The Struct type ``kind`` is, or the one in its union (``Retry | int | None``)."""
    for candidate in _members(kind):
        if isinstance(candidate, type) and issubclass(candidate, msgspec.Struct):
            return candidate
    return None


def _leaf_problem(raw: Any, kind: Any, failure: str, label: str, where: str) -> Problem:
    if date in _members(kind):
        return Problem(
            label, where, f"{raw!r} is not a date", "write it as YYYY-MM-DD, such as 2026-12-31"
        )
    meta = _number_meta(kind)
    if meta is not None and _is_number(raw, kind):
        low, high = meta.ge, meta.le
        allowed = f"from {low} to {high}" if high is not None else f"at least {low}"
        return Problem(label, where, f"{raw!r} is out of range: it must be {allowed}")
    words = [str(v) for m in _members(kind) if get_origin(m) is Literal for v in get_args(m)]
    if words and isinstance(raw, str):
        struct = _struct_of(kind)
        known = " or ".join(words) + (", or a mapping" if struct is not None else "")
        return Problem(label, where, f"{raw!r} is not known here", f"write {known}")
    match = _MSGSPEC_PATH.match(failure)
    assert match is not None
    path = _join(where, (match.group("path") or "").lstrip("."))
    message = match.group("message")
    return Problem(label, path, message[0].lower() + message[1:].replace("`", ""))


def _number_meta(kind: Any) -> msgspec.Meta | None:
    """The bounds the model sets on a number (``Annotated[int, Meta(ge=0)]``), if any."""
    for candidate in _members(kind):
        if get_origin(candidate) is Annotated:
            for meta in candidate.__metadata__:
                if isinstance(meta, msgspec.Meta) and meta.ge is not None:
                    return meta
    return None


def _is_number(raw: Any, kind: Any) -> bool:
    """Whether ``raw`` has the type of the bounded number in ``kind`` (3.5 is no count)."""
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        return False
    bounded = [get_args(m)[0] for m in _members(kind) if get_origin(m) is Annotated]
    return float in bounded or isinstance(raw, int)


def _members(kind: Any) -> tuple[Any, ...]:
    """The types of a union (``A | B``, or ``Union[A, B]`` where one is Annotated)."""
    return get_args(kind) if get_origin(kind) in (Union, types.UnionType) else (kind,)


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where and key != "" else f"{where}{key}"


def _check(flow: Flow, label: str) -> Iterator[Problem]:
    def problem(where: str, message: str, hint: str = "") -> Problem:
        return Problem(label, where, message, hint)

    for where, value in _durations(flow):
        try:
            length = seconds(value)
        except ValueError as exc:
            yield problem(where, str(exc))
            continue
        if where.endswith(".timeout") and length == 0:
            yield problem(where, "a timeout of 0 would fail every request", "give it a length")
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
        if test.until is not None and test.until.next is not None:
            yield from (problem(f"{at}.until.next", m) for m in _check_capture(test.until.next))
            if test.until.next.collect or test.until.next.secret is not None:
                yield problem(
                    f"{at}.until.next",
                    "collect and secret belong to captures, not to until.next",
                    "capture the values in the test's capture instead",
                )


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
        regex.compile(pattern)  # what the run compiles it with (captures.compile_regex)
    except regex.error as exc:
        yield f"regular expression {pattern!r} does not compile: {exc}"


def _durations(flow: Flow) -> Iterator[tuple[str, Any]]:
    yield "defaults.timeout", flow.defaults.timeout
    for name, service in flow.services.items():
        yield f"services.{name}.timeout", service.timeout
        yield f"services.{name}.degraded_after", service.degraded_after
    retry_specs: list[tuple[str, Any]] = [("defaults.retries", flow.defaults.retries)]
    auths = [("defaults.auth", flow.defaults.auth)]
    auths += [
        (f"tests.{name}.request.auth", test.request.auth) for name, test in flow.tests.items()
    ]
    for where, auth in auths:
        if isinstance(auth, Auth) and auth.oauth2 is not None:
            refresh = auth.oauth2.refresh_before
            if not (isinstance(refresh, str) and templating.has_template(refresh)):
                yield f"{where}.oauth2.refresh_before", refresh
    for name, test in flow.tests.items():
        if test.request.timeout is not None:
            yield f"tests.{name}.request.timeout", test.request.timeout
        if test.until is not None and test.until.interval is not None:
            yield f"tests.{name}.until.interval", test.until.interval
        retry_specs.append((f"tests.{name}.retries", test.retries))
        for capture_name, spec in test.capture.items():
            if spec.ttl is not None:
                yield f"tests.{name}.capture.{capture_name}.ttl", spec.ttl
    for where, retry in retry_specs:
        if retry is not None and not isinstance(retry, int):
            yield f"{where}.delay", retry.delay
            yield f"{where}.max_delay", retry.max_delay


def _templates(flow: Flow) -> Iterator[tuple[str, str]]:
    for text in templating.template_strings(flow.base_url):
        yield "base_url", text
    for text in templating.template_strings(flow.defaults.headers):
        yield "defaults.headers", text
    for text in templating.template_strings(msgspec.to_builtins(flow.defaults.tls)):
        yield "defaults.tls", text
    for text in templating.template_strings(msgspec.to_builtins(flow.defaults.auth)):
        yield "defaults.auth", text
    for name, service in flow.services.items():
        for text in templating.template_strings(service.base_url):
            yield f"services.{name}.base_url", text
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
    if test.tls is not None:
        yield "tls", msgspec.to_builtins(test.tls)
