"""Templates in flow files: a sandboxed jinja2, and which variables a template reads.

A flow file is data, not code: the immutable sandbox refuses attribute access to Python
internals (``{{ ''.__class__ }}``) and StrictUndefined makes an unknown name an error
instead of an empty string. A value that is a single ``{{ expression }}`` keeps its type,
so ``product_id: "{{ product_id }}"`` sends the number 3, not the string "3".
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from jinja2 import StrictUndefined, TemplateError, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = [
    "TemplateError",
    "compile_value",
    "has_template",
    "references",
    "render",
    "template_strings",
]

_ENV = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False)
_SINGLE_EXPRESSION = re.compile(r"^\{\{(?P<expr>(?:(?!\}\}|\{\{).)*)\}\}$", re.DOTALL)
_MARKERS = ("{{", "{%", "{#")
_DOTTED = r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)\s*\}\}"
_NAMES_ONLY = re.compile(
    rf"(?:[^{{]|\{{(?![{{%#]))*(?:{_DOTTED}(?:[^{{]|\{{(?![{{%#]))*)+", re.DOTALL
)
_DOTTED_NAME = re.compile(_DOTTED)

# names jinja2 provides itself: never variables a test must define
_GLOBALS = frozenset(_ENV.globals) | {"loop", "self", "varargs", "kwargs", "caller"}
# names jinja2 reads as constants or operators, whatever the namespace holds
_KEYWORDS = frozenset(
    {"true", "false", "none", "True", "False", "None", "not", "and", "or", "in", "is", "if"}
)


def has_template(text: str) -> bool:
    return any(marker in text for marker in _MARKERS)


Renderer = Callable[[Mapping[str, Any]], Any]


@functools.lru_cache(maxsize=4096)
def _compile(text: str) -> Renderer:
    single = _SINGLE_EXPRESSION.match(text.strip())
    if single:
        expression = _ENV.compile_expression(single.group("expr"), undefined_to_none=False)
        slow: Renderer = lambda namespace: _strict(expression(**namespace))  # noqa: E731
    else:
        slow = _ENV.from_string(text).render
    fast = _names_only(text, bool(single))
    if fast is None:
        return slow
    return lambda namespace: fast(namespace, slow)


def _strict(value: Any) -> Any:
    # compile_expression hands back Undefined instead of raising; make it raise like render
    if isinstance(value, StrictUndefined):
        str(value)
    return value


_ABSENT = object()


def _names_only(text: str, single: bool) -> Callable[[Mapping[str, Any], Renderer], Any] | None:
    """A renderer for the common template made only of dotted names (``/cart/{{ cart_id }}``,
    ``Bearer {{ auth.token }}``) that looks them up in the namespace's dicts, as jinja2
    would, without a jinja2 context per render. Whenever a lookup is not a plain dict key
    (a missing name, an attribute, a global), jinja2 renders instead, with its errors.
    None for any other template, and where jinja2 would change the text around the names
    (a trailing newline, carriage returns)."""
    if not _NAMES_ONLY.fullmatch(text) or text.endswith("\n") or "\r" in text:
        return None
    pieces = _DOTTED_NAME.split(text)  # text, name, text, name, ..., text
    literals = pieces[0::2]
    paths = [tuple(name.split(".")) for name in pieces[1::2]]
    for path in paths:
        if path[0] in _GLOBALS | _KEYWORDS or any(hasattr(dict, key) for key in path[1:]):
            return None

    def lookup(namespace: Mapping[str, Any], path: tuple[str, ...]) -> Any:
        value: Any = namespace.get(path[0], _ABSENT)
        for key in path[1:]:
            if type(value) is not dict:
                return _ABSENT
            value = value.get(key, _ABSENT)
        return value

    if single:
        (path,) = paths

        def one(namespace: Mapping[str, Any], slow: Renderer) -> Any:
            value = lookup(namespace, path)
            return slow(namespace) if value is _ABSENT else value

        return one

    def join(namespace: Mapping[str, Any], slow: Renderer) -> Any:
        out = [literals[0]]
        for path, literal in zip(paths, literals[1:], strict=True):
            value = lookup(namespace, path)
            if value is _ABSENT:
                return slow(namespace)
            out.append(value if type(value) is str else str(value))
            out.append(literal)
        return "".join(out)

    return join


def render(value: Any, namespace: Mapping[str, Any]) -> Any:
    """Render every template string inside value (str, list, dict); other values pass through."""
    if isinstance(value, str):
        if not has_template(value):
            return value
        return _compile(value)(namespace)
    if isinstance(value, dict):
        return {render(key, namespace): render(item, namespace) for key, item in value.items()}
    if isinstance(value, list):
        return [render(item, namespace) for item in value]
    return value


def compile_value(value: Any) -> Renderer:
    """``render`` with the walk done once: a function of the namespace giving what
    ``render(value, namespace)`` gives. Parts without templates are returned as they are,
    not copied: callers must not change what it returns."""
    if isinstance(value, str):
        if not has_template(value):
            return lambda namespace: value
        return _compile(value)
    if isinstance(value, dict):
        parts = [(compile_value(key), compile_value(item)) for key, item in value.items()]
        if not any(_is_template(key) or _is_template(item) for key, item in value.items()):
            return lambda namespace: value
        return lambda namespace: {key(namespace): item(namespace) for key, item in parts}
    if isinstance(value, list):
        items = [compile_value(item) for item in value]
        if not any(_is_template(item) for item in value):
            return lambda namespace: value
        return lambda namespace: [item(namespace) for item in items]
    return lambda namespace: value


def _is_template(value: Any) -> bool:
    return next(template_strings(value), None) is not None


def template_strings(value: Any) -> Iterator[str]:
    """Every string inside value that holds a template."""
    if isinstance(value, str):
        if has_template(value):
            yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from template_strings(key)
            yield from template_strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from template_strings(item)


# big enough for every template of the largest flow file: the loader and then the
# planner read each one, and a smaller cache made the second pass parse them all again
@functools.lru_cache(maxsize=65536)
def references(text: str) -> frozenset[str]:
    """The dotted variable names a template reads, e.g. ``{"auth.token", "product_id"}``.

    Names inside ``| default(...)`` are optional and left out; names a template assigns
    itself (``{% set %}``, loop targets) are left out. Raises TemplateSyntaxError.
    """
    tree = _ENV.parse(text)
    local = {node.name for node in tree.find_all(nodes.Name) if node.ctx in ("store", "param")}
    found: set[str] = set()
    _collect(tree, found, optional=False)
    return frozenset(name for name in found if name.split(".")[0] not in local | _GLOBALS)


def _collect(node: nodes.Node, found: set[str], *, optional: bool) -> None:
    if isinstance(node, nodes.Filter) and node.name in ("default", "d"):
        if node.node is not None:
            _collect(node.node, found, optional=True)
        for child in [*node.args, *node.kwargs]:
            _collect(child, found, optional=optional)
        return
    dotted = _dotted(node)
    if dotted is not None:
        if not optional:
            found.add(dotted)
        return
    for child in node.iter_child_nodes():
        _collect(child, found, optional=optional)


def _dotted(node: nodes.Node) -> str | None:
    """``auth.token`` for Getattr(Name(auth), token) or auth['token']; None otherwise."""
    if isinstance(node, nodes.Name) and node.ctx == "load":
        return node.name
    if isinstance(node, nodes.Getattr):
        base = _dotted(node.node)
        return f"{base}.{node.attr}" if base is not None else None
    if (
        isinstance(node, nodes.Getitem)
        and isinstance(node.arg, nodes.Const)
        and isinstance(node.arg.value, str)
    ):
        base = _dotted(node.node)
        return f"{base}.{node.arg.value}" if base is not None else None
    return None
