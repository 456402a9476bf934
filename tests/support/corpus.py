"""The fedora-devel January 2010 thread corpus (tests/data/threads-fedora-devel/, BSD, licence
beside it), and the threading evaluation run on it by tests/integration/test_corpus_threading.py
and bench/corpus_threading.py.

Corpus: ``2010-January.mbox.gz`` (292 list messages, archive order = chronological) and
``2010-January_thread.html.gz``, the MHonArc archive's own thread index (ground truth).

Mapping between the two (documented in ``map_ground_truth``): MHonArc names every message
``msgNNNNN.html`` with ``NNNNN`` its 0-based position in the archive, i.e. in the mbox. The
index entry ``<a name="00040" href="msg00040.html">subject</a>, <em>author</em>`` is therefore
mbox message 40. The mapping is checked, not trusted: the index's subject (whitespace folded)
must equal the mbox message's, and its author the From display name or address (MHonArc
shows only part of some names: ``पराग़`` for ``Parag N (पराग़)``, so containment counts).

Ground truth: the index's nested ``<ul>/<li>`` is the thread tree; a message's parent is the
``<li>`` whose ``<ul>`` holds it, its root the top-level ``<li>`` of its tree. MHonArc also
threads by subject when references are missing, so a ground-truth parent does not always
come with a References/In-Reply-To header: the evaluation only counts as *eligible* a reply
whose headers name an earlier message of the corpus (what a threading engine can act on).
"""

from __future__ import annotations

import gzip
import html
import mailbox
import re
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.header import decode_header, make_header
from email.utils import parseaddr
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.app import Gateway

CORPUS_DIR = Path(__file__).resolve().parents[1] / "data" / "threads-fedora-devel"
MBOX = CORPUS_DIR / "2010-January.mbox.gz"
THREAD_HTML = CORPUS_DIR / "2010-January_thread.html.gz"
SUPPORT_ADDRESS = "support@example.com"

_MSGID_RE = re.compile(r"<[^<>\s]+>")


# ------------------------------------------------------------------------------------------
# The mbox


@dataclass(frozen=True)
class CorpusMessage:
    """One list message, in archive order (``number`` = MHonArc's msgNNNNN)."""

    number: int
    raw: bytes  # CRLF line endings, no mbox "From " line
    message_id: str | None  # with <>
    in_reply_to: tuple[str, ...]
    references: tuple[str, ...]
    sender: str  # the From address (envelope sender when fed to the gateway)
    author: str  # the From display name, else the address
    subject: str  # decoded, whitespace folded

    @property
    def referenced_ids(self) -> tuple[str, ...]:
        """Every Message-ID this message names (In-Reply-To first), without repeats."""
        out: list[str] = []
        for mid in (*self.in_reply_to, *self.references):
            if mid not in out:
                out.append(mid)
        return tuple(out)


def _ids(value: str | None) -> tuple[str, ...]:
    return tuple(_MSGID_RE.findall(value or ""))


def _decoded(value: str | None) -> str:
    if not value:
        return ""
    try:
        text = str(make_header(decode_header(value)))
    except Exception:  # malformed encoded words: keep the raw text
        text = value
    return " ".join(text.split())


