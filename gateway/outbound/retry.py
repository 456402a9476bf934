"""When to try a deferred outbound message again, and when to give up (docs/design.md §6).

The schedule follows Postfix's queue manager: the delay before the next attempt equals the
message's age, clamped between `minimal_backoff_time` (300 s) and `maximal_backoff_time`
(4000 s, about 67 minutes), so retries start quickly and back off exponentially to about
one per hour. After `maximal_queue_lifetime` (5 days, also RFC 5321 §4.5.4.1's "at least
4-5 days") the message is given up and its owner is told (not the customer).

Jitter (±10%) spreads retries of messages that failed together (a relay outage) so they
do not all come back in the same second.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta

MIN_BACKOFF = timedelta(seconds=300)  # Postfix minimal_backoff_time
MAX_BACKOFF = timedelta(seconds=4000)  # Postfix maximal_backoff_time (~67 min)
GIVE_UP_AFTER = timedelta(days=5)  # Postfix maximal_queue_lifetime
JITTER = 0.10  # ± fraction applied to the clamped delay

_rng = random.Random()  # noqa: S311 (retry jitter, not a secret)


def next_attempt(
    first_attempt_at: datetime, now: datetime, rng: random.Random | None = None
) -> datetime | None:
    """The time of the next delivery attempt, or None when the message must be given up.

    `first_attempt_at` is when the message was first tried (its age counts from there);
    `now` is the time of the attempt that just failed. Both must be aware (or both naive).
    A clock that went backwards (now < first_attempt_at) counts as age zero.
    """
    age = now - first_attempt_at
    if age >= GIVE_UP_AFTER:
        return None
    age = max(age, timedelta(0))
    delay = min(max(age, MIN_BACKOFF), MAX_BACKOFF)
    factor = (rng or _rng).uniform(1.0 - JITTER, 1.0 + JITTER)
    return now + delay * factor
