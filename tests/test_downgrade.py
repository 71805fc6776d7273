"""mta.smtp.downgrade: 8-bit MIME made 7-bit for a next hop without 8BITMIME.

The properties are checked on generated MIME trees (multiparts, digests,
encapsulated messages, leaves of every kind, declared 7bit/8bit or not at
all): the output is 7-bit with lines of at most 998 octets, the stdlib
``email`` parser finds the same tree in it, every leaf decodes to what it
was, and every part without an 8-bit octet (and each preamble and epilogue)
is in the output byte for byte.
"""
from __future__ import annotations

import binascii
import email
import email.policy

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mta.smtp.downgrade import DowngradeError, quoted_printable, to_7bit

SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_ASCII_LINE = st.binary(max_size=90).map(
    lambda b: bytes(c & 0x7F for c in b).replace(b"\r", b"").replace(b"\n", b""))
_ANY_LINE = st.binary(max_size=90).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


@st.composite
def text(draw, eightbit: bool) -> bytes:
    lines = draw(st.lists(_ANY_LINE if eightbit else _ASCII_LINE, max_size=8))
    end = draw(st.sampled_from([b"", b"\r\n"]))
    return b"\r\n".join(lines) + end


@st.composite
def entity(draw, depth: int, default: str = "text/plain",
           fragments: list | None = None) -> tuple[bytes, bytes]:
    """(header block, body) of a MIME entity; *fragments* collects the raw
    bytes that must come out unchanged."""
    kinds = ["leaf"] if depth >= 3 else ["leaf", "leaf", "multipart", "message"]
    kind = draw(st.sampled_from(kinds))
    extra = draw(st.sampled_from([b"", b"X-Note: kept\r\n", b"X-Folded: a\r\n\tb\r\n"]))
    if kind == "multipart":
        sub = draw(st.sampled_from(["mixed", "alternative", "digest"]))
        boundary = b"=_b%d_%d" % (depth, draw(st.integers(0, 999)))
        header = (b"Content-Type: multipart/" + sub.encode() + b"; boundary=\"" + boundary
                  + b"\"\r\n" + extra + b"\r\n")
        inner = "message/rfc822" if sub == "digest" else "text/plain"
        parts = []
        for _ in range(draw(st.integers(1, 3))):
            h, b = draw(entity(depth + 1, inner, fragments))
            part = h + b
            if part.endswith(b"\r\n"):
                part = part[:-2] if draw(st.booleans()) else part
            parts.append(part)
        pre = draw(_ASCII_LINE)
        epi = draw(_ASCII_LINE)
        for p in parts + [pre, epi]:
            assume(b"--" + boundary not in p)
        body = (pre + b"\r\n" + b"".join(b"--" + boundary + b"\r\n" + p + b"\r\n"
                                          for p in parts)
                + b"--" + boundary + b"--\r\n" + epi)
        if fragments is not None:
            fragments += [pre + b"\r\n--" + boundary + b"\r\n", b"\r\n--" + boundary + b"--\r\n"
                          + epi]
        return header, body
    if kind == "message":
        h, b = draw(entity(depth + 1, "text/plain", fragments))
        inner = b"Subject: inner\r\n" + h + b
        header = (b"" if default == "message/rfc822" and draw(st.booleans())
                  else b"Content-Type: message/rfc822\r\n") + extra + b"\r\n"
        return header, inner
    ctype = draw(st.sampled_from([b"text/plain; charset=utf-8", b"text/html",
                                  b"message/delivery-status", b"application/octet-stream",
                                  None]))
    if ctype is None and default == "message/rfc822":
        ctype = b"text/plain"
    eightbit = draw(st.booleans())
    cte = draw(st.sampled_from([None, b"7bit", b"8bit"] if eightbit else [None, b"7bit"]))
    header = b""
    if ctype is not None:
        header += b"Content-Type: " + ctype + b"\r\n"
    if cte is not None:
        header += b"Content-Transfer-Encoding: " + cte + b"\r\n"
    header += extra + b"\r\n"
    body = draw(text(eightbit))
    if fragments is not None and body.isascii():
        fragments.append(header + body)
    return header, body


@st.composite
def messages(draw) -> tuple[bytes, list[bytes]]:
    fragments: list[bytes] = []
    top = b"From: a@example.test\r\nSubject: test\r\n"
    if draw(st.booleans()):
        body = draw(text(True))
        return top + b"\r\n" + body, []
    h, b = draw(entity(0, "text/plain", fragments))
    return top + b"MIME-Version: 1.0\r\n" + h + b, fragments


