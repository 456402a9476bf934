"""Letters written directly (gateway/letters/mime.py) are the bytes ``email.message`` writes.

Each case composes the same letter twice, with :class:`Draft` and with
``EmailMessage(policy=SMTP)`` (the way letters were composed before), and compares the bytes
with the random multipart boundaries replaced. The composed acknowledgement and owner
notification are also parsed back with the stdlib parser (``policy=default``): headers,
RFC 2047 words, bodies, attachments, line lengths, CRLF, and a DKIM signature that verifies.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import SMTP, default
from pathlib import Path
from typing import Any

import dkim
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.letters import templates as letters
from gateway.letters.ack import AckContent, compose_ack, html_text
from gateway.letters.mime import Draft, header_line
from gateway.letters.notification import Part, compose_notification, compose_owner_notification
from gateway.outbound.dkim import keygen, load_key, public_txt_record, sign
from gateway.routing.model import Person
from gateway.security.tokens import Signer
from gateway.sla.business_time import BusinessCalendar
from tests.support.dkim import KeyTable

SIGNER = Signer(b"unit-test-secret-key-0123456789abcdef")
NOW = datetime(2026, 12, 3, 10, 0, tzinfo=UTC)
CALENDAR = BusinessCalendar.build("berlin", "Europe/Berlin", {"mon-fri": "09:00-17:00"})
BOUNDARY = re.compile(rb"={15}\d{19}==(?:\.\d+)?")

RU_SUBJECT = "Принтер горит, помогите пожалуйста, это очень срочно для нашего отдела продаж"
DE_SUBJECT = "Drucker zeigt Fehler 42 – Grüße aus München"
RU_TEXT = "Здравствуйте!\n\nПринтер показывает ошибку 42 с утра.\nСпасибо,\nАлиса\n"
LONG_RU = "Очень длинная строка без переносов, " * 6 + "\n" + "вторая строка\n"
HEADER_VALUES = [
    "plain ASCII words",
    "x" * 69,  # "Subject: " + 69 = 78
    "x" * 70,  # 79: folded or left long as the stdlib decides
    "word " * 30,
    "  leading and  double  spaces ",
    "literal =?utf-8?q?not_an_encoded_word?= here",
    'quotes "and" (parens), commas; and <angles>',
    "tab\tinside",
    RU_SUBJECT,
    DE_SUBJECT,
    "[ACME-1] " + "ü" * 40,
    "",
]
ADDRESSES = [
    "pat@customer.example",
    "Pat Smith <pat@customer.example>",
    '"Smith, Pat" <pat@customer.example>',
    "=?utf-8?b?0J/QvtC00LTQtdGA0LbQutCw?= <support@example.com>",
    "Jürgen Groß <j@example.de>",
    "a@x.example, b@y.example",
    "",
]
TEXTS = [
    "Hello,\n\nshort ASCII lines.\n",
    "",
    "no final newline",
    "trailing spaces   \nand\ttabs\t\n",
    "a line of exactly seventy-eight characters is fine as 7bit, no more than that!!\n",
    "ASCII but one line far longer than seventy-eight characters " + "x" * 100 + "\n",
    "many long lines\n" + ("y" * 90 + "\n") * 12,
    "CRLF\r\nendings\r\nand a bare CR\rhere\n",
    "From the start of a line\n.\n..\n",
    DE_SUBJECT + "\n\nMit freundlichen Grüßen\n",
    RU_TEXT,
    LONG_RU,
    "mixed é" + "e" * 100 + "\n",
]


@dataclass
class Pair:
    """The same calls on a Draft and on an EmailMessage with the SMTP policy."""

    draft: Draft
    reference: EmailMessage

    def set(self, name: str, value: str) -> None:
        self.draft[name] = value
        self.reference[name] = value

    def call(self, method: str, *args: Any, **kwargs: Any) -> None:
        getattr(self.draft, method)(*args, **kwargs)
        getattr(self.reference, method)(*args, **kwargs)

    def check(self) -> bytes:
        ours = self.draft.as_bytes()
        theirs = self.reference.as_bytes(policy=SMTP)
        assert BOUNDARY.sub(b"B", ours) == BOUNDARY.sub(b"B", theirs)
        return ours


def unix(text: str) -> str:
    return text.replace("\r\n", "\n")


def pair() -> Pair:
    return Pair(Draft(), EmailMessage(policy=SMTP))


def lines_of(raw: bytes) -> list[bytes]:
    assert raw.endswith(b"\r\n")
    lines = raw[:-2].split(b"\r\n")
    assert not any(b"\n" in line or b"\r" in line for line in lines)  # CRLF only
    assert all(len(line) <= 998 for line in lines)  # RFC 5322 §2.1.1
    return lines


@pytest.mark.parametrize("value", HEADER_VALUES)
def test_unstructured_headers_are_written_as_the_stdlib_writes_them(value: str) -> None:
    p = pair()
    for name in ("Subject", "X-Support-Gateway-Loop", "References"):
        p.set(name, value)
    p.call("set_content", "x\n")
    p.check()


@pytest.mark.parametrize("value", ADDRESSES)
def test_address_headers_are_written_as_the_stdlib_writes_them(value: str) -> None:
    p = pair()
    for name in ("From", "To", "Reply-To", "Cc"):
        p.set(name, value)
    p.check()


# Characters that reach the short path's decisions: words, specials, spaces, "=?", non-ASCII.
_VALUE_CHARS = st.sampled_from(list("abcXYZ09 @<>\"(),;:.\\[]=?_-'!#~\tйü"))


@given(
    st.sampled_from(["Subject", "To", "From", "Cc", "Reply-To", "Message-ID", "References"]),
    st.text(_VALUE_CHARS, max_size=90),
)
def test_any_header_value_is_written_as_the_stdlib_writes_it(name: str, value: str) -> None:
    """The same bytes, or both refuse the value (the stdlib's parser raises on some, e.g.
    ``To: <``; it raises on assignment, a Draft when writing)."""

    def written(msg: Draft | EmailMessage) -> bytes | str:
        try:
            msg[name] = value
            return msg.as_bytes() if isinstance(msg, Draft) else msg.as_bytes(policy=SMTP)
        except Exception as exc:  # whatever the stdlib's parser raises
            return type(exc).__name__

    assert written(Draft()) == written(EmailMessage(policy=SMTP))


@given(st.text(st.sampled_from(list("ab Z.=\t\r\n é–Жж€\x00")), max_size=400))
def test_any_text_body_is_written_as_the_stdlib_writes_it(text: str) -> None:
    p = pair()
    p.call("set_content", text)
    p.check()


@given(
    st.lists(
        st.tuples(
            st.integers(min_value=60, max_value=90),
            st.text(st.sampled_from(list(" \t=éa–")), max_size=4),
        ),
        min_size=1,
        max_size=14,
    )
)
def test_long_lines_are_broken_as_the_stdlib_breaks_them(lines: list[tuple[int, str]]) -> None:
    """Quoted-printable soft line breaks next to "=XX" and a trailing blank at every
    length around the 78 limit, over more and fewer than the ten lines the stdlib sniffs."""
    p = pair()
    p.call("set_content", "".join("y" * n + end + "\n" for n, end in lines))
    p.check()


@pytest.mark.parametrize("subtype", ["alternative", "mixed", "related"])
@pytest.mark.parametrize("suffix", ["", ".0", ".17"])
def test_multipart_content_types_are_folded_as_the_stdlib_folds_them(
    subtype: str, suffix: str
) -> None:
    for digits in ("0" * 19, "9" * 19, "1234567890123456789"):
        value = f'multipart/{subtype}; boundary="{"=" * 15}{digits}=={suffix}"'
        expected = SMTP.header_factory("Content-Type", value).fold(policy=SMTP)
        assert header_line("Content-Type", value) == expected.encode("ascii")


def test_threading_and_date_headers_as_the_stdlib() -> None:
    p = pair()
    refs = " ".join(f"<{n}.{'r' * 30}@customer.example>" for n in range(11))
    p.set("Date", "Thu, 03 Dec 2026 10:00:00 +0000")
    p.set("Message-ID", "<g1.ack.c.n6dcoleztebg2viy.3xwpoosc5oyf6nho@gw.example.com>")
    p.set("In-Reply-To", "<abc@customer.example>")
    p.set("References", refs)
    p.set("Auto-Submitted", "auto-replied")
    p.call("set_content", "x\n")
    raw = p.check()
    assert header_line("References", refs) in raw


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("html", [False, True])
def test_text_bodies_get_the_stdlib_transfer_encoding(text: str, html: bool) -> None:
    p = pair()
    p.set("Subject", "s")
    p.call("set_content", text)
    if html:
        p.call("add_alternative", html_text(text), subtype="html")
    raw = p.check()
    lines_of(raw)
    parsed = message_from_bytes(raw, policy=default)
    body = parsed.get_body(("plain",))
    assert body is not None
    # What the reader gets back: the text, its line endings made CRLF.
    expected = "\n".join(re.split(r"\r\n|\r|\n", text.rstrip("\r\n")))
    assert unix(body.get_content()).rstrip("\n") == expected


@pytest.mark.parametrize(
    "filename",
    ["photo.jpg", 'we"ird\\name.pdf', "отчёт за ноябрь.pdf", "x" * 120 + ".bin", "", None],
)
def test_attachments_as_the_stdlib(filename: str | None) -> None:
    p = pair()
    p.set("Subject", "files")
    p.call("set_content", RU_TEXT)
    data = bytes(range(256)) * 3
    p.call("add_attachment", data, maintype="image", subtype="jpeg", filename=filename)
    p.call("add_attachment", b"", maintype="application", subtype="pdf", filename="empty.pdf")
    raw = p.check()
    lines_of(raw)
    parsed = message_from_bytes(raw, policy=default)
    files = list(parsed.iter_attachments())
    assert [f.get_content() for f in files] == [data, b""]
    if filename:
        assert files[0].get_filename() == filename


def test_alternative_then_attachment_nests_as_the_stdlib() -> None:
    p = pair()
    p.call("set_content", "text\n")
    p.call("add_alternative", "<p>text</p>\n", subtype="html")
    p.call("add_attachment", b"data", maintype="application", subtype="pdf", filename="a.pdf")
    p.check()


def test_header_values_on_several_lines_and_second_unique_headers_are_refused() -> None:
    draft = Draft()
    with pytest.raises(ValueError, match="linefeed"):
        draft["Subject"] = "one\r\nBcc: victim@example.org"
    draft["Subject"] = "one"
    with pytest.raises(ValueError, match="at most 1"):
        draft["Subject"] = "two"
    with pytest.raises(ValueError, match="cannot attach"):
        draft.add_attachment(b"x", maintype="message", subtype="rfc822", filename="m.eml")
    assert draft["subject"] == "one"


# ----------------------------------------------------------------- the letters themselves


@dataclass
class File:
    filename: str
    content_type: str
    size: int


def ack(lang: str, subject: str, owner: str, from_name: str) -> bytes:
    content = AckContent(
        ref="ACME-12",
        owner_name=owner,
        subject=subject,
        first_response_due=NOW + timedelta(hours=4),
        calendar=CALENDAR,
        received_at=NOW,
        attachments=[File("photo.jpg", "image/jpeg", 1234)],
    )
    raw, message_id = compose_ack(
        content=content,
        ticket_id=12,
        to_address="pat@customer.example",
        customer_message_id="<abc@customer.example>",
        customer_references=["<r1@customer.example>"],
        from_address="support@example.com",
        from_name=from_name,
        signer=SIGNER,
        hostname="gw.example.com",
        now=NOW,
        template=letters.load("ack", lang),
    )
    assert SIGNER.verify_message_id(message_id) is not None
    return raw


@pytest.mark.parametrize(
    ("lang", "subject", "owner", "from_name", "greeting"),
    [
        ("en", "Printer on fire", "Alice Smith", "Example Support", "Hello"),
        ("de", DE_SUBJECT, "Jürgen Groß", "Beispiel Kundendienst", "Guten Tag"),
        ("ru", RU_SUBJECT, "Алиса Петрова", "Поддержка Пример", "Здравствуйте"),
    ],
)
def test_acknowledgement_parses_back(
    lang: str, subject: str, owner: str, from_name: str, greeting: str
) -> None:
    raw = ack(lang, subject, owner, from_name)
    lines_of(raw)
    # Encoded bodies stay within 78 (headers: as the stdlib folds them, within 998).
    assert all(len(line) <= 78 for line in lines_of(raw.split(b"\r\n\r\n", 1)[1]))
    msg = message_from_bytes(raw, policy=default)
    assert msg["Subject"] == f"[ACME-12] {subject}"
    assert msg["From"].addresses[0].display_name == from_name
    assert msg["From"].addresses[0].addr_spec == "support@example.com"
    assert msg["To"] == "pat@customer.example"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["X-Auto-Response-Suppress"] == "All"
    assert msg["X-Support-Gateway-Loop"] == SIGNER.installation_id()
    assert msg["In-Reply-To"] == "<abc@customer.example>"
    assert msg["References"] == "<r1@customer.example> <abc@customer.example>"
    claim = SIGNER.parse_reply_address(str(msg["Reply-To"]))
    assert claim is not None
    assert claim.ticket_id == 12
    assert SIGNER.verify_message_id(str(msg["Message-ID"])) is not None
    assert msg["Date"].datetime == NOW
    assert msg.get_content_type() == "multipart/alternative"
    plain, html = msg.iter_parts()
    assert plain.get_content_type() == "text/plain"
    assert plain.get_content_charset() == "utf-8"
    text = unix(plain.get_content())
    assert greeting in text
    assert owner in text
    assert "ACME-12" in text
    assert html.get_content_type() == "text/html"
    assert owner in html.get_content()
    if lang != "en":  # non-ASCII headers travel as RFC 2047 encoded words
        head = raw.split(b"\r\n\r\n", 1)[0]
        assert head.isascii()
        assert b"=?utf-8?" in head
    assert not any(p.defects for p in msg.walk())


def owner_notification(parts: Sequence[Part], subject: str = RU_SUBJECT) -> tuple[bytes, str]:
    ticket: Any = type(
        "T",
        (),
        dict(
            id=12,
            ref="ACME-12",
            subject=subject,
            status="open",
            requester="pat@customer.example",
            queue="support",
            priority="normal",
            first_response_due=NOW + timedelta(hours=4),
            first_responded_at=None,
            next_response_due=None,
            resolution_due=None,
        ),
    )()
    raw, _mid, _subject, text = compose_owner_notification(
        ticket=ticket,
        owner=Person("alice", "Alice Smith", "alice@example.com"),
        new_ticket=True,
        sender="pat@customer.example",
        sender_name="Pat Müller",
        customer_subject=subject,
        customer_text=RU_TEXT + "x" * 120,
        received_at=NOW,
        parts=parts,
        calendar=CALENDAR,
        warnings=["the sender's domain has no SPF record"],
        from_address="support@example.com",
        from_name="Example Support",
        signer=SIGNER,
        hostname="gw.example.com",
        now=NOW,
        attachment_limit=10**6,
    )
    return raw, text


def test_owner_notification_with_attachments_parses_back() -> None:
    photo = b"\xff\xd8" + bytes(range(256)) * 10
    parts = [
        Part("photo.jpg", "image/jpeg", photo),
        Part("notes.txt", "text/plain", "заметки\n".encode()),
        Part("отчёт.pdf", "application/pdf", b"%PDF-1.4"),
        Part("fwd.eml", "message/rfc822", b"From: a@b\r\n\r\nhi\r\n"),
    ]
    raw, text = owner_notification(parts)
    lines_of(raw)
    msg = message_from_bytes(raw, policy=default)
    assert msg["Subject"] == f"[ACME-12] {RU_SUBJECT}"
    assert msg["To"] == "Alice Smith <alice@example.com>"
    assert msg["Auto-Submitted"] == "auto-generated"
    claim = SIGNER.parse_reply_address(str(msg["Reply-To"]))
    assert claim is not None
    assert (claim.ticket_id, claim.person) == (12, "alice")
    assert msg.get_content_type() == "multipart/mixed"
    body = msg.get_body(("plain",))
    assert body is not None
    assert unix(body.get_content()) == text
    files = list(msg.iter_attachments())
    assert [(f.get_filename(), f.get_content_type(), f.get_content()) for f in files] == [
        ("photo.jpg", "image/jpeg", photo),
        ("notes.txt", "application/octet-stream", "заметки\n".encode()),
        ("отчёт.pdf", "application/pdf", b"%PDF-1.4"),
        ("fwd.eml", "application/octet-stream", b"From: a@b\r\n\r\nhi\r\n"),
    ]
    assert not any(p.defects for p in msg.walk())


def test_staff_notice_is_one_text_part() -> None:
    raw, _mid = compose_notification(
        to_address="alice@example.com",
        to_name="Alice Smith",
        subject="[ACME-12] first response due in 30 minutes",
        body="The first response to ACME-12 is due at 15:00 CET.",
        from_address="support@example.com",
        from_name="Example Support",
        signer=SIGNER,
        hostname="gw.example.com",
        now=NOW,
        ticket_id=12,
        person="alice",
        in_reply_to="<parent@gw.example.com>",
    )
    msg = message_from_bytes(raw, policy=default)
    assert msg.get_content_type() == "text/plain"
    assert msg["Content-Transfer-Encoding"] == "7bit"
    assert msg["MIME-Version"] == "1.0"
    assert msg["In-Reply-To"] == "<parent@gw.example.com>"
    assert msg.get_content() == "The first response to ACME-12 is due at 15:00 CET.\r\n"


@pytest.mark.parametrize(
    "compose",
    [
        lambda: ack("ru", RU_SUBJECT, "Алиса Петрова", "Поддержка Пример"),
        lambda: ack("de", DE_SUBJECT, "Jürgen Groß", "Beispiel Kundendienst"),
        lambda: owner_notification([Part("photo.jpg", "image/jpeg", b"\xff\xd8" * 500)])[0],
    ],
    ids=["ack-ru", "ack-de", "notification"],
)
def test_composed_letters_sign_and_verify(compose: Callable[[], bytes], tmp_path: Path) -> None:
    keygen(tmp_path / "rsa.key", domain="example.com", selector="gw1")
    key = load_key(tmp_path / "rsa.key", "example.com", "gw1")
    keys = KeyTable({"gw1._domainkey.example.com": public_txt_record(key)})
    signed = sign(compose(), [key])
    assert dkim.verify(signed, dnsfunc=keys.dnsfunc)
    assert not dkim.verify(signed.replace(b"ACME-12", b"ACME-13"), dnsfunc=keys.dnsfunc)
