"""``baton import curl``: commands as typed in a terminal become a flow that runs, with the
credentials on their command lines as secrets and every option it cannot carry listed."""

from __future__ import annotations

import base64
import io
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from tests.auth_http import auth_server
from tests.cli import baton


def shop_commands(url: str, token: str) -> str:
    return f"""\
# a session against the shop, as copied from a terminal
curl -sf -X POST {url}/auth/login \\
  -H 'Content-Type: application/json' \\
  -d '{{"username": "alice", "password": "secret-alice"}}'

$ curl -f --compressed -H "Authorization: Bearer {token}" '{url}/catalog?limit=2&category=hardware'
curl -f --json '{{"product_id": 1, "quantity": 2}}' -H "Authorization: Bearer {token}" {url}/cart
curl -fsS {url}/feedback -H "Authorization: Bearer {token}" \\
  -d rating=5 --data-urlencode 'comment=Fast & friendly'
curl -f -XPUT {url}/echo -H 'Content-Type: text/plain' --data-raw 'line one
line two'
curl -f -F note=hello -F 'upload=@upload.txt;type=text/plain' {url}/echo
"""


def test_curl_commands_run_against_the_demo_api(env: dict[str, str], tmp_path: Path) -> None:
    url = env["SHOP_URL"]
    login = httpx.post(f"{url}/auth/login", json={"username": "alice", "password": "secret-alice"})
    token = login.json()["access_token"]
    source = tmp_path / "session.sh"
    source.write_text(shop_commands(url, token))
    (tmp_path / "upload.txt").write_text("uploaded text\n")
    flow_path = tmp_path / "flow.yaml"

    code, out, err = baton("import", "curl", str(source), "-o", str(flow_path))
    assert code == 0, out + err
    text = flow_path.read_text()
    assert token not in text and "secret-alice" not in text
    assert (
        f"secret to provide: TOKEN (the value found at {source}: line 6 header Authorization)"
        in err
    )
    assert f"secret to provide: PASSWORD (the value found at {source}: line 2 body.password)" in err
    assert "line 12 -F: upload: the file upload.txt is read relative to the flow file" in err
    assert err.splitlines()[-1] == f"imported 6 test(s) from {source}; 1 part(s) not translated"

    flow = yaml.safe_load(text)
    assert flow["variables"] == {"base_url": url}
    tests = flow["tests"]
    assert list(tests) == [
        "post_auth_login",
        "get_catalog",
        "post_cart",
        "post_feedback",
        "put_echo",
        "post_echo",
    ]
    assert tests["get_catalog"]["request"]["params"] == {"limit": "2", "category": "hardware"}
    assert tests["post_cart"]["request"]["json"] == {"product_id": 1, "quantity": 2}
    assert tests["post_feedback"]["request"]["form"] == {
        "rating": "5",
        "comment": "Fast & friendly",
    }
    assert tests["put_echo"]["request"]["body"] == "line one\nline two"
    assert tests["put_echo"]["expect"] == {"status": ["1xx", "2xx", "3xx"]}  # -f
    assert tests["post_echo"]["request"]["multipart"] == {
        "note": "hello",
        "upload": {"file": "upload.txt", "content_type": "text/plain"},
    }

    secrets = tmp_path / "secrets.yaml"
    secrets.write_text(f"PASSWORD: secret-alice\nTOKEN: {token}\n")
    code, out, err = baton("run", str(flow_path), "--secrets", str(secrets))
    assert code == 0, out + err
    assert out.splitlines()[-1].startswith("6 passed in "), out
    assert token not in out + err


def test_what_a_flow_cannot_carry_is_listed_with_its_line(tmp_path: Path) -> None:
    source = tmp_path / "more.sh"
    source.write_text(
        "curl -k https://api.example.com/upload -F file=@photo.png --weird-option\n"
        "ls -l\n"
        "curl -u bob:secret-bob https://api.example.com/me -d @body.json\n"
    )
    code, out, err = baton("import", "curl", str(source))
    assert code == 0, err
    lines = err.splitlines()
    for expected in (
        "line 1 -F: file: the file photo.png is read relative to the flow file",
        "line 1 --weird-option: an unknown curl option",
        "line 2: not a curl command: 'ls' ...",
        "line 3 -d: the body is read from a file (@body.json)",
    ):
        assert any(line.startswith(f"not translated: {source}: {expected}") for line in lines), err
    assert (
        f"secret to provide: PASSWORD (the value found at {source}: line 3 -u: the password of bob)"
        in err
    )
    flow = yaml.safe_load(out)
    upload = flow["tests"]["post_upload"]
    assert upload["tls"] == {"verify": False}  # -k
    assert upload["request"]["multipart"] == {"file": {"file": "photo.png"}}
    me = flow["tests"]["post_me"]["request"]  # curl POSTs -d @file, read or not
    assert me["method"] == "POST"
    assert me["auth"] == {"basic": {"username": "bob", "password": "{{ secrets.PASSWORD }}"}}
    assert "headers" not in me
    assert "secret-bob" not in out


