"""The flow file as typed Structs. Unknown fields are errors, so a typo never passes silently.

Durations are a number of seconds or a string such as ``"250ms"``, ``"10s"``, ``"2m"``.
Any string value may be a jinja2 template; templates are rendered at run time.
"""

from __future__ import annotations

import re
from datetime import date
from typing import Annotated, Any, Literal

import msgspec

Duration = str | float | int
Scalar = str | int | float | bool | None
# Numbers outside these bounds are mistakes, never settings: a negative retry count, a
# backoff that shrinks the wait, a million polls. The loader names the bounds.
Attempts = Annotated[int, msgspec.Meta(ge=0, le=100)]
Polls = Annotated[int, msgspec.Meta(ge=1, le=10_000)]
Backoff = Annotated[float, msgspec.Meta(ge=1, le=100)]
Length = Annotated[int, msgspec.Meta(ge=0)]


class _Spec(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, frozen=True):
    pass


class Predicate(_Spec, frozen=True):
    """Checks on one value. Every field given must hold."""

    equals: Any = msgspec.UNSET
    exists: bool | None = None
    type: Literal["string", "number", "integer", "boolean", "array", "object", "null"] | None = None
    contains: Any = msgspec.UNSET
    matches: str | None = None
    gt: float | None = None
    gte: float | None = None
    lt: float | None = None
    lte: float | None = None
    length: Length | None = None
    one_of: list[Any] | None = None
    not_equals: Any = msgspec.UNSET


# a bare value is shorthand for {equals: value}
Check = Predicate | Scalar | list[Any]


class BodyExpect(_Spec, frozen=True):
    contains: str | None = None
    matches: str | None = None
    not_contains: str | None = None


class Expect(_Spec, frozen=True):
    status: int | str | list[int | str] | None = None
    headers: dict[str, Check] = {}
    json: dict[str, Check] = {}
    body: BodyExpect | None = None
    schema: dict[str, Any] | str | None = None
    """A JSON Schema inline, or a path relative to the flow file."""
    duration_ms: Predicate | None = None


class MultipartFile(_Spec, frozen=True):
    """A file part of a multipart body, read from disk when the request is sent."""

    file: str
    """A path relative to the flow file; may be a template."""
    content_type: str | None = None
    """Default: guessed from the file name, else application/octet-stream."""
    filename: str | None = None
    """The name the server sees; default: the file's own name."""


class GraphQL(_Spec, frozen=True):
    """A GraphQL request: sent as a JSON POST of {query, variables, operationName}."""

    query: str
    variables: dict[str, Any] = {}
    operation_name: str | None = None


class Tls(_Spec, frozen=True):
    """How HTTPS connections are made. Paths are relative to the flow file."""

    ca_bundle: str | None = None
    """PEM file of the certificate authorities to trust instead of the system's."""
    client_cert: str | None = None
    """PEM file of the client certificate (and its key, unless ``client_key`` is given)."""
    client_key: str | None = None
    verify: bool | None = None
    """False: accept any server certificate (a warning says so on every run). None: true,
    or what ``defaults.tls`` says."""


class BasicAuth(_Spec, frozen=True):
    username: str
    password: str


class OAuth2(_Spec, frozen=True):
    """OAuth2 client credentials (RFC 6749 section 4.4): a token fetched from ``token_url``,
    shared by every request with the same token_url, client_id, scope and audience, and
    fetched again before it expires and once after a 401."""

    token_url: str
    client_id: str
    client_secret: str
    scope: str | None = None
    audience: str | None = None
    refresh_before: Duration = "30s"
    """Fetch a new token when the one held expires within this."""
    client_auth: Literal["basic", "body"] = "basic"
    """How the client authenticates to token_url: HTTP Basic, or client_id and
    client_secret in the form body."""


class AwsSigV4(_Spec, frozen=True):
    access_key_id: str
    secret_access_key: str
    region: str
    service: str
    session_token: str | None = None


