"""The schema side of the OpenAPI importer: local ``$ref`` lookup, response schemas made
self-contained JSON Schema (Draft 2020-12) for ``expect.schema``, and sample values for
request bodies and parameters that have no example.

A flow's schema check has no OpenAPI document to resolve references against, so every
schema it carries holds what it refers to under its own ``$defs``; a recursive schema
(a tree, a linked list) stays a reference there instead of being inlined without end.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

from orchestrator.importers import Untranslated

# keywords whose value is a schema, a list of schemas or a mapping of names to schemas:
# only these are walked, so a property called "nullable" or "example" stays a property
_ONE_SCHEMA = frozenset(
    {
        "additionalProperties",
        "additionalItems",
        "not",
        "contains",
        "propertyNames",
        "if",
        "then",
        "else",
        "unevaluatedItems",
        "unevaluatedProperties",
        "contentSchema",
    }
)
_SCHEMA_LISTS = frozenset({"allOf", "anyOf", "oneOf", "prefixItems"})
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions"})
_DEPENDENT = "dependentSchemas"
# OpenAPI's own annotations: they mean nothing to a JSON Schema validator
_OPENAPI_ONLY = frozenset({"xml", "externalDocs", "discriminator"})

_STRING_FORMATS = {
    "date-time": "2024-01-01T00:00:00Z",
    "date": "2024-01-01",
    "time": "00:00:00Z",
    "email": "user@example.com",
    "uuid": "00000000-0000-4000-8000-000000000000",
    "uri": "https://example.com/",
    "url": "https://example.com/",
    "hostname": "example.com",
    "ipv4": "192.0.2.1",
    "ipv6": "2001:db8::1",
    "byte": "c3RyaW5n",
}
# bounds on a made-up value, whatever the schema asks: it is a starting point to edit
_MAX_SAMPLE_DEPTH = 8
_MAX_SAMPLE_ITEMS = 3
_MAX_SAMPLE_TEXT = 256
_MAX_SAMPLE_NODES = 2000


def pointer_parts(ref: str) -> list[str] | None:
    """``#/components/schemas/Pet`` -> its keys; None when the reference is not local."""
    if not ref.startswith("#"):
        return None
    tail = unquote(ref[1:])
    if tail == "":
        return []
    if not tail.startswith("/"):
        return None  # an anchor name (#foo): not a pointer
    return [part.replace("~1", "/").replace("~0", "~") for part in tail[1:].split("/")]


def place(parts: list[str]) -> str:
    """The place of a node as ``baton import`` names it: keys joined with dots."""
    return ".".join(parts)


def json_path(pointer: str) -> str | None:
    """A JSON pointer into a body (``/items/0/id``) as the JSONPath of a capture."""
    if pointer not in ("", "/") and not pointer.startswith("/"):
        return None
    path = "$"
    for part in pointer.split("/")[1:] if pointer else []:
        key = unquote(part).replace("~1", "/").replace("~0", "~")
        if key.isdigit():
            path += f"[{key}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            path += f".{key}"
        else:
            path += "[" + repr(key) + "]"
    return path


class Document:
    """The OpenAPI document: what its local references point at, and what could not be
    followed (reported once per place)."""

    def __init__(self, data: dict[str, Any], version: str) -> None:
        self.data = data
        self.version = version  # "3.0" or "3.1"
        self.untranslated: list[Untranslated] = []
        self._reported: set[str] = set()

    def report(self, where: str, reason: str) -> None:
        key = f"{where}\0{reason}"
        if key not in self._reported:
            self._reported.add(key)
            self.untranslated.append(Untranslated(where, reason))

    def lookup(self, ref: str) -> tuple[Any, list[str]] | None:
        parts = pointer_parts(ref)
        if parts is None:
            return None
        node: Any = self.data
        for part in parts:
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return None
        return node, parts

    def resolve(self, node: Any, where: str) -> Any:
        """A node with its ``$ref`` chain followed (parameters, bodies, responses, links);
        None, reported at ``where``, when a reference leads outside the document or
        nowhere."""
        seen: set[str] = set()
        while isinstance(node, dict) and isinstance(node.get("$ref"), str):
            ref = node["$ref"]
            if ref in seen:
                self.report(where, f"the reference {ref} refers to itself")
                return None
            seen.add(ref)
            found = self.lookup(ref)
            if found is None:
                self.report(where, _unfollowed(ref))
                return None
            node = found[0]
        return node


