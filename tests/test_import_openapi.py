"""baton import openapi: real documents in (the Swagger Petstore 3.0, the shop's 3.1 document
with links), flows out that baton validate accepts and baton run passes against the shop."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.auth_http import auth_server
from tests.cli import baton

DATA = Path(__file__).resolve().parent / "data" / "importers"
PETSTORE = DATA / "petstore-openapi-3.0.yaml"
SHOP = DATA / "shop-openapi-3.1.yaml"


def imported(source: Path, tmp_path: Path) -> tuple[dict[str, Any], str, Path]:
    """(the flow, what baton import said on stderr, the flow file)."""
    out = tmp_path / f"{source.stem}.flow.yaml"
    code, stdout, stderr = baton("import", "openapi", str(source), "-o", str(out))
    assert code == 0, stderr
    assert stdout == ""
    return yaml.safe_load(out.read_text(encoding="utf-8")), stderr, out


def not_translated(stderr: str, source: Path) -> list[str]:
    prefix = f"not translated: {source}: "
    return [line[len(prefix) :] for line in stderr.splitlines() if line.startswith(prefix)]


def write_spec(tmp_path: Path, spec: dict[str, Any], name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    text = json.dumps(spec) if name.endswith(".json") else yaml.safe_dump(spec, sort_keys=False)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def petstore_secrets(tmp_path: Path) -> Path:
    path = tmp_path / "secrets.yaml"
    path.write_text("API_KEY: special-key\nPETSTORE_AUTH: a-token\n", encoding="utf-8")
    return path


def test_petstore_imports_one_test_per_operation_and_validates(
    tmp_path: Path, petstore_secrets: Path
) -> None:
    flow, stderr, out = imported(PETSTORE, tmp_path)

    assert f"imported 19 test(s) from {PETSTORE}" in stderr
    assert list(flow["tests"])[:3] == ["updatePet", "addPet", "findPetsByStatus"]
    assert flow["base_url"] == "{{ env.BASE_URL | default('https://petstore3.swagger.io/api/v3') }}"
    add = flow["tests"]["addPet"]
    assert add["request"]["method"] == "POST" and add["request"]["url"] == "/pet"
    # the body from the schema's property examples
    assert add["request"]["json"]["name"] == "doggie"
    assert add["request"]["json"]["category"] == {"id": 1, "name": "Dogs"}
    assert add["request"]["headers"]["Authorization"] == "Bearer {{ secrets.PETSTORE_AUTH }}"
    assert add["expect"]["status"] == 200
    by_id = flow["tests"]["getPetById"]["request"]
    assert by_id["url"] == "/pet/{{ petId }}" and by_id["headers"]["api_key"] == (
        "{{ secrets.API_KEY }}"
    )
    assert flow["tests"]["findPetsByStatus"]["request"]["params"] == {"status": "available"}
    assert flow["variables"]["petId"] == 1

    code, said, err = baton("validate", str(out), "--secrets", str(petstore_secrets))
    assert code == 0, err
    assert "ok (19 tests" in said + err
    # run at once, a delete would race the reads of its resource on a real server
    code, plan, err = baton("graph", str(out), "--secrets", str(petstore_secrets))
    assert "deletePet  <- getPetById (order), updatePetWithForm (order), uploadFile (order)" in plan
    assert "deleteUser  <- getUserByName (order), updateUser (order)" in plan


def test_petstore_lists_what_it_did_not_translate_with_its_place(tmp_path: Path) -> None:
    _, stderr, _ = imported(PETSTORE, tmp_path)
    parts = not_translated(stderr, PETSTORE)

    assert "paths./pet/{petId}/uploadImage.post.requestBody.content: no JSON or form body " in (
        "\n".join(parts)
    )
    assert any(
        p.startswith("paths./pet.post.requestBody.content: sent as application/json; ")
        and "application/xml" in p
        for p in parts
    )
    assert any(
        p.startswith("paths./pet/{petId}.get.parameters.0: needs a value: variables.petId")
        and "--var petId=" in p
        for p in parts
    )
    assert any(
        p.startswith("components.securitySchemes.api_key: needs a value: ")
        and "secrets.API_KEY" in p
        for p in parts
    )
    assert f"; {len(parts)} part(s) not translated" in stderr


def test_petstore_response_schema_is_self_contained_and_checks_bodies(tmp_path: Path) -> None:
    flow, _, _ = imported(PETSTORE, tmp_path)
    schema = flow["tests"]["getPetById"]["expect"]["schema"]

    assert set(schema["$defs"]) == {"Pet", "Category", "Tag"}
    assert "components" not in json.dumps(schema)  # no reference into the document left
    validator = jsonschema.Draft202012Validator(schema)
    pet = {"id": 10, "name": "doggie", "photoUrls": [], "tags": [{"id": 1, "name": "t"}]}
    assert validator.is_valid(pet)
    assert not validator.is_valid({**pet, "tags": [{"id": "one"}]})
    assert not validator.is_valid({"id": 10})  # name and photoUrls are required


def test_links_become_captures_and_dependencies(tmp_path: Path) -> None:
    flow, _, out = imported(SHOP, tmp_path)
    tests = flow["tests"]

    # login -> token: a secret capture every test under bearerAuth reads
    assert tests["login"]["capture"] == {"auth.bearerAuth": {"json": "$.access_token"}}
    assert tests["getMe"]["request"]["headers"]["Authorization"] == "Bearer {{ auth.bearerAuth }}"
    assert "Authorization" not in tests["login"]["request"].get("headers", {})
    assert tests["listCatalog"]["capture"] == {
        "listCatalog.product_id": {"json": "$.products[0].id"}
    }
    assert tests["getProduct"]["request"]["url"] == "/products/{{ listCatalog.product_id }}"
    assert tests["createCart"]["request"]["json"] == {
        "product_id": "{{ getProduct.product_id }}",
        "quantity": 1,
    }
    assert tests["getCart"]["request"]["url"] == "/cart/{{ createCart.cart_id }}"
    assert "variables" not in flow  # every path parameter comes from a link

    code, plan, err = baton("graph", str(out))
    assert code == 0, err
    assert "getMe  <- login (token)" in plan
    assert "getProduct  <- listCatalog (data), login (token)" in plan
    assert "getCart  <- createCart (data), login (token)" in plan


def test_shop_31_untranslated_parts_are_named(tmp_path: Path) -> None:
    _, stderr, _ = imported(SHOP, tmp_path)
    parts = not_translated(stderr, SHOP)

    assert [p.split(": ")[0] for p in parts] == [
        "paths./me.get.parameters.0",
        "paths./cart.post.callbacks.cartAbandoned",
        "webhooks.orderShipped",
    ]
    assert "cookie parameter 'theme'" in parts[0]


def test_imported_shop_flow_runs_against_the_shop(
    tmp_path: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, out = imported(SHOP, tmp_path)
    monkeypatch.setenv("BASE_URL", env["SHOP_URL"])

    code, stdout, stderr = baton("run", str(out))

    assert code == 0, stdout + stderr
    assert "6 passed" in stdout + stderr


def test_schema_check_fails_when_the_response_does_not_match(
    tmp_path: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = yaml.safe_load(SHOP.read_text(encoding="utf-8"))
    spec["components"]["schemas"]["Product"]["properties"]["price"] = {"type": "string"}
    _, _, out = imported(write_spec(tmp_path, spec, "wrong-price.yaml"), tmp_path)
    monkeypatch.setenv("BASE_URL", env["SHOP_URL"])

    code, stdout, stderr = baton("run", str(out))

    said = stdout + stderr
    assert code == 1, said
    assert "does not match the schema" in said
    assert "listCatalog  [assertion]" in said
    # login and getMe pass; listCatalog fails, and what its link feeds is skipped
    assert "getProduct  skipped: depends on listCatalog, which failed" in said
    assert "2 passed, 1 failed, 3 skipped" in said


def test_json_input_gives_the_same_flow_as_yaml(tmp_path: Path) -> None:
    for source in (SHOP, PETSTORE):
        spec = yaml.safe_load(source.read_text(encoding="utf-8"))
        as_json = write_spec(tmp_path, spec, f"{source.stem}.json")
        from_yaml, yaml_err, _ = imported(source, tmp_path)
        from_json, json_err, _ = imported(as_json, tmp_path)
        assert from_json["tests"] == from_yaml["tests"]
        assert not_translated(json_err, as_json) == not_translated(yaml_err, source)


def test_a_path_s_operations_keep_the_document_s_order(tmp_path: Path) -> None:
    things = {
        "post": {"operationId": "addThing", "responses": {"201": {"description": "made"}}},
        "get": {"operationId": "listThings", "responses": {"200": {"description": "all"}}},
    }
    flow, _, _ = imported(write_spec(tmp_path, _spec_30(**{"/things": things})), tmp_path)
    assert list(flow["tests"]) == ["addThing", "listThings"]


def _spec_30(**paths: Any) -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {"title": "nullable things", "version": "1"},
        "servers": [{"url": "/v1"}],
        "paths": paths,
        "components": {
            "schemas": {
                "Node": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string", "nullable": True},
                        "size": {"type": "integer", "minimum": 0, "exclusiveMinimum": True},
                        "next": {"$ref": "#/components/schemas/Node"},
                        "kind": {"type": "string", "enum": ["a", "b"], "nullable": True},
                    },
                }
            }
        },
    }


def test_openapi_30_schemas_are_converted_for_json_schema(tmp_path: Path) -> None:
    node = {"$ref": "#/components/schemas/Node"}
    spec = _spec_30(
        **{
            "/nodes/{id}": {
                "get": {
                    "operationId": "get-node",
                    "parameters": [
                        {"name": "id", "in": "path", "required": True, "example": 7},
                        {"name": "X-Trace", "in": "header", "required": True, "example": "t1"},
                    ],
                    "responses": {
                        "200": {
                            "description": "a node",
                            "content": {"application/json": {"schema": node}},
                        }
                    },
                }
            }
        }
    )
    flow, stderr, out = imported(write_spec(tmp_path, spec), tmp_path)
    test = flow["tests"]["get_node"]
    validator = jsonschema.Draft202012Validator(test["expect"]["schema"])

    assert validator.is_valid({"name": None, "kind": None})  # nullable
    assert not validator.is_valid({"name": 3})
    assert not validator.is_valid({"name": "x", "size": 0})  # exclusiveMinimum: true
    assert validator.is_valid({"name": "x", "size": 1, "next": {"name": "y"}})  # recursive
    assert not validator.is_valid({"name": "x", "next": {"name": 5}})
    assert test["request"]["url"] == "/nodes/{{ id }}" and flow["variables"] == {"id": 7}
    assert test["request"]["headers"] == {"X-Trace": "t1"}
    assert flow["base_url"] == "{{ env.BASE_URL | default('http://localhost/v1') }}"
    assert "servers.0.url: a relative URL (/v1): set BASE_URL" in stderr
    assert baton("validate", str(out))[0] == 0


def test_document_text_that_looks_like_a_template_is_sent_as_written(
    tmp_path: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    body = {"note": "{{ not_a_variable }}", "{% raw %}": "{# {% endraw %}"}
    # the shop's /echo answers the body it got as text: the schema checks it came unchanged
    sent = r'"note": ?"\{\{ not_a_variable \}\}", ?"\{% raw %\}": ?"\{# \{% endraw %\}"'
    echoed = {"type": "object", "required": ["body"], "properties": {"body": {"pattern": sent}}}
    spec = _spec_30(
        **{
            "/echo": {
                "post": {
                    "requestBody": {"content": {"application/json": {"example": body}}},
                    "responses": {
                        "200": {
                            "description": "what the server got",
                            "content": {"application/json": {"schema": echoed}},
                        }
                    },
                }
            }
        }
    )
    flow, _, out = imported(write_spec(tmp_path, spec), tmp_path)
    monkeypatch.setenv("BASE_URL", env["SHOP_URL"])

    assert list(flow["tests"]) == ["post_echo"]
    code, stdout, stderr = baton("run", str(out))
    assert code == 0, stdout + stderr  # else: not_a_variable is not defined


def test_references_outside_the_document_are_reported(tmp_path: Path) -> None:
    spec = _spec_30(
        **{
            "/things": {
                "get": {
                    "operationId": "things",
                    "responses": {
                        "200": {
                            "description": "things",
                            "content": {
                                "application/json": {"schema": {"$ref": "other.yaml#/Thing"}}
                            },
                        }
                    },
                }
            }
        }
    )
    _, stderr, out = imported(write_spec(tmp_path, spec), tmp_path)

    assert (
        "paths./things.get.responses.200.content.application/json.schema.$ref: "
        "the reference other.yaml#/Thing is not in this document"
    ) in stderr
    assert baton("validate", str(out))[0] == 0


def test_references_that_lead_back_to_themselves_are_reported_not_kept(
    tmp_path: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A: {$ref: B}, B: {$ref: A} names no schema: kept, the run's check went round it
    without end (a RecursionError's traceback)."""
    spec = _spec_30(
        **{
            "/health": {
                "get": {
                    "operationId": "health",
                    "responses": {
                        "200": {
                            "description": "loops",
                            "content": {"application/json": {"schema": {"$ref": "#/x/A"}}},
                        }
                    },
                }
            }
        }
    )
    spec["x"] = {"A": {"$ref": "#/x/B"}, "B": {"$ref": "#/x/A"}}
    source = write_spec(tmp_path, spec)
    _, stderr, out = imported(source, tmp_path)

    where = "paths./health.get.responses.200.content.application/json.schema.$ref: "
    assert where + "the reference #/x/B refers to itself" in not_translated(stderr, source)
    monkeypatch.setenv("BASE_URL", env["SHOP_URL"])
    code, stdout, stderr = baton("run", str(out))
    assert code == 0, stdout + stderr


