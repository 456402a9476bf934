"""The new part of a reply: the quoted text below it removed (mail-parser-reply).

Used by the staff stage (the text relayed to the customer) and the handover pack (internal
notes without the notification they quote).
"""

from __future__ import annotations

from mailparser_reply import EmailReplyParser

__all__ = ["QUOTE_LANGUAGES", "strip_quoted"]

#: Languages whose "On ... wrote:" headers mail-parser-reply recognises for us.
QUOTE_LANGUAGES = ["en", "de", "fr", "es", "it", "nl", "sv", "da", "pl", "cs"]


# ------------------------------------------------------------------------------ quoted text


def strip_quoted(text: str) -> str:
    """The new part of a reply: the quoted notification (``On ... wrote:`` and what follows,
    ``-----Original Message-----``, trailing ``>`` lines) removed.

    mail-parser-reply finds the quote header; the cut is then applied to the original lines
    so the reply keeps its indentation (the library strips every line while parsing).
    """
    text = (text or "").replace("\r\n", "\n").replace("\r", "\n")
    try:
        replies = EmailReplyParser(languages=QUOTE_LANGUAGES).read(text).replies
        # A first fragment that starts with a quote header means nothing was written above it.
        latest = replies[0].content if replies and not replies[0].headers else ""
    except Exception:  # a parser bug must not lose the reply: fall back to the whole text
        latest = text
    lines = text.split("\n")
    normalised = [line.strip() for line in lines]
    keep = lines
    latest_lines = [line.strip() for line in latest.strip().split("\n")] if latest.strip() else []
    if latest_lines:
        n = len(latest_lines)
        for start in range(len(normalised) - n + 1):
            if normalised[start : start + n] == latest_lines:
                keep = lines[: start + n]
                break
        else:
            keep = latest.split("\n")
    else:
        keep = []
    while keep and (not keep[-1].strip() or keep[-1].lstrip().startswith(">")):
        keep.pop()
    return "\n".join(line.rstrip() for line in keep).strip("\n")
