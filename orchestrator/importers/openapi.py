"""``baton import openapi SPEC``: one test per operation of an OpenAPI 3.0 or 3.1 document.

Each test sends the operation's request (parameters and body from the document's
examples, else made from the schemas), expects the first documented success status and
checks the body against that response's schema. Links become captures on the linking
test and template references in the linked one, so the planner orders the two; a link
that sets a security scheme's credential (``header.Authorization``) makes every test
under that scheme use the captured token. What the flow cannot carry (callbacks,
webhooks, cookie parameters, XML bodies, references to other files) is reported with its
place in the document, never dropped silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import msgspec
import networkx as nx

from orchestrator.errors import UsageError
from orchestrator.importers import Imported
from orchestrator.importers.openapi_schemas import (
    Bundler,
    Document,
    Sampler,
    json_path,
    pointer_parts,
)
from orchestrator.loader import MAX_DEPTH, decode_yaml

METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_PATH_NAME = re.compile(r"{([^{}/]+)}")
_EMBEDDED = re.compile(r"{(\$[^{}]+)}")
_TEMPLATE_NAME = re.compile(r"^{{ ([A-Za-z_][\w.]*) }}$")
# OpenAPI ignores header parameters of these names; the flow sets them itself
_IGNORED_HEADERS = frozenset({"accept", "content-type", "authorization"})
_JINJA_RESERVED = frozenset(
    {"and", "or", "not", "in", "is", "if", "else", "true", "false", "none", "env", "secrets"}
    | {"poll", "auth", "loop", "self", "True", "False", "None"}
)


def convert(text: str, source: str) -> Imported:
    data, version = _parse(text, source)
    return _Importer(data, version, source).run()


def _parse(text: str, source: str) -> tuple[dict[str, Any], str]:
    if text.lstrip().startswith("{"):
        try:
            data = msgspec.json.decode(text)
        except msgspec.DecodeError as exc:
            raise UsageError(f"{source}: not valid JSON: {exc}") from None
        except RecursionError:
            data = None  # deeper than any limit: refused just below
        # the bound YAML documents are held to (decode_yaml), so that walking the document
        # and writing the flow cannot exhaust the stack
        if data is None or _depth(data) > MAX_DEPTH:
            raise UsageError(f"{source}: values are nested more than {MAX_DEPTH} levels deep")
    else:
        data = decode_yaml(text.encode("utf-8"), source)
    if not isinstance(data, dict):
        raise UsageError(
            f"{source}: not an OpenAPI document (it must be a mapping with an 'openapi' field)"
        )
    if "swagger" in data:
        raise UsageError(
            f"{source}: swagger: {data['swagger']}: Swagger 2.0 is not imported "
            "(convert it to OpenAPI 3 first, for example with swagger2openapi)"
        )
    version = str(data.get("openapi", ""))
    if not re.match(r"^3\.[01](\.|$)", version):
        found = f"{version!r}" if version else "missing"
        raise UsageError(
            f"{source}: openapi: {found}: not an OpenAPI 3.0 or 3.1 document "
            "(its first line should be 'openapi: 3.0.x' or 'openapi: 3.1.x')"
        )
    paths = data.get("paths") or {}
    if not isinstance(paths, dict):
        raise UsageError(f"{source}: paths: must be a mapping of paths to their operations")
    if not any(isinstance(item, dict) and set(item) & set(METHODS) for item in paths.values()):
        raise UsageError(f"{source}: paths: no operation to import (add one under paths)")
    return data, version[:3]


def _depth(data: Any) -> int:
    deepest, stack = 0, [(data, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth <= MAX_DEPTH:
            children = node.values() if isinstance(node, dict) else node
            if isinstance(node, dict | list):
                stack.extend((child, depth + 1) for child in children)
    return deepest


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


def _is_json(media_type: str) -> bool:
    base = media_type.split(";")[0].strip().lower()
    return base == "application/json" or base.endswith("+json") or base == "*/*"


def _is_form(media_type: str) -> bool:
    return media_type.split(";")[0].strip().lower() == "application/x-www-form-urlencoded"


@dataclass
class _Draft:
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
    expect: dict[str, Any] = field(default_factory=dict)
    capture: dict[str, dict[str, Any]] = field(default_factory=dict)
    depends_on: list[str] = field(default_factory=list)
    linked: dict[str, str] = field(default_factory=dict)  # "in.name" -> the link's place
    response: dict[str, Any] = field(default_factory=dict)
    response_where: str = ""


@dataclass(frozen=True)
class _Credential:
    scheme: str
    location: str  # header | query
    key: str
    prefix: str  # "Bearer " or ""
    secret: str


class _Importer:
    def __init__(self, data: dict[str, Any], version: str, source: str) -> None:
        self.data = data
        self.version = version
        self.source = source
        self.document = Document(data, version)
        self.sampler = Sampler(self.document)
        self.drafts: dict[str, _Draft] = {}
        self.by_id: dict[str, _Draft] = {}
        self.by_place: dict[tuple[str, str], _Draft] = {}
        self.variables: dict[str, Any] = {}
        self.placeholders: set[str] = set()  # variables whose value is made up
        self.credentials: dict[str, _Credential | None] = {}
        self.tokens: dict[str, tuple[str, str]] = {}  # scheme -> (source test, template)
        self.capture_owner: dict[str, str] = {}  # capture name -> test
        self.capture_names: dict[tuple[str, str], str] = {}  # (test, encoded spec) -> name
        self.graph: nx.DiGraph[str] = nx.DiGraph()  # test -> the tests that wait for it

    def report(self, where: str, reason: str) -> None:
        self.document.report(where, reason)

    def run(self) -> Imported:
        base_url = self._base_url()
        for path, raw_item in (self.data.get("paths") or {}).items():
            item = self.document.resolve(raw_item, f"paths.{path}")
            if not isinstance(item, dict):
                continue
            if item.get("servers"):
                self.report(
                    f"paths.{path}.servers", "path servers are not used: tests use base_url"
                )
            for method in METHODS:
                if isinstance(item.get(method), dict):
                    self._add_draft(str(path), method, item, item[method])
        for name in _mapping(self.data.get("webhooks")):
            self.report(
                f"webhooks.{name}",
                "a webhook is a request the API sends, not one a flow sends: not translated",
            )
        self._links()
        self._deletes_last()
        tests = {name: self._test(draft) for name, draft in self.drafts.items()}
        secret_schemes = self._secret_schemes(tests)
        flow: dict[str, Any] = {"name": self._title()}
        flow["description"] = self._description(secret_schemes)
        flow["base_url"] = base_url
        used = self._used_variables(tests)
        if used:
            flow["variables"] = {name: self.variables[name] for name in used}
        flow["tests"] = tests
        self._report_placeholders()
        for scheme in secret_schemes:
            credential = self.credentials[scheme]
            assert credential is not None
            self.report(
                f"components.securitySchemes.{scheme}",
                f"needs a value: the credential is read from secrets.{credential.secret} "
                "(an environment variable or --secrets FILE)",
            )
        return Imported(flow, list(self.document.untranslated))

    # -- the flow's frame

    def _title(self) -> str:
        info = _mapping(self.data.get("info"))
        return str(info.get("title") or self.source)

    def _description(self, secret_schemes: list[str]) -> str:
        info = _mapping(self.data.get("info"))
        version = f" {info['version']}" if info.get("version") else ""
        text = f"Imported from {self.source} (OpenAPI {self.data['openapi']}, API{version})."
        listed = [
            f"{c.scheme} from secrets.{c.secret} ({c.location} {c.key})"
            for c in map(self.credentials.__getitem__, secret_schemes)
            if c is not None
        ]
        listed += [
            f"{scheme} from the capture of test {test}" for scheme, (test, _) in self.tokens.items()
        ]
        if listed:
            text += f" Credentials: {', '.join(listed)}."
        return text

    def _base_url(self) -> str:
        servers = self.data.get("servers")
        default = "http://localhost"
        if isinstance(servers, list) and servers and isinstance(servers[0], dict):
            url = self._server_url(servers[0])
            if len(servers) > 1:
                self.report(
                    "servers", f"only servers.0 ({url}) is used: set BASE_URL for another server"
                )
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", url):
                default = url
            else:
                self.report(
                    "servers.0.url",
                    f"a relative URL ({url}): set BASE_URL to the server's full URL",
                )
                default = default + ("" if url.startswith("/") else "/") + url
        else:
            self.report("servers", "no server given: set BASE_URL to the API's URL")
        quoted = default.rstrip("/").replace("\\", "\\\\").replace("'", "\\'")
        return "{{ env.BASE_URL | default('" + quoted + "') }}"

    def _server_url(self, server: dict[str, Any]) -> str:
        url = str(server.get("url", "/"))
        variables = _mapping(server.get("variables"))

        def expand(match: re.Match[str]) -> str:
            variable = variables.get(match.group(1))
            if isinstance(variable, dict) and "default" in variable:
                return str(variable["default"])
            self.report(
                f"servers.0.variables.{match.group(1)}", "a server variable without a default"
            )
            return match.group(0)

        return _PATH_NAME.sub(expand, url)

    # -- operations

    def _add_draft(
        self, path: str, method: str, item: dict[str, Any], operation: dict[str, Any]
    ) -> None:
        where = f"paths.{path}.{method}"
        operation_id = operation.get("operationId")
        base = identifier(str(operation_id) if operation_id else f"{method}_{path}")
        name, number = base, 2
        while name in self.drafts:
            name, number = f"{base}_{number}", number + 1
        draft = _Draft(name, method, path, where, operation)
        self.drafts[name] = draft
        if isinstance(operation_id, str):
            self.by_id[operation_id] = draft
        self.by_place[(path, method)] = draft
        for parameter, place in self._parameters(item, operation, where, path):
            self._parameter(draft, parameter, place)
        for missing in _PATH_NAME.findall(path):
            if missing not in draft.path_values:
                self.report(where, f"path parameter {missing!r} is not declared")
                variable = self._variable(missing, missing, False, where)
                draft.path_values[missing] = "{{ " + variable + " }}"
                draft.variable_places[missing] = (variable, where)
        self._request_body(draft)
        self._security(draft)
        self._response(draft)
        for callback in _mapping(operation.get("callbacks")):
            self.report(
                f"{where}.callbacks.{callback}",
                "a callback is a request the API sends, not one a flow sends: not translated",
            )
        if operation.get("servers"):
            self.report(f"{where}.servers", "operation servers are not used: tests use base_url")

    def _parameters(
        self, item: dict[str, Any], operation: dict[str, Any], where: str, path: str
    ) -> list[tuple[dict[str, Any], str]]:
        found: dict[tuple[str, str], tuple[dict[str, Any], str]] = {}
        for owner, owner_where in ((item, f"paths.{path}"), (operation, where)):
            for index, raw in enumerate(_sequence(owner.get("parameters"))):
                place = f"{owner_where}.parameters.{index}"
                parameter = self.document.resolve(raw, place)
                if isinstance(parameter, dict):
                    key = (str(parameter.get("name")), str(parameter.get("in")))
                    found[key] = (parameter, place)  # the operation's own wins
        return list(found.values())

    def _parameter(self, draft: _Draft, parameter: dict[str, Any], where: str) -> None:
        name, location = parameter.get("name"), parameter.get("in")
        if not isinstance(name, str) or location not in ("path", "query", "header", "cookie"):
            self.report(where, "a parameter without a name or a valid 'in': not translated")
            return
        draft.declared[name] = location
        if location == "cookie":
            self.report(where, f"cookie parameter {name!r} is not sent (set a Cookie header)")
            return
        if location == "header" and name.lower() in _IGNORED_HEADERS:
            return
        value, documented = self._parameter_value(parameter, where)
        if location == "path":
            variable = self._variable(name, value, documented, where)
            draft.path_values[name] = "{{ " + variable + " }}"
            draft.variable_places[name] = (variable, where)
            return
        if not documented and not parameter.get("required"):
            return  # an optional parameter with no value given: not sent
        if isinstance(value, dict) or (
            isinstance(value, list) and any(isinstance(v, dict | list) for v in value)
        ):
            self.report(where, f"{location} parameter {name!r} holds an object: not translated")
            return
        if not documented:
            self.report(
                where, f"needs a value: required {location} parameter {name!r} is sent as {value!r}"
            )
        if location == "query":
            draft.params[name] = literal(value)
        else:
            draft.headers[name] = literal(_text(value))

    def _parameter_value(self, parameter: dict[str, Any], where: str) -> tuple[Any, bool]:
        if "example" in parameter:
            return parameter["example"], True
        examples = parameter.get("examples")
        if isinstance(examples, dict) and examples:
            first, example = next(iter(examples.items()))
            resolved = self.document.resolve(example, f"{where}.examples.{first}")
            if isinstance(resolved, dict) and "value" in resolved:
                return resolved["value"], True
        schema = parameter.get("schema")
        if schema is None and "content" in parameter:
            self.report(f"{where}.content", "a parameter described by content: give its value")
        value = self.sampler.sample(schema)
        return ("value" if value is None else value), self.sampler.documented(schema)

    def _variable(self, name: str, value: Any, documented: bool, where: str) -> str:
        variable = identifier(name)
        if variable not in self.variables or (variable in self.placeholders and documented):
            self.variables[variable] = literal(value)
            self.placeholders.discard(variable)
            if not documented:
                self.placeholders.add(variable)
        return variable

    def _report_placeholders(self) -> None:
        """Each made-up variable at the first parameter that still reads it (a link may have
        given the others their values)."""
        reported: set[str] = set()
        for draft in self.drafts.values():
            for name, (variable, where) in draft.variable_places.items():
                still = draft.path_values.get(name) == "{{ " + variable + " }}"
                if still and variable in self.placeholders and variable not in reported:
                    reported.add(variable)
                    self.report(
                        where,
                        f"needs a value: variables.{variable} is a placeholder "
                        f"({self.variables[variable]!r}); set it with --var {variable}=VALUE",
                    )

    def _request_body(self, draft: _Draft) -> None:
        if "requestBody" not in draft.operation:
            return
        where = f"{draft.where}.requestBody"
        body = self.document.resolve(draft.operation["requestBody"], where)
        content = body.get("content") if isinstance(body, dict) else None
        if not isinstance(content, dict) or not content:
            return
        chosen = next((t for t in content if _is_json(t)), None)
        chosen = chosen or next((t for t in content if _is_form(t)), None)
        if chosen is None:
            self.report(
                f"{where}.content", f"no JSON or form body ({', '.join(content)}): none is sent"
            )
            return
        others = [t for t in content if t != chosen]
        if others:
            self.report(f"{where}.content", f"sent as {chosen}; {', '.join(others)} not translated")
        media = content[chosen] if isinstance(content[chosen], dict) else {}
        value = self._media_example(media, f"{where}.content.{chosen}")
        if _is_json(chosen):
            draft.body = ("json", literal(value))
            return
        if not isinstance(value, dict):
            self.report(f"{where}.content.{chosen}", "a form body that is not an object: none sent")
            return
        form: dict[str, str] = {}
        for key, item in value.items():
            if isinstance(item, dict | list):
                self.report(
                    f"{where}.content.{chosen}.schema.properties.{key}",
                    "a form field that is not a scalar: sent as JSON text",
                )
            form[str(key)] = _text(item)
        draft.body = ("form", literal(form))

    def _media_example(self, media: dict[str, Any], where: str) -> Any:
        if "example" in media:
            return media["example"]
        examples = media.get("examples")
        if isinstance(examples, dict) and examples:
            first, example = next(iter(examples.items()))
            resolved = self.document.resolve(example, f"{where}.examples.{first}")
            if isinstance(resolved, dict) and "value" in resolved:
                return resolved["value"]
            if isinstance(resolved, dict) and "externalValue" in resolved:
                self.report(
                    f"{where}.examples.{first}.externalValue",
                    "an example in another file is not read: a body is made from the schema",
                )
        return self.sampler.sample(media.get("schema"))

    def _security(self, draft: _Draft) -> None:
        own = "security" in draft.operation
        requirements = draft.operation["security"] if own else self.data.get("security")
        where = f"{draft.where}.security" if own else "security"
        if not isinstance(requirements, list) or not requirements:
            return
        for requirement in requirements:
            if not isinstance(requirement, dict):
                continue
            credentials = [self._credential(str(name)) for name in requirement]
            if all(credentials):
                draft.schemes = [str(name) for name in requirement]
                return
        self.report(where, "no security requirement could be translated: no credentials sent")

    def _credential(self, scheme: str) -> _Credential | None:
        if scheme in self.credentials:
            return self.credentials[scheme]
        where = f"components.securitySchemes.{scheme}"
        schemes = _mapping(_mapping(self.data.get("components")).get("securitySchemes"))
        spec = self.document.resolve(schemes.get(scheme), where) if scheme in schemes else None
        secret = identifier(re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", scheme)).upper()
        credential: _Credential | None = None
        kind = spec.get("type") if isinstance(spec, dict) else None
        if spec is None:
            self.report(where, "the security scheme is not defined: no credentials sent")
        elif kind == "http" and str(spec.get("scheme", "")).lower() in ("bearer", "basic"):
            prefix = "Bearer " if str(spec["scheme"]).lower() == "bearer" else "Basic "
            credential = _Credential(scheme, "header", "Authorization", prefix, secret)
        elif kind in ("oauth2", "openIdConnect"):
            # the flow cannot run an OAuth2 flow: it sends an access token obtained elsewhere
            credential = _Credential(scheme, "header", "Authorization", "Bearer ", secret)
        elif kind == "apiKey" and spec.get("in") in ("header", "query") and spec.get("name"):
            credential = _Credential(scheme, str(spec["in"]), str(spec["name"]), "", secret)
        else:
            detail = {"http": "scheme", "apiKey": "in"}.get(str(kind), "")
            shown = f"{kind} {spec.get(detail)}" if detail else f"{kind}"
            self.report(where, f"a security scheme of type {shown} is not translated")
        self.credentials[scheme] = credential
        return credential

    def _response(self, draft: _Draft) -> None:
        responses = draft.operation.get("responses")
        where = f"{draft.where}.responses"
        if not isinstance(responses, dict) or not responses:
            self.report(where, "no documented response: the test checks no status")
            return
        keys = {str(key): key for key in responses}
        code = _expected_code(list(keys))
        draft.response_where = f"{where}.{code}"
        response = self.document.resolve(responses[keys[code]], draft.response_where)
        draft.response = response if isinstance(response, dict) else {}
        if code.isdigit():
            draft.expect["status"] = int(code)
        else:
            draft.expect["status"] = code.lower() if re.match(r"^[1-5]XX$", code, re.I) else "2xx"
        content = draft.response.get("content")
        if not isinstance(content, dict) or not content:
            return
        chosen = next((t for t in content if _is_json(t)), None)
        if chosen is None:
            self.report(
                f"{draft.response_where}.content",
                f"no JSON response body ({', '.join(content)}): its schema is not checked",
            )
            return
        if len(content) > 1:
            draft.headers.setdefault("Accept", chosen)
        media = content[chosen] if isinstance(content[chosen], dict) else {}
        if "schema" in media:
            place = f"{draft.response_where}.content.{chosen}.schema"
            draft.expect["schema"] = literal(Bundler(self.document).bundle(media["schema"], place))

    # -- links

    def _links(self) -> None:
        graph = self.graph
        graph.add_nodes_from(self.drafts)
        for draft in list(self.drafts.values()):
            links = draft.response.get("links")
            for link_name, raw in (links if isinstance(links, dict) else {}).items():
                where = f"{draft.response_where}.links.{link_name}"
                link = self.document.resolve(raw, where)
                target = self._link_target(link, where) if isinstance(link, dict) else None
                if target is None or not isinstance(link, dict):
                    continue
                if target is draft or nx.has_path(graph, target.name, draft.name):
                    self.report(
                        where,
                        f"the link from {draft.name} to {target.name} would make a dependency "
                        "cycle: not translated",
                    )
                    continue
                if link.get("server"):
                    self.report(
                        f"{where}.server", "a link's server is not used: tests use base_url"
                    )
                carried = False
                for key, expression in _mapping(link.get("parameters")).items():
                    place = f"{where}.parameters.{key}"
                    carried |= self._link_parameter(draft, target, str(key), expression, place)
                if "requestBody" in link:
                    value = self._expression(draft, link["requestBody"], f"{where}.requestBody")
                    if value is not None:
                        kind = target.body[0] if target.body else "json"
                        target.body, carried = (kind, value), True
                graph.add_edge(draft.name, target.name)
                if not carried and draft.name not in target.depends_on:
                    target.depends_on.append(draft.name)  # the order the link states

    def _deletes_last(self) -> None:
        """A DELETE waits for the other tests of its resource and the resources under it:
        the planner runs independent tests at once, and a pet deleted before it is read
        would fail the read against a real server."""
        for delete in self.drafts.values():
            if delete.method != "delete":
                continue
            for other in self.drafts.values():
                under = other.path == delete.path or other.path.startswith(delete.path + "/")
                if other.method == "delete" or not under:
                    continue
                if not nx.has_path(self.graph, delete.name, other.name):
                    self.graph.add_edge(other.name, delete.name)
                    delete.depends_on.append(other.name)

    def _link_target(self, link: dict[str, Any], where: str) -> _Draft | None:
        if isinstance(link.get("operationId"), str):
            target = self.by_id.get(link["operationId"])
            if target is None:
                self.report(f"{where}.operationId", f"no operation {link['operationId']!r}")
            return target
        ref = link.get("operationRef")
        parts = pointer_parts(ref) if isinstance(ref, str) else None
        if parts is None or len(parts) != 3 or parts[0] != "paths":
            self.report(where, "a link's operationRef outside this document: not translated")
            return None
        target = self.by_place.get((parts[1], parts[2]))
        if target is None:
            self.report(f"{where}.operationRef", f"no operation at {ref}")
        return target

    def _link_parameter(
        self, source: _Draft, target: _Draft, key: str, expression: Any, where: str
    ) -> bool:
        location, _, name = key.partition(".") if "." in key else ("", "", key)
        if location not in ("", "path", "query", "header", "cookie"):
            location, name = "", key
        location = location or target.declared.get(name, "")
        credential = self._credential_at(target, location, name)
        if credential is not None:
            return self._link_token(source, credential, expression, where)
        if location == "cookie":
            self.report(where, f"cookie parameter {name!r} is not sent: not translated")
            return False
        if location not in ("path", "query", "header"):
            self.report(where, f"names no parameter of {target.name}: not translated")
            return False
        slot = f"{location}.{name}"
        if slot in target.linked:
            self.report(where, f"{target.name}'s {slot} comes from {target.linked[slot]} already")
            return False
        value = self._expression(source, expression, where, name)
        if value is None:
            return False
        target.linked[slot] = where
        if location == "path":
            target.path_values[name] = value
        elif location == "query":
            target.params[name] = value
        else:
            target.headers[name] = _text(value)
        return True

    def _credential_at(self, target: _Draft, location: str, name: str) -> _Credential | None:
        for scheme in target.schemes:
            credential = self.credentials.get(scheme)
            if credential is None:
                continue
            same_name = credential.key.lower() == name.lower()
            if same_name and location in ("", credential.location):
                return credential
        return None

    def _link_token(
        self, source: _Draft, credential: _Credential, expression: Any, where: str
    ) -> bool:
        if credential.scheme in self.tokens:
            self.report(where, f"the {credential.scheme} credential comes from another link")
            return False
        if isinstance(expression, str) and credential.prefix:
            # "Bearer {$response.body#/access_token}": the flow adds the prefix itself
            prefix = credential.prefix.strip()
            expression = re.sub(rf"^{prefix}\s+", "", expression, flags=re.I)
        if isinstance(expression, str) and _EMBEDDED.fullmatch(expression):
            expression = expression[1:-1]
        name = "auth." + identifier(credential.scheme)
        value = self._expression(source, expression, where, capture_as=name)
        if value is None:
            return False
        self.tokens[credential.scheme] = (source.name, _text(value))
        return True

    def _expression(
        self, source: _Draft, expression: Any, where: str, hint: str = "value", capture_as: str = ""
    ) -> Any:
        """A link's value as a flow value: a constant, or templates of captures taken from
        the source's response (or of the source's own request values)."""
        if isinstance(expression, dict):
            # a body of values each of which may be an expression: common, if beyond the letter
            # of the specification (which allows one expression or a constant)
            fields = {k: self._expression(source, v, where, str(k)) for k, v in expression.items()}
            if None in fields.values():
                return None
            return {literal(str(k)): v for k, v in fields.items()}
        if isinstance(expression, list):
            items = [self._expression(source, item, where, hint) for item in expression]
            return None if None in items else items
        if not isinstance(expression, str):
            return literal(expression)
        if expression.startswith("$"):
            return self._runtime(source, expression, where, hint, capture_as)
        parts: list[str] = []
        position = 0
        for match in _EMBEDDED.finditer(expression):
            value = self._runtime(source, match.group(1), where, hint, capture_as)
            if value is None:
                return None
            parts += [literal(expression[position : match.start()]), _text(value)]
            position = match.end()
        return "".join(parts) + literal(expression[position:]) if parts else literal(expression)

    def _runtime(
        self, source: _Draft, expression: str, where: str, hint: str, capture_as: str
    ) -> Any:
        spec: dict[str, Any] | None = None
        if expression == "$statusCode":
            spec = {"status": True}
        elif expression.startswith("$response.body"):
            pointer = expression[len("$response.body") :]
            path = json_path(pointer[1:]) if pointer.startswith("#") else None
            path = "$" if pointer == "" else path
            spec = {"json": path} if path else None
        elif expression.startswith("$response.header."):
            spec = {"header": expression[len("$response.header.") :]}
        elif expression.startswith("$request."):
            return self._request_value(source, expression[len("$request.") :], where)
        if spec is None:
            self.report(where, f"the runtime expression {expression!r} is not translated")
            return None
        return (
            "{{ "
            + self._capture(source, spec, capture_as or f"{source.name}.{identifier(hint)}")
            + " }}"
        )

    def _request_value(self, source: _Draft, what: str, where: str) -> Any:
        if (what == "body" or what.startswith("body#")) and source.body is not None:
            pointer = what[len("body#") :] if what.startswith("body#") else ""
            found = Document({"body": source.body[1]}, self.version).lookup("#/body" + pointer)
            if found is not None:
                return found[0]
        location, _, name = what.partition(".")
        values = {"path": source.path_values, "query": source.params, "header": source.headers}
        if location in values and name in values[location]:
            return values[location][name]
        self.report(where, f"$request.{what}: the linking test sends no such value")
        return None

    def _capture(self, source: _Draft, spec: dict[str, Any], wanted: str) -> str:
        key = (source.name, msgspec.json.encode(spec).decode())
        if key in self.capture_names:
            return self.capture_names[key]
        name, number = wanted, 2
        while name in self.capture_owner or name in self.variables:
            name, number = f"{wanted}_{number}", number + 1
        self.capture_owner[name] = source.name
        self.capture_names[key] = name
        source.capture[name] = spec
        return name

    # -- assembling the tests

    def _test(self, draft: _Draft) -> dict[str, Any]:
        def fill(match: re.Match[str]) -> str:
            value = draft.path_values.get(match.group(1))
            if value is None:
                return match.group(0)
            text = _text(value)
            return text if "{{" in text or "{%" in text else quote(text, safe="")

        request: dict[str, Any] = {"method": draft.method.upper()}
        request["url"] = _PATH_NAME.sub(fill, draft.path)
        params, headers = dict(draft.params), dict(draft.headers)
        for scheme in draft.schemes:
            credential = self.credentials[scheme]
            assert credential is not None
            token = self.tokens.get(scheme)
            if token is not None and token[0] != draft.name:
                value = credential.prefix + token[1]
            else:
                value = credential.prefix + "{{ secrets." + credential.secret + " }}"
            (headers if credential.location == "header" else params)[credential.key] = value
        if params:
            request["params"] = params
        if headers:
            request["headers"] = headers
        if draft.body is not None:
            request[draft.body[0]] = draft.body[1]
        test: dict[str, Any] = {}
        summary = draft.operation.get("summary") or draft.operation.get("description")
        if isinstance(summary, str) and summary.strip():
            test["description"] = literal(summary.strip())
        tags = draft.operation.get("tags")
        if isinstance(tags, list) and tags:
            test["tags"] = [str(tag) for tag in tags]
        test["request"] = request
        if draft.expect:
            test["expect"] = draft.expect
        if draft.capture:
            test["capture"] = draft.capture
        if draft.depends_on:
            test["depends_on"] = draft.depends_on
        return test

    def _used_variables(self, tests: dict[str, Any]) -> list[str]:
        text = msgspec.json.encode(tests).decode()
        return [name for name in self.variables if "{{ " + name + " }}" in text]

    def _secret_schemes(self, tests: dict[str, Any]) -> list[str]:
        text = msgspec.json.encode(tests).decode()
        return [
            scheme
            for scheme, credential in self.credentials.items()
            if credential is not None and "{{ secrets." + credential.secret + " }}" in text
        ]


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _sequence(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, bool | dict | list):
        return msgspec.json.encode(value).decode()
    return str(value)


def _expected_code(codes: list[str]) -> str:
    """The response a test expects: the first documented success, else what is there."""
    successes = sorted(code for code in codes if code.isdigit() and code.startswith("2"))
    if successes:
        return successes[0]
    for code in codes:
        if code.upper() == "2XX":
            return code
    if "default" in codes:
        return "default"
    numbered = sorted(code for code in codes if code.isdigit())
    return numbered[0] if numbered else codes[0]