@pytest.mark.parametrize(
    ("text", "name", "says"),
    [
        ("openapi: 3.0.0\npaths: {\n", "broken.yaml", "not valid YAML"),
        ('{"openapi": "3.1.0", "paths": ', "broken.json", "not valid JSON"),
        ("swagger: '2.0'\npaths: {}\n", "old.yaml", "Swagger 2.0 is not imported"),
        ("info: {title: x}\npaths: {}\n", "none.yaml", "openapi: missing: not an OpenAPI 3.0"),
        ("openapi: 3.1.0\npaths: {}\n", "empty.yaml", "paths: no operation to import"),
        ("- a\n- b\n", "list.yaml", "not an OpenAPI document"),
        ('{"openapi": "3.1.0", "paths": ' + "[" * 99 + "]" * 99 + "}", "deep.json", "64 levels"),
    ],
)
def test_a_malformed_document_is_one_line_and_exit_2(
    tmp_path: Path, text: str, name: str, says: str
) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")

    code, stdout, stderr = baton("import", "openapi", str(path))

    assert code == 2
    assert stdout == ""
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert str(path) in stderr and says in stderr
    assert "Traceback" not in stderr


def test_the_oai_link_example_chains_its_operations(tmp_path: Path) -> None:
    source = DATA / "oai-link-example-3.0.yaml"
    flow, stderr, out = imported(source, tmp_path)
    merge = flow["tests"]["mergePullRequest"]

    assert merge["request"]["url"] == (
        "/2.0/repositories/{{ getPullRequestsById.username }}/{{ getPullRequestsById.slug }}"
        "/pullrequests/{{ getPullRequestsById.pid }}/merge"
    )
    assert flow["tests"]["getPullRequestsById"]["capture"] == {
        "getPullRequestsById.username": {"json": "$.author.username"},
        "getPullRequestsById.slug": {"json": "$.repository.slug"},
        "getPullRequestsById.pid": {"json": "$.id"},
    }
    assert merge["expect"] == {"status": 204}
    code, plan, err = baton("graph", str(out))
    assert code == 0, err
    assert "getRepository  <- getRepositoriesByOwner (data)" in plan
    assert "mergePullRequest  <- getPullRequestsById (data)" in plan
    # slug is made up only where no link gives it: in getPullRequestsById
    needs = [p for p in not_translated(stderr, source) if "needs a value" in p]
    assert [p.split(": ")[0] for p in needs] == [
        "paths./2.0/users/{username}.get.parameters.0",
        "paths./2.0/repositories/{username}/{slug}/pullrequests/{pid}.get.parameters.1",
        "paths./2.0/repositories/{username}/{slug}/pullrequests/{pid}.get.parameters.2",
    ]


