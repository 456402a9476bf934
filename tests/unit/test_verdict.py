"""The pure sender-verdict rules of docs/decisions.md D10: unknown is not verified
(gateway.security.verdict).

Each case is an ``AuthResult`` as the checks (or a trusted front MTA) would produce it, and
the decision a staff reply or an acknowledgement gets from it.
"""

from __future__ import annotations

import pytest

from gateway.security.sender_auth import AuthResult, DkimCheck
from gateway.security.verdict import ack_decision, proof_of, sender_standing, staff_decision


def auth(
    *,
    dkim: tuple[DkimCheck, ...] = (),
    spf: str = "none",
    spf_domain: str = "example.com",
    dmarc: str = "none",
    policy: str | None = None,
    source: str = "verified",
    from_domain: str = "example.com",
) -> AuthResult:
    return AuthResult(
        from_domain=from_domain,
        dkim=dkim,
        spf=spf,
        spf_domain=spf_domain,
        dmarc=dmarc,
        dmarc_policy=policy,
        arc=None,
        source=source,
    )


PASS = DkimCheck("example.com", "s1", "rsa-sha256", "pass")
PASS_SUB = DkimCheck("mail.example.com", "s1", "rsa-sha256", "pass")
PASS_OTHER = DkimCheck("mailer.example", "s1", "rsa-sha256", "pass")
TEMP = DkimCheck("example.com", "s1", "rsa-sha256", "temperror")
NOKEY = DkimCheck("example.com", "s1", "rsa-sha256", "permerror")

# The exact results of docs/decisions.md D10.1.
DNS_DOWN = auth(spf="temperror", dmarc="temperror")
NXDOMAIN_ALL = auth(spf="none", dmarc="none")


@pytest.mark.parametrize(
    ("result", "standing"),
    [
        (DNS_DOWN, "inconclusive"),
        (NXDOMAIN_ALL, "unproven"),
        (auth(dkim=(PASS,)), "proven"),
        (auth(dkim=(PASS_SUB,)), "proven"),  # relaxed alignment (RFC 7489 §3.1)
        (auth(dkim=(PASS_OTHER,)), "unproven"),  # a pass for another domain proves nothing
        (auth(dkim=(PASS,), spf="temperror", dmarc="temperror"), "proven"),
        (auth(spf="pass"), "proven"),
        (auth(spf="pass", spf_domain="bounces.other.example"), "unproven"),
        (auth(dmarc="pass", source="trusted-header"), "proven"),
        (auth(spf="fail"), "failed"),
        (auth(spf="fail", dkim=(TEMP,)), "inconclusive"),  # DKIM could still pass
        (auth(dmarc="fail", policy="reject"), "failed"),
        (auth(dmarc="fail", policy="none"), "unproven"),
        (auth(dkim=(TEMP,)), "inconclusive"),
        (auth(dkim=(NOKEY,)), "unproven"),
        (auth(source="skipped"), "unproven"),
        (None, "unproven"),
    ],
)
def test_standing(result: AuthResult | None, standing: str) -> None:
    assert sender_standing(result) == standing


def test_proof_names_what_proved_it() -> None:
    assert proof_of(auth(dkim=(PASS,))) == "dkim pass d=example.com"
    assert proof_of(auth(spf="pass")) == "spf pass example.com"
    assert proof_of(DNS_DOWN) is None


# ---------------------------------------------------------------------------- staff replies


def test_staff_reply_with_dns_down_waits_then_is_refused() -> None:
    d = staff_decision(DNS_DOWN, sender="alice@example.com")
    assert d.action == "wait"
    assert "could not be completed" in d.reason
    d = staff_decision(DNS_DOWN, sender="alice@example.com", waited_out=True)
    assert d.action == "refuse"
    assert "unknown is not verified" in d.reason


def test_staff_reply_without_any_evidence_is_refused() -> None:
    # Was: "no results, the token is the proof" -> relayed. Tokens travel in forwards.
    d = staff_decision(NXDOMAIN_ALL, sender="alice@example.com")
    assert d.action == "refuse"
    assert "reply token" in d.reason


def test_staff_reply_not_checked_at_all_is_refused() -> None:
    assert staff_decision(None, sender="alice@example.com").action == "refuse"


def test_staff_reply_with_aligned_dkim_is_accepted() -> None:
    d = staff_decision(auth(dkim=(PASS,)), sender="alice@example.com")
    assert d.action == "accept"
    assert "dkim pass" in d.reason


def test_staff_reply_spf_fail_is_refused_even_when_dkim_is_unknown_after_the_window() -> None:
    r = auth(spf="fail", dkim=(TEMP,))
    assert staff_decision(r, sender="alice@example.com").action == "wait"
    assert staff_decision(r, sender="alice@example.com", waited_out=True).action == "refuse"


def test_token_only_domains_is_an_explicit_opt_in() -> None:
    opt = ["Example.com"]
    ok = staff_decision(NXDOMAIN_ALL, sender="alice@example.com", token_only_domains=opt)
    assert ok.action == "accept"
    assert "staff_token_only_domains" in ok.reason
    # Not for another domain, not when something failed, and never while unknown.
    other = staff_decision(NXDOMAIN_ALL, sender="alice@other.example", token_only_domains=opt)
    assert other.action == "refuse"
    failed = staff_decision(auth(spf="softfail"), sender="alice@example.com",
                            token_only_domains=opt)  # fmt: skip
    assert failed.action == "refuse"
    unknown = staff_decision(DNS_DOWN, sender="alice@example.com", token_only_domains=opt)
    assert unknown.action == "wait"


# --------------------------------------------------------------------------- acknowledgements


def test_ack_to_unknown_sender_is_deferred_then_policy() -> None:
    assert ack_decision(DNS_DOWN).action == "defer"
    late = ack_decision(DNS_DOWN, waited_out=True)
    assert late.action == "suppress"
    assert "ack_if_unverified = suppress" in late.reason
    assert ack_decision(DNS_DOWN, waited_out=True, if_unverified="send").action == "send"


@pytest.mark.parametrize("if_unverified", ["suppress", "send"])
@pytest.mark.parametrize("waited_out", [False, True])
def test_ack_never_goes_to_a_failed_sender(if_unverified: str, waited_out: bool) -> None:
    for failed in (auth(spf="fail"), auth(dmarc="fail", policy="reject"),
                   auth(dmarc="fail", policy="quarantine")):  # fmt: skip
        d = ack_decision(failed, waited_out=waited_out, if_unverified=if_unverified)  # type: ignore[arg-type]
        assert d.action == "suppress"
        assert "backscatter" in d.reason


def test_ack_for_completed_checks() -> None:
    assert ack_decision(NXDOMAIN_ALL).action == "send"
    assert ack_decision(auth(dkim=(PASS,), dmarc="temperror")).action == "send"
    assert ack_decision(auth(spf="softfail")).action == "send"
    assert ack_decision(None).action == "send"  # verify_senders = false


def test_recheck_backoff_is_bounded_by_the_deadline() -> None:
    from datetime import UTC, datetime, timedelta

    from gateway.pipeline.holds import next_check

    t0 = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
    deadline = t0 + timedelta(minutes=30)
    steps = [next_check(t0, n, deadline) - t0 for n in range(6)]
    assert steps == [timedelta(minutes=m) for m in (1, 2, 4, 8, 10, 10)]
    assert next_check(deadline - timedelta(seconds=5), 3, deadline) == deadline
