"""Database engine: SQLite (WAL, synchronous=FULL) by default, PostgreSQL via psycopg 3.

`open_database()` creates the engine and applies the Alembic migrations, so `serve` and
every command start on the current schema (`support-gateway db upgrade` does the same
explicitly).
"""

from __future__ import annotations

import os
import select
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import event, exc
from sqlalchemy.engine import URL, Engine, make_url
from sqlmodel import Session, create_engine

from gateway.store import plan_marks  # noqa: F401  (registers the escalate_at hooks)
from gateway.store.turnstile import Turnstile

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).parent / "migrations"

#: Execution option marking a connection whose transactions only read (see read_scope).
READ_ONLY = "gateway_read_only"
#: Seconds a SQLite writer waits for the write lock before "database is locked".
BUSY_TIMEOUT = 30
#: Key of a pooled SQLite connection's `Turnstile` in its record's info.
TURNSTILE = "gateway_turnstile"


def make_engine(url: str) -> Engine:
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        return _sqlite_engine(url, u)
    if u.drivername == "postgresql":
        url = u.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    # A database host that stops answering (network cut) must fail the pipeline in seconds,
    # not hang it (docs/decisions.md D10; the worker pauses and probes): connect_timeout for new
    # connections, TCP keepalives (libpq) for established ones (dead within about a minute).
    args = {
        "connect_timeout": 10,
        "keepalives": 1,
        "keepalives_idle": 30,
        "keepalives_interval": 10,
        "keepalives_count": 3,
    }
    engine = create_engine(url, future=True, connect_args=args)
    ping = engine.dialect.do_ping

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
        check_alive(dbapi_conn, ping)

    return engine


def check_alive(dbapi_conn: Any, ping: Callable[[Any], bool]) -> None:
    """Before a pooled PostgreSQL connection is handed out: is it still connected?

    SQLAlchemy's `pool_pre_ping` asks the server (a round trip, one backend wake-up) at
    every checkout: about a tenth of all the statements a message cost. Instead the socket
    is polled without waiting, as Go's MySQL driver checks a pooled connection
    (go-sql-driver/mysql `connCheck`): an idle connection has nothing to read unless the
    server or a proxy closed it, or sent something unasked (a notice, a shutdown message).
    Only then is the server asked, and a dead connection is replaced
    (`DisconnectionError` makes the pool open a new one). A connection that dies without a
    word (a cut cable) fails its first statement instead, as it did between a ping and that
    statement; TCP keepalives (above) find it within about a minute when idle.
    """
    if dbapi_conn.closed or getattr(dbapi_conn, "broken", False):
        raise exc.DisconnectionError("the connection is closed")
    try:
        # poll, not select: no limit on the descriptor's number (FD_SETSIZE).
        poller = select.poll()
        poller.register(dbapi_conn.fileno(), select.POLLIN | select.POLLPRI)
        readable = poller.poll(0)
    except (OSError, ValueError) as err:
        raise exc.DisconnectionError(f"the connection's socket: {err}") from err
    if not readable:
        return
    try:
        # The dialect's ping raises the driver's error on a dead connection (it returns
        # False for none): either way the pool must replace the connection, and only a
        # DisconnectionError makes it do so rather than fail the caller's checkout.
        alive = ping(dbapi_conn)
    except Exception as err:
        raise exc.DisconnectionError(f"the server closed the connection: {err}") from err
    if not alive:
        raise exc.DisconnectionError("the server closed the connection")


def _sqlite_engine(url: str, u: URL) -> Engine:
    """WAL, synchronous=FULL, foreign keys; writers begin IMMEDIATE, through the turnstile."""
    in_file = bool(u.database) and u.database != ":memory:"
    if in_file:
        db_file = Path(str(u.database))
        db_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Created 0600 before SQLite opens it: its WAL and SHM files take the database
        # file's mode, so all three stay private whatever the umask (customers' mail).
        if not db_file.exists():
            os.close(os.open(db_file, os.O_WRONLY | os.O_CREAT, 0o600))
    engine = create_engine(
        url, connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT}, future=True
    )
    event.listen(engine, "connect", _pragmas)
    event.listen(engine, "begin", _begin)
    if in_file:
        _take_turns(engine, Path(str(u.database)))
    return engine


def _pragmas(dbapi_conn: Any, _record: Any) -> None:
    # Let SQLAlchemy issue BEGIN itself (pysqlite's implicit transactions are off).
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit survives power loss in WAL mode (docs/design.md §2).
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT * 1000}")
    cur.close()


