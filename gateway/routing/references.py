"""Cross-references between rules tables: which keys name a person, calendar, SLA policy or
brand, ids defined twice, and references to ids nobody defined (docs/rules.md "What rules
check catches").

References are read from the raw tables, not from validated values, so a table with some
other mistake still has its references checked and one run of `rules check` reports
everything. They are checked once every file is loaded (a route may name a person defined in
a later file); the loader skips the check when a file had a syntax error, since everything
defined there would otherwise look unknown.
"""

from __future__ import annotations

import difflib
from collections.abc import Container, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.routing.locator import Key, Source

__all__ = ["REFERENCES", "Definitions", "Reference", "references_in", "unknown"]

#: What each kind of id is called in messages.
KINDS = {"person": "person", "calendar": "calendar", "sla": "SLA policy", "brand": "brand"}

#: Per table, (key, kind of id it names, whether it may be a list of ids).
REFERENCES: dict[str, tuple[tuple[str, str, bool], ...]] = {
    "person": (
        ("calendar", "calendar", False),
        ("backup", "person", False),
        ("manager", "person", False),
    ),
    "sla": (("calendar", "calendar", False), ("on_call", "person", True)),
    "step": (("notify", "person", False), ("assign", "person", False)),
    "defaults": (("owner", "person", False), ("sla", "sla", False)),
    "route": (
        ("owner", "person", False),
        ("team", "person", True),
        ("notify", "person", True),
        ("sla", "sla", False),
        ("brand", "brand", False),
    ),
}


@dataclass(frozen=True)
class Reference:
    """One id named at ``path`` of ``source``, by the table called ``label``."""

    kind: str  # a key of KINDS
    id: str
    source: Source
    path: Key
    label: str


def references_in(
    table: str,
    data: Mapping[str, Any],
    source: Source,
    path: Key,
    label: str,
    skip: Mapping[str, Container[str]] | None = None,
) -> Iterator[Reference]:
    """The references of one ``table`` kind (`REFERENCES`); ``skip`` maps a key to ids that
    are not references there (escalation roles, a person's own id)."""
    for key, kind, many in REFERENCES[table]:
        value = data.get(key)
        if isinstance(value, list) and not many:
            continue  # the schema reports it
        items = list(enumerate(value)) if isinstance(value, list) else [(None, value)]
        for index, item in items:
            if not isinstance(item, str) or not item.strip():
                continue  # the schema reports it
            if skip is not None and item.strip() in skip.get(key, ()):
                continue
            at: Key = (*path, key) if index is None else (*path, key, index)
            yield Reference(kind, item.strip(), source, at, label)


def unknown(
    refs: list[Reference], known: Mapping[str, set[str]]
) -> Iterator[tuple[Reference, str]]:
    """Each reference to an id nobody defined, with the message (and the closest id)."""
    for ref in refs:
        ids = known[ref.kind]
        if ref.id in ids:
            continue
        hint = difflib.get_close_matches(ref.id, sorted(ids), n=1)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        yield ref, f"{ref.label}: unknown {KINDS[ref.kind]} '{ref.id}'{suggestion}"


@dataclass
class Definitions:
    """Where each id was defined (across files), to report one defined twice."""

    seen: dict[str, dict[str, str]] = field(default_factory=dict)

    def define(self, kind: str, id: str, where: str) -> str | None:
        """Record ``id``; when it was defined before, return where (and keep the first)."""
        known = self.seen.setdefault(kind, {})
        if id in known:
            return known[id]
        known[id] = where
        return None

    def ids(self, kind: str) -> set[str]:
        return set(self.seen.get(kind, {}))
