"""Dates, times, opening hours, durations and sizes written for the letter's language.

Small hand-written tables instead of the C library's locales: a server's installed locales
vary (a container often has only C.UTF-8), and a letter must read the same everywhere. The
English forms are exactly the ones the gateway always wrote before it had languages
(docs/decisions.md D17), so English letters do not change.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from gateway.sla.business_time import ALWAYS_OPEN, BusinessCalendar

__all__ = [
    "DEFAULT_LANGUAGE",
    "LANGUAGES",
    "describe_hours",
    "describe_size",
    "duration",
    "format_local",
    "format_offset",
    "human",
]

#: The languages the shipped templates are written in.
LANGUAGES: tuple[str, ...] = ("en", "de", "fr", "es", "ru")
DEFAULT_LANGUAGE = "en"

_DAYS = {
    "en": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
    "de": ("Montag", "Dienstag", "Mittwoch", "Donnerstag", "Freitag", "Samstag", "Sonntag"),
    "fr": ("lundi", "mardi", "mercredi", "jeudi", "vendredi", "samedi", "dimanche"),
    "es": ("lunes", "martes", "miércoles", "jueves", "viernes", "sábado", "domingo"),
    "ru": ("понедельник", "вторник", "среда", "четверг", "пятница", "суббота", "воскресенье"),
}
_DAY_LABELS = {
    "en": ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"),
    "de": ("Mo", "Di", "Mi", "Do", "Fr", "Sa", "So"),
    "fr": ("lun.", "mar.", "mer.", "jeu.", "ven.", "sam.", "dim."),
    "es": ("lun.", "mar.", "mié.", "jue.", "vie.", "sáb.", "dom."),
    "ru": ("пн", "вт", "ср", "чт", "пт", "сб", "вс"),
}
# Russian writes the month of a date in the genitive ("23 ноября").
_MONTHS = {
    "en": ("January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December"),
    "de": ("Januar", "Februar", "März", "April", "Mai", "Juni", "Juli", "August",
           "September", "Oktober", "November", "Dezember"),
    "fr": ("janvier", "février", "mars", "avril", "mai", "juin", "juillet", "août",
           "septembre", "octobre", "novembre", "décembre"),
    "es": ("enero", "febrero", "marzo", "abril", "mayo", "junio", "julio", "agosto",
           "septiembre", "octubre", "noviembre", "diciembre"),
    "ru": ("января", "февраля", "марта", "апреля", "мая", "июня", "июля", "августа",
           "сентября", "октября", "ноября", "декабря"),
}  # fmt: skip


def _lang(lang: str) -> str:
    return lang if lang in LANGUAGES else DEFAULT_LANGUAGE


def human(dt: datetime, lang: str = DEFAULT_LANGUAGE) -> str:
    """The date and time as people of ``lang`` write it, e.g. "Montag, 23. November 2026,
    14:00 Uhr"; English: "Monday 23 November 2026, 14:00"."""
    lang = _lang(lang)
    day = _DAYS[lang][dt.weekday()]
    month = _MONTHS[lang][dt.month - 1]
    clock = f"{dt.hour:02d}:{dt.minute:02d}"  # %H:%M without strftime
    if lang == "de":
        return f"{day}, {dt.day}. {month} {dt.year}, {clock} Uhr"
    if lang == "fr":
        return f"{day} {dt.day} {month} {dt.year} à {clock}"
    if lang == "es":
        return f"{day}, {dt.day} de {month} de {dt.year}, {clock}"
    if lang == "ru":
        return f"{day}, {dt.day} {month} {dt.year} г., {clock}"
    return f"{day} {dt.day} {month} {dt.year}, {clock}"


def format_local(dt: datetime, calendar: BusinessCalendar, lang: str = DEFAULT_LANGUAGE) -> str:
    """In the calendar's zone with the zone spelled out: "... 14:00 CET (Europe/Berlin)"."""
    local = dt.astimezone(calendar.timezone)
    abbrev = local.tzname() or ""
    zone = calendar.timezone.key
    if not abbrev or abbrev == zone:
        return f"{human(local, lang)} {zone}"
    return f"{human(local, lang)} {abbrev} ({zone})"


