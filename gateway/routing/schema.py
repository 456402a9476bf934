"""The shape of every table in `rules/*.toml`, as pydantic models (docs/rules.md).

Each model forbids unknown keys (``extra="forbid"``) and checks each value on its own: its
type (no coercion: ``"yes"`` is not true), and what can be judged without the other tables
(a priority, an assign mode, an address). What needs another value or another table (a
duration in days needs its calendar, ``owner`` and ``team`` exclude each other, every
reference must exist) is the loader's and `gateway.routing.references`' work.

`problems` turns a pydantic ``ValidationError`` into the wording `rules check` has always
printed (docs/rules.md "What rules check catches"): ``label: message`` at a key path that
`gateway.routing.locator.Locator` maps to a line. A field's messages are written with
``{key}`` for the key as the admin wrote it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, ValidationError
from pydantic_core import PydanticCustomError

from gateway.routing.conditions import unknown_key
from gateway.routing.locator import Key
from gateway.routing.model import ASSIGN_MODES, DISPOSITIONS, PRIORITIES

__all__ = [
    "KNOWN_CUSTOMER",
    "LANGUAGE_CODES",
    "TOP_LEVEL_KEYS",
    "BrandTable",
    "CalendarTable",
    "DefaultsTable",
    "DkimTable",
    "PersonTable",
    "PolicyTable",
    "RouteTable",
    "StepTable",
    "keys_of",
    "problems",
    "validate",
]

#: The sections a rules file may have.
TOP_LEVEL_KEYS = ("people", "calendars", "sla", "defaults", "route", "brands")
#: Languages the shipped letters are written in (gateway/templates/*.<lang>.txt).
LANGUAGE_CODES = ("en", "de", "fr", "es", "ru")
#: A route's `known_customer` (docs/threading.md), as `tickets.known_customer`.
KNOWN_CUSTOMER = ("same-subject", "separate")

_EMAIL_RE = re.compile(r"[^@\s]+@[^@\s]+")
_TEMPLATE_RE = re.compile(r"[A-Za-z0-9_.-]+")


def _wrong(message: str) -> PydanticCustomError:
    return PydanticCustomError("rules", message)


# ------------------------------------------------------------------------------- values


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _wrong("'{key}' must be a non-empty string")
    return value.strip()


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _wrong("'{key}' must be true or false")
    return value


def _texts(value: Any) -> tuple[str, ...]:
    """A string or a non-empty list of strings."""
    if isinstance(value, str) and value.strip():
        return (value.strip(),)
    if isinstance(value, list) and not value:
        raise _wrong("'{key}' must not be empty")
    if isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value):
        return tuple(v.strip() for v in value)
    raise _wrong("'{key}' must be a string or a list of strings")


def _one_of(choices: tuple[str, ...], what: str) -> Callable[[Any], str]:
    """A non-empty string from ``choices`` ("bad priority 'asap'; use one of ...")."""

    def check(value: Any) -> str:
        text = _text(value)
        if text not in choices:
            raise _wrong(f"bad {what} '{text}'; use one of {', '.join(choices)}")
        return text

    return check


def _email(value: Any) -> str:
    text = _text(value)
    if not _EMAIL_RE.fullmatch(text):
        raise _wrong(f"bad email address '{text}'")
    return text


def _address(value: Any) -> str:
    text = _text(value)
    if not _EMAIL_RE.fullmatch(text):
        raise _wrong("'{key}' must be an address")
    return text.lower()


def _acknowledge(value: Any) -> bool | str:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and _TEMPLATE_RE.fullmatch(value):
        return value
    raise _wrong("'{key}' must be true, false or a template name")


def _disposition(value: Any) -> str:
    if isinstance(value, str) and value.strip() in DISPOSITIONS:
        return value.strip()
    choices = ", ".join(f'"{d}"' for d in DISPOSITIONS)
    raise _wrong(f"bad disposition {value!r}; use one of {choices}")


def _known_customer(value: Any) -> str:
    if value in KNOWN_CUSTOMER:
        return str(value)
    raise _wrong(f"'{{key}}' must be one of {', '.join(KNOWN_CUSTOMER)}")


def _language(value: Any) -> str:
    text = _text(value)
    if text not in LANGUAGE_CODES:
        raise _wrong(f"no letters in language '{text}'; use one of {', '.join(LANGUAGE_CODES)}")
    return text


def _fraction(value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < 1:
        return float(value)
    raise _wrong("'{key}' must be a fraction between 0 and 1, e.g. 0.8")


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise _wrong("'{key}' must be a list")
    return value


# Each type is "value or None": None is only ever the default of a key not written (TOML has
# no null), so a validator sees every value the admin wrote and nothing else.
Text = Annotated[str | None, PlainValidator(_text)]
Flag = Annotated[bool | None, PlainValidator(_flag)]
Texts = Annotated[tuple[str, ...], PlainValidator(_texts)]
Email = Annotated[str | None, PlainValidator(_email)]
Address = Annotated[str | None, PlainValidator(_address)]
Priority = Annotated[str | None, PlainValidator(_one_of(PRIORITIES, "priority"))]
AssignMode = Annotated[str | None, PlainValidator(_one_of(ASSIGN_MODES, "assign mode"))]
Acknowledge = Annotated[bool | str | None, PlainValidator(_acknowledge)]
Disposition = Annotated[str | None, PlainValidator(_disposition)]
KnownCustomer = Annotated[str | None, PlainValidator(_known_customer)]
Language = Annotated[str | None, PlainValidator(_language)]
Fraction = Annotated[float | None, PlainValidator(_fraction)]
Steps = Annotated[list[Any], PlainValidator(_list)]
#: Checked where the rest is known (durations need their calendar, hours their days).
Raw = Any


class _Table(BaseModel):
    """A rules table: unknown keys are mistakes, values are never coerced.

    Required keys are listed in ``required`` rather than left without a default: a table
    missing one is still checked key by key, so one run reports every mistake.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=False)
    required: ClassVar[tuple[str, ...]] = ()


