"""Business time, deadlines, SLA clocks, duty and the escalation plan: pure computations.

Nothing here reads the database, sends mail or sleeps; the rules model appears only in
annotations. The worker that acts on the plan is `gateway.escalation` (docs/architecture.md,
"Layers").
"""
