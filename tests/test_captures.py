"""Captures: each source finds its value, and each miss names the capture and what is missing."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from events.secrets import Redactor
from orchestrator.captures import CaptureError, capture
from orchestrator.model import Capture
from orchestrator.results import ResponseView

BODY = {
    "access_token": "tok-123",
    "user": {"id": 7, "nickname": None},
    "products": [{"id": 11, "price": 9.5}, {"id": 12, "price": 20}],
}
ONE_SOURCE = "a capture takes exactly one of json, header, cookie, regex, link, status"


def response(
    body: Any = BODY,
    *,
    text: str | None = None,
    status: int = 200,
    headers: dict[str, str] | None = None,
    cookies: dict[str, str] | None = None,
) -> ResponseView:
    if text is None:
        text = msgspec.json.encode(body).decode()
    set_cookie = tuple(
        f"{name}={value}; Path=/; HttpOnly" for name, value in (cookies or {}).items()
    )
    return ResponseView(status, headers or {}, text, 5.0, set_cookie)


def spec(**fields: Any) -> Capture:
    # msgspec.convert decodes the dict exactly as the loader decodes YAML
    return msgspec.convert(fields, Capture)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("$.access_token", "tok-123"),
        ("$.user.id", 7),
        ("$.user", {"id": 7, "nickname": None}),
        ("$.user.nickname", None),
        ("$.products[0].id", 11),
        ("$.products[*].id", [11, 12]),
        ("$.products[?@.price > 10].id", 12),
        ("$..price", [9.5, 20]),
    ],
)
def test_json(path: str, value: Any) -> None:
    assert capture("v", spec(json=path), response()) == value


@pytest.mark.parametrize(
    ("fields", "resp", "message"),
    [
        (
            {"json": "$.products[0].id"},
            response({"products": []}),
            "capture product_id: $.products[0].id matched nothing in the response body",
        ),
        (
            {"json": "$.products[?@.price > 99]"},
            response(),
            "capture product_id: $.products[?@.price > 99] matched nothing in the response body",
        ),
        (
            {"json": "$.id"},
            response(text="<html>Service Unavailable</html>"),
            "capture product_id: $.id: the response body is not JSON (it starts '<html>Service",
        ),
        ({"json": "$.products["}, response(), "capture product_id: JSONPath '$.products[' does"),
        (
            {"header": "X-Product-Id"},
            response(headers={"content-type": "application/json"}),
            "capture product_id: header X-Product-Id is not in the response"
            " (headers: content-type)",
        ),
        (
            {"cookie": "session"},
            response(cookies={"theme": "dark"}),
            "capture product_id: cookie session is not set by the response (cookies: theme)",
        ),
        (
            {"cookie": "Session"},
            response(cookies={"session": "s"}),
            "capture product_id: cookie Session is not set",
        ),
        (
            {"regex": r"product-(\d+)"},
            response(text="no products here"),
            r"capture product_id: regular expression 'product-(\\d+)' matched nothing in the body",
        ),
        (
            {"regex": r"id=(\d+)?x"},
            response(text="id=x"),
            r"capture product_id: regular expression 'id=(\\d+)?x' matched, but group 1 did not",
        ),
        (
            {"regex": "(a"},
            response(),
            "capture product_id: regular expression '(a' does not compile",
        ),
        ({"json": "$.id", "header": "X-Id"}, response(), f"capture product_id: {ONE_SOURCE}"),
        ({}, response(), f"capture product_id: {ONE_SOURCE}"),
    ],
)
def test_errors_name_the_capture_and_what_is_missing(
    fields: dict[str, Any], resp: ResponseView, message: str
) -> None:
    with pytest.raises(CaptureError) as caught:
        capture("product_id", spec(**fields), resp)
    assert str(caught.value).startswith(message)
    assert caught.value.name == "product_id"


@pytest.mark.parametrize("name", ["X-Request-Id", "x-request-id", "X-REQUEST-ID"])
def test_header_names_are_case_insensitive(name: str) -> None:
    resp = response(headers={"x-request-id": "req-9", "content-type": "text/plain"})
    assert capture("request_id", spec(header=name), resp) == "req-9"


def test_repeated_headers_arrive_joined() -> None:
    resp = response(headers={"set-cookie": "a=1, b=2"})
    assert capture("c", spec(header="Set-Cookie"), resp) == "a=1, b=2"


def test_cookie() -> None:
    resp = response(cookies={"session": "abc", "theme": "dark"})
    assert capture("auth.session", spec(cookie="session"), resp) == "abc"


@pytest.mark.parametrize(
    ("pattern", "text", "value"),
    [
        (r"token=(\w+)", "ok token=abc123; next", "abc123"),
        (r"order-\d+", "created order-42 today", "order-42"),
        (r"(?P<year>\d{4})-(\d{2})", "on 2024-05-01", "2024"),
        (r"(?:id|ref)=(\d+)", "ref=9", "9"),
        (r'"id":\s*(\d+)', '{"id": 77}', "77"),
    ],
)
def test_regex(pattern: str, text: str, value: str) -> None:
    assert capture("v", spec(regex=pattern), response(text=text)) == value


@pytest.mark.parametrize("status", [200, 201, 404, 503])
def test_status(status: int) -> None:
    assert capture("code", spec(status=True), response({}, status=status)) == status


def test_a_capture_error_quotes_the_body_redacted_before_it_is_cut() -> None:
    secret = "s3cr3t-value-0123456789"
    body = "<html>" + "x" * 70 + secret + " and the rest of the page</html>"
    error = CaptureError("order_id", "$.id: the response body is not JSON", body)
    shown = error.shown(Redactor([secret]))
    assert shown.startswith("capture order_id: $.id: the response body is not JSON (it starts")
    assert "s3cr" not in shown and "***" in shown
