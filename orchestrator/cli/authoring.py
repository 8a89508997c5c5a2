"""Commands that help write flows: validate, graph, plan, init, schema, import."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from orchestrator.cli.app import cli
from orchestrator.cli.options import _options, flow_options
from orchestrator.errors import UsageError


@cli.command()
@flow_options
def validate(**kwargs: Any) -> None:
    """Check flow files without sending a request."""
    from orchestrator import execution

    jobs = execution.prepare(_options(**kwargs))
    for job in jobs:
        tests = len(job.plan.order)
        setups = "".join(f", setup {setup.label}" for setup in job.setups)
        click.echo(f"{job.plan.loaded.label}: ok ({tests} tests, {len(job.runs)} run(s){setups})")


@cli.command()
@flow_options
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "mermaid", "dot"]),
    default="text",
    show_default=True,
)
def graph(fmt: str, **kwargs: Any) -> None:
    """Print the dependency plan of flow files (checked as baton validate checks them)."""
    from orchestrator import execution
    from orchestrator.graphs import render_graph

    for job in execution.prepare(_options(**kwargs)):
        click.echo(render_graph(job.plan, fmt, [setup.label for setup in job.setups]))


@cli.command("plan")
@flow_options
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the plan as JSON: tests, dependencies and their kind, what each needs.",
)
def plan_command(as_json: bool, **kwargs: Any) -> None:
    """Print the plan of flow files (checked as baton validate checks them); with --json
    as data for tools and coding agents (docs/ci.md)."""
    from orchestrator import execution
    from orchestrator.graphs import render_graph
    from orchestrator.plan_export import encode_plans

    jobs = execution.prepare(_options(**kwargs))
    if as_json:
        click.echo(encode_plans((job.plan, len(job.runs)) for job in jobs).decode())
        return
    for job in jobs:
        click.echo(render_graph(job.plan, "text", [setup.label for setup in job.setups]))


@cli.command()
@click.argument("directory", default=".", type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", help="The flow's name (its file: flows/NAME.yaml).  [default: api]")
@click.option(
    "--base-url",
    help="The API's address, for env/local.yaml; asked on a terminal.  "
    "[default: http://127.0.0.1:8765]",
)
@click.option(
    "--ci",
    type=click.Choice(["github", "gitlab", "none"]),
    default="github",
    show_default=True,
    help="The CI file: .github/workflows/baton.yml or .gitlab-ci.yml.",
)
@click.option("--force", is_flag=True, help="Overwrite files that exist.")
def init(directory: Path, name: str | None, base_url: str | None, ci: str, force: bool) -> None:
    """Scaffold a project in DIRECTORY: a login-then-use flow, env/local.yaml and a CI
    file. On a terminal it asks for what the options do not give; elsewhere it asks
    nothing. It refuses to overwrite a file unless --force."""
    from orchestrator.scaffold import DEFAULT_BASE_URL, Scaffold

    if base_url is None:
        base_url = DEFAULT_BASE_URL
        # a pipe, CI or a closed standard input (None) has nobody to answer
        if sys.stdin is not None and sys.stdin.isatty():
            base_url = click.prompt("Base URL of the API", default=DEFAULT_BASE_URL)
    scaffold = Scaffold(directory, name or "api", base_url, ci)  # type: ignore[arg-type]
    for path in scaffold.write(force=force):
        click.echo(f"wrote {path}")
    where = "" if directory == Path(".") else f"cd {directory} && "
    click.echo(f"next: {where}baton validate flows/ && baton run flows/ --env local")


@cli.command()
@click.argument("kind", type=click.Choice(["flow", "events"]))
def schema(kind: str) -> None:
    """Print the JSON Schema of flow files or of the event stream (docs/agents.md); the
    same as docs/flow.schema.json and docs/events.schema.json."""
    from orchestrator.schemas import schema_text

    click.echo(schema_text(kind), nl=False)


def _unreadable(exc: OSError | UnicodeDecodeError) -> str:
    """Why SOURCE could not be read, as a sentence (as -o says why it cannot write)."""
    if isinstance(exc, UnicodeDecodeError):
        return f"not a UTF-8 text file (at byte {exc.start})"
    return f"cannot read it ({exc.strerror or exc.__class__.__name__})"


@cli.command("import")
@click.argument("kind", type=click.Choice(["openapi", "postman", "curl", "har"]))
@click.argument("source", metavar="SOURCE")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the flow to this file (default: standard output).",
)
@click.option(
    "--host",
    "hosts",
    multiple=True,
    metavar="HOST",
    help="har: keep only the requests to this host (repeatable).",
)
def import_(kind: str, source: str, output: Path | None, hosts: tuple[str, ...]) -> None:
    """Write a flow file from an OpenAPI document, a Postman collection, curl commands or a
    HAR file (SOURCE; - for standard input). What cannot be translated is listed on
    standard error, each with its place in SOURCE."""
    from orchestrator.importers import Imported, converter

    if hosts and kind != "har":
        raise UsageError(f"--host filters the requests of a HAR file, not of {kind}: remove it")
    if source == "-":
        text, name = sys.stdin.read(), "<stdin>"
    else:
        try:
            text, name = Path(source).read_text(encoding="utf-8"), source
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"{source}: {_unreadable(exc)}") from None
    imported: Imported
    try:
        if hosts:
            from orchestrator.importers.har import convert as convert_har

            imported = convert_har(text, name, hosts=hosts)
        else:
            imported = converter(kind)(text, name)
        flow_text = imported.yaml()
    except RecursionError:
        # JSON nested thousands deep: no collection or recording is shaped so
        raise UsageError(f"{name}: nested too deeply to import (split or flatten it)") from None
    for part in imported.untranslated:
        click.echo(f"not translated: {name}: {part}", err=True)
    for secret, where in imported.secrets.items():
        click.echo(
            f"secret to provide: {secret} (the value found at {name}: {where}); "
            f"export {secret}=... or put it in the file given with --secrets",
            err=True,
        )
    if output is None:
        click.echo(flow_text, nl=False)
    else:
        try:
            output.write_text(flow_text, encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"{output}: cannot write the flow ({exc.strerror})") from None
    tests = len(imported.flow.get("tests", {}))
    left = f"; {len(imported.untranslated)} part(s) not translated" if imported.untranslated else ""
    click.echo(f"imported {tests} test(s) from {name}{left}", err=True)
