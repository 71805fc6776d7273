"""mta.dsn: RFC 3464 / RFC 6533 delivery status notifications, parsed back
with the stdlib email package and checked field by field."""
from __future__ import annotations

import email
import email.policy
import re
from email.message import EmailMessage
from email.utils import parsedate_to_datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mta.dsn import (
    SUBJECT_DELAYED,
    SUBJECT_FAILED,
    SUBJECT_SUCCESS,
    DSNRecipient,
    OriginalMessage,
    _address_field,
    _orcpt_field,
    build_dsn,
    needs_smtputf8,
)

ARRIVAL = 1_700_000_000.0
NOW = ARRIVAL + 3600
HEADERS = (b"Received: from client.example.org ([192.0.2.1])\r\n"
           b"\tby mx.test (mta) with ESMTP id Q123;\r\n"
           b"\tTue, 14 Nov 2023 22:13:20 +0000\r\n"
           b"From: Alice <alice@example.org>\r\n"
           b"To: bob@example.net\r\n"
           b"Subject: the original\r\n"
           b"Message-ID: <orig.1@example.org>\r\n"
           b"\r\n")
BODY = b"Hello Bob,\r\n\r\n.leading dot and trailing space \r\nbye\r\n"


def original(**kw) -> OriginalMessage:
    args = dict(queue_id="Q123", sender="alice@example.org", headers=HEADERS, body=BODY,
                arrival=ARRIVAL)
    args.update(kw)
    return OriginalMessage(**args)


FAILED = DSNRecipient(
    final_recipient="bob@example.net", action="failed", status="5.1.1",
    original_recipient="rfc822;Bob+2Bdsn@example.net", remote_mta="mx.example.net",
    diagnostic_code="550 5.1.1 <bob@example.net>: no such user",
    last_attempt=ARRIVAL + 60)
DELAYED = DSNRecipient(
    final_recipient="carol@example.com", action="delayed", status="4.4.1",
    remote_mta="mx.example.com", diagnostic_code="421 4.4.1 connection timed out",
    last_attempt=ARRIVAL + 1800, will_retry_until=ARRIVAL + 5 * 86400)
DELIVERED = DSNRecipient(
    final_recipient="dave@example.com", action="delivered", status="2.0.0",
    remote_mta="mx.example.com", diagnostic_code="250 2.0.0 Ok: queued as XYZ",
    last_attempt=ARRIVAL + 5)
RELAYED = DSNRecipient(
    final_recipient="erin@example.com", action="relayed", status="2.0.0",
    remote_mta="mx.example.com", diagnostic_code="250 ok", last_attempt=ARRIVAL + 5)


def build(orig=None, rcpts=(FAILED,), **kw) -> bytes:
    kw.setdefault("reporting_mta", "mx.test")
    kw.setdefault("now", NOW)
    return build_dsn(orig or original(), list(rcpts), **kw)


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert not msg.defects
    return msg


def assert_wire_clean(data: bytes) -> None:
    """Every line ends with CRLF and is at most 998 octets before it."""
    assert data.endswith(b"\r\n")
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", data) is None, "bare CR or LF"
    for line in data.split(b"\r\n"):
        assert len(line) <= 998, line[:80]


def raw_parts(data: bytes) -> list[tuple[bytes, bytes]]:
    """(part header block, part content) of the top-level parts, from the
    raw bytes: the content is exact, as a MIME parser delimits it."""
    boundary = parse(data).get_boundary().encode()
    pieces = data.split(b"\r\n--" + boundary)
    assert pieces[-1] == b"--\r\n"
    out = []
    for piece in pieces[1:-1]:
        assert piece.startswith(b"\r\n")
        head, sep, content = piece[2:].partition(b"\r\n\r\n")
        assert sep
        out.append((head + b"\r\n", content))
    return out