def test_the_oai_webhook_example_reports_its_webhook(tmp_path: Path) -> None:
    source = DATA / "oai-webhook-example-3.1.yaml"
    flow, stderr, out = imported(source, tmp_path)

    assert list(flow["tests"]) == ["listPets"]
    assert "limit" not in json.dumps(flow["tests"]["listPets"]["request"])  # optional, no value
    assert not_translated(stderr, source) == [
        "servers: no server given: set BASE_URL to the API's URL",
        "webhooks.newPet: a webhook is a request the API sends, not one a flow sends: "
        "not translated",
    ]
    assert baton("validate", str(out))[0] == 0


def test_links_may_pass_on_what_the_linking_test_sent(tmp_path: Path) -> None:
    def operation(operation_id: str, **extra: Any) -> dict[str, Any]:
        return {"operationId": operation_id, "responses": {"200": {"description": "ok"}}, **extra}

    spec = _spec_30(
        **{
            "/users/{name}": {
                "put": operation(
                    "putUser",
                    parameters=[{"name": "name", "in": "path", "required": True, "example": "al"}],
                    requestBody={"content": {"application/json": {"example": {"a.b": {"c": 3}}}}},
                    responses={
                        "200": {
                            "description": "stored",
                            "links": {
                                "read": {
                                    "operationId": "getUser",
                                    "parameters": {
                                        "path.name": "$request.path.name",
                                        "query.c": "$request.body#/a.b/c",
                                        "header.X-Status": "$statusCode",
                                        "query.url": "$url",
                                    },
                                },
                                "loop": {"operationId": "putUser"},
                                "nowhere": {"operationId": "noSuchOperation"},
                            },
                        }
                    },
                ),
                "get": operation("getUser"),
            },
        }
    )
    flow, stderr, out = imported(write_spec(tmp_path, spec), tmp_path)
    request = flow["tests"]["getUser"]["request"]

    assert request["url"] == "/users/{{ name }}"  # the same value the put sent
    assert request["params"] == {"c": 3}
    assert request["headers"] == {"X-Status": "{{ putUser.X_Status }}"}
    assert flow["tests"]["putUser"]["capture"] == {"putUser.X_Status": {"status": True}}
    links = "paths./users/{name}.put.responses.200.links"
    parts = not_translated(stderr, tmp_path / "spec.yaml")
    assert (
        f"{links}.read.parameters.query.url: the runtime expression '$url' is not translated"
        in (parts)
    )
    assert any(p.startswith(f"{links}.loop: the link from putUser to putUser would") for p in parts)
    assert f"{links}.nowhere.operationId: no operation 'noSuchOperation'" in parts
    assert baton("validate", str(out))[0] == 0


