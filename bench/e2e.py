"""End to end: SMTP in -> DKIM-signed acknowledgement at a relay (docs/decisions.md D16).

What a customer feels is the time from sending a message to the signed acknowledgement in
their inbox. This bench runs `support-gateway serve` as an admin would (its own process,
the pipeline in its own child process, a temporary spool), with an rsa-sha256 2048 DKIM key
and a capture relay (an aiosmtpd sink in this process). Each message comes from a new
customer (a new ticket and an acknowledgement each), at steady rates (default 20, 50 and
100 messages a second for 60 s each), with 0 and with 100,000 open tickets pre-loaded.

Pre-loading: the open tickets are bulk-inserted directly into the database after `db
upgrade` and before `serve` starts (one executemany, ~3 s on SQLite; tickets with running
SLA clocks due days ahead, so nothing is due; `escalate_at` left NULL, so the escalator's
cold planning at start is part of what is measured; the bench waits for it before the first
rate and prints how long it took).

Printed per rate: sent, acknowledged (arrived at the relay, DKIM-Signature present), p50 /
p95 / p99 from the start of the SMTP session to arrival at the relay, the SMTP `250` p99 (end
of DATA to the reply), the backlog when sending stops (acknowledgements not yet arrived;
outbox rows queued) and the daemon's and the pipeline child's RSS (peak during the rate).
Sender checks are off (`verify_senders = false`): the machine has no DNS for the made-up
customer domains; bench/dns_outage.py covers DNS.

Usage::

    python bench/e2e.py                                   # SQLite, 0 and 100k, 20/50/100/s, 60 s
    python bench/e2e.py --duration 20 --preload 100000   # shorter
    python bench/e2e.py --database-url postgresql://postgres@127.0.0.1:5432/postgres
    python bench/e2e.py --tls                             # the relay offers STARTTLS
    python bench/e2e.py --database-url ... --workers 2    # two pipeline processes

With defaults one database takes about 8 minutes (2 x (3 x 60 s + drains) + start-up). With
--database-url a fresh database is created next to the one named (and dropped after).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from aiosmtpd.controller import Controller  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from bench.mail import customer_message  # noqa: E402

RULES = REPO / "tests" / "support" / "rules"
#: One pre-loaded ticket whose first response falls due during the first rate: the time
#: from its moment to the escalation mail at the relay is the escalator's lag (goal < 5 s).
DUE_REF = "PRE-DUE"
MiB = 1024 * 1024
#: Seconds one client session may take (connect to the reply after QUIT).
SEND_TIMEOUT = 120.0


# ------------------------------------------------------------------------------ processes


def rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            out.extend(int(t) for t in (task / "children").read_text().split())
    except OSError:
        pass
    return out


class Sampler(threading.Thread):
    """Peak RSS of the daemon and of its pipeline child, every 100 ms, reset per rate."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self.child_peak = 0
        self.stop = threading.Event()

    def reset(self) -> None:
        self.peak = self.child_peak = 0

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, rss(self.pid))
            self.child_peak = max(self.child_peak, pipeline_rss(self.pid))
            time.sleep(0.1)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (/proc/PID/stat fields 14 and 15)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle since boot (/proc/stat), for everything the
    bench does not see as its own children: the PostgreSQL server above all."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class CpuShare:
    """CPU used by the daemon, its pipeline process(es), this bench and the whole machine
    between `__init__` and `per_message` (so the figures say where the two cores went)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start = self._now()

    def _now(self) -> tuple[float, float, float, float]:
        me = os.times()
        pipeline = sum(cpu_seconds(c) for c in children(self.pid))
        busy = machine_busy_seconds()
        return cpu_seconds(self.pid), pipeline, me.user + me.system, busy

    def per_message(self, n: int) -> str:
        end = self._now()
        d, c, b, m = (1000 * (e - s) / max(n, 1) for e, s in zip(end, self.start, strict=True))
        return (
            f"CPU per message: daemon {d:.1f} ms, pipeline {c:.1f} ms, bench {b:.1f} ms,"
            f" whole machine {m:.1f} ms"
        )


def pipeline_rss(pid: int) -> int:
    """RSS of the pipeline child (the largest child: multiprocessing's resource tracker,
    ~15 MB, is the other one)."""
    return max((rss(c) for c in children(pid)), default=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------ the relay


class Sink:
    """aiosmtpd handler: records when each acknowledgement arrives, per recipient."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self.signed: dict[str, bool] = {}
        self.samples: list[bytes] = []
        self.due_arrived: float | None = None  # wall time the due ticket's first mail came
        self.mails = 0  # every mail the relay took
        self.sessions = 0  # SMTP sessions that carried at least one of them
        self.tls_sessions = 0  # ... of which upgraded with STARTTLS

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        now = time.monotonic()
        data = bytes(envelope.content)
        self.mails += 1
        if not getattr(session, "carried_mail", False):
            session.carried_mail = True
            self.sessions += 1
            self.tls_sessions += getattr(session, "ssl", None) is not None
        if self.due_arrived is None and DUE_REF.encode() in data:
            self.due_arrived = time.time()
        for address in envelope.rcpt_tos:
            rcpt = address.lower()
            if rcpt.startswith("c") and rcpt.endswith("@customer.example"):
                self.arrived.setdefault(rcpt, now)
                self.signed[rcpt] = data.startswith(b"DKIM-Signature:")
                if len(self.samples) < 3:
                    self.samples.append(data)
        return "250 OK"


