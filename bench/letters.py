"""CPU of the two letters of every new ticket, and of choosing their language, in isolation.

bench/pipeline.py measures the whole pipeline; there the letters are a fifth of the CPU and
their share drowns in the noise of the database. This bench runs only what the pipeline's
``respond`` and ``notify`` stages spend on letters for the message bench/pipeline.py sends:

- ``ack``: the templates ``send_ack_now`` loads (``ack`` and ``common``) and
  ``compose_ack`` (gateway/letters/ack.py);
- ``notification``: the templates ``notify_owner_stage`` loads (``notify`` and ``staff``)
  and ``compose_owner_notification`` (gateway/letters/notification.py);
- ``language``: ``gateway.letters.language.choose`` on the message text (py3langid);

and prints the process CPU per letter in microseconds (the best of the rounds). It also
prints a digest of every byte written (multipart boundaries and Message-ID nonces made
deterministic): the same digest before and after a change means the same letters.

Usage::

    python bench/letters.py                          # this checkout
    python bench/letters.py --code /work/main        # another checkout (before/after)
    python bench/letters.py --lang de --templates empty
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# `--code DIR` (before anything imports gateway): time another checkout's letters.
if "--code" in sys.argv:
    sys.path.insert(0, str(Path(sys.argv[sys.argv.index("--code") + 1]).resolve()))
else:
    sys.path.insert(0, str(REPO))

NOW = datetime(2026, 12, 3, 10, 0, 7, tzinfo=UTC)
TEXTS = {
    "en": "Hello,\n\nour printer shows error 42 since this morning. Please help.\n\nCustomer 7\n",
    "de": "Guten Tag,\n\nunser Drucker zeigt seit heute Morgen Fehler 42. Bitte helfen Sie.\n",
    "ru": "Здравствуйте!\n\nПринтер показывает ошибку 42 с утра. Помогите, пожалуйста.\n",
}
SUBJECTS = {
    "en": "printer on fire, case {i}",
    "de": "Drucker zeigt Fehler 42 – Grüße aus München, Fall {i}",
    "ru": "Принтер горит, помогите пожалуйста, случай {i}",
}


def setup(args: argparse.Namespace, tmp: Path) -> dict[str, Callable[[int], bytes]]:
    from gateway.letters import templates as letters
    from gateway.letters.ack import AckContent, compose_ack, response_stats
    from gateway.letters.language import choose
    from gateway.letters.notification import compose_owner_notification
    from gateway.routing.model import Person
    from gateway.security import tokens
    from gateway.security.tokens import Signer
    from gateway.sla.business_time import BusinessCalendar

    # Message-ID nonces from a seeded generator, so the digest compares letters.
    nonces = random.Random(0)

    class _Secrets:
        @staticmethod
        def token_bytes(n: int) -> bytes:
            return nonces.randbytes(n)

    tokens.secrets = _Secrets()  # type: ignore[attr-defined,assignment]

    lang = args.lang
    templates: Path = tmp / "templates"
    if args.templates != "missing":
        templates.mkdir()
    if args.templates == "override":
        (templates / "ack.en.txt").write_text(
            letters.load("ack", "en").body + "\n(override)\n", encoding="utf-8"
        )
    signer = Signer(b"bench-secret-key-0123456789abcdef")
    calendar = BusinessCalendar.build(
        "berlin",
        "Europe/Berlin",
        dict.fromkeys(("mon", "tue", "wed", "thu", "fri"), "09:00-17:00"),
        holidays=["2026-12-24", "2026-12-25"],
    )
    alice = Person("alice", "Alice Martin", "alice@example.com")
    stats = response_stats([timedelta(minutes=10 + i) for i in range(40)])
    text, subject = TEXTS[lang], SUBJECTS[lang]

    class Ticket:
        id = 7
        ref = "SUP-7"
        status = "open"
        requester = "c0-7@customer.example"
        queue = "support"
        priority = "normal"
        first_response_due = NOW + timedelta(hours=4)
        first_responded_at = None
        next_response_due = None
        resolution_due = NOW + timedelta(days=5)

    ticket: Any = Ticket()

    def ack(i: int) -> bytes:
        ticket.subject = subject.format(i=i)  # a new ticket's: its letters share it
        letter = letters.load("ack", lang, templates, default_language="en")
        letters.load("common", lang, templates, default_language="en")
        content = AckContent(
            ref=ticket.ref,
            owner_name=alice.name,
            subject=ticket.subject,
            first_response_due=ticket.first_response_due,
            calendar=calendar,
            received_at=NOW,
            customer_date=NOW,
            stats=stats,
        )
        raw, _mid = compose_ack(
            content=content,
            ticket_id=ticket.id,
            to_address=ticket.requester,
            customer_message_id=f"<e2e.{i}.0123456789abcdef@customer.example>",
            from_address="support@example.com",
            from_name="",
            signer=signer,
            hostname="mx.bench.example",
            now=NOW,
            template=letter,
        )
        return raw

    def notification(i: int) -> bytes:
        letter = letters.load("notify", "en", templates)
        raw, _mid, _subject, _text = compose_owner_notification(
            ticket=ticket,
            owner=alice,
            new_ticket=True,
            sender=ticket.requester,
            sender_name=f"Customer {i}",
            customer_subject=ticket.subject,
            customer_text=text,
            received_at=NOW,
            parts=[],
            calendar=calendar,
            warnings=[],
            from_address="support@example.com",
            from_name="",
            signer=signer,
            hostname="mx.bench.example",
            now=NOW,
            attachment_limit=10 * 2**20,
            recipient=alice,
            commands="#close, #assign <person>",
            letter=letter,
            staff=letters.load("staff", "en", templates),
        )
        return raw

    def language(i: int) -> bytes:
        choice = choose(
            route=None,
            route_name=None,
            earlier=None,
            content_language=[],
            text=text.replace("7", str(i)),
            default="en",
        )
        return repr(choice).encode()

    return {"ack": ack, "notification": notification, "language": language}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2000, help="letters of each kind per round")
    p.add_argument("--rounds", type=int, default=5, help="rounds (the best one counts)")
    p.add_argument("--lang", default="en", choices=sorted(TEXTS))
    p.add_argument(
        "--templates",
        default="missing",
        choices=["missing", "empty", "override"],
        help="the templates_dir: missing (as in bench/pipeline.py), empty, or with an override",
    )
    p.add_argument("--code", default="", help="import gateway from this checkout instead")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = setup(args, Path(tmp))
        random.seed(1)  # multipart boundaries
        digest = hashlib.sha256()
        for i in range(50):
            for fn in runs.values():
                digest.update(fn(i))
        # One new ticket after the other, as the pipeline writes them: its acknowledgement,
        # then its notification (which share the ticket's subject), then the next ticket.
        best = dict.fromkeys(runs, float("inf"))
        clock = time.process_time
        for _ in range(args.rounds):
            spent = dict.fromkeys(runs, 0.0)
            for i in range(args.n):
                for name, fn in runs.items():
                    cpu = clock()
                    fn(i)
                    spent[name] += clock() - cpu
            for name in runs:
                best[name] = min(best[name], spent[name] / args.n * 1e6)
    import gateway

    print(f"code {Path(gateway.__file__).parent.parent}, lang {args.lang}, {args.templates}")
    print("  ".join(f"{name} {us:.1f} µs" for name, us in best.items()))
    print(f"digest {digest.hexdigest()[:16]}")


if __name__ == "__main__":
    main()
