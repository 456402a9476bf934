"""One duration grammar for rules, email commands and the CLI (docs/decisions.md D11, item 9).

``#snooze 2d`` used to mean 48 clock hours while ``resolution = "2d"`` in the rules meant
two *working* days: the same two characters, two meanings, depending on where they were
typed. Now every duration is read here and means one thing (docs/rules.md "Durations"):

- grammar: one or more ``<number><unit>`` groups, units ``d``, ``h``, ``m``, ``s`` in that
  order, each at most once, spaces allowed between groups, case-insensitive: ``"90s"``,
  ``"30m"``, ``"4h"``, ``"2d"``, ``"1h30m"``, ``"1d 4h"``. No fractions, no signs, no ``w``
  (write ``5d`` for a working week of a Monday-Friday calendar);
- meaning: **business time in a calendar**. ``h``, ``m``, ``s`` are open hours, minutes and
  seconds; a ``d`` is one working day of that calendar (its usual daily opening,
  ``BusinessCalendar.day``). In a 24x7 calendar that is plain clock time.

Which calendar: the SLA policy's for rules (deadlines, ladder steps); the ticket's policy
calendar for ``#snooze`` and per ticket for ``sla upcoming --within``. Where there is no
calendar (``sla upcoming`` without rules) a day is 24 hours.

`parse` is pure and keeps the units apart (`Duration`); `Duration.business` turns it into a
budget of business time for a calendar's day length and `Duration.after` adds it to a moment
in a calendar (``BusinessCalendar.add``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.sla.business_time import BusinessCalendar

__all__ = ["Duration", "parse"]

_GRAMMAR = re.compile(
    r"(?:(?P<d>\d+)\s*d)?\s*(?:(?P<h>\d+)\s*h)?\s*(?:(?P<m>\d+)\s*m)?\s*(?:(?P<s>\d+)\s*s)?"
)
#: A plain day where no calendar says otherwise.
CLOCK_DAY = timedelta(days=1)


@dataclass(frozen=True)
class Duration:
    """A parsed duration: working days and business seconds, kept apart until a calendar
    says how long its working day is."""

    days: int = 0
    seconds: int = 0
    text: str = ""

    def business(self, day: timedelta = CLOCK_DAY) -> timedelta:
        """The business time this duration is worth when one working day lasts `day`."""
        return day * self.days + timedelta(seconds=self.seconds)

    def after(self, start: datetime, calendar: BusinessCalendar | None) -> datetime:
        """The moment this much business time after `start` in `calendar` (clock time when
        there is no calendar)."""
        if calendar is None:
            return start + self.business()
        return calendar.add(start, self.business(calendar.day))

    def is_zero(self) -> bool:
        return self.days == 0 and self.seconds == 0


def parse(text: object) -> Duration:
    """Read a duration (module docstring); ValueError saying what is accepted otherwise."""
    if not isinstance(text, str):
        raise ValueError(f'duration must be a string like "4h", got {text!r}')
    stripped = text.strip().lower()
    match = _GRAMMAR.fullmatch(stripped)
    if not stripped or match is None or not any(match.groupdict().values()):
        raise ValueError(
            f'bad duration "{text}": use a number with a unit s, m, h or d, e.g. "4h", "30m", '
            '"2d" or "1h30m" (d = working days of the calendar)'
        )
    n = {k: int(v) if v else 0 for k, v in match.groupdict().items()}
    seconds = n["h"] * 3600 + n["m"] * 60 + n["s"]
    return Duration(days=n["d"], seconds=seconds, text=re.sub(r"\s+", "", stripped))
