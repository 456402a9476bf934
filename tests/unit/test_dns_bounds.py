"""DNS trouble does not stall the pipeline (docs/decisions.md D10.2): the per-message budget, the
cache and the circuit breaker of gateway.security.dns, against real sockets: a loopback
address where nothing listens (127.0.0.2) and a tiny real DNS server (tests/support)."""

from __future__ import annotations

import pytest

from gateway.security.dns import BudgetResolver, DnsTempError, StaticResolver, SystemResolver
from gateway.security.sender_auth import authenticate
from tests.support.dns_server import NxDnsServer


class Ticking:
    """A monotonic clock the test moves (no sleeping)."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_budget_is_shared_by_all_questions_of_a_message() -> None:
    clock = Ticking()
    inner = StaticResolver({("a.example", "TXT"): ["v=spf1 -all"]})
    budget = BudgetResolver(inner, 2.0, monotonic=clock)
    assert budget.query("a.example", "TXT") == ["v=spf1 -all"]
    clock.t += 1.5
    assert budget.query("a.example", "TXT") == ["v=spf1 -all"]
    assert not budget.cut
    clock.t += 0.6
    with pytest.raises(DnsTempError, match="budget"):
        budget.query("a.example", "TXT")
    assert budget.cut
    assert budget.temp_errors == 1
    assert budget.questions == 3
    assert len(inner.queries) == 2  # the spent budget did not ask


def test_unreachable_servers_cost_one_budget_then_fail_at_once() -> None:
    resolver = SystemResolver(nameservers=["127.0.0.2"], timeout=5.0, probe_interval=60)
    try:
        first = BudgetResolver(resolver, 0.3)
        for name in ("a.example", "b.example"):
            with pytest.raises(DnsTempError):
                first.query(name, "TXT")
        assert first.cut  # the first message spent its budget waiting
        # One timeout makes the servers suspect; the probe of the root times out too.
        assert resolver.breaker_open.wait(timeout=5)
        assert resolver.unreachable
        second = BudgetResolver(resolver, 0.3)
        with pytest.raises(DnsTempError, match="unreachable"):
            second.query("c.example", "TXT")
        assert not second.cut  # refused at once, nothing waited
    finally:
        resolver.close()


def test_breaker_closes_when_a_probe_is_answered() -> None:
    with NxDnsServer() as server:
        resolver = SystemResolver(nameservers=["127.0.0.1"], port=server.port, timeout=1.0,
                                  probe_interval=0.05)  # fmt: skip
        try:
            with resolver._lock:
                resolver._open()  # as after timeouts
            assert resolver.unreachable
            resolver._record_timeout()  # starts the prober
            assert resolver._prober is not None
            resolver._prober.join(timeout=5)
            assert not resolver.unreachable
            assert not resolver.breaker_open.is_set()
            assert (".", "NS") in server.questions or ("", "NS") in server.questions
        finally:
            resolver.close()


def test_answers_and_nxdomain_are_cached() -> None:
    records = {("example.com", "TXT"): ["v=spf1 -all"]}
    with NxDnsServer(records) as server:
        resolver = SystemResolver(nameservers=["127.0.0.1"], port=server.port, timeout=2.0)
        for _ in range(3):
            assert resolver.query("example.com", "TXT") == ["v=spf1 -all"]
            assert resolver.query("_dmarc.example.com", "TXT") == []
        assert server.questions.count(("example.com", "TXT")) == 1
        assert server.questions.count(("_dmarc.example.com", "TXT")) == 1


def test_nxdomain_everything_completes_without_proof() -> None:
    raw = (
        b"From: Alice Martin <alice@example.com>\r\nTo: support@example.com\r\n"
        b"Subject: hi\r\nMessage-ID: <1@example.com>\r\n\r\nhello\r\n"
    )
    with NxDnsServer() as server:
        resolver = SystemResolver(nameservers=["127.0.0.1"], port=server.port, timeout=2.0)
        result = authenticate(raw, envelope_sender="alice@example.com", client_ip="127.0.0.1",
                              helo="client.test", resolver=resolver)  # fmt: skip
    assert (result.spf, result.dmarc) == ("none", "none")
    assert not result.inconclusive
    assert not result.authenticated
