"""Business-time arithmetic: RT's vectors, weekends, holidays, DST, and properties."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.routing.model import EscalationStep, SlaPolicy
from gateway.sla.business_time import (
    BusinessCalendar,
    parse_duration,
    parse_hours,
    parse_timezone,
)
from gateway.sla.deadlines import (
    Deadlines,
    escalation_schedule,
    initial_deadlines,
    isoz,
    next_response_deadline,
)

H = timedelta(hours=1)


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def weekdays(hours: str, zone: str, **extra: object) -> BusinessCalendar:
    return BusinessCalendar.build("c", zone, {"mon-fri": hours}, **extra)  # type: ignore[arg-type]


BERLIN = weekdays("09:00-17:00", "Europe/Berlin")


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4h", timedelta(hours=4)),
        ("30m", timedelta(minutes=30)),
        ("2d", timedelta(days=2)),
        ("90s", timedelta(seconds=90)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("1d4h", timedelta(days=1, hours=4)),
        ("0m", timedelta(0)),
        (" 2H ", timedelta(hours=2)),
    ],
)
def test_parse_duration_accepts_units_and_combinations(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "4", "h", "4 hours", "1.5h", "-1h", "30m1h", "2w"])
def test_parse_duration_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError, match="bad duration"):
        parse_duration(text)


def test_a_day_is_what_the_caller_says_it_is() -> None:
    # Business days: "5d" in an 8-hour calendar is 40 business hours.
    assert parse_duration("5d", day=timedelta(hours=8)) == timedelta(hours=40)
    assert parse_duration("1d2h", day=timedelta(hours=8)) == timedelta(hours=10)


def test_calendar_day_length_is_the_most_common_working_day() -> None:
    assert BERLIN.day == timedelta(hours=8)
    short_friday = BusinessCalendar.build(
        "c", "UTC", {"mon-thu": "09:00-17:00", "fri": "09:00-15:00"}
    )
    assert short_friday.day == timedelta(hours=8)
    assert BusinessCalendar.build("c", "UTC", "24x7").day == timedelta(hours=24)


# --------------------------------------------------------------------------- RT's vectors


def test_rt_vector_new_york() -> None:
    # RT t/sla/timezone.t with Business::Hours' default week, Mon-Fri 09:00-18:00.
    calendar = weekdays("09:00-18:00", "America/New_York")
    created = utc(2007, 1, 1, 22)
    assert calendar.next_open(created) == created  # 17:00 EST is still open
    assert calendar.add(created, 2 * H) == utc(2007, 1, 2, 15)


def test_rt_vector_moscow() -> None:
    calendar = weekdays("09:00-18:00", "Europe/Moscow")
    created = utc(2007, 1, 1, 22)
    assert calendar.next_open(created) == utc(2007, 1, 2, 6)
    assert calendar.add(created, 2 * H) == utc(2007, 1, 2, 8)


def test_rt_vector_with_a_five_oclock_close_starts_next_morning() -> None:
    # With 09:00-17:00 the ticket arrives at closing time (17:00 EST): the clock starts at
    # 09:00 EST (14:00Z), so two hours later is 16:00Z; Moscow is unchanged.
    assert weekdays("09:00-17:00", "America/New_York").add(utc(2007, 1, 1, 22), 2 * H) == utc(
        2007, 1, 2, 16
    )
    assert weekdays("09:00-17:00", "Europe/Moscow").add(utc(2007, 1, 1, 22), 2 * H) == utc(
        2007, 1, 2, 8
    )


def test_contract_example_deadlines() -> None:
    # docs/interface.md: created 09:12Z Monday, 4h and 5d in Mon-Fri 09-17 Berlin.
    created = utc(2026, 11, 23, 9, 12)
    assert BERLIN.add(created, 4 * H) == utc(2026, 11, 23, 13, 12)
    assert BERLIN.add(created, parse_duration("5d", day=BERLIN.day)) == utc(2026, 11, 30, 9, 12)


# --------------------------------------------------------------------------- open / next_open


def test_is_open_boundaries() -> None:
    # 2026-11-23 is a Monday; Berlin is UTC+1 in November.
    assert not BERLIN.is_open(utc(2026, 11, 23, 7, 59, 59))
    assert BERLIN.is_open(utc(2026, 11, 23, 8))  # 09:00 opening instant is open
    assert BERLIN.is_open(utc(2026, 11, 23, 15, 59, 59))
    assert not BERLIN.is_open(utc(2026, 11, 23, 16))  # 17:00 closing instant is closed
    assert not BERLIN.is_open(utc(2026, 11, 28, 12))  # Saturday


def test_next_open_returns_utc_and_the_instant_itself_when_open() -> None:
    local = datetime(2026, 11, 23, 10, 30, tzinfo=ZoneInfo("Europe/Berlin"))
    result = BERLIN.next_open(local)
    assert result == utc(2026, 11, 23, 9, 30)
    assert result.tzinfo is UTC
    assert BERLIN.next_open(utc(2026, 11, 27, 16)) == utc(2026, 11, 30, 8)  # Fri 17:00 -> Mon


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        BERLIN.is_open(datetime(2026, 11, 23, 10))
    with pytest.raises(ValueError, match="timezone-aware"):
        BERLIN.add(datetime(2026, 11, 23, 10), H)


# --------------------------------------------------------------------------- add / elapsed


def test_weekend_is_skipped() -> None:
    # Fri 16:00 CET + 2h = 1h on Friday + 1h on Monday -> Mon 10:00 CET.
    assert BERLIN.add(utc(2026, 11, 27, 15), 2 * H) == utc(2026, 11, 30, 9)


def test_deadline_that_uses_up_a_day_lands_on_closing_time() -> None:
    assert BERLIN.add(utc(2026, 11, 23, 15), H) == utc(2026, 11, 23, 16)


def test_adding_zero_to_a_closed_instant_gives_the_next_opening() -> None:
    assert BERLIN.add(utc(2026, 11, 28, 12), timedelta(0)) == utc(2026, 11, 30, 8)
    assert BERLIN.add(utc(2026, 11, 23, 10), timedelta(0)) == utc(2026, 11, 23, 10)


def test_negative_duration_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        BERLIN.add(utc(2026, 11, 23, 10), -H)


def test_split_shifts() -> None:
    calendar = weekdays("09:00-12:00,13:00-17:00", "UTC")
    assert calendar.add(utc(2026, 11, 23, 11), 2 * H) == utc(2026, 11, 23, 14)
    assert not calendar.is_open(utc(2026, 11, 23, 12, 30))
    assert calendar.elapsed(utc(2026, 11, 23, 0), utc(2026, 11, 24, 0)) == 7 * H


def test_list_form_of_split_shifts_is_the_same_calendar() -> None:
    assert parse_hours({"mon": ["09:00-12:00", "13:00-17:00"]}) == parse_hours(
        {"mon": "09:00-12:00, 13:00-17:00"}
    )


def test_elapsed_counts_only_open_time_and_is_signed() -> None:
    friday_noon, monday_noon = utc(2026, 11, 27, 11), utc(2026, 11, 30, 11)
    assert BERLIN.elapsed(friday_noon, monday_noon) == 8 * H
    assert BERLIN.elapsed(monday_noon, friday_noon) == -8 * H
    assert BERLIN.elapsed(friday_noon, friday_noon) == timedelta(0)


def test_explicit_and_public_holidays_close_whole_days() -> None:
    calendar = weekdays(
        "09:00-17:00", "Europe/Berlin", holidays=["2026-12-24"], country="DE", subdivision="BE"
    )
    # Wed 23 Dec 16:00 CET + 2h: Thu 24 (listed), Fri 25 (Christmas), weekend -> Mon 28 10:00.
    assert calendar.add(utc(2026, 12, 23, 15), 2 * H) == utc(2026, 12, 28, 9)
    assert calendar.holiday_name(date(2026, 12, 24)) == "holiday"
    assert calendar.holiday_name(date(2026, 12, 25)) is not None
    assert calendar.holiday_name(date(2026, 12, 23)) is None
    # Berlin alone keeps International Women's Day (a Monday in 2027).
    assert calendar.is_holiday(date(2027, 3, 8))
    assert not weekdays("09:00-17:00", "Europe/Berlin", country="DE", subdivision="BY").is_holiday(
        date(2027, 3, 8)
    )


def test_toml_dates_are_accepted_as_holidays() -> None:
    calendar = weekdays("09:00-17:00", "UTC", holidays=[date(2026, 11, 24)])
    assert calendar.add(utc(2026, 11, 23, 16, 30), H) == utc(2026, 11, 25, 9, 30)


# --------------------------------------------------------------------------- DST


def test_berlin_spring_forward_day_has_23_hours_in_a_24x7_calendar() -> None:
    calendar = BusinessCalendar.build("c", "Europe/Berlin", "24x7")
    start = datetime(2026, 3, 29, tzinfo=ZoneInfo("Europe/Berlin"))
    end = datetime(2026, 3, 30, tzinfo=ZoneInfo("Europe/Berlin"))
    assert calendar.elapsed(start, end) == 23 * H
    assert calendar.add(start, 24 * H) == utc(2026, 3, 29, 23)  # 01:00 CEST on the 30th


def test_berlin_fall_back_day_has_25_hours_in_a_24x7_calendar() -> None:
    calendar = BusinessCalendar.build("c", "Europe/Berlin", "24x7")
    start = datetime(2026, 10, 25, tzinfo=ZoneInfo("Europe/Berlin"))
    end = datetime(2026, 10, 26, tzinfo=ZoneInfo("Europe/Berlin"))
    assert calendar.elapsed(start, end) == 25 * H


def test_office_hours_follow_the_local_clock_across_dst() -> None:
    # Fri 27 Mar 16:00 CET (15:00Z) + 2h -> Mon 30 Mar 10:00 CEST (08:00Z).
    assert BERLIN.add(utc(2026, 3, 27, 15), 2 * H) == utc(2026, 3, 30, 8)
    # Fri 23 Oct 16:00 CEST (14:00Z) + 2h -> Mon 26 Oct 10:00 CET (09:00Z).
    assert BERLIN.add(utc(2026, 10, 23, 14), 2 * H) == utc(2026, 10, 26, 9)


def test_new_york_hours_spanning_the_spring_gap_are_real_hours() -> None:
    # On Sun 2026-03-08 New York skips 02:00-03:00: "01:00-04:00" is two real hours.
    calendar = BusinessCalendar.build("c", "America/New_York", {"sun": "01:00-04:00"})
    day_start = utc(2026, 3, 8, 0)
    assert calendar.elapsed(day_start, day_start + 24 * H) == 2 * H
    assert calendar.next_open(day_start) == utc(2026, 3, 8, 6)  # 01:00 EST
    assert calendar.add(day_start, 2 * H) == utc(2026, 3, 8, 8)  # 04:00 EDT
    # The next Sunday is an ordinary three-hour window.
    assert calendar.elapsed(utc(2026, 3, 15), utc(2026, 3, 16)) == 3 * H


def test_a_range_inside_the_spring_gap_never_opens() -> None:
    calendar = BusinessCalendar.build(
        "c", "America/New_York", {"sun": "02:00-02:30", "mon": "09:00-10:00"}
    )
    assert calendar.elapsed(utc(2026, 3, 8), utc(2026, 3, 9)) == timedelta(0)
    assert calendar.next_open(utc(2026, 3, 8)) == utc(2026, 3, 9, 13)  # Mon 09:00 EDT


def test_a_range_starting_in_the_spring_gap_opens_at_the_transition() -> None:
    # "02:30-05:00" on 2026-03-08: 02:30 does not exist, so the office opens at 03:00 EDT.
    calendar = BusinessCalendar.build("c", "America/New_York", {"sun": "02:30-05:00"})
    assert calendar.next_open(utc(2026, 3, 8)) == utc(2026, 3, 8, 7)
    assert calendar.elapsed(utc(2026, 3, 8), utc(2026, 3, 9)) == 2 * H


def test_new_york_fall_back_night_shift_counts_the_repeated_hour() -> None:
    # On Sun 2026-11-01 01:00-02:00 happens twice: "00:00-03:00" is four real hours.
    calendar = BusinessCalendar.build("c", "America/New_York", {"sun": "00:00-03:00"})
    assert calendar.elapsed(utc(2026, 11, 1), utc(2026, 11, 2)) == 4 * H


def test_a_range_closing_in_the_repeated_hour_closes_at_its_second_occurrence() -> None:
    # "00:00-01:30" on 2026-11-01: the clock reads 00:00-01:30 from 04:00Z to 06:30Z.
    calendar = BusinessCalendar.build("c", "America/New_York", {"sun": "00:00-01:30"})
    assert calendar.elapsed(utc(2026, 11, 1), utc(2026, 11, 2)) == timedelta(hours=2, minutes=30)
    assert calendar.is_open(utc(2026, 11, 1, 6, 29))
    assert not calendar.is_open(utc(2026, 11, 1, 6, 30))
    # Two adjacent ranges meeting in the repeated hour never count time twice.
    split = BusinessCalendar.build("c", "America/New_York", {"sun": "00:00-01:30,01:30-03:00"})
    assert split.elapsed(utc(2026, 11, 1), utc(2026, 11, 2)) == 4 * H


# --------------------------------------------------------------------------- parsing errors


@pytest.mark.parametrize(
    ("hours", "message"),
    [
        ("9-5", "bad hours"),
        ({"mon": "9-5"}, "bad hours"),
        ({"mon": "17:00-09:00"}, "end must be after the start"),
        ({"mon": "09:00-25:00"}, "bad time"),
        ({"mon": "09:60-10:00"}, "bad time"),
        ({"mon": "09:00-12:00,11:00-13:00"}, "overlapping"),
        ({"mon-fri": "09:00-17:00", "fri": "10:00-12:00"}, "fri is given twice"),
        ({"monday": "09:00-17:00"}, "unknown day"),
        ({"fri-mon": "09:00-17:00"}, "unknown day"),
        ({"mon": "closed"}, "never open"),
        ({"mon": 9}, "must be a string"),
    ],
)
def test_bad_hours_are_explained(hours: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_hours(hours)


def test_closed_days_and_24_00() -> None:
    week = parse_hours({"mon-fri": "08:00-24:00", "sat": "closed"})
    assert week[0] == ((480, 1440),)
    assert week[5] == ()
    assert week[6] == ()


def test_bad_time_zone() -> None:
    with pytest.raises(ValueError, match='unknown time zone "Mars/Olympus"'):
        parse_timezone("Mars/Olympus")


def test_bad_country() -> None:
    with pytest.raises(ValueError, match="unknown holiday country"):
        BusinessCalendar.build("c", "UTC", "24x7", country="XX")


# --------------------------------------------------------------------------- describe


def test_describe_hours() -> None:
    assert BERLIN.describe_hours() == "Mon–Fri 09:00–17:00 Europe/Berlin"
    assert BusinessCalendar.build("c", "UTC", "24x7").describe_hours() == "24x7 UTC"
    mixed = BusinessCalendar.build(
        "c",
        "America/New_York",
        {"mon-thu": "09:00-12:00,13:00-17:00", "fri": "09:00-15:00", "sat": "10:00-12:00"},
        holidays=["2026-12-25"],
    )
    assert mixed.describe_hours() == (
        "Mon–Thu 09:00–12:00, 13:00–17:00; Fri 09:00–15:00; Sat 10:00–12:00 America/New_York, "
        "closed on 1 listed date"
    )


# --------------------------------------------------------------------------- deadlines


def policy(**overrides: object) -> SlaPolicy:
    values: dict[str, object] = {
        "id": "standard",
        "calendar": "berlin",
        "first_response": 4 * H,
        "next_response": 8 * H,
        "resolution": 40 * H,
        "escalation": (
            EscalationStep(timedelta(0), notify="owner"),
            EscalationStep(H, assign="backup"),
        ),
    }
    values.update(overrides)
    return SlaPolicy(**values)  # type: ignore[arg-type]


def test_initial_deadlines_and_json() -> None:
    deadlines = initial_deadlines(policy(), BERLIN, utc(2026, 11, 23, 9, 12))
    assert deadlines == Deadlines(
        first_response=utc(2026, 11, 23, 13, 12),
        next_response=None,
        resolution=utc(2026, 11, 30, 9, 12),
    )
    assert deadlines.to_json() == {
        "first_response": "2026-11-23T13:12:00Z",
        "next_response": None,
        "resolution": "2026-11-30T09:12:00Z",
    }


def test_missing_clocks_give_no_deadline() -> None:
    deadlines = initial_deadlines(
        policy(first_response=None, resolution=None), BERLIN, utc(2026, 11, 23, 9)
    )
    assert deadlines.to_json() == {
        "first_response": None,
        "next_response": None,
        "resolution": None,
    }


def test_next_response_deadline() -> None:
    # Customer writes Fri 15:00 CET; 8 business hours -> Mon 15:00 CET.
    assert next_response_deadline(policy(), BERLIN, utc(2026, 11, 27, 14)) == utc(2026, 11, 30, 14)


def test_escalation_schedule_counts_business_time_after_the_miss() -> None:
    missed = utc(2026, 11, 27, 16)  # Friday 17:00 CET, closing time
    schedule = escalation_schedule(policy(), BERLIN, missed)
    assert [when for when, _ in schedule] == [missed, utc(2026, 11, 30, 9)]


def test_isoz() -> None:
    assert isoz(None) is None
    assert isoz(datetime(2026, 11, 23, 14, tzinfo=ZoneInfo("Europe/Berlin"))) == (
        "2026-11-23T13:00:00Z"
    )
    assert isoz(utc(2026, 1, 1) + timedelta(microseconds=5)) == "2026-01-01T00:00:00.000005Z"
    with pytest.raises(ValueError, match="timezone-aware"):
        isoz(datetime(2026, 1, 1))


# --------------------------------------------------------------------------- properties

CALENDARS = [
    weekdays(
        "09:00-17:00", "Europe/Berlin", holidays=["2026-12-24"], country="DE", subdivision="BE"
    ),
    BusinessCalendar.build(
        "ny",
        "America/New_York",
        {"mon-fri": "08:30-12:00,13:00-17:30", "sun": "01:00-04:00"},
    ),
    BusinessCalendar.build("always", "Europe/Berlin", "24x7"),
    BusinessCalendar.build("late", "Asia/Kolkata", {"tue-sat": "14:00-24:00"}),
    BusinessCalendar.build(
        "dst", "America/New_York", {"sat": "23:00-24:00", "sun": "00:30-01:30,01:30-02:30"}
    ),
]

calendars = st.sampled_from(CALENDARS)
instants = st.one_of(
    st.datetimes(
        min_value=datetime(2025, 1, 1), max_value=datetime(2027, 12, 31), timezones=st.just(UTC)
    ),
    # Bias towards the DST weekends of 2026 (Europe: Mar 29 / Oct 25, US: Mar 8 / Nov 1).
    st.sampled_from(
        [utc(2026, 3, 7), utc(2026, 3, 28), utc(2026, 10, 24), utc(2026, 10, 31)]
    ).flatmap(
        lambda base: st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=2)).map(
            lambda offset: base + offset
        )
    ),
)
durations = st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=20))
property_settings = settings(max_examples=150, deadline=None)


@property_settings
@given(calendars, instants, durations)
def test_property_add_then_elapsed_round_trips(
    calendar: BusinessCalendar, start: datetime, duration: timedelta
) -> None:
    assert calendar.elapsed(start, calendar.add(start, duration)) == duration


@property_settings
@given(calendars, instants, durations, durations)
def test_property_add_is_monotonic_in_duration(
    calendar: BusinessCalendar, start: datetime, a: timedelta, b: timedelta
) -> None:
    small, large = sorted((a, b))
    assert calendar.add(start, small) <= calendar.add(start, large)


@property_settings
@given(calendars, instants, instants, durations)
def test_property_add_is_monotonic_in_start(
    calendar: BusinessCalendar, a: datetime, b: datetime, duration: timedelta
) -> None:
    early, late = sorted((a, b))
    assert calendar.add(early, duration) <= calendar.add(late, duration)


@property_settings
@given(calendars, instants, durations)
def test_property_result_is_open_or_a_closing_boundary(
    calendar: BusinessCalendar, start: datetime, duration: timedelta
) -> None:
    result = calendar.add(start, duration)
    assert result >= start
    assert calendar.is_open(result) or calendar.is_open(result - timedelta(microseconds=1))


@property_settings
@given(calendars, instants, instants, instants)
def test_property_elapsed_is_additive_over_split_points(
    calendar: BusinessCalendar, a: datetime, b: datetime, c: datetime
) -> None:
    assert calendar.elapsed(a, c) == calendar.elapsed(a, b) + calendar.elapsed(b, c)


@property_settings
@given(calendars, instants, instants)
def test_property_elapsed_never_exceeds_wall_time(
    calendar: BusinessCalendar, a: datetime, b: datetime
) -> None:
    early, late = sorted((a, b))
    assert timedelta(0) <= calendar.elapsed(early, late) <= late - early


@property_settings
@given(calendars, instants)
def test_property_next_open_is_open_and_nothing_is_open_before_it(
    calendar: BusinessCalendar, at: datetime
) -> None:
    opening = calendar.next_open(at)
    assert calendar.is_open(opening)
    assert calendar.elapsed(at, opening) == timedelta(0)
