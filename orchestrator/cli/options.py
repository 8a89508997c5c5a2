"""Option decorators shared by the commands that run flows."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def _environment_names(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[click.shell_completion.CompletionItem]:
    """``--env`` completes the environments of env/ in the working directory (where
    ``baton init`` puts them; the flows named before it are not parsed yet when an
    option's value is completed, so env/ beside them is out of reach)."""
    names = {found.stem for pattern in ("*.yaml", "*.yml") for found in Path("env").glob(pattern)}
    return [
        click.shell_completion.CompletionItem(name)
        for name in sorted(names)
        if name.startswith(incomplete)
    ]


def _variable_options() -> list[Callable[[F], F]]:
    """--var and --secrets: what a run reads besides its files."""
    return [
        click.option("--var", "variables", multiple=True, help="Set a variable: name=value."),
        click.option(
            "--secrets",
            "secrets_file",
            type=click.Path(path_type=Path),
            help="YAML file of secrets (read as secrets.NAME).",
        ),
    ]


def flow_options(function: F) -> F:
    options = [
        click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path)),
        click.option(
            "--env",
            "environment",
            help="Environment: env/NAME.yaml or a file.",
            shell_complete=_environment_names,
        ),
        *_variable_options(),
        click.option(
            "--data",
            "data_file",
            type=click.Path(path_type=Path),
            help="CSV or JSON rows: one run per row.",
        ),
        click.option(
            "--tag", "tags", multiple=True, help="Only tests with this tag, and what they need."
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def report_options(function: F) -> F:
    options = [
        click.option("--junit", type=click.Path(path_type=Path), help="Write a JUnit XML report."),
        click.option(
            "--json", "json_path", type=click.Path(path_type=Path), help="Write a JSON report."
        ),
        click.option("--html", type=click.Path(path_type=Path), help="Write an HTML report."),
        click.option(
            "--ctrf",
            type=click.Path(path_type=Path),
            help="Write a CTRF JSON report (Common Test Report Format).",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _options(**kwargs: Any) -> Any:
    from orchestrator.execution import Options
    from orchestrator.inputs import parse_vars

    kwargs["variables"] = parse_vars(kwargs["variables"])
    return Options(**kwargs)


def _rerun_inputs(function: F) -> F:
    """What a rerun or a replay may give again instead of what the run recorded."""
    options = [
        click.option(
            "--flow",
            type=click.Path(path_type=Path),
            help="The flow file (default: the one the run recorded, as given then).",
        ),
        click.option("--env", "environment", help="Environment (default: the run's)."),
        *_variable_options(),
        click.option(
            "--data",
            "data_file",
            type=click.Path(path_type=Path),
            help="A batch's data file (default: the one it recorded).",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function
