"""The parse policy's kept header objects and the readers' shortcuts change no outcome.

`gateway.pipeline.parse._POLICY` keeps each parsed header object per distinct (name, raw
value), shared between reads and messages; `_simple_text` gives a simple value's text without
the policy's parser; `Clues.values` answers [] for a header the message lacks without asking
`header_values`; `_words` skips `decode_words` for a value without an encoded word.

Every message of both corpora (tests/data: the sisimai bounces and the fedora-devel list
month) and a set of hostile hand-made ones is parsed, classified and its bounce read twice:
with the caching policy and shortcuts (all messages in a row, so values shared between
messages hit), and with plain ``email.policy.default`` (CRLF) read through mailparts only.
Everything later stages may read must be equal: every field of the `ParsedMessage`, every
header of every part as text and as its header class, content types, defects, the serialised
message, the verdict, the bounce.
"""

from __future__ import annotations

import email.policy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.pipeline import mailparts
from gateway.pipeline import parse as parse_mod
from gateway.pipeline.bounce import parse_bounce
from gateway.pipeline.classify import Clues, classify
from gateway.pipeline.mailparts import decode_words, header_values, raw_headers
from gateway.pipeline.parse import _simple_text, _words, parse, walk_parts
from tests.support.corpus import iter_raw

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("parse_policy_cache")]

DATA = Path(os.environ.get("GATEWAY_CORPORA", Path(__file__).resolve().parents[1] / "data"))

HOSTILE = [
    b"To: :;0\r\nFrom: a@b\r\nSubject: group\r\n\r\nbody\r\n",
    b"From: =?utf-8?q?J=C3=B6rg?= <j@example.com>\r\nSubject: =?utf-8?b?w6TDtsO8?=\r\n\r\nx\r\n",
    b"From: \xc3\xa9t\xc3\xa9 <e@example.com>\r\nSubject: 8-bit \xff\r\n\r\nx\r\n",
    b'From: broken <<<@>>>\r\nReply-To: ,,,\r\nCc: "unterminated <c@example.com>\r\n\r\nx\r\n',
    b'Content-Type: text/plain; charset="no-such-charset"\r\n\r\n\xe9\xe9\r\n',
    b"Content-Type: text/plain; charset=utf-8\r\nContent-Type: text/html\r\n\r\n<p>two</p>\r\n",
    b"Content-Type: multipart/mixed\r\n\r\nno boundary\r\n",
    b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n"
    b"one\r\n--b\r\nContent-Type: application/pdf; name*=utf-8''%C3%A9.pdf\r\n"
    b"Content-Disposition: attachment; filename*0=a; filename*1=b.pdf\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0=\r\n--b--\r\n",
    b"Content-Type: multipart/report; report-type=delivery-status; boundary=x\r\n"
    b"From: MAILER-DAEMON@example.com\r\n\r\n--x\r\n\r\nfailed\r\n--x\r\n"
    b"Content-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; a\r\n\r\n"
    b"Final-Recipient: rfc822; x@example.com\r\nAction: failed\r\nStatus: 5.1.1\r\n"
    b"\r\n--x\r\nContent-Type: message/rfc822\r\n\r\nMessage-ID: <o@example.com>\r\n"
    b"Subject: original\r\n\r\nhi\r\n--x--\r\n",
    b"Content-Type: text/plain; charset=utf-8 (comment); format=flowed\r\n"
    b"Content-Transfer-Encoding: quoted-printable (odd)\r\nDate: not a date\r\n"
    b"Message-ID: no-brackets@example.com\r\nIn-Reply-To: <a@b> <c@d>\r\n"
    b"References: =?utf-8?q?<x@y>?=\r\nAuto-Submitted: auto-replied (vacation)\r\n"
    b"Precedence: bulk\r\nList-Id: <l.example.com>\r\n\r\n=C3=A9\r\n",
    b"Subject: folded\r\n  over\r\n\tlines\r\n"
    b'Content-Type: text/plain;\r\n charset="us-ascii"\r\n\r\nx\r\n',
    b"From: \r\nTo: \r\nSubject:\r\nContent-Type:\r\n\r\n",
    b"Content-Type: multipart/digest; boundary=d\r\n\r\n--d\r\n\r\nSubject: in a digest\r\n\r\n"
    b'x\r\n--d\r\nContent-Type: text/plain\r\nContent-Disposition: inline; filename="a b.txt"\r\n'
    b"content-disposition: attachment\r\n\r\ny\r\n--d\r\nContent-Type: foo\r\n"
    b"Content-Disposition: ATTACHMENT; filename*=utf-8''%E2%82%AC.txt\r\n\r\nz\r\n--d--\r\n",
    b"no headers at all",
]


