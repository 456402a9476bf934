"""Letter templates: shipped files, an admin's overrides, rendering and `rules check`.

One file per letter and language in ``gateway/templates/`` (package data), named
``<letter>.<lang>.txt``. The file's text up to the first section line is the letter's body;
each ``=== name ===`` line starts a *phrase*, a sentence the code puts together with facts
(a deadline line, one attachment line, ...). Placeholders are ``$name`` or ``${name}``
(:class:`string.Template`), nothing else: a template cannot compute, only say.

Templates receive persons and times as *facts* taken from the ticket and the plan the
escalator enforces (the stored deadline, the named owner; gateway.sla.plan): they never
compute them, so a letter cannot promise something the escalator will not do.

Overrides: a file with the same name in ``templates_dir`` (default ``templates`` beside the
rules folder) wins; a phrase it does not contain comes from the shipped file. A language-less
``<letter>.txt`` there is the override for the installation's default language (the form the
gateway read before templates had languages). ``common.<lang>.txt`` holds phrases several letters
share.
"""

from __future__ import annotations

import functools
import os
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from gateway.letters.i18n import DEFAULT_LANGUAGE, LANGUAGES

__all__ = [
    "LETTERS",
    "Letter",
    "LetterSpec",
    "Template",
    "check_templates",
    "load",
    "render",
    "shipped_names",
    "sources",
]

_SECTION_RE = re.compile(r"^=== ([a-z0-9_]+) ===[ \t]*$")
_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class LetterSpec:
    """What a letter may say: the body's facts, the facts it must use, its phrases."""

    name: str
    description: str
    facts: frozenset[str]
    #: Each inner tuple is "at least one of these" (a deadline may be written three ways).
    required: tuple[tuple[str, ...], ...] = ()
    phrases: dict[str, frozenset[str]] = field(default_factory=dict)
    #: "customer" letters are written in the ticket's language; "staff" ones in English.
    audience: str = "customer"


def _f(*names: str) -> frozenset[str]:
    return frozenset(names)


_COMMON_PHRASES = {
    "what_first_response": _f(),
    "what_next_response": _f(),
    "what_resolution": _f(),
    "commitment_none": _f("who", "ref"),
    "commitment_by": _f("who", "ref", "by"),
    "commitment_then": _f("who", "then"),
    "and": _f(),
    "no_subject": _f(),
    "staff_reply_footer": _f("ref"),
    "others_head": _f(),
    "open_head": _f(),
    "request_line": _f("ref", "subject", "who", "deadline"),
    "deadline_first": _f("when"),
    "deadline_next": _f("when"),
    "deadline_resolution": _f("when"),
    "deadline_waiting": _f(),
    "deadline_none": _f(),
}

