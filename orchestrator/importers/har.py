"""``baton import har FILE [--host HOST]``: a browser's recording (HAR 1.2) as a flow.

One test per entry, in order; static assets (images, styles, scripts, fonts) are left
out with a note. Where a later request carries a value that an earlier response gave
(a JSON member, a header, a cookie) and that no earlier request had sent, the earlier
test captures it and the later one reads the capture, which makes it depend on the
earlier test: the recorded token or id is never replayed, the run gets fresh ones.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import default
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import urlsplit

from orchestrator.errors import UsageError
from orchestrator.importers import Imported, Untranslated
from orchestrator.importers.parts import (
    Secrets,
    basic_auth,
    basic_credentials,
    body_fields,
    header_value,
    identifier,
    is_credential_name,
    literal,
    origin,
    relative_to,
    request_name,
    secure_request,
    split_query,
    split_userinfo,
    unique,
)

_STATIC_RESOURCES = frozenset({"image", "stylesheet", "script", "font", "media", "manifest"})
_STATIC_TYPES = ("image/", "font/", "video/", "audio/", "text/css", "javascript", "wasm")
_STATIC_SUFFIXES = (
    ".png", ".jpg", ".jpeg", ".gif", ".svg", ".ico", ".webp", ".avif", ".bmp", ".css",
    ".js", ".mjs", ".map", ".woff", ".woff2", ".ttf", ".otf", ".eot", ".mp4", ".webm",
)  # fmt: skip
# Set by the HTTP client itself: replaying the recorded ones would be wrong (a length
# for another body) or noise (a browser's fingerprint).
_CLIENT_HEADERS = frozenset(
    {
        "host", "content-length", "connection", "accept-encoding", "keep-alive", "te",
        "transfer-encoding", "upgrade-insecure-requests", "user-agent", "priority",
    }
)  # fmt: skip
# Response headers whose values say nothing a later request could carry.
_PLAIN_RESPONSE_HEADERS = frozenset(
    {
        "date", "content-type", "content-length", "server", "cache-control", "vary",
        "connection", "expires", "last-modified", "age", "keep-alive", "transfer-encoding",
        "content-encoding", "set-cookie", "strict-transport-security", "accept-ranges",
    }
)  # fmt: skip
_GENERIC_KEYS = frozenset({"id", "value", "key", "name", "uuid", "token"})


@dataclass
class _Source:
    """A value an earlier response gave: which test got it and how to capture it."""

    test: str
    capture: dict[str, Any]
    name_hint: str
    name: str | None = None


_TOKEN = re.compile(r"[\w-]+")


@dataclass
class _Recording:
    """The flow being built, and what the responses so far gave.

    Values are found again by their words (``[\\w-]+``): a value that is one word is
    looked up directly, a longer one (a JWT, a path) by its first word and then compared
    in place, so that a recording of thousands of entries stays linear in its size.
    """

    source: str
    secrets: Secrets = field(default_factory=Secrets)
    untranslated: list[Untranslated] = field(default_factory=list)
    tests: dict[str, Any] = field(default_factory=dict)
    known: dict[str, _Source] = field(default_factory=dict)
    """Value (as text) -> where it came from, the most recent response winning."""
    captured: set[str] = field(default_factory=set)
    _by_first_word: dict[str, set[tuple[str, int]]] = field(default_factory=dict)
    """A first word -> the known values of several words that hold it, with the length
    of what comes before it (the ``/`` of ``/cart/1``)."""
    _sent_words: set[str] = field(default_factory=set)
    _sent: list[str] = field(default_factory=list)

    def note(self, where: str, reason: str) -> None:
        self.untranslated.append(Untranslated(where, reason))

    def sent(self, text: str) -> None:
        self._sent.append(text)
        self._sent_words.update(_TOKEN.findall(text))

    def learn(self, value: str, source: _Source) -> None:
        first = _TOKEN.search(value)
        if first is None:
            return
        if first.group() in self._sent_words and (
            first.group() == value or any(value in text for text in self._sent)
        ):
            return  # the user sent it first: typed, not derived from a response
        if first.group() != value:
            self._by_first_word.setdefault(first.group(), set()).add((value, first.start()))
        self.known[value] = source

    def _matches(self, text: str) -> list[tuple[int, int]]:
        """Where known values are in ``text``: the longest at each place, none overlapping."""
        found: list[tuple[int, int]] = []
        for word in _TOKEN.finditer(text):
            if word.group() in self.known:
                found.append((word.start(), word.end()))
            for value, lead in self._by_first_word.get(word.group(), ()):
                begin = word.start() - lead
                end = begin + len(value)
                if begin >= 0 and text.startswith(value, begin) and _bounded(text, begin, end):
                    found.append((begin, end))
        chosen: list[tuple[int, int]] = []
        for begin, end in sorted(found, key=lambda span: (span[0], span[0] - span[1])):
            if not chosen or begin >= chosen[-1][1]:
                chosen.append((begin, end))
        return chosen

    def capture_name(self, source: _Source) -> str:
        if source.name is None:
            source.name = unique(source.name_hint, self.captured)
            self.captured.add(source.name)
            test = self.tests[source.test]
            test.setdefault("capture", {})[source.name] = source.capture
        return source.name

    def template(self, text: str) -> str:
        """``text`` with each value from an earlier response read from its capture; the
        rest kept as written."""
        pieces, last = [], 0
        for begin, end in self._matches(text):
            pieces.append(literal(text[last:begin]))
            pieces.append("{{ " + self.capture_name(self.known[text[begin:end]]) + " }}")
            last = end
        pieces.append(literal(text[last:]))
        return "".join(pieces)

    def value(self, value: Any) -> Any:
        """A JSON value with its strings templated; a whole number or string that an
        earlier response gave becomes that capture (its type kept)."""
        if isinstance(value, bool) or value is None:
            return value
        if isinstance(value, int | float | str) and str(value) in self.known:
            return "{{ " + self.capture_name(self.known[str(value)]) + " }}"
        if isinstance(value, str):
            return self.template(value)
        if isinstance(value, list):
            return [self.value(item) for item in value]
        if isinstance(value, dict):
            return {self.template(str(key)): self.value(item) for key, item in value.items()}
        return value


def _bounded(text: str, begin: int, end: int) -> bool:
    """Whether text[begin:end] is not part of a longer word."""
    before = text[begin - 1] if begin > 0 else " "
    after = text[end] if end < len(text) else " "
    return not (before.isalnum() or before in "_-") and not (after.isalnum() or after in "_-")


def convert(text: str, source: str, hosts: Iterable[str] = ()) -> Imported:
    entries = _entries(text, source)
    recording = _Recording(source)
    kept = list(_kept(entries, {host.lower() for host in hosts}, recording))
    if not kept:
        raise UsageError(
            f"{source}: log.entries: no request left to import" + _hosts_hint(entries, hosts)
        )
    origins = Counter(origin(str(entry["request"]["url"])) for _, entry in kept)
    base = origins.most_common(1)[0][0]
    dropped: set[str] = set()
    for index, entry in kept:
        _add_test(index, entry, base, recording, dropped)
    if dropped:
        recording.note(
            "log.entries[*].request.headers",
            "headers the HTTP client sets itself are left out: " + ", ".join(sorted(dropped)),
        )
    flow: dict[str, Any] = {
        "name": f"recorded in {source}",
        "base_url": "{{ base_url }}",
        "variables": {"base_url": base},
        "tests": recording.tests,
    }
    return Imported(flow, recording.untranslated, recording.secrets.places)


def _entries(text: str, source: str) -> list[dict[str, Any]]:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"{source}: line {exc.lineno} column {exc.colno}: not JSON ({exc.msg}); "
            "export the HAR again from the browser's network panel"
        ) from None
    log = document.get("log") if isinstance(document, dict) else None
    entries = log.get("entries") if isinstance(log, dict) else None
    if not isinstance(entries, list):
        raise UsageError(f"{source}: log.entries: not a HAR file (no list of entries)")
    for index, entry in enumerate(entries):
        request = entry.get("request") if isinstance(entry, dict) else None
        if not isinstance(request, dict) or not isinstance(request.get("url"), str):
            raise UsageError(
                f"{source}: log.entries[{index}].request: an entry needs a request with a url"
            )
    return entries


def _kept(
    entries: list[dict[str, Any]], hosts: set[str], recording: _Recording
) -> Iterator[tuple[int, dict[str, Any]]]:
    elsewhere: Counter[str] = Counter()
    for index, entry in enumerate(entries):
        url = str(entry["request"]["url"])
        at = f"log.entries[{index}] {entry['request'].get('method', 'GET')} {url[:120]}"
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            recording.note(at, f"a {parts.scheme or 'relative'} URL is not an HTTP request")
        elif hosts and parts.hostname not in hosts and parts.netloc.lower() not in hosts:
            elsewhere[parts.netloc] += 1
        elif (kind := _static(entry)) is not None:
            recording.note(at, f"a static asset ({kind}): left out")
        else:
            yield index, entry
    if elsewhere:
        listed = ", ".join(f"{host} ({count})" for host, count in sorted(elsewhere.items()))
        recording.note("log.entries", f"requests to other hosts than --host left out: {listed}")


def _hosts_hint(entries: list[dict[str, Any]], hosts: Iterable[str]) -> str:
    """What to give --host instead: a mistyped host (or a port left out of a recording
    made on another port) must not leave the user guessing what the HAR holds."""
    if not hosts:
        return ""
    found = sorted({urlsplit(str(entry["request"]["url"])).netloc for entry in entries} - {""})
    return " (none to the --host given; the recording's hosts: " + ", ".join(found) + ")"


def _static(entry: dict[str, Any]) -> str | None:
    resource = entry.get("_resourceType")
    if isinstance(resource, str) and resource.lower() in _STATIC_RESOURCES:
        return resource.lower()
    content = (entry.get("response") or {}).get("content") or {}
    mime = str(content.get("mimeType", "")).lower()
    if any(kind in mime for kind in _STATIC_TYPES):
        return mime.split(";")[0]
    path = urlsplit(str(entry["request"]["url"])).path.lower()
    suffix = next((suffix for suffix in _STATIC_SUFFIXES if path.endswith(suffix)), None)
    return f"{suffix} file" if suffix else None


def _add_test(
    index: int, entry: dict[str, Any], base: str, recording: _Recording, dropped: set[str]
) -> None:
    at = f"log.entries[{index}]"
    har_request = entry["request"]
    method = str(har_request.get("method") or "GET").upper()
    url, userinfo = split_userinfo(str(har_request["url"]))
    url, params = split_query(url)
    request: dict[str, Any] = {}
    if method != "GET":
        request["method"] = method
    request["url"] = recording.template(relative_to(base, url))
    # named after the templated URL: /orders/{{ order_id }} is get_orders, not get_orders_1001
    name = unique(request_name(method, request["url"]), recording.tests)
    if params:
        request["params"] = {
            key: _credential(key, recording.value(value), recording, f"{at} query {key}")
            for key, value in params.items()
        }
    headers = _headers(har_request.get("headers"), at, recording, dropped)
    auth = _auth(har_request.get("headers"), at, recording)
    if auth is None and userinfo is not None:
        auth = basic_auth(*userinfo, recording.secrets, f"{at} url")
    body = _body(har_request.get("postData"), at, recording)
    if "json" in body or "multipart" in body:
        # the client writes its own: a multipart boundary is chosen per request
        headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
    if headers:
        request["headers"] = headers
    if auth is not None:
        request["auth"] = auth
    request.update(body)
    secure_request(request, recording.secrets, at)
    test: dict[str, Any] = {"request": request}
    response = entry.get("response") or {}
    status = response.get("status")
    if isinstance(status, int) and status > 0:
        test["expect"] = {"status": status}
    else:
        recording.note(at, "the recording has no response (blocked or cancelled): no expect")
    recording.tests[name] = test
    recording.sent(json.dumps(har_request))
    _learn(response, name, recording)


def _credential(key: str, value: Any, recording: _Recording, where: str) -> Any:
    """A credential-named value that no earlier response gave: a secret."""
    templated = isinstance(value, str) and "{{" in value
    if is_credential_name(key) and isinstance(value, str | int) and value != "" and not templated:
        return recording.secrets.template(str(value), key, where)
    return value


def _auth(entries: Any, at: str, recording: _Recording) -> dict[str, Any] | None:
    """A recorded ``Authorization: Basic ...`` as ``auth: {basic: ...}``."""
    for header in entries if isinstance(entries, list) else []:
        if isinstance(header, dict) and str(header.get("name", "")).lower() == "authorization":
            found = basic_credentials(str(header.get("value", "")))
            if found is not None:
                return basic_auth(*found, recording.secrets, f"{at} header Authorization")
    return None


def _headers(entries: Any, at: str, recording: _Recording, dropped: set[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for header in entries if isinstance(entries, list) else []:
        if not isinstance(header, dict):
            continue
        name, value = str(header.get("name", "")), str(header.get("value", ""))
        lowered = name.lower()
        if (
            not name
            or name.startswith(":")
            or lowered in _CLIENT_HEADERS
            or lowered.startswith("sec-")
        ):
            if name and not name.startswith(":"):
                dropped.add(name)
            continue
        if lowered == "authorization" and basic_credentials(value) is not None:
            continue  # the request's auth: (see _auth)
        where = f"{at} header {name}"
        if lowered == "cookie":
            value = "; ".join(
                _cookie(pair, recording, where) for pair in value.split(";") if pair.strip()
            )
        else:
            value = recording.template(value)
            if "{{" not in value:
                value = header_value(name, value, recording.secrets, where)
        headers[name] = value
    return headers


def _cookie(pair: str, recording: _Recording, where: str) -> str:
    name, _, value = pair.strip().partition("=")
    templated = recording.template(value)
    if "{{" in templated or not value:
        return f"{name}={templated}"
    return f"{name}=" + recording.secrets.template(value, f"cookie_{name}", f"{where} {name}")


_BINARY = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f]")


def _body(post: Any, at: str, recording: _Recording) -> dict[str, Any]:
    if not isinstance(post, dict):
        return {}
    mime = str(post.get("mimeType", ""))
    where = f"{at} body"
    if mime.lower().startswith("multipart/"):
        params = post.get("params")
        if not params and isinstance(post.get("text"), str):
            params = _multipart_params(mime, post["text"])
        return _multipart(params, where, recording)
    text = post.get("text")
    if not isinstance(text, str):
        params = post.get("params")
        if not isinstance(params, list) or not params:
            return {}
        pairs = [
            (str(p.get("name", "")), str(p.get("value", ""))) for p in params if isinstance(p, dict)
        ]
        return {
            "form": {
                key: _credential(key, recording.value(value), recording, f"{where}.{key}")
                for key, value in pairs
            }
        }
    if not text:
        return {}
    if post.get("encoding") == "base64":  # not in HAR 1.2, but recorders write it
        try:
            text = base64.b64decode(text, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            recording.note(where, f"a binary body ({mime or 'no type'}) is not sent")
            return {}
    if _BINARY.search(text):
        # a flow's body is text, sent as UTF-8: these bytes would not be the recorded ones
        recording.note(where, f"a binary body ({mime or 'no type'}) is not sent")
        return {}
    fields = body_fields(mime, text)
    if "json" in fields:
        return {"json": _secret_members(recording.value(fields["json"]), recording, where)}
    if "form" in fields:
        return {"form": _secret_members(recording.value(fields["form"]), recording, where)}
    return {"body": recording.template(text)}


def _multipart_params(mime: str, text: str) -> list[dict[str, str]]:
    """The parts of a raw multipart body, as a HAR's ``params`` would list them (Chrome
    writes the raw body instead)."""
    message = BytesParser(policy=default).parsebytes(
        f"Content-Type: {mime}\r\n\r\n".encode() + text.encode("utf-8", "surrogateescape")
    )
    if not message.is_multipart():
        return []
    params: list[dict[str, str]] = []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        filename = part.get_filename()
        if filename:
            params.append(
                {"name": name, "fileName": filename, "contentType": part.get_content_type()}
            )
        else:
            payload = part.get_payload(decode=True)
            value = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""
            params.append({"name": name, "value": value})
    return params


def _multipart(params: Any, where: str, recording: _Recording) -> dict[str, Any]:
    """A recorded multipart body, from its parts: a HAR keeps a file's name, not its bytes."""
    parts: dict[str, Any] = {}
    for index, param in enumerate(params if isinstance(params, list) else []):
        if not isinstance(param, dict) or not param.get("name"):
            continue
        name = str(param["name"])
        if param.get("fileName"):
            part: dict[str, Any] = {"file": str(param["fileName"])}
            if param.get("contentType"):
                part["content_type"] = str(param["contentType"])
            parts[name] = part
            recording.note(
                f"{where} params[{index}] {name}",
                f"the recording holds no file: put {param['fileName']} beside the flow file",
            )
        else:
            value = recording.value(str(param.get("value", "")))
            parts[name] = _credential(name, value, recording, f"{where}.{name}")
    if not parts:
        recording.note(where, "a multipart body without its parts (params): left out")
        return {}
    return {"multipart": parts}


