"""``baton import postman COLLECTION``: a Postman collection (v2.1, v2.0) as a flow.

Folders become test-name prefixes and tags, collection variables ``variables:``, auth
basic, digest, oauth2 (client credentials) and awsv4 the request's ``auth:``, bearer and
apikey headers or parameters, and ``{{var}}`` Baton templates. Test scripts are read
statically, line by line (see :mod:`orchestrator.importers.scripts`): status checks become
``expect.status`` and ``pm.environment.set("x", jsonData.a)`` a capture of ``$.a``, on
which the requests that read ``{{x}}`` then depend. Every other line is listed.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from orchestrator.errors import UsageError
from orchestrator.importers import Imported, Untranslated
from orchestrator.importers.parts import (
    Secrets,
    header_value,
    identifier,
    is_credential_name,
    origin,
    relative_to,
    secure_request,
    slug,
    unique,
)
from orchestrator.importers.scripts import ScriptReading, read_test_script

_VARIABLE = re.compile(r"\{\{\s*([^{}]+?)\s*\}\}")
_LEADING_VARIABLE = re.compile(r"^\{\{\s*([^{}\s]+)\s*\}\}")
_PLACEHOLDER = "__baton_postman_{}__"


@dataclass
class _Collection:
    source: str
    secrets: Secrets = field(default_factory=Secrets)
    untranslated: list[Untranslated] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)
    """Postman variable name -> the Baton name that stands for it."""
    used: dict[str, str] = field(default_factory=dict)
    """Baton names read by templates -> the first place reading them."""

    def note(self, where: str, reason: str) -> None:
        self.untranslated.append(Untranslated(where, reason))

    def name(self, postman_name: str) -> str:
        if postman_name not in self.names:
            taken = set(self.names.values())
            self.names[postman_name] = unique(identifier(postman_name), taken)
        return self.names[postman_name]

    def template(self, text: str, where: str) -> str:
        """Postman's ``{{var}}`` as ``{{ var }}``; a dynamic ``{{$guid}}`` is listed."""

        def replace(match: re.Match[str]) -> str:
            raw = match.group(1)
            if raw.startswith("$"):
                self.note(where, f"dynamic variable {{{{{raw}}}}} has no Baton equivalent")
                return "{{ '{{" + raw + "}}' }}"
            name = self.name(raw)
            self.used.setdefault(name, where)
            return "{{ " + name + " }}"

        return _VARIABLE.sub(replace, text)


def convert(text: str, source: str) -> Imported:
    collection = _collection_document(text, source)
    state = _Collection(source)
    variables = _variables(collection.get("variable"), state)
    requests: list[tuple[list[str], dict[str, Any], str]] = []
    _walk(collection.get("item"), [], collection.get("auth"), state, requests, "item")
    _scripts_outside_requests(collection.get("event"), "collection", state)
    base_variable = _base_variable(requests)
    base_origin = _base_origin(requests) if base_variable is None else ""
    if base_origin:
        base_variable = unique("base_url", set(variables) | set(state.names.values()))
        state.names[base_variable] = base_variable
        variables[base_variable] = base_origin

    tests: dict[str, Any] = {}
    captured: dict[str, str] = {}
    for folders, item, where in requests:
        name = unique(slug("_".join([*folders, str(item.get("name", ""))])), tests)
        test = _test(item, folders, where, base_variable, base_origin, state)
        reading = read_test_script(item.get("event"), where)
        state.untranslated.extend(reading.untranslated)
        _apply_reading(test, reading, name, captured, where, state)
        tests[name] = test

    for used, where in state.used.items():
        if used not in variables and used not in captured:
            variables[used] = ""
            state.note(
                where,
                f"variable {used} is not defined in the collection (an environment's?): "
                f"give it under variables or with --var {used}=...",
            )
    info = collection.get("info") or {}
    flow: dict[str, Any] = {"name": str(info.get("name") or collection.get("name") or source)}
    if base_variable is not None:
        flow["base_url"] = "{{ " + state.name(base_variable) + " }}"
    if variables:
        flow["variables"] = variables
    flow["tests"] = tests
    if not tests:
        raise UsageError(f"{source}: item: the collection holds no request to import")
    return Imported(flow, state.untranslated, state.secrets.places)


