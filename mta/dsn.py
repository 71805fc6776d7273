"""Delivery status notifications (RFC 3464, RFC 3461 §6, RFC 6533).

:func:`build_dsn` turns an original message plus the fate of some of its
recipients into one ``multipart/report; report-type=delivery-status``
message, to be sent from ``<>`` to the original envelope sender.  Pure
functions: no I/O, no Twisted, no clock (``now`` is a parameter); the only
impurity is the random MIME boundary and Message-ID.

The MIME structure is assembled by hand rather than with
:class:`email.message.EmailMessage`: the ``email`` generator re-serialises
``message/rfc822`` payloads (so the returned original would not be
byte-exact) and re-folds ``message/delivery-status`` blocks.  The stdlib
``email`` package is used for dates, and the result is written so that
``email.message_from_bytes(data, policy=email.policy.default)`` parses it
back into the three parts (the tests check exactly that).

Output guarantees: every line ends with CRLF and no line is longer than
998 octets (header fields are folded at white space, at 78 octets where
possible).  The returned original is byte-exact when it is returned whole.

Who said it (RFC 3464 §2.3.5, §2.3.6): ``remote_mta`` and
``diagnostic_code`` are for a reply that remote MTA really sent
(``Remote-MTA: dns;host``, ``Diagnostic-Code: smtp;...``, "host said: ..."
in the text); ``reason`` is our own explanation (a next hop without an
extension we need, no route, a connection refused...), written as
``Diagnostic-Code: X-mta;...`` (the way Postfix writes ``X-Postfix;``) and
"Reason given by <reporting MTA>: ..." in the text, with no Remote-MTA.

Internationalisation (RFC 6533): when an address that goes into the report
is not ASCII (sender, final or original recipient), or when an SMTPUTF8
original has non-ASCII header fields, the report is a "global" one: the
second part is ``message/global-delivery-status`` (UTF-8, ``utf-8;``
address type with raw UTF-8 addresses), the returned message is
``message/global`` (or ``message/global-headers``), and the top-level
``To:`` carries the UTF-8 address as is (RFC 6532).  Such a DSN must leave
with SMTPUTF8 (see :func:`needs_smtputf8`).  Otherwise the report is the
classic ASCII ``message/delivery-status``; a non-ASCII ORCPT there is
written in the ``utf-8-addr-xtext`` form (``\\x{HEX}``), and stray non-ASCII
in diagnostic text is replaced by ``?``.
"""
from __future__ import annotations

import re
import secrets
import textwrap
from dataclasses import dataclass
from email.utils import formatdate

from . import domain
from .smtp.params import xtext_decode as _xtext_decode

__all__ = [
    "DSNRecipient",
    "OriginalMessage",
    "build_dsn",
    "needs_smtputf8",
    "SUBJECT_FAILED",
    "SUBJECT_DELAYED",
    "SUBJECT_SUCCESS",
]

SUBJECT_FAILED = "Undelivered Mail Returned to Sender"
SUBJECT_DELAYED = "Delayed Mail (still being retried)"
SUBJECT_SUCCESS = "Successful Mail Delivery Report"

ACTIONS = frozenset({"failed", "delayed", "delivered", "relayed", "expanded"})
_SUCCESS = frozenset({"delivered", "relayed", "expanded"})
_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")

DIAGNOSTIC_TYPE = "X-mta"   # diagnostic-type of our own explanations (RFC 3464 §2.3.6)

_FOLD_WIDTH = 78      # preferred line length (RFC 5322 §2.1.1 SHOULD)
_HARD_WIDTH = 990     # well under the 998-octet MUST, CRLF excluded
_TEXT_WIDTH = 76      # human-readable part


@dataclass(frozen=True)
class DSNRecipient:
    final_recipient: str                    # the address we tried, no type prefix
    action: str                             # failed|delayed|delivered|relayed|expanded
    status: str                             # "5.1.1" etc.
    original_recipient: str | None = None   # ORCPT as received: "addr-type;xtext"
    remote_mta: str | None = None           # host name of the MTA that sent diagnostic_code
    diagnostic_code: str | None = None      # its reply, "550 5.1.1 ..." ("smtp;" added here)
    reason: str | None = None               # our own explanation (no remote MTA said it)
    last_attempt: float | None = None       # Unix time
    will_retry_until: float | None = None   # for "delayed"


