"""Protocol unit tests for the inbound ESMTP server: no sockets.

The server is driven through Twisted's ``StringTransport`` with a
``MemoryReactorClock`` as its reactor, a fake spool whose ``store()``
returns a Deferred the test fires (or fails) when it chooses, and the real
relay policy.  Replies are checked code for code, enhanced code included.
"""
from __future__ import annotations

import re

import pytest
from hypothesis import given, settings as hsettings
from hypothesis import strategies as st
from smtpwire import HOST, INSIDE, OUTSIDE, Client, FakeSpool, RaisingSpool, code, codes, make_factory


# -- greeting, HELO, EHLO ---------------------------------------------------------

def test_greeting():
    c = Client()
    assert c.greeting == [f"220 {HOST} ESMTP mta"]


def test_helo_and_ehlo_need_an_argument():
    c = Client()
    assert code(c.cmd("HELO")) == "501"
    assert code(c.cmd("HELO ")) == "501"
    assert code(c.cmd("EHLO")) == "501"
    # Still no HELO: MAIL is out of sequence.
    assert code(c.cmd("MAIL FROM:<a@example.org>")) == "503"


def test_ehlo_keywords():
    c = Client()
    [rep] = c.ehlo("client.example.org")
    lines = rep.split("\n")
    assert all(line.startswith("250-") for line in lines[:-1])
    assert lines[-1].startswith("250 ")
    assert lines[0] == f"250-{HOST} greets client.example.org"
    kws = {line[4:] for line in lines[1:]}
    for kw in ("PIPELINING", "SIZE 36700160", "8BITMIME", "ENHANCEDSTATUSCODES",
               "SMTPUTF8", "DSN", "CHUNKING"):
        assert kw in kws, kw


def test_ehlo_advertises_configured_size():
    c = Client(max_message_size=12345)
    [rep] = c.ehlo()
    assert "250-SIZE 12345" in rep.split("\n")


def test_unlimited_size():
    c = Client(max_message_size=0)
    [rep] = c.ehlo()
    assert "250-SIZE" in rep.split("\n")
    assert code(c.cmd("MAIL FROM:<a@example.org> SIZE=99999999999999")) == "250 2.1.0"


def test_enhanced_codes_only_after_ehlo():
    c = Client()
    assert c.cmd("HELO client.example.org") == f"250 {HOST}"
    assert c.cmd("MAIL FROM:<a@example.org>") == "250 Ok"
    assert c.cmd("RCPT TO:<u@example.test>") == "250 Ok"
    assert c.cmd("RSET") == "250 Ok"
    assert code(c.cmd("FOO")) == "500"
    c.ehlo()
    assert c.cmd("MAIL FROM:<a@example.org>") == "250 2.1.0 Ok"
    assert code(c.cmd("RCPT TO:<u@example.test>")) == "250 2.1.5"
    assert code(c.cmd("FOO")) == "500 5.5.1"
    # HELO again turns them off.
    c.cmd("HELO again.example.org")
    assert code(c.cmd("FOO")) == "500"


def test_ehlo_resets_transaction():
    c = Client()
    c.start()
    c.ehlo()
    assert code(c.cmd("RCPT TO:<u@example.test>")) == "503 5.5.1"
    assert code(c.cmd("MAIL FROM:<a@example.org>")) == "250 2.1.0"


# -- MAIL ---------------------------------------------------------------------------

def test_mail_before_helo():
    c = Client()
    assert code(c.cmd("MAIL FROM:<a@example.org>")) == "503"


def test_nested_mail():
    c = Client()
    c.ehlo()
    assert code(c.cmd("MAIL FROM:<a@example.org>")) == "250 2.1.0"
    assert code(c.cmd("MAIL FROM:<b@example.org>")) == "503 5.5.1"


def test_mail_null_sender():
    c = Client()
    c.start(sender="<>")
    c.send("DATA\r\nhi\r\n.\r\n")
    [msg] = c.spool.messages
    assert msg.sender == ""


@pytest.mark.parametrize("line, expected", [
    ("MAIL", "501 5.5.2"),
    ("MAIL TO:<a@example.org>", "501 5.5.2"),
    ("MAIL FROM<a@example.org>", "501 5.5.2"),
    ("MAIL FROM:", "501 5.1.7"),
    ("MAIL FROM:<a@example.org", "501 5.1.7"),
    ("MAIL FROM:<a@example.org>x", "501 5.1.7"),
    ("MAIL FROM:<a@>", "501 5.1.7"),
    ("MAIL FROM:<@example.org>", "501 5.1.7"),
    ("MAIL FROM:<a..b@example.org>", "501 5.1.7"),
    ("MAIL FROM:<a@-example.org>", "501 5.1.7"),
    ("MAIL FROM:<a@[300.1.1.1]>", "501 5.1.7"),
    ("MAIL FROM:<a b@example.org>", "501 5.1.7"),
    ("MAIL FROM:<a@example.org> SIZE", "501 5.5.4"),
    ("MAIL FROM:<a@example.org> SIZE=abc", "501 5.5.4"),
    ("MAIL FROM:<a@example.org> SIZE=\u00b2", "501 5.5.4"),
    ("MAIL FROM:<a@example.org> SIZE=\u0661\u0662", "501 5.5.4"),
    ("MAIL FROM:<a@example.org> BODY=9BIT", "501 5.5.4"),
    ("MAIL FROM:<a@example.org> BODY=8bitm\u0131me", "501 5.5.4"),
    ("MAIL FROM:<a@example.org> RET=ALL", "501 5.5.4"),
    ("MAIL FROM:<a@example.org> ENVID=a+zz", "501 5.5.4"),
    ("MAIL FROM:<a@example.org> SMTPUTF8=yes", "501 5.5.4"),
    ("MAIL FROM:<a@example.org> SIZE=1 SIZE=2", "501 5.5.4"),
    ("MAIL FROM:<a@example.org> =x", "501 5.5.4"),
    ("MAIL FROM:<a@example.org> FOO=bar", "555 5.5.4"),
    ("MAIL FROM:<a@example.org> XYZ", "555 5.5.4"),
])
def test_mail_syntax_errors(line, expected):
    c = Client()
    c.ehlo()
    assert code(c.cmd(line)) == expected
    # The session goes on and no sender was set.
    assert code(c.cmd("MAIL FROM:<a@example.org>")) == "250 2.1.0"


def test_mail_variants_accepted():
    c = Client()
    c.ehlo()
    for line in ("MAIL FROM:<a@example.org>", "mail from:<a@example.org>",
                 "MAIL FROM: <a@example.org>", "MAIL FROM:a@example.org",
                 'MAIL FROM:<"a b>c"@example.org>', "MAIL FROM:<a@[192.0.2.1]>",
                 "MAIL FROM:<a@[IPv6:2001:db8::1]>",
                 "MAIL FROM:<@relay.example.net:a@example.org>",
                 "MAIL FROM:<a@example.org> size=100 body=8bitmime"):
        assert code(c.cmd(line)) == "250 2.1.0", line
        assert code(c.cmd("RSET")) == "250 2.0.0"


def test_mail_params_after_helo_refused():
    c = Client()
    c.cmd("HELO client.example.org")
    assert code(c.cmd("MAIL FROM:<a@example.org> SIZE=10")) == "555"
    assert code(c.cmd("MAIL FROM:<a@example.org>")) == "250"


def test_mail_size_over_limit():
    c = Client(max_message_size=1000)
    c.ehlo()
    assert code(c.cmd("MAIL FROM:<a@example.org> SIZE=1001")) == "552 5.3.4"
    assert code(c.cmd("MAIL FROM:<a@example.org> SIZE=99999999999999999999")) == "552 5.3.4"
    assert code(c.cmd("MAIL FROM:<a@example.org> SIZE=1000")) == "250 2.1.0"


