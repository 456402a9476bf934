"""Robot detection (docs/design.md §3, RFC 3834): who must never get an acknowledgement."""

from __future__ import annotations

import email
import email.policy
from email.message import Message

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.pipeline.classify import KINDS, RobotVerdict, classify
from gateway.security.tokens import Signer

CUSTOMER = "alice@customer.example"


def mail(headers: str = "", body: str = "Hello, my printer is on fire.\n", **kw: str) -> Message:
    base = {
        "From": f"Alice <{CUSTOMER}>",
        "To": "support@example.com",
        "Subject": "Printer on fire",
        "Message-ID": "<abc@customer.example>",
    }
    base.update({k.replace("_", "-"): v for k, v in kw.items()})
    text = "".join(f"{k}: {v}\n" for k, v in base.items()) + headers + "\n" + body
    return email.message_from_string(text, policy=email.policy.default)


def verdict(msg: Message, sender: str = CUSTOMER, **kw: object) -> RobotVerdict:
    return classify(msg, sender, **kw)  # type: ignore[arg-type]


def test_plain_customer_mail_is_human() -> None:
    v = verdict(mail())
    assert v == RobotVerdict("human", ())
    assert v.is_human
    assert v.may_acknowledge


@pytest.mark.parametrize("sender", ["", "<>", " <> "])
def test_null_envelope_sender(sender: str) -> None:
    v = verdict(mail(), sender)
    assert v.kind == "robot"
    assert not v.may_acknowledge
    assert "null envelope sender" in v.reasons


def test_return_path_null() -> None:
    v = verdict(mail("Return-Path: <>\n"))
    assert v.kind == "robot"
    assert "Return-Path: <>" in v.reasons


@pytest.mark.parametrize(
    ("value", "kind", "reason"),
    [
        ("auto-replied", "auto_reply", "Auto-Submitted: auto-replied"),
        ("Auto-Replied", "auto_reply", "Auto-Submitted: auto-replied"),
        ("auto-generated", "robot", "Auto-Submitted: auto-generated"),
        ("auto-notified", "robot", "Auto-Submitted: auto-notified"),
        ("auto-replied (zimbra; vacation)", "auto_reply", "Auto-Submitted: auto-replied"),
        ("auto-generated; owner-email=x@y", "robot", "Auto-Submitted: auto-generated"),
        ("", "robot", "Auto-Submitted: (empty)"),
    ],
)
def test_auto_submitted(value: str, kind: str, reason: str) -> None:
    v = verdict(mail(f"Auto-Submitted: {value}\n"))
    assert v.kind == kind
    assert reason in v.reasons


@pytest.mark.parametrize("value", ["no", "No", "NO", " no (a person wrote this)", "no; x=y"])
def test_auto_submitted_no_is_a_human(value: str) -> None:
    # FreeScout treats any Auto-Submitted header as a robot; RFC 3834 §5 says "no" is human.
    assert verdict(mail(f"Auto-Submitted: {value}\n")).is_human


def test_every_auto_submitted_instance_counts() -> None:
    v = verdict(mail("Auto-Submitted: no\nAuto-Submitted: auto-generated\n"))
    assert v.kind == "robot"


@pytest.mark.parametrize(
    ("value", "kind"),
    [("bulk", "bulk"), ("junk", "bulk"), ("list", "list"), ("auto_reply", "auto_reply")],
)
def test_precedence(value: str, kind: str) -> None:
    v = verdict(mail(f"Precedence: {value}\n"))
    assert v.kind == kind
    assert f"Precedence: {value}" in v.reasons


def test_precedence_every_instance_and_comments() -> None:
    v = verdict(mail("Precedence: first-class\nPrecedence: Bulk (newsletter)\n"))
    assert v.kind == "bulk"
    assert verdict(mail("Precedence: first-class\n")).is_human


@pytest.mark.parametrize(
    "header",
    [
        "List-Id: <fedora-devel.lists.fedoraproject.org>",
        "List-Unsubscribe: <mailto:leave@example.org>",
        "List-Post: <mailto:list@example.org>",
        "X-Mailing-List: linux-kernel@vger.kernel.org",
        "Mailing-List: contact list-help@example.org; run by ezmlm",
    ],
)
def test_list_headers(header: str) -> None:
    v = verdict(mail(header + "\n"))
    assert v.kind == "list"
    assert not v.may_acknowledge


@pytest.mark.parametrize("value", ["All", "OOF", "AutoReply", "DR, NDR, RN, NRN, OOF, AutoReply"])
def test_x_auto_response_suppress(value: str) -> None:
    v = verdict(mail(f"X-Auto-Response-Suppress: {value}\n"))
    assert not v.may_acknowledge
    assert any(r.startswith("X-Auto-Response-Suppress") for r in v.reasons)


def test_x_auto_response_suppress_other_values_are_human() -> None:
    assert verdict(mail("X-Auto-Response-Suppress: DR, RN\n")).is_human


