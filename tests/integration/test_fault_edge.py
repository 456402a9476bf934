"""docs/decisions.md D10.7, D10.9, D10.10 and D10.11: the SMTP edge under abuse (real daemon,
real sockets).

Memory is bounded by `smtp.inflight_budget` (large DATA streamed to disk), control
characters in envelope addresses get a final syntax reply, a session cannot outlive
`smtp.max_session_time` by NOOPing, the greeting tells nothing about the software, short
secrets stop start-up, and what the daemon writes is private whatever the umask.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiosmtplib
import pytest

from gateway.clock import FrozenClock
from gateway.outbound.deliver import PERMANENT, deliver
from gateway.settings import Settings
from tests.conftest import make_settings
from tests.support.gateway import all_tickets, make_mail, running_gateway

RULES = Path(__file__).parents[1] / "support" / "rules"


class Client:
    """A bare SMTP client on asyncio streams: exactly the bytes a test wants on the wire."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.greeting = ""

    @classmethod
    async def connect(cls, port: int) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        c = cls(reader, writer)
        _, c.greeting = await c.reply()
        return c

    async def reply(self) -> tuple[int, str]:
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), 30)
            if not line:
                raise ConnectionError("closed: " + " | ".join(lines))
            text = line.decode(errors="replace").rstrip("\r\n")
            lines.append(text)
            if text[3:4] != "-":
                return int(text[:3]), "\n".join(lines)

    async def cmd(self, line: bytes) -> tuple[int, str]:
        self.writer.write(line + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def envelope(self, sender: str = "pat@customer.example") -> None:
        assert (await self.cmd(b"EHLO client.example"))[0] == 250
        assert (await self.cmd(f"MAIL FROM:<{sender}>".encode()))[0] == 250
        assert (await self.cmd(b"RCPT TO:<support@example.com>"))[0] == 250
        assert (await self.cmd(b"DATA"))[0] == 354

    async def closed(self, timeout: float = 10) -> bool:
        """True once the server has closed the connection (bounded wait)."""
        try:
            data = await asyncio.wait_for(self.reader.read(), timeout)
        except TimeoutError:
            return False
        return data == b"" or self.reader.at_eof()

    def close(self) -> None:
        self.writer.close()


# --- #9: control characters in envelope addresses ---------------------------------------


async def test_control_characters_in_envelope_addresses_get_a_syntax_reply(
    settings: Settings, clock: FrozenClock
) -> None:
    async with running_gateway(settings, clock) as gw:
        assert gw.port is not None
        c = await Client.connect(gw.port)
        try:
            assert (await c.cmd(b"EHLO client.example"))[0] == 250
            for bad in (b"n\x00ul@cust.example", b"a\rb@cust.example", b"x\x01y@c.example"):
                code, text = await c.cmd(b"MAIL FROM:<" + bad + b">")
                assert code == 501, text
                assert "5.1.7" in text, text
            code, text = await c.cmd(b"MAIL FROM:<d\x7fel@cust.example>")
            assert code == 501, text
            assert "5.1.7" in text, text
            # Nothing of the refused sender survives: DATA has no transaction to end.
            assert (await c.cmd(b"DATA"))[0] == 503
            assert (await c.cmd(b"MAIL FROM:<pat@customer.example>"))[0] == 250
            code, text = await c.cmd(b"RCPT TO:<sup\x00port@example.com>")
            assert code == 501, text
            assert "5.1.3" in text, text
            assert (await c.cmd(b"DATA"))[0] == 503  # no recipient was taken
            assert (await c.cmd(b"QUIT"))[0] == 221
        finally:
            c.close()
        assert gw.spool.counts() == {}


async def test_delivery_to_an_address_with_a_control_character_is_permanent() -> None:
    # Such an address may still come from elsewhere (a header); aiosmtplib refuses to send
    # it with ValueError, which used to be retried for five days.
    result = await deliver(
        b"Subject: ack\r\n\r\nhi\r\n",
        "",
        ["n\x00ul@cust.example"],
        relay=("127.0.0.1", 9),
        helo="mx.example.com",
    )
    assert result.outcome == PERMANENT
    assert "5.1.3" in result.detail


# --- #10: session lifetime ---------------------------------------------------------------


async def test_a_noop_loop_cannot_hold_a_session_beyond_max_session_time(
    tmp_path: Path, clock: FrozenClock
) -> None:
    settings = make_settings(tmp_path, smtp={"max_session_time": 2.0, "timeout": 300.0})
    async with running_gateway(settings, clock) as gw:
        assert gw.port is not None
        c = await Client.connect(gw.port)
        started = time.monotonic()
        try:
            assert (await c.cmd(b"EHLO client.example"))[0] == 250
            last: tuple[int, str] = (0, "")
            # Each NOOP resets the 300 s idle timer; only the lifetime can end this loop.
            while time.monotonic() - started < 15:
                try:
                    last = await c.cmd(b"NOOP")
                except ConnectionError as exc:
                    last = (421, str(exc))
                if last[0] != 250:
                    break
                await asyncio.sleep(0.2)
            assert last[0] == 421, last
            assert "4.4.2" in last[1], last
            assert await c.closed()
        finally:
            c.close()
        # Ended by the 2 s lifetime, not by the 15 s bound of this loop.
        assert time.monotonic() - started < 10


async def test_rset_spam_is_bounded_between_messages(tmp_path: Path, clock: FrozenClock) -> None:
    settings = make_settings(tmp_path, smtp={"max_idle_commands": 10})
    async with running_gateway(settings, clock) as gw:
        assert gw.port is not None
        c = await Client.connect(gw.port)
        try:
            assert (await c.cmd(b"EHLO client.example"))[0] == 250  # idle command 1
            for _ in range(9):
                assert (await c.cmd(b"RSET"))[0] == 250
            code, text = await c.cmd(b"RSET")
            assert code == 421
            assert "4.7.0" in text
            assert await c.closed()
        finally:
            c.close()
        # A session that sends mail is not cut: the count starts again after each message.
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.port, timeout=30) as smtp:
            for i in range(3):
                for _ in range(5):
                    await smtp.rset()
                m = make_mail(subject=f"busy client {i}")
                errors, _ = await smtp.sendmail(
                    "pat@customer.example", ["support@example.com"], m.as_bytes()
                )
                assert not errors
        assert gw.spool.counts() == {"pending": 3}


