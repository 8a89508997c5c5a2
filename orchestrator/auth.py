"""A request's ``auth:``: HTTP Basic and Digest (httpx's own), OAuth2 client credentials
(tokens cached per Runner, fetched again before they expire and once after a 401), and AWS
SigV4 (botocore's signer, the ``aws`` extra). Each is an ``httpx.Auth``: it acts on the
final request, just before it is sent, and after the request's event is recorded, so the
credentials it adds never reach an event.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncGenerator, Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_plus

import httpx
import msgspec

from orchestrator.model import CREDENTIAL_FIELDS, seconds

OAUTH2_TOKEN_NAME = "auth.oauth2"
"""The name an OAuth2 token fetch is recorded under (an ``AuthTokenUpdated``, sealed)."""
AWS_HINT = "install the aws extra: pip install 'baton[aws]'"
# headers the transport may change after signing: signing them would break the signature
_UNSIGNED = frozenset({"user-agent", "expect", "connection", "accept-encoding"})


class AuthFailure(Exception):
    """The auth of a request cannot be done: the token endpoint refused, botocore is
    missing. The message names the setting and holds no credential."""


def credentials(rendered: Mapping[str, Any]) -> list[str]:
    """The credential values of a rendered auth block: secrets by kind, whatever their
    name, masked in every output."""
    found = []
    for settings in rendered.values():
        if isinstance(settings, Mapping):
            for field, value in settings.items():
                if field in CREDENTIAL_FIELDS and value:
                    found.append(str(value))
    return found


@dataclass(frozen=True)
class TokenRequest:
    token_url: str
    client_id: str
    client_secret: str
    scope: str | None
    audience: str | None
    refresh_before: float
    client_auth: str

    @property
    def key(self) -> tuple[str, ...]:
        # the secret's digest, not the secret: two clients with one id but different
        # secrets (a rotated one) do not share a token
        secret = hashlib.sha256(self.client_secret.encode()).hexdigest()
        return (self.token_url, self.client_id, self.scope or "", self.audience or "", secret)


@dataclass
class _Held:
    token: str
    expires_at: float | None
    """On the cache's clock; None: the server gave no expires_in."""


