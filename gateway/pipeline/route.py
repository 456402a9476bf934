"""Route stage: a new ticket gets its queue, named owner, SLA policy and deadlines.

The routing decision is the pure `gateway.routing.engine.evaluate`; this stage only feeds it
the message facts and the assignment state (open tickets per person, round-robin cursors),
and stores the trace on the audit trail so an admin can see why.
"""

from __future__ import annotations

from email.utils import parseaddr

from gateway.pipeline.context import Context
from gateway.pipeline.parse import ParsedMessage, parse
from gateway.routing.conditions import extra_facts
from gateway.routing.engine import AssignmentState, cover_window, evaluate
from gateway.routing.facts import MessageFacts
from gateway.security.dns import BudgetResolver, OfflineResolver, Resolver
from gateway.security.relay import effective_client_of
from gateway.security.sender_auth import AuthResult
from gateway.security.sender_auth import authenticate as check_sender
from gateway.security.spam import SpamVerdict, read_spam_verdict
from gateway.settings import Settings
from gateway.spool import Envelope
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
    for raw in [*rcpt_tos, *p.to, *p.cc]:
        a = raw.lower()
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


def authenticate_envelope(
    raw: bytes, envelope: Envelope, settings: Settings, resolver: Resolver | None
) -> AuthResult | None:
    """Sender authentication as the pipeline's authenticate stage runs it (docs/security.md):
    None without a resolver unless a trusted front MTA's Authentication-Results can be read
    (then offline: anything needing DNS is temperror), one DNS budget per message, and the
    client a trusted relay saw (gateway.security.relay)."""
    security = settings.security
    if resolver is None:
        if not security.trusted_authserv_ids:
            return None
        resolver = OfflineResolver()
    client = effective_client_of(raw, envelope, settings)
    return check_sender(
        raw,
        envelope_sender=envelope.mail_from,
        client_ip=client.client_ip,
        helo=client.helo,
        resolver=BudgetResolver(resolver, security.dns_budget),
        trusted_authserv_ids=client.trusted_authserv_ids,
    )


def explain_facts(
    raw: bytes, settings: Settings, resolver: Resolver | None, *, trusted_relay: bool = False
) -> tuple[ParsedMessage, MessageFacts]:
    """The facts `rules explain` routes a message file by, built the way the pipeline builds
    them (`facts_of`), sender authentication included: a route on `authenticated` explains
    as it routes. A file has no SMTP envelope: the envelope sender is its Return-Path (else
    its From), the client unknown (so SPF is `none`), and with `trusted_relay` the message is
    read as handed over by a trusted front host (its Received header and
    Authentication-Results count, as for `ingest`)."""
    parsed = parse(raw)
    # No To header: the message reached our support address (as an envelope RCPT TO would).
    rcpt_tos = [] if parsed.to else [f"support@{settings.smtp.domains[0]}"]
    return_path = next(iter(parsed.header("Return-Path")), "")
    mail_from = parseaddr(return_path)[1] or parsed.from_address
    envelope = Envelope(mail_from, rcpt_tos, source="pipe" if trusted_relay else "smtp")
    auth = authenticate_envelope(raw, envelope, settings, resolver)
    spam = read_spam_verdict(parsed.headers, trusted=trusted_relay)
    sender = parsed.from_address or mail_from.lower()  # as the parse stage's ctx.sender
    authenticated = bool(auth and auth.authenticated)
    return parsed, facts_from(parsed, rcpt_tos, sender, authenticated, spam)


def facts_of(ctx: Context) -> MessageFacts:
    assert ctx.parsed is not None
    authenticated = bool(ctx.auth and ctx.auth.authenticated)
    return facts_from(ctx.parsed, ctx.entry.envelope.rcpt_tos, ctx.sender, authenticated, ctx.spam)


#: How a team route assigns: the decisions that read the assignment state.
_TEAM_ASSIGNMENT = frozenset({"round-robin", "least-open"})


def route(ctx: Context) -> None:
    rules, facts = ctx.services.rules, facts_of(ctx)
    decision = evaluate(rules, facts, ctx.received_at)
    if decision.assigned_by in _TEAM_ASSIGNMENT:
        # Round-robin and least-open read the assignment state and write it back with the
        # ticket: several nodes (or pipeline processes) must take turns, or simultaneous
        # tickets get the same owner (docs/decisions.md D13.5). The lock is held until this
        # message's transaction commits, so it is taken only by the messages whose owner
        # depends on it: the others would wait on each other for nothing. Evaluated again
        # under the lock, with the state as the previous holder committed it (the match
        # itself does not depend on the state, so the same route decides).
        xact_lock(ctx.session, "routing")
        state = AssignmentState(
            open_tickets=open_ticket_counts(ctx.session),
            last_assigned=assignment_cursors(ctx.session),
        )
        decision = evaluate(rules, facts, ctx.received_at, state)
    ctx.decision = cover_window(ctx.services.rules, decision, ctx.received_at)
