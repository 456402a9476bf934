"""SLA clocks and the escalator under a frozen clock (docs/design.md §7, docs/rules.md).

Times: the `clock` fixture starts Monday 2026-11-23 09:00Z (10:00 in Berlin). The "berlin"
calendar is Mon-Fri 09:00-17:00 Europe/Berlin = 08:00-16:00Z in November, so the "standard"
policy (4h first response) of a ticket created at 09:00Z is due 13:00Z, its ladder steps
fall at 13:00Z (notify owner), 14:00Z (assign backup) and Tuesday 09:00Z (4 business hours
after 13:00Z: assign manager).
"""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from gateway.escalation.escalator import BREACH_STEP, NOTICE_STEP, WARNING_STEP
from gateway.security.tokens import Signer
from gateway.sla import clocks
from gateway.store.db import open_database
from gateway.store.models import EscalationStep, Promise, Ticket
from tests.conftest import make_settings
from tests.support.sla import (
    SLA_RULES,
    add_customer_message,
    events,
    make_escalator,
    new_ticket,
    outbox,
    sla_rules,
)

H = timedelta(hours=1)
M = timedelta(minutes=1)
MON_09 = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
TUE_02 = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)


def at(day: int, hour: int, minute: int = 0, second: int = 0) -> datetime:
    return datetime(2026, 11, day, hour, minute, second, tzinfo=UTC)


RULES = sla_rules()
STANDARD = RULES.policy("standard")
BERLIN = RULES.calendars["berlin"]


def fresh(created: datetime = MON_09, sla: str = "standard") -> Ticket:
    from gateway.sla.deadlines import initial_deadlines

    d = initial_deadlines(RULES.policy(sla), RULES.calendar_for_policy(sla), created)
    return Ticket(
        ref="ACME-1",
        status="open",
        owner="alice",
        sla=sla,
        created_at=created,
        updated_at=created,
        first_response_due=d.first_response,
        next_response_due=d.next_response,
        resolution_due=d.resolution,
        last_customer_at=created,
    )


# ============================================================================== pure clocks


def test_new_ticket_runs_first_response_and_resolution() -> None:
    t = fresh()
    assert clocks.active_deadlines(t) == [
        ("first_response", at(23, 13)),
        ("resolution", at(30, 9)),  # 5d = one working week
    ]


def test_first_staff_reply_stops_first_response_and_is_kept() -> None:
    t = fresh()
    clocks.on_staff_reply(t, at(23, 11))
    clocks.on_staff_reply(t, at(23, 12))
    assert t.first_responded_at == at(23, 11)
    assert t.last_staff_at == at(23, 12)
    assert [c for c, _ in clocks.active_deadlines(t)] == ["resolution"]


def test_next_response_not_armed_before_first_reply() -> None:
    t = fresh()
    clocks.on_customer_message(t, at(23, 10), STANDARD, BERLIN)
    assert t.next_response_due is None
    assert t.last_customer_at == at(23, 10)


def test_next_response_rearms_from_oldest_unanswered_message() -> None:
    t = fresh()
    clocks.on_staff_reply(t, at(23, 10))
    clocks.on_customer_message(t, at(23, 12, 30), STANDARD, BERLIN)
    # 8 business hours from 12:30Z: 3.5h Monday (to 16:00Z), 4.5h Tuesday from 08:00Z.
    assert t.next_response_due == at(24, 12, 30)
    # A second and third message before we answer keep the oldest one's deadline.
    clocks.on_customer_message(t, at(23, 14), STANDARD, BERLIN)
    clocks.on_customer_message(t, at(24, 9), STANDARD, BERLIN)
    assert t.next_response_due == at(24, 12, 30)
    assert ("next_response", at(24, 12, 30)) in clocks.active_deadlines(t)
    # The reply answers all of them; the next message starts a new clock from itself.
    clocks.on_staff_reply(t, at(24, 10))
    assert t.next_response_due is None
    assert [c for c, _ in clocks.active_deadlines(t)] == ["resolution"]
    clocks.on_customer_message(t, at(24, 11), STANDARD, BERLIN)
    assert t.next_response_due == at(25, 11)


