"""Robot detection: may this message get an automatic acknowledgement? (docs/design.md §3)

``classify`` is a pure function of the parsed message and its envelope sender. It returns a
``RobotVerdict``: one ``kind`` chosen by precedence, and **every** reason found, so the audit
trail shows why no acknowledgement went out. It never raises: header values may be malformed,
non-ASCII or missing, and a classifier bug must fail safe (no ack), not crash the pipeline.

Rules (numbers are docs/design.md §3):

1. null envelope sender or ``Return-Path: <>`` — RFC 3834 §2 / RFC 5321 §4.5.5: bounces and
   auto-replies are sent with a null reverse-path, and nothing may answer a null sender.
2. ``Auto-Submitted`` present and not ``no`` (RFC 3834 §5). ``Auto-Submitted: no`` is what a
   *human* message may carry; FreeScout treats its mere presence as a robot, which swallows
   real customers' mail.
3. ``Precedence: bulk|list|junk|auto_reply`` on any instance (RFC 3834 §3.1.8 and §5 note the
   convention), any ``List-*`` header (RFC 2369/2919), ``X-Mailing-List``/``Mailing-List``.
4. ``X-Auto-Response-Suppress`` containing All/OOF/AutoReply (Microsoft [MS-OXCMAIL] 2.2.3.2.20).
5. system local parts (RFC 2142 mailbox names, Mailman/Majordomo conventions, no-reply).
6. our own address or our own loop header (RFC 3834 §2: "a responder MUST NOT respond to
   itself"), or a Message-ID we generated (``is_own_message_id``).
7. ``multipart/report`` (RFC 6522): delivery-status is a bounce (RFC 3464), disposition-
   notification is a read report (RFC 8098), feedback-report is abuse feedback (RFC 5965).
   Bounces that are not multipart/report (qmail, old Exim, Exchange 2003...) are recognised
   from a robot sender plus bounce wording; a subject alone never makes a bounce, because
   "Delivery failure" is also what a customer writes about a parcel.

Also out-of-office responders that skip RFC 3834 (``X-Autoreply``, Apple's
``X-Apple-Action: VACATION``, Exchange inbox-rule headers, "Automatic reply:" subjects).

Kind precedence: loop > bounce/report > auto_reply > list/bulk > robot > human.
Rules 8 (forged senders) and 9 (rate limits) need authentication results and the database;
they live in their own stages.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from email.message import Message
from email.utils import getaddresses

from gateway.pipeline.subject import decode_rfc2047

__all__ = [
    "KINDS",
    "RobotVerdict",
    "bounce_reasons",
    "classify",
    "header_values",
    "text_parts",
]

KINDS = ("human", "auto_reply", "bounce", "report", "list", "bulk", "robot", "loop")
# Higher wins. bounce and report share a rank: the first found (the report structure) wins.
_RANK = {
    "human": 0,
    "robot": 1,
    "bulk": 2,
    "list": 3,
    "auto_reply": 4,
    "report": 6,
    "bounce": 6,
    "loop": 7,
}


@dataclass(frozen=True)
class RobotVerdict:
    """The outcome of ``classify``: what kind of sender, and every reason found."""

    kind: str  # one of KINDS
    reasons: tuple[str, ...]

    @property
    def is_human(self) -> bool:
        return self.kind == "human"

    @property
    def may_acknowledge(self) -> bool:
        """False for every robot kind: we never send an automatic reply to a robot."""
        return self.kind == "human"


# --------------------------------------------------------------------------------------------
# Safe accessors: nothing below may raise on hostile input.


def _raw_headers(msg: Message) -> list[tuple[str, str]]:
    raw = getattr(msg, "_headers", None) or []
    out: list[tuple[str, str]] = []
    for item in raw:
        try:
            name, value = item[0], item[1]
            out.append((str(name), str(value)))
        except Exception:
            continue
    return out


def header_names(msg: Message) -> list[str]:
    """Header field names, as written (never raises)."""
    try:
        return [str(k) for k in msg]
    except Exception:
        return [name for name, _ in _raw_headers(msg)]


def header_values(msg: Message, name: str) -> list[str]:
    """Every instance of a header, RFC 2047-decoded, as str; [] if absent (never raises)."""
    try:
        values: list[object] = list(msg.get_all(name) or [])
    except Exception:  # the default policy parses on access, and parsers have bugs
        values = [v for k, v in _raw_headers(msg) if k.lower() == name.lower()]
    out: list[str] = []
    for value in values:
        try:
            text = str(value)
        except Exception:
            continue
        out.append(decode_rfc2047(text).strip())
    return out


def _first(msg: Message, name: str) -> str:
    values = header_values(msg, name)
    return values[0] if values else ""


_COMMENT_RE = re.compile(r"\([^()]*\)")


def _strip_comments(value: str) -> str:
    """Remove RFC 5322 comments (nested ones too)."""
    for _ in range(10):
        stripped = _COMMENT_RE.sub(" ", value)
        if stripped == value:
            break
        value = stripped
    return value


def _keyword(value: str) -> str:
    """The bare keyword of a structured value: no comments, no ``;parameters``, lowercase."""
    return _strip_comments(value).split(";", 1)[0].strip().strip('"').lower()


def _addresses(value: str) -> list[str]:
    """Bare addresses in a header value (or an envelope address), lowercased."""
    value = value.strip()
    if not value:
        return []
    try:
        pairs = getaddresses([value])
    except Exception:
        pairs = []
    addrs = [addr.strip().lower() for _, addr in pairs if addr and addr.strip()]
    if not addrs:
        # Envelope forms like "<MAILER-DAEMON>" or a bare local part.
        bare = value.strip().strip("<>").strip().lower()
        if bare and " " not in bare:
            addrs = [bare]
    return addrs


def _local_part(address: str) -> str:
    local = address.rsplit("@", 1)[0] if "@" in address else address
    local = local.strip().strip('"').lower()
    return local


def _base_address(address: str) -> str:
    """``support+tag@example.com`` -> ``support@example.com`` (RFC 5233 subaddress)."""
    if "@" not in address:
        return address
    local, domain = address.rsplit("@", 1)
    return f"{local.split('+', 1)[0]}@{domain}"


def _content_type(part: Message) -> str:
    try:
        return str(part.get_content_type()).lower()
    except Exception:
        return "text/plain"


def _param(part: Message, name: str) -> str:
    try:
        value = part.get_param(name)
    except Exception:
        return ""
    if isinstance(value, tuple):  # RFC 2231 (charset, language, value)
        value = value[2]
    return str(value or "").strip().lower()


def iter_parts(msg: Message, *, into_messages: bool = False, limit: int = 200) -> Iterator[Message]:
    """Walk MIME parts depth-first without raising; by default do not descend into attached
    messages (message/rfc822), whose content is the *original* mail, not the report."""
    stack: list[Message] = [msg]
    seen = 0
    while stack and seen < limit:
        part = stack.pop()
        seen += 1
        yield part
        ctype = _content_type(part)
        if ctype.startswith("message/") and not into_messages and part is not msg:
            continue
        try:
            payload = part.get_payload()
        except Exception:
            continue
        if isinstance(payload, list):
            stack.extend(reversed([p for p in payload if isinstance(p, Message)]))


def _decode_part(part: Message) -> str:
    try:
        data = part.get_payload(decode=True)
    except Exception:
        data = None
    if not isinstance(data, bytes):
        try:
            payload = part.get_payload()
        except Exception:
            return ""
        return payload if isinstance(payload, str) else ""
    try:
        charset = part.get_content_charset() or "utf-8"
    except Exception:
        charset = "utf-8"
    data = data[:262144]  # enough for any bounce notice; never decode a huge attachment
    try:
        return data.decode(charset, errors="replace")
    except (LookupError, ValueError):
        return data.decode("utf-8", errors="replace")


def text_parts(msg: Message, max_chars: int = 65536) -> str:
    """The message's own text (text/plain, else text/html with tags dropped), not attachments'
    inner messages; at most ``max_chars`` characters. Never raises."""
    chunks: list[str] = []
    total = 0
    for part in iter_parts(msg):
        ctype = _content_type(part)
        if ctype.startswith("multipart/"):
            # A multipart whose boundary was never found keeps its body as one string
            # (StartBoundaryNotFoundDefect); bounces from hand-rolled MTAs do this.
            try:
                payload = part.get_payload()
            except Exception:
                continue
            if not isinstance(payload, str):
                continue
            text = payload
        elif ctype in ("text/plain", "text/html"):
            text = _decode_part(part)
        else:
            continue
        if ctype == "text/html":
            text = re.sub(r"<[^>]*>", " ", text)
        chunks.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "\n".join(chunks)[:max_chars]


# --------------------------------------------------------------------------------------------
# Vocabulary.

# RFC 2142 role mailboxes that only machines send from, list-manager conventions, no-reply.
_ROBOT_LOCALS = frozenset(
    {
        "mailer-daemon",
        "mailerdaemon",
        "mailer_daemon",
        "postmaster",
        "post_master",  # Verizon, Apache James
        "listserv",
        "majordomo",
        "double-bounce",  # Postfix
        "no-reply",
        "noreply",
        "no_reply",
        "do-not-reply",
        "donotreply",
        "do_not_reply",
        "bounce",
        "bounces",
    }
)
_NOREPLY_RE = re.compile(
    r"(?:^|[._-])(?:no-?reply|do-?not-?reply|no_reply|do_not_reply)(?:$|[._-])"
)

# Headers list managers add besides List-* (ezmlm, fml, Mailman 2).
_LIST_HEADERS = frozenset(
    {
        "x-mailing-list",
        "mailing-list",
        "x-ml-name",
        "x-mlserver",
        "x-mailman-version",
        "x-beenthere",
    }
)

_PRECEDENCE_KIND = {"bulk": "bulk", "junk": "bulk", "list": "list", "auto_reply": "auto_reply"}

# Out-of-office headers from responders that do not set Auto-Submitted.
_AUTOREPLY_HEADERS = (
    "X-Autoreply",
    "X-Autorespond",
    "X-Auto-Reply",
    "X-AutoReply-From",
    "X-Autoresponder",
    "X-Mail-Autoreply",
    "X-Vacation",
    "X-MS-Exchange-Inbox-Rules-Loop",  # Exchange inbox rule replied/forwarded
    "X-MS-Exchange-Generated-Message-Source",  # Exchange-generated (OOF, NDR, rule)
)
_ROBOT_HEADERS = (
    "X-FC-MachineGenerated",  # FirstClass
    "X-Cron-Env",  # cron mail
)

# Subject prefixes of auto-replies. Each ends in a colon or is the whole subject, so a
# customer writing "Out of office next week, please call" is not mistaken for a responder.
_AUTOREPLY_SUBJECT_RE = re.compile(
    r"^\s*(?:"
    r"out of (?:the )?office|automatic reply|auto[ -]?reply|auto[ -]?response|autorespons"
    r"|abwesenheitsnotiz|automatische antwort|abwesend|réponse automatique|reponse automatique"
    r"|absence du bureau|respuesta automática|respuesta automatica|risposta automatica"
    r"|resposta automática|resposta automatica|automatisch antwoord|afwezig|autosvar"
    r"|automatisk svar|automaattinen vastaus|odpowiedź automatyczna|vacation reply|on vacation"
    r"|away from (?:the|my) office|自動応答|自动回复|自動回覆"
    r")\s*(?::|：|$)",
    re.IGNORECASE,
)

# Subjects MTAs give non-standard bounces (qmail, Exim, Exchange 2003, Gmail, Yahoo, ...).
_BOUNCE_SUBJECT_RE = re.compile(
    r"undeliver|undelivered mail|returned mail|returning message|return(?:ed)? to sender"
    r"|mail delivery fail|delivery fail|failure notice|failed delivery|failure delivery"
    r"|delivery status notification|delivery notification|mail delivery system"
    r"|delivery (?:has )?failed|could not be delivered|couldn'?t be delivered"
    r"|not (?:be )?delivered|non[- ]?delivery|delayed mail|message delayed|delivery delayed"
    r"|mail system error|mail failure|error sending your mail|could not send mail"
    r"|delivery failure|permanent delivery|warning: message .* delayed|nondeliverable"
    r"|mail failed|returning to sender"
    r"|メッセージを配信できません|未配達|配信エラー|メールエラー",
    re.IGNORECASE,
)
_FORWARD_RE = re.compile(r"^\s*(?:fwd?|wg|tr|rv|enc|pd|doorst)\s*:", re.IGNORECASE)

# Wording MTAs put in bounce bodies. Strong: sentences only delivery software writes.
_BOUNCE_BODY_STRONG_RE = re.compile(
    r"this is the mail system at host"  # Postfix
    r"|this is the qmail-send program"  # qmail
    r"|i'?m afraid i wasn'?t able to deliver"
    r"|i'?m sorry to have to inform you that your message could not"
    r"|this message was created automatically by mail delivery software"  # Exim
    r"|a message that you sent could not be delivered to one or more"  # Exim
    r"|the following addresses had permanent fatal errors"  # Sendmail
    r"|----- transcript of session follows -----"  # Sendmail
    r"|delivery to the following recipients? (?:failed|was aborted|has been delayed)"  # Gmail
    r"|delivery has failed to these recipients"  # Exchange
    r"|your message did not reach some or all of the intended recipients"  # Exchange
    r"|this is an automatically generated delivery status notification"
    r"|^\s*final-recipient:\s*rfc822;"  # RFC 3464 fields pasted as text
    r"|^\s*diagnostic-code:\s*smtp;",
    re.IGNORECASE | re.MULTILINE,
)
# Weak: wording a person might also use; only counts together with a robot sender.
_BOUNCE_BODY_WEAK_RE = re.compile(
    r"your message (?:could not|couldn'?t|wasn'?t|was not) (?:be )?delivered"
    r"|could not be delivered to|(?:could not|cannot|can'?t) be delivered"
    r"|unable to deliver|delivery status notification|message delivery (?:has )?failed"
    r"|(?:permanent|fatal|delivery) (?:error|failure)|undeliver(?:able|ed)"
    r"|user unknown|no such user|invalid (?:user|recipient)|unknown (?:user|recipient)"
    r"|mailbox (?:unavailable|not found|full|is full)|address (?:not found|rejected)"
    r"|recipient (?:address )?rejected|has been delayed|still being retried|will be retried"
    r"|could not send mail|returned mail|failed recipient|delivery failed|not delivered"
    r"|\b5[0-5][0-9][ -]5\.[0-9]{1,3}\.[0-9]{1,3}\b",
    re.IGNORECASE,
)

_REPORT_TYPES = {
    "delivery-status": ("bounce", "RFC 3464 delivery status"),
    "global-delivery-status": ("bounce", "RFC 6533 delivery status"),
    "disposition-notification": ("report", "RFC 8098 disposition notification"),
    "global-disposition-notification": ("report", "RFC 8098 disposition notification"),
    "feedback-report": ("report", "RFC 5965 abuse feedback"),
}


def _report_signals(msg: Message) -> list[tuple[str, str]]:
    """(kind, reason) for multipart/report and report parts (RFC 6522, 3464, 8098, 5965)."""
    found: list[tuple[str, str]] = []
    if _content_type(msg) == "multipart/report":
        rtype = _param(msg, "report-type")
        kind, what = _REPORT_TYPES.get(rtype, ("bounce" if not rtype else "report", "report"))
        found.append((kind, f"multipart/report; report-type={rtype or '?'} ({what})"))
    for part in iter_parts(msg):
        ctype = _content_type(part)
        if ctype.startswith("message/") and part is not msg:
            sub = ctype.split("/", 1)[1]
            if sub in _REPORT_TYPES:
                kind, what = _REPORT_TYPES[sub]
                reason = f"{ctype} part ({what})"
                if (kind, reason) not in found:
                    found.append((kind, reason))
    return found


def _robot_local_reason(local: str) -> str | None:
    base = local.split("+", 1)[0]
    if base in _ROBOT_LOCALS:
        return base
    if base.endswith("-request") or base.startswith("owner-") or base.endswith("-owner"):
        return base  # Majordomo/Mailman list administrative addresses
    if base.endswith("-bounces") or base.startswith("bounce-") or base.startswith("bounces-"):
        return base  # list / ESP bounce (VERP) addresses
    if _NOREPLY_RE.search(base):
        return base
    return None


def _sender_addresses(msg: Message, envelope_sender: str) -> list[tuple[str, str]]:
    """(where, address) for the envelope sender, Return-Path, From and Sender."""
    out: list[tuple[str, str]] = [("envelope", a) for a in _addresses(envelope_sender)]
    for header in ("Return-Path", "From", "Sender"):
        for value in header_values(msg, header):
            out.extend((header, a) for a in _addresses(value))
    return out


def _is_null(value: str) -> bool:
    return _strip_comments(value).strip() in ("", "<>", "< >")


def bounce_reasons(msg: Message, envelope_sender: str | None = None) -> list[str]:
    """Why a message that is not a standard DSN looks like a bounce ([] when it does not).

    Needs a robot-looking sender (null sender, system local part, Auto-Submitted) plus bounce
    wording in the subject or body, or bounce wording in both; ``X-Failed-Recipients`` (Exim)
    is enough alone. Shared with ``gateway.pipeline.bounce``.
    """
    reasons: list[str] = []
    failed = header_values(msg, "X-Failed-Recipients")
    if failed:
        reasons.append("X-Failed-Recipients header")
    robot_sender = False
    if envelope_sender is not None and _is_null(envelope_sender):
        robot_sender = True
    if any(_is_null(v) for v in header_values(msg, "Return-Path")):
        robot_sender = True
    for _, address in _sender_addresses(msg, envelope_sender or ""):
        if _robot_local_reason(_local_part(address)):
            robot_sender = True
    if any(_keyword(v) != "no" for v in header_values(msg, "Auto-Submitted")):
        robot_sender = True
    subject = _first(msg, "Subject")
    subject_hit = bool(_BOUNCE_SUBJECT_RE.search(subject)) and not _FORWARD_RE.match(subject)
    body = text_parts(msg, 32768)
    strong_body = bool(_BOUNCE_BODY_STRONG_RE.search(body))
    weak_body = strong_body or bool(_BOUNCE_BODY_WEAK_RE.search(body))
    if robot_sender and subject_hit:
        reasons.append(f"robot sender and bounce subject {subject[:60]!r}")
    elif robot_sender and weak_body:
        reasons.append("robot sender and bounce wording in body")
    elif subject_hit and strong_body:
        reasons.append(f"bounce subject {subject[:60]!r} and MTA bounce text in body")
    return reasons


def _classify(
    msg: Message,
    envelope_sender: str,
    own_addresses: Collection[str],
    own_domains: Collection[str],
    loop_header: str,
    loop_value: str | Collection[str] | None,
    is_own_message_id: Callable[[str], bool] | None,
) -> RobotVerdict:
    signals: list[tuple[str, str]] = []  # (kind, reason)

    def add(kind: str, reason: str) -> None:
        if (kind, reason) not in signals:
            signals.append((kind, reason))

    # 6. Loops: our own address, our loop header, our own Message-ID (RFC 3834 §2).
    own = {a for v in own_addresses for a in _addresses(str(v))}
    own_base = {_base_address(a) for a in own}
    domains = {str(d).strip().lower().rstrip(".") for d in own_domains if str(d).strip()}
    for where, address in _sender_addresses(msg, envelope_sender):
        if where not in ("envelope", "From"):
            continue
        if address in own or _base_address(address) in own_base:
            add("loop", f"{where} sender is our own address {address}")
        elif "@" in address and address.rsplit("@", 1)[1].rstrip(".") in domains:
            add("loop", f"{where} sender is in our own domain {address}")
    loop_values = {loop_value} if isinstance(loop_value, str) else loop_value
    for value in header_values(msg, loop_header):
        if loop_values is None or value.strip() in loop_values:
            add("loop", f"our loop header {loop_header}")
        else:
            # Another installation of this software: two gateways must not ping-pong.
            add("robot", f"foreign {loop_header} header")
    if is_own_message_id is not None:
        for value in header_values(msg, "Message-ID"):
            try:
                ours = bool(is_own_message_id(value))
            except Exception:
                ours = False
            if ours:
                add("loop", "Message-ID is one we generated")

    # 7. Reports (RFC 6522) and non-standard bounces.
    reports = _report_signals(msg)
    for kind, reason in reports:
        add(kind, reason)
    if not reports:  # a standard report says what it is; wording cannot override it
        for reason in bounce_reasons(msg, envelope_sender):
            add("bounce", reason)
    subject = _first(msg, "Subject")
    if re.match(r"\s*complaint about message from", subject, re.IGNORECASE) and any(
        _content_type(p) == "message/rfc822" for p in iter_parts(msg)
    ):
        add("report", "abuse complaint with the original attached (Hotmail JMRP)")

    # 1. Null sender (RFC 3834 §2, RFC 5321 §4.5.5).
    if _is_null(envelope_sender):
        add("robot", "null envelope sender")
    for value in header_values(msg, "Return-Path"):
        if _is_null(value):
            add("robot", "Return-Path: <>")

    # 2. Auto-Submitted (RFC 3834 §5): anything but "no" is a robot.
    for value in header_values(msg, "Auto-Submitted"):
        keyword = _keyword(value)
        if keyword == "no":
            continue
        label = keyword or "(empty)"
        kind = "auto_reply" if keyword == "auto-replied" else "robot"
        add(kind, f"Auto-Submitted: {label}")

    # 3. Precedence (every instance), List-* (RFC 2369, RFC 2919), X-Mailing-List.
    for value in header_values(msg, "Precedence"):
        keyword = _keyword(value)
        if keyword in _PRECEDENCE_KIND:
            add(_PRECEDENCE_KIND[keyword], f"Precedence: {keyword}")
    for name in header_names(msg):
        lower = name.lower()
        if lower.startswith("list-") or lower in _LIST_HEADERS:
            add("list", f"{name} header")

    # 4. X-Auto-Response-Suppress ([MS-OXCMAIL]).
    for value in header_values(msg, "X-Auto-Response-Suppress"):
        tokens = {t.lower() for t in re.split(r"[\s,;]+", _strip_comments(value)) if t}
        hit = sorted(tokens & {"all", "oof", "autoreply"})
        if hit:
            add("robot", f"X-Auto-Response-Suppress: {value[:40]}")

    # Out-of-office responders without Auto-Submitted.
    for name in _AUTOREPLY_HEADERS:
        for value in header_values(msg, name):
            if name.lower().startswith("x-ms-exchange") or _keyword(value) not in ("no", "false"):
                add("auto_reply", f"{name} header")
    if any(_keyword(v) == "vacation" for v in header_values(msg, "X-Apple-Action")):
        add("auto_reply", "X-Apple-Action: VACATION")
    for value in header_values(msg, "X-Autogenerated"):
        add("auto_reply" if _keyword(value) == "reply" else "robot", "X-Autogenerated header")
    for name in _ROBOT_HEADERS:
        if header_values(msg, name):
            add("robot", f"{name} header")
    if _AUTOREPLY_SUBJECT_RE.match(subject):
        add("auto_reply", f"auto-reply subject {subject[:60]!r}")

    # 5. System local parts.
    for where, address in _sender_addresses(msg, envelope_sender):
        if where == "Sender":
            continue
        local = _robot_local_reason(_local_part(address))
        if local:
            add("robot", f"local part {local!r}")

    if not signals:
        return RobotVerdict("human", ())
    kind = max((k for k, _ in signals), key=lambda k: _RANK[k])
    return RobotVerdict(kind, tuple(reason for _, reason in signals))


def classify(
    msg: Message,
    envelope_sender: str,
    *,
    own_addresses: Collection[str] = (),
    own_domains: Collection[str] = (),
    loop_header: str = "X-Support-Gateway-Loop",
    loop_value: str | Collection[str] | None = None,
    is_own_message_id: Callable[[str], bool] | None = None,
) -> RobotVerdict:
    """Classify ``msg`` as human or one of the robot kinds; collect every reason. Never raises.

    ``own_domains`` are domains only this gateway sends from (its Message-ID host, its bounce
    domain); do not list a domain your staff send from, or their replies count as loops.
    ``loop_value``: when given (one value or several: every node of one installation), a
    loop header with another value is a *foreign* gateway (robot), not our own loop.
    ``is_own_message_id``: e.g. ``Signer.verify_message_id`` wrapped in ``bool``; our own
    signed Message-ID arriving here means our mail came back.
    """
    try:
        return _classify(
            msg,
            envelope_sender if isinstance(envelope_sender, str) else "",
            own_addresses,
            own_domains,
            loop_header,
            loop_value,
            is_own_message_id,
        )
    except Exception as exc:  # fail safe: a classifier bug must never cause an ack
        return RobotVerdict("robot", (f"classifier error: {type(exc).__name__}",))