@dataclass(frozen=True)
class OriginalMessage:
    queue_id: str
    sender: str                             # envelope sender; never "" (no DSN for <>)
    headers: bytes                          # header block as stored (with its empty line)
    body: bytes
    arrival: float
    envid: str | None = None                # ENVID xtext as received
    ret: str | None = None                  # "FULL" | "HDRS" | None
    smtputf8: bool = False


# ---------------------------------------------------------------------------
# Small text helpers


_EMBEDDED = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")


def _unembed(value: str) -> str:
    """Decode RFC 6533 ``\\x{HEX}`` escapes (utf-8-addr-xtext/unitext)."""
    def repl(m: re.Match[str]) -> str:
        cp = int(m.group(1), 16)
        if cp > 0x10FFFF or 0xD800 <= cp <= 0xDFFF:
            return "?"
        return chr(cp)
    return _EMBEDDED.sub(repl, value)


def _embed(addr: str, *, ascii_only: bool) -> str:
    """Encode an address as utf-8-addr-unitext (``ascii_only=False``) or
    utf-8-addr-xtext (``ascii_only=True``), RFC 6533 §3."""
    out = []
    for ch in addr:
        o = ord(ch)
        if (o <= 0x20 or ch in "+=\\" or o == 0x7F or 0x80 <= o <= 0x9F
                or 0xD800 <= o <= 0xDFFF or (ascii_only and o > 0x7E)):
            out.append(f"\\x{{{o:02X}}}")
        else:
            out.append(ch)
    return "".join(out)


_CTL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
_WS = re.compile(r"[ \t\r\n]+")


def _clean(text: str, *, ascii_only: bool) -> str:
    """One line of printable text: line breaks and tabs become single spaces,
    controls (and, for ASCII reports, non-ASCII) become ``?``."""
    text = _WS.sub(" ", _CTL.sub("?", text)).strip()
    if ascii_only and not text.isascii():
        text = "".join(c if c.isascii() else "?" for c in text)
    return text


_REPLY_LINE = re.compile(r"(\d{3})([- ]?)(.*)", re.S)
_ENHANCED = re.compile(r"([245]\.\d{1,3}\.\d{1,3})(?: +|$)")


def _join_reply(reply: str) -> str:
    """A multi-line SMTP reply as one line: ``550-5.1.1 a / 550 5.1.1 b`` →
    ``550 5.1.1 a b`` (other text is only joined with spaces)."""
    lines = [ln for ln in re.split(r"\r\n|\r|\n", reply.strip()) if ln.strip()]
    if len(lines) < 2:
        return reply
    matches = [_REPLY_LINE.fullmatch(ln) for ln in lines]
    if not all(matches) or len({m.group(1) for m in matches}) != 1:  # type: ignore[union-attr]
        return " ".join(lines)
    code = matches[0].group(1)  # type: ignore[union-attr]
    texts = [m.group(3).strip() for m in matches]  # type: ignore[union-attr]
    first = _ENHANCED.match(texts[0])
    if first:
        esc = first.group(1)
        texts = [t[m.end():] if (m := _ENHANCED.match(t)) and m.group(1) == esc else t
                 for t in texts]
        code = f"{code} {esc}"
    return " ".join([code, *(t for t in texts if t)])


def _octets(s: str) -> int:
    return len(s.encode("utf-8"))


def _hard_split(line: str, limit: int) -> list[str]:
    """Split *line* into pieces of at most *limit* octets (never inside a
    character); pieces after the first start with a space (a fold)."""
    pieces: list[str] = []
    cur = ""
    size = 0
    for ch in line:
        n = _octets(ch)
        if size + n > limit:
            pieces.append(cur)
            cur, size = " ", 1
        cur += ch
        size += n
    pieces.append(cur)
    return pieces


