"""Who a letter is from: the installation's own identity or a brand of the rules (docs/decisions.md
D17).

A ticket keeps its brand for life (``Ticket.brand``, set once when it is opened), so every
letter about it (acknowledgement, customer notices, the late message, staff replies relayed
to the customer) goes From the brand's address with the brand's signature; the reply
address (a signed token) and the Message-ID use the brand's domain, and the delivery worker
signs with the key whose domain is the From's (gateway.outbound.worker).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: routing imports this module (rules explain)
    from gateway.routing.model import Rules
    from gateway.settings import Settings

__all__ = ["Identity", "brand_domains", "identity"]


@dataclass(frozen=True)
class Identity:
    brand: str  # "" = the installation's own identity
    from_address: str
    from_name: str
    signature: str
    business_name: str
    reply_local: str
    reply_domain: str
    message_id_domain: str


def identity(settings: Settings, rules: Rules | None, brand_id: str | None) -> Identity:
    """The identity of ``brand_id``; the configured one when it is empty or no longer in
    the rules (a removed brand must not stop the letters of its old tickets)."""
    brand = (rules.brands.get(brand_id) if rules is not None and brand_id else None) or None
    if brand is None:
        out = settings.outbound
        local, _, domain = out.from_address.rpartition("@")
        return Identity(
            "",
            out.from_address,
            out.from_name,
            out.from_name or out.from_address,
            out.from_name or out.from_address,
            local.split("+", 1)[0],
            domain,
            settings.smtp.hostname,
        )
    local = brand.from_address.rpartition("@")[0].split("+", 1)[0]
    name = brand.from_name or brand.from_address
    return Identity(
        brand.id,
        brand.from_address,
        brand.from_name,
        brand.signature or name,
        brand.business_name or name,
        local,
        brand.reply_to_domain,
        brand.dkim_domain or brand.domain,
    )


def brand_domains(rules: Rules | None) -> set[str]:
    """Every domain mail to a brand arrives at (its From and reply-address domains)."""
    if rules is None:
        return set()
    found: set[str] = set()
    for brand in rules.brands.values():
        found.add(brand.domain)
        found.add(brand.reply_to_domain)
    return found