# --- #7: bounded memory -------------------------------------------------------------------


def _body(size: int, tag: str) -> bytes:
    """A message of about `size` bytes whose lines often begin with a dot."""
    head = (
        f"From: pat@customer.example\r\nTo: support@example.com\r\nSubject: big {tag}\r\n"
        f"Message-ID: <{tag}@customer.example>\r\n\r\n"
    ).encode()
    lines = []
    n = 0
    while n < size:
        line = f"{'.' if n % 3 == 0 else ''}{tag} line {n:08d} " + "x" * 60 + "\r\n"
        lines.append(line.encode())
        n += len(line)
    return head + b"".join(lines)


def _stuffed(raw: bytes) -> bytes:
    # RFC 5321 §4.5.2, what a client does before sending.
    return (b"\r\n" + raw).replace(b"\r\n.", b"\r\n..")[2:]


async def test_inflight_budget_streams_large_data_to_disk_and_loses_nothing(
    tmp_path: Path, clock: FrozenClock
) -> None:
    budget = 2 * 1024 * 1024
    settings = make_settings(tmp_path, smtp={"inflight_budget": "2MiB"})
    bodies = [_body(900 * 1024, f"mid{i}") for i in range(3)] + [_body(1536 * 1024, "large")]
    async with running_gateway(settings, clock) as gw:
        assert gw.port is not None
        assert gw.handler is not None
        meter = gw.handler.budget
        clients = [await Client.connect(gw.port) for _ in bodies]
        try:
            for c in clients:
                await c.envelope()
            # All bodies on the wire, no terminator yet: together they exceed the budget.
            for c, raw in zip(clients, bodies, strict=True):
                c.writer.write(_stuffed(raw))
            await asyncio.gather(*(c.writer.drain() for c in clients))
            deadline = time.monotonic() + 20
            while meter.spilled < 2 and time.monotonic() < deadline:  # bounded wait
                await asyncio.sleep(0.02)
            for c in clients:
                c.writer.write(b".\r\n")
            replies = [await c.reply() for c in clients]
        finally:
            for c in clients:
                c.close()
        assert [code for code, _ in replies] == [250] * 4, replies
        # The 1.5 MiB message went to disk by size, at least one 900 KiB one for the budget.
        assert meter.spilled >= 2
        assert meter.peak <= budget
        assert meter.used == 0
        assert list(gw.spool.tmp_dir.iterdir()) == []  # streamed files are gone
        for (_, text), raw in zip(replies, bodies, strict=True):
            entry_id = int(re.search(r"queued as (\d+)", text).group(1))  # type: ignore[union-attr]
            entry = gw.spool.get(entry_id)
            assert entry is not None
            assert entry.raw == raw
        assert await gw.pipeline.run_once() == 4
        assert len(all_tickets(gw)) == 4
        assert gw.spool.counts() == {}


