"""A tiny real DNS server on loopback UDP, for fault tests of sender authentication.

It answers TXT questions from a table and NXDOMAIN to everything else (``records`` empty:
the "resolver that answers NXDOMAIN to everything" of docs/decisions.md D10), with a TTL, and counts
the questions it got, so tests can see what the gateway's cache saved.  Served by a thread with
dnspython's wire format; stop it with :meth:`close` (or use it as a context manager).

    with NxDnsServer({("_dmarc.example.com", "TXT"): ["v=DMARC1; p=reject"]}) as server:
        resolver = SystemResolver(nameservers=["127.0.0.1"], port=server.port)
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Mapping, Sequence
from types import TracebackType

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


class NxDnsServer:
    def __init__(
        self, records: Mapping[tuple[str, str], Sequence[str]] | None = None, *, ttl: int = 300
    ) -> None:
        self.records = {(n.lower().rstrip("."), t.upper()): list(v) for (n, t), v in
                        (records or {}).items()}  # fmt: skip
        self.ttl = ttl
        self.questions: list[tuple[str, str]] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port: int = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="nx-dns", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self._sock.recvfrom(4096)
            except (TimeoutError, OSError):
                continue
            try:
                query = dns.message.from_wire(data)
            except Exception:  # noqa: S112 (a garbled datagram: a real server drops it too)
                continue
            response = dns.message.make_response(query)
            for q in query.question:
                name = q.name.to_text().rstrip(".").lower()
                rtype = dns.rdatatype.to_text(q.rdtype)
                self.questions.append((name, rtype))
                answers = self.records.get((name, rtype))
                if answers:
                    texts = ['"' + a.replace('"', '\\"') + '"' for a in answers]
                    response.answer.append(
                        dns.rrset.from_text_list(q.name, self.ttl, "IN", rtype, texts)
                    )
                else:
                    response.set_rcode(dns.rcode.NXDOMAIN)
            with contextlib.suppress(OSError):
                self._sock.sendto(response.to_wire(), addr)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close()

    def __enter__(self) -> NxDnsServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