class LeanRelay(asyncio.Protocol):
    """A minimal SMTP sink for the capture relay (RFC 5321 server side: EHLO/HELO, MAIL,
    RCPT, DATA with dot-unstuffing, RSET, NOOP, QUIT; PIPELINING and 8BITMIME as aiosmtpd
    advertises them), feeding the same `Sink.handle_DATA`.

    Why not aiosmtpd here: the bench shares the daemon's two cores, and aiosmtpd costs the
    bench ~0.5 ms of CPU per mail received (its per-command dispatch, header-parser address
    parsing, per-session introspection), two mails per new customer: CPU the gateway then
    cannot use, although in production the relay runs elsewhere. `--tls` keeps aiosmtpd (it
    needs STARTTLS)."""

    EHLO = (
        b"250-relay.bench.example\r\n250-SIZE 33554432\r\n250-8BITMIME\r\n"
        b"250-SMTPUTF8\r\n250 HELP\r\n"
    )

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.buf = b""
        self.data: bytearray | None = None
        self.rcpt: list[str] = []
        self.session = _Session()
        self.quit = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(b"220 relay.bench.example ESMTP\r\n")

    def data_received(self, chunk: bytes) -> None:
        self.buf += chunk
        out: list[bytes] = []
        while self.buf and not self.transport.is_closing():
            if self.data is not None:
                if not self._take_data(out):
                    break
                continue
            line, sep, rest = self.buf.partition(b"\r\n")
            if not sep:
                break
            self.buf = rest
            out.append(self._command(line))
        if out:
            self.transport.write(b"".join(out))
        if self.quit:
            self.transport.close()

    def _take_data(self, out: list[bytes]) -> bool:
        """Move message bytes out of the buffer; True once the message is complete."""
        assert self.data is not None
        end = self.buf.find(b"\r\n.\r\n")
        if end < 0:
            # keep the last 4 bytes: the terminator may straddle two reads
            self.data += self.buf[:-4]
            self.buf = self.buf[-4:]
            return False
        self.data += self.buf[: end + 2]
        self.buf = self.buf[end + 5 :]
        content = bytes(self.data).replace(b"\r\n..", b"\r\n.")
        if content.startswith(b".."):
            content = content[1:]
        self.data = None
        env = _Envelope(content, self.rcpt)
        self.rcpt = []
        # Sink.handle_DATA is a coroutine that never awaits: run it to its return here.
        with contextlib.suppress(StopIteration):
            self.sink.handle_DATA(None, self.session, env).send(None)
        out.append(b"250 OK\r\n")
        return True

    def _command(self, line: bytes) -> bytes:
        verb = line[:4].upper()
        if verb == b"EHLO":
            return self.EHLO
        if verb in (b"MAIL", b"RSET"):
            self.rcpt = []
        elif verb == b"RCPT":
            self.rcpt.append(line.partition(b"<")[2].partition(b">")[0].decode("utf-8", "replace"))
        elif verb == b"DATA":
            self.data = bytearray()
            if self.buf.startswith(b".\r\n"):  # an empty message: its terminator needs a CRLF
                self.buf = b"\r\n" + self.buf
            return b"354 End data with <CR><LF>.<CR><LF>\r\n"
        elif verb == b"QUIT":
            self.quit = True
            return b"221 Bye\r\n"
        elif verb not in (b"HELO", b"NOOP"):
            return b"500 Error: command not recognized\r\n"
        return b"250 OK\r\n"


