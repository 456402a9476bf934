"""Compose the mail the gateway sends: acknowledgements and notices to staff.

Pure functions: everything they need is passed in (no database, no clock, no settings
lookup), and they return the RFC 5322 bytes (``email.policy.SMTP``: CRLF line endings)
plus the Message-ID. Nothing here signs: DKIM is applied last, by the delivery worker,
after every header is final (FIELD-NOTES §6).

What every automatic message carries (FIELD-NOTES §3, RFC 3834):

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

The acknowledgement is honest (BRIEF): the real reference, the named owner, the deadline as
*stored* on the ticket (the value the escalator enforces, never recomputed here) written in
the SLA calendar's time zone with the zone spelled out, what we actually received (and what
we did not keep), and no "as soon as possible".
"""

from __future__ import annotations

import html
import re
import statistics
import string
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, formataddr
from pathlib import Path
from typing import Any

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

_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = (
    "January", "February", "March", "April", "May", "June", "July",
    "August", "September", "October", "November", "December",
)  # fmt: skip


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
    return f"{_DAYS[dt.weekday()]} {dt.day} {_MONTHS[dt.month - 1]} {dt.year}, {dt:%H:%M}"


def format_local(dt: datetime, calendar: BusinessCalendar) -> str:
    """E.g. "Monday 23 November 2026, 14:00 CET (Europe/Berlin)"."""
    local = dt.astimezone(calendar.timezone)
    abbrev = local.tzname() or ""
    zone = calendar.timezone.key
    if not abbrev or abbrev == zone:
        return f"{_human(local)} {zone}"
    return f"{_human(local)} {abbrev} ({zone})"


def _offset_text(offset: timedelta) -> str:
    total = int(offset.total_seconds())
    sign = "+" if total >= 0 else "-"
    total = abs(total)
    return f"UTC{sign}{total // 3600:02d}:{total % 3600 // 60:02d}"


def format_offset(dt: datetime, offset: timedelta) -> str:
    """E.g. "Monday 23 November 2026, 08:00 UTC-05:00"."""
    local = dt.astimezone(timezone(offset))
    return f"{_human(local)} {_offset_text(offset)}"


def describe_size(size: int) -> str:
    if size < 1024:
        return f"{size} bytes"
    if size < 1024 * 1024:
        return f"{size / 1024:.0f} KB"
    return f"{size / (1024 * 1024):.1f} MB"


def _duration(value: timedelta) -> str:
    minutes = round(value.total_seconds() / 60)
    hours, minutes = divmod(minutes, 60)
    if hours and minutes:
        return f"{hours} h {minutes} min"
    if hours:
        return f"{hours} h"
    return f"{minutes} min"


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


DEFAULT_ACK_TEMPLATE = """\
Hello,

we have received your message and opened ticket $ref.

$owner is looking after your request.

$deadline
$others
$hours
$received
$performance
$notice
To add anything, simply reply to this email: your reply goes straight into ticket $ref
and is read by people.

$signature
"""


def _deadline_text(c: AckContent) -> str:
    due = c.first_response_due
    lines = [
        f"You will get a first answer from a person by {format_local(due, c.calendar)} "
        f"({isoz(due)})."
    ]
    if c.customer_date is not None and c.customer_date.utcoffset() is not None:
        theirs = c.customer_date.utcoffset()
        assert theirs is not None
        ours = due.astimezone(c.calendar.timezone).utcoffset()
        if theirs != ours:
            lines.append(f"In the time zone of your message that is {format_offset(due, theirs)}.")
    # A deadline normally lies inside business hours or on a closing instant (business-time
    # arithmetic never ends in closed time); if the stored value is outside, say so plainly.
    if not c.calendar.is_open(due) and not c.calendar.is_open(due - timedelta(seconds=1)):
        back = c.calendar.next_open(due)
        lines.append(f"Our team is back on {format_local(back, c.calendar)}.")
    return "\n".join(lines) + "\n"


