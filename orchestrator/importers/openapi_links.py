"""OpenAPI links as a flow carries them: a capture on the linking test, a template in the
linked one (the planner orders the two from it), and, when a link sets a security
scheme's credential, that capture read by every test under the scheme."""

from __future__ import annotations

import re
from typing import Any

import msgspec
import networkx as nx

from orchestrator.importers.openapi_drafts import (
    Credential,
    Draft,
    as_text,
    identifier,
    literal,
    mapping,
)
from orchestrator.importers.openapi_schemas import Document, json_path, pointer_parts

_EMBEDDED = re.compile(r"{(\$[^{}]+)}")


class Links:
    """Applies the links of every test's expected response to the drafts, then orders each
    DELETE after the other tests of its resource."""

    def __init__(
        self,
        document: Document,
        drafts: dict[str, Draft],
        credentials: dict[str, Credential | None],
        variables: dict[str, Any],
    ) -> None:
        self.document = document
        self.version = document.version
        self.drafts = drafts
        self.credentials = credentials
        self.variables = variables
        self.by_id = {
            str(d.operation["operationId"]): d
            for d in reversed(drafts.values())
            if isinstance(d.operation.get("operationId"), str)
        }
        self.by_place = {(d.path, d.method): d for d in drafts.values()}
        self.tokens: dict[str, tuple[str, str]] = {}  # scheme -> (source test, template)
        self.capture_owner: dict[str, str] = {}  # capture name -> test
        self.capture_names: dict[tuple[str, str], str] = {}  # (test, encoded spec) -> name
        self.graph: nx.DiGraph[str] = nx.DiGraph()  # test -> the tests that wait for it

    def report(self, where: str, reason: str) -> None:
        self.document.report(where, reason)

    def apply(self) -> None:
        self._links()
        self._deletes_last()

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
                for key, expression in mapping(link.get("parameters")).items():
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

    def _link_target(self, link: dict[str, Any], where: str) -> Draft | None:
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
        self, source: Draft, target: Draft, key: str, expression: Any, where: str
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
            target.headers[name] = as_text(value)
        return True

    def _credential_at(self, target: Draft, location: str, name: str) -> Credential | None:
        for scheme in target.schemes:
            credential = self.credentials.get(scheme)
            if credential is None or credential.kind != "value":
                continue  # an auth kind: the flow's auth sends it, no link can replace it
            same_name = credential.key.lower() == name.lower()
            if same_name and location in ("", credential.location):
                return credential
        return None

    def _link_token(
        self, source: Draft, credential: Credential, expression: Any, where: str
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
        self.tokens[credential.scheme] = (source.name, as_text(value))
        return True

    def _expression(
        self, source: Draft, expression: Any, where: str, hint: str = "value", capture_as: str = ""
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
            parts += [literal(expression[position : match.start()]), as_text(value)]
            position = match.end()
        return "".join(parts) + literal(expression[position:]) if parts else literal(expression)

    def _runtime(
        self, source: Draft, expression: str, where: str, hint: str, capture_as: str
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

    def _request_value(self, source: Draft, what: str, where: str) -> Any:
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

    def _capture(self, source: Draft, spec: dict[str, Any], wanted: str) -> str:
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
