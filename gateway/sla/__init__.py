"""Business time, deadlines, SLA clocks and the escalation worker."""
