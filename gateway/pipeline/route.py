"""Route stage: a new ticket gets its queue, named owner, SLA policy and deadlines.

The routing decision is the pure `gateway.routing.engine.evaluate`; this stage only feeds it
the message facts and the assignment state (open tickets per person, round-robin cursors),
and stores the trace on the audit trail so an admin can see why.
"""

from __future__ import annotations

from gateway.pipeline.context import Context
from gateway.pipeline.parse import ParsedMessage
from gateway.routing.conditions import extra_facts
from gateway.routing.engine import AssignmentState, cover_window, evaluate
from gateway.routing.facts import MessageFacts
from gateway.security.spam import SpamVerdict
from gateway.store.queries import assignment_cursors, open_ticket_counts, xact_lock


def facts_from(
    p: ParsedMessage,
    rcpt_tos: list[str],
    sender: str,
    authenticated: bool,
    spam: SpamVerdict | None = None,
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
        # Only a trusted front filter's verdict is routable (gateway.security.spam).
        spam=spam.spam_for_routes if spam is not None else False,
        spam_score=spam.score_for_routes if spam is not None else None,
        extra=extra_facts(p),
    )


def facts_of(ctx: Context) -> MessageFacts:
    assert ctx.parsed is not None
    authenticated = bool(ctx.auth and ctx.auth.authenticated)
    return facts_from(ctx.parsed, ctx.entry.envelope.rcpt_tos, ctx.sender, authenticated, ctx.spam)


def route(ctx: Context) -> None:
    # Round-robin and least-loaded read the assignment state and write it back with the
    # ticket: several nodes must take turns, or simultaneous tickets get the same owner
    # (issue 13 finding 5). The lock is held until this message's transaction commits.
    xact_lock(ctx.session, "routing")
    state = AssignmentState(
        open_tickets=open_ticket_counts(ctx.session),
        last_assigned=assignment_cursors(ctx.session),
    )
    decision = evaluate(ctx.services.rules, facts_of(ctx), ctx.received_at, state)
    ctx.decision = cover_window(ctx.services.rules, decision, ctx.received_at)
