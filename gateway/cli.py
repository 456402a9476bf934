"""Command line: `support-gateway [--config PATH] COMMAND ...`.

The commands, their options, JSON shapes and exit statuses are the public interface
(docs/interface.md); names are extended, never renamed. Every failure ends with one line
naming the problem and an exit status (issue 14): 0 ok, 1 failure, 2 usage, 75 temporary
(ingest), 78 configuration. Never a traceback, unless -v asks for one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlmodel import Session, col, select

from gateway.settings import ConfigError, Settings, load_settings

EX_OK = 0
EX_FAIL = 1
EX_USAGE = 64
EX_ARGS = 2  # argparse's usage status, and ours for a bad option value (CONTRACT.md)
EX_TEMPFAIL = 75  # sysexits.h: the MTA keeps the message and retries
EX_CONFIG = 78  # sysexits.h EX_CONFIG

DESCRIPTION = """\
An email-first support gateway: customer mail in over SMTP (or pipe mode), tickets,
honest acknowledgements, staff replies by email, SLA escalation.

Configuration: --config, else $GATEWAY_CONFIG, else ./config.toml (see config.example.toml;
any key can be set as GATEWAY_<SECTION>__<KEY>). Documentation: README.md and docs/
(docs/interface.md: commands, JSON output and exit statuses; docs/operations.md: status,
metrics, health and logs; docs/rules.md: routing rules).
"""
EPILOG = "Exit status: 0 ok, 1 failure, 2 usage, 75 temporary (ingest), 78 configuration."


class UsageError(Exception):
    """A bad option value: one line, exit 2."""


class Failure(Exception):
    """An expected failure (no such database, unreadable file): one line, exit 1."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="support-gateway",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="config.toml (default $GATEWAY_CONFIG, else ./config.toml)")
    p.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging, library logs and tracebacks"
    )
    p.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=None,
        help="log lines as text or as JSON objects (default: config log_format, else text)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser(
        "serve",
        help="run the daemon: SMTP listener, pipeline, delivery, escalation, metrics",
        description="Run the daemon until SIGTERM (graceful stop); SIGHUP reloads the rules.",
    )
    st = sub.add_parser(
        "status",
        help="spool, quarantine, outbox, tickets, rules: the state at a glance",
        description="Reads the database and the spool directly (no daemon needed); asks the"
        " daemon's [http] listener for its uptime and rules load time when it runs.",
    )
    st.add_argument("--json", action="store_true", help="one JSON object instead of lines")

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
        dest="rules_command", required=True, metavar="SUBCOMMAND"
    )
    rc = rules.add_parser(
        "check", help="validate rules_dir: exit 0 when valid, else file:line: message lines"
    )
    rc.add_argument("--at", help="ISO 8601 start of the 4-week coverage check (default: now)")
    ex = rules.add_parser("explain", help="where would this .eml go, and why (writes nothing)")
    ex.add_argument("file", help="the message, as an .eml file")
    ex.add_argument("--at", help="ISO 8601 arrival time with a zone (default: now)")
    ex.add_argument("--json", action="store_true", help="one JSON object (docs/interface.md)")

    t = sub.add_parser("tickets", help="list or show tickets").add_subparsers(
        dest="tickets_command", required=True, metavar="SUBCOMMAND"
    )
    tl = t.add_parser("list", help="tickets, newest first")
    tl.add_argument("--json", action="store_true", help="a JSON array instead of lines")
    tl.add_argument(
        "--status", choices=["open", "waiting", "closed"], help="only tickets in this status"
    )
    tl.add_argument("--limit", type=int, default=0, help="at most this many tickets (default: all)")
    ts = t.add_parser("show", help="one ticket: messages, events, links, deadlines")
    ts.add_argument("ref", help="the ticket reference, e.g. ACME-1042")
    ts.add_argument("--json", action="store_true", help="one JSON object instead of text")

    q = sub.add_parser("quarantine", help="messages that failed processing").add_subparsers(
        dest="q_command", required=True, metavar="SUBCOMMAND"
    )
    ql = q.add_parser("list", help="quarantined messages with their reasons")
    ql.add_argument("--json", action="store_true", help="a JSON array instead of lines")
    qs = q.add_parser("show", help="print the raw message (the reason goes to stderr)")
    qs.add_argument("id", type=int, help="quarantine id (from quarantine list)")
    qr = q.add_parser("replay", help="process it again now (ID, or --all)")
    qr.add_argument("id", type=int, nargs="?", help="quarantine id (from quarantine list)")
    qr.add_argument("--all", action="store_true", help="every quarantined message")

    o = sub.add_parser("outbox", help="outgoing mail and its delivery state").add_subparsers(
        dest="o_command", required=True, metavar="SUBCOMMAND"
    )
    ol = o.add_parser("list", help="outgoing mail, newest first, with its delivery state")
    ol.add_argument("--json", action="store_true", help="a JSON array instead of lines")
    orr = o.add_parser("retry", help="deliver this message again at the next chance")
    orr.add_argument("id", type=int, help="outbox id (from outbox list)")

    sla = sub.add_parser("sla", help="deadlines").add_subparsers(
        dest="sla_command", required=True, metavar="SUBCOMMAND"
    )
    su = sla.add_parser("upcoming", help="deadlines due soon (and missed), per owner")
    su.add_argument(
        "--within",
        default="1d",
        help="duration in the rules' grammar, e.g. 4h, 2d: business time in each ticket's "
        "SLA calendar, d = one working day (default 1d)",
    )
    su.add_argument("--json", action="store_true", help="a JSON array instead of lines")
    su.add_argument("--at", help="ISO 8601 'now' with a zone (default: now)")

    c = sub.add_parser("customers", help="customers and their addresses").add_subparsers(
        dest="c_command", required=True, metavar="SUBCOMMAND"
    )
    cm = c.add_parser("merge", help="join the customer of address A into the customer of B")
    cm.add_argument("a", help="an address of the customer that is merged away")
    cm.add_argument("b", help="an address of the customer that stays")

    db = sub.add_parser("db", help="database").add_subparsers(
        dest="db_command", required=True, metavar="SUBCOMMAND"
    )
    db.add_parser("upgrade", help="create the database or apply pending migrations")

    sub.add_parser("process", help="process what waits in the spool once, then exit")

    dk = sub.add_parser("dkim", help="DKIM keys").add_subparsers(
        dest="dkim_command", required=True, metavar="SUBCOMMAND"
    )
    kg = dk.add_parser("keygen", help="write a signing key and print its DNS TXT record")
    kg.add_argument(
        "--algorithm",
        choices=["rsa-sha256", "ed25519-sha256"],
        default="rsa-sha256",
        help="signing algorithm (default rsa-sha256)",
    )
    kg.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    kg.add_argument("--out", help="key file (default: outbound.dkim.key_file)")
    return p


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(args.config)
    if args.log_format is not None:
        # The option wins over the config, in this process and in the pipeline process.
        settings.log_format = args.log_format
    elif settings.effective_log_format != "text":
        from gateway.logs import setup_logging

        setup_logging(fmt=settings.effective_log_format, verbose=args.verbose)
    if not args.verbose:
        logging.getLogger().setLevel(settings.logging.level)
    return settings


