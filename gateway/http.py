"""The admin HTTP listener: `/metrics`, `/healthz`, `/readyz`, `/status` (config `[http] listen`).

A few dozen lines of asyncio instead of a web framework: four GET endpoints, one request per
connection (`Connection: close`), read-only, meant for loopback or a monitoring network.
Scrapes run the store queries in a thread with a timeout so a slow database never blocks
the SMTP event loop (the same loop answers customers' mail servers).

- `/healthz`: the process is alive and its event loop turns (200 "ok").
- `/readyz`: ready to take mail: the SMTP socket is listening, the database answers and the
  spool folder is writable with `smtp.min_free_disk` free; 503 with the failing checks
  otherwise (a load balancer or Kubernetes probe takes the node out of rotation).
- `/metrics`: Prometheus text format 0.0.4 (`prometheus_client.generate_latest`).
- `/status`: the daemon's own facts as JSON (pid, started, rules loaded at) for
  `support-gateway status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger("gateway.http")

SCRAPE_TIMEOUT = 10.0
_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}

Handler = Callable[[], Awaitable[tuple[int, str, bytes]]]


class AdminHttp:
    """Serves the admin endpoints on one socket."""

    def __init__(
        self,
        *,
        registry: CollectorRegistry,
        ready: Callable[[], Awaitable[dict[str, str]]],
        status: Callable[[], dict[str, Any]],
    ) -> None:
        self.registry = registry
        self.ready = ready  # check name -> "" when fine, else what is wrong
        self.status = status
        self.server: asyncio.Server | None = None
        self.port: int | None = None

    async def start(self, host: str, port: int, *, start_serving: bool = True) -> None:
        self.server = await asyncio.start_server(
            self._client, host=host, port=port, start_serving=start_serving
        )
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.server.wait_closed(), 2)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            method, _, rest = head.decode("latin-1").partition(" ")
            path = rest.split(" ", 1)[0].split("?", 1)[0]
            code, ctype, body = await self._route(method, path)
            writer.write(
                f"HTTP/1.1 {code} {_REASONS.get(code, 'OK')}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + (body if method != "HEAD" else b"")
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.LimitOverrunError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _route(self, method: str, path: str) -> tuple[int, str, bytes]:
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"GET only\n"
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/readyz":
            problems = {k: v for k, v in (await self.ready()).items() if v}
            if problems:
                text = "".join(f"{k}: {v}\n" for k, v in problems.items())
                return 503, "text/plain", text.encode()
            return 200, "text/plain", b"ready\n"
        if path == "/metrics":
            try:
                body = await asyncio.wait_for(
                    asyncio.to_thread(generate_latest, self.registry), SCRAPE_TIMEOUT
                )
            except TimeoutError:
                log.warning("metrics scrape took longer than %ss", SCRAPE_TIMEOUT)
                return 503, "text/plain", b"scrape timed out\n"
            return 200, CONTENT_TYPE_LATEST, body
        if path == "/status":
            return 200, "application/json", json.dumps(self.status()).encode()
        return 404, "text/plain", b"not found: try /metrics, /healthz, /readyz\n"
