"""Captures: values read out of a response (JSONPath, header, cookie, regex, link, status).

Also the lookups assertions share: compiled JSONPath queries and regexes, cached because
the same flow runs thousands of times, and ``MISSING`` for a value that is not there.
"""

from __future__ import annotations

import enum
import functools
import re
from typing import Any
from urllib.parse import urljoin

import jsonpath_rfc9535
import regex

from events.secrets import Redactor
from orchestrator import templating
from orchestrator.model import Capture
from orchestrator.results import ResponseView

NOT_JSON = "the response body is not JSON"


class Missing(enum.Enum):
    """A path or header that matched nothing; distinct from a JSON ``null`` value.

    An enum member so that msgspec encodes it (as ``"<missing>"``) inside events and reports.
    """

    MISSING = "<missing>"

    def __repr__(self) -> str:
        return "<missing>"

    __str__ = __repr__


MISSING = Missing.MISSING


class CaptureError(Exception):
    """A capture found nothing to capture; the message names the capture and what is missing.

    ``body``: the response text the message quotes the start of. It is kept whole so that
    ``shown`` can redact before cutting: a cut first could leave half a secret in view.
    """

    def __init__(self, name: str, problem: str, body: str | None = None) -> None:
        self.name = name
        self.problem = problem
        self.body = body
        super().__init__(self._message(excerpt(body, _QUOTED) if body is not None else None))

    def shown(self, redactor: Redactor) -> str:
        """The message as a user may see it: every secret masked, the quote included."""
        quoted = redactor.excerpt(self.body, _QUOTED) if self.body is not None else None
        return redactor.redact(self._message(quoted))

    def _message(self, quoted: str | None) -> str:
        tail = f" (it starts {quoted!r})" if quoted is not None else ""
        return f"capture {self.name}: {self.problem}{tail}"


_QUOTED = 80
"""How much of a body a capture's message quotes."""


@functools.lru_cache(maxsize=2048)
def compile_path(path: str) -> jsonpath_rfc9535.JSONPathQuery:
    """Raises ``jsonpath_rfc9535.JSONPathError`` if the path does not parse."""
    return jsonpath_rfc9535.compile(path)


@functools.lru_cache(maxsize=2048)
def compile_regex(pattern: str) -> regex.Pattern[str]:
    """Raises ``regex.error`` if the pattern does not compile. The ``regex`` package (the
    syntax of ``re``) because its matches take a timeout: see ``search``."""
    return regex.compile(pattern)


class PatternTimeout(Exception):
    """A match of one of the flow's patterns took longer than the run's limit."""


def search(pattern: regex.Pattern[str], text: str) -> regex.Match[str] | None:
    """``pattern.search(text)`` within the run's ``pattern_seconds``: a pattern that
    backtracks without end fails its check instead of holding the event loop."""
    seconds = templating.LIMITS.get(templating.CLI_LIMITS).pattern_seconds
    try:
        # concurrent: the match lets go of the GIL, so the loop answers while it runs
        return pattern.search(text, timeout=seconds, concurrent=True)
    except TimeoutError:
        raise PatternTimeout(
            f"regular expression {pattern.pattern!r} took longer than {seconds:g} s on "
            "the response, the limit of one match; simplify it (nested repeats such as "
            "(a+)+ backtrack without end)"
        ) from None


def select(query: jsonpath_rfc9535.JSONPathQuery, document: Any) -> Any:
    """One node: its value; several: the list of them; none: ``MISSING``."""
    values = [node.value for node in query.finditer(document)]
    if not values:
        return MISSING
    return values[0] if len(values) == 1 else values


