"""SMTP ingest benchmark: the durable gateway against a bare aiosmtpd server, in one run.

What is measured (messages per second, and the latency of the final ``250``):

* ``bare``        stock ``aiosmtpd.smtp.SMTP`` whose handler only answers ``250``;
* ``gateway``     the real ``Gateway`` (spool in SQLite WAL, synchronous=FULL, group commit),
                  ``workers=False``: ingest only;
* ``gateway+wk``  the same with ``workers=True``: the pipeline (parse, thread, route, store)
                  runs while mail arrives and competes for the CPU;
* ``pg``, ``pg+wk`` with ``--database-url postgresql+psycopg://...``: the same on PostgreSQL,
                  where the spool is the database's ``spool_entry`` table (``250`` after the
                  commit there, group commit; gateway/shared_spool.py). Each run gets a
                  fresh database on that server (created and dropped here).

Every server runs on this process's event loop, set up like the daemon's (``asyncio.run``,
default loop, ``loop.create_server`` on 127.0.0.1 port 0). The load comes from a separate
process (``multiprocessing``, spawn) running one asyncio client per session over raw
sockets, so the client's CPU never shares the server's loop.

Modes: ``reuse`` (one connection per session, M messages on it) and ``new`` (a fresh
connection, EHLO and QUIT for every message).

Usage::

    python bench/ingest.py                         # 50 sessions x 100 messages, 4 KiB
    python bench/ingest.py --sessions 1 --messages 500 --modes reuse
    python bench/ingest.py --profile /tmp/gw.prof  # cProfile of the gateway's loop thread
    python bench/ingest.py --database-url postgresql+psycopg://postgres@127.0.0.1/postgres \
        --modes reuse --servers bare,gateway,pg       # SQLite and PostgreSQL, same run

At the end every gateway run is checked: the spool (plus, with workers, the messages the
pipeline already moved to the ticket database) holds exactly the messages that got ``250``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import multiprocessing as mp
import pstats
import sqlite3
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RULES = REPO / "tests" / "support" / "rules"
HOST = "127.0.0.1"
RCPT = "support@example.com"

# ----------------------------------------------------------------------------------------
# Client side (runs in the load process)
# ----------------------------------------------------------------------------------------


def make_message(session: int, seq: int, size: int, tag: str) -> bytes:
    """A plausible plain-text mail of about `size` bytes, CRLF lines, unique Message-ID."""
    head = (
        f"From: Customer {session} <c{session}@customer.example>\r\n"
        f"To: Support <{RCPT}>\r\n"
        f"Subject: Benchmark message {seq} from session {session}\r\n"
        "Date: Mon, 23 Nov 2026 10:00:00 +0100\r\n"
        f"Message-ID: <bench.{tag}.{session}.{seq}@customer.example>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 7bit\r\n"
        "\r\n"
    ).encode()
    line = b"Hello support, the printer on floor three is on fire again, please help.\r\n"
    body = bytearray()
    while len(head) + len(body) + len(line) <= size:
        body += line
    body += b"x" * max(0, size - len(head) - len(body) - 2) + b"\r\n"
    return head + bytes(body)


async def _reply(reader: asyncio.StreamReader) -> int:
    """Read one (possibly multi-line) SMTP reply; return its code."""
    while True:
        line = await reader.readline()
        if len(line) < 4:
            raise ConnectionError(f"connection closed or bad reply: {line!r}")
        if line[3:4] != b"-":
            return int(line[:3])


@dataclass
class LoadResult:
    sent: int = 0
    errors: int = 0
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)
    first_error: str = ""
    cpu: float = 0.0  # CPU seconds the load process used for this job


async def _transaction(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    session: int,
    data: bytes,
    res: LoadResult,
) -> None:
    writer.write(f"MAIL FROM:<c{session}@customer.example>\r\n".encode())
    code = await _reply(reader)
    if code != 250:
        raise ConnectionError(f"MAIL answered {code}")
    writer.write(f"RCPT TO:<{RCPT}>\r\n".encode())
    code = await _reply(reader)
    if code != 250:
        raise ConnectionError(f"RCPT answered {code}")
    writer.write(b"DATA\r\n")
    code = await _reply(reader)
    if code != 354:
        raise ConnectionError(f"DATA answered {code}")
    writer.write(data + b".\r\n")
    t0 = time.perf_counter()
    code = await _reply(reader)
    res.latencies.append(time.perf_counter() - t0)
    if code != 250:
        raise ConnectionError(f"end of DATA answered {code}")
    res.sent += 1


async def _open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(HOST, port)
    if await _reply(reader) != 220:
        raise ConnectionError("no 220 greeting")
    writer.write(b"EHLO load.bench.example\r\n")
    if await _reply(reader) != 250:
        raise ConnectionError("EHLO refused")
    return reader, writer


async def _close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"QUIT\r\n")
    with contextlib.suppress(ConnectionError):
        await _reply(reader)
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def run_load(
    port: int, mode: str, sessions: int, messages: int, size: int, tag: str
) -> LoadResult:
    """`sessions` concurrent SMTP clients, `messages` each, reused or new connections."""
    res = LoadResult()
    bodies = [[make_message(s, m, size, tag) for m in range(messages)] for s in range(sessions)]

    async def one_session(s: int) -> None:
        try:
            if mode == "reuse":
                reader, writer = await _open(port)
                for data in bodies[s]:
                    await _transaction(reader, writer, s, data, res)
                await _close(reader, writer)
            else:
                for data in bodies[s]:
                    reader, writer = await _open(port)
                    await _transaction(reader, writer, s, data, res)
                    await _close(reader, writer)
        except (OSError, ConnectionError, asyncio.IncompleteReadError) as exc:
            res.errors += 1
            res.first_error = res.first_error or f"session {s}: {exc!r}"

    c0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one_session(s) for s in range(sessions)))
    res.elapsed = time.perf_counter() - t0
    res.cpu = time.process_time() - c0
    return res


def client_process(conn: Connection) -> None:
    """The load process: run each job it is sent, answer with the result."""
    while True:
        job = conn.recv()
        if job is None:
            return
        try:
            res = asyncio.run(asyncio.wait_for(run_load(**job), timeout=job_timeout(job)))
        except TimeoutError:
            res = LoadResult(errors=1, first_error="client timed out")
        conn.send(res)


def job_timeout(job: dict[str, Any]) -> float:
    """A generous bound so that a wedged server never hangs the benchmark."""
    return 60.0 + job["sessions"] * job["messages"] * 0.02


# ----------------------------------------------------------------------------------------
# Server side (this process, one event loop)
# ----------------------------------------------------------------------------------------


class BareHandler:
    """The do-nothing handler: every message is answered `250` and forgotten."""

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 OK"


@dataclass
class Served:
    """A listening server; `expected` is set by the caller, `check` after the stop."""

    port: int
    expected: int = 0
    check: str = ""
    # Waits until the pipeline has processed the warm-up (workers only): the timed run then
    # measures a running pipeline, not one still starting up.
    drained: Callable[[], Awaitable[None]] | None = None


@contextlib.asynccontextmanager
async def bare_server() -> AsyncIterator[Served]:
    from aiosmtpd.smtp import SMTP

    loop = asyncio.get_running_loop()
    handler = BareHandler()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="mx.example.com", loop=loop), host=HOST, port=0
    )
    try:
        yield Served(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 5)


def gateway_settings(tmp: Path, rules: Path, database_url: str = "") -> Any:
    from gateway.settings import load_settings

    config = tmp / "config.toml"
    config.write_text("# benchmark config: everything comes from overrides\n")
    return load_settings(
        str(config),
        rules_dir=str(rules),
        smtp={
            "listen": f"{HOST}:0",
            "hostname": "mx.example.com",
            "domains": ["example.com"],
            "min_free_disk": 0,
            "max_connections_per_ip": 0,  # the load comes from one address
        },
        storage={
            "database_url": database_url or f"sqlite:///{tmp}/gateway.db",
            "spool_dir": str(tmp / "spool"),
        },
        outbound={"relay": "127.0.0.1:9", "from_address": "support@example.com"},
        security={"secret_key": "bench-secret-key-0123456789abcdef"},
    )


@contextlib.contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    """A new, empty PostgreSQL database on the server of `server_url`; dropped afterwards."""
    import psycopg

    base = server_url.replace("postgresql+psycopg://", "postgresql://")
    name = f"gw_bench_{time.time_ns()}"
    with psycopg.connect(base, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield server_url.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(base, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.asynccontextmanager
async def gateway_server(
    workers: bool, rules: Path, database_url: str = ""
) -> AsyncIterator[Served]:
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(fresh_database(database_url)) if database_url else ""
        async with _gateway_server(workers, rules, url) as served:
            yield served


@contextlib.asynccontextmanager
async def _gateway_server(workers: bool, rules: Path, database_url: str) -> AsyncIterator[Served]:
    from sqlalchemy import select, text

    from gateway.app import Gateway
    from gateway.security.dns import StaticResolver
    from gateway.store.db import open_database
    from gateway.store.models import Message

    with tempfile.TemporaryDirectory(prefix="gw-bench-") as d:
        tmp = Path(d)
        gw = Gateway(gateway_settings(tmp, rules, database_url), resolver=StaticResolver({}))
        await gw.start(workers=workers)
        assert gw.port is not None

        def verify(expected: int) -> str:
            # Spool ids still in the spool, united with the spool ids of messages the
            # pipeline already stored (an entry is deleted only after that commit).
            conn = sqlite3.connect(gw.spool.path)
            try:
                counts = dict(conn.execute("SELECT state, count(*) FROM spool GROUP BY state"))
                ids = {r[0] for r in conn.execute("SELECT id FROM spool")}
            finally:
                conn.close()
            local = 0
            if database_url:  # the spool is in PostgreSQL; the local file only for fallback
                local = len(ids)
                engine = open_database(database_url, migrate=False)
                with engine.connect() as c:
                    rows = c.execute(text("SELECT id, state FROM spool_entry")).fetchall()
                engine.dispose()
                ids = {r[0] for r in rows}
                counts = dict(Counter(r[1] for r in rows), local=local)
            stored: set[int] = set()
            if workers:
                engine = open_database(gw.settings.storage.database_url)
                with engine.connect() as c:
                    stored = {
                        r[0]
                        for r in c.execute(
                            select(Message.spool_id).where(Message.spool_id.is_not(None))  # type: ignore[union-attr]
                        )
                    }
                engine.dispose()
            total = len(ids | stored) + local
            ok = "OK" if total == expected else "MISMATCH"
            return (
                f"{ok}: spool {counts}, pipeline stored {len(stored)},"
                f" distinct {total}, expected {expected}"
            )

        async def drained() -> None:
            end = time.monotonic() + 60
            while gw.spool.counts().get("pending") and time.monotonic() < end:
                await asyncio.sleep(0.05)

        served = Served(gw.port, drained=drained if workers else None)
        try:
            yield served
        finally:
            # stop() lets the pipeline finish its current message only; the rest stays spooled.
            await gw.stop()
        served.check = verify(served.expected)  # the temp dir still exists here


# ----------------------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------------------


@dataclass
class Row:
    mode: str
    server: str
    rep: int
    msgs: int
    seconds: float
    errors: int
    p50_ms: float
    p99_ms: float
    server_cpu: float = 0.0  # CPU seconds per wall second, all threads of this process
    client_cpu: float = 0.0  # the same for the load process
    check: str = ""

    @property
    def rate(self) -> float:
        return self.msgs / self.seconds if self.seconds else 0.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class LoadClient:
    """The separate load process and the pipe to it."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=client_process, args=(child,), daemon=True)
        self.proc.start()

    async def run(self, **job: Any) -> LoadResult:
        def round_trip() -> LoadResult:
            self.conn.send(job)
            if not self.conn.poll(job_timeout(job) + 30):
                raise TimeoutError("load process did not answer")
            result: LoadResult = self.conn.recv()
            return result

        return await asyncio.get_running_loop().run_in_executor(None, round_trip)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.terminate()


