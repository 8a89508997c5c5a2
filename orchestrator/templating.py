"""Templates in flow files: a sandboxed jinja2, and which variables a template reads.

A flow file is data, not code: the immutable sandbox refuses attribute access to Python
internals (``{{ ''.__class__ }}``) and StrictUndefined makes an unknown name an error
instead of an empty string. A value that is a single ``{{ expression }}`` keeps its type,
so ``product_id: "{{ product_id }}"`` sends the number 3, not the string "3".

A flow file may also be someone else's (a tenant of the service), so what one render may
cost is bounded (``Limits``): the characters it makes, its loop turns, its time. Every
operation a template makes through the sandbox (operators, calls, filters, loop turns,
output) is checked against the render's budget, and the few that can make a huge value
in one step ('a' * n, center(n), replace, join, format widths, lipsum, range, ``**``)
are refused before they run. Whatever fails inside a template is a TemplateError with a
message, never another exception: ``{% include %}``, ``{% import %}`` and
``{% extends %}`` do not parse (a flow has no other templates to read).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import re
import string
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from jinja2 import StrictUndefined, TemplateError, nodes
from jinja2.exceptions import TemplateRuntimeError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import generate_lorem_ipsum
from jinja2.visitor import NodeTransformer

__all__ = [
    "CLI_LIMITS",
    "LIMITS",
    "SERVICE_LIMITS",
    "Limits",
    "TemplateCostError",
    "TemplateError",
    "compile_value",
    "has_template",
    "is_costly",
    "off_loop",
    "references",
    "render",
    "template_strings",
]

T = TypeVar("T")


@dataclass(frozen=True)
class Limits:
    """What one render of one template string may cost, and where it runs."""

    output: int
    """Characters of the rendered value, and items or characters of any value made on the
    way (a string, a list)."""
    iterations: int
    """Loop turns of one render, all loops together; and the items of one range()."""
    seconds: float
    """Time of one render."""
    int_bits: int = 4096
    """Bits of any integer a template computes (Python prints no more than 4300 digits)."""
    off_loop: bool = False
    """Render in a worker thread, so that the event loop goes on answering meanwhile."""
    pattern_seconds: float = 10.0
    """Time of one match of one of the flow's regular expressions (``matches``, a regex
    capture): a pattern that backtracks without end would hold the event loop as long."""
    read_files: bool = True
    """Whether a run may read the files a flow names (multipart parts, TLS certificates):
    a tenant's flow must not upload the service's own files."""


CLI_LIMITS = Limits(output=16 * 2**20, iterations=10_000_000, seconds=10.0)
"""``baton run``: a user's own flows, generous but finite."""
SERVICE_LIMITS = Limits(
    output=2**20,
    iterations=100_000,
    seconds=1.0,
    off_loop=True,
    pattern_seconds=0.25,
    read_files=False,
)
"""Runs started through the service: a tenant's flow must not stall it."""
LIMITS: contextvars.ContextVar[Limits] = contextvars.ContextVar("baton_template_limits")
"""The limits of the renders of the current task (a run sets them); CLI_LIMITS if unset."""


class TemplateCostError(TemplateRuntimeError):
    """A render would cost more than its Limits allow."""


class _Budget:
    """What is left of one render's Limits."""

    __slots__ = ("deadline", "limits", "turns")

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.deadline = time.monotonic() + limits.seconds
        self.turns = limits.iterations

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateCostError(
                f"the template ran for more than {self.limits.seconds:g} s, its limit"
            )

    def turn(self) -> None:
        self.turns -= 1
        if self.turns & 63 == 0:  # the clock every 64 turns: a turn costs well under 1 ms
            if self.turns < 0:
                raise TemplateCostError(
                    f"the template's loops turn more than {self.limits.iterations:,} times, "
                    "its limit"
                )
            self.check_time()

    def too_long(self, length: int, what: str = "a value") -> TemplateCostError | None:
        if length > self.limits.output:
            return TemplateCostError(
                f"{what} of the template would have {length:,} characters or items; "
                f"the limit is {self.limits.output:,}"
            )
        return None

    def sized(self, value: T) -> T:
        """``value``, if it is within the limits."""
        if isinstance(value, str | bytes | list | tuple | dict):
            failure = self.too_long(len(value))
            if failure is not None:
                raise failure
        elif isinstance(value, int) and value.bit_length() > self.limits.int_bits:
            raise TemplateCostError(
                f"the template computes an integer of more than {self.limits.int_bits} bits"
            )
        return value

    def number(self, value: Any, what: str) -> None:
        """Refuse an integer argument that asks for more than the output may hold."""
        if isinstance(value, int) and not isinstance(value, bool) and value > self.limits.output:
            raise TemplateCostError(
                f"{what}: {value:,} is more than the limit of {self.limits.output:,} "
                "characters or items"
            )


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar(
    "baton_template_budget", default=None
)