def test_mail_params_are_stored():
    c = Client()
    c.start(mail_params="SIZE=321 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=QQ+2Bx AUTH=<>",
            rcpts=["<u@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;u+40example.test",
                   "<v@example.test> NOTIFY=NEVER",
                   "<w@example.test>"])
    c.send("DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n")
    [msg] = c.spool.messages
    assert msg.sender == "s@example.org"
    assert msg.size_param == 321
    assert msg.body_type == "8BITMIME"
    assert msg.smtputf8 is True
    assert msg.ret == "HDRS"
    assert msg.envid == "QQ+2Bx"
    assert msg.auth == "<>"
    assert [(r.address, r.notify, r.orcpt) for r in msg.recipients] == [
        ("u@example.test", "SUCCESS,FAILURE", "rfc822;u+40example.test"),
        ("v@example.test", "NEVER", None),
        ("w@example.test", None, None),
    ]
    assert msg.client_address == OUTSIDE
    assert msg.helo == "client.example.org"


def test_mail_auth_xtext_and_body_values():
    c = Client()
    c.start(mail_params="BODY=7BIT RET=FULL AUTH=someone+40example.org")
    c.send("DATA\r\nhi\r\n.\r\n")
    [msg] = c.spool.messages
    # The client has not authenticated, so AUTH= is taken as AUTH=<> (RFC 4954 §5);
    # an authenticated client's value is kept (tests/test_smtp_auth.py).
    assert (msg.body_type, msg.ret, msg.auth, msg.smtputf8) == (
        "7BIT", "FULL", "<>", False)


def test_non_ascii_sender_needs_smtputf8():
    c = Client()
    c.ehlo()
    assert code(c.cmd("MAIL FROM:<j\u00f6rg@example.org>")) == "553 5.6.7"
    assert code(c.cmd("MAIL FROM:<jorg@\u00e9xample.org>")) == "553 5.6.7"
    assert code(c.cmd("MAIL FROM:<j\u00f6rg@\u00e9xample.org> SMTPUTF8")) == "250 2.1.0"
    assert code(c.cmd("RCPT TO:<\u00fcser@example.test>")) == "250 2.1.5"
    c.send("DATA\r\nhi\r\n.\r\n")
    [msg] = c.spool.messages
    assert msg.sender == "j\u00f6rg@\u00e9xample.org"
    assert msg.recipients[0].address == "\u00fcser@example.test"
    assert msg.smtputf8


def test_non_ascii_recipient_needs_smtputf8():
    c = Client()
    c.ehlo()
    c.cmd("MAIL FROM:<a@example.org>")
    assert code(c.cmd("RCPT TO:<\u00fcser@example.test>")) == "553 5.6.7"
    assert code(c.cmd("RCPT TO:<user@ex\u00e4mple.test>")) == "553 5.6.7"
    assert code(c.cmd("RCPT TO:<user@example.test>")) == "250 2.1.5"


# -- RCPT ---------------------------------------------------------------------------

def test_rcpt_before_mail_and_before_helo():
    c = Client()
    assert code(c.cmd("RCPT TO:<u@example.test>")) == "503"
    c.ehlo()
    assert code(c.cmd("RCPT TO:<u@example.test>")) == "503 5.5.1"


@pytest.mark.parametrize("rcpt", ["<postmaster>", "<Postmaster>", "<POSTMASTER>",
                                  "<postmaster@example.test>"])
def test_rcpt_postmaster_from_anyone(rcpt):
    c = Client()
    c.ehlo()
    c.cmd("MAIL FROM:<a@example.org>")
    assert code(c.cmd(f"RCPT TO:{rcpt}")) == "250 2.1.5"
    c.send("DATA\r\nhi\r\n.\r\n")
    assert c.spool.messages[0].recipients[0].address == rcpt[1:-1]


def test_rcpt_postmaster_at_foreign_domain_is_relaying():
    c = Client()
    c.ehlo()
    c.cmd("MAIL FROM:<a@example.org>")
    assert code(c.cmd("RCPT TO:<postmaster@example.org>")) == "554 5.7.1"


def test_source_route_accepted_as_final_mailbox():
    c = Client()
    c.ehlo()
    c.cmd("MAIL FROM:<a@example.org>")
    assert code(c.cmd("RCPT TO:<@a.example.net,@b.example.net:user@example.test>")) \
        == "250 2.1.5"
    # The route is not where the mail goes: a foreign final domain is still relaying.
    assert code(c.cmd("RCPT TO:<@mx.example.test:user@example.org>")) == "554 5.7.1"
    c.send("DATA\r\nhi\r\n.\r\n")
    [msg] = c.spool.messages
    assert [r.address for r in msg.recipients] == ["user@example.test"]


@pytest.mark.parametrize("params", [
    "NOTIFY=SUCCESS", "NOTIFY=failure,delay", "NOTIFY=NEVER",
    "NOTIFY=SUCCESS,FAILURE,DELAY", "ORCPT=rfc822;user+40example.test",
    "ORCPT=utf-8;us\u00e9r@example.test", "NOTIFY=DELAY ORCPT=rfc822;a+2Bb@example.test",
])
def test_rcpt_dsn_params_valid(params):
    c = Client()
    c.ehlo()
    c.cmd("MAIL FROM:<a@example.org>")
    assert code(c.cmd(f"RCPT TO:<u@example.test> {params}")) == "250 2.1.5"


@pytest.mark.parametrize("params, expected", [
    ("NOTIFY", "501 5.5.4"),
    ("NOTIFY=", "501 5.5.4"),
    ("NOTIFY=SOMETIMES", "501 5.5.4"),
    ("NOTIFY=NEVER,SUCCESS", "501 5.5.4"),
    ("NOTIFY=SUCCESS,SUCCESS", "501 5.5.4"),
    ("NOTIFY=SUCCESS,", "501 5.5.4"),
    ("NOTIFY=\u017fuccess", "501 5.5.4"),
    ("ORCPT", "501 5.5.4"),
    ("ORCPT=rfc822", "501 5.5.4"),
    ("ORCPT=;a@example.test", "501 5.5.4"),
    ("ORCPT=rfc822;", "501 5.5.4"),
    ("ORCPT=rfc822;a+zzb", "501 5.5.4"),
    ("ORCPT=rfc822;a+2b", "501 5.5.4"),
    ("NOTIFY=NEVER NOTIFY=NEVER", "501 5.5.4"),
    ("FOO=BAR", "555 5.5.4"),
    ("SIZE=10", "555 5.5.4"),
])
def test_rcpt_dsn_params_invalid(params, expected):
    c = Client()
    c.ehlo()
    c.cmd("MAIL FROM:<a@example.org>")
    assert code(c.cmd(f"RCPT TO:<u@example.test> {params}")) == expected
    assert code(c.cmd("RCPT TO:<u@example.test>")) == "250 2.1.5"


def test_rcpt_params_after_helo_refused():
    c = Client()
    c.cmd("HELO client.example.org")
    c.cmd("MAIL FROM:<a@example.org>")
    assert code(c.cmd("RCPT TO:<u@example.test> NOTIFY=NEVER")) == "555"


@pytest.mark.parametrize("line, expected", [
    ("RCPT", "501 5.5.2"),
    ("RCPT FROM:<u@example.test>", "501 5.5.2"),
    ("RCPT TO:", "501 5.1.3"),
    ("RCPT TO:<>", "501 5.1.3"),
    ("RCPT TO:<u@>", "501 5.1.3"),
    ("RCPT TO:<u>", "501 5.1.3"),
    ("RCPT TO:<u@example.test", "501 5.1.3"),
    ("RCPT TO:<u@example.test>junk", "501 5.1.3"),
])
def test_rcpt_syntax_errors(line, expected):
    c = Client()
    c.ehlo()
    c.cmd("MAIL FROM:<a@example.org>")
    assert code(c.cmd(line)) == expected


