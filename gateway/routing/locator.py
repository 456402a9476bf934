"""Where each mistake in `rules/*.toml` is: the TOML line locator and `Problem`.

`tomllib` gives line numbers only for syntax errors. For everything else `Locator` scans the
text the parser accepted and maps each key path ("route", 2, "owner") to the line it was
written on, so every problem the schema (`gateway.routing.schema`), the loader and the
reference checks (`gateway.routing.references`) find is printed as `file:line: message`
(docs/rules.md "What rules check catches").
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Key", "Locator", "Problem", "RulesError", "Source", "syntax_line"]

#: A key path inside a rules file; ints are array positions.
Key = tuple[str | int, ...]


# --------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class Problem:
    """One mistake in the rules, printed as `file:line: message`."""

    file: str
    line: int | None
    message: str

    def __str__(self) -> str:
        if self.line is None:
            return f"{self.file}: {self.message}"
        return f"{self.file}:{self.line}: {self.message}"


class RulesError(Exception):
    """The rules are invalid; `problems` lists every mistake found."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems: list[Problem] = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


# --------------------------------------------------------------------------- locating lines


class Locator:
    """Maps key paths to the line they appear on, by scanning TOML text the parser accepted.

    Paths use ints for array positions, so the third `[[route]]`'s owner is
    ("route", 2, "owner") and the second escalation step is ("sla", "std", "escalation", 1).
    Best effort: on anything unexpected it keeps what it found so far.
    """

    def __init__(self, text: str) -> None:
        self.lines: dict[Key, int] = {}
        self._text = text
        self._pos = 0
        self._line = 1
        with contextlib.suppress(IndexError, ValueError):
            self._scan()

    def line(self, path: Key) -> int:
        """Line of `path`, else of its closest recorded ancestor, else 1."""
        for end in range(len(path), 0, -1):
            found = self.lines.get(path[:end])
            if found is not None:
                return found
        return 1

    # -- scanning
    def _peek(self, ahead: int = 0) -> str:
        index = self._pos + ahead
        return self._text[index] if index < len(self._text) else ""

    def _skip(self, newlines: bool = False) -> None:
        while self._pos < len(self._text):
            char = self._text[self._pos]
            if char in " \t\r":
                self._pos += 1
            elif char == "#":
                while self._pos < len(self._text) and self._text[self._pos] != "\n":
                    self._pos += 1
            elif char == "\n" and newlines:
                self._line += 1
                self._pos += 1
            else:
                return

    def _string(self) -> str:
        quote = self._peek()
        start = self._pos + 1
        self._pos = start
        if quote == "'":
            end = self._text.index("'", start)
            self._pos = end + 1
            return self._text[start:end]
        chars: list[str] = []
        while self._peek() != '"':
            if self._peek() == "\\":
                chars.append(self._text[self._pos : self._pos + 2])
                self._pos += 2
            else:
                chars.append(self._peek())
                self._pos += 1
        self._pos += 1
        return "".join(chars)

    def _key(self) -> tuple[str, ...]:
        parts: list[str] = []
        while True:
            self._skip()
            if self._peek() in ("'", '"'):
                parts.append(self._string())
            else:
                start = self._pos
                while self._peek() and (self._peek().isalnum() or self._peek() in "_-"):
                    self._pos += 1
                if self._pos == start:
                    raise ValueError("no key")
                parts.append(self._text[start : self._pos])
            self._skip()
            if self._peek() != ".":
                return tuple(parts)
            self._pos += 1

    def _multiline(self) -> None:
        quote = self._text[self._pos : self._pos + 3]
        index = self._pos + 3
        while True:
            end = self._text.index(quote, index)
            backslashes = 0
            while quote == '"""' and self._text[end - 1 - backslashes] == "\\":
                backslashes += 1
            if backslashes % 2 == 0:
                break
            index = end + 1
        end += 3
        while end < len(self._text) and self._text[end] == quote[0] and end - self._pos < 8:
            end += 1  # up to two quotes may be part of the content
        self._line += self._text.count("\n", self._pos, end)
        self._pos = end

    def _value(self, path: Key) -> None:
        self._skip()
        char = self._peek()
        if self._text.startswith('"""', self._pos) or self._text.startswith("'''", self._pos):
            self._multiline()
        elif char in ("'", '"'):
            self._string()
        elif char == "[":
            self._array(path)
        elif char == "{":
            self._inline_table(path)
        else:
            while self._peek() and self._peek() not in ",]}\n#":
                self._pos += 1

    def _array(self, path: Key) -> None:
        self._pos += 1
        index = 0
        while True:
            self._skip(newlines=True)
            if self._peek() == "]":
                self._pos += 1
                return
            self.lines.setdefault((*path, index), self._line)
            self._value((*path, index))
            self._skip(newlines=True)
            if self._peek() == ",":
                self._pos += 1
                index += 1
            elif self._peek() != "]":
                raise ValueError("bad array")

    def _inline_table(self, path: Key) -> None:
        self._pos += 1
        while True:
            self._skip(newlines=True)
            if self._peek() == "}":
                self._pos += 1
                return
            sub = (*path, *self._key())
            self.lines.setdefault(sub, self._line)
            if self._peek() != "=":
                raise ValueError("bad inline table")
            self._pos += 1
            self._value(sub)
            self._skip(newlines=True)
            if self._peek() == ",":
                self._pos += 1

    def _scan(self) -> None:
        table: Key = ()
        arrays: dict[tuple[str, ...], int] = {}
        while True:
            self._skip(newlines=True)
            if self._pos >= len(self._text):
                return
            if self._peek() == "[":
                double = self._peek(1) == "["
                self._pos += 2 if double else 1
                raw = self._key()
                self._pos += 2 if double else 1
                resolved: list[str | int] = []
                for end in range(1, len(raw) + 1):
                    resolved.append(raw[end - 1])
                    if raw[:end] in arrays and not (double and end == len(raw)):
                        resolved.append(arrays[raw[:end]])
                if double:
                    self.lines.setdefault(tuple(resolved), self._line)
                    arrays[raw] = arrays.get(raw, -1) + 1
                    resolved.append(arrays[raw])
                table = tuple(resolved)
                for end in range(1, len(table) + 1):
                    self.lines.setdefault(table[:end], self._line)
            else:
                path = (*table, *self._key())
                for end in range(len(table) + 1, len(path) + 1):
                    self.lines.setdefault(path[:end], self._line)
                if self._peek() != "=":
                    raise ValueError("bad key/value")
                self._pos += 1
                self._value(path)
            self._skip()


def syntax_line(message: str, text: str) -> int:
    """The line of a `tomllib` syntax error (its message says "at line N")."""
    match = re.search(r"at line (\d+)", message)
    if match:
        return int(match.group(1))
    return max(1, len(text.splitlines()))  # "at end of document"


@dataclass
class Source:
    """One parsed rules file: its data and where each key of it was written."""

    path: Path
    data: dict[str, Any]
    locator: Locator

    @property
    def name(self) -> str:
        return str(self.path)

    def line(self, path: Key) -> int:
        return self.locator.line(path)

    def where(self, path: Key) -> str:
        """``rules/routes.toml:12``."""
        return f"{self.name}:{self.line(path)}"