def _field(name: str, value: str) -> str:
    """``Name: value`` folded at spaces, CRLF-terminated, lines ≤ 998 octets."""
    words = value.split(" ") if value else [""]
    lines: list[str] = []
    cur = f"{name}: {words[0]}"
    for w in words[1:]:
        if _octets(cur) + 1 + _octets(w) <= _FOLD_WIDTH:
            cur += " " + w
        else:
            lines.append(cur)
            cur = " " + w
    lines.append(cur)
    out: list[str] = []
    for line in lines:
        out.extend(_hard_split(line, _HARD_WIDTH) if _octets(line) > _HARD_WIDTH else [line])
    return "".join(line + "\r\n" for line in out)


def _date(ts: float) -> str:
    return formatdate(ts, localtime=True)


def _ascii_host(host: str) -> str:
    host = _clean(host, ascii_only=False).replace(" ", "")
    if host.isascii():
        return host
    try:
        return domain.to_ascii(host)
    except domain.DomainError:
        return "".join(c if c.isascii() else "?" for c in host)


# ---------------------------------------------------------------------------
# Addresses in the report

def _bare(addr: str) -> str:
    """Tolerate an address handed over as a path, ``<addr>``."""
    return addr[1:-1] if addr.startswith("<") and addr.endswith(">") else addr


def _address_field(addr: str, *, utf8: bool) -> str:
    """``rfc822;addr`` for ASCII, ``utf-8;addr`` (RFC 6533) otherwise."""
    addr = _clean(_bare(addr), ascii_only=False)
    if addr.isascii():
        return f"rfc822;{addr}"
    return "utf-8;" + _embed(addr, ascii_only=not utf8)


def _orcpt_address(orcpt: str) -> tuple[str, str]:
    """Split and decode an ORCPT value: ``(addr-type, decoded address)``."""
    atype, semi, raw = orcpt.partition(";")
    if not semi:
        atype, raw = "rfc822", orcpt
    atype = atype.strip()
    addr = _xtext_decode(raw.strip())
    if atype.lower() == "utf-8":
        addr = _unembed(addr)
    return atype, addr


def _orcpt_field(orcpt: str, *, utf8: bool) -> str:
    atype, addr = _orcpt_address(orcpt)
    if atype.lower() in ("rfc822", "utf-8"):
        return _address_field(addr, utf8=utf8)
    # Some other address type (x400, ...): pass it through decoded.
    return f"{_clean(atype, ascii_only=True)};{_clean(addr, ascii_only=not utf8)}"


def _report_addresses(original: OriginalMessage, recipients: list[DSNRecipient]) -> list[str]:
    addrs = [original.sender]
    for r in recipients:
        addrs.append(r.final_recipient)
        if r.original_recipient:
            addrs.append(_orcpt_address(r.original_recipient)[1])
    return addrs


def _is_global(original: OriginalMessage, recipients: list[DSNRecipient]) -> bool:
    if not all(a.isascii() for a in _report_addresses(original, recipients)):
        return True
    return original.smtputf8 and not bytes(original.headers).isascii()


def needs_smtputf8(original: OriginalMessage, recipients: list[DSNRecipient]) -> bool:
    """True when :func:`build_dsn` makes an RFC 6533 "global" report for
    these arguments: UTF-8 in its header and machine-readable parts, so the
    DSN must be relayed with SMTPUTF8 (and BODY=8BITMIME)."""
    return _is_global(original, recipients)


# ---------------------------------------------------------------------------
# The original message

def _line_clean(data: bytes) -> bool:
    """Usable as 7bit/8bit MIME content: CRLF lines ≤ 998 octets, no NUL.

    (Counting and splitting rather than a ``[^\\r\\n]{999}`` regex, which
    backtracks to quadratic time on long lines.)"""
    crlf = data.count(b"\r\n")
    if data.count(b"\r") != crlf or data.count(b"\n") != crlf or b"\x00" in data:
        return False
    return max(map(len, data.split(b"\r\n")), default=0) <= 998