def to_crlf(data: bytes) -> bytes:
    """Normalise line endings to CRLF (SMTP's), whatever the input used."""
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def read_mbox(path: Path = MBOX) -> list[CorpusMessage]:
    """Every message of the gzipped mbox, in file (= archive, chronological) order."""
    with tempfile.TemporaryDirectory(prefix="corpus-") as tmp:
        plain = Path(tmp) / "archive.mbox"
        with gzip.open(path, "rb") as src, plain.open("wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        box = mailbox.mbox(plain, create=False)
        try:
            out: list[CorpusMessage] = []
            for number, key in enumerate(box.iterkeys()):
                raw = box.get_bytes(key)
                msg = box.get_message(key)
                name, addr = parseaddr(_decoded(msg.get("From")))
                mid = _ids(msg.get("Message-ID"))
                out.append(
                    CorpusMessage(
                        number=number,
                        raw=to_crlf(raw),
                        message_id=mid[0] if mid else None,
                        in_reply_to=_ids(msg.get("In-Reply-To")),
                        references=_ids(msg.get("References")),
                        sender=addr.lower(),
                        author=name or addr,
                        subject=_decoded(msg.get("Subject")),
                    )
                )
            return out
        finally:
            box.close()


def iter_raw(path: Path = MBOX) -> Iterator[tuple[CorpusMessage, bytes]]:
    """(message, raw CRLF bytes) in archive order."""
    for m in read_mbox(path):
        yield m, m.raw


# ------------------------------------------------------------------------------------------
# The ground-truth thread index


@dataclass
class IndexEntry:
    """One ``<li>`` of the MHonArc thread index."""

    number: int | None = None  # from <a name="00040">; None for navigation items
    subject: str = ""
    author: str = ""
    parent: IndexEntry | None = None
    _field: str = ""


class _ThreadIndexParser(HTMLParser):
    """Builds the tree from nested ``<ul>``/``<li>``; tolerant of unclosed ``</li>``."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.entries: list[IndexEntry] = []
        self._owners: list[IndexEntry | None] = []  # the <li> each open <ul> belongs to
        self._last: IndexEntry | None = None  # the <li> most recently opened at this depth

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "ul":
            self._owners.append(self._last)
            self._last = None
        elif tag == "li":
            parent = self._owners[-1] if self._owners else None
            entry = IndexEntry(parent=parent)
            self.entries.append(entry)
            self._last = entry
        elif tag == "a" and self._last is not None:
            name = dict(attrs).get("name")
            if name and name.isdigit() and self._last.number is None:
                self._last.number = int(name)
                self._last._field = "subject"
        elif tag == "em" and self._last is not None and self._last.number is not None:
            self._last._field = "author"

    def handle_endtag(self, tag: str) -> None:
        if tag == "ul":
            self._last = self._owners.pop() if self._owners else None
        elif tag in ("a", "em") and self._last is not None:
            self._last._field = ""

    def handle_data(self, data: str) -> None:
        entry = self._last
        if entry is None or not entry._field:
            return
        if entry._field == "subject":
            entry.subject += data
        else:
            entry.author += data


@dataclass(frozen=True)
class GroundTruth:
    """For each archive number: its parent (None for a thread start) and its thread root."""

    parent: dict[int, int | None]
    root: dict[int, int]

    def threads(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for n, r in sorted(self.root.items()):
            out.setdefault(r, []).append(n)
        return out


def _clean(text: str) -> str:
    # MHonArc escapes quotes in names as \"; fold whitespace (tabs from folded headers).
    return " ".join(html.unescape(text).replace('\\"', '"').split())


def parse_thread_index(path: Path = THREAD_HTML) -> list[IndexEntry]:
    """The index's message entries (navigation items dropped), with their parents."""
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        text = f.read()
    parser = _ThreadIndexParser()
    parser.feed(text)
    parser.close()
    entries = [e for e in parser.entries if e.number is not None]
    for e in entries:
        e.subject = _clean(e.subject)
        e.author = _clean(e.author)
        while e.parent is not None and e.parent.number is None:
            e.parent = e.parent.parent
    return entries


def ground_truth(entries: list[IndexEntry]) -> GroundTruth:
    parent: dict[int, int | None] = {}
    root: dict[int, int] = {}
    for e in entries:
        assert e.number is not None
        parent[e.number] = e.parent.number if e.parent is not None else None
    for n in parent:
        r, seen = n, {n}
        while (p := parent[r]) is not None and p not in seen:
            seen.add(p)
            r = p
        root[n] = r
    return GroundTruth(parent, root)


@dataclass
class Mapping:
    """How index entries were matched to mbox messages (by archive number, verified)."""

    truth: GroundTruth
    mapped: int  # index entries whose number names an mbox message
    verified: int  # ... whose subject and author also agree
    mismatches: list[str] = field(default_factory=list)
    unmapped_index: list[int] = field(default_factory=list)
    unmapped_mbox: list[int] = field(default_factory=list)


def _same_text(a: str, b: str) -> bool:
    return " ".join(a.split()).casefold() == " ".join(b.split()).casefold()


def map_ground_truth(messages: list[CorpusMessage], entries: list[IndexEntry]) -> Mapping:
    """Match index entry ``msgNNNNN`` to mbox message number NNNNN and check subject+author."""
    by_number = {m.number: m for m in messages}
    truth = ground_truth(entries)
    mapped = verified = 0
    mismatches: list[str] = []
    unmapped_index: list[int] = []
    for e in entries:
        assert e.number is not None
        m = by_number.get(e.number)
        if m is None:
            unmapped_index.append(e.number)
            continue
        mapped += 1
        if _same_text(e.subject, m.subject) and (
            _same_text(e.author, m.author)
            or _same_text(e.author, m.sender)
            or (e.author and e.author.casefold() in m.author.casefold())
        ):
            verified += 1
        else:
            mismatches.append(
                f"msg{e.number:05d}: index {e.subject!r} by {e.author!r}, "
                f"mbox {m.subject!r} by {m.author!r} <{m.sender}>"
            )
    indexed = {e.number for e in entries}
    unmapped_mbox = [m.number for m in messages if m.number not in indexed]
    return Mapping(truth, mapped, verified, mismatches, unmapped_index, unmapped_mbox)


# ------------------------------------------------------------------------------------------
# Feeding the gateway and measuring


async def feed(gw: Gateway, messages: list[CorpusMessage], *, batch: int = 1) -> None:
    """Send each message over real SMTP to support@ (envelope sender = From address) in
    archive order; the pipeline runs after every ``batch`` messages so order is kept."""
    import aiosmtplib

    assert gw.port is not None
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.port, timeout=60) as smtp:
        for i, m in enumerate(messages, 1):
            errors, _ = await smtp.sendmail(m.sender, [SUPPORT_ADDRESS], m.raw)
            assert not errors, (m.number, errors)
            if i % batch == 0:
                await gw.pipeline.run_once()
    await gw.pipeline.run_once()