async def test_sessions_beyond_the_budget_wait_for_room_and_all_land(
    tmp_path: Path, clock: FrozenClock
) -> None:
    # 1 MiB budget: each DATA reserves 128 KiB for its socket buffers, so 8 fit at once.
    settings = make_settings(tmp_path, smtp={"inflight_budget": "1MiB"})
    bodies = [_body(200 * 1024, f"wait{i}") for i in range(12)]
    async with running_gateway(settings, clock) as gw:
        assert gw.port is not None
        assert gw.handler is not None
        meter = gw.handler.budget
        clients = [await Client.connect(gw.port) for _ in bodies]
        try:
            for c in clients:
                assert (await c.cmd(b"EHLO client.example"))[0] == 250
                assert (await c.cmd(b"MAIL FROM:<pat@customer.example>"))[0] == 250
                assert (await c.cmd(b"RCPT TO:<support@example.com>"))[0] == 250
            for c in clients:
                c.writer.write(b"DATA\r\n")
            deadline = time.monotonic() + 20
            while meter.waited < 4 and time.monotonic() < deadline:  # bounded wait
                await asyncio.sleep(0.02)
            assert meter.waited == 4
            assert meter.used == meter.total

            async def finish(c: Client, raw: bytes) -> tuple[int, str]:
                assert (await c.reply())[0] == 354  # at once, or once another finished
                c.writer.write(_stuffed(raw) + b".\r\n")
                return await c.reply()

            replies = await asyncio.gather(
                *(finish(c, raw) for c, raw in zip(clients, bodies, strict=True))
            )
        finally:
            for c in clients:
                c.close()
        assert [code for code, _ in replies] == [250] * 12, replies
        assert meter.refused == 0
        assert meter.used == 0
        assert meter.peak <= meter.total
        assert gw.spool.counts() == {"pending": 12}


# --- #11: banner, secrets, file modes (the daemon as an admin runs it) -------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(tmp_path: Path, port: int, security: str) -> Path:
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        f'rules_dir = "{RULES}"\n'
        f'[smtp]\nlisten = "127.0.0.1:{port}"\nhostname = "mx.example.com"\n'
        'domains = ["example.com"]\nmin_free_disk = 0\n'
        f'[storage]\ndatabase_url = "sqlite:///{tmp_path}/var/gw.db"\n'
        f'spool_dir = "{tmp_path}/var/spool"\n'
        f"[security]\n{security}\nverify_senders = false\n"
    )
    return cfg