class _Session:
    """What Sink.handle_DATA reads of an aiosmtpd session."""

    ssl = None
    carried_mail = False


class _Envelope:
    def __init__(self, content: bytes, rcpt_tos: list[str]) -> None:
        self.content = content
        self.rcpt_tos = rcpt_tos


class LeanController:
    """Runs `LeanRelay` on its own event loop in a thread (like aiosmtpd's Controller)."""

    def __init__(self, sink: Sink, port: int) -> None:
        self.sink, self.port = sink, port
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> None:
        self.thread.start()
        make = self.loop.create_server(lambda: LeanRelay(self.sink), "127.0.0.1", self.port)
        self.server = asyncio.run_coroutine_threadsafe(make, self.loop).result(10)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


# ------------------------------------------------------------------------------ the client


class _Client(asyncio.Protocol):
    """One sender session in lock step (no PIPELINING: the gateway does not offer it): each
    command waits for the reply to the one before, as a plain MTA does. A protocol rather
    than streams, to keep the bench's own CPU low (it shares the daemon's cores)."""

    def __init__(self, steps: list[bytes], done: asyncio.Future[tuple[float, str]]) -> None:
        self.steps = steps  # what to send after each reply: greeting, EHLO, ..., the message
        self.done = done
        self.buf = b""
        self.sent_data_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, chunk: bytes) -> None:
        self.buf += chunk
        while b"\r\n" in self.buf:
            line, _, self.buf = self.buf.partition(b"\r\n")
            if len(line) < 4 or line[3:4] == b"-":
                continue  # a continuation line of a multi-line reply
            if not self.steps:  # the reply to the message: done (QUIT needs no answer)
                answer = line.decode(errors="replace")
                latency = time.monotonic() - self.sent_data_at
                self.transport.write(b"QUIT\r\n")
                if not self.done.done():
                    self.done.set_result((latency, answer))
                return
            step = self.steps.pop(0)
            if not self.steps:
                self.sent_data_at = time.monotonic()
            self.transport.write(step)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"closed: {exc!r}"))


async def send_one(port: int, addr: str, n: int) -> tuple[float, float, str]:
    """One new customer's message on its own connection: (start, 250 latency, reply)."""
    start = time.monotonic()
    msg = customer_message(n, addr)
    steps = [
        b"EHLO client.customer.example\r\n",
        f"MAIL FROM:<{addr}>\r\n".encode(),
        b"RCPT TO:<support@example.com>\r\n",
        b"DATA\r\n",
        msg + b".\r\n",
    ]
    loop = asyncio.get_running_loop()
    done: asyncio.Future[tuple[float, str]] = loop.create_future()
    transport, _ = await loop.create_connection(lambda: _Client(steps, done), "127.0.0.1", port)
    try:
        latency, answer = await done
        return start, latency, answer
    finally:
        transport.close()


async def load(port: int, rate: int, duration: float, tag: str) -> list[tuple[str, Any]]:
    """Send rate x duration messages, one every 1/rate s (not waiting for earlier ones)."""
    total = int(rate * duration)
    t0 = time.monotonic()
    tasks: list[tuple[str, asyncio.Task[tuple[float, float, str]]]] = []
    for i in range(total):
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        addr = f"c{tag}-{i}@customer.example"
        # Bounded: on an overloaded machine a connection can sit in the listen backlog for
        # ever; it then counts as not acknowledged instead of hanging the bench.
        one = asyncio.wait_for(send_one(port, addr, i), timeout=SEND_TIMEOUT)
        tasks.append((addr, asyncio.create_task(one)))
    out: list[tuple[str, Any]] = []
    for addr, task in tasks:
        try:
            out.append((addr, await task))
        except Exception as exc:  # a refused connection counts as not acknowledged
            out.append((addr, exc))
    return out


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