def _unfollowed(ref: str) -> str:
    if pointer_parts(ref) is None:
        return f"the reference {ref} is not in this document: only local references are followed"
    return f"the reference {ref} points at nothing in this document"


class Bundler:
    """One response schema as a self-contained JSON Schema, OpenAPI 3.0 dialect converted:
    ``nullable``, boolean ``exclusiveMinimum``/``exclusiveMaximum``, ``example``."""

    def __init__(self, document: Document) -> None:
        self.document = document
        self.defs: dict[str, Any] = {}
        self.names: dict[str, str] = {}

    def bundle(self, schema: Any, where: str) -> Any:
        root = self.convert(schema, where)
        if self.defs and isinstance(root, dict):
            own = root.get("$defs", {})
            root = {**root, "$defs": {**self.defs, **own}}
        return root

    def convert(self, schema: Any, where: str) -> Any:
        if not isinstance(schema, dict):
            return schema
        if isinstance(schema.get("$ref"), str):
            target = {"$ref": "#/$defs/" + self._define(schema["$ref"], where)}
            if self.document.version == "3.0":
                # 3.0: siblings of $ref are ignored, but nullable beside it is common usage
                return _nullable(target) if schema.get("nullable") is True else target
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            return {**self.convert(rest, where), **target}
        converted: dict[str, Any] = {}
        for key, value in schema.items():
            inner = f"{where}.{key}"
            if key in _ONE_SCHEMA:
                converted[key] = self.convert(value, inner)
            elif key == "items" or key in _SCHEMA_LISTS:
                converted[key] = self._subschemas(value, inner)
            elif key in _SCHEMA_MAPS or key == _DEPENDENT:
                converted[key] = (
                    {name: self.convert(sub, f"{inner}.{name}") for name, sub in value.items()}
                    if isinstance(value, dict)
                    else value
                )
            elif (
                key in _OPENAPI_ONLY
                or key.startswith("x-")
                or (self.document.version == "3.0" and key in ("nullable", "example"))
            ):
                continue
            else:
                converted[key] = value
        if self.document.version == "3.0":
            converted = _from_openapi_30(schema, converted)
        return converted

    def _subschemas(self, value: Any, where: str) -> Any:
        if isinstance(value, list):
            return [self.convert(item, f"{where}.{index}") for index, item in enumerate(value)]
        return self.convert(value, where)

    def _define(self, ref: str, where: str) -> str:
        if ref in self.names:
            return self.names[ref]
        found = self.document.lookup(ref)
        base = re.sub(r"[^A-Za-z0-9_.-]", "_", ref.rsplit("/", 1)[-1]) or "schema"
        name, number = base, 2
        while name in self.defs:
            name, number = f"{base}_{number}", number + 1
        self.names[ref] = name
        self.defs[name] = {}  # taken before converting, so a recursive reference finds it
        if found is None:
            self.document.report(f"{where}.$ref", _unfollowed(ref) + "; any value is accepted")
            return name
        if self.document.resolve(found[0], f"{where}.$ref") is None:
            # references that lead back to themselves name no schema; kept, they would
            # send the run's schema check round them without end
            return name
        self.defs[name] = self.convert(found[0], place(found[1]))
        return name


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _from_openapi_30(original: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(schema.get(bound), bool) and schema.pop(bound) and limit in schema:
            schema[bound] = schema.pop(limit)
    if original.get("nullable") is not True:
        return schema
    kind = schema.get("type")
    if isinstance(kind, str):
        schema["type"] = [kind, "null"]
        if isinstance(schema.get("enum"), list) and None not in schema["enum"]:
            schema["enum"] = [*schema["enum"], None]
        return schema
    return _nullable(schema)


class Sampler:
    """A value that fits a schema, for a body or a parameter the document gives no example
    for: its example, default, const or first enum value, else one made from its type."""

    def __init__(self, document: Document) -> None:
        self.document = document
        self._budget = _MAX_SAMPLE_NODES

    def sample(self, schema: Any, request: bool = True) -> Any:
        self._budget = _MAX_SAMPLE_NODES
        return self._sample(schema, request, (), 0)

    def documented(self, schema: Any) -> bool:
        """Whether the schema itself gives a value (an example, default, const or enum)."""
        schema = self._follow(schema, ())[0]
        return isinstance(schema, dict) and any(
            key in schema for key in ("example", "examples", "default", "const", "enum")
        )

    def _follow(self, schema: Any, stack: tuple[str, ...]) -> tuple[Any, tuple[str, ...]]:
        while isinstance(schema, dict) and isinstance(schema.get("$ref"), str):
            ref = schema["$ref"]
            found = self.document.lookup(ref)
            if ref in stack or found is None:
                return None, stack
            schema, stack = found[0], (*stack, ref)
        return schema, stack

    def _sample(self, schema: Any, request: bool, stack: tuple[str, ...], depth: int) -> Any:
        schema, stack = self._follow(schema, stack)
        self._budget -= 1
        if not isinstance(schema, dict) or depth > _MAX_SAMPLE_DEPTH or self._budget < 0:
            return None
        given = _given_value(schema)
        if given is not _NONE:
            return given

        def inner(sub: Any) -> Any:
            return self._sample(sub, request, stack, depth + 1)

        if isinstance(schema.get("allOf"), list):
            merged: dict[str, Any] = {}
            for part in schema["allOf"]:
                value = inner(part)
                if isinstance(value, dict):
                    merged.update(value)
            return merged
        for choice in ("oneOf", "anyOf"):
            if isinstance(schema.get(choice), list) and schema[choice]:
                return inner(schema[choice][0])
        return _by_type(schema, request, inner)


_NONE = object()


def _given_value(schema: dict[str, Any]) -> Any:
    if "example" in schema:
        return schema["example"]
    if isinstance(schema.get("examples"), list) and schema["examples"]:
        return schema["examples"][0]
    for key in ("const", "default"):
        if key in schema:
            return schema[key]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    return _NONE


def _kind(schema: dict[str, Any]) -> str | None:
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if isinstance(kind, str):
        return kind
    if "properties" in schema or "additionalProperties" in schema:
        return "object"
    if "items" in schema:
        return "array"
    return None


def _by_type(schema: dict[str, Any], request: bool, inner: Callable[[Any], Any]) -> Any:
    kind = _kind(schema)
    if kind == "object":
        result: dict[str, Any] = {}
        listed = schema.get("required")
        required: list[Any] = listed if isinstance(listed, list) else []
        properties = schema.get("properties")
        for name, sub in (properties if isinstance(properties, dict) else {}).items():
            # the server sets readOnly properties; a client never sends writeOnly ones back
            skip = "readOnly" if request else "writeOnly"
            if isinstance(sub, dict) and sub.get(skip) is True and name not in required:
                continue
            value = inner(sub)
            if value is not None or name in required:
                result[name] = value
        return result
    if kind == "array":
        item = inner(schema.get("items"))
        least = schema.get("minItems")
        count = min(least, _MAX_SAMPLE_ITEMS) if isinstance(least, int) and least > 1 else 1
        return [] if item is None else [item] * count
    if kind == "string":
        text = _STRING_FORMATS.get(str(schema.get("format")), "string")
        low, high = schema.get("minLength"), schema.get("maxLength")
        if isinstance(low, int) and len(text) < low:
            text = text + "x" * (min(low, _MAX_SAMPLE_TEXT) - len(text))
        if isinstance(high, int) and len(text) > high:
            text = text[:high]
        return text
    if kind in ("integer", "number"):
        return _number(schema, kind == "integer")
    if kind == "boolean":
        return True
    return None


def _number(schema: dict[str, Any], integer: bool) -> int | float:
    value: float = 1
    low, high = schema.get("minimum"), schema.get("maximum")
    exclusive_low = schema.get("exclusiveMinimum")
    if isinstance(low, int | float) and not isinstance(low, bool):
        value = max(value, low)
    if isinstance(exclusive_low, int | float) and not isinstance(exclusive_low, bool):
        value = max(value, exclusive_low + 1)
    if isinstance(high, int | float) and not isinstance(high, bool) and value > high:
        value = high
    return int(value) if integer else value
