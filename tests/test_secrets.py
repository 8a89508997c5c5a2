"""Secrets: encryption and its key, and redaction in every form a secret can leak in."""

from __future__ import annotations

import base64
import io
import json
import multiprocessing
import os
import re
import stat
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
from cryptography.fernet import Fernet

from events import types as ev
from events.secrets import (
    GENERATE_HINT,
    KEY_FILE,
    MASK,
    Cipher,
    Redactor,
    SecretError,
    is_encrypted,
    is_secret_capture,
    load_key,
    masked_event,
    reads_auth,
    secret_references,
)

# A canary with every character that encodings treat specially: quote, slash, plus, space.
CANARY = 'hunter2 "s3cr/t+key"'


def fernet_key() -> str:
    return Fernet.generate_key().decode()


# ---- encryption ---------------------------------------------------------------------------


def test_round_trip_and_ciphertext_never_contains_the_clear_value() -> None:
    cipher = Cipher(load_key(fernet_key(), Path("/nonexistent")))
    token = cipher.encrypt(CANARY)
    assert is_encrypted(token)
    assert token.startswith("enc:v1:")
    assert "hunter2" not in token
    assert cipher.decrypt(token) == CANARY
    # a fresh nonce each time: equal secrets are not recognisable as equal in the log
    assert cipher.encrypt(CANARY) != token
    assert cipher.decrypt(cipher.encrypt("")) == ""
    assert cipher.decrypt(cipher.encrypt("ünïcødé ✓")) == "ünïcødé ✓"


def test_wrong_key_is_a_clear_error() -> None:
    token = Cipher(fernet_key()).encrypt(CANARY)
    with pytest.raises(SecretError, match=r"encrypted with another key.*BATON_SECRET_KEY"):
        Cipher(fernet_key()).decrypt(token)


def test_damaged_token_and_clear_text_are_errors() -> None:
    cipher = Cipher(fernet_key())
    token = cipher.encrypt(CANARY)
    damaged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    with pytest.raises(SecretError, match="damaged"):
        cipher.decrypt(damaged)
    with pytest.raises(SecretError, match="not an encrypted value"):
        cipher.decrypt(CANARY)
    assert not is_encrypted(CANARY)
    assert not is_encrypted(42)


def test_secret_key_from_environment_is_used_and_nothing_is_written(tmp_path: Path) -> None:
    key = fernet_key()
    home = tmp_path / "home"
    token = Cipher(load_key(key, home)).encrypt(CANARY)
    assert Cipher(key).decrypt(token) == CANARY
    assert not (home / KEY_FILE).exists()


@pytest.mark.parametrize(
    "bad", ["not-a-key", "x" * 44, base64.urlsafe_b64encode(b"short").decode(), "a b c"]
)
def test_malformed_secret_key_says_how_to_make_one(tmp_path: Path, bad: str) -> None:
    with pytest.raises(SecretError) as error:
        load_key(bad, tmp_path)
    message = str(error.value)
    assert "BATON_SECRET_KEY" in message
    assert GENERATE_HINT in message
    assert bad not in message  # a mistyped key may still be a real secret


def test_standard_base64_key_is_accepted() -> None:
    raw = os.urandom(32)
    assert load_key(base64.b64encode(raw).decode(), Path("/nonexistent")) == raw


def test_generated_key_file_is_private_and_reused(tmp_path: Path) -> None:
    home = tmp_path / "not" / "yet" / "there"
    key = load_key(None, home)
    path = home / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = Cipher(key).encrypt(CANARY)
    # a later process finds the same key and reads what the first one wrote
    assert load_key(None, home) == key
    assert load_key("", home) == key  # an empty BATON_SECRET_KEY means unset
    assert Cipher(load_key(None, home)).decrypt(token) == CANARY
    # the file holds a key one can copy into BATON_SECRET_KEY elsewhere
    assert load_key(path.read_text(), tmp_path / "elsewhere") == key
    assert [p.name for p in home.iterdir()] == [KEY_FILE]


def _load_in_child(home: str) -> bytes:
    return load_key(None, Path(home))