@dataclass
class Miss:
    """An eligible reply that is neither in its root's ticket nor in a ticket linked to it."""

    number: int
    message_id: str | None
    root: int
    why: str
    header_connected: bool  # True: a References chain within the corpus reached the root


@dataclass
class Report:
    """The measured figures; ``lines()`` renders them."""

    total: int
    mapping: Mapping
    threads: int
    tickets: int
    unplaced: list[int]
    eligible: int
    same_ticket: int
    linked_ticket: int
    misses: list[Miss]
    connected_eligible: int  # eligible replies with a References chain to their root
    connected_placed: int
    cross_thread_links: list[tuple[int, int]]  # links between tickets of different threads
    wrong_joins: list[tuple[int, int, list[int]]]  # (message, ticket, foreign messages there)
    thread_keys: Counter[str]
    fragmented_threads: int  # eligible threads spread over more than one ticket

    @property
    def placed(self) -> int:
        return self.same_ticket + self.linked_ticket

    @property
    def placement_share(self) -> float:
        return self.placed / self.eligible if self.eligible else 1.0

    @property
    def gateway_misses(self) -> list[Miss]:
        """Misses the headers could have prevented (a References chain reached the root)."""
        return [m for m in self.misses if m.header_connected]

    def lines(self) -> list[str]:
        mp = self.mapping

        def pct(n: int, d: int) -> str:
            return f"{n}/{d} ({100.0 * n / d:.1f}%)" if d else f"{n}/0"

        out = [
            "Threading on fedora-devel 2010-January (real list mail)",
            f"  messages fed:                {self.total}",
            f"  ground truth mapped:         {mp.mapped}/{self.total} by archive number, "
            f"{mp.verified} with subject+author verified",
            f"  ground-truth threads:        {self.threads}",
            f"  tickets created:             {self.tickets}",
            f"  messages without a ticket:   {len(self.unplaced)}",
            f"  eligible replies:            {self.eligible} (ground-truth parent and "
            "References/In-Reply-To naming an earlier corpus message)",
            f"  reply placement:             {pct(self.placed, self.eligible)}",
            f"    same ticket as root:       {pct(self.same_ticket, self.eligible)}",
            f"    linked ticket only:        {pct(self.linked_ticket, self.eligible)}",
            f"    missed:                    {pct(len(self.misses), self.eligible)}",
            f"  with a References chain to the root (within the corpus): "
            f"{pct(self.connected_placed, self.connected_eligible)} placed",
            f"  threads split over tickets:  {self.fragmented_threads}",
            f"  wrong joins:                 {pct(len(self.wrong_joins), self.total)}",
            f"  links across threads:        {len(self.cross_thread_links)}",
            "  thread decisions:            "
            + ", ".join(f"{k}={v}" for k, v in sorted(self.thread_keys.items())),
        ]
        for miss in self.misses:
            tag = "GATEWAY MISS" if miss.header_connected else "MISS (no header path)"
            out.append(
                f"  {tag} msg{miss.number:05d} {miss.message_id} (root msg{miss.root:05d}): "
                f"{miss.why}"
            )
        for a, b in self.cross_thread_links:
            out.append(f"  CROSS-THREAD LINK ticket {a} -> ticket {b}")
        for number, ticket, foreign in self.wrong_joins:
            out.append(
                f"  WRONG JOIN msg{number:05d} in ticket {ticket} with other threads' "
                + ", ".join(f"msg{n:05d}" for n in foreign)
            )
        for line in mp.mismatches:
            out.append(f"  MAPPING MISMATCH {line}")
        return out


