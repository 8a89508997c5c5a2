"""What the Postman, curl and HAR importers share: test names, secrets, bodies, URLs.

Each importer reads requests someone sent by hand; what they carry in clear (a bearer
token, a password in a login body, a cookie) must not land in a flow file, so every
credential becomes a ``{{ secrets.NAME }}`` that the user provides at run time.
"""

from __future__ import annotations

import binascii
import json
import re
from base64 import b64decode
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

from events.secrets import policy_for

# Headers whose whole value is a credential whatever the flow's redaction says.
_CREDENTIAL_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "x-api-key", "api-key", "x-auth-token"}
)
_JINJA = re.compile(r"\{\{|\{%|\{#")
_NOT_NAME = re.compile(r"[^a-z0-9]+")


def is_credential_name(name: str) -> bool:
    """A header, field or parameter name whose value Baton would mask: also secret here."""
    return name.lower() in _CREDENTIAL_HEADERS or policy_for().is_credential(name)


def literal(text: str) -> str:
    """``text`` as a template that renders to itself: a recorded value may hold ``{{``."""
    if not _JINJA.search(text):
        return text
    return "{% raw %}" + text.replace("{% endraw %}", "") + "{% endraw %}"


def literal_tree(value: Any) -> Any:
    """A JSON value with every string in it (keys too) made :func:`literal`."""
    if isinstance(value, str):
        return literal(value)
    if isinstance(value, dict):
        return {literal(key): literal_tree(item) for key, item in value.items()}
    if isinstance(value, list):
        return [literal_tree(item) for item in value]
    return value


def slug(text: str, fallback: str = "request") -> str:
    """A test or variable name from free text: lower case, words joined by ``_``."""
    name = _NOT_NAME.sub("_", text.lower()).strip("_")
    if not name:
        return fallback
    return f"_{name}" if name[0].isdigit() else name


def identifier(text: str, fallback: str = "var") -> str:
    """A template variable name from another tool's (``base-url`` -> ``base_url``), its case
    kept so that the user still recognises it."""
    name = re.sub(r"[^A-Za-z0-9_]+", "_", text).strip("_")
    if not name:
        return fallback
    return f"_{name}" if name[0].isdigit() else name


def unique(name: str, taken: set[str] | dict[str, Any]) -> str:
    """``name``, or ``name_2``, ``name_3``... the first not in ``taken``."""
    candidate, number = name, 2
    while candidate in taken:
        candidate, number = f"{name}_{number}", number + 1
    return candidate


def request_name(method: str, url: str) -> str:
    """``post_auth_login`` for ``POST https://host/auth/login?x=1``."""
    path = urlsplit(url).path
    words = [part for part in path.split("/") if part and not part.startswith("{")]
    return slug(" ".join([method, *words]))


@dataclass
class Secrets:
    """The secrets a flow reads, each once: its name, where its value was found, and the
    value itself only to give the same value the same name (it is never written)."""

    places: dict[str, str] = field(default_factory=dict)
    _by_value: dict[str, str] = field(default_factory=dict)

    def name_for(self, value: str, hint: str, where: str) -> str:
        if value in self._by_value:
            return self._by_value[value]
        name = unique(slug(hint, "secret").strip("_").upper() or "SECRET", self.places)
        self._by_value[value] = name
        self.places[name] = where
        return name

    def template(self, value: str, hint: str, where: str) -> str:
        return "{{ secrets." + self.name_for(value, hint, where) + " }}"


_SCHEMES = ("bearer", "basic", "token", "digest", "apikey")


def header_value(name: str, value: str, secrets: Secrets, where: str) -> str:
    """A header's value for the flow: a credential header's secret part as a secret."""
    if not is_credential_name(name) or not value or "{{" in value:
        return value
    scheme, _, credential = value.partition(" ")
    if credential and scheme.lower() in _SCHEMES:
        hint = f"{name}_{scheme}" if scheme.lower() != "bearer" else "token"
        return f"{scheme} " + secrets.template(credential.strip(), hint, where)
    return secrets.template(value, name, where)


def basic_credentials(value: str) -> tuple[str, str] | None:
    """The user and password of an ``Authorization: Basic <base64 of user:password>``
    value, or None when it is not one."""
    scheme, _, encoded = value.strip().partition(" ")
    if scheme.lower() != "basic" or not encoded.strip():
        return None
    try:
        decoded = b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, colon, password = decoded.partition(":")
    return (user, password) if colon else None