def test_answered_agent_is_not_reported_running_zammad_3140() -> None:
    t = fresh()
    clocks.on_staff_reply(t, at(23, 10))
    clocks.on_customer_message(t, at(23, 11), STANDARD, BERLIN)
    # Even if a stale next_response_due survived somewhere, a newer staff reply wins.
    t.last_staff_at = at(23, 12)
    assert [c for c, _ in clocks.active_deadlines(t)] == ["resolution"]


def test_customer_message_older_than_our_reply_does_not_rearm() -> None:
    t = fresh()
    clocks.on_staff_reply(t, at(23, 12))
    clocks.on_customer_message(t, at(23, 11), STANDARD, BERLIN)  # delivered late
    assert t.next_response_due is None


def test_waiting_pauses_and_resume_shifts_by_business_time() -> None:
    t = fresh()
    clocks.on_waiting(t, at(23, 10))
    assert t.status == "waiting"
    assert clocks.active_deadlines(t) == []
    clocks.on_customer_message(t, at(23, 12), STANDARD, BERLIN)  # 2 business hours later
    assert t.status == "open"
    assert t.waiting_since is None
    assert t.first_response_due == at(23, 15)
    # Resolution pauses too (all three clocks measure our work) and moves by the same 2h.
    assert t.resolution_due == at(30, 11)


def test_waiting_overnight_counts_only_open_hours() -> None:
    t = fresh(created=at(23, 14))
    assert t.first_response_due == at(24, 10)  # 2h Monday + 2h Tuesday
    clocks.on_waiting(t, at(23, 15))
    clocks.on_resume(t, at(24, 9), BERLIN)  # waited 15-16Z and 08-09Z: 2 business hours
    assert t.first_response_due == at(24, 12)


def test_waiting_outside_hours_moves_nothing() -> None:
    t = fresh()
    before = (t.first_response_due, t.resolution_due)
    clocks.on_waiting(t, datetime(2026, 11, 28, 10, tzinfo=UTC))  # Saturday
    clocks.on_resume(t, datetime(2026, 11, 29, 20, tzinfo=UTC), BERLIN)  # Sunday
    assert (t.first_response_due, t.resolution_due) == before


def test_missed_deadline_is_not_moved_by_a_pause() -> None:
    t = fresh()
    clocks.on_waiting(t, at(23, 14))  # first response was due 13:00Z: already missed
    clocks.on_resume(t, at(23, 15), BERLIN)
    assert t.first_response_due == at(23, 13)
    assert t.resolution_due == at(30, 10)


def test_close_stops_everything_and_reopen_resumes_resolution() -> None:
    t = fresh()
    clocks.on_staff_reply(t, at(23, 10))
    clocks.on_snooze(t, at(23, 20))
    clocks.on_close(t, at(23, 11))
    assert t.status == "closed"
    assert t.closed_at == at(23, 11)
    assert t.snoozed_until is None
    assert clocks.active_deadlines(t) == []
    clocks.on_customer_message(t, at(23, 12), STANDARD, BERLIN)  # ignored while closed
    assert t.next_response_due is None
    clocks.on_reopen(t, at(24, 11), BERLIN)  # closed for 5h Monday + 3h Tuesday = 8h
    assert t.status == "open"
    assert t.closed_at is None
    assert t.resolution_due == datetime(2026, 12, 1, 9, tzinfo=UTC)
    clocks.on_customer_message(t, at(24, 11), STANDARD, BERLIN)
    assert t.next_response_due == at(25, 11)


def test_snooze_keeps_the_promise() -> None:
    t = fresh()
    clocks.on_snooze(t, at(23, 15))
    assert t.snoozed_until == at(23, 15)
    assert clocks.active_deadlines(t)[0] == ("first_response", at(23, 13))
    clocks.on_snooze(t, None)
    assert t.snoozed_until is None


def test_naive_datetimes_are_read_as_utc() -> None:
    t = fresh()
    t.first_response_due = datetime(2026, 11, 23, 13, 0)
    assert clocks.active_deadlines(t)[0] == ("first_response", at(23, 13))


