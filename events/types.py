"""The event vocabulary: frozen, tagged msgspec Structs in one union, and one codec.

Schema evolution (msgspec's rules): a new field gets a default; a field's type never changes.
Secret values inside events are always ciphertext (see ``events.secrets``), never clear text.
"""

from __future__ import annotations

import os
import time
import uuid
from datetime import datetime
from typing import Any, Literal

import msgspec

TestStatus = Literal["passed", "failed", "skipped"]
RunStatus = Literal["passed", "failed", "cancelled", "error"]
FailureCategory = Literal[
    "assertion",
    "timeout",
    "connection",
    "server_error",
    "dependency_skipped",
    "template",
    "capture",
]
DependencyKind = Literal["token", "data", "order"]
HealthStatus = Literal["healthy", "degraded", "unhealthy", "timeout"]
FlakyRule = Literal["failure_rate", "flip_rate"]


class _Event(msgspec.Struct, frozen=True, tag_field="type", omit_defaults=True):
    __test__ = False  # TestStarted, TestPassed...: not pytest test classes


class PlannedTest(msgspec.Struct, frozen=True, omit_defaults=True):
    name: str
    depends_on: dict[str, DependencyKind] = {}
    definition_hash: str = ""


class RunStarted(_Event, tag="RunStarted", frozen=True):
    run_id: str
    suite: str
    suite_digest: str
    plan: list[PlannedTest]
    environment: str = ""
    batch_id: str = ""
    row: int = -1
    tags: list[str] = []
    project: str = "default"
    organization: str = ""
    """The organization's id (a UUID) for runs the service starts; "" is the default org."""
    source: str = ""
    """The flow file, as given on the command line."""
    session_id: str = ""
    """The test session the run belongs to (``baton run --session ID``), if any."""
    continues: str = ""
    """The run this one reruns (``baton rerun``, the service's rerun): its id, or ""."""
    setup_runs: list[str] = []
    """The runs of the shared setups (``use:``) whose captures this run started with."""


class TestStarted(_Event, tag="TestStarted", frozen=True):
    test: str
    attempt: int = 1


class RequestSent(_Event, tag="RequestSent", frozen=True):
    test: str
    attempt: int
    method: str
    url: str
    headers: dict[str, str] = {}
    body_excerpt: str = ""
    insecure: bool = False
    """Sent with TLS verification off (``tls: {verify: false}``)."""


class Timings(msgspec.Struct, frozen=True, omit_defaults=True):
    total_ms: float


class ResponseReceived(_Event, tag="ResponseReceived", frozen=True):
    test: str
    attempt: int
    status: int
    headers: dict[str, str]
    body_excerpt: str
    timings: Timings


class AssertionEvaluated(_Event, tag="AssertionEvaluated", frozen=True):
    test: str
    attempt: int
    subject: str
    predicate: str
    expected: Any
    actual: Any
    passed: bool


class VariableCaptured(_Event, tag="VariableCaptured", frozen=True):
    """``value`` is ciphertext when ``secret`` is set."""

    test: str
    name: str
    value: Any
    secret: bool = False


class AuthTokenUpdated(_Event, tag="AuthTokenUpdated", frozen=True):
    """A captured ``auth.*`` value; ``value`` is always ciphertext."""

    test: str
    name: str
    value: str


class KnownFailureMark(msgspec.Struct, frozen=True, omit_defaults=True):
    """The flow marked the test known-failing: why, the last day the mark holds (ISO date),
    and whether that day had passed when the test ran (then its failure fails the run)."""

    reason: str
    until: str
    expired: bool = False


class TestPassed(_Event, tag="TestPassed", frozen=True):
    test: str
    attempts: int
    duration_ms: float
    known_failure: KnownFailureMark | None = None
    """Marked known-failing, and passed: the mark can be removed."""


class TestFailed(_Event, tag="TestFailed", frozen=True):
    test: str
    attempts: int
    duration_ms: float
    category: FailureCategory
    message: str
    known_failure: KnownFailureMark | None = None
    """Marked known-failing: unless the mark has expired, this failure does not fail the run."""


class TestSkipped(_Event, tag="TestSkipped", frozen=True):
    test: str
    reason: str
    category: FailureCategory | None = None


class RunCompleted(_Event, tag="RunCompleted", frozen=True):
    status: RunStatus
    passed: int
    failed: int
    skipped: int
    duration_ms: float
    known_failures: int = 0
    """Of the failed, those marked known-failing whose mark had not expired: they did not
    fail the run."""