def status_blocks(data: bytes) -> list[dict[str, str]]:
    """The delivery-status part's field blocks (works for the global type
    too, which the email package does not split into blocks)."""
    content = raw_parts(data)[1][1].decode("utf-8")
    assert content.endswith("\r\n")
    blocks = []
    for block in content.rstrip("\r\n").split("\r\n\r\n"):
        unfolded = re.sub(r"\r\n(?=[ \t])", "", block)
        fields: dict[str, str] = {}
        for line in unfolded.split("\r\n"):
            name, colon, value = line.partition(":")
            assert colon and name not in fields, line
            fields[name] = value.strip()
        blocks.append(fields)
    return blocks


def parts(msg: EmailMessage) -> list[EmailMessage]:
    return list(msg.iter_parts())


def date_of(value: str) -> float:
    return parsedate_to_datetime(value).timestamp()


# ---------------------------------------------------------------------------
# Structure and top-level header

def test_structure_and_top_level_header():
    data = build()
    assert_wire_clean(data)
    msg = parse(data)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in parts(msg)] == [
        "text/plain", "message/delivery-status", "message/rfc822"]
    assert str(msg["From"]) == "Mail Delivery System <MAILER-DAEMON@mx.test>"
    assert msg["From"].addresses[0].addr_spec == "MAILER-DAEMON@mx.test"
    assert msg["To"].addresses[0].addr_spec == "alice@example.org"
    assert str(msg["Subject"]) == SUBJECT_FAILED
    assert date_of(str(msg["Date"])) == NOW
    assert re.fullmatch(r"<[^<>@\s]+@mx\.test>", str(msg["Message-ID"]))
    assert str(msg["Auto-Submitted"]) == "auto-replied"
    assert str(msg["MIME-Version"]) == "1.0"
    assert needs_smtputf8(original(), [FAILED]) is False
    assert data.isascii()  # nothing 8-bit in this one: 7bit throughout
    assert msg["Content-Transfer-Encoding"] is None


def test_message_ids_and_boundaries_differ():
    a, b = parse(build()), parse(build())
    assert a["Message-ID"] != b["Message-ID"]
    assert a.get_boundary() != b.get_boundary()


def test_human_part_explains_each_recipient():
    msg = parse(build(rcpts=[FAILED, DELAYED]))
    text = parts(msg)[0]
    assert text.get_content_charset() == "us-ascii"
    body = text.get_content()
    assert "could not be delivered" in body
    assert "<bob@example.net>" in body
    assert "550 5.1.1 <bob@example.net>: no such user" in body
    assert "<carol@example.com>" in body
    assert "421 4.4.1 connection timed out" in body
    assert "postmaster@mx.test" in body
    assert "Q123" in body


def test_postmaster_contact_is_configurable():
    msg = parse(build(postmaster="hostmaster@example.test"))
    assert "<hostmaster@example.test>" in parts(msg)[0].get_content()


# ---------------------------------------------------------------------------
# The delivery-status part

def test_per_message_fields():
    data = build(original(envid="QQ+2B314+3Dx"))
    msg = parse(data)
    blocks = parts(msg)[1].get_payload()  # the email package's own view
    assert len(blocks) == 2
    per_msg = blocks[0]
    assert str(per_msg["Reporting-MTA"]) == "dns;mx.test"
    assert str(per_msg["Original-Envelope-Id"]) == "QQ+314=x"  # xtext decoded
    assert date_of(str(per_msg["Arrival-Date"])) == ARRIVAL
    # Same thing from the raw bytes.
    assert status_blocks(data)[0]["Original-Envelope-Id"] == "QQ+314=x"


def test_no_envelope_id_field_without_envid():
    assert "Original-Envelope-Id" not in status_blocks(build())[0]


def test_failed_recipient_fields():
    msg = parse(build())
    rcpt = parts(msg)[1].get_payload()[1]
    assert str(rcpt["Original-Recipient"]) == "rfc822;Bob+dsn@example.net"
    assert str(rcpt["Final-Recipient"]) == "rfc822;bob@example.net"
    assert str(rcpt["Action"]) == "failed"
    assert str(rcpt["Status"]) == "5.1.1"
    assert str(rcpt["Remote-MTA"]) == "dns;mx.example.net"
    assert str(rcpt["Diagnostic-Code"]) == "smtp;550 5.1.1 <bob@example.net>: no such user"
    assert date_of(str(rcpt["Last-Attempt-Date"])) == ARRIVAL + 60
    assert rcpt["Will-Retry-Until"] is None


