"""Email commands on the first lines of a staff reply (``#close``, ``#assign bob``...).

One registry, `COMMANDS`: each `CommandSpec` is one command's syntax and argument parser, its
checks that need the rules or the database (``#assign`` to a known person, ``#merge`` to an
existing ticket), its effect on the ticket, and its one-line help. `parse_commands` is pure
(text in, ``(commands, remaining_text, errors)`` out); the staff stage
(``gateway.pipeline.staff``) runs every command's ``validate`` before any ``apply``, through a
`Desk` it provides (events and the letters a command sends). The help in staff letters is
generated from the registry (`help_text`, `help_lines`), so adding a command is one spec here
plus docs/staff-email.md (recipe in docs/architecture.md).

Grammar (docs/design.md §0: "a few email commands"; docs/staff-email.md):

- commands are read only from the **first lines** of the reply, one per line, case-insensitive;
  blank lines before and between them are skipped; the first line that is not a command ends
  the command block, and everything from there on is the reply text (so a ``#`` further down,
  or in the quoted notification, is never a command);
- ``#note`` (internal, not sent), ``#close``, ``#waiting`` take no argument;
  ``#junk`` (the ticket is junk: to the junk folder, clocks stopped, nothing sent to the
  sender; docs/spam.md) takes none or ``sender`` (``#junk sender`` also blocks the requester);
  ``#assign <person-id>``, ``#snooze <duration>`` (``2d``, ``4h``, ``1d12h``: the grammar of
  the rules, ``gateway.sla.durations``; ``d`` is a working day of the ticket's SLA calendar,
  so ``#snooze 2d`` on a Friday wakes on Tuesday, not on Sunday),
  ``#priority <low|normal|high|urgent>``, ``#merge <REF>`` take one;
- an unknown ``#word`` in the command block is an **error**, not silently text: a mistyped
  ``#clsoe`` must not be relayed to the customer as the first line of the answer;
- contradictory status commands (``#close`` with ``#waiting`` or ``#merge``) and a command
  given twice with different arguments are errors too.

A line such as ``#1 priority`` (``#`` not followed by a letter) is text, not a command.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Protocol

from sqlmodel import select

from gateway.pipeline.junk import block_sender, junk_ticket, withdraw_customer_mail
from gateway.sla.clocks import on_close, on_snooze, on_waiting
from gateway.sla.deadlines import isoz
from gateway.sla.durations import Duration, parse
from gateway.store import promises
from gateway.store.models import Participant
from gateway.store.queries import add_event, add_participant, find_ticket, link

if TYPE_CHECKING:
    from gateway.pipeline.context import Context
    from gateway.routing.model import Person
    from gateway.store.models import Ticket

__all__ = [
    "COMMANDS",
    "PRIORITIES",
    "Command",
    "CommandSpec",
    "Desk",
    "help_lines",
    "help_text",
    "parse_commands",
    "parse_duration",
]

PRIORITIES = ("low", "normal", "high", "urgent")
#: Longest snooze accepted (a typo such as ``#snooze 200d`` should not hide a ticket for good).
MAX_SNOOZE = timedelta(days=365)

_LINE_RE = re.compile(r"#([A-Za-z][A-Za-z0-9_-]*)(?:\s+(.*))?")
_PERSON_RE = re.compile(r"[a-z0-9_-]{1,32}")
_REF_RE = re.compile(r"[A-Z0-9][A-Z0-9_-]{0,63}")
_INVISIBLE = "\ufeff\u200b\u200c\u200d\u2060"


@dataclass(frozen=True)
class Command:
    """One parsed command: ``name`` as in `COMMANDS`, its normalised argument, the original
    line (for confirmations), and the duration of ``#snooze`` (applied in the ticket's
    calendar by the staff stage)."""

    name: str
    arg: str = ""
    line: str = ""
    duration: Duration | None = None

    def describe(self) -> str:
        return f"#{self.name}" + (f" {self.arg}" if self.arg else "")


class Desk(Protocol):
    """What a command's checks and effect may use: the message's context, the verified staff
    person who sent it, the ticket's audit trail, and the letters a command sends (composed
    by the letters code; the staff stage implements this)."""

    ctx: Context
    person: Person

    def event(self, type_: str, detail: str, data: object = None) -> None:
        """An event on the ticket's audit trail, for this message."""

    def hand_over(self, target: Person, previous: Person | None, reason: str) -> None:
        """The new holder gets the whole history, the previous one is told
        (docs/staff-email.md "Handover")."""

    def tell_merged(self, into: Ticket) -> None:
        """Both owners are told of a merge of this ticket into ``into``."""


