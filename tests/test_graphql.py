"""The ``graphql:`` request shorthand against the demo shop's /graphql: the JSON POST it
sends, and GraphQL errors (a 200 with an ``errors`` array) failing a test unless it
checks ``$.errors`` itself."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli import baton
from tests.flows import events_of, run_flow, write_flow


async def test_a_query_with_variables_is_posted_as_json_and_its_data_checked(
    env: dict[str, str], tmp_path: Path, pg_server_dsn: str
) -> None:
    flow = write_flow(
        tmp_path,
        """
        product:
          request:
            url: /graphql
            graphql:
              query: "query Product($id: Int!) { product(id: $id) { id name price } }"
              variables: {id: "{{ wanted }}"}
              operation_name: Product
          expect:
            json: {"$.data.product.name": HTTP Pocket Guide}
          capture:
            price: {json: "$.data.product.price"}
        listing:
          request:
            url: /graphql
            graphql: {query: "{ products { id } }"}
          expect:
            json: {"$.data.products": {length: 7}}
        """,
        head="variables: {wanted: 2}\n",
    )
    code, out, err, tests = await run_flow(flow)
    assert code == 0, out + err
    assert tests["product"]["captures"] == {"price": 42.5}
    sent = {e["test"]: e for e in await events_of(pg_server_dsn, tests["_run_id"], "RequestSent")}
    assert sent["product"]["method"] == "POST"
    assert sent["product"]["headers"]["content-type"] == "application/json"
    assert json.loads(sent["product"]["body_excerpt"]) == {
        "query": "query Product($id: Int!) { product(id: $id) { id name price } }",
        "variables": {"id": 2},
        "operationName": "Product",
    }
    assert json.loads(sent["listing"]["body_excerpt"]) == {
        "query": "{ products { id } }",
        "variables": {},
    }


async def test_errors_in_the_response_fail_the_test_with_their_messages(
    env: dict[str, str], tmp_path: Path
) -> None:
    flow = write_flow(
        tmp_path,
        """
        missing:
          request:
            url: /graphql
            graphql: {query: "{ product(id: 99) { id } }"}
          expect: {status: 200}
        after:
          depends_on: [missing]
          request: {url: /health}
        """,
    )
    code, _out, _err, tests = await run_flow(flow)
    assert code == 1
    failed = tests["missing"]
    assert failed["status"] == "failed"
    assert 'graphql errors empty: expected [], got ["no product with id 99"]' in failed["message"]
    assert "check $.errors in expect.json" in failed["message"]
    assert tests["after"]["status"] == "skipped"


async def test_a_test_that_checks_errors_expects_them(env: dict[str, str], tmp_path: Path) -> None:
    flow = write_flow(
        tmp_path,
        """
        bad_field:
          request:
            url: /graphql
            graphql: {query: "{ product(id: 1) { id colour } }"}
          expect:
            json:
              "$.errors[0].message": {contains: colour}
        no_errors:
          request:
            url: /graphql
            graphql: {query: "{ product(id: 1) { name } }"}
          expect:
            json: {"$.errors": {exists: false}}
        """,
    )
    code, out, err, tests = await run_flow(flow)
    assert code == 0, out + err
    assert tests["bad_field"]["status"] == "passed"


def test_validate_refuses_graphql_with_another_body(tmp_path: Path) -> None:
    flow = write_flow(
        tmp_path,
        """
        both:
          request:
            url: /graphql
            graphql: {query: "{ products { id } }"}
            body: "{}"
        """,
    )
    code, _out, err = baton("validate", str(flow))
    assert code == 2
    problem = "tests.both.request: a request has one body, this one gives body and graphql"
    assert f"{flow}: {problem}" in err