def _components(nodes: set[int], edges: list[tuple[int, int]]) -> dict[int, int]:
    """Union-find over tickets joined by links (either direction, transitively)."""
    parent = {n: n for n in nodes}

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        parent.setdefault(a, a)
        parent.setdefault(b, b)
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[ra] = rb
    return {n: find(n) for n in parent}


def _header_break(
    number: int,
    truth: GroundTruth,
    hcomp: dict[int, int],
    by_number: dict[int, CorpusMessage],
    position: dict[str, int],
) -> str:
    """Why no References chain leads from ``number`` to its root: the first ground-truth edge
    on the way up that no header supports, and what that message's headers do name."""
    child = number
    while (parent := truth.parent.get(child)) is not None:
        if hcomp[child] != hcomp[parent]:
            m = by_number[child]
            outside = [i for i in m.referenced_ids if i not in position]
            thread_refs = {
                i
                for o in by_number.values()
                if hcomp[o.number] == hcomp[parent]
                for i in o.referenced_ids
            }
            shared = [i for i in outside if i in thread_refs]
            named = ", ".join(m.referenced_ids) or "nothing (no In-Reply-To/References)"
            why = (
                f"no header path to the root: the archive puts msg{child:05d} under "
                f"msg{parent:05d}, but msg{child:05d} names {named}"
            )
            if shared:
                why += (
                    f"; it shares the out-of-corpus reference {shared[0]} with "
                    f"msg{parent:05d}'s part of the thread (a common ancestor nobody sent us)"
                )
            elif not m.referenced_ids:
                why += "; the archive threaded it by subject"
            return why
        child = parent
    return "no header path to the root"


