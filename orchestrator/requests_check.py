"""Checks of request bodies, auth and TLS settings: one body kind per request, one auth
kind per ``auth:`` (and botocore for SigV4), and the files that multipart parts and
``tls:`` name exist."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from orchestrator import templating
from orchestrator.auth import AWS_HINT
from orchestrator.errors import Problem
from orchestrator.model import AUTH_KINDS, Auth, Flow, MultipartFile, Tls


def request_problems(flow: Flow, label: str, base_dir: Path) -> Iterator[Problem]:
    if isinstance(flow.defaults.auth, str):  # auth: none
        yield Problem(
            label,
            "defaults.auth",
            "auth: none switches off defaults.auth for one request; it has no meaning here",
            "leave auth out of defaults, or give auth: none on the requests that send none",
        )
    elif flow.defaults.auth is not None:
        yield from _auth_problems(flow.defaults.auth, label, "defaults.auth")
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
        if isinstance(request.auth, Auth):
            yield from _auth_problems(request.auth, label, f"{at}.request.auth")


def _auth_problems(auth: Auth, label: str, where: str) -> Iterator[Problem]:
    kinds = auth.kinds()
    if len(kinds) != 1:
        given = f"gives {' and '.join(kinds)}" if kinds else "gives none"
        yield Problem(
            label,
            where,
            f"auth takes exactly one of {', '.join(AUTH_KINDS)}; this one {given}",
            "keep one of them",
        )
    if auth.aws_sigv4 is not None and not _has_botocore():
        yield Problem(label, f"{where}.aws_sigv4", "AWS SigV4 signing needs botocore", AWS_HINT)


def _has_botocore() -> bool:
    try:
        import botocore.auth  # noqa: F401
    except ImportError:
        return False
    return True


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
