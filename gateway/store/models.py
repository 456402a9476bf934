"""SQLModel tables: customers, tickets, messages (raw kept), events, links, outbox, SLA steps.

Datetimes are aware UTC (sqlmodel's UTCDateTime stores and returns UTC on both SQLite and
PostgreSQL). JSON-ish lists are stored as text so the schema is identical on both.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, Index, LargeBinary, Text, UniqueConstraint, text
from sqlmodel import Field, SQLModel

#: Open tickets marked "to be planned" by the escalator (`Ticket.escalate_at` NULL): the rows of
#: the partial index `ticket_to_plan`.
TO_PLAN = "status = 'open' AND escalate_at IS NULL"


class Customer(SQLModel, table=True):
    __table_args__ = (Index("customer_merged", "merged_into_id"),)
    id: int | None = Field(default=None, primary_key=True)
    name: str = ""
    created_at: datetime
    # Set when this customer was merged into another; its addresses moved there.
    merged_into_id: int | None = Field(default=None, foreign_key="customer.id")


class CustomerAddress(SQLModel, table=True):
    __tablename__ = "customer_address"
    id: int | None = Field(default=None, primary_key=True)
    customer_id: int = Field(foreign_key="customer.id", index=True)
    address: str = Field(unique=True)  # lowercased
    created_at: datetime
    # Set by a permanent DSN about our mail to this address; cleared when it writes again.
    undeliverable_since: datetime | None = None
    undeliverable_reason: str = ""


class CustomerMerge(SQLModel, table=True):
    """History of `customers merge A B`: what moved where, and when."""

    __tablename__ = "customer_merge"
    id: int | None = Field(default=None, primary_key=True)
    source_id: int = Field(foreign_key="customer.id")
    target_id: int = Field(foreign_key="customer.id")
    addresses: str = Field(sa_column=Column(Text, nullable=False))  # JSON list
    tickets: str = Field(sa_column=Column(Text, nullable=False))  # JSON list of refs
    at: datetime
    by: str = ""


class Ticket(SQLModel, table=True):
    __table_args__ = (
        Index("ticket_escalate", "status", "escalate_at"),
        Index("ticket_snoozed", "snoozed_until"),
        Index("ticket_owner_status", "owner", "status"),
        Index("ticket_queue_created", "queue", "created_at", "first_responded_at"),
        # The escalator's queue of tickets to be planned, in id order (migration 0012).
        Index(
            "ticket_to_plan",
            "id",
            postgresql_where=text(TO_PLAN),
            sqlite_where=text(TO_PLAN),
        ),
    )
    id: int | None = Field(default=None, primary_key=True)
    ref: str = Field(unique=True)
    status: str = "open"  # open | waiting | closed
    subject: str = ""
    normalized_subject: str = Field(default="", index=True)
    requester: str = ""
    customer_id: int | None = Field(default=None, foreign_key="customer.id", index=True)
    owner: str = ""  # person id from rules/
    queue: str = ""
    priority: str = "normal"
    tags: str = "[]"  # JSON list
    sla: str = ""
    route: str | None = None
    created_at: datetime
    updated_at: datetime
    closed_at: datetime | None = None
    # SLA clocks: the promise in the acknowledgement and what the escalator enforces.
    first_response_due: datetime | None = None
    next_response_due: datetime | None = None
    resolution_due: datetime | None = None
    first_responded_at: datetime | None = None
    last_customer_at: datetime | None = None
    last_staff_at: datetime | None = None
    waiting_since: datetime | None = None
    snoozed_until: datetime | None = None
    acknowledged: bool = False
    # The language of the ticket's letters ("" = not chosen yet) and its brand ("" = the
    # installation's own identity); both chosen once, kept for the ticket's life (docs/decisions.md
    # D17).
    language: str = ""
    brand: str = ""
    # The earliest moment of the ticket's escalation plan not fired yet (docs/decisions.md D16): the
    # escalator reads only tickets with escalate_at <= now (indexed), so a pass costs the
    # same at 100 or 100,000 open tickets. NULL = to be planned: set whenever a column the
    # plan depends on changes (`gateway.store.plan_marks`), computed by the escalator.
    escalate_at: datetime | None = None


class Participant(SQLModel, table=True):
    __table_args__ = (UniqueConstraint("ticket_id", "address"),)
    id: int | None = Field(default=None, primary_key=True)
    ticket_id: int = Field(foreign_key="ticket.id", index=True)
    address: str = Field(index=True)  # lowercased
    role: str = "cc"  # requester | cc | staff
    added_at: datetime


class Message(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    # Robot mail that matches no ticket (an unknown bounce) is still recorded, ticketless.
    ticket_id: int | None = Field(default=None, foreign_key="ticket.id", index=True)
    direction: str = "in"  # in | out
    kind: str = "customer"  # see docs/interface.md message kinds
    message_id: str | None = Field(default=None, index=True)  # the header, with <>
    dedupe_key: str = Field(unique=True)  # sha256 of envelope + raw (docs/design.md §2)
    raw_sha256: str = Field(index=True)
    mail_from: str = ""  # envelope sender
    from_address: str = ""
    to: str = "[]"  # JSON list (header To + Cc, and envelope recipients)
    subject: str = ""
    at: datetime
    size: int = 0
    raw: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    text: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    in_reply_to: str | None = None
    references: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    robot: str = ""  # classification reasons, "" for a human
    auth: str = "{}"  # JSON sender-authentication result
    # The From address was neither authenticated nor the envelope sender (docs/decisions.md D10):
    # the mail counted as nobody's and made nobody a participant.
    sender_unverified: bool = False
    not_kept: str = "[]"  # JSON list of what was not kept (oversize parts, truncation)
    spool_id: int | None = None
    # The front filter's spam verdict and whether it was trusted (gateway.security.spam).
    spam: str = Field(default="{}", sa_column=Column(Text, nullable=False, default="{}"))


class MessageRef(SQLModel, table=True):
    """Each Message-ID an inbound message names in In-Reply-To/References (indexed), so a
    reply whose parent we never received can still be linked to the ticket that shares its
    ancestor (fedora-devel corpus: list threads whose root arrived before our time)."""

    __tablename__ = "message_ref"
    id: int | None = Field(default=None, primary_key=True)
    message_id: int = Field(foreign_key="message.id", index=True)
    ref: str = Field(index=True)


class Event(SQLModel, table=True):
    """The audit trail: why every automatic decision was taken."""

    id: int | None = Field(default=None, primary_key=True)
    ticket_id: int | None = Field(default=None, foreign_key="ticket.id", index=True)
    message_id: int | None = Field(default=None, foreign_key="message.id")
    at: datetime
    type: str
    detail: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    data: str = Field(default="{}", sa_column=Column(Text, nullable=False, default="{}"))


class TicketLink(SQLModel, table=True):
    __tablename__ = "ticket_link"
    __table_args__ = (UniqueConstraint("ticket_id", "other_id", "relation"),)
    id: int | None = Field(default=None, primary_key=True)
    ticket_id: int = Field(foreign_key="ticket.id", index=True)
    other_id: int = Field(foreign_key="ticket.id")
    relation: str  # possible-follow-up | follow-up-of-closed | merged-into
    created_at: datetime


class Outbox(SQLModel, table=True):
    """Transactional outbox: written with the ticket change, sent by the delivery worker."""

    __table_args__ = (
        Index("outbox_due", "state", "next_attempt_at"),
        Index("outbox_claims", "state", "claimed_by"),
        Index("outbox_rcpt_kind", "rcpt_tos", "kind", "created_at"),
    )
    id: int | None = Field(default=None, primary_key=True)
    ticket_id: int | None = Field(default=None, foreign_key="ticket.id", index=True)
    kind: str  # ack | notification | staff_reply | escalation | customer_notice | confirmation
    mail_from: str = ""  # envelope sender ("" = null sender for automatic mail)
    rcpt_tos: str = "[]"  # JSON list
    message_id: str = Field(default="", index=True)  # bounces are matched by it
    raw: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    state: str = "queued"  # queued | sending | sent | failed | given_up
    attempts: int = 0
    created_at: datetime
    first_attempt_at: datetime | None = None
    next_attempt_at: datetime
    sent_at: datetime | None = None
    last_error: str = ""
    claimed_until: datetime | None = None
    # The claim (migration 0004_delivery): which node holds the row, which run of it, and a
    # fencing token bumped by every claim; only the current claim may record the outcome.
    claimed_by: str = ""
    claim_boot: str = ""
    claim_token: int = 0


class AssignmentCursor(SQLModel, table=True):
    """Round-robin position of each route's team."""

    __tablename__ = "assignment_cursor"
    route: str = Field(primary_key=True)
    person: str
    updated_at: datetime


