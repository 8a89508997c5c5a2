"""Who is calling, and what they may do: an API key on every request but a few.

The key comes as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``. No key or an
unknown one is a 401; a key without the scope a route needs is a 403. What a route needs
is its ``opt["scope"]`` if it says, else ``read`` for GET and HEAD and ``admin`` for the
rest, so a router added later is guarded as strictly as the rest by default. A route
that needs no key (``/health``, the OpenAPI document) says ``opt={"exclude_from_auth":
True}`` or is listed in ``PUBLIC_PATHS``.

Another organization's resources are not forbidden but absent (404): the queries run under
row-level security (context_service.database), so they never find them.
"""

from __future__ import annotations

from typing import Any

from litestar.connection import ASGIConnection
from litestar.enums import ScopeType
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware import DefineMiddleware
from litestar.middleware.authentication import (
    AbstractAuthenticationMiddleware,
    AuthenticationResult,
)

from context_service.errors import Forbidden, Unauthorized
from context_service.keys import Principal, Scope

PUBLIC_PATHS = ["^/health$", "^/schema"]
"""Regular expressions of the paths that need no key."""
EXCLUDE_OPT = "exclude_from_auth"
KEY_COOKIE = "baton_key"
"""The dashboard's login cookie (HttpOnly, SameSite=Strict): a key, accepted on HTTP reads
only, so a page of another site can never make a browser start or change anything, nor
read a run through a WebSocket."""
_READ_METHODS = frozenset({"GET", "HEAD"})


def presented_key(headers: Any) -> str | None:
    """The key a request carries, if any."""
    authorization: str = headers.get("authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    api_key: str = headers.get("x-api-key", "").strip()
    return api_key or None


def key_of(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    """The key a request carries: its header, or on an HTTP read the dashboard's cookie.
    Never a WebSocket's cookie: a browser sends it with a handshake any page of the same
    site opens, and no CORS keeps that page from reading the messages (the dashboard
    follows runs with EventSource, whose answers CORS does keep from other origins)."""
    key = presented_key(connection.headers)
    if (
        key is None
        and connection.scope["type"] == ScopeType.HTTP
        and connection.scope.get("method") in _READ_METHODS
    ):
        key = connection.cookies.get(KEY_COOKIE) or None
    return key


class ApiKeyMiddleware(AbstractAuthenticationMiddleware):
    async def authenticate_request(
        self, connection: ASGIConnection[Any, Any, Any, Any]
    ) -> AuthenticationResult:
        key = key_of(connection)
        if key is None:
            raise Unauthorized(
                "an API key is required: send 'Authorization: Bearer <key>' or "
                "'X-API-Key: <key>' (create one with `baton keys create`)"
            )
        principal = await connection.app.state.services.db.principal(key)
        if principal is None:
            raise Unauthorized("this API key is not valid (unknown or revoked)")
        handler = connection.scope["route_handler"]
        scope = required_scope(connection, handler)
        if not principal.allows(scope):
            raise Forbidden(f"this API key lacks the {scope!r} scope this request needs")
        return AuthenticationResult(user=principal, auth=principal.key_id)


def middleware() -> DefineMiddleware:
    return DefineMiddleware(
        ApiKeyMiddleware, exclude=PUBLIC_PATHS, exclude_from_auth_key=EXCLUDE_OPT
    )


def required_scope(
    connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
) -> Scope:
    scope = handler.opt.get("scope")
    if scope in ("read", "run", "admin"):
        return scope  # type: ignore[no-any-return]
    return "read" if connection.scope.get("method", "GET") in _READ_METHODS else "admin"


def principal_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Principal:
    """The caller of an authenticated route."""
    principal = connection.scope.get("user")
    if not isinstance(principal, Principal):
        raise Unauthorized("an API key is required")
    return principal
