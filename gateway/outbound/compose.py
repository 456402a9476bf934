"""Former home of letter composition, kept so existing imports keep working.

Every letter is composed in :mod:`gateway.letters` now (docs/templates.md): the headers in
``gateway.letters.headers``, the acknowledgement in ``gateway.letters.ack``, notices to
staff in ``gateway.letters.notification``. New code imports from there.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from gateway.letters import i18n
from gateway.letters.ack import (
    MIN_HISTORY,
    AckContent,
    ResponseStats,
    compose_ack,
    render_ack_text,
    response_stats,
)
from gateway.letters.facts import isoz
from gateway.letters.headers import LOOP_HEADER, tagged_subject
from gateway.letters.notification import compose_notification
from gateway.sla.business_time import BusinessCalendar

__all__ = [
    "LOOP_HEADER",
    "MIN_HISTORY",
    "AckContent",
    "ResponseStats",
    "compose_ack",
    "compose_notification",
    "describe_size",
    "format_local",
    "format_offset",
    "isoz",
    "render_ack_text",
    "response_stats",
    "tagged_subject",
]


def format_local(dt: datetime, calendar: BusinessCalendar) -> str:
    """E.g. "Monday 23 November 2026, 14:00 CET (Europe/Berlin)"."""
    return i18n.format_local(dt, calendar)


def format_offset(dt: datetime, offset: timedelta) -> str:
    """E.g. "Monday 23 November 2026, 08:00 UTC-05:00"."""
    return i18n.format_offset(dt, offset)


def describe_size(size: int) -> str:
    return i18n.describe_size(size)