def _engine(settings: Settings, *, create: bool = False) -> Any:
    """The database; only `serve`, `process` and `db upgrade` may create it (issue 14: a
    command run from the wrong folder silently made an empty database there)."""
    from gateway.status import missing_database
    from gateway.store.db import open_database

    if not create:
        missing = missing_database(settings.storage.database_url)
        if missing:
            raise Failure(missing)
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
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"--at {text!r}: expected an ISO 8601 time, e.g. 2026-11-23T09:00:00Z"
        ) from None
    if at.tzinfo is None:
        raise UsageError(f"--at {text!r}: give a time zone, e.g. 2026-11-23T09:00:00Z")
    return at.astimezone(UTC)


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.app import serve

    return asyncio.run(serve(_settings(args)))


def cmd_ingest(args: argparse.Namespace) -> int:
    """Exit 0 only when the message is durable; 75 on any temporary failure."""
    os.umask(0o077)  # the spool it may create holds customers' mail (as `serve` does)
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


def _route_templates(settings: Settings) -> tuple[str, ...]:
    """The template names routes give in `acknowledge = "name"` (valid rules only)."""
    from gateway.routing.loader import RulesError, load_rules

    try:
        rules = load_rules(settings.rules_path)
    except RulesError:
        return ()
    names = [r.acknowledge for r in rules.routes if isinstance(r.acknowledge, str)]
    if isinstance(rules.defaults.acknowledge, str):
        names.append(rules.defaults.acknowledge)
    return tuple(names)