#: The registry: every template the gateway renders, what it may and must say.
LETTERS: dict[str, LetterSpec] = {
    spec.name: spec
    for spec in (
        LetterSpec(
            "ack",
            "acknowledgement of a new ticket (to the customer)",
            _f(
                "ref", "owner", "subject", "deadline", "deadline_local", "deadline_utc",
                "hours", "received", "performance", "reply_address", "signature",
                "business_name", "others", "notice",
            ),
            (("ref",), ("owner",), ("deadline", "deadline_local", "deadline_utc")),
            {
                "deadline": _f("due_local", "due_utc"),
                "deadline_their_zone": _f("due_theirs"),
                "deadline_back": _f("back"),
                "hours": _f("hours"),
                "hours_closed": _f("hours", "back"),
                "received_head": _f(),
                "received_subject": _f("subject"),
                "attachments_one": _f("count", "total"),
                "attachments_many": _f("count", "total"),
                "attachment_line": _f("name", "size"),
                "unnamed": _f(),
                "no_attachments": _f(),
                "not_kept": _f("what", "size", "why"),
                "performance": _f("days", "median", "p90", "tickets"),
            },
        ),
        LetterSpec(
            "notice",
            "customer notice: a promise was broken, and what the plan does now",
            _f("said", "commitment", "hours", "ref", "signature", "business_name"),
            (("ref",), ("said",), ("commitment",)),
            {"owned_person": _f("person", "when"), "owned_clock": _f("what", "when")},
        ),
        LetterSpec(
            "late",
            "late-processing message (instead of an acknowledgement)",
            _f(
                "received", "processed", "missed", "commitment", "hours", "ref", "signature",
                "business_name",
            ),
            (("ref",), ("received",), ("processed",), ("commitment",)),
            {"missed_item": _f("what", "when")},
        ),
        LetterSpec(
            "bundled",
            "bundled acknowledgement: further mails of one customer within the ack window",
            _f(
                "intro", "items", "open_requests", "notice", "ref", "count", "signature",
                "business_name", "reply_address",
            ),
            (("ref",), ("items",)),
            {
                "intro_one": _f(),
                "intro_many": _f("count"),
                "item": _f(
                    "n", "subject", "received", "received_local", "where", "who", "deadline",
                    "ref",
                ),
                "where_new": _f("ref"),
                "where_added": _f("ref", "ticket_subject"),
                "subject_one": _f("ref"),
                "subject_many": _f("ref", "count"),
                "subject_refs": _f("count", "refs"),
            },
        ),
        LetterSpec(
            "cap",
            "the daily-cap paragraph of the acknowledgement that reaches outbound.daily_ack_cap",
            _f("cap", "where"),
            (("cap",),),
            {"where": _f("requests"), "request": _f("ref", "who", "deadline")},
        ),
        LetterSpec(
            "notify",
            "owner notification: a new ticket or a customer writing again (to staff, English)",
            _f(
                "unverified", "headline", "why", "references", "warnings", "ref", "status",
                "subject", "requester", "owner", "queue", "priority", "deadlines", "sender",
                "received", "message_subject", "message", "files", "footer",
            ),
            (("ref",), ("owner",), ("deadlines",), ("message",)),
            {
                "unverified": _f("why", "sender"),
                "warning": _f("warning"),
                "no_text": _f(),
                "files_attached": _f("count", "noun", "total"),
                "files_not_attached": _f("count", "noun", "total", "limit"),
                "file_line": _f("name", "size"),
                "why_route": _f("routes"),
                "noun_one": _f(),
                "noun_many": _f(),
                "no_subject": _f(),
            },
            audience="staff",
        ),
        LetterSpec(
            "handover",
            "handover pack: a ticket's whole history to whoever receives it (to staff, English)",
            _f(
                "reason", "notes", "ref", "status", "subject", "requester", "owner", "queue",
                "priority", "deadlines", "messages", "distinct", "attached", "history",
                "footer",
            ),
            (("ref",), ("owner",), ("history",)),
            {
                "note": _f("note"),
                "one_message": _f(),
                "messages": _f("count"),
                "no_messages": _f(),
                "was": _f("name"),
                "entry_head": _f("n", "total", "at", "label"),
                "entry_subject": _f("subject"),
                "no_subject": _f(),
                "entry_no_text": _f(),
                "entry_files": _f(),
                "file_attached": _f("name", "size"),
                "file_same": _f("name", "size", "n"),
                "file_not_attached": _f("name", "size", "limit"),
                "label_customer": _f("who"),
                "label_staff_answer": _f("author"),
                "label_note": _f("author"),
                "label_note_commands": _f("author", "commands"),
                "label_commands": _f("author", "commands"),
                "label_notice": _f(),
                "label_ack": _f("who"),
                "label_auto_reply": _f("who"),
                "label_bounce": _f("who"),
                "unknown_sender": _f(),
                "unknown_author": _f(),
            },
            audience="staff",
        ),
        LetterSpec(
            "alert",
            "alert to the admins ([alerts] admins; English)",
            _f("details", "subject"),
            (("details",),),
            audience="staff",
        ),
        LetterSpec(
            "staff",
            "lines of the letters to staff (English): owner notification, handover, alerts",
            _f(),
            (),
            {
                "notify_new": _f("ref", "who"),
                "notify_again": _f("ref", "who"),
                "reply_footer": _f("requester", "from_address", "commands"),
                "handover_subject": _f("ref", "subject"),
                "held_subject": _f("ref", "holder", "subject"),
                "held_body": _f(
                    "ref", "subject", "requester", "holder", "holder_email", "reason"
                ),
                "alert_subject": _f("subject"),
                "ack_limit_subject": _f("ref", "sender"),
                "ack_limit_body": _f("ref", "sender", "cap", "subject"),
                "bundled_intro": _f("sender", "count", "mails", "window"),
                "bundled_item": _f(
                    "n", "where", "owner", "status", "deadline", "sender", "received",
                    "subject", "text",
                ),
                "bundled_new": _f("ref"),
                "bundled_reply": _f("ref"),
                "bundled_added": _f("ref"),
                "bundled_footer": _f("ref", "from_address"),
                "bundled_subject": _f("ref", "count", "sender", "refs"),
                "duplicate_subject": _f("ref", "others"),
                "duplicate_body": _f(
                    "requester", "ref", "subject", "deadline", "lines", "first"
                ),
                "deadlines_paused": _f(),
                "due_first": _f("when"),
                "due_next": _f("when"),
                "due_resolution": _f("when"),
                "deadlines_none": _f(),
            },
            audience="staff",
        ),
        LetterSpec(
            "escalation",
            "escalation letters to staff (English): warning, ladder step, handover, broken promise",
            _f(
                "headline", "ref", "subject", "requester", "owner", "clock", "deadline_local",
                "deadline_utc", "hours", "notes", "last_message",
            ),
            (("ref",), ("headline",)),
            {
                "note": _f("ref", "note"),
                "last_message": _f("ref", "at", "from_address", "text"),
                "no_text": _f("ref"),
                "no_owner": _f("ref"),
                "clock_first_response": _f("ref"),
                "clock_next_response": _f("ref"),
                "clock_resolution": _f("ref"),
                "warning_subject": _f("ref", "clock"),
                "warning_headline": _f("ref", "clock", "due"),
                "step": _f("ref", "step", "steps"),
                "escalation_subject": _f("ref", "clock"),
                "escalation_headline": _f("ref", "clock", "due", "step"),
                "handover_subject": _f("ref", "clock"),
                "handover_headline": _f("ref", "clock", "due", "step"),
                "handover_answer_by": _f("ref", "by"),
                "handover_answer_by_then": _f("ref", "by", "then"),
                "handover_told": _f("ref", "clock", "due", "step", "who"),
                "broken_subject": _f("ref"),
                "broken_headline": _f("ref"),
                "broken_headline_by": _f("ref", "by"),
            },
            audience="staff",
        ),
        LetterSpec("common", "phrases several letters share", _f(), (), _COMMON_PHRASES),
    )
}  # fmt: skip


