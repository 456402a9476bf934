"""What a sender check proves, and what may be done on its strength: pure decisions.

docs/decisions.md D10.1: with the nameservers unreachable, ``spf temperror; dmarc temperror`` was
read as "no evidence", so a forged staff reply was relayed to the customer with its commands
applied, and a forged sender got an acknowledgement (backscatter).  The rule here is the one
RFC 8601 §2.7 and RFC 7489 §6.6.2 imply: a check that could not complete (``temperror``) is
*unknown*, and unknown is neither authentic nor forged.  So:

* :func:`sender_standing` sorts an :class:`~gateway.security.sender_auth.AuthResult` into
  ``proven`` (positive proof for the From domain), ``failed`` (checks completed and say
  forged), ``unproven`` (checks completed, no proof, not forged) or ``inconclusive`` (a check
  that could still give proof, or overturn a failure, did not complete).
* :func:`staff_decision`: a staff reply acts only on ``proven`` (DKIM pass aligned with the
  From domain, DMARC pass, aligned SPF pass, or the same from a trusted front MTA's
  Authentication-Results).  ``inconclusive`` waits for a re-check (bounded); anything else is
  refused and the owner told.  A signed reply token is a capability that travels in every
  forward and reply-all, so it is never proof of the person on its own; the only exception is
  the explicit opt-in ``security.staff_token_only_domains`` for staff domains that publish
  neither DKIM nor SPF, and even then only when the checks completed and nothing failed.
* :func:`ack_decision`: an acknowledgement is sent unless the sender is ``failed`` (an ack
  would be backscatter, docs/design.md §3 rule 8); ``inconclusive`` defers it (ticket and owner
  notification never wait); once the re-check window is over, a still-unknown sender gets
  what ``security.ack_if_unverified`` says (default ``suppress``).  A sender whose checks
  *failed* is never acknowledged, whatever that setting says.

No I/O here: the pipeline (``respond``, ``staff``) and the re-check worker
(:mod:`gateway.pipeline.recheck`) do the storing and sending.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from gateway.security.sender_auth import AuthResult, organizational_domain

__all__ = [
    "AckDecision",
    "StaffDecision",
    "Standing",
    "ack_decision",
    "auth_summary",
    "proof_of",
    "sender_standing",
    "staff_decision",
]

Standing = Literal["proven", "failed", "unproven", "inconclusive"]


@dataclass(frozen=True)
class StaffDecision:
    """``accept`` (act as staff), ``wait`` (re-check later) or ``refuse`` (owner told)."""

    action: Literal["accept", "wait", "refuse"]
    reason: str


@dataclass(frozen=True)
class AckDecision:
    """``send`` the acknowledgement now, ``defer`` it, or ``suppress`` it, and why."""

    action: Literal["send", "defer", "suppress"]
    reason: str


def auth_summary(auth: AuthResult | None) -> str:
    """``dkim example.com=pass; spf none; dmarc temperror`` (or ``not checked``)."""
    if auth is None:
        return "not checked"
    dkim = ", ".join(f"{c.domain}={c.result}" for c in auth.dkim) or "none"
    via = " (front MTA)" if auth.source == "trusted-header" else ""
    return f"dkim {dkim}; spf {auth.spf}; dmarc {auth.dmarc}{via}"


def _org_aligned(identifier: str, from_domain: str) -> bool:
    """RFC 7489 §3.1 relaxed alignment: same organizational domain."""
    a, b = identifier.strip().lower(), from_domain.strip().lower()
    return bool(a and b) and organizational_domain(a) == organizational_domain(b)


def proof_of(auth: AuthResult | None) -> str | None:
    """What positively proves the From domain, or None.

    DMARC pass (RFC 7489 §4.2), or an aligned DKIM pass (RFC 6376: the domain's key signed
    this message), or an aligned SPF pass (RFC 7208: the domain authorises the sending
    host).  Read from our own checks or from a trusted front MTA's Authentication-Results.
    """
    if auth is None or auth.source == "skipped" or not auth.from_domain:
        return None
    if auth.dmarc == "pass":
        return "dmarc pass"
    for c in auth.dkim:
        if c.result == "pass" and _org_aligned(c.domain, auth.from_domain):
            return f"dkim pass d={c.domain}"
    if auth.spf == "pass" and _org_aligned(auth.spf_domain, auth.from_domain):
        return f"spf pass {auth.spf_domain}"
    return None


def _failed(auth: AuthResult) -> bool:
    """Checks completed and say forged: DMARC fail under p=reject/quarantine, or SPF fail,
    and no DKIM check that could still pass is pending (it would authenticate the domain)."""
    if not auth.likely_forged:
        return False
    return not any(c.result == "temperror" for c in auth.dkim)


def sender_standing(auth: AuthResult | None) -> Standing:
    """Sort a check result (see module docstring).  ``None`` (not checked) is unproven."""
    if auth is None:
        return "unproven"
    if proof_of(auth) is not None:
        return "proven"
    if auth.source == "skipped":
        return "unproven"
    if _failed(auth):
        return "failed"
    if auth.inconclusive:
        return "inconclusive"
    return "unproven"


def _domain_of(address: str) -> str:
    return address.strip().strip("<>").rpartition("@")[2].lower() if "@" in address else ""


def staff_decision(
    auth: AuthResult | None,
    *,
    sender: str,
    token_only_domains: Iterable[str] = (),
    waited_out: bool = False,
) -> StaffDecision:
    """May a reply on a staff token (its identity checks already passed) act as staff?

    ``waited_out``: the re-check window is over; an inconclusive check is then refused.
    """
    standing = sender_standing(auth)
    summary = auth_summary(auth)
    if standing == "proven":
        return StaffDecision("accept", f"{proof_of(auth)} ({summary})")
    if standing == "failed":
        return StaffDecision(
            "refuse", f"the From domain of {sender} is not authenticated: it failed ({summary})"
        )
    if standing == "inconclusive":
        if waited_out:
            return StaffDecision(
                "refuse",
                f"the sender check for {sender} could not be completed within the re-check "
                f"window ({summary}): unknown is not verified",
            )
        return StaffDecision(
            "wait",
            f"the sender check for {sender} could not be completed ({summary}); held until it can",
        )
    # Completed without proof.  The opt-in escape hatch for staff domains without DKIM/SPF.
    domain = _domain_of(sender)
    allowed = {d.strip().lower() for d in token_only_domains if d.strip()}
    nothing_failed = auth is None or (
        auth.spf not in ("fail", "softfail")
        and auth.dmarc != "fail"
        and not any(c.result == "fail" for c in auth.dkim)
    )
    if domain and domain in allowed and nothing_failed:
        return StaffDecision(
            "accept",
            f"{domain} is listed in security.staff_token_only_domains: the reply token "
            f"issued to {sender} is accepted without DKIM/SPF ({summary})",
        )
    return StaffDecision(
        "refuse",
        f"the From domain of {sender} is not authenticated ({summary}): From and a reply "
        f"token prove nothing on their own (a token travels in every forward and reply-all)",
    )


def ack_decision(
    auth: AuthResult | None,
    *,
    waited_out: bool = False,
    if_unverified: Literal["suppress", "send"] = "suppress",
) -> AckDecision:
    """May the acknowledgement of a new ticket go to this sender now?

    Only the sender's standing is judged here; the other reasons (robots, caps, routes) are
    :mod:`gateway.pipeline.respond`'s.  ``waited_out``: the re-check window is over.
    """
    summary = auth_summary(auth)
    if auth is None:
        return AckDecision("send", "sender checks are off (security.verify_senders = false)")
    standing = sender_standing(auth)
    if standing == "failed":
        return AckDecision(
            "suppress",
            f"sender likely forged (spf {auth.spf}, dmarc {auth.dmarc} "
            f"p={auth.dmarc_policy or '-'}): an ack would be backscatter",
        )
    if standing == "inconclusive":
        if not waited_out:
            return AckDecision(
                "defer",
                f"sender check could not complete ({summary}); the acknowledgement waits "
                f"for a verdict",
            )
        if if_unverified == "send":
            return AckDecision(
                "send",
                f"sender still unverified after the re-check window ({summary}); "
                f"security.ack_if_unverified = send",
            )
        return AckDecision(
            "suppress",
            f"sender still unverified after the re-check window ({summary}); "
            f"security.ack_if_unverified = suppress (an ack could be backscatter)",
        )
    if standing == "proven":
        return AckDecision("send", f"sender authenticated: {proof_of(auth)}")
    return AckDecision("send", f"sender checks completed, nothing failed ({summary})")