class EscalationStep(SQLModel, table=True):
    """One fired escalation step; the unique key makes each fire exactly once."""

    __tablename__ = "escalation_step"
    __table_args__ = (UniqueConstraint("ticket_id", "clock", "due_at", "step"),)
    id: int | None = Field(default=None, primary_key=True)
    ticket_id: int = Field(foreign_key="ticket.id", index=True)
    clock: str  # first_response | next_response | resolution
    due_at: datetime
    step: int  # index in the policy's ladder; -1 = warning before the breach
    person: str = ""
    action: str = ""
    fired_at: datetime


class AuthRecheck(SQLModel, table=True):
    """A decision waiting for a sender check that could not complete (docs/decisions.md D10).

    ``purpose`` ``ack``: the acknowledgement of the message's new ticket is deferred until the
    sender's DKIM/SPF/DMARC verdict is known; ``staff``: a reply on a staff token is held, not
    relayed, its commands not applied, until its From domain is proven.  The re-check worker
    (``gateway.pipeline.recheck``) re-runs authentication on the stored raw message with the
    SMTP client's address and HELO kept here, with backoff, until ``deadline``.
    """

    __tablename__ = "auth_recheck"
    __table_args__ = (Index("auth_recheck_due", "state", "next_check_at"),)
    id: int | None = Field(default=None, primary_key=True)
    message_id: int = Field(foreign_key="message.id", index=True)
    ticket_id: int | None = Field(default=None, foreign_key="ticket.id", index=True)
    purpose: str  # ack | staff
    client_ip: str = ""
    helo: str = ""
    created_at: datetime
    deadline: datetime
    next_check_at: datetime
    attempts: int = 0
    state: str = "waiting"  # waiting | done
    outcome: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    data: str = Field(default="{}", sa_column=Column(Text, nullable=False, default="{}"))


