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
from typing import Any
from urllib.parse import quote

import msgspec

from orchestrator.errors import UsageError
from orchestrator.importers import Imported
from orchestrator.importers.openapi_drafts import (
    Credential,
    Draft,
    as_text,
    identifier,
    is_form,
    is_json,
    literal,
    mapping,
    sequence,
)
from orchestrator.importers.openapi_links import Links
from orchestrator.importers.openapi_schemas import (
    Bundler,
    Document,
    Sampler,
)
from orchestrator.loader import MAX_DEPTH, decode_yaml

METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_PATH_NAME = re.compile(r"{([^{}/]+)}")
# OpenAPI ignores header parameters of these names; the flow sets them itself
_IGNORED_HEADERS = frozenset({"accept", "content-type", "authorization"})


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


class _Importer:
    def __init__(self, data: dict[str, Any], version: str, source: str) -> None:
        self.data = data
        self.version = version
        self.source = source
        self.document = Document(data, version)
        self.sampler = Sampler(self.document)
        self.drafts: dict[str, Draft] = {}
        self.variables: dict[str, Any] = {}
        self.placeholders: set[str] = set()  # variables whose value is made up
        self.credentials: dict[str, Credential | None] = {}
        self.tokens: dict[str, tuple[str, str]] = {}  # scheme -> (source test, template)

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
            for method in [key for key in item if key in METHODS]:  # the document's order
                if isinstance(item[method], dict):
                    self._add_draft(str(path), method, item, item[method])
        for name in mapping(self.data.get("webhooks")):
            self.report(
                f"webhooks.{name}",
                "a webhook is a request the API sends, not one a flow sends: not translated",
            )
        links = Links(self.document, self.drafts, self.credentials, self.variables)
        links.apply()
        self.tokens = links.tokens
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
            names = " and ".join(f"secrets.{name}" for name in credential.secrets)
            self.report(
                f"components.securitySchemes.{scheme}",
                f"needs a value: the credential is read from {names} "
                "(an environment variable or --secrets FILE)",
            )
        return Imported(flow, list(self.document.untranslated))

    # -- the flow's frame

    def _title(self) -> str:
        info = mapping(self.data.get("info"))
        return str(info.get("title") or self.source)

    def _description(self, secret_schemes: list[str]) -> str:
        info = mapping(self.data.get("info"))
        version = f" {info['version']}" if info.get("version") else ""
        text = f"Imported from {self.source} (OpenAPI {self.data['openapi']}, API{version})."
        listed = [
            f"{c.scheme} from secrets.{c.secret} ({c.location} {c.key})"
            if c.kind == "value"
            else f"{c.scheme} from {' and '.join(f'secrets.{n}' for n in c.secrets)} ({c.kind})"
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
        variables = mapping(server.get("variables"))

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
        draft = Draft(name, method, path, where, operation)
        self.drafts[name] = draft
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
        for callback in mapping(operation.get("callbacks")):
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
            for index, raw in enumerate(sequence(owner.get("parameters"))):
                place = f"{owner_where}.parameters.{index}"
                parameter = self.document.resolve(raw, place)
                if isinstance(parameter, dict):
                    key = (str(parameter.get("name")), str(parameter.get("in")))
                    found[key] = (parameter, place)  # the operation's own wins
        return list(found.values())

    def _parameter(self, draft: Draft, parameter: dict[str, Any], where: str) -> None:
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
            draft.headers[name] = literal(as_text(value))

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

    def _request_body(self, draft: Draft) -> None:
        if "requestBody" not in draft.operation:
            return
        where = f"{draft.where}.requestBody"
        body = self.document.resolve(draft.operation["requestBody"], where)
        content = body.get("content") if isinstance(body, dict) else None
        if not isinstance(content, dict) or not content:
            return
        chosen = next((t for t in content if is_json(t)), None)
        chosen = chosen or next((t for t in content if is_form(t)), None)
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
        if is_json(chosen):
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
            form[str(key)] = as_text(item)
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

    def _security(self, draft: Draft) -> None:
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
                draft.scopes = {
                    str(name): [str(scope) for scope in sequence(scopes)]
                    for name, scopes in requirement.items()
                }
                return
        self.report(where, "no security requirement could be translated: no credentials sent")

    def _credential(self, scheme: str) -> Credential | None:
        if scheme in self.credentials:
            return self.credentials[scheme]
        where = f"components.securitySchemes.{scheme}"
        schemes = mapping(mapping(self.data.get("components")).get("securitySchemes"))
        spec = self.document.resolve(schemes.get(scheme), where) if scheme in schemes else None
        secret = identifier(re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", scheme)).upper()
        credential: Credential | None = None
        kind = spec.get("type") if isinstance(spec, dict) else None
        if spec is None:
            self.report(where, "the security scheme is not defined: no credentials sent")
        elif kind == "http" and str(spec.get("scheme", "")).lower() == "bearer":
            credential = Credential(scheme, "header", "Authorization", "Bearer ", secret)
        elif kind == "http" and str(spec.get("scheme", "")).lower() in ("basic", "digest"):
            auth_kind = str(spec["scheme"]).lower()
            credential = Credential(scheme, "header", "Authorization", "", secret, auth_kind)
        elif kind == "oauth2" and _token_url(spec):
            credential = Credential(
                scheme, "header", "Authorization", "", secret, "oauth2", _token_url(spec)
            )
        elif kind in ("oauth2", "openIdConnect"):
            # Baton runs the client credentials grant only: any other flow's access token is
            # obtained elsewhere and given as a secret
            self.report(
                where,
                f"{kind} without a clientCredentials flow: an access token obtained elsewhere "
                f"is sent from secrets.{secret}",
            )
            credential = Credential(scheme, "header", "Authorization", "Bearer ", secret)
        elif kind == "apiKey" and spec.get("in") in ("header", "query") and spec.get("name"):
            credential = Credential(scheme, str(spec["in"]), str(spec["name"]), "", secret)
        else:
            detail = {"http": "scheme", "apiKey": "in"}.get(str(kind), "")
            shown = f"{kind} {spec.get(detail)}" if detail else f"{kind}"
            self.report(where, f"a security scheme of type {shown} is not translated")
        self.credentials[scheme] = credential
        return credential

    def _response(self, draft: Draft) -> None:
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
        chosen = next((t for t in content if is_json(t)), None)
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

    def _test(self, draft: Draft) -> dict[str, Any]:
        def fill(match: re.Match[str]) -> str:
            value = draft.path_values.get(match.group(1))
            if value is None:
                return match.group(0)
            text = as_text(value)
            return text if "{{" in text or "{%" in text else quote(text, safe="")

        request: dict[str, Any] = {"method": draft.method.upper()}
        request["url"] = _PATH_NAME.sub(fill, draft.path)
        params, headers = dict(draft.params), dict(draft.headers)
        auth_scheme = ""
        for scheme in draft.schemes:
            credential = self.credentials[scheme]
            assert credential is not None
            if credential.kind != "value":
                if auth_scheme:
                    self.report(
                        f"{draft.where}.security.{scheme}",
                        f"a request has one auth: {auth_scheme}'s is sent, not this one",
                    )
                else:
                    request["auth"] = credential.auth(draft.scopes.get(scheme, []))
                    auth_scheme = scheme
                continue
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
            if credential is not None
            and any("{{ secrets." + name + " }}" in text for name in credential.secrets)
        ]


def _token_url(scheme: dict[str, Any]) -> str:
    """The tokenUrl of an oauth2 scheme's clientCredentials flow, or ``""``."""
    flow = mapping(mapping(scheme.get("flows")).get("clientCredentials"))
    url = flow.get("tokenUrl")
    return literal(url) if isinstance(url, str) else ""


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