#: (argument, line) -> the command, or the error message.
Parser = Callable[[str, str, str], "Command | str"]


def _no_checks(desk: Desk, cmd: Command) -> list[str]:
    return []


@dataclass(frozen=True)
class CommandSpec:
    """One email command (module docstring)."""

    name: str
    #: How it is written, for the help: ``#assign <person>``.
    syntax: str
    #: What it does, in one line (the help in staff letters).
    help: str
    #: (name, argument, line) -> `Command` or an error message; pure.
    parse: Parser
    #: Errors that need the rules or the database; all checked before anything is applied.
    validate: Callable[[Desk, Command], list[str]] = _no_checks
    #: The effect; returns the confirmation line. None: the staff stage handles it (#note).
    apply: Callable[[Desk, Command], str] | None = None
    #: Sets the ticket's status: at most one such command per mail.
    status: bool = False
    #: The mail's text stays an internal note, never relayed to the customer.
    internal: bool = False
    #: Shown in the one-line summary of letter footers after the syntax.
    short: str = ""


def parse_duration(text: str) -> Duration | None:
    """``2d``, ``4h``, ``90m``, ``1d12h`` (``gateway.sla.durations``); None when invalid."""
    try:
        return parse(text)
    except ValueError:
        return None


# ---------------------------------------------------------------------------- arguments


def _no_arg(name: str, arg: str, line: str) -> Command | str:
    if arg:
        return f"#{name} takes no argument (got {arg!r} in {line!r})"
    return Command(name, "", line)


def _one_arg(hint: str, convert: Callable[[str, str], Command | str]) -> Parser:
    """A parser for a command with exactly one argument (``hint`` says what it needs)."""

    def parse_one(name: str, arg: str, line: str) -> Command | str:
        if not arg:
            return f"#{name} needs {hint}"
        words = arg.split()
        if len(words) > 1:
            return f"#{name} takes one argument (got {arg!r} in {line!r})"
        return convert(words[0], line)

    return parse_one


def _person_arg(word: str, line: str) -> Command | str:
    person = word.lower()
    if not _PERSON_RE.fullmatch(person):
        return f"#assign: {word!r} is not a person id"
    return Command("assign", person, line)


def _priority_arg(word: str, line: str) -> Command | str:
    level = word.lower()
    if level not in PRIORITIES:
        return f"#priority: {word!r} is not one of " + ", ".join(PRIORITIES)
    return Command("priority", level, line)


def _ref_arg(word: str, line: str) -> Command | str:
    ref = word.strip("[]").upper()
    if not _REF_RE.fullmatch(ref):
        return f"#merge: {word!r} is not a ticket reference"
    return Command("merge", ref, line)


def _snooze_arg(name: str, arg: str, line: str) -> Command | str:
    if not arg:
        return f"#{name} needs a duration, e.g. #snooze 2d or #snooze 4h"
    duration = parse_duration(arg)  # "1d 12h" is one duration: spaces allowed
    if duration is None or duration.is_zero():
        return (
            f"#snooze: {arg!r} is not a duration such as 2d, 4h or 90m "
            f"(d = working days, as in the rules)"
        )
    if duration.business() > MAX_SNOOZE:  # a working day is at most 24 h: an upper bound
        return f"#snooze: {arg!r} is longer than {MAX_SNOOZE.days} days"
    return Command(name, duration.text, line, duration)