def _collection_document(text: str, source: str) -> dict[str, Any]:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"{source}: line {exc.lineno} column {exc.colno}: not JSON ({exc.msg}); "
            "export the collection from Postman as Collection v2.1"
        ) from None
    if not isinstance(document, dict) or "item" not in document:
        raise UsageError(
            f"{source}: item: not a Postman collection (no item list); "
            "export the collection from Postman as Collection v2.1"
        )
    if not isinstance(document.get("item"), list):
        raise UsageError(f"{source}: item: a collection's item must be a list of requests")
    if "info" in document and not isinstance(document["info"], dict):
        raise UsageError(f"{source}: info: must be an object with the collection's name")
    return document


def _variables(entries: Any, state: _Collection) -> dict[str, Any]:
    variables: dict[str, Any] = {}
    for index, entry in enumerate(entries if isinstance(entries, list) else []):
        if not isinstance(entry, dict) or "key" not in entry or entry.get("disabled"):
            continue
        key, value = str(entry["key"]), entry.get("value", "")
        name = state.name(key)
        where = f"variable[{index}] {key}"
        if is_credential_name(key) and isinstance(value, str) and value and "{{" not in value:
            variables[name] = state.secrets.template(value, key, where)
        elif isinstance(value, str):
            variables[name] = state.template(value, where)
        else:
            variables[name] = value
    return variables


def _walk(
    items: Any,
    folders: list[str],
    auth: Any,
    state: _Collection,
    found: list[tuple[list[str], dict[str, Any], str]],
    where: str,
) -> None:
    for index, item in enumerate(items if isinstance(items, list) else []):
        at = f"{where}[{index}]"
        if not isinstance(item, dict):
            raise UsageError(f"{state.source}: {at}: an item must be an object")
        label = " / ".join([*folders, str(item.get("name", at))])
        inherited = _own_auth(item.get("auth"), auth)
        request = item.get("request")
        if isinstance(request, dict):
            inherited = _own_auth(request.get("auth"), inherited)
        if isinstance(item.get("item"), list):
            _scripts_outside_requests(item.get("event"), f"folder {label!r}", state)
            folder = [*folders, str(item.get("name", ""))]
            _walk(item["item"], folder, inherited, state, found, f"{at}.item")
        elif "request" in item:
            found.append((folders, {**item, "_auth": inherited}, f"{label!r} ({at})"))
        else:
            state.note(f"{label!r} ({at})", "an item with neither request nor item: left out")


def _own_auth(auth: Any, parent: Any) -> Any:
    """An item's auth, or its parent's: Postman writes an inherited one as no ``auth``,
    ``"auth": null`` or ``{"type": "inherit"}``."""
    if auth is None or (isinstance(auth, dict) and auth.get("type") == "inherit"):
        return parent
    return auth


def _scripts_outside_requests(events: Any, where: str, state: _Collection) -> None:
    """Collection and folder scripts run around every request: nothing in a flow does."""
    events = [events] if isinstance(events, dict) else events
    for event in events if isinstance(events, list) else []:
        script = event.get("script", {}) if isinstance(event, dict) else {}
        lines = script.get("exec", []) if isinstance(script, dict) else []
        lines = [lines] if isinstance(lines, str) else lines
        for number, line in enumerate(lines, 1):
            if isinstance(line, str) and line.strip() and not line.strip().startswith("//"):
                state.note(
                    f"{where} {event.get('listen', 'script')} script line {number}",
                    f"a script around every request is not translated: {line.strip()}",
                )