# ============================================================================== escalator


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    e = open_database(f"sqlite:///{tmp_path}/sla.db")
    yield e  # type: ignore[misc]
    e.dispose()


@pytest.fixture
def sla_settings(tmp_path: Path):  # type: ignore[no-untyped-def]
    return make_settings(tmp_path, rules_dir=str(SLA_RULES))


def create(engine: Engine, **kw: object) -> int:
    with Session(engine) as s:
        t = new_ticket(s, RULES, **kw)  # type: ignore[arg-type]
        s.commit()
        assert t.id is not None
        return t.id


def steps(engine: Engine, ticket_id: int) -> list[tuple[str, int, str, str]]:
    with Session(engine) as s:
        rows = s.exec(
            select(EscalationStep)
            .where(EscalationStep.ticket_id == ticket_id)
            .order_by(EscalationStep.id)  # type: ignore[arg-type]
        ).all()
        return [(r.clock, r.step, r.person, r.action) for r in rows]


def test_ladder_fires_at_business_time_offsets(engine, sla_settings, clock) -> None:  # type: ignore[no-untyped-def]
    tid = create(engine, at=MON_09)
    esc = make_escalator(engine, sla_settings, clock)
    assert esc.next_due() == at(23, 13)
    clock.set(at(23, 12, 59))
    assert esc.run_once() == 0
    clock.set(at(23, 13))
    assert esc.run_once() == 3  # breach, notify owner, customer notice
    assert steps(engine, tid) == [
        ("first_response", BREACH_STEP, "", "breach"),
        ("first_response", 0, "alice", "notify:owner"),
        ("first_response", NOTICE_STEP, "alice", "customer-notice"),
    ]
    assert esc.next_due() == at(23, 14)
    clock.set(at(23, 14))
    # Step 2, and the notice's own promise ("Alice by 14:00Z") is broken: told again.
    assert esc.run_once() == 2
    clock.set(at(23, 23))
    assert esc.run_once() == 0  # 4 business hours after 13:00Z is Tuesday 09:00Z
    assert esc.next_due() == at(24, 9)
    clock.set(at(24, 9))
    assert esc.run_once() == 2
    assert [s[1:3] for s in steps(engine, tid) if s[1] >= 0] == [
        (0, "alice"),
        (1, "bob"),
        (2, "carol"),  # the manager of the owner at that moment (bob)
    ]
    with Session(engine) as s:
        t = s.get(Ticket, tid)
        assert t is not None
        assert t.owner == "carol"
        assigned = events(s, tid, "assigned")
        assert [e.detail.split(" by ")[0] for e in assigned] == [
            "ACME-1001 assigned to Bob Stone",
            "ACME-1001 assigned to Carol Diaz",
        ]
        assert len(events(s, tid, "breach")) == 1
        assert len(events(s, tid, "escalated")) == 3
        to = [r.rcpt_tos for r in outbox(s, "escalation")]
        assert to == ['["alice@example.com"]', '["bob@example.com"]', '["carol@example.com"]']


def test_staff_notification_has_summary_text_and_person_token(engine, sla_settings, clock) -> None:  # type: ignore[no-untyped-def]
    tid = create(engine, at=MON_09, text="The printer says PC LOAD LETTER.")
    esc = make_escalator(engine, sla_settings, clock)
    clock.set(at(23, 13))
    esc.run_once()
    with Session(engine) as s:
        (row,) = outbox(s, "escalation")
    assert row.mail_from == ""
    assert row.state == "queued"
    assert row.next_attempt_at == at(23, 13)
    msg = email.message_from_bytes(row.raw, policy=email.policy.default)
    assert msg["Auto-Submitted"] == "auto-generated"
    claim = Signer(sla_settings.secret()).parse_reply_address(str(msg["Reply-To"]))
    assert claim is not None
    assert claim.ticket_id == tid
    assert claim.person == "alice"
    body = msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    for needle in (
        "ACME-1001",
        "Printer on fire",
        "pat@customer.example",
        "Alice Martin",
        "first response",
        "Monday 23 November 2026, 14:00 CET (Europe/Berlin)",
        "The printer says PC LOAD LETTER.",
    ):
        assert needle in body


