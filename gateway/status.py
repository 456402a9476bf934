"""`support-gateway status` and the readiness checks: the facts an admin asks for first.

The command works without a running daemon: it reads the spool file and the database
directly (read-only, never creating either) and, when `[http] listen` is set, asks the
daemon's `/status` endpoint for what only the daemon knows (since when it runs, when it
loaded the rules). The same queries feed `/metrics` (gateway/metrics.py), so the terminal
and the dashboard never disagree.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import tempfile
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Engine, make_url

import gateway
from gateway.metrics import db_facts, node_name, spool_facts
from gateway.settings import Settings
from gateway.store.db import read_only


def sqlite_path(url: str) -> Path | None:
    """The file behind a sqlite URL (None for PostgreSQL or an in-memory database)."""
    u = make_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    return Path(u.database)


def missing_database(url: str) -> str | None:
    """A message when the SQLite file does not exist (read-only commands must not create it)."""
    path = sqlite_path(url)
    if path is None or path.exists():
        return None
    return (
        f"no database at {path} (is --config right? run `support-gateway db upgrade` "
        "or `serve` first)"
    )


def check_database(engine: Engine) -> str:
    """ "" when the database answers, else what is wrong (blocking)."""
    try:
        path = sqlite_path(str(engine.url))
        if path is not None:
            # The pool may hold a connection to a file that has since been removed or
            # moved; open the path anew, read-write and without creating it.
            if not path.exists():
                return f"{path} does not exist"
            with contextlib.closing(
                sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=2)
            ) as conn:
                conn.execute("SELECT version_num FROM alembic_version").fetchall()
            return ""
        with read_only(engine).connect() as conn:
            conn.execute(text("SELECT 1")).scalar()
        return ""
    except Exception as exc:
        return f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def check_spool(directory: Path, min_free: int = 0) -> str:
    """ "" when a file can be created, written and fsynced in the spool folder with room left."""
    try:
        fd, name = tempfile.mkstemp(prefix=".ready-", dir=directory)
        try:
            os.write(fd, b"ok")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(name)
        free = shutil.disk_usage(directory).free
    except OSError as exc:
        return f"{directory}: {exc.strerror or exc}"
    if min_free and free < min_free:
        return f"{directory}: {free} bytes free, below smtp.min_free_disk ({min_free})"
    return ""


def _daemon(settings: Settings, timeout: float = 2.0) -> dict[str, Any]:
    addr = settings.http_listen
    if addr is None:
        return {"running": None, "detail": "http.listen is off: cannot ask the daemon"}
    if addr[1] == 0:
        return {"running": None, "detail": "http.listen has port 0: cannot find the daemon"}
    host = addr[0]
    if host in ("0.0.0.0", "", "*"):  # noqa: S104 (compares a configured address; binds nothing)
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    url = f"http://{host}:{addr[1]}/status"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            data: dict[str, Any] = json.loads(r.read())
            return data
    except (OSError, ValueError) as exc:
        return {"running": False, "detail": f"no answer at {url}: {exc}"}


def _rules(settings: Settings) -> dict[str, Any]:
    from gateway.routing.loader import RulesError, load_rules

    path = settings.rules_path
    files = sorted(path.glob("*.toml")) if path.is_dir() else []
    changed = max((f.stat().st_mtime for f in files), default=None)
    out: dict[str, Any] = {
        "dir": str(path),
        "files": len(files),
        "changed_at": datetime.fromtimestamp(changed, UTC).isoformat() if changed else None,
        "valid": False,
        "problems": [],
    }
    try:
        load_rules(path)
        out["valid"] = True
    except RulesError as exc:
        out["problems"] = [str(p) for p in exc.problems]
    except OSError as exc:
        out["problems"] = [f"{path}: {exc.strerror or exc}"]
    return out


def collect(settings: Settings, engine: Engine, *, ask_daemon: bool = True) -> dict[str, Any]:
    """Every fact of `status --json` (docs/interface.md: spool, quarantine, outbox, tickets)."""
    now = datetime.now(UTC)
    spool_file = settings.spool_path / "spool.sqlite3"
    if spool_file.exists():
        with contextlib.closing(
            sqlite3.connect(f"file:{spool_file}?mode=ro", uri=True, timeout=5)
        ) as conn:
            sf = spool_facts(conn, now)
    else:
        sf = {
            "pending": 0,
            "processing": 0,
            "quarantined": 0,
            "oldest_received_at": None,
            "oldest_age_seconds": 0.0,
            "oldest_quarantined_at": None,
        }
    with read_only(engine).connect() as conn:
        df = db_facts(conn, now)
    outbox_by_state: dict[str, int] = {}
    outbox_by_kind: dict[str, int] = {}
    for row in df["outbox"]:
        outbox_by_state[row["state"]] = outbox_by_state.get(row["state"], 0) + row["count"]
        if row["state"] in ("queued", "sending"):
            outbox_by_kind[row["kind"]] = outbox_by_kind.get(row["kind"], 0) + row["count"]
    tickets_by_status: dict[str, int] = {"open": 0, "waiting": 0}
    by_queue: dict[str, int] = {}
    by_owner: dict[str, int] = {}
    for row in df["tickets"]:
        tickets_by_status[row["status"]] = tickets_by_status.get(row["status"], 0) + row["count"]
        by_queue[row["queue"]] = by_queue.get(row["queue"], 0) + row["count"]
        by_owner[row["owner"]] = by_owner.get(row["owner"], 0) + row["count"]
    return {
        "node": settings.smtp.hostname or node_name(),
        "host": node_name(),
        "version": gateway.__version__,
        "config": settings.config_path,
        "at": now.isoformat(),
        "daemon": _daemon(settings) if ask_daemon else {"running": None},
        "spool": {
            "dir": str(settings.spool_path),
            "pending": sf["pending"],
            "processing": sf["processing"],
            "oldest_received_at": sf["oldest_received_at"],
            "oldest_age_seconds": round(sf["oldest_age_seconds"], 1),
        },
        "quarantine": {
            "count": sf["quarantined"],
            "oldest_quarantined_at": sf["oldest_quarantined_at"],
        },
        "outbox": {
            "queued": outbox_by_state.get("queued", 0),
            "sending": outbox_by_state.get("sending", 0),
            "sent": outbox_by_state.get("sent", 0),
            "failed": outbox_by_state.get("failed", 0),
            "given_up": outbox_by_state.get("given_up", 0),
            "waiting_by_kind": outbox_by_kind,
            "oldest_waiting_age_seconds": round(df["outbox_oldest_queued_age_seconds"], 1),
        },
        "tickets": {
            "open": tickets_by_status.get("open", 0),
            "waiting": tickets_by_status.get("waiting", 0),
            "overdue": df["overdue"],
            "by_queue": dict(sorted(by_queue.items())),
            "by_owner": dict(sorted(by_owner.items())),
        },
        "rules": _rules(settings),
        "database": str(make_url(str(engine.url)).render_as_string(hide_password=True)),
    }


def _age(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def format_status(d: dict[str, Any]) -> str:
    """The same facts as lines for a terminal."""
    sp, q, ob, tk, ru, dm = (
        d["spool"],
        d["quarantine"],
        d["outbox"],
        d["tickets"],
        d["rules"],
        d["daemon"],
    )
    lines = [f"support-gateway {d['version']} on {d['node']} (config {d['config'] or '-'})"]
    if dm.get("running"):
        lines.append(
            f"daemon:     running, pid {dm.get('pid')}, since {dm.get('started_at')};"
            f" rules loaded at {dm.get('rules_loaded_at')}"
            f" (reloads ok {dm['rules_reloads']['ok']}, failed {dm['rules_reloads']['failed']})"
        )
    else:
        lines.append(
            f"daemon:     {'not answering' if dm.get('running') is False else 'unknown'}"
            f" ({dm.get('detail', '')})"
        )
    busy = sp["pending"] + sp["processing"]
    oldest = f", oldest {_age(sp['oldest_age_seconds'])}" if busy else ""
    lines.append(f"spool:      {sp['pending']} waiting, {sp['processing']} in process{oldest}")
    lines.append(
        f"quarantine: {q['count']}"
        + (" (run `support-gateway quarantine list`)" if q["count"] else "")
    )
    waiting = ob["queued"] + ob["sending"]
    lines.append(
        f"outbox:     {waiting} waiting, {ob['sent']} sent, {ob['failed']} failed,"
        f" {ob['given_up']} given up"
        + (f", oldest waiting {_age(ob['oldest_waiting_age_seconds'])}" if waiting else "")
    )
    lines.append(
        f"tickets:    {tk['open']} open, {tk['waiting']} waiting on the customer,"
        f" {tk['overdue']} overdue"
    )
    for queue, n in tk["by_queue"].items():
        lines.append(f"  queue {queue or '-':<20} {n}")
    for owner, n in tk["by_owner"].items():
        lines.append(f"  owner {owner or '-':<20} {n}")
    state = "valid" if ru["valid"] else f"INVALID ({len(ru['problems'])} problems)"
    lines.append(
        f"rules:      {ru['dir']}: {ru['files']} files, {state}, last changed {ru['changed_at']}"
    )
    for p in ru["problems"][:5]:
        lines.append(f"  {p}")
    return "\n".join(lines)