def test_relay_denied_for_outside_client():
    c = Client(ip=OUTSIDE)
    c.ehlo()
    c.cmd("MAIL FROM:<a@example.org>")
    rep = c.cmd("RCPT TO:<victim@example.org>")
    assert code(rep) == "554 5.7.1"
    assert "Relay access denied" in rep
    assert code(c.cmd("RCPT TO:<u@sub.example.test>")) == "554 5.7.1"
    assert code(c.cmd("RCPT TO:<u@[192.0.2.1]>")) == "554 5.7.1"
    assert code(c.cmd("RCPT TO:<u@[127.0.0.1]>")) == "554 5.7.1"
    # No recipient was taken.
    assert code(c.cmd("DATA")) == "554 5.5.1"
    assert c.spool.calls == []


@pytest.mark.parametrize("rcpt", [
    "<a%b@example.test>", "<a%example.org@example.test>",
    "<a!b@example.test>", "<example.org!a@example.test>",
    '<"a@example.org"@example.test>', '<"a%b"@example.test>', '<"a!b"@example.test>',
    '<"a\\@b"@example.test>',
])
def test_sender_routing_in_local_part_refused_from_outside(rcpt):
    c = Client(ip=OUTSIDE)
    c.ehlo()
    c.cmd("MAIL FROM:<a@example.org>")
    assert code(c.cmd(f"RCPT TO:{rcpt}")) == "554 5.7.1"
    # A relay client may send them: they are relayed as they are, never rewritten.
    r = Client(ip=INSIDE)
    r.ehlo()
    r.cmd("MAIL FROM:<a@example.org>")
    assert code(r.cmd(f"RCPT TO:{rcpt}")) == "250 2.1.5"


def test_relay_domain_case_insensitive():
    c = Client(ip=OUTSIDE)
    c.ehlo()
    c.cmd("MAIL FROM:<a@example.org>")
    assert code(c.cmd("RCPT TO:<User@EXAMPLE.TEST>")) == "250 2.1.5"
    assert code(c.cmd("RCPT TO:<u@Example.Test>")) == "250 2.1.5"
    c.send("DATA\r\nhi\r\n.\r\n")
    assert [r.address for r in c.spool.messages[0].recipients] == [
        "User@EXAMPLE.TEST", "u@Example.Test"]


def test_relay_client_may_send_anywhere():
    c = Client(ip=INSIDE)
    c.ehlo()
    c.cmd("MAIL FROM:<a@example.org>")
    assert code(c.cmd("RCPT TO:<someone@example.org>")) == "250 2.1.5"
    assert code(c.cmd("RCPT TO:<someone@[192.0.2.7]>")) == "250 2.1.5"


def test_relay_client_ipv6_outside():
    c = Client(ip="2001:db8::5")
    c.ehlo()
    c.cmd("MAIL FROM:<a@example.org>")
    assert code(c.cmd("RCPT TO:<someone@example.org>")) == "554 5.7.1"
    assert code(c.cmd("RCPT TO:<someone@example.test>")) == "250 2.1.5"
    c.send("DATA\r\nhi\r\n.\r\n")
    assert b"([IPv6:2001:db8::5])" in c.spool.messages[0].headers


def test_max_recipients():
    c = Client(max_recipients=3)
    c.ehlo()
    c.cmd("MAIL FROM:<a@example.org>")
    for i in range(3):
        assert code(c.cmd(f"RCPT TO:<u{i}@example.test>")) == "250 2.1.5"
    assert code(c.cmd("RCPT TO:<u4@example.test>")) == "452 4.5.3"
    assert code(c.cmd("RCPT TO:<u5@example.test>")) == "452 4.5.3"
    assert code(c.send("DATA\r\n")[0]) == "354"
    c.send("hi\r\n.\r\n")
    assert len(c.spool.messages[0].recipients) == 3


def test_duplicate_recipients_kept_once():
    # One copy per address as parse_path gives it (source route and brackets
    # dropped): the first spelling's NOTIFY/ORCPT are kept; every RCPT gets
    # 250; the local part is case-sensitive (RFC 5321 §2.4), so is the domain
    # as spelled; a duplicate does not use up max_recipients.
    c = Client(make_factory(FakeSpool(auto=True), max_recipients=3))
    c.ehlo()
    c.cmd("MAIL FROM:<a@example.org>")
    for rcpt in ["<u@example.test> NOTIFY=FAILURE ORCPT=rfc822;first@example.test",
                 "<u@example.test> NOTIFY=NEVER", "<@relay.example.test:u@example.test>",
                 "u@example.test", "<U@example.test>", "<U@example.test>"]:
        assert code(c.cmd(f"RCPT TO:{rcpt}")) == "250 2.1.5", rcpt
    assert code(c.cmd("RCPT TO:<v@example.test>")) == "250 2.1.5"   # the third distinct one
    assert code(c.cmd("RCPT TO:<w@example.test>")) == "452 4.5.3"
    c.send("DATA\r\nhi\r\n.\r\n")
    [msg] = c.spool.messages
    assert [(r.address, r.notify, r.orcpt) for r in msg.recipients] == [
        ("u@example.test", "FAILURE", "rfc822;first@example.test"), ("U@example.test", None, None),
        ("v@example.test", None, None)]
    # A new transaction starts with no recipients seen.
    c.start(rcpts=["<u@example.test>", "<u@example.test>"])
    c.send("DATA\r\nhi\r\n.\r\n")
    assert [r.address for r in c.spool.messages[1].recipients] == ["u@example.test"]


class CountingList(list):
    """A list that counts the items handed out by iterating over it."""
    visits = 0

    def __iter__(self):
        for item in super().__iter__():
            CountingList.visits += 1
            if CountingList.visits > 100_000:
                raise AssertionError("the recipient list is scanned for every RCPT")
            yield item


def test_ten_thousand_recipients_without_rescanning_the_list():
    # The duplicate check must not walk the recipients so far at every RCPT
    # (10,000 RCPTs: 50 million comparisons, the reactor blocked for seconds).
    n = 10_000
    c = Client(max_recipients=2 * n)
    c.ehlo()
    c.cmd("MAIL FROM:<a@example.org>")
    CountingList.visits = 0
    c.proto.recipients = CountingList()
    burst = "".join(f"RCPT TO:<u{i}@example.test>\r\nRCPT TO:<u{i // 2}@example.test>\r\n"
                    for i in range(n))
    replies = c.send(burst)
    assert codes(replies) == ["250 2.1.5"] * (2 * n)
    assert CountingList.visits < 100_000
    c.send("DATA\r\nhi\r\n.\r\n")
    assert [r.address for r in c.spool.messages[0].recipients] == [
        f"u{i}@example.test" for i in range(n)]


# -- DATA -----------------------------------------------------------------------------

def test_data_without_mail_or_rcpt():
    c = Client()
    assert code(c.cmd("DATA")) == "503"
    c.ehlo()
    assert code(c.cmd("DATA")) == "503 5.5.1"
    c.cmd("MAIL FROM:<a@example.org>")
    assert code(c.cmd("DATA")) == "554 5.5.1"
    c.cmd("RCPT TO:<x@example.org>")  # refused: relaying
    assert code(c.cmd("DATA")) == "554 5.5.1"
    # The text that follows is read as commands, as the client has no 354.
    assert code(c.cmd("RCPT TO:<u@example.test>")) == "250 2.1.5"
    assert code(c.cmd("DATA X")) == "501 5.5.4"
    assert code(c.cmd("DATA")) == "354"