@pytest.mark.parametrize(
    ("address", "local"),
    [
        ("MAILER-DAEMON@mx.example.org", "mailer-daemon"),
        ("postmaster@example.org", "postmaster"),
        ("listserv@lists.example.org", "listserv"),
        ("majordomo@example.org", "majordomo"),
        ("fedora-devel-request@example.org", "fedora-devel-request"),
        ("owner-fedora-devel@example.org", "owner-fedora-devel"),
        ("no-reply@shop.example", "no-reply"),
        ("noreply@shop.example", "noreply"),
        ("do-not-reply@shop.example", "do-not-reply"),
        ("donotreply@shop.example", "donotreply"),
        ("accounts-noreply@shop.example", "accounts-noreply"),
        ("NoReply+tag@shop.example", "noreply"),
    ],
)
def test_system_local_parts(address: str, local: str) -> None:
    # In the envelope ...
    v = verdict(mail(), address)
    assert v.kind == "robot", v
    assert f"local part {local!r}" in v.reasons
    # ... and in From.
    v = verdict(mail(From=address))
    assert not v.may_acknowledge
    assert f"local part {local!r}" in v.reasons


@pytest.mark.parametrize(
    "address", ["post@example.org", "requests@example.org", "noreplyguy@example.org"]
)
def test_similar_local_parts_are_human(address: str) -> None:
    assert verdict(mail(From=address), address).is_human


def test_own_address_is_a_loop() -> None:
    own = ["support@example.com", "billing@example.com"]
    v = verdict(mail(From="Support <Support@Example.COM>"), "x@y.example", own_addresses=own)
    assert v.kind == "loop"
    assert any("From sender is our own address" in r for r in v.reasons)
    v = verdict(mail(), "support+1abc@example.com", own_addresses=own)
    assert v.kind == "loop"
    assert verdict(mail(), own_addresses=own).is_human


def test_own_domain_is_a_loop() -> None:
    v = verdict(mail(), "bounces@mx.support.example.com", own_domains=["mx.support.example.com"])
    assert v.kind == "loop"


def test_loop_header() -> None:
    assert verdict(mail("X-Support-Gateway-Loop: yes\n")).kind == "loop"
    v = verdict(mail("X-Support-Gateway-Loop: abc\n"), loop_value="abc")
    assert v.kind == "loop"
    # Another installation's loop header: still never answered, but not "our" loop.
    v = verdict(mail("X-Support-Gateway-Loop: other\n"), loop_value="abc")
    assert v.kind == "robot"
    assert "foreign X-Support-Gateway-Loop header" in v.reasons
    assert verdict(mail("X-Gw: 1\n"), loop_header="X-Gw").kind == "loop"


def test_own_signed_message_id_is_a_loop() -> None:
    signer = Signer(b"secret")
    mid = signer.message_id("mx.example.com", 5)

    def ours(value: str) -> bool:
        return signer.verify_message_id(value) is not None

    assert verdict(mail(Message_ID=mid), is_own_message_id=ours).kind == "loop"
    forged = "<g1.msg.5.aaaaaaaaaaaaaaaa.aaaaaaaaaaaaaaaa@mx.example.com>"
    assert verdict(mail(Message_ID=forged), is_own_message_id=ours).is_human


REPORT = """\
From: Mail Delivery System <MAILER-DAEMON@mx.example.org>
To: support@example.com
Subject: Undelivered Mail Returned to Sender
Message-ID: <report@mx.example.org>
MIME-Version: 1.0
Content-Type: multipart/report; report-type={rtype}; boundary="B"

--B
Content-Type: text/plain

Something happened.

--B
Content-Type: message/{rtype}

Reporting-MTA: dns; mx.example.org

Final-Recipient: rfc822; bob@example.org
Action: failed
Status: 5.1.1

--B--
"""


@pytest.mark.parametrize(
    ("rtype", "kind"),
    [
        ("delivery-status", "bounce"),
        ("disposition-notification", "report"),
        ("feedback-report", "report"),
    ],
)
def test_multipart_report(rtype: str, kind: str) -> None:
    msg = email.message_from_string(REPORT.format(rtype=rtype), policy=email.policy.default)
    # Even with a (forged) human envelope sender the content says what it is.
    v = verdict(msg, "bob@example.org")
    assert v.kind == kind
    assert any(r.startswith(f"multipart/report; report-type={rtype}") for r in v.reasons)


@pytest.mark.parametrize(
    ("sender", "subject", "body"),
    [
        (
            "MAILER-DAEMON@mx.example.jp",
            "failure notice",
            "Hi. This is the qmail-send program at mx.example.jp.\n",
        ),
        ("Mailer-Daemon@example.org", "Mail delivery failed: returning message to sender", "x"),
        ("mailer-daemon@googlemail.com", "Delivery Status Notification (Failure)", "x"),
        ("postmaster@example.com", "Undeliverable: Hello", "x"),
        ("MAILER-DAEMON@example.org", "Returned mail: see transcript for details", "x"),
        ("MAILER-DAEMON@example.org", "Hello", "I'm sorry, user unknown.\n"),
    ],
)
def test_non_standard_bounces(sender: str, subject: str, body: str) -> None:
    v = verdict(mail(From=sender, Subject=subject, body=body), sender)
    assert v.kind == "bounce", v