def basic_auth(user: str, password: str, secrets: Secrets, where: str) -> dict[str, Any]:
    """``auth: {basic: ...}`` with the password a secret: httpx writes the header."""
    secret = secrets.template(password, "password", f"{where}: the password of {user}")
    return {"basic": {"username": literal(user), "password": secret}}


def split_query(url: str) -> tuple[str, dict[str, Any]]:
    """The URL without its query, and the query as ``params`` (a repeated name: a list)."""
    parts = urlsplit(url)
    params: dict[str, Any] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in params:
            previous = params[key]
            params[key] = [*previous, value] if isinstance(previous, list) else [previous, value]
        else:
            params[key] = value
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")), params


def split_userinfo(url: str) -> tuple[str, tuple[str, str] | None]:
    """The URL without the ``user:password@`` before its host, and that user and password
    (decoded), or None when it has none: for ``auth:``, whose password is a secret, as a
    password in a URL of the flow would be a credential in clear."""
    parts = urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at:
        return url, None
    user, _, password = userinfo.partition(":")
    return urlunsplit(parts._replace(netloc=host)), (unquote(user), unquote(password))


def origin(url: str) -> str:
    """Scheme and host of ``url``, without any ``user:password@`` (never a base URL's)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}" if parts.scheme and host else ""


def relative_to(base: str, url: str) -> str:
    """``url`` without ``base`` in front when it starts so (a path then), else itself."""
    if base and url.startswith(base) and url[len(base) : len(base) + 1] in ("", "/"):
        return url[len(base) :] or "/"
    return url


def secret_fields(value: Any, secrets: Secrets, where: str) -> Any:
    """A JSON body or form with every credential-named member's value as a secret."""
    if isinstance(value, dict):
        return {
            key: (
                secrets.template(str(item), key, f"{where}.{key}")
                if is_credential_name(key) and isinstance(item, str | int) and item != ""
                else secret_fields(item, secrets, f"{where}.{key}")
            )
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [secret_fields(item, secrets, f"{where}[{i}]") for i, item in enumerate(value)]
    return value


def looks_secret(value: str) -> bool:
    """A literal that Baton's redaction would mask by its shape (a JWT, ``Bearer ...``,
    ``password=...``): written into a flow, it would be a credential in clear."""
    return "{{" not in value and policy_for().scrub(value) != value


def secure_request(request: dict[str, Any], secrets: Secrets, where: str) -> None:
    """Every credential left in clear in a request (a header, parameter or body field
    named like one, or a value shaped like one) made a secret, in place."""
    for part in ("headers", "params", "form", "multipart"):
        fields = request.get(part)
        if isinstance(fields, dict):
            for key, value in fields.items():
                fields[key] = _secured(key, value, secrets, f"{where} {part}.{key}")
    if "json" in request:
        request["json"] = _secured_tree(request["json"], secrets, f"{where} json")
    body = request.get("body")
    if isinstance(body, str) and looks_secret(body):
        request["body"] = secrets.template(body, "body", f"{where} body")


def _secured(key: str, value: Any, secrets: Secrets, where: str) -> Any:
    if isinstance(value, list):
        return [_secured(key, item, secrets, where) for item in value]
    if not isinstance(value, str) or not value or "{{" in value:
        return value
    if is_credential_name(key):
        return header_value(key, value, secrets, where)
    return secrets.template(value, key, where) if looks_secret(value) else value


def _secured_tree(value: Any, secrets: Secrets, where: str) -> Any:
    if isinstance(value, dict):
        return {
            key: (
                _secured(key, item, secrets, f"{where}.{key}")
                if isinstance(item, str)
                else _secured_tree(item, secrets, f"{where}.{key}")
            )
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_secured_tree(item, secrets, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, str) and looks_secret(value):
        return secrets.template(value, "value", where)
    return value


def body_fields(content_type: str, text: str) -> dict[str, Any]:
    """The request fields of a recorded body: ``json``, ``form`` or ``body`` (raw)."""
    kind = content_type.split(";")[0].strip().lower()
    if kind == "application/json" or kind.endswith("+json") or (not kind and _json_like(text)):
        try:
            return {"json": json.loads(text)}
        except ValueError:
            pass
    if kind in ("application/x-www-form-urlencoded", ""):
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=False)
        if pairs and all("=" in part for part in text.split("&")):
            return {"form": dict(pairs)}
    return {"body": text}


def _json_like(text: str) -> bool:
    return text.lstrip()[:1] in ("{", "[")