def _gateway(cfg: Path, *args: str, **kw: object) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return subprocess.Popen(  # type: ignore[call-overload,no-any-return]
        [sys.executable, "-m", "gateway", "--config", str(cfg), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        **kw,
    )


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ('secret_key = "a"', "security.secret_key"),
        ('secret_key = "abababababababababababababababab"', "security.secret_key"),
        ("secret_key_file = '{short}'", "security.secret_key_file"),
    ],
)
def test_a_weak_secret_stops_start_up_naming_the_key(
    tmp_path: Path, setting: str, key: str
) -> None:
    short = tmp_path / "short_key"
    short.write_text("0123456789abcdef\n")  # 16 bytes: was accepted before
    cfg = _config(tmp_path, _free_port(), setting.format(short=short))
    proc = _gateway(cfg, "serve")
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # it started: the weak secret was accepted
        proc.kill()
        out, _ = proc.communicate()
    text = out.decode(errors="replace")
    assert proc.returncode == 78, text  # EX_CONFIG
    assert key in text, text
    assert "too short" in text or "variety" in text, text
    assert "abababab" not in text  # the secret itself is never echoed
    assert not (tmp_path / "var" / "spool").exists()  # refused before anything was created


async def test_daemon_files_are_private_and_the_banner_names_no_software(tmp_path: Path) -> None:
    port = _free_port()
    cfg = _config(tmp_path, port, "")  # no secret: generated and stored, as in the quickstart
    proc = _gateway(cfg, "serve", umask=0o022)
    try:
        assert proc.stdout is not None
        line = b""
        deadline = time.monotonic() + 30
        while b"listening on" not in line and time.monotonic() < deadline:
            line = await asyncio.to_thread(proc.stdout.readline)
            assert line or proc.poll() is None, "daemon exited"
        c = await Client.connect(port)
        try:
            assert c.greeting.startswith("220 mx.example.com"), c.greeting
            assert "Python" not in c.greeting
            assert not re.search(r"\d+\.\d+", c.greeting)
            code, ehlo = await c.cmd(b"EHLO client.example")
            assert code == 250
            assert "Python" not in ehlo
            assert (await c.cmd(b"QUIT"))[0] == 221
        finally:
            c.close()
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=30) as smtp:
            await smtp.sendmail(
                "pat@customer.example", ["support@example.com"], make_mail().as_bytes()
            )
        var = tmp_path / "var"
        deadline = time.monotonic() + 30
        while not (var / "gw.db-wal").exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # bounded wait for the pipeline's first write
        modes = {
            str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode)
            for p in [var, *var.rglob("*")]
        }
        expected_files = {
            "var/secret_key",
            "var/gw.db",
            "var/gw.db-wal",
            "var/spool/spool.sqlite3",
            "var/spool/spool.sqlite3-wal",
        }
        assert expected_files <= set(modes), modes
        for name, mode in modes.items():
            want = 0o700 if (tmp_path / name).is_dir() else 0o600
            assert mode == want, f"{name}: {oct(mode)} (want {oct(want)}) in {modes}"
        assert len((var / "secret_key").read_text().strip()) == 64
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.communicate, timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (a real full disk, not a simulated one)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace')}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


async def test_a_large_message_that_cannot_be_streamed_to_disk_gets_452(
    tmp_path: Path, clock: FrozenClock, small_disk: Path
) -> None:
    settings = make_settings(
        tmp_path,
        smtp={"inflight_budget": "1MiB"},
        storage={"spool_dir": str(small_disk / "spool")},
    )
    async with running_gateway(settings, clock) as gw:
        assert gw.port is not None
        c = await Client.connect(gw.port)
        try:
            await c.envelope()
            c.writer.write(_stuffed(_body(3 * 1024 * 1024, "toolarge")) + b".\r\n")
            code, text = await c.reply()
            assert code == 452, text
            assert "4.3.1" in text, text  # temporary: the sender retries
            # The session goes on, and the space the failed file took is free again.
            assert (await c.cmd(b"MAIL FROM:<pat@customer.example>"))[0] == 250
            assert (await c.cmd(b"RCPT TO:<support@example.com>"))[0] == 250
            assert (await c.cmd(b"DATA"))[0] == 354
            c.writer.write(_stuffed(_body(4096, "small")) + b".\r\n")
            code, text = await c.reply()
            assert code == 250, text
        finally:
            c.close()
        assert list(gw.spool.tmp_dir.iterdir()) == []
        assert gw.spool.counts() == {"pending": 1}
