"""The DATA phase: find the end of the message, undo dot-stuffing, check
line endings and line lengths, and keep memory bounded.

Only ``<CRLF>.<CRLF>`` ends DATA (RFC 5321 §4.1.1.4).  Sequences such as
``<LF>.<LF>`` or ``<CR>.<CR>`` never do; they are bare line endings, and a
message carrying one is refused whole (SMTP smuggling defence) unless the
server is configured to normalise them to CRLF.
"""
from __future__ import annotations

import re

from . import replies
from .replies import Reply

END = b"\r\n.\r\n"
MAX_TEXT_LINE = 998  # octets, without the CRLF (RFC 5321 §4.5.3.1.6)


def unstuff(stuffed: bytes | bytearray) -> bytearray:
    """Undo dot-stuffing of text that is preceded by a (virtual) CRLF.

    ``stuffed`` must start with ``b"\\r\\n"``; the result does not.
    """
    out = bytearray(stuffed).replace(b"\r\n.", b"\r\n")
    del out[:2]
    return out


def has_bare_newline(data: bytes | bytearray) -> bool:
    crlf = data.count(b"\r\n")
    return data.count(b"\n") != crlf or data.count(b"\r") != crlf


def normalize_newlines(data: bytes | bytearray) -> bytearray:
    """Turn bare CR and bare LF into CRLF."""
    return bytearray(re.sub(rb"\r\n|\r|\n", b"\r\n", bytes(data)))


def has_long_line(data: bytes | bytearray) -> bool:
    """Is any CRLF-terminated line longer than 998 octets?  (Bare CR/LF have
    been refused or normalised before this is asked.)"""
    n = len(data)
    if n <= MAX_TEXT_LINE:
        return False
    if n < (4 << 20):  # fastest: one split in C
        return max(map(len, data.split(b"\r\n"))) > MAX_TEXT_LINE
    # Big messages: walk the line ends without copying the text.
    find = data.find
    pos = 0
    while True:
        nl = find(b"\r\n", pos)
        end = n if nl < 0 else nl
        if end - pos > MAX_TEXT_LINE:
            return True
        if nl < 0:
            return False
        pos = nl + 2


class DataReader:
    """Accumulates a DATA block until ``<CRLF>.<CRLF>``.

    ``feed(data, start)`` returns the offset in *data* just past the
    terminator, or ``None`` if more input is needed.  Afterwards
    ``result()`` gives ``(content, None)`` or ``(None, reply)`` when the
    message must be refused.
    """

    __slots__ = ("_buf", "_scan", "_limit", "_size", "_overflow", "_bare")

    def __init__(self, max_size: int, bare_newlines: str = "reject"):
        # The DATA command line's CRLF precedes the first text line, so a
        # message consisting of ".\r\n" alone is the empty message.
        self._buf = bytearray(b"\r\n")
        self._scan = 0
        # Stuffing dots inflate the wire size; the exact check is made on the
        # unstuffed content in result().  A stuffed line is at least "..\r\n"
        # for 3 octets of content, so the wire form is at most 4/3 of it: a
        # smaller margin would refuse a dot-heavy message that is within
        # the limit.
        self._limit = (max_size + max_size // 3 + 1024) if max_size else 0
        self._size = 0
        self._overflow = False
        self._bare = bare_newlines

    def feed(self, data: bytes, start: int = 0) -> int | None:
        buf = self._buf
        base = len(buf)
        if start:
            buf += memoryview(data)[start:]
        else:
            buf += data
        i = buf.find(END, self._scan)
        if i >= 0:
            consumed = start + (i + 5 - base)
            del buf[i + 2:]  # keep the last line's CRLF, drop ".\r\n" and beyond
            return consumed
        self._size += len(buf) - base
        if self._limit and self._size > self._limit:
            # Too big: stop keeping the text, keep scanning for the end.
            self._overflow = True
            tail = bytes(buf[-4:])
            buf.clear()
            buf += tail
        self._scan = max(0, len(buf) - 4)
        return None

    def result(self, max_size: int) -> tuple[bytearray | None, Reply | None]:
        if self._overflow:
            return None, replies.MSG_TOO_BIG
        content = unstuff(self._buf)
        self._buf = bytearray()
        if max_size and len(content) > max_size:
            return None, replies.MSG_TOO_BIG
        if has_bare_newline(content):
            if self._bare != "normalize":
                return None, replies.BARE_NEWLINE
            content = normalize_newlines(content)
        if has_long_line(content):
            return None, replies.TEXT_LINE_TOO_LONG
        return content, None
