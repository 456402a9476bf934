"""Command line: `support-gateway [--config PATH] COMMAND ...` (names fixed by CONTRACT.md)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlmodel import Session, col, select

from gateway.settings import ConfigError, Settings, load_settings

EX_OK = 0
EX_USAGE = 64
EX_TEMPFAIL = 75  # sysexits.h: the MTA keeps the message and retries


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="support-gateway", description=__doc__)
    p.add_argument("--config", help="config.toml (default $GATEWAY_CONFIG, else ./config.toml)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("serve", help="run the daemon (SIGTERM stops, SIGHUP reloads rules)")

    ing = sub.add_parser("ingest", help="pipe mode: one message from FILE or stdin")
    ing.add_argument("file", nargs="?", help="the message (default: stdin)")
    ing.add_argument("--sender", "-f", default=None, help="envelope sender (Postfix ${sender})")
    ing.add_argument(
        "--recipient",
        "-r",
        action="append",
        default=[],
        help="envelope recipient (Postfix ${recipient}); repeatable",
    )

    rules = sub.add_parser("rules", help="check or explain the routing rules").add_subparsers(
        dest="rules_command", required=True
    )
    rules.add_parser("check", help="exit 0 when valid, else file:line: message lines")
    ex = rules.add_parser("explain", help="where would this .eml go, and why (writes nothing)")
    ex.add_argument("file")
    ex.add_argument("--at", help="ISO 8601 arrival time (default: now)")
    ex.add_argument("--json", action="store_true")

    t = sub.add_parser("tickets", help="list or show tickets").add_subparsers(
        dest="tickets_command", required=True
    )
    tl = t.add_parser("list")
    tl.add_argument("--json", action="store_true")
    tl.add_argument("--status", choices=["open", "waiting", "closed"])
    tl.add_argument("--limit", type=int, default=0)
    tl.add_argument(
        "--customer",
        metavar="ADDRESS",
        help="only the tickets of the customer of ADDRESS (any of their addresses)",
    )
    ts = t.add_parser("show")
    ts.add_argument("ref")
    ts.add_argument("--json", action="store_true")

    q = sub.add_parser("quarantine", help="messages that failed processing").add_subparsers(
        dest="q_command", required=True
    )
    ql = q.add_parser("list")
    ql.add_argument("--json", action="store_true")
    qs = q.add_parser("show", help="print the raw message")
    qs.add_argument("id", type=int)
    qr = q.add_parser("replay", help="process it again now")
    qr.add_argument("id", type=int)

    o = sub.add_parser("outbox", help="outgoing mail and its delivery state").add_subparsers(
        dest="o_command", required=True
    )
    ol = o.add_parser("list")
    ol.add_argument("--json", action="store_true")
    orr = o.add_parser("retry")
    orr.add_argument("id", type=int)

    sla = sub.add_parser("sla", help="deadlines").add_subparsers(dest="sla_command", required=True)
    su = sla.add_parser("upcoming", help="deadlines due soon (and missed), per owner")
    su.add_argument(
        "--within",
        default="1d",
        help="duration in the rules' grammar, e.g. 4h, 2d: business time in each ticket's "
        "SLA calendar, d = one working day (default 1d)",
    )
    su.add_argument("--json", action="store_true")
    su.add_argument("--at", help="ISO 8601 'now' (default: now)")

    c = sub.add_parser("customers", help="customers").add_subparsers(
        dest="c_command", required=True
    )
    cm = c.add_parser("merge", help="join the customer of address A into the customer of B")
    cm.add_argument("a")
    cm.add_argument("b")
    cs = c.add_parser("show", help="a customer's addresses, tickets and merges")
    cs.add_argument("address")
    cs.add_argument("--json", action="store_true")

    db = sub.add_parser("db", help="database").add_subparsers(dest="db_command", required=True)
    db.add_parser("upgrade", help="apply migrations")

    sub.add_parser("process", help="process what waits in the spool once, then exit")

    dk = sub.add_parser("dkim", help="DKIM keys").add_subparsers(dest="dkim_command", required=True)
    kg = dk.add_parser("keygen", help="write a signing key and print its DNS TXT record")
    kg.add_argument("--algorithm", choices=["rsa-sha256", "ed25519-sha256"], default="rsa-sha256")
    kg.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    kg.add_argument("--out", help="key file (default: outbound.dkim.key_file)")
    return p


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def _engine(settings: Settings) -> Any:
    from gateway.store.db import open_database

    return open_database(settings.storage.database_url)


def _rules_or_none(settings: Settings) -> Any:
    from gateway.routing.loader import RulesError, load_rules

    try:
        return load_rules(settings.rules_path)
    except (RulesError, OSError):
        return None


def _parse_at(text: str | None) -> datetime:
    if not text:
        return datetime.now(UTC)
    at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if at.tzinfo is None:
        raise SystemExit(f"--at {text!r}: give a time zone, e.g. 2026-11-23T09:00:00Z")
    return at.astimezone(UTC)


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.app import serve

    return asyncio.run(serve(_settings(args)))


def cmd_ingest(args: argparse.Namespace) -> int:
    """Exit 0 only when the message is durable; 75 on any temporary failure."""
    try:
        settings = _settings(args)
        raw = Path(args.file).read_bytes() if args.file else sys.stdin.buffer.read()
        from email.parser import BytesHeaderParser
        from email.utils import getaddresses

        from gateway.app import build_spool
        from gateway.spool import Envelope

        headers = BytesHeaderParser().parsebytes(raw)
        sender = args.sender
        if sender is None:
            rp = getaddresses([str(headers.get("Return-Path", ""))])
            sender = rp[0][1] if rp else ""
        recipients = (
            args.recipient
            or [a for _, a in getaddresses([str(v) for v in headers.get_all("To", []) or []]) if a]
            or [f"postmaster@{settings.smtp.domains[0]}"]
        )
        # Normalise CRLF so pipe mode and SMTP store the same bytes for the same message.
        if b"\r\n" not in raw:
            raw = raw.replace(b"\n", b"\r\n")
        spool = build_spool(settings)
        try:
            entry_id = spool.submit_sync(
                Envelope(
                    mail_from=sender,
                    rcpt_tos=recipients,
                    source="pipe",
                    received_at=datetime.now(UTC).replace(microsecond=0).isoformat(),
                ),
                raw,
            )
        finally:
            spool.close()
    except ConfigError as exc:
        print(f"support-gateway ingest: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    except Exception as exc:  # anything else is temporary too: the MTA keeps the mail
        print(f"support-gateway ingest: temporary failure: {exc!r}", file=sys.stderr)
        return EX_TEMPFAIL
    print(f"queued as {entry_id}")
    return EX_OK


def cmd_rules(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from gateway.routing.loader import RulesError, check_rules, load_rules

    if args.rules_command == "check":
        problems = check_rules(settings.rules_path)
        for line in problems:
            print(line)
        if not problems:
            print(f"{settings.rules_path}: rules are valid")
        return 1 if problems else 0
    try:
        rules = load_rules(settings.rules_path)
    except RulesError as exc:
        for p in exc.problems:
            print(p, file=sys.stderr)
        return 1
    from gateway.pipeline.parse import parse
    from gateway.pipeline.route import facts_from
    from gateway.routing.explain import explain, format_explain

    parsed = parse(Path(args.file).read_bytes())
    recipients = parsed.to or [f"support@{settings.smtp.domains[0]}"]
    facts = facts_from(parsed, [], parsed.from_address, False)
    if not parsed.to:
        facts = facts_from(parsed, recipients, parsed.from_address, False)
    result = explain(rules, facts, _parse_at(args.at))
    if args.json:
        _print(result)
    else:
        print(format_explain(result))
    return 0


def cmd_tickets(args: argparse.Namespace) -> int:
    settings = _settings(args)
    engine = _engine(settings)
    rules = _rules_or_none(settings)
    from gateway.store.models import Ticket
    from gateway.store.queries import find_ticket
    from gateway.views import ticket_detail, ticket_summary

    with Session(engine) as s:
        if args.tickets_command == "list":
            q = select(Ticket).order_by(col(Ticket.created_at).desc(), col(Ticket.id).desc())
            if args.customer:
                from gateway.views import customer_tickets

                found = customer_tickets(s, args.customer)
                if found is None:
                    print(f"no customer with the address {args.customer}", file=sys.stderr)
                    return 1
                q = q.where(col(Ticket.id).in_([t.id for t in found]))
            if args.status:
                q = q.where(Ticket.status == args.status)
            if args.limit:
                q = q.limit(args.limit)
            items = [ticket_summary(t, rules) for t in s.exec(q).all()]
            if args.json:
                _print(items)
            else:
                for i in items:
                    print(
                        f"{i['ref']:<12} {i['status']:<8} {i['owner']['name']:<20} "
                        f"{i['requester']:<30} {i['subject'][:60]}"
                    )
            return 0
        t = find_ticket(s, args.ref)
        if t is None:
            print(f"no ticket {args.ref}", file=sys.stderr)
            return 1
        d = ticket_detail(s, t, rules)
        if args.json:
            _print(d)
        else:
            print(f"{d['ref']}  [{d['status']}]  {d['subject']}")
            print(
                f"requester {d['requester']}; owner {d['owner']['name']} <{d['owner']['email']}>;"
                f" queue {d['queue']}; priority {d['priority']}"
            )
            print(f"deadlines: {d['deadlines']}")
            for m in d["messages"]:
                print(
                    f"  {m['at']} {m['direction']:>3} {m['kind']:<14} {m['from']}: {m['subject']}"
                )
            for e in d["events"]:
                print(f"  {e['at']} {e['type']}: {e['detail']}")
            for lk in d["links"]:
                print(f"  link: {lk['relation']} {lk['ref']}")
    return 0


def cmd_quarantine(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from gateway.app import build_spool

    spool = build_spool(settings)
    try:
        if args.q_command == "list":
            items = spool.quarantined()
            if args.json:
                _print(items)
            else:
                for i in items:
                    reason = (i["reason"] or "").splitlines()[0] if i["reason"] else ""
                    print(
                        f"{i['id']:>6} {i['received_at']} from <{i['mail_from']}> "
                        f"{i['size']} bytes, {i['attempts']} attempts: {reason}"
                    )
                if not items:
                    print("quarantine is empty")
            return 0
        entry = spool.get(args.id)
        if entry is None or (args.q_command == "replay" and entry.state != "quarantined"):
            print(f"no quarantined message {args.id}", file=sys.stderr)
            return 1
        if args.q_command == "show":
            sys.stdout.buffer.write(entry.raw)
            print(f"\n--- reason ---\n{entry.last_error}", file=sys.stderr)
            return 0
        spool.replay(args.id)
        return _process_spool(settings, spool, only=args.id)
    finally:
        spool.close()


def _process_spool(settings: Settings, spool: Any, only: int | None = None) -> int:
    from gateway.app import build_resolver
    from gateway.clock import SystemClock
    from gateway.pipeline.context import Services
    from gateway.pipeline.worker import PipelineWorker
    from gateway.routing.loader import load_rules
    from gateway.security.tokens import Signer

    services = Services(
        settings=settings,
        clock=SystemClock(),
        signer=Signer(settings.secret()),
        rules=load_rules(settings.rules_path),
        resolver=build_resolver(settings),
    )
    engine = _engine(settings)
    worker = PipelineWorker(engine=engine, spool=spool, services=services)
    n = worker.run_once_sync()
    # Bundled acknowledgements whose window has closed (issue 12) go to the outbox too.
    from gateway.pipeline.bundle import BundleWorker

    BundleWorker(engine, services).run_once_sync()
    state = spool.get(only) if only is not None else None
    if state is not None:  # still in the spool: it failed again
        print(f"message {only} failed again: {(state.last_error or '').splitlines()[0]}")
        return 1
    print(f"processed {n} message(s)")
    return 0


def cmd_process(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from gateway.app import build_spool

    spool = build_spool(settings)
    try:
        return _process_spool(settings, spool)
    finally:
        spool.close()


def cmd_outbox(args: argparse.Namespace) -> int:
    settings = _settings(args)
    engine = _engine(settings)
    from gateway.sla.deadlines import isoz
    from gateway.store.models import Outbox

    with Session(engine) as s:
        if args.o_command == "list":
            rows = s.exec(select(Outbox).order_by(col(Outbox.id).desc())).all()
            items = [
                {
                    "id": o.id,
                    "kind": o.kind,
                    "to": json.loads(o.rcpt_tos),
                    "state": o.state,
                    "attempts": o.attempts,
                    "next_attempt_at": isoz(o.next_attempt_at),
                    "sent_at": isoz(o.sent_at),
                    "last_error": o.last_error,
                    "message_id": o.message_id,
                }
                for o in rows
            ]
            if args.json:
                _print(items)
            else:
                for i in items:
                    print(
                        f"{i['id']:>6} {i['kind']:<16} {i['state']:<9} {','.join(i['to'])}"
                        f" attempts={i['attempts']} {i['last_error'][:60]}"
                    )
            return 0
        o = s.get(Outbox, args.id)
        if o is None:
            print(f"no outbox message {args.id}", file=sys.stderr)
            return 1
        o.state = "queued"
        o.next_attempt_at = datetime.now(UTC)
        o.claimed_until = None
        s.add(o)
        s.commit()
        print(f"outbox message {args.id} queued for delivery now")
    return 0


def cmd_sla(args: argparse.Namespace) -> int:
    settings = _settings(args)
    engine = _engine(settings)
    from gateway.sla import durations
    from gateway.views import upcoming

    try:
        # The rules' grammar: "2d" is two working days of each ticket's SLA calendar.
        within = durations.parse(args.within)
    except ValueError as exc:
        print(f"--within {args.within!r}: {exc}", file=sys.stderr)
        return EX_USAGE
    with Session(engine) as s:
        rows = upcoming(s, _rules_or_none(settings), _parse_at(args.at), within)
    if args.json:
        _print(rows)
        return 0
    owner = None
    for r in rows:
        if r["owner"]["id"] != owner:
            owner = r["owner"]["id"]
            print(f"{r['owner']['name']} <{r['owner']['email']}>")
        if r["paused"]:
            # Issue 11: a paused clock is not "due"; say why and what is left.
            why = r["paused_reason"]
            more = (
                f"{r['remaining']} left when the customer writes"
                if r["remaining"]
                else f"deadline {r['due']} stands"
                if why.startswith("snoozed")
                else f"deadline was {r['due']}"
            )
            print(f"  {r['ref']:<12} {r['clock']:<15} paused ({why}); {more}  {r['subject'][:50]}")
            continue
        flag = "MISSED" if r["overdue"] else "due"
        print(f"  {r['ref']:<12} {r['clock']:<15} {flag} {r['due']}  {r['subject'][:50]}")
    if not rows:
        print(f"nothing due within {args.within}")
    return 0


def cmd_customers(args: argparse.Namespace) -> int:
    settings = _settings(args)
    engine = _engine(settings)
    from gateway.store.db import session_scope
    from gateway.store.queries import customer_of, merge_customers

    if args.c_command == "show":
        return _customer_show(args, settings, engine)
    with session_scope(engine) as s:
        a, b = customer_of(s, args.a), customer_of(s, args.b)
        if a is None or b is None:
            print(f"unknown address: {args.a if a is None else args.b}", file=sys.stderr)
            return 1
        try:
            rec = merge_customers(s, a, b, datetime.now(UTC), by="cli")
        except ValueError as exc:
            print(str(exc), file=sys.stderr)
            return 1
        print(
            f"merged customer {rec.source_id} ({args.a}) into {rec.target_id} ({args.b}): "
            f"addresses {json.loads(rec.addresses)}, tickets {json.loads(rec.tickets)}"
        )
        # Issue 12: their open tickets are possible duplicates; each owner is told.
        from gateway.pipeline.conversation import announce_customer_merge
        from gateway.security.tokens import Signer

        for line in announce_customer_merge(
            s,
            customer_id=rec.target_id,
            rules=_rules_or_none(settings),
            settings=settings,
            signer=Signer(settings.secret()),
            now=datetime.now(UTC),
        ):
            print(f"possible duplicate: {line}")
    return 0


def _customer_show(args: argparse.Namespace, settings: Settings, engine: Any) -> int:
    from gateway.views import customer_detail

    with Session(engine) as s:
        d = customer_detail(s, args.address, _rules_or_none(settings))
    if d is None:
        print(f"no customer with the address {args.address}", file=sys.stderr)
        return 1
    if args.json:
        _print(d)
        return 0
    print(f"customer {d['id']} {d['name']}".rstrip())
    for a in d["addresses"]:
        bad = " (undeliverable)" if a["undeliverable"] else ""
        print(f"  address {a['address']} since {a['since']}{bad}")
    for t in d["tickets"]:
        print(f"  {t['ref']:<12} {t['status']:<8} {t['owner']['name']:<20} {t['subject'][:60]}")
    for m in d["merges"]:
        print(f"  merged {m['addresses']} ({m['tickets']}) at {m['at']} by {m['by']}")
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _engine(settings)
    print("database is at the latest schema")
    return 0


def cmd_dkim(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from gateway.outbound.dkim import keygen

    dkim = settings.outbound.dkim
    out = args.out or dkim.key_file
    if not out:
        print("give --out PATH or set outbound.dkim.key_file", file=sys.stderr)
        return EX_USAGE
    try:
        record = keygen(
            Path(out),
            domain=dkim.domain,
            selector=dkim.selector,
            algorithm=args.algorithm,
            bits=args.bits,
        )
    except (FileExistsError, ValueError) as exc:
        print(f"dkim keygen: {exc}", file=sys.stderr)
        return 1
    print(f"; private key written to {out} (mode 0600); publish this record:")
    print(record)
    return 0


COMMANDS = {
    "serve": cmd_serve,
    "ingest": cmd_ingest,
    "rules": cmd_rules,
    "tickets": cmd_tickets,
    "quarantine": cmd_quarantine,
    "outbox": cmd_outbox,
    "sla": cmd_sla,
    "customers": cmd_customers,
    "db": cmd_db,
    "process": cmd_process,
    "dkim": cmd_dkim,
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # dkimpy logs every failing signature at ERROR; the result is stored on the message.
        logging.getLogger("gateway.security.sender_auth.dkimpy").setLevel(logging.CRITICAL)
        # Migrations run at every command; their chatter is noise unless something changes.
        logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"support-gateway: {exc}", file=sys.stderr)
        return 78 if args.command != "ingest" else EX_TEMPFAIL  # EX_CONFIG


if __name__ == "__main__":
    raise SystemExit(main())
