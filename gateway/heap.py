"""The garbage collector in the long-running processes: the daemon and its pipeline child.

A full (generation 2) collection walks every object the process holds. After start-up that
is almost all imported modules, SQLAlchemy's mapper and statement caches, pydantic models and
the rules: tens of megabytes that never become garbage. Those walks were the SMTP event
loop's longest stalls: 110-200 ms each, several a minute under load, measured with
`bench/loop_stall.py` and the collector's own callbacks (docs/performance.md, "The SMTP loop
while acknowledgements are signed and delivered").

`gc.freeze()` moves everything that exists at that moment into a permanent generation the
collector no longer walks; later objects are collected as before. Reference counting still
frees a frozen object whose count drops to zero; only a reference cycle among frozen
objects (an old rules object with a cycle, after a reload) would stay, which is bounded
by the number of reloads.
"""

from __future__ import annotations

import gc

__all__ = ["freeze_startup_heap"]


def freeze_startup_heap() -> None:
    """Collect once, then exclude what is left (the start-up heap) from later collections."""
    gc.collect()
    gc.freeze()