def excerpt(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def capture(name: str, spec: Capture, response: ResponseView) -> Any:
    """The value ``spec`` names in ``response``; raises ``CaptureError`` if it is not there."""
    try:
        kind, source = spec.source()
    except ValueError as exc:
        raise CaptureError(name, str(exc)) from None
    if kind == "json":
        return _json(name, source, response)
    if kind == "header":
        value = response.headers.get(source.lower())
        if value is None:
            present = ", ".join(sorted(response.headers)) or "none"
            raise CaptureError(name, f"header {source} is not in the response (headers: {present})")
        return value
    if kind == "cookie":
        # cookie names are case-sensitive (RFC 6265), unlike header names
        if source not in response.cookies:
            present = ", ".join(sorted(response.cookies)) or "none"
            raise CaptureError(
                name, f"cookie {source} is not set by the response (cookies: {present})"
            )
        return response.cookies[source]
    if kind == "regex":
        return _regex(name, source, response.text)
    if kind == "link":
        target = links(response).get(source.lower())
        if target is None:
            present = ", ".join(sorted(links(response))) or "none"
            raise CaptureError(name, f'the Link header has no rel="{source}" (rels: {present})')
        return target
    return response.status


def capture_all(name: str, spec: Capture, response: ResponseView) -> list[Any]:
    """Every value ``spec`` finds in ``response``: each node a JSONPath selects (so a page of
    one item gives a list of one), or the one value of another source; [] if none. Raises
    ``CaptureError`` for what no page could fix: a body that is not JSON, a bad pattern."""
    kind, source = spec.source()
    if kind == "json":
        return _nodes(name, source, response)
    if kind == "regex":
        _pattern(name, source)
    try:
        return [capture(name, spec, response)]
    except CaptureError:
        return []


# RFC 8288: <target>; param; name=value; name="quoted, value"
_LINK_VALUE = re.compile(
    r'<([^>]*)>((?:\s*;\s*[^;,"=\s]+(?:\s*=\s*(?:"(?:[^"\\]|\\.)*"|[^;,\s]*))?)*)'
)
_LINK_PARAM = re.compile(r';\s*([^;,"=\s]+)(?:\s*=\s*("(?:[^"\\]|\\.)*"|[^;,\s]*))?')


def links(response: ResponseView) -> dict[str, str]:
    """The Link header's targets by relation type (lower case), resolved against the
    response's URL; the first link wins for a relation given twice."""
    found: dict[str, str] = {}
    for target, params in _LINK_VALUE.findall(response.headers.get("link", "")):
        for param, value in _LINK_PARAM.findall(params):
            if param.lower() == "rel":
                for rel in value.strip('"').lower().split():
                    found.setdefault(rel, urljoin(response.url, target.strip()))
    return found


def _json(name: str, path: str, response: ResponseView) -> Any:
    values = _nodes(name, path, response)
    if not values:
        raise CaptureError(name, f"{path} matched nothing in the response body")
    return values[0] if len(values) == 1 else values


def _nodes(name: str, path: str, response: ResponseView) -> list[Any]:
    try:
        query = compile_path(path)
    except jsonpath_rfc9535.JSONPathError as exc:
        raise CaptureError(name, f"JSONPath {path!r} does not parse: {exc}") from None
    try:
        document = response.json
    except ValueError:
        raise CaptureError(name, f"{path}: {NOT_JSON}", response.text) from None
    return [node.value for node in query.finditer(document)]


def _pattern(name: str, pattern: str) -> regex.Pattern[str]:
    try:
        return compile_regex(pattern)
    except regex.error as exc:
        raise CaptureError(
            name, f"regular expression {pattern!r} does not compile: {exc}"
        ) from None


def _regex(name: str, pattern: str, text: str) -> str:
    compiled = _pattern(name, pattern)
    try:
        match = search(compiled, text)
    except PatternTimeout as exc:
        raise CaptureError(name, str(exc)) from None
    if match is None:
        raise CaptureError(name, f"regular expression {pattern!r} matched nothing in the body")
    # a group says which part to keep: token=(\w+) captures the token, not "token="
    value: str | None = match.group(1) if compiled.groups else match.group(0)
    if value is None:
        raise CaptureError(name, f"regular expression {pattern!r} matched, but group 1 did not")
    return value
