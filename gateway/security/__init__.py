"""Signed reply tokens and Message-IDs, DNS, and inbound sender authentication."""