def _header_lines(headers: bytes) -> bytes:
    """The header block for a headers-only return: without the empty line
    that ends it, CRLF-terminated, lines ≤ 998 octets (bare CR/LF are made
    CRLF and over-long lines folded; a normal header block is unchanged)."""
    data = re.sub(rb"\r\n|\r|\n", b"\r\n", headers.replace(b"\x00", b""))
    lines = data.split(b"\r\n")
    if lines and lines[-1] == b"":
        lines.pop()
    while lines and lines[-1] == b"":
        lines.pop()
    out = []
    for line in lines:
        while len(line) > _HARD_WIDTH:
            out.append(line[:_HARD_WIDTH])
            line = b" " + line[_HARD_WIDTH:]
        out.append(line)
    return b"".join(line + b"\r\n" for line in out)


# ---------------------------------------------------------------------------
# The human-readable part

def _kind(recipients: list[DSNRecipient]) -> str:
    actions = {r.action for r in recipients}
    if "failed" in actions:
        return "failed"
    if "delayed" in actions:
        return "delayed"
    return "success"


_SECTION_TITLES = {
    "failed": "Delivery to the following recipients failed permanently:",
    "delayed": "Delivery to the following recipients has been delayed:",
    "success": "Delivery to the following recipients succeeded:",
}


def _wrap(text: str, indent: str = "") -> list[str]:
    return textwrap.wrap(text, width=_TEXT_WIDTH, initial_indent=indent,
                         subsequent_indent=indent, break_long_words=True,
                         break_on_hyphens=False) or [indent.rstrip()]


def _human_text(original: OriginalMessage, recipients: list[DSNRecipient], *,
                kind: str, reporting_mta: str, postmaster: str,
                returned: str, utf8: bool) -> str:
    clean = lambda s: _clean(s, ascii_only=not utf8)  # noqa: E731
    lines: list[str] = [f"This is the mail system at {reporting_mta}.", ""]
    if kind == "failed":
        intro = ("Your message could not be delivered to one or more of its "
                 "recipients. This is a permanent error; the mail system has "
                 "given up. The details are below.")
    elif kind == "delayed":
        intro = ("Your message has not yet been delivered to one or more of its "
                 "recipients. The mail system will keep trying; you do not "
                 "need to send it again. You will be told if delivery finally "
                 "fails.")
    elif all(r.action == "relayed" for r in recipients):
        # RFC 3461 §6.2.7: handed on, not delivered: do not say delivered.
        intro = ("Your message was passed on to the next mail system for the "
                 "recipients listed below, as you asked to be told. That system "
                 "does not report delivery, so you may get no further notice "
                 "for them.")
    else:
        intro = ("Your message was delivered to the recipients listed below, as "
                 "you asked to be told. If a recipient is marked \"relayed\", "
                 "the message was handed to a system that does not report "
                 "delivery, and you may get no further notice for it.")
    lines += _wrap(intro)
    lines.append("")
    if returned == "full":
        lines += _wrap("The original message is attached.")
    elif returned == "headers":
        lines += _wrap("The header of the original message is attached.")
    else:
        lines += _wrap("The original message is too large, or not in a form that "
                       "can be returned unchanged, so only its header is attached.")
    lines.append("")
    lines += _wrap(f"If you need help, write to <{clean(postmaster)}> and include "
                   f"this report.")
    lines.append("")
    lines += _wrap(f"Queue ID: {clean(original.queue_id)}")
    lines += _wrap(f"Sender: <{clean(original.sender)}>")
    lines += _wrap(f"Received: {_date(original.arrival)}")
    for section in ("failed", "delayed", "success"):
        group = [r for r in recipients
                 if (r.action in _SUCCESS if section == "success" else r.action == section)]
        if not group:
            continue
        lines.append("")
        lines.append(_SECTION_TITLES[section])
        for r in group:
            lines.append("")
            lines += _wrap(f"<{clean(_bare(r.final_recipient))}>", "  ")
            if r.original_recipient:
                _, orig = _orcpt_address(r.original_recipient)
                if orig != _bare(r.final_recipient):
                    lines += _wrap(f"(originally addressed to <{clean(orig)}>)", "    ")
            detail = f"Action: {r.action}; status {r.status}"
            if r.remote_mta:
                detail += f"; remote host {_ascii_host(r.remote_mta)}"
            lines += _wrap(detail, "    ")
            if r.diagnostic_code:
                who = f"{_ascii_host(r.remote_mta)} said" if r.remote_mta else "Reason"
                lines += _wrap(f"{who}: {clean(_join_reply(r.diagnostic_code))}", "    ")
            if r.reason:
                lines += _wrap(f"Reason given by {reporting_mta}: {clean(r.reason)}", "    ")
            if r.last_attempt is not None:
                lines += _wrap(f"Last attempt: {_date(r.last_attempt)}", "    ")
            if r.action == "delayed" and r.will_retry_until is not None:
                lines += _wrap(f"Will keep trying until: {_date(r.will_retry_until)}", "    ")
    return "".join(line.rstrip() + "\r\n" for line in lines)