def _base_variable(requests: list[tuple[list[str], dict[str, Any], str]]) -> str | None:
    """The variable most URLs start with (``{{baseUrl}}``), to become the flow's base_url."""
    leading = Counter(
        match.group(1)
        for _, item, _ in requests
        if (match := _LEADING_VARIABLE.match(_raw_url(item.get("request"))))
    )
    if not leading:
        return None
    name, count = leading.most_common(1)[0]
    return name if count * 2 >= len(requests) else None


def _base_origin(requests: list[tuple[list[str], dict[str, Any], str]]) -> str:
    """The scheme and host most absolute URLs share, when no variable leads them."""
    origins = Counter(origin(_raw_url(item.get("request"))) for _, item, _ in requests)
    origins.pop("", None)
    return origins.most_common(1)[0][0] if origins else ""


def _raw_url(request: Any) -> str:
    if isinstance(request, str):
        return request
    if not isinstance(request, dict):
        return ""
    url = request.get("url", "")
    if isinstance(url, dict):
        raw = url.get("raw")
        if raw is None:  # assembled from its parts, as some exporters write it
            host = url.get("host", "")
            host = ".".join(host) if isinstance(host, list) else str(host)
            path = url.get("path", "")
            path = "/".join(map(str, path)) if isinstance(path, list) else str(path)
            protocol = url.get("protocol")
            raw = (f"{protocol}://" if protocol else "") + host + ("/" + path if path else "")
        for variable in url.get("variable") or []:
            if isinstance(variable, dict) and variable.get("key"):
                value = str(variable.get("value", "") or "{{" + variable["key"] + "}}")
                raw = re.sub(rf":{re.escape(variable['key'])}(?=/|$|\?)", value, str(raw))
        return str(raw)
    return str(url)


def _test(
    item: dict[str, Any],
    folders: list[str],
    where: str,
    base_variable: str | None,
    base_origin: str,
    state: _Collection,
) -> dict[str, Any]:
    raw = item.get("request")
    request_spec: dict[str, Any] = raw if isinstance(raw, dict) else {"url": raw}
    url = _raw_url(request_spec)
    if base_variable is not None:
        match = _LEADING_VARIABLE.match(url)
        if match and match.group(1) == base_variable:
            url = url[match.end() :] or "/"
            url = url if url.startswith("/") else "/" + url
    if base_origin:
        url = relative_to(base_origin, url)
    request: dict[str, Any] = {}
    method = str(request_spec.get("method") or "GET").upper()
    if method != "GET":
        request["method"] = method
    request["url"] = state.template(url, f"{where} url")
    headers: dict[str, str] = {}
    for index, header in enumerate(request_spec.get("header") or []):
        if not isinstance(header, dict) or header.get("disabled") or not header.get("key"):
            continue
        key = str(header["key"])
        at = f"{where} header[{index}] {key}"
        value = header_value(key, str(header.get("value", "")), state.secrets, at)
        headers[key] = state.template(value, at)
    params: dict[str, str] = {}
    auth = _auth(item.get("_auth"), headers, params, where, state)
    if params:
        request["params"] = params
    if headers:
        request["headers"] = headers
    if auth is not None:
        request["auth"] = auth
    request.update(_body(request_spec.get("body"), headers, where, state))
    secure_request(request, state.secrets, where)
    test: dict[str, Any] = {"request": request}
    if folders:
        test["tags"] = [slug(folder, "folder") for folder in folders]
    description = item.get("request", {}).get("description") if isinstance(raw, dict) else None
    if isinstance(description, str) and description.strip():
        test["description"] = description.strip()
    return test