def test_optional_recipient_fields_are_omitted():
    bare = DSNRecipient(final_recipient="bob@example.net", action="failed", status="5.4.4")
    block = status_blocks(build(rcpts=[bare]))[1]
    assert block == {"Final-Recipient": "rfc822;bob@example.net", "Action": "failed",
                     "Status": "5.4.4"}


def test_delayed_notice():
    data = build(rcpts=[DELAYED])
    assert_wire_clean(data)
    msg = parse(data)
    assert str(msg["Subject"]) == SUBJECT_DELAYED
    assert "not yet been delivered" in parts(msg)[0].get_content()
    rcpt = parts(msg)[1].get_payload()[1]
    assert str(rcpt["Action"]) == "delayed"
    assert str(rcpt["Status"]) == "4.4.1"
    assert str(rcpt["Diagnostic-Code"]) == "smtp;421 4.4.1 connection timed out"
    assert date_of(str(rcpt["Last-Attempt-Date"])) == ARRIVAL + 1800
    assert date_of(str(rcpt["Will-Retry-Until"])) == ARRIVAL + 5 * 86400
    # Headers only by default for a delay notice.
    assert parts(msg)[2].get_content_type() == "text/rfc822-headers"


def test_will_retry_until_only_for_delayed():
    odd = DSNRecipient(final_recipient="bob@example.net", action="failed", status="5.4.7",
                       will_retry_until=NOW)
    assert "Will-Retry-Until" not in status_blocks(build(rcpts=[odd]))[1]


@pytest.mark.parametrize("rcpt", [DELIVERED, RELAYED])
def test_success_notice(rcpt):
    data = build(rcpts=[rcpt])
    msg = parse(data)
    assert str(msg["Subject"]) == SUBJECT_SUCCESS
    block = parts(msg)[1].get_payload()[1]
    assert str(block["Action"]) == rcpt.action
    assert str(block["Status"]) == "2.0.0"
    assert str(block["Final-Recipient"]) == f"rfc822;{rcpt.final_recipient}"
    assert parts(msg)[2].get_content_type() == "text/rfc822-headers"


def test_several_recipients_share_one_dsn():
    other = DSNRecipient(final_recipient="zed@example.net", action="failed", status="5.2.2",
                         remote_mta="mx.example.net",
                         diagnostic_code="552 5.2.2 mailbox full")
    data = build(rcpts=[FAILED, DELAYED, other, DELIVERED])
    assert_wire_clean(data)
    msg = parse(data)
    assert str(msg["Subject"]) == SUBJECT_FAILED  # the gravest action wins
    blocks = parts(msg)[1].get_payload()
    assert len(blocks) == 5
    assert [str(b["Final-Recipient"]) for b in blocks[1:]] == [
        "rfc822;bob@example.net", "rfc822;carol@example.com",
        "rfc822;zed@example.net", "rfc822;dave@example.com"]
    assert [str(b["Action"]) for b in blocks[1:]] == ["failed", "delayed", "failed", "delivered"]
    assert [str(b["Status"]) for b in blocks[1:]] == ["5.1.1", "4.4.1", "5.2.2", "2.0.0"]
    assert status_blocks(data)[1:] == [
        {k: str(v) for k, v in b.items()} for b in blocks[1:]]
    text = parts(msg)[0].get_content()
    for addr in ("bob@example.net", "carol@example.com", "zed@example.net", "dave@example.com"):
        assert f"<{addr}>" in text
    assert "552 5.2.2 mailbox full" in text
    # A failure present: the full original comes back.
    assert parts(msg)[2].get_content_type() == "message/rfc822"


def test_delayed_and_delivered_together_is_a_delay_notice():
    msg = parse(build(rcpts=[DELIVERED, DELAYED]))
    assert str(msg["Subject"]) == SUBJECT_DELAYED


