"""Checks of request bodies and TLS settings that need the flow's directory: one body kind
per request, and the files that multipart parts and ``tls:`` name exist."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from orchestrator import templating
from orchestrator.errors import Problem
from orchestrator.model import Flow, MultipartFile, Tls


def request_problems(flow: Flow, label: str, base_dir: Path) -> Iterator[Problem]:
    if flow.defaults.tls is not None:
        yield from _tls_problems(flow.defaults.tls, label, "defaults.tls", base_dir)
    for name, test in flow.tests.items():
        at = f"tests.{name}"
        request = test.request
        bodies = request.bodies()
        if len(bodies) > 1:
            yield Problem(
                label,
                f"{at}.request",
                f"a request has one body, this one gives {' and '.join(bodies)}",
                "keep one of them",
            )
        for field, part in (request.multipart or {}).items():
            if isinstance(part, MultipartFile):
                where = f"{at}.request.multipart.{field}.file"
                yield from _missing(part.file, label, where, base_dir)
        if test.tls is not None:
            yield from _tls_problems(test.tls, label, f"{at}.tls", base_dir)


def _tls_problems(tls: Tls, label: str, where: str, base_dir: Path) -> Iterator[Problem]:
    for field in ("ca_bundle", "client_cert", "client_key"):
        value = getattr(tls, field)
        if value is not None:
            yield from _missing(value, label, f"{where}.{field}", base_dir)
    if tls.client_key is not None and tls.client_cert is None:
        yield Problem(
            label, f"{where}.client_key", "a client key without client_cert", "give client_cert"
        )


def _missing(path: str, label: str, where: str, base_dir: Path) -> Iterator[Problem]:
    """A path that names no file (one that is a template is checked when it is rendered)."""
    if templating.has_template(path):
        return
    full = base_dir / Path(path).expanduser()
    if not full.is_file():
        yield Problem(
            label,
            where,
            f"no such file: {path} (relative to the flow file: {full})",
            "fix the path; it is relative to the flow file's directory",
        )