def _budget() -> _Budget:
    budget = _BUDGET.get()
    return budget if budget is not None else _Budget(LIMITS.get(CLI_LIMITS))


def _repeat_length(left: Any, right: Any) -> int | None:
    """The length of ``left * right`` for a sequence times an integer; None otherwise."""
    for sequence, times in ((left, right), (right, left)):
        if isinstance(sequence, str | bytes | list | tuple) and isinstance(times, int):
            return len(sequence) * max(times, 0)
    return None


_PRINTF = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
_DIGITS = re.compile(r"\d+")


def _check_format(budget: _Budget, fmt: str, values: Iterable[Any], printf: bool) -> None:
    """Refuse a format whose widths or precisions ask for more than the output may hold:
    written in it, or taken from the arguments (``%*s``, ``{:{}}``)."""
    if printf:
        specs = [part for found in _PRINTF.findall(fmt) for part in found]
        nested = "*" in specs
    else:
        try:
            specs = [spec or "" for _, _, spec, _ in string.Formatter().parse(fmt)]
        except ValueError:
            return  # the call itself says what is wrong with it
        nested = any("{" in spec for spec in specs)
    for spec in specs:
        for digits in _DIGITS.findall(spec):
            if len(digits) > len(str(budget.limits.output)) or int(digits) > budget.limits.output:
                raise TemplateCostError(
                    f"a width or precision of {digits[:20]} in a format is over the limit "
                    f"of {budget.limits.output:,} characters"
                )
    if nested:
        for value in values:
            budget.number(value, "a width or precision of a format")


def _check_bits(budget: _Budget, operator: str, left: int, right: int) -> None:
    """Refuse ``left * right`` or ``left ** right`` with more bits than the limit allows."""
    if operator == "*":
        bits = left.bit_length() + right.bit_length()
    else:
        bits = 0 if right <= 0 or left in (-1, 0, 1) else (left.bit_length() - 1) * right
    if bits > budget.limits.int_bits:
        raise TemplateCostError(
            f"the template computes an integer of more than {budget.limits.int_bits} bits"
        )


def _check_replace(budget: _Budget, text: Any, old: Any, new: Any, count: Any) -> None:
    if not (isinstance(text, str) and isinstance(old, str) and isinstance(new, str)):
        return
    found = text.count(old) if old else len(text) + 1
    if isinstance(count, int) and count >= 0:
        found = min(found, count)
    failure = budget.too_long(len(text) + found * (len(new) - len(old)), "replace()")
    if failure is not None:
        raise failure


def _check_join(budget: _Budget, separator: Any, items: Any) -> None:
    if isinstance(separator, str) and hasattr(items, "__len__"):
        failure = budget.too_long(len(separator) * max(len(items) - 1, 0), "join()")
        if failure is not None:
            raise failure


_WIDTHS = frozenset(
    {
        "center",
        "ljust",
        "rjust",
        "zfill",
        "expandtabs",
        "indent",
        "batch",
        "slice",
        "tojson",
        "pprint",
        "wordwrap",
        "truncate",
    }
)
"""Calls and filters whose integer arguments say how much to make."""


