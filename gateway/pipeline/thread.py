"""Thread stage: which ticket does this message belong to, and why (docs/design.md §4).

Threading proves the ticket, participation proves the person (docs/decisions.md D10). Order of
precedence, first hit wins:
1. exact duplicate (same envelope+bytes hash, or a Message-ID we already stored): record,
   do nothing else;
2. a signed reply token in a recipient address (`support+<token>@domain`): a *staff* token
   (one naming a person) always reaches its ticket, the staff stage then judges the person;
   a *customer* token joins only when the sender is a participant;
3. In-Reply-To/References naming a Message-ID *we* generated and signed, only when the sender
   is a participant;
4. In-Reply-To/References naming a stored Message-ID of a ticket, only when the sender is
   a participant of that ticket (or the same customer under another address);
5. a ticket reference in the subject (`[ACME-1042]`), only when the sender is a participant;
6. otherwise a new ticket, linked (`possible-follow-up`) to every ticket it referenced, so a
   stranger who quotes a ticket number, one of our Message-IDs or a customer reply token
   never lands in (nor is copied on) someone else's ticket (zammad#5064) but the owner still
   sees the connection. A reference to a message we never received is followed too: tickets
   whose messages name the same unknown ancestor are linked (never joined), which keeps list
   threads whose root predates us together.

Our signed Message-IDs and customer reply tokens travel in every forward, quote and
reply-all: they prove *which ticket* is meant, never *who may join it*. "The sender is a
participant" needs two things: the sender's From address is on the ticket (`is_participant`)
and that From address is verified (`sender_verified`: authenticated, or equal to the envelope
sender; see `from_is_verified`). Robot mail (auto-replies, bounces, our own mail coming back)
still reaches its ticket by a signed reference without being a participant: it never becomes
one, never reopens and never pages anybody.

Robot mail then has its own outcomes (docs/design.md §3): an auto-reply or our own mail that
reached no ticket is `unmatched-auto-reply` or `loop`; a bounce belongs to the ticket whose
outbound message it reports on (`bounce`), whatever it quoted, or to none
(`unmatched-bounce`), and never opens one (§3 rule 7).

The outcome is one `Disposition`; each selects its list of stages (`stages.CHAINS`). The
decision is pure: storage is reached only through the `ThreadLookup` protocol
(gateway/store/lookup.py), so it is tested without I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

from gateway.pipeline.parse import ParsedMessage
from gateway.pipeline.subject import find_ticket_refs
from gateway.security.tokens import ReplyClaim, Signer
from gateway.store.lookup import ThreadLookup, TicketView

__all__ = [
    "Disposition",
    "RobotMail",
    "ThreadDecision",
    "ThreadLookup",
    "TicketView",
    "decide",
    "from_is_verified",
    "robot_mail",
]


class Disposition(StrEnum):
    """What becomes of a message: the outcome of threading, which selects its stages.

    The values are the words the audit trail, the log line's ``thread`` field and JSON have
    always shown (docs/interface.md), so they must not change.
    """

    DUPLICATE = "duplicate"  # stored before: record that, nothing else
    REPLY_TOKEN = "reply-token"  # a signed reply address (customer or staff token)  # noqa: S105 (a disposition name, not a password)
    OUR_MESSAGE_ID = "our-message-id"  # a reply to a Message-ID we signed
    KNOWN_MESSAGE_ID = "known-message-id"  # a reply to a stored message of a ticket
    SUBJECT_REF = "subject-ref"  # the subject names a ticket the sender takes part in
    NEW = "new"  # a new ticket (routed, acknowledged, its owner notified)
    # A known customer's new mail joined their open request (conversation.py). Never the
    # outcome of `decide`: the known-customer stage sets it inside the NEW chain, because the
    # policy comes from the route.
    KNOWN_CUSTOMER = "known-customer"
    BOUNCE = "bounce"  # a bounce of one of our messages: joins that ticket
    UNMATCHED_BOUNCE = "unmatched-bounce"  # a bounce of nothing we know: no ticket
    UNMATCHED_AUTO_REPLY = "unmatched-auto-reply"  # an out-of-office for no ticket
    LOOP = "loop"  # our own mail came back and names no ticket


class RobotMail(StrEnum):
    """Robot mail that joins a ticket without its sender becoming a participant."""

    AUTO_REPLY = "auto_reply"
    LOOP = "loop"
    BOUNCE = "bounce"

    @property
    def message_kind(self) -> str:
        """The stored message's kind: our own mail coming back is filed as an auto-reply."""
        return "bounce" if self is RobotMail.BOUNCE else "auto_reply"