def test_data_simple_message_queued_after_spool_fires():
    c = Client()
    c.start()
    assert c.send("DATA\r\n") == ["354 End data with <CR><LF>.<CR><LF>"]
    assert c.send("Subject: hi\r\n\r\nHello\r\n") == []
    assert c.send(".\r\n") == []          # nothing until the spool answers
    assert len(c.spool.calls) == 1
    qid = c.spool.fire()
    assert c.take() == [f"250 2.0.0 Ok: queued as {qid}"]
    msg = c.spool.messages[0]
    assert msg.body == b"Hello\r\n" or bytes(msg.body) == b"Hello\r\n"
    assert msg.headers.endswith(b"Subject: hi\r\n\r\n")


def stored_content(msg) -> bytes:
    """headers || body with our Received field removed."""
    whole = bytes(msg.headers) + bytes(msg.body)
    m = re.match(rb"Received: [^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*", whole)
    assert m, whole[:200]
    return whole[m.end():]


@pytest.mark.parametrize("wire, content", [
    (b".\r\n", b""),
    (b"..\r\n.\r\n", b".\r\n"),
    (b"...\r\n.\r\n", b"..\r\n"),
    (b"..leading dot\r\n.\r\n", b".leading dot\r\n"),
    (b"a\r\n..\r\nb\r\n.\r\n", b"a\r\n.\r\nb\r\n"),
    (b"a\r\n. \r\n.\r\n", b"a\r\n \r\n"),
    (b"a.\r\n.b\r\n.\r\n", b"a.\r\nb\r\n"),
    (b"Subject: x\r\n\r\n..\r\n..x\r\n.\r\n", b"Subject: x\r\n\r\n.\r\n.x\r\n"),
])
def test_dot_unstuffing(wire, content):
    c = Client()
    c.start()
    c.send(b"DATA\r\n" + wire)
    [msg] = c.spool.messages
    assert stored_content(msg) == content


def test_dot_unstuffing_split_at_every_point():
    wire = b"Subject: t\r\n\r\n..one\r\ntwo\r\n...\r\n.\r\n"
    for cut in range(len(wire) + 1):
        c = Client()
        c.start()
        c.send(b"DATA\r\n")
        c.send(wire[:cut])
        c.send(wire[cut:])
        assert stored_content(c.spool.messages[0]) == b"Subject: t\r\n\r\n.one\r\ntwo\r\n..\r\n"


@pytest.mark.parametrize("bad", [b"bare\nLF\r\n", b"bare\rCR\r\n", b"end with\r\r\n",
                                 b"\n\r\n", b"x\n\r\n", b"a\r\n\r\n\rb\r\n",
                                 b"\r\r\n", b"\n\n\r\n"])
def test_bare_newlines_refused(bad):
    c = Client()
    c.start()
    c.send("DATA\r\n")
    assert codes(c.send(b"Subject: x\r\n\r\n" + bad + b".\r\n")) == ["554 5.6.0"]
    assert c.spool.calls == []
    # In step: the next transaction works.
    assert code(c.cmd("MAIL FROM:<a@example.org>")) == "250 2.1.0"


SMUGGLING = [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r", b"\r.\r\n", b"\r\n.\n", b"\n.\r",
             b"\r\n.\r\r\n"]


@pytest.mark.parametrize("fake_end", SMUGGLING)
def test_smtp_smuggling_does_not_end_data(fake_end):
    c = Client(ip=OUTSIDE)
    c.start()
    c.send("DATA\r\n")
    smuggled = (b"Subject: one\r\n\r\nfirst" + fake_end +
                b"MAIL FROM:<admin@example.test>\r\nRCPT TO:<victim@example.test>\r\n"
                b"DATA\r\nSubject: smuggled\r\n\r\nevil\r\n.\r\n")
    replies = c.send(smuggled)
    # One reply, for the one message: refused for its bare line ending.
    assert codes(replies) == ["554 5.6.0"]
    assert c.spool.calls == []
    # Nothing of the smuggled transaction survives.
    assert code(c.cmd("RCPT TO:<u@example.test>")) == "503 5.5.1"


@pytest.mark.parametrize("fake_end", SMUGGLING)
def test_smtp_smuggling_normalize_mode_stores_one_message(fake_end):
    c = Client(bare_newlines="normalize")
    c.start()
    c.send("DATA\r\n")
    replies = c.send(b"Subject: one\r\n\r\nfirst" + fake_end +
                     b"MAIL FROM:<admin@example.test>\r\nRCPT TO:<victim@example.test>\r\n"
                     b"DATA\r\nevil\r\n.\r\n")
    assert replies == []
    assert len(c.spool.calls) == 1
    c.spool.fire()
    assert codes(c.take()) == ["250 2.0.0"]
    content = stored_content(c.spool.messages[0])
    assert b"MAIL FROM:<admin@example.test>" in content
    assert content.count(b"\r\n") == content.count(b"\n") == content.count(b"\r")
    assert code(c.cmd("RCPT TO:<u@example.test>")) == "503 5.5.1"


def test_smtp_smuggling_split_at_every_point():
    payload = (b"Subject: one\r\n\r\nfirst\n.\r\nMAIL FROM:<admin@example.test>\r\n"
               b"RCPT TO:<victim@example.test>\r\nDATA\r\nevil\r\n.\r\nNOOP\r\n")
    for cut in range(len(payload) + 1):
        c = Client()
        c.start()
        c.send("DATA\r\n")
        replies = c.send(payload[:cut]) + c.send(payload[cut:])
        assert codes(replies) == ["554 5.6.0", "250 2.0.0"], cut
        assert c.spool.calls == []


def test_long_text_line_refused_after_dot():
    c = Client()
    c.start()
    c.send("DATA\r\n")
    ok_line = b"x" * 998 + b"\r\n"         # 1000 octets with CRLF: allowed
    long_line = b"y" * 999 + b"\r\n"       # 1001: too long
    assert c.send(b"Subject: x\r\n\r\n" + ok_line + long_line) == []
    assert codes(c.send(b"more\r\n.\r\n")) == ["554 5.6.0"]   # content, not a command error
    assert c.spool.calls == []
    assert code(c.cmd("NOOP")) == "250 2.0.0"
    c.cmd("MAIL FROM:<a@example.org>")
    c.cmd("RCPT TO:<u@example.test>")
    c.send(b"DATA\r\n" + ok_line + b".\r\n")
    assert stored_content(c.spool.messages[0]) == ok_line


def test_long_text_line_with_stuffed_dot_is_measured_unstuffed():
    c = Client()
    c.start()
    c.send(b"DATA\r\n." + b"." * 998 + b"\r\n.\r\n")  # 999 octets on the wire before CRLF
    assert len(c.spool.calls) == 1


def test_message_over_max_size_refused_after_dot():
    c = Client(max_message_size=1000)
    c.start()
    c.send("DATA\r\n")
    assert c.send(b"Subject: big\r\n\r\n" + b"z" * 70 + b"\r\n") == []
    big = (b"a" * 78 + b"\r\n") * 30   # 2400 octets
    assert c.send(big) == []
    assert codes(c.send(b".\r\n")) == ["552 5.3.4"]
    assert c.spool.calls == []
    assert code(c.cmd("NOOP")) == "250 2.0.0"
    assert code(c.cmd("MAIL FROM:<a@example.org>")) == "250 2.1.0"


def test_message_far_over_max_size_in_many_pieces_stays_in_step():
    c = Client(max_message_size=1000)
    c.start()
    c.send("DATA\r\n")
    piece = (b"b" * 98 + b"\r\n") * 10
    for _ in range(200):
        assert c.send(piece) == []
    # The terminator split over two writes, with the next command right behind it.
    assert c.send(b"\r\n.") == []
    assert codes(c.send(b"\r\nNOOP\r\n")) == ["552 5.3.4", "250 2.0.0"]
    assert c.spool.calls == []
    assert c.proto._reader is None