class Promise(SQLModel, table=True):
    """A statement of a person or a time made to someone (docs/decisions.md D11, "One plan, said and
    done"): the acknowledgement's first-response promise, each customer notice's next
    commitment, a staff mail's "answer by". `state` is pending, kept, broken or withdrawn."""

    id: int | None = Field(default=None, primary_key=True)
    ticket_id: int = Field(foreign_key="ticket.id", index=True)
    made_at: datetime
    audience: str = "customer"  # customer | staff
    to: str = ""  # the address the promise was made to
    person: str = ""  # the person id accountable for keeping it
    message_id: str = ""  # the mail that made it
    what: str = ""
    clock: str = ""  # first_response | next_response | resolution
    due: datetime | None = None  # None: a named person, no time (the ladder is exhausted)
    state: str = Field(default="pending", index=True)
    settled_at: datetime | None = None
    told: str = ""  # Message-ID of the notice that told the customer it was broken


class Junk(SQLModel, table=True):
    """One message kept out of the ticket queue (docs/decisions.md D18): a route's ``disposition =
    "junk"``, a blocked sender, or a staff ``#junk`` on a ticket. The raw message and the
    envelope are kept so ``junk release`` can process it as if it had just arrived; ``events``
    is its audit trail (the route trace, the spam verdict, who released it and why)."""

    __table_args__ = (Index("junk_state_at", "state", "junked_at"),)
    id: int | None = Field(default=None, primary_key=True)
    state: str = "junk"  # junk | released | expired
    source: str = "route"  # route | blocked | staff
    reason: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    rule: str = ""  # the route that said junk, "#junk" or "blocked sender"
    received_at: datetime
    junked_at: datetime
    mail_from: str = ""
    rcpt_tos: str = "[]"  # JSON list
    peer: str = ""
    helo: str = ""
    from_address: str = Field(default="", index=True)
    subject: str = ""
    message_id: str | None = Field(default=None, index=True)
    dedupe_key: str = Field(index=True)
    size: int = 0
    raw: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    spam: str = Field(default="{}", sa_column=Column(Text, nullable=False, default="{}"))
    events: str = Field(default="[]", sa_column=Column(Text, nullable=False, default="[]"))
    # Set when a staff #junk moved a ticket's message here.
    ticket_id: int | None = Field(default=None, foreign_key="ticket.id", index=True)
    message_row_id: int | None = Field(default=None, foreign_key="message.id")
    released_at: datetime | None = None
    released_by: str = ""
    released_reason: str = ""
    expired_at: datetime | None = None