def test_multiline_reply_becomes_one_diagnostic():
    rcpt = DSNRecipient(final_recipient="bob@example.net", action="failed", status="5.7.1",
                        diagnostic_code="550-5.7.1 Message rejected\r\n"
                                        "550-5.7.1 see https://example.net/why\r\n"
                                        "550 5.7.1 go away")
    block = status_blocks(build(rcpts=[rcpt]))[1]
    assert block["Diagnostic-Code"] == (
        "smtp;550 5.7.1 Message rejected see https://example.net/why go away")


def test_long_diagnostic_is_folded():
    words = " ".join(f"word{i}" for i in range(400))
    blob = "x" * 3000
    rcpt = DSNRecipient(final_recipient="bob@example.net", action="failed", status="5.0.0",
                        remote_mta="mx.example.net",
                        diagnostic_code=f"554 5.0.0 {words} {blob}")
    data = build(rcpts=[rcpt])
    assert_wire_clean(data)
    diag = str(parts(parse(data))[1].get_payload()[1]["Diagnostic-Code"])
    assert diag.startswith(f"smtp;554 5.0.0 {words} xxxx")
    # Folding at white space is lossless; the unbreakable run needed extra breaks.
    assert diag.replace(" ", "").count("x") == 3000
    # Folded, not one long line: the delivery-status lines stay short where possible.
    status = raw_parts(data)[1][1]
    assert max(len(line) for line in status.split(b"\r\n") if b"word" in line) <= 78


def test_hostile_text_cannot_inject_fields():
    rcpt = DSNRecipient(final_recipient="bob@example.net", action="failed", status="5.0.0",
                        remote_mta="mx.example.net\r\nAction: delivered",
                        diagnostic_code="550 nope\r\nStatus: 2.0.0\r\n\r\nFinal-Recipient: x")
    data = build(original(envid="a+0D+0AReporting-MTA:+20evil"), rcpts=[rcpt])
    assert_wire_clean(data)
    blocks = status_blocks(data)
    assert len(blocks) == 2
    assert blocks[0]["Reporting-MTA"] == "dns;mx.test"
    assert blocks[1]["Action"] == "failed"
    assert blocks[1]["Status"] == "5.0.0"
    assert blocks[1]["Final-Recipient"] == "rfc822;bob@example.net"


def test_non_ascii_reply_text_in_an_ascii_report():
    rcpt = DSNRecipient(final_recipient="bob@example.net", action="failed", status="5.1.1",
                        diagnostic_code="550 5.1.1 utilisateur inconnu: bébé")
    data = build(rcpts=[rcpt])
    assert data.isascii()
    assert status_blocks(data)[1]["Diagnostic-Code"] == "smtp;550 5.1.1 utilisateur inconnu: b?b?"


# ---------------------------------------------------------------------------
# The returned original

def test_full_return_is_byte_exact():
    data = build()
    msg = parse(data)
    head, content = raw_parts(data)[2]
    assert content == HEADERS + BODY
    assert b"Content-Type: message/rfc822\r\n" in head
    inner = parts(msg)[2].get_payload(0)
    assert str(inner["Subject"]) == "the original"
    assert str(inner["Message-ID"]) == "<orig.1@example.org>"


def test_ret_hdrs_returns_headers_only():
    for ret in ("HDRS", "hdrs"):
        data = build(original(ret=ret))
        msg = parse(data)
        part = parts(msg)[2]
        assert part.get_content_type() == "text/rfc822-headers"
        head, content = raw_parts(data)[2]
        assert content == HEADERS[:-2]  # the header fields, without the empty line
        assert b"Hello Bob" not in data
        assert "header of the original" in parts(msg)[0].get_content()


def test_ret_full_returns_the_message_with_a_delay_notice():
    data = build(original(ret="FULL"), rcpts=[DELAYED])
    assert parts(parse(data))[2].get_content_type() == "message/rfc822"
    assert raw_parts(data)[2][1] == HEADERS + BODY