def robot_mail(verdict_kind: str, envelope_sender: str) -> RobotMail | None:
    """Which robot mail this is, from the classifier's kind and the envelope — pure.

    Out-of-office replies (often sent with the null reverse-path, RFC 3834 §3.1.3) stay
    auto-replies. Reports and bounces are bounces; so is any other mail with the null
    reverse-path, which is reserved for such notifications (RFC 5321 §4.5.5), even when its
    content is not a recognisable report. List, bulk and other robot kinds are None: such
    mail must take part like a human's.
    """
    if verdict_kind in ("auto_reply", "loop"):
        return RobotMail(verdict_kind)
    if verdict_kind in ("bounce", "report") or not envelope_sender:
        return RobotMail.BOUNCE
    return None


def from_is_verified(
    from_address: str, envelope_sender: str, *, authenticated: bool
) -> tuple[bool, str]:
    """Does the From address count as the person it names? (verified, why) — pure.

    Yes when the From domain is authenticated (aligned DKIM or SPF pass, or a trusted
    Authentication-Results: `AuthResult.authenticated`, RFC 7489 §3.1), or when From equals
    the envelope sender, case-insensitively. A plain comparison on purpose: SRS (forwarders)
    and BATV (`prvs=...=local@domain`) rewrite the envelope, so such mail is verified only
    through DKIM; a signed domain is the better proof anyway. With `security.verify_senders`
    off there is no authentication, and the envelope match is the only proof. A message
    without a From address is taken as its envelope sender's (nothing else is claimed).
    """
    claimed = from_address.strip().lower()
    envelope = envelope_sender.strip().lower()
    if not claimed:
        return True, "no From address: the envelope sender stands for the sender"
    if authenticated:
        return True, f"the domain of {claimed} is authenticated"
    if claimed == envelope:
        return True, f"{claimed} is also the envelope sender"
    return False, (
        f"the From address {claimed} is not authenticated and the envelope sender is "
        f"{envelope or '<> (null)'}"
    )


@dataclass
class ThreadDecision:
    disposition: Disposition
    ticket: TicketView | None
    detail: str
    duplicate_of: int | None = None
    claim: ReplyClaim | None = None  # the reply token's claim (staff tokens carry a person)
    links: list[tuple[int, str, str]] = field(default_factory=list)  # (ticket, relation, why)
    notes: list[str] = field(default_factory=list)  # keys seen but refused, and why
    reopen: bool = False
    # docs/decisions.md D12: the ticket the message named had been merged into `ticket`.
    redirected_from: TicketView | None = None

    @property
    def is_new(self) -> bool:
        """A new ticket is to be opened (robot mail that reached no ticket opens none)."""
        return self.disposition is Disposition.NEW


def decide(
    parsed: ParsedMessage,
    *,
    sender: str,
    recipients: Collection[str],
    dedupe_key: str,
    signer: Signer,
    lookup: ThreadLookup,
    ref_prefix: str,
    closed_followup: str = "reopen",
    sender_verified: bool = True,
    robot: RobotMail | None = None,
    bounced: Sequence[str] = (),
    merged_into: Callable[[int], TicketView | None] | None = None,
) -> ThreadDecision:
    """Decide the ticket and the disposition of one message. `sender` is the From (else
    envelope) address.

    `sender_verified` False: the From address is not proven (see `from_is_verified`), so it
    counts as nobody's: the sender is a participant of no ticket. `robot` (see `robot_mail`):
    a signed reference of ours reaches its ticket without participation, and the outcome is
    a robot's (module docstring). `bounced`: the Message-IDs a bounce reports on
    (`bounce.BounceInfo.original_message_ids`). `merged_into` (docs/decisions.md D12): the ticket a
    merged ticket went into; every key that names a merged ticket (its tokens, Message-IDs, subject
    reference) reaches the target instead, so a merged ticket never reopens.
    """
    d = _match(
        parsed,
        sender=sender,
        recipients=recipients,
        dedupe_key=dedupe_key,
        signer=signer,
        lookup=lookup,
        ref_prefix=ref_prefix,
        closed_followup=closed_followup,
        sender_verified=sender_verified,
        robot=robot is not None,
        merged_into=merged_into,
    )
    if robot is None or d.disposition is Disposition.DUPLICATE:
        return d
    return _robot_outcome(d, robot, bounced, signer, lookup)


