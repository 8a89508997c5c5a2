"""SIGINT and SIGTERM: how a command stops when the user (or systemd, Docker,
Kubernetes) stops it, and the event loop the commands run in.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised as Python raises KeyboardInterrupt for SIGINT.

    SIGTERM is how systemd, Docker and Kubernetes stop a process; left to its default it
    kills the process on the spot, so no ``finally`` and no atexit handler runs: the runs in
    flight never record their end and the embedded PostgreSQL is left running.
    """

    def __init__(self, signum: int) -> None:
        self.signal = signal.Signals(signum)
        super().__init__(self.signal.name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signal.value


class _Signals:
    """SIGINT and SIGTERM alike: outside an event loop each raises Interrupted at once.

    While ``_run`` runs an event loop, the first one cancels its main task instead, as
    asyncio.run does for SIGINT alone: runs in flight end with RunCancelled, their events
    are stored and what was opened is closed; ``_run`` then raises Interrupted. A second one
    (the cleaning up hangs) raises it at once.
    """

    def __init__(self) -> None:
        self.handled: tuple[signal.Signals, ...] = ()
        self.received = 0
        self.main: asyncio.Task[Any] | None = None
        """``_run``'s main task while its loop runs."""

    def __call__(self, signum: int, frame: object) -> None:
        raise Interrupted(signum)

    def cancel_on_signal(self, task: asyncio.Task[Any], signum: int) -> None:
        if self.received:
            raise Interrupted(signum)
        self.received = signum
        task.cancel()


_signals = _Signals()


def stdout_closed() -> None:
    """Standard output's reader went away (``baton run --events ndjson | head -1``): stop
    as a shell's tool stops on SIGPIPE, but cleanly, as on SIGTERM: the runs in flight end
    with RunCancelled, and the command exits 141 (128 + SIGPIPE). What is still written to
    standard output (the summary, the events of the cancelling) goes nowhere: writing to
    the closed pipe would raise again, and at exit too."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    if _signals.main is not None and not _signals.received:
        _signals.received = signal.SIGPIPE
        _signals.main.cancel()


@contextmanager
def _handled_signals() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # the in-process tests call main() from threads, where no handler can be set
        return
    previous = {}
    for signum, default in (
        (signal.SIGINT, signal.default_int_handler),
        (signal.SIGTERM, signal.SIG_DFL),
    ):
        # a signal the parent made us ignore (`cmd &` in a script ignores SIGINT) stays so
        if signal.getsignal(signum) is default:
            previous[signum] = signal.signal(signum, _signals)
    _signals.handled = tuple(previous)
    try:
        yield
    finally:
        _signals.handled = ()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _unread_after_interrupt(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The loop's error handler. A connection the signal cut short while it opened (the
    event store's server accepted and had not answered yet) leaves its driver's future
    failed with a lost connection that nothing reads any more: asyncio would print it at
    exit, after "interrupted by ...". Every other error is reported as asyncio does."""
    failure = context.get("exception")
    if _signals.received and "future" in context and isinstance(failure, ConnectionError):
        return
    loop.default_exception_handler(context)


def _run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, where SIGTERM cancels the main task as SIGINT does (see ``_Signals``)."""

    async def cancellable() -> T:
        # through the loop, not signal.signal: a signal that lands in another thread (the
        # embedded PostgreSQL starts in one) still wakes the loop at once
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(_unread_after_interrupt)
        task = asyncio.current_task()
        assert task is not None
        watched = _signals.handled if threading.current_thread() is threading.main_thread() else ()
        for signum in watched:
            loop.add_signal_handler(signum, _signals.cancel_on_signal, task, signum)
        _signals.main = task
        try:
            return await main
        finally:
            _signals.main = None
            for signum in watched:
                loop.remove_signal_handler(signum)
                signal.signal(signum, _signals)

    _signals.received = 0
    try:
        result = asyncio.run(cancellable())
    except asyncio.CancelledError:
        if _signals.received:
            raise Interrupted(_signals.received) from None
        raise
    if _signals.received:  # it came as the work ended: still the user's stop
        raise Interrupted(_signals.received)
    return result


async def _until_stopped(main: Callable[[asyncio.Event], Awaitable[T]]) -> T:
    """``main(stop)``, where the first SIGINT or SIGTERM sets ``stop`` instead of cancelling
    (a worker drains) and a second one stops at once; either way the command then exits as
    interrupted by the first (128 + its number)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    stop = asyncio.Event()

    def stopping(signum: int) -> None:
        if stop.is_set():
            _signals.cancel_on_signal(task, signum)
            return
        _signals.received = signum
        stop.set()

    if threading.current_thread() is threading.main_thread():
        for signum in _signals.handled:
            loop.add_signal_handler(signum, stopping, signum)
    return await main(stop)
