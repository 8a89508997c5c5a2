"""A tiny GraphQL endpoint for the demo shop: two queries, hand-rolled, no library.

It understands ``product(id: ...) { fields }`` and ``products { fields }`` (one top-level
field per request, no fragments or aliases), which is all Baton's examples and tests need;
anything else is answered as GraphQL servers answer a bad query: 200 with ``errors``.
"""

from __future__ import annotations

import re
from typing import Any

from examples.shop.state import PRODUCTS

_PRODUCT_FIELDS = frozenset(PRODUCTS[0])
_FIELD = re.compile(
    r"(?P<name>\w+)\s*(?:\(\s*id\s*:\s*(?P<arg>\$\w+|\"?\d+\"?)\s*\))?\s*\{(?P<fields>[^{}]*)\}"
)


def execute(body: Any) -> dict[str, Any]:
    """The response document for a request body {query, variables?, operationName?}."""
    if not isinstance(body, dict) or not isinstance(body.get("query"), str):
        return _error("the body must be a JSON object with a query string")
    variables = body.get("variables") or {}
    # the selection inside the operation's braces: "query Q($id: Int!) { product(...) {...} }"
    inner = body["query"].strip()
    start, end = inner.find("{"), inner.rfind("}")
    if start < 0 or end <= start:
        return _error("syntax error: expected a selection set in braces")
    match = _FIELD.search(inner[start + 1 : end])
    if match is None:
        return _error("syntax error: expected a field with a selection set")
    name, fields = match.group("name"), match.group("fields").split()
    unknown = [field for field in fields if field not in _PRODUCT_FIELDS]
    if unknown:
        return _error(f'Cannot query field "{unknown[0]}" on type "Product".')
    if name == "products":
        return {"data": {"products": [_pick(product, fields) for product in PRODUCTS]}}
    if name != "product":
        return _error(f'Cannot query field "{name}" on type "Query".')
    arg = match.group("arg") or ""
    raw = variables.get(arg[1:]) if arg.startswith("$") else arg.strip('"')
    found = next((p for p in PRODUCTS if str(p["id"]) == str(raw)), None)
    if found is None:
        return {
            "data": {"product": None},
            "errors": [{"message": f"no product with id {raw}", "path": ["product"]}],
        }
    return {"data": {"product": _pick(found, fields)}}


def _pick(product: dict[str, Any], fields: list[str]) -> dict[str, Any]:
    return {field: product[field] for field in fields}


def _error(message: str) -> dict[str, Any]:
    return {"errors": [{"message": message}]}
