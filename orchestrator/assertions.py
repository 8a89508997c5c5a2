"""Assertions: an ``Expect`` checked against a received response, one result per check.

Pure functions, no network. Nothing here raises on a bad response or a bad check: a path
that does not parse, a regex that does not compile, a missing schema file or a body that
is not JSON each become a failed ``AssertionResult`` that says so, because a run must
report every problem of a test, not stop at the first one.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonpath_rfc9535
import msgspec
import regex

from orchestrator.captures import (
    MISSING,
    NOT_JSON,
    Missing,
    PatternTimeout,
    compile_path,
    compile_regex,
    excerpt,
    search,
    select,
)
from orchestrator.model import BodyExpect, Check, Expect, Predicate
from orchestrator.results import AssertionResult, ResponseView


def evaluate(expect: Expect, response: ResponseView, *, base_dir: Path) -> list[AssertionResult]:
    """Every check of ``expect`` against ``response``, in the order they are written."""
    results: list[AssertionResult] = []
    if expect.status is not None:
        results.append(_status(expect.status, response.status))
    for name, spec in expect.headers.items():
        actual = response.headers.get(name.lower(), MISSING)
        missing = f"header {name} is not in the response"
        results += check(f"header {name}", spec, actual, missing=missing, header=True)
    if expect.json:
        results += _json(expect.json, response)
    if expect.body is not None:
        results += _body(expect.body, response.text)
    if expect.schema is not None:
        results.append(_schema(expect.schema, response, base_dir))
    if expect.duration_ms is not None:
        results += check("duration_ms", expect.duration_ms, response.duration_ms)
    return results


def check_value(spec: Check, actual: Any) -> tuple[bool, str]:
    """Whether ``actual`` satisfies ``spec``, and why not (the first failure) when it does not."""
    for result in check("value", spec, actual):
        if not result.passed:
            return False, describe(result)
    return True, ""


def describe(result: AssertionResult) -> str:
    """One line for a failed result, e.g. for polling or a console summary."""
    detail = result.message or f"expected {result.expected!r}, got {result.actual!r}"
    return f"{result.subject} {result.predicate}: {detail}"


def check(
    subject: str, spec: Check, actual: Any, *, missing: str = "", header: bool = False
) -> list[AssertionResult]:
    """One result per predicate field of ``spec``; a bare value or list means ``equals``.

    ``header`` compares the text of a header with numbers and booleans written in YAML, so
    ``Content-Length: {lt: 1000}`` and ``X-Count: 5`` work on the string a header carries.
    An empty predicate means ``exists: true``: a check that cannot fail would hide typos.
    """
    if not isinstance(spec, Predicate):
        return [_run(subject, "equals", spec, actual, missing, header)]
    results = [
        _run(subject, name, getattr(spec, name), actual, missing, header) for name in _given(spec)
    ]
    return results or [_run(subject, "exists", True, actual, missing, header)]


# exists first: when it fails, it is the one result that explains the others. A field is
# given when it differs from its default: None for most, UNSET where null is a valid value.
_DEFAULTS = dict(zip(Predicate.__struct_fields__, Predicate.__struct_defaults__, strict=True))
_FIELDS = [("exists", None), *((k, v) for k, v in _DEFAULTS.items() if k != "exists")]


def _given(spec: Predicate) -> list[str]:
    return [name for name, default in _FIELDS if getattr(spec, name) is not default]


def _run(
    subject: str, name: str, expected: Any, actual: Any, missing: str, header: bool
) -> AssertionResult:
    if name == "exists":
        passed = (actual is not MISSING) == bool(expected)
        if passed:
            message = ""
        elif expected:
            message = missing or f"{subject} is missing"
        else:
            message = f"{subject} was expected to be absent"
        return AssertionResult(subject, name, expected, actual, passed, message)
    if actual is MISSING:
        message = missing or f"{subject} is missing"
        return AssertionResult(subject, name, _shown(expected), actual, False, message)
    passed, message, shown = _PREDICATES[name](expected, actual, header)
    return AssertionResult(subject, name, _shown(expected), shown, passed, message)


def _shown(expected: Any) -> Any:
    # msgspec decodes YAML `lt: 800` into a float field; 800 reads better than 800.0
    if isinstance(expected, float) and expected.is_integer():
        return int(expected)
    return expected


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def equal(a: Any, b: Any) -> bool:
    """JSON equality: ``1 == 1.0`` but ``True != 1``, recursively through lists and objects."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if _is_number(a):
        return _is_number(b) and a == b
    if isinstance(a, dict):
        return (
            isinstance(b, dict)
            and a.keys() == b.keys()
            and all(equal(value, b[key]) for key, value in a.items())
        )
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(map(equal, a, b))
    return not isinstance(b, dict | list | tuple | Missing) and a == b