def test_made_up_documents_import_or_fail_in_one_line(tmp_path: Path) -> None:
    """Parts of real documents replaced by values of the wrong shape: each gives a flow
    or a UsageError, never another exception (the CLI would show a traceback)."""
    import copy
    import random

    from orchestrator.errors import UsageError
    from orchestrator.importers.openapi import convert

    originals = [yaml.safe_load(p.read_text(encoding="utf-8")) for p in (PETSTORE, SHOP)]
    wrong: list[Any] = [None, 7, "x", [], {}, [1], {"a": 1}, True, {"$ref": "#/nope"}, "$url"]
    chooser = random.Random(13)
    for _ in range(150):
        spec = copy.deepcopy(chooser.choice(originals))
        places = list(_places(spec))
        for _ in range(chooser.randint(1, 3)):
            *parents, last = chooser.choice(places)
            node = spec
            for key in parents:
                node = node[key] if isinstance(node, dict | list) else node
            if isinstance(node, dict | list):
                node[last] = copy.deepcopy(chooser.choice(wrong))
        try:
            convert(json.dumps(spec, default=str), "made-up.json").yaml()
        except UsageError as error:
            assert "\n" not in str(error)


def _places(node: Any, path: tuple[Any, ...] = ()) -> Any:
    if path:
        yield path
    items = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else []
    )
    for key, child in items:
        yield from _places(child, (*path, key))


