"""``baton import har``: a recording becomes a flow that runs again, capturing what the
later requests took from earlier responses instead of replaying recorded tokens and ids."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import yaml

from tests.cli import baton
from tests.har_recorder import record

DATA = Path(__file__).parent / "data" / "importers"
SHOP_HAR = DATA / "shop.har"


def recorded_values(har: Path) -> tuple[str, str]:
    """The access token and the cart id the recording's responses gave."""
    entries = json.loads(har.read_text())["log"]["entries"]
    bodies = [json.loads(e["response"]["content"]["text"] or "null") for e in entries]
    token = next(b["access_token"] for b in bodies if isinstance(b, dict) and "access_token" in b)
    cart = next(b["cart_id"] for b in bodies if isinstance(b, dict) and "cart_id" in b)
    return token, cart


def test_recorded_shop_session_runs_again(env: dict[str, str], tmp_path: Path) -> None:
    flow_path = tmp_path / "flow.yaml"
    code, out, err = baton(
        "import", "har", str(SHOP_HAR), "--host", "127.0.0.1", "-o", str(flow_path)
    )
    assert code == 0, out + err
    text = flow_path.read_text()
    token, cart_id = recorded_values(SHOP_HAR)
    assert token not in text and cart_id not in text and "secret-alice" not in text
    assert "logo.png: a static asset (.png file): left out" in err
    assert "requests to other hosts than --host left out: localhost:" in err
    assert "secret to provide: PASSWORD (the value found at" in err
    assert "params[1] receipt: the recording holds no file: put receipt.txt beside the flow" in err
    assert err.splitlines()[-1].startswith(f"imported 9 test(s) from {SHOP_HAR}")

    tests = yaml.safe_load(text)["tests"]
    assert tests["post_auth_login"]["capture"]["access_token"] == {"json": "$.access_token"}
    assert tests["post_auth_login"]["capture"]["session_cookie"] == {"cookie": "session"}
    assert (
        tests["get_catalog"]["request"]["headers"]["authorization"] == "Bearer {{ access_token }}"
    )
    assert tests["post_cart"]["capture"] == {"cart_id": {"json": "$.cart_id"}}
    assert tests["get_cart"]["request"]["url"] == "/cart/{{ cart_id }}"
    assert tests["post_checkout"]["request"]["json"] == {"cart_id": "{{ cart_id }}"}
    assert tests["get_orders"]["request"]["url"] == "/orders/{{ order_id }}"
    assert tests["get_session"]["request"]["headers"]["cookie"] == "session={{ session_cookie }}"
    assert tests["post_cart"]["expect"] == {"status": 201}
    assert tests["post_echo"]["request"]["multipart"] == {
        "order": "thanks",
        "receipt": {"file": "receipt.txt", "content_type": "text/plain"},
    }
    assert "content-type" not in tests["post_echo"]["request"]["headers"]  # its own boundary

    secrets = tmp_path / "secrets.yaml"
    secrets.write_text("PASSWORD: secret-alice\n")
    (tmp_path / "receipt.txt").write_text("order received\n")
    options = ("--var", f"base_url={env['SHOP_URL']}", "--secrets", str(secrets))
    code, out, err = baton("run", str(flow_path), *options)
    assert code == 0, out + err
    assert out.splitlines()[-1].startswith("9 passed in "), out


def test_a_fresh_recording_imports_and_runs(env: dict[str, str], tmp_path: Path) -> None:
    har = tmp_path / "fresh.har"
    har.write_text(json.dumps(record(env["SHOP_URL"])))
    flow_path = tmp_path / "flow.yaml"
    code, out, err = baton("import", "har", str(har), "-o", str(flow_path))
    assert code == 0, out + err
    # without --host the second host name stays, as an absolute URL
    tests = yaml.safe_load(flow_path.read_text())["tests"]
    assert tests["get_health_2"]["request"]["url"].startswith("http://localhost:")
    secrets = tmp_path / "secrets.yaml"
    secrets.write_text("PASSWORD: secret-alice\n")
    (tmp_path / "receipt.txt").write_text("order received\n")
    code, out, err = baton("run", str(flow_path), "--secrets", str(secrets))
    assert code == 0, out + err
    assert out.splitlines()[-1].startswith("10 passed in "), out


def test_a_public_browser_recording_keeps_the_page_and_lists_the_assets(tmp_path: Path) -> None:
    har = DATA / "sitespeed-http1.1-chrome.har"
    flow_path = tmp_path / "flow.yaml"
    code, out, err = baton("import", "har", str(har), "-o", str(flow_path))
    assert code == 0, out + err
    notes = [line for line in err.splitlines() if "a static asset" in line]
    assert len(notes) == 12
    assert f"not translated: {har}: log.entries[1] GET https://www.sitespeed.io/img/" in notes[0]
    flow = yaml.safe_load(flow_path.read_text())
    assert flow["variables"] == {"base_url": "https://www.sitespeed.io"}
    assert list(flow["tests"]) == ["get"]
    assert flow["tests"]["get"]["expect"] == {"status": 200}
    code, out, err = baton("validate", str(flow_path))
    assert code == 0, out + err

    code, out, err = baton("import", "har", str(har), "--host", "www.sitespeed.io")
    assert code == 0, err
    assert "requests to other hosts than --host left out: ssl.google-analytics.com (2)" in err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"log": {"entries": [}', "line 1 column 22: not JSON"),
        ('{"log": {}}', "log.entries: not a HAR file"),
        (
            '{"log": {"entries": [{"request": {"method": "GET"}}]}}',
            "log.entries[0].request: an entry needs",
        ),
        (
            '{"log": {"entries": [{"request": {"method": "GET", "url": "https://a.example/x.png"}}]}}',
            "log.entries: no request left to import",
        ),
    ],
)
def test_a_malformed_har_is_one_line_and_exit_2(tmp_path: Path, text: str, message: str) -> None:
    source = tmp_path / "bad.har"
    source.write_text(text)
    code, out, err = baton("import", "har", str(source))
    assert code == 2
    assert out == ""
    assert err.startswith(f"error: {source}: {message}"), err
    assert len(err.splitlines()) == 1