def _junk_arg(name: str, arg: str, line: str) -> Command | str:
    if arg and arg.lower() != "sender":
        return f"#junk takes no argument or 'sender' (got {arg!r} in {line!r})"
    return Command(name, arg.lower(), line)


# ------------------------------------------------------------------------------ checks


def _known_person(desk: Desk, cmd: Command) -> list[str]:
    people = desk.ctx.services.rules.people
    if cmd.arg in people:
        return []
    return [f"#assign: nobody called {cmd.arg!r} in rules/ (people: {', '.join(sorted(people))})"]


def _other_ticket(desk: Desk, cmd: Command) -> list[str]:
    assert desk.ctx.ticket is not None
    target = find_ticket(desk.ctx.session, cmd.arg)
    if target is None:
        return [f"#merge: there is no ticket {cmd.arg}"]
    if target.id == desk.ctx.ticket.id:
        return [f"#merge: {cmd.arg} is this ticket"]
    return []


# ----------------------------------------------------------------------------- effects


def _ticket(desk: Desk) -> Ticket:
    ticket = desk.ctx.ticket
    assert ticket is not None
    assert ticket.id is not None
    return ticket


def _by(desk: Desk, cmd: Command) -> str:
    return f"by {desk.person.name} (#{cmd.name})"


def _close(desk: Desk, cmd: Command) -> str:
    t = _ticket(desk)
    on_close(t, desk.ctx.now)
    desk.event("closed", f"{t.ref} closed {_by(desk, cmd)}")
    return f"#close: {t.ref} is closed"


def _waiting(desk: Desk, cmd: Command) -> str:
    t = _ticket(desk)
    before = t.status
    on_waiting(t, desk.ctx.now)
    if t.status != "waiting":
        desk.event("waiting", f"not set to waiting {_by(desk, cmd)}: the ticket is {before}")
        return f"#waiting: nothing to do, {t.ref} is {before}"
    desk.event("waiting", f"waiting on the customer {_by(desk, cmd)}: our clocks pause")
    return f"#waiting: {t.ref} waits on the customer; our clocks pause until they write"


def _snooze(desk: Desk, cmd: Command) -> str:
    t = _ticket(desk)
    rules = desk.ctx.services.rules
    assert cmd.duration is not None
    # One grammar (gateway.sla.durations): "2d" is two working days of the ticket's
    # SLA calendar, as in the rules; clock time only when the policy is unknown.
    calendar = rules.calendar_for_policy(t.sla) if t.sla in rules.sla else None
    until = cmd.duration.after(desk.ctx.now, calendar)
    on_snooze(t, until)
    desk.event("snoozed", f"snoozed until {isoz(until)} {_by(desk, cmd)}; deadlines unchanged")
    return f"#snooze: no escalation before {isoz(until)} (the deadlines stand)"


def _priority(desk: Desk, cmd: Command) -> str:
    t = _ticket(desk)
    old = t.priority
    t.priority = cmd.arg
    desk.event("priority", f"priority {old} -> {cmd.arg} {_by(desk, cmd)}")
    return f"#priority: {old} -> {cmd.arg}"


def _assign(desk: Desk, cmd: Command) -> str:
    t = _ticket(desk)
    rules = desk.ctx.services.rules
    target = rules.people[cmd.arg]
    old = t.owner
    t.owner = target.id
    desk.event("assigned", f"owner {old} -> {target.id} ({target.name}) {_by(desk, cmd)}")
    desk.hand_over(
        target,
        rules.people.get(old),
        f"{desk.person.name} assigned {t.ref} to {target.name} (#assign).",
    )
    return f"#assign: {t.ref} now belongs to {target.name}"