def test_commands_from_standard_input(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("curl -L 'https://api.example.com/a?x=1'\n"))
    code, out, err = baton("import", "curl", "-")
    assert code == 0, err
    test = yaml.safe_load(out)["tests"]["get_a"]
    assert test["request"] == {"url": "/a", "params": {"x": "1"}, "follow_redirects": True}
    assert err.splitlines()[-1] == "imported 1 test(s) from <stdin>"


def test_an_imported_flow_validates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "one.sh"
    source.write_text(shop_commands("http://127.0.0.1:9", "abcdef0123456789"))
    (tmp_path / "upload.txt").write_text("x")
    flow_path = tmp_path / "flow.yaml"
    assert baton("import", "curl", str(source), "-o", str(flow_path))[0] == 0
    code, out, err = baton("validate", str(flow_path))
    assert code == 2
    assert "secret PASSWORD is not set" in err
    monkeypatch.setenv("PASSWORD", "x")
    monkeypatch.setenv("TOKEN", "y")
    code, out, err = baton("validate", str(flow_path))
    assert code == 0, out + err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            'curl https://a.example/x\ncurl -d \'{"a": 1}\n  https://a.example/y\n',
            "line 2: a quote",
        ),
        ("# nothing here\n\n", "line 1: no curl command with a URL in it"),
        ("curl -s\n", "line 1: no curl command with a URL in it"),
    ],
)
def test_malformed_commands_are_one_line_and_exit_2(
    tmp_path: Path, text: str, message: str
) -> None:
    source = tmp_path / "bad.sh"
    source.write_text(text)
    code, out, err = baton("import", "curl", str(source))
    assert code == 2
    assert out == ""
    assert err.startswith(f"error: {source}: {message}")
    assert len(err.splitlines()) == 1


def test_values_shaped_like_credentials_become_secrets(tmp_path: Path) -> None:
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLW9mLXRoZS10b2tlbg"
    source = tmp_path / "jwt.sh"
    source.write_text(
        f'curl --json \'{{"refresh": "{jwt}", "n": 1, "id": "AKIAZ7QWERTYUIOP1234"}}\' '
        f"-H 'X-Session-Hint: {jwt}' 'https://api.example.com/renew?state=ok&api_key=k-123456'\n"
    )
    code, out, err = baton("import", "curl", str(source))
    assert code == 0, err
    assert jwt not in out and "k-123456" not in out and "AKIAZ7QWERTYUIOP1234" not in out
    request = yaml.safe_load(out)["tests"]["post_renew"]["request"]
    # one value, one secret, named after the first place it was found
    assert request["headers"]["X-Session-Hint"] == "{{ secrets.X_SESSION_HINT }}"
    assert request["json"] == {
        "refresh": "{{ secrets.X_SESSION_HINT }}",
        "n": 1,
        "id": "{{ secrets.ID }}",  # an AWS access key id, by its form
    }
    assert request["params"] == {"state": "ok", "api_key": "{{ secrets.API_KEY }}"}
    assert "secret to provide: X_SESSION_HINT" in err and "secret to provide: API_KEY" in err


def test_an_output_that_cannot_be_written_is_one_line(tmp_path: Path) -> None:
    source = tmp_path / "one.sh"
    source.write_text("curl https://api.example.com/\n")
    target = tmp_path / "missing" / "flow.yaml"
    code, _, err = baton("import", "curl", str(source), "-o", str(target))
    assert code == 2
    assert (
        err.splitlines()[-1]
        == f"error: {target}: cannot write the flow (No such file or directory)"
    )