class Auth(_Spec, frozen=True):
    """Exactly one kind. Values may be templates, usually ``{{ secrets.NAME }}``."""

    basic: BasicAuth | None = None
    digest: BasicAuth | None = None
    oauth2: OAuth2 | None = None
    aws_sigv4: AwsSigV4 | None = None

    def kinds(self) -> list[str]:
        return [kind for kind in AUTH_KINDS if getattr(self, kind) is not None]


AUTH_KINDS = ("basic", "digest", "oauth2", "aws_sigv4")
NoAuth = Literal["none"]
"""``auth: none`` on a request: send it without ``defaults.auth`` (a login call under a
default OAuth2 or Basic auth)."""
CREDENTIAL_FIELDS = frozenset({"password", "client_secret", "secret_access_key", "session_token"})
"""The fields of an auth block that are secrets by kind: masked whatever they are named."""


BODY_KINDS = ("json", "body", "form", "multipart", "graphql")
"""The ways to give a request's body: at most one per request."""


class Request(_Spec, frozen=True):
    url: str
    method: str | None = None
    """Default: POST with ``graphql``, GET otherwise."""
    params: dict[str, Scalar | list[Scalar]] = {}
    headers: dict[str, str] = {}
    json: Any = msgspec.UNSET
    form: dict[str, str] | None = None
    body: str | None = None
    multipart: dict[str, str | MultipartFile] | None = None
    """Fields of a multipart/form-data body: text, or a file."""
    graphql: GraphQL | None = None
    timeout: Duration | None = None
    follow_redirects: bool | None = None
    auth: Auth | NoAuth | None = None
    """Replaces ``defaults.auth`` as a whole; ``none`` sends the request without one."""

    @property
    def verb(self) -> str:
        if self.method is not None:
            return self.method
        return "POST" if self.graphql is not None else "GET"

    def bodies(self) -> list[str]:
        """The body kinds the request gives (more than one is a mistake)."""
        given = {
            "json": self.json is not msgspec.UNSET,
            "body": self.body is not None,
            "form": self.form is not None,
            "multipart": self.multipart is not None,
            "graphql": self.graphql is not None,
        }
        return [kind for kind in BODY_KINDS if given[kind]]


class Capture(_Spec, frozen=True):
    """Exactly one source: json, header, cookie, regex, link or status."""

    json: str | None = None
    header: str | None = None
    cookie: str | None = None
    regex: str | None = None
    link: str | None = None
    """A relation type of the Link header (``next``): the target URL, made absolute."""
    status: bool = False
    secret: bool | None = None
    """Default: True for names in the ``auth.`` namespace, False otherwise."""
    collect: bool = False
    """Keep a list of what every response of the test's polling gives (every JSONPath node,
    page after page) instead of the value in the last response."""
    ttl: Duration | None = None
    """How long the captured value stays good (a token's lifetime): ``baton rerun`` runs
    the capturing test again rather than reuse a value older than this."""

    def source(self) -> tuple[str, str]:
        given = [
            (kind, value)
            for kind, value in (
                ("json", self.json),
                ("header", self.header),
                ("cookie", self.cookie),
                ("regex", self.regex),
                ("link", self.link),
                ("status", "status" if self.status else None),
            )
            if value is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "a capture takes exactly one of json, header, cookie, regex, link, status"
            )
        return given[0]


class Until(Expect, frozen=True):
    """Poll: repeat the request until these checks hold, at most ``max_attempts`` times.

    With ``next``, each response also gives the value ``{{ poll.next }}`` reads in the next
    request (a URL, a cursor, a page number), and the polling ends when a response gives
    none: following pages until there are no more.
    """

    interval: Duration | None = None
    """The wait between two requests: 500ms, or none when following ``next``."""
    max_attempts: Polls = 10
    next: Capture | None = None

    def wait(self) -> Duration:
        if self.interval is not None:
            return self.interval
        return 0 if self.next is not None else "500ms"


class Redact(_Spec, frozen=True):
    """What the flow adds to the names whose values are masked in every output (the keys of
    bodies at any depth, query parameters, form fields, headers), and takes away from them.
    Glob patterns matched against a whole name without case: ``ssn``, ``*card*``."""

    keys: list[str] = []
    keep: list[str] = []
    """Names that only look like credentials' (``token_type``): shown, not masked."""


