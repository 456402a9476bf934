"""Compose the mail the gateway sends: acknowledgements and notices to staff.

Pure functions: everything they need is passed in (no database, no clock, no settings
lookup), and they return the RFC 5322 bytes (``email.policy.SMTP``: CRLF line endings)
plus the Message-ID. Nothing here signs: DKIM is applied last, by the delivery worker,
after every header is final (docs/design.md §6).

What every automatic message carries (docs/design.md §3, RFC 3834):

- ``Auto-Submitted: auto-replied`` on acknowledgements (RFC 3834 §5.1) and
  ``auto-generated`` on notices, so well-behaved responders never answer them;
- ``X-Auto-Response-Suppress: All`` (Microsoft [MS-OXCMAIL] 2.2.3.2.20) for Exchange/Outlook;
- our loop header ``X-Support-Gateway-Loop: <installation id>`` (``Signer.installation_id``,
  derived from the shared key, so the same on every node): mail carrying it that comes back
  is recognised as our own (RFC 3834 §2, "a responder MUST NOT respond to itself");
- a signed Message-ID (``Signer.message_id``), so an auto-responder answering us *without*
  any auto-reply header is still recognised when it names our id in ``In-Reply-To``;
- ``In-Reply-To``/``References`` to the customer's message (RFC 3834 §3.1.5) so the ack
  threads with what they wrote.

No ``Precedence`` header: RFC 3834 §3.1.8 discourages it on auto-replies.

The acknowledgement is honest (docs/design.md §0): the real reference, the named owner, the
deadline as *stored* on the ticket (the value the escalator enforces, never recomputed here)
written in the SLA calendar's time zone with the zone spelled out, what we actually received
(and what we did not keep), and no "as soon as possible".
"""

from __future__ import annotations

import html
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, formataddr
from pathlib import Path
from typing import Any

from gateway.letters import i18n
from gateway.letters import templates as letters
from gateway.letters.templates import Letter
from gateway.security.tokens import Signer
from gateway.sla.business_time import BusinessCalendar

__all__ = [
    "LOOP_HEADER",
    "MIN_HISTORY",
    "AckContent",
    "ResponseStats",
    "compose_ack",
    "compose_notification",
    "describe_size",
    "format_local",
    "format_offset",
    "isoz",
    "render_ack_text",
    "response_stats",
    "tagged_subject",
]

#: Our own loop header (the classifier treats it as a loop when it comes back).
LOOP_HEADER = "X-Support-Gateway-Loop"
#: Below this many tickets in the window, performance numbers say nothing useful.
MIN_HISTORY = 20


@dataclass(frozen=True)
class ResponseStats:
    """First-response performance of a queue over a window (wall-clock durations)."""

    median: timedelta
    p90: timedelta
    tickets: int
    days: int = 30


def response_stats(durations: Sequence[timedelta], days: int = 30) -> ResponseStats | None:
    """Median and 90th percentile, or None with fewer than ``MIN_HISTORY`` samples."""
    if len(durations) < MIN_HISTORY:
        return None
    secs = sorted(d.total_seconds() for d in durations)
    p90 = statistics.quantiles(secs, n=10, method="inclusive")[8]
    return ResponseStats(
        median=timedelta(seconds=statistics.median(secs)),
        p90=timedelta(seconds=p90),
        tickets=len(secs),
        days=days,
    )


# --------------------------------------------------------------------------------- formatting


def isoz(dt: datetime) -> str:
    """ISO 8601 in UTC with "Z", seconds precision: 2026-11-23T13:00:00Z."""
    return dt.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def _human(dt: datetime) -> str:
    # Spelled out without the C library's locale: "Monday 23 November 2026, 14:00".
    return i18n.human(dt)


def format_local(dt: datetime, calendar: BusinessCalendar) -> str:
    """E.g. "Monday 23 November 2026, 14:00 CET (Europe/Berlin)"."""
    return i18n.format_local(dt, calendar)