def test_eight_bit_original():
    body = "Grüße aus Köln\r\n".encode("utf-8") + b"\xff\xfe raw latin1 \xe9\r\n"
    data = build(original(body=body))
    assert_wire_clean(data)
    msg = parse(data)
    assert str(msg["Content-Transfer-Encoding"]) == "8bit"
    part = parts(msg)[2]
    assert part.get_content_type() == "message/rfc822"
    assert str(part["Content-Transfer-Encoding"]) == "8bit"
    assert raw_parts(data)[2][1] == HEADERS + body
    # The other parts stay 7bit ASCII.
    assert raw_parts(data)[0][1].isascii() and raw_parts(data)[1][1].isascii()


def test_oversized_original_returns_headers_only():
    body = b"x" * 100 + b"\r\n"
    data = build(original(body=body * 100), max_original_size=len(HEADERS) + 1000)
    msg = parse(data)
    assert parts(msg)[2].get_content_type() == "text/rfc822-headers"
    assert raw_parts(data)[2][1] == HEADERS[:-2]
    assert "too large" in parts(msg)[0].get_content()
    # Exactly at the limit it still fits.
    data = build(original(), max_original_size=len(HEADERS) + len(BODY))
    assert parts(parse(data))[2].get_content_type() == "message/rfc822"


@pytest.mark.parametrize("body", [
    b"bare LF\nin the body\r\n",
    b"bare CR\rin the body\r\n",
    b"y" * 1500 + b"\r\n",
    b"NUL\x00\r\n",
])
def test_original_that_is_not_mime_clean_returns_headers_only(body):
    data = build(original(body=body))
    assert_wire_clean(data)
    assert parts(parse(data))[2].get_content_type() == "text/rfc822-headers"


def test_headers_only_part_is_made_clean():
    headers = b"Subject: " + b"z" * 2000 + b"\r\nX-Bare: lf\nTo: bob@example.net\r\n\r\n"
    data = build(original(headers=headers, ret="HDRS"))
    assert_wire_clean(data)
    content = raw_parts(data)[2][1]
    assert b"X-Bare: lf\r\nTo: bob@example.net\r\n" in content


def test_message_without_body_separator():
    data = build(original(headers=b"Subject: no body\r\n", body=b""))
    assert_wire_clean(data)
    assert raw_parts(data)[2][1] == b"Subject: no body\r\n"


def test_boundary_lookalikes_in_the_original_are_harmless():
    body = b"--=_dsn_0000\r\n--=_dsn_0000--\r\n"
    data = build(original(body=body))
    assert raw_parts(data)[2][1] == HEADERS + body
    assert len(parts(parse(data))) == 3


# ---------------------------------------------------------------------------
# Internationalised addresses (RFC 6533)

UTF8_HEADERS = "From: Jösé <jösé@exämple.org>\r\nSubject: héllo\r\n\r\n".encode("utf-8")


def test_non_ascii_addresses_give_a_global_report():
    orig = original(sender="jösé@exämple.org", headers=UTF8_HEADERS,
                    body="¡hola!\r\n".encode("utf-8"), smtputf8=True)
    rcpts = [
        DSNRecipient(final_recipient="müller@bücher.de", action="failed", status="5.1.1",
                     original_recipient="utf-8;m\\x{FC}ller@b\\x{FC}cher.de",
                     remote_mta="mx.bücher.de",
                     diagnostic_code="550 5.1.1 Benutzer unbekannt: müller"),
        DSNRecipient(final_recipient="bob@example.net", action="failed", status="5.1.1",
                     original_recipient="rfc822;bob@example.net"),
    ]
    assert needs_smtputf8(orig, rcpts) is True
    data = build(orig, rcpts)
    assert_wire_clean(data)
    msg = parse(data)
    # RFC 6532 header: raw UTF-8 (the email package's address objects keep
    # surrogate escapes, so compare the field text and the raw bytes).
    assert str(msg["To"]) == "jösé@exämple.org"
    assert "\r\nTo: <jösé@exämple.org>\r\n".encode() in data
    assert [p.get_content_type() for p in parts(msg)] == [
        "text/plain", "message/global-delivery-status", "message/global"]
    assert parts(msg)[0].get_content_charset() == "utf-8"
    assert "<müller@bücher.de>" in parts(msg)[0].get_content()
    blocks = status_blocks(data)
    assert blocks[0]["Reporting-MTA"] == "dns;mx.test"
    assert blocks[1]["Final-Recipient"] == "utf-8;müller@bücher.de"
    assert blocks[1]["Original-Recipient"] == "utf-8;müller@bücher.de"
    assert blocks[1]["Remote-MTA"] == "dns;mx.xn--bcher-kva.de"
    assert blocks[1]["Diagnostic-Code"] == "smtp;550 5.1.1 Benutzer unbekannt: müller"
    assert blocks[2]["Final-Recipient"] == "rfc822;bob@example.net"
    assert blocks[2]["Original-Recipient"] == "rfc822;bob@example.net"
    assert raw_parts(data)[2][1] == orig.headers + orig.body


