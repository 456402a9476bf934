"""A TCP proxy on loopback that a test can cut and restore: a database outage made real.

Threads, not asyncio: the code under test talks to the database from worker threads *and*
sometimes from the event loop, and a proxy on that same loop would deadlock with it.

    with TcpProxy("127.0.0.1", 5432) as proxy:     # listens on 127.0.0.1:<free port>
        url = f"postgresql+psycopg://postgres@127.0.0.1:{proxy.port}/db"
        proxy.cut()        # every open connection is closed; new ones are closed at once
        proxy.restore()    # connections are forwarded again

While cut, a client sees what it sees when the server goes away: its connections end and a
new connection is closed before the server's first byte ("server closed the connection
unexpectedly"). `connections` counts the connections accepted while forwarding.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._cut = False
        self._closing = False
        self._threads: list[threading.Thread] = []
        self.connections = 0

    # Lifecycle ------------------------------------------------------------------------------

    def start(self) -> TcpProxy:
        t = threading.Thread(target=self._accept_loop, name="tcp-proxy", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def close(self) -> None:
        self._closing = True
        self._drop_all()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for t in self._threads:
            t.join(timeout=5)

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # Faults ---------------------------------------------------------------------------------

    def cut(self) -> None:
        """The database is gone: close every connection, refuse new ones."""
        self._cut = True
        self._drop_all()

    def restore(self) -> None:
        self._cut = False

    @property
    def is_cut(self) -> bool:
        return self._cut

    # Internals ------------------------------------------------------------------------------

    def _drop_all(self) -> None:
        with self._lock:
            socks, self._open = list(self._open), set()
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _accept_loop(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._cut or self._closing:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            self.connections += 1
            with self._lock:
                self._open.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                t = threading.Thread(target=self._pump, args=(a, b), daemon=True)
                t.start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open.discard(src)
                self._open.discard(dst)
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
