"""Letters an admin can shape (docs/decisions.md D17), end to end: real SMTP into the daemon, the
pipeline, the delivery worker signing with DKIM, a capture relay; the clock is a FrozenClock.

A German customer gets a German acknowledgement, a Russian one (no header, only text) a
Russian one; a route with a brand answers From the brand, signed with the brand's key, and
the customer's reply to it threads; an admin's override of the acknowledgement is used, and
a broken one is refused by `rules check` with file:line.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import dkim
import pytest

from gateway.app import Gateway
from gateway.clock import FrozenClock
from gateway.outbound.dkim import keygen as dkim_keygen
from gateway.outbound.dkim import load_key, public_txt_record
from gateway.outbound.worker import DeliveryWorker
from gateway.pipeline.notify import notify_owner_stage
from gateway.pipeline.stages import CHAINS
from tests.conftest import RULES, make_settings
from tests.support.dkim import KeyTable
from tests.support.gateway import (
    all_tickets,
    inbound,
    make_mail,
    rules_check,
    running_gateway,
    send,
    ticket_json,
)
from tests.support.relay import Captured, CaptureRelay

SELECTOR = "gw1"

BRANDS = """
[brands.b2]
from_address = "help@b2.example"
from_name = "B2 Support"
signature = "Your B2 team"
business_name = "B2 Ltd"
dkim = {{ domain = "b2.example", selector = "gw1", key_file = "{key}" }}