# ---------------------------------------------------------------------------
# The machine-readable part

def _status_text(original: OriginalMessage, recipients: list[DSNRecipient], *,
                 reporting_mta: str, utf8: bool) -> str:
    out = []
    if original.envid:
        out.append(_field("Original-Envelope-Id",
                          _clean(_xtext_decode(original.envid), ascii_only=not utf8)))
    out.append(_field("Reporting-MTA", f"dns;{reporting_mta}"))
    out.append(_field("X-Mta-Queue-ID", _clean(original.queue_id, ascii_only=True)))
    out.append(_field("Arrival-Date", _date(original.arrival)))
    for r in recipients:
        out.append("\r\n")
        if r.original_recipient:
            out.append(_field("Original-Recipient", _orcpt_field(r.original_recipient, utf8=utf8)))
        out.append(_field("Final-Recipient", _address_field(r.final_recipient, utf8=utf8)))
        out.append(_field("Action", r.action))
        out.append(_field("Status", r.status))
        if r.remote_mta:
            out.append(_field("Remote-MTA", f"dns;{_ascii_host(r.remote_mta)}"))
        if r.diagnostic_code:
            out.append(_field("Diagnostic-Code",
                              "smtp;" + _clean(_join_reply(r.diagnostic_code),
                                               ascii_only=not utf8)))
        elif r.reason:
            # Our own diagnosis, typed as such (as Postfix's "X-Postfix;"): no
            # remote MTA said it, so neither "smtp;" nor Remote-MTA.
            out.append(_field("Diagnostic-Code",
                              f"{DIAGNOSTIC_TYPE};" + _clean(r.reason, ascii_only=not utf8)))
        if r.last_attempt is not None:
            out.append(_field("Last-Attempt-Date", _date(r.last_attempt)))
        if r.action == "delayed" and r.will_retry_until is not None:
            out.append(_field("Will-Retry-Until", _date(r.will_retry_until)))
    return "".join(out)


# ---------------------------------------------------------------------------

def _part(headers: list[str], content: bytes) -> bytes:
    return "".join(headers).encode("utf-8") + b"\r\n" + content


def _cte(content: bytes) -> list[str]:
    return [] if content.isascii() else ["Content-Transfer-Encoding: 8bit\r\n"]