async def measure(
    client: LoadClient,
    server: str,
    mode: str,
    args: argparse.Namespace,
    rep: int,
    profiler: cProfile.Profile | None,
) -> Row:
    rules = Path(args.rules)
    cm = (
        bare_server()
        if server == "bare"
        else gateway_server(
            workers=server.endswith("+wk"),
            rules=rules,
            database_url=args.database_url if server.startswith("pg") else "",
        )
    )
    job = {"mode": mode, "size": args.size}
    tag = f"{mode}.{server}.{rep}.{time.time_ns()}"  # unique Message-IDs and bytes
    async with cm as served:
        # Warm-up: a few messages per session, not timed (connections, caches, imports).
        warm = await client.run(
            port=served.port, sessions=args.sessions, messages=2, tag=tag + "w", **job
        )
        if served.drained is not None:
            await served.drained()
        if profiler is not None:
            profiler.enable()
        c0 = time.process_time()
        res = await client.run(
            port=served.port, sessions=args.sessions, messages=args.messages, tag=tag, **job
        )
        server_cpu = time.process_time() - c0
        if profiler is not None:
            profiler.disable()
        served.expected = warm.sent + res.sent
    row = Row(
        mode=mode,
        server=server,
        rep=rep,
        msgs=res.sent,
        seconds=res.elapsed,
        errors=res.errors + warm.errors,
        p50_ms=percentile(res.latencies, 0.50) * 1000,
        p99_ms=percentile(res.latencies, 0.99) * 1000,
        server_cpu=server_cpu / res.elapsed if res.elapsed else 0.0,
        client_cpu=res.cpu / res.elapsed if res.elapsed else 0.0,
        check=served.check,
    )
    if res.first_error or warm.first_error:
        row.check += f" first error: {res.first_error or warm.first_error}"
    return row


