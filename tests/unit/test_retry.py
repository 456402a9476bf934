"""The Postfix-like retry schedule: clamp(age, 5 min, ~67 min) ± jitter, give up at 5 days."""

from __future__ import annotations

import itertools
import random
from datetime import UTC, datetime, timedelta

import pytest

from gateway.outbound.retry import (
    GIVE_UP_AFTER,
    JITTER,
    MAX_BACKOFF,
    MIN_BACKOFF,
    next_attempt,
)

T0 = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)


def delay_at(age: timedelta, seed: int = 1) -> timedelta:
    when = next_attempt(T0, T0 + age, random.Random(seed))
    assert when is not None
    return when - (T0 + age)


def within(delay: timedelta, base: timedelta) -> bool:
    return base * (1 - JITTER) <= delay <= base * (1 + JITTER)


def test_constants_match_postfix_defaults() -> None:
    assert MIN_BACKOFF.total_seconds() == 300
    assert MAX_BACKOFF.total_seconds() == 4000
    assert GIVE_UP_AFTER.days == 5


@pytest.mark.parametrize(
    ("age", "base"),
    [
        (timedelta(0), MIN_BACKOFF),
        (timedelta(minutes=2), MIN_BACKOFF),
        (timedelta(minutes=10), timedelta(minutes=10)),
        (timedelta(minutes=40), timedelta(minutes=40)),
        (timedelta(hours=3), MAX_BACKOFF),
        (timedelta(days=4, hours=23), MAX_BACKOFF),
    ],
)
def test_delay_is_clamped_age_with_jitter(age: timedelta, base: timedelta) -> None:
    for seed in range(50):
        assert within(delay_at(age, seed), base)


def test_jitter_actually_varies() -> None:
    delays = {delay_at(timedelta(hours=2), seed) for seed in range(20)}
    assert len(delays) > 10


def test_same_seed_same_answer() -> None:
    now = T0 + timedelta(minutes=17)
    assert next_attempt(T0, now, random.Random(7)) == next_attempt(T0, now, random.Random(7))


def test_gives_up_after_five_days() -> None:
    assert next_attempt(T0, T0 + GIVE_UP_AFTER, random.Random(1)) is None
    assert next_attempt(T0, T0 + timedelta(days=9), random.Random(1)) is None
    assert next_attempt(T0, T0 + GIVE_UP_AFTER - timedelta(seconds=1), random.Random(1))


def test_clock_going_backwards_counts_as_new() -> None:
    assert within(delay_at(-timedelta(hours=1)), MIN_BACKOFF)


def test_default_rng() -> None:
    when = next_attempt(T0, T0)
    assert when is not None
    assert within(when - T0, MIN_BACKOFF)


def test_whole_schedule_of_a_message_that_never_gets_through() -> None:
    rng = random.Random(2026)
    attempts = [T0]
    while (when := next_attempt(T0, attempts[-1], rng)) is not None:
        assert when > attempts[-1]
        attempts.append(when)
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    # Quick first retries, exponential back-off, then about once an hour.
    assert within(gaps[0], MIN_BACKOFF)
    assert gaps[4] > gaps[1] * 2
    assert all(g <= MAX_BACKOFF * (1 + JITTER) for g in gaps)
    assert all(within(g, MAX_BACKOFF) for g in gaps[10:])
    # The last attempt is made shortly after the 5-day mark, and that is the end.
    assert GIVE_UP_AFTER <= attempts[-1] - T0 < GIVE_UP_AFTER + MAX_BACKOFF * (1 + JITTER)
    assert 100 < len(attempts) < 130