def _merge(desk: Desk, cmd: Command) -> str:
    t = _ticket(desk)
    s, now = desk.ctx.session, desk.ctx.now
    into = find_ticket(s, cmd.arg)
    assert t.id is not None
    assert into is not None
    assert into.id is not None
    link(s, t.id, into.id, "merged-into", now)
    for p in s.exec(select(Participant).where(Participant.ticket_id == t.id)).all():
        role = "cc" if p.role == "requester" else p.role
        add_participant(s, into.id, p.address, role, now)
    on_close(t, now)
    by = _by(desk, cmd)
    desk.event("merged", f"{t.ref} merged into {into.ref} and closed {by}")
    add_event(
        s,
        into.id,
        "merged",
        f"{t.ref} ({t.requester}: {t.subject}) merged into this ticket {by}",
        now,
    )
    desk.tell_merged(into)
    return f"#merge: {t.ref} merged into {into.ref} and closed"


def _junk(desk: Desk, cmd: Command) -> str:
    """``#junk [sender]`` (docs/spam.md "The junk folder"): the ticket's messages to the junk
    folder, every clock stopped, what was still to go out to the customer withdrawn, and with
    ``sender`` the requester's future mail to the junk folder too. Nothing is sent to the
    sender."""
    t = _ticket(desk)
    assert t.id is not None
    s, now, person = desk.ctx.session, desk.ctx.now, desk.person
    block = cmd.arg == "sender"
    by = f"by {person.name} (#junk{' sender' if block else ''})"
    trail = [
        {
            "at": isoz(now),
            "type": "junked",
            "detail": f"{t.ref} ({t.requester}: {t.subject}) declared junk {by}",
            "data": {"ticket": t.ref, "person": person.id},
        }
    ]
    moved = junk_ticket(s, t, by=person.name, now=now, events=trail)
    on_close(t, now)
    # No clock runs for junk: nothing is owed, nothing escalates.
    t.first_response_due = None
    t.next_response_due = None
    t.resolution_due = None
    t.snoozed_until = None
    tags = json.loads(t.tags or "[]")
    if "junk" not in tags:
        t.tags = json.dumps([*tags, "junk"])
    withdrawn = withdraw_customer_mail(s, t.id, now)
    # The ticket is closed now: its pending promises are withdrawn (closed before their time).
    s.add(t)
    s.flush()
    settled = promises.settle(s, now, {t.id})
    n_promises = sum(1 for p in settled if p.state == "withdrawn")
    desk.event(
        "junked",
        f"{t.ref} declared junk {by}: {moved} message(s) moved to the junk folder, clocks "
        f"stopped, {withdrawn} pending mail to the customer withdrawn, {n_promises} "
        "promise(s) withdrawn",
        {"moved": moved, "withdrawn": withdrawn, "block": block, "promises": n_promises},
    )
    line = f"#junk: {t.ref} is junk ({moved} message(s) in the junk folder, clocks stopped)"
    if block:
        address = (t.requester or "").lower()
        if address and block_sender(
            s, address, by=person.name, ticket_ref=t.ref, reason=f"#junk sender on {t.ref}", now=now
        ):
            desk.event("sender-blocked", f"{address} blocked {by}: future mail goes to junk")
            line += f"; future mail from {address} goes to the junk folder"
            line += f" (undo: customers unblock {address})"
        else:
            line += f"; {address or 'the sender'} was already blocked"
    return line


# ----------------------------------------------------------------------------- registry