def _secret_members(value: Any, recording: _Recording, where: str) -> Any:
    if isinstance(value, dict):
        return {
            key: _credential(
                key, _secret_members(item, recording, f"{where}.{key}"), recording, f"{where}.{key}"
            )
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_secret_members(item, recording, f"{where}[{i}]") for i, item in enumerate(value)]
    return value


def _learn(response: dict[str, Any], test: str, recording: _Recording) -> None:
    """Remember what this response gave that a later request may carry."""
    found_in_json: list[str] = []
    for path, hint, value in _json_values(_response_json(response)):
        text = str(value)
        found_in_json.append(text)
        recording.learn(text, _Source(test, {"json": path}, hint))
    for header in response.get("headers") or []:
        if not isinstance(header, dict):
            continue
        name, value = str(header.get("name", "")), str(header.get("value", ""))
        if name.lower() in _PLAIN_RESPONSE_HEADERS or len(value) < 8:
            continue
        if any(json_value in value for json_value in found_in_json):
            continue  # the body's member is the better source of the same value
        recording.learn(value, _Source(test, {"header": name}, identifier(name.lower())))
    for name, value in _set_cookies(response):
        if len(value) >= 4:
            hint = identifier(name) if name.lower() != "session" else "session_cookie"
            recording.learn(value, _Source(test, {"cookie": name}, hint))


