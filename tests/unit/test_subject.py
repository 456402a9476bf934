"""Subject normalisation and ticket references (docs/design.md §4)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.pipeline.subject import (
    decode_rfc2047,
    find_ticket_refs,
    format_ref,
    normalise_subject,
)


@pytest.mark.parametrize(
    "subject",
    [
        "Printer on fire",
        "Re: Printer on fire",
        "RE: Printer on fire",
        "re:Printer on fire",
        "AW: Printer on fire",
        "Aw: Printer on fire",
        "Fwd: Printer on fire",
        "FW: Printer on fire",
        "Fw: Printer on fire",
        "WG: Printer on fire",
        "Fwd[5]: Printer on fire",
        "Re[2]: Printer on fire",
        "Re(3): Printer on fire",
        "Re^2: Printer on fire",
        "SV: Printer on fire",
        "VS: Printer on fire",
        "Antw: Printer on fire",
        "RIF: Printer on fire",
        "TR: Printer on fire",
        "Re : Printer on fire",  # French spacing
        "RE :  Printer   on\tfire",
        "Re: AW: Fwd[2]: Re: Printer on fire",
        "Re: Re: Re: Re: Printer on fire",
        "回复：Printer on fire",  # full-width colon
        "ΑΠ: Printer on fire",
        "Odp: Printer on fire",
        "  Re:  PRINTER ON FIRE  ",
        "Printer on fire (fwd)",
        "[fedora-devel] Printer on fire",
        "[fedora-devel] Re: Printer on fire",  # Mailman puts its tag first
        "Re: [fedora-devel] Printer on fire",  # clients put Re: first
        "Re: [fedora-devel] Re: [fedora-devel] Printer on fire",
        "[EXTERNAL] RE: Printer on fire",
        "=?UTF-8?Q?Re=3A_Printer_on_fire?=",
        "=?iso-8859-1?q?AW:_Printer_on_fire?=",
    ],
)
def test_variants_of_one_conversation_normalise_alike(subject: str) -> None:
    assert normalise_subject(subject) == "printer on fire"


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        ("Rerun: tests", "rerun: tests"),  # "Re" inside a word is not a prefix
        ("Fwdx: thing", "fwdx: thing"),
        ("Report: Q3", "report: q3"),
        ("[Printer issue] help", "[printer issue] help"),  # tags with spaces are typed text
        ("Help [fedora-devel]", "help [fedora-devel]"),  # only leading tags are dropped
        ("Straße", "strasse"),  # casefold, not lower
        ("", ""),
        ("Re:", ""),
        ("Ｒｅ： full width", "full width"),  # NFKC
    ],
)
def test_normalise_keeps_what_people_typed(subject: str, expected: str) -> None:
    assert normalise_subject(subject) == expected


def test_normalise_strips_our_own_reference_anywhere_when_prefix_given() -> None:
    assert normalise_subject("Re: [ACME-1042] Printer on fire", "ACME") == "printer on fire"
    assert normalise_subject("Printer on fire [acme-1042]", "ACME") == "printer on fire"
    assert normalise_subject("Printer on fire [OTHER-7]", "ACME") == "printer on fire [other-7]"
    # Without a prefix, a trailing ref is ordinary text.
    assert normalise_subject("Printer on fire [ACME-1042]") == "printer on fire [acme-1042]"


def test_find_ticket_refs() -> None:
    assert find_ticket_refs("Re: [ACME-1042] Printer on fire", "ACME") == ["ACME-1042"]
    assert find_ticket_refs("re: [acme-1042]", "acme") == ["ACME-1042"]
    assert find_ticket_refs("[ ACME-01042 ] x", "ACME") == ["ACME-1042"]
    assert find_ticket_refs("[ACME-1] and [ACME-2] and [ACME-1]", "ACME") == ["ACME-1", "ACME-2"]
    assert find_ticket_refs("[OTHER-1042] [XACME-1] [ACME-x] ACME-5", "ACME") == []
    assert find_ticket_refs("=?UTF-8?B?W0FDTUUtMTA0Ml0gaMOpbGxv?=", "ACME") == ["ACME-1042"]
    assert find_ticket_refs("[A.B-3]", "A.B") == ["A.B-3"]
    assert find_ticket_refs("[AxB-3]", "A.B") == []  # the prefix is literal, not a pattern
    assert find_ticket_refs("[ACME-1042]", "") == []


def test_format_ref() -> None:
    assert format_ref("ACME", 1042) == "ACME-1042"
    assert format_ref("acme", 7) == "ACME-7"
    assert find_ticket_refs(f"[{format_ref('ACME', 99)}]", "ACME") == ["ACME-99"]
    with pytest.raises(ValueError, match="invalid ticket number"):
        format_ref("ACME", -1)


def test_decode_rfc2047() -> None:
    assert decode_rfc2047("=?UTF-8?B?44Gr44KD44KT44GT?=") == "にゃんこ"
    assert decode_rfc2047("plain") == "plain"
    assert decode_rfc2047("=?bogus-charset?Q?x?=") == "=?bogus-charset?Q?x?="


@given(st.text(max_size=200), st.sampled_from(["ACME", "a.b", "X"]))
def test_never_raises_and_is_idempotent(subject: str, prefix: str) -> None:
    once = normalise_subject(subject, prefix)
    assert normalise_subject(once, prefix) == once
    for ref in find_ticket_refs(subject, prefix):
        assert ref.startswith(prefix.upper() + "-")


@given(st.from_regex(r"[A-Za-z][A-Za-z ]{0,30}[A-Za-z]", fullmatch=True), st.data())
def test_prefix_stacks_normalise_to_the_base(base: str, data: st.DataObject) -> None:
    prefixes = data.draw(
        st.lists(st.sampled_from(["Re: ", "AW: ", "Fwd[2]: ", "FW: ", "[list] ", "Re : "]))
    )
    subject = "".join(prefixes) + base
    expected = normalise_subject(base)
    assert normalise_subject(subject) == expected