def _auth(
    auth: Any, headers: dict[str, str], params: dict[str, str], where: str, state: _Collection
) -> dict[str, Any] | None:
    """The request's ``auth:`` (basic, digest, oauth2, awsv4), or the header or parameter
    a bearer token or an API key is sent in."""
    if not isinstance(auth, dict) or auth.get("type") in (None, "noauth"):
        return None
    kind = str(auth["type"])
    fields = auth.get(kind)
    values: dict[str, str] = {}
    if isinstance(fields, list):
        values = {str(f.get("key")): str(f.get("value", "")) for f in fields if isinstance(f, dict)}
    elif isinstance(fields, dict):
        values = {str(key): str(value) for key, value in fields.items()}
    at = f"{where} auth {kind}"
    if kind == "bearer":
        token = values.get("token", "")
        headers["Authorization"] = "Bearer " + _credential(token, "token", at, state)
    elif kind in ("basic", "digest"):
        return {
            kind: {
                "username": state.template(values.get("username", ""), at),
                "password": _credential(values.get("password", ""), "password", at, state),
            }
        }
    elif kind == "oauth2":
        return _oauth2(values, headers, at, state)
    elif kind == "awsv4":
        settings = {
            "access_key_id": _credential(
                values.get("accessKey", ""), "aws_access_key_id", at, state
            ),
            "secret_access_key": _credential(
                values.get("secretKey", ""), "aws_secret_access_key", at, state
            ),
            "region": state.template(values.get("region") or "us-east-1", at),
            "service": state.template(values.get("service") or "execute-api", at),
        }
        for field, default in (("region", "us-east-1"), ("service", "execute-api")):
            if not values.get(field):
                state.note(at, f"no {field}: {default} is written, check it")
        if values.get("sessionToken"):
            settings["session_token"] = _credential(
                values["sessionToken"], "aws_session_token", at, state
            )
        return {"aws_sigv4": settings}
    elif kind == "apikey":
        key, value = values.get("key", "X-Api-Key"), values.get("value", "")
        credential = _credential(value, key, at, state)
        if values.get("in") == "query":
            params[key] = credential
        else:
            headers[key] = credential
    else:
        state.note(at, f"{kind} auth is not translated: give its header in the request")
    return None


def _oauth2(
    values: dict[str, str], headers: dict[str, str], at: str, state: _Collection
) -> dict[str, Any] | None:
    """The client credentials grant as ``auth: {oauth2: ...}``; any other grant needs a
    user at a browser, so the token it got (``accessToken``) is sent as a bearer secret."""
    grant = values.get("grant_type", "authorization_code")
    if grant != "client_credentials" or not values.get("accessTokenUrl"):
        state.note(
            at,
            f"the {grant} grant is not run by Baton: the access token obtained in Postman "
            "is sent as a bearer token",
        )
        token = values.get("accessToken", "")
        # no token saved in the export: the secret is named, never found
        token = token or f"\0oauth2 token at {at}"
        headers["Authorization"] = "Bearer " + _credential(token, "token", at, state)
        return None
    settings: dict[str, Any] = {
        "token_url": state.template(values["accessTokenUrl"], at),
        "client_id": state.template(values.get("clientId", ""), at),
        "client_secret": _credential(values.get("clientSecret", ""), "client_secret", at, state),
    }
    if values.get("scope"):
        settings["scope"] = state.template(values["scope"], at)
    if values.get("audience"):
        settings["audience"] = state.template(values["audience"], at)
    if values.get("client_authentication") == "body":
        settings["client_auth"] = "body"
    return {"oauth2": settings}


def _credential(value: str, hint: str, where: str, state: _Collection) -> str:
    """A template reading the collection's variable, else the value itself as a secret."""
    if "{{" in value:
        return state.template(value, where)
    return state.secrets.template(value, hint, where)