def test_customer_notice_once_names_owner_and_next_time(engine, sla_settings, clock) -> None:  # type: ignore[no-untyped-def]
    tid = create(engine, at=MON_09)
    esc = make_escalator(engine, sla_settings, clock)
    clock.set(at(23, 13))
    esc.run_once()
    clock.set(at(23, 13, 59))
    esc.run_once()
    with Session(engine) as s:
        (row,) = outbox(s, "customer_notice")
        assert len(events(s, tid, "customer-notice")) == 1
    assert row.rcpt_tos == '["pat@customer.example"]'
    assert row.mail_from == ""
    msg = email.message_from_bytes(row.raw, policy=email.policy.default)
    assert msg["From"] == "Example Support <support@example.com>"
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["X-Auto-Response-Suppress"] == "All"
    assert msg["X-Support-Gateway-Loop"] == Signer(sla_settings.secret()).installation_id()
    assert msg["In-Reply-To"] == f"<m{tid}.0@customer.example>"
    assert msg["Subject"] == "[ACME-1001] Printer on fire"
    claim = Signer(sla_settings.secret()).parse_reply_address(str(msg["Reply-To"]))
    assert claim is not None
    assert claim.ticket_id == tid
    assert claim.person is None
    body = msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "by Monday 23 November 2026, 14:00 CET (Europe/Berlin)" in body  # the promise
    assert "Alice Martin is now responsible for your request ACME-1001" in body
    assert "answer you by Monday 23 November 2026, 15:00 CET" in body  # next ladder step
    assert "If Alice Martin has not answered by then, Bob Stone takes over." in body
    # That is a promise too: when 15:00 CET passes unanswered, the customer hears again.
    clock.set(at(23, 14))
    esc.run_once()
    with Session(engine) as s:
        _, second = outbox(s, "customer_notice")
    text = email.message_from_bytes(second.raw, policy=email.policy.default)
    body = text.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "told you Alice Martin would answer you by Monday 23 November 2026, 15:00" in body
    assert "Bob Stone is now responsible" in body


def test_catch_up_after_downtime_fires_each_step_once(engine, sla_settings, clock) -> None:  # type: ignore[no-untyped-def]
    tid = create(engine, at=MON_09)
    esc = make_escalator(engine, sla_settings, clock)
    clock.advance(timedelta(days=3))  # down from Monday 09:00 to Thursday 09:00
    assert esc.run_once() == 5
    assert esc.run_once() == 0
    # A restarted process (empty caches) and a second node find nothing left either.
    assert make_escalator(engine, sla_settings, clock).run_once() == 0
    assert [s[1] for s in steps(engine, tid)] == [BREACH_STEP, 0, 1, 2, NOTICE_STEP]
    with Session(engine) as s:
        escalated = [e.data for e in events(s, tid, "escalated")]
        assert [('"step": 0' in d, '"step": 1' in d, '"step": 2' in d) for d in escalated] == [
            (True, False, False),
            (False, True, False),
            (False, False, True),
        ]
        (notice,) = outbox(s, "customer_notice")
    # The notice goes last and names the owner after the whole ladder: Carol, with no time
    # (the ladder is exhausted: nothing would enforce one).
    assert b"Carol Diaz is responsible for your request" in notice.raw
    assert b"will answer you by" not in notice.raw


def test_two_nodes_fire_each_step_once(engine, sla_settings, clock) -> None:  # type: ignore[no-untyped-def]
    create(engine, at=MON_09)
    a = make_escalator(engine, sla_settings, clock)
    b = make_escalator(engine, sla_settings, clock)
    clock.set(at(23, 14))
    assert a.run_once() + b.run_once() == 4
    with Session(engine) as s:
        assert len(outbox(s, "escalation")) == 2
        assert len(outbox(s, "customer_notice")) == 1