@dataclass(frozen=True)
class Template:
    """One parsed file: its body, its phrases, and where each came from (for errors)."""

    path: str
    body: str
    phrases: dict[str, str]
    #: section ("" = body) -> first line number in the file
    lines: dict[str, int]


def parse(text: str, path: str) -> Template:
    """Split a template file into its body and ``=== name ===`` phrases."""
    body: list[str] = []
    phrases: dict[str, list[str]] = {}
    lines = {"": 1}
    current = body
    for number, line in enumerate(text.splitlines(), start=1):
        m = _SECTION_RE.match(line)
        if m:
            current = phrases.setdefault(m.group(1), [])
            lines[m.group(1)] = number + 1
            continue
        current.append(line)
    joined = {k: "\n".join(v).strip("\n") for k, v in phrases.items()}
    return Template(path, "\n".join(body).strip("\n"), joined, lines)


def _shipped_text(filename: str) -> str | None:
    try:
        return resources.files("gateway").joinpath("templates", filename).read_text("utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return None


@functools.cache
def _shipped(filename: str) -> Template | None:
    """A shipped file, parsed once per process (package data does not change under a running
    process; every letter read and parsed its files again: docs/performance.md §5)."""
    text = _shipped_text(filename)
    return None if text is None else parse(text, f"gateway/templates/{filename}")


# An admin's overrides, parsed, by path: kept while the file's (mtime, size, inode) stay the
# same, so an edit is read by the next letter, as when every letter read the file.
_OVERRIDES: dict[str, tuple[tuple[int, int, int], Template]] = {}


def _override(templates_dir: Path | None, filename: str) -> Template | None:
    if templates_dir is None:
        return None
    path = Path(templates_dir) / filename
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    key, stamp = str(path), (st.st_mtime_ns, st.st_size, st.st_ino)
    known = _OVERRIDES.get(key)
    if known is not None and known[0] == stamp:
        return known[1]
    found = _override_text(templates_dir, filename)
    if found is None:
        _OVERRIDES.pop(key, None)
        return None
    template = parse(*found)
    _OVERRIDES[key] = (stamp, template)
    return template


def shipped_names() -> list[str]:
    """Every shipped template file name, sorted."""
    folder = resources.files("gateway").joinpath("templates")
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".txt"))