def _response_json(response: dict[str, Any]) -> Any:
    content = response.get("content") or {}
    if "json" not in str(content.get("mimeType", "")).lower():
        return None
    text = content.get("text")
    if not isinstance(text, str):
        return None
    if content.get("encoding") == "base64":
        try:
            text = base64.b64decode(text).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def _json_values(
    document: Any, path: str = "$", parent: str = ""
) -> Iterator[tuple[str, str, Any]]:
    """(JSONPath, a capture name for it, value) of each value distinctive enough that
    finding it again in a later request is no coincidence."""
    if isinstance(document, dict):
        for key, value in document.items():
            key = str(key)
            step = (
                f"{path}.{key}"
                if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key)
                else (f"{path}['" + key.replace("\\", "\\\\").replace("'", "\\'") + "']")
            )
            yield from _json_values(value, step, key if key else parent)
    elif isinstance(document, list):
        for index, value in enumerate(document):
            yield from _json_values(value, f"{path}[{index}]", parent)
    elif _distinctive(document):
        name = identifier(parent or "value")
        if name.lower() in _GENERIC_KEYS:
            name = identifier(f"{_parent_key(path)}_{name}") if _parent_key(path) else name
        yield path, name, document


def _parent_key(path: str) -> str:
    keys = re.findall(r"\.([A-Za-z_][A-Za-z0-9_]*)", path)
    return keys[-2] if len(keys) >= 2 else ""


def _distinctive(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return abs(value) >= 100
    if isinstance(value, str):
        return 4 <= len(value) <= 4096 and (len(value) >= 8 or any(c.isdigit() for c in value))
    return False


def _set_cookies(response: dict[str, Any]) -> Iterator[tuple[str, str]]:
    cookies = response.get("cookies")
    if isinstance(cookies, list) and cookies:
        for cookie in cookies:
            if isinstance(cookie, dict) and cookie.get("name"):
                yield str(cookie["name"]), str(cookie.get("value", ""))
        return
    for header in response.get("headers") or []:
        if isinstance(header, dict) and str(header.get("name", "")).lower() == "set-cookie":
            jar: SimpleCookie = SimpleCookie()
            try:
                jar.load(str(header.get("value", "")))
            except CookieError:
                continue
            for name, morsel in jar.items():
                yield name, morsel.value