def test_global_headers_only():
    orig = original(sender="jösé@exämple.org", headers=UTF8_HEADERS, smtputf8=True,
                    ret="HDRS")
    data = build(orig)
    assert parts(parse(data))[2].get_content_type() == "message/global-headers"
    assert raw_parts(data)[2][1] == UTF8_HEADERS[:-2]


def test_smtputf8_original_with_ascii_content_stays_classic():
    orig = original(smtputf8=True)
    assert needs_smtputf8(orig, [FAILED]) is False
    msg = parse(build(orig))
    assert parts(msg)[1].get_content_type() == "message/delivery-status"


def test_orcpt_raw_utf8_and_xtext_forms_decode():
    rcpts = [DSNRecipient(final_recipient="ü@example.de", action="failed", status="5.1.1",
                          original_recipient="utf-8;ü@example.de"),
             DSNRecipient(final_recipient="ü@example.de", action="failed", status="5.1.1",
                          original_recipient="rfc822;+C3+BC@example.de"),
             DSNRecipient(final_recipient="a+b@example.de", action="failed", status="5.1.1",
                          original_recipient="utf-8;a\\x{2B}b@example.de")]
    blocks = status_blocks(build(rcpts=rcpts))
    assert blocks[1]["Original-Recipient"] == "utf-8;ü@example.de"
    assert blocks[2]["Original-Recipient"] == "utf-8;ü@example.de"
    assert blocks[3]["Original-Recipient"] == "rfc822;a+b@example.de"


def test_address_forms():
    assert _address_field("<bob@example.net>", utf8=False) == "rfc822;bob@example.net"
    assert _address_field("bob@example.net", utf8=False) == "rfc822;bob@example.net"
    assert _address_field("bob@example.net", utf8=True) == "rfc822;bob@example.net"
    assert _address_field("jö+x@b.de", utf8=True) == "utf-8;jö\\x{2B}x@b.de"
    # In an ASCII report: utf-8-addr-xtext.
    assert _address_field("jö+x@b.de", utf8=False) == "utf-8;j\\x{F6}\\x{2B}x@b.de"
    assert _orcpt_field("x400;+2FC=DE", utf8=False) == "x400;/C=DE"


# ---------------------------------------------------------------------------
# Refusals

def test_refuses_null_sender_and_bad_input():
    with pytest.raises(ValueError):
        build(original(sender=""))
    with pytest.raises(ValueError):
        build(original(sender="<>"))
    with pytest.raises(ValueError):
        build(rcpts=[])
    with pytest.raises(ValueError):
        build(rcpts=[DSNRecipient("bob@example.net", "bounced", "5.1.1")])
    with pytest.raises(ValueError):
        build(rcpts=[DSNRecipient("bob@example.net", "failed", "550")])


# ---------------------------------------------------------------------------
# Whatever goes in, the result is well-formed

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=1200)


@settings(max_examples=150, deadline=None)
@given(diag=_text, envid=st.one_of(st.none(), _text), local=st.text(
    st.characters(blacklist_categories=("Cs", "Cc", "Zs")), min_size=1, max_size=64),
       remote=st.one_of(st.none(), _text), sender_utf8=st.booleans(),
       action=st.sampled_from(["failed", "delayed", "delivered", "relayed", "expanded"]))