def messages() -> Iterator[tuple[str, bytes, str]]:
    for i, raw in enumerate(HOSTILE):
        yield f"hostile/{i}", raw, ""
        yield f"hostile/{i}/null", raw, "<>"
    maildir = DATA / "bounces-sisimai" / "maildir"
    for path in sorted(maildir.rglob("*.eml")):
        yield f"sisimai/{path.parent.name}/{path.name}", path.read_bytes(), ""
    for m, raw in iter_raw():
        yield f"fedora/{m.number}", raw, "fedora-devel-bounces@redhat.com"


def outcome(raw: bytes, sender: str) -> dict[str, Any]:
    parsed = parse(raw, max_size=10_000_000)
    verdict = classify(
        parsed.msg,
        sender,
        own_addresses={"support@example.com"},
        loop_header="X-Support-Gateway-Loop",
        loop_value={"gw1.example.com"},
        is_own_message_id=lambda mid: mid.endswith("@gw1.example.com>"),
    )
    parts: list[object] = []
    for part in walk_parts(parsed.msg):
        heads = []
        for name in part:
            try:
                value = part[name]
                defects = len(getattr(value, "defects", ()))
                heads.append((name, str(value), type(value).__name__, defects))
            except Exception as exc:  # the policy's parser raising is an outcome too
                heads.append((name, type(exc).__name__, "", 0))
        parts.append(
            (heads, part.get_content_type(), part.get_filename(), part.get_content_charset())
        )
        parts.append([d.__class__.__name__ for d in part.defects])
    try:
        serialised: object = parsed.msg.as_bytes()
    except Exception as exc:
        serialised = type(exc).__name__
    fields = {k: v for k, v in vars(parsed).items() if k != "msg"}
    return {
        "parsed": fields,
        "parts": parts,
        "bytes": serialised,
        "verdict": verdict,
        "bounce": parse_bounce(parsed.msg, sender),
    }


