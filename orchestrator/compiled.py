"""A test of a plan, compiled: its templates parsed, its defaults resolved, once.

``Plan.compiled`` builds one per test on first use and every run of the plan shares it
(each row of a batch, too), so that a run does per request only what the request needs:
render, send, check, capture.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgspec

from events import types as ev
from events.secrets import Policy, policy_for
from orchestrator import templating
from orchestrator.model import (
    Auth,
    Capture,
    Defaults,
    Expect,
    NoAuth,
    Redact,
    Request,
    Retry,
    Test,
    Tls,
    Until,
    seconds,
)

E = TypeVar("E", bound=Expect)


@dataclass(frozen=True)
class RequestParts:
    """A test's request: each part a function of the namespace."""

    url: templating.Renderer
    headers: templating.Renderer
    json: templating.Renderer | None
    body: templating.Renderer | None
    form: templating.Renderer | None
    params: templating.Renderer | None
    multipart: templating.Renderer | None
    """Renders to {field: text | {file, content_type?, filename?}}."""
    graphql: templating.Renderer | None
    """Renders to the JSON body {query, variables, operationName}."""

    @classmethod
    def of(cls, request: Request, default_headers: Mapping[str, str]) -> RequestParts:
        def optional(value: Any) -> templating.Renderer | None:
            return None if value is None else templating.compile_value(value)

        return cls(
            url=templating.compile_value(request.url),
            headers=templating.compile_value({**default_headers, **request.headers}),
            json=None if request.json is msgspec.UNSET else templating.compile_value(request.json),
            body=optional(request.body),
            form=optional(request.form),
            params=optional(request.params or None),
            multipart=optional(
                None
                if request.multipart is None
                else {
                    field: value if isinstance(value, str) else msgspec.to_builtins(value)
                    for field, value in request.multipart.items()
                }
            ),
            graphql=optional(
                None
                if request.graphql is None
                else {
                    "query": request.graphql.query,
                    "variables": request.graphql.variables,
                    "operationName": request.graphql.operation_name,
                }
            ),
        )


@dataclass(frozen=True)
class Expectation(Generic[E]):
    """Checks as the flow gives them, and what renders their templates (None: none)."""

    spec: E
    renderer: templating.Renderer | None

    @classmethod
    def of(cls, spec: E) -> Expectation[E]:
        data = msgspec.to_builtins(spec)
        has = next(templating.template_strings(data), None) is not None
        return cls(spec, templating.compile_value(data) if has else None)


@dataclass(frozen=True)
class RetryPolicy:
    """A test's ``retries`` (or the flow's default), durations in seconds."""

    attempts: int
    statuses: frozenset[str]
    """The conditions a response meets by its status: ``5xx``, ``429``."""
    failures: frozenset[ev.FailureCategory]
    """The failures that are retried: ``timeout``, ``connection``."""
    delay: float
    backoff: float
    max_delay: float

    @classmethod
    def of(cls, spec: Retry) -> RetryPolicy:
        failures: set[ev.FailureCategory] = set()
        if "timeout" in spec.on:
            failures.add("timeout")
        if "connect" in spec.on:
            failures.add("connection")
        return cls(
            attempts=spec.attempts,
            statuses=frozenset(spec.on) & {"5xx", "429"},
            failures=frozenset(failures),
            delay=seconds(spec.delay),
            backoff=spec.backoff,
            max_delay=seconds(spec.max_delay),
        )

    def backoff_after(self, retry: int) -> float:
        """The wait before the retry after attempt ``retry`` (0 for the first)."""
        return min(self.delay * self.backoff**retry, self.max_delay)


@dataclass(frozen=True)
class CompiledTest:
    name: str
    spec: Test
    request: RequestParts
    timeout: float
    """Seconds: the request's timeout, or the flow's default."""
    follow_redirects: bool
    retry: RetryPolicy
    expect: Expectation[Expect] | None
    until: Expectation[Until] | None
    poll_wait: float
    """Seconds between two requests of ``until`` polling."""
    captures: Mapping[str, Capture]
    redaction: Policy
    """The flow's ``defaults.redact`` with the test's own ``redact``."""
    method: str = "GET"
    tls: Tls | None = None
    """The flow's ``defaults.tls`` with the test's own over it; None: the system's."""
    graphql_errors_fail: bool = False
    """A GraphQL test whose expect does not check ``$.errors``: errors fail it."""
    auth: templating.Renderer | None = None
    """Renders to {kind: settings}: the request's ``auth``, or else ``defaults.auth``."""


def compile_test(name: str, test: Test, defaults: Defaults) -> CompiledTest:
    """Durations are the loader's checked ones: they convert without error."""
    request = test.request
    retries = defaults.retries if test.retries is None else test.retries
    return CompiledTest(
        name=name,
        spec=test,
        request=RequestParts.of(request, defaults.headers),
        timeout=seconds(request.timeout if request.timeout is not None else defaults.timeout),
        follow_redirects=(
            request.follow_redirects
            if request.follow_redirects is not None
            else defaults.follow_redirects
        ),
        retry=RetryPolicy.of(Retry(attempts=retries) if isinstance(retries, int) else retries),
        expect=Expectation.of(test.expect) if test.expect is not None else None,
        until=Expectation.of(test.until) if test.until is not None else None,
        poll_wait=seconds(test.until.wait()) if test.until is not None else 0.0,
        captures=test.capture,
        redaction=redaction_policy(defaults.redact, test.redact),
        method=request.verb,
        tls=merged_tls(defaults.tls, test.tls),
        graphql_errors_fail=request.graphql is not None and not expects_errors(test.expect),
        auth=_auth(defaults.auth if request.auth is None else request.auth),
    )


def _auth(auth: Auth | NoAuth | None) -> templating.Renderer | None:
    if not isinstance(auth, Auth):
        return None
    return templating.compile_value(msgspec.to_builtins(auth))


def merged_tls(defaults: Tls | None, test: Tls | None) -> Tls | None:
    """The test's TLS settings over the flow's, field by field."""
    if defaults is None or test is None:
        return test or defaults
    own = {k: v for k, v in msgspec.structs.asdict(test).items() if v is not None}
    return msgspec.structs.replace(defaults, **own)


def expects_errors(expect: Expect | None) -> bool:
    """Whether the test checks the GraphQL ``errors`` array itself (``$.errors...``)."""
    if expect is None:
        return False
    prefixes = ("$.errors", "$['errors']", '$["errors"]')
    return any(path.replace(" ", "").startswith(prefixes) for path in expect.json)


def redaction_policy(defaults: Redact, test: Redact | None = None) -> Policy:
    """The policy of a test: the flow's ``defaults.redact`` and the test's own ``redact``;
    a name the test lists wins over the defaults' opposite choice."""
    if test is None:
        return policy_for(tuple(defaults.keys), tuple(defaults.keep))
    keys = [key for key in defaults.keys if key not in test.keep] + test.keys
    keep = [key for key in defaults.keep if key not in test.keys] + test.keep
    return policy_for(tuple(keys), tuple(keep))
