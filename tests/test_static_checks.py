"""Every static check fires before a request is sent: exit code 2, one readable line per
problem naming the file, the test and the fix, never a traceback."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests.cli import baton

VALID = """
name: shop
base_url: http://127.0.0.1:9
tests:
  login:
    request: {method: POST, url: /auth/login, json: {username: alice}}
    expect: {status: 200}
    capture:
      auth.token: {json: "$.access_token"}
  catalog:
    request:
      url: /catalog
      headers: {Authorization: "Bearer {{ auth.token }}"}
    capture:
      product_id: {json: "$.products[0].id"}
  cart:
    request:
      method: POST
      url: /cart
      headers: {Authorization: "Bearer {{ auth.token }}"}
      json: {product_id: "{{ product_id }}"}
"""


def write(tmp_path: Path, text: str, name: str = "checkout.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def validate(path: Path, *args: str) -> tuple[int, str]:
    code, out, err = baton("validate", str(path), *args)
    assert "Traceback" not in out + err
    return code, out + err


def test_a_valid_flow_passes(tmp_path: Path) -> None:
    code, output = validate(write(tmp_path, VALID))
    assert code == 0
    assert "ok (3 tests" in output


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            ("expect: {status: 200}", "expect: {status: abc}"),
            "tests.login.expect.status: expected a status code or class",
        ),
        (
            ("expect: {status: 200}", "expect: {status: true}"),
            "tests.login.expect.status: expected int | str | array | null, got bool",
        ),
        (
            ("expect: {status: 200}", "expect: {statuss: 200}"),
            "tests.login.expect: object contains unknown field statuss",
        ),
        (
            ("url: /catalog", "url: /catalog\n      timeout: 3 parsecs"),
            "tests.catalog.request.timeout: duration '3 parsecs'",
        ),
        (
            ('{json: "$.access_token"}', '{json: "$.["}'),
            "tests.login.capture.auth.token: JSONPath '$.[' does not parse",
        ),
        (
            ('{json: "$.access_token"}', '{json: "$.a", header: X-Token}'),
            "tests.login.capture.auth.token: a capture takes exactly one of",
        ),
        (
            ('Bearer {{ auth.token }}"}\n    capture', 'Bearer {{ auth.token "}\n    capture'),
            "tests.catalog.request: template does not parse",
        ),
    ],
)
def test_schema_and_syntax_errors_name_file_and_path(
    tmp_path: Path, change: tuple[str, str], expected: str
) -> None:
    old, new = change
    assert old in VALID
    path = write(tmp_path, VALID.replace(old, new, 1))
    code, output = validate(path)
    assert code == 2
    assert f"error: {path}: {expected}" in output


def test_not_yaml_at_all(tmp_path: Path) -> None:
    path = write(tmp_path, "name: [unclosed\ntests: {")
    code, output = validate(path)
    assert code == 2
    assert f"error: {path}: not valid YAML" in output


def test_undefined_variable_names_test_and_variable_with_a_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, VALID.replace('"{{ product_id }}"', '"{{ product_idd }}"'))
    code, output = validate(path)
    assert code == 2
    assert (
        f"error: {path}: tests.cart.request: variable 'product_idd' is not defined "
        "(did you mean 'product_id'?)" in output
    )


def test_variables_from_var_env_and_data_count_as_defined(tmp_path: Path) -> None:
    flow = VALID.replace('"{{ product_id }}"', '"{{ sku }}-{{ region }}-{{ user }}"')
    path = write(tmp_path, flow)
    (tmp_path / "env").mkdir()
    (tmp_path / "env" / "staging.yaml").write_text("region: eu\n")
    (tmp_path / "rows.csv").write_text("user\nalice\nbob\n")
    code, output = validate(
        path, "--var", "sku=42", "--env", "staging", "--data", str(tmp_path / "rows.csv")
    )
    assert code == 0, output
    assert "2 run(s)" in output
    code, output = validate(path, "--var", "sku=42")
    assert code == 2
    assert "variable 'region' is not defined" in output


def test_missing_environment_variable_and_secret(tmp_path: Path) -> None:
    flow = VALID.replace(
        "base_url: http://127.0.0.1:9",
        'base_url: "{{ env.BATON_TEST_NOPE }}"\nvariables:\n  pw: "{{ secrets.NOPE_PW }}"',
    )
    code, output = validate(write(tmp_path, flow))
    assert code == 2
    assert "base_url: environment variable BATON_TEST_NOPE is not set" in output
    assert "variables.pw: secret NOPE_PW is not set" in output


def test_default_filter_makes_a_variable_optional(tmp_path: Path) -> None:
    flow = VALID.replace(
        "base_url: http://127.0.0.1:9",
        "base_url: \"{{ env.BATON_TEST_NOPE | default('http://127.0.0.1:9') }}\"",
    )
    code, output = validate(write(tmp_path, flow))
    assert code == 0, output


def test_two_tests_capturing_the_same_name(tmp_path: Path) -> None:
    flow = VALID.replace("product_id: {json:", "auth.token: {json:")
    code, output = validate(write(tmp_path, flow))
    assert code == 2
    assert (
        "tests.catalog.capture.auth.token: 'auth.token' is already captured by test 'login'"
        in output
    )


def test_unknown_depends_on(tmp_path: Path) -> None:
    flow = VALID.replace("  cart:\n", "  cart:\n    depends_on: [catalogue]\n")
    code, output = validate(write(tmp_path, flow))
    assert code == 2
    assert "tests.cart.depends_on: unknown test 'catalogue' (did you mean 'catalog'?)" in output


def test_cycle_is_named(tmp_path: Path) -> None:
    flow = VALID.replace("  login:\n", "  login:\n    depends_on: [cart]\n")
    code, output = validate(write(tmp_path, flow))
    assert code == 2
    assert "dependency cycle: login -> catalog -> cart -> login" in output


def test_every_problem_of_every_file_is_reported_at_once(tmp_path: Path) -> None:
    write(tmp_path, VALID.replace("expect: {status: 200}", "expect: {status: 99}"), "a.yaml")
    write(tmp_path, VALID.replace("  login:\n", "  login:\n    depends_on: [nope]\n"), "b.yaml")
    code, output = validate(tmp_path)
    assert code == 2
    assert "a.yaml: tests.login.expect.status" in output
    assert "b.yaml: tests.login.depends_on: unknown test 'nope'" in output


def test_bad_command_line_input(tmp_path: Path) -> None:
    path = write(tmp_path, VALID)
    assert validate(path, "--var", "novalue")[0] == 2
    code, output = validate(path, "--env", "nowhere")
    assert code == 2
    assert "no such environment" in output
    code, output = validate(tmp_path / "missing.yaml")
    assert code == 2
    assert "no such file or directory" in output
    (tmp_path / "rows.csv").write_text("user,role\nalice\n")
    code, output = validate(path, "--data", str(tmp_path / "rows.csv"))
    assert code == 2
    assert "line 2: the number of fields differs from the header" in output


def test_graph_formats(tmp_path: Path) -> None:
    path = write(tmp_path, VALID)
    code, out, _ = baton("graph", str(path))
    assert code == 0
    assert "3. cart  <- login (token), catalog (data)" in out
    code, out, _ = baton("graph", str(path), "--format", "mermaid")
    assert 'n1["login"]' in out
    assert "n1 -->|token| n2" in out
    code, out, _ = baton("graph", str(path), "--format", "dot")
    assert 'n2 [label="catalog"];' in out
    assert 'n2 -> n3 [label="data"];' in out


def test_default_headers_cannot_read_captured_values(tmp_path: Path) -> None:
    flow = VALID.replace(
        "tests:\n", 'defaults:\n  headers: {Authorization: "Bearer {{ auth.token }}"}\ntests:\n', 1
    )
    code, output = validate(write(tmp_path, flow))
    assert code == 2
    assert "defaults.headers: variable 'auth.token' is not defined" in output


def test_json_data_rows(tmp_path: Path) -> None:
    flow = VALID.replace('"{{ product_id }}"', '"{{ sku }}"')
    path = write(tmp_path, flow)
    rows = tmp_path / "rows.json"
    rows.write_text('[{"sku": 1}, {"sku": 2}, {"sku": 3}]')
    code, output = validate(path, "--data", str(rows))
    assert code == 0, output
    assert "3 run(s)" in output
    rows.write_text('{"sku": 1}')
    code, output = validate(path, "--data", str(rows))
    assert code == 2
    assert "expected a JSON array of objects" in output
