"""One installation, one secret: what every node on a shared PostgreSQL must agree on.

Reply tokens and Message-IDs are HMACs (gateway/security/tokens.py). A reply to mail one
node sent may arrive at any other node, so all nodes must sign with one key (docs/decisions.md
D13.6: with the default, each node generated its own, and replies silently failed to verify on the
other node). The database records a fingerprint of the key, written by the first node that starts;
every later start compares and refuses on a mismatch (exit 78 in `serve`), saying what to do.

With PostgreSQL and no key configured, a node refuses to start: a key generated beside one
node's spool cannot work for several nodes, and keeping the key itself in the database
would turn a database read (a backup, a replica) into forged staff replies.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import text
from sqlalchemy.engine import Engine

from gateway.settings import ConfigError, Settings
from gateway.store.db import is_postgres

FINGERPRINT = "secret-fingerprint"

SHARE_HOWTO = (
    "every node of one installation must sign with the same key: put one key (at least"
    " 16 characters, e.g. `python3 -c 'import secrets; print(secrets.token_hex(32))'`) in a"
    " file readable only by the gateway user on every node and set"
    " security.secret_key_file to it (docs/scaling.md)"
)


def require_configured_secret(settings: Settings, engine: Engine) -> None:
    """On PostgreSQL, refuse the generated per-node key (call before `settings.secret()`)."""
    sec = settings.security
    if is_postgres(engine) and not sec.secret_key and not sec.secret_key_file:
        raise ConfigError(
            "security.secret_key is empty and security.secret_key_file is not set, with"
            f" PostgreSQL ({engine.url.render_as_string(hide_password=True)}): a key generated"
            f" on this node would not verify on the others; {SHARE_HOWTO}. A single node that"
            " ran with the generated key can point secret_key_file at"
            f" {settings.spool_path.parent / 'secret_key'}"
        )


def check_fingerprint(engine: Engine, fingerprint: str, node: str) -> None:
    """Record the key's fingerprint if none is, else compare: ConfigError on a mismatch.

    An upsert (ON CONFLICT DO NOTHING), so several first starts at once agree on one
    fingerprint without a unique-key error; the losers then compare with the winner's.
    SQLite has one node: nothing to compare, and a deliberate key change there must work.
    """
    if not is_postgres(engine):
        return
    now = datetime.now(UTC).replace(microsecond=0).isoformat()
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO installation(key, value, set_by, set_at) VALUES (:k, :v, :n, :t)"
                " ON CONFLICT (key) DO NOTHING"
            ),
            {"k": FINGERPRINT, "v": fingerprint, "n": node, "t": now},
        )
        row = conn.execute(
            text("SELECT value, set_by, set_at FROM installation WHERE key = :k"),
            {"k": FINGERPRINT},
        ).one()
    if row[0] != fingerprint:
        raise ConfigError(
            f"this node's secret key differs from the installation's (key fingerprint"  # noqa: S608 (an error message, not SQL)
            f" {fingerprint[:12]}…, the database has {row[0][:12]}… recorded by node"
            f" {row[1] or '?'} at {row[2] or '?'}): replies and Message-IDs signed by one node"
            f" would not verify on another; {SHARE_HOWTO}. To change the key of the whole"
            " installation on purpose, stop every node, run"
            " `DELETE FROM installation WHERE key = 'secret-fingerprint'`, and start them with"
            " the new key"
        )
