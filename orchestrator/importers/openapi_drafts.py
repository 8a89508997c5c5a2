"""What the OpenAPI importer builds each test from, and the small conversions its parts
share: template names, document text kept literal, media types."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import msgspec

_JINJA_RESERVED = frozenset(
    {"and", "or", "not", "in", "is", "if", "else", "true", "false", "none", "env", "secrets"}
    | {"poll", "auth", "loop", "self", "True", "False", "None"}
)


def identifier(name: str) -> str:
    """A name a template can read: ``pet-id`` -> ``pet_id``."""
    text = re.sub(r"\W+", "_", name)
    text = re.sub(r"__+", "_", text).strip("_") or "value"
    if text[0].isdigit():
        text = "_" + text
    return text + "_" if text in _JINJA_RESERVED else text


def literal(value: Any) -> Any:
    """A value from the document, kept as written when the flow renders it as a template."""
    if isinstance(value, str):
        if "{{" not in value and "{%" not in value and "{#" not in value:
            return value
        if "endraw" not in value:
            return "{% raw %}" + value + "{% endraw %}"
        return "{{ '" + value.replace("\\", "\\\\").replace("'", "\\'") + "' }}"
    if isinstance(value, dict):
        return {literal(str(key)): literal(item) for key, item in value.items()}
    if isinstance(value, list):
        return [literal(item) for item in value]
    return value


def is_json(media_type: str) -> bool:
    base = media_type.split(";")[0].strip().lower()
    return base == "application/json" or base.endswith("+json") or base == "*/*"


def is_form(media_type: str) -> bool:
    return media_type.split(";")[0].strip().lower() == "application/x-www-form-urlencoded"


@dataclass
class Draft:
    """One operation's test while links may still change where its values come from."""

    name: str
    method: str
    path: str
    where: str
    operation: dict[str, Any]
    declared: dict[str, str] = field(default_factory=dict)  # parameter name -> in
    path_values: dict[str, Any] = field(default_factory=dict)
    variable_places: dict[str, tuple[str, str]] = field(default_factory=dict)  # -> (var, where)
    params: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, Any] = field(default_factory=dict)
    body: tuple[str, Any] | None = None  # ("json" | "form", value)
    schemes: list[str] = field(default_factory=list)
    scopes: dict[str, list[str]] = field(default_factory=dict)  # scheme -> required scopes
    expect: dict[str, Any] = field(default_factory=dict)
    capture: dict[str, dict[str, Any]] = field(default_factory=dict)
    depends_on: list[str] = field(default_factory=list)
    linked: dict[str, str] = field(default_factory=dict)  # "in.name" -> the link's place
    response: dict[str, Any] = field(default_factory=dict)
    response_where: str = ""


@dataclass(frozen=True)
class Credential:
    scheme: str
    location: str  # header | query
    key: str
    prefix: str  # "Bearer " or ""
    secret: str
    kind: str = "value"
    """``value``: the secret is sent in the header or parameter ``key``; else the flow's
    auth kind (``basic``, ``digest``, ``oauth2``), whose settings read the secrets."""
    token_url: str = ""
    """The clientCredentials flow's tokenUrl (``oauth2``)."""

    @property
    def secrets(self) -> tuple[str, ...]:
        if self.kind in ("basic", "digest"):
            return (f"{self.secret}_USERNAME", f"{self.secret}_PASSWORD")
        if self.kind == "oauth2":
            return (f"{self.secret}_CLIENT_ID", f"{self.secret}_CLIENT_SECRET")
        return (self.secret,)

    def auth(self, scopes: list[str]) -> dict[str, Any]:
        """The flow's ``auth:`` block of an auth kind."""
        first, second = ("{{ secrets." + name + " }}" for name in self.secrets)
        if self.kind == "oauth2":
            settings = {"token_url": self.token_url, "client_id": first, "client_secret": second}
            if scopes:
                settings["scope"] = " ".join(scopes)
            return {"oauth2": settings}
        return {self.kind: {"username": first, "password": second}}


def mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def sequence(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, bool | dict | list):
        return msgspec.json.encode(value).decode()
    return str(value)
