"""The services a flow declares: which one a test calls, their health before a run, and
their rate limits, held by one limiter per service per process that every run shares.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from events import types as ev
from events.secrets import Redactor
from orchestrator import templating
from orchestrator.model import Flow, Service, Test, seconds

WINDOW = 60.0
"""Seconds a rate limit counts requests over: limits are per minute."""
HEALTH_RETRY_WAIT = 0.2
"""Seconds between two requests of a health check."""


class Clock(Protocol):
    """Time as the limiter and the health checks see it: tests pass one that sleeps
    without waiting."""

    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


@dataclass(frozen=True)
class ResolvedService:
    """A declared service with its base URL rendered for a run."""

    name: str
    base_url: str
    spec: Service

    @property
    def key(self) -> tuple[str, str]:
        """What identifies the service in a process: runs of one flow with different
        environments may send the same name to different hosts."""
        return self.name, self.base_url

    @property
    def health_url(self) -> str | None:
        if self.spec.health is None:
            return None
        return f"{self.base_url}/{self.spec.health.lstrip('/')}"


def resolve(flow: Flow, namespace: Mapping[str, Any]) -> dict[str, ResolvedService]:
    """The flow's services, base URLs rendered with ``namespace``. Raises TemplateError."""
    return {
        name: ResolvedService(
            name, str(templating.render(spec.base_url, namespace)).rstrip("/"), spec
        )
        for name, spec in flow.services.items()
    }


def service_of(
    test: Test, url: str, services: Mapping[str, ResolvedService]
) -> ResolvedService | None:
    """The service ``test`` calls: the one it names, or the one with the longest base URL
    that ``url`` (the rendered request URL) begins with; None when it calls none."""
    if test.service is not None:
        return services[test.service]
    matching = [
        service
        for service in services.values()
        if url == service.base_url or url.startswith(service.base_url + "/")
    ]
    return max(matching, key=lambda service: len(service.base_url), default=None)


class RateLimiter:
    """At most ``per_minute`` requests in any 60 seconds: a request that would be one too
    many waits until the oldest of the window is a minute old. Waiters go in turn."""

    def __init__(self, per_minute: int, clock: Clock) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._sent: deque[float] = deque()
        self._turn = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._turn:
            while True:
                now = self._clock.now()
                while self._sent and self._sent[0] <= now - WINDOW:
                    self._sent.popleft()
                if len(self._sent) < self.per_minute:
                    self._sent.append(now)
                    return
                await self._clock.sleep(self._sent[0] + WINDOW - now)


class Limiters:
    """One RateLimiter per service (name and base URL) for the whole process."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._limiters: dict[tuple[str, str], RateLimiter] = {}

    def of(self, service: ResolvedService) -> RateLimiter | None:
        if service.spec.rate_limit is None:
            return None
        limiter = self._limiters.get(service.key)
        if limiter is None:
            limiter = RateLimiter(service.spec.rate_limit, self.clock)
            self._limiters[service.key] = limiter
        return limiter


@dataclass(frozen=True)
class Health:
    """A health check's outcome; ``reason`` says what failed, for a skipped test."""

    service: ResolvedService
    status: ev.HealthStatus
    attempts: int
    url: str
    response_time_ms: float | None = None
    status_code: int | None = None
    error: str = ""

    @property
    def usable(self) -> bool:
        return self.status in ("healthy", "degraded")

    @property
    def reason(self) -> str:
        return f"service unhealthy: {self.service.name}: {self.error}"

    def event(self, redactor: Redactor, **where: str) -> ev.ServiceHealthChecked:
        return ev.ServiceHealthChecked(
            service=self.service.name,
            url=redactor.redact(self.url),
            status=self.status,
            attempts=self.attempts,
            response_time_ms=self.response_time_ms,
            status_code=self.status_code,
            error=redactor.redact(self.error),
            **where,
        )


async def check(
    service: ResolvedService, transport: httpx.AsyncBaseTransport, clock: Clock
) -> Health:
    """GET the service's health URL within its timeout, retried ``retries`` times."""
    spec = service.spec
    url = service.health_url
    assert url is not None
    timeout = seconds(spec.timeout)
    slow_ms = seconds(spec.degraded_after) * 1000
    attempts = spec.retries + 1
    failure = Health(service, "unhealthy", 0, url)
    # not closed: closing a client closes its transport, the runs' shared pool
    client = httpx.AsyncClient(transport=transport, timeout=timeout)
    for attempt in range(1, attempts + 1):
        started = time.perf_counter()
        try:
            response = await client.get(url)
        except httpx.TimeoutException:
            failure = Health(
                service,
                "timeout",
                attempt,
                url,
                error=f"GET {url}: no answer within {timeout:g} s",
            )
        except (httpx.TransportError, httpx.InvalidURL) as exc:
            failure = Health(
                service, "unhealthy", attempt, url, error=f"GET {url}: cannot connect ({exc})"
            )
        else:
            elapsed = round((time.perf_counter() - started) * 1000, 3)
            code = response.status_code
            if code < 400:
                slow = elapsed > slow_ms
                status: ev.HealthStatus = "degraded" if slow or attempt > 1 else "healthy"
                note = (
                    f"answered in {elapsed:g} ms, over {slow_ms:g} ms"
                    if slow
                    else f"answered only at attempt {attempt}"
                    if attempt > 1
                    else ""
                )
                return Health(service, status, attempt, url, elapsed, code, note)
            failure = Health(
                service,
                "unhealthy",
                attempt,
                url,
                elapsed,
                code,
                f"GET {url} answered {code}",
            )
        if attempt < attempts:
            await clock.sleep(HEALTH_RETRY_WAIT)
    suffix = f" (after {attempts} attempts)" if attempts > 1 else ""
    return Health(
        service,
        failure.status,
        failure.attempts,
        url,
        failure.response_time_ms,
        failure.status_code,
        failure.error + suffix,
    )
