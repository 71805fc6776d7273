"""8-bit MIME content made 7-bit for a next hop without 8BITMIME.

RFC 6152 §3 leaves a relay two choices for 8-bit content and a next hop
that does not offer 8BITMIME: convert it (RFC 1652 §3 / RFC 2045) or bounce
it.  :func:`to_7bit` converts; the SMTP client bounces only what it cannot
convert (:class:`DowngradeError`, with the reason).  Pure functions, bytes
in and bytes out, no I/O.

What is changed, and only that:

* A leaf part (not ``multipart/*``, not ``message/rfc822``) that holds an
  8-bit octet is re-encoded: ``text/*`` and ``message/*`` as
  quoted-printable, unless QP would not carry it as text — a NUL, a bare
  CR or LF, or more than half of its octets 8-bit (Cyrillic, CJK: QP
  would triple it) — then base64; every other type as base64.  Its
  ``Content-Transfer-Encoding`` field is replaced (or added at the end of its
  header block); its other header fields stay as they were.
* ``multipart/*`` is walked part by part on the raw bytes: the boundaries,
  the preamble, the epilogue and every part without an 8-bit octet are
  copied byte for byte.  ``message/rfc822`` (and ``message/news``), which
  may have no encoding but 7bit/8bit/binary (RFC 2046 §5.2.1), is walked
  into: the encapsulated message is converted like a top-level one.  A
  composite entity that declared ``8bit``/``binary`` is relabelled ``7bit``.
* A top-level (or encapsulated) message with none of ``MIME-Version``,
  ``Content-Type`` and ``Content-Transfer-Encoding`` — plain RFC 5322 text
  with 8-bit octets in its body — is taken as ``text/plain``: it gains
  ``MIME-Version: 1.0``, ``Content-Type: text/plain; charset=utf-8`` (when
  the body is valid UTF-8, else ``charset=unknown-8bit``, RFC 1428) and its
  ``Content-Transfer-Encoding``, at the end of its header block.

The header blocks are read with the stdlib ``email`` parser (type,
boundary, encoding), never re-serialised by it.  Content without an 8-bit
octet is returned unchanged.  A conversion breaks a DKIM signature over the
body, as every MTA's does.

What cannot be converted (:class:`DowngradeError`): 8-bit octets in a
header field (only SMTPUTF8 carries them), in a preamble or an epilogue, in
a part already declared quoted-printable or base64 (or any other encoding);
a multipart without a boundary parameter or without its close delimiter;
nesting deeper than :data:`MAX_DEPTH`.

The input is CRLF text as the spool stores it (bare CR/LF normalised).
"""
from __future__ import annotations

import base64
import binascii
import re
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32

from ..message import split_header_block

MAX_DEPTH = 50          # nested multiparts / encapsulated messages

_IDENTITY = ("7bit", "8bit", "binary")
_ENCAPSULATING = ("message/rfc822", "message/news")
_FIELD_NAME = re.compile(rb"([!-9;-~]+)[ \t]*:")
_HIGH = bytes(range(0x80, 0x100))
_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


class DowngradeError(ValueError):
    """The content cannot be made 7-bit; ``str()`` says why."""


def to_7bit(content: bytes) -> bytes:
    """*content* (a whole message, header block and body) with every 8-bit
    part re-encoded as described in the module docstring; unchanged when it
    is 7-bit already.  Raises DowngradeError when it cannot be converted."""
    content = bytes(content)
    if content.isascii():
        return content
    return _message(content, 0)


# ---------------------------------------------------------------------------
# Entities
# ---------------------------------------------------------------------------

def _split(entity: bytes) -> tuple[bytes, bytes]:
    n = split_header_block(entity)
    header, body = entity[:n], entity[n:]
    if not header.isascii():
        raise DowngradeError("8-bit octets in a header field (only SMTPUTF8 could carry them)")
    return header, body


def _parse(header: bytes, default_type: str = "text/plain") -> Message:
    msg = BytesHeaderParser(policy=compat32).parsebytes(header if header.endswith(b"\r\n\r\n")
                                                        else header + b"\r\n")
    msg.set_default_type(default_type)
    return msg


def _message(entity: bytes, depth: int) -> bytes:
    """A top-level or encapsulated message."""
    header, body = _split(entity)
    names = {name for name, _s, _e in _fields(header)}
    if not names & {b"mime-version", b"content-type", b"content-transfer-encoding"}:
        if body.isascii():
            return entity
        charset = "utf-8" if _is_utf8(body) else "unknown-8bit"
        cte, encoded = _encode_leaf("text", body)
        added = (b"MIME-Version: 1.0\r\n"
                 b"Content-Type: text/plain; charset=" + charset.encode() + b"\r\n"
                 b"Content-Transfer-Encoding: " + cte + b"\r\n")
        return _insert_fields(header, added) + encoded
    return _entity(header, body, depth, "text/plain")


def _entity(header: bytes, body: bytes, depth: int, default_type: str) -> bytes:
    if body.isascii():
        return header + body
    if depth >= MAX_DEPTH:
        raise DowngradeError(f"MIME structure nested deeper than {MAX_DEPTH} levels")
    msg = _parse(header, default_type)
    ctype = msg.get_content_type()
    maintype = msg.get_content_maintype()
    cte = str(msg.get("content-transfer-encoding", "7bit")).strip().lower()
    if cte not in _IDENTITY:
        raise DowngradeError(f"8-bit octets in a part declared {cte[:40]} ({ctype})")
    if maintype == "multipart":
        boundary = msg.get_boundary()
        if not boundary:
            raise DowngradeError(f"{ctype} without a boundary parameter")
        inner_default = "message/rfc822" if ctype == "multipart/digest" else "text/plain"
        new_body = _multipart(body, boundary.encode("ascii", "replace"), depth, inner_default)
        return _relabel(header, cte) + new_body
    if ctype in _ENCAPSULATING:
        return _relabel(header, cte) + _message(body, depth + 1)
    new_cte, encoded = _encode_leaf(maintype, body)
    return _set_cte(header, new_cte) + encoded


