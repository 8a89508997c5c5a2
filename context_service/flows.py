"""Flow files sent to the service: the CLI's static checks, and its messages, on text.

An upload is checked as ``baton validate`` checks a file (orchestrator.loader and planner),
except that ``env.*`` and ``secrets.*`` are left to the run: which environment a run uses
is known only when it starts, and the run checks them then, with the same messages. A
flow file holds data only, but one thing in it reaches the service's disk: a JSON Schema
given as a file path. The service has no files beside an upload, so it refuses those.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Iterator, Mapping

from context_service.errors import FieldError, TooLarge, Unprocessable
from orchestrator.errors import Problem, UsageError
from orchestrator.loader import LoadedFlow
from orchestrator.loader import load_text as load_flow_text
from orchestrator.model import MultipartFile
from orchestrator.planner import Plan, Scope, plan

MAX_FLOW_BYTES = 256 * 1024
"""The largest flow file the service accepts, below the CLI's (orchestrator.loader): an
upload is held in memory, and the shop's biggest example is ~6 KB."""
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class _Anything(Mapping[str, str]):
    """A scope where every name is defined: for the names known only at run time."""

    def __contains__(self, key: object) -> bool:
        return True

    def __getitem__(self, key: str) -> str:
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def safe_filename(filename: str) -> str:
    """The last part of a name, in characters that are safe anywhere; ``flow.yaml`` if
    nothing is left."""
    base = _UNSAFE.sub("-", filename.replace("\\", "/").rsplit("/", 1)[-1]).strip(".-")
    return base[:100] or "flow.yaml"


def rejected(problems: list[Problem], filename: str) -> Unprocessable:
    """The problems of a flow as a 422, each as the CLI prints it."""
    shown = [dataclasses.replace(problem, file=filename) for problem in problems]
    errors = [FieldError(p.message, p.where, hint=p.hint) for p in shown]
    count = f"{len(shown)} problem{'s' if len(shown) != 1 else ''}"
    return Unprocessable(f"the flow file has {count}:\n" + "\n".join(map(str, shown)), errors)


def load_text(content: str, filename: str) -> LoadedFlow:
    """Decode and check a flow file's text with the CLI's loader, which refuses first what
    would hurt the process (alias bombs, deep nesting); raises TooLarge or Unprocessable
    (the loader's problems, the file named ``filename``)."""
    data = content.encode("utf-8", "surrogatepass")
    if len(data) > MAX_FLOW_BYTES:
        raise TooLarge(f"the flow file is {len(data)} bytes; the limit is {MAX_FLOW_BYTES} bytes")
    name = safe_filename(filename)
    try:
        loaded = load_flow_text(content, name)
    except UsageError as exc:
        raise rejected(exc.problems or [Problem(name, "", str(exc))], name) from None
    problems = [*_schema_files(loaded), *_disk_files(loaded)]
    if loaded.flow.use:
        problems.append(
            Problem(
                name,
                "use",
                "an uploaded suite cannot use a test of another file as a shared setup",
                "put the setup's tests in this suite, or run the flows with baton run",
            )
        )
    if problems:
        raise rejected(problems, name)
    return loaded


def _schema_files(loaded: LoadedFlow) -> Iterator[Problem]:
    for name, test in loaded.flow.tests.items():
        for part, expect in (("expect", test.expect), ("until", test.until)):
            if expect is not None and isinstance(expect.schema, str):
                yield Problem(
                    loaded.label,
                    f"tests.{name}.{part}.schema",
                    "a schema file cannot be read by the service",
                    "put the JSON Schema inline in the flow file",
                )


def _disk_files(loaded: LoadedFlow) -> Iterator[Problem]:
    """Multipart files and TLS certificates: the service reads no file a tenant names."""
    flow = loaded.flow
    tls = [("defaults.tls", flow.defaults.tls)]
    for name, test in flow.tests.items():
        tls.append((f"tests.{name}.tls", test.tls))
        for field, part in (test.request.multipart or {}).items():
            if isinstance(part, MultipartFile):
                yield Problem(
                    loaded.label,
                    f"tests.{name}.request.multipart.{field}",
                    "a file cannot be read by the service",
                    "send the file from `baton run`, or its content as a text field",
                )
    for where, settings in tls:
        if settings is not None and (settings.ca_bundle or settings.client_cert):
            yield Problem(
                loaded.label,
                where,
                "certificate files cannot be read by the service",
                "run flows that need them with `baton run`",
            )


def check_upload(loaded: LoadedFlow, variables: Collection[str] = ()) -> Plan:
    """The planner's checks at upload time: ``variables`` are names an environment may
    define; every ``env.*`` and ``secrets.*`` passes until the run."""
    names = {*loaded.flow.variables, *variables}
    try:
        return plan(loaded, Scope(names, _Anything(), _Anything()))
    except UsageError as exc:
        raise rejected(exc.problems, loaded.label) from None


def check_run(
    loaded: LoadedFlow,
    variables: Collection[str],
    env: Mapping[str, str],
    secrets: Mapping[str, str],
    tags: Collection[str] = (),
) -> Plan:
    """The planner's checks for a run, with what the run's environment really defines."""
    try:
        return plan(loaded, Scope({*loaded.flow.variables, *variables}, env, secrets), tags)
    except UsageError as exc:
        raise rejected(exc.problems, loaded.label) from None