def test_message_exactly_max_size_accepted():
    c = Client(max_message_size=1000)
    c.start()
    content = (b"c" * 98 + b"\r\n") * 10
    assert len(content) == 1000
    c.send(b"DATA\r\n" + content + b".\r\n")
    assert len(c.spool.calls) == 1
    assert stored_content(c.spool.messages[0]) == content
    # With stuffing dots the wire form is longer, the message is not.
    c.spool.fire()
    c.take()
    c.cmd("MAIL FROM:<a@example.org>")
    c.cmd("RCPT TO:<u@example.test>")
    stuffed = (b"." + b"." * 97 + b"\r\n") * 10
    c.send(b"DATA\r\n" + stuffed + b".\r\n")
    assert len(c.spool.calls) == 2
    assert stored_content(c.spool.messages[1]) == (b"." * 97 + b"\r\n") * 10


def test_connection_lost_mid_data_stores_nothing():
    c = Client()
    c.start()
    c.send("DATA\r\nSubject: x\r\n\r\npartial")
    c.lose()
    assert c.spool.calls == []
    c.clock.advance(10000)
    assert c.tr.value() == b""


def test_connection_lost_with_terminator_half_sent():
    c = Client()
    c.start()
    c.send("DATA\r\nSubject: x\r\n\r\nbody\r\n.")
    c.lose()
    assert c.spool.calls == []


def test_connection_count_released_on_loss():
    f = make_factory()
    c = Client(f)
    assert f.connections == 1 and f.per_client[OUTSIDE] == 1
    c.lose()
    assert f.connections == 0 and OUTSIDE not in f.per_client


# -- BDAT (RFC 3030) --------------------------------------------------------------

def test_bdat_chunks():
    c = Client()
    c.start()
    assert codes(c.send(b"BDAT 5\r\nhello")) == ["250 2.0.0"]
    # A chunk split over several writes.
    assert c.send(b"BDAT 10 LAST\r\n wor") == []
    assert c.send(b"ld\r\n") == []
    assert c.send(b"\r\n") == []
    assert len(c.spool.calls) == 1
    c.spool.fire()
    assert codes(c.take()) == ["250 2.0.0"]
    assert stored_content(c.spool.messages[0]) == b"hello world\r\n\r\n"


def test_bdat_no_unstuffing_and_dot_lines_are_data():
    c = Client()
    c.start()
    chunk = b"..x\r\n.\r\nQUIT\r\n"
    c.send(b"BDAT %d LAST\r\n" % len(chunk) + chunk)
    assert stored_content(c.spool.messages[0]) == chunk
    assert not c.closing


def test_bdat_bare_cr_at_chunk_end_refused():
    c = Client()
    c.start()
    assert codes(c.send(b"BDAT 3\r\nabc")) == ["250 2.0.0"]
    assert codes(c.send(b"BDAT 4\r\nd\r\n\r")) == ["250 2.0.0"]
    assert codes(c.send(b"BDAT 0 LAST\r\n")) == ["554 5.6.0"]
    assert c.spool.calls == []


def test_bdat_zero_last_clean():
    c = Client()
    c.start()
    assert codes(c.send(b"BDAT 5\r\nabc\r\nBDAT 3\r\nd\r\n")) == ["250 2.0.0", "250 2.0.0"]
    assert c.send(b"BDAT 0 LAST\r\n") == []
    c.spool.fire()
    assert codes(c.take()) == ["250 2.0.0"]
    assert stored_content(c.spool.messages[0]) == b"abc\r\nd\r\n"


def test_bdat_zero_last_alone_is_empty_message():
    c = Client()
    c.start()
    assert c.send(b"BDAT 0 LAST\r\n") == []
    assert stored_content(c.spool.messages[0]) == b""


def test_bdat_bare_lf_refused_and_binarymime_kept():
    c = Client()
    c.start()
    assert codes(c.send(b"BDAT 6 LAST\r\na\nb\r\n\r")) == ["554 5.6.0"]
    assert c.spool.calls == []
    assert code(c.cmd("MAIL FROM:<a@example.org> BODY=BINARYMIME")) == "250 2.1.0"
    c.cmd("RCPT TO:<u@example.test>")
    binary = bytes(range(256)) * 8   # bare CR/LF, NUL, long "lines": all fine in binary
    c.send(b"BDAT %d LAST\r\n" % len(binary) + binary)
    assert len(c.spool.calls) == 1
    assert stored_content(c.spool.messages[0]) == binary
    assert c.spool.messages[0].body_type == "BINARYMIME"


def test_bdat_long_line_refused():
    c = Client()
    c.start()
    chunk = b"x" * 1200 + b"\r\n"
    assert codes(c.send(b"BDAT %d LAST\r\n" % len(chunk) + chunk + b"NOOP\r\n")) \
        == ["554 5.6.0", "250 2.0.0"]
    assert c.spool.calls == []


def test_bdat_then_data_refused():
    c = Client()
    c.start()
    c.send(b"BDAT 4\r\nabc\n")
    assert code(c.cmd("DATA")) == "503 5.5.1"
    assert code(c.cmd("RCPT TO:<v@example.test>")) == "503 5.5.1"
    assert code(c.cmd("RSET")) == "250 2.0.0"
    c.start()
    assert code(c.cmd("DATA")) == "354"


def test_bdat_without_mail_reads_chunk_then_503():
    c = Client()
    c.ehlo()
    # The chunk holds something that looks like a command: it must be swallowed.
    assert codes(c.send(b"BDAT 6\r\nQUIT\r\nNOOP\r\n")) == ["503 5.5.1", "250 2.0.0"]
    assert not c.closing
    assert codes(c.send(b"BDAT 6 LAST\r\nRSET\r\n")) == ["503 5.5.1"]
    assert c.spool.calls == []


def test_bdat_before_helo_reads_chunk():
    c = Client()
    assert codes(c.send(b"BDAT 6 LAST\r\nQUIT\r\nNOOP\r\n")) == ["503", "250"]
    assert not c.closing


def test_bdat_without_rcpt():
    c = Client()
    c.ehlo()
    c.cmd("MAIL FROM:<a@example.org>")
    assert codes(c.send(b"BDAT 6 LAST\r\nQUIT\r\n")) == ["554 5.5.1"]
    assert not c.closing


@pytest.mark.parametrize("arg", ["", "x", "-1", "5 LAST X", "5 FIRST", "1234567890123456"])
def test_bdat_bad_syntax_closes(arg):
    # Without a chunk size the server cannot find the next command: it
    # answers 501 and closes rather than read message content as commands.
    c = Client()
    c.start()
    assert code(c.cmd(f"BDAT {arg}".strip())) == "501 5.5.4", arg
    assert c.closing


def test_bdat_over_size_last():
    c = Client(max_message_size=100)
    c.start()
    chunk = b"x" * 60 + b"\r\n"
    assert codes(c.send(b"BDAT 62\r\n" + chunk)) == ["250 2.0.0"]
    assert codes(c.send(b"BDAT 62 LAST\r\n" + chunk + b"NOOP\r\n")) == ["552 5.3.4", "250 2.0.0"]
    assert c.spool.calls == []
    # LAST ended the failed transaction.
    assert code(c.cmd("MAIL FROM:<a@example.org>")) == "250 2.1.0"


def test_bdat_over_size_then_more_chunks():
    c = Client(max_message_size=100)
    c.start()
    big = b"y" * 200
    assert codes(c.send(b"BDAT 200\r\n" + big)) == ["552 5.3.4"]
    # Chunks already pipelined are read and refused too.
    assert codes(c.send(b"BDAT 10\r\n0123456789BDAT 0 LAST\r\n")) == ["552 5.3.4", "552 5.3.4"]
    assert c.spool.calls == []
    assert code(c.cmd("MAIL FROM:<a@example.org>")) == "250 2.1.0"


