"""What a bounce or report is about (RFC 3464, RFC 5965, RFC 8098, and text bounces)."""

from __future__ import annotations

import email
import email.policy
from email.message import Message

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.pipeline.bounce import BounceInfo, _parse, parse_bounce
from gateway.security.tokens import Signer

signer = Signer(b"secret")
OUR_ID = signer.message_id("mx.support.example.com", 1042)


def parse(text: str) -> Message:
    return email.message_from_string(text, policy=email.policy.default)


DSN = f"""\
From: Mail Delivery System <MAILER-DAEMON@mx.example.org>
To: support@example.com
Subject: Undelivered Mail Returned to Sender
Message-ID: <dsn-1@mx.example.org>
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="B"

--B
Content-Type: text/plain

This is the mail system at host mx.example.org.

--B
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.org

Final-Recipient: rfc822; ok@example.org
Action: delivered
Status: 2.0.0

Final-Recipient: rfc822; Bob@Example.ORG
Original-Recipient: rfc822;bob@example.org
Action: failed
Status: 5.1.1
Diagnostic-Code: smtp; 550 5.1.1 <bob@example.org>: Recipient address
    rejected: User unknown

--B
Content-Type: text/rfc822-headers

From: support@example.com
To: bob@example.org
Subject: [ACME-1042] Printer on fire
Message-ID: {OUR_ID}

--B--
"""


def test_rfc3464_dsn() -> None:
    info = parse_bounce(parse(DSN))
    assert info == BounceInfo(
        kind="dsn",
        original_message_ids=(OUR_ID,),
        failed_recipients=("bob@example.org",),
        status="5.1.1",
        action="failed",
        diagnostic="550 5.1.1 <bob@example.org>: Recipient address rejected: User unknown",
    )
    assert info.permanent
    # The original is ours: it names its ticket.
    assert signer.ticket_from_message_id(info.original_message_ids[0]) == 1042


def test_delayed_dsn_is_not_permanent() -> None:
    text = DSN.replace("Action: failed", "Action: delayed").replace("5.1.1", "4.4.1")
    info = parse_bounce(parse(text))
    assert info is not None
    assert (info.action, info.status, info.permanent) == ("delayed", "4.4.1", False)


def test_original_in_message_rfc822_part() -> None:
    text = DSN.replace("text/rfc822-headers", "message/rfc822").replace(
        "Message-ID: " + OUR_ID + "\n", "Message-ID: " + OUR_ID + "\n\nbody\n"
    )
    info = parse_bounce(parse(text))
    assert info is not None
    assert info.original_message_ids == (OUR_ID,)


ARF = """\
From: abuse@isp.example
To: support@example.com
Subject: FW: Printer on fire
Message-ID: <arf-1@isp.example>
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report; boundary="B"

--B
Content-Type: text/plain

This is an email abuse report.

--B
Content-Type: message/feedback-report

Feedback-Type: abuse
User-Agent: SomeGenerator/1.0
Version: 1
Original-Rcpt-To: <Complainer@isp.example>

--B
Content-Type: message/rfc822

From: support@example.com
To: complainer@isp.example
Message-ID: <orig-7@mx.support.example.com>
Subject: hi

hi
--B--
"""


def test_arf_feedback() -> None:
    info = parse_bounce(parse(ARF))
    assert info is not None
    assert info.kind == "feedback"
    assert info.failed_recipients == ("complainer@isp.example",)
    assert info.original_message_ids == ("<orig-7@mx.support.example.com>",)
    assert info.diagnostic == "abuse"
    assert not info.permanent


MDN = """\
From: bob@example.org
To: support@example.com
Subject: Read: Printer on fire
Message-ID: <mdn-1@example.org>
MIME-Version: 1.0
Content-Type: multipart/report; report-type=disposition-notification; boundary="B"

--B
Content-Type: text/plain

Your message was displayed.

--B
Content-Type: message/disposition-notification

Reporting-UA: mail.example.org; Mailer 1.0
Final-Recipient: rfc822; bob@example.org
Original-Message-ID: <orig-9@mx.support.example.com>
Disposition: manual-action/MDN-sent-manually; displayed

--B--
"""


def test_mdn() -> None:
    info = parse_bounce(parse(MDN))
    assert info is not None
    assert info.kind == "mdn"
    assert info.original_message_ids == ("<orig-9@mx.support.example.com>",)
    assert info.failed_recipients == ()  # the reader did not fail
    assert info.diagnostic == "manual-action/MDN-sent-manually; displayed"