def test_curl_auth_options_become_the_flows_auth_kinds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "auth.sh"
    source.write_text(
        "curl --digest -u bob:secret-bob https://api.example.com/digest\n"
        "curl --aws-sigv4 aws:amz:eu-west-1:execute-api -u AKIDSECRETKEYID:aws-secret-value "
        "-H 'X-Amz-Security-Token: session-value' https://api.example.com/signed\n"
        "curl --aws-sigv4 aws:amz -u AKIDSECRETKEYID:aws-secret-value "
        "https://execute-api.us-east-2.amazonaws.com/prod/items\n"
        "curl --oauth2-bearer bearer-value https://api.example.com/me\n"
        "curl -u carol https://api.example.com/asks\n"
    )
    flow_path = tmp_path / "flow.yaml"
    code, out, err = baton("import", "curl", str(source), "-o", str(flow_path))
    assert code == 0, err
    text = flow_path.read_text()
    for clear in ("secret-bob", "AKIDSECRETKEYID", "aws-secret-value", "session-value"):
        assert clear not in text and clear not in err
    assert "bearer-value" not in text
    tests = yaml.safe_load(text)["tests"]
    assert tests["get_digest"]["request"]["auth"] == {
        "digest": {"username": "bob", "password": "{{ secrets.PASSWORD }}"}
    }
    signed = tests["get_signed"]["request"]
    assert signed["auth"] == {
        "aws_sigv4": {
            "access_key_id": "{{ secrets.AWS_ACCESS_KEY_ID }}",
            "secret_access_key": "{{ secrets.AWS_SECRET_ACCESS_KEY }}",
            "region": "eu-west-1",
            "service": "execute-api",
            "session_token": "{{ secrets.AWS_SESSION_TOKEN }}",
        }
    }
    assert "headers" not in signed  # the signer sends the session token
    # region and service from the host name, as curl takes them; one key, one secret
    items = tests["get_prod_items"]["request"]["auth"]["aws_sigv4"]
    assert (items["region"], items["service"]) == ("us-east-2", "execute-api")
    assert items["access_key_id"] == "{{ secrets.AWS_ACCESS_KEY_ID }}"
    assert tests["get_me"]["request"]["headers"] == {"Authorization": "Bearer {{ secrets.TOKEN }}"}
    assert f"secret to provide: TOKEN (the value found at {source}: line 4 --oauth2-bearer)" in err
    assert f"not translated: {source}: line 5 -u: no password: curl would ask for carol's" in err
    asked = tests["get_asks"]["request"]["auth"]["basic"]
    assert asked == {"username": "carol", "password": "{{ secrets.PASSWORD_2 }}"}
    for name in ("PASSWORD", "PASSWORD_2", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "x")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "x")
    monkeypatch.setenv("TOKEN", "x")
    code, out, err = baton("validate", str(flow_path))
    assert code == 0, out + err


def test_imported_basic_auth_authenticates_against_a_real_server(
    env: dict[str, str], tmp_path: Path
) -> None:
    with auth_server() as server:
        encoded = base64.b64encode(f"{server.user}:{server.password}".encode()).decode()
        source = tmp_path / "basic.sh"
        source.write_text(
            f"curl -f -u {server.user}:{server.password} {server.url}/basic\n"
            f"curl -f -H 'Authorization: Basic {encoded}' {server.url}/basic?again=1\n"
        )
        flow_path = tmp_path / "flow.yaml"
        code, out, err = baton("import", "curl", str(source), "-o", str(flow_path))
        assert code == 0, err
        text = flow_path.read_text()
        assert server.password not in text and encoded not in text
        # the header's credentials are the same password: one secret for both
        assert text.count("{{ secrets.PASSWORD }}") == 2 and "PASSWORD_2" not in text
        secrets = tmp_path / "secrets.yaml"
        secrets.write_text(f"PASSWORD: {server.password}\n")
        code, out, err = baton("run", str(flow_path), "--secrets", str(secrets))
        assert code == 0, out + err
        assert out.splitlines()[-1].startswith("2 passed in "), out
        assert server.password not in out + err
        secrets.write_text("PASSWORD: wrong\n")
        code, out, err = baton("run", str(flow_path), "--secrets", str(secrets))
        assert code == 1, out + err