def _override_text(templates_dir: Path | None, filename: str) -> tuple[str, str] | None:
    if templates_dir is None:
        return None
    path = Path(templates_dir) / filename
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None


@dataclass(frozen=True)
class Letter:
    """A letter ready to render in one language: body and phrases resolved, with sources."""

    name: str
    lang: str
    body: str
    phrases: dict[str, str]
    #: the file the body came from ("gateway/templates/ack.de.txt" or the override's path)
    source: str

    def phrase(self, key: str, **facts: object) -> str:
        text = self.phrases.get(key, "")
        if "$" not in text:
            return text  # nothing to substitute (safe_substitute would give it back as it is)
        return string.Template(text).safe_substitute({k: str(v) for k, v in facts.items()})


def _override_names(name: str, lang: str, default_language: str) -> list[str]:
    """The override files of letter ``name`` in ``lang``, most specific first."""
    return [f"{name}.{lang}.txt", *([f"{name}.txt"] if lang == default_language else [])]


def _layers(
    name: str, lang: str, templates_dir: Path | None, default_language: str, shipped: bool
) -> list[Template]:
    """Most specific first: the override for ``lang``, the language-less override (it speaks
    the installation's default language), then the shipped file for ``lang`` and English."""
    found: list[Template] = []
    for filename in _override_names(name, lang, default_language):
        override = _override(templates_dir, filename)
        if override is not None:
            found.append(override)
    if shipped:
        for code in dict.fromkeys((lang, DEFAULT_LANGUAGE)):
            template = _shipped(f"{name}.{code}.txt")
            if template is not None:
                found.append(template)
    return found


# load()'s letters by its arguments, with the override files the letter was made of and
# their (mtime, size, inode) stamps, None for a missing one (docs/performance.md §5). Every
# load still stats each file an override could be in, as it did before it was cached, so an
# edited, new or removed override is read by the next letter; only the pathlib objects, the
# layering and the merging of phrases are saved. A templates_dir that does not exist is one
# stat: no file can be in it. The Letter is shared by the callers that get it: nothing
# changes a Letter's phrases (``dataclasses.replace`` makes a new Letter).
_Stamp = tuple[int, int, int] | None
_LOADED: dict[tuple[str, str, str, str], tuple[tuple[str, ...], tuple[_Stamp, ...], Letter]] = {}
#: Cached letters at most (names come from the rules and the code, so this is never reached
#: but by a bug; then the cache starts again rather than grow).
_LOADED_MAX = 1024


def _stamp(path: str) -> _Stamp:
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def _stamps(folder: str, paths: tuple[str, ...]) -> tuple[_Stamp, ...]:
    try:
        os.stat(folder)
    except (FileNotFoundError, NotADirectoryError):
        return (None,) * len(paths)  # no folder, no file in it
    return tuple(_stamp(p) for p in paths)