[[route]]
name = "b2"
match = {{ to = ["help@b2.example"] }}
brand = "b2"
"""


@dataclass
class Env:
    gw: Gateway
    worker: DeliveryWorker
    relay: CaptureRelay
    clock: FrozenClock
    dns: dict[str, str]
    root: Path

    async def process(self) -> int:
        await self.gw.pipeline.run_once()
        return await self.worker.run_once()


@pytest.fixture
async def env(tmp_path: Path, clock: FrozenClock, relay: CaptureRelay) -> AsyncIterator[Env]:
    keys = {}
    for domain in ("example.com", "b2.example"):
        path = tmp_path / f"{domain}.key"
        dkim_keygen(path, domain=domain, selector=SELECTOR, bits=1024)
        keys[domain] = path
    rules = tmp_path / "rules"
    rules.mkdir()
    shutil.copy(RULES / "rules.toml", rules / "rules.toml")
    # Sorted before rules.toml: the b2 route is tried first.
    (rules / "00-brands.toml").write_text(BRANDS.format(key=keys["b2.example"]))
    settings = make_settings(
        tmp_path,
        rules_dir=str(rules),
        outbound={
            "relay": f"127.0.0.1:{relay.port}",
            "from_name": "Example Support",
            "ack_window": "0s",  # each test mail its own acknowledgement (no bundling)
            "dkim": {
                "domain": "example.com",
                "selector": SELECTOR,
                "key_file": str(keys["example.com"]),
            },
        },
    )
    async with running_gateway(settings, clock) as gw:
        gw.pipeline.chains = {  # customer mail only
            d: tuple(s for s in chain if s is not notify_owner_stage) for d, chain in CHAINS.items()
        }
        worker = DeliveryWorker(gw.engine, settings, clock, signer=gw.signer)
        dns = {
            f"{SELECTOR}._domainkey.{d}": public_txt_record(load_key(k, d, SELECTOR))
            for d, k in keys.items()
        }
        yield Env(gw, worker, relay, clock, dns, tmp_path)


def _text(captured: Captured) -> str:
    body = captured.message().get_body(preferencelist=("plain",))
    assert body is not None
    return str(body.get_content()).replace("\r\n", "\n")


def _language_event(gw: Gateway, ref: str) -> dict:  # type: ignore[type-arg]
    [event] = [e for e in ticket_json(gw, ref)["events"] if e["type"] == "language"]
    return event  # type: ignore[no-any-return]


def _stated_deadline(text: str) -> str:
    stated = re.search(r"\((\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)\)", text)
    assert stated is not None, text
    return stated.group(1)


async def test_german_customer_gets_a_german_ack_with_the_tickets_deadline_and_owner(
    env: Env,
) -> None:
    mail = make_mail(
        subject="Drucker brennt",
        body="Guten Tag,\nunser Drucker im zweiten Stock brennt seit heute Morgen. "
        "Können Sie bitte jemanden vorbeischicken?\nViele Grüße\nPia\n",
    )
    mail["Content-Language"] = "de"  # after set_content, which clears Content-* headers
    await send(env.gw, mail)
    assert await env.process() == 1
    [ack] = env.relay.messages
    [t] = all_tickets(env.gw)
    d = ticket_json(env.gw, t.ref)
    text = _text(ack)
    assert text.startswith("Guten Tag,")
    assert f"Wir haben dazu das Ticket {t.ref} angelegt." in text
    # The owner and the deadline are the ticket's own, never computed by the template.
    assert f"{d['owner']['name']} kümmert sich um Ihr Anliegen." in text
    assert _stated_deadline(text) == d["deadlines"]["first_response"] == "2026-11-23T13:00:00Z"
    assert "spätestens am Montag, 23. November 2026, 14:00 Uhr CET (Europe/Berlin)" in text
    assert "Unsere Geschäftszeiten: Mo–Fr 09:00–17:00 (Europe/Berlin)" in text
    assert "  Betreff: Drucker brennt" in text
    assert "You will get" not in text
    assert "Hello" not in text
    event = _language_event(env.gw, t.ref)
    assert event["detail"] == "letters in de: Content-Language: de"
    assert env.gw.signer.ticket_from_message_id(ack.message()["Message-ID"]) == t.id
    assert KeyTable(env.dns).verify(ack)


async def test_russian_text_without_a_header_gets_a_russian_ack(env: Env) -> None:
    mail = make_mail(
        subject="Не работает принтер",
        body="Здравствуйте!\nУ нас в офисе со вчерашнего дня не печатает принтер, "
        "горит красная лампочка. Помогите, пожалуйста, разобраться.\nСпасибо, Ольга\n",
    )
    assert "Content-Language" not in mail
    await send(env.gw, mail)
    assert await env.process() == 1
    [ack] = env.relay.messages
    [t] = all_tickets(env.gw)
    d = ticket_json(env.gw, t.ref)
    text = _text(ack)
    assert text.startswith("Здравствуйте!")
    assert f"Мы получили ваше сообщение и открыли обращение {t.ref}." in text
    assert f"Вашим вопросом занимается {d['owner']['name']}." in text
    assert _stated_deadline(text) == d["deadlines"]["first_response"]
    assert "понедельник, 23 ноября 2026 г., 14:00 CET (Europe/Berlin)" in text
    assert "  Тема: Не работает принтер" in text
    detail = _language_event(env.gw, t.ref)["detail"]
    assert detail.startswith("letters in ru: detected in the text (")

    # The customer's earlier choice holds for their next ticket, even for a short text.
    env.relay.messages.clear()
    await send(env.gw, make_mail(subject="ok", body="ok\n"))
    assert await env.process() == 1
    [second] = env.relay.messages
    t2 = all_tickets(env.gw)[1]
    assert _text(second).startswith("Здравствуйте!")
    assert _language_event(env.gw, t2.ref)["detail"] == (
        f"letters in ru: the customer's earlier ticket {t.ref}"
    )


async def test_brand_route_sends_from_the_brand_signed_with_its_key_and_replies_thread(
    env: Env,
) -> None:
    mail = make_mail(to="help@b2.example", subject="Where is my order?")
    await send(env.gw, mail)
    assert await env.process() == 1
    [ack] = env.relay.messages
    [t] = all_tickets(env.gw)
    m = ack.message()
    assert m["From"] == "B2 Support <help@b2.example>"
    assert m["Message-ID"].endswith("@b2.example>")
    assert m["Reply-To"].startswith("help+")
    assert m["Reply-To"].endswith("@b2.example")
    assert _text(ack).rstrip().endswith("Your B2 team")
    # Signed with b2's key, d=b2.example (DMARC-aligned with the From), and it verifies.
    sig = dkim.util.parse_tag_value(m["DKIM-Signature"].encode())
    assert (sig[b"d"], sig[b"s"]) == (b"b2.example", b"gw1")
    assert KeyTable(env.dns).verify(ack)
    only_main = {k: v for k, v in env.dns.items() if "b2.example" not in k}
    assert not KeyTable(only_main).verify(ack)
    d = ticket_json(env.gw, t.ref)
    assert "brand b2" in _language_event(env.gw, t.ref)["detail"]

    # The customer answers the brand's letter: accepted for b2.example, threaded.
    env.relay.messages.clear()
    reply = make_mail(
        to=str(m["Reply-To"]),
        subject=f"Re: {m['Subject']}",
        body="Order number 4711.\n",
        in_reply_to=m["Message-ID"],
        references=[m["Message-ID"]],
    )
    await send(env.gw, reply)
    await env.process()
    assert len(all_tickets(env.gw)) == 1
    d = ticket_json(env.gw, t.ref)
    assert len(inbound(d)) == 2
    assert env.relay.messages == []  # a reply to an open ticket gets no second ack


async def test_admin_override_of_the_acknowledgement_is_used(env: Env) -> None:
    templates = env.root / "templates"  # beside rules/
    templates.mkdir()
    (templates / "ack.en.txt").write_text(
        "Hi there,\n\n$owner has your ticket $ref and answers by $deadline_utc.\n\n$business_name\n"
    )
    await send(env.gw, make_mail())
    assert await env.process() == 1
    [ack] = env.relay.messages
    [t] = all_tickets(env.gw)
    d = ticket_json(env.gw, t.ref)
    assert _text(ack) == (
        f"Hi there,\n\nAlice Martin has your ticket {t.ref} and answers by "
        f"{d['deadlines']['first_response']}.\n\nExample Support\n"
    )
    [sent] = [e["detail"] for e in d["events"] if e["type"] == "ack-sent"]
    assert f"in en from {templates / 'ack.en.txt'}" in sent


def test_broken_override_is_refused_by_rules_check_with_file_and_line(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    shutil.copy(RULES / "rules.toml", rules / "rules.toml")
    assert rules_check(tmp_path).returncode == 0
    templates = tmp_path / "templates"
    templates.mkdir()
    # Line 3 names a fact that does not exist; the deadline is never stated.
    (templates / "ack.de.txt").write_text(
        "Guten Tag,\n\nTicket $ref, $owner kümmert sich, bis $due_tomorrow.\n"
    )
    r = rules_check(tmp_path)
    assert r.returncode == 1, r.stdout
    path = templates / "ack.de.txt"
    assert f"{path}:3: unknown placeholder $due_tomorrow" in r.stdout
    assert f"{path}:1: the 'ack' letter must state $deadline or $deadline_local or" in r.stdout
    # Fixed, it passes.
    path.write_text("Guten Tag,\n\nTicket $ref, $owner kümmert sich, bis $deadline_local.\n")
    r = rules_check(tmp_path)
    assert r.returncode == 0, r.stdout
    assert json.dumps(r.stdout).count("unknown placeholder") == 0
