"""`python -m gateway` runs the command line (gateway/entry.py: ingest's fast path first)."""

from gateway.entry import main

raise SystemExit(main())