def _offset_text(offset: timedelta) -> str:
    total = int(offset.total_seconds())
    sign = "+" if total >= 0 else "-"
    total = abs(total)
    return f"UTC{sign}{total // 3600:02d}:{total % 3600 // 60:02d}"


def format_offset(dt: datetime, offset: timedelta, lang: str = DEFAULT_LANGUAGE) -> str:
    """In a bare UTC offset (the customer's Date header): "... 08:00 UTC-05:00"."""
    local = dt.astimezone(timezone(offset))
    return f"{human(local, lang)} {_offset_text(offset)}"


_ALWAYS = {
    "de": "rund um die Uhr",
    "fr": "24 h/24, 7 j/7",
    "es": "24 horas, todos los días",
    "ru": "круглосуточно",
}
_HOLIDAYS = {
    "de": ", an Feiertagen ({where}) geschlossen",
    "fr": ", fermé les jours fériés ({where})",
    "es": ", cerrado los días festivos ({where})",
    "ru": ", кроме праздничных дней ({where})",
}
_LISTED = {
    "de": ", außerdem an {n} weiteren Tagen geschlossen",
    "fr": ", ainsi que {n} autres jours de fermeture",
    "es": ", y {n} días de cierre más",
    "ru": ", а также ещё {n} нерабочих дн.",
}


def _clock(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def describe_hours(calendar: BusinessCalendar, lang: str = DEFAULT_LANGUAGE) -> str:
    """Opening hours in words; English is ``BusinessCalendar.describe_hours`` unchanged."""
    lang = _lang(lang)
    if lang == "en":
        return calendar.describe_hours()
    zone = calendar.timezone.key
    if calendar.hours == ALWAYS_OPEN:
        text = f"{_ALWAYS[lang]} ({zone})"
    else:
        groups: list[tuple[int, int, tuple[tuple[int, int], ...]]] = []
        for index, ranges in enumerate(calendar.hours):
            if groups and groups[-1][2] == ranges and groups[-1][1] == index - 1:
                groups[-1] = (groups[-1][0], index, ranges)
            else:
                groups.append((index, index, ranges))
        parts = []
        for first, last, ranges in groups:
            if not ranges:
                continue
            days = _DAY_LABELS[lang][first]
            if last > first:
                days += "–" + _DAY_LABELS[lang][last]
            spans = ", ".join(f"{_clock(a)}–{_clock(b)}" for a, b in ranges)
            parts.append(f"{days} {spans}")
        text = "; ".join(parts) + f" ({zone})"
    if calendar.country:
        where = calendar.country + (f"-{calendar.subdivision}" if calendar.subdivision else "")
        text += _HOLIDAYS[lang].format(where=where)
    if calendar.holidays:
        text += _LISTED[lang].format(n=len(calendar.holidays))
    return text


_UNITS = {
    "en": ("h", "min"),
    "de": ("Std.", "Min."),
    "fr": ("h", "min"),
    "es": ("h", "min"),
    "ru": ("ч", "мин"),
}


def duration(value: timedelta, lang: str = DEFAULT_LANGUAGE) -> str:
    """Rounded to minutes: "2 h 5 min", "2 Std. 5 Min."."""
    h_unit, m_unit = _UNITS[_lang(lang)]
    minutes = round(value.total_seconds() / 60)
    hours, minutes = divmod(minutes, 60)
    if hours and minutes:
        return f"{hours} {h_unit} {minutes} {m_unit}"
    if hours:
        return f"{hours} {h_unit}"
    return f"{minutes} {m_unit}"


_SIZE_UNITS = {
    "en": ("bytes", "KB", "MB"),
    "de": ("Bytes", "KB", "MB"),
    "fr": ("octets", "Ko", "Mo"),
    "es": ("bytes", "KB", "MB"),
    "ru": ("байт", "КБ", "МБ"),
}


def describe_size(size: int, lang: str = DEFAULT_LANGUAGE) -> str:
    """ "12 KB", "1.5 MB"; a decimal comma outside English ("1,5 MB")."""
    lang = _lang(lang)
    b, kb, mb = _SIZE_UNITS[lang]
    if size < 1024:
        return f"{size} {b}"
    if size < 1024 * 1024:
        return f"{size / 1024:.0f} {kb}"
    text = f"{size / (1024 * 1024):.1f}"
    return f"{text if lang == 'en' else text.replace('.', ',')} {mb}"
