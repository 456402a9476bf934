"""The acknowledgement of a new ticket (to the customer), composed from its template.

Pure functions: everything they need is passed in (no database, no clock, no settings
lookup), and they return the RFC 5322 bytes (CRLF line endings) plus the Message-ID. The
headers are :mod:`gateway.letters.headers`'s (Auto-Submitted: auto-replied, the loop header,
a signed Message-ID, In-Reply-To/References to the customer's message; docs/design.md §3).

The acknowledgement is honest (docs/design.md §0): the real reference, the named owner, the
deadline as *stored* on the ticket (the value the escalator enforces, never recomputed here)
written in the SLA calendar's time zone with the zone spelled out, what we actually received
(and what we did not keep), and no "as soon as possible". The words are the template's
(``gateway/templates/ack.<lang>.txt``, docs/templates.md).
"""

from __future__ import annotations

import html
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from gateway.letters import headers, i18n
from gateway.letters import templates as letters
from gateway.letters.facts import isoz
from gateway.letters.headers import clean_subject, tagged_subject
from gateway.letters.templates import Letter
from gateway.security.tokens import Signer
from gateway.sla.business_time import BusinessCalendar

__all__ = [
    "MIN_HISTORY",
    "AckContent",
    "ResponseStats",
    "ack_letter",
    "compose_ack",
    "html_text",
    "isoz",
    "render_ack_text",
    "response_stats",
]

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
    # docs/decisions.md D12: the customer's other open requests (stored owners and deadlines), and
    # the honest notice of the acknowledgement that reaches the daily cap.
    others: str = ""
    notice: str = ""


def _deadline_text(c: AckContent, letter: Letter, due_local: str, due_utc: str) -> str:
    due, lang = c.first_response_due, letter.lang
    lines = [letter.phrase("deadline", due_local=due_local, due_utc=due_utc)]
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
    subject = clean_subject(c.subject) or letter.phrase("no_subject")
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
    $placeholders, the form before languages and brands) over the shipped phrases, or the
    shipped one."""
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
    due_local = i18n.format_local(content.first_response_due, content.calendar, lang)
    due_utc = isoz(content.first_response_due)
    values = {
        "ref": content.ref,
        "owner": content.owner_name,
        "subject": clean_subject(content.subject),
        "deadline": _deadline_text(content, letter, due_local, due_utc),
        "deadline_local": due_local,
        "deadline_utc": due_utc,
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
    # what else is open and when confirmations stop (docs/threading.md): they go before the end.
    body = letter.body
    for key in ("others", "notice"):
        if values[key] and f"${key}" not in body and f"${{{key}}}" not in body:
            body = body.rstrip("\n") + f"\n\n${key}\n"
    if body != letter.body:
        letter = replace(letter, body=body)
    return letters.render(letter, values)


def html_text(text: str) -> str:
    """The HTML alternative of a plain-text letter: one <p> per paragraph."""
    # Escaped once, before splitting: html.escape touches no line break or blank, so the
    # paragraphs and lines are those of the text.
    paragraphs = [p for p in html.escape(text).split("\n\n") if p.strip()]
    body = "\n".join("<p>" + "<br>\n".join(p.splitlines()) + "</p>" for p in paragraphs)
    head = '<!DOCTYPE html>\n<html><body style="font-family: sans-serif">'
    return f"{head}\n{body}\n</body></html>\n"


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
    local, domain = headers.split_address(from_address)
    reply_to = signer.reply_address(local, reply_domain or domain, ticket_id)
    content = AckContent(**{**content.__dict__, "reply_address": reply_to})
    # A brand's letters carry Message-IDs of the brand's domain (docs/templates.md); the signer
    # verifies its ids whatever the domain, so replies thread either way.
    message_id = signer.message_id(message_id_domain or hostname, ticket_id, "ack")
    text = render_ack_text(content, template, signature or from_name or from_address, business_name)
    msg = headers.new_message()
    headers.set_base(
        msg,
        from_header=headers.format_address(from_name, from_address),
        to=to_address,
        subject=tagged_subject(content.ref, content.subject),
        message_id=message_id,
        now=now,
        auto_submitted=headers.AUTO_REPLIED,  # RFC 3834 §5.2: a reply to one message
        loop=signer.installation_id(),
    )
    msg["Reply-To"] = reply_to
    # RFC 3834 §3.1.5: In-Reply-To and References name the message answered.
    headers.set_thread(msg, customer_message_id, customer_references)
    msg.set_content(text)
    msg.add_alternative(html_text(text), subtype="html")
    return headers.as_bytes(msg), message_id