def cmd_rules(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from gateway.routing.loader import RulesError, check_rules, load_rules

    if args.rules_command == "check":
        problems = check_rules(settings.rules_path)
        warnings: list[str] = []
        # Letter overrides (issue 17): unknown placeholders, missing facts, with file:line.
        from gateway.letters.templates import check_templates

        problems += check_templates(settings.templates_path, _route_templates(settings))
        if not problems:
            # Coverage (issue 11): hours of each policy nobody on its ladder is on duty.
            from gateway.sla.coverage import coverage_report

            warnings, problems = coverage_report(
                load_rules(settings.rules_path), _parse_at(args.at)
            )
        for line in [*problems, *warnings]:
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

    try:
        raw = Path(args.file).read_bytes()
    except OSError as exc:
        raise Failure(f"explain: cannot read {args.file}: {exc.strerror or exc}") from None
    parsed = parse(raw)
    recipients = parsed.to or [f"support@{settings.smtp.domains[0]}"]
    facts = facts_from(parsed, [], parsed.from_address, False)
    if not parsed.to:
        facts = facts_from(parsed, recipients, parsed.from_address, False)
    result = explain(
        rules,
        facts,
        _parse_at(args.at),
        settings=settings,
        content_language=parsed.header("Content-Language"),
        text=parsed.text or "",
    )
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
            print("deadlines:")
            for line in _deadline_lines(d["deadlines"]):
                print(f"  {line}")
            for m in d["messages"]:
                print(
                    f"  {m['at']} {m['direction']:>3} {m['kind']:<14} {m['from']}: {m['subject']}"
                )
            for e in d["events"]:
                print(f"  {e['at']} {e['type']}: {e['detail']}")
            for lk in d["links"]:
                print(f"  link: {lk['relation']} {lk['ref']}")
            for pr in d["promises"]:
                print(
                    f"  promise {pr['made_at']} to {pr['to']}: {pr['what']}"
                    f" (due {pr['due'] or 'no time'}) [{pr['state']}]"
                )
    return 0


def _deadline_lines(deadlines: Any) -> list[str]:
    """`tickets show` text: one line per clock, not a Python dict (issue 14)."""
    if not isinstance(deadlines, dict) or not deadlines:
        return ["none"]
    out = []
    for clock, value in deadlines.items():
        name = str(clock).replace("_", " ")
        if isinstance(value, dict):
            words = [f"{k.replace('_', ' ')} {v}" for k, v in value.items() if v not in (None, "")]
            out.append(f"{name + ':':<16} {'; '.join(words) or '-'}")
        else:
            out.append(f"{name + ':':<16} {value if value is not None else '-'}")
    return out


def cmd_status(args: argparse.Namespace) -> int:
    settings = _settings(args)
    engine = _engine(settings)
    from gateway.status import collect, format_status

    facts = collect(settings, engine)
    engine.dispose()
    if args.json:
        _print(facts)
    else:
        print(format_status(facts))
    return 0


def _require_spool(settings: Settings) -> None:
    from gateway.spool import Spool

    path = settings.spool_path / Spool.FILE
    if not path.exists():
        raise Failure(f"no spool at {path} (is --config right? `serve` or `ingest` creates it)")


def cmd_quarantine(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from gateway.app import build_spool

    _require_spool(settings)
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
        if args.q_command == "replay" and args.all:
            if args.id is not None:
                print("give an ID or --all, not both", file=sys.stderr)
                return 2
            ids = spool.replay_all()
            print(f"replaying {len(ids)} quarantined message(s)")
            return _process_spool(settings, spool, replayed=ids)
        if args.id is None:
            print("give the ID of a quarantined message, or --all", file=sys.stderr)
            return 2
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


def _process_spool(
    settings: Settings, spool: Any, only: int | None = None, replayed: list[int] | None = None
) -> int:
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
    # `process` may be the first command after pipe-mode ingest: it may create the database.
    worker = PipelineWorker(engine=_engine(settings, create=True), spool=spool, services=services)
    n = worker.run_once_sync()
    if worker.outage is not None:
        print(f"paused: {worker.outage.kind} unavailable ({worker.outage.reason})")
        return EX_TEMPFAIL
    state = spool.get(only) if only is not None else None
    if state is not None:  # still in the spool: it failed again
        print(f"message {only} failed again: {(state.last_error or '').splitlines()[0]}")
        return 1
    again = [e for e in (spool.get(i) for i in replayed or []) if e is not None]
    for e in again:
        print(f"message {e.id} failed again: {(e.last_error or '').splitlines()[0]}")
    if again:
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
                    # The node that holds (sending) or last held (sent) the row's claim.
                    "claimed_by": o.claimed_by,
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
        return EX_ARGS
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
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _engine(settings, create=True)
    print("database is at the latest schema")
    return 0


def cmd_dkim(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from gateway.outbound.dkim import keygen

    dkim = settings.outbound.dkim
    out = args.out or dkim.key_file
    if not out:
        print("give --out PATH or set outbound.dkim.key_file", file=sys.stderr)
        return EX_ARGS
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
    "status": cmd_status,
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


def _quiet_stdout() -> None:
    """The reader went away (`outbox list | head`): send the rest of our output nowhere."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from gateway.logs import setup_logging

    # Libraries (alembic, aiosmtpd's "Connection lost", dkimpy) stay quiet unless -v.
    setup_logging(fmt=args.log_format or "text", verbose=args.verbose)
    prog = "support-gateway"
    try:
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe shows up here, not at interpreter exit
        return code
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EX_CONFIG if args.command != "ingest" else EX_TEMPFAIL
    except BrokenPipeError:
        _quiet_stdout()
        return EX_OK
    except KeyboardInterrupt:
        return 130
    except UsageError as exc:
        print(f"{prog} {args.command}: {exc}", file=sys.stderr)
        return EX_ARGS
    except Failure as exc:
        print(f"{prog} {args.command}: {exc}", file=sys.stderr)
        return EX_FAIL
    except Exception as exc:
        if args.verbose:
            raise
        print(f"{prog} {args.command}: {_one_line(exc)}", file=sys.stderr)
        return EX_FAIL


def _one_line(exc: BaseException) -> str:
    """One line for an unexpected error (the traceback is for -v)."""
    from gateway.app import ListenError

    if isinstance(exc, ListenError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror}"
    try:
        from sqlalchemy.exc import DBAPIError

        if isinstance(exc, DBAPIError):
            first = str(exc.orig).splitlines()[0] if exc.orig else str(exc).splitlines()[0]
            return f"database error: {first}"
    except ImportError:  # pragma: no cover
        pass
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{exc.__class__.__name__}: {text} (run with -v for the traceback)"


if __name__ == "__main__":
    raise SystemExit(main())
