"""The context is a pure fold of a run's events: incremental, time-travelling, secret-safe."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import msgspec
import pytest
from cryptography.fernet import Fernet

from events import types as ev
from events.context import (
    Context,
    ContextError,
    context_at,
    decrypted_variables,
    evolve,
    fold,
    redacted,
)
from events.secrets import Cipher, SecretError, is_encrypted

CIPHER = Cipher(Fernet.generate_key())
TOKEN = "eyJhbGciOi.secret-jwt.payload"
PASSWORD = "s3cr3t-cart-pass"
STREAM = "run-r1"
WHEN = datetime(2025, 1, 1, tzinfo=UTC)


def recorded(
    events: list[ev.Event], stream: str = STREAM, first_position: int = 100
) -> list[ev.RecordedEvent]:
    # positions interleave with other runs' events in the global log, hence the gaps
    return [
        ev.RecordedEvent(uuid.uuid4(), stream, n + 1, first_position + 3 * n, WHEN, event)
        for n, event in enumerate(events)
    ]


def realistic_run() -> list[ev.RecordedEvent]:
    sealed_token = CIPHER.encrypt(TOKEN)
    sealed_pass = CIPHER.encrypt(PASSWORD)
    plan = [ev.PlannedTest("login"), ev.PlannedTest("catalog"), ev.PlannedTest("cart")]
    return recorded(
        [
            ev.RunStarted("r1", "shop checkout", "digest", plan, environment="staging"),
            ev.TestStarted("login"),
            ev.RequestSent("login", 1, "POST", "http://shop/auth/login"),
            ev.ResponseReceived("login", 1, 200, {}, "{}", ev.Timings(12.0)),
            ev.AuthTokenUpdated("login", "auth.token", sealed_token),
            ev.VariableCaptured("login", "user_id", 7),
            ev.TestPassed("login", 1, 12.5),
            ev.TestStarted("catalog"),
            ev.VariableCaptured("catalog", "product_id", 3),
            ev.VariableCaptured("catalog", "cart.password", sealed_pass, secret=True),
            ev.TestPassed("catalog", 1, 8.0),
            ev.TestStarted("cart"),
            ev.TestStarted("cart", attempt=2),
            ev.TestFailed("cart", 2, 30.0, "server_error", "503 from /cart"),
            ev.TestSkipped("checkout", "add_to_cart failed", "dependency_skipped"),
            ev.RunCompleted("failed", passed=2, failed=1, skipped=1, duration_ms=60.0),
        ]
    )


def test_fold_of_a_realistic_run() -> None:
    events = realistic_run()
    context = fold(events)
    assert (context.run_id, context.suite, context.environment) == (
        "r1",
        "shop checkout",
        "staging",
    )
    assert context.status == "failed"
    assert context.order == ["login", "catalog", "cart", "checkout"]
    assert context.statuses == {
        "login": "passed",
        "catalog": "passed",
        "cart": "failed",
        "checkout": "skipped",
    }
    assert context.attempts == {"login": 1, "catalog": 1, "cart": 2}
    assert context.variables["user_id"] == 7
    assert context.variables["product_id"] == 3
    assert "auth.token" not in context.variables
    assert set(context.auth) == {"token"}
    assert context.captured["login"]["user_id"] == 7
    assert set(context.captured) == {"login", "catalog"}
    assert (context.stream, context.version, context.position) == (STREAM, 16, 145)


def test_secrets_stay_ciphertext_in_the_context_and_its_serialised_form() -> None:
    context = fold(realistic_run())
    assert is_encrypted(context.auth["token"])
    assert is_encrypted(context.variables["cart.password"])
    assert is_encrypted(context.captured["login"]["auth.token"])
    # what a cache stores: no clear secret anywhere in it
    blob = msgspec.json.encode(context)
    assert TOKEN.encode() not in blob
    assert PASSWORD.encode() not in blob
    assert msgspec.json.decode(blob, type=Context) == context


def test_redacted_context_shows_no_ciphertext() -> None:
    context = fold(realistic_run())
    shown = redacted(context)
    assert shown.auth == {"token": "***"}
    assert shown.variables == {"user_id": 7, "product_id": 3, "cart.password": "***"}
    assert shown.captured["login"] == {"auth.token": "***", "user_id": 7}
    assert b"enc:v1:" not in msgspec.json.encode(shown)
    assert is_encrypted(context.auth["token"])  # the original is untouched


def test_decrypted_variables_nest_dotted_names_for_templates() -> None:
    namespace = decrypted_variables(fold(realistic_run()), CIPHER)
    assert namespace == {
        "auth": {"token": TOKEN},
        "user_id": 7,
        "product_id": 3,
        "cart": {"password": PASSWORD},
    }


def test_decrypting_with_another_key_fails_clearly() -> None:
    other = Cipher(Fernet.generate_key())
    with pytest.raises(SecretError, match="another key"):
        decrypted_variables(fold(realistic_run()), other)


def test_incremental_fold_equals_full_fold_at_every_split() -> None:
    events = realistic_run()
    full = fold(events)
    for split in range(len(events) + 1):
        head = fold(events[:split])
        snapshot = msgspec.json.encode(head)
        assert fold(events[split:], head) == full, split
        assert msgspec.json.encode(head) == snapshot  # fold left its starting point alone
    stepped = Context()
    for event in events:
        stepped = evolve(stepped, event)
    assert stepped == full


def test_overlapping_reads_fold_once() -> None:
    events = realistic_run()
    head = fold(events[:10])
    # a cache that re-reads from an older version folds the overlap harmlessly
    assert fold(events[5:], head) == fold(events)
    assert fold(events + events) == fold(events)


def test_context_at_travels_back_in_time() -> None:
    events = realistic_run()
    assert context_at(events, 0) == Context()
    first = context_at(events, events[0].position)
    assert (first.run_id, first.status, first.statuses, first.version) == ("r1", "running", {}, 1)

    after_login = context_at(events, events[6].position)
    assert after_login.statuses == {"login": "passed"}
    assert after_login.order == ["login"]
    assert set(after_login.auth) == {"token"}
    assert "product_id" not in after_login.variables
    assert after_login.status == "running"

    # a position between two events: the context after the earlier one
    between = context_at(events, events[8].position + 1)
    assert between.version == 9
    assert between.variables["product_id"] == 3
    assert between.statuses["catalog"] == "running"

    retrying = context_at(events, events[12].position)
    assert retrying.attempts["cart"] == 2
    assert retrying.statuses["cart"] == "running"

    assert context_at(events, events[-1].position + 1000) == fold(events)


def test_cancelled_run() -> None:
    events = recorded(
        [
            ev.RunStarted("r1", "s", "d", []),
            ev.TestStarted("login"),
            ev.RunCancelled("user pressed Ctrl-C"),
        ]
    )
    context = fold(events)
    assert context.status == "cancelled"
    assert context.statuses == {"login": "running"}
    assert context.order == []


def test_a_gap_or_another_stream_is_refused() -> None:
    events = realistic_run()
    with pytest.raises(ContextError, match=r"version 5 follows 3, 1 event\(s\) missing"):
        fold(events[:3] + events[4:])
    other = recorded([ev.TestStarted("x")] * 20, stream="run-other")
    with pytest.raises(ContextError, match="run-other"):
        fold(events[:3] + other[3:4])


def test_ten_thousand_events_decode_and_fold_to_every_capture() -> None:
    # how fast is bench/store_bench.py's to measure (bench/STORE.md), not a timed test's
    steps: list[ev.Event] = [ev.RunStarted("r1", "s", "d", [])]
    n = 0
    while len(steps) < 10_000:
        test = f"test_{n}"
        n += 1
        steps += [
            ev.TestStarted(test),
            ev.RequestSent(test, 1, "GET", "http://shop/catalog", {"Accept": "*/*"}),
            ev.ResponseReceived(test, 1, 200, {"a": "b"}, '{"id": 3}', ev.Timings(3.0)),
            ev.AssertionEvaluated(test, 1, "status", "equals", 200, 200, True),
            ev.VariableCaptured(test, f"var_{n}", n),
            ev.TestPassed(test, 1, 3.0),
        ]
    blob = msgspec.json.encode(recorded(steps[:10_000]))
    context = fold(msgspec.json.Decoder(list[ev.RecordedEvent]).decode(blob))
    assert context.version == 10_000
    captured = [e for e in steps[:10_000] if isinstance(e, ev.VariableCaptured)]
    assert len(captured) == 1_666
    assert all(context.variables[e.name] == e.value for e in captured)