def test_off_duty_backup_is_skipped_at_night(engine, sla_settings, clock) -> None:  # type: ignore[no-untyped-def]
    clock.set(TUE_02)
    tid = create(engine, at=TUE_02, sla="night", owner="alice")
    esc = make_escalator(engine, sla_settings, clock)
    assert esc.next_due() == at(24, 2, 30)  # warn_at 0.5 of 1h
    clock.set(at(24, 2, 30))
    assert esc.run_once() == 1
    clock.set(at(24, 3))
    esc.run_once()
    clock.set(at(24, 3, 30))  # 04:30 in Berlin: Bob (office hours) is off duty
    assert esc.run_once() == 2  # the step, and the notice's promise (Alice by 03:30) broken
    assert [(s[1], s[2]) for s in steps(engine, tid) if s[1] in (WARNING_STEP, 0, 1)] == [
        (WARNING_STEP, "alice"),
        (0, "alice"),
        (1, "carol"),
    ]
    with Session(engine) as s:
        (warning,) = outbox(s, "notification")
        assert warning.rcpt_tos == '["alice@example.com"]'
        last = events(s, tid, "escalated")[-1]
        assert "notified Carol Diaz (backup)" in last.detail
        assert "Bob Stone (backup) skipped: off duty" in last.detail
        assert "Europe/Berlin" in last.detail


def test_default_owner_is_the_last_resort(engine, sla_settings, clock) -> None:  # type: ignore[no-untyped-def]
    clock.set(TUE_02)
    tid = create(engine, at=TUE_02, sla="night", owner="erin")
    esc = make_escalator(engine, sla_settings, clock)
    clock.set(at(24, 3))
    esc.run_once()
    with Session(engine) as s:
        (row,) = outbox(s, "escalation")
        assert row.rcpt_tos == '["dave@example.com"]'
        detail = events(s, tid, "escalated")[0].detail
    for skipped in ("Erin Office (owner)", "Frank Office (backup)", "Grace Office (manager)"):
        assert f"{skipped} skipped: off duty" in detail
    assert "default owner Dave Night used" in detail


def test_ticket_without_owner_escalates_to_default_owner(engine, sla_settings, clock) -> None:  # type: ignore[no-untyped-def]
    tid = create(engine, at=MON_09, owner="")
    esc = make_escalator(engine, sla_settings, clock)
    clock.set(at(23, 13))
    esc.run_once()
    with Session(engine) as s:
        (row,) = outbox(s, "escalation")
        assert row.rcpt_tos == '["dave@example.com"]'
        assert "no owner: default owner Dave Night used" in events(s, tid, "escalated")[0].detail


def test_answered_in_time_never_escalates_zammad_3140(engine, sla_settings, clock) -> None:  # type: ignore[no-untyped-def]
    tid = create(engine, at=MON_09)
    with Session(engine) as s:
        t = s.get(Ticket, tid)
        assert t is not None
        clocks.on_staff_reply(t, at(23, 12))
        clocks.on_customer_message(t, at(23, 12, 30), STANDARD, BERLIN)
        add_customer_message(s, t, at(23, 12, 30), text="thanks, one more thing")
        s.add(t)
        s.commit()
    esc = make_escalator(engine, sla_settings, clock)
    clock.set(at(24, 10))
    with Session(engine) as s:
        t = s.get(Ticket, tid)
        assert t is not None
        clocks.on_staff_reply(t, clock.now())  # answered before the 12:30Z deadline
        s.add(t)
        s.commit()
    for day in range(24, 30):
        clock.set(at(day, 8))
        assert esc.run_once() == 0
    assert steps(engine, tid) == []


def test_snoozed_ticket_waits_then_catches_up(engine, sla_settings, clock) -> None:  # type: ignore[no-untyped-def]
    tid = create(engine, at=MON_09)
    with Session(engine) as s:
        t = s.get(Ticket, tid)
        assert t is not None
        clocks.on_snooze(t, at(23, 15))
        s.add(t)
        s.commit()
    esc = make_escalator(engine, sla_settings, clock)
    assert esc.next_due() == at(23, 15)
    clock.set(at(23, 14, 30))
    assert esc.run_once() == 0
    clock.set(at(23, 15))
    assert esc.run_once() == 4
    assert [s[1] for s in steps(engine, tid)] == [BREACH_STEP, 0, 1, NOTICE_STEP]