def _multipart(body: bytes, boundary: bytes, depth: int, default_type: str) -> bytes:
    delimiter = re.compile(rb"(?m)^--" + re.escape(boundary) + rb"(--)?[ \t]*(?:\r\n|\Z)")
    marks: list[tuple[int, int]] = []       # (start, end incl. CRLF) of each delimiter line
    closed = False
    for m in delimiter.finditer(body):
        marks.append((m.start(), m.end()))
        if m.group(1):
            closed = True
            break
    if not marks:
        raise DowngradeError("a multipart with no boundary delimiter in its body")
    if not closed:
        raise DowngradeError("a multipart without its close delimiter")
    if not body[:marks[0][0]].isascii():
        raise DowngradeError("8-bit octets in a multipart preamble")
    if not body[marks[-1][1]:].isascii():
        raise DowngradeError("8-bit octets in a multipart epilogue")
    out = [body[:marks[0][1]]]
    for (_s, start), (nxt, nxt_end) in zip(marks, marks[1:]):
        # The CRLF before a delimiter belongs to the delimiter (RFC 2046 §5.1.1).
        end = max(start, nxt - 2)
        part = body[start:end]
        if part.isascii():
            out.append(part)
        else:
            header, pbody = _split(part)
            out.append(_entity(header, pbody, depth + 1, default_type))
        out.append(body[end:nxt_end])
    out.append(body[marks[-1][1]:])
    return b"".join(out)


# ---------------------------------------------------------------------------
# Encodings
# ---------------------------------------------------------------------------

def _encode_leaf(maintype: str, data: bytes) -> tuple[bytes, bytes]:
    """(Content-Transfer-Encoding value, encoded data) for a leaf."""
    if maintype in ("text", "message") and qp_safe(data):
        return b"quoted-printable", quoted_printable(data)
    return b"base64", encode_base64(data, len(data) >= 2 and data.endswith(b"\r\n"))


def qp_safe(data: bytes) -> bool:
    """Can quoted-printable carry *data* as text (its CRLFs as line breaks)?"""
    if b"\0" in data or _BARE.search(data):
        return False
    eight = len(data) - len(data.translate(None, _HIGH))
    return eight * 2 <= len(data)


def quoted_printable(data: bytes) -> bytes:
    """RFC 2045 §6.7 with CRLF line breaks: every CRLF of *data* is a hard
    line break, lines are at most 76 octets; *data* must be qp_safe."""
    if not data:
        return data
    # binascii picks its line ending from the first one in the data: give it a CRLF.
    out = binascii.b2a_qp(data + b"\r\n", quotetabs=False, istext=True, header=False)
    assert out.endswith(b"\r\n")
    return out[:-2]


def encode_base64(data: bytes, final_crlf: bool = True) -> bytes:
    """Base64 in 76-character CRLF lines (the last CRLF only when asked)."""
    out = base64.encodebytes(data).replace(b"\n", b"\r\n")
    return out if final_crlf or not out else out[:-2]


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# ---------------------------------------------------------------------------
# Header fields, raw
# ---------------------------------------------------------------------------

def _fields(header: bytes) -> list[tuple[bytes, int, int]]:
    """(lower-case name, start, end) of each field of a header block (the
    end includes its continuation lines and their CRLFs)."""
    out: list[tuple[bytes, int, int]] = []
    pos = 0
    n = len(header)
    while pos < n:
        nl = header.find(b"\r\n", pos)
        end = n if nl < 0 else nl + 2
        if header[pos:end] in (b"\r\n", b""):
            break
        if header[pos] in (0x20, 0x09) and out:
            name, start, _ = out[-1]
            out[-1] = (name, start, end)
        else:
            m = _FIELD_NAME.match(header, pos)
            out.append((m.group(1).lower() if m else b"", pos, end))
        pos = end
    return out


def _fields_end(header: bytes) -> int:
    fields = _fields(header)
    return fields[-1][2] if fields else 0


def _insert_fields(header: bytes, added: bytes) -> bytes:
    """*added* (whole CRLF-terminated fields) at the end of the header block."""
    at = _fields_end(header)
    head, rest = header[:at], header[at:]
    if head and not head.endswith(b"\r\n"):
        head += b"\r\n"
    if not rest:
        rest = b"\r\n"      # a header block must end with its empty line
    return head + added + rest


def _set_cte(header: bytes, value: bytes) -> bytes:
    """*header* with its Content-Transfer-Encoding field(s) replaced by one
    with *value* (in the place of the first; at the end when there was none)."""
    field = b"Content-Transfer-Encoding: " + value + b"\r\n"
    spans = [(s, e) for name, s, e in _fields(header) if name == b"content-transfer-encoding"]
    if not spans:
        return _insert_fields(header, field)
    out = [header[:spans[0][0]], field]
    for (_s, e), (s2, _e2) in zip(spans, spans[1:] + [(len(header), 0)]):
        out.append(header[e:s2])
    return b"".join(out)


def _relabel(header: bytes, cte: str) -> bytes:
    """A composite entity that said 8bit/binary: its content is 7-bit now."""
    return header if cte == "7bit" or not _has_cte(header) else _set_cte(header, b"7bit")


def _has_cte(header: bytes) -> bool:
    return any(name == b"content-transfer-encoding" for name, _s, _e in _fields(header))