def _begin(conn: Any) -> None:
    if conn.get_execution_options().get(READ_ONLY):
        # A read (read_scope): a plain deferred transaction, a WAL snapshot that never
        # takes the write lock, so the escalator's scans and the delivery worker's reads
        # no longer queue behind (and block) the pipeline's commits (docs/decisions.md
        # D16.3).
        conn.exec_driver_sql("BEGIN")
        return
    # IMMEDIATE: take the write lock at BEGIN, so two writers never deadlock on lock
    # upgrade; the loser waits (busy_timeout) instead of failing. Writers queue for it in
    # the turnstile first (gateway/store/turnstile.py).
    turnstile = conn.connection.info.get(TURNSTILE)
    if turnstile is None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
        return
    turnstile.acquire()
    try:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    except BaseException:
        turnstile.release()
        raise


def _take_turns(engine: Engine, database: Path) -> None:
    """Give every pooled connection of `engine` a `Turnstile` of its own, taken by
    `_begin` and given back as its transaction ends or the connection closes."""

    @event.listens_for(engine, "connect")
    def _open(_dbapi_conn: Any, record: Any) -> None:
        record.info[TURNSTILE] = Turnstile(database, BUSY_TIMEOUT)

    @event.listens_for(engine, "close")
    def _close(_dbapi_conn: Any, record: Any) -> None:
        turnstile = record.info.pop(TURNSTILE, None)
        if turnstile is not None:
            turnstile.close()

    @event.listens_for(engine, "commit")
    @event.listens_for(engine, "rollback")
    def _end(conn: Any) -> None:
        # Fired as the transaction ends (before SQLite's COMMIT returns): the next writer
        # may wait a moment in SQLite's busy handler, never a whole turn.
        turnstile = _turnstile_of(conn)
        if turnstile is not None:
            turnstile.release()


def _turnstile_of(conn: Any) -> Turnstile | None:
    # A connection invalidated by an error has no DBAPI connection to ask; its close
    # (the "close" event) gives the turn back.
    try:
        turnstile: Turnstile | None = conn.connection.info.get(TURNSTILE)
    except Exception:
        return None
    return turnstile


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


def alembic_config(engine: Engine) -> Config:
    # Imported here: Alembic (with Mako and Pygments) costs every process ~0.1 s to import,
    # and only `serve`, `process` and `db upgrade` migrate; the pipeline process never does.
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


#: pg_advisory_lock key held while migrations run ("sgw-migrate" as a 64-bit number).
MIGRATION_LOCK = 0x7367772D6D696772


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply the migrations; on PostgreSQL under a database-wide advisory lock.

    Several nodes may start at once on one database (docs/decisions.md D13.4: two concurrent
    upgrades both saw an empty `alembic_version` and one died on its unique key). The lock
    is taken on a connection of its own and held across the whole upgrade, so the second
    node waits, then reads the version the first one committed and finds nothing to do.
    A session-level lock (not a transaction one) so it spans Alembic's own transactions; it
    is released explicitly, or by PostgreSQL when the connection ends (a node killed
    mid-upgrade does not leave it held).
    """
    from alembic import command

    if not is_postgres(engine):
        command.upgrade(alembic_config(engine), revision)
        return
    with engine.connect() as lock:
        lock.exec_driver_sql(f"SELECT pg_advisory_lock({MIGRATION_LOCK})")
        lock.commit()
        try:
            command.upgrade(alembic_config(engine), revision)
        finally:
            lock.exec_driver_sql(f"SELECT pg_advisory_unlock({MIGRATION_LOCK})")
            lock.commit()


def open_database(url: str, *, migrate: bool = True) -> Engine:
    engine = make_engine(url)
    if migrate:
        upgrade(engine)
    return engine


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """One transaction: commit on success, roll back on any error."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def read_only(engine: Engine) -> Engine:
    """`engine` for reads only: its transactions begin deferred on SQLite (a snapshot, never
    the write lock the pipeline holds) and are never committed. Build it once per reader:
    each call makes a new option-bearing engine.

    On PostgreSQL its statements run in autocommit: under READ COMMITTED each statement
    sees its own snapshot anyway, so a transaction added nothing to a read but a BEGIN, a
    ROLLBACK, and psycopg forgetting every prepared statement of the connection at that
    ROLLBACK (it cannot tell whether it undid a DDL), so that the pooled connection's next
    user parsed and planned its statements again (docs/performance.md §8)."""
    if is_postgres(engine):
        return engine.execution_options(**{READ_ONLY: True}, isolation_level="AUTOCOMMIT")
    return engine.execution_options(**{READ_ONLY: True})


@contextmanager
def read_scope(engine: Engine) -> Iterator[Session]:
    """Reads only: on SQLite one deferred transaction (a snapshot, no write lock), never
    committed; on PostgreSQL statements in autocommit (`read_only`). Never write through
    it (on PostgreSQL a write would stand): use `session_scope` for writes."""
    with Session(read_only(engine), expire_on_commit=False) as s:
        try:
            yield s
        finally:
            s.rollback()