def _check_call(
    budget: _Budget, name: str, receiver: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Refuse a call that would make more than the output may hold in one step;
    ``receiver`` is what a method is called on, or a filter's value."""
    if name in _WIDTHS:
        for value in (*args, *kwargs.values()):
            budget.number(value, f"{name}()")
    elif name == "replace":
        old, new, count = (*args, None, None, None)[:3]
        _check_replace(budget, receiver, old, new, kwargs.get("count", count))
    elif name == "join":
        if isinstance(receiver, str):  # str.join(items)
            _check_join(budget, receiver, args[0] if args else ())
        else:  # items|join(separator)
            _check_join(budget, args[0] if args else kwargs.get("d", ""), receiver)
    elif name in ("format", "format_map") and isinstance(receiver, str):
        _check_format(budget, receiver, (*args, *kwargs.values()), printf=False)


def _filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """A filter of jinja2's under the render's budget (its pass_context marks kept)."""
    passes = getattr(function, "jinja_pass_arg", None)

    @functools.wraps(function)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.check_time()
        given = args[1:] if passes is not None else args  # drop the context/environment
        if given:
            value, rest = given[0], given[1:]
            if name == "format" and isinstance(value, str):
                _check_format(budget, value, (*rest, *kwargs.values()), printf=True)
            else:
                _check_call(budget, name, value, rest, kwargs)
        return budget.sized(function(*args, **kwargs))

    return bounded


def _range(*args: int) -> range:
    budget = _budget()
    numbers = range(*args)
    if len(numbers) > budget.limits.iterations:
        raise TemplateCostError(
            f"range() of {len(numbers):,} numbers; a template may make at most "
            f"{budget.limits.iterations:,} loop turns"
        )
    return numbers


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
    budget = _budget()
    # about 8 characters a word, at most ``max`` words a paragraph
    failure = budget.too_long(8 * n * max, "lipsum()")
    if failure is not None:
        raise failure
    return str(generate_lorem_ipsum(n=n, html=html, min=min, max=max))


def _turns(iterable: Iterable[T]) -> Iterator[T]:
    """A loop's iterable, one turn of the budget per item."""
    budget = _budget()
    for item in iterable:
        budget.turn()
        yield item


_FORBIDDEN = {
    nodes.Include: "{% include %}",
    nodes.Import: "{% import %}",
    nodes.FromImport: "{% from ... import %}",
    nodes.Extends: "{% extends %}",
}


class _Bounded(NodeTransformer):
    """Every loop's iterable through ``_turns``, every ``~`` through the size check."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = nodes.Filter(node.iter, "baton_turns", [], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return nodes.Filter(node, "baton_sized", [], [], None, None, lineno=node.lineno)


class _FlowEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox of flow files, with every render under a budget (see the module)."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self) -> None:
        super().__init__(undefined=StrictUndefined, autoescape=False)
        self.filters = {name: _filter(name, f) for name, f in self.filters.items()}
        self.filters["baton_turns"] = _turns
        self.filters["baton_sized"] = lambda value: _budget().sized(value)
        self.globals["range"] = _range
        self.globals["lipsum"] = _lipsum

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        for kind, tag in _FORBIDDEN.items():
            found = next(tree.find_all(kind), None)
            if found is not None:
                raise TemplateSyntaxError(
                    f"{tag} cannot be used in a flow file: it has no other templates to read",
                    found.lineno,
                )
        return tree

    def _generate(self, source: nodes.Template, *args: Any, **kwargs: Any) -> str:
        return super()._generate(_Bounded().visit(source), *args, **kwargs)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = _budget()
        budget.check_time()
        length = _repeat_length(left, right) if operator == "*" else None
        if length is not None:
            failure = budget.too_long(length, "'*'")
            if failure is not None:
                raise failure
        elif operator in ("*", "**") and isinstance(left, int) and isinstance(right, int):
            _check_bits(budget, operator, left, right)
        elif operator == "+" and hasattr(left, "__len__") and hasattr(right, "__len__"):
            failure = budget.too_long(len(left) + len(right), "'+'")
            if failure is not None:
                raise failure
        elif operator == "%" and isinstance(left, str):
            values = right if isinstance(right, tuple) else (right,)
            _check_format(budget, left, values, printf=True)
        return budget.sized(super().call_binop(context, operator, left, right))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.check_time()
        name = getattr(__obj, "__name__", "")
        if isinstance(name, str) and name:
            # str.format comes wrapped by the sandbox: its string is the wrapped method's
            method = getattr(__obj, "__wrapped__", __obj)
            _check_call(budget, name, getattr(method, "__self__", None), args, kwargs)
        return budget.sized(super().call(__context, __obj, *args, **kwargs))


_ENV = _FlowEnvironment()
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


_COSTLY: weakref.WeakSet[Renderer] = weakref.WeakSet()
"""Renderers that evaluate more than dotted names: what ``off_loop`` moves to a thread."""


def is_costly(renderer: Renderer) -> bool:
    """Whether ``renderer`` may evaluate more than dotted names (see ``off_loop``)."""
    return renderer in _COSTLY


@functools.lru_cache(maxsize=4096)
def _compile(text: str) -> Renderer:
    try:
        single = _SINGLE_EXPRESSION.match(text.strip())
        if single:
            expression = _ENV.compile_expression(single.group("expr"), undefined_to_none=False)
            slow = _bounded(lambda namespace: _value(expression(**namespace)))
        else:
            template = _ENV.from_string(text)
            slow = _bounded(lambda namespace: _output(template.generate(namespace)))
    except TemplateError as exc:
        failure = exc  # the loader reports it first; a run that meets it fails the test

        def slow(namespace: Mapping[str, Any]) -> Any:
            raise failure

    fast = _names_only(text, bool(single))
    if fast is None:
        _COSTLY.add(slow)
        return slow
    return lambda namespace: fast(namespace, slow)


def _bounded(render: Renderer) -> Renderer:
    """``render`` under a budget of the task's Limits; whatever fails is a TemplateError."""

    def bounded(namespace: Mapping[str, Any]) -> Any:
        token = _BUDGET.set(_Budget(LIMITS.get(CLI_LIMITS)))
        try:
            return render(namespace)
        except TemplateError:
            raise
        except RecursionError:
            raise TemplateRuntimeError("the template calls itself too deeply") from None
        except MemoryError:
            raise TemplateCostError("the template needs more memory than there is") from None
        except Exception as exc:  # a template's mistake, e.g. 1 + 'a': the test's failure
            raise TemplateRuntimeError(f"{type(exc).__name__}: {exc}") from None
        finally:
            _BUDGET.reset(token)

    return bounded


def _output(chunks: Iterator[str]) -> str:
    """A template's output, stopped as soon as it is over the limit."""
    budget = _budget()
    limit = budget.limits.output
    out: list[str] = []
    size = 0
    for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise budget.too_long(size, "the output") or AssertionError(size)
        out.append(chunk)
        if len(out) & 63 == 0:
            budget.check_time()
    return "".join(out)


def _value(value: Any) -> Any:
    """A single expression's value, if what it holds (counting every reference to a value
    again, as sending it would) is within the limits."""
    # compile_expression hands back Undefined instead of raising; make it raise like render
    if isinstance(value, StrictUndefined):
        str(value)
    budget = _budget()
    size = 0
    stack = [value]
    while stack:
        item = stack.pop()
        budget.sized(item)
        size += len(item) if isinstance(item, str | bytes) else 1
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
        failure = budget.too_long(size, "the value")
        if failure is not None:
            raise failure
    return value


async def off_loop(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` in a render thread, with the task's context (its Limits)."""
    context = contextvars.copy_context()
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_RENDERS, functools.partial(context.run, function, *args))


_RENDERS = ThreadPoolExecutor(max_workers=1, thread_name_prefix="baton-render")
"""Where off_loop renders: one thread. Renders share one GIL with the event loop, so a
second thread would only take more of it from the loop (/health's slowest answer while
tenants' templates ran to their limit: 1.2 s with two threads, 0.1-0.5 s with one);
costly renders wait for each other instead, which is their tenants' cost, not the
service's."""


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
        return _costly_if(
            lambda namespace: {key(namespace): item(namespace) for key, item in parts},
            [part for pair in parts for part in pair],
        )
    if isinstance(value, list):
        items = [compile_value(item) for item in value]
        if not any(_is_template(item) for item in value):
            return lambda namespace: value
        return _costly_if(lambda namespace: [item(namespace) for item in items], items)
    return lambda namespace: value


def _costly_if(renderer: Renderer, parts: list[Renderer]) -> Renderer:
    if any(part in _COSTLY for part in parts):
        _COSTLY.add(renderer)
    return renderer


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
    local.update(macro.name for macro in tree.find_all(nodes.Macro))
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
