"""Robot detection and bounce parsing against real mail nobody here wrote.

Corpus: sisimai "set-of-emails" (BSD 2-clause), ``tests/data/bounces-sisimai/maildir``:
``bsd/`` holds 629 bounces, auto-replies and feedback reports from dozens of MTAs; ``not/``
holds messages that are not bounces. No per-file answers are encoded here: every file must
pass the same rules, and the shares below are thresholds under what was measured
(see the printed summary, ``pytest -n 0 -s``).

Measured when written (Python 3.11, email.policy.default):
* null envelope sender: 629/629 not acknowledged;
* From as envelope sender (content alone): 628/629 not acknowledged, 615/629 recognised as
  bounce/report; the one acknowledged is a person forwarding a bounce ("Fwd: Returned mail"),
  which a support desk should answer;
* parse_bounce(msg, "") on the 616 files classified bounce/report with a null sender: all
  parsed, 610/616 give a failed recipient or an original Message-ID (597 a recipient, 519 a
  Message-ID, 468 a status); parse_bounce(msg) from content alone: 615/629;
* email.policy.compat32 gives the same kinds and the same parse results.
"""

from __future__ import annotations

import email
import email.policy
import os
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from email.utils import getaddresses
from pathlib import Path

import pytest

from gateway.pipeline.bounce import BounceInfo, parse_bounce
from gateway.pipeline.classify import RobotVerdict, classify

# One worker parses the corpus once for all the tests below (the module-scoped `results`).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("bounce_corpus")]

CORPUS = (
    Path(os.environ.get("GATEWAY_CORPORA", Path(__file__).resolve().parents[1] / "data"))
    / "bounces-sisimai"
    / "maildir"
)


def load(path: Path) -> Message:
    raw = path.read_bytes()
    try:
        return email.message_from_bytes(raw, policy=email.policy.default)
    except Exception:
        return email.message_from_bytes(raw, policy=email.policy.compat32)


def first_address(msg: Message, header: str) -> str:
    try:
        values = [str(v) for v in msg.get_all(header) or []]
        pairs = getaddresses(values)
    except Exception:
        return ""
    return next((addr for _, addr in pairs if addr), "")


@dataclass(frozen=True)
class Result:
    name: str
    null_sender: RobotVerdict
    from_sender: RobotVerdict
    bounce: BounceInfo | None  # parse_bounce(msg): content alone
    bounce_null: BounceInfo | None  # parse_bounce(msg, ""): as received with MAIL FROM:<>


@pytest.fixture(scope="module")
def results() -> list[Result]:
    files = sorted((CORPUS / "bsd").glob("*.eml"))
    if not files:
        pytest.skip(f"corpus not found at {CORPUS} (set GATEWAY_CORPORA)")
    out = []
    for path in files:
        msg = load(path)
        out.append(
            Result(
                name=path.name,
                null_sender=classify(msg, ""),
                from_sender=classify(msg, first_address(msg, "From")),
                bounce=parse_bounce(msg),
                bounce_null=parse_bounce(msg, ""),
            )
        )
    return out


def share(part: int, whole: int) -> str:
    return f"{part}/{whole} ({100 * part / max(whole, 1):.1f}%)"


def test_corpus_is_complete(results: list[Result]) -> None:
    assert len(results) == 629


def test_no_classifier_errors(results: list[Result]) -> None:
    errors = [
        r.name
        for r in results
        for v in (r.null_sender, r.from_sender)
        if any(reason.startswith("classifier error") for reason in v.reasons)
    ]
    assert errors == []


def test_every_file_is_a_robot_with_a_null_envelope_sender(results: list[Result]) -> None:
    acked = [r.name for r in results if r.null_sender.may_acknowledge]
    print(
        f"\nnull envelope sender: not acknowledged {share(len(results) - len(acked), len(results))}"
    )
    assert acked == []


def test_content_alone_recognises_robots_and_bounces(results: list[Result]) -> None:
    total = len(results)
    acked = [r for r in results if r.from_sender.may_acknowledge]
    reports = [r for r in results if r.from_sender.kind in ("bounce", "report")]
    kinds: dict[str, int] = {}
    for r in results:
        kinds[r.from_sender.kind] = kinds.get(r.from_sender.kind, 0) + 1
    summary = (
        f"From as envelope sender: not acknowledged {share(total - len(acked), total)}, "
        f"bounce/report {share(len(reports), total)}, kinds {dict(sorted(kinds.items()))}, "
        f"acknowledged: {[r.name for r in acked]}"
    )
    print("\n" + summary)
    # Measured 628/629 and 615/629.
    assert total - len(acked) >= 0.995 * total, summary
    assert len(reports) >= 0.96 * total, summary


def test_auto_replies_are_auto_replies_not_bounces(results: list[Result]) -> None:
    # The corpus's rfc3834-* files are vacation responders (by its own naming scheme).
    replies = [r for r in results if r.name.startswith("rfc3834")]
    assert replies
    for r in replies:
        assert r.from_sender.kind == "auto_reply", (r.name, r.from_sender)
        assert r.bounce is None, r.name