def test_waiting_ticket_does_not_escalate(engine, sla_settings, clock) -> None:  # type: ignore[no-untyped-def]
    tid = create(engine, at=MON_09)
    with Session(engine) as s:
        t = s.get(Ticket, tid)
        assert t is not None
        clocks.on_waiting(t, at(23, 10))
        s.add(t)
        s.commit()
    esc = make_escalator(engine, sla_settings, clock)
    clock.set(at(27, 12))
    assert esc.run_once() == 0
    assert esc.next_due() is None


def test_no_customer_notice_to_robots(engine, sla_settings, clock) -> None:  # type: ignore[no-untyped-def]
    tid = create(engine, at=MON_09, robot="auto-reply: Auto-Submitted: auto-replied")
    esc = make_escalator(engine, sla_settings, clock)
    clock.set(at(23, 13))
    esc.run_once()
    assert esc.run_once() == 0
    with Session(engine) as s:
        assert outbox(s, "customer_notice") == []
        assert len(outbox(s, "escalation")) == 1
        (ev,) = events(s, tid, "customer-notice")
        assert "not sent" in ev.detail


def test_no_customer_notice_when_policy_says_so(engine, sla_settings, clock) -> None:  # type: ignore[no-untyped-def]
    create(engine, at=MON_09, sla="quiet")
    esc = make_escalator(engine, sla_settings, clock)
    clock.set(at(23, 10))
    assert esc.run_once() == 2  # breach + notify owner
    with Session(engine) as s:
        assert outbox(s, "customer_notice") == []


def test_customer_notices_are_limited_per_promise_not_per_day(engine, sla_settings, clock) -> None:  # type: ignore[no-untyped-def]
    clock.set(TUE_02)
    tid = create(engine, at=TUE_02, sla="night", owner="alice")
    esc = make_escalator(engine, sla_settings, clock)
    clock.set(at(24, 3))
    esc.run_once()  # first response missed: notice 1 promises Alice by 03:30
    with Session(engine) as s:
        t = s.get(Ticket, tid)
        assert t is not None
        clocks.on_staff_reply(t, at(24, 3, 10))
        clocks.on_customer_message(
            t, at(24, 3, 20), RULES.policy("night"), RULES.calendars["always"]
        )
        add_customer_message(s, t, at(24, 3, 20), text="still broken")
        s.add(t)
        s.commit()
        assert t.next_response_due == at(24, 5, 20)
    clock.set(at(24, 3, 30))
    esc.run_once()  # the staff reply kept notice 1's promise: nothing to say
    with Session(engine) as s:
        assert len(outbox(s, "customer_notice")) == 1
        states = [p.state for p in s.exec(select(Promise).order_by(Promise.id)).all()]  # type: ignore[arg-type]
        assert states == ["kept"]
    clock.set(at(24, 5, 20))
    esc.run_once()  # next response missed: told at once (no "one a day" silence)
    with Session(engine) as s:
        notices = outbox(s, "customer_notice")
        assert len(notices) == 2
        assert b"an answer to your last message" in notices[1].raw
    clock.set(at(24, 5, 50))
    esc.run_once()  # notice 2 promised an answer by 05:50: broken, told once more
    clock.set(at(24, 9))
    esc.run_once()  # 07:20: the last step; its notice names who stays responsible, no time
    with Session(engine) as s:
        notices = outbox(s, "customer_notice")
        assert len(notices) == 4
        assert b"will answer you by" not in notices[3].raw
    assert esc.run_once() == 0


async def test_run_sleeps_until_next_due_and_wakes_on_demand(engine, sla_settings, clock) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    create(engine, at=MON_09)
    esc = make_escalator(engine, sla_settings, clock)
    loop = asyncio.get_running_loop()
    runs: asyncio.Queue[int] = asyncio.Queue()
    original = esc.run_once

    def counted() -> int:
        n = original()
        loop.call_soon_threadsafe(runs.put_nowait, n)
        return n

    esc.run_once = counted  # type: ignore[method-assign]
    stopping, wakeup = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(esc.run(stopping, wakeup))
    assert await asyncio.wait_for(runs.get(), 10) == 0
    clock.set(at(23, 12, 59, 30))
    wakeup.set()  # e.g. a new ticket: look again now
    assert await asyncio.wait_for(runs.get(), 10) == 0
    # The breach is 30 s away: it sleeps exactly that long, not a poll interval.
    while esc.last_delay is None or esc.last_delay == 60.0:
        await asyncio.sleep(0)
    assert esc.last_delay == 30.0
    clock.set(at(23, 13))
    wakeup.set()
    assert await asyncio.wait_for(runs.get(), 10) == 3
    stopping.set()
    await asyncio.wait_for(task, 10)