def format_offset(dt: datetime, offset: timedelta) -> str:
    """E.g. "Monday 23 November 2026, 08:00 UTC-05:00"."""
    return i18n.format_offset(dt, offset)


def describe_size(size: int) -> str:
    return i18n.describe_size(size)


def _duration(value: timedelta) -> str:
    return i18n.duration(value)


def _clean_subject(subject: str) -> str:
    return " ".join((subject or "").split())


def tagged_subject(ref: str, subject: str) -> str:
    """``[REF] subject``, without doubling a ``[REF]`` already present."""
    subject = _clean_subject(subject) or "(no subject)"
    if re.search(rf"\[{re.escape(ref)}\]", subject, re.IGNORECASE):
        return subject
    return f"[{ref}] {subject}"


# ------------------------------------------------------------------------------- ack content


@dataclass(frozen=True)
class AckContent:
    """Everything the acknowledgement says (the template's $placeholders)."""

    ref: str
    owner_name: str
    subject: str
    first_response_due: datetime
    calendar: BusinessCalendar
    received_at: datetime
    customer_date: datetime | None = None
    attachments: Sequence[Any] = ()  # objects with filename, content_type, size
    not_kept: Sequence[dict[str, Any]] = ()
    stats: ResponseStats | None = None
    reply_address: str = ""
    # Issue 12: the customer's other open requests (stored owners and deadlines), and the
    # honest notice of the acknowledgement that reaches the daily cap.
    others: str = ""
    notice: str = ""


def _deadline_text(c: AckContent, letter: Letter) -> str:
    due, lang = c.first_response_due, letter.lang
    lines = [
        letter.phrase(
            "deadline", due_local=i18n.format_local(due, c.calendar, lang), due_utc=isoz(due)
        )
    ]
    if c.customer_date is not None and c.customer_date.utcoffset() is not None:
        theirs = c.customer_date.utcoffset()
        assert theirs is not None
        ours = due.astimezone(c.calendar.timezone).utcoffset()
        if theirs != ours:
            lines.append(
                letter.phrase(
                    "deadline_their_zone", due_theirs=i18n.format_offset(due, theirs, lang)
                )
            )
    # A deadline normally lies inside business hours or on a closing instant (business-time
    # arithmetic never ends in closed time); if the stored value is outside, say so plainly.
    if not c.calendar.is_open(due) and not c.calendar.is_open(due - timedelta(seconds=1)):
        back = c.calendar.next_open(due)
        lines.append(letter.phrase("deadline_back", back=i18n.format_local(back, c.calendar, lang)))
    return "\n".join(lines) + "\n"


def _hours_text(c: AckContent, letter: Letter) -> str:
    hours = letter.phrase("hours", hours=i18n.describe_hours(c.calendar, letter.lang))
    if c.calendar.is_open(c.received_at):
        return hours + "\n"
    back = i18n.format_local(c.calendar.next_open(c.received_at), c.calendar, letter.lang)
    return letter.phrase("hours_closed", back=back, hours=hours) + f"\n{hours}\n"


def _received_text(c: AckContent, letter: Letter) -> str:
    lang = letter.lang
    subject = _clean_subject(c.subject) or letter.phrase("no_subject")
    lines = [letter.phrase("received_head"), letter.phrase("received_subject", subject=subject)]
    if c.attachments:
        total = sum(int(a.size) for a in c.attachments)
        key = "attachments_one" if len(c.attachments) == 1 else "attachments_many"
        lines.append(
            letter.phrase(key, count=len(c.attachments), total=i18n.describe_size(total, lang))
        )
        for a in c.attachments:
            lines.append(
                letter.phrase(
                    "attachment_line",
                    name=a.filename or letter.phrase("unnamed"),
                    size=i18n.describe_size(int(a.size), lang),
                )
            )
    else:
        lines.append(letter.phrase("no_attachments"))
    for item in c.not_kept:
        what = str(item.get("what", "part"))
        size = item.get("size")
        why = str(item.get("why", ""))
        size_text = f" ({i18n.describe_size(int(size), lang)})" if isinstance(size, int) else ""
        lines.append(letter.phrase("not_kept", what=what, size=size_text, why=why))
    return "\n".join(lines) + "\n"


