"""Several spool entries per database transaction (docs/decisions.md D16; docs/performance.md).

The pipeline processes up to `TX_BATCH` waiting entries in one transaction (one commit, one
spool release). Each message's outcome must stay its own: a message that fails takes none
of its neighbours with it, none of its own writes survive, and nobody's mail is recorded
twice when the group is redone one by one. Real SMTP in, the real pipeline, real SQLite.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlmodel import Session, select

from gateway.clock import FrozenClock
from gateway.pipeline.context import Context
from gateway.pipeline.thread import Disposition
from gateway.store.models import Message, Outbox, Ticket
from tests.conftest import make_settings
from tests.support.gateway import make_mail, running_gateway, send

SENDERS = [f"customer{i}@customer.example" for i in range(5)]


def _spool(spool_dir: Path) -> list[tuple[str, int]]:
    with contextlib.closing(sqlite3.connect(spool_dir / "spool.sqlite3")) as c:
        return [(r[0], r[1]) for r in c.execute("SELECT state, attempts FROM spool ORDER BY id")]


def json_rcpt(rcpt_tos: str) -> str:
    [to] = json.loads(rcpt_tos)
    return str(to)


def _commits(engine: Any) -> list[int]:
    """Counts the database commits made through `engine` (appends one per commit)."""
    seen: list[int] = []
    event.listen(engine, "commit", lambda conn: seen.append(1))
    return seen


async def test_a_group_commits_once_and_answers_everyone(
    tmp_path: Path, clock: FrozenClock
) -> None:
    settings = make_settings(tmp_path)
    async with running_gateway(settings, clock) as gw:
        assert gw.pipeline.tx_batch > 1
        # A group closes after TX_BUDGET seconds of work; a loaded test machine must not
        # split this one.
        gw.pipeline.tx_budget = 3600.0
        for i, sender in enumerate(SENDERS):
            await send(gw, make_mail(sender=sender, subject=f"Question {i}"))
        commits = _commits(gw.engine)
        assert await gw.pipeline.run_once() == len(SENDERS)
        assert len(commits) == 1  # the five messages in one transaction
        assert _spool(settings.spool_path) == []  # and all released
        with Session(gw.engine) as s:
            tickets = s.exec(select(Ticket)).all()
            assert sorted(t.requester for t in tickets) == sorted(SENDERS)
            acks = s.exec(select(Outbox).where(Outbox.kind == "ack")).all()
            assert len(acks) == len(SENDERS)


async def test_a_failing_message_does_not_poison_its_group(
    tmp_path: Path, clock: FrozenClock
) -> None:
    settings = make_settings(tmp_path, storage={"max_attempts": 3})
    async with running_gateway(settings, clock) as gw:
        chains = gw.pipeline.chains

        def explodes_after_recording(ctx: Context) -> None:
            # The failure comes after the message's own ticket, message and outbox rows were
            # written in the shared transaction: none of them may survive.
            if b"POISON" in ctx.entry.raw:
                raise ValueError("stage exploded on this message")

        new = Disposition.NEW  # every mail here opens a ticket; the last stage explodes
        gw.pipeline.chains = {**chains, new: (*chains[new], explodes_after_recording)}
        gw.pipeline.tx_budget = 3600.0  # the poison message shares its group
        for i, sender in enumerate(SENDERS):
            subject = "POISON pill" if i == 2 else f"Question {i}"
            await send(gw, make_mail(sender=sender, subject=subject))
        assert await gw.pipeline.run_once() == len(SENDERS)
        # The poison message paid one attempt and waits for its retry; the rest are done.
        assert _spool(settings.spool_path) == [("pending", 1)]
        with Session(gw.engine) as s:
            tickets = s.exec(select(Ticket)).all()
            assert sorted(t.requester for t in tickets) == sorted(
                x for i, x in enumerate(SENDERS) if i != 2
            )
            assert all(t.subject != "POISON pill" for t in tickets)
            inbound = s.exec(select(Message).where(Message.direction == "in")).all()
            assert len(inbound) == len(SENDERS) - 1  # nobody recorded twice
            acks = s.exec(select(Outbox).where(Outbox.kind == "ack")).all()
            assert sorted(json_rcpt(a.rcpt_tos) for a in acks) == sorted(
                x for i, x in enumerate(SENDERS) if i != 2
            )
        # Once the bug is gone the retry makes its ticket, like any other message.
        gw.pipeline.chains = chains
        clock.advance(3600)
        assert await gw.pipeline.run_once() == 1
        assert _spool(settings.spool_path) == []
        with Session(gw.engine) as s:
            assert len(s.exec(select(Ticket)).all()) == len(SENDERS)
