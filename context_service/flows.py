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
import tempfile
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path

import yaml

from context_service.errors import FieldError, TooLarge, Unprocessable
from orchestrator.errors import Problem, UsageError
from orchestrator.loader import LoadedFlow, load_flow
from orchestrator.planner import Plan, Scope, plan

MAX_FLOW_BYTES = 256 * 1024
"""The largest flow file accepted (the shop's biggest example is ~6 KB)."""
MAX_DEPTH = 64
"""How deep values may nest in a flow file (the shop's examples: 6)."""
MAX_VALUES = 100_000
"""How many values a flow file may hold with its aliases expanded."""
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_NOT_BRACKETS = bytes(set(range(256)) - set(b"[]{}"))


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
    """Decode and check a flow file's text as the CLI's loader does; raises TooLarge or
    Unprocessable (the loader's problems, the file named ``filename``)."""
    data = content.encode("utf-8", "surrogatepass")
    if len(data) > MAX_FLOW_BYTES:
        raise TooLarge(f"the flow file is {len(data)} bytes; the limit is {MAX_FLOW_BYTES} bytes")
    name = safe_filename(filename)
    problem = _shape_problem(data, name)
    if problem is not None:
        raise rejected([problem], name)
    with tempfile.TemporaryDirectory(prefix="baton-flow-") as folder:
        path = Path(folder) / name
        path.write_bytes(data)
        try:
            loaded = load_flow(path)
        except UsageError as exc:
            raise rejected(exc.problems or [Problem(name, "", str(exc))], name) from None
    # the label runs record as their source, and no folder to read schema files from
    loaded = dataclasses.replace(loaded, path=Path(name))
    problems = list(_schema_files(loaded))
    if problems:
        raise rejected(problems, name)
    return loaded


def _flow_depth(data: bytes) -> int:
    """How deep ``[`` and ``{`` nest: an upper bound, counting those inside quoted strings
    and comments too (telling those apart takes a YAML parser, the thing to protect)."""
    depth = deepest = 0
    for char in data.translate(None, _NOT_BRACKETS):
        if char in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif depth:
            depth -= 1
    return deepest


def _expanded_size(root: yaml.Node, limit: int) -> int:
    """How many values the document holds once its aliases are expanded, counted without
    expanding them (each node once); more than ``limit`` for a recursive alias."""
    sizes: dict[int, int] = {}
    expanding: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        children = _children(node)
        if children_done:
            sizes[key] = 1 + sum(sizes[id(child)] for child in children)
            expanding.discard(key)
            if sizes[key] > limit:
                return sizes[key]
            continue
        if key in sizes:
            continue
        if key in expanding:
            return limit + 1
        expanding.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in children if id(child) not in sizes)
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _shape_problem(data: bytes, label: str) -> Problem | None:
    """What would make decoding the file itself a danger to the service: brackets nested so
    deep that the YAML library's C code overflows its stack (the whole process dies), or
    aliases that expand a few lines into billions of values. None for a normal file."""
    if _flow_depth(data) > MAX_DEPTH:
        return Problem(label, "", f"values are nested more than {MAX_DEPTH} levels deep")
    try:
        root = yaml.compose(data, Loader=_LOADER)
    except yaml.YAMLError:
        return None  # the loader says what is wrong, in the CLI's words
    if root is not None and _expanded_size(root, MAX_VALUES) > MAX_VALUES:
        return Problem(
            label,
            "",
            f"the file holds more than {MAX_VALUES} values once its YAML aliases are expanded",
            "use fewer aliases (*name), or none",
        )
    return None


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