def build_dsn(original: OriginalMessage, recipients: list[DSNRecipient], *,
              reporting_mta: str, now: float, postmaster: str | None = None,
              max_original_size: int = 10_000_000) -> bytes:
    """Return the whole DSN message (header + body, CRLF line endings) to be
    sent from ``<>`` to ``original.sender``.

    The subject and the human-readable text follow the gravest action
    present: any "failed" → ``Undelivered Mail Returned to Sender``; else
    any "delayed" → ``Delayed Mail (still being retried)``; else
    ``Successful Mail Delivery Report``.

    The original is returned whole (``message/rfc822``) when a recipient
    failed and RET is not HDRS, or when RET=FULL; otherwise, or when it is
    larger than *max_original_size* or is not valid MIME line-wise (bare
    CR/LF, lines over 998 octets, NUL), only its header is returned
    (``text/rfc822-headers``).  ``postmaster`` is the contact address named
    in the human-readable part (default ``postmaster@reporting_mta``).

    Raises :class:`ValueError` for a null sender, no recipients, an unknown
    action or a malformed status code.
    """
    if not _bare(original.sender):
        raise ValueError("no DSN for a message from <>")
    if not recipients:
        raise ValueError("a DSN needs at least one recipient")
    for r in recipients:
        if r.action not in ACTIONS:
            raise ValueError(f"bad DSN action {r.action!r}")
        if not _STATUS.fullmatch(r.status):
            raise ValueError(f"bad DSN status {r.status!r}")

    host = _ascii_host(reporting_mta)
    utf8 = _is_global(original, recipients)
    kind = _kind(recipients)
    postmaster = postmaster or f"postmaster@{host}"

    # What to return of the original.
    headers = bytes(original.headers)
    ret = (original.ret or "").upper()
    want_full = ret != "HDRS" if kind == "failed" else ret == "FULL"
    returned = "headers"
    full = b""
    if want_full:
        returned = "truncated"
        if len(headers) + len(original.body) <= max_original_size:
            full = headers + bytes(original.body)
            if _line_clean(full):
                returned = "full"

    # Parts.
    text = _human_text(original, recipients, kind=kind, reporting_mta=host,
                       postmaster=postmaster, returned=returned, utf8=utf8).encode("utf-8")
    charset = "us-ascii" if text.isascii() else "utf-8"
    part1 = _part([f"Content-Type: text/plain; charset={charset}\r\n",
                   "Content-Description: Notification\r\n", *_cte(text)], text)

    status = _status_text(original, recipients, reporting_mta=host, utf8=utf8).encode("utf-8")
    status_type = "message/global-delivery-status" if utf8 else "message/delivery-status"
    part2 = _part([f"Content-Type: {status_type}\r\n",
                   "Content-Description: Delivery report\r\n", *_cte(status)], status)

    if returned == "full":
        content = full
        ctype = "message/global" if utf8 else "message/rfc822"
        desc = {"failed": "Undelivered Message", "delayed": "Delayed Message",
                "success": "Delivered Message"}[kind]
    else:
        content = _header_lines(headers)
        ctype = "message/global-headers" if utf8 else "text/rfc822-headers"
        desc = {"failed": "Undelivered Message Headers", "delayed": "Delayed Message Headers",
                "success": "Delivered Message Headers"}[kind]
    part3 = _part([f"Content-Type: {ctype}\r\n", f"Content-Description: {desc}\r\n",
                   *_cte(content)], content)

    parts = (part1, part2, part3)
    while True:
        boundary = f"=_dsn_{secrets.token_hex(16)}"
        bb = boundary.encode("ascii")
        if not any(bb in p for p in parts):
            break

    subject = {"failed": SUBJECT_FAILED, "delayed": SUBJECT_DELAYED,
               "success": SUBJECT_SUCCESS}[kind]
    sender = _clean(_bare(original.sender), ascii_only=not utf8)
    top = [
        _field("From", f"Mail Delivery System <MAILER-DAEMON@{host}>"),
        _field("To", f"<{sender}>"),
        _field("Subject", subject),
        _field("Date", _date(now)),
        _field("Message-ID", f"<{int(now)}.{secrets.token_hex(8)}@{host}>"),
        _field("Auto-Submitted", "auto-replied"),
        _field("MIME-Version", "1.0"),
        _field("Content-Type", f'multipart/report; report-type=delivery-status; '
                               f'boundary="{boundary}"'),
    ]
    eight_bit = not all(p.isascii() for p in parts)
    if eight_bit:
        top.append(_field("Content-Transfer-Encoding", "8bit"))

    out = bytearray("".join(top).encode("utf-8"))
    out += b"\r\nThis is a MIME-encapsulated message.\r\n"
    for p in parts:
        # The CRLF before a delimiter belongs to the delimiter (RFC 2046
        # §5.1.1), so each part keeps its own last CRLF, byte-exact.
        out += b"\r\n--" + bb + b"\r\n" + p
    out += b"\r\n--" + bb + b"--\r\n"
    return bytes(out)
