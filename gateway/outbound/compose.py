"""Former home of letter composition; what is left here keeps the escalator's imports working.

Every letter is composed in :mod:`gateway.letters` now (docs/templates.md): the headers in
``gateway.letters.headers``, the acknowledgement in ``gateway.letters.ack``, notices to
staff in ``gateway.letters.notification``. New code imports from there; this module goes
once ``gateway.sla.escalator`` imports from ``gateway.letters`` too.
"""

from __future__ import annotations

from datetime import datetime

from gateway.letters import i18n
from gateway.letters.notification import compose_notification
from gateway.sla.business_time import BusinessCalendar

__all__ = ["compose_notification", "format_local"]


def format_local(dt: datetime, calendar: BusinessCalendar) -> str:
    """E.g. "Monday 23 November 2026, 14:00 CET (Europe/Berlin)"."""
    return i18n.format_local(dt, calendar)