def _performance_text(c: AckContent, letter: Letter) -> str:
    s = c.stats
    if s is None or s.tickets < MIN_HISTORY:
        return ""  # too little history to say anything honest
    return (
        letter.phrase(
            "performance",
            days=s.days,
            median=i18n.duration(s.median, letter.lang),
            p90=i18n.duration(s.p90, letter.lang),
            tickets=s.tickets,
        )
        + "\n"
    )


def ack_letter(template: Letter | str | None, lang: str = i18n.DEFAULT_LANGUAGE) -> Letter:
    """A Letter for the acknowledgement: as given, or a legacy template body (a string of
    $placeholders, the form before issue 17) over the shipped phrases, or the shipped one."""
    if isinstance(template, Letter):
        return template
    shipped = letters.load("ack", lang)
    if template is None:
        return shipped
    return Letter(shipped.name, shipped.lang, template, shipped.phrases, "(given)")


def render_ack_text(
    content: AckContent,
    template: Letter | str | None,
    signature: str,
    business_name: str = "",
) -> str:
    """The plain-text body of the acknowledgement (gateway/templates/ack.<lang>.txt)."""
    letter = ack_letter(template)
    lang = letter.lang
    values = {
        "ref": content.ref,
        "owner": content.owner_name,
        "subject": _clean_subject(content.subject),
        "deadline": _deadline_text(content, letter),
        "deadline_local": i18n.format_local(content.first_response_due, content.calendar, lang),
        "deadline_utc": isoz(content.first_response_due),
        "hours": _hours_text(content, letter),
        "received": _received_text(content, letter),
        "performance": _performance_text(content, letter),
        "reply_address": content.reply_address,
        "signature": signature,
        "business_name": business_name or signature,
        "others": content.others,
        "notice": content.notice + "\n" if content.notice else "",
    }
    # An admin's template written before these paragraphs existed still tells the customer
    # what else is open and when confirmations stop (issue 12): they go before the end.
    body = letter.body
    for key in ("others", "notice"):
        if values[key] and f"${key}" not in body and f"${{{key}}}" not in body:
            body = body.rstrip("\n") + f"\n\n${key}\n"
    if body != letter.body:
        letter = replace(letter, body=body)
    return letters.render(letter, values)


def load_template(rules_dir: Path | None, name: str = "ack") -> str | None:
    """``<rules_dir>/templates/<name>.txt`` when it exists, else None (built-in default).

    Kept for callers of the first version; new code uses ``gateway.letters.templates.load``.
    """
    if rules_dir is None or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
        return None
    path = Path(rules_dir) / "templates" / f"{name}.txt"
    try:
        return path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return None


def _html(text: str) -> str:
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    body = "\n".join(
        "<p>" + "<br>\n".join(html.escape(line) for line in p.splitlines()) + "</p>"
        for p in paragraphs
    )
    head = '<!DOCTYPE html>\n<html><body style="font-family: sans-serif">'
    return f"{head}\n{body}\n</body></html>\n"


def _local_and_domain(address: str) -> tuple[str, str]:
    local, _, domain = address.rpartition("@")
    return local.split("+", 1)[0], domain


def _base_headers(
    msg: EmailMessage,
    *,
    from_address: str,
    from_name: str,
    to: str,
    subject: str,
    message_id: str,
    now: datetime,
    hostname: str,
    auto_submitted: str,
    loop: str = "",
) -> None:
    msg["From"] = formataddr((from_name, from_address)) if from_name else from_address
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = format_datetime(now.astimezone(UTC))
    msg["Message-ID"] = message_id
    msg["Auto-Submitted"] = auto_submitted  # RFC 3834 §5
    msg["X-Auto-Response-Suppress"] = "All"  # [MS-OXCMAIL]; docs/design.md §3
    # docs/design.md §3 rule 6; the installation id, the same on every node (issue 13).
    msg[LOOP_HEADER] = loop or hostname


