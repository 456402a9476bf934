"""What the customer is told when a promise is not kept (docs/design.md §7).

``customer`` queues a customer notice (a broken promise, or a ticket processed after moments
of its own plan) threaded under the customer's last message; ``late`` collapses the moments a
ticket missed while nobody could act on it into one notice. Both the pipeline (a message
processed late, a staff command) and the escalator (a step that fires) use them, so they sit
below both: they import the letters, the outbound queue and the store, never
``gateway.pipeline`` or ``gateway.escalation``.
"""
