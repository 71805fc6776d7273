"""What the server hands to the spool: the envelope and the content, kept
apart (OpenSMTPD's vocabulary: one message, one envelope row per recipient),
the records delivery reads back, and :class:`MessageStore`, the one thing
the SMTP server needs of the spool (here, so that mta/smtp/ need not import
mta/spool/; the spool's whole interface is mta.spool.interface).
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Protocol

from twisted.internet.defer import Deferred

_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")

# Queue ids: 12 chars of time (microseconds) + 6 random, base 32, sortable by
# arrival and unique across nodes sharing one spool.
_ALPHABET = "0123456789BCDFGHJKLMNPQRSTVWXYZ"


def new_queue_id(now: float | None = None) -> str:
    t = int((time.time() if now is None else now) * 1_000_000)
    out = []
    for _ in range(11):
        t, r = divmod(t, 31)
        out.append(_ALPHABET[r])
    rnd = int.from_bytes(os.urandom(4), "big")
    for _ in range(6):
        rnd, r = divmod(rnd, 31)
        out.append(_ALPHABET[r])
    return "".join(reversed(out[:11])) + "".join(out[11:])


def split_header_block(content: bytes | bytearray) -> int:
    """Return the offset where the body starts.

    The header block is the leading run of header fields (with their
    continuation lines) plus the empty line that ends it, if present.
    Content that does not start with a header field has an empty header
    block.  ``content[:n] + content[n:]`` is always the content unchanged.
    """
    pos = 0
    n = len(content)
    while pos < n:
        nl = content.find(b"\n", pos)
        if nl < 0:
            return pos
        if nl == pos or (nl == pos + 1 and content[pos] == 0x0D):
            return nl + 1  # the empty line belongs to the header block
        c = content[pos]
        if c in (0x20, 0x09):
            if pos == 0:
                return 0
        elif _FIELD.match(content, pos) is None:
            return pos
        pos = nl + 1
    return pos


@dataclass(slots=True)
class Recipient:
    address: str                 # mailbox as given in RCPT TO (source route dropped)
    notify: str | None = None
    orcpt: str | None = None


@dataclass(slots=True)
class InboundMessage:
    queue_id: str
    sender: str                  # "" for the null reverse-path
    recipients: list[Recipient]
    headers: bytes               # our Received line + the header block as received
    body: bytes | bytearray | memoryview
    arrival: float
    client_address: str
    helo: str
    protocol: str                # SMTP, ESMTP, ESMTPS, ESMTPA, UTF8SMTP, ...
    size: int                    # len(headers) + len(body)
    body_type: str | None = None
    smtputf8: bool = False
    size_param: int | None = None
    ret: str | None = None
    envid: str | None = None
    auth: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    """A message in the spool, as delivery sees it (built by mta.spool.ops
    from its rows; no row dict leaves mta/spool/ for the delivery path)."""
    queue_id: str
    sender: str                  # "" for the null reverse-path
    headers: bytes
    body: bytes
    arrival: float
    body_type: str | None = None
    smtputf8: bool = False
    ret: str | None = None       # DSN RET=
    envid: str | None = None     # DSN ENVID= (xtext as received)


@dataclass(frozen=True, slots=True)
class QueuedRecipient:
    """One recipient of a spooled message with its delivery state (built by
    mta.spool.ops).  ``id`` is its row id, the key of its results."""
    id: int
    queue_id: str
    address: str                 # as accepted ("postmaster" may be bare)
    notify: str | None = None
    orcpt: str | None = None
    attempts: int = 0
    warned: bool = False         # a delay DSN was sent
    last_reply: str | None = None
    message_size: int = 0        # its message's octets, as the due read saw them (0: not read)


class MessageStore(Protocol):
    """Where received mail goes: mta.spool.Spool (and the tests' fakes)."""

    def store(self, msg: InboundMessage) -> Deferred[str]:
        """Durably store *msg*; fires with its queue id once it is safe to
        say 250 (after the commit), or fails (nothing of it was kept)."""
        ...


_date_cache: list = [None, ""]


def rfc5322_date(now: float) -> str:
    sec = int(now)
    if _date_cache[0] != sec:
        _date_cache[0] = sec
        _date_cache[1] = formatdate(sec, localtime=True)
    return _date_cache[1]


def _sanitize(text: str) -> str:
    return re.sub(r"[^\x21-\x27\x2a-\x7e\u0080-\U0010ffff]", "?", text)[:255]


def received_header(*, helo: str, client_ip: str, hostname: str, protocol: str,
                    queue_id: str, recipient: str | None, now: float,
                    tls: str | None = None) -> bytes:
    """RFC 5321 §4.4 trace field, folded to stay under 78 octets per line.
    *tls* ("TLSv1.3 with cipher ...") becomes a comment line, as Postfix does."""
    literal = f"[IPv6:{client_ip}]" if ":" in client_ip else f"[{client_ip}]"
    lines = [f"Received: from {_sanitize(helo) or literal} ({literal})"]
    if tls:
        lines.append("\t(using " + re.sub(r"[^A-Za-z0-9_.\-/ ()]", "?", tls)[:200] + ")")
    lines.append(f"\tby {hostname} (mta) with {protocol} id {queue_id}")
    if recipient:
        lines.append(f"\tfor <{recipient}>;")
    else:
        lines[-1] += ";"
    lines.append(f"\t{rfc5322_date(now)}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")
