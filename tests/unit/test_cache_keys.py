"""Cache keys: message normalization, history digests, and key derivation."""

from __future__ import annotations

import re
from typing import Any

import pytest

from app.cache import cache_key, history_digest, normalize_message
from app.domain import Message

HISTORY: list[Message] = [
    {"role": "user", "content": "What is 2+2?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "calculator", "arguments": '{"expression": "2+2"}'},
            }
        ],
    },
    {"role": "tool", "content": "4", "tool_call_id": "call_1", "name": "calculator"},
    {"role": "assistant", "content": "It is 4."},
]


def key(**overrides: Any) -> str:
    args: dict[str, Any] = {
        "fingerprint": "f" * 64,
        "history": HISTORY,
        "message": "And 3+3?",
        "scope": "anon",
    }
    args.update(overrides)
    return cache_key(**args)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  hello   world \n", "hello world"),
        ("a\tb\r\nc\u00a0d", "a b c d"),
        ("Hello World", "Hello World"),
        ("cafe\u0301", "caf\u00e9"),  # decomposed e + combining acute -> NFC
        ("", ""),
        (" \n\t ", ""),
    ],
)
def test_normalize_message(text: str, expected: str) -> None:
    assert normalize_message(text) == expected


def test_normalize_keeps_case() -> None:
    assert normalize_message("ABC") != normalize_message("abc")


def test_key_is_sha256_hex_and_deterministic() -> None:
    first = key()
    assert re.fullmatch(r"[0-9a-f]{64}", first)
    assert key() == first
    assert key(history=[dict(m) for m in HISTORY]) == first  # equal copies, same key


def test_equivalent_messages_share_a_key() -> None:
    assert key(message="  And   3+3?\n") == key(message="And 3+3?")
    assert key(message="caf\u00e9") == key(message="cafe\u0301")
    assert key(message="and 3+3?") != key(message="And 3+3?")


def test_history_key_order_and_extra_fields_do_not_matter() -> None:
    reordered = [dict(reversed(list(m.items()))) for m in HISTORY]
    assert history_digest(reordered) == history_digest(HISTORY)
    with_extras = [{**m, "id": 42, "created_at": "2024-01-01"} for m in HISTORY]
    assert history_digest(with_extras) == history_digest(HISTORY)


def changed(index: int, **fields: Any) -> list[Message]:
    history = [dict(m) for m in HISTORY]
    history[index].update(fields)
    return history


@pytest.mark.parametrize(
    "history",
    [
        pytest.param(changed(0, content="What is 2+3?"), id="content"),
        pytest.param(changed(3, role="user"), id="role"),
        pytest.param(changed(2, tool_call_id="call_2"), id="tool_call_id"),
        pytest.param(changed(2, name="search"), id="name"),
        pytest.param(
            changed(
                1,
                tool_calls=[
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "calculator", "arguments": '{"expression":"2*2"}'},
                    }
                ],
            ),
            id="tool_calls",
        ),
        pytest.param([HISTORY[1], HISTORY[0], *HISTORY[2:]], id="order"),
        pytest.param(HISTORY[:-1], id="shorter"),
        pytest.param([], id="empty"),
    ],
)
def test_different_history_different_key(history: list[Message]) -> None:
    assert history_digest(history) != history_digest(HISTORY)
    assert key(history=history) != key()


def test_scope_and_fingerprint_are_part_of_the_key() -> None:
    keys = {
        key(),
        key(scope="shared"),
        key(scope="sub:alice"),
        key(scope="sub:bob"),
        key(fingerprint="e" * 64),
    }
    assert len(keys) == 5


@pytest.mark.parametrize("scope", ["", "sub:", "alice", "Anon", "subject:alice"])
def test_invalid_scope_is_refused(scope: str) -> None:
    with pytest.raises(ValueError, match="scope"):
        key(scope=scope)


def test_precomputed_history_digest() -> None:
    digest = history_digest(HISTORY)
    by_digest = cache_key(fingerprint="f" * 64, history_digest=digest, message="m", scope="anon")
    assert by_digest == cache_key(
        fingerprint="f" * 64, history_digest=digest, message=" m ", scope="anon"
    )
    assert by_digest != cache_key(
        fingerprint="f" * 64, history_digest="0" * 64, message="m", scope="anon"
    )
    assert key(history=HISTORY, message="m") == by_digest


@pytest.mark.parametrize("both", [True, False])
def test_history_xor_digest(both: bool) -> None:
    extra: dict[str, Any] = {"history": [], "history_digest": "x"} if both else {}
    with pytest.raises(TypeError, match="exactly one"):
        cache_key(fingerprint="f", message="m", scope="anon", **extra)


def test_framing_prevents_fields_bleeding_into_each_other() -> None:
    assert key(fingerprint="ab", message="c") != key(fingerprint="a", message="bc")
    assert key(message="x", scope="sub:y") != key(message="x sub:", scope="sub:y")
    assert key(fingerprint="a", scope="sub:bc") != key(fingerprint="a\x00", scope="sub:bc")
    # Field content that mimics the JSON framing cannot collide either.
    assert key(fingerprint='a","b') != key(fingerprint="a", message='b","And 3+3?')


def test_history_framing_prevents_messages_merging() -> None:
    one = [{"role": "user", "content": "ab"}, {"role": "user", "content": "c"}]
    two = [{"role": "user", "content": "a"}, {"role": "user", "content": "bc"}]
    assert history_digest(one) != history_digest(two)
    merged = [{"role": "user", "content": "abc"}]
    assert history_digest(merged) != history_digest(one)
