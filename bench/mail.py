"""The customer's message the benches send: one new customer's first mail to support.

Shared by bench/e2e.py (over SMTP), bench/pipeline.py (straight into the spool) and
bench/parse_classify.py, so that every figure is about the same mail.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime


def customer_message(n: int, addr: str) -> bytes:
    """Customer `n`'s plain-text request from `addr` (a fresh Message-ID each call)."""
    return (
        f"From: Customer {n} <{addr}>\r\nTo: support@example.com\r\n"
        f"Subject: printer on fire, case {n}\r\n"
        f"Message-ID: <e2e.{n}.{uuid.uuid4().hex}@customer.example>\r\n"
        f"Date: {datetime.now(UTC):%a, %d %b %Y %H:%M:%S +0000}\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        "Hello,\r\n\r\nour printer shows error 42 since this morning. Please help.\r\n\r\n"
        f"Customer {n}\r\n"
    ).encode()
