"""compose.yaml read, not run (no Docker engine where the tests run): each `baton` command
it starts parses with the CLI's own options, the settings it passes are the ones Baton
reads, and it points at the servers it defines."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import yaml

from events.settings import Settings
from orchestrator.cli import cli

COMPOSE = Path(__file__).parent.parent / "compose.yaml"


def _services() -> dict[str, Any]:
    services: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())["services"]
    return services


def _baton_commands(service: dict[str, Any]) -> list[list[str]]:
    """The `baton ...` commands of a service's `sh -c` command line."""
    script = service["command"][-1]
    parts = [shlex.split(part) for part in script.split("&&")]
    return [[a for a in part if a != "exec"][1:] for part in parts if "baton" in part[:2]]


def _parse(args: list[str]) -> click.Context:
    """The context click makes of ``baton ARGS``: a wrong command or option raises."""
    command: click.Command = cli
    parent = click.Context(cli, info_name="baton")
    while isinstance(command, click.Group):
        name, *args = args
        found = command.get_command(parent, name)
        assert found is not None, f"baton has no command {name!r}"
        command = found
        parent = click.Context(command, info_name=name, parent=parent)
    return command.make_context(command.name, args, parent=parent.parent)


def _environment(service: dict[str, Any]) -> dict[str, str]:
    # ${NAME:-default} as compose substitutes it with NAME unset
    return {
        key: re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value))
        for key, value in service["environment"].items()
    }


def test_the_service_and_workers_run_real_baton_commands() -> None:
    services = _services()
    assert {"postgres", "redis", "service", "worker"} <= set(services)
    service = [_parse(args) for args in _baton_commands(services["service"])]
    assert [ctx.command.name for ctx in service] == ["migrate", "serve"]
    assert service[-1].params["host"] == "0.0.0.0"  # reachable through the published port
    [worker] = [_parse(args) for args in _baton_commands(services["worker"])]
    assert worker.command.name == "worker"
    queue = urlsplit(worker.params["queue_url"])
    assert queue.scheme == "redis" and queue.hostname in services
    # SIGTERM lets jobs drain for --drain-timeout before compose sends SIGKILL
    assert (
        float(services["worker"]["stop_grace_period"].rstrip("s")) > worker.params["drain_timeout"]
    )
    assert "replicas" in services["worker"]["deploy"]


def test_the_settings_passed_are_the_ones_baton_reads() -> None:
    services = _services()
    for name in ("service", "worker"):
        settings = Settings.from_env(_environment(services[name]))
        assert settings.database_url is not None and settings.redis_url is not None
        assert urlsplit(settings.database_url).hostname in services
        assert urlsplit(settings.redis_url).hostname in services
        assert str(settings.home) == "/baton"  # one volume: one secret key for all
        postgres = services["postgres"]["environment"]
        assert urlsplit(settings.database_url).path == f"/{postgres['POSTGRES_DB']}"