class BlockedSender(SQLModel, table=True):
    """``#junk sender``: this address's future mail goes to the junk folder (never
    answered, never lost: ``junk release`` and ``customers unblock`` undo it)."""

    __tablename__ = "blocked_sender"
    id: int | None = Field(default=None, primary_key=True)
    address: str = Field(unique=True)  # lowercased
    blocked_at: datetime
    by: str = ""
    ticket_ref: str = ""
    reason: str = ""


class BundleItem(SQLModel, table=True):
    """A customer's new mail waiting for the bundled acknowledgement or owner notification.

    docs/decisions.md D12: further new mails from one customer within ``outbound.ack_window`` after
    an acknowledgement (``purpose`` ``ack``, ``recipient`` = the customer's address) or after an
    owner notification (``notify``, ``recipient`` = the person id) are not answered one by
    one: each waits here until ``due_at`` (the window's close), when the bundle worker
    (``gateway.pipeline.bundle``) sends ONE message covering all of them.
    """

    __tablename__ = "bundle_item"
    __table_args__ = (Index("bundle_item_due", "state", "due_at"),)
    id: int | None = Field(default=None, primary_key=True)
    purpose: str  # ack | notify
    recipient: str = Field(index=True)
    customer_id: int | None = Field(default=None, foreign_key="customer.id")
    ticket_id: int = Field(foreign_key="ticket.id", index=True)
    message_id: int = Field(foreign_key="message.id")
    how: str = "new"  # new (opened the ticket) | joined (known customer, same ticket)
    created_at: datetime
    due_at: datetime
    state: str = "waiting"  # waiting | sent | capped
    sent_at: datetime | None = None
    outcome: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))


class SpoolRow(SQLModel, table=True):
    """The durable spool in the database (PostgreSQL ingest, docs/decisions.md D13;
    gateway/pgspool.py).

    Same life as an entry of the SQLite spool (gateway/spool.py), plus the node that
    accepted it and the claim: ``claimed_by`` (node name) and ``lease_until`` (epoch
    seconds), after which any node may claim the entry again.
    """

    __tablename__ = "spool_entry"
    __table_args__ = (Index("spool_entry_state", "state", "id"),)
    id: int | None = Field(default=None, primary_key=True)
    dedupe_key: str = Field(unique=True)
    received_at: str
    envelope: str = Field(sa_column=Column(Text, nullable=False))
    raw: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    state: str = "pending"
    attempts: int = 0
    last_error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    quarantined_at: str | None = None
    not_before: float = 0.0
    accepted_by: str = ""
    claimed_by: str = ""
    lease_until: float = 0.0


class Installation(SQLModel, table=True):
    """Facts every node of one installation must agree on (``secret-fingerprint``)."""

    __tablename__ = "installation"
    key: str = Field(primary_key=True)
    value: str
    set_by: str = ""
    set_at: str = ""
