"""Letters composed in one package (docs/templates.md), end to end: real SMTP into the daemon,
the pipeline, the bundle worker, the delivery worker (DKIM-signed, verified with dkimpy), a
capture relay, a FrozenClock.

A German customer's bundled acknowledgement is German and states the stored owners and
deadlines; the acknowledgement that reaches the daily cap says so in Russian; an admin's
override of the owner notification is used (and a broken one refused by `rules check`);
a brand whose DKIM key cannot be read is refused by `rules check` and at start.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from email.message import EmailMessage
from pathlib import Path

import pytest

from gateway.app import Gateway
from gateway.clock import FrozenClock
from gateway.outbound.dkim import keygen as dkim_keygen
from gateway.outbound.dkim import load_key, public_txt_record
from gateway.outbound.worker import DeliveryWorker
from gateway.settings import ConfigError
from tests.conftest import RULES, make_settings
from tests.support.dkim import KeyTable
from tests.support.gateway import (
    all_tickets,
    make_mail,
    rules_check,
    running_gateway,
    send,
    ticket_json,
)
from tests.support.relay import Captured, CaptureRelay

SELECTOR = "gw1"
PAT = "pat@customer.example"


@dataclass
class Env:
    gw: Gateway
    worker: DeliveryWorker
    relay: CaptureRelay
    clock: FrozenClock
    dns: dict[str, str]
    root: Path

    async def mail(self, msg: EmailMessage) -> None:
        await send(self.gw, msg)
        await self.process()

    async def process(self) -> None:
        await self.gw.pipeline.run_once()
        await self.gw.bundler.run_once()
        await self.worker.run_once()

    def to(self, address: str) -> list[Captured]:
        return [m for m in self.relay.messages if address in m.rcpt_tos]


@pytest.fixture
async def env(tmp_path: Path, clock: FrozenClock, relay: CaptureRelay) -> AsyncIterator[Env]:
    key = tmp_path / "example.com.key"
    dkim_keygen(key, domain="example.com", selector=SELECTOR, bits=1024)
    rules = tmp_path / "rules"
    rules.mkdir()
    shutil.copy(RULES / "rules.toml", rules / "rules.toml")
    settings = make_settings(
        tmp_path,
        rules_dir=str(rules),
        outbound={
            "relay": f"127.0.0.1:{relay.port}",
            "from_name": "Example Support",
            "dkim": {"domain": "example.com", "selector": SELECTOR, "key_file": str(key)},
        },
    )
    async with running_gateway(settings, clock) as gw:
        worker = DeliveryWorker(gw.engine, settings, clock, signer=gw.signer)
        dns = {
            f"{SELECTOR}._domainkey.example.com": public_txt_record(
                load_key(key, "example.com", SELECTOR)
            )
        }
        yield Env(gw, worker, relay, clock, dns, tmp_path)


def _text(captured: Captured) -> str:
    body = captured.message().get_body(preferencelist=("plain",))
    assert body is not None
    return str(body.get_content()).replace("\r\n", "\n")


def _german(subject: str, body: str) -> EmailMessage:
    m = make_mail(sender=PAT, subject=subject, body=body)
    m["Content-Language"] = "de"
    return m


async def test_bundled_acknowledgement_in_german_states_the_stored_owners_and_deadlines(
    env: Env,
) -> None:
    await env.mail(_german("Rechnung fehlt", "Guten Tag, mir fehlt die Rechnung 4711.\n"))
    [first_ack] = env.to(PAT)
    assert _text(first_ack).startswith("Guten Tag,")
    # Two more new mails within outbound.ack_window: confirmed together when it closes.
    env.clock.advance(timedelta(seconds=20))
    await env.mail(_german("Drucker defekt", "Unser Drucker druckt nur noch leere Seiten.\n"))
    env.clock.advance(timedelta(seconds=20))
    await env.mail(_german("Passwort vergessen", "Ich komme nicht mehr in mein Konto.\n"))
    assert len(env.to(PAT)) == 1
    env.clock.advance(timedelta(minutes=5))
    await env.process()
    acks = env.to(PAT)
    assert len(acks) == 2, [str(m) for m in acks]
    bundled = acks[1]
    text = _text(bundled)
    tickets = all_tickets(env.gw)
    assert len(tickets) == 3
    second, third = (ticket_json(env.gw, t.ref) for t in tickets[1:])
    assert text.startswith("Guten Tag,\n\nseit unserer letzten Bestätigung haben wir 2 weitere")
    assert f"als neue Anfrage {second['ref']} angelegt" in text
    assert f"als neue Anfrage {third['ref']} angelegt" in text
    # Owner and deadline of each item are the ticket's own (tickets show --json).
    for d in (second, third):
        assert f"{d['owner']['name']} kümmert sich darum, erste Antwort bis " in text, text
        assert f"({d['deadlines']['first_response']})" in text, text
    assert "Alle Ihre offenen Anfragen bei uns:" in text
    assert "Viele Grüße\nExample Support" in text
    assert "Hello" not in text
    assert "looking after it" not in text
    m = bundled.message()
    assert m["Subject"] == f"[{third['ref']}] Eingegangen: 2 weitere Nachrichten" or m[
        "Subject"
    ].startswith("Eingegangen: 2 weitere Nachrichten (")
    assert m["Auto-Submitted"] == "auto-replied"
    assert env.gw.signer.ticket_from_message_id(m["Message-ID"]) == tickets[2].id
    assert KeyTable(env.dns).verify(bundled)


async def test_the_ack_that_reaches_the_cap_says_so_in_russian(env: Env) -> None:
    env.gw.settings.outbound.daily_ack_cap = 2
    bodies = [
        "Здравствуйте! Не приходит счёт за ноябрь, хотя оплата прошла ещё неделю назад.\n",
        "Добрый день! Не могу войти в личный кабинет, пишет, что пароль неверный.\n",
        "Здравствуйте! Принтер в бухгалтерии снова печатает пустые страницы.\n",
    ]
    for n, body in enumerate(bodies):
        await env.mail(make_mail(sender=PAT, subject=f"Вопрос {n}", body=body))
        env.clock.advance(timedelta(minutes=10))  # each outside the ack window
    acks = env.to(PAT)
    assert len(acks) == 2, [str(m) for m in acks]
    first_ref = all_tickets(env.gw)[0].ref
    last = _text(acks[1])
    assert last.startswith("Здравствуйте!")
    assert "Это наше последнее автоматическое подтверждение на сегодня (2 за 24 часа)." in last
    assert f"Ответы и письма по {first_ref} (" in last
    assert "Другие ваши открытые обращения:" in last
    assert first_ref in last
    assert "last automatic confirmation" not in last
    assert "other open requests" not in last
    assert KeyTable(env.dns).verify(acks[1])
    assert len(all_tickets(env.gw)) == 3  # the third mail is filed without a confirmation


async def test_admin_override_of_the_owner_notification_is_used(env: Env) -> None:
    templates = env.root / "templates"
    templates.mkdir()
    (templates / "notify.en.txt").write_text(
        "$headline\n\nTicket $ref for $owner\n$deadlines\n\n$message\n\n$footer\n"
        "=== no_text ===\n(empty)\n"
    )
    await env.mail(make_mail(sender=PAT, subject="Help", body="My order 4711 is late.\n"))
    [note] = env.to("alice@example.com")
    [t] = all_tickets(env.gw)
    d = ticket_json(env.gw, t.ref)
    text = _text(note)
    assert text.startswith(f"New ticket {t.ref} from {PAT}.\n\nTicket {t.ref} for Alice Martin")
    assert "First response due: " in text
    assert f"({d['deadlines']['first_response']})" in text
    assert "\n\nMy order 4711 is late.\n\nReply to this email to answer" in text
    assert "----- Message from" not in text  # the shipped layout is not used
    assert KeyTable(env.dns).verify(note)


def test_broken_notification_override_is_refused_with_file_and_line(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    shutil.copy(RULES / "rules.toml", rules / "rules.toml")
    templates = tmp_path / "templates"
    templates.mkdir()
    path = templates / "notify.en.txt"
    path.write_text("$headline\n\nTicket $ref for $owner\n$deadline_tomorrow\n")
    r = rules_check(tmp_path)
    assert r.returncode == 1, r.stdout
    assert f"{path}:4: unknown placeholder $deadline_tomorrow" in r.stdout
    assert f"{path}:1: the 'notify' letter must state $deadlines" in r.stdout
    assert f"{path}:1: the 'notify' letter must state $message" in r.stdout


BRAND = """
[brands.b2]
from_address = "help@b2.example"
dkim = {{ domain = "b2.example", selector = "gw1", key_file = "{key}" }}
"""


def test_a_brand_whose_dkim_key_cannot_be_read_is_refused(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    shutil.copy(RULES / "rules.toml", rules / "rules.toml")
    missing = tmp_path / "nowhere" / "b2.key"
    (rules / "00-brands.toml").write_text(BRAND.format(key=missing))
    r = rules_check(tmp_path)
    assert r.returncode == 1, r.stdout
    where = f"{rules / '00-brands.toml'}:2: brand 'b2': DKIM key_file {missing} cannot be used"
    assert where in r.stdout, r.stdout
    # Not a key at all: refused too; at start as well as by `rules check`.
    junk = tmp_path / "b2.key"
    junk.write_text("not a key\n")
    (rules / "00-brands.toml").write_text(BRAND.format(key=junk))
    assert "not a usable DKIM private key" in rules_check(tmp_path).stdout
    with pytest.raises(ConfigError, match="brand 'b2': DKIM key_file"):
        Gateway(make_settings(tmp_path, rules_dir=str(rules)))
    # A readable key passes.
    junk.unlink()
    dkim_keygen(junk, domain="b2.example", selector="gw1", bits=1024)
    assert rules_check(tmp_path).returncode == 0