def _parse(data: bytes):
    # The stdlib parses the body of every message/* type as a message; a
    # message/delivery-status leaf is renamed here so it is read as a leaf.
    data = data.replace(b"message/delivery-status", b"application/x-dsn-leaf")
    return email.message_from_bytes(data, policy=email.policy.compat32)


def _leaves(msg) -> list:
    return [p for p in msg.walk() if not p.is_multipart()]


def _decoded(part) -> bytes:
    data = part.get_payload(decode=True)
    # Quoted-printable decodes its hard line breaks as LF.
    return data.replace(b"\r\n", b"\n")


@SETTINGS
@given(messages())
def test_converted_message_is_7bit_same_tree_same_content(case):
    original, fragments = case
    out = to_7bit(original)
    assert out.isascii()
    assert max(len(line) for line in out.split(b"\r\n")) <= 998
    if original.isascii():
        assert out == original
    before, after = _parse(original), _parse(out)
    assert [p.get_content_type() for p in before.walk()] == \
        [p.get_content_type() for p in after.walk()]
    for a, b in zip(_leaves(before), _leaves(after)):
        assert _decoded(a) == _decoded(b)
        if not _decoded(a).isascii():
            assert b["Content-Transfer-Encoding"] in ("quoted-printable", "base64")
    for fragment in fragments:
        assert fragment in out


@SETTINGS
@given(st.binary(max_size=300).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
       st.lists(st.binary(max_size=120).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
                max_size=5))
def test_quoted_printable_round_trip(first, rest):
    data = b"\r\n".join([first] + rest)
    out = quoted_printable(data)
    assert out.isascii()
    assert all(len(line) <= 76 for line in out.split(b"\r\n"))
    assert binascii.a2b_qp(out) == data


def test_plain_message_becomes_text_plain():
    out = to_7bit(b"Subject: x\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n")
    assert out == (b"Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8"
                   b"\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nGr=C3=BC=C3=9Fe\r\n")
    assert b"charset=unknown-8bit" in to_7bit(b"Subject: x\r\n\r\n\xe9t\xe9\r\n")


def test_nul_and_8bit_heavy_text_go_base64():
    for body in (b"a\x00\xe9\r\n", "Привет\r\n".encode()):
        out = to_7bit(b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n"
                      b"Content-Transfer-Encoding: 8bit\r\n\r\n" + body)
        assert b"Content-Transfer-Encoding: base64\r\n" in out
        assert b"8bit" not in out


def test_only_the_transfer_encoding_field_changes():
    header = (b"Content-Type: text/plain;\r\n charset=utf-8\r\nX-A: 1\r\n"
              b"Content-transfer-encoding:\r\n 8bit\r\nX-B: 2\r\n\r\n")
    out = to_7bit(b"MIME-Version: 1.0\r\n" + header + b"\xc3\xa9\r\n")
    assert out == (b"MIME-Version: 1.0\r\nContent-Type: text/plain;\r\n charset=utf-8\r\n"
                   b"X-A: 1\r\nContent-Transfer-Encoding: quoted-printable\r\nX-B: 2\r\n\r\n"
                   b"=C3=A9\r\n")


@pytest.mark.parametrize("content, why", [
    (b"Subject: \xc3\xa9\r\n\r\n\xe9\r\n", "8-bit octets in a header field"),
    (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
     b"--b\r\nX-A: \xe9\r\n\r\nx\r\n--b--\r\n", "8-bit octets in a header field"),
    (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed\r\n\r\n\xe9\r\n",
     "without a boundary parameter"),
    (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
     b"--b\r\n\r\n\xe9\r\n", "without its close delimiter"),
    (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
     b"\xe9\r\n--b\r\n\r\nx\r\n--b--\r\n", "preamble"),
    (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
     b"--b\r\n\r\nx\r\n--b--\r\n\xe9\r\n", "epilogue"),
    (b"MIME-Version: 1.0\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n\xe9\r\n",
     "declared quoted-printable"),
    (b"MIME-Version: 1.0\r\nContent-Type: message/rfc822\r\n\r\nSubject: \xe9\r\n\r\nx\r\n",
     "8-bit octets in a header field"),
])
def test_what_cannot_be_converted(content, why):
    with pytest.raises(DowngradeError, match=why):
        to_7bit(content)


def test_deep_nesting_is_refused_not_recursed_without_end():
    content = b"x\xe9\r\n"
    for _ in range(60):
        content = b"Content-Type: message/rfc822\r\n\r\nSubject: s\r\n" + content
    with pytest.raises(DowngradeError, match="nested deeper"):
        to_7bit(b"MIME-Version: 1.0\r\n" + content)
