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


# Every octet but CR and LF: what has_bare_newline deletes to count those two.
_NOT_CR_LF = bytes(b for b in range(256) if b not in (0x0D, 0x0A))
_PIECE = 1 << 20     # has_bare_newline's transient copies stay this small


def has_bare_newline(data: bytes | bytearray) -> bool:
    """Is there a CR not followed by LF, or an LF not preceded by CR?

    Each CRLF pair holds one CR and one LF, and no octet is in two pairs, so
    the text is CRLF-only exactly when its CRs and LFs number twice its
    pairs: two passes in C (``translate`` keeps the CRs and LFs, ``count``
    counts the pairs), a third less than counting CR, LF and CRLF apart --
    this runs on every message received and on every one sent.  Big content
    is translated a megabyte at a time (translate's result is as long as its
    input until it is cut down: the content is never held twice).
    """
    if len(data) <= _PIECE:
        kept = len(data.translate(None, _NOT_CR_LF))
    else:
        view = memoryview(data)
        kept = sum(len(bytes(view[i:i + _PIECE]).translate(None, _NOT_CR_LF))
                   for i in range(0, len(data), _PIECE))
    return kept != 2 * data.count(b"\r\n")


def normalize_newlines(data: bytes | bytearray) -> bytearray:
    """Turn bare CR and bare LF into CRLF."""
    return bytearray(re.sub(rb"\r\n|\r|\n", b"\r\n", bytes(data)))


def has_long_line(data: bytes | bytearray) -> bool:
    """Is any line longer than 998 octets, its CRLF not counted (the last
    line may lack one)?  Bare CR/LF have been refused or normalised before
    this is asked: a line ends at its LF."""
    n = len(data)
    if n <= MAX_TEXT_LINE:
        return False
    # From the start of a line, a short one has its LF within the next 998
    # + 2 octets: jump to the last LF there (every line up to it is short),
    # a few hundred jumps for a megabyte of mail, no copy of the text.
    rfind = data.rfind
    start = 0
    while True:
        lf = rfind(b"\n", start, start + MAX_TEXT_LINE + 2)
        if lf < 0:
            return True            # 999 octets or more without a line end
        start = lf + 1
        if n - start <= MAX_TEXT_LINE:
            return False           # what is left is one short line at most


class DataReader:
    """Accumulates a DATA block until ``<CRLF>.<CRLF>``, undoing the
    dot-stuffing as the text arrives.

    ``feed(data, start)`` returns the offset in *data* just past the
    terminator, or ``None`` if more input is needed.  Afterwards
    ``result()`` gives ``(content, None)`` or ``(None, reply)`` when the
    message must be refused.

    Memory: the content is kept once, unstuffed, in one bytearray that
    ``result()`` hands over as it is; each read is copied a bounded number
    of times on its way in.  Beyond *max_size* octets of content the text is
    no longer kept (the terminator is still looked for, to stay in step).
    """

    __slots__ = ("_buf", "_tail", "_max", "_overflow", "_bare")

    def __init__(self, max_size: int, bare_newlines: str = "reject"):
        self._buf = bytearray()   # unstuffed content so far
        # Input not yet unstuffed into _buf (at most the 4 octets that may
        # begin the terminator), preceded by the 2 octets before it: a
        # "<CRLF>." or the terminator may straddle reads.  The DATA command
        # line's CRLF precedes the first text line, so a message consisting
        # of ".\r\n" alone is the empty message.
        self._tail = b"\r\n"
        self._max = max_size
        self._overflow = False
        self._bare = bare_newlines

    def feed(self, data: bytes, start: int = 0) -> int | None:
        tail = self._tail
        raw = tail + (memoryview(data)[start:] if start else data)
        # The terminator begins with "<CRLF>.": one search finds the first
        # line that begins with a dot, and only from there is it looked for
        # (most reads have neither).
        dot = raw.find(b"\r\n.")
        i = raw.find(END, dot) if dot >= 0 else -1
        if i >= 0:
            self._commit(raw, i + 2, dot)  # keep the last line's CRLF, drop ".\r\n"
            self._tail = b""
            # The terminator cannot lie within the old tail: it was searched.
            return start + i + 5 - len(tail)
        cut = len(raw) - 4
        if cut > 2:
            self._commit(raw, cut, dot)
            self._tail = raw[cut - 2:]
        else:
            self._tail = raw
        return None

    def _commit(self, raw: bytes, end: int, dot: int) -> None:
        """Unstuff ``raw[2:end]`` (``raw[:2]`` is context) onto the content;
        *dot* is where the first "<CRLF>." of *raw* begins (-1: none)."""
        if end <= 2 or self._overflow:
            return
        if 0 <= dot and dot + 3 <= end:    # a dot-stuffed line within raw[:end]
            # A "<CRLF>." match needs 3 octets, so none lies within the 2
            # context octets and the dot removed always lies after them.
            piece = memoryview(raw[:end].replace(b"\r\n.", b"\r\n"))[2:]
        else:
            piece = memoryview(raw)[2:end]
        if self._max and len(self._buf) + len(piece) > self._max:
            # Too big: stop keeping the text, keep looking for the end.
            self._overflow = True
            self._buf = bytearray()
            return
        self._buf += piece

    def result(self, max_size: int) -> tuple[bytearray | None, Reply | None]:
        if self._overflow:
            return None, replies.MSG_TOO_BIG
        content = self._buf
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
