"""Email commands on the first lines of a staff reply (gateway.pipeline.commands), and the
quoted-text removal the staff stage applies to what follows them."""

from __future__ import annotations

from datetime import timedelta

import pytest

from gateway.pipeline.commands import (
    COMMANDS,
    Command,
    CommandSpec,
    help_lines,
    help_text,
    parse_commands,
    parse_duration,
)
from gateway.pipeline.quoting import strip_quoted
from gateway.sla.durations import Duration


def names(text: str) -> list[str]:
    commands, _, errors = parse_commands(text)
    assert errors == []
    return [c.describe() for c in commands]


def test_no_commands_is_all_text() -> None:
    commands, rest, errors = parse_commands("Hello Pat,\n#close is not a command here\n")
    assert commands == []
    assert errors == []
    assert rest == "Hello Pat,\n#close is not a command here"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("#note", "#note"),
        ("#close", "#close"),
        ("#CLOSE", "#close"),
        ("  #Waiting  ", "#waiting"),
        ("#assign Bob", "#assign bob"),
        ("#snooze 2d", "#snooze 2d"),
        ("#snooze 4H", "#snooze 4h"),
        ("#priority URGENT", "#priority urgent"),
        ("#merge acme-1042", "#merge ACME-1042"),
        ("#merge [ACME-1042]", "#merge ACME-1042"),
    ],
)
def test_each_command(line: str, expected: str) -> None:
    assert names(line + "\n\nbody") == [expected]


def test_commands_then_text() -> None:
    commands, rest, errors = parse_commands(
        "\n#priority high\n\n#assign bob\nHello Pat,\n#close\n> quoted\n"
    )
    assert errors == []
    assert [c.name for c in commands] == ["priority", "assign"]
    assert rest == "Hello Pat,\n#close\n> quoted"  # only the FIRST lines are commands


def test_command_only_mail_leaves_no_text() -> None:
    commands, rest, errors = parse_commands("#close\r\n#priority low\r\n")
    assert [c.name for c in commands] == ["close", "priority"]
    assert rest == ""
    assert errors == []


def test_snooze_carries_duration() -> None:
    # The rules' grammar, units kept apart: a "d" is a working day of the ticket's calendar,
    # applied by the staff stage (docs/decisions.md D11, item 9).
    [cmd], _, _ = parse_commands("#snooze 1d12h")
    assert cmd == Command("snooze", "1d12h", "#snooze 1d12h", Duration(1, 12 * 3600, "1d12h"))
    assert cmd.duration is not None
    assert cmd.duration.business(timedelta(hours=8)) == timedelta(hours=20)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("#clsoe\nHello", "unknown command #clsoe"),
        ("#assign", "#assign needs a person id"),
        ("#assign bob carol", "takes one argument"),
        ("#assign B@d!", "not a person id"),
        ("#close now", "#close takes no argument"),
        ("#snooze tomorrow", "not a duration"),
        ("#snooze 0h", "not a duration"),
        ("#snooze 400d", "longer than 365 days"),
        ("#priority meh", "not one of low, normal, high, urgent"),
        ("#merge", "needs a ticket reference"),
        ("#merge ???", "not a ticket reference"),
        ("#close\n#waiting", "contradictory commands: #close and #waiting"),
        ("#priority low\n#priority high", "#priority given twice"),
    ],
)
def test_errors_are_clear(text: str, fragment: str) -> None:
    _, _, errors = parse_commands(text)
    assert errors, errors
    assert fragment in errors[0], errors


def test_unknown_word_is_an_error_even_with_valid_commands() -> None:
    commands, rest, errors = parse_commands("#close\n#frobnicate\nText")
    assert [c.name for c in commands] == ["close"]
    assert rest == "Text"
    assert errors == [
        "unknown command #frobnicate (known commands: #note, #close, #waiting, #assign, "
        "#snooze, #priority, #merge, #junk)"
    ]


def test_hash_not_followed_by_a_letter_is_text() -> None:
    commands, rest, errors = parse_commands("#1 thing to check: the fuse\n")
    assert commands == []
    assert errors == []
    assert rest.startswith("#1 thing")


def test_same_command_twice_is_harmless() -> None:
    assert names("#close\n#close\n") == ["#close", "#close"]


def test_invisible_characters_before_a_command() -> None:
    assert names("\ufeff#note\nsecret") == ["#note"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2d", timedelta(days=2)),
        ("4h", timedelta(hours=4)),
        ("90m", timedelta(minutes=90)),
        ("1d 2h", timedelta(hours=26)),
        # One grammar with the rules (gateway.sla.durations): no weeks, units in order.
        ("1w", None),
        ("2h1d", None),
        ("2x", None),
        ("", None),
        ("d", None),
    ],
)
def test_parse_duration(text: str, expected: timedelta | None) -> None:
    parsed = parse_duration(text)
    assert (parsed.business() if parsed is not None else None) == expected


def test_strip_quoted_keeps_indentation_and_drops_the_notification() -> None:
    text = (
        "Hello Pat,\n\nplease:\n    1. switch it off\n    2. unplug it\n\nAlice\n\n"
        "On Mon, 23 Nov 2026 at 10:00, Example Support <support@example.com> wrote:\n"
        "> New ticket ACME-1 from pat@customer.example.\n> the printer is on fire.\n"
    )
    assert strip_quoted(text) == (
        "Hello Pat,\n\nplease:\n    1. switch it off\n    2. unplug it\n\nAlice"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Thanks!\n\n-----Original Message-----\nFrom: x\n", "Thanks!"),
        ("Answer\n\n> quoted without a header line\n", "Answer"),
        ("> nothing but quote\n", ""),
        ("Am 23.11.2026 um 10:00 schrieb Example Support <support@example.com>:\n> x\n", ""),
        ("", ""),
    ],
)
def test_strip_quoted_variants(text: str, expected: str) -> None:
    assert strip_quoted(text) == expected


# ------------------------------------------------------------------------------ the registry


def _tag(name: str, arg: str, line: str) -> Command | str:
    return Command(name, arg.lower(), line) if arg else f"#{name} needs a tag"


def test_a_registered_command_is_parsed_and_listed_in_the_help(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = CommandSpec("tag", "#tag <word>", "add a tag to the ticket", _tag)
    monkeypatch.setitem(COMMANDS, "tag", spec)
    commands, rest, errors = parse_commands("#tag VIP\n#close\nThanks")
    assert errors == []
    assert rest == "Thanks"
    assert [c.describe() for c in commands] == ["#tag vip", "#close"]
    assert "#tag needs a tag" in parse_commands("#tag\n")[2]
    assert any(line.startswith("#tag <word>") and "add a tag" in line for line in help_lines())
    assert help_text().endswith("#tag <word>")


def test_the_help_names_every_command_once() -> None:
    text = help_text()
    assert text.startswith("#note (internal, not sent), #close, ")
    for name, spec in COMMANDS.items():
        assert text.count(f"#{name}") == 1
        assert spec.syntax in text
    assert len(help_lines()) == len(COMMANDS)


def test_status_commands_come_from_the_registry() -> None:
    statuses = [name for name, spec in COMMANDS.items() if spec.status]
    assert statuses == ["close", "waiting", "merge", "junk"]
    _, _, errors = parse_commands("#junk\n#waiting\n")
    assert errors == ["contradictory commands: #waiting and #junk (pick one)"]