def print_table(rows: list[Row], args: argparse.Namespace) -> None:
    print()
    print(
        f"{args.sessions} sessions x {args.messages} messages of {args.size} bytes,"
        f" python {sys.version.split()[0]}, {mp.cpu_count()} cores"
    )
    header = (
        f"{'mode':<6} {'server':<11} {'msgs':>6} {'seconds':>8} {'msg/s':>8}"
        f" {'vs bare':>8} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} {'srv cpu':>7}"
        f" {'cli cpu':>7}"
    )
    print(header)
    print("-" * len(header))
    bare = {(r.mode, r.rep): r.rate for r in rows if r.server == "bare"}
    for r in rows:
        base = bare.get((r.mode, r.rep))
        ratio = f"{r.rate / base:.2f}" if base else "-"
        print(
            f"{r.mode:<6} {r.server:<11} {r.msgs:>6} {r.seconds:>8.2f} {r.rate:>8.0f}"
            f" {ratio:>8} {r.p50_ms:>7.2f} {r.p99_ms:>7.2f} {r.errors:>6}"
            f" {r.server_cpu:>7.2f} {r.client_cpu:>7.2f}"
        )
    if args.repeat > 1:
        print(f"\nmedian of {args.repeat} runs (ratio: median of the per-run ratios):")
        for mode in dict.fromkeys(r.mode for r in rows):
            for server in dict.fromkeys(r.server for r in rows):
                mine = [r for r in rows if r.mode == mode and r.server == server]
                ratios = [r.rate / bare[(mode, r.rep)] for r in mine if bare.get((mode, r.rep))]
                med_ratio = f"{statistics.median(ratios):.2f}" if ratios else "-"
                print(
                    f"  {mode:<6} {server:<11} {statistics.median(r.rate for r in mine):8.0f}"
                    f" msg/s  vs bare {med_ratio}"
                )
    checks = [r for r in rows if r.check]
    if checks:
        print("\ncorrectness (spool rows + pipeline-stored messages == messages answered 250):")
        for r in checks:
            print(f"  {r.mode:<6} {r.server:<11} {r.check}")


