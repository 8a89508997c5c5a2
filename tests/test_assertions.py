"""Assertions: every predicate passes and fails as a flow author expects, and never raises."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from orchestrator.assertions import check_value, evaluate
from orchestrator.captures import MISSING, NOT_JSON
from orchestrator.model import Expect, Predicate
from orchestrator.results import AssertionResult, ResponseView


def response(
    body: Any = None,
    *,
    text: str | None = None,
    status: int = 200,
    headers: dict[str, str] | None = None,
    duration_ms: float = 12.5,
) -> ResponseView:
    if text is None:
        text = msgspec.json.encode(body).decode()
    return ResponseView(status, headers or {}, text, duration_ms)


def run(
    expect: dict[str, Any], resp: ResponseView, base_dir: Path = Path(".")
) -> list[AssertionResult]:
    # msgspec.convert decodes the dict exactly as the loader decodes YAML
    return evaluate(msgspec.convert(expect, Expect), resp, base_dir=base_dir)


def one(expect: dict[str, Any], resp: ResponseView, base_dir: Path = Path(".")) -> AssertionResult:
    results = run(expect, resp, base_dir)
    assert len(results) == 1, results
    return results[0]


# (check, value at $.v, passed, fragment of the message on failure)
PREDICATES = [
    # equals: JSON equality, 1 == 1.0 but booleans are not numbers
    ({"equals": 1}, 1.0, True, ""),
    ({"equals": 1}, True, False, ""),
    ({"equals": True}, 1, False, ""),
    ({"equals": "1"}, 1, False, ""),
    ({"equals": None}, None, True, ""),
    ({"equals": None}, 0, False, ""),
    ({"equals": {"a": [1, True]}}, {"a": [1.0, True]}, True, ""),
    ({"equals": {"a": [1, True]}}, {"a": [1, 1]}, False, ""),
    ({"equals": {"a": 1}}, {"a": 1, "b": 2}, False, ""),
    (5, 5, True, ""),
    ("alice", "bob", False, ""),
    ([1, 2], [1, 2], True, ""),
    ([1, 2], [2, 1], False, ""),
    (None, None, True, ""),
    ({"not_equals": 3}, 4, True, ""),
    ({"not_equals": 3}, 3.0, False, "anything but 3"),
    ({"not_equals": 1}, True, True, ""),
    # exists on a present value, even null
    ({"exists": True}, None, True, ""),
    ({"exists": False}, 0, False, "expected to be absent"),
    # type
    ({"type": "string"}, "x", True, ""),
    ({"type": "string"}, 1, False, "type string, got integer"),
    ({"type": "number"}, 1, True, ""),
    ({"type": "number"}, 1.5, True, ""),
    ({"type": "number"}, True, False, "got boolean"),
    ({"type": "integer"}, 3, True, ""),
    ({"type": "integer"}, 3.0, True, ""),
    ({"type": "integer"}, 3.5, False, "got number"),
    ({"type": "integer"}, False, False, "got boolean"),
    ({"type": "boolean"}, False, True, ""),
    ({"type": "boolean"}, 0, False, "got integer"),
    ({"type": "array"}, [], True, ""),
    ({"type": "array"}, {}, False, "got object"),
    ({"type": "object"}, {}, True, ""),
    ({"type": "null"}, None, True, ""),
    ({"type": "null"}, "", False, "got string"),
    # contains: substring, element, key
    ({"contains": "ell"}, "hello", True, ""),
    ({"contains": "xyz"}, "hello", False, "'xyz' is not in the string"),
    ({"contains": 42}, "order 42 ok", True, ""),
    ({"contains": 2}, [1, 2.0, 3], True, ""),
    ({"contains": 1}, [True, "1"], False, "no element of the array equals 1"),
    ({"contains": {"id": 1}}, [{"id": 1}, {"id": 2}], True, ""),
    ({"contains": "id"}, {"id": 1}, True, ""),
    ({"contains": "name"}, {"id": 1}, False, "no key 'name'"),
    ({"contains": 1}, 12, False, "contains needs a string, array or object, got integer"),
    # matches: a regex search
    ({"matches": r"^\d{3}-\d{4}$"}, "555-1234", True, ""),
    ({"matches": r"\d+"}, "order 42", True, ""),
    ({"matches": r"^\d+$"}, "order 42", False, "does not match"),
    ({"matches": r"\d+"}, 42, False, "matches needs a string, got integer"),
    ({"matches": "("}, "x", False, "does not compile"),
    # numeric comparisons
    ({"gt": 5}, 6, True, ""),
    ({"gt": 5}, 5, False, "5 is not > 5"),
    ({"gte": 5}, 5.0, True, ""),
    ({"gte": 5}, 4.99, False, "is not >= 5"),
    ({"lt": 5}, 4.5, True, ""),
    ({"lt": 5}, 5, False, "is not < 5"),
    ({"lte": 5}, 5, True, ""),
    ({"lte": 5}, 6, False, "is not <= 5"),
    ({"gt": 0}, True, False, "expected a number, got boolean"),
    ({"lt": 10}, "3", False, "expected a number, got string"),
    ({"gte": 0}, None, False, "expected a number, got null"),
    # length of strings, arrays, objects
    ({"length": 3}, "abc", True, ""),
    ({"length": 2}, [1, 2], True, ""),
    ({"length": 1}, {"a": 1}, True, ""),
    ({"length": 3}, [1], False, "expected length 3, got 1"),
    ({"length": 3}, 123, False, "length needs a string, array or object, got integer"),
    # one_of
    ({"one_of": ["new", "paid"]}, "paid", True, ""),
    ({"one_of": ["new", "paid"]}, "void", False, "'void' is none of ['new', 'paid']"),
    ({"one_of": [1, 2]}, True, False, "is none of"),
    ({"one_of": [1, 2]}, 2.0, True, ""),
]


@pytest.mark.parametrize(("spec", "value", "passed", "message"), PREDICATES)
def test_json_predicate(spec: Any, value: Any, passed: bool, message: str) -> None:
    result = one({"json": {"$.v": spec}}, response({"v": value}))
    assert result.subject == "json $.v"
    assert result.passed is passed
    assert result.actual == value or result.predicate == "length"
    if message:
        assert message in result.message
    if passed:
        assert result.message == ""


def test_bare_value_is_equals_with_expected_and_actual() -> None:
    result = one({"json": {"$.user.name": "alice"}}, response({"user": {"name": "bob"}}))
    assert (result.predicate, result.expected, result.actual, result.passed) == (
        "equals",
        "alice",
        "bob",
        False,
    )


def test_length_reports_the_length_as_actual() -> None:
    result = one({"json": {"$.items": {"length": 3}}}, response({"items": [1, 2]}))
    assert (result.expected, result.actual, result.passed) == (3, 2, False)


def test_every_field_of_a_predicate_is_one_result_exists_first() -> None:
    spec = {"type": "integer", "gt": 0, "lt": 10, "exists": True}
    results = run({"json": {"$.n": spec}}, response({"n": 12}))
    assert [(r.predicate, r.passed) for r in results] == [
        ("exists", True),
        ("type", True),
        ("gt", True),
        ("lt", False),
    ]


def test_empty_predicate_means_exists() -> None:
    assert one({"json": {"$.id": {}}}, response({"id": 1})).passed
    result = one({"json": {"$.id": {}}}, response({}))
    assert (result.predicate, result.passed) == ("exists", False)


@pytest.mark.parametrize(
    "spec",
    [{"equals": 1}, {"exists": True}, {"type": "null"}, {"length": 0}, {"lt": 1}, "x", None],
)
def test_a_path_that_matches_nothing_fails_with_missing(spec: Any) -> None:
    result = one({"json": {"$.products[0].id": spec}}, response({"products": []}))
    assert result.passed is False
    assert result.actual is MISSING
    assert str(result.actual) == "<missing>"
    assert result.message == "$.products[0].id matched nothing in the response body"


def test_exists_false_passes_on_a_missing_path_and_missing_is_not_null() -> None:
    assert one({"json": {"$.error": {"exists": False}}}, response({"ok": 1})).passed
    present_null = one({"json": {"$.error": {"exists": False}}}, response({"error": None}))
    assert present_null.passed is False


def test_a_path_matching_several_nodes_gives_the_list() -> None:
    body = {"items": [{"id": 1}, {"id": 2}, {"id": 3}]}
    result = one({"json": {"$.items[*].id": [1, 2, 3]}}, response(body))
    assert result.passed and result.actual == [1, 2, 3]
    assert one({"json": {"$.items[*].id": {"length": 3}}}, response(body)).passed
    assert one({"json": {"$.items[*].id": {"contains": 2}}}, response(body)).passed
    filtered = one({"json": {"$.items[?@.id > 2].id": 3}}, response(body))
    assert filtered.passed and filtered.actual == 3


def test_an_invalid_jsonpath_is_a_failed_result() -> None:
    result = one({"json": {"$.items[": 1}}, response({"items": []}))
    assert result.passed is False
    assert "does not parse" in result.message


def test_json_checks_on_a_body_that_is_not_json() -> None:
    resp = response(text="<html>502 Bad Gateway</html>", status=502)
    results = run({"json": {"$.id": {"exists": False, "type": "integer"}, "$.x": 1}}, resp)
    assert len(results) == 3
    assert all(not r.passed and r.message == NOT_JSON for r in results)
    assert results[0].actual == "<html>502 Bad Gateway</html>"


def test_missing_is_encoded_as_text_in_events_and_reports() -> None:
    result = one({"json": {"$.id": 1}}, response({}))
    assert b'"actual":"<missing>"' in msgspec.json.encode(result)


@pytest.mark.parametrize(
    ("expected", "status", "passed"),
    [
        (200, 200, True),
        (200, 201, False),
        ("201", 201, True),
        ([200, "201"], 201, True),
        ([200, 204], 201, False),
        ("2xx", 204, True),
        ("2XX", 299, True),
        ("2xx", 404, False),
        ("4xx", 404, True),
        (["2xx", 404], 404, True),
        ("5xx", 503, True),
    ],
)
def test_status(expected: Any, status: int, passed: bool) -> None:
    result = one({"status": expected}, response({}, status=status))
    assert (result.subject, result.actual, result.passed) == ("status", status, passed)


def test_status_expected_is_normalised_and_a_list_is_one_of() -> None:
    assert one({"status": "201"}, response({}, status=201)).expected == 201
    result = one({"status": ["2xx", "404"]}, response({}, status=500))
    assert (result.predicate, result.expected) == ("one_of", ["2xx", 404])


def test_a_nonsense_status_fails_with_a_reason() -> None:
    result = one({"status": "ok"}, response({}, status=200))
    assert result.passed is False
    assert "not a code or a class like 2xx" in result.message


HEADERS = {"content-type": "application/json; charset=utf-8", "content-length": "523"}


@pytest.mark.parametrize(
    ("name", "spec", "passed"),
    [
        ("Content-Type", "application/json; charset=utf-8", True),
        ("CONTENT-TYPE", {"contains": "application/json"}, True),
        ("content-type", {"matches": "^text/"}, False),
        ("Content-Length", 523, True),
        ("Content-Length", "523", True),
        ("Content-Length", 524, False),
        ("Content-Length", {"lt": 1000, "gt": 100}, True),
        ("Content-Length", {"one_of": [523, 524]}, True),
        ("Content-Length", {"type": "string"}, True),
        ("X-Request-Id", {"exists": False}, True),
    ],
)
def test_headers(name: str, spec: Any, passed: bool) -> None:
    results = run({"headers": {name: spec}}, response({}, headers=HEADERS))
    assert results
    assert all(r.subject == f"header {name}" for r in results)
    assert all(r.passed for r in results) is passed


def test_a_missing_header_fails_naming_it() -> None:
    result = one({"headers": {"X-Request-Id": {"matches": "."}}}, response({}, headers=HEADERS))
    assert result.passed is False and result.actual is MISSING
    assert result.message == "header X-Request-Id is not in the response"


def test_boolean_header_value() -> None:
    resp = response({}, headers={"x-cache": "true"})
    assert one({"headers": {"X-Cache": True}}, resp).passed
    assert not one({"headers": {"X-Cache": False}}, resp).passed


@pytest.mark.parametrize(
    ("body", "passed", "message"),
    [
        ({"contains": "welcome"}, True, ""),
        ({"contains": "goodbye"}, False, "'goodbye' is not in the body"),
        ({"not_contains": "error"}, True, ""),
        ({"not_contains": "welcome"}, False, "'welcome' is in the body"),
        ({"matches": r"user \d+"}, True, ""),
        ({"matches": r"^user"}, False, "does not match"),
        ({"matches": "[unclosed"}, False, "does not compile"),
    ],
)
def test_body(body: dict[str, str], passed: bool, message: str) -> None:
    result = one({"body": body}, response(text="welcome, user 42"))
    assert (result.subject, result.passed, result.actual) == ("body", passed, "welcome, user 42")
    assert message in result.message


def test_body_actual_is_an_excerpt_of_a_long_body() -> None:
    result = one({"body": {"contains": "needle"}}, response(text="x" * 10_000))
    assert not result.passed
    assert len(result.actual) < 300


USER_SCHEMA = {
    "type": "object",
    "required": ["id", "email"],
    "properties": {"id": {"type": "integer"}, "email": {"type": "string", "format": "email"}},
}


def test_inline_schema_passes_and_fails_naming_the_path() -> None:
    assert one({"schema": USER_SCHEMA}, response({"id": 1, "email": "a@b.c"})).passed
    result = one({"schema": USER_SCHEMA}, response({"id": "1", "email": "a@b.c"}))
    assert result.passed is False
    assert result.message == (
        "the response body does not match the schema at $.id: '1' is not of type 'integer'"
    )
    missing = one({"schema": USER_SCHEMA}, response({"id": 1}))
    assert "'email' is a required property" in missing.message


def test_schema_formats_are_checked() -> None:
    result = one({"schema": USER_SCHEMA}, response({"id": 1, "email": "nobody"}))
    assert result.passed is False
    assert "is not a 'email'" in result.message


def test_schema_file_relative_to_the_flow(tmp_path: Path) -> None:
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "user.json").write_bytes(msgspec.json.encode(USER_SCHEMA))
    (tmp_path / "user.yaml").write_text("type: object\nrequired: [id]\n")
    expect = {"schema": "schemas/user.json"}
    assert one(expect, response({"id": 1, "email": "a@b.c"}), tmp_path).passed
    assert not one(expect, response({"id": True, "email": "a@b.c"}), tmp_path).passed
    assert one({"schema": "user.yaml"}, response({"id": 1}), tmp_path).passed
    assert not one({"schema": "user.yaml"}, response({}), tmp_path).passed


def test_a_missing_schema_file_is_a_failed_result(tmp_path: Path) -> None:
    result = one({"schema": "nope.json"}, response({}), tmp_path)
    assert result.passed is False
    assert "nope.json cannot be read" in result.message
    # found once it exists: a failure is not cached
    (tmp_path / "nope.json").write_text('{"type": "object"}')
    assert one({"schema": "nope.json"}, response({}), tmp_path).passed


def test_a_schema_file_that_does_not_parse(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    result = one({"schema": "bad.json"}, response({}), tmp_path)
    assert result.passed is False and "does not parse" in result.message


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"type": 12}, "is not a valid JSON Schema"),
        ({"$schema": "https://example.com/my-dialect", "type": "object"}, "unknown $schema"),
    ],
)
def test_an_invalid_schema_is_a_failed_result(schema: dict[str, Any], message: str) -> None:
    result = one({"schema": schema}, response({}))
    assert result.passed is False and message in result.message


def test_schema_defaults_to_2020_12_and_honours_dollar_schema() -> None:
    # prefixItems exists only from 2020-12; draft-07 ignores it and uses the array form of items
    assert not one({"schema": {"prefixItems": [{"type": "string"}]}}, response([1])).passed
    draft7 = {"$schema": "http://json-schema.org/draft-07/schema#"}
    assert one({"schema": {**draft7, "prefixItems": [{"type": "string"}]}}, response([1])).passed
    tuple_items = {**draft7, "items": [{"type": "string"}]}
    result = one({"schema": tuple_items}, response([1]))
    assert result.passed is False and "$[0]" in result.message


def test_schema_on_a_body_that_is_not_json() -> None:
    result = one({"schema": USER_SCHEMA}, response(text="oops"))
    assert (result.passed, result.message) == (False, NOT_JSON)


@pytest.mark.parametrize(
    ("spec", "passed"),
    [({"lt": 800}, True), ({"lt": 10}, False), ({"gte": 12.5, "lte": 12.5}, True)],
)
def test_duration(spec: dict[str, float], passed: bool) -> None:
    results = run({"duration_ms": spec}, response({}, duration_ms=12.5))
    assert all(r.subject == "duration_ms" and r.actual == 12.5 for r in results)
    assert all(r.passed for r in results) is passed


def test_results_follow_the_order_of_the_expect_block() -> None:
    expect = {
        "status": 200,
        "headers": {"Content-Type": {"exists": True}},
        "json": {"$.id": 1},
        "body": {"contains": "id"},
        "schema": {"type": "object"},
        "duration_ms": {"lt": 100},
    }
    resp = response({"id": 1}, headers={"content-type": "application/json"})
    results = run(expect, resp)
    assert [r.subject for r in results] == [
        "status",
        "header Content-Type",
        "json $.id",
        "body",
        "schema",
        "duration_ms",
    ]
    assert all(r.passed for r in results)


def test_an_empty_expect_checks_nothing() -> None:
    assert run({}, response(text="anything")) == []


def test_check_value_for_polling() -> None:
    assert check_value(Predicate(equals="done"), "done") == (True, "")
    ok, why = check_value(Predicate(one_of=["done", "failed"]), "pending")
    assert not ok and "'pending' is none of" in why
    assert check_value(3, 4) == (False, "value equals: expected 3, got 4")
    assert check_value(Predicate(exists=False), MISSING) == (True, "")
    assert check_value(Predicate(gt=1), "x") == (False, "value gt: expected a number, got string")
