"""Which language a ticket's letters speak, and why (docs/decisions.md D17).

In this order, the first that answers wins (the reason goes to the audit trail as the
ticket's ``language`` event):

1. the route's ``language = "de"`` (an admin's decision, e.g. a German-only address);
2. the customer's earlier choice: the language an earlier ticket of the same customer was
   written in by the customer (its header or its detected text; never a default);
3. the message's ``Content-Language`` header (RFC 3282), first supported primary subtag;
4. detection of the message text with py3langid (a maintained fork of langid.py with its
   model bundled: offline, and deterministic: a naive Bayes classifier has no random seed),
   trusted only for a text of at least ``MIN_LETTERS`` letters and a normalised probability
   of at least ``MIN_CONFIDENCE`` (short "ok thanks" mails are too ambiguous);
5. the installation's ``outbound.default_language``.
"""

from __future__ import annotations

import itertools
import re
import threading
from dataclasses import dataclass
from typing import Any

from gateway.letters.i18n import LANGUAGES

__all__ = ["MIN_CONFIDENCE", "MIN_LETTERS", "Choice", "choose", "detect", "from_header"]

#: Below this many letters a text says too little about its language.
MIN_LETTERS = 20
#: Normalised probability a detection must reach to be believed.
MIN_CONFIDENCE = 0.80
#: Only the start of a long text is read: enough for the language, cheap for a huge mail.
_READ = 2000

_LETTER = re.compile(r"[^\W\d_]")

#: Sources a later ticket may take as "the customer's earlier choice".
CUSTOMER_SOURCES = ("header", "detected", "customer")


@dataclass(frozen=True)
class Choice:
    lang: str
    source: str  # "route" | "customer" | "header" | "detected" | "default"
    reason: str


def from_header(values: list[str]) -> str | None:
    """The first supported language of ``Content-Language: de-DE, en`` (RFC 3282)."""
    for value in values:
        for tag in str(value).split(","):
            primary = tag.strip().split("-", 1)[0].split("_", 1)[0].lower()
            if primary in LANGUAGES:
                return primary
    return None


_identifier: Any = None
_lock = threading.Lock()


def _model() -> Any:
    global _identifier  # noqa: PLW0603 (one lazily loaded model per process, under _lock)
    with _lock:
        if _identifier is None:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier

            _identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        return _identifier


def warm_up() -> None:
    """Load the model now (a long-running process, before it freezes its start-up heap)."""
    _model()


def _body_text(text: str) -> str:
    # Quoted history and signatures may be in another language than what the person wrote.
    kept: list[str] = []
    for line in text.splitlines():
        if line.strip() in ("--", "-- "):
            break
        if not line.lstrip().startswith(">"):
            kept.append(line)
    return "\n".join(kept)[:_READ]


def detect(text: str) -> tuple[str, float] | None:
    """(language, probability) of ``text``, or None when it is too short to tell."""
    body = _body_text(text or "")
    # Letters are counted up to MIN_LETTERS only: a long text is not listed letter by letter.
    if sum(1 for _ in itertools.islice(_LETTER.finditer(body), MIN_LETTERS)) < MIN_LETTERS:
        return None
    lang, probability = _model().classify(body)
    return str(lang), float(probability)


def choose(
    *,
    route: str | None,
    route_name: str | None,
    earlier: tuple[str, str] | None,
    content_language: list[str],
    text: str,
    default: str,
) -> Choice:
    """The language and its reason; ``earlier`` is (language, ticket ref) or None."""
    if route:
        return Choice(route, "route", f"route {route_name or '(defaults)'} says language = {route}")
    if earlier is not None and earlier[0] in LANGUAGES:
        return Choice(earlier[0], "customer", f"the customer's earlier ticket {earlier[1]}")
    header = from_header(content_language)
    if header is not None:
        return Choice(header, "header", f"Content-Language: {', '.join(content_language)}")
    found = detect(text)
    if found is not None:
        lang, probability = found
        if probability >= MIN_CONFIDENCE and lang in LANGUAGES:
            return Choice(lang, "detected", f"detected in the text ({probability:.2f})")
        default_reason = (
            f"detection unsure ({lang} {probability:.2f})"
            if lang in LANGUAGES
            else f"detected {lang} ({probability:.2f}), no letters in it"
        )
    else:
        default_reason = "text too short to detect"
    return Choice(default, "default", f"installation default; {default_reason}")