QMAIL = f"""\
From: MAILER-DAEMON@mx4.example.jp
To: support@example.com
Subject: failure notice
Message-ID: <qmail-1@mx4.example.jp>

Hi. This is the qmail-send program at mx4.example.jp.
I'm afraid I wasn't able to deliver your message to the following addresses.
This is a permanent error; I've given up. Sorry it didn't work out.

<kijitora@example.jp>:
192.0.2.153 does not like recipient.
Remote host said: 550 5.1.1 <kijitora@example.jp>... User Unknown
Giving up on 192.0.2.153.

--- Below this line is a copy of the message.

Return-Path: <support@example.com>
From: support@example.com
To: kijitora@example.jp
Message-ID: {OUR_ID}
Subject: hello

hello
"""


def test_qmail_text_bounce() -> None:
    info = parse_bounce(parse(QMAIL), "")
    assert info is not None
    assert info.kind == "heuristic"
    assert info.failed_recipients == ("kijitora@example.jp",)
    assert info.original_message_ids == (OUR_ID,)
    assert info.status == "5.1.1"
    assert info.permanent


EXIM = """\
From: Mail Delivery System <Mailer-Daemon@e1.example.org>
To: support@example.com
Subject: Mail delivery failed: returning message to sender
X-Failed-Recipients: Kijitora@Example.jp
Auto-Submitted: auto-replied
Message-ID: <exim-1@e1.example.org>

This message was created automatically by mail delivery software.

A message that you sent could not be delivered to one or more of its
recipients. This is a permanent error. The following address(es) failed:

  kijitora@example.jp
    SMTP error from remote mail server after RCPT TO:<kijitora@example.jp>:
    550 5.1.1 User unknown

------ This is a copy of the message, including all the headers. ------

Message-ID: <orig-3@mx.support.example.com>
From: support@example.com
To: kijitora@example.jp
"""


def test_exim_text_bounce() -> None:
    info = parse_bounce(parse(EXIM))
    assert info is not None
    assert info.failed_recipients == ("kijitora@example.jp",)
    assert info.original_message_ids == ("<orig-3@mx.support.example.com>",)
    assert info.action == "failed"
    assert info.permanent


def test_in_reply_to_is_the_last_resort_for_the_original() -> None:
    text = """\
From: post_master@vtext.example.com
To: support@example.com
Subject: Re:Test message
In-Reply-To: <orig-5@mx.support.example.com>
Message-ID: <x@vtext.example.com>

Error: Invalid user address
550 - Requested action not taken: no such user here
  RCPT TO: 000000000000@vtext.example.com
"""
    info = parse_bounce(parse(text))
    assert info is not None
    assert info.original_message_ids == ("<orig-5@mx.support.example.com>",)
    assert info.failed_recipients == ("000000000000@vtext.example.com",)


def test_human_mail_is_not_a_bounce() -> None:
    text = """\
From: Alice <alice@customer.example>
To: support@example.com
Subject: Delivery failure of my parcel
Message-ID: <a@customer.example>
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="B"

--B
Content-Type: text/plain

My parcel was not delivered, see the attached mail from the shop.

--B
Content-Type: message/rfc822

From: shop@shop.example
Message-ID: <shop-1@shop.example>
Subject: Your order

Your parcel could not be delivered.
--B--
"""
    assert parse_bounce(parse(text)) is None
    assert parse_bounce(parse(text), "alice@customer.example") is None


def test_auto_reply_is_not_a_bounce() -> None:
    text = """\
From: bob@example.org
To: support@example.com
Subject: Automatic reply: Printer on fire
Auto-Submitted: auto-replied

I am out of the office until Monday.
"""
    assert parse_bounce(parse(text), "") is None


def test_permanent_property() -> None:
    base = BounceInfo("dsn", (), (), None, None, None)
    assert not base.permanent
    assert BounceInfo("dsn", (), (), "5.7.1", None, None).permanent
    assert BounceInfo("dsn", (), (), None, "failed", None).permanent
    assert not BounceInfo("dsn", (), (), "4.2.2", "delayed", None).permanent


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=400), st.sampled_from(["delivery-status", "feedback-report", "x"]))
def test_garbage_reports_never_raise(garbage: bytes, rtype: str) -> None:
    raw = (
        b"From: MAILER-DAEMON@x.example\nSubject: failure notice\n"
        b"Content-Type: multipart/report; report-type=" + rtype.encode() + b'; boundary="B"\n\n'
        b"--B\nContent-Type: message/" + rtype.encode() + b"\n\n" + garbage + b"\n--B--\n"
    )
    for policy in (email.policy.default, email.policy.compat32):
        msg = email.message_from_bytes(raw, policy=policy)
        info = _parse(msg, None)  # the unguarded core: must not raise either
        assert info == parse_bounce(msg)
        assert info is None or isinstance(info, BounceInfo)
        if info is not None:
            assert all(r == r.lower() for r in info.failed_recipients)
            assert all(i.startswith("<") and i.endswith(">") for i in info.original_message_ids)