#: Every email command, in the order the help and error messages list them.
COMMANDS: dict[str, CommandSpec] = {
    spec.name: spec
    for spec in (
        CommandSpec(
            "note", "#note", "keep the reply as an internal note, not sent to the customer",
            _no_arg, internal=True, short="internal, not sent",
        ),
        CommandSpec("close", "#close", "close the ticket", _no_arg, apply=_close, status=True),
        CommandSpec(
            "waiting", "#waiting", "the ticket waits on the customer: our clocks pause",
            _no_arg, apply=_waiting, status=True,
        ),
        CommandSpec(
            "assign", "#assign <person>", "give the ticket to another person of rules/",
            _one_arg("a person id, e.g. #assign bob", _person_arg),
            validate=_known_person, apply=_assign,
        ),
        CommandSpec(
            "snooze", "#snooze <2d|4h>",
            "no escalation for that long (d = working days); the deadlines stand",
            _snooze_arg, apply=_snooze,
        ),
        CommandSpec(
            "priority", "#priority <" + "|".join(PRIORITIES) + ">", "set the ticket's priority",
            _one_arg("one of " + ", ".join(PRIORITIES), _priority_arg), apply=_priority,
        ),
        CommandSpec(
            "merge", "#merge <REF>", "merge this ticket into ticket REF and close it",
            _one_arg("a ticket reference, e.g. #merge ACME-1042", _ref_arg),
            validate=_other_ticket, apply=_merge, status=True,
        ),
        # docs/spam.md: the ticket is junk (no clock, no promise, nothing sent to the sender);
        # optional argument "sender": that sender's future mail goes to the junk folder too.
        CommandSpec(
            "junk", "#junk [sender]",
            "junk: no clocks, nothing sent ('sender': their future mail is junk too)",
            _junk_arg, apply=_junk, status=True, internal=True,
        ),
    )
}  # fmt: skip


def help_lines() -> list[str]:
    """One line per command (syntax: what it does), for letters that explain commands."""
    width = max(len(spec.syntax) for spec in COMMANDS.values())
    return [f"{spec.syntax:<{width}}  {spec.help}" for spec in COMMANDS.values()]


def help_text() -> str:
    """Every command on one line, for letter footers: ``#note (internal, not sent), ...``."""
    return ", ".join(
        spec.syntax + (f" ({spec.short})" if spec.short else "") for spec in COMMANDS.values()
    )


# ------------------------------------------------------------------------------ parsing


def parse_commands(text: str) -> tuple[list[Command], str, list[str]]:
    """Read the command block at the top of ``text``.

    Returns the commands (in order), the text after the command block (unchanged, original
    line breaks; "" when the mail held only commands) and the errors (empty when all is well).
    """
    lines = (text or "").replace("\r\n", "\n").replace("\r", "\n").split("\n")
    commands: list[Command] = []
    errors: list[str] = []
    rest_at = len(lines)
    for i, raw_line in enumerate(lines):
        line = raw_line.strip().strip(_INVISIBLE).strip()
        if not line:
            continue
        match = _LINE_RE.fullmatch(line)
        if match is None:
            rest_at = i
            break
        name = match.group(1).lower()
        arg = (match.group(2) or "").strip()
        spec = COMMANDS.get(name)
        if spec is None:
            known = ", ".join(f"#{c}" for c in COMMANDS)
            errors.append(f"unknown command #{match.group(1)} (known commands: {known})")
            continue
        parsed = spec.parse(name, arg, line)
        if isinstance(parsed, str):
            errors.append(parsed)
        else:
            commands.append(parsed)
    errors.extend(_conflicts(commands))
    rest = "\n".join(lines[rest_at:]).strip("\n")
    return commands, rest, errors


def _conflicts(commands: list[Command]) -> list[str]:
    errors: list[str] = []
    seen: dict[str, Command] = {}
    for cmd in commands:
        before = seen.get(cmd.name)
        if before is not None and before.arg != cmd.arg:
            errors.append(f"#{cmd.name} given twice ({before.describe()}, {cmd.describe()})")
        seen[cmd.name] = cmd
    status = [name for name, spec in COMMANDS.items() if spec.status and name in seen]
    if len(status) > 1:
        errors.append(
            "contradictory commands: " + " and ".join(f"#{n}" for n in status) + " (pick one)"
        )
    return errors