def _robot_outcome(
    d: ThreadDecision,
    robot: RobotMail,
    bounced: Sequence[str],
    signer: Signer,
    lookup: ThreadLookup,
) -> ThreadDecision:
    """Robot mail joins its ticket without reopening it (docs/design.md §3); unmatched, it
    is recorded without a ticket and links to none."""
    d.reopen = False
    if robot is not RobotMail.BOUNCE:
        if d.ticket is None:
            auto = robot is RobotMail.AUTO_REPLY
            d.disposition = Disposition.UNMATCHED_AUTO_REPLY if auto else Disposition.LOOP
            d.links.clear()
        return d
    # A bounce belongs to the ticket whose outbound message it reports on, stored or signed;
    # only failing both, to the ticket its references reached (§3 rule 7).
    target = lookup.ticket_of_outbound(bounced)
    if target is None:
        target = next(
            (t for t in map(signer.ticket_from_message_id, bounced) if t is not None), None
        )
    if target is None and d.ticket is not None:
        target = d.ticket.id
    ticket = lookup.ticket(target) if target is not None else None
    if ticket is None or d.ticket is None or ticket.id != d.ticket.id:
        d.redirected_from = None  # the redirect was of a ticket the bounce does not join
    d.links.clear()
    d.ticket = ticket
    d.disposition = Disposition.BOUNCE if ticket else Disposition.UNMATCHED_BOUNCE
    return d


def _match(
    parsed: ParsedMessage,
    *,
    sender: str,
    recipients: Collection[str],
    dedupe_key: str,
    signer: Signer,
    lookup: ThreadLookup,
    ref_prefix: str,
    closed_followup: str,
    sender_verified: bool,
    robot: bool,
    merged_into: Callable[[int], TicketView | None] | None,
) -> ThreadDecision:
    """The threading keys in order of precedence (module docstring), first hit wins."""
    dup = lookup.duplicate_of(dedupe_key, parsed.message_id)
    if dup is not None:
        msg_row, ticket_id = dup
        ticket = lookup.ticket(ticket_id) if ticket_id is not None else None
        why = f"same message already stored (message {msg_row})"
        return ThreadDecision(Disposition.DUPLICATE, ticket, why, duplicate_of=msg_row)

    m = _Matcher(
        sender=sender,
        signer=signer,
        lookup=lookup,
        closed_followup=closed_followup,
        sender_verified=sender_verified,
        robot=robot,
        merged_into=merged_into,
    )
    # 2. Signed reply token in a recipient address.
    for rcpt in recipients:
        if (d := m.by_token(rcpt)) is not None:
            return d
    # 3. and 4. In-Reply-To / References.
    for mid in parsed.referenced_ids:
        if (d := m.by_reference(mid)) is not None:
            return d
    # 5. Ticket reference in the subject.
    for ref in find_ticket_refs(parsed.subject, ref_prefix):
        if (d := m.by_subject(ref)) is not None:
            return d
    return m.unmatched()


