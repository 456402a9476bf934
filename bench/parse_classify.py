"""CPU of the pipeline's first two stages alone: `parse` + `classify` (+ `parse_bounce` for
bounces, as `classify_stage` does) over real mail, per message.

The messages: the sisimai bounce corpus (tests/data/bounces-sisimai, 629 + the `not/` ones),
the fedora-devel list month (tests/data/threads-fedora-devel, 292) and bench/e2e.py's
new-customer message (unique per round, like the pipeline bench's). Every round starts with
the per-value caches of `gateway.*` emptied, so a message's own header values are never
already parsed (as in the pipeline, where each message is new), while values many messages
share (``text/plain; charset=utf-8``) hit as they would.

Usage::

    python bench/parse_classify.py                  # this checkout
    python bench/parse_classify.py --code /work/main  # another checkout (before/after)
    python bench/parse_classify.py --dump out.pickle  # every outcome, for an old/new compare

Prints the process CPU per message (ms) per corpus, the median of --rounds.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import mailbox
import pickle
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if "--code" in sys.argv:
    sys.path.insert(0, str(Path(sys.argv[sys.argv.index("--code") + 1]).resolve()))
else:
    sys.path.insert(0, str(REPO))

sys.path.append(str(REPO))  # bench.mail, after the checkout under test

from bench.mail import customer_message  # noqa: E402

DATA = REPO / "tests" / "data"


def sisimai() -> list[tuple[str, bytes, str]]:
    out = []
    for path in sorted((DATA / "bounces-sisimai" / "maildir").rglob("*.eml")):
        out.append((f"sisimai/{path.parent.name}/{path.name}", path.read_bytes(), ""))
    return out


def fedora() -> list[tuple[str, bytes, str]]:
    out = []
    with tempfile.NamedTemporaryFile(suffix=".mbox") as tmp:
        mbox = DATA / "threads-fedora-devel" / "2010-January.mbox.gz"
        tmp.write(gzip.decompress(mbox.read_bytes()))
        tmp.flush()
        for i, m in enumerate(mailbox.mbox(tmp.name)):
            raw = m.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            out.append((f"fedora/{i}", raw, "fedora-devel-bounces@redhat.com"))
    return out


def customer(n: int) -> bytes:
    return customer_message(n, f"customer{n}.{uuid.uuid4().hex[:8]}@example.net")


def clear_caches() -> None:
    for name, mod in list(sys.modules.items()):
        if not name.startswith("gateway"):
            continue
        for value in list(vars(mod).values()):
            if isinstance(value, functools._lru_cache_wrapper):
                value.cache_clear()


def one(raw: bytes, sender: str) -> Any:
    from gateway.pipeline.bounce import parse_bounce
    from gateway.pipeline.classify import classify
    from gateway.pipeline.parse import parse

    parsed = parse(raw, max_size=10_000_000)
    verdict = classify(
        parsed.msg,
        sender,
        own_addresses={"support@example.com"},
        loop_header="X-Support-Gateway-Loop",
        loop_value={"gw1.example.com"},
        is_own_message_id=lambda mid: mid.endswith("@gw1.example.com>"),
    )
    bounce = parse_bounce(parsed.msg, sender) if verdict.kind in ("bounce", "report") else None
    return parsed, verdict, bounce


def outcome(parsed: Any, verdict: Any, bounce: Any) -> dict[str, Any]:
    """Everything later stages may read of the three results (the msg by its headers)."""
    from gateway.pipeline.parse import walk_parts

    fields = {k: v for k, v in vars(parsed).items() if k != "msg"}
    parts = []
    for part in walk_parts(parsed.msg):
        heads = []
        for k in part:
            try:
                heads.append((k, str(part[k]), type(part[k]).__name__))
            except Exception as exc:
                heads.append((k, "raises " + type(exc).__name__, ""))
        parts.append(
            (
                heads,
                part.get_content_type(),
                part.get_default_type(),
                [d.__class__.__name__ for d in part.defects],
                part.is_multipart(),
                part.preamble,
                part.epilogue,
            )
        )
    try:
        as_bytes = parsed.msg.as_bytes()
    except Exception as exc:
        as_bytes = "raises " + type(exc).__name__
    return {
        "parsed": repr(fields),
        "parts": parts,
        "as_bytes": as_bytes,
        "verdict": repr(verdict),
        "bounce": repr(bounce),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--code")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dump")
    args = ap.parse_args()
    corpora = {"sisimai": sisimai(), "fedora": fedora()}
    import gateway.pipeline.parse

    print("code:", Path(gateway.pipeline.parse.__file__).parents[2])
    if args.dump:
        clear_caches()
        out = {}
        for corpus in corpora.values():
            for key, raw, sender in corpus:
                out[key] = outcome(*one(raw, sender))
        Path(args.dump).write_bytes(pickle.dumps(out))
        print(f"dumped {len(out)} outcomes to {args.dump}")
        return
    times: dict[str, list[float]] = {k: [] for k in [*corpora, "customer"]}
    for r in range(args.rounds):
        batches = dict(corpora)
        batches["customer"] = [(f"c{i}", customer(r * 1000 + i), "") for i in range(300)]
        for name, batch in batches.items():
            clear_caches()
            t0 = time.process_time()
            for _key, raw, sender in batch:
                one(raw, sender)
            times[name].append((time.process_time() - t0) / len(batch) * 1000)
    for name, ts in times.items():
        each = ", ".join(f"{t:.3f}" for t in ts)
        print(f"{name:9s} {statistics.median(ts):7.3f} ms CPU/message  (rounds: {each})")


if __name__ == "__main__":
    main()
