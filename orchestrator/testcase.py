"""One test of a run: render its request, send it with retries and polling, check the
response, capture what later tests need, and record each step as an event.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import hashlib
import mimetypes
import ssl
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
import httpx
import msgspec

from events import types as ev
from events.context import assign_dotted
from events.secrets import MASK, is_auth_name, is_secret_capture
from events.store import now_us
from orchestrator import templating
from orchestrator.assertions import evaluate
from orchestrator.auth import OAUTH2_TOKEN_NAME, AuthFailure, auth_of, credentials
from orchestrator.captures import MISSING, CaptureError, capture, capture_all
from orchestrator.compiled import CompiledTest, Expectation
from orchestrator.known_failures import judged
from orchestrator.model import Capture, Expect
from orchestrator.results import AssertionResult, Exchange, ResponseView, TestResult
from orchestrator.run_client import text as response_text
from orchestrator.tls import EXTENSION as tls_extension
from orchestrator.tls import TlsConfig, TlsProblem

if TYPE_CHECKING:
    from orchestrator.runner import RunExecution
    from orchestrator.services import RateLimiter

_E = TypeVar("_E", bound=Expect)


class _Failure(Exception):
    def __init__(self, category: ev.FailureCategory, message: str) -> None:
        super().__init__(message)
        self.category: ev.FailureCategory = category


class TestExecution:
    __test__ = False  # not a pytest test class

    def __init__(
        self, run: RunExecution, compiled: CompiledTest, limiter: RateLimiter | None = None
    ) -> None:
        self.run = run
        self.limiter = limiter
        """The rate limit of the service the test calls: every request waits its turn."""
        self.compiled = compiled
        self.name = compiled.name
        self.redactor = run.redactor.scoped(compiled.redaction)
        self.attempt = 0
        """Requests sent, polls and retries included."""
        self.tries = 0
        """Attempts in the sense of retries: what a flaky-test detector counts."""
        self.unreported: ResponseView | None = None
        self.unreported_at = 0
        """When the unreported response was received (microseconds since the Unix epoch)."""
        self.exchange: Exchange | None = None
        self.known_failure = judged(compiled.spec.known_failure, run.inputs.today)
        self.assertions: list[AssertionResult] = []
        self.captured: dict[str, Any] = {}
        self.collected: dict[str, list[Any]] = {}
        self._values: dict[str, Any] = {}
        """The captures of the last response, read once (CaptureError for one not found)."""
        self.poll: dict[str, Any] = {"attempt": 1}
        """``{{ poll.* }}``: the request's number in the polling, the previous ``next``."""
        # what this test's templates read: the run's names, and its own poll values
        self.namespace: dict[str, Any] = {**run.namespace, "poll": self.poll}

    async def execute(self) -> TestResult:
        start = time.perf_counter()
        try:
            response = await self._send_until()
            await self._learn_secrets(response)
            self._report_response()
            await self._check(response)
            self._capture(response)
        except _Failure as failure:
            self._report_response()
            duration = (time.perf_counter() - start) * 1000
            message = self.redactor.redact(str(failure))
            self.run.emit(
                ev.TestFailed(
                    test=self.name,
                    attempts=self.tries,
                    duration_ms=round(duration, 3),
                    category=failure.category,
                    message=message,
                    known_failure=self.known_failure,
                )
            )
            return self._result("failed", duration, failure.category, message)
        duration = (time.perf_counter() - start) * 1000
        self.run.emit(
            ev.TestPassed(
                test=self.name,
                attempts=self.tries,
                duration_ms=round(duration, 3),
                known_failure=self.known_failure,
            )
        )
        return self._result("passed", duration)

    def _result(
        self,
        status: ev.TestStatus,
        duration: float,
        category: ev.FailureCategory | None = None,
        message: str = "",
    ) -> TestResult:
        return TestResult(
            name=self.name,
            status=status,
            duration_ms=round(duration, 3),
            attempts=self.tries,
            category=category,
            message=message,
            assertions=self.assertions,
            captures=self.captured,
            exchange=self.exchange if status == "failed" else None,
            tags=self.compiled.spec.tags,
            known_failure=self.known_failure,
        )

    async def _render(self, renderer: templating.Renderer) -> Any:
        try:
            return await self.run.runner.render(renderer, self.namespace)
        except templating.TemplateError as exc:
            raise _Failure("template", f"template error: {exc}") from None

    async def _send_until(self) -> ResponseView:
        until = self.compiled.until
        polls = until.spec.max_attempts if until is not None else 1
        for poll in range(1, polls + 1):
            self.poll["attempt"] = poll
            response = await self._send_with_retries()
            await self._collect(response)
            if until is None:
                return response
            rendered = await self._expect(until)
            checks = await self._evaluate(rendered, response)
            held = all(check.passed for check in checks)
            if rendered.next is None:
                if held:
                    return response
                failure = f"until: the condition still failed after {polls} attempts"
            else:
                following = await self.run.runner.off_loop(_next, rendered.next, response)
                if checks and held:
                    return response
                if following is None:
                    if not checks:
                        return response  # the last page
                    self._report_response()
                    self.assertions.extend(self._record(checks, "until ", response=response))
                    raise _Failure(
                        "assertion",
                        f"until: no next page after {poll} requests, and the condition "
                        "still failed",
                    )
                self.poll["next"] = following
                failure = (
                    f"until: still a next page after {polls} requests; "
                    "raise until.max_attempts to follow more"
                )
            self._report_response()
            if poll == polls:
                self.assertions.extend(self._record(checks, "until ", response=response))
                raise _Failure("assertion", failure)
            await asyncio.sleep(self.compiled.poll_wait)
        raise AssertionError("unreachable")

    async def _collect(self, response: ResponseView) -> None:
        """What ``collect: true`` captures keep of every response, page after page."""
        for name, spec in self.compiled.captures.items():
            if spec.collect:
                try:
                    found = await self.run.runner.off_loop(capture_all, name, spec, response)
                except CaptureError as exc:
                    raise _Failure("capture", exc.shown(self.redactor)) from None
                for value in found:
                    if self._is_secret(name, spec, value):
                        self.redactor.add(_secret_text(value))
                self.collected.setdefault(name, []).extend(found)

    async def _evaluate(self, expect: Expect, response: ResponseView) -> list[AssertionResult]:
        base_dir = self.run.plan.loaded.base_dir
        return await self.run.runner.off_loop(
            functools.partial(evaluate, base_dir=base_dir), expect, response
        )

    async def _expect(self, expectation: Expectation[_E]) -> _E:
        expect = expectation.spec
        if expectation.renderer is None:
            return expect
        rendered = await self._render(expectation.renderer)
        try:
            return msgspec.convert(rendered, type(expect))
        except msgspec.ValidationError as exc:
            raise _Failure("template", f"expectations after rendering: {exc}") from None

    async def _send_with_retries(self) -> ResponseView:
        policy = self.compiled.retry
        for retry in range(policy.attempts + 1):
            self.attempt += 1
            if retry or self.tries == 0:
                self.tries = retry + 1
                self.run.emit(ev.TestStarted(test=self.name, attempt=self.tries))
            try:
                response = await self._send()
            except _Failure as failure:
                if retry < policy.attempts and failure.category in policy.failures:
                    await asyncio.sleep(policy.backoff_after(retry))
                    continue
                raise
            condition = "5xx" if response.status >= 500 else "429" if response.status == 429 else ""
            if condition and condition in policy.statuses and retry < policy.attempts:
                self._report_response()
                wait = _retry_after(response.headers.get("retry-after"))
                await asyncio.sleep(min(max(wait, policy.backoff_after(retry)), policy.max_delay))
                continue
            return response
        raise AssertionError("unreachable")

    async def _send(self) -> ResponseView:
        run, compiled = self.run, self.compiled
        method = compiled.method
        parts = compiled.request
        url = str(await self._render(parts.url))
        if "://" not in url:
            url = f"{run.base_url}/{url.lstrip('/')}"
        headers = {str(k): str(v) for k, v in (await self._render(parts.headers)).items()}
        content: bytes | str | None = None
        if parts.json is not None or parts.graphql is not None:
            if parts.graphql is not None:
                content = msgspec.json.encode(_graphql_body(await self._render(parts.graphql)))
            elif parts.json is not None:
                content = msgspec.json.encode(await self._render(parts.json))
            if not any(name.lower() == "content-type" for name in headers):
                headers["content-type"] = "application/json"
        elif parts.body is not None:
            content = str(await self._render(parts.body))
        form = await self._render(parts.form) if parts.form is not None else None
        files = None
        shown: Any = content or form
        if parts.multipart is not None:
            form, files, shown = await self._multipart(await self._render(parts.multipart))
        params = await self._render(parts.params) if parts.params is not None else None
        timeout = compiled.timeout
        tls = await self._tls()
        auth = await self._auth()
        try:
            prepared = run.client.prepare(
                method,
                url,
                headers=headers,
                content=content,
                data=form,
                files=files,
                params=params,
                timeout=timeout,
            )
        except httpx.InvalidURL as exc:
            self._note_exchange(method, url, headers, shown)
            message = f"cannot send to {url}: the URL is not valid ({exc})"
            raise _Failure("connection", message) from None
        if tls is not None:
            prepared.extensions[tls_extension] = tls
        # what is recorded is what is sent: the URL with the query of `params` merged in
        url = str(prepared.url)
        redactor = self.redactor
        redactor.add_sent_credentials(headers)
        await run.runner.writer.writable()  # paused while the event store is unreachable
        if self.limiter is not None:
            await self.limiter.acquire()
        self.run.emit(
            ev.RequestSent(
                test=self.name,
                attempt=self.attempt,
                method=method,
                url=redactor.redact(url),
                headers=redactor.mask_headers(headers),
                body_excerpt=redactor.excerpt(_text(shown or ""), run.runner.excerpt_limit),
                insecure=tls is not None and not tls.verify,
            )
        )
        started = time.perf_counter()
        try:
            response = await run.client.send(
                prepared, follow_redirects=compiled.follow_redirects, auth=auth
            )
        except AuthFailure as exc:
            self._note_exchange(method, url, headers, shown)
            raise _Failure("connection", str(exc)) from None
        except httpx.TimeoutException as exc:
            self._note_exchange(method, url, headers, shown)
            lost = _not_a_timeout(exc)
            if lost is None:
                raise _Failure("timeout", f"no response within {timeout:g} s from {url}") from None
            # httpx-aiohttp maps every aiohttp connection error to ConnectTimeout, a refused
            # certificate and a closed connection too: those are no timeouts
            hint = _tls_hint(exc, url, client_cert=tls is not None and tls.client_cert is not None)
            raise _Failure("connection", f"cannot reach {url}: {lost}{hint}") from None
        except httpx.TransportError as exc:
            self._note_exchange(method, url, headers, shown)
            raise _Failure(
                "connection",
                f"cannot reach {url}: {exc or type(exc).__name__}"
                + _tls_hint(exc, url, client_cert=tls is not None and tls.client_cert is not None),
            ) from None
        received_at = now_us()
        elapsed = (time.perf_counter() - started) * 1000
        joined: dict[str, str] = {}
        for key, value in response.headers.multi_items():  # lower-case names
            joined[key] = f"{joined[key]}, {value}" if key in joined else value
        view = ResponseView(
            status=response.status_code,
            headers=joined,
            text=response_text(response),
            duration_ms=elapsed,
            set_cookie=tuple(response.headers.get_list("set-cookie"))
            if "set-cookie" in joined
            else (),
            url=str(response.url),
        )
        self._note_exchange(method, url, headers, shown)
        self.unreported = view
        self.unreported_at = received_at
        return view

    async def _multipart(
        self, fields: Mapping[str, Any]
    ) -> tuple[dict[str, str], dict[str, tuple[str, bytes, str]], str]:
        """The text fields, the files read from disk, and what events show of the body:
        each field's text, each file's name, type, size and sha256, never its bytes."""
        base_dir = self.run.plan.loaded.base_dir
        texts: dict[str, str] = {}
        files: dict[str, tuple[str, bytes, str]] = {}
        summary = []
        for name, value in fields.items():
            if not isinstance(value, Mapping):
                texts[str(name)] = str(value)
                summary.append(f"{name}={value}")
                continue
            path = base_dir / str(value["file"])
            if not self.run.runner.limits.read_files:
                raise _Failure("template", f"multipart.{name}: this run may not read files")
            try:
                data = await asyncio.to_thread(path.read_bytes)
            except OSError as exc:
                raise _Failure(
                    "template",
                    f"multipart.{name}: cannot read {path}: {exc.strerror}",
                ) from None
            filename = str(value.get("filename") or path.name)
            kind = str(
                value.get("content_type")
                or mimetypes.guess_type(filename)[0]
                or "application/octet-stream"
            )
            files[str(name)] = (filename, data, kind)
            digest = hashlib.sha256(data).hexdigest()
            summary.append(f"{name}=@{filename} ({kind}, {len(data)} bytes, sha256 {digest})")
        return texts, files, "multipart/form-data: " + "; ".join(summary)

    async def _tls(self) -> TlsConfig | None:
        spec = self.compiled.tls
        if spec is None:
            return None
        if not self.run.runner.limits.read_files:
            raise _Failure("connection", "tls: this run may not read certificate files")
        paths = {}
        for field in ("ca_bundle", "client_cert", "client_key"):
            value = getattr(spec, field)
            paths[field] = None if value is None else str(await self._render_text(value))
        try:
            config = TlsConfig.of(
                self.run.plan.loaded.base_dir, verify=spec.verify is not False, **paths
            )
            # read here, not in the transport, so that a bad file fails with its setting named
            config.context()
        except TlsProblem as exc:
            raise _Failure("connection", str(exc)) from None
        return config

    async def _auth(self) -> httpx.Auth | None:
        if self.compiled.auth is None:
            return None
        rendered = await self._render(self.compiled.auth)
        oauth2 = rendered.get("oauth2")
        if isinstance(oauth2, dict) and "://" not in str(oauth2.get("token_url", "")):
            token_url = str(oauth2.get("token_url", "")).lstrip("/")
            rendered = {"oauth2": {**oauth2, "token_url": f"{self.run.base_url}/{token_url}"}}
        for value in credentials(rendered):
            self.redactor.add(value)  # secrets by kind: masked whatever they are named
        try:
            return auth_of(
                rendered, tokens=self.run.runner.tokens, client=self.run.client, learn=self._token
            )
        except (AuthFailure, ValueError) as exc:
            raise _Failure("template", f"auth: {exc}") from None

    def _token(self, token: str, fetched: bool) -> None:
        """An OAuth2 token this test sends: a secret; its fetch is recorded, sealed."""
        self.redactor.add(token)  # once: a known value is not added again
        if fetched:
            sealed = self.run.runner.cipher.encrypt(token)
            self.run.emit(ev.AuthTokenUpdated(test=self.name, name=OAUTH2_TOKEN_NAME, value=sealed))

    async def _render_text(self, text: str) -> Any:
        if not templating.has_template(text):
            return text
        return await self._render(templating.compile_value(text))

    def _report_response(self) -> None:
        """Record the last response. Deferred until the test's secret captures are known, so
        a token is redacted in the very response that brings it."""
        view, self.unreported = self.unreported, None
        if view is None or self.exchange is None:
            return
        excerpt = self.redactor.excerpt(view.text, self.run.runner.excerpt_limit)
        masked = self.redactor.mask_headers(view.headers)
        self.run.emit(
            ev.ResponseReceived(
                test=self.name,
                attempt=self.attempt,
                status=view.status,
                headers=masked,
                body_excerpt=excerpt,
                timings=ev.Timings(total_ms=round(view.duration_ms, 3)),
            ),
            at=self.unreported_at,
        )
        self.exchange.status = view.status
        self.exchange.response_headers = masked
        self.exchange.response_excerpt = excerpt
        self.exchange.duration_ms = round(view.duration_ms, 3)

    async def _learn_secrets(self, response: ResponseView) -> None:
        captures = self.compiled.captures
        self._values = await self.run.runner.off_loop(_read_captures, captures, response)
        for name, spec in captures.items():
            if spec.collect:  # _collect learnt those, one by one
                self._values[name] = self.collected.get(name, [])
                continue
            value = self._values[name]
            if isinstance(value, CaptureError):
                continue  # reported when the captures run
            if self._is_secret(name, spec, value):
                self.redactor.add(_secret_text(value))

    def _is_secret(self, name: str, spec: Capture, value: Any) -> bool:
        """A secret capture: ``secret: true`` or ``auth.*``; a value that shows a known
        secret, whatever ``secret:`` says (an echo of a password is the password); and,
        unless ``secret: false``, a credential by its shape: a cookie, a name, a JSONPath
        or a header named like a credential's, a value with one inside."""
        if is_secret_capture(name, spec.secret) or self.redactor.holds(value):
            return True
        if spec.secret is False:
            return False
        credential = self.redactor.policy.mentions_credential
        kind, source = spec.source()
        return (
            kind == "cookie"
            or credential(name)
            or (kind in ("json", "header") and credential(source))
            or self.redactor.redact_value(value) != value
        )

    def _note_exchange(self, method: str, url: str, headers: dict[str, str], body: Any) -> None:
        redactor = self.redactor
        self.exchange = Exchange(
            method=method,
            url=redactor.redact(url),
            request_headers=redactor.mask_headers(headers),
            request_body=redactor.excerpt(_text(body or ""), self.run.runner.excerpt_limit),
        )

    async def _check(self, response: ResponseView) -> None:
        checks = []
        if self.compiled.expect is not None:
            checks = await self._evaluate(await self._expect(self.compiled.expect), response)
        if self.compiled.graphql_errors_fail:
            checks.append(_graphql_errors(response))
        if not checks:
            return
        recorded = self._record(checks, response=response)
        self.assertions.extend(recorded)
        failed = [check for check in recorded if not check.passed]
        if failed:
            category: ev.FailureCategory = "server_error" if response.status >= 500 else "assertion"
            first = failed[0]
            raise _Failure(
                category,
                f"{len(failed)} of {len(checks)} checks failed; first: {first.subject} "
                f"{first.predicate}: expected {_short(first.expected)}, "
                f"got {_short(first.actual)}" + (f" ({first.message})" if first.message else ""),
            )

    def _record(
        self, checks: list[AssertionResult], prefix: str = "", *, response: ResponseView
    ) -> list[AssertionResult]:
        redactor = self.redactor
        recorded = []
        for check in checks:
            safe = AssertionResult(
                subject=prefix + check.subject,
                predicate=check.predicate,
                expected=redactor.redact_value(check.expected),
                actual=self._shown_actual(check, response),
                passed=check.passed,
                message=redactor.redact(check.message),
            )
            recorded.append(safe)
            self.run.emit(
                ev.AssertionEvaluated(
                    test=self.name,
                    attempt=self.attempt,
                    subject=safe.subject,
                    predicate=safe.predicate,
                    expected=safe.expected,
                    actual=safe.actual,
                    passed=safe.passed,
                )
            )
        return recorded

    def _shown_actual(self, check: AssertionResult, response: ResponseView) -> Any:
        """What a check found, as events and reports show it: redacted; masked outright
        when what it checks is named like a credential (``json $.refresh_token``)."""
        actual = check.actual
        if actual is MISSING or actual is None or isinstance(actual, bool):
            return actual
        if self.redactor.policy.mentions_credential(check.subject):
            return MASK
        text = response.text
        if isinstance(actual, str) and actual.endswith("…") and text.startswith(actual[:-1]):
            # the start of the body: redacted as a whole, so that the cut hides no secret
            return self.redactor.excerpt(response.text, len(actual) - 1) + "…"
        return self.redactor.redact_value(actual)

    def _capture(self, response: ResponseView) -> None:
        run = self.run
        for name, spec in self.compiled.captures.items():
            value = self._values[name]
            if isinstance(value, CaptureError):
                raise _Failure("capture", value.shown(self.redactor))
            assign_dotted(run.namespace, name, value)
            if self._is_secret(name, spec, value):
                text = _secret_text(value)
                self.redactor.add(text)
                sealed = run.runner.cipher.encrypt(text)
                self.captured[name] = MASK
                if is_auth_name(name):
                    run.emit(ev.AuthTokenUpdated(test=self.name, name=name, value=sealed))
                else:
                    run.emit(
                        ev.VariableCaptured(test=self.name, name=name, value=sealed, secret=True)
                    )
            else:
                self.captured[name] = value
                run.emit(ev.VariableCaptured(test=self.name, name=name, value=value))


