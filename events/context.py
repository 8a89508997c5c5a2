"""A run's execution context: a pure fold of the run's stream.

No I/O, no clock: the same events always give the same context, so a cache (Redis or in
process) can hold it, drop it, or extend it with the events after its ``version``, and a
rebuild from the log is always the right answer. Secret values stay ciphertext here; only
``decrypted_variables`` (for the runner) opens them, and ``redacted`` is what is shown.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import takewhile
from typing import Any, Literal

import msgspec

from events.errors import ContextError as ContextError
from events.secrets import AUTH_PREFIX, MASK, Cipher
from events.types import (
    AuthTokenUpdated,
    RecordedEvent,
    RunCancelled,
    RunCompleted,
    RunStarted,
    RunStatus,
    TestFailed,
    TestPassed,
    TestSkipped,
    TestStarted,
    TestStatus,
    VariableCaptured,
)

ContextStatus = Literal["running", RunStatus]
TestState = Literal["running", TestStatus]


class Context(msgspec.Struct, kw_only=True):
    """What a run knows at one point of its stream.

    ``auth`` is keyed by the name *without* its ``auth.`` prefix (``auth["token"]`` for a
    capture named ``auth.token``), as templates read it (``{{ auth.token }}``); its values
    are always ciphertext. ``variables`` holds every other capture, ciphertext for the
    names listed in ``secret_names``. Treat a Context as immutable: ``fold`` never changes
    the one it starts from, and callers must not either.
    """

    stream: str = ""
    run_id: str = ""
    suite: str = ""
    environment: str = ""
    status: ContextStatus = "running"
    variables: dict[str, Any] = {}
    auth: dict[str, str] = {}
    secret_names: list[str] = []
    captured: dict[str, dict[str, Any]] = {}
    """Per test, the names it captured and their values (ciphertext for secrets)."""
    order: list[str] = []
    """Tests in the order they finished (passed, failed or skipped)."""
    statuses: dict[str, TestState] = {}
    attempts: dict[str, int] = {}
    version: int = 0
    """The stream version this context reflects: fold the events after it to catch up."""
    position: int = 0
    """Global position of the last event folded."""


def _copy(context: Context) -> Context:
    # containers are copied once per fold, so the loop below may mutate freely
    return msgspec.structs.replace(
        context,
        variables=dict(context.variables),
        auth=dict(context.auth),
        secret_names=list(context.secret_names),
        captured={test: dict(values) for test, values in context.captured.items()},
        order=list(context.order),
        statuses=dict(context.statuses),
        attempts=dict(context.attempts),
    )


def _run_started(ctx: Context, event: RunStarted) -> None:
    ctx.run_id = event.run_id
    ctx.suite = event.suite
    ctx.environment = event.environment


def _test_started(ctx: Context, event: TestStarted) -> None:
    ctx.statuses[event.test] = "running"
    ctx.attempts[event.test] = event.attempt


def _captured(ctx: Context, event: VariableCaptured) -> None:
    name = event.name
    ctx.variables[name] = event.value
    ctx.captured.setdefault(event.test, {})[name] = event.value
    if event.secret and name not in ctx.secret_names:
        ctx.secret_names.append(name)


def _auth(ctx: Context, event: AuthTokenUpdated) -> None:
    name = event.name.removeprefix(AUTH_PREFIX)
    ctx.auth[name] = event.value
    ctx.captured.setdefault(event.test, {})[AUTH_PREFIX + name] = event.value


def _finished(ctx: Context, test: str, status: TestStatus) -> None:
    if ctx.statuses.get(test, "running") != "running":
        ctx.order.remove(test)  # decided again (a rerun in the same stream): latest counts
    ctx.statuses[test] = status
    ctx.order.append(test)


def _passed(ctx: Context, event: TestPassed) -> None:
    _finished(ctx, event.test, "passed")
    ctx.attempts[event.test] = event.attempts


def _failed(ctx: Context, event: TestFailed) -> None:
    _finished(ctx, event.test, "failed")
    ctx.attempts[event.test] = event.attempts


def _skipped(ctx: Context, event: TestSkipped) -> None:
    _finished(ctx, event.test, "skipped")


def _completed(ctx: Context, event: RunCompleted) -> None:
    ctx.status = event.status


def _cancelled(ctx: Context, event: RunCancelled) -> None:
    ctx.status = "cancelled"


# Requests, responses and assertions do not change the context: only its version moves.
_HANDLERS: dict[type, Callable[[Context, Any], None]] = {
    RunStarted: _run_started,
    TestStarted: _test_started,
    VariableCaptured: _captured,
    AuthTokenUpdated: _auth,
    TestPassed: _passed,
    TestFailed: _failed,
    TestSkipped: _skipped,
    RunCompleted: _completed,
    RunCancelled: _cancelled,
}


def fold(events: Iterable[RecordedEvent], initial: Context | None = None) -> Context:
    """The context after ``events``, one stream's, in version order, starting at ``initial``.

    Events at or below the context's version are skipped, so overlapping reads fold
    harmlessly; a gap in versions or an event of another stream raises ContextError rather
    than answer with a context that misses something.
    """
    ctx = Context() if initial is None else _copy(initial)
    handlers = _HANDLERS
    stream = ctx.stream
    version = ctx.version
    position = ctx.position
    for recorded in events:
        if recorded.stream != stream:
            if stream:
                raise ContextError(
                    f"event {recorded.position} belongs to {recorded.stream!r}, not to {stream!r}"
                )
            stream = ctx.stream = recorded.stream
        if recorded.version <= version:
            continue
        if recorded.version != version + 1:
            raise ContextError(
                f"{stream!r}: version {recorded.version} follows {version}, "
                f"{recorded.version - version - 1} event(s) missing in between"
            )
        handler = handlers.get(type(recorded.event))
        if handler is not None:
            handler(ctx, recorded.event)
        version = recorded.version
        position = recorded.position
    ctx.version = version
    ctx.position = position
    return ctx


def evolve(context: Context, recorded: RecordedEvent) -> Context:
    """One step of the fold: a new context; ``context`` is left as it was."""
    return fold((recorded,), context)


def context_at(events: Iterable[RecordedEvent], position: int) -> Context:
    """The context as it was right after the last event at or before global ``position``.

    Positions grow with versions within a stream, so the read stops at the first event
    past ``position``.
    """
    return fold(takewhile(lambda recorded: recorded.position <= position, events))


def redacted(context: Context) -> Context:
    """The context for display: every ciphertext replaced with ``***``."""
    secret = set(context.secret_names)
    auth_names = {AUTH_PREFIX + name for name in context.auth}
    hidden = secret | auth_names
    return msgspec.structs.replace(
        context,
        variables={k: MASK if k in secret else v for k, v in context.variables.items()},
        auth=dict.fromkeys(context.auth, MASK),
        captured={
            test: {k: MASK if k in hidden else v for k, v in values.items()}
            for test, values in context.captured.items()
        },
    )


def decrypted_variables(context: Context, cipher: Cipher) -> dict[str, Any]:
    """The template namespace of the captures: dotted names nested, secrets in clear.

    ``{"auth": {"token": "..."}, "product_id": 3}``. A secret that was not a string when
    captured comes back as its JSON text (``"42"``), the form it was encrypted in. Raises
    SecretError if the cipher's key is not the one the run was recorded with.
    """
    namespace: dict[str, Any] = {}
    secret = set(context.secret_names)
    for name, value in context.variables.items():
        assign_dotted(namespace, name, cipher.decrypt(value) if name in secret else value)
    for name, token in context.auth.items():
        assign_dotted(namespace, AUTH_PREFIX + name, cipher.decrypt(token))
    return namespace


def hidden_values(context: Context, cipher: Cipher) -> list[str]:
    """The clear values of a context's secrets (to mask them in the events of a run that
    reuses its captures)."""
    values = [cipher.decrypt(token) for token in context.auth.values()]
    values.extend(
        cipher.decrypt(context.variables[name])
        for name in context.secret_names
        if name in context.variables
    )
    return values


def assign_dotted(namespace: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``auth.token`` as ``namespace['auth']['token']``, the shape templates read.

    A deeper name replaces a plain value standing in its way."""
    *parents, last = dotted.split(".")
    target = namespace
    for part in parents:
        child = target.get(part)
        if not isinstance(child, dict):
            child = target[part] = {}
        target = child
    target[last] = value