def evaluate(gw: Gateway, messages: list[CorpusMessage], mapping: Mapping) -> Report:  # noqa: C901  (one report; each tally reads the tables built above it)
    """Compare where the gateway put every message with the archive's thread tree."""
    from sqlmodel import Session, col, select

    from gateway.store.models import Event, Message, Ticket, TicketLink

    truth = mapping.truth
    with Session(gw.engine) as s:
        rows = s.exec(
            select(Message.id, Message.message_id, Message.ticket_id)
            .where(Message.direction == "in")
            .order_by(col(Message.id))
        ).all()
        links = [(ln.ticket_id, ln.other_id) for ln in s.exec(select(TicketLink)).all()]
        ticket_ids = {t.id for t in s.exec(select(Ticket)).all() if t.id is not None}
        events = s.exec(
            select(Event.message_id, Event.type, Event.detail).where(
                col(Event.type).in_(["threaded", "created", "unthreaded"])
            )
        ).all()
    row_of: dict[str, tuple[int, int | None]] = {}
    for row_id, mid, tid in rows:
        if row_id is not None and mid is not None and mid not in row_of:
            row_of[mid] = (row_id, tid)
    why_of: dict[int, list[str]] = {}
    for msg_row, type_, detail in events:
        if msg_row is not None:
            why_of.setdefault(msg_row, []).append(f"{type_}: {detail}")

    def reasons(m: CorpusMessage) -> list[str]:
        hit = row_of.get(m.message_id or "")
        return why_of.get(hit[0], []) if hit else ["not stored"]

    ticket_of: dict[int, int | None] = {}
    for m in messages:
        hit = row_of.get(m.message_id or "")
        ticket_of[m.number] = hit[1] if hit else None
    comp = _components(ticket_ids, links)

    keys: Counter[str] = Counter()
    for m in messages:
        key = "not stored"
        for r in reasons(m):
            if r.startswith("threaded: "):
                key = r.split(": ", 2)[1]
            elif r.startswith("created: "):
                key = "new"
            elif r.startswith("unthreaded: "):
                key = "unthreaded " + r.split(": ", 2)[1]
        keys[key] += 1

    # What the headers alone connect: message -> earlier corpus messages it names.
    by_number = {m.number: m for m in messages}
    position = {m.message_id: m.number for m in messages if m.message_id}
    earlier_of = {
        m.number: [position[i] for i in m.referenced_ids if position.get(i, m.number) < m.number]
        for m in messages
    }
    hcomp = _components(set(by_number), [(n, e) for n, es in earlier_of.items() for e in es])

    eligible = same = linked = connected_eligible = connected_placed = 0
    misses: list[Miss] = []
    thread_tickets: dict[int, set[int | None]] = {}
    for m in messages:
        earlier = earlier_of[m.number]
        if truth.parent.get(m.number) is None or not earlier:
            continue
        eligible += 1
        root = truth.root[m.number]
        connected = hcomp[m.number] == hcomp[root]
        connected_eligible += connected
        mine, theirs = ticket_of[m.number], ticket_of[root]
        thread_tickets.setdefault(root, {theirs}).add(mine)
        if mine is not None and mine == theirs:
            same += 1
            connected_placed += connected
        elif mine is not None and theirs is not None and comp.get(mine) == comp.get(theirs):
            linked += 1
            connected_placed += connected
        else:
            names = ", ".join(f"msg{n:05d}" for n in earlier)
            if connected:
                why = "a References chain reaches the root, yet the ticket is not linked to it"
            else:
                why = _header_break(m.number, truth, hcomp, by_number, position)
            misses.append(
                Miss(
                    m.number,
                    m.message_id,
                    root,
                    f"in ticket {mine}, root in ticket {theirs}; names earlier {names}; {why}; "
                    f"gateway: {' | '.join(reasons(m))}",
                    connected,
                )
            )

    members: dict[int, list[int]] = {}
    for n, tid in ticket_of.items():
        if tid is not None:
            members.setdefault(tid, []).append(n)
    wrong: list[tuple[int, int, list[int]]] = []
    for n, tid in sorted(ticket_of.items()):
        if tid is None or n not in truth.root:
            continue
        foreign = [o for o in members[tid] if o in truth.root and truth.root[o] != truth.root[n]]
        if foreign:
            wrong.append((n, tid, foreign))
    thread_of_ticket = {
        tid: {truth.root[n] for n in ns if n in truth.root} for tid, ns in members.items()
    }
    cross = [
        (a, b)
        for a, b in links
        if thread_of_ticket.get(a) and thread_of_ticket.get(a) != thread_of_ticket.get(b)
    ]

    return Report(
        total=len(messages),
        mapping=mapping,
        threads=len(truth.threads()),
        tickets=len(ticket_ids),
        unplaced=[n for n, t in ticket_of.items() if t is None],
        eligible=eligible,
        same_ticket=same,
        linked_ticket=linked,
        misses=misses,
        connected_eligible=connected_eligible,
        connected_placed=connected_placed,
        cross_thread_links=cross,
        wrong_joins=wrong,
        thread_keys=keys,
        fragmented_threads=sum(1 for ts in thread_tickets.values() if len(ts) > 1),
    )


def load_corpus() -> tuple[list[CorpusMessage], Mapping]:
    """The mbox messages and the verified ground-truth mapping."""
    messages = read_mbox()
    return messages, map_ground_truth(messages, parse_thread_index())


__all__ = [
    "MBOX",
    "SUPPORT_ADDRESS",
    "THREAD_HTML",
    "CorpusMessage",
    "GroundTruth",
    "IndexEntry",
    "Mapping",
    "Miss",
    "Report",
    "evaluate",
    "feed",
    "iter_raw",
    "load_corpus",
    "map_ground_truth",
    "parse_thread_index",
    "read_mbox",
    "to_crlf",
]