async def amain(args: argparse.Namespace) -> int:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    client = LoadClient()
    profiler = cProfile.Profile() if args.profile else None
    rows: list[Row] = []
    try:
        for mode in modes:
            for rep in range(args.repeat):
                for server in servers:
                    prof = profiler if server == args.profile_server else None
                    row = await measure(client, server, mode, args, rep, prof)
                    print(
                        f"  {row.mode:<6} {row.server:<11} {row.msgs:>6} msgs"
                        f" {row.seconds:6.2f} s {row.rate:7.0f} msg/s",
                        flush=True,
                    )
                    rows.append(row)
    finally:
        client.close()
    print_table(rows, args)
    if profiler is not None:
        profiler.dump_stats(args.profile)
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
        print(
            f"\ncProfile of the event-loop thread during '{args.profile_server}' runs"
            f" (saved to {args.profile}), top by own time:"
        )
        print(out.getvalue())
    bad = [r for r in rows if r.errors or (r.check and not r.check.startswith("OK"))]
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--sessions", type=int, default=50, help="concurrent SMTP sessions")
    p.add_argument("--messages", type=int, default=100, help="messages per session")
    p.add_argument("--size", type=int, default=4096, help="message size in bytes")
    p.add_argument("--modes", default="reuse,new", help="reuse,new")
    p.add_argument(
        "--servers",
        default="",
        help="bare,gateway,gateway+wk,pg,pg+wk (default: all; pg* need --database-url)",
    )
    p.add_argument(
        "--database-url",
        default="",
        help="a PostgreSQL server (postgresql+psycopg://user@host/db): adds the pg runs",
    )
    p.add_argument("--repeat", type=int, default=1, help="repetitions of each measurement")
    p.add_argument("--rules", default=str(DEFAULT_RULES), help="rules folder for the gateway")
    p.add_argument("--profile", metavar="FILE", help="cProfile the server loop, save stats")
    p.add_argument("--profile-server", default="gateway", help="which server to profile")
    args = p.parse_args(argv)
    if args.sessions < 1 or args.messages < 1 or args.size < 512:
        p.error("need --sessions >= 1, --messages >= 1, --size >= 512")
    if not args.servers:
        args.servers = "bare,gateway,gateway+wk" + (",pg,pg+wk" if args.database_url else "")
    if "pg" in args.servers and not args.database_url:
        p.error("the pg servers need --database-url")
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
