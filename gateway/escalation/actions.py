"""What a fired step does: the event, the staff mail, the handover, the customer notice.

Called by the loop (`gateway.escalation.escalator`) inside the ticket's transaction, after the
step's row was claimed, so everything here happens exactly once or is rolled back with the
claim. Who is told and what a notice promises come from the plan (`gateway.sla.plan`,
walking `gateway.sla.duty`): the person a notice names is the person the ladder step acts
with, and no person is sent two mails for one breach (docs/design.md §7). The wording is in
`gateway.letters.escalation`; this module only decides and queues.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlmodel import Session, select

from gateway.escalation.moments import Key, key
from gateway.letters import escalation as letters
from gateway.letters.escalation import Facts, StaffLetter, clock_name
from gateway.letters.i18n import format_local
from gateway.notices.customer import (
    Broken,
    notice_text,
    promised,
    queue_customer_mail,
    responsible,
)
from gateway.outbound.worker import notify_owner
from gateway.pipeline.handover import compose_handover
from gateway.routing.model import Person, Rules
from gateway.security.tokens import Signer
from gateway.settings import Settings
from gateway.sla.clocks import active_deadlines, utc
from gateway.sla.deadlines import isoz
from gateway.sla.duty import resolve
from gateway.sla.plan import BREACH_STEP, WARNING_STEP, Commitment, Fire, TicketPlan, plan_ticket
from gateway.store import promises
from gateway.store.models import EscalationStep, Message, Promise, Ticket
from gateway.store.queries import add_event, last_customer_message

__all__ = ["Actions", "Batch", "plan_now"]


@dataclass
class Batch:
    """What one run of a ticket has done so far: who was mailed for which breach, who acts
    for each clock, and the customer notices to send as one mail at the end."""

    told: dict[tuple[str, datetime], set[str]]  # (clock, due) -> person ids mailed
    acting: dict[str, str]  # clock -> person id acting since its latest ladder step
    notices: list[tuple[Fire, EscalationStep]]
    mailed: set[str]


def plan_now(ticket: Ticket, rules: Rules, now: datetime, known: set[Key]) -> TicketPlan:
    """The plan of this ticket at `now`, with every step fired so far taken as done."""
    assert ticket.id is not None
    fired = [(c, d, s) for (t, c, d, s) in known if t == ticket.id and s >= 0]
    return plan_ticket(ticket, ticket.owner, ticket.sla, rules, now, fired)


def owner_of(ticket: Ticket, rules: Rules) -> tuple[Person, list[str]]:
    """The ticket's owner, or the default owner when it has none (docs/design.md §7:
    always a named human, where Zammad would notify nobody)."""
    person = rules.people.get(ticket.owner) if ticket.owner else None
    if person is not None:
        return person, []
    fallback = rules.person(rules.defaults.owner)
    why = f"owner {ticket.owner!r} unknown" if ticket.owner else "no owner"
    return fallback, [f"{why}: default owner {fallback.name} used"]


class Actions:
    """The effects of fired steps for one escalator (its settings and signer)."""

    def __init__(self, settings: Settings, signer: Signer) -> None:
        self.settings = settings
        self.signer = signer
        self._last_message: dict[int | None, Message | None] = {}

    def start_ticket(self) -> None:
        """Forget what was read for the previous ticket (its last customer message)."""
        self._last_message = {}

    # -------------------------------------------------------------------------- mail

    def _last_customer_message(self, session: Session, ticket_id: int | None) -> Message | None:
        """The customer's last inbound message (memoised for the ticket being processed)."""
        if ticket_id in self._last_message:
            return self._last_message[ticket_id]
        found = last_customer_message(session, ticket_id) if ticket_id is not None else None
        self._last_message = {ticket_id: found}
        return found

    def _facts(self, session: Session, ticket: Ticket, rules: Rules, fire: Fire) -> Facts:
        return Facts(
            letter=letters.load(self.settings.templates_path),
            ticket=ticket,
            owner=rules.people.get(ticket.owner),
            calendar=rules.calendar_for_policy(ticket.sla),
            fire=fire,
            last=self._last_customer_message(session, ticket.id),
        )

    def notify(
        self,
        session: Session,
        ticket: Ticket,
        person: Person,
        letter: StaffLetter,
        now: datetime,
        kind: str = "escalation",
    ) -> str:
        """Queue a staff mail to `person`; returns its Message-ID."""
        row = notify_owner(
            session,
            self.settings,
            self.signer,
            ticket=ticket,
            email=person.email,
            name=person.name,
            person=person.id,
            subject=letter.subject,
            body=letter.body,
            now=now,
            kind=kind,
        )
        return row.message_id

    # -------------------------------------------------------------------------- steps

    def act(
        self,
        session: Session,
        ticket: Ticket,
        row: EscalationStep,
        fire: Fire,
        now: datetime,
        rules: Rules,
        known: set[Key],
        batch: Batch,
    ) -> None:
        """The breach event, the warning, or a ladder step (assign and/or notify)."""
        policy = rules.policy(ticket.sla)
        calendar = rules.calendar_for_policy(ticket.sla)
        name = clock_name(fire.clock)
        promised = f"{format_local(fire.due_at, calendar)} ({isoz(fire.due_at)})"
        if fire.step == BREACH_STEP:
            add_event(
                session,
                ticket.id,
                "breach",
                f"{name} deadline missed: it was due {promised}",
                now,
                data={"clock": fire.clock, "due_at": isoz(fire.due_at)},
            )
            return
        owner, why_owner = owner_of(ticket, rules)
        told = batch.told.setdefault((fire.clock, fire.due_at), set())
        if fire.step == WARNING_STEP:
            found = resolve(rules, policy, "owner", owner, now)
            person, skipped = found.person, list(found.skipped)
            row.person, row.action = person.id, "warning"
            facts = self._facts(session, ticket, rules, fire)
            letter = letters.warning(facts, [*why_owner, *skipped])
            self.notify(session, ticket, person, letter, now, "notification")
            batch.mailed.add(person.id)
            told.add(person.id)
            add_event(
                session,
                ticket.id,
                "sla-warning",
                f"{name} due {promised}: warned {person.name}"
                + (f" ({'; '.join([*why_owner, *skipped])})" if why_owner or skipped else ""),
                now,
                data={"clock": fire.clock, "due_at": isoz(fire.due_at), "person": person.id},
            )
            return
        ladder = policy.escalation
        if fire.step >= len(ladder):
            return  # the rules changed and the ladder got shorter
        step = ladder[fire.step]
        # The plan with this step still to do: what it does is what it said it would do.
        planned = plan_now(ticket, rules, now, known - {key(ticket.id or 0, fire)})
        this = planned.step(fire.clock, fire.due_at, fire.step)
        assert this is not None
        after = plan_now(ticket, rules, now, known)
        done: list[str] = []
        notes: list[str] = list(why_owner)
        if this.assign is not None:
            person = this.assign.person
            notes += this.assign.skipped
            previous = ticket.owner
            if person.id != ticket.owner:
                ticket.owner = person.id
                add_event(
                    session,
                    ticket.id,
                    "assigned",
                    f"{ticket.ref} assigned to {person.name} by escalation ({name} missed;"
                    f" ladder step {fire.step + 1}: assign {step.assign});"
                    f" was {previous or 'nobody'}",
                    now,
                    data={"from": previous, "to": person.id, "skipped": list(this.assign.skipped)},
                )
                done.append(f"assigned to {person.name} ({step.assign})")
                commitment = after.commitment(fire.clock, fire.due_at, person)
                self.tell_new_holder(
                    session,
                    ticket,
                    person,
                    rules.people.get(previous) if previous else None,
                    fire,
                    notes,
                    now,
                    len(ladder),
                    commitment,
                    rules,
                )
                told.add(person.id)
                batch.mailed.add(person.id)
            else:
                done.append(f"{person.name} already holds it ({step.assign})")
            row.person, row.action = person.id, f"assign:{step.assign}"
        if this.notify is not None:
            person = this.notify.person
            notes += this.notify.skipped
            if person.id in told:
                # One mail per person per breach: they already have this one.
                done.append(f"{person.name} already told ({step.notify})")
            else:
                facts = self._facts(session, ticket, rules, fire)
                self.notify(
                    session, ticket, person, letters.escalated(facts, len(ladder), notes), now
                )
                told.add(person.id)
                batch.mailed.add(person.id)
                done.append(f"notified {person.name} ({step.notify})")
            if this.assign is None:
                row.person, row.action = person.id, f"notify:{step.notify}"
        batch.acting[fire.clock] = this.acting.id
        session.add(row)
        add_event(
            session,
            ticket.id,
            "escalated",
            f"{name} due {promised} missed; step {fire.step + 1} of {len(ladder)}: "
            + ", ".join(done)
            + (f" ({'; '.join(notes)})" if notes else ""),
            now,
            data={
                "clock": fire.clock,
                "due_at": isoz(fire.due_at),
                "step": fire.step,
                "person": row.person,
                "skipped": notes,
            },
        )

    def tell_new_holder(
        self,
        session: Session,
        ticket: Ticket,
        person: Person,
        previous: Person | None,
        fire: Fire,
        notes: list[str],
        now: datetime,
        steps: int,
        commitment: Commitment,
        rules: Rules,
    ) -> None:
        """The one place an assign step tells the person who now holds the ticket: the
        handover pack (the whole history; the previous holder is told who has it now). A
        time stated to them is recorded as a promise."""
        assert ticket.id is not None
        texts = letters.handover(
            self._facts(session, ticket, rules, fire), steps, person, commitment
        )
        rows = compose_handover(
            session,
            ticket,
            person,
            previous,
            texts.headline,
            rules=rules,
            settings=self.settings,
            signer=self.signer,
            now=now,
            subject=texts.subject,
            notes=notes,
            kind="escalation",
            told=texts.told,
        )
        message_id = rows[0].message_id if rows else ""
        if commitment.by is not None:
            _staff_promise(session, ticket, person, message_id, fire.clock, commitment.by, now)

    # -------------------------------------------------------------------------- the customer

    def _broken(
        self, session: Session, ticket: Ticket, rules: Rules, batch: Batch
    ) -> tuple[list[Broken], list[Promise]]:
        """Each promise this notice owns up to, and the promise rows it covers."""
        running = dict(active_deadlines(ticket))
        broken: list[Broken] = []
        covered: list[Promise] = []
        for fire, _ in batch.notices:
            rows = session.exec(
                select(Promise).where(
                    Promise.ticket_id == ticket.id,
                    Promise.audience == "customer",
                    Promise.clock == fire.clock,
                    Promise.due == fire.due_at,
                    Promise.told == "",
                )
            ).all()
            rows = [p for p in rows if utc(p.due) == fire.due_at]
            covered += rows
            names = {rules.people[p.person].name for p in rows if p.person in rules.people}
            if fire.due_at == running.get(fire.clock) or not names:
                broken.append(Broken(fire.clock, fire.due_at))
            else:
                broken.append(Broken(fire.clock, fire.due_at, " or ".join(sorted(names))))
        return broken, covered

    def customer_notice(
        self,
        session: Session,
        ticket: Ticket,
        now: datetime,
        rules: Rules,
        known: set[Key],
        batch: Batch,
    ) -> None:
        """One mail for every customer notice of this run: each broken promise owned up to,
        then the next real commitment from the plan (who acts now, by when, who next), or,
        with the ladder exhausted, who stays responsible and no invented time."""
        assert ticket.id is not None
        calendar = rules.calendar_for_policy(ticket.sla)
        running = dict(active_deadlines(ticket))
        broken, covered = self._broken(session, ticket, rules, batch)
        # The notice speaks for the clock due first; its breach's ladder gives the next time.
        main = min((f for f, _ in batch.notices), key=lambda f: (f.due_at, f.clock))
        plan = plan_now(ticket, rules, now, known)
        acting_id = batch.acting.get(main.clock)
        acting = rules.people.get(acting_id) if acting_id else None
        if acting is None:
            acting = plan.acting.person
        breach_due = running.get(main.clock, main.due_at)
        commitment = plan.commitment(main.clock, breach_due, acting)
        # In the ticket's language, From its brand (gateway.letters).
        text = notice_text(self.settings, rules, ticket, broken, commitment, calendar)
        last = self._last_customer_message(session, ticket.id)
        message_id = queue_customer_mail(
            session, self.settings, self.signer, ticket, text, now, last, rules=rules
        )
        for p in covered:
            p.told = message_id
            if p.state == "pending":
                p.state, p.settled_at = "broken", now
            session.add(p)
        promises.record(
            session,
            ticket_id=ticket.id,
            made_at=now,
            to=ticket.requester,
            person=acting.id,
            message_id=message_id,
            what=promised(commitment),
            clock=main.clock,
            due=commitment.by,
        )
        if acting.id not in batch.mailed:
            # The person accountable for the broken promise hears of it too.
            letter = letters.broken_promise(
                self._facts(session, ticket, rules, main), commitment.by
            )
            staff_id = self.notify(session, ticket, acting, letter, now)
            batch.mailed.add(acting.id)
            if commitment.by is not None:
                _staff_promise(session, ticket, acting, staff_id, main.clock, commitment.by, now)
        for _, step_row in batch.notices:
            step_row.person = acting.id
            session.add(step_row)
        add_event(
            session,
            ticket.id,
            "customer-notice",
            f"told {ticket.requester} that "
            + "; ".join(f"the {clock_name(b.clock)} promise ({isoz(b.due)})" for b in broken)
            + f" was missed; {responsible(commitment)}",
            now,
            data={
                "clock": main.clock,
                "due_at": isoz(main.due_at),
                "covers": [[b.clock, isoz(b.due)] for b in broken],
                "breach_due": isoz(breach_due),
                "person": acting.id,
                "by": isoz(commitment.by),
                "then": commitment.then.id if commitment.then else None,
                "message_id": message_id,
            },
        )


def _staff_promise(
    session: Session,
    ticket: Ticket,
    person: Person,
    message_id: str,
    clock: str,
    by: datetime,
    now: datetime,
) -> None:
    """A time stated to a colleague is a promise too: recorded, shown and settled like the
    customer's (docs/decisions.md D11.2)."""
    assert ticket.id is not None
    promises.record(
        session,
        ticket_id=ticket.id,
        made_at=now,
        to=person.email,
        person=person.id,
        message_id=message_id,
        what=f"{person.name} answers {ticket.ref} by {isoz(by)}",
        clock=clock,
        due=by,
        audience="staff",
    )