def test_bdat_over_size_pipelined_chunks_are_one_error():
    # RFC 3030: chunks pipelined after the refused one are read and
    # discarded; each is answered (the refusal again, as the reply to LAST
    # is what many clients report), but the message is one error: no 421
    # before BDAT LAST however many chunks were in flight.
    c = Client(max_message_size=100, max_errors=3)
    chunk = b"x" * 58 + b"\r\n"
    burst = b"".join(b"BDAT 60\r\n" + chunk for _ in range(30)) + b"BDAT 0 LAST\r\nNOOP\r\n"
    for _ in range(2):
        c.start()
        assert codes(c.send(burst)) == ["250 2.0.0"] + ["552 5.3.4"] * 30 + ["250 2.0.0"]
        assert not c.closing and c.spool.calls == []
    # Two refused messages were two errors: the third refusal is the third error.
    c.start()
    assert codes(c.send(burst))[:3] == ["250 2.0.0", "552 5.3.4", "421 4.7.0"]
    assert c.closing


def test_bdat_refused_chunks_without_transaction_are_one_error():
    # A client whose MAIL failed but which pipelined its chunks anyway: each
    # chunk is read and answered 503, and the run of them is one error.
    c = Client(max_errors=2)
    c.ehlo()
    burst = b"".join(b"BDAT 6\r\nNOOP\r\n" for _ in range(25)) + b"BDAT 0 LAST\r\n"
    assert codes(c.send(burst)) == ["503 5.5.1"] * 26
    assert not c.closing
    # Another command ends the run: a new refused chunk is a new error.
    assert code(c.cmd("NOOP")) == "250 2.0.0"
    assert codes(c.send(b"BDAT 1\r\nx")) == ["503 5.5.1", "421 4.7.0"]
    assert c.closing


def test_bdat_over_size_then_rset():
    c = Client(max_message_size=100)
    c.start()
    assert codes(c.send(b"BDAT 200\r\n" + b"y" * 200)) == ["552 5.3.4"]
    assert code(c.cmd("RSET")) == "250 2.0.0"
    c.start()
    assert codes(c.send(b"BDAT 5 LAST\r\nabc\r\n")) == []
    assert len(c.spool.calls) == 1


def test_binarymime_with_data_refused():
    c = Client()
    c.start(mail_params="BODY=BINARYMIME")
    assert code(c.cmd("DATA")) == "503 5.5.1"
    c.send(b"BDAT 3 LAST\r\nabc")
    assert len(c.spool.calls) == 1


def test_connection_lost_mid_bdat_stores_nothing():
    c = Client()
    c.start()
    c.send(b"BDAT 5\r\nhello")
    c.send(b"BDAT 100 LAST\r\npartial")
    c.lose()
    assert c.spool.calls == []


def test_bdat_pipelined_with_commands():
    c = Client()
    c.ehlo()
    replies = c.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<u@example.test>\r\n"
                     b"BDAT 4\r\nab\r\nBDAT 3 LAST\r\ncd\nMAIL FROM:<b@example.org>\r\n")
    # ab CRLF cd LF: a bare LF, refused after LAST; the next MAIL is then taken.
    assert codes(replies) == ["250 2.1.0", "250 2.1.5", "250 2.0.0", "554 5.6.0", "250 2.1.0"]


# -- other verbs --------------------------------------------------------------------

def test_rset():
    c = Client()
    c.start()
    assert c.cmd("RSET") == "250 2.0.0 Ok"
    assert code(c.cmd("RCPT TO:<u@example.test>")) == "503 5.5.1"
    assert code(c.cmd("RSET now")) == "501 5.5.4"
    # RSET keeps the HELO.
    assert code(c.cmd("MAIL FROM:<a@example.org>")) == "250 2.1.0"


def test_noop():
    c = Client()
    assert c.cmd("NOOP") == "250 Ok"
    c.ehlo()
    assert c.cmd("NOOP") == "250 2.0.0 Ok"
    assert c.cmd("noop with text") == "250 2.0.0 Ok"


def test_quit():
    c = Client()
    c.ehlo()
    assert c.send("QUIT\r\n") == ["221 2.0.0 Bye"]
    assert c.closing
    # Anything after QUIT is ignored.
    assert c.send("NOOP\r\n") == []


def test_quit_before_helo_and_pipelined():
    c = Client()
    assert c.send("NOOP\r\nQUIT\r\nNOOP\r\n") == ["250 Ok", "221 Bye"]
    assert c.closing


def test_vrfy_expn_help():
    c = Client()
    c.ehlo()
    assert code(c.cmd("VRFY postmaster")) == "252 2.5.0"
    assert code(c.cmd("VRFY <nosuchuser@example.test>")) == "252 2.5.0"
    assert code(c.cmd("VRFY")) == "501 5.5.4"
    assert code(c.cmd("EXPN staff")) == "502 5.5.1"
    help_reply = c.cmd("HELP")
    assert code(help_reply) == "214 2.0.0"
    assert code(c.cmd("HELP MAIL")) == "214 2.0.0"


@pytest.mark.parametrize("verb", ["TURN", "SEND FROM:<a@example.org>", "SOML FROM:<a@b.c>",
                                  "SAML FROM:<a@b.c>", "ETRN example.test", "ETRN"])
def test_not_implemented_verbs(verb):
    c = Client()
    c.ehlo()
    assert code(c.cmd(verb)) == "502 5.5.1"


@pytest.mark.parametrize("line", ["FOO", "", "MAILFROM:<a@b.c>", "HELOx", " NOOP", "EHL0 x"])
def test_unknown_command(line):
    c = Client()
    c.ehlo()
    assert code(c.cmd(line)) == "500 5.5.1"
    assert code(c.cmd("NOOP")) == "250 2.0.0"


def test_verbs_are_case_insensitive():
    c = Client()
    assert code(c.cmd("ehlo client.example.org")) == "250"
    assert code(c.cmd("Mail From:<a@example.org>")) == "250 2.1.0"
    assert code(c.cmd("rcpt to:<u@example.test>")) == "250 2.1.5"
    assert code(c.cmd("data")) == "354"


def test_bare_lf_terminated_commands_accepted():
    # Postfix accepts LF alone as a command line ending; so do we.
    c = Client()
    assert codes(c.send(b"EHLO x\nNOOP\n")) == ["250", "250 2.0.0"]


def test_command_line_limits():
    c = Client()
    c.ehlo()
    max_ok = b"NOOP " + b"a" * (512 - 7) + b"\r\n"
    assert len(max_ok) == 512
    assert codes(c.send(max_ok)) == ["250 2.0.0"]
    too_long = b"NOOP " + b"a" * (512 - 6) + b"\r\n"
    assert codes(c.send(too_long + b"NOOP\r\n")) == ["500 5.5.2", "250 2.0.0"]


def test_command_line_too_long_across_writes():
    c = Client()
    c.ehlo()
    c.cmd("MAIL FROM:<a@example.org>")
    assert c.send(b"RCPT TO:<" + b"a" * 300) == []
    assert c.send(b"b" * 300) == []
    assert c.send(b"c" * 5000) == []
    assert codes(c.send(b"@example.test>\r\nRCPT TO:<u@example.test>\r\n")) == [
        "500 5.5.2", "250 2.1.5"]
    c.send(b"DATA\r\nhi\r\n.\r\n")
    assert [r.address for r in c.spool.messages[0].recipients] == ["u@example.test"]


def test_nul_and_invalid_utf8_in_commands():
    c = Client()
    c.ehlo()
    assert code(c.cmd(b"NOOP\x00")) == "500 5.5.2"
    assert code(c.cmd(b"MAIL FROM:<a\x00b@example.org>")) == "500 5.5.2"
    assert code(c.cmd(b"MAIL FROM:<\xff@example.org>")) == "500 5.5.2"
    assert code(c.cmd(b"MAIL FROM:<\xc3\x28@example.org> SMTPUTF8")) == "500 5.5.2"
    assert code(c.cmd(b"\xed\xa0\x80")) == "500 5.5.2"   # encoded surrogate
    assert code(c.cmd("MAIL FROM:<a@example.org>")) == "250 2.1.0"


