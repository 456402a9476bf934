"""The rules in force, swapped atomically on reload; a broken edit keeps the old rules.

Reload happens on SIGHUP and when a file in `rules_dir` changes (checked by modification
times, cheap enough to run every few seconds). A failed reload is logged loudly with every
`file:line: message` problem and counted, and the previous rules stay in force.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from gateway.routing.loader import RulesError, load_rules
from gateway.routing.model import Rules

log = logging.getLogger("gateway.rules")


class RulesHolder:
    def __init__(self, rules_dir: Path, initial: Rules | None = None) -> None:
        self.rules_dir = Path(rules_dir)
        # Start-up fails on broken rules, unless rules already in force are handed over
        # (the pipeline process starts with the daemon's).
        self.current: Rules = initial if initial is not None else load_rules(self.rules_dir)
        self._stamp = self._fingerprint()
        self.reloads = 0
        self.failed_reloads = 0
        self.last_error: str | None = None
        self.loaded_at = time.time()  # when the rules in force were read (status, /metrics)
        # The daemon reloads in worker threads (SIGHUP and the file watch may overlap).
        self._reloading = threading.Lock()

    def _fingerprint(self) -> tuple[tuple[str, int, int], ...]:
        files = sorted(self.rules_dir.glob("*.toml"))
        templates = sorted((self.rules_dir / "templates").glob("*"))
        out = []
        for f in [*files, *templates]:
            try:
                st = f.stat()
            except FileNotFoundError:
                continue
            out.append((str(f), st.st_mtime_ns, st.st_size))
        return tuple(out)

    def reload(self) -> bool:
        """Load the rules again; on error keep the current ones. True when swapped."""
        with self._reloading:
            return self._reload()

    def _reload(self) -> bool:
        stamp = self._fingerprint()
        try:
            rules = load_rules(self.rules_dir)
        except RulesError as exc:
            self.failed_reloads += 1
            self._stamp = stamp  # do not retry the same broken edit in a loop
            self.last_error = "\n".join(str(p) for p in exc.problems)
            log.error("rules reload FAILED, previous rules stay in force:\n%s", self.last_error)
            return False
        self.current = rules
        self._stamp = stamp
        self.loaded_at = time.time()
        self.reloads += 1
        self.last_error = None
        log.info("rules reloaded from %s", self.rules_dir)
        return True

    def reload_if_changed(self) -> bool:
        with self._reloading:
            if self._fingerprint() == self._stamp:
                return False
            return self._reload()