def load(
    name: str,
    lang: str = DEFAULT_LANGUAGE,
    templates_dir: Path | None = None,
    *,
    default_language: str = DEFAULT_LANGUAGE,
) -> Letter:
    """The letter ``name`` in ``lang`` (English for a phrase nobody wrote in ``lang``).

    ``name`` may be a route's own acknowledgement (``acknowledge = "vip"``): its body comes
    from ``vip.<lang>.txt``/``vip.txt`` in ``templates_dir``, else from ``ack``; its phrases
    from ``ack``.
    """
    if templates_dir is None:
        key = (name, lang, "", default_language)
        known = _LOADED.get(key)
        if known is not None:
            return known[2]
        letter = _load(name, lang, None, default_language)
        _remember(key, (), (), letter)
        return letter
    folder = os.fspath(templates_dir)
    key = (name, lang, folder, default_language)
    known = _LOADED.get(key)
    if known is not None:
        paths = known[0]
    else:
        paths = tuple(
            os.path.join(folder, f) for f in _override_files(name, lang, default_language)
        )
    # Stamped before reading: a file that changes meanwhile is read again by the next letter.
    stamps = _stamps(folder, paths)
    if known is not None and known[1] == stamps:
        return known[2]
    letter = _load(name, lang, templates_dir, default_language)
    _remember(key, paths, stamps, letter)
    return letter


def _remember(
    key: tuple[str, str, str, str],
    paths: tuple[str, ...],
    stamps: tuple[_Stamp, ...],
    letter: Letter,
) -> None:
    if len(_LOADED) >= _LOADED_MAX:
        _LOADED.clear()
    _LOADED[key] = (paths, stamps, letter)


def _override_files(name: str, lang: str, default_language: str) -> list[str]:
    """Every override file ``_load`` may read for these arguments."""
    if lang not in LANGUAGES:
        lang = DEFAULT_LANGUAGE
    if not _NAME_RE.fullmatch(name):
        name = "ack"
    base = name if name in LETTERS else "ack"
    names = [name, base, "common"] if base != name else [base, "common"]
    return [f for n in names for f in _override_names(n, lang, default_language)]


def _load(name: str, lang: str, templates_dir: Path | None, default_language: str) -> Letter:
    if lang not in LANGUAGES:
        lang = DEFAULT_LANGUAGE
    if not _NAME_RE.fullmatch(name):
        name = "ack"
    base = name if name in LETTERS else "ack"
    layers: list[Template] = []
    if base != name:
        layers += _layers(name, lang, templates_dir, default_language, shipped=False)
    layers += _layers(base, lang, templates_dir, default_language, shipped=True)
    body, source = "", ""
    for t in layers:
        if t.body.strip():
            body, source = t.body, t.path
            break
    layers += _layers("common", lang, templates_dir, default_language, shipped=True)
    phrases: dict[str, str] = {}
    for t in reversed(layers):
        phrases.update(t.phrases)
    return Letter(name, lang, body, phrases, source)


def sources(
    lang: str,
    templates_dir: Path | None,
    *,
    default_language: str = DEFAULT_LANGUAGE,
    ack: str = "ack",
) -> dict[str, tuple[str, str]]:
    """Every letter of the registry: (language, file its body comes from) as it would be
    used for a ticket in ``lang`` (``rules explain``); ``ack`` is a route's own template.
    Staff letters are English."""
    out: dict[str, tuple[str, str]] = {}
    for name, spec in LETTERS.items():
        code = lang if spec.audience == "customer" else DEFAULT_LANGUAGE
        letter = load(
            ack if name == "ack" else name, code, templates_dir, default_language=default_language
        )
        # A letter of phrases only (common, staff): the file its phrases come from.
        source = letter.source or _phrase_source(name, code, templates_dir, default_language)
        out[name] = (code, source)
    return out


def _phrase_source(name: str, lang: str, templates_dir: Path | None, default_language: str) -> str:
    layers = _layers(name, lang, templates_dir, default_language, shipped=True)
    return layers[0].path if layers else ""


_BLANK_LINES = re.compile(r"\n{3,}")


def render(letter: Letter, facts: Mapping[str, str], verbatim: Sequence[str] = ()) -> str:
    """The body with its facts; blank facts leave no hole of empty lines. The facts named
    in ``verbatim`` (a customer's own text) are placed after that tidying, as they are."""
    marks = {name: f"\x00{i}\x00" for i, name in enumerate(verbatim)}
    values = {k: marks.get(k, v) for k, v in facts.items()}
    text = string.Template(letter.body).safe_substitute(values)
    text = _BLANK_LINES.sub("\n\n", text).strip() + "\n"
    for name, mark in marks.items():
        text = text.replace(mark, facts.get(name, ""))
    return text


