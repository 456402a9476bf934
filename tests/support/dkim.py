"""DKIM checks in tests: verify what reached the capture relay against keys the test made,
answering dkimpy's DNS questions from a dict (no network)."""

from __future__ import annotations

import dkim

from tests.support.relay import Captured


class KeyTable(dict[str, str]):
    """`{"gw1._domainkey.example.com": "v=DKIM1; k=rsa; p=..."}`."""

    def dnsfunc(self, name: bytes | str, timeout: int = 5) -> bytes | None:
        key = name.decode() if isinstance(name, bytes) else name
        value = self.get(key.rstrip(".").lower())
        return value.encode() if value is not None else None

    def verify(self, captured: Captured) -> bool:
        """Whether the DKIM signature on the captured mail verifies."""
        return bool(dkim.verify(captured.data, dnsfunc=self.dnsfunc))
