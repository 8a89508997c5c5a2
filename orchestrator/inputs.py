"""Where a run's variables come from besides the flow: environment files, ``--var``,
``--data`` rows and secrets files. Precedence, lowest first: the flow's ``variables``, the
``--env`` file, the data row, ``--var``.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from orchestrator.errors import Problem, UsageError
from orchestrator.loader import decode_yaml
from orchestrator.planner import RESERVED


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
        raw = path.read_bytes()
    except OSError as exc:
        raise UsageError([Problem(label, "", f"cannot read: {exc.strerror}")]) from None
    try:
        # utf-8-sig: spreadsheets save "CSV UTF-8" with a byte order mark, which would
        # otherwise become part of the first column's name
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UsageError(
            [
                Problem(
                    label,
                    f"line {line}",
                    f"not UTF-8 (byte 0x{raw[exc.start]:02x})",
                    "save the file with the UTF-8 encoding",
                )
            ]
        ) from None
    if path.suffix.lower() == ".json":
        rows = _json_rows(text, label)
    elif path.suffix.lower() == ".csv":
        rows = _csv_rows(text, label)
    else:
        raise UsageError([Problem(label, "", "data files are .csv or .json")])
    if not rows:
        raise UsageError([Problem(label, "", "no rows")])
    return rows


def _json_rows(text: str, label: str) -> list[dict[str, Any]]:
    try:
        rows = msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        raise UsageError([Problem(label, "", f"not valid JSON: {exc}")]) from None
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise UsageError([Problem(label, "", "expected a JSON array of objects")])
    return rows


def _csv_rows(text: str, label: str) -> list[dict[str, Any]]:
    # newline="": a quoted field keeps its line breaks, and only \r and \n end a record
    # (str.splitlines would also split at U+2028, form feeds and the like inside a value)
    # strict: an unclosed quote is an error, not a value that swallows the rows after it
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    start = 1  # the line the record being read begins on
    try:
        header = [name.strip() for name in next(reader, [])]
        _check_header(header, label)
        rows: list[dict[str, Any]] = []
        start = reader.line_num + 1
        for fields in reader:
            if fields and len(fields) != len(header):
                raise UsageError(
                    [
                        Problem(
                            label,
                            f"line {start}",
                            f"{len(fields)} fields, and the header has {len(header)}",
                            "quote a value that holds a comma",
                        )
                    ]
                )
            if fields:  # else a blank line, such as the one after the last row
                rows.append(dict(zip(header, fields, strict=True)))
            start = reader.line_num + 1
    except csv.Error:
        raise UsageError(
            [
                Problem(
                    label,
                    f"line {start}",
                    "a quoted value is not closed, or goes on after its closing quote",
                    'write a quote inside a quoted value twice: "say ""hi"""',
                )
            ]
        ) from None
    return rows


def _check_header(header: list[str], label: str) -> None:
    """Each column is a variable: it needs a name of its own."""
    for number, name in enumerate(header, start=1):
        if not name:
            raise UsageError(
                [Problem(label, "line 1", f"column {number} has no name", "name it in the header")]
            )
        if name in RESERVED:
            raise UsageError(
                [
                    Problem(
                        label,
                        "line 1",
                        f"column {number} is named {name!r}, a reserved name",
                        f"give it another name: {RESERVED[name]}",
                    )
                ]
            )
        if header.index(name) != number - 1:
            raise UsageError(
                [
                    Problem(
                        label,
                        "line 1",
                        f"column {number} is named {name!r}, as column {header.index(name) + 1} is",
                        "give each column a name of its own",
                    )
                ]
            )
