"""Every static check fires before a request is sent: exit code 2, one readable line per
problem naming the file, the test and the fix, never a traceback."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import pytest

from orchestrator.loader import MAX_FLOW_BYTES
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
            "tests.login.expect: unknown field 'statuss' (did you mean 'status'?)",
        ),
        (
            ("request: {method: POST,", "reqest: {method: POST,"),
            "tests.login: unknown field 'reqest' (did you mean 'request'?)",
        ),
        (
            ("expect: {status: 200}", "expect: {status: 200}\n    retries: -1"),
            "tests.login.retries: -1 is out of range: it must be from 0 to 100",
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


def test_every_schema_problem_of_a_file_is_listed(tmp_path: Path) -> None:
    """msgspec stops at the first error; the loader lists them all, each once."""
    flow = (
        VALID.replace("request: {method: POST,", "request: {methd: POST,")
        .replace("expect: {status: 200}", "expect: {status: 200, json: {'$.a': {lenght: 1}}}")
        .replace("  catalog:\n", "  catalog:\n    retries: {attempts: 3, backof: 2}\n")
        .replace('{json: "$.products[0].id"}', '{jsn: "$.products[0].id"}')
        .replace("  cart:\n    request:", "  cart:\n    reqest:")
    )
    path = write(tmp_path, flow)
    code, output = validate(path)
    assert code == 2
    expected = [
        "tests.login.request: unknown field 'methd' (did you mean 'method'?)",
        "tests.login.expect.json.$.a: unknown field 'lenght' (did you mean 'length'?)",
        "tests.catalog.capture.product_id: unknown field 'jsn' (did you mean 'json'?)",
        "tests.catalog.retries: unknown field 'backof' (did you mean 'backoff'?)",
        "tests.cart: unknown field 'reqest' (did you mean 'request'?)",
    ]
    assert output.splitlines() == [f"error: {path}: {line}" for line in expected]


def test_schema_problems_do_not_hide_the_other_checks_of_valid_tests(tmp_path: Path) -> None:
    flow = VALID.replace("request: {method: POST,", "request: {methd: POST,").replace(
        '{json: "$.products[0].id"}', '{json: "$.["}'
    )
    path = write(tmp_path, flow)
    code, output = validate(path)
    assert code == 2
    assert f"error: {path}: tests.login.request: unknown field 'methd'" in output
    assert f"error: {path}: tests.catalog.capture.product_id: JSONPath '$.[' does not" in output


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        (
            "retries: {attempts: -1}",
            "tests.t.retries.attempts: -1 is out of range: it must be from 0 to 100",
        ),
        ("retries: 1000", "tests.t.retries: 1000 is out of range: it must be from 0 to 100"),
        (
            "retries: {backoff: 0.5}",
            "tests.t.retries.backoff: 0.5 is out of range: it must be from 1 to 100",
        ),
        ("retries: {backoff: .nan}", "tests.t.retries.backoff: nan is out of range"),
        (
            "until: {max_attempts: 0}",
            "tests.t.until.max_attempts: 0 is out of range: it must be from 1 to 10000",
        ),
        (
            "until: {max_attempts: 99999999999999999999}",
            "tests.t.until.max_attempts: 99999999999999999999 is out of range",
        ),
        (
            "expect: {json: {$.a: {length: -1}}}",
            "tests.t.expect.json.$.a.length: -1 is out of range: it must be at least 0",
        ),
        (
            "request: {url: /, timeout: 0s}",
            "tests.t.request.timeout: a timeout of 0 would fail every request",
        ),
        ("request: {url: /, timeout: -1}", "tests.t.request.timeout: duration -1 is negative"),
    ],
)
def test_nonsensical_numbers_are_refused(tmp_path: Path, setting: str, expected: str) -> None:
    flow = "name: n\nbase_url: http://127.0.0.1:9\ntests:\n  t:\n"
    if not setting.startswith("request"):
        flow += "    request: {url: /}\n"
    path = write(tmp_path, flow + f"    {setting}\n")
    code, output = validate(path)
    assert code == 2
    assert f"error: {path}: {expected}" in output


def test_a_tab_in_the_indentation_is_named(tmp_path: Path) -> None:
    path = write(
        tmp_path, VALID.replace("\n    expect: {status: 200}", "\n\texpect: {status: 200}")
    )
    code, output = validate(path)
    assert code == 2
    assert f"error: {path}: line 7, column 1: a tab character; YAML indents with spaces" in output


def test_a_binary_file_is_not_a_text_file(tmp_path: Path) -> None:
    path = tmp_path / "image.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    code, output = validate(path)
    assert code == 2
    assert output == f"error: {path}: not a text file (it holds NUL bytes)\n"
    path.write_bytes(VALID.encode() + b"\xff\xfe oops\n")
    code, output = validate(path)
    assert code == 2
    assert f"error: {path}: not a UTF-8 text file (at byte {len(VALID)})" in output


def test_a_flow_file_over_the_size_limit_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = write(tmp_path, VALID + "#" * MAX_FLOW_BYTES)
    code, output = validate(path)
    assert code == 2
    size = path.stat().st_size
    assert f"the file is {size} bytes; the limit is {MAX_FLOW_BYTES} bytes (1 MiB)" in output


def _chain(tmp_path: Path, count: int) -> Path:
    lines = ["name: big", "base_url: http://127.0.0.1:9", "variables: {item: 1}", "tests:"]
    for index in range(count):
        reads = f"v{index - 1}" if index % 2 else "item"
        lines += [
            f"  t{index}:",
            f'    request: {{url: "/i/{{{{ {reads} }}}}"}}',
            f'    capture: {{v{index}: {{json: "$.id"}}}}',
        ]
    return write(tmp_path, "\n".join(lines) + "\n", f"chain{count}.yaml")


def test_validation_time_grows_linearly_up_to_the_largest_file(tmp_path: Path) -> None:
    """Planning was quadratic (each reference scanned every capture): 20,000 tests took
    74 s to plan, now under 2 s. 12,000 tests fill the size limit (~1 MiB)."""

    def seconds(count: int, times: int) -> float:
        path = _chain(tmp_path, count)
        assert path.stat().st_size < MAX_FLOW_BYTES
        took = []
        for _ in range(times):
            # CPU time of this (in-process) validation, not wall time: tests running beside
            # it (pytest-xdist, other suites) stretch the wall clock, not the work done
            started = time.process_time()
            code, output = validate(path)
            took.append(time.process_time() - started)
            assert code == 0, output
            assert f"ok ({count} tests" in output
        return min(took)  # the least disturbed by cache and memory contention

    small, large = seconds(3_000, 2), seconds(12_000, 1)
    # four times the tests: linear is at most 4x, quadratic 16x
    assert large < 10 * small, (small, large)


BOMB = "variables:\n  l0: &l0 [a, a, a, a, a, a, a, a, a, a]\n" + "".join(
    f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n" for i in range(1, 10)
)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("command", ["validate", "run", "graph"])
def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path: Path, command: str) -> None:
    """Ten lines that expand to 10**10 values hung validate and run; the service refused
    them already. The same check in the loader serves both."""
    path = write(tmp_path, VALID + BOMB)
    code, _, err = baton(command, str(path))
    assert code == 2
    assert (
        f"error: {path}: the file holds more than 1000000 values once its YAML aliases are "
        "expanded (use fewer aliases (*name), or none)"
    ) in err


@pytest.mark.timeout(30)
def test_an_alias_bomb_in_an_environment_file_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, VALID)
    (tmp_path / "env").mkdir()
    (tmp_path / "env" / "bomb.yaml").write_text(
        BOMB.replace("variables:\n  ", "").replace("\n  ", "\n")
    )
    code, output = validate(path, "--env", "bomb")
    assert code == 2
    assert "aliases are expanded" in output


def test_a_key_given_twice_is_named_not_silently_replaced(tmp_path: Path) -> None:
    """YAML keeps the last of two equal keys: a second test named login replaced the
    first without a word."""
    second = "  login:\n    request: {url: /again}\n"
    path = write(tmp_path, VALID.replace("  catalog:\n", second + "  catalog:\n", 1))
    code, output = validate(path)
    assert code == 2
    assert (
        f"error: {path}: line 10: 'login' is given twice in one mapping; the second would "
        "replace the first (rename or remove one)"
    ) in output


def test_deeply_nested_brackets_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, VALID + "variables:\n  a: " + "[" * 100_000 + "]" * 100_000 + "\n")
    code, output = validate(path)
    assert code == 2
    assert f"error: {path}: values are nested more than 64 levels deep" in output


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
    # a variable env would hide env.*: {{ env.URL | default(...) }} would take its default
    code, output = validate(path, "--var", "env=prod")
    assert code == 2
    assert "variables.env: 'env' is a reserved name" in output
    code, output = validate(path, "--env", "nowhere")
    assert code == 2
    assert "no such environment" in output
    code, output = validate(tmp_path / "missing.yaml")
    assert code == 2
    assert "no such file or directory" in output
    (tmp_path / "rows.csv").write_text("user,role\nalice\n")
    code, output = validate(path, "--data", str(tmp_path / "rows.csv"))
    assert code == 2
    assert "rows.csv: line 2: 1 fields, and the header has 2" in output


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