class RunCancelled(_Event, tag="RunCancelled", frozen=True):
    reason: str


class BatchStarted(_Event, tag="BatchStarted", frozen=True):
    batch_id: str
    suite: str
    source: str
    runs: list[str]
    continues: str = ""
    """The batch whose failed rows this one reruns (``baton rerun --failed-rows``), or ""."""
    data: str = ""
    """The data file the rows were read from, as given on the command line."""


class BatchCompleted(_Event, tag="BatchCompleted", frozen=True):
    batch_id: str
    passed: int
    failed: int
    duration_ms: float


class ShardStarted(_Event, tag="ShardStarted", frozen=True):
    """Shard ``shard`` of ``shards`` (``baton run --shard K/N --batch ID``) begins its share
    of the batch's units: ``runs[i]`` runs the unit keyed ``units[i]``. Every shard of a
    batch appends to the batch's stream; a shard run again (a CI retry) appends another
    ShardStarted for the same ``shard``, and the latest one is that shard's (docs/batches.md)."""

    batch_id: str
    shard: int
    shards: int
    runs: list[str]
    units: list[str]
    queued: str = ""
    """For a batch on a queue (``baton run --queue``): its jobs' options, encrypted with
    the secret key (variables may be secrets), so that ``baton batch requeue`` can queue
    the runs that have not ended again from the log alone."""


class ShardCompleted(_Event, tag="ShardCompleted", frozen=True):
    """Every run of the shard's latest ShardStarted in this process has ended: how many
    passed and how many did not."""

    batch_id: str
    shard: int
    shards: int
    passed: int
    failed: int
    duration_ms: float


class ServiceHealthChecked(_Event, tag="ServiceHealthChecked", frozen=True):
    """A service's health check before a run (stream ``health-<id>``, one per invocation).

    healthy: a 2xx/3xx answer within ``degraded_after`` at the first request; degraded: a
    2xx/3xx answer, but slower than that or only after a retry; unhealthy: every request
    answered another status or could not connect; timeout: the last request got no answer
    within the timeout. ``response_time_ms`` and ``status_code`` are the last request's.
    """

    service: str
    url: str
    status: HealthStatus
    attempts: int
    response_time_ms: float | None = None
    status_code: int | None = None
    error: str = ""
    project: str = "default"
    organization: str = ""
    suite: str = ""
    session_id: str = ""


class SessionCreated(_Event, tag="SessionCreated", frozen=True):
    """A test session begins (stream ``session-<id>``): runs over a period, grouped.
    Its states and their changes: events.sessions."""

    session_id: str
    name: str
    description: str = ""
    project: str = "default"
    organization: str = ""
    tester: str = ""


class SessionRunsStarted(_Event, tag="SessionRunsStarted", frozen=True):
    """Runs admitted to the session (one invocation's), appended at the version the
    session was read at: a pause committed meanwhile makes the append fail, never both."""

    run_ids: list[str]


class SessionPaused(_Event, tag="SessionPaused", frozen=True):
    reason: str = ""


class SessionResumed(_Event, tag="SessionResumed", frozen=True):
    pass


class SessionCompleted(_Event, tag="SessionCompleted", frozen=True):
    pass


class SessionFailed(_Event, tag="SessionFailed", frozen=True):
    reason: str = ""


SessionEvent = (
    SessionCreated
    | SessionRunsStarted
    | SessionPaused
    | SessionResumed
    | SessionCompleted
    | SessionFailed
)


class _Finding(_Event, frozen=True):
    """What the projector finds in a test's history when a run completes: the test (case and
    environment, as test_run_history keys it) and the run whose execution of it crossed a
    rule's line. Stream ``analytics-<project id>`` (events.projections.detect)."""

    run_id: str
    suite: str
    test: str
    test_case_id: str
    environment: str
    environment_id: str


class FlakyTestDetected(_Finding, tag="FlakyTestDetected", frozen=True):
    """A flaky rule became true for the test with ``run_id``'s execution of it (and was
    false without it).

    ``failure_rate``: ``failures / samples`` above ``threshold`` over the ``window`` before
    the run completed, while not always failing. ``flip_rate``: ``flips / (samples - 1)``
    (status changes between consecutive executions) at or above ``threshold`` over the
    last executions. Skipped executions (a failed dependency among them) are not samples.
    """

    rule: FlakyRule
    rate: float
    threshold: float
    samples: int
    window: str
    """What was looked at: "7 days" or "last 30 executions"."""
    failures: int = 0
    """failure_rate: the failed executions among the samples."""
    flips: int = 0
    """flip_rate: the status changes among the samples."""


