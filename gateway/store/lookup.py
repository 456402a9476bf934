"""What the threading decision may ask of storage, without any storage in it.

`gateway.pipeline.thread.decide` is pure: it reaches stored tickets and messages only
through the `ThreadLookup` protocol below. `gateway.store.queries.SqlLookup` implements it
over a database session; the unit tests implement it over dictionaries. The protocol and its
value type live here, apart from both, so that `store` never imports `pipeline` (the
pipeline uses the store, never the other way round; docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = ["ThreadLookup", "TicketView"]


@dataclass(frozen=True)
class TicketView:
    """The little of a ticket that threading needs."""

    id: int
    ref: str
    status: str


class ThreadLookup(Protocol):
    def duplicate_of(
        self, dedupe_key: str, message_id: str | None
    ) -> tuple[int, int | None] | None:
        """(message row id, ticket id) of an identical stored message, if any."""
        ...

    def ticket_of_message_id(self, message_id: str) -> int | None:
        """Ticket of a stored message (inbound or outbound) with this Message-ID header."""
        ...

    def ticket(self, ticket_id: int) -> TicketView | None: ...

    def ticket_by_ref(self, ref: str) -> TicketView | None: ...

    def is_participant(self, ticket_id: int, address: str) -> bool: ...

    def tickets_referencing(self, message_id: str) -> list[int]:
        """Tickets of stored messages that also name this (unknown to us) Message-ID."""
        ...

    def ticket_of_outbound(self, message_ids: Sequence[str]) -> int | None:
        """Ticket of the first of these Message-IDs that we sent (a bounce's original)."""
        ...
