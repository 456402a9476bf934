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

import functools
import re
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from email.message import Message
from functools import cached_property

from gateway.pipeline.mailparts import (
    content_type,
    first_header,
    header_names,
    header_values,
    iter_parts,
    param,
    raw_headers,
    text_parts,
)
from gateway.pipeline.parse import address_pairs_of

__all__ = [
    "KINDS",
    "RULES",
    "Clues",
    "RobotVerdict",
    "Rule",
    "bounce_reasons",
    "classify",
    "verdict_of",
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
    if len(value) > 1000:  # a long value is not kept
        return list(_addresses_of.__wrapped__(value))
    return list(_addresses_of(value))


@functools.lru_cache(maxsize=512)
def _addresses_of(value: str) -> tuple[str, ...]:
    """`_addresses`, kept per distinct value: a message's senders are read by two rules and
    by bounce detection, and our own addresses are the same for every message."""
    value = value.strip()
    if not value:
        return ()
    pairs = address_pairs_of((value,))
    addrs = [addr.strip().lower() for _, addr in pairs if addr and addr.strip()]
    if not addrs:
        # Envelope forms like "<MAILER-DAEMON>" or a bare local part.
        bare = value.strip().strip("<>").strip().lower()
        if bare and " " not in bare:
            addrs = [bare]
    return tuple(addrs)


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
    if content_type(msg) == "multipart/report":
        rtype = param(msg, "report-type")
        kind, what = _REPORT_TYPES.get(rtype, ("bounce" if not rtype else "report", "report"))
        found.append((kind, f"multipart/report; report-type={rtype or '?'} ({what})"))
    for part in iter_parts(msg):
        ctype = content_type(part)
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
    subject = first_header(msg, "Subject")
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


# --------------------------------------------------------------------------------------------
# The rules. Each is a small function of the `Clues` that yields a (kind, reason) for every
# robot sign it finds (none for a human message); `RULES` lists them, and their order is the
# order of the reasons on the audit trail. Adding a rule: docs/architecture.md.

Signal = tuple[str, str]  # (kind, reason)


@dataclass(frozen=True)
class Clues:
    """What a rule may look at: the message, its envelope sender and what is ours."""

    msg: Message
    envelope_sender: str
    own_addresses: Collection[str] = ()
    own_domains: Collection[str] = ()
    loop_header: str = "X-Support-Gateway-Loop"
    loop_value: str | Collection[str] | None = None
    is_own_message_id: Callable[[str], bool] | None = None

    @cached_property
    def senders(self) -> list[tuple[str, str]]:
        """(where, address) for the envelope sender, Return-Path, From and Sender."""
        return _sender_addresses(self.msg, self.envelope_sender)

    @cached_property
    def subject(self) -> str:
        return first_header(self.msg, "Subject")

    @cached_property
    def present(self) -> frozenset[str]:
        """The message's header names, lowercase. Most of the ~20 headers the rules ask for
        are absent from any one message; each answer would otherwise be one scan of all the
        headers to find nothing."""
        return frozenset(name.lower() for name, _ in raw_headers(self.msg))

    def values(self, name: str) -> list[str]:
        if name.lower() not in self.present:
            return []  # what header_values answers for a header the message lacks
        return header_values(self.msg, name)


Rule = Callable[[Clues], Iterable[Signal]]


def own_sender(c: Clues) -> Iterator[Signal]:
    """6. Our own address or domain as envelope or From sender (RFC 3834 §2)."""
    own = {a for v in c.own_addresses for a in _addresses(str(v))}
    own_base = {_base_address(a) for a in own}
    domains = {str(d).strip().lower().rstrip(".") for d in c.own_domains if str(d).strip()}
    for where, address in c.senders:
        if where not in ("envelope", "From"):
            continue
        if address in own or _base_address(address) in own_base:
            yield "loop", f"{where} sender is our own address {address}"
        elif "@" in address and address.rsplit("@", 1)[1].rstrip(".") in domains:
            yield "loop", f"{where} sender is in our own domain {address}"


def loop_header(c: Clues) -> Iterator[Signal]:
    """6. Our loop header; another installation's is a foreign robot."""
    loop_values = {c.loop_value} if isinstance(c.loop_value, str) else c.loop_value
    for value in c.values(c.loop_header):
        if loop_values is None or value.strip() in loop_values:
            yield "loop", f"our loop header {c.loop_header}"
        else:
            # Another installation of this software: two gateways must not ping-pong.
            yield "robot", f"foreign {c.loop_header} header"


def own_message_id(c: Clues) -> Iterator[Signal]:
    """6. A Message-ID we generated: our own mail came back."""
    if c.is_own_message_id is None:
        return
    for value in c.values("Message-ID"):
        try:
            ours = bool(c.is_own_message_id(value))
        except Exception:  # a caller's check; whatever it raises, the mail is not ours
            ours = False
        if ours:
            yield "loop", "Message-ID is one we generated"


def reports_and_bounces(c: Clues) -> Iterator[Signal]:
    """7. Reports (RFC 6522) and, only without one, non-standard bounces."""
    reports = _report_signals(c.msg)
    yield from reports
    if not reports:  # a standard report says what it is; wording cannot override it
        for reason in bounce_reasons(c.msg, c.envelope_sender):
            yield "bounce", reason


def abuse_complaint(c: Clues) -> Iterator[Signal]:
    """Hotmail JMRP: a complaint subject with the original attached."""
    if re.match(r"\s*complaint about message from", c.subject, re.IGNORECASE) and any(
        content_type(p) == "message/rfc822" for p in iter_parts(c.msg)
    ):
        yield "report", "abuse complaint with the original attached (Hotmail JMRP)"


def null_sender(c: Clues) -> Iterator[Signal]:
    """1. Null envelope sender or Return-Path (RFC 3834 §2, RFC 5321 §4.5.5)."""
    if _is_null(c.envelope_sender):
        yield "robot", "null envelope sender"
    for value in c.values("Return-Path"):
        if _is_null(value):
            yield "robot", "Return-Path: <>"


def auto_submitted(c: Clues) -> Iterator[Signal]:
    """2. Auto-Submitted (RFC 3834 §5): anything but "no" is a robot."""
    for value in c.values("Auto-Submitted"):
        keyword = _keyword(value)
        if keyword == "no":
            continue
        kind = "auto_reply" if keyword == "auto-replied" else "robot"
        yield kind, f"Auto-Submitted: {keyword or '(empty)'}"


def precedence(c: Clues) -> Iterator[Signal]:
    """3. Precedence, every instance (RFC 3834 §3.1.8)."""
    for value in c.values("Precedence"):
        keyword = _keyword(value)
        if keyword in _PRECEDENCE_KIND:
            yield _PRECEDENCE_KIND[keyword], f"Precedence: {keyword}"


def list_headers(c: Clues) -> Iterator[Signal]:
    """3. List-* (RFC 2369, RFC 2919), X-Mailing-List and other list managers' headers."""
    for name in header_names(c.msg):
        lower = name.lower()
        if lower.startswith("list-") or lower in _LIST_HEADERS:
            yield "list", f"{name} header"


def auto_response_suppress(c: Clues) -> Iterator[Signal]:
    """4. X-Auto-Response-Suppress: All/OOF/AutoReply ([MS-OXCMAIL] 2.2.3.2.20)."""
    for value in c.values("X-Auto-Response-Suppress"):
        tokens = {t.lower() for t in re.split(r"[\s,;]+", _strip_comments(value)) if t}
        if tokens & {"all", "oof", "autoreply"}:
            yield "robot", f"X-Auto-Response-Suppress: {value[:40]}"


def autoreply_headers(c: Clues) -> Iterator[Signal]:
    """Out-of-office responders without Auto-Submitted."""
    for name in _AUTOREPLY_HEADERS:
        for value in c.values(name):
            if name.lower().startswith("x-ms-exchange") or _keyword(value) not in ("no", "false"):
                yield "auto_reply", f"{name} header"


def apple_vacation(c: Clues) -> Iterator[Signal]:
    if any(_keyword(v) == "vacation" for v in c.values("X-Apple-Action")):
        yield "auto_reply", "X-Apple-Action: VACATION"


def autogenerated(c: Clues) -> Iterator[Signal]:
    for value in c.values("X-Autogenerated"):
        yield ("auto_reply" if _keyword(value) == "reply" else "robot"), "X-Autogenerated header"


def robot_headers(c: Clues) -> Iterator[Signal]:
    for name in _ROBOT_HEADERS:
        if c.values(name):
            yield "robot", f"{name} header"


def autoreply_subject(c: Clues) -> Iterator[Signal]:
    if _AUTOREPLY_SUBJECT_RE.match(c.subject):
        yield "auto_reply", f"auto-reply subject {c.subject[:60]!r}"


def system_local_part(c: Clues) -> Iterator[Signal]:
    """5. System local parts of the envelope sender, Return-Path and From (not Sender)."""
    for where, address in c.senders:
        if where == "Sender":
            continue
        local = _robot_local_reason(_local_part(address))
        if local:
            yield "robot", f"local part {local!r}"


#: Every robot rule, in the order their reasons are listed.
RULES: tuple[Rule, ...] = (
    own_sender,
    loop_header,
    own_message_id,
    reports_and_bounces,
    abuse_complaint,
    null_sender,
    auto_submitted,
    precedence,
    list_headers,
    auto_response_suppress,
    autoreply_headers,
    apple_vacation,
    autogenerated,
    robot_headers,
    autoreply_subject,
    system_local_part,
)


def verdict_of(clues: Clues, rules: Iterable[Rule] = RULES) -> RobotVerdict:
    """Run the rules; the highest-ranked kind found wins and every reason is kept."""
    signals: list[Signal] = []
    for rule in rules:
        for signal in rule(clues):
            if signal not in signals:
                signals.append(signal)
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
        clues = Clues(
            msg,
            envelope_sender if isinstance(envelope_sender, str) else "",
            own_addresses,
            own_domains,
            loop_header,
            loop_value,
            is_own_message_id,
        )
        return verdict_of(clues, RULES)
    except Exception as exc:  # fail safe: a classifier bug must never cause an ack
        return RobotVerdict("robot", (f"classifier error: {type(exc).__name__}",))