def test_a_copy_as_curl_with_bash_quoting_runs_against_the_demo_api(
    env: dict[str, str], tmp_path: Path
) -> None:
    # as Chrome's "Copy as cURL (bash)" writes a body holding a quote, a non-ASCII letter,
    # an escaped backslash: $'...' with \', \uHHHH, \\
    source = tmp_path / "copied.sh"
    body = r"""$'{"name":"O\'Brien","city":"Z\u00fcrich","path":"C:\\\\tmp"}'"""
    source.write_text(
        f"curl '{env['SHOP_URL']}/echo' \\\n"
        "  -H 'content-type: application/json' \\\n"
        f"  --data-raw {body}\n"
    )
    flow_path = tmp_path / "flow.yaml"
    code, out, err = baton("import", "curl", str(source), "-o", str(flow_path))
    assert code == 0, err
    flow = yaml.safe_load(flow_path.read_text())
    request = flow["tests"]["post_echo"]["request"]
    assert request["json"] == {"name": "O'Brien", "city": "Z\u00fcrich", "path": "C:\\tmp"}
    flow["tests"]["post_echo"]["expect"] = {"json": {"$.body": {"contains": "O'Brien"}}}
    flow_path.write_text(yaml.safe_dump(flow))
    code, out, err = baton("run", str(flow_path))
    assert code == 0, out + err


def test_bodies_curl_reads_from_files_are_listed_and_still_posted(tmp_path: Path) -> None:
    source = tmp_path / "files.sh"
    source.write_text(
        "curl --json @order.json https://api.example.com/orders\n"
        "curl --data-urlencode 'note@note.txt' --data-urlencode '=a b' https://api.example.com/n\n"
    )
    code, out, err = baton("import", "curl", str(source))
    assert code == 0, err
    for expected in (
        "line 1 --json: the body is read from a file (@order.json)",
        "line 2 --data-urlencode: the value is read from a file (note@note.txt)",
    ):
        assert f"not translated: {source}: {expected}" in err
    tests = yaml.safe_load(out)["tests"]
    assert tests["post_orders"]["request"]["method"] == "POST"
    assert "body" not in tests["post_orders"]["request"]
    # '=a b' sends the content alone, encoded; the file's field is not sent empty
    assert tests["post_n"]["request"]["body"] == "a+b"


def test_a_password_in_the_url_becomes_auth_basic_and_authenticates(
    env: dict[str, str], tmp_path: Path
) -> None:
    """``curl https://user:password@host/``: curl sends Basic from the URL's userinfo; the
    flow gets ``auth: {basic: ...}`` with the password a secret, and neither the test's URL
    nor the base URL holds it."""
    with auth_server() as server:
        url = server.url.replace("://", f"://{server.user}:{server.password}@", 1)
        source = tmp_path / "userinfo.sh"
        source.write_text(f"curl -f {url}/basic\n")
        flow_path = tmp_path / "flow.yaml"
        code, out, err = baton("import", "curl", str(source), "-o", str(flow_path))
        assert code == 0, err
        text = flow_path.read_text()
        assert server.password not in text + err
        flow = yaml.safe_load(text)
        assert flow["variables"] == {"base_url": server.url}
        request = flow["tests"]["get_basic"]["request"]
        assert request["url"] == "/basic"
        assert request["auth"] == {
            "basic": {"username": "alice", "password": "{{ secrets.PASSWORD }}"}
        }
        assert f"secret to provide: PASSWORD (the value found at {source}: line 1 -u" in err
        secrets = tmp_path / "secrets.yaml"
        secrets.write_text(f"PASSWORD: {server.password}\n")
        code, out, err = baton("run", str(flow_path), "--secrets", str(secrets))
        assert code == 0, out + err
        assert out.splitlines()[-1].startswith("1 passed in "), out


def test_a_source_that_cannot_be_read_is_one_line_saying_why(tmp_path: Path) -> None:
    code, _, err = baton("import", "curl", str(tmp_path / "nope.sh"))
    assert code == 2
    assert err == f"error: {tmp_path / 'nope.sh'}: cannot read it (No such file or directory)\n"
    (tmp_path / "binary.sh").write_bytes(b"curl \xff\n")
    code, _, err = baton("import", "curl", str(tmp_path / "binary.sh"))
    assert code == 2
    assert err == f"error: {tmp_path / 'binary.sh'}: not a UTF-8 text file (at byte 5)\n"