# ------------------------------------------------------------------------------ database


def preload(url: str, count: int, due_at: datetime) -> float:
    """Bulk-insert `count` open tickets, nothing due for days, plus one (DUE_REF) whose
    first response falls due at `due_at`; returns seconds taken."""
    from gateway.store.models import Ticket

    if count <= 0:
        return 0.0
    t = time.monotonic()
    now = datetime.now(UTC)
    engine = create_engine(url)
    table: Any = Ticket.metadata.tables["ticket"]
    template = Ticket(ref="x", created_at=now, updated_at=now).model_dump()
    template.pop("id", None)
    rows = []
    owners = ("alice", "bob", "carol")
    for i in range(count):
        created = now - timedelta(minutes=(i % 20_000))
        row = dict(template)
        row.update(
            ref=f"PRE-{i:06d}",
            subject=f"preloaded {i}",
            normalized_subject=f"preloaded {i}",
            requester=f"pre{i}@old.example",
            owner=owners[i % 3],
            queue="support",
            sla="fast",
            created_at=created,
            updated_at=created,
            last_customer_at=created,
            first_response_due=now + timedelta(days=2 + i % 7),
            resolution_due=now + timedelta(days=10 + i % 7),
            acknowledged=True,
            escalate_at=None,
        )
        rows.append(row)
    due = dict(rows[0])
    due.update(ref=DUE_REF, subject="due soon", first_response_due=due_at, owner="alice")
    rows.append(due)
    with engine.begin() as conn:
        for i in range(0, len(rows), 10_000):
            conn.execute(table.insert(), rows[i : i + 10_000])
    with engine.begin() as conn:
        # Statistics for the planner on the table just loaded, as autovacuum would gather
        # after such a load. Only that table: statistics that say "empty" about the tables
        # about to grow (message, event, outbox) made PostgreSQL read them whole for every
        # lookup and foreign-key check, for as long as nothing analysed them again, and on
        # a server with autovacuum off (this machine's) nothing does (docs/performance.md §9).
        conn.execute(text("ANALYZE ticket"))
    engine.dispose()
    return time.monotonic() - t


def count(url: str, sql: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text(sql)).scalar() or 0)
    finally:
        engine.dispose()


# ------------------------------------------------------------------------------ one run


