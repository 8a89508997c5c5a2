"""The service's error tree, and the one place where every error becomes a response.

Every error answer is an RFC 9457 problem details document (``application/problem+json``):
``type``, ``title``, ``status``, ``detail``, ``instance``, and ``errors`` when there is one
thing wrong per field, per item of a bulk request or per line of a flow file. A database
driver's error never reaches a response: the database layer turns it into one of these
first, and anything unforeseen becomes a 500 that says nothing of its insides.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, SerializationException, ValidationException

from events.store import StoreError, StoreUnavailable

PROBLEM_JSON = "application/problem+json"
_log = logging.getLogger("baton.service")


class FieldError(msgspec.Struct, frozen=True, omit_defaults=True):
    """One thing wrong: where (a field, an item of a bulk request, a place in a flow file)
    and what."""

    detail: str
    location: str = ""
    index: int | None = None
    """The item of a bulk request it concerns."""
    status: int | None = None
    """What the item alone would have been answered (bulk requests)."""
    hint: str = ""


class Problem(msgspec.Struct, frozen=True, omit_defaults=True):
    """RFC 9457 problem details."""

    title: str
    status: int
    detail: str = ""
    type: str = "about:blank"
    instance: str = ""
    errors: list[FieldError] = []


class ServiceError(Exception):
    """Base of the errors a handler raises on purpose; each maps to one status."""

    status = HTTPStatus.INTERNAL_SERVER_ERROR

    def __init__(self, detail: str, errors: Sequence[FieldError] = ()) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = list(errors)

    def headers(self) -> dict[str, str]:
        return {}


class BadRequest(ServiceError):
    status = HTTPStatus.BAD_REQUEST


class Unauthorized(ServiceError):
    status = HTTPStatus.UNAUTHORIZED

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="baton"'}


class Forbidden(ServiceError):
    status = HTTPStatus.FORBIDDEN


class NotFound(ServiceError):
    status = HTTPStatus.NOT_FOUND


class Conflict(ServiceError):
    status = HTTPStatus.CONFLICT


class TooLarge(ServiceError):
    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class Unprocessable(ServiceError):
    status = HTTPStatus.UNPROCESSABLE_ENTITY


class Unavailable(ServiceError):
    status = HTTPStatus.SERVICE_UNAVAILABLE


def problem_response(
    request: Request[Any, Any, Any],
    status: int,
    detail: str,
    errors: Sequence[FieldError] = (),
    headers: Mapping[str, str] | None = None,
) -> Response[Problem]:
    body = Problem(
        title=HTTPStatus(status).phrase,
        status=status,
        detail=detail,
        instance=request.url.path,
        errors=list(errors),
    )
    return Response(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _service_error(request: Request[Any, Any, Any], exc: ServiceError) -> Response[Problem]:
    return problem_response(request, exc.status, exc.detail, exc.errors, exc.headers())


def _validation_errors(extra: Any) -> list[FieldError]:
    errors: list[FieldError] = []
    if isinstance(extra, list):
        for item in extra:
            if isinstance(item, dict):
                # source is Litestar's ParamType, a str Enum: its value reads "query", its str()
                # "ParamType.QUERY", a library name in the answer
                where = ".".join(
                    str(getattr(item[k], "value", item[k]))
                    for k in ("source", "key")
                    if item.get(k)
                )
                errors.append(FieldError(str(item.get("message", "")), where))
    return errors


def _http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Problem]:
    status = exc.status_code
    if status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE:
        limit = request.app.request_max_body_size
        return problem_response(
            request, status, f"the request body is larger than the limit of {limit} bytes"
        )
    if isinstance(exc.__cause__, SerializationException):
        return problem_response(request, status, f"the body is not valid JSON: {exc.detail}")
    if isinstance(exc, ValidationException):
        errors = _validation_errors(exc.extra)
        detail = "the request is not valid: " + "; ".join(
            f"{error.location}: {error.detail}" if error.location else error.detail
            for error in errors
        )
        return problem_response(request, status, detail if errors else exc.detail, errors)
    if status >= HTTPStatus.INTERNAL_SERVER_ERROR:
        _log.error("%s %s: %s", request.method, request.url.path, exc.detail)
        return problem_response(request, status, "the service failed to answer this request")
    headers = dict(exc.headers or {})
    return problem_response(request, status, exc.detail or HTTPStatus(status).phrase, (), headers)


def _store_error(request: Request[Any, Any, Any], exc: StoreError) -> Response[Problem]:
    # driver messages can name tables, constraints, hosts: logged, never answered
    _log.error("%s %s: database error: %s", request.method, request.url.path, exc)
    if isinstance(exc, StoreUnavailable):
        return problem_response(request, 503, "the database is unavailable; try again later")
    return problem_response(request, 500, "the service failed to answer this request")


def _not_utf8(request: Request[Any, Any, Any], exc: UnicodeError) -> Response[Problem]:
    # a body or parameter that is not UTF-8, or a lone surrogate: the request's fault
    return problem_response(request, 400, f"the request holds text that is not UTF-8: {exc}")


def _unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[Problem]:
    _log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
    return problem_response(request, 500, "the service failed to answer this request")


EXCEPTION_HANDLERS: Mapping[Any, Any] = {
    ServiceError: _service_error,
    HTTPException: _http_error,
    StoreError: _store_error,
    UnicodeError: _not_utf8,
    Exception: _unexpected,
}
"""For ``Litestar(exception_handlers=...)``: every error as problem details."""
