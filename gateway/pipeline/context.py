"""What the stages share while one spooled message is processed (one DB transaction)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlmodel import Session

from gateway.clock import Clock
from gateway.pipeline.bounce import BounceInfo
from gateway.pipeline.classify import RobotVerdict
from gateway.pipeline.parse import ParsedMessage
from gateway.pipeline.thread import ThreadDecision
from gateway.routing.engine import Decision
from gateway.routing.model import Rules
from gateway.security.dns import Resolver
from gateway.security.sender_auth import AuthResult
from gateway.security.spam import SpamVerdict
from gateway.security.tokens import Signer
from gateway.settings import Settings
from gateway.spool import SpoolEntry
from gateway.store.models import Message, Ticket


@dataclass
class Services:
    """Long-lived collaborators the stages use (built once in `gateway.app`)."""

    settings: Settings
    clock: Clock
    signer: Signer
    rules: Rules
    resolver: Resolver | None = None


@dataclass
class Context:
    entry: SpoolEntry
    session: Session
    services: Services
    now: datetime
    received_at: datetime
    parsed: ParsedMessage | None = None
    verdict: RobotVerdict | None = None
    bounce: BounceInfo | None = None
    auth: AuthResult | None = None
    thread: ThreadDecision | None = None
    decision: Decision | None = None
    ticket: Ticket | None = None
    message: Message | None = None
    sender: str = ""
    # Whether `sender` (the From address) is proven: authenticated or equal to the envelope
    # sender (thread.from_is_verified). An unverified From makes nobody a participant.
    sender_verified: bool = True
    unverified_reason: str = ""
    kind: str = "customer"
    staff_hold_reason: str = ""  # why a staff reply waits for its sender check (staff.judge)
    spam: SpamVerdict | None = None  # the front filter's verdict (docs/decisions.md D18)
    # Set when the message goes to the junk folder instead of the ticket queue (docs/decisions.md
    # D18): (source, rule, reason); the driver then ends the chain and files it there
    # (stages.run_stages).
    junk: tuple[str, str, str] | None = None
    # docs/decisions.md D12: a human's NEW mail (not a reply): "new" opened a ticket, "joined" went
    # into the customer's open ticket (gateway.pipeline.conversation); "" for anything else.
    fresh: str = ""
    events: list[tuple[str, str, Any]] = field(default_factory=list)

    def event(self, type_: str, detail: str, data: Any = None) -> None:
        self.events.append((type_, detail, data))
