"""Outgoing mail: compose, DKIM-sign last, deliver through the relay or MX, retry."""