def _hours_text(c: AckContent) -> str:
    hours = f"Our business hours: {c.calendar.describe_hours()}."
    if c.calendar.is_open(c.received_at):
        return hours + "\n"
    back = c.calendar.next_open(c.received_at)
    return (
        f"Your message arrived outside our business hours; the team is back on "
        f"{format_local(back, c.calendar)}.\n{hours}\n"
    )


def _received_text(c: AckContent) -> str:
    lines = ["What we received:", f"  Subject: {_clean_subject(c.subject) or '(no subject)'}"]
    if c.attachments:
        total = sum(int(a.size) for a in c.attachments)
        noun = "attachment" if len(c.attachments) == 1 else "attachments"
        lines.append(f"  {len(c.attachments)} {noun}, {describe_size(total)} in total:")
        for a in c.attachments:
            lines.append(f"    - {a.filename or '(unnamed)'} ({describe_size(int(a.size))})")
    else:
        lines.append("  No attachments.")
    for item in c.not_kept:
        what = str(item.get("what", "part"))
        size = item.get("size")
        why = str(item.get("why", ""))
        size_text = f" ({describe_size(int(size))})" if isinstance(size, int) else ""
        lines.append(f"  NOT kept: {what}{size_text}: {why}. Please send it another way.")
    return "\n".join(lines) + "\n"


def _performance_text(c: AckContent) -> str:
    s = c.stats
    if s is None or s.tickets < MIN_HISTORY:
        return ""  # too little history to say anything honest
    return (
        f"Over the last {s.days} days this team sent a first answer in {_duration(s.median)} "
        f"(median), and in {_duration(s.p90)} or less for 9 requests out of 10 "
        f"({s.tickets} requests).\n"
    )


def render_ack_text(content: AckContent, template: str | None, signature: str) -> str:
    """The plain-text body: ``template`` (string.Template, $placeholders) or the default."""
    values = {
        "ref": content.ref,
        "owner": content.owner_name,
        "subject": _clean_subject(content.subject),
        "deadline": _deadline_text(content),
        "deadline_local": format_local(content.first_response_due, content.calendar),
        "deadline_utc": isoz(content.first_response_due),
        "hours": _hours_text(content),
        "received": _received_text(content),
        "performance": _performance_text(content),
        "reply_address": content.reply_address,
        "signature": signature,
        "others": content.others,
        "notice": content.notice + "\n" if content.notice else "",
    }
    template = template or DEFAULT_ACK_TEMPLATE
    # A site template written before issue 12 still tells the customer what is open and when
    # confirmations stop: the paragraphs go before the end.
    for key in ("others", "notice"):
        if values[key] and f"${key}" not in template and f"${{{key}}}" not in template:
            template = template.rstrip("\n") + f"\n\n${key}\n"
    text = string.Template(template).safe_substitute(values)
    # Blank placeholders (no performance numbers) must not leave a hole of empty lines.
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def load_template(rules_dir: Path | None, name: str = "ack") -> str | None:
    """``<rules_dir>/templates/<name>.txt`` when it exists, else None (built-in default)."""
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
    msg["X-Auto-Response-Suppress"] = "All"  # [MS-OXCMAIL]; FIELD-NOTES §3
    # FIELD-NOTES §3 rule 6; the installation id, the same on every node (issue 13).
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
    template: str | None = None,
) -> tuple[bytes, str]:
    """The acknowledgement for a new ticket: (unsigned RFC 5322 bytes, Message-ID).

    ``to_address`` is the envelope sender or the authenticated From, never a Reply-To
    (FIELD-NOTES §3: a forged Reply-To would turn us into a relay for unwanted mail).
    """
    local, domain = _local_and_domain(from_address)
    reply_to = signer.reply_address(local, domain, ticket_id)
    content = AckContent(**{**content.__dict__, "reply_address": reply_to})
    message_id = signer.message_id(hostname, ticket_id, "ack")
    text = render_ack_text(content, template, from_name or from_address)
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
