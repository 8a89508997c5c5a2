"""``baton mcp``: Baton as an MCP server on standard input and output, for coding agents.

The tools are ``orchestrator.agent_tools``; a Baton error (a flow's problem, an unknown
run, the event store down) becomes an MCP tool error whose text is the message ``baton``
would print, with its exit code, so an agent reads what a user would.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from events.errors import EventsError
from events.secrets import RedactingFormatter
from orchestrator import agent_tools
from orchestrator.errors import BatonError, InfrastructureError

T = TypeVar("T")

INSTRUCTIONS = (
    "Baton runs chains of dependent HTTP API tests written as YAML flow files. "
    "validate_flow checks a flow without sending a request; run_flow runs it and returns "
    "run ids; run_failures and run_context read what a run recorded (secrets masked). "
    "The flow file's JSON Schema: `baton schema flow`."
)


def _tool_error(exc: BatonError | EventsError) -> Exception:
    from mcp.server.mcpserver.exceptions import ToolError

    from orchestrator.cli import _failure

    code, message = _failure(exc)
    return ToolError(f"{message} [exit {code}]")


def _baton_errors(call: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    @functools.wraps(call)
    async def guarded(*args: Any, **kwargs: Any) -> T:
        try:
            return await call(*args, **kwargs)
        except (BatonError, EventsError) as exc:
            raise _tool_error(exc) from None

    return guarded


def make_server() -> Any:
    """The MCP server with Baton's tools (an mcp.server.mcpserver.MCPServer)."""
    try:
        from mcp.server.mcpserver import MCPServer
    except ImportError:
        raise InfrastructureError(
            "baton mcp needs the mcp package: pip install 'baton[mcp]'"
        ) from None
    server = MCPServer("baton", instructions=INSTRUCTIONS, log_level="WARNING")

    @server.tool()
    @_baton_errors
    async def validate_flow(
        path: str, env: str | None = None, vars: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """Check a flow file (or a directory of them) as `baton validate` does, sending no
        request: every problem with its file, place and fix. env: an environment name
        (env/NAME.yaml) or file; vars: variables, as --var name=value."""
        return agent_tools.validate_flow(path, env, vars)

    @server.tool()
    @_baton_errors
    async def run_flow(
        path: str, env: str | None = None, vars: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """Run a flow file (or a directory of them) as `baton run` does; returns each run's
        id, status and tallies, and the summary. exit_code is what `baton run` exits with."""
        return await _to_its_end(agent_tools.run_flow(path, env, vars))

    @server.tool()
    @_baton_errors
    async def run_failures(run_id: str) -> dict[str, Any]:
        """A recorded run's failed tests (category, message, failed assertions with
        expected and actual, the last response) and skipped tests with their reasons."""
        return await agent_tools.run_failures(run_id)

    @server.tool()
    @_baton_errors
    async def run_context(run_id: str, position: int | None = None) -> dict[str, Any]:
        """A run's execution context as `baton context` shows it: variables, captures,
        order, statuses; secret values are ***. position: as it was at that log position."""
        return await agent_tools.run_context(run_id, position)

    @server.tool()
    @_baton_errors
    async def replay(run_id: str, path: str | None = None) -> dict[str, Any]:
        """Check a flow's current expect and capture sections against the responses stored
        in a run, as `baton replay` does: no request is sent, nothing is recorded. Edit an
        assertion, replay, see it pass or fail. path: the flow file (default: the run's)."""
        return await agent_tools.replay(run_id, path)

    return server


async def _to_its_end(work: Coroutine[Any, Any, T]) -> T:
    """``work`` in a task of its own. The call cancelled (the client cancels it, ``baton
    mcp`` is stopped), the task is cancelled once and awaited to its end: the runs in flight
    store their RunCancelled before the store closes. Run in the tool call's own task, the
    SDK's cancel scope would cancel every await of that cleaning up again, and the runs
    would stay ``running`` until another Baton process swept them."""
    import anyio

    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.wait([task])
        raise


async def serve() -> None:
    """Serve on standard input and output until the client closes them; run in the CLI's
    event loop, so that SIGTERM stops it as SIGINT does (``orchestrator.cli.signals``)."""
    _log_to_stderr()
    await make_server().run_stdio_async()


def _log_to_stderr() -> None:
    """Warnings and errors only, on standard error, through Baton's redaction: at INFO the
    HTTP client logs every URL it requests, query strings (and any secret in them) too.
    Set before the server is made, so the SDK's own logging set-up finds it and stands back."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter("baton mcp: %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