def test_always_well_formed(diag, envid, local, remote, sender_utf8, action):
    sender = "jösé@exämple.org" if sender_utf8 else "alice@example.org"
    rcpt = DSNRecipient(final_recipient=f"{local}@example.net", action=action,
                        status="5.0.0" if action == "failed" else "2.0.0",
                        original_recipient=f"rfc822;{local}", remote_mta=remote,
                        diagnostic_code=diag, last_attempt=NOW, will_retry_until=NOW)
    data = build(original(sender=sender, envid=envid), [rcpt])
    assert_wire_clean(data)
    msg = parse(data)
    assert msg.get_param("report-type") == "delivery-status"
    assert len(parts(msg)) == 3
    blocks = status_blocks(data)
    assert len(blocks) == 2
    assert blocks[1]["Action"] == action
    assert blocks[0]["Reporting-MTA"] == "dns;mx.test"


def test_large_original_with_maximal_lines():
    # Lines of exactly 998 octets are legal; ~9 MB of them must be handled in
    # linear time and returned byte-exact.
    body = (b"m" * 998 + b"\r\n") * 9000
    data = build(original(body=body))
    assert raw_parts(data)[2][1] == HEADERS + body


# ---------------------------------------------------------------------------
# Who said it (RFC 3464 §2.3.5, §2.3.6): a remote MTA's reply, or our own reason

OURS = DSNRecipient(
    final_recipient="carol@example.com", action="failed", status="5.6.7",
    reason="SMTPUTF8 is required, but was not offered by host mx.example.com[192.0.2.7]:25",
    last_attempt=ARRIVAL + 60)


def test_own_reason_is_not_reported_as_a_remote_reply():
    data = build(rcpts=[FAILED, OURS])
    assert_wire_clean(data)
    msg = parse(data)
    blocks = status_blocks(data)
    remote, ours = blocks[1], blocks[2]
    # The remote's reply: Remote-MTA and an smtp diagnostic.
    assert remote["Remote-MTA"] == "dns;mx.example.net"
    assert remote["Diagnostic-Code"] == "smtp;550 5.1.1 <bob@example.net>: no such user"
    # Our decision: no Remote-MTA, a diagnostic typed as ours (like X-Postfix).
    assert "Remote-MTA" not in ours
    assert ours["Diagnostic-Code"] == ("X-mta;SMTPUTF8 is required, but was not offered by "
                                       "host mx.example.com[192.0.2.7]:25")
    assert ours["Status"] == "5.6.7"
    # The stdlib parser agrees.
    stdlib = parts(msg)[1].get_payload()
    assert stdlib[2]["Remote-MTA"] is None
    assert str(stdlib[2]["Diagnostic-Code"]).startswith("X-mta;")
    text = " ".join(parts(msg)[0].get_content().split())
    assert text.count(" said: ") == 1
    assert "mx.example.net said: 550 5.1.1 <bob@example.net>: no such user" in text
    assert ("Reason given by mx.test: SMTPUTF8 is required, but was not offered by host "
            "mx.example.com[192.0.2.7]:25") in text
    assert "remote host mx.example.com" not in text


def test_own_reason_in_a_delay_report_and_a_global_report():
    delayed = DSNRecipient(final_recipient="dave@example.com", action="delayed", status="4.4.1",
                           reason="connect to mx.example.com[192.0.2.7]:25: Connection refused",
                           last_attempt=ARRIVAL + 60, will_retry_until=ARRIVAL + 86400)
    data = build(rcpts=[delayed])
    [_, block] = status_blocks(data)
    assert "Remote-MTA" not in block
    assert block["Diagnostic-Code"] == ("X-mta;connect to mx.example.com[192.0.2.7]:25: "
                                        "Connection refused")
    utf8 = DSNRecipient(final_recipient="jörg@example.de", action="failed", status="5.3.4",
                        reason="Message too big for next hop")
    data = build(rcpts=[utf8])
    assert_wire_clean(data)
    [_, block] = status_blocks(data)
    assert "Remote-MTA" not in block
    assert block["Diagnostic-Code"] == "X-mta;Message too big for next hop"