def test_security_schemes_become_auth_headers_or_params_from_secrets(tmp_path: Path) -> None:
    implicit = {"authorizationUrl": "https://login.example.com/a", "scopes": {}}
    schemes = {
        "basicAuth": {"type": "http", "scheme": "basic"},
        "queryKey": {"type": "apiKey", "in": "query", "name": "key"},
        "cookieKey": {"type": "apiKey", "in": "cookie", "name": "sid"},
        "digestAuth": {"type": "http", "scheme": "digest"},
        "mtls": {"type": "mutualTLS"},
        "machine": {
            "type": "oauth2",
            "flows": {
                "clientCredentials": {
                    "tokenUrl": "https://login.example.com/token",
                    "scopes": {"orders:read": "read", "orders:write": "write"},
                },
                "implicit": implicit,
            },
        },
        "browser": {
            "type": "oauth2",
            "flows": {
                "implicit": {"authorizationUrl": "https://login.example.com/a", "scopes": {}}
            },
        },
    }
    spec = _spec_30(
        **{
            "/a": {"get": {"operationId": "a", "security": [{"basicAuth": [], "queryKey": []}]}},
            "/b": {"get": {"operationId": "b", "security": [{"cookieKey": []}, {"mtls": []}]}},
            "/c": {"get": {"operationId": "c", "security": [{"digestAuth": []}, {}]}},
            "/d": {"get": {"operationId": "d", "security": [{"machine": ["orders:read"]}]}},
            "/e": {"get": {"operationId": "e", "security": [{"browser": ["x"]}]}},
        }
    )
    for operation in spec["paths"].values():
        operation["get"]["responses"] = {"200": {"description": "ok"}}
    spec["components"]["securitySchemes"] = schemes
    flow, stderr, out = imported(write_spec(tmp_path, spec), tmp_path)
    tests = flow["tests"]

    assert tests["a"]["request"]["auth"] == {
        "basic": {
            "username": "{{ secrets.BASIC_AUTH_USERNAME }}",
            "password": "{{ secrets.BASIC_AUTH_PASSWORD }}",
        }
    }
    assert "headers" not in tests["a"]["request"]
    assert tests["a"]["request"]["params"] == {"key": "{{ secrets.QUERY_KEY }}"}
    assert "headers" not in tests["b"]["request"] and "auth" not in tests["b"]["request"]
    assert tests["c"]["request"]["auth"] == {
        "digest": {
            "username": "{{ secrets.DIGEST_AUTH_USERNAME }}",
            "password": "{{ secrets.DIGEST_AUTH_PASSWORD }}",
        }
    }
    assert tests["d"]["request"]["auth"] == {
        "oauth2": {
            "token_url": "https://login.example.com/token",
            "client_id": "{{ secrets.MACHINE_CLIENT_ID }}",
            "client_secret": "{{ secrets.MACHINE_CLIENT_SECRET }}",
            "scope": "orders:read",
        }
    }
    assert tests["e"]["request"]["headers"] == {"Authorization": "Bearer {{ secrets.BROWSER }}"}
    parts = not_translated(stderr, tmp_path / "spec.yaml")
    assert (
        "components.securitySchemes.cookieKey: "
        "a security scheme of type apiKey cookie is not translated" in parts
    )
    assert (
        "components.securitySchemes.browser: oauth2 without a clientCredentials flow: an access "
        "token obtained elsewhere is sent from secrets.BROWSER" in parts
    )
    assert (
        "paths./b.get.security: no security requirement could be translated: no credentials sent"
        in parts
    )
    assert not any(p.startswith("paths./c.get.security") for p in parts)
    assert (
        "components.securitySchemes.machine: needs a value: the credential is read from "
        "secrets.MACHINE_CLIENT_ID and secrets.MACHINE_CLIENT_SECRET" in " ".join(parts)
    )
    assert "secrets.BASIC_AUTH_PASSWORD" in flow["description"]
    assert "cookieKey" not in flow["description"]
    secrets = tmp_path / "secrets.yaml"
    names = ["BASIC_AUTH", "DIGEST_AUTH"]
    secrets.write_text(
        "".join(f"{n}_USERNAME: u\n{n}_PASSWORD: p\n" for n in names)
        + "QUERY_KEY: k\nMACHINE_CLIENT_ID: c\nMACHINE_CLIENT_SECRET: s\nBROWSER: t\n",
        encoding="utf-8",
    )
    assert baton("validate", str(out), "--secrets", str(secrets))[0] == 0