def test_host_is_refused_for_other_kinds(tmp_path: Path) -> None:
    source = tmp_path / "c.sh"
    source.write_text("curl https://a.example/\n")
    code, _, err = baton("import", "curl", str(source), "--host", "a.example")
    assert code == 2
    assert err == "error: --host filters the requests of a HAR file, not of curl: remove it\n"


def test_json_nested_without_end_is_refused_in_one_line(tmp_path: Path) -> None:
    source = tmp_path / "deep.har"
    source.write_text('{"log": {"entries": ' + "[" * 100_000 + "]" * 100_000 + "}}")
    code, out, err = baton("import", "har", str(source))
    assert code == 2
    assert out == ""
    assert err == f"error: {source}: nested too deeply to import (split or flatten it)\n"


def test_a_recorded_basic_authorization_becomes_auth_basic(tmp_path: Path) -> None:
    encoded = base64.b64encode(b"alice:har-secret-pw").decode()
    har = {
        "log": {
            "version": "1.2",
            "entries": [
                {
                    "request": {
                        "method": "GET",
                        "url": "https://api.example.com/me",
                        "headers": [
                            {"name": "Authorization", "value": f"Basic {encoded}"},
                            {"name": "Accept", "value": "application/json"},
                        ],
                    },
                    "response": {"status": 200, "headers": [], "content": {"text": "{}"}},
                }
            ],
        }
    }
    source = tmp_path / "basic.har"
    source.write_text(json.dumps(har))
    code, out, err = baton("import", "har", str(source))
    assert code == 0, err
    assert encoded not in out and "har-secret-pw" not in out
    request = yaml.safe_load(out)["tests"]["get_me"]["request"]
    assert request["auth"] == {"basic": {"username": "alice", "password": "{{ secrets.PASSWORD }}"}}
    assert request["headers"] == {"Accept": "application/json"}
    assert "secret to provide: PASSWORD (the value found at " in err
    assert "header Authorization: the password of alice)" in err


def test_base64_and_binary_request_bodies(tmp_path: Path) -> None:
    def entry(path: str, post: dict[str, str]) -> dict[str, object]:
        request = {"method": "POST", "url": f"https://api.example.com{path}", "postData": post}
        return {"request": request, "response": {"status": 201, "headers": [], "content": {}}}

    order = base64.b64encode(b'{"sku": "caf\xc3\xa9-42"}').decode()
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n\x00\x00").decode()
    har = {
        "log": {
            "version": "1.2",
            "entries": [
                entry(
                    "/orders", {"mimeType": "application/json", "text": order, "encoding": "base64"}
                ),
                entry("/avatar", {"mimeType": "image/png", "text": png, "encoding": "base64"}),
                # binary as text, as a browser writes it: its UTF-8 bytes are not the recorded ones
                entry("/blob", {"mimeType": "application/octet-stream", "text": "\x89PNG\x00\x01"}),
            ],
        }
    }
    source = tmp_path / "bodies.har"
    source.write_text(json.dumps(har))
    code, out, err = baton("import", "har", str(source))
    assert code == 0, err
    tests = yaml.safe_load(out)["tests"]
    assert tests["post_orders"]["request"]["json"] == {"sku": "café-42"}
    for index, name, mime in (
        (1, "post_avatar", "image/png"),
        (2, "post_blob", "application/octet-stream"),
    ):
        assert set(tests[name]["request"]) == {"method", "url"}
        expected = f"not translated: {source}: log.entries[{index}] body: a binary body ({mime})"
        assert expected in err


def test_a_password_in_a_recorded_url_becomes_auth_basic(tmp_path: Path) -> None:
    entry = {
        "request": {"method": "GET", "url": "https://bob:url-pw-4711@api.example.com/me"},
        "response": {"status": 200, "headers": [], "content": {"text": "{}"}},
    }
    source = tmp_path / "userinfo.har"
    source.write_text(json.dumps({"log": {"version": "1.2", "entries": [entry]}}))
    code, out, err = baton("import", "har", str(source))
    assert code == 0, err
    assert "url-pw-4711" not in out + err
    flow = yaml.safe_load(out)
    assert flow["variables"] == {"base_url": "https://api.example.com"}
    request = flow["tests"]["get_me"]["request"]
    assert request == {
        "url": "/me",
        "auth": {"basic": {"username": "bob", "password": "{{ secrets.PASSWORD }}"}},
    }
    assert "url: the password of bob)" in err


def test_a_host_the_recording_lacks_names_the_hosts_it_has() -> None:
    code, out, err = baton("import", "har", str(SHOP_HAR), "--host", "127.0.0.1:8765")
    assert code == 2 and out == ""
    assert err == (
        f"error: {SHOP_HAR}: log.entries: no request left to import (none to the --host"
        " given; the recording's hosts: 127.0.0.1:36739, localhost:36739)\n"
    )
