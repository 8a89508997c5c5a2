"""Templates in flow files: a sandboxed jinja2, and which variables a template reads.

A flow file is data, not code: the immutable sandbox refuses attribute access to Python
internals (``{{ ''.__class__ }}``) and StrictUndefined makes an unknown name an error
instead of an empty string. A value that is a single ``{{ expression }}`` keeps its type,
so ``product_id: "{{ product_id }}"`` sends the number 3, not the string "3".
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping
from typing import Any

from jinja2 import StrictUndefined, TemplateError, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["TemplateError", "has_template", "references", "render", "template_strings"]

_ENV = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False)
_SINGLE_EXPRESSION = re.compile(r"^\{\{(?P<expr>(?:(?!\}\}|\{\{).)*)\}\}$", re.DOTALL)
_MARKERS = ("{{", "{%", "{#")

# names jinja2 provides itself: never variables a test must define
_GLOBALS = frozenset(_ENV.globals) | {"loop", "self", "varargs", "kwargs", "caller"}


def has_template(text: str) -> bool:
    return any(marker in text for marker in _MARKERS)


@functools.lru_cache(maxsize=4096)
def _compile(text: str) -> Any:
    single = _SINGLE_EXPRESSION.match(text.strip())
    if single:
        expression = _ENV.compile_expression(single.group("expr"), undefined_to_none=False)
        return lambda namespace: _strict(expression(**namespace))
    template = _ENV.from_string(text)
    return template.render


def _strict(value: Any) -> Any:
    # compile_expression hands back Undefined instead of raising; make it raise like render
    if isinstance(value, StrictUndefined):
        str(value)
    return value


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


@functools.lru_cache(maxsize=4096)
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
