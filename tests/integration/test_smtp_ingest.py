"""Issue 2: durable SMTP ingest that never bounces a customer (real sockets, real spool)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiosmtplib
import pytest

from gateway.clock import FrozenClock
from gateway.settings import Settings
from tests.conftest import make_settings
from tests.support.gateway import all_tickets, make_mail, running_gateway, send, ticket_json


async def test_message_becomes_a_ticket(settings: Settings, clock: FrozenClock) -> None:
    async with running_gateway(settings, clock) as gw:
        code, text = await send(gw, make_mail())
        assert code == 250 and "queued as" in text
        assert await gw.pipeline.run_once() == 1
        [t] = all_tickets(gw)
        d = ticket_json(gw, t.ref)
        assert d["ref"] == "ACME-1000"
        assert d["requester"] == "pat@customer.example"
        assert d["owner"] == {"id": "alice", "name": "Alice Martin", "email": "alice@example.com"}
        assert d["messages"][0]["kind"] == "customer"
        assert d["created_at"] == "2026-11-23T09:00:00Z"
        # Standard SLA: 4 business hours in Berlin from Mon 10:00 local -> 14:00 local = 13:00Z.
        assert d["deadlines"]["first_response"] == "2026-11-23T13:00:00Z"
        types = [e["type"] for e in d["events"]]
        assert {"created", "routed", "deadlines"} <= set(types)