def test_non_ascii_verb_is_unknown():
    c = Client()
    c.ehlo()
    # 'ı'.upper() == 'I': such a verb must not pass for MAIL.
    assert code(c.cmd("MA\u0131L FROM:<a@example.org>")) == "500 5.5.1"
    assert code(c.cmd("\uff2e\uff2f\uff2f\uff30")) == "500 5.5.1"


# -- timeouts, error limits, connection limits ------------------------------------

def test_idle_timeout():
    c = Client()
    c.ehlo()
    c.clock.advance(299)
    assert c.take() == [] and not c.closing
    c.cmd("NOOP")             # input resets the timer
    c.clock.advance(299)
    assert c.take() == []
    c.clock.advance(2)
    [rep] = c.take()
    assert code(rep) == "421 4.4.2"
    assert HOST in rep
    assert c.closing


def test_idle_timeout_before_ehlo_has_enhanced_code():
    c = Client()
    c.clock.advance(300)
    assert codes(c.take()) == ["421 4.4.2"]
    assert c.closing


def test_data_timeout():
    c = Client(command_timeout=10, data_timeout=20)
    c.start()
    c.send("DATA\r\npartial")
    c.clock.advance(15)
    assert c.take() == []
    c.clock.advance(6)
    assert codes(c.take()) == ["421 4.4.2"]
    assert c.closing
    c.lose()
    assert c.spool.calls == []


def test_no_timeout_while_spool_write_outstanding():
    c = Client(command_timeout=10, data_timeout=10)
    c.start()
    c.send("DATA\r\nhi\r\n.\r\n")
    c.clock.advance(100)
    assert c.take() == [] and not c.closing
    c.spool.fire()
    assert codes(c.take()) == ["250 2.0.0"]
    c.clock.advance(10)
    assert codes(c.take()) == ["421 4.4.2"]


def test_too_many_errors():
    c = Client(max_errors=3)
    c.ehlo()
    assert codes(c.send("FOO\r\nBAR\r\n")) == ["500 5.5.1", "500 5.5.1"]
    assert not c.closing
    assert codes(c.send("BAZ\r\nNOOP\r\n")) == ["500 5.5.1", "421 4.7.0"]
    assert c.closing
    assert c.send("NOOP\r\n") == []


def test_connection_limit_total():
    f = make_factory(max_connections=2)
    a = Client(f, ip="10.0.0.1")
    b = Client(f, ip="10.0.0.2")
    assert codes(a.greeting) == codes(b.greeting) == ["220"]
    c = Client(f, ip="10.0.0.3")
    assert codes(c.greeting) == ["421 4.7.0"]
    assert c.closing
    assert c.send("EHLO x\r\n") == []
    c.lose()
    a.lose()
    d = Client(f, ip="10.0.0.4")
    assert codes(d.greeting) == ["220"]
    assert f.connections == 2


def test_connection_limit_per_client():
    f = make_factory(max_connections_per_client=2)
    a = Client(f, ip=OUTSIDE, port=1)
    b = Client(f, ip=OUTSIDE, port=2)
    c = Client(f, ip=OUTSIDE, port=3)
    assert codes(a.greeting + b.greeting) == ["220", "220"]
    assert codes(c.greeting) == ["421 4.7.0"]
    assert c.closing
    other = Client(f, ip="10.9.9.9")
    assert codes(other.greeting) == ["220"]
    c.lose()
    b.lose()
    e = Client(f, ip=OUTSIDE, port=4)
    assert codes(e.greeting) == ["220"]
    assert f.per_client[OUTSIDE] == 2


# -- pipelining (RFC 2920) ------------------------------------------------------------

def test_pipelined_transaction_replies_in_order_one_write():
    c = Client()
    c.ehlo()
    n = len(c.tr.writes)
    replies = c.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<u@example.test>\r\n"
                     b"RCPT TO:<nobody@example.org>\r\nRCPT TO:<v@example.test>\r\nDATA\r\n")
    assert codes(replies) == ["250 2.1.0", "250 2.1.5", "554 5.7.1", "250 2.1.5", "354"]
    assert len(c.tr.writes) == n + 1


def test_pipelined_ehlo_through_data_and_message():
    c = Client()
    replies = c.send(b"EHLO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<u@example.test>\r\n"
                     b"DATA\r\nSubject: p\r\n\r\nbody\r\n.\r\nNOOP\r\n")
    assert codes(replies) == ["250", "250 2.1.0", "250 2.1.5", "354"]
    c.spool.fire()
    assert codes(c.take()) == ["250 2.0.0", "250 2.0.0"]


def test_pipelined_after_final_dot_waits_for_spool():
    c = Client()
    c.start()
    c.send("DATA\r\n")
    replies = c.send(b"Subject: 1\r\n\r\none\r\n.\r\n"
                     b"MAIL FROM:<b@example.org>\r\nRCPT TO:<v@example.test>\r\nDATA\r\n")
    assert replies == []
    # More pipelined input arriving while the write is outstanding is held as well.
    assert c.send(b"Subject: 2\r\n\r\ntwo\r\n.\r\nQUIT\r\n") == []
    assert len(c.spool.calls) == 1
    qid1 = c.spool.fire()
    assert codes(c.take()) == ["250 2.0.0", "250 2.1.0", "250 2.1.5", "354"]
    assert len(c.spool.calls) == 2
    assert not c.closing
    qid2 = c.spool.fire()
    replies = c.take()
    assert replies == [f"250 2.0.0 Ok: queued as {qid2}", "221 2.0.0 Bye"]
    assert qid1 != qid2
    assert c.closing
    m1, m2 = c.spool.messages
    assert stored_content(m1) == b"Subject: 1\r\n\r\none\r\n"
    assert stored_content(m2) == b"Subject: 2\r\n\r\ntwo\r\n"
    assert m2.sender == "b@example.org"
    assert [r.address for r in m2.recipients] == ["v@example.test"]


def test_pipelined_quit_after_dot_answered_after_250():
    c = Client()
    c.start()
    assert codes(c.send(b"DATA\r\nhi\r\n.\r\nQUIT\r\n")) == ["354"]
    assert not c.closing
    qid = c.spool.fire()
    assert c.take() == [f"250 2.0.0 Ok: queued as {qid}", "221 2.0.0 Bye"]
    assert c.closing


def test_pipelined_after_bdat_last_waits_for_spool():
    c = Client()
    c.start()
    assert c.send(b"BDAT 4 LAST\r\nab\r\nMAIL FROM:<b@example.org>\r\nNOOP\r\n") == []
    c.spool.fire()
    assert codes(c.take()) == ["250 2.0.0", "250 2.1.0", "250 2.0.0"]


def test_pipelined_with_synchronous_spool():
    c = Client(spool=FakeSpool(auto=True))
    c.ehlo()
    burst = b""
    for i in range(3):
        burst += (b"MAIL FROM:<a@example.org>\r\nRCPT TO:<u@example.test>\r\nDATA\r\n"
                  b"Subject: %d\r\n\r\nx\r\n.\r\n" % i)
    burst += b"QUIT\r\n"
    replies = c.send(burst)
    assert codes(replies) == ["250 2.1.0", "250 2.1.5", "354", "250 2.0.0"] * 3 + ["221 2.0.0"]
    assert [stored_content(m) for m in c.spool.messages] == [
        b"Subject: %d\r\n\r\nx\r\n" % i for i in range(3)]


def test_large_pipelined_input_while_busy_pauses_and_resumes():
    c = Client()
    c.start()
    c.send(b"DATA\r\nhi\r\n.\r\n")
    assert c.tr.producerState == "producing"
    c.send(b"NOOP\r\n" * 50000)   # 300 KB while the spool write is outstanding
    assert c.tr.producerState == "paused"
    c.spool.fire()
    assert c.tr.producerState == "producing"
    replies = c.take()
    assert len(replies) == 50001
    assert codes(replies[:2]) == ["250 2.0.0", "250 2.0.0"]


