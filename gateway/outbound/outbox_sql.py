"""Prebuilt Core statements for the delivery worker's claims and outcomes.

Why (docs/performance.md §7, gateway/store/core.py): the worker claims and records every
outgoing mail, two per new ticket. Through the ORM that was an entity select plus one
unit-of-work UPDATE per claimed row, and per outcome an ``s.get(..., with_for_update=True)``
(whose autoflush wrote the previous row's changes) and another UPDATE: ~14% of the daemon's
CPU at 40 messages/s. The same reads and writes as statements built once here cost a fraction.

The statements write exactly what the ORM code wrote (same columns, same values); values the
ORM computed in Python from the row it had just locked (``claim_token + 1``, ``attempts + 1``,
``first_attempt_at`` when unset) are computed by the database on the same locked row.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Integer,
    LargeBinary,
    and_,
    bindparam,
    func,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.sql import Executable, Update

from gateway.store.core import table
from gateway.store.models import Outbox

__all__ = ["CLAIM_UPDATE", "NEXT_DUE", "OUTCOME_ROWS", "SENT_ALL", "SENT_UPDATE", "claim_select"]

_T = table(Outbox)
_C = _T.c

#: The columns a claim needs: what `_Claimed` carries, plus what the take-over warning names.
_CLAIM_COLUMNS = (
    _C.id,
    _C.ticket_id,
    _C.kind,
    _C.mail_from,
    _C.rcpt_tos,
    _C.message_id,
    _C.raw,
    _C.first_attempt_at,
    _C.claim_token,
    _C.state,
    _C.claimed_by,
    _C.claim_boot,
)

_claim_selects: dict[tuple[int, bool], Executable] = {}


def claim_select(batch: int, postgres: bool = False) -> Executable:
    """Due rows (queued and due, or sending past their lease), oldest first, at most `batch`,
    locked (``FOR UPDATE SKIP LOCKED`` on PostgreSQL; SQLite has one writer). Parameter:
    ``now``. Built once per batch size (a worker has one) and dialect."""
    cached = _claim_selects.get((batch, postgres))
    if cached is None:
        now = bindparam("now", type_=_C.next_attempt_at.type)
        queued = and_(_C.state == "queued", _C.next_attempt_at <= now)
        # Its node stopped renewing (died, or lost the database): fair game again.
        expired = and_(_C.state == "sending", _C.claimed_until < now)
        if postgres:
            cached = _two_scans(batch, queued, expired)
        else:
            cached = (
                select(*_CLAIM_COLUMNS)
                .where(or_(queued, expired))
                .order_by(_C.next_attempt_at, _C.id)
                .limit(batch)
            )
        _claim_selects[(batch, postgres)] = cached
    return cached


def _two_scans(batch: int, queued: Any, expired: Any) -> Executable:
    """The claim on PostgreSQL: each kind of due row by an ordered index scan of its own,
    locked as it is found, then the oldest `batch` of both. One ``... OR ...`` was answered
    by bitmap index scans, which never mark dead index entries: every claim read all the
    entries of the rows sent since the last vacuum (0.76 million in 40 s at 50 messages a
    second, docs/performance.md §8); a plain index scan marks them as it passes, as the
    shared spool's claim does (gateway/shared_spool.py). Rows locked by a scan but left out
    by the final LIMIT are free again when the claim commits, a moment later."""
    waiting = (
        select(_C.id)
        .where(queued)
        .order_by(_C.next_attempt_at, _C.id)
        .limit(batch)
        .with_for_update(skip_locked=True)
        .cte("waiting")
    )
    lapsed = (
        select(_C.id)
        .where(expired)
        .order_by(_C.id)
        .limit(batch)
        .with_for_update(skip_locked=True)
        .cte("lapsed")
    )
    due = select(waiting.c.id).union_all(select(lapsed.c.id))
    # Locked again (they are this transaction's already, so nothing waits): a locking read
    # returns each row as its latest committed version, as the scans judged it, where a
    # plain read would return it as of the statement's start, possibly with the fencing
    # token of a claim that committed in between.
    return (
        select(*_CLAIM_COLUMNS)
        .where(_C.id.in_(due))
        .order_by(_C.next_attempt_at, _C.id)
        .limit(batch)
        .with_for_update(skip_locked=True)
    )


#: Claims the rows ``ids`` (just selected and locked) for this run. Parameters: ``ids``,
#: ``c_now``, ``c_until``, ``c_by``, ``c_boot``. A fresh fencing token (``claim_token`` + 1)
#: and ``first_attempt_at`` stamped on the first claim only.
CLAIM_UPDATE: Update = (
    update(_T)
    .where(_C.id.in_(bindparam("ids", expanding=True)))
    .values(
        state="sending",
        claimed_until=bindparam("c_until", type_=_C.claimed_until.type),
        claimed_by=bindparam("c_by", type_=_C.claimed_by.type),
        claim_boot=bindparam("c_boot", type_=_C.claim_boot.type),
        claim_token=func.coalesce(_C.claim_token, literal(0)) + 1,
        first_attempt_at=func.coalesce(
            _C.first_attempt_at, bindparam("c_now", type_=_C.first_attempt_at.type)
        ),
    )
)

#: The state and fencing token of the rows ``ids``, locked (PostgreSQL) so that no claim
#: slips in between the check and the write of their outcomes.
OUTCOME_ROWS = (
    select(_C.id, _C.state, _C.claim_token)
    .where(_C.id.in_(bindparam("ids", expanding=True)))
    .with_for_update()
)


def _sent(now: Any, raw: Any) -> dict[str, Any]:
    """What a delivery the relay took for every recipient writes: sent at `now`, with the
    signed bytes `raw` that went out (both SQL expressions)."""
    return {
        "attempts": _C.attempts + 1,
        "claimed_until": None,
        "state": "sent",
        "sent_at": now,
        "raw": raw,
        "last_error": "",
    }


#: A delivery that the relay took for every recipient: one executemany over parameters
#: ``o_id``, ``o_now`` (sent_at), ``o_raw`` (the signed bytes that went out).
SENT_UPDATE: Update = (
    update(_T)
    .where(_C.id == bindparam("o_id", type_=_C.id.type))
    .values(_sent(bindparam("o_now", type_=_C.sent_at.type), bindparam("o_raw", type_=_C.raw.type)))
)

#: PostgreSQL: a batch the relay took for every recipient, in ONE statement (arrays
#: ``ids``, ``tokens``, ``raws``; ``now``, sent_at): what `OUTCOME_ROWS` and one
#: `SENT_UPDATE` per row did, a round trip per mail sent (two per new ticket). Only the rows
#: still under the claim (state ``sending``, the same fencing token) change; the ids
#: returned are those, any other was claimed again meanwhile (stale).
_SENT = (
    func.unnest(
        bindparam("ids", type_=ARRAY(Integer)),
        bindparam("tokens", type_=ARRAY(BigInteger)),
        bindparam("raws", type_=ARRAY(LargeBinary)),
    )
    .table_valued("id", "token", "raw")
    .render_derived(name="sent")
)
SENT_ALL: Update = (
    update(_T)
    .where(_C.id == _SENT.c.id, _C.state == "sending", _C.claim_token == _SENT.c.token)
    .values(_sent(bindparam("now", type_=_C.sent_at.type), _SENT.c.raw))
    .returning(_C.id)
)

#: When the earliest queued row is due and when the earliest lease runs out (NULL: none),
#: in one round trip. The worker reads it after every pass: built through the ORM each
#: time (two selects, compiled and cached by key) it cost more than the claim itself.
NEXT_DUE = select(
    select(func.min(_C.next_attempt_at))
    .where(_C.state == "queued")
    .scalar_subquery()
    .label("queued"),
    select(func.min(_C.claimed_until))
    .where(_C.state == "sending")
    .scalar_subquery()
    .label("lease"),
)
