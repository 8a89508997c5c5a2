"""``baton serve``: the app under uvicorn, until interrupted (SIGINT or SIGTERM)."""

from __future__ import annotations

import logging
from typing import Any

from events.secrets import RedactingFormatter
from events.settings import Settings
from orchestrator.errors import InfrastructureError

UVICORN_OPTIONS: dict[str, Any] = {
    # uvloop and httptools, named rather than "auto" so a missing one fails loudly instead
    # of falling back to asyncio and h11: together they halve the service's CPU per request
    # (bench/API.md)
    "loop": "uvloop",
    "http": "httptools",
    # the app answers problem details itself; uvicorn's own headers add nothing
    "server_header": False,
    "proxy_headers": False,
    # live streams never end on their own: bound the wait at shut-down; their clients
    # resume with Last-Event-ID and lose nothing
    "timeout_graceful_shutdown": 5,
}
"""How the service runs under uvicorn: ``baton serve`` and the benchmarks alike."""

_STREAMS_DRAIN_S = 1.0
"""How long the shut-down waits for live streams to say goodbye to their clients."""


def serve(host: str, port: int, settings: Settings) -> None:
    """Run the service on host:port (blocking). The database is BATON_DATABASE_URL's or the
    embedded default, the context cache Redis at BATON_REDIS_URL or in-process.

    On SIGINT or SIGTERM uvicorn shuts down gracefully (the app's shut-down cancels the runs
    in flight, which record RunCancelled), then raises the signal again, which the CLI turns
    into its exit code; the embedded PostgreSQL is stopped on the way out either way.
    Raises StartupFailed when the app did not start (its log says why).
    """
    import asyncio
    import socket

    import uvicorn

    configure_logging()

    from context_service.app import create_app

    app = create_app(settings)
    # log_config None: uvicorn's loggers keep no handlers of their own and write through
    # the root's, redacted like every other line
    config = uvicorn.Config(
        app, host=host, port=port, log_level="info", log_config=None, **UVICORN_OPTIONS
    )

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            # uvicorn waits for open responses before the app's own shut-down runs, and a
            # live stream never ends by itself: end them now, not after the graceful
            # timeout. Wait for their goodbyes first: uvicorn's own close of a WebSocket
            # says 1012 (restart), not 1001 with the resume hint
            services = getattr(app.state, "services", None)
            if services is not None:
                await services.drain(within=_STREAMS_DRAIN_S)
            await super().shutdown(sockets)

    # uvicorn.Server rather than uvicorn.run, which swallows KeyboardInterrupt and so would
    # hide which signal stopped the service
    server = Server(config)
    try:
        server.run()
    except SystemExit:
        pass  # uvicorn exits when it cannot bind, after logging why
    finally:
        if settings.database_url is None:
            from events.embedded import stop_embedded

            asyncio.run(stop_embedded(settings.home))
    if not server.started:
        raise StartupFailed("the service did not start (its log above says why)")


class StartupFailed(InfrastructureError):
    """The service did not start: its log says why."""


QUIET_LOGGERS = ("httpx", "httpcore", "aiohttp")
"""Libraries that log every request's URL at INFO (query strings, secrets in them)."""


def configure_logging() -> None:
    """The service's log: one handler on stderr whose every line passes through the same
    redaction as the runs' events (their secrets, credentials by shape), and no library
    logging request URLs at INFO."""
    handler = logging.StreamHandler()
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
