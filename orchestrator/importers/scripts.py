"""What a Postman test script says that a flow can say too, read without running it.

Only lines of known shapes are translated: status checks (``pm.response.to.have.status(200)``,
``pm.expect(pm.response.code).to.eql(201)``) and variables set from the response
(``pm.environment.set("id", pm.response.json().data.id)``, the same through
``var jsonData = pm.response.json()``, or from a header or a cookie). Every other line,
a skipped ``pm.test.skip`` block and every pre-request script line are listed with
their line number: a script is code, and guessing at code would hide what it did.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from orchestrator.importers import Untranslated

_QUOTED = r"""(?P<q{name}>['"`])(?P<{name}>(?:(?!(?P=q{name})).)*)(?P=q{name})"""
_TEST_OPEN = re.compile(
    r"^pm\.test\(\s*(['\"`]).*?\1\s*,\s*(?:function\s*\(\s*\)|\(\s*\)\s*=>)\s*\{$"
)
_TEST_INLINE = re.compile(
    r"^pm\.test\(\s*(['\"`]).*?\1\s*,\s*(?:function\s*\(\s*\)|\(\s*\)\s*=>)\s*\{(?P<body>.*)\}\s*\)$"
)
_CLOSING = re.compile(r"^[})\s;]*$")
_SKIP_OPEN = re.compile(r"^pm\.test\.skip\(")
_ALIAS = re.compile(
    r"^(?:var|let|const)\s+(?P<alias>[A-Za-z_$][\w$]*)\s*=\s*"
    r"(?:pm\.response\.json\(\)|JSON\.parse\(\s*responseBody\s*\))$"
)
_STATUS = re.compile(r"^pm\.response\.to\.(?:have\.status|be\.status)\(\s*(?P<code>\d{3})\s*\)$")
_STATUS_SHAPE: dict[str, int | str] = {
    "pm.response.to.be.ok": 200,
    "pm.response.to.be.success": "2xx",
}
_CODE_EQUALS = re.compile(
    r"^pm\.expect\(\s*pm\.response\.(?:code|status)\s*\)\.to\.(?:be\.)?"
    r"(?:eql|equal|equals|eq)\(\s*(?P<code>\d{3})\s*\)$"
)
_CODE_ONE_OF = re.compile(
    r"^pm\.expect\(\s*pm\.response\.code\s*\)\.to\.be\.oneOf\(\s*\[(?P<codes>[\d,\s]+)\]\s*\)$"
)
_LEGACY_CODE = re.compile(
    r"^tests\[\s*(['\"]).*?\1\s*\]\s*=\s*\(?\s*responseCode\.code\s*===?\s*(?P<code>\d{3})\s*\)?$"
)
_SET = re.compile(
    r"^(?:pm\.(?:environment|collectionVariables|globals|variables)\.set|"
    r"postman\.set(?:Environment|Global)Variable)\(\s*"
    + _QUOTED.format(name="name")
    + r"\s*,\s*(?P<value>.+)\)$"
)
_ACCESSOR = re.compile(
    r"""\.(?P<key>[A-Za-z_$][\w$]*)|\[\s*(?P<index>\d+)\s*\]|\[\s*(['"])(?P<quoted>(?:(?!\3).)*)\3\s*\]"""
)
_HEADER = re.compile(
    r"^pm\.response\.(?:headers\.get|header)\(\s*" + _QUOTED.format(name="h") + r"\s*\)$"
)
_COOKIE = re.compile(r"^pm\.cookies\.get\(\s*" + _QUOTED.format(name="c") + r"\s*\)$")
_EXPECT_EQUAL = re.compile(
    r"^pm\.expect\((?P<subject>.+?)\)\.to\.(?:deep\.)?(?:be\.)?(?:eql|equal|equals|eq)"
    r"\((?P<expected>.+)\)$"
)
_HAS_PROPERTY = re.compile(
    r"^pm\.expect\((?P<subject>.+?)\)\.to\.have\.property\(\s*"
    + _QUOTED.format(name="p")
    + r"\s*\)$"
)
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class ScriptReading:
    statuses: list[int | str] = field(default_factory=list)
    captures: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Postman variable name -> a capture (``{"json": "$.a.b"}``)."""
    json_checks: dict[str, Any] = field(default_factory=dict)
    """JSONPath -> a check on the body (a value it equals, or ``{exists: true}``)."""
    untranslated: list[Untranslated] = field(default_factory=list)


def read_test_script(events: Any, where: str) -> ScriptReading:
    reading = ScriptReading()
    events = [events] if isinstance(events, dict) else events
    for event in events if isinstance(events, list) else []:
        if not isinstance(event, dict):
            continue
        listen = str(event.get("listen", "script"))
        script = event.get("script")
        lines = _lines(script.get("exec") if isinstance(script, dict) else None)
        if listen == "test":
            _read(lines, f"{where} test script", reading)
        else:
            for number, line in lines:
                reading.untranslated.append(
                    Untranslated(
                        f"{where} {listen} script line {number}",
                        f"a pre-request script is not translated: {line}",
                    )
                )
    return reading


def _lines(exec_: Any) -> list[tuple[int, str]]:
    """The script's lines that hold code, with their number from 1."""
    parts = [exec_] if isinstance(exec_, str) else exec_ if isinstance(exec_, list) else []
    text = "\n".join(part for part in parts if isinstance(part, str))
    return [
        (number, line.strip())
        for number, line in enumerate(text.splitlines(), 1)
        if line.strip() and not line.strip().startswith("//")
    ]


def _read(lines: list[tuple[int, str]], where: str, reading: ScriptReading) -> None:
    aliases: set[str] = set()
    skipping = 0
    for number, line in lines:
        place = f"{where} line {number}"
        if skipping or _SKIP_OPEN.match(line):
            skipping += line.count("{") + line.count("(") - line.count("}") - line.count(")")
            reading.untranslated.append(Untranslated(place, f"in a skipped pm.test: {line}"))
            continue
        inline = _TEST_INLINE.match(line.rstrip(";").rstrip())
        statements = [inline.group("body")] if inline else [line]
        if inline is None and (_TEST_OPEN.match(line) or _CLOSING.match(line)):
            continue
        for statement in _statements(statements[0]):
            if not _statement(statement, aliases, reading):
                reading.untranslated.append(Untranslated(place, f"not translated: {statement}"))


def _statements(text: str) -> list[str]:
    """``a; b;`` as ``[a, b]`` (not split inside quotes, which a JSON key may need)."""
    found, current, quote = [], "", ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"`":
            quote = char
        elif char == ";":
            found.append(current.strip())
            current = ""
            continue
        current += char
    found.append(current.strip())
    return [statement for statement in found if statement]


def _statement(statement: str, aliases: set[str], reading: ScriptReading) -> bool:
    """Whether the statement was translated (into ``reading``)."""
    if alias := _ALIAS.match(statement):
        aliases.add(alias.group("alias"))
        return True
    if statement in _STATUS_SHAPE:
        reading.statuses.append(_STATUS_SHAPE[statement])
        return True
    for pattern in (_STATUS, _CODE_EQUALS, _LEGACY_CODE):
        if match := pattern.match(statement):
            reading.statuses.append(int(match.group("code")))
            return True
    if match := _CODE_ONE_OF.match(statement):
        reading.statuses.extend(
            int(code) for code in match.group("codes").split(",") if code.strip()
        )
        return True
    if match := _EXPECT_EQUAL.match(statement):
        path = _body_path(match.group("subject").strip(), aliases)
        expected = _literal(match.group("expected").strip())
        if path is not None and path.endswith(".length") and isinstance(expected, int):
            reading.json_checks[path.removesuffix(".length")] = {"length": expected}
            return True
        if path is not None and expected is not _NOT_LITERAL:
            reading.json_checks[path] = expected
            return True
    if match := _HAS_PROPERTY.match(statement):
        path = _body_path(match.group("subject").strip(), aliases)
        if path is not None:
            key = match.group("p")
            step = f".{key}" if _IDENTIFIER.match(key) else "['" + key.replace("'", "\\'") + "']"
            reading.json_checks[path + step] = {"exists": True}
            return True
    if match := _SET.match(statement):
        capture = _capture(match.group("value").strip(), aliases)
        if capture is not None:
            reading.captures.setdefault(match.group("name"), capture)
            return True
    return False


_NOT_LITERAL = object()


def _literal(text: str) -> Any:
    """A JavaScript literal as a JSON value: a number, a quoted string, true, false, null."""
    if len(text) >= 2 and text[0] == text[-1] == "'" and '"' not in text:
        text = '"' + text[1:-1] + '"'
    try:
        value = json.loads(text)
    except ValueError:
        return _NOT_LITERAL
    return value if not isinstance(value, dict | list) else _NOT_LITERAL


def _body_path(expression: str, aliases: set[str]) -> str | None:
    capture = _capture(expression, aliases)
    return capture.get("json") if capture is not None else None


def _capture(expression: str, aliases: set[str]) -> dict[str, Any] | None:
    if header := _HEADER.match(expression):
        return {"header": header.group("h")}
    if cookie := _COOKIE.match(expression):
        return {"cookie": cookie.group("c")}
    for root in ("pm.response.json()", "JSON.parse(responseBody)", *aliases):
        if expression.startswith(root):
            path = _json_path(expression[len(root) :])
            if path is not None:
                return {"json": path}
    return None


def _json_path(accessors: str) -> str | None:
    """``.data.items[0]["x-y"]`` as ``$.data.items[0]['x-y']``; None if it is not only that."""
    path, position = "$", 0
    while position < len(accessors):
        match = _ACCESSOR.match(accessors, position)
        if match is None:
            return None
        key = match.group("key") or match.group("quoted")
        if match.group("index") is not None:
            path += f"[{match.group('index')}]"
        elif key is not None and _IDENTIFIER.match(key):
            path += f".{key}"
        elif key is not None:
            escaped = key.replace("\\", "\\\\").replace("'", "\\'")
            path += f"['{escaped}']"
        position = match.end()
    return path
