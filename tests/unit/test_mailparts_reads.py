"""Header reads remembered per message (gateway/pipeline/mailparts.py) follow changes."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage

from gateway.pipeline import mailparts

RAW = (
    b"From: Pat <pat@customer.example>\r\nTo: support@example.com\r\n"
    b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\nList-Id: <news.example>\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
    b"--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b\r\n\r\nno type\r\n--b--\r\n"
)


def parsed() -> EmailMessage:
    msg = email.message_from_bytes(RAW, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def test_reads_are_the_same_the_second_time_and_callers_may_change_them() -> None:
    msg = parsed()
    first = mailparts.header_values(msg, "Subject")
    assert first == ["Grüße"]
    first.append("changed by a caller")
    assert mailparts.header_values(msg, "subject") == ["Grüße"]
    assert mailparts.header_text(msg, "From") == "Pat <pat@customer.example>"
    assert mailparts.header_texts(msg, "List-Id") == ["<news.example>"]
    assert mailparts.content_type(msg) == "multipart/mixed"


def test_a_changed_header_is_read_again() -> None:
    msg = parsed()
    assert mailparts.header_values(msg, "List-Id") == ["<news.example>"]
    del msg["List-Id"]
    assert mailparts.header_values(msg, "List-Id") == []
    msg["List-Id"] = "<other.example>"
    assert mailparts.header_values(msg, "List-Id") == ["<other.example>"]
    msg.replace_header("List-Id", "<third.example>")
    assert mailparts.header_texts(msg, "List-Id") == ["<third.example>"]


def test_a_part_without_content_type_follows_its_default_type() -> None:
    _, untyped = parsed().iter_parts()
    assert mailparts.content_type(untyped) == "text/plain"
    untyped.set_default_type("message/rfc822")  # as inside a multipart/digest
    assert mailparts.content_type(untyped) == "message/rfc822"
    untyped["Content-Type"] = "image/png"
    assert mailparts.content_type(untyped) == "image/png"
