"""The escalation worker: the side-effecting half of the SLA (docs/design.md §7).

``escalator`` is the loop (find what is due, claim it exactly once, act, sleep until the next
moment); ``moments`` keeps each open ticket's next moment (``Ticket.escalate_at``) in step
with the rules and the tickets; ``actions`` is what a fired step does (events, staff mail,
the handover pack of ``gateway.pipeline.handover``, the customer notice of
``gateway.notices``).

Everything they decide comes from the pure planning in ``gateway.sla`` (``plan``, ``duty``,
``clocks``, ``deadlines``), which imports nothing from here: ``gateway.sla`` is the lower
layer that routing, settings and the letters share, this package sits above the store, the
outbound queue, the letters, the notices and the pipeline (whose handover pack it sends);
nothing below imports it.
"""