class PerformanceDegraded(_Finding, tag="PerformanceDegraded", frozen=True):
    """The test's recent median duration became more than ``threshold`` times its baseline
    median with ``run_id``'s execution of it.

    Recent: its last ``recent_samples`` passed executions; baseline: its passed executions
    in the ``baseline_days`` before the oldest of them.
    """

    recent_median_ms: float
    baseline_median_ms: float
    ratio: float
    threshold: float
    recent_samples: int
    baseline_samples: int
    baseline_days: int


Finding = FlakyTestDetected | PerformanceDegraded
"""What the projector finds in a test's history: the events of ``analytics-`` streams."""

Event = (
    RunStarted
    | TestStarted
    | RequestSent
    | ResponseReceived
    | AssertionEvaluated
    | VariableCaptured
    | AuthTokenUpdated
    | TestPassed
    | TestFailed
    | TestSkipped
    | RunCompleted
    | RunCancelled
    | BatchStarted
    | BatchCompleted
    | ShardStarted
    | ShardCompleted
    | ServiceHealthChecked
    | SessionCreated
    | SessionRunsStarted
    | SessionPaused
    | SessionResumed
    | SessionCompleted
    | SessionFailed
    | FlakyTestDetected
    | PerformanceDegraded
)


class RecordedEvent(msgspec.Struct, frozen=True):
    """An event as the store holds it: where it sits in its stream and in the log."""

    id: uuid.UUID
    stream: str
    version: int
    position: int
    recorded_at: datetime
    event: Event

    @property
    def type(self) -> str:
        return type(self.event).__name__


def event_type(event: Event) -> str:
    return type(event).__name__


def run_stream(run_id: str) -> str:
    return f"run-{run_id}"


def batch_stream(batch_id: str) -> str:
    return f"batch-{batch_id}"


SESSION_PREFIX = "session-"


def session_stream(session_id: str) -> str:
    return f"{SESSION_PREFIX}{session_id}"


HEALTH_PREFIX = "health-"


def health_stream(check_id: str) -> str:
    """The stream of one invocation's health checks (ServiceHealthChecked)."""
    return f"{HEALTH_PREFIX}{check_id}"


ANALYTICS_PREFIX = "analytics-"


def analytics_stream(project_id: uuid.UUID) -> str:
    """The stream of a project's findings (FlakyTestDetected, PerformanceDegraded)."""
    return f"{ANALYTICS_PREFIX}{project_id}"


def new_id() -> uuid.UUID:
    """A UUIDv7 (RFC 9562): time-ordered, so the unique index on event ids grows at its
    right edge instead of splitting random pages as uuid4 would."""
    try:
        low = _RANDOM_PARTS.pop()
    except IndexError:
        _RANDOM_PARTS.extend(_random_parts(1024))
        low = _RANDOM_PARTS.pop()
    # what uuid.UUID(int=) ends with, without its range checks: half of an id's cost, and
    # an id is made for every event
    made = _new_object(uuid.UUID)
    _set_attribute(made, "int", (time.time_ns() // 1_000_000) << 80 | low)
    _set_attribute(made, "is_safe", _UNKNOWN)
    return made


def _random_parts(count: int) -> list[int]:
    """The low 80 bits of ``count`` ids: version, 12 random bits, variant, 62 random bits.
    One system call for many ids instead of one per id."""
    data = os.urandom(10 * count)
    parts = []
    for at in range(0, 10 * count, 10):
        rand = int.from_bytes(data[at : at + 10])
        parts.append(0x7 << 76 | (rand >> 68) << 64 | 0b10 << 62 | rand & 0x3FFF_FFFF_FFFF_FFFF)
    return parts


_RANDOM_PARTS: list[int] = []
_new_object = object.__new__
_set_attribute = object.__setattr__
_UNKNOWN = uuid.SafeUUID.unknown  # an enum member: its attribute lookup is not free
# a forked child must not hand out the ids its parent drew
os.register_at_fork(after_in_child=_RANDOM_PARTS.clear)


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Event)


def encode(event: Event) -> bytes:
    return _encoder.encode(event)


def decode(data: bytes | str) -> Event:
    event: Event = _decoder.decode(data)
    return event
