"""docs/decisions.md D3: broken mail is stored and threaded, never dropped (CPython's MIME edge
cases, plus hand-made horrors), and property-based junk never reaches the quarantine."""

from __future__ import annotations

import os
from pathlib import Path

import test.test_email  # CPython's own e-mail test data ships with every Python
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from gateway.clock import FrozenClock
from gateway.pipeline.parse import parse
from gateway.settings import Settings
from tests.support.gateway import all_tickets, running_gateway, send

DATA = Path(os.path.dirname(test.test_email.__file__)) / "data"

HORRORS = [
    b"",  # an empty message
    b"\r\n\r\nno headers at all\r\n",
    b"From: \xff\xfe broken <@>\r\nSubject: =?unknown-8bit?q?=FF=FE?=\r\n\r\nbody\r\n",
    b"Subject: missing boundary\r\nContent-Type: multipart/mixed\r\n\r\n--x\r\n\r\nhalf\r\n",
    b"Content-Type: text/plain; charset=klingon\r\nFrom: a@b.example\r\n\r\n\xc3\x28 bad utf8\r\n",
    b"Content-Transfer-Encoding: base64\r\nFrom: a@b.example\r\n\r\n!!!not base64!!!\r\n",
    b"From: a@b.example\r\nDate: yesterday-ish\r\nMessage-ID: no brackets@all\r\n\r\nx\r\n",
    b"From: a@b.example\r\n" + b"X-Long: " + b"y" * 20000 + b"\r\n\r\nlong header\r\n",
]


async def test_cpython_mime_edge_cases_are_all_stored(
    settings: Settings, clock: FrozenClock
) -> None:
    files = sorted(p for p in DATA.iterdir() if p.name.startswith("msg_"))
    assert len(files) >= 40, f"CPython test data not found in {DATA}"
    raws = [p.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") for p in files]
    raws += HORRORS
    async with running_gateway(settings, clock) as gw:
        for raw in raws:
            await send(
                gw, raw, sender="someone@customer.example", recipients=["support@example.com"]
            )
        await gw.pipeline.run_once()
        assert gw.spool.counts() == {}  # nothing quarantined, nothing left behind
        from sqlmodel import Session, func, select

        from gateway.store.models import Event, Message

        with Session(gw.engine) as s:
            stored = s.exec(
                select(func.count()).select_from(Message).where(Message.direction == "in")
            ).one()
            dups = s.exec(
                select(func.count()).select_from(Event).where(Event.type == "duplicate")
            ).one()
            defects = s.exec(
                select(func.count()).select_from(Event).where(Event.type == "parsed-with-defects")
            ).one()
        distinct = len(set(raws))
        print(
            f"{len(raws)} defective/edge-case messages: {stored} stored, {dups} duplicates, "
            f"{defects} with recorded defects, {len(all_tickets(gw))} tickets"
        )
        assert stored + dups == distinct
        assert defects > 0


@hsettings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_parse_never_raises_on_arbitrary_bytes(raw: bytes) -> None:
    p = parse(raw)
    assert isinstance(p.subject, str)
    assert isinstance(p.text, str)


@hsettings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(
                [
                    "From",
                    "To",
                    "Subject",
                    "Content-Type",
                    "Message-ID",
                    "References",
                    "Date",
                    "Content-Transfer-Encoding",
                    "Auto-Submitted",
                    "X-Any",
                ]
            ),
            st.text(max_size=80).map(lambda t: t.replace("\r", " ").replace("\n", " ")),
        ),
        max_size=8,
    ),
    st.text(max_size=300),
)
def test_parse_never_raises_on_arbitrary_headers(headers: list[tuple[str, str]], body: str) -> None:
    raw = "".join(f"{k}: {v}\r\n" for k, v in headers).encode("utf-8", "surrogateescape")
    p = parse(raw + b"\r\n" + body.encode("utf-8", "surrogateescape"))
    assert isinstance(p.referenced_ids, list)