def test_kept_header_objects_change_no_outcome(monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = list(messages())
    assert len(corpus) > 900, "both corpora should be there (tests/data)"
    parse_mod._header_object.cache_clear()
    cached = {key: outcome(raw, sender) for key, raw, sender in corpus}
    assert parse_mod._header_object.cache_info().hits > len(corpus)  # values are shared
    # Before: the plain policy, and every header text read by mailparts' parser.
    monkeypatch.setattr(parse_mod, "_POLICY", email.policy.default.clone(linesep="\r\n"))
    monkeypatch.setattr(parse_mod, "_simple_text", lambda lname, raw: None)
    differ = [key for key, raw, sender in corpus if outcome(raw, sender) != cached[key]]
    assert differ == []


def test_a_header_is_parsed_once_per_distinct_value() -> None:
    raw = b"Content-Type: text/plain; charset=utf-8\r\nSubject: x\r\n\r\nbody\r\n"
    a, b = parse(raw).msg, parse(raw).msg
    assert a["Content-Type"] is b["Content-Type"]
    assert a["Content-Type"].params["charset"] == "utf-8"  # type: ignore[union-attr]
    assert a.policy.linesep == "\r\n"


def test_a_value_the_parser_rejects_raises_on_every_read() -> None:
    """Not cached: each read raises as it did (mailparts falls back to the raw value)."""
    msg = parse(b"To: :;0\r\n\r\nx\r\n").msg
    outcomes = []
    for _ in range(2):
        try:
            outcomes.append(str(msg["To"]))
        except Exception as exc:
            outcomes.append(type(exc).__name__)
    assert outcomes[0] == outcomes[1]


def test_only_short_mime_header_values_are_kept() -> None:
    params = "; ".join(f"p{i}=v{i}" for i in range(40))
    raw = f"Content-Type: text/plain; {params}\r\nSubject: s\r\n\r\nx\r\n".encode()
    msg = parse(raw).msg
    assert msg["Content-Type"] is not msg["Content-Type"]  # long: parsed on each read
    assert msg["Subject"] is not msg["Subject"]  # not a MIME header
    assert msg.get_content_type() == "text/plain"


@given(st.text(alphabet='ab =?qQbB_\t\r\n"<>(),\udcff\u00e9\u3042\x00utf-8', max_size=30))
def test_words_is_decode_words(value: str) -> None:
    assert _words(value) == decode_words(value)


@given(
    st.lists(
        st.sampled_from(["Precedence", "X-Autoreply", "list-id", "Return-Path", "Subject"]),
        max_size=4,
    )
)
def test_clues_values_is_header_values(names: list[str]) -> None:
    raw = "".join(f"{n}: v{i}\r\n" for i, n in enumerate(names)).encode() + b"\r\nx\r\n"
    msg = parse(raw).msg
    clues = Clues(msg, "")
    for name in ["Precedence", "PRECEDENCE", "X-Autoreply", "List-Id", "Auto-Submitted", "Sender"]:
        assert clues.values(name) == header_values(msg, name)


def _policy_text(lname: str, raw: str) -> str | None:
    try:
        return str(email.policy.default.header_fetch_parse(lname, raw))
    except Exception:
        return None  # the parser raised: the shortcut must not have answered


NAMES = ["subject", "message-id", "from", "to", "cc", "reply-to", "sender", "date"]
NAMES += ["references", "in-reply-to", "return-path", "x-anything", "resent-from"]


def test_simple_text_is_the_policy_text_for_every_corpus_header() -> None:
    answered = 0
    for _key, raw, _sender in messages():
        msg = parse(raw, max_size=10_000_000).msg
        for part in walk_parts(msg):
            for name, value in raw_headers(part):
                text = _simple_text(name.lower(), value)
                if text is not None:
                    answered += 1
                    assert text == _policy_text(name.lower(), value), (name, value)
    assert answered > 15000  # most real header values are simple


_ATOM = st.text(alphabet="aZ09", min_size=1, max_size=4)
_LOCAL = st.text(alphabet="aZ09!#$%&'*+/=?^_`{|}~-", min_size=1, max_size=4)
_NOISE = st.sampled_from([*"aZ09 .@<>\"=?-_+'\t,;:()[]\\!#~é\udcff", "\r\n ", "=?a?q?b?="])


@st.composite
def header_values_(draw: st.DrawFn) -> str:
    name = " ".join(draw(st.lists(_ATOM, max_size=3)))
    local = ".".join(draw(st.lists(_LOCAL, min_size=1, max_size=3)))
    domain = ".".join(draw(st.lists(st.text("aZ09-", min_size=1, max_size=4), min_size=1)))
    shapes = [f"{name} <{local}@{domain}>", f'"{name}" <{local}@{domain}>', f"{local}@{domain}"]
    shapes += [
        f"<{local}@{domain}>",
        f"{name}<{local}@{domain}>",
        "Fri, 04 Dec 2026 18:34:00 +0000",
    ]
    shapes += ["4 Dec 2026 18:34 -0500", "Tue, 31 Feb 2026 25:61:61 +9999", "garbage", ""]
    value = draw(st.sampled_from(shapes))
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, len(value)))
        value = value[:at] + draw(_NOISE) + value[at:]
    return value


@given(header_values_(), st.sampled_from(NAMES))
def test_simple_text_is_the_policy_text(value: str, lname: str) -> None:
    text = _simple_text(lname, value)
    if text is not None:
        assert text == _policy_text(lname, value)


def test_readers_answer_as_mailparts_for_every_corpus_message() -> None:
    """And every part presents itself (type, disposition, file name) as its methods say."""
    names = [n.title() for n in NAMES] + ["X-Failed-Recipients", "Auto-Submitted", "Precedence"]
    for _key, raw, _sender in messages():
        msg = parse(raw, max_size=10_000_000).msg
        for part in walk_parts(msg):
            assert parse_mod._presentation(part) == parse_mod._read_presentation(part)
        # The same bytes under the plain policy: mailparts' readers without the shortcut.
        plain = email.message_from_bytes(raw, policy=email.policy.default.clone(linesep="\r\n"))
        for name in names:
            for reader in (
                mailparts.header_text,
                mailparts.header_texts,
                mailparts.header_values,
                mailparts.first_header,
            ):
                assert reader(msg, name) == reader(plain, name), (reader.__name__, name)
            texts = mailparts.header_texts(msg, name)
            pairs = mailparts.address_pairs(texts)
            assert list(parse_mod.address_pairs_of(tuple(texts))) == pairs