def _body(body: Any, headers: dict[str, str], where: str, state: _Collection) -> dict[str, Any]:
    if not isinstance(body, dict) or not body.get("mode") or body.get("disabled"):
        return {}
    mode, at = str(body["mode"]), f"{where} body"
    if mode == "raw":
        raw = str(body.get("raw", ""))
        if not raw:
            return {}
        language = body.get("options", {}).get("raw", {}).get("language", "")
        content_type = next((v for k, v in headers.items() if k.lower() == "content-type"), "")
        if language == "json" or "json" in content_type.lower():
            parsed = _json_with_variables(raw, at, state)
            if parsed is not None:
                return {"json": parsed}
        return {"body": state.template(raw, at)}
    if mode in ("urlencoded", "formdata"):
        fields: dict[str, Any] = {}
        for index, entry in enumerate(body.get(mode) or []):
            if not isinstance(entry, dict) or entry.get("disabled") or not entry.get("key"):
                continue
            key, place = str(entry["key"]), f"{at} {mode}[{index}] {entry['key']}"
            if entry.get("type") == "file" and mode == "formdata":
                source = entry.get("src")
                if isinstance(source, list):
                    # a flow's field holds one file; Postman's may hold several
                    for other in source[1:]:
                        state.note(place, f"a second file in one field is not sent: {other}")
                    source = source[0] if source else None
                if not isinstance(source, str) or not source:
                    state.note(place, "a file field without a file: left out")
                    continue
                fields[key] = {"file": source}
                if entry.get("contentType"):
                    fields[key]["content_type"] = str(entry["contentType"])
                state.note(place, f"the file {source} is read relative to the flow file")
                continue
            value = str(entry.get("value", ""))
            if is_credential_name(key) and value and "{{" not in value:
                fields[key] = state.secrets.template(value, key, place)
            else:
                fields[key] = state.template(value, place)
        if not fields:
            return {}
        return {"multipart": fields} if mode == "formdata" else {"form": fields}
    if mode == "graphql":
        graphql = body.get("graphql") or {}
        payload: dict[str, Any] = {"query": state.template(str(graphql.get("query", "")), at)}
        if graphql.get("variables"):
            variables = _json_with_variables(str(graphql["variables"]), at, state)
            if isinstance(variables, dict):
                payload["variables"] = variables
            else:
                state.note(at, "GraphQL variables that are not a JSON object: left out")
        return {"graphql": payload}
    state.note(at, f"a {mode} body is not translated")
    return {}


def _json_with_variables(raw: str, where: str, state: _Collection) -> Any:
    """A raw JSON body that may hold ``{{var}}`` inside strings or as bare values: the
    parsed value with each variable a template (a bare one keeps the value's type)."""
    found: list[str] = []

    def hold(match: re.Match[str]) -> str:
        found.append(match.group(0))
        return _PLACEHOLDER.format(len(found) - 1)

    held = _VARIABLE.sub(hold, raw)
    for text in (held, re.sub(r'(?<!")(__baton_postman_\d+__)(?!")', r'"\1"', held)):
        try:
            parsed = json.loads(text)
        except ValueError:
            continue
        return _restore(parsed, found, where, state)
    state.note(where, "the raw JSON body does not parse: sent as text")
    return None


def _restore(value: Any, found: list[str], where: str, state: _Collection) -> Any:
    if isinstance(value, str):
        for index, original in enumerate(found):
            value = value.replace(_PLACEHOLDER.format(index), original)
        return state.template(value, where)
    if isinstance(value, dict):
        return {
            _restore(key, found, where, state): _restore(item, found, where, state)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_restore(item, found, where, state) for item in value]
    return value


def _apply_reading(
    test: dict[str, Any],
    reading: ScriptReading,
    name: str,
    captured: dict[str, str],
    where: str,
    state: _Collection,
) -> None:
    expect: dict[str, Any] = {}
    if reading.statuses:
        statuses = list(dict.fromkeys(reading.statuses))
        expect["status"] = statuses[0] if len(statuses) == 1 else statuses
    if reading.json_checks:
        expect["json"] = reading.json_checks
    if expect:
        test["expect"] = expect
    captures: dict[str, Any] = {}
    for variable, capture in reading.captures.items():
        baton_name = state.name(variable)
        if baton_name in captured:
            state.note(
                where,
                f"{variable} is set again here; Baton captures a name in one test only "
                f"(it is captured by {captured[baton_name]})",
            )
            continue
        captured[baton_name] = name
        captures[baton_name] = capture
    if captures:
        test["capture"] = captures