def _header_equal(expected: Any, actual: Any) -> bool:
    if isinstance(actual, str) and not isinstance(expected, str):
        if isinstance(expected, bool):
            return actual.strip().lower() == ("true" if expected else "false")
        number = _header_number(actual)
        return _is_number(expected) and number is not None and number == expected
    return equal(expected, actual)


def _header_number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


_TYPE_NAMES = {
    type(None): "null",
    bool: "boolean",
    int: "integer",
    float: "number",
    str: "string",
    list: "array",
    tuple: "array",
    dict: "object",
}


def _type_name(value: Any) -> str:
    return _TYPE_NAMES.get(type(value)) or type(value).__name__


Outcome = tuple[bool, str, Any]
"""passed, message, the actual value to show."""
Check_ = Callable[[Any, Any, bool], Outcome]
"""expected, actual, whether actual is a header's text."""


def _equals(expected: Any, actual: Any, header: bool) -> Outcome:
    return (_header_equal if header else equal)(expected, actual), "", actual


def _not_equals(expected: Any, actual: Any, header: bool) -> Outcome:
    passed = not _equals(expected, actual, header)[0]
    return passed, "" if passed else f"expected anything but {expected!r}", actual


def _one_of(expected: Any, actual: Any, header: bool) -> Outcome:
    same = _header_equal if header else equal
    passed = any(same(option, actual) for option in expected)
    return passed, "" if passed else f"{actual!r} is none of {expected!r}", actual


def _type(expected: Any, actual: Any, header: bool) -> Outcome:
    kind = _type_name(actual)
    passed = (
        kind == expected
        or (expected == "number" and kind == "integer")
        # JSON has one number type: 3.0 is an integer, as JSON Schema says
        or (expected == "integer" and kind == "number" and float(actual).is_integer())
    )
    return passed, "" if passed else f"expected a value of type {expected}, got {kind}", actual


def _contains(expected: Any, actual: Any, header: bool) -> Outcome:
    if isinstance(actual, str):
        needle = expected if isinstance(expected, str) else msgspec.json.encode(expected).decode()
        passed = needle in actual
        return passed, "" if passed else f"{needle!r} is not in the string", actual
    if isinstance(actual, list):
        passed = any(equal(expected, item) for item in actual)
        return passed, "" if passed else f"no element of the array equals {expected!r}", actual
    if isinstance(actual, dict):
        passed = isinstance(expected, str) and expected in actual
        return passed, "" if passed else f"the object has no key {expected!r}", actual
    return False, f"contains needs a string, array or object, got {_type_name(actual)}", actual


def _matches(expected: Any, actual: Any, header: bool) -> Outcome:
    try:
        pattern = compile_regex(expected)
    except regex.error as exc:
        return False, f"regular expression {expected!r} does not compile: {exc}", actual
    if not isinstance(actual, str):
        return False, f"matches needs a string, got {_type_name(actual)}", actual
    try:
        passed = search(pattern, actual) is not None
    except PatternTimeout as exc:
        return False, str(exc), actual
    return passed, "" if passed else f"{expected!r} does not match", actual


def _compare(symbol: str, test: Callable[[Any, Any], bool]) -> Check_:
    def compare(expected: Any, actual: Any, header: bool) -> Outcome:
        number = _header_number(actual) if header and isinstance(actual, str) else actual
        if not _is_number(number):
            return False, f"expected a number, got {_type_name(actual)}", actual
        passed = bool(test(number, expected))
        return passed, "" if passed else f"{actual!r} is not {symbol} {_shown(expected)}", actual

    return compare


def _length(expected: Any, actual: Any, header: bool) -> Outcome:
    if not isinstance(actual, str | list | dict):
        return False, f"length needs a string, array or object, got {_type_name(actual)}", actual
    size = len(actual)
    passed = size == expected
    return passed, "" if passed else f"expected length {expected}, got {size}", size


_PREDICATES: dict[str, Check_] = {
    "equals": _equals,
    "not_equals": _not_equals,
    "one_of": _one_of,
    "type": _type,
    "contains": _contains,
    "matches": _matches,
    "gt": _compare(">", operator.gt),
    "gte": _compare(">=", operator.ge),
    "lt": _compare("<", operator.lt),
    "lte": _compare("<=", operator.le),
    "length": _length,
}


def _status(expected: int | str | list[int | str], status: int) -> AssertionResult:
    options = expected if isinstance(expected, list) else [expected]
    predicate = "one_of" if isinstance(expected, list) else "equals"
    shown: list[int | str] = []
    passed = False
    for option in options:
        text = str(option).strip().lower()
        if text.isdigit():
            shown.append(int(text))
            passed = passed or int(text) == status
        elif len(text) == 3 and text[0] in "12345" and text[1:] == "xx":
            shown.append(text)
            passed = passed or str(status)[0] == text[0]
        else:
            message = f"status {option!r} is not a code or a class like 2xx"
            return AssertionResult("status", predicate, expected, status, False, message)
    want = shown if isinstance(expected, list) else shown[0]
    return AssertionResult("status", predicate, want, status, passed)