# ------------------------------------------------------------------------------- tables


class PersonTable(_Table):
    """``[people.ID]``."""

    required = ("name", "email")

    name: Text = None
    email: Email = None
    calendar: Text = None
    backup: Text = None
    manager: Text = None
    away: Raw = None  # dates or "first..last" ranges, parsed by the loader


class CalendarTable(_Table):
    """``[calendars.ID]``."""

    required = ("timezone", "hours")

    timezone: Text = None
    hours: Raw = None
    holidays: Raw = None
    country: Text = None
    subdivision: Text = None
    description: Text = None


class StepTable(_Table):
    """One ``escalation`` step of an SLA policy."""

    required = ("after",)

    after: Raw = None  # a duration in the policy calendar's working days
    notify: Text = None
    assign: Text = None


class PolicyTable(_Table):
    """``[sla.ID]``."""

    required = ("calendar",)

    calendar: Text = None
    first_response: Raw = None
    next_response: Raw = None
    resolution: Raw = None
    customer_notice: Flag = None
    escalation: Steps = Field(default_factory=list)
    warn_at: Fraction = None
    on_call: Texts = ()
    description: Text = None


class DefaultsTable(_Table):
    """``[defaults]``."""

    required = ("owner", "sla")

    owner: Text = None
    queue: Text = None
    sla: Text = None
    priority: Priority = None
    acknowledge: Acknowledge = None


class RouteTable(_Table):
    """One ``[[route]]``; its ``match`` table is the condition registry's
    (`gateway.routing.conditions`)."""

    required = ("name",)

    name: Text = None
    description: Text = None
    match: Raw = None
    queue: Text = None
    owner: Text = None
    team: Texts = ()
    assign: AssignMode = None
    sla: Text = None
    priority: Priority = None
    tags: Texts = ()
    acknowledge: Acknowledge = None
    notify: Texts = ()
    continue_: Flag = Field(False, alias="continue")
    disposition: Disposition = None
    known_customer: KnownCustomer = None
    language: Language = None
    brand: Text = None


class DkimTable(_Table):
    """A brand's ``dkim`` table."""

    required = ("domain", "selector", "key_file")

    domain: Text = None
    selector: Text = None
    key_file: Text = None


class BrandTable(_Table):
    """``[brands.ID]``."""

    required = ("from_address",)

    from_address: Address = None
    from_name: Text = None
    signature: Text = None
    business_name: Text = None
    reply_domain: Text = None
    dkim: Raw = None  # a DkimTable, checked with its own label
    description: Text = None


# ---------------------------------------------------------------------------- problems


def keys_of(model: type[BaseModel]) -> tuple[str, ...]:
    """The keys a table may have, as written in TOML, in documentation order."""
    return tuple(field.alias or name for name, field in model.model_fields.items())


def problems(error: ValidationError, model: type[BaseModel]) -> Iterator[tuple[Key, str]]:
    """(key path inside the table, message) for each mistake pydantic found.

    The message comes without the table's label, which the caller puts in front: an unknown
    key names the closest allowed one, a missing one is "missing required key", a value's own
    wording comes from its validator above.
    """
    for item in error.errors(include_url=False):
        loc: Key = tuple(item["loc"])
        kind = item["type"]
        key = str(loc[-1]) if loc else ""
        if kind == "extra_forbidden":
            yield loc, unknown_key(key, keys_of(model))
        else:
            yield loc, str(item["msg"]).replace("{key}", key)


def validate(model: type[_Table], data: dict[str, Any]) -> tuple[Any, list[tuple[Key, str]]]:
    """The model for the table ``data`` and its mistakes (`problems`, then missing keys).

    With mistakes, the model is what remains valid without the keys at fault, so the loader
    still checks the rest (a reference, a duration) and one run reports every mistake.
    """
    found: list[tuple[Key, str]] = []
    try:
        table = model.model_validate(data)
    except ValidationError as error:
        found = list(problems(error, model))
        at_fault = {loc[0] for loc, _ in found if loc}
        table = model.model_validate({k: v for k, v in data.items() if k not in at_fault})
    found += [((), f"missing required key '{key}'") for key in model.required if key not in data]
    return table, found