def test_parse_bounce_finds_what_bounced(results: list[Result]) -> None:
    bounces = [r for r in results if r.null_sender.kind in ("bounce", "report")]
    infos = [r.bounce_null for r in bounces if r.bounce_null is not None]
    useful = [i for i in infos if i.failed_recipients or i.original_message_ids]
    with_rcpt = [i for i in infos if i.failed_recipients]
    with_ids = [i for i in infos if i.original_message_ids]
    with_status = [i for i in infos if i.status]
    content_only = [r for r in results if r.bounce is not None]
    summary = (
        f"parse_bounce on {len(bounces)} bounce/report files (null sender): "
        f"parsed {share(len(infos), len(bounces))}, "
        f"recipient or Message-ID {share(len(useful), len(bounces))}, "
        f"recipient {share(len(with_rcpt), len(bounces))}, "
        f"Message-ID {share(len(with_ids), len(bounces))}, "
        f"status {share(len(with_status), len(bounces))}; "
        f"parse_bounce without envelope: {share(len(content_only), len(results))} parsed"
    )
    print("\n" + summary)
    assert len(infos) == len(bounces), summary  # classify and parse_bounce agree
    assert len(useful) >= 0.97 * len(bounces), summary
    assert len(content_only) >= 0.96 * len(results), summary
    for info in infos:
        assert all(a == a.lower() and "@" in a for a in info.failed_recipients), info
        assert all(i.startswith("<") and i.endswith(">") for i in info.original_message_ids)
    # Nothing that classify calls a non-bounce is parsed as one.
    for r in results:
        if r.null_sender.kind not in ("bounce", "report"):
            assert r.bounce_null is None, r.name


def test_dsn_fields_are_consistent(results: list[Result]) -> None:
    dsns = [r.bounce for r in results if r.bounce is not None and r.bounce.kind == "dsn"]
    assert len(dsns) >= 300
    for info in dsns:
        if info.status is not None:
            assert info.status[0] in "245"
            assert info.status.count(".") == 2
        assert info.action in (None, "failed", "delayed", "delivered", "relayed", "expanded")
    permanent = sum(info.permanent for info in dsns)
    print(f"\nRFC 3464 DSNs: {len(dsns)}, permanent {share(permanent, len(dsns))}")
    assert permanent >= 0.8 * len(dsns)


def test_messages_that_are_not_bounces(results: list[Result]) -> None:
    files = sorted((CORPUS / "not").glob("*.eml"))
    assert files
    for path in files:
        msg = load(path)
        return_path = [str(v) for v in msg.get_all("Return-Path") or []]
        envelope = first_address(msg, "Return-Path")
        verdict = classify(msg, envelope)
        if any(v.strip() == "<>" for v in return_path):
            # Declares itself machine mail (null reverse-path): never acknowledged.
            assert not verdict.may_acknowledge, path.name
        else:
            # Ordinary mail, even with a message/rfc822 attachment: a person, not a bounce.
            assert verdict.is_human, (path.name, verdict)
            assert parse_bounce(msg, envelope) is None, path.name


def test_compat32_parses_give_the_same_answers(results: list[Result]) -> None:
    by_name = {r.name: r for r in results}
    for path in sorted((CORPUS / "bsd").glob("*.eml")):
        msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.compat32)
        expected = by_name[path.name]
        # Reason wording may differ (an undecodable raw subject), the verdict may not.
        assert classify(msg, "").kind == expected.null_sender.kind, path.name
        assert parse_bounce(msg, "") == expected.bounce_null, path.name


def _stdlib(read: Callable[[], object]) -> object:
    try:
        return read()
    except Exception as exc:  # the email package's parsers raise almost anything
        return type(exc)


def test_content_type_and_headers_answer_as_the_email_package_does() -> None:
    """mailparts keeps a part's content type per raw Content-Type value, and a header's
    text per raw value (each is read many times per message); on every part of the
    corpus, under both policies, inside attached messages too, they must say what
    `get_content_type()` and `get_all()` say, and fail where they fail."""
    from gateway.pipeline.mailparts import _all_parsed, content_type, header_text, iter_parts

    checked = 0
    for path in sorted((CORPUS / "bsd").glob("*.eml")) + sorted((CORPUS / "not").glob("*.eml")):
        raw = path.read_bytes()
        for policy in (email.policy.default, email.policy.compat32):
            msg = email.message_from_bytes(raw, policy=policy)
            for part in iter_parts(msg, into_messages=True):
                try:
                    expected = part.get_content_type().lower()
                except Exception:
                    expected = "text/plain"
                assert content_type(part) == expected, (path.name, part.get("Content-Type"))
                for name in {k.lower() for k, _ in part.raw_items()}:
                    want = _stdlib(lambda p=part, n=name: [str(v) for v in p.get_all(n) or []])
                    assert _stdlib(lambda p=part, n=name: _all_parsed(p, n)) == want, (
                        path.name,
                        name,
                    )
                    first = _stdlib(lambda p=part, n=name: str(p.get(n)))
                    if isinstance(first, str):
                        assert header_text(part, name) == first, (path.name, name)
                checked += 1
    assert checked > 2000
