"""What the routing engine may know about a message: a small, typed, immutable summary.

The pipeline's parse/authenticate stages build `MessageFacts`; the engine never looks at raw
MIME, so routing stays a pure function that tests can drive with literals.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MessageFacts"]


@dataclass(frozen=True)
class MessageFacts:
    """The routable facts of one inbound message.

    `recipients` are the envelope RCPT TO plus To/Cc header addresses and `sender` the From
    address, all lowercased by whoever builds the facts. Header names compare
    case-insensitively (RFC 5322 §1.2.2), values as given.
    """

    recipients: tuple[str, ...]
    sender: str
    subject: str
    body: str
    headers: tuple[tuple[str, str], ...] = ()
    authenticated: bool = False
    has_attachment: bool = False
    # The front filter's verdict, only when it came from a trusted relay (docs/decisions.md D18): an
    # untrusted X-Spam-Flag leaves spam False and spam_score None.
    spam: bool = False
    spam_score: float | None = None
    #: Facts read by match conditions that bring their own reader (`Condition.fact` in
    #: gateway.routing.conditions): (match key, value) pairs.
    extra: tuple[tuple[str, object], ...] = ()

    def fact(self, key: str) -> object:
        """The fact the condition `key` read from the message (None when it has none)."""
        return next((value for k, value in self.extra if k == key), None)

    def header_values(self, name: str) -> tuple[str, ...]:
        """Every value of header `name` (case-insensitive name), in message order."""
        wanted = name.lower()
        return tuple(value for key, value in self.headers if key.lower() == wanted)
