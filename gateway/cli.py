"""Command line: `support-gateway [--config PATH] COMMAND ...`.

The commands, their options, JSON shapes and exit statuses are the public interface
(docs/interface.md); names are extended, never renamed. Every failure ends with one line
naming the problem and an exit status (docs/decisions.md D14): 0 ok, 1 failure, 2 usage, 75
temporary (ingest), 78 configuration. Never a traceback, unless -v asks for one.
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
from typing import TYPE_CHECKING, Any

from sqlmodel import Session, col, select

from gateway.settings import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from gateway.store.models import Junk

EX_OK = 0
EX_FAIL = 1
EX_USAGE = 64
EX_ARGS = 2  # argparse's usage status, and ours for a bad option value (docs/interface.md)
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

    ing = sub.add_parser(
        "ingest",
        help="pipe mode: one message from FILE or stdin (docs/postfix.md)",
        description="Exit 0 when the message is durable, 75 on any failure (the MTA retries).",
    )
    from gateway.pipe import add_arguments as ingest_arguments

    ingest_arguments(ing)

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
    ex.add_argument(
        "--trusted-relay",
        action="store_true",
        help="read the spam verdict headers as if a trusted front host handed the mail over",
    )

    t = sub.add_parser("tickets", help="list or show tickets").add_subparsers(
        dest="tickets_command", required=True, metavar="SUBCOMMAND"
    )
    tl = t.add_parser("list", help="tickets, newest first")
    tl.add_argument("--json", action="store_true", help="a JSON array instead of lines")
    tl.add_argument(
        "--status", choices=["open", "waiting", "closed"], help="only tickets in this status"
    )
    tl.add_argument("--limit", type=int, default=0, help="at most this many tickets (default: all)")
    tl.add_argument(
        "--customer",
        metavar="ADDRESS",
        help="only the tickets of the customer of ADDRESS (any of their addresses)",
    )
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
    cb = c.add_parser("blocked", help="senders blocked by #junk sender (their mail goes to junk)")
    cb.add_argument("--json", action="store_true", help="a JSON array instead of lines")
    cu = c.add_parser("unblock", help="undo #junk sender: ADDRESS's mail opens tickets again")
    cu.add_argument("address", help="the blocked sender's address")
    cs = c.add_parser("show", help="a customer's addresses, tickets and merges")
    cs.add_argument("address", help="any of the customer's addresses")
    cs.add_argument("--json", action="store_true", help="one JSON object instead of text")

    j = sub.add_parser("junk", help="the junk folder: kept out of the ticket queue, and why")
    js = j.add_subparsers(dest="j_command", required=True, metavar="SUBCOMMAND")
    jl = js.add_parser("list", help="junk items, newest first")
    jl.add_argument("--json", action="store_true", help="a JSON array instead of lines")
    jl.add_argument(
        "--all", action="store_true", help="also released and expired items (default: in junk)"
    )
    jsh = js.add_parser("show", help="one item: envelope, why it is junk, its audit trail")
    jsh.add_argument("id", type=int, help="junk id (from junk list)")
    jsh.add_argument("--json", action="store_true", help="one JSON object instead of text")
    jsh.add_argument("--raw", action="store_true", help="print the raw message")
    jr = js.add_parser("release", help="process it as a normal message, as if it just arrived")
    jr.add_argument("id", type=int, help="junk id (from junk list)")
    jr.add_argument("--reason", default="", help="why (kept in the audit trail)")
    jr.add_argument("--by", default="", help="who releases it (default: $USER)")
    js.add_parser("expire", help="expire junk older than junk.expire_days now")

    db = sub.add_parser("db", help="database").add_subparsers(
        dest="db_command", required=True, metavar="SUBCOMMAND"
    )
    db.add_parser("upgrade", help="create the database or apply pending migrations")

    pr = sub.add_parser(
        "process",
        help="process what waits in the spool once, deliver the outbox once, then exit",
    )
    pr.add_argument(
        "--no-deliver",
        action="store_true",
        help="leave outgoing mail for the running daemon (`serve`) to deliver",
    )

    doc = sub.add_parser(
        "doctor",
        help="check the installation end to end (config, database, spool, relay, DNS, TLS, "
        "rules); each check ok/warn/fail with the fix; exit 1 when any fails",
    )
    doc.add_argument("--json", action="store_true", help='{"checks": [...]} (docs/interface.md)')

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


#: The engines this command opened; `main` closes their connections when it returns.
_OPENED: list[Any] = []


def _engine(settings: Settings, *, create: bool = False) -> Any:
    """The database; only `serve`, `process` and `db upgrade` may create it (docs/decisions.md D14:
    a command run from the wrong folder silently made an empty database there)."""
    from gateway.status import missing_database
    from gateway.store.db import open_database

    if not create:
        missing = missing_database(settings.storage.database_url)
        if missing:
            raise Failure(missing)
    engine = open_database(settings.storage.database_url)
    _OPENED.append(engine)
    return engine


def _close_engines() -> None:
    """Close the pooled connections now rather than at interpreter exit (PostgreSQL sees
    the session end at once; a caller that runs commands in its own process, as the tests
    do, does not accumulate them)."""
    while _OPENED:
        _OPENED.pop().dispose()


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
    """Exit 0 only when the message is durable; 75 on any temporary failure (gateway/pipe.py)."""
    from gateway.pipe import run

    return run(args)


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
        # Letter overrides (docs/decisions.md D17): unknown placeholders, missing facts, with
        # file:line.
        from gateway.letters.templates import check_templates

        problems += check_templates(settings.templates_path, _route_templates(settings))
        # A brand whose DKIM key cannot be read (docs/decisions.md D17), with the brand's file:line.
        if not problems:
            from gateway.outbound.brandkeys import check_brand_keys

            problems += check_brand_keys(load_rules(settings.rules_path))
        if not problems:
            # Coverage (docs/decisions.md D11): hours of each policy nobody on its ladder is on
            # duty.
            from gateway.routing.coverage import coverage_report

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
    from gateway.explain import explain, format_explain
    from gateway.factories import build_resolver
    from gateway.pipeline.route import explain_facts

    try:
        raw = Path(args.file).read_bytes()
    except OSError as exc:
        raise Failure(f"explain: cannot read {args.file}: {exc.strerror or exc}") from None
    # The facts the pipeline would route by, sender authentication included (a route on
    # `authenticated` must explain as it routes).
    parsed, facts = explain_facts(
        raw, settings, build_resolver(settings), trusted_relay=args.trusted_relay
    )
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
    from gateway.store.queries import find_ticket
    from gateway.views import ticket_detail

    with Session(engine) as s:
        if args.tickets_command == "list":
            return _tickets_list(s, args, rules)
        t = find_ticket(s, args.ref)
        if t is None:
            print(f"no ticket {args.ref}", file=sys.stderr)
            return 1
        d = ticket_detail(s, t, rules)
        if args.json:
            _print(d)
        else:
            _print_ticket(d)
    return 0


def _tickets_list(s: Session, args: argparse.Namespace, rules: Any) -> int:
    """`tickets list`: newest first, filtered by customer and status."""
    from gateway.store.models import Ticket
    from gateway.views import ticket_summary

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


def _print_ticket(d: dict[str, Any]) -> None:
    """`tickets show` as text."""
    print(f"{d['ref']}  [{d['status']}]  {d['subject']}")
    print(
        f"requester {d['requester']}; owner {d['owner']['name']} <{d['owner']['email']}>;"
        f" queue {d['queue']}; priority {d['priority']}"
    )
    print("deadlines:")
    for line in _deadline_lines(d["deadlines"]):
        print(f"  {line}")
    for m in d["messages"]:
        print(f"  {m['at']} {m['direction']:>3} {m['kind']:<14} {m['from']}: {m['subject']}")
    for e in d["events"]:
        print(f"  {e['at']} {e['type']}: {e['detail']}")
    for lk in d["links"]:
        print(f"  link: {lk['relation']} {lk['ref']}")
    for pr in d["promises"]:
        print(
            f"  promise {pr['made_at']} to {pr['to']}: {pr['what']}"
            f" (due {pr['due'] or 'no time'}) [{pr['state']}]"
        )


def _deadline_lines(deadlines: Any) -> list[str]:
    """`tickets show` text: one line per clock, not a Python dict (docs/decisions.md D14)."""
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
    from gateway.factories import build_spool

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
    settings: Settings,
    spool: Any,
    only: int | None = None,
    replayed: list[int] | None = None,
    deliver: bool = False,
) -> int:
    from gateway.clock import SystemClock
    from gateway.factories import build_resolver
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
    engine = _engine(settings, create=True)
    worker = PipelineWorker(engine=engine, spool=spool, services=services)
    n = worker.run_once_sync()
    if worker.outage is not None:
        print(f"paused: {worker.outage.kind} unavailable ({worker.outage.reason})")
        return EX_TEMPFAIL
    # Bundled acknowledgements whose window has closed (docs/decisions.md D12) go to the outbox too.
    from gateway.pipeline.bundle import BundleWorker

    BundleWorker(engine, services).run_once_sync()
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
    if deliver:
        # Pipe mode without a running daemon (docs/decisions.md D14): `process` also makes one
        # delivery pass, so acknowledgements leave now; what the relay refuses stays queued for the
        # next pass or for `serve` (retry schedule unchanged).
        from gateway.outbound.worker import DeliveryWorker

        sent = asyncio.run(
            DeliveryWorker(
                engine,
                settings,
                services.clock,
                signer=services.signer,
                rules=lambda: services.rules,
            ).run_once()
        )
        print(f"delivered {sent} outgoing message(s)")
    return 0


def cmd_process(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from gateway.factories import build_spool

    spool = build_spool(settings)
    try:
        return _process_spool(settings, spool, deliver=not args.no_deliver)
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
            # docs/decisions.md D11: a paused clock is not "due"; say why and what is left.
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

    if args.c_command in ("blocked", "unblock"):
        return _customers_blocks(args, engine)
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
        # docs/decisions.md D12: their open tickets are possible duplicates; each owner is told.
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


def _customers_blocks(args: argparse.Namespace, engine: Any) -> int:
    from gateway.pipeline.junk import unblock_sender
    from gateway.sla.deadlines import isoz
    from gateway.store.db import session_scope
    from gateway.store.models import BlockedSender

    with session_scope(engine) as s:
        if args.c_command == "unblock":
            if not unblock_sender(s, args.address):
                print(f"{args.address} is not blocked", file=sys.stderr)
                return 1
            print(
                f"{args.address} unblocked: new mail opens tickets again (what is in the junk "
                "folder stays there: `junk release ID`)"
            )
            return 0
        rows = s.exec(select(BlockedSender).order_by(col(BlockedSender.id))).all()
        items = [
            {
                "address": r.address,
                "blocked_at": isoz(r.blocked_at),
                "by": r.by,
                "ticket": r.ticket_ref,
                "reason": r.reason,
            }
            for r in rows
        ]
    if args.json:
        _print(items)
    else:
        for i in items:
            print(f"{i['address']:<40} {i['blocked_at']} by {i['by']}: {i['reason']}")
        if not items:
            print("no blocked senders")
    return 0


def cmd_junk(args: argparse.Namespace) -> int:
    settings = _settings(args)
    engine = _engine(settings)
    from gateway.pipeline.junk import expire_junk
    from gateway.store.db import session_scope
    from gateway.store.models import Junk

    now = datetime.now(UTC)
    with session_scope(engine) as s:
        if args.j_command == "expire":
            expired = expire_junk(s, now, settings.junk.expire_days)
            print(f"{expired} junk item(s) expired (older than {settings.junk.expire_days} days)")
            return 0
        if args.j_command == "list":
            return _junk_list(s, args)
        row = s.get(Junk, args.id)
        if row is None:
            print(f"no junk item {args.id}", file=sys.stderr)
            return 1
        if args.j_command == "show":
            return _junk_show(row, args)
        return _junk_release(s, settings, args, now)


def _junk_list(s: Session, args: argparse.Namespace) -> int:
    """`junk list`: newest first, only what is still junk unless --all."""
    from gateway.pipeline.junk import junk_summary
    from gateway.store.models import Junk

    q = select(Junk).order_by(col(Junk.junked_at).desc(), col(Junk.id).desc())
    if not args.all:
        q = q.where(Junk.state == "junk")
    items = [junk_summary(r) for r in s.exec(q).all()]
    if args.json:
        _print(items)
    else:
        for i in items:
            print(
                f"{i['id']:>6} {i['received_at']} {i['from'][:30]:<30} "
                f"{i['subject'][:40]:<40} {i['reason'][:60]}"
            )
        if not items:
            print("the junk folder is empty")
    return 0


def _junk_show(row: Junk, args: argparse.Namespace) -> int:
    """`junk show`: the raw message, the JSON summary or the text summary."""
    from gateway.pipeline.junk import junk_summary

    if args.raw:
        sys.stdout.buffer.write(row.raw)
        return 0
    d = junk_summary(row)
    d["envelope"] = {"mail_from": row.mail_from, "client": row.peer, "helo": row.helo}
    d["events"] = json.loads(row.events or "[]")
    if args.json:
        _print(d)
        return 0
    print(f"junk {d['id']} [{d['state']}]  {d['subject']}")
    print(f"from {d['from']} (envelope <{row.mail_from}>, client {row.peer or '-'})")
    print(f"received {d['received_at']}; why: {d['reason']}")
    for e in d["events"]:
        print(f"  {e['at']} {e['type']}: {e['detail']}")
    return 0


def _junk_release(s: Session, settings: Settings, args: argparse.Namespace, now: datetime) -> int:
    """`junk release`: back into the spool, then processed as a normal message."""
    import getpass

    from gateway.factories import build_spool
    from gateway.pipeline.junk import release_junk

    spool = build_spool(settings)
    try:
        by = args.by or getpass.getuser()
        released, why = release_junk(
            s, spool, args.id, reason=args.reason or "released by an admin", by=by, now=now
        )
        if released is None:
            print(why, file=sys.stderr)
            return 1
        s.commit()
        print(f"junk {args.id} released: processed as a normal message")
        return _process_spool(settings, spool)
    finally:
        spool.close()


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


def cmd_doctor(args: argparse.Namespace) -> int:
    from gateway.doctor import format_text, run_checks

    checks = run_checks(args.config, now=datetime.now(UTC))
    if args.json:
        _print({"checks": [c.to_json() for c in checks]})
    else:
        print(format_text(checks))
    return 1 if any(c.status == "fail" for c in checks) else 0


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
    "junk": cmd_junk,
    "db": cmd_db,
    "process": cmd_process,
    "dkim": cmd_dkim,
    "doctor": cmd_doctor,
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
    finally:
        _close_engines()


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