def test_failed_fire_rolls_back_and_is_retried(engine, sla_settings, clock, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    tid = create(engine, at=MON_09)
    esc = make_escalator(engine, sla_settings, clock)
    clock.set(at(23, 13))
    with monkeypatch.context() as m:
        m.setattr(
            esc.actions, "notify", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full"))
        )
        assert esc.run_once() == 0  # the whole ticket transaction rolled back
    assert steps(engine, tid) == []
    assert esc.run_once() == 3  # nothing was remembered as fired: retried in full
    assert esc.run_once() == 0


def test_catch_up_past_the_deadline_sends_no_stale_warning(engine, sla_settings, clock) -> None:  # type: ignore[no-untyped-def]
    clock.set(TUE_02)
    tid = create(engine, at=TUE_02, sla="night", owner="alice")
    esc = make_escalator(engine, sla_settings, clock)
    clock.set(at(24, 3, 5))  # down over both the warning (02:30) and the breach (03:00)
    esc.run_once()
    assert (WARNING_STEP, "", "warning-skipped") in [(s[1], s[2], s[3]) for s in steps(engine, tid)]
    with Session(engine) as s:
        assert outbox(s, "notification") == []
        assert len(outbox(s, "escalation")) == 1


def test_notices_due_within_a_minute_go_as_one_mail(engine, sla_settings, clock) -> None:  # type: ignore[no-untyped-def]
    tid = create(engine, at=MON_09)
    with Session(engine) as s:
        t = s.get(Ticket, tid)
        assert t is not None
        # Resolution runs out 30 s after first response (a short policy, or a pause moved it).
        t.resolution_due = at(23, 13) + timedelta(seconds=30)
        s.add(t)
        s.commit()
    esc = make_escalator(engine, sla_settings, clock)
    clock.set(at(23, 13))
    esc.run_once()
    clock.set(at(23, 13) + timedelta(seconds=30))
    esc.run_once()
    with Session(engine) as s:
        (notice,) = outbox(s, "customer_notice")
        (event,) = events(s, tid, "customer-notice")
    assert b"a first answer from a person" in notice.raw
    assert b"your request resolved" in notice.raw
    assert '"covers": [["first_response"' in (event.data or "")
    assert "resolution" in (event.data or "")


def test_escalation_letters_take_an_admins_wording(engine, tmp_path, clock) -> None:  # type: ignore[no-untyped-def]
    # An override with two phrases and no body: those phrases change, the rest is shipped.
    folder = tmp_path / "letters"
    folder.mkdir()
    (folder / "escalation.en.txt").write_text(
        "=== escalation_subject ===\n[$ref] ESCALATED: $clock\n"
        "=== escalation_headline ===\n$ref is late ($clock, $step).\n"
    )
    settings = make_settings(tmp_path, rules_dir=str(SLA_RULES), templates_dir=str(folder))
    tid = create(engine, at=MON_09)
    esc = make_escalator(engine, settings, clock)
    clock.set(at(23, 13))
    assert esc.run_once() == 3
    with Session(engine) as s:
        t = s.get(Ticket, tid)
        assert t is not None
        (row,) = outbox(s, "escalation")
        mail = email.message_from_bytes(row.raw, policy=email.policy.default)
        assert mail["Subject"] == f"[{t.ref}] ESCALATED: first response"
        text = mail.get_content().replace("\r\n", "\n")  # type: ignore[attr-defined]
        assert text.startswith(f"{t.ref} is late (first response, escalation step 1 of 3).")
        assert f"Ticket:     {t.ref}\n" in text  # the shipped body around it