# --------------------------------------------------------------------------- checking


def _placeholders(text: str) -> list[tuple[int, str]]:
    """(line offset, name) of every placeholder; ``$$`` is a literal dollar."""
    found = []
    for m in string.Template.pattern.finditer(text):
        name = m.group("named") or m.group("braced")
        if name:
            found.append((text.count("\n", 0, m.start()), name))
        elif m.group("invalid") is not None:
            found.append((text.count("\n", 0, m.start()), "$"))
    return found


def check_text(text: str, path: str, spec: LetterSpec, *, body_required: bool) -> list[str]:
    """Problems of one template file as ``file:line: message``."""
    problems: list[str] = []
    t = parse(text, path)
    sections = {"": t.body, **t.phrases}
    for section, content in sections.items():
        if section and section not in spec.phrases and section not in _COMMON_PHRASES:
            problems.append(
                f"{path}:{t.lines[section] - 1}: unknown phrase '{section}' in the "
                f"'{spec.name}' template; known: {', '.join(sorted(spec.phrases))}"
            )
            continue
        if section:
            allowed = spec.phrases.get(section, _COMMON_PHRASES.get(section, _f()))
        else:
            allowed = spec.facts
        # The body starts at line 1; a phrase's content on the line after its header.
        first = t.lines[section] + (_leading_blank(text) if not section else 0)
        problems += _placeholder_problems(content, allowed, f"{path}:", first, section)
    if t.body.strip():
        used = {name for _, name in _placeholders(t.body)}
        for group in spec.required:
            if not used.intersection(group):
                need = " or ".join(f"${n}" for n in group)
                problems.append(
                    f"{path}:1: the '{spec.name}' letter must state {need} "
                    "(a fact from the ticket and its plan)"
                )
    elif body_required:
        problems.append(f"{path}:1: the template has no text")
    return problems


def _placeholder_problems(
    content: str, allowed: frozenset[str], where: str, first: int, section: str
) -> list[str]:
    """A lone ``$`` or a placeholder not in ``allowed`` in one section (body: ``""``) whose
    content starts at line ``first`` of the file (``where`` is ``"path:"``)."""
    problems: list[str] = []
    for offset, name in _placeholders(content):
        if name == "$":
            problems.append(f"{where}{first + offset}: a lone '$' (write '$$' for a dollar sign)")
        elif name not in allowed:
            known = ", ".join(f"${n}" for n in sorted(allowed)) or "none"
            problems.append(
                f"{where}{first + offset}: unknown placeholder ${name} in "
                f"{'the body' if not section else f'phrase {section!r}'}; allowed: {known}"
            )
    return problems


def _leading_blank(text: str) -> int:
    # parse() strips leading blank lines of the body; count them back for line numbers.
    n = 0
    for line in text.splitlines():
        if line.strip():
            break
        n += 1
    return n


def check_templates(templates_dir: Path, route_templates: tuple[str, ...] = ()) -> list[str]:
    """Every override in ``templates_dir``: unknown letters, placeholders and phrases, and
    missing required facts, each ``file:line: message``. A missing folder is no problem."""
    folder = Path(templates_dir)
    if not folder.is_dir():
        return []
    problems: list[str] = []
    for path in sorted(folder.glob("*.txt")):
        parts = path.name[: -len(".txt")].split(".")
        name = parts[0]
        lang = parts[1] if len(parts) > 1 else None
        if len(parts) > 2 or (lang is not None and lang not in LANGUAGES):
            problems.append(
                f"{path}:1: name templates <letter>.<language>.txt with a language of "
                f"{', '.join(LANGUAGES)}"
            )
            continue
        spec = LETTERS.get(name)
        if spec is None and name in route_templates:
            spec = LETTERS["ack"]  # a route's own acknowledgement
        if spec is None:
            problems.append(
                f"{path}:1: unknown template '{name}'; known: "
                f'{", ".join(sorted(LETTERS))} or a route\'s acknowledge = "{name}"'
            )
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            problems.append(f"{path}:1: cannot read: {error}")
            continue
        problems += check_text(text, str(path), spec, body_required=name not in ("common", "staff"))
    return problems
