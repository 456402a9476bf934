"""Route stage: a new ticket gets its queue, named owner, SLA policy and deadlines.

The routing decision is the pure `gateway.routing.engine.evaluate`; this stage only feeds it
the message facts and the assignment state (open tickets per person, round-robin cursors),
and stores the trace on the audit trail so an admin can see why.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

from gateway.pipeline.context import Context
from gateway.pipeline.parse import ParsedMessage
from gateway.routing.engine import AssignmentState, Decision, TraceEntry, evaluate
from gateway.routing.facts import MessageFacts
from gateway.routing.model import Rules
from gateway.sla.deadlines import initial_deadlines
from gateway.sla.duty import owner_for_window
from gateway.store.queries import assignment_cursors, open_ticket_counts


def facts_from(
    p: ParsedMessage, rcpt_tos: list[str], sender: str, authenticated: bool
) -> MessageFacts:
    """What the rules may look at, from a parsed message and its envelope."""
    recipients: list[str] = []
    for a in [*rcpt_tos, *p.to, *p.cc]:
        a = a.lower()
        if a not in recipients:
            recipients.append(a)
    return MessageFacts(
        recipients=tuple(recipients),
        sender=sender,
        subject=p.subject,
        body=p.text,
        headers=tuple(p.headers),
        authenticated=authenticated,
        has_attachment=bool(p.attachments),
    )


def facts_of(ctx: Context) -> MessageFacts:
    assert ctx.parsed is not None
    authenticated = bool(ctx.auth and ctx.auth.authenticated)
    return facts_from(ctx.parsed, ctx.entry.envelope.rcpt_tos, ctx.sender, authenticated)


def route(ctx: Context) -> None:
    state = AssignmentState(
        open_tickets=open_ticket_counts(ctx.session),
        last_assigned=assignment_cursors(ctx.session),
    )
    decision = evaluate(ctx.services.rules, facts_of(ctx), ctx.received_at, state)
    ctx.decision = cover_window(ctx.services.rules, decision, ctx.received_at)


def cover_window(rules: Rules, decision: Decision, received_at: datetime) -> Decision:
    """The owner the acknowledgement names must be on duty at some time before the first
    response is due (issue 11: never name someone away for the whole window). Otherwise the
    plan's walk (backup, manager, on call, default owner) picks who is, and the trace says
    why."""
    policy = rules.sla.get(decision.sla)
    if policy is None:
        return decision
    due = initial_deadlines(policy, rules.calendar_for_policy(decision.sla), received_at)
    end = due.first_response or due.resolution
    found = owner_for_window(rules, policy, decision.owner, received_at, end)
    if found.person.id == decision.owner.id:
        return decision
    why = "; ".join(found.skipped) or f"{decision.owner.name} is not on duty"
    entry = TraceEntry("(coverage)", True, f"owner {found.person.name}: {why}")
    return replace(decision, owner=found.person, trace=(*decision.trace, entry))
