"""Email commands on the first lines of a staff reply (``#close``, ``#assign bob``...).

Pure: text in, ``(commands, remaining_text, errors)`` out; no database, no rules. The staff
stage (``gateway.pipeline.staff``) validates what needs the rules (``#assign`` to a known
person, ``#merge`` to an existing ticket) and applies them.

Grammar (docs/design.md §0: "a few email commands"; issue 7):

- commands are read only from the **first lines** of the reply, one per line, case-insensitive;
  blank lines before and between them are skipped; the first line that is not a command ends
  the command block, and everything from there on is the reply text (so a ``#`` further down,
  or in the quoted notification, is never a command);
- ``#note`` (internal, not sent), ``#close``, ``#waiting`` take no argument;
  ``#junk`` (the ticket is junk: to the junk folder, clocks stopped, nothing sent to the
  sender; issue 18) takes none or ``sender`` (``#junk sender`` also blocks the requester);
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

import re
from dataclasses import dataclass
from datetime import timedelta

from gateway.sla.durations import Duration, parse

__all__ = [
    "COMMANDS",
    "PRIORITIES",
    "Command",
    "parse_commands",
    "parse_duration",
]

#: Known commands and whether they take an argument.
COMMANDS: dict[str, bool] = {
    "note": False,
    "close": False,
    "waiting": False,
    "assign": True,
    "snooze": True,
    "priority": True,
    "merge": True,
    # Issue 18: the ticket is junk (no clock, no promise, nothing sent to the sender);
    # optional argument "sender": that sender's future mail goes to the junk folder too.
    "junk": False,
}
PRIORITIES = ("low", "normal", "high", "urgent")
#: Longest snooze accepted (a typo such as ``#snooze 200d`` should not hide a ticket for good).
MAX_SNOOZE = timedelta(days=365)

_LINE_RE = re.compile(r"#([A-Za-z][A-Za-z0-9_-]*)(?:\s+(.*))?")
_PERSON_RE = re.compile(r"[a-z0-9_-]{1,32}")
_REF_RE = re.compile(r"[A-Z0-9][A-Z0-9_-]{0,63}")
_STATUS = ("close", "waiting", "merge", "junk")
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


def parse_duration(text: str) -> Duration | None:
    """``2d``, ``4h``, ``90m``, ``1d12h`` (``gateway.sla.durations``); None when invalid."""
    try:
        return parse(text)
    except ValueError:
        return None


def _command(name: str, arg: str, line: str) -> tuple[Command | None, str | None]:
    """One command line to a Command, or an error message."""
    takes_arg = COMMANDS[name]
    if name == "junk":
        if arg and arg.lower() != "sender":
            return None, f"#junk takes no argument or 'sender' (got {arg!r} in {line!r})"
        return Command(name, arg.lower(), line), None
    if not takes_arg:
        if arg:
            return None, f"#{name} takes no argument (got {arg!r} in {line!r})"
        return Command(name, "", line), None
    if not arg:
        hint = {
            "assign": "a person id, e.g. #assign bob",
            "snooze": "a duration, e.g. #snooze 2d or #snooze 4h",
            "priority": "one of " + ", ".join(PRIORITIES),
            "merge": "a ticket reference, e.g. #merge ACME-1042",
        }[name]
        return None, f"#{name} needs {hint}"
    words = arg.split()
    if len(words) > 1 and name != "snooze":
        return None, f"#{name} takes one argument (got {arg!r} in {line!r})"
    if name == "assign":
        person = words[0].lower()
        if not _PERSON_RE.fullmatch(person):
            return None, f"#assign: {words[0]!r} is not a person id"
        return Command(name, person, line), None
    if name == "priority":
        level = words[0].lower()
        if level not in PRIORITIES:
            return None, f"#priority: {words[0]!r} is not one of " + ", ".join(PRIORITIES)
        return Command(name, level, line), None
    if name == "merge":
        ref = words[0].strip("[]").upper()
        if not _REF_RE.fullmatch(ref):
            return None, f"#merge: {words[0]!r} is not a ticket reference"
        return Command(name, ref, line), None
    # snooze
    duration = parse_duration(arg)
    if duration is None or duration.is_zero():
        return None, (
            f"#snooze: {arg!r} is not a duration such as 2d, 4h or 90m "
            f"(d = working days, as in the rules)"
        )
    if duration.business() > MAX_SNOOZE:  # a working day is at most 24 h: an upper bound
        return None, f"#snooze: {arg!r} is longer than {MAX_SNOOZE.days} days"
    return Command(name, duration.text, line, duration), None


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
        if name not in COMMANDS:
            known = ", ".join(f"#{c}" for c in COMMANDS)
            errors.append(f"unknown command #{match.group(1)} (known commands: {known})")
            continue
        cmd, error = _command(name, arg, line)
        if error is not None:
            errors.append(error)
        elif cmd is not None:
            commands.append(cmd)
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
    status = [name for name in _STATUS if name in seen]
    if len(status) > 1:
        errors.append(
            "contradictory commands: " + " and ".join(f"#{n}" for n in status) + " (pick one)"
        )
    return errors