def test_imported_basic_and_oauth2_authenticate_against_a_real_server(
    env: dict[str, str], tmp_path: Path
) -> None:
    with auth_server() as server:
        spec = {
            "openapi": "3.1.0",
            "info": {"title": "auth", "version": "1"},
            "servers": [{"url": server.url}],
            "paths": {
                "/basic": {"get": {"operationId": "who", "security": [{"userPass": []}]}},
                "/api": {"get": {"operationId": "api", "security": [{"machine": ["read"]}]}},
            },
            "components": {
                "securitySchemes": {
                    "userPass": {"type": "http", "scheme": "basic"},
                    "machine": {
                        "type": "oauth2",
                        "flows": {
                            "clientCredentials": {
                                "tokenUrl": f"{server.url}/token",
                                "scopes": {"read": "read"},
                            }
                        },
                    },
                }
            },
        }
        for item in spec["paths"].values():
            item["get"]["responses"] = {"200": {"description": "ok"}}
        flow, stderr, out = imported(write_spec(tmp_path, spec), tmp_path)
        assert flow["tests"]["api"]["request"]["auth"]["oauth2"]["scope"] == "read"
        assert "secrets.USER_PASS_USERNAME and secrets.USER_PASS_PASSWORD" in stderr
        secrets = tmp_path / "secrets.yaml"
        secrets.write_text(
            f"USER_PASS_USERNAME: {server.user}\nUSER_PASS_PASSWORD: {server.password}\n"
            f"MACHINE_CLIENT_ID: {server.client_id}\n"
            f"MACHINE_CLIENT_SECRET: {server.client_secret}\n"
        )
        code, stdout, err = baton("run", str(out), "--secrets", str(secrets))
        assert code == 0, stdout + err
        assert stdout.splitlines()[-1].startswith("2 passed in "), stdout
        assert server.scopes == ["read"]
        assert server.password not in stdout + err


def test_the_oai_uspto_example_fills_server_variables_and_a_form_body(tmp_path: Path) -> None:
    source = DATA / "oai-uspto-3.0.yaml"
    flow, stderr, out = imported(source, tmp_path)

    assert stderr.splitlines()[-1] == f"imported 3 test(s) from {source}"
    # servers[0] is '{scheme}://developer.uspto.gov/ds-api', scheme's default https
    assert flow["base_url"] == "{{ env.BASE_URL | default('https://developer.uspto.gov/ds-api') }}"
    assert flow["variables"] == {"dataset": "oa_citations", "version": "v1"}
    search = flow["tests"]["perform_search"]["request"]
    assert search["url"] == "/{{ dataset }}/{{ version }}/records"
    assert search["form"] == {"criteria": "*:*", "start": "0", "rows": "100"}
    code, _, err = baton("validate", str(out))
    assert code == 0, err