def test_bounce_subject_alone_from_a_person_is_human() -> None:
    # "Delivery failure" is also what a customer writes about a parcel.
    for subject in ["Delivery failure", "Failure notice", "Mail delivery failed"]:
        assert verdict(mail(Subject=subject)).is_human
    assert verdict(mail(Subject="Fwd: Returned mail: see transcript for details")).is_human


def test_x_failed_recipients_is_a_bounce() -> None:
    v = verdict(mail("X-Failed-Recipients: bob@example.org\n"))
    assert v.kind == "bounce"


@pytest.mark.parametrize(
    "headers",
    [
        "X-Autoreply: yes\n",
        "X-Autorespond: Vacation\n",
        "X-Auto-Reply: yes\n",
        "X-MS-Exchange-Inbox-Rules-Loop: alice@customer.example\n",
        "X-MS-Exchange-Generated-Message-Source: Mailbox Rules Agent\n",
        "X-Apple-Action: VACATION\n",
        "Auto-Submitted: auto-replied (zimbra; vacation)\n",
    ],
)
def test_out_of_office_headers(headers: str) -> None:
    v = verdict(mail(headers))
    assert v.kind == "auto_reply", v


@pytest.mark.parametrize(
    "subject",
    [
        "Out of Office: Printer on fire",
        "Automatic reply: Printer on fire",
        "Autoreply: Printer on fire",
        "Auto-Reply: Printer on fire",
        "Abwesenheitsnotiz: Printer on fire",
        "Réponse automatique : Printer on fire",
        "=?UTF-8?Q?R=C3=A9ponse_automatique_:_x?=",
        "Out of office",
    ],
)
def test_out_of_office_subjects(subject: str) -> None:
    assert verdict(mail(Subject=subject)).kind == "auto_reply"


def test_people_writing_about_being_away_are_human() -> None:
    assert verdict(mail(Subject="Out of office next week, please call")).is_human
    assert verdict(mail(Subject="Re: automatic replies are broken")).is_human


def test_precedence_order_and_all_reasons_collected() -> None:
    msg = mail(
        "Auto-Submitted: auto-replied\nPrecedence: bulk\nList-Id: <x.example.org>\n"
        "X-Support-Gateway-Loop: yes\n",
        From="noreply@example.org",
    )
    v = verdict(msg, "")
    assert v.kind == "loop"
    for reason in [
        "our loop header X-Support-Gateway-Loop",
        "null envelope sender",
        "Auto-Submitted: auto-replied",
        "Precedence: bulk",
        "List-Id header",
        "local part 'noreply'",
    ]:
        assert reason in v.reasons
    assert verdict(mail("Auto-Submitted: auto-replied\nPrecedence: list\n")).kind == "auto_reply"
    assert verdict(mail("Precedence: list\n"), "").kind == "list"
    assert verdict(mail("Precedence: bulk\nList-Id: <a.b>\n")).kind == "list"


def test_malformed_and_non_ascii_headers_never_raise() -> None:
    raw = (
        b"From: =?utf-8?b?!!!?= <\xff\xfe@@>\n"
        b"To: ,,,<<>>\n"
        b"Subject: =?unknown-8bit?q?=FF?=\n"
        b"Auto-Submitted: (unclosed comment\n"
        b"Precedence: \xe9\n"
        b"Return-Path: <<<\n"
        b"Content-Type: multipart/report; report-type=\n"
        b"\n\xff\xfe"
    )
    for policy in (email.policy.default, email.policy.compat32):
        msg = email.message_from_bytes(raw, policy=policy)
        v = classify(msg, "\udcff@\x00")
        assert v.kind in KINDS
        assert not any(r.startswith("classifier error") for r in v.reasons), v
        assert not v.may_acknowledge  # Auto-Submitted present and not "no"


header_names = st.sampled_from(
    [
        "From",
        "Return-Path",
        "Auto-Submitted",
        "Precedence",
        "Subject",
        "X-Auto-Response-Suppress",
        "Content-Type",
        "List-Id",
        "Sender",
        "Message-ID",
        "X-Autoreply",
    ]
)
header_text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\r\n"),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(header_names, header_text), max_size=8), st.text(max_size=100))
def test_fuzzed_headers_never_break_the_classifier(
    headers: list[tuple[str, str]], sender: str
) -> None:
    raw = "".join(f"{name}: {value}\n" for name, value in headers) + "\nbody\n"
    for policy in (email.policy.default, email.policy.compat32):
        msg = email.message_from_bytes(raw.encode("utf-8", "surrogateescape"), policy=policy)
        v = classify(msg, sender)
        assert v.kind in KINDS
        assert not any(r.startswith("classifier error") for r in v.reasons), (raw, v)
        assert v.may_acknowledge == (v.kind == "human")
