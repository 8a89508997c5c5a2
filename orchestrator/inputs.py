"""Where a run's variables come from besides the flow: environment files, ``--var``,
``--data`` rows and secrets files. Precedence, lowest first: the flow's ``variables``, the
``--env`` file, the data row, ``--var``.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from orchestrator.errors import Problem, UsageError
from orchestrator.loader import decode_yaml


def parse_vars(pairs: tuple[str, ...] | list[str], option: str = "--var") -> dict[str, str]:
    """``name=value`` pairs; a malformed one is a UsageError naming ``option``."""
    values: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"{option} {pair!r}: write {option} name=value")
        values[name.strip()] = value
    return values


def environment_file(name: str, flow_dir: Path) -> Path:
    """``--env staging``: a file path, else ``env/staging.yaml`` beside the flow or in the cwd."""
    direct = Path(name)
    if direct.suffix in (".yaml", ".yml") and direct.is_file():
        return direct
    candidates = [
        base / "env" / f"{name}{suffix}"
        for base in (flow_dir, Path.cwd())
        for suffix in (".yaml", ".yml")
    ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise UsageError(
        [
            Problem(
                f"--env {name}",
                "",
                "no such environment",
                f"create {candidates[0]} with the environment's variables",
            )
        ]
    )


def read_mapping(path: Path, what: str) -> dict[str, Any]:
    """A flat YAML mapping of names to values (environment and secrets files)."""
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise UsageError([Problem(str(path), "", f"cannot read {what}: {exc.strerror}")]) from None
    data = decode_yaml(text, str(path))  # the flow files' guards: alias bombs, size, tabs
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError([Problem(str(path), "", f"{what} must be a mapping of names to values")])
    return {str(key): value for key, value in data.items()}


def read_secrets(path: Path | None, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """``secrets.NAME``: the process environment, overridden by the secrets file if given."""
    secrets = dict(environ)
    if path is not None:
        secrets.update({k: str(v) for k, v in read_mapping(path, "the secrets file").items()})
    return secrets


def read_rows(path: Path) -> list[dict[str, Any]]:
    """``--data``: rows of a CSV file (with a header line) or a JSON array of objects."""
    label = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError([Problem(label, "", f"cannot read: {exc.strerror}")]) from None
    if path.suffix.lower() == ".json":
        try:
            rows = msgspec.json.decode(text)
        except msgspec.DecodeError as exc:
            raise UsageError([Problem(label, "", f"not valid JSON: {exc}")]) from None
        if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
            raise UsageError([Problem(label, "", "expected a JSON array of objects")])
    elif path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        rows = list(reader)
        for number, row in enumerate(rows, start=2):
            if None in row or any(value is None for value in row.values()):
                raise UsageError(
                    [
                        Problem(
                            label, f"line {number}", "the number of fields differs from the header"
                        )
                    ]
                )
    else:
        raise UsageError([Problem(label, "", "data files are .csv or .json")])
    if not rows:
        raise UsageError([Problem(label, "", "no rows")])
    return [{str(key): value for key, value in row.items()} for row in rows]
