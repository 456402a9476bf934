"""Business-time arithmetic: calendars with an IANA time zone, weekly hours and holidays.

SLA clocks run only while the support team is open (docs/design.md §7). A `BusinessCalendar`
answers four questions about instants: is it open, when does it next open, what instant lies a
given amount of business time after another, and how much business time lies between two.

Everything here is pure: no clock reads, no I/O. Inputs must be timezone-aware datetimes and
every result is an aware UTC datetime. Opening hours are written in the calendar's local time
and converted through `zoneinfo`, so DST changes are honoured: on the night Europe/Berlin
springs forward a 24x7 day lasts 23 real hours, and business time is always *real* elapsed time
while open (a deadline two open hours away is two hours of wall time away, never one or three).

Reference vectors from Request Tracker's `t/sla/timezone.t` (see docs/design.md §7): created
2007-01-01T22:00Z, 2 business hours, Mon-Fri 09:00-17:00 America/New_York -> 2007-01-02T15:00Z;
the same in Europe/Moscow -> opens 06:00Z, due 08:00Z. Both are unit tests.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import holidays as holidays_lib

from gateway.sla import durations

__all__ = [
    "DAY_NAMES",
    "BusinessCalendar",
    "DayHours",
    "WeeklyHours",
    "day_indexes",
    "parse_day",
    "parse_duration",
    "parse_holiday_dates",
    "parse_hours",
    "parse_timezone",
    "public_holidays",
]

DAY_NAMES: tuple[str, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_DAY_LABELS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MINUTES_PER_DAY = 24 * 60

#: One day's opening: (start, end) in minutes after local midnight, sorted, non-overlapping;
#: end may be 1440 (24:00, i.e. the next local midnight).
DayHours = tuple[tuple[int, int], ...]
#: Monday-first opening hours for the seven weekdays.
WeeklyHours = tuple[DayHours, DayHours, DayHours, DayHours, DayHours, DayHours, DayHours]

ALWAYS_OPEN: WeeklyHours = (((0, _MINUTES_PER_DAY),),) * 7

# A calendar that never opens would make `add` search forever; ten years of closed days is
# proof enough that the calendar is broken (the loader rejects empty weeks up front).
_MAX_CLOSED_DAYS = 3660
#: Days a calendar remembers the open ranges of (`BusinessCalendar._day_ranges`): years of
#: them, more than the longest closed stretch a walk may cross.
_DAYS_REMEMBERED = 8192


# --------------------------------------------------------------------------- durations


def parse_duration(text: str, *, day: timedelta = timedelta(days=1)) -> timedelta:
    """Parse "4h", "30m", "2d", "90s" or a combination in that order ("1d4h", "1h30m").

    `day` is what one "d" is worth. Rules files speak of *business* days ("resolution = 5d"
    means five working days, docs/interface.md's example lands exactly one week later), so the
    loader passes the length of the policy calendar's working day (`BusinessCalendar.day`);
    the plain default is 24 hours. The grammar lives in `gateway.sla.durations` (one grammar
    for rules, commands and the CLI).
    """
    return durations.parse(text).business(day)


def format_duration(value: timedelta) -> str:
    """Render a duration compactly in h/m/s ("4h", "1h30m", "0m"); for messages and docs."""
    total = int(value.total_seconds())
    sign = "-" if total < 0 else ""
    total = abs(total)
    hours, rest = divmod(total, 3600)
    minutes, seconds = divmod(rest, 60)
    text = "".join(f"{n}{unit}" for n, unit in ((hours, "h"), (minutes, "m"), (seconds, "s")) if n)
    return sign + (text or "0m")


# --------------------------------------------------------------------------- parsing pieces


def parse_timezone(name: str) -> ZoneInfo:
    """An IANA zone such as "Europe/Berlin"; ValueError with a readable message otherwise."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f'bad time zone {name!r}: use an IANA name such as "Europe/Berlin"')
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(
            f'unknown time zone "{name}": use an IANA name such as "Europe/Berlin" or "UTC"'
        ) from None


_TIME_RANGE_RE = re.compile(r"(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})")


def _parse_clock(hours: str, minutes: str, text: str) -> int:
    h, m = int(hours), int(minutes)
    if m > 59 or h > 24 or (h == 24 and m != 0):
        raise ValueError(f'bad time in "{text}": use HH:MM between 00:00 and 24:00')
    return h * 60 + m


def parse_day(value: object, day: str) -> DayHours:
    """One day's value: "09:00-17:00", "09:00-12:00,13:00-17:00", a list of those, or "closed"."""
    if isinstance(value, str):
        pieces = [p.strip() for p in value.split(",")]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        pieces = [p.strip() for v in value for p in v.split(",")]
    else:
        raise ValueError(f'hours for {day} must be a string like "09:00-17:00" or a list of them')
    pieces = [p for p in pieces if p]
    if not pieces or pieces == ["closed"]:
        return ()
    ranges: list[tuple[int, int]] = []
    for piece in pieces:
        match = _TIME_RANGE_RE.fullmatch(piece)
        if match is None:
            raise ValueError(
                f'bad hours "{piece}" for {day}: use "HH:MM-HH:MM", several separated by commas'
            )
        start = _parse_clock(match.group(1), match.group(2), piece)
        end = _parse_clock(match.group(3), match.group(4), piece)
        if end <= start:
            # Overnight ranges are ambiguous around DST and holidays; ask for two ranges.
            raise ValueError(
                f'bad hours "{piece}" for {day}: the end must be after the start '
                "(split overnight shifts at 24:00 into two days)"
            )
        ranges.append((start, end))
    ranges.sort()
    for (_, end1), (start2, _) in itertools.pairwise(ranges):
        if start2 < end1:
            raise ValueError(f"overlapping hours for {day}: {', '.join(pieces)}")
    return tuple(ranges)


def day_indexes(key: str) -> list[int]:
    """ "mon" -> [0]; "mon-fri" -> [0..4]."""
    lowered = key.strip().lower()
    if lowered in DAY_NAMES:
        return [DAY_NAMES.index(lowered)]
    first, sep, last = lowered.partition("-")
    if sep and first in DAY_NAMES and last in DAY_NAMES:
        a, b = DAY_NAMES.index(first), DAY_NAMES.index(last)
        if a <= b:
            return list(range(a, b + 1))
    raise ValueError(
        f'unknown day "{key}" in hours: use mon, tue, wed, thu, fri, sat, sun or a range '
        'like "mon-fri"'
    )


def parse_hours(value: object) -> WeeklyHours:
    """`hours = "24x7"` or a table of day (or day range) -> ranges. Days not named are closed."""
    if isinstance(value, str):
        if value.strip().lower() == "24x7":
            return ALWAYS_OPEN
        raise ValueError(
            f'bad hours "{value}": use "24x7" or a table like {{ mon-fri = "09:00-17:00" }}'
        )
    if not isinstance(value, Mapping):
        raise ValueError('hours must be "24x7" or a table like { mon-fri = "09:00-17:00" }')
    week: list[DayHours | None] = [None] * 7
    for key, day_value in value.items():
        ranges = parse_day(day_value, key)
        for index in day_indexes(key):
            if week[index] is not None:
                raise ValueError(f"{DAY_NAMES[index]} is given twice in hours")
            week[index] = ranges
    result = tuple(day or () for day in week)
    if not any(result):
        raise ValueError("hours are empty: the calendar would never open")
    return result  # type: ignore[return-value]


def parse_holiday_dates(value: object) -> frozenset[date]:
    """A list of TOML dates or "YYYY-MM-DD" strings."""
    if not isinstance(value, list):
        raise ValueError('holidays must be a list of dates like ["2026-12-24", "2026-12-25"]')
    days: set[date] = set()
    for item in value:
        if isinstance(item, datetime):
            raise ValueError(f"holiday {item.isoformat()} must be a date without a time")
        if isinstance(item, date):
            days.add(item)
            continue
        if isinstance(item, str):
            try:
                days.add(date.fromisoformat(item.strip()))
                continue
            except ValueError:
                pass
        raise ValueError(f'bad holiday date {item!r}: use "YYYY-MM-DD"')
    return frozenset(days)


def public_holidays(country: str, subdivision: str | None = None) -> holidays_lib.HolidayBase:
    """National (and regional) public holidays from the `holidays` package."""
    try:
        return holidays_lib.country_holidays(country.upper(), subdiv=subdivision)
    except NotImplementedError:
        where = f"{country}" + (f"-{subdivision}" if subdivision else "")
        raise ValueError(
            f'unknown holiday country/subdivision "{where}": use an ISO code such as "DE" with '
            'an optional subdivision such as "BE"'
        ) from None


# --------------------------------------------------------------------------- the calendar


def _require_aware(value: datetime, what: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be a timezone-aware datetime, got {value!r}")
    return value.astimezone(UTC)


def _clock_text(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


@dataclass(frozen=True)
class BusinessCalendar:
    """Opening hours in one time zone, minus holidays.

    `hours` holds the weekly schedule in local time (Monday first); `holidays` are explicit
    closed dates; `country`/`subdivision` add public holidays from the `holidays` package.
    A holiday closes the whole local date.
    """

    id: str
    timezone: ZoneInfo
    hours: WeeklyHours = ALWAYS_OPEN
    holidays: frozenset[date] = frozenset()
    country: str | None = None
    subdivision: str | None = None
    _public: holidays_lib.HolidayBase | None = field(
        default=None, init=False, compare=False, repr=False
    )
    # Each local day's open ranges as UTC instants (`_day_ranges`): every deadline and
    # coverage question walks days from "now", the pipeline about 26 times per new ticket,
    # and converting each range's wall times through the zone was ~1.5% of its CPU.
    _days: dict[date, tuple[tuple[datetime, datetime], ...]] = field(
        default_factory=dict, init=False, compare=False, repr=False
    )

    def __post_init__(self) -> None:
        if not any(self.hours):
            raise ValueError(f"calendar {self.id!r} never opens")
        if self.country:
            # The holidays object caches years lazily; it never changes what a date means,
            # so the calendar stays a pure value.
            object.__setattr__(self, "_public", public_holidays(self.country, self.subdivision))

    @classmethod
    def build(
        cls,
        id: str,
        timezone: str,
        hours: object = "24x7",
        holidays: Sequence[object] = (),
        country: str | None = None,
        subdivision: str | None = None,
    ) -> BusinessCalendar:
        """Build from the raw TOML values (raises ValueError on the first bad one)."""
        return cls(
            id=id,
            timezone=parse_timezone(timezone),
            hours=parse_hours(hours),
            holidays=parse_holiday_dates(list(holidays)),
            country=country,
            subdivision=subdivision,
        )

    # ----------------------------------------------------------------- facts about days

    @property
    def always_open(self) -> bool:
        return self.hours == ALWAYS_OPEN and not self.holidays and not self.country

    @property
    def day(self) -> timedelta:
        """Length of one business day, what "1d" means in an SLA using this calendar.

        The most common daily opening among the open weekdays (ties: the longest), so a
        Mon-Fri 09:00-17:00 calendar has 8-hour days and "5d" is one working week.
        """
        lengths = [sum(end - start for start, end in day) for day in self.hours if day]
        best = max(set(lengths), key=lambda n: (lengths.count(n), n))
        return timedelta(minutes=best)

    def is_holiday(self, day: date) -> bool:
        """True when the local date is closed as a holiday (explicit or public)."""
        return day in self.holidays or (self._public is not None and day in self._public)

    def holiday_name(self, day: date) -> str | None:
        """The public holiday's name, "holiday" for an explicit date, None when not a holiday."""
        if self._public is not None and day in self._public:
            return str(self._public.get(day))
        return "holiday" if day in self.holidays else None

    def _instant(self, day: date, minutes: int, *, closing: bool = False) -> datetime:
        """Local wall-clock time on `day` as a UTC instant.

        A range stands for every instant whose local wall time lies inside it, so around DST:
        a wall time skipped by spring-forward maps to the transition instant (the first one
        whose wall time is later), and a repeated fall-back wall time maps to its first
        occurrence when it opens a range and to its second when it closes one. Thus
        "01:00-04:00" on New York's spring-forward Sunday is two real hours, on its
        fall-back Sunday four, and "02:00-02:30" on the spring-forward day never opens.
        """
        if minutes >= _MINUTES_PER_DAY:
            day, minutes = day + timedelta(days=1), minutes - _MINUTES_PER_DAY
        wall = datetime.combine(day, time(minutes // 60, minutes % 60))
        local = wall.replace(tzinfo=self.timezone, fold=1 if closing else 0)
        instant = local.astimezone(UTC)
        if instant.astimezone(self.timezone).replace(tzinfo=None) == wall:
            return instant
        return self._gap_end(wall)

    def _gap_end(self, wall: datetime) -> datetime:
        """The spring-forward transition instant for a wall time that does not exist."""
        # fold=1 reads the wall time with the later offset, fold=0 with the earlier one; the
        # transition lies between those two instants. Transitions fall on whole seconds.
        low = wall.replace(tzinfo=self.timezone, fold=1).astimezone(UTC)
        high = wall.replace(tzinfo=self.timezone, fold=0).astimezone(UTC)
        after = high.astimezone(self.timezone).utcoffset()
        while high - low > timedelta(seconds=1):
            middle = low + (high - low) // 2
            if middle.astimezone(self.timezone).utcoffset() == after:
                high = middle
            else:
                low = middle
        return high

    def _day_ranges(self, day: date) -> tuple[tuple[datetime, datetime], ...]:
        """The local `day`'s opening ranges as UTC instants (none on a holiday), as
        `_instant` makes them: a pure function of the calendar and the day, so remembered
        (a bounded memo: a long-running process meets new days)."""
        known = self._days.get(day)
        if known is None:
            ranges = () if self.is_holiday(day) else self.hours[day.weekday()]
            known = tuple(
                (self._instant(day, start), self._instant(day, end, closing=True))
                for start, end in ranges
            )
            if len(self._days) >= _DAYS_REMEMBERED:
                self._days.clear()
            self._days[day] = known
        return known

    def _intervals(self, after: datetime) -> Iterator[tuple[datetime, datetime]]:
        """Open intervals [start, end) in UTC, in order, that end after `after` (UTC).

        Adjacent intervals (24x7 days, "…-12:00,12:00-…") are not merged: every caller works
        interval by interval and an open interval is half-open, so adjacency is seamless.
        """
        # Start one local day early: a range of the previous local date can still be running.
        day = after.astimezone(self.timezone).date() - timedelta(days=1)
        last_end: datetime | None = None
        closed_days = 0
        while True:
            produced = False
            for opens, end in self._day_ranges(day):
                start = opens
                if last_end is not None and start < last_end:
                    start = last_end  # DST folds must never count an hour twice
                if end <= start:
                    continue  # the range fell into a spring-forward gap
                last_end = end
                produced = True
                if end > after:
                    yield start, end
            closed_days = 0 if produced else closed_days + 1
            if closed_days > _MAX_CLOSED_DAYS:
                raise ValueError(f"calendar {self.id!r} is closed for over ten years")
            day += timedelta(days=1)

    def open_intervals(self, start: datetime, end: datetime) -> list[tuple[datetime, datetime]]:
        """The open intervals [a, b) in UTC clipped to [start, end), in order (coverage
        checks walk these instead of sampling hours)."""
        start = _require_aware(start, "start").astimezone(UTC)
        end = _require_aware(end, "end").astimezone(UTC)
        out: list[tuple[datetime, datetime]] = []
        for a, b in self._intervals(start):
            if a >= end:
                break
            out.append((max(a, start), min(b, end)))
        return out

    # ----------------------------------------------------------------- the four questions

    def is_open(self, at: datetime) -> bool:
        """True when `at` lies inside opening hours (opening instant included, closing not)."""
        instant = _require_aware(at, "at")
        start, _ = next(self._intervals(instant))
        return start <= instant

    def next_open(self, at: datetime) -> datetime:
        """`at` itself (in UTC) when open, else the next opening instant."""
        instant = _require_aware(at, "at")
        start, _ = next(self._intervals(instant))
        return max(start, instant)

    def add(self, start: datetime, duration: timedelta) -> datetime:
        """The instant `duration` of business time after `start`.

        Time only runs while open. A deadline that uses up an interval exactly lands on its
        closing instant (16:00 + 1h = 17:00 the same day, not 09:00 the next), and adding zero
        to a closed instant gives the next opening, so every result is open or a closing time.
        """
        instant = _require_aware(start, "start")
        if duration < timedelta(0):
            raise ValueError("business duration must not be negative")
        remaining = duration
        for open_at, close_at in self._intervals(instant):
            begin = max(open_at, instant)
            available = close_at - begin
            if remaining <= available:
                return begin + remaining
            remaining -= available
        raise AssertionError("unreachable: _intervals is endless")  # pragma: no cover

    def elapsed(self, start: datetime, end: datetime) -> timedelta:
        """Business time between two instants; negative when `end` is before `start`."""
        first = _require_aware(start, "start")
        last = _require_aware(end, "end")
        if last < first:
            return -self.elapsed(last, first)
        total = timedelta(0)
        for open_at, close_at in self._intervals(first):
            if open_at >= last:
                break
            total += min(close_at, last) - max(open_at, first)
        return total

    # ----------------------------------------------------------------- for humans

    def describe_hours(self) -> str:
        """E.g. "Mon–Fri 09:00–17:00 Europe/Berlin" or "24x7 UTC"; holidays mentioned."""
        zone = self.timezone.key
        if self.hours == ALWAYS_OPEN:
            text = f"24x7 {zone}"
        else:
            groups: list[tuple[int, int, DayHours]] = []
            for index, ranges in enumerate(self.hours):
                if groups and groups[-1][2] == ranges and groups[-1][1] == index - 1:
                    groups[-1] = (groups[-1][0], index, ranges)
                else:
                    groups.append((index, index, ranges))
            parts = []
            for first, last, ranges in groups:
                if not ranges:
                    continue
                days = _DAY_LABELS[first]
                if last > first:
                    days += "–" + _DAY_LABELS[last]
                spans = ", ".join(f"{_clock_text(a)}–{_clock_text(b)}" for a, b in ranges)
                parts.append(f"{days} {spans}")
            text = "; ".join(parts) + f" {zone}"
        closed = []
        if self.country:
            closed.append(
                "public holidays "
                + self.country
                + (f"-{self.subdivision}" if self.subdivision else "")
            )
        if self.holidays:
            count = len(self.holidays)
            closed.append(f"{count} listed date{'s' if count != 1 else ''}")
        if closed:
            text += ", closed on " + " and ".join(closed)
        return text
