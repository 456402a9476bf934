"""support-gateway: an email-first customer-support gateway daemon."""

__version__ = "0.1.0"
