"""The language and brand of a new ticket's letters, chosen once and recorded (docs/decisions.md
D17).

Called by ``respond`` for every new ticket (acknowledged or not: later notices need them too),
in the pipeline's transaction. The choice is pure (gateway.letters.language.choose); this
module only gathers its inputs (the route's decision, the customer's earlier tickets, the
message's header and text) and writes the result on the ticket plus a ``language`` event
whose detail says why, so ``tickets show`` explains the language of every letter.
"""

from __future__ import annotations

import json
from typing import Any, cast

from sqlalchemy import ColumnElement, bindparam
from sqlalchemy import select as core_select

from gateway.letters.language import CUSTOMER_SOURCES, choose
from gateway.pipeline.context import Context
from gateway.store import core, fresh
from gateway.store.models import Event, Ticket
from gateway.store.queries import add_event

__all__ = ["choose_letters"]


#: How many of the customer's latest tickets are asked for an earlier choice.
EARLIER_TICKETS = 20


_TICKET = core.table(Ticket)
_EVENT = core.table(Event)


def _earlier_tickets(same: ColumnElement[bool]) -> Any:
    """The latest tickets (id, ref, language) matching ``same``, but ``:ticket`` itself."""
    return (
        core_select(_TICKET.c.id, _TICKET.c.ref, _TICKET.c.language)
        .where(same, _TICKET.c.id != bindparam("ticket"))
        .order_by(_TICKET.c.id.desc())
        .limit(EARLIER_TICKETS)
    )


# Prebuilt Core reads (once per new ticket; gateway.store.core): the customer's latest
# tickets, or the requester's when the ticket has no customer, and their language events.
_EARLIER_OF_CUSTOMER = _earlier_tickets(_TICKET.c.customer_id == bindparam("customer"))
_EARLIER_OF_REQUESTER = _earlier_tickets(_TICKET.c.requester == bindparam("requester"))
_LANGUAGE_EVENTS = (
    core_select(_EVENT.c.ticket_id, _EVENT.c.data)
    .where(
        _EVENT.c.ticket_id.in_(bindparam("tickets", expanding=True)),
        _EVENT.c.type == "language",
    )
    .order_by(_EVENT.c.id.desc())
)


def _earlier(ctx: Context, ticket: Ticket) -> tuple[str, str] | None:
    """(language, ref) the customer chose on their latest earlier ticket, if any.

    The customer's latest tickets first (index on `customer_id`), then their `language`
    events (index on `ticket_id`): joined in one statement, SQLite walked every `language`
    event of the installation newest first, 14 ms a message with 100,000 tickets."""
    params: dict[str, Any] = {"ticket": ticket.id}
    if ticket.customer_id is not None:
        made_here = fresh.tickets_of(ctx.session, [ticket.customer_id])
        if made_here is not None and set(made_here) <= {ticket.id}:
            return None  # a new customer's first ticket (gateway.store.fresh)
        stmt = _EARLIER_OF_CUSTOMER
        params["customer"] = ticket.customer_id
    else:
        stmt = _EARLIER_OF_REQUESTER
        params["requester"] = ticket.requester
    tickets = cast("list[tuple[int, str, str]]", core.read(ctx.session, stmt, params).all())
    known = {tid: (ref, language) for tid, ref, language in tickets}
    if not known:
        return None
    found = core.read(ctx.session, _LANGUAGE_EVENTS, {"tickets": list(known)})
    events = cast("list[tuple[int | None, str]]", found.all())
    rows = [(data, *known[tid]) for tid, data in events if tid in known]
    for data, ref, language in rows:
        try:
            source = json.loads(data).get("source")
        except (ValueError, AttributeError):
            continue
        if source in CUSTOMER_SOURCES and language:
            return language, ref
    return None


def choose_letters(ctx: Context) -> None:
    """Set ``ticket.language`` and ``ticket.brand`` once; record the language's reason."""
    ticket, decision, parsed = ctx.ticket, ctx.decision, ctx.parsed
    if ticket is None or ticket.id is None or decision is None or parsed is None:
        return
    brand = decision.brand if not ticket.brand and decision.brand else ""
    if ticket.language:
        if brand:
            ticket.brand = brand
        return
    settings = ctx.services.settings
    choice = choose(
        route=decision.language,
        route_name=decision.route,
        earlier=None if decision.language else _earlier(ctx, ticket),
        content_language=parsed.header("Content-Language"),
        text=parsed.text or "",
        default=settings.outbound.default_language,
    )
    _set_letters(ctx, ticket, choice.lang, brand)
    add_event(
        ctx.session,
        ticket.id,
        "language",
        f"letters in {choice.lang}: {choice.reason}"
        + (f"; brand {ticket.brand}" if ticket.brand else ""),
        ctx.now,
        message_id=ctx.message.id if ctx.message is not None else None,
        data={"language": choice.lang, "source": choice.source, "brand": ticket.brand},
    )


def _set_letters(ctx: Context, ticket: Ticket, language: str, brand: str) -> None:
    """Write the ticket's language (and brand) now by Core (`core.update_attached`): the
    ORM would write the same UPDATE at its next flush (the event's INSERT right after), but
    a unit-of-work flush of one changed ticket costs ~0.3 ms of CPU, the most of any
    statement of a new ticket."""
    if brand:
        core.update_attached(ctx.session, ticket, language=language, brand=brand)
    else:
        core.update_attached(ctx.session, ticket, language=language)