def run(args: argparse.Namespace, open_tickets: int, db_url: str, tmp: Path) -> list[str]:  # noqa: C901  (the benchmark in time order: start, warm-up, rates, checks, stop)
    from gateway.outbound.dkim import keygen

    key = tmp / "dkim.pem"
    keygen(key, domain="example.com", selector="bench")
    sink = Sink()
    tls: dict[str, Any] = {}
    if args.tls:
        # The relay offers STARTTLS, as most smarthosts do (self-signed: the daemon's
        # opportunistic TLS encrypts without verifying).
        import ssl

        from tests.support.tls import self_signed

        cert, cert_key = self_signed(tmp, "127.0.0.1")
        server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_tls.load_cert_chain(cert, cert_key)
        tls["tls_context"] = server_tls
    relay: Any = (
        Controller(sink, hostname="127.0.0.1", port=free_port(), **tls)
        if tls
        else LeanController(sink, free_port())
    )
    relay.start()
    port = free_port()
    cfg = tmp / "config.toml"
    cfg.write_text(
        f'rules_dir = "{RULES}"\n'
        f'[smtp]\nlisten = "127.0.0.1:{port}"\nhostname = "mx.bench.example"\n'
        'domains = ["example.com"]\nmin_free_disk = 0\nmax_connections_per_ip = 1000\n'
        f'[storage]\ndatabase_url = "{db_url}"\nspool_dir = "{tmp}/spool"\n'
        f'[outbound]\nrelay = "127.0.0.1:{relay.port}"\nfrom_address = "support@example.com"\n'
        f'[outbound.dkim]\nselector = "bench"\nkey_file = "{key}"\ndomain = "example.com"\n'
        '[security]\nsecret_key = "bench-secret-key-0123456789abcdef"\n'
        "verify_senders = false\n"
        + (f"[pipeline]\nworkers = {args.workers}\n" if args.workers > 1 else "")
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["PYTHONPATH"] = str(Path(args.code).resolve()) if args.code else str(REPO)
    cli = [sys.executable, "-m", "gateway", "--config", str(cfg)]
    # `python -m` puts the working directory before PYTHONPATH: run from the temporary
    # folder, or a bench started inside a checkout would run that checkout's daemon.
    subprocess.run([*cli, "db", "upgrade"], check=True, env=env, capture_output=True, cwd=tmp)
    due_at = datetime.now(UTC) + timedelta(seconds=args.due_in)
    took = preload(db_url, open_tickets, due_at)
    logf = open(tmp / "daemon.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [*cli, "serve"], stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=tmp
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while b"listening on" not in (tmp / "daemon.log").read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.stderr.write((tmp / "daemon.log").read_text())
                raise SystemExit("daemon did not start")
            time.sleep(0.05)
        t = time.monotonic()
        unplanned = "SELECT count(*) FROM ticket WHERE status = 'open' AND escalate_at IS NULL"
        while open_tickets and count(db_url, unplanned) and time.monotonic() - t < 300:
            time.sleep(0.5)
        cold = time.monotonic() - t
        if open_tickets:
            lines.append(
                f"preloaded {open_tickets:,} open tickets in {took:.1f} s; escalator planned"
                f" them in {cold:.1f} s after start; RSS daemon {rss(proc.pid) / MiB:.0f} MB,"
                f" pipeline {pipeline_rss(proc.pid) / MiB:.0f} MB"
            )
        # Warm-up: the first rate starts once the pipeline child is up and one message has
        # gone all the way through (a spawned child imports for seconds on a loaded machine;
        # that start-up is not what a customer waits for in steady operation).
        t = time.monotonic()
        warm = asyncio.run(load(port, 1, 1, "warmup"))
        while any(a not in sink.arrived for a, _ in warm) and time.monotonic() - t < 120:
            time.sleep(0.2)
        lines.append(
            f"warm-up: the first acknowledgement arrived {time.monotonic() - t:.1f} s"
            " after its message"
        )
        print(lines[-1], flush=True)
        time.sleep(1.0)
        sampler = Sampler(proc.pid)
        sampler.start()
        for rate in args.rates:
            sampler.reset()
            mails, sessions, tls = sink.mails, sink.sessions, sink.tls_sessions
            tag = f"{open_tickets}x{rate}"
            cpu = CpuShare(proc.pid)
            results = asyncio.run(load(port, rate, args.duration, tag))
            stop = time.monotonic()
            sent = [(a, r) for a, r in results if not isinstance(r, Exception)]
            accepted = [(a, r) for a, r in sent if r[2].startswith("250")]
            pending = sum(1 for a, _ in accepted if a not in sink.arrived)
            queued = count(db_url, "SELECT count(*) FROM outbox WHERE state = 'queued'")
            end = stop + args.drain
            while time.monotonic() < end and any(a not in sink.arrived for a, _ in accepted):
                time.sleep(0.2)
            lat = [sink.arrived[a] - r[0] for a, r in accepted if a in sink.arrived]
            share = cpu.per_message(len(lat))
            smtp = [r[1] for _, r in sent]
            signed = sum(1 for a, _ in accepted if sink.signed.get(a))
            lines.append(
                f"| {open_tickets:,} | {rate}/s for {args.duration:.0f} s "
                f"| {len(lat):,}/{len(results):,} (signed {signed:,}) "
                f"| {pct(lat, 50):.2f} s | {pct(lat, 95):.2f} s | {pct(lat, 99):.2f} s "
                f"| {pct(smtp, 99) * 1000:.0f} ms "
                f"| {pending:,} not arrived, {queued:,} queued "
                f"| {sampler.peak / MiB:.0f} MB | {sampler.child_peak / MiB:.0f} MB |"
            )
            print(lines[-1], flush=True)
            print(
                f"  relay: {sink.mails - mails:,} mails over {sink.sessions - sessions:,}"
                f" new SMTP sessions ({sink.tls_sessions - tls:,} with STARTTLS)",
                flush=True,
            )
            print(f"  {share} (acknowledged, from the rate's start to the drain's end)", flush=True)
            time.sleep(1.0)
        sampler.stop.set()
        if open_tickets:
            lag = (
                f"{sink.due_arrived - due_at.timestamp():.1f} s"
                if sink.due_arrived is not None
                else "never arrived"
            )
            lines.append(
                f"escalation: {DUE_REF}'s breach mail at the relay {lag} after its moment"
                f" (with {open_tickets:,} open tickets, during the {args.rates[0]}/s rate)"
            )
        if sink.samples:
            import dkim

            from gateway.outbound.dkim import load_key, public_txt_record

            record = public_txt_record(load_key(key, "example.com", "bench")).encode()
            ok = all(dkim.verify(m, dnsfunc=lambda name, timeout=5: record) for m in sink.samples)
            lines.append(f"DKIM verifies (dkimpy, {len(sink.samples)} samples): {ok}")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        logf.close()
        relay.stop()
        if args.keep_log:
            Path(args.keep_log).write_bytes((tmp / "daemon.log").read_bytes())
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rates", default="20,50,100", help="messages per second, comma-separated")
    p.add_argument("--duration", type=float, default=60.0, help="seconds per rate")
    p.add_argument("--preload", default="0,100000", help="open tickets, comma-separated")
    p.add_argument("--drain", type=float, default=20.0, help="seconds to wait after a rate")
    p.add_argument(
        "--due-in", type=float, default=45.0, help="seconds from pre-load to the due moment"
    )
    p.add_argument("--keep-log", default="", help="copy the daemon's log here at the end")
    p.add_argument("--database-url", default="", help="PostgreSQL server (default SQLite)")
    p.add_argument("--tls", action="store_true", help="the relay offers STARTTLS")
    p.add_argument("--workers", type=int, default=1, help="pipeline.workers (PostgreSQL only, > 1)")
    p.add_argument(
        "--code",
        default="",
        help="run the daemon from this checkout (e.g. /work/main) for a before/after pair",
    )
    args = p.parse_args()
    args.rates = [int(r) for r in args.rates.split(",") if r]
    preloads = [int(n) for n in args.preload.split(",") if n]
    load_avg = os.getloadavg()
    print(f"load average before: {load_avg[0]:.2f} {load_avg[1]:.2f} {load_avg[2]:.2f}")
    print(f"daemon code: {args.code or REPO}")
    header = (
        "| open tickets | rate | acknowledged | p50 | p95 | p99 | SMTP 250 p99 | backlog at end"
        " | RSS daemon | RSS pipeline |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    out: list[str] = []
    for n in preloads:
        with tempfile.TemporaryDirectory(prefix="gw-e2e-") as tmpdir:
            tmp = Path(tmpdir)
            if args.database_url:
                base = make_url(args.database_url)
                name = f"gw_e2e_{os.getpid()}_{n}"
                admin = create_engine(base, isolation_level="AUTOCOMMIT")
                with admin.connect() as conn:
                    conn.execute(text(f'CREATE DATABASE "{name}"'))
                    # Part of the figure: with autovacuum off nothing refreshes the
                    # planner's statistics nor reclaims deleted rows (docs/performance.md §9).
                    autovacuum = conn.execute(text("SHOW autovacuum")).scalar()
                print(f"PostgreSQL server: autovacuum = {autovacuum}", flush=True)
                url = base.set(database=name).render_as_string(hide_password=False)
                try:
                    print(header if not out else "", flush=True)
                    out += run(args, n, url, tmp)
                finally:
                    with admin.connect() as conn:
                        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                    admin.dispose()
            else:
                print(header if not out else "", flush=True)
                out += run(args, n, f"sqlite:///{tmp}/gw.db", tmp)
    print()
    print(header)
    for line in out:
        print(line)
    load_avg = os.getloadavg()
    print(f"load average after: {load_avg[0]:.2f} {load_avg[1]:.2f} {load_avg[2]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