def test_processes_racing_for_the_first_key_agree(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    with context.Pool(6) as pool:
        keys = pool.map(_load_in_child, [str(tmp_path)] * 12)
    assert len(set(keys)) == 1
    assert [p.name for p in tmp_path.iterdir()] == [KEY_FILE]


def test_corrupt_key_file_names_the_file(tmp_path: Path) -> None:
    (tmp_path / KEY_FILE).write_text("garbage\n")
    with pytest.raises(SecretError, match=str(tmp_path / KEY_FILE)):
        load_key(None, tmp_path)


def test_cipher_repr_does_not_show_the_key() -> None:
    key = fernet_key()
    assert key not in repr(Cipher(key))
    assert "hunter2" not in repr(Redactor([CANARY]))


# ---- redaction ----------------------------------------------------------------------------


def _b64_forms(data: bytes) -> list[str]:
    std = base64.b64encode(data).decode()
    url = base64.urlsafe_b64encode(data).decode()
    return [std, std.rstrip("="), url, url.rstrip("=")]


ENCODINGS = {
    "clear": CANARY,
    "quote": quote(CANARY, safe=""),
    "quote path": quote(CANARY),
    "quote_plus": quote_plus(CANARY),
    "quote lowercase hex": re.sub("%[0-9A-F]{2}", lambda m: m.group().lower(), quote(CANARY)),
    "json": json.dumps(CANARY)[1:-1],
    "json slash": json.dumps(CANARY)[1:-1].replace("/", "\\/"),
    **{f"base64 {i}": form for i, form in enumerate(_b64_forms(CANARY.encode()))},
}


@pytest.mark.parametrize("name", ENCODINGS)
def test_every_encoding_of_a_secret_is_masked(name: str) -> None:
    encoded = ENCODINGS[name]
    redactor = Redactor([CANARY])
    out = redactor.redact(f"before {encoded} after")
    assert out == f"before {MASK} after"


def test_secret_in_json_document_and_url_query() -> None:
    redactor = Redactor([CANARY])
    document = json.dumps({"password": CANARY, "note": "ok"})
    assert json.loads(redactor.redact(document)) == {"password": MASK, "note": "ok"}
    url = f"https://api.example/login?user=alice&password={quote_plus(CANARY)}"
    assert redactor.redact(url) == "https://api.example/login?user=alice&password=***"


@pytest.mark.parametrize("user", ["alice", "al", "a", "bob@example.com"])
@pytest.mark.parametrize("trailer", ["", "x", "xy"])
def test_secret_inside_longer_base64_is_masked(user: str, trailer: str) -> None:
    """``Basic base64(user:password)`` echoed in a body, at every alignment of the password:
    no base64 character that carries a bit of the password is left."""
    password = "correct horse/battery+staple"
    prefix, total = len(user) + 1, len(user) + 1 + len(password) + len(trailer)
    encoded = base64.b64encode(f"{user}:{password}{trailer}".encode()).decode()
    out = Redactor([password]).redact(f'{{"echoed": "Basic {encoded}"}}')
    left, right = out.split("Basic ", 1)[1].split('"', 1)[0].split(MASK)
    assert encoded.startswith(left)
    assert encoded.endswith(right)
    # base64 character i carries bits 6i..6i+5; the password holds bits 8*prefix onwards
    assert len(left) <= 8 * prefix // 6
    password_end_char = -(-8 * (prefix + len(password)) // 6)
    assert len(right.rstrip("=")) <= -(-8 * total // 6) - password_end_char


def test_short_values_are_not_secrets() -> None:
    redactor = Redactor(["abc", "1"])
    assert len(redactor) == 0
    assert redactor.redact("abc 1 abcd") == "abc 1 abcd"
    redactor.add("abcd")
    assert redactor.redact("abc 1 abcd") == f"abc 1 {MASK}"


def test_secrets_learned_during_a_run_apply_from_then_on() -> None:
    redactor = Redactor()
    assert redactor.redact("value=tok-123456") == "value=tok-123456"
    redactor.add("tok-123456")
    assert redactor.redact("value=tok-123456") == f"value={MASK}"
    redactor.add("second-secret")
    assert redactor.redact("tok-123456 second-secret") == f"{MASK} {MASK}"


def test_longest_secret_wins_when_one_contains_another() -> None:
    redactor = Redactor(["pass", "password-123"])
    assert redactor.redact("x password-123 y pass z") == f"x {MASK} y {MASK} z"


def test_text_without_secrets_is_returned_unchanged() -> None:
    redactor = Redactor([CANARY, "another-secret-value"])
    text = '{"products": [{"id": 3, "name": "widget"}]}' * 50
    assert redactor.redact(text) is text


def test_redact_value_walks_nested_data() -> None:
    redactor = Redactor([CANARY, "987654"])
    data: dict[str, Any] = {
        "user": {"password": CANARY, "tags": ["a", f"x{CANARY}y"]},
        "pin": 987654,
        "count": 9876543,
        "ok": True,
        "none": None,
    }
    assert redactor.redact_value(data) == {
        "user": {"password": MASK, "tags": ["a", f"x{MASK}y"]},
        "pin": MASK,
        "count": 9876543,
        "ok": True,
        "none": None,
    }
    assert data["user"]["password"] == CANARY  # the input is left as it was


def test_credential_headers_are_always_masked() -> None:
    redactor = Redactor([CANARY])
    headers = {
        "Authorization": "Bearer abc",
        "proxy-authorization": "Basic xyz",
        "Cookie": "sid=1",
        "Set-Cookie": "sid=1; HttpOnly",
        "X-API-Key": "k",
        "Api-Key": "k",
        "X-Auth-Token": "t",
        "X-Client-Secret": "s",
        "X-Apikey": "k",
        "Content-Type": "application/json",
        "X-Echo": f"value {CANARY}",
    }
    masked = redactor.mask_headers(headers)
    assert list(masked) == list(headers)
    plain = {"Content-Type": "application/json", "X-Echo": f"value {MASK}"}
    assert masked == {name: plain.get(name, MASK) for name in headers}


# ---- credentials by shape: values the flow never names --------------------------------------

RT = "rt-canary-9f3e1b7a"


@pytest.mark.parametrize(
    "name",
    [
        "password",
        "passwd",
        "userPassword",
        "secret",
        "client_secret",
        "access_token",
        "refresh_token",
        "id_token",
        "tokens",
        "api_key",
        "apikey",
        "X-Api-Key",
        "private_key",
        "authorization",
        "cookie",
        "session",
        "session_id",
        "jwt",
    ],
)
def test_values_of_credential_names_are_masked_at_any_depth(name: str) -> None:
    redactor = Redactor()
    document = {"user": {"id": 7, "profile": [{"name": "x", name: RT}]}, name: RT}
    for text in (json.dumps(document), json.dumps(document, indent=2)):
        out = redactor.redact(text)
        assert RT not in out
        assert json.loads(out) == {
            "user": {"id": 7, "profile": [{"name": "x", name: MASK}]},
            name: MASK,
        }
    assert redactor.redact_value(document)["user"]["profile"][0][name] == MASK
    assert redactor.redact(f"https://api.example/x?a=1&{name}={RT}&b=2") == (
        f"https://api.example/x?a=1&{name}={MASK}&b=2"
    )
    assert redactor.mask_headers({name: RT}) == {name: MASK}


def test_a_credential_holding_an_object_is_masked_whole() -> None:
    text = '{"tokens": {"access": "a1", "refresh": ["r1", {"x": "r2"}]}, "next": 3}'
    assert json.loads(Redactor().redact(text)) == {"tokens": MASK, "next": 3}


def test_credential_names_in_forms_cookies_reprs_and_json_inside_json() -> None:
    redactor = Redactor()
    cases = {
        f"grant_type=refresh&refresh_token={RT}&client_secret=cs-1": (
            f"grant_type=refresh&refresh_token={MASK}&client_secret={MASK}"
        ),
        f"session={RT}==; Path=/; HttpOnly": f"session={MASK}; Path=/; HttpOnly",
        f"user[password]={quote_plus(RT)}&user[name]=al": f"user[password]={MASK}&user[name]=al",
        f"{{'refresh_token': '{RT}', 'n': 1}}": f"{{'refresh_token': '{MASK}', 'n': 1}}",
        json.dumps({"body": json.dumps({"refresh_token": RT + '"x', "u": 1})}): json.dumps(
            {"body": json.dumps({"refresh_token": MASK, "u": 1})}
        ),
        f"Authorization: Bearer {RT}": f"Authorization: Bearer {MASK}",
    }
    for text, expected in cases.items():
        assert redactor.redact(text) == expected, text


def test_a_cut_json_excerpt_masks_to_its_end() -> None:
    text = f'{{"user_id": 1, "refresh_token": "{RT}", "session": {{"id": "{RT}"}}}}'
    for cut in range(len(text)):
        out = Redactor().redact(text[:cut])
        assert RT[:4] not in out, (cut, out)


def test_jwt_shaped_strings_are_masked_wherever_they_are() -> None:
    header = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=").decode()
    payload = base64.urlsafe_b64encode(b'{"sub":"42"}').rstrip(b"=").decode()
    jwt = f"{header}.{payload}.c2lnbmF0dXJlLXg_y-z"
    out = Redactor().redact(f'{{"note": "issued {jwt} today", "x": "{jwt}"}}')
    assert jwt not in out and payload not in out
    assert out == f'{{"note": "issued {MASK} today", "x": "{MASK}"}}'


PEM = "-----BEGIN RSA PRIVATE KEY-----\\nMIIEpAIBAAKCAQEA7d1\\n-----END RSA PRIVATE KEY-----"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ('{"AccessKeyId": "AKIAZ7QWERTYUIOP1234"}', '{"AccessKeyId": "***"}'),
        ("temporary ASIAZ7QWERTYUIOP1234 here", "temporary *** here"),
        ('{"value": "ghp_0123456789abcdefABCDEF0123456789abcd"}', '{"value": "***"}'),
        ("slack xoxb-123456789012-abcdefghijkl done", "slack *** done"),
        ("stripe sk_live_0123456789abcdefGHIJ", "stripe ***"),
        (f'{{"pem": "{PEM}\\n", "n": 1}}', '{"pem": "***\\n", "n": 1}'),
        ('{"pem": "-----BEGIN PRIVATE KEY-----\\nMIIEvQIBADAN', '{"pem": "***'),  # cut short
        (
            '{"link": "https://admin:u1pw-9a8b@db.example.com/x"}',
            '{"link": "https://admin:***@db.example.com/x"}',
        ),
        (
            '{"dsn": "redis://:p%40ss-42@127.0.0.1:6379/0"}',
            '{"dsn": "redis://:***@127.0.0.1:6379/0"}',
        ),
        ('{"link": "https:\\/\\/admin:pw-12345@db"}', '{"link": "https:\\/\\/admin:***@db"}'),
    ],
)
def test_credentials_are_masked_by_their_own_form_under_any_name(text: str, shown: str) -> None:
    assert Redactor().redact(text) == shown


def test_ordinary_texts_are_left_alone() -> None:
    redactor = Redactor()
    for text in (
        '{"products": [{"id": 3, "name": "monkey wrench", "keywords": ["tools"]}]}',
        "a basic example, key points: none; x=1&y=2",
        "GET /api/v1/runs?limit=10&sort=-started_at",
        # near misses of the credential forms: no password in a URL, too short, no prefix
        "mail alice@example.com at http://example.com:8080/a@b, ghp_short",
        "AKIA is a prefix; AKIAZ7QWERTYUIOP12345 is one character too long; thigh_ok",
    ):
        assert redactor.redact(text) is text


def test_the_credentials_a_request_sends_are_known_secrets_however_written() -> None:
    """A literal token in a credential header, a Basic password, a session cookie: a target
    that echoes one back under a name that says nothing shows a secret."""
    basic = base64.b64encode(b"alice:pa55-literal").decode()
    redactor = Redactor()
    redactor.add_sent_credentials(
        {
            "Authorization": "Bearer literal-bearer-77",
            "Proxy-Authorization": f"Basic {basic}",
            "X-Auth-Token": "tkn-header-99",
            "Cookie": "theme=dark; sid=sess-7f3a9c2e1b",
            "Accept": "application/json-seq",
        }
    )
    echoed = '{"seen": "literal-bearer-77", "pw": "pa55-literal", "t": "tkn-header-99", '
    echoed += '"sid": "sess-7f3a9c2e1b", "theme": "dark", "accept": "application/json-seq"}'
    assert redactor.redact(echoed) == (
        '{"seen": "***", "pw": "***", "t": "***", "sid": "***", "theme": "dark", '
        '"accept": "application/json-seq"}'
    )


def test_a_flow_adds_names_and_keeps_others() -> None:
    from events.secrets import policy_for

    text = json.dumps(
        {"ssn": "123-45-678", "user_ssn": "u", "card_number": "4111", "token_type": "Bearer"}
    )
    redactor = Redactor().scoped(policy_for(("ssn", "*card*"), ("token_type",)))
    assert json.loads(redactor.redact(text)) == {
        "ssn": MASK,
        "user_ssn": "u",  # a name without * is that name only
        "card_number": MASK,
        "token_type": "Bearer",
    }
    assert json.loads(Redactor().redact(text))["token_type"] == MASK
    # the credential headers of the design stay masked whatever a flow keeps
    keeping = Redactor().scoped(policy_for((), ("authorization", "x-session")))
    assert keeping.mask_headers({"Authorization": "Basic eA==", "X-Session": "s"}) == {
        "Authorization": MASK,
        "X-Session": "s",
    }


def test_scoped_redactors_share_the_secrets_they_learn() -> None:
    from events.secrets import policy_for

    run = Redactor()
    test = run.scoped(policy_for(("ssn",)))
    test.add("learned-in-a-test")
    assert run.redact("x learned-in-a-test") == f"x {MASK}"
    assert run.holds({"echo": ["learned-in-a-test"]})
    assert not run.holds({"echo": "something else"})


def test_an_excerpt_never_ends_in_part_of_a_secret() -> None:
    secret = "s3cr3t-value-that-is-long"
    redactor = Redactor([secret])
    for padding in range(40):
        text = "x" * (2048 - padding) + secret + "y" * 5000
        out = redactor.excerpt(text, 2048)
        assert len(out) == 2048 or out.endswith("y")
        assert secret[:4] not in out
    # shape rules too: a token cut by the limit is masked, not half shown
    body = "[" + ", ".join(f'{{"refresh_token": "{RT}-{i}"}}' for i in range(200)) + "]"
    assert RT not in redactor.excerpt(body, 2048)


def test_log_lines_are_redacted_with_every_live_runs_secrets_and_by_shape() -> None:
    import logging

    from events.secrets import RedactingFormatter

    run = Redactor([CANARY])
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(RedactingFormatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("baton.test.redaction")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("sent %s", f"https://x/?q={quote_plus(CANARY)}&refresh_token={RT}")
        try:
            raise ValueError(f"bad value {CANARY!r}")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "Traceback" in text
    for secret in (CANARY, RT):
        for form in {secret, quote_plus(secret), json.dumps(secret)[1:-1], repr(secret)[1:-1]}:
            assert form not in text, form
    assert len(run) == 1  # alive until here: its secrets are known to the log


# ---- which names are secret, and how an event is shown -----------------------------------


@pytest.mark.parametrize(
    ("name", "declared", "secret"),
    [
        ("auth.token", None, True),
        ("auth.refresh", False, False),
        ("token", None, False),
        ("author", None, False),
        ("auth", None, False),
        ("api_key", True, True),
        ("session", False, False),
    ],
)
def test_a_capture_is_secret_by_its_auth_name_or_what_it_declares(
    name: str, declared: bool | None, secret: bool
) -> None:
    assert is_secret_capture(name, declared) is secret


@pytest.mark.parametrize(
    ("reference", "reads"),
    [("auth.token", True), ("auth.token.raw", True), ("auth", True), ("author", False)],
)
def test_a_template_reads_auth_tokens_only_in_the_auth_namespace(
    reference: str, reads: bool
) -> None:
    assert reads_auth(reference) is reads


def test_secret_references_are_found_by_attribute_and_by_key() -> None:
    text = "{{ secrets.A }} {{ secrets['B'] }} {{ secrets[\"C\"] | default('x') }} {{ secretsX }}"
    assert secret_references(text) == {"A", "B", "C"}


def test_an_event_is_shown_with_every_secret_capture_masked_and_nothing_else() -> None:
    token = ev.AuthTokenUpdated(test="login", name="auth.token", value="enc:v1:ab:cd")
    sealed = ev.VariableCaptured(test="login", name="sid", value="enc:v1:ab:ef", secret=True)
    plain = ev.VariableCaptured(test="login", name="author", value="ada")
    failed = ev.TestFailed(test="t", attempts=1, duration_ms=1.0, category="assertion", message="m")
    assert masked_event(token) == ev.AuthTokenUpdated(test="login", name="auth.token", value=MASK)
    assert masked_event(sealed) == ev.VariableCaptured(
        test="login", name="sid", value=MASK, secret=True
    )
    assert masked_event(plain) is plain
    assert masked_event(failed) is failed
