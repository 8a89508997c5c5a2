"""Commands that start or follow the context service: serve, keys, watch, mcp.

Only these import context_service, inside the commands (DESIGN.md).
"""

from __future__ import annotations

import os

import click

from orchestrator.cli.app import cli
from orchestrator.cli.signals import _run
from orchestrator.errors import UsageError


@cli.command()
@click.argument("run_id")
@click.option(
    "--supabase",
    is_flag=True,
    help="Follow through Supabase Realtime (SUPABASE_URL, SUPABASE_KEY).",
)
@click.option(
    "--url",
    envvar="BATON_URL",
    default="http://127.0.0.1:8000",
    show_default=True,
    help="The Baton service (BATON_URL).",
)
@click.option(
    "--key", envvar="BATON_API_KEY", help="An API key with the read scope (BATON_API_KEY)."
)
def watch(run_id: str, supabase: bool, url: str, key: str | None) -> None:
    """Follow a run live until it ends, one line per change."""
    # the service's client side: imported only by the command that needs it
    if supabase:
        from context_service.supabase import format_change, watch_supabase

        supabase_url, supabase_key = os.environ.get("SUPABASE_URL"), os.environ.get("SUPABASE_KEY")
        if not supabase_url or not supabase_key:
            raise UsageError("--supabase needs SUPABASE_URL and SUPABASE_KEY in the environment")
        try:
            _run(
                watch_supabase(
                    supabase_url,
                    supabase_key,
                    run_id,
                    lambda change: click.echo(format_change(change)),
                )
            )
        except ValueError as exc:  # the run id is not a UUID
            raise UsageError(str(exc)) from exc
        return
    from context_service.watch import watch_stream
    from orchestrator.inspect import format_event

    if not key:
        raise UsageError("watch needs an API key: --key or BATON_API_KEY (baton keys create)")
    _run(
        watch_stream(
            url,
            key,
            run_id,
            lambda position, kind, event: click.echo(format_event(position, kind, event)),
        )
    )


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
def serve(host: str, port: int) -> None:
    """Start the service: REST API, realtime streams, dashboard (OpenAPI at /schema).
    SIGINT or SIGTERM stops it: runs in flight end as cancelled."""
    from context_service.server import serve as run_service
    from events.settings import Settings

    run_service(host, port, Settings.from_env())


@cli.group()
def keys() -> None:
    """API keys of the service."""


@keys.command("create")
@click.option(
    "--org",
    "organization",
    default="default",
    show_default=True,
    help="The organization (a slug; created if missing).",
)
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    default=["read", "run"],
    show_default=True,
    type=click.Choice(["read", "run", "admin"]),
    help="Repeat for several.",
)
@click.option("--name", default="", help="What the key is for.")
def create_key(organization: str, scopes: tuple[str, ...], name: str) -> None:
    """Create a key and print it, once: it is stored only as a hash."""
    from context_service.keys import create_key as create
    from events.settings import Settings

    settings = Settings.from_env()
    click.echo(_run(create(settings, organization=organization, scopes=list(scopes), name=name)))


@cli.command()
def mcp() -> None:
    """Serve Baton's tools to a coding agent over MCP on standard input and output
    (validate_flow, run_flow, run_failures, run_context, replay; docs/agents.md)."""
    from orchestrator.mcp_server import serve as serve_mcp

    _run(serve_mcp())
