"""RFC 5321 paths: ``<>``, ``local@domain``, quoted local parts, address
literals, source routes (kept only as the final mailbox) and, with SMTPUTF8
(RFC 6531), UTF-8 local parts and U-label domains.

No %-hack, no !-path rewriting: an address is what the grammar says it is.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from . import domain as _domain

MAX_LOCAL = 64
MAX_DOMAIN = _domain.MAX_LENGTH  # a name DNS can hold (RFC 5321 §4.5.3.1.2 allows 255)
MAX_PATH = 256


class AddressError(ValueError):
    """The path does not follow RFC 5321 (or RFC 6531 when UTF-8 is allowed)."""


_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"


def _class(ascii_body: str, utf8: bool) -> str:
    """The character class ``[ascii_body]``, and with *utf8* every non-ASCII
    character too -- written as the complement of the ASCII characters it
    leaves out: ``[...\u0080-\U0010ffff]`` means the same but takes re
    ~130 ms to compile, at every start of every ``mta`` command."""
    if not utf8:
        return f"[{ascii_body}]"
    ascii_class = re.compile(f"[{ascii_body}]")
    out = "".join(re.escape(chr(c)) for c in range(128) if not ascii_class.fullmatch(chr(c)))
    return f"[^{out}]"


def _grammar(utf8: bool) -> tuple[re.Pattern[str], re.Pattern[str]]:
    atom = _class(_ATEXT, utf8) + "+"
    dot_string = rf"{atom}(?:\.{atom})*"
    qtext = _class(r"\x20\x21\x23-\x5b\x5d-\x7e", utf8)
    quoted = rf'"(?:{qtext}|\\[\x20-\x7e])*"'
    letdig = _class("A-Za-z0-9", utf8)
    ldh = _class(r"A-Za-z0-9\-", utf8)
    label = rf"{letdig}(?:{ldh}*{letdig})?"
    domain = rf"{label}(?:\.{label})*"
    literal = r"\[[\x21-\x5a\x5e-\x7e]+\]"
    mailbox = rf"(?P<local>{dot_string}|{quoted})@(?P<domain>{domain}|{literal})"
    adl = rf"@{domain}(?:,@{domain})*"
    path = re.compile(rf"<(?:{adl}:)?{mailbox}>", re.S)
    return path, re.compile(domain)


_PATH = {False: _grammar(False), True: _grammar(True)}
_POSTMASTER = re.compile(r"<postmaster>", re.I)


@dataclass(frozen=True, slots=True)
class Mailbox:
    """A mailbox as the client spelled it (source route dropped)."""

    local: str   # as on the wire: dot-string or quoted-string
    domain: str  # domain, U-labels allowed, or "[address literal]"; "" for bare postmaster

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}" if self.domain else self.local

    @property
    def is_literal(self) -> bool:
        return _domain.is_literal(self.domain)

    @property
    def local_text(self) -> str:
        """The local part with quoting removed (what a next hop would see)."""
        lp = self.local
        if lp.startswith('"'):
            return re.sub(r"\\(.)", r"\1", lp[1:-1])
        return lp

    @property
    def ascii_domain(self) -> str:
        """The domain's key for comparisons and routing (mta.domain.to_ascii);
        "" for the bare postmaster."""
        return _domain.to_ascii(self.domain) if self.domain else ""

    @property
    def is_ascii(self) -> bool:
        return str(self).isascii()


def domain_key(address: str, hostname: str) -> str:
    """The domain of a recipient address as stored (``local@domain``, or a bare
    ``postmaster``, which is *hostname*'s) as mta.domain.key writes it: the
    key that the queue runner groups by and the queue CLI filters on."""
    return _domain.key(address.rsplit("@", 1)[1] if "@" in address else hostname)


def _check_domain(domain: str) -> None:
    try:
        _domain.to_ascii(domain)
    except _domain.DomainError as e:
        raise AddressError(str(e)) from None


def parse_path(path: str, *, utf8: bool = False, allow_null: bool = False,
               allow_postmaster: bool = False) -> Mailbox | None:
    """Parse one RFC 5321 Path including its angle brackets.

    Returns ``None`` for the null path ``<>`` (when *allow_null*).
    Raises :class:`AddressError` when the path is not valid.
    """
    if not path.isascii():
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: not text from any wire
            raise AddressError("invalid characters in path") from None
    if path == "<>":
        if allow_null:
            return None
        raise AddressError("null path not allowed here")
    if allow_postmaster and _POSTMASTER.fullmatch(path):
        return Mailbox(path[1:-1], "")
    if len(path.encode("utf-8")) > MAX_PATH + 2 and not utf8:
        raise AddressError("path too long")
    m = _PATH[utf8][0].fullmatch(path)
    if m is None:
        if not utf8 and not path.isascii() and _PATH[True][0].fullmatch(path):
            raise AddressError("non-ASCII address without SMTPUTF8")
        raise AddressError(f"syntax error in path {path}")
    local, domain = m.group("local"), m.group("domain")
    if len(local.encode("utf-8")) > MAX_LOCAL:
        raise AddressError("local part too long")
    _check_domain(domain)
    return Mailbox(local, domain)


def split_path(arg: str) -> tuple[str, str]:
    """Split ``<path> params`` (the text after ``FROM:``/``TO:``) into the
    path, brackets included, and the parameter text.

    Tolerates spaces after the colon and a missing pair of angle brackets
    (``MAIL FROM:user@example.test``), as Postfix does.
    """
    s = arg.lstrip(" ")
    if not s.startswith("<"):
        addr, _, rest = s.partition(" ")
        if not addr:
            raise AddressError("missing path")
        return f"<{addr}>", rest
    # The first ">" outside a quoted local part ends the path; without a
    # quote (nearly always) that is simply the first ">".
    end = s.find(">") if '"' not in s else _closing_bracket(s)
    if end < 0:
        raise AddressError("unterminated path")
    rest = s[end + 1:]
    if rest and not rest.startswith(" "):
        raise AddressError("garbage after path")
    return s[: end + 1], rest.lstrip(" ")


def _closing_bracket(s: str) -> int:
    """Where the ">" that closes the path *s* (which may quote) is; -1: nowhere."""
    in_quote = escaped = False
    for i, ch in enumerate(s):
        if escaped:
            escaped = False
        elif ch == "\\" and in_quote:
            escaped = True
        elif ch == '"':
            in_quote = not in_quote
        elif ch == ">" and not in_quote:
            return i
    return -1