class TokenCache:
    """OAuth2 tokens by (token_url, client_id, scope, audience): one fetch for every test
    that needs the same token, concurrent ones included."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._held: dict[tuple[str, ...], _Held] = {}
        self._locks: dict[tuple[str, ...], asyncio.Lock] = {}

    async def token(
        self,
        spec: TokenRequest,
        client: httpx.AsyncClient,
        extensions: Mapping[str, Any],
        refused: str | None = None,
    ) -> tuple[str, bool]:
        """The token to send, and whether it was fetched now. ``refused``: a token the
        server answered 401 to, fetched again unless another test already did."""
        lock = self._locks.setdefault(spec.key, asyncio.Lock())
        async with lock:
            held = self._held.get(spec.key)
            if held is not None and held.token != refused and not self._expiring(held, spec):
                return held.token, False
            held = await self._fetch(spec, client, extensions)
            self._held[spec.key] = held
            return held.token, True

    def _expiring(self, held: _Held, spec: TokenRequest) -> bool:
        return held.expires_at is not None and held.expires_at - self.clock() <= spec.refresh_before

    async def _fetch(
        self, spec: TokenRequest, client: httpx.AsyncClient, extensions: Mapping[str, Any]
    ) -> _Held:
        form = {"grant_type": "client_credentials"}
        if spec.scope:
            form["scope"] = spec.scope
        if spec.audience:
            form["audience"] = spec.audience
        auth: httpx.Auth | None = None
        if spec.client_auth == "basic":
            # RFC 6749 2.3.1: id and secret are form-encoded before they are joined
            auth = httpx.BasicAuth(quote_plus(spec.client_id), quote_plus(spec.client_secret))
        else:
            form["client_id"] = spec.client_id
            form["client_secret"] = spec.client_secret
        request = client.build_request(
            "POST", spec.token_url, data=form, headers={"accept": "application/json"}
        )
        request.extensions.update(extensions)  # the test's TLS settings and timeout
        where = f"auth.oauth2: the token endpoint {spec.token_url}"
        started = self.clock()
        try:
            response = await client.send(request, auth=auth)
        except httpx.TransportError as exc:
            raise AuthFailure(f"{where} cannot be reached: {exc or type(exc).__name__}") from None
        try:
            data = msgspec.json.decode(response.content)
        except msgspec.DecodeError:
            data = None
        if not isinstance(data, dict):
            data = {}
        if response.status_code >= 300:
            said = " ".join(str(data[k]) for k in ("error", "error_description") if k in data)
            hint = (
                "; check client_id and client_secret, or try client_auth: body"
                if response.status_code in (400, 401)
                else ""
            )
            raise AuthFailure(
                f"{where} answered {response.status_code}" + (f": {said}" if said else "") + hint
            )
        token = data.get("access_token")
        if not isinstance(token, str) or not token:
            raise AuthFailure(f"{where} answered {response.status_code} without an access_token")
        expires_in = data.get("expires_in")
        if isinstance(expires_in, str) and expires_in.isdigit():
            expires_in = int(expires_in)
        expires_at = (
            started + float(expires_in)
            if isinstance(expires_in, int | float) and not isinstance(expires_in, bool)
            else None
        )
        return _Held(token, expires_at)


class OAuth2ClientCredentials(httpx.Auth):
    def __init__(
        self,
        spec: TokenRequest,
        tokens: TokenCache,
        client: httpx.AsyncClient,
        learn: Callable[[str, bool], None],
    ) -> None:
        self.spec = spec
        self.tokens = tokens
        self.client = client
        self.learn = learn
        """Told every token used, and whether it was fetched for this request."""

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        token, fetched = await self.tokens.token(self.spec, self.client, request.extensions)
        self.learn(token, fetched)
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code != 401:
            return
        # revoked or expired early: one new token, one more try
        token, fetched = await self.tokens.token(
            self.spec, self.client, request.extensions, refused=token
        )
        self.learn(token, fetched)
        request.headers["Authorization"] = f"Bearer {token}"
        yield request


class AwsSigV4(httpx.Auth):
    requires_request_body = True

    def __init__(self, settings: Mapping[str, Any]) -> None:
        try:
            from botocore.auth import SigV4Auth
            from botocore.credentials import Credentials
        except ImportError:
            raise AuthFailure(f"auth.aws_sigv4 needs botocore: {AWS_HINT}") from None
        credentials = Credentials(
            str(settings["access_key_id"]),
            str(settings["secret_access_key"]),
            str(settings["session_token"]) if settings.get("session_token") else None,
        )
        self.signer = SigV4Auth(credentials, str(settings["service"]), str(settings["region"]))

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        from botocore.awsrequest import AWSRequest

        signed = AWSRequest(
            method=request.method,
            url=str(request.url),
            data=request.content,
            headers={k: v for k, v in request.headers.items() if k.lower() not in _UNSIGNED},
        )
        self.signer.add_auth(signed)
        for name in ("Authorization", "X-Amz-Date", "X-Amz-Security-Token"):
            if name in signed.headers:
                request.headers[name] = signed.headers[name]
        yield request


def auth_of(
    rendered: Mapping[str, Any],
    *,
    tokens: TokenCache,
    client: httpx.AsyncClient,
    learn: Callable[[str, bool], None],
) -> httpx.Auth:
    """The ``httpx.Auth`` of a rendered auth block (exactly one kind: the loader checked)."""
    kind, settings = next((k, v) for k, v in rendered.items() if v is not None)
    if kind in ("basic", "digest"):
        make = httpx.BasicAuth if kind == "basic" else httpx.DigestAuth
        return make(str(settings["username"]), str(settings["password"]))
    if kind == "oauth2":
        spec = TokenRequest(
            token_url=str(settings["token_url"]),
            client_id=str(settings["client_id"]),
            client_secret=str(settings["client_secret"]),
            scope=_optional(settings.get("scope")),
            audience=_optional(settings.get("audience")),
            refresh_before=seconds(settings.get("refresh_before", "30s")),
            client_auth=str(settings.get("client_auth", "basic")),
        )
        return OAuth2ClientCredentials(spec, tokens, client, learn)
    return AwsSigV4(settings)


def _optional(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)
