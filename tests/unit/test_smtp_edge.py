"""Pure decisions of the SMTP edge: dot-unstuffing in pieces, control characters, secrets."""

from __future__ import annotations

import random

import pytest

from gateway.inbound.smtp import control_character, unstuff
from gateway.settings import secret_problem


def _whole(data: bytes) -> bytes:
    # The reference: RFC 5321 §4.5.2 applied to the message in one piece.
    return (b"\r\n" + data).replace(b"\r\n.", b"\r\n")[2:]


def _pieces(data: bytes, cuts: list[int]) -> bytes:
    out = []
    tail = b"\r\n"
    last = 0
    for cut in [*cuts, len(data)]:
        piece = data[last:cut]
        last = cut
        if piece:
            out.append(unstuff(piece, tail))
            tail = (tail + piece)[-2:]
    return b"".join(out)


@pytest.mark.parametrize("seed", range(200))
def test_unstuffing_in_pieces_equals_unstuffing_the_whole(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = [b".", b"\r", b"\n", b"\r\n", b"\r\n.", b"..", b"a", b"x y"]
    data = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
    cuts = sorted(rng.sample(range(len(data) + 1), k=min(len(data), rng.randint(0, 12))))
    assert _pieces(data, cuts) == _whole(data)


def test_control_characters_are_found() -> None:
    assert control_character("pat@customer.example") is None
    assert control_character("pät@kunde.example") is None  # SMTPUTF8 is not a control
    assert control_character("n\x00ul@cust.example") == "\x00"
    assert control_character("a\rb@c.example") == "\r"
    assert control_character("del\x7f@c.example") == "\x7f"


def test_secret_strength() -> None:
    assert secret_problem("test-secret-key-0123456789abcdef") is None
    assert secret_problem("0123456789abcdef" * 4) is None  # what we generate: token_hex(32)
    assert "too short" in (secret_problem("a") or "")
    assert "too short" in (secret_problem("0123456789abcdef") or "")
    assert "variety" in (secret_problem("ab" * 20) or "")
