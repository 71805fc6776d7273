"""The content of an outbound message as it goes out: :func:`prepare_content`
makes a stored message's header block and body into a :class:`Content`
(never with a bare CR or LF unless it is BINARYMIME: DESIGN.md, SMTP
smuggling; 8-bit or not; its 7-bit conversion, made once, for a hop without
8BITMIME), and :class:`DotStuffer` stuffs it as it is written (RFC 5321
§4.5.2), whatever the chunking.  Used by mta.smtp.client (the protocol
writes it) and mta.smtp.session (which checks what the hop can take).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.logger import Logger

from .data import has_bare_newline, normalize_newlines
from .downgrade import DowngradeError, to_7bit

log = Logger(namespace="mta.smtp")


class Outgoing(Protocol):
    """What :func:`prepare_content` reads of a message
    (mta.smtp.client.OutboundMessage is one)."""
    queue_id: str
    headers: bytes
    body: bytes
    body_type: str | None


class DotStuffer:
    """Dot-stuffing (RFC 5321 §4.5.2) that is correct whatever the chunking.

    The stream is taken to start at the beginning of a line.  The last two
    octets seen are kept, so a ``CRLF.`` split over two (or three) chunks is
    still found.
    """

    __slots__ = ("_tail",)

    def __init__(self) -> None:
        self._tail = b"\r\n"

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        buf = self._tail + chunk
        # A match needs 3 octets, so none lies inside the 2-octet tail, and
        # the extra dot always lands after it: dropping len(tail) octets of
        # the output leaves exactly the stuffed chunk.
        out = buf.replace(b"\r\n.", b"\r\n..")
        self._tail = buf[-2:]
        return out[2:]


def dot_stuff(data: bytes) -> bytes:
    """The whole-buffer form, for reference and tests."""
    out = data.replace(b"\r\n.", b"\r\n..")
    return b"." + out if out.startswith(b".") else out


@dataclass
class Content:
    parts: list[bytes]
    size: int
    eightbit: bool                  # holds an 8-bit octet (not only declared BODY=8BITMIME)
    binary: bool
    declared_8bit: bool = False     # stored with BODY=8BITMIME
    _seven: "Content | DowngradeError | None" = field(default=None, repr=False)

    def seven_bit(self) -> "Content":
        """This content converted for a next hop without 8BITMIME (computed
        once); raises DowngradeError when it cannot be."""
        if self._seven is None:
            try:
                data = to_7bit(b"".join(self.parts))
            except DowngradeError as e:
                self._seven = e
            else:
                self._seven = Content([data] if data else [], len(data), False, False)
        if isinstance(self._seven, DowngradeError):
            raise self._seven
        return self._seven


def _as_bytes(data: Any) -> bytes:
    if isinstance(data, bytes):
        return data
    return bytes(data)


def prepare_content(msg: Outgoing) -> Content:
    headers = _as_bytes(msg.headers)
    body = _as_bytes(msg.body)
    body_type = (msg.body_type or "").upper()
    binary = body_type == "BINARYMIME"
    if not binary:
        # Our server stores CRLF-only content; never forward anything else.
        if has_bare_newline(headers) or has_bare_newline(body):
            log.warn("{queue_id}: bare CR or LF in stored content, normalised",
                     queue_id=msg.queue_id)
            whole = normalize_newlines(headers + body)
            headers, body = bytes(whole), b""
    eightbit = (not binary) and not (headers.isascii() and body.isascii())
    parts = [p for p in (headers, body) if p]
    if parts and not binary and not parts[-1].endswith(b"\r\n"):
        parts.append(b"\r\n")  # the final dot must follow a CRLF of the content's own
    return Content(parts, sum(len(p) for p in parts), eightbit, binary,
                    declared_8bit=body_type == "8BITMIME")