@dataclass
class _Matcher:
    """One message's threading keys tried in turn (:func:`_match`): each ``by_*`` method
    returns the decision when its key joins a ticket, else None after noting why not."""

    sender: str
    signer: Signer
    lookup: ThreadLookup
    closed_followup: str
    sender_verified: bool
    robot: bool
    merged_into: Callable[[int], TicketView | None] | None
    notes: list[str] = field(default_factory=list)
    # Tickets named by this message but not joined, and how.
    referenced: dict[int, str] = field(default_factory=dict)

    @property
    def who(self) -> str:
        return self.sender or "the sender"

    def follow(self, ticket: TicketView) -> TicketView:
        current, seen = ticket, {ticket.id}
        while self.merged_into is not None:
            nxt = self.merged_into(current.id)
            if nxt is None or nxt.id in seen:
                break
            seen.add(nxt.id)
            current = nxt
        return current

    def joined(
        self,
        named: TicketView,
        ticket: TicketView,
        key: Disposition,
        detail: str,
        claim: ReplyClaim | None = None,
    ) -> ThreadDecision:
        if named.id != ticket.id:
            detail += f"; {named.ref} was merged into {ticket.ref}: redirected"
            if claim is not None:
                claim = replace(claim, ticket_id=ticket.id)
        d = _join(ticket, key, detail, self.notes, self.closed_followup, claim=claim)
        if named.id != ticket.id:
            d.redirected_from = named
        return d

    def takes_part(self, ticket: TicketView) -> bool:
        # Robot mail gains nothing by joining (no participant, no reopen, no page), so its
        # From need not be proven; a human's must be.
        return (self.sender_verified or self.robot) and self.lookup.is_participant(
            ticket.id, self.sender
        )

    def refuse(self, ticket: TicketView, how: str, what: str) -> None:
        """Note that ``ticket`` was named (``how``) but not joined, and why (``what`` ...)."""
        self.referenced.setdefault(ticket.id, how)
        if not self.sender_verified and self.lookup.is_participant(ticket.id, self.sender):
            why = f"{what} but the From address {self.who} is not verified, so it does not count"
        else:
            why = f"{what} but {self.who} is not a participant"
        self.notes.append(why)

    def by_token(self, rcpt: str) -> ThreadDecision | None:
        local = rcpt.rpartition("@")[0]
        if "+" not in local:
            return None
        claim = self.signer.parse_reply_address(rcpt)
        if claim is None:
            self.notes.append(f"reply token in {rcpt} is not valid (forged, altered or truncated)")
            return None
        named = self.lookup.ticket(claim.ticket_id)
        if named is None:
            self.notes.append(f"reply token in {rcpt} names no existing ticket")
            return None
        ticket = self.follow(named)
        if not claim.person and not self.robot and not self.takes_part(ticket):
            # A customer token is issued to the requester's address but copied into every
            # forward: it names the ticket, it does not admit whoever holds it.
            self.refuse(
                ticket,
                f"customer reply token of {ticket.ref} in {rcpt}",
                f"reply token in {rcpt} names {ticket.ref}",
            )
            return None
        return self.joined(
            named, ticket, Disposition.REPLY_TOKEN, f"signed reply token in {rcpt}", claim
        )

    def by_reference(self, mid: str) -> ThreadDecision | None:
        ticket_id = self.signer.ticket_from_message_id(mid)
        named = self.lookup.ticket(ticket_id) if ticket_id is not None else None
        if named is not None:
            ticket = self.follow(named)
            if self.robot or self.takes_part(ticket):
                return self.joined(
                    named, ticket, Disposition.OUR_MESSAGE_ID, f"reply to our message {mid}"
                )
            self.refuse(
                ticket,
                f"reply to our message {mid} of {ticket.ref}",
                f"{mid} is our message in {ticket.ref}",
            )
            return None
        known = self.lookup.ticket_of_message_id(mid)
        if known is None:
            self.share_ancestor(mid)
            return None
        named = self.lookup.ticket(known)
        if named is None:
            return None
        ticket = self.follow(named)
        if self.takes_part(ticket):
            return self.joined(
                named, ticket, Disposition.KNOWN_MESSAGE_ID, f"reply to stored message {mid}"
            )
        self.refuse(ticket, f"references {mid} of {ticket.ref}", f"{mid} belongs to {ticket.ref}")
        return None

    def share_ancestor(self, mid: str) -> None:
        """``mid`` was never received: link the tickets whose messages name it too."""
        for tid in self.lookup.tickets_referencing(mid):
            shared = self.lookup.ticket(tid)
            if shared is not None:
                self.referenced.setdefault(
                    tid, f"shares the earlier message {mid} with {shared.ref}"
                )

    def by_subject(self, ref: str) -> ThreadDecision | None:
        named = self.lookup.ticket_by_ref(ref)
        if named is None:
            self.notes.append(f"subject names {ref}, which does not exist")
            return None
        ticket = self.follow(named)
        if self.takes_part(ticket):
            return self.joined(
                named,
                ticket,
                Disposition.SUBJECT_REF,
                f"subject names {ref} and {self.sender} takes part",
            )
        self.refuse(ticket, f"subject names {ref}", f"subject names {ref}")
        return None

    def unmatched(self) -> ThreadDecision:
        decision = ThreadDecision(
            Disposition.NEW, None, "no threading key matched", notes=self.notes
        )
        for tid, why in self.referenced.items():
            decision.links.append((tid, "possible-follow-up", why))
        if self.notes:
            decision.detail = "no threading key matched: " + "; ".join(self.notes)
        return decision


def _join(
    ticket: TicketView,
    key: Disposition,
    detail: str,
    notes: list[str],
    closed_followup: str,
    claim: ReplyClaim | None = None,
) -> ThreadDecision:
    if ticket.status != "closed":
        return ThreadDecision(key, ticket, detail, claim=claim, notes=notes)
    if closed_followup == "new":
        d = ThreadDecision(
            Disposition.NEW,
            None,
            f"{detail}, but {ticket.ref} is closed: new linked ticket",
            notes=notes,
        )
        d.links.append((ticket.id, "follow-up-of-closed", detail))
        return d
    return ThreadDecision(
        key, ticket, f"{detail}; reopens closed {ticket.ref}", claim=claim, notes=notes, reopen=True
    )