def compose_ack(
    *,
    content: AckContent,
    ticket_id: int,
    to_address: str,
    customer_message_id: str | None,
    customer_references: Sequence[str] = (),
    from_address: str,
    from_name: str,
    signer: Signer,
    hostname: str,
    now: datetime,
    template: Letter | str | None = None,
    signature: str = "",
    business_name: str = "",
    message_id_domain: str = "",
    reply_domain: str = "",
) -> tuple[bytes, str]:
    """The acknowledgement for a new ticket: (unsigned RFC 5322 bytes, Message-ID).

    ``to_address`` is the envelope sender or the authenticated From, never a Reply-To
    (docs/design.md §3: a forged Reply-To would turn us into a relay for unwanted mail).
    """
    local, domain = _local_and_domain(from_address)
    reply_to = signer.reply_address(local, reply_domain or domain, ticket_id)
    content = AckContent(**{**content.__dict__, "reply_address": reply_to})
    # A brand's letters carry Message-IDs of the brand's domain (issue 17); the signer
    # verifies its ids whatever the domain, so replies thread either way.
    message_id = signer.message_id(message_id_domain or hostname, ticket_id, "ack")
    text = render_ack_text(content, template, signature or from_name or from_address, business_name)
    msg = EmailMessage(policy=SMTP)
    _base_headers(
        msg,
        from_address=from_address,
        from_name=from_name,
        to=to_address,
        subject=tagged_subject(content.ref, content.subject),
        message_id=message_id,
        now=now,
        hostname=hostname,
        loop=signer.installation_id(),
        auto_submitted="auto-replied",  # RFC 3834 §5.2: a reply to one message
    )
    msg["Reply-To"] = reply_to
    if customer_message_id:
        # RFC 3834 §3.1.5: In-Reply-To and References name the message answered.
        msg["In-Reply-To"] = customer_message_id
        refs = [r for r in customer_references if r != customer_message_id]
        msg["References"] = " ".join([*refs[-10:], customer_message_id])
    msg.set_content(text)
    msg.add_alternative(_html(text), subtype="html")
    return msg.as_bytes(policy=SMTP), message_id


def compose_notification(
    *,
    to_address: str,
    to_name: str,
    subject: str,
    body: str,
    from_address: str,
    from_name: str,
    signer: Signer,
    hostname: str,
    now: datetime,
    ticket_id: int | None,
    person: str | None = None,
    in_reply_to: str | None = None,
) -> tuple[bytes, str]:
    """A notice to staff (kind notification): (unsigned bytes, Message-ID).

    ``Auto-Submitted: auto-generated`` (RFC 3834 §5.1: not a reply to any one message). The
    Reply-To is the staff person's signed token address, so an answer lands in the ticket.
    """
    message_id = signer.message_id(hostname, ticket_id, "notice")
    msg = EmailMessage(policy=SMTP)
    _base_headers(
        msg,
        from_address=from_address,
        from_name=from_name,
        to=formataddr((to_name, to_address)) if to_name else to_address,
        subject=_clean_subject(subject),
        message_id=message_id,
        now=now,
        hostname=hostname,
        loop=signer.installation_id(),
        auto_submitted="auto-generated",
    )
    if ticket_id is not None:
        local, domain = _local_and_domain(from_address)
        msg["Reply-To"] = signer.reply_address(local, domain, ticket_id, person)
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
        msg["References"] = in_reply_to
    msg.set_content(body.rstrip("\n") + "\n")
    return msg.as_bytes(policy=SMTP), message_id
