"""Every error ``events`` raises, in one tree, so that a caller tells what failed by its class.

    EventsError
    ├── StoreError               an event store failed; driver errors never escape a backend
    │   ├── StoreUnavailable     it cannot be reached (refused, server gone, timed out)
    │   ├── WrongExpectedVersion an append expected another version of its stream
    │   └── WriterClosed         an event emitted after its writer closed
    ├── CacheError               a context cache failed; driver errors never escape a backend
    │   └── CacheUnavailable     it cannot be reached now
    ├── ReaderError              the context reader, besides the store's and cache's errors
    │   └── UnknownRun           no event of the run in the log (also a LookupError)
    ├── ContextError             events that cannot be folded (also a ValueError)
    ├── SessionError             a test session that is not there, or refuses the change
    │   ├── UnknownSession       no such session (also a LookupError)
    │   └── SessionRefused       the change its state does not allow (a pause, a new run)
    ├── SecretError              a key that cannot be used, a token that cannot be decrypted
    └── SettingsError            a BATON_* variable that does not hold what it must (a ValueError)

An error keeps what caused it (``raise ... from cause``). A cause's text can show what was
connected to, password included (a driver's message quoting its DSN): ``scrubbed`` gives
the cause to chain with such a credential masked, so that no traceback prints it.

The modules that raise these errors re-export them (``from events.store import
StoreError`` keeps working).
"""

from __future__ import annotations

from collections.abc import Callable


class EventsError(Exception):
    """Base of every error ``events`` raises."""


class StoreError(EventsError):
    """Base of every error an event store raises; driver errors never escape a backend."""


class StoreUnavailable(StoreError):
    """The store cannot be reached (connection refused, server gone, timeout)."""


class WrongExpectedVersion(StoreError):
    def __init__(self, stream: str, expected: int, actual: int) -> None:
        super().__init__(
            f"stream {stream!r} is at version {actual}, the append expected {expected}"
        )
        self.stream = stream
        self.expected = expected
        self.actual = actual


class WriterClosed(StoreError):
    """An event emitted to a writer that was closed."""


class CacheError(EventsError):
    """Base of every error a cache backend raises; driver errors never escape a backend."""


class CacheUnavailable(CacheError):
    """The cache cannot be reached now (refused, timed out, backing off after a failure)."""


class ReaderError(EventsError):
    """Base of the errors of ``ContextReader`` besides the event store's own."""


class UnknownRun(ReaderError, LookupError):
    """No event of this run in the log."""

    def __init__(self, run_id: str) -> None:
        super().__init__(f"no run {run_id!r} in the event store")
        self.run_id = run_id


class ContextError(EventsError, ValueError):
    """Events that cannot be folded into this context (another stream, a missing version)."""


class SessionError(EventsError):
    """Base of the errors of events.sessions besides the event store's own."""


class UnknownSession(SessionError, LookupError):
    def __init__(self, session_id: str) -> None:
        super().__init__(f"no test session {session_id!r} in the event store")
        self.session_id = session_id


class SessionRefused(SessionError):
    """What the session's state does not allow; the message says the state and why."""


class ArchiveError(EventsError):
    """A run that cannot be archived or restored as asked (not in the log, still running,
    not in the archive, in the log already): the user's to fix."""


class ArchiveUnwritable(EventsError):
    """The archive directory cannot take a file (not a folder, no permission, disk full):
    nothing it would hold was removed."""


class SecretError(EventsError):
    """A key that cannot be used, or a token that cannot be decrypted."""


class SettingsError(EventsError, ValueError):
    """A BATON_* variable that does not hold what it must (a usage error)."""


class ScrubbedCause(Exception):
    """What a library raised, as text with a credential masked: chained in its place."""


_DEPTH = 8
"""How far down a chain of causes ``scrubbed`` looks: a driver's chains are short."""


def scrubbed(cause: BaseException, scrub: Callable[[str], str]) -> BaseException:
    """``cause`` itself, to chain (``raise ... from scrubbed(exc, scrub)``), when ``scrub``
    leaves its text and its own causes' unchanged; otherwise a ``ScrubbedCause`` naming its
    class, with the scrubbed text, and the causes below it scrubbed alike.

    A stand-in rather than the exception with its arguments rewritten: some exceptions
    (OSError) show attributes rather than their arguments, and the driver's own objects
    should not be changed under it."""
    return _scrubbed(cause, scrub, _DEPTH)


def _scrubbed(cause: BaseException, scrub: Callable[[str], str], depth: int) -> BaseException:
    below = _below(cause)
    kept = _scrubbed(below, scrub, depth - 1) if below is not None and depth > 0 else None
    text = str(cause)
    if scrub(text) == text and kept is below:
        return cause
    stand_in = ScrubbedCause(f"{type(cause).__module__}.{type(cause).__qualname__}: {scrub(text)}")
    stand_in.__cause__ = kept
    return stand_in


def _below(error: BaseException) -> BaseException | None:
    """The exception a traceback of ``error`` shows under it."""
    if error.__cause__ is not None:
        return error.__cause__
    return None if error.__suppress_context__ else error.__context__