def _json(checks: dict[str, Check], response: ResponseView) -> list[AssertionResult]:
    try:
        document = response.json
    except ValueError:
        body = excerpt(response.text)
        return [
            msgspec.structs.replace(result, actual=body, passed=False, message=NOT_JSON)
            for path, spec in checks.items()
            for result in check(f"json {path}", spec, MISSING)
        ]
    results: list[AssertionResult] = []
    for path, spec in checks.items():
        subject = f"json {path}"
        try:
            actual = select(compile_path(path), document)
        except jsonpath_rfc9535.JSONPathError as exc:
            message = f"JSONPath {path!r} does not parse: {exc}"
            results.append(AssertionResult(subject, "jsonpath", path, MISSING, False, message))
            continue
        missing = f"{path} matched nothing in the response body"
        results += check(subject, spec, actual, missing=missing)
    return results


def _body(expect: BodyExpect, text: str) -> list[AssertionResult]:
    shown = excerpt(text)
    results = []
    for name, expected in (
        ("contains", expect.contains),
        ("not_contains", expect.not_contains),
        ("matches", expect.matches),
    ):
        if expected is None:
            continue
        if name == "matches":
            passed, message, _ = _matches(expected, text, False)
        elif name == "contains":
            passed = expected in text
            message = "" if passed else f"{expected!r} is not in the body"
        else:
            passed = expected not in text
            message = "" if passed else f"{expected!r} is in the body"
        results.append(AssertionResult("body", name, expected, shown, passed, message))
    return results


class _SchemaProblem(Exception):
    pass


def _schema(
    schema: dict[str, Any] | str, response: ResponseView, base_dir: Path
) -> AssertionResult:
    def failed(actual: Any, message: str) -> AssertionResult:
        return AssertionResult("schema", "schema", schema, actual, False, message)

    try:
        if isinstance(schema, str):
            validator = _file_validator(str((base_dir / schema).resolve()))
        else:
            validator = _inline_validator(schema)
    except _SchemaProblem as exc:
        return failed(MISSING, str(exc))
    try:
        document = response.json
    except ValueError:
        return failed(excerpt(response.text), NOT_JSON)
    import jsonschema  # ~75 ms to import: only flows with a schema check pay for it

    try:
        error = jsonschema.exceptions.best_match(validator.iter_errors(document))
    except RecursionError:
        # {A: {$ref: B}, B: {$ref: A}}: valid to check_schema, endless to resolve
        return failed(MISSING, "the schema's $ref references lead back to themselves: fix it")
    if error is None:
        return AssertionResult("schema", "schema", schema, "valid", True)
    where = error.json_path
    message = f"the response body does not match the schema at {where}: {error.message}"
    return failed(f"{where}: {error.message}", message)


def _inline_validator(schema: dict[str, Any]) -> Any:
    try:
        key = msgspec.json.encode(schema)
    except (TypeError, msgspec.EncodeError):
        return _validator(schema, "the inline schema")
    return _cached_inline_validator(key)


@functools.lru_cache(maxsize=256)
def _cached_inline_validator(key: bytes) -> Any:
    # keyed by the encoded schema: a rendered schema is a new dict on every request
    return _validator(msgspec.json.decode(key), "the inline schema")


@functools.lru_cache(maxsize=256)
def _file_validator(path: str) -> Any:
    # lru_cache does not keep exceptions, so a schema file added later is still found
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise _SchemaProblem(f"schema file {path} cannot be read: {exc.strerror}") from None
    try:
        if path.endswith((".yaml", ".yml")):
            schema = msgspec.yaml.decode(data)
        else:
            schema = msgspec.json.decode(data)
    except (msgspec.DecodeError, ImportError) as exc:
        raise _SchemaProblem(f"schema file {path} does not parse: {exc}") from None
    if not isinstance(schema, dict | bool):
        raise _SchemaProblem(f"schema file {path} holds no JSON Schema object")
    return _validator(schema, f"the schema in {path}")


def _validator(schema: Any, what: str) -> Any:
    import jsonschema

    if isinstance(schema, dict) and "$schema" in schema:
        cls = jsonschema.validators.validator_for(schema, default=None)
        if cls is None:
            # jsonschema would quietly use another draft; a typo here must not go unnoticed
            dialect = schema["$schema"]
            raise _SchemaProblem(f"{what} names an unknown $schema {dialect!r}")
    else:
        cls = jsonschema.Draft202012Validator
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = exc.json_path
        raise _SchemaProblem(
            f"{what} is not a valid JSON Schema at {where}: {exc.message}"
        ) from None
    return cls(schema, format_checker=cls.FORMAT_CHECKER)
