"""Letter templates, languages and formats (gateway.letters; docs/decisions.md D17)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.letters import i18n
from gateway.letters.language import MIN_LETTERS, choose, detect, from_header
from gateway.letters.templates import (
    LETTERS,
    check_templates,
    load,
    parse,
    render,
    shipped_names,
)
from gateway.sla.business_time import BusinessCalendar

BERLIN = BusinessCalendar.build(
    "berlin", "Europe/Berlin", {d: "09:00-17:00" for d in ("mon", "tue", "wed", "thu", "fri")}
)
DUE = datetime(2026, 11, 23, 13, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("lang", "expected"),
    [
        ("en", "Monday 23 November 2026, 14:00 CET (Europe/Berlin)"),
        ("de", "Montag, 23. November 2026, 14:00 Uhr CET (Europe/Berlin)"),
        ("fr", "lundi 23 novembre 2026 à 14:00 CET (Europe/Berlin)"),
        ("es", "lunes, 23 de noviembre de 2026, 14:00 CET (Europe/Berlin)"),
        ("ru", "понедельник, 23 ноября 2026 г., 14:00 CET (Europe/Berlin)"),
    ],
)
def test_dates_are_written_for_the_language(lang: str, expected: str) -> None:
    assert i18n.format_local(DUE, BERLIN, lang) == expected


def test_hours_sizes_and_durations_per_language() -> None:
    assert i18n.describe_hours(BERLIN, "en") == BERLIN.describe_hours()
    assert i18n.describe_hours(BERLIN, "de") == "Mo–Fr 09:00–17:00 (Europe/Berlin)"
    assert i18n.describe_hours(BERLIN, "ru") == "пн–пт 09:00–17:00 (Europe/Berlin)"
    assert i18n.describe_size(3 * 1024 * 1024 // 2, "de") == "1,5 MB"
    assert i18n.describe_size(3 * 1024 * 1024 // 2, "en") == "1.5 MB"
    assert i18n.duration(timedelta(minutes=125), "de") == "2 Std. 5 Min."


def test_every_shipped_template_passes_its_own_check(tmp_path: Path) -> None:
    names = shipped_names()
    # Every letter of the registry is shipped: customer letters in every language, letters
    # to staff in English; and nothing is shipped that the registry does not know.
    for letter, spec in LETTERS.items():
        langs = i18n.LANGUAGES if spec.audience == "customer" else ("en",)
        for lang in langs:
            assert f"{letter}.{lang}.txt" in names
    assert {n.split(".")[0] for n in names} == set(LETTERS)
    # The shipped files are valid overrides of themselves (same placeholders, same facts).
    for name in names:
        text = (Path(__file__).parents[2] / "gateway" / "templates" / name).read_text()
        (tmp_path / name).write_text(text)
    assert check_templates(tmp_path) == []


def test_every_language_has_every_english_phrase() -> None:
    # Each language's OWN file (not load(), which falls back to English phrase by phrase).
    folder = Path(__file__).parents[2] / "gateway" / "templates"
    customer = [n for n, spec in LETTERS.items() if spec.audience == "customer"]
    assert {"ack", "bundled", "cap", "notice", "late", "common"} <= set(customer)
    for name in customer:
        english = parse((folder / f"{name}.en.txt").read_text(), name)
        for lang in i18n.LANGUAGES:
            own = parse((folder / f"{name}.{lang}.txt").read_text(), name)
            assert set(own.phrases) >= set(english.phrases), (lang, name)
            assert bool(own.body.strip()) == bool(english.body.strip()), (lang, name)


def test_override_wins_and_missing_phrases_come_from_the_shipped_file(tmp_path: Path) -> None:
    (tmp_path / "ack.de.txt").write_text("Hallo! $ref bei $owner, bis $deadline_utc.\n")
    letter = load("ack", "de", tmp_path)
    assert letter.source == str(tmp_path / "ack.de.txt")
    assert letter.phrase("no_attachments") == "  Keine Anhänge."
    text = render(letter, {"ref": "A-1", "owner": "Alice", "deadline_utc": "2026-11-23T13:00Z"})
    assert text == "Hallo! A-1 bei Alice, bis 2026-11-23T13:00Z.\n"
    # The language-less override is the default language's; German ignores it.
    (tmp_path / "notice.txt").write_text("Sorry: $said $commitment $ref\n")
    assert load("notice", "en", tmp_path).source == str(tmp_path / "notice.txt")
    assert load("notice", "de", tmp_path).source == "gateway/templates/notice.de.txt"


def test_an_edited_or_removed_override_is_read_by_the_next_letter(tmp_path: Path) -> None:
    """Templates are parsed once, but an admin's edit counts at once (as when every letter
    read its files)."""
    override = tmp_path / "ack.txt"
    override.write_text("First $ref $owner $deadline\n")
    assert load("ack", "en", tmp_path).body == "First $ref $owner $deadline"
    assert load("ack", "en", tmp_path).body == "First $ref $owner $deadline"
    override.write_text("Second, longer: $ref $owner $deadline\n")
    assert load("ack", "en", tmp_path).body == "Second, longer: $ref $owner $deadline"
    override.unlink()
    assert load("ack", "en", tmp_path).source == "gateway/templates/ack.en.txt"
    override.mkdir()  # a folder where a file was: the shipped letter, as before
    assert load("ack", "en", tmp_path).source == "gateway/templates/ack.en.txt"


def test_a_new_override_or_templates_folder_is_read_by_the_next_letter(tmp_path: Path) -> None:
    """Letters are cached, but each load still looks at every file that could override it."""
    folder = tmp_path / "templates"
    assert load("ack", "de", folder).source == "gateway/templates/ack.de.txt"
    folder.mkdir()
    assert load("ack", "de", folder).source == "gateway/templates/ack.de.txt"
    (folder / "common.de.txt").write_text("=== no_subject ===\n(ohne Betreff, hier)\n")
    assert load("ack", "de", folder).phrases["no_subject"] == "(ohne Betreff, hier)"
    (folder / "ack.de.txt").write_text("Hallo $ref $owner $deadline\n")
    assert load("ack", "de", folder).body == "Hallo $ref $owner $deadline"
    assert load("ack", "de", folder).source == str(folder / "ack.de.txt")
    with (folder / "ack.de.txt").open("w") as f:  # edited in place: the folder is unchanged
        f.write("Servus $ref $owner $deadline\n")
    assert load("ack", "de", folder).body == "Servus $ref $owner $deadline"
    (folder / "ack.de.txt").unlink()
    (folder / "common.de.txt").unlink()
    assert load("ack", "de", folder) == load("ack", "de")


def test_check_reports_unknown_placeholders_phrases_and_missing_facts(tmp_path: Path) -> None:
    (tmp_path / "ack.txt").write_text("Hello\n\n$ref $owner $deadline\n$colour\n")
    (tmp_path / "notice.fr.txt").write_text(
        "Bonjour $said $commitment $ref\n=== owned_person ===\n$person le $when $who\n"
    )
    (tmp_path / "late.xx.txt").write_text("x\n")
    (tmp_path / "thanks.txt").write_text("x\n")
    (tmp_path / "vip.txt").write_text("Dear $owner, $ref by $deadline_local\n")
    (tmp_path / "ack.es.txt").write_text("Hola $ref\n=== bogus ===\nx\n")
    problems = check_templates(tmp_path, route_templates=("vip",))
    text = "\n".join(problems)
    assert f"{tmp_path}/ack.txt:4: unknown placeholder $colour in the body" in text
    assert f"{tmp_path}/notice.fr.txt:3: unknown placeholder $who in phrase 'owned_person'" in text
    assert f"{tmp_path}/late.xx.txt:1: name templates" in text
    assert f"{tmp_path}/thanks.txt:1: unknown template 'thanks'" in text
    assert f"{tmp_path}/ack.es.txt:2: unknown phrase 'bogus'" in text
    assert f"{tmp_path}/ack.es.txt:1: the 'ack' letter must state $owner" in text
    assert "vip.txt" not in text  # a route's own acknowledgement, valid
    assert set(LETTERS) >= {"ack", "notice", "late", "staff", "common"}


def test_language_choice_order_and_reasons() -> None:
    german = "Guten Tag, mein Drucker funktioniert seit gestern nicht mehr. Können Sie helfen?"
    base = {"route_name": "r", "earlier": None, "content_language": [], "default": "en"}
    assert choose(route="fr", text=german, **base).lang == "fr"  # type: ignore[arg-type]
    assert choose(route=None, text=german, **{**base, "earlier": ("es", "A-1")}).source == (  # type: ignore[arg-type]
        "customer"
    )
    c = choose(route=None, text="hi", **{**base, "content_language": ["ru-RU, en"]})  # type: ignore[arg-type]
    assert (c.lang, c.source) == ("ru", "header")
    c = choose(route=None, text=german, **base)  # type: ignore[arg-type]
    assert (c.lang, c.source) == ("de", "detected")
    c = choose(route=None, text="ok thanks", **base)  # type: ignore[arg-type]
    assert (c.lang, c.source, c.reason) == (
        "en",
        "default",
        "installation default; text too short to detect",
    )
    # Detection is deterministic and ignores quoted history.
    assert detect(german) == detect(german)
    quoted = "Thanks!\n" + "\n".join("> " + german for _ in range(5))
    assert detect(quoted) is None
    # MIN_LETTERS letters (digits, "_" and punctuation are none) are enough to detect.
    assert detect("1_ é, " * (MIN_LETTERS - 1) + "ab12") is not None
    assert detect("1_ é, " * (MIN_LETTERS - 1) + "12") is None
    assert from_header(["it", "de-AT"]) == "de"
    assert from_header(["it"]) is None


def test_staff_letter_wording_comes_from_the_templates(tmp_path: Path) -> None:
    """The handover pack's markings, file lines and deadline lines are phrases of
    handover.en.txt and staff.en.txt: an admin's override changes them, the facts stay."""
    from datetime import UTC, datetime, timedelta
    from typing import Any

    from gateway.letters.handover import Entry, compose_handover_letter
    from gateway.letters.notification import Part
    from gateway.routing.model import Person
    from gateway.security.tokens import Signer

    now = datetime(2026, 12, 3, 10, 0, tzinfo=UTC)
    ticket: Any = type(
        "T",
        (),
        dict(
            id=7, ref="ACME-7", subject="Printer", status="open", requester="pat@customer.example",
            queue="support", priority="normal", first_response_due=now + timedelta(hours=4),
            first_responded_at=None, next_response_due=None, resolution_due=None,
        ),
    )()  # fmt: skip
    photo = Part("photo.jpg", "image/jpeg", b"\xff\xd8" * 100)
    entries = [
        Entry(now, "customer", {"who": "pat@customer.example"}, "Printer", "It burns.", (photo,)),
        Entry(now, "note_commands", {"author": "", "commands": "#priority high"}, "", "Look."),
        Entry(now, "ack", {"who": "pat@customer.example"}, "[ACME-7] Printer", None),
        Entry(now, "customer", {"who": ""}, "Again", "Same photo.", (photo,)),
    ]

    def pack(templates: Path | None) -> str:
        return compose_handover_letter(
            ticket=ticket,
            new_holder=Person("bob", "Bob Stone", "bob@example.com"),
            previous_holder=Person("alice", "Alice Smith", "alice@example.com"),
            reason="Reassigned.",
            notes=[],
            entries=entries,
            calendar=None,
            subject="[ACME-7] Handed over to you: Printer",
            from_address="support@example.com",
            from_name="Example Support",
            signer=Signer(b"unit-test-secret-key-0123456789abcdef"),
            hostname="gw.example.com",
            now=now,
            attachment_limit=10**6,
            letter=load("handover", "en", templates),
            staff=load("staff", "en", templates),
        )[3]

    shipped = pack(None)
    assert "===== 1 of 4 · 2026-12-03T10:00:00Z · CUSTOMER MESSAGE from pat@customer.example" in (
        shipped
    )
    assert "INTERNAL NOTE by staff (not sent to the customer); commands #priority high" in shipped
    assert "AUTOMATIC ACKNOWLEDGEMENT sent to the customer (pat@customer.example)" in shipped
    assert "CUSTOMER MESSAGE from (no sender)" in shipped
    assert "  - photo.jpg (200 bytes), same file as in message 1, attached once" in shipped
    assert "First response due: 2026-12-03T14:00:00Z" in shipped
    assert "Bob Stone <bob@example.com> (was Alice Smith)" in shipped

    (tmp_path / "handover.txt").write_text(
        "=== label_customer ===\nKUNDE $who\n=== file_same ===\n  * $name: wie in Nr. $n\n"
        "=== was ===\n(vorher $name)\n"
    )
    (tmp_path / "staff.txt").write_text("=== due_first ===\nErste Antwort bis $when\n")
    local = pack(tmp_path)
    assert "· KUNDE pat@customer.example =====" in local
    assert "  * photo.jpg: wie in Nr. 1" in local
    assert "Erste Antwort bis 2026-12-03T14:00:00Z" in local
    assert "Bob Stone <bob@example.com> (vorher Alice Smith)" in local
    assert "CUSTOMER MESSAGE" not in local


def test_the_language_model_loads_once_at_warm_up() -> None:
    """The pipeline process loads the model at start-up (`warm_up`, before it freezes its
    start-up heap: gateway/pipeline/process.py), and detection then uses that one model."""
    from gateway.letters import language

    language.warm_up()
    model = language._identifier
    assert model is not None
    assert detect("Bonjour, mon imprimante est en panne depuis ce matin.") is not None
    language.warm_up()
    assert language._identifier is model
