"""Property tests (hypothesis) for the parsers: RFC 5321 paths, MAIL/RCPT
parameters and xtext, dot-stuffing in the DATA reader, and the header/body
split of a stored message."""
from __future__ import annotations

import re

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from mta import address
from mta import domain as mta_domain
from mta.address import AddressError, Mailbox, parse_path, split_path
from mta.message import split_header_block
from mta.smtp import replies
from mta.smtp.data import (DataReader, has_bare_newline, has_long_line, normalize_newlines,
                           unstuff)
from mta.smtp.params import (MailParams, RcptParams, parse_mail_params, parse_rcpt_params,
                             split_params, xtext_decode, xtext_encode)
from mta.smtp.replies import SMTPReplyError

# Every test here is pure computation; no deadline so a slow CI box does not flake.
fast = settings(deadline=None, max_examples=75)
light = settings(deadline=None, max_examples=40)


# -- strategies for RFC 5321 paths --------------------------------------------------

ATEXT = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+-/=?^_`{|}~"
LETDIG = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
QTEXT = "".join(chr(c) for c in range(0x20, 0x7F) if c not in (0x22, 0x5C))
NON_ASCII = st.characters(min_codepoint=0x80, max_codepoint=0x10FFFF,
                          exclude_categories=("Cs",))


def atoms(utf8: bool):
    ch = st.sampled_from(ATEXT)
    if utf8:
        ch = st.one_of(ch, NON_ASCII)
    return st.text(ch, min_size=1, max_size=12)


def dot_strings(utf8: bool = False):
    return st.lists(atoms(utf8), min_size=1, max_size=4).map(".".join)


def quoted_strings(utf8: bool = False):
    ch = st.sampled_from(QTEXT)
    if utf8:
        ch = st.one_of(ch, NON_ASCII)
    item = st.one_of(ch, st.sampled_from([chr(c) for c in range(0x20, 0x7F)]).map(
        lambda c: "\\" + c))
    return st.lists(item, max_size=15).map(lambda xs: '"' + "".join(xs) + '"')


def local_parts(utf8: bool = False):
    return st.one_of(dot_strings(utf8), quoted_strings(utf8)).filter(
        lambda lp: len(lp.encode("utf-8")) <= address.MAX_LOCAL)


@st.composite
def labels(draw):
    n = draw(st.one_of(st.integers(1, 8), st.integers(1, 63)))
    if n == 1:
        return draw(st.sampled_from(LETDIG))
    mid = draw(st.text(st.sampled_from(LETDIG + "-"), min_size=n - 2, max_size=n - 2))
    return draw(st.sampled_from(LETDIG)) + mid + draw(st.sampled_from(LETDIG))


def domains():
    return st.lists(labels(), min_size=1, max_size=4).map(".".join).filter(
        lambda d: len(d) <= address.MAX_DOMAIN)


def u_label_domains():
    """Domains with U-labels that IDNA 2008 (mta.domain) can encode."""
    ulabel = st.text(st.one_of(st.sampled_from("abcdefghij0123"),
                               st.sampled_from("\u00e4\u00f6\u00fc\u00e9\u00e8\u00e7\u00f1"
                                               "\u4e2d\u6587\u0436\u0434\u03b1\u05d0")),
                     min_size=1, max_size=10)

    def ok(d: str) -> bool:
        try:
            mta_domain.to_ascii(d)
        except mta_domain.DomainError:
            return False
        return not d.isascii()
    return st.lists(ulabel, min_size=1, max_size=3).map(".".join).filter(ok)


def address_literals():
    return st.one_of(
        st.ip_addresses(v=4).map(lambda a: f"[{a}]"),
        st.ip_addresses(v=6).map(lambda a: f"[IPv6:{a}]"),
    )


def mailboxes(utf8: bool = False):
    doms = st.one_of(domains(), address_literals())
    if utf8:
        doms = st.one_of(doms, u_label_domains())
    return st.tuples(local_parts(utf8), doms).filter(
        lambda t: len(f"<{t[0]}@{t[1]}>".encode()) <= address.MAX_PATH + 2 or utf8)


# -- address.py ---------------------------------------------------------------------

@fast
@given(mailboxes())
def test_parse_path_round_trip_ascii(lp_dom):
    local, domain = lp_dom
    mb = parse_path(f"<{local}@{domain}>")
    assert mb == Mailbox(local, domain)
    assert str(mb) == f"{local}@{domain}"
    assert parse_path(f"<{mb}>") == mb
    assert mb.is_ascii
    # Without SMTPUTF8 and with it, an ASCII path parses the same way.
    assert parse_path(f"<{mb}>", utf8=True) == mb


@light
@given(mailboxes(utf8=True))
def test_parse_path_round_trip_utf8(lp_dom):
    local, domain = lp_dom
    mb = parse_path(f"<{local}@{domain}>", utf8=True)
    assert mb == Mailbox(local, domain)
    assert parse_path(f"<{mb}>", utf8=True) == mb
    if not mb.is_ascii:
        with pytest.raises(AddressError):
            parse_path(f"<{mb}>")
    # ascii_domain never fails on a domain the parser accepted.
    assert mb.ascii_domain.isascii()


def short_domains():
    return st.lists(st.text(st.sampled_from(LETDIG), min_size=1, max_size=8),
                    min_size=1, max_size=3).map(".".join)


@light
@given(mailboxes(), st.lists(short_domains(), min_size=1, max_size=3))
def test_source_route_is_dropped(lp_dom, route):
    local, domain = lp_dom
    adl = ",".join("@" + d for d in route)
    path = f"<{adl}:{local}@{domain}>"
    assume(len(path) <= address.MAX_PATH + 2)
    assert parse_path(path) == Mailbox(local, domain)


@fast
@given(mailboxes(), st.text(st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZ=0123456789 "),
                            max_size=40))
def test_split_path_round_trip(lp_dom, params):
    local, domain = lp_dom
    path = f"<{local}@{domain}>"
    params = params.strip(" ")
    text = path + (" " + params if params else "")
    assert split_path(text) == (path, params)
    assert split_path("  " + text) == (path, params)


@light
@given(dot_strings(), domains())
def test_split_path_without_brackets(local, domain):
    assert split_path(f"{local}@{domain} SIZE=1") == (f"<{local}@{domain}>", "SIZE=1")


def test_local_part_text_unquotes():
    assert parse_path('<"a\\"b\\\\c d"@x.example>').local_text == 'a"b\\c d'
    assert parse_path("<a.b@x.example>").local_text == "a.b"


def test_postmaster_and_null():
    assert parse_path("<>", allow_null=True) is None
    with pytest.raises(AddressError):
        parse_path("<>")
    assert parse_path("<postmaster>", allow_postmaster=True) == Mailbox("postmaster", "")
    assert parse_path("<PostMaster>", allow_postmaster=True) == Mailbox("PostMaster", "")
    with pytest.raises(AddressError):
        parse_path("<postmaster>")


@pytest.mark.parametrize("path", [
    "<a@b..c>", "<a@-b.c>", "<a@b-.c>", "<.a@b.c>", "<a.@b.c>", "<a..b@c.d>", "<a@[1.2.3]>",
    "<a@[1.2.3.256]>", "<a@[IPv6:1::2::3]>", "<a@[IPv6:fe80::1%eth0]>", "<a@[x]>",
    "<a@[]>", "<a@b.c", "a@b.c", "<a@b.c>>", "<@b.c>", "<a@>", "<@x:>", "<@:a@b.c>",
    "<a b@c.d>", '<"a"b@c.d>', '<"a\\\u00e9"@c.d>', "<" + "a" * 65 + "@b.c>",
    "<a@" + "b" * 64 + ".c>", "<a@" + ("b" * 60 + ".") * 5 + "c>",
])
def test_invalid_paths(path):
    with pytest.raises(AddressError):
        parse_path(path)
    with pytest.raises(AddressError):
        parse_path(path, utf8=True)


PATHISH = st.text(st.one_of(st.sampled_from('<>@".\\[]:,;-+ %!aZ09~\x00\t\r\n'),
                            st.characters()), max_size=80)


@fast
@given(st.one_of(st.text(max_size=300), PATHISH, PATHISH.map(lambda s: f"<{s}>")),
       st.booleans(), st.booleans(), st.booleans())
@example("<a@\u3002>", True, False, False)
@example("<a@xn--a>", True, False, False)
@example("<a@xn--\u00e4>", True, False, False)
@example("<a@[IPv6:::]>", False, False, False)
@example("<a@[a:" + "\u00e4" + "]>", True, False, False)
@example("<a@" + "\u00e4" * 70 + ".test>", True, False, False)
def test_parse_path_only_raises_address_error(text, utf8, allow_null, allow_postmaster):
    try:
        mb = parse_path(text, utf8=utf8, allow_null=allow_null,
                        allow_postmaster=allow_postmaster)
    except AddressError:
        return
    if mb is None:
        assert text == "<>"
        return
    # What it accepts prints back to something it accepts again.
    if mb.domain:
        assert parse_path(f"<{mb}>", utf8=utf8) == mb
        mb.ascii_domain  # no exception


@fast
@given(st.one_of(st.text(max_size=300), PATHISH))
def test_split_path_only_raises_address_error(text):
    try:
        path, rest = split_path(text)
    except AddressError:
        return
    assert path.startswith("<") and path.endswith(">")
    assert not rest.startswith(" ")


# -- params.py ------------------------------------------------------------------------

PARAMISH = st.text(st.one_of(st.sampled_from("=;+,<> SIZEBODYRETNVIDAUTHOCPMFLS0123456789"
                                             "abcdefxyz-."), st.characters()), max_size=80)


@fast
@given(st.one_of(st.text(max_size=200), PARAMISH), st.booleans())
@example("SIZE=\u00b2", True)
@example("SIZE=\u0661", True)
@example("BODY=8bitm\u0131me", True)
@example("NOTIFY=\u017fuccess", True)
@example("ORCPT=utf-8;\u00e4", True)
def test_params_only_raise_reply_errors(text, esmtp):
    for parse in (parse_mail_params, parse_rcpt_params):
        try:
            result = parse(text, esmtp=esmtp)
        except SMTPReplyError as e:
            assert 500 <= e.reply.code < 600
            assert e.reply.status is not None and e.reply.status.startswith("5.")
        else:
            assert isinstance(result, (MailParams, RcptParams))
            if not esmtp:
                assert result in (MailParams(), RcptParams())


KNOWN_VALUE = st.one_of(
    st.text(st.sampled_from("0123456789"), min_size=1, max_size=22),
    st.sampled_from(["7BIT", "8bitmime", "BINARYMIME", "FULL", "hdrs", "NEVER",
                     "SUCCESS,FAILURE", "delay", "<>", "rfc822;a@b", "utf-8;\u00e9",
                     "x+2B", "+zz", ""]),
    st.text(max_size=20),
)


@light
@given(st.lists(st.tuples(
    st.sampled_from(["SIZE", "BODY", "SMTPUTF8", "RET", "ENVID", "AUTH", "NOTIFY", "ORCPT",
                     "size", "Body", "X-FOO"]),
    st.one_of(st.none(), KNOWN_VALUE)), max_size=5))
def test_structured_params_only_raise_reply_errors(items):
    text = " ".join(k if v is None else f"{k}={v}" for k, v in items)
    for parse in (parse_mail_params, parse_rcpt_params):
        try:
            parse(text, esmtp=True)
        except SMTPReplyError as e:
            assert e.reply.code in (501, 555)


@fast
@given(st.integers(0, 10**20 - 1))
def test_size_param(n):
    assert parse_mail_params(f"SIZE={n}", esmtp=True).size == n


def test_mail_params_values():
    p = parse_mail_params("size=10 body=8bitmime smtputf8 ret=hdrs envid=a+2Bb auth=<>",
                          esmtp=True)
    assert p == MailParams(size=10, body="8BITMIME", smtputf8=True, ret="HDRS",
                           envid="a+2Bb", auth="<>")
    r = parse_rcpt_params("notify=success,delay orcpt=rfc822;a+40b", esmtp=True)
    assert r == RcptParams(notify="SUCCESS,DELAY", orcpt="rfc822;a+40b")
    with pytest.raises(SMTPReplyError) as e:
        parse_mail_params("FOO=1", esmtp=True)
    assert e.value.reply.code == 555
    with pytest.raises(SMTPReplyError) as e:
        parse_mail_params("SIZE=1", esmtp=False)
    assert e.value.reply.code == 555
    assert split_params("") == {}
    assert split_params("A=1  b") == {"A": "1", "B": None}


@fast
@given(st.text(max_size=60))
def test_xtext_round_trip(text):
    enc = xtext_encode(text)
    assert enc.isascii()
    assert xtext_decode(enc) == text
    if text:
        assert re.fullmatch(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})+", enc)


@fast
@given(st.text(min_size=1, max_size=30))
def test_xtext_encoded_envid_and_orcpt_accepted(text):
    enc = xtext_encode(text)
    assume(len(enc) <= 100)
    assert parse_mail_params(f"ENVID={enc}", esmtp=True).envid == enc
    assert parse_mail_params(f"AUTH={enc}", esmtp=True).auth == enc
    assert parse_rcpt_params(f"ORCPT=rfc822;{enc}", esmtp=True).orcpt == f"rfc822;{enc}"


def test_xtext_decode_examples():
    assert xtext_decode("a+2Bb+3Dc") == "a+b=c"
    assert xtext_decode("+C3+A9t+C3+A9") == "\u00e9t\u00e9"
    assert xtext_encode("a+b=c d\u00e9") == "a+2Bb+3Dc+20d+C3+A9"


# -- dot-stuffing and the DATA reader --------------------------------------------------

LINE = st.binary(max_size=120).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
DOT_LINE = st.one_of(LINE, LINE.map(lambda b: b"." + b), LINE.map(lambda b: b".." + b),
                     st.just(b"."), st.just(b""))
CONTENT = st.lists(DOT_LINE, max_size=30).map(lambda ls: b"".join(l + b"\r\n" for l in ls))


def stuff(content: bytes) -> bytes:
    """What a client sends for *content*: every line starting with '.' gets
    another '.'; then the terminator."""
    lines = content.split(b"\r\n")
    assert lines[-1] == b""
    return b"".join((b"." + l if l.startswith(b".") else l) + b"\r\n" for l in lines[:-1]) \
        + b".\r\n"


@st.composite
def pieces(draw, data: bytes):
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    out, prev = [], 0
    for c in cuts + [len(data)]:
        out.append(data[prev:c])
        prev = c
    return out


def feed_all(reader: DataReader, chunks: list[bytes], junk: bytes = b"") -> tuple[int, bytes]:
    """Feed chunks the way the server does (with already-consumed bytes in
    front, passed as *start*); return (index of the chunk that ended DATA,
    the bytes left over after the terminator)."""
    for i, chunk in enumerate(chunks):
        buf = junk + chunk
        end = reader.feed(buf, len(junk))
        if end is not None:
            assert len(junk) <= end <= len(buf)
            return i, buf[end:] + b"".join(chunks[i + 1:])
    raise AssertionError("terminator not found")


@fast
@given(st.data(), CONTENT, st.binary(max_size=40), st.binary(max_size=5))
def test_dot_stuffing_round_trip(data, content, trailing, junk):
    wire = stuff(content) + trailing
    chunks = data.draw(pieces(wire))
    reader = DataReader(max_size=0)
    _, rest = feed_all(reader, chunks, junk)
    assert rest == trailing
    got, err = reader.result(0)
    assert err is None
    assert bytes(got) == content


@light
@given(st.data(), CONTENT.filter(bool))
def test_size_limit_applies_to_unstuffed_content(data, content):
    wire = stuff(content)
    r = DataReader(len(content))
    feed_all(r, data.draw(pieces(wire)))
    got, err = r.result(len(content))
    assert err is None and bytes(got) == content
    r = DataReader(len(content) - 1)
    feed_all(r, data.draw(pieces(wire)))
    got, err = r.result(len(content) - 1)
    assert got is None and err == replies.MSG_TOO_BIG


@light
@given(st.integers(1, 2000), st.sampled_from([7, 100, 4096]))
def test_dot_heavy_message_at_the_size_limit_is_accepted(nlines, piece):
    # ".\r\n" lines: the wire form is 4/3 of the content; that is not "too big".
    content = b".\r\n" * nlines
    wire = stuff(content) + b"NOOP\r\n"
    r = DataReader(len(content))
    _, rest = feed_all(r, [wire[i:i + piece] for i in range(0, len(wire), piece)])
    assert rest == b"NOOP\r\n"
    got, err = r.result(len(content))
    assert err is None and bytes(got) == content


@fast
@given(st.data(), st.binary(max_size=300), st.binary(max_size=20))
@example(None, b"a\n.\nb\r.\rc\r\n.\rd\n.\r\n", b"")
def test_only_crlf_dot_crlf_ends_data(data, text, trailing):
    """On arbitrary bytes, DATA ends exactly after the first <CRLF>.<CRLF>
    (the DATA command's own CRLF counting as the first CRLF)."""
    wire = text + b"\r\n.\r\n" + trailing
    first = (b"\r\n" + wire).find(b"\r\n.\r\n")
    expected_rest = wire[first + 3:]
    chunks = data.draw(pieces(wire)) if data is not None else [wire]
    reader = DataReader(max_size=10**6)
    _, rest = feed_all(reader, chunks)
    assert rest == expected_rest
    content, err = reader.result(10**6)
    body = (b"\r\n" + wire)[:first + 2]
    if has_bare_newline(body) :
        assert content is None and err == replies.BARE_NEWLINE
    elif err is None:
        assert bytes(content) == unstuff(body)


@fast
@given(st.binary(max_size=300))
def test_bare_newline_detection_and_normalizing(data):
    bare = re.search(rb"\r(?!\n)|(?<!\r)\n", data) is not None
    assert has_bare_newline(data) == bare
    norm = normalize_newlines(data)
    assert not has_bare_newline(norm)
    if not bare:
        assert norm == data


@fast
@given(st.lists(st.binary(max_size=1100).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b"")), max_size=4))
def test_long_line_detection(lines):
    content = b"".join(l + b"\r\n" for l in lines)
    assert has_long_line(content) == any(len(l) > 998 for l in lines)


@fast
@given(st.lists(st.binary(max_size=1100).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b"")), min_size=1, max_size=4))
def test_long_line_detection_with_an_unterminated_last_line(lines):
    content = b"\r\n".join(lines)           # as sendmail may be given it
    assert has_long_line(content) == any(len(l) > 998 for l in lines)


def test_long_line_limits():
    for size in (997, 998, 999, 1000):
        line = b"x" * size
        for content in (line + b"\r\n", line, b"a\r\n" + line + b"\r\n", b"a\r\n" + line,
                        (b"y" * 998 + b"\r\n") * 3 + line + b"\r\nz\r\n"):
            assert has_long_line(content) == (size > 998), (size, content[:8])
            assert has_long_line(bytearray(content)) == (size > 998)


def test_unstuff_examples():
    assert unstuff(b"\r\n") == b""
    assert unstuff(b"\r\n..\r\n") == b".\r\n"
    assert unstuff(b"\r\n.a\r\n..b\r\nc.\r\n") == b"a\r\n.b\r\nc.\r\n"


# -- message.split_header_block ------------------------------------------------------

FIELD_NAME = st.text(st.sampled_from([chr(c) for c in range(0x21, 0x7F) if c != 0x3A]),
                     min_size=1, max_size=20)
FIELD_VALUE = st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
EOL = st.sampled_from([b"\r\n", b"\n"])


@st.composite
def header_fields(draw):
    eol = draw(EOL)
    name = draw(FIELD_NAME).encode()
    out = name + draw(st.sampled_from([b":", b": ", b" :", b"\t:"])) + draw(FIELD_VALUE) + eol
    for cont in draw(st.lists(FIELD_VALUE, max_size=2)):
        out += draw(st.sampled_from([b" ", b"\t"])) + cont + eol
    return out


@fast
@given(st.binary(max_size=400))
@example(b"")
@example(b"\r\n")
@example(b" folded first\r\nA: b\r\n")
@example(b"A: b\r\n\r")
def test_split_header_block_any_bytes(content):
    for c in (content, bytearray(content)):
        n = split_header_block(c)
        assert 0 <= n <= len(c)
        assert c[:n] + c[n:] == c
        assert n == 0 or c[n - 1:n] == b"\n"          # at a line boundary


@fast
@given(st.lists(header_fields(), min_size=1, max_size=6), EOL, st.binary(max_size=200))
def test_split_header_block_ends_with_empty_line(fields, eol, body):
    headers = b"".join(fields)
    content = headers + eol + body
    n = split_header_block(content)
    assert n == len(headers) + len(eol)
    assert content[:n].endswith(eol)


@fast
@given(st.lists(header_fields(), max_size=6))
def test_split_header_block_headers_only(fields):
    headers = b"".join(fields)
    assert split_header_block(headers) == len(headers)


@fast
@given(st.lists(header_fields(), max_size=4),
       st.sampled_from([b"not a header\r\n", b" continuation first\r\n",
                        b"From someone\r\n", b"a b: c\r\n", b":x\r\n"]),
       st.binary(max_size=100))
def test_split_header_block_stops_at_non_header(fields, bad, rest):
    headers = b"".join(fields)
    if not headers and bad.startswith(b" "):
        expected = 0
    elif bad.startswith(b" "):
        expected = None            # a continuation line belongs to the field before it
    else:
        expected = len(headers)
    n = split_header_block(headers + bad + rest)
    if expected is not None:
        assert n == expected
    else:
        assert n >= len(headers) + len(bad)
