"""What a run produces, as plain data: the runner fills these in, reporters only render them.

Every string here has already passed through the run's redactor: no secret in clear.
"""

from __future__ import annotations

import contextlib
import functools
import http.cookies
from dataclasses import dataclass
from typing import Any

import msgspec

from events.types import FailureCategory, KnownFailureMark, RunStatus, TestStatus


class AssertionResult(msgspec.Struct, frozen=True, omit_defaults=True):
    subject: str
    """What was checked: ``status``, ``header Content-Type``, ``json $.id``, ``body``..."""
    predicate: str
    """``equals``, ``exists``, ``lt``, ``schema``..."""
    expected: Any
    actual: Any
    passed: bool
    message: str = ""
    """Why it failed, in a sentence, when expected/actual alone do not say it."""


class Exchange(msgspec.Struct, omit_defaults=True):
    """The last request of a test and what came back, for failure reports."""

    method: str
    url: str
    request_headers: dict[str, str] = {}
    request_body: str = ""
    status: int | None = None
    response_headers: dict[str, str] = {}
    response_excerpt: str = ""
    duration_ms: float = 0.0


class TestResult(msgspec.Struct, omit_defaults=True):
    __test__ = False  # not a pytest test class

    name: str
    status: TestStatus
    duration_ms: float = 0.0
    attempts: int = 0
    category: FailureCategory | None = None
    message: str = ""
    assertions: list[AssertionResult] = []
    captures: dict[str, Any] = {}
    exchange: Exchange | None = None
    tags: list[str] = []
    known_failure: KnownFailureMark | None = None
    """The flow's known-failure mark, as judged the day the test ran."""

    @property
    def excused(self) -> bool:
        """Failed, but marked known-failing and the mark has not expired: the run still
        passes."""
        return (
            self.status == "failed"
            and self.known_failure is not None
            and not self.known_failure.expired
        )


class RunResult(msgspec.Struct, omit_defaults=True):
    run_id: str
    suite: str
    file: str
    status: RunStatus
    started_at: str
    """ISO 8601, UTC."""
    duration_ms: float
    tests: list[TestResult]
    environment: str = ""
    batch_id: str = ""
    row: int = -1
    continues: str = ""
    """The run this one reruns (``baton rerun``), or ""."""
    setup: str = ""
    """The shared setup (``use:``) this run is, by its label (``login.yaml::login``), or
    "": the runs using it skip what reads it with ``setup login.yaml::login failed``."""
    failed_setups: list[str] = []
    """The labels of the shared setups this run uses that failed: its run failed with them."""

    @property
    def known_failures(self) -> int:
        return sum(1 for test in self.tests if test.excused)

    def count(self, status: TestStatus) -> int:
        return sum(1 for test in self.tests if test.status == status)


@dataclass(frozen=True)
class ResponseView:
    """A received response, as assertions and captures see it."""

    status: int
    headers: dict[str, str]
    """Lower-cased names; repeated headers joined with ", "."""
    text: str
    duration_ms: float
    set_cookie: tuple[str, ...] = ()
    """The raw Set-Cookie headers; parsed only when a capture asks for a cookie."""
    url: str = ""
    """Where the response came from, what a relative Link target is resolved against."""

    @functools.cached_property
    def cookies(self) -> dict[str, str]:
        jar: http.cookies.SimpleCookie = http.cookies.SimpleCookie()
        for header in self.set_cookie:
            with contextlib.suppress(http.cookies.CookieError):
                jar.load(header)
        return {name: morsel.value for name, morsel in jar.items()}

    @functools.cached_property
    def json(self) -> Any:
        """The body decoded as JSON; raises ValueError if it is not JSON."""
        try:
            return msgspec.json.decode(self.text)
        except msgspec.DecodeError as exc:
            raise ValueError(f"the response body is not JSON: {exc}") from None