# -- spool failures -------------------------------------------------------------------

def test_spool_failure_451_and_session_goes_on():
    c = Client()
    c.start()
    c.send(b"DATA\r\nhi\r\n.\r\nMAIL FROM:<b@example.org>\r\n")
    c.spool.fail()
    assert codes(c.take()) == ["451 4.3.0", "250 2.1.0"]
    assert not c.closing
    c.cmd("RCPT TO:<u@example.test>")
    c.send("DATA\r\nagain\r\n.\r\n")
    c.spool.fire()
    assert codes(c.take()) == ["250 2.0.0"]


def test_spool_raising_synchronously_451():
    c = Client(spool=RaisingSpool())
    c.start()
    assert codes(c.send(b"DATA\r\nhi\r\n.\r\nNOOP\r\n")) == ["354", "451 4.3.0", "250 2.0.0"]


def test_connection_lost_while_spool_write_outstanding():
    c = Client()
    c.start()
    c.send(b"DATA\r\nhi\r\n.\r\nNOOP\r\n")
    c.lose()
    c.spool.fire()       # must neither crash nor write
    assert c.tr.value() == b""


# -- the stored message -------------------------------------------------------------

def received_of(msg) -> str:
    whole = bytes(msg.headers)
    m = re.match(rb"Received: [^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*", whole)
    assert m
    return m.group(0).decode()


def test_received_header_esmtp_one_recipient():
    c = Client()
    c.start(rcpts=["<u@example.test>"])
    c.send("DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n")
    msg = c.spool.messages[0]
    rec = received_of(msg)
    unfolded = re.sub(r"\r\n[ \t]+", " ", rec)
    assert unfolded.startswith(f"Received: from client.example.org ([{OUTSIDE}])")
    assert f" by {HOST} " in unfolded
    assert " with ESMTP " in unfolded
    assert f" id {msg.queue_id}" in unfolded
    assert " for <u@example.test>;" in unfolded
    assert re.search(r";\s+\w{3}, \d{1,2} \w{3} \d{4} \d\d:\d\d:\d\d [+-]\d{4}\r\n$",
                     unfolded)
    for line in rec.split("\r\n"):
        assert len(line) <= 998
    assert msg.protocol == "ESMTP"


def test_received_header_no_for_with_two_recipients():
    c = Client()
    c.start(rcpts=["<u@example.test>", "<v@example.test>"])
    c.send("DATA\r\nhi\r\n.\r\n")
    rec = received_of(c.spool.messages[0])
    assert " for " not in rec and "for <" not in rec


def test_received_header_smtp_after_helo():
    c = Client()
    c.start(esmtp=False)
    c.send("DATA\r\nhi\r\n.\r\n")
    msg = c.spool.messages[0]
    assert " with SMTP " in re.sub(r"\r\n[ \t]+", " ", received_of(msg))
    assert msg.protocol == "SMTP"


def test_received_header_utf8smtp():
    c = Client()
    c.start(mail_params="SMTPUTF8", rcpts=["<\u00fc@example.test>"])
    c.send("DATA\r\nhi\r\n.\r\n")
    msg = c.spool.messages[0]
    rec = re.sub(r"\r\n[ \t]+", " ", received_of(msg))
    assert " with UTF8SMTP " in rec
    assert " for <\u00fc@example.test>;" in rec
    assert msg.protocol == "UTF8SMTP"


def test_received_header_hostile_helo_sanitized():
    c = Client()
    c.ehlo("evil\x7f(comment)")
    c.cmd("MAIL FROM:<a@example.org>")
    c.cmd("RCPT TO:<u@example.test>")
    c.send("DATA\r\nhi\r\n.\r\n")
    rec = received_of(c.spool.messages[0])
    assert "(comment)" not in rec
    assert "\x7f" not in rec


@pytest.mark.parametrize("wire, header_block", [
    (b"Subject: x\r\nFrom: a@example.org\r\n\r\nbody\r\n..dot\r\n",
     b"Subject: x\r\nFrom: a@example.org\r\n\r\n"),
    (b"Subject: x\r\n  folded\r\n\r\n", b"Subject: x\r\n  folded\r\n\r\n"),
    (b"no header here\r\n\r\nX: y\r\n", b""),
    (b"Subject: only headers\r\n", b"Subject: only headers\r\n"),
    (b"\r\nbody only\r\n", b"\r\n"),
    (b"", b""),
])
def test_stored_headers_and_body(wire, header_block):
    c = Client()
    c.start()
    stuffed = wire.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    c.send(b"DATA\r\n" + stuffed + b".\r\n")
    msg = c.spool.messages[0]
    rec = received_of(msg).encode()
    assert bytes(msg.headers) == rec + header_block
    assert bytes(msg.headers) + bytes(msg.body) == rec + wire
    assert msg.size == len(msg.headers) + len(msg.body)


# -- a whole session, cut anywhere ------------------------------------------------------

SESSION = (b"EHLO client.example.org\r\n"
           b"MAIL FROM:<a@example.org> SIZE=100\r\n"
           b"RCPT TO:<u@example.test> NOTIFY=FAILURE\r\n"
           b"RCPT TO:<x@example.org>\r\n"
           b"DATA\r\n"
           b"Subject: cut\r\n\r\n..a\r\n.\r\n"
           b"MAIL FROM:<>\r\n"
           b"RCPT TO:<postmaster>\r\n"
           b"BDAT 5\r\nhe\r\n\rBDAT 3 LAST\r\n\nx\n"
           b"MAIL FROM:<>\r\nRCPT TO:<v@example.test>\r\n"
           b"BDAT 4 LAST\r\nhi\r\n"
           b"VRFY x\r\nQUIT\r\n")
SESSION_CODES = ["250", "250 2.1.0", "250 2.1.5", "554 5.7.1", "354", "250 2.0.0",
                 "250 2.1.0", "250 2.1.5", "250 2.0.0", "554 5.6.0",
                 "250 2.1.0", "250 2.1.5", "250 2.0.0", "252 2.5.0", "221 2.0.0"]


@hsettings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(SESSION)), max_size=12),
       st.booleans())
def test_session_cut_at_random_points(cuts, sync):
    c = Client(spool=FakeSpool(auto=sync))
    pieces = []
    prev = 0
    for cut in sorted(cuts) + [len(SESSION)]:
        pieces.append(SESSION[prev:cut])
        prev = cut
    replies = []
    for piece in pieces:
        replies += c.send(piece)
        if not sync:
            while any(not d.called for _, d in c.spool.calls):
                [d for _, d in c.spool.calls if not d.called][0].callback("QID")
                replies += c.take()
    assert codes(replies) == SESSION_CODES
    assert [stored_content(m) for m in c.spool.messages] == [b"Subject: cut\r\n\r\n.a\r\n",
                                                               b"hi\r\n"]
    assert c.closing


def test_mail_loop_refused_by_hop_count():
    # 49 Received lines + ours would be the 50th hop: refused as a loop
    # (RFC 5321 §6.3), nothing stored, the session goes on.
    c = Client()
    c.start()
    looping = "".join(f"Received: from h{i} by h{i + 1}; date\r\n" for i in range(50))
    assert codes(c.send("DATA\r\n" + looping + "Subject: x\r\n\r\nhi\r\n.\r\n")) == [
        "354", "554 5.4.6"]
    assert c.spool.messages == []
    c.start()
    fine = "".join(f"Received: from h{i}\r\n" for i in range(49))
    assert codes(c.send("DATA\r\n" + fine + "\r\nhi\r\n.\r\n")) == ["354"]
    assert len(c.spool.messages) == 1