RetryCondition = Literal["5xx", "429", "timeout", "connect"]


class Retry(_Spec, frozen=True):
    attempts: Attempts = 0
    """Extra attempts after the first."""
    delay: Duration = "200ms"
    backoff: Backoff = 2.0
    max_delay: Duration = "10s"
    on: list[RetryCondition] = msgspec.field(
        default_factory=lambda: ["5xx", "429", "timeout", "connect"]
    )


class Defaults(_Spec, frozen=True):
    timeout: Duration = "10s"
    retries: Retry | Attempts = 0
    headers: dict[str, str] = {}
    follow_redirects: bool = False
    redact: Redact = Redact()
    tls: Tls | None = None
    auth: Auth | NoAuth | None = None
    """``none`` here is refused by the checks with a readable line, not by the schema."""


RateLimit = Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]
UnhealthyAction = Literal["skip", "abort"]


class Service(_Spec, frozen=True):
    """A service the flow calls: checked before a run, its requests held to its rate limit.

    A test calls the service its ``service:`` names, or else the one whose ``base_url``
    begins its request's URL (the longest such base).
    """

    base_url: str
    """May be a template (``"{{ shop_url }}"``): an environment file gives it per environment."""
    health: str | None = None
    """The path (under base_url) of a GET that answers 2xx when the service is up; None: no
    check."""
    timeout: Duration = "5s"
    """For one health-check request."""
    retries: Attempts = 2
    """Extra health-check requests after a failed one."""
    degraded_after: Duration = "1s"
    """A health check that answers more slowly than this (or only after a retry) is degraded."""
    rate_limit: RateLimit | None = None
    """Requests per minute, every run of the process together; None: no limit."""
    on_unhealthy: UnhealthyAction = "skip"
    """skip: its tests are skipped ("service unhealthy"); abort: the run exits 3 first."""


class KnownFailure(_Spec, frozen=True):
    """A test expected to fail for now: it runs and is reported, but its failure fails the
    run only once ``until`` has passed (the last day the mark holds, UTC)."""

    reason: str
    until: date
    """YYYY-MM-DD."""


class Test(_Spec, frozen=True):
    __test__ = False  # not a pytest test class

    request: Request
    service: str | None = None
    """The name of the flow's service the test calls; None: the one its URL begins with."""
    description: str = ""
    depends_on: list[str] = []
    tags: list[str] = []
    skip: bool | str = False
    """True, or the reason to skip."""
    known_failure: KnownFailure | None = None
    expect: Expect | None = None
    capture: dict[str, Capture] = {}
    retries: Retry | Attempts | None = None
    until: Until | None = None
    redact: Redact | None = None
    """Added to ``defaults.redact``; a name this one lists wins over the defaults'."""
    tls: Tls | None = None
    """Replaces ``defaults.tls`` field by field: what it gives wins."""


class Use(_Spec, frozen=True):
    """A test of another flow file run first, once per ``baton run``, as a shared setup:
    its captures (and those of the tests it depends on there) are the using flow's too."""

    flow: str
    """The flow file, relative to this one."""
    test: str


class Flow(_Spec, frozen=True):
    name: str
    tests: dict[str, Test]
    use: list[Use] = []
    """Shared setups (see Use)."""
    project: str = "default"
    """Groups suites for history and analytics: a test is (project, suite, test, env)."""
    base_url: str = ""
    description: str = ""
    variables: dict[str, Any] = {}
    defaults: Defaults = Defaults()
    services: dict[str, Service] = {}


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def seconds(value: Duration) -> float:
    """``"250ms"`` -> 0.25; a bare number is seconds. Raises ValueError naming the value."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"duration {value!r} is negative")
        return float(value)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f'duration {value!r}: write a number of seconds or "250ms", "10s", "2m"')
    return float(match.group(1)) * _UNIT[match.group(2)]
