"""Behind a front MTA (docs/decisions.md D14.3): SPF is judged on the client the relay saw.

The daemon gets the mail over real SMTP from 127.0.0.1 (the front MTA's address) with the
Received header Postfix writes; the customer's domain publishes SPF for its real server only.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.app import Gateway
from gateway.clock import FrozenClock
from gateway.security.dns import StaticResolver
from tests.conftest import make_settings
from tests.support.gateway import all_tickets, inbound, make_mail, send, ticket_json

RECEIVED = (
    "from mail.customer.example (mail.customer.example [192.0.2.10]) by mx.example.com "
    "(Postfix) with ESMTP id 4ABCD1234 for <support@example.com>; Mon, 23 Nov 2026 10:00:00 +0100"
)


async def _auth_of_one_message(tmp_path: Path, clock: FrozenClock, relays: list[str]) -> dict:  # type: ignore[type-arg]
    settings = make_settings(tmp_path, security={"trusted_relays": relays})
    dns = StaticResolver({("customer.example", "TXT"): ["v=spf1 ip4:192.0.2.10 -all"]})
    gw = Gateway(settings, clock=clock, resolver=dns)
    await gw.start(workers=False)
    try:
        m = make_mail()
        m["Received"] = RECEIVED
        await send(gw, m, sender="pat@customer.example", recipients=["support@example.com"])
        await gw.pipeline.run_once()
        [t] = all_tickets(gw)
        [msg] = inbound(ticket_json(gw, t.ref))
        return msg["auth"]  # type: ignore[no-any-return]
    finally:
        await gw.stop()


@pytest.mark.parametrize("relays", [["127.0.0.1/32"], ["127.0.0.0/8", "::1"]])
async def test_spf_uses_the_address_the_trusted_relay_saw(
    tmp_path: Path, clock: FrozenClock, relays: list[str]
) -> None:
    auth = await _auth_of_one_message(tmp_path, clock, relays)
    assert auth["spf"] == "pass"
    assert auth["likely_forged"] is False
    assert auth["authenticated"] is True


async def test_without_trust_the_relay_address_fails_spf(
    tmp_path: Path, clock: FrozenClock
) -> None:
    # What happened before trusted_relays: 127.0.0.1 is not in the domain's SPF.
    auth = await _auth_of_one_message(tmp_path, clock, [])
    assert auth["spf"] == "fail"
    assert auth["likely_forged"] is True
