"""The DKIM key for a letter's From domain: a brand's own key, else the configured ones.

A brand (`[brands.X] dkim = {domain, selector, key_file}`, docs/decisions.md D17) signs its letters
with its own key so the signature aligns with its From domain (DMARC, RFC 7489 §3.1.1: the d=
domain must align with the From domain). Keys are read on first use and kept; a key file
that cannot be read makes signing fail for that letter only (the delivery worker retries it
as a temporary failure and the other letters still go out).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from email.parser import BytesHeaderParser
from email.utils import parseaddr
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.outbound.dkim import DkimKey, load_key

if TYPE_CHECKING:
    from gateway.routing.model import Brand, Rules

__all__ = ["BrandKeys", "check_brand_keys", "from_domain"]


def from_domain(raw: bytes) -> str:
    """The domain of the message's From address, lowercased ("" when there is none)."""
    head = raw.split(b"\r\n\r\n", 1)[0]
    msg = BytesHeaderParser().parsebytes(head + b"\r\n\r\n")
    return parseaddr(str(msg.get("From", "")))[1].rpartition("@")[2].lower()


class BrandKeys:
    """Chooses the signing keys of one outgoing message by its From domain."""

    def __init__(self, rules: Callable[[], Rules] | None) -> None:
        self.rules = rules
        self._cache: dict[tuple[str, str, str], DkimKey] = {}

    def keys_for(self, raw: bytes, default: Sequence[DkimKey]) -> Sequence[DkimKey]:
        if self.rules is None:
            return default
        try:
            rules = self.rules()
        except Exception:  # no rules loaded: the configured keys, as before brands
            return default
        if not rules.brands:
            return default
        domain = from_domain(raw)
        for brand in rules.brands.values():
            if brand.domain != domain or not brand.dkim_key_file:
                continue
            return [self._key(brand)]
        return default

    def every_key(self) -> list[DkimKey]:
        """Every brand's key, loaded (what `keys_for` loads on a brand's first letter)."""
        try:
            rules = self.rules() if self.rules is not None else None
        except Exception:
            return []
        brands = rules.brands.values() if rules is not None else ()
        return [self._key(brand) for brand in brands if brand.dkim_key_file]

    def _key(self, brand: Brand) -> DkimKey:
        """The brand's key, read from its file once."""
        ident = (brand.dkim_key_file, brand.dkim_domain, brand.dkim_selector)
        if ident not in self._cache:
            self._cache[ident] = load_key(Path(brand.dkim_key_file), *ident[1:])
        return self._cache[ident]


def _brand_line(rules: Rules, brand_id: str) -> str:
    """``file:line`` of ``[brands.<id>]`` (or an inline ``<id> = {...}`` under ``[brands]``)
    in the rules files; the first rules file when it cannot be found."""
    header = re.compile(rf'^\s*\[\s*brands\s*\.\s*"?{re.escape(brand_id)}"?\s*\]')
    dotted = re.compile(rf'^\s*(brands\s*\.\s*)?"?{re.escape(brand_id)}"?\s*[.=]')
    for path in rules.files:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            continue
        in_brands = False
        for number, line in enumerate(lines, 1):
            if header.match(line):
                return f"{path}:{number}"
            if line.lstrip().startswith("["):
                in_brands = line.strip() == "[brands]"
            elif (in_brands or "brands" in line) and dotted.match(line):
                return f"{path}:{number}"
    return f"{rules.files[0]}:1" if rules.files else "rules:1"


def check_brand_keys(rules: Rules) -> list[str]:
    """Each brand whose DKIM key file is missing, unreadable or not a key, as
    ``file:line: message`` (the brand in the rules). ``rules check`` and start-up refuse
    them: the brand's letters would otherwise wait in the outbox unsigned, retried
    until they expire (docs/templates.md "Brands")."""
    problems: list[str] = []
    for brand in rules.brands.values():
        if not brand.dkim_key_file:
            continue
        try:
            load_key(Path(brand.dkim_key_file), brand.dkim_domain, brand.dkim_selector)
        except (OSError, ValueError) as error:
            why = error.strerror if isinstance(error, OSError) and error.strerror else error
            problems.append(
                f"{_brand_line(rules, brand.id)}: brand '{brand.id}': DKIM key_file "
                f"{brand.dkim_key_file} cannot be used: {why}"
            )
    return problems