def _graphql_body(rendered: Mapping[str, Any]) -> dict[str, Any]:
    body = {"query": rendered["query"], "variables": rendered.get("variables") or {}}
    if rendered.get("operationName") is not None:
        body["operationName"] = rendered["operationName"]
    return body


def _graphql_errors(response: ResponseView) -> AssertionResult:
    """A GraphQL response's ``errors``: none, or the test fails with their messages (a
    GraphQL server answers 200 with errors, so the status alone says nothing)."""
    try:
        data = msgspec.json.decode(response.text)
    except msgspec.DecodeError:
        data = None
    errors = data.get("errors") if isinstance(data, dict) else None
    if not isinstance(errors, list) or not errors:
        return AssertionResult("graphql errors", "empty", [], [], True)
    messages = [
        str(error.get("message", error)) if isinstance(error, dict) else str(error)
        for error in errors
    ]
    return AssertionResult(
        "graphql errors",
        "empty",
        [],
        messages[:3],
        False,
        f"the response has {len(errors)} GraphQL error(s); to expect them, check $.errors "
        "in expect.json",
    )


def _not_a_timeout(exc: BaseException) -> BaseException | None:
    """The connection error behind a TimeoutException that is none: a TLS error, or the
    server closing the connection. None for a real timeout."""
    seen: BaseException | None = exc.__cause__
    while seen is not None:
        if isinstance(seen, TimeoutError):
            return None
        if isinstance(seen, ssl.SSLError | aiohttp.ClientConnectionError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _tls_hint(exc: BaseException, url: str, *, client_cert: bool) -> str:
    """What to do about a TLS connection that failed."""
    text = str(_not_a_timeout(exc) or exc)
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return (
            "; the server's certificate is not trusted: give its CA with tls.ca_bundle "
            "(or tls.verify: false, for a test server only)"
        )
    asked = "CERTIFICATE_REQUIRED" in text or "HANDSHAKE_FAILURE" in text
    closed = "disconnected" in text.lower() and url.startswith("https:")
    if asked or (closed and not client_cert):
        return (
            "; if the server requires a client certificate (mutual TLS), give "
            "tls.client_cert and tls.client_key"
        )
    return ""


def _next(spec: Capture, response: ResponseView) -> Any:
    """What ``until.next`` finds in the response; None when there is no next page."""
    try:
        found = capture("until.next", spec, response)
    except CaptureError:
        return None
    return None if found == "" else found


def _read_captures(captures: Mapping[str, Capture], response: ResponseView) -> dict[str, Any]:
    """Each capture's value in ``response``, or the CaptureError that says why it has none
    (``collect`` captures are _collect's)."""
    values: dict[str, Any] = {}
    for name, spec in captures.items():
        if spec.collect:
            continue
        try:
            values[name] = capture(name, spec, response)
        except CaptureError as exc:
            values[name] = exc
    return values


def _retry_after(value: str | None) -> float:
    """Retry-After in seconds: a number, or an HTTP date; 0 when absent or unreadable."""
    if not value:
        return 0.0
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return 0.0
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _secret_text(value: Any) -> str:
    return value if isinstance(value, str) else msgspec.json.encode(value).decode()


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, str):
        return value
    return msgspec.json.encode(value).decode()


def _short(value: Any, limit: int = 120) -> str:
    text = _text(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
