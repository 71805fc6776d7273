"""End-to-end tests of the outbound relay (Step 2) with real parts only:
smtplib sends to the real ``twistd mta`` (conftest.MTADaemon), which routes
through ``[routes]``, ``[relay] smarthost`` or DNS MX (the real twisted.names
test server of tests/dnsserver.py, on loopback) to scripted next hops
(tests/peers.py, in subprocesses, on 127.0.0.x) or Postfix's smtp-sink.

Bounces are read where they arrive: the sender's domain is routed to a
second peer, and the DSN it receives is parsed with the stdlib ``email``
package.  Every wait polls against a deadline; nothing sleeps a fixed time.
"""
from __future__ import annotations

import email
import email.policy
import email.utils
import os
import re
import shutil
import smtplib
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import free_port, toml_text, wait_for
from dnsserver import blackhole
from peers import DEFAULT_EXTENSIONS

HOSTNAME = "mx.e2e.test"     # conftest's default [server] hostname
SENDER = "alice@origin.test"
DELIVERY = 15.0              # seconds allowed for a delivery that should happen now


# --------------------------------------------------------------------------- helpers

def relay_config(*, routes: dict[str, str] | None = None, dns_port: int | None = None,
                 relay: dict | None = None, retry: dict | None = None,
                 dns_timeout: str = "1s") -> str:
    """``extra`` text for mta_factory: delivery on, the given routes, and a
    loopback nameserver (the test DNS server, or conftest's dead 127.0.0.1:9)."""
    sections: dict = {"relay": dict(relay or {})}
    sections["dns"] = {"nameservers": [f"127.0.0.1:{dns_port or 9}"], "timeout": dns_timeout}
    if retry:
        sections["retry"] = retry
    text = toml_text(sections)
    if routes:
        text += "[routes]\n" + "".join(f'"{d}" = "{hp}"\n' for d, hp in routes.items())
    return text


def send(mta, sender: str, rcpts: list[str], data: bytes, mail_options=(),
         rcpt_options=()) -> str:
    """One smtplib transaction; returns the queue id from the 250 reply."""
    with smtplib.SMTP(mta.host, mta.port, local_hostname="client.e2e.test", timeout=10) as s:
        s.ehlo("client.e2e.test")
        code, text = s.mail(sender, list(mail_options))
        assert code == 250, text
        for r in rcpts:
            opts = rcpt_options(r) if callable(rcpt_options) else list(rcpt_options)
            code, text = s.rcpt(r, opts)
            assert code == 250, (r, text)
        code, text = s.data(data)
    assert code == 250, text
    m = re.search(rb"queued as ([0-9A-Z]+)", text)
    assert m, text
    return m.group(1).decode()


def message(subject: str = "test", body: bytes = b"Hello.\r\n",
            extra_headers: bytes = b"") -> bytes:
    return (b"From: Alice <alice@origin.test>\r\n"
            b"To: bob@dest.test\r\n"
            b"Subject: " + subject.encode() + b"\r\n"
            b"Message-ID: <" + subject.replace(" ", "-").encode() + b"@origin.test>\r\n"
            + extra_headers + b"\r\n" + body)


_RECEIVED = re.compile(rb"Received: [^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*")


def split_received(data: bytes) -> tuple[bytes, bytes]:
    """(our Received field, the rest) of content as a next hop got it."""
    m = _RECEIVED.match(data)
    assert m, data[:300]
    return data[:m.end()], data[m.end():]


def spool_empty(mta) -> bool:
    return mta.count("messages") == 0 and mta.count("recipients") == 0


def wait_spool_empty(mta, timeout: float = DELIVERY) -> None:
    wait_for(lambda: spool_empty(mta), timeout, "the spool to drain", interval=0.05)


def delivery_lines(mta, qid: str) -> list[str]:
    return [ln.split("] ", 1)[1] for ln in mta.log().splitlines()
            if f"] {qid}: to=<" in ln]


def log_line_re(qid: str, rcpt: str, relay: str, *, attempts: int, dsn: str,
                status: str, reply: str = r".*", tls: str = "none") -> str:
    return (rf"{qid}: to=<{re.escape(rcpt)}> relay={relay} tls={tls} delay=\d+(\.\d+)? "
            rf"attempts={attempts} dsn={re.escape(dsn)} status={status} \({reply}\)")


def said(reply: str) -> str:
    """The log form (a regex) of a reply that the next hop on 127.0.0.1 sent."""
    return re.escape(f"host 127.0.0.1[127.0.0.1] said: {reply}")


def rcpt_rows(mta, qid: str) -> dict[str, dict]:
    return {r["address"]: dict(r) for r in mta.rows(
        "SELECT * FROM recipients WHERE queue_id = ?", (qid,))}


def dsns(peer) -> list:
    """The DSNs a peer received (transactions from <>), as (transaction, parsed message)."""
    return [(tx, email.message_from_bytes(tx.data, policy=email.policy.default))
            for tx in peer.transactions() if tx.mail_address == ""]


def wait_dsns(peer, n: int, timeout: float = DELIVERY) -> list:
    return wait_for(lambda: (lambda d: d if len(d) >= n else None)(dsns(peer)), timeout,
                    f"{n} DSN(s) at {peer.address}", interval=0.05)


def report(msg) -> tuple[object, list]:
    """(per-message block, [per-recipient blocks]) of a multipart/report DSN."""
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = list(msg.iter_parts())
    assert parts[0].get_content_type() == "text/plain"
    assert parts[1].get_content_type() in ("message/delivery-status",
                                           "message/global-delivery-status")
    blocks = parts[1].get_payload()
    if parts[1].get_content_type() == "message/global-delivery-status":
        # The stdlib parses only message/delivery-status into its blocks; the
        # RFC 6533 form comes back as one message: split its body ourselves.
        [first] = blocks
        text = first.get_payload(decode=True).decode("utf-8")
        blocks = [first] + [email.message_from_string(b + "\n", policy=email.policy.default)
                            for b in re.split(r"\r?\n\r?\n", text) if b.strip()]
    return blocks[0], blocks[1:]


def per_recipient(msg) -> dict[str, object]:
    _, blocks = report(msg)
    return {b["Final-Recipient"].split(";", 1)[1].strip(): b for b in blocks}


def mx_peers(peer_factory, addresses: list[str], script: dict | None = None) -> tuple[int, list]:
    """Peers on several loopback addresses that share one port (MX delivery
    goes to one [relay] port for every host)."""
    for _ in range(20):
        port = free_port(addresses[0])
        peers = [peer_factory.new(script, interface=a, port=port) for a in addresses]
        for peer in peers:
            peer.spawn()
        try:
            return port, [peer.wait_started() for peer in peers]
        except AssertionError:
            for peer in peers:
                peer.stop()     # the port was taken on another address meanwhile
    raise AssertionError("no common free port")


def refused(address: str, port: int) -> bool:
    try:
        socket.create_connection((address, port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def body_with_dot_lines_at(offsets: list[int], total: int) -> bytes:
    """A body whose lines starting with "." begin exactly at *offsets* (so
    that CRLF and the dot fall on both sides of the client's 64 KiB writes),
    plus lines that are only dots, filled with ordinary lines to *total*."""
    out = bytearray(b".first line starts with a dot\r\n.\r\n..\r\n...\r\n. \r\n")
    for target in sorted(offsets):
        while target - len(out) > 100:
            out += b"y" * 78 + b"\r\n"
        out += b"z" * (target - len(out) - 2) + b"\r\n"
        assert len(out) == target
        out += b".dot at %d\r\n" % target
    while len(out) < total:
        out += b"w" * 60 + b"\r\n"
    return bytes(out + b".\r\n.last line\r\n")


# --------------------------------------------------------------------------- routes / smarthost

def test_route_delivers_byte_exact_in_one_transaction(mta_factory, peer_factory):
    dest, other = peer_factory.spawn(None, None)
    mta = mta_factory(extra=relay_config(routes={"dest.test": dest.address,
                                                 "other.test": other.address}))
    peer_factory.ready()
    # Dots at line starts everywhere, and across the client's 64 KiB writes
    # (the body is its own part: 65536 is a write boundary; so is 131072,
    # which falls between the CR and the LF of the line before a dot line;
    # and the body starts with a dot line, right after the header part).
    body = body_with_dot_lines_at([65536, 131073], 140000)
    data = message("byte exact", body, b"X-Eight: caf\xc3\xa9\r\n")
    rcpts = ["a@dest.test", "B.Person@dest.test", "c@Dest.TEST", "x@other.test"]
    qid = send(mta, SENDER, rcpts, data, ["BODY=8BITMIME"])

    wait_spool_empty(mta)
    [tx] = dest.transactions()
    [tx2] = other.transactions()
    assert tx.mail_address == SENDER and tx2.mail_address == SENDER
    assert tx.mail_params.get("BODY") == "8BITMIME"
    assert sorted(tx.rcpts) == sorted(f"RCPT TO:<{r}>" for r in rcpts[:3])
    assert sorted(tx.accepted) == sorted(rcpts[:3])
    assert tx2.rcpts == ["RCPT TO:<x@other.test>"]
    for t in (tx, tx2):
        assert t.method == "DATA" and t.complete
        received, rest = split_received(t.data)
        assert rest == data                      # byte-exact apart from our Received line
        assert re.match(rb"Received: from client\.e2e\.test \(\[127\.0\.0\.1\]\)\r\n"
                        rb"\tby mx\.e2e\.test \(mta\) with ESMTP id " + qid.encode(), received)
        # It was stuffed on the wire: every line that starts with a dot got one more.
        assert t.raw.count(b"\r\n..") == (b"\r\n" + t.data).count(b"\r\n.")
    assert rest.count(b"\r\n.dot at ") == 2

    lines = delivery_lines(mta, qid)
    assert len(lines) == 4, lines
    for r in rcpts:
        peer = dest if r.lower().endswith("@dest.test") else other
        relay = re.escape(f"127.0.0.1[127.0.0.1]:{peer.port}")
        assert any(re.fullmatch(log_line_re(qid, r, relay, attempts=1, dsn="2.0.0", status="sent",
                                            reply=r"250 2\.0\.0 Ok: queued as Q1"), ln)
                   for ln in lines), (r, lines)


def test_smarthost_takes_everything_but_routes(mta_factory, peer_factory):
    smarthost, special = peer_factory.spawn(None, None)
    [v6] = peer_factory.spawn(None, interface="::1")
    mta = mta_factory(extra=relay_config(relay={"smarthost": smarthost.address},
                                         routes={"special.test": special.address,
                                                 "v6.test": v6.address}))
    peer_factory.ready()
    data = message("smarthost", b"..\r\n.\r\nend\r\n")
    qid = send(mta, SENDER, ["a@one.test", "b@one.test", "c@two.test", "d@special.test",
                             "e@v6.test"], data)
    wait_spool_empty(mta)
    [tx] = v6.transactions()
    assert tx.accepted == ["e@v6.test"] and split_received(tx.data)[1] == data
    assert any(f"to=<e@v6.test> relay=::1[::1]:{v6.port} " in ln
               for ln in delivery_lines(mta, qid)), delivery_lines(mta, qid)

    txs = smarthost.transactions()
    # Same next hop (the smarthost), one transaction, whatever the domains.
    assert [sorted(t.accepted) for t in txs] == [["a@one.test", "b@one.test", "c@two.test"]]
    assert [t.accepted for t in special.transactions()] == [["d@special.test"]]
    for t in txs + special.transactions():
        assert t.mail_address == SENDER
        assert split_received(t.data)[1] == data
    lines = delivery_lines(mta, qid)
    assert sum(f"relay=127.0.0.1[127.0.0.1]:{smarthost.port} " in ln for ln in lines) == 3
    assert sum(f"relay=127.0.0.1[127.0.0.1]:{special.port} " in ln for ln in lines) == 1
    assert len(lines) == 5
    assert all("status=sent" in ln and "attempts=1" in ln for ln in lines)


# --------------------------------------------------------------------------- DNS MX

def test_relay_port_config():
    from mta.config import ConfigError, config_from_dict
    assert config_from_dict({}).relay.port == 25
    assert config_from_dict({"relay": {"port": 2525}}).relay.port == 2525
    for bad in (0, 65536, "25", True):
        with pytest.raises(ConfigError) as e:
            config_from_dict({"relay": {"port": bad}}, "mta.toml")
        assert str(e.value).startswith("mta.toml: [relay] port: ")



def test_mx_routing(mta_factory, peer_factory, dns_factory):
    port, (second, implicit, real) = mx_peers(peer_factory, ["127.0.0.3", "127.0.0.4",
                                                             "127.0.0.21"])
    assert refused("127.0.0.2", port)
    [origin] = peer_factory.spawn(None)
    dns_port = dns_factory([
        # The preferred MX refuses connections; the second takes the mail.
        "pref.e2e.test MX 10 mx1.pref.e2e.test",
        "pref.e2e.test MX 20 mx2.pref.e2e.test",
        "mx1.pref.e2e.test A 127.0.0.2",
        "mx2.pref.e2e.test A 127.0.0.3",
        # No MX: the domain's own address is the implicit MX.
        "implicit.e2e.test A 127.0.0.4",
    ])
    mta = mta_factory(extra=relay_config(dns_port=dns_port, relay={"port": port},
                                         routes={"origin.test": origin.address}))
    peer_factory.ready()
    data = message("mx")
    # alias.test is a CNAME of real.test, whose MX is mx.real.test (127.0.0.21): see dnsserver.ZONE.
    qid = send(mta, SENDER, ["a@pref.e2e.test", "b@pref.e2e.test", "c@implicit.e2e.test",
                             "d1@nullmx.test", "d2@nullmx.test", "e@nosuch.e2e.test",
                             "f@alias.test", "g@[127.0.0.3]"], data)
    wait_spool_empty(mta)

    # An address literal goes straight to that address, at the [relay] port.
    assert sorted(sorted(t.accepted) for t in second.transactions()) == [
        ["a@pref.e2e.test", "b@pref.e2e.test"], ["g@[127.0.0.3]"]]
    assert [t.accepted for t in implicit.transactions()] == [["c@implicit.e2e.test"]]
    assert [t.accepted for t in real.transactions()] == [["f@alias.test"]]
    for t in second.transactions() + implicit.transactions() + real.transactions():
        assert split_received(t.data)[1] == data

    lines = delivery_lines(mta, qid)
    assert any(re.fullmatch(log_line_re(qid, "a@pref.e2e.test",
                                        re.escape(f"mx2.pref.e2e.test[127.0.0.3]:{port}"),
                                        attempts=1, dsn="2.0.0", status="sent"), ln)
               for ln in lines), lines
    assert any(re.fullmatch(log_line_re(qid, "c@implicit.e2e.test",
                                        re.escape(f"implicit.e2e.test[127.0.0.4]:{port}"),
                                        attempts=1, dsn="2.0.0", status="sent"), ln)
               for ln in lines), lines
    assert any(re.fullmatch(log_line_re(qid, "f@alias.test",
                                        re.escape(f"mx.real.test[127.0.0.21]:{port}"),
                                        attempts=1, dsn="2.0.0", status="sent"), ln)
               for ln in lines), lines
    for r in ("d1@nullmx.test", "d2@nullmx.test"):
        assert any(re.fullmatch(log_line_re(qid, r, "none", attempts=1, dsn="5.1.10",
                                            status="bounced"), ln) for ln in lines), lines
    assert any(re.fullmatch(log_line_re(qid, "e@nosuch.e2e.test", "none", attempts=1,
                                        dsn="5.1.2", status="bounced"), ln) for ln in lines), lines
    assert re.search(rf"{qid}: mx1\.pref\.e2e\.test\[127\.0\.0\.2\]:{port}: 451 4\.4\.1 .*refused",
                     mta.log()), mta.log()

    # One DSN for the message and attempt, though its failed recipients were
    # routed as two domains (two jobs).
    wait_spool_empty(mta)           # the DSN too has left
    [(tx, dsn)] = dsns(origin)
    assert tx.rcpts == [f"RCPT TO:<{SENDER}> NOTIFY=NEVER"]
    blocks = per_recipient(dsn)
    assert {r: b["Status"] for r, b in blocks.items()} == {
        "d1@nullmx.test": "5.1.10", "d2@nullmx.test": "5.1.10", "e@nosuch.e2e.test": "5.1.2"}
    assert all(b["Action"] == "failed" for b in blocks.values())
    # No route is our own finding: no remote MTA said it (RFC 3464 §2.3.5/2.3.6).
    assert all("Remote-MTA" not in b and str(b["Diagnostic-Code"]).startswith("X-mta;")
               for b in blocks.values())


def test_dns_timeout_defers(mta_factory):
    port, close = blackhole()      # a nameserver that never answers
    try:
        mta = mta_factory(extra=f'[relay]\n[dns]\nnameservers = ["127.0.0.1:{port}"]\n'
                                f'timeout = "1s"\n')
        qid = send(mta, SENDER, ["bob@slowdns.test"], message("dns timeout"))
        rows = wait_for(lambda: (lambda r: r if r and r["bob@slowdns.test"]["state"] == "deferred"
                                 else None)(rcpt_rows(mta, qid)), DELIVERY, "the deferral")
        row = rows["bob@slowdns.test"]
        assert row["attempts"] == 1
        assert row["last_reply"].startswith("451 4.4.3 "), row
        assert "timeout" in row["last_reply"]
        assert any(re.fullmatch(log_line_re(qid, "bob@slowdns.test", "none", attempts=1,
                                            dsn="4.4.3", status="deferred"), ln)
                   for ln in delivery_lines(mta, qid))
        assert mta.count("messages") == 1
    finally:
        close()


# --------------------------------------------------------------------------- 4xx: retry, expiry

def test_deferral_then_retry_delivers(mta_factory, peer_factory):
    [dest] = peer_factory.spawn({"actions": {"RCPT@1#1": "451 4.3.0 Try again later"}})
    mta = mta_factory(extra=relay_config(routes={"dest.test": dest.address},
                                         retry={"first": "1s", "max": "1s"}))
    peer_factory.ready()
    data = message("retry")
    t0 = time.time()
    qid = send(mta, SENDER, ["bob@dest.test"], data)
    row = wait_for(lambda: (lambda r: r if r and r["state"] != "queued" and r["state"] != "inflight"
                            else None)(rcpt_rows(mta, qid).get("bob@dest.test")),
                   DELIVERY, "the first attempt", interval=0.005)
    t1 = time.time()
    assert row["state"] == "deferred", row
    assert row["attempts"] == 1
    assert row["last_reply"] == "451 4.3.0 Try again later"
    # next_attempt = attempt time + first (1 s) with +-10 % jitter.
    assert t0 + 0.9 - 0.05 <= row["next_attempt"] <= t1 + 1.1 + 0.05, (t0, row, t1)

    wait_spool_empty(mta)
    [tx] = dest.transactions()
    assert tx.accepted == ["bob@dest.test"]
    assert split_received(tx.data)[1] == data
    relay = re.escape(f"127.0.0.1[127.0.0.1]:{dest.port}")
    lines = delivery_lines(mta, qid)
    assert re.fullmatch(log_line_re(qid, "bob@dest.test", relay, attempts=1, dsn="4.3.0",
                                    status="deferred",
                                    reply=said("451 4.3.0 Try again later")),
                        lines[0]), lines
    assert re.fullmatch(log_line_re(qid, "bob@dest.test", relay, attempts=2, dsn="2.0.0",
                                    status="sent"), lines[1]), lines
    assert len(lines) == 2


# --------------------------------------------------------------------------- bounces

def test_bounce_for_5xx_recipient(mta_factory, peer_factory):
    reject = "550 5.1.1 <bad@dest.test>: Recipient address rejected: User unknown"
    dest, origin = peer_factory.spawn(
        {"rcpt": {"bad@dest.test": reject}},
        None,
    )
    mta = mta_factory(extra=relay_config(routes={"dest.test": dest.address,
                                                 "origin.test": origin.address}))
    peer_factory.ready()
    data = message("bounce", b"Original body.\r\n.dotted\r\n")
    before = time.time()
    qid = send(mta, SENDER, ["good@dest.test", "bad@dest.test"], data,
               ["ENVID=env+2Bid.1"], lambda r: [f"ORCPT=rfc822;orig-{r}"])
    [(tx, dsn)] = wait_dsns(origin, 1)
    wait_spool_empty(mta)

    # The good recipient was delivered in the same transaction.
    [delivered] = dest.transactions()
    assert sorted(delivered.rcpts) == sorted([
        "RCPT TO:<good@dest.test> ORCPT=rfc822;orig-good@dest.test",
        "RCPT TO:<bad@dest.test> ORCPT=rfc822;orig-bad@dest.test"])
    assert delivered.accepted == ["good@dest.test"]

    # The DSN: from <> to the sender, an RFC 3464 report.
    assert tx.mail_address == ""
    assert tx.rcpts == [f"RCPT TO:<{SENDER}> NOTIFY=NEVER"]   # never a DSN about a DSN
    assert "MAILER-DAEMON" in dsn["From"]
    assert dsn["From"].addresses[0].addr_spec == f"MAILER-DAEMON@{HOSTNAME}"
    assert dsn["To"].addresses[0].addr_spec == SENDER
    assert dsn["Subject"] == "Undelivered Mail Returned to Sender"
    assert dsn["Auto-Submitted"] == "auto-replied"
    msg_block, blocks = report(dsn)
    assert msg_block["Reporting-MTA"] == f"dns;{HOSTNAME}"
    assert msg_block["Original-Envelope-Id"] == "env+id.1"
    arrival = email.utils.parsedate_to_datetime(msg_block["Arrival-Date"]).timestamp()
    assert before - 2 <= arrival <= time.time()
    [block] = blocks
    assert block["Final-Recipient"] == "rfc822;bad@dest.test"
    assert block["Original-Recipient"] == "rfc822;orig-bad@dest.test"
    assert block["Action"] == "failed"
    assert block["Status"] == "5.1.1"
    assert block["Remote-MTA"] == "dns;127.0.0.1"
    assert block["Diagnostic-Code"] == f"smtp;{reject}"
    assert email.utils.parsedate_to_datetime(block["Last-Attempt-Date"]).timestamp() >= arrival - 1
    parts = list(dsn.iter_parts())
    assert len(parts) == 3
    assert "bad@dest.test" in parts[0].get_content()
    assert parts[2].get_content_type() == "message/rfc822"
    [original] = parts[2].get_payload()
    assert original["Subject"] == "bounce"
    # The original comes back whole: our Received line + what was sent.
    stored = delivered.data
    assert stored in tx.data
    assert split_received(stored)[1] == data

    lines = delivery_lines(mta, qid)
    relay = re.escape(f"127.0.0.1[127.0.0.1]:{dest.port}")
    assert any(re.fullmatch(log_line_re(qid, "bad@dest.test", relay, attempts=1, dsn="5.1.1",
                                        status="bounced", reply=said(reject)), ln)
               for ln in lines), lines
    assert re.search(rf"{qid}: sender non-delivery notification: [0-9A-Z]+", mta.log())


def test_bounce_with_ret_hdrs_and_rejected_content(mta_factory, peer_factory):
    dest, content, origin = peer_factory.spawn(
        {"rcpt": {"bad@dest.test": "550 5.7.1 Go away"}},
        {"actions": {"DATA_END": "554 5.6.0 Content rejected\nby policy"}},
        None)
    mta = mta_factory(extra=relay_config(routes={"dest.test": dest.address,
                                                 "content.test": content.address,
                                                 "origin.test": origin.address}))
    peer_factory.ready()
    data = message("headers only", b"SECRET BODY\r\n")
    send(mta, SENDER, ["bad@dest.test"], data, ["RET=HDRS"])
    [(tx, dsn)] = wait_dsns(origin, 1)
    parts = list(dsn.iter_parts())
    assert parts[2].get_content_type() == "text/rfc822-headers"
    assert b"SECRET BODY" not in tx.data
    assert b"Subject: headers only" in tx.data
    [block] = per_recipient(dsn).values()
    assert block["Status"] == "5.7.1"
    assert "Original-Recipient" not in block

    # A 5xx after the content fails every recipient of the transaction; the
    # multi-line reply is kept as one line.
    qid = send(mta, SENDER, ["p@content.test", "q@content.test"], message("rejected"))
    [_, (tx, dsn)] = wait_dsns(origin, 2)
    wait_spool_empty(mta)
    blocks = per_recipient(dsn)
    assert set(blocks) == {"p@content.test", "q@content.test"}
    for block in blocks.values():
        assert block["Status"] == "5.6.0"
        assert block["Diagnostic-Code"] == "smtp;554 5.6.0 Content rejected by policy"
    assert len(content.transactions()) == 1
    assert all("status=bounced" in ln and "dsn=5.6.0" in ln
               for ln in delivery_lines(mta, qid)), delivery_lines(mta, qid)


def test_notify_never_success_and_delay(mta_factory, peer_factory):
    """RFC 3461 §6.2.7: NOTIFY=SUCCESS to a next hop with DSN passes the duty
    on (no report from us); to hops without DSN, one "relayed" report per
    message, even when its recipients went to two next hops."""
    plain_ext = [e for e in DEFAULT_EXTENSIONS if e != "DSN"]
    dsn_peer, plain, plain2, origin = peer_factory.spawn(
        {"rcpt": {"never@dsn.test": "550 5.1.1 No such user"}},
        {"extensions": plain_ext},
        {"extensions": plain_ext},
        None,
    )
    mta = mta_factory(extra=relay_config(routes={"dsn.test": dsn_peer.address,
                                                 "plain.test": plain.address,
                                                 "plain2.test": plain2.address,
                                                 "origin.test": origin.address}))
    peer_factory.ready()
    send(mta, SENDER, ["never@dsn.test"], message("never"), rcpt_options=["NOTIFY=NEVER"])
    wait_spool_empty(mta)
    send(mta, SENDER, ["ok@dsn.test"], message("passed on"), rcpt_options=["NOTIFY=SUCCESS"])
    wait_spool_empty(mta)           # a DSN is spooled with the result: none was
    assert dsns(origin) == []
    send(mta, SENDER, ["ok@plain.test", "ok@plain2.test", "two@dsn.test"], message("relayed"),
         rcpt_options=["NOTIFY=SUCCESS"])
    wait_spool_empty(mta)
    [(_, relayed)] = dsns(origin)   # one report for the message, not one per next hop
    assert relayed["Subject"] == "Successful Mail Delivery Report"
    blocks = per_recipient(relayed)
    assert sorted(blocks) == ["ok@plain.test", "ok@plain2.test"]   # not the DSN hop's
    for rcpt, block in blocks.items():
        assert block["Final-Recipient"] == f"rfc822;{rcpt}"
        assert block["Action"] == "relayed"
        assert block["Status"] == "2.0.0"
    # NOTIFY=SUCCESS alone: only the headers come back (RFC 3461 RET default).
    assert list(relayed.iter_parts())[2].get_content_type() == "text/rfc822-headers"
    # The DSN-capable peer was told NOTIFY (it owes the report now); the others were not.
    assert [t.rcpts for t in dsn_peer.transactions() if t.accepted] == [
        ["RCPT TO:<ok@dsn.test> NOTIFY=SUCCESS"], ["RCPT TO:<two@dsn.test> NOTIFY=SUCCESS"]]
    assert [t.rcpts for t in plain.transactions()] == [["RCPT TO:<ok@plain.test>"]]
    assert [t.rcpts for t in plain2.transactions()] == [["RCPT TO:<ok@plain2.test>"]]


def test_warn_after_then_lifetime_expiry(mta_factory, peer_factory):
    """4xx until the lifetime runs out: one "delayed" DSN after warn_after,
    however many attempts follow, then a "failed" one with status 4.4.7."""
    dest, origin = peer_factory.spawn(
        {"rcpt": {"slow@dest.test": "452 4.2.2 Mailbox full"}}, None)
    mta = mta_factory(extra=relay_config(
        routes={"dest.test": dest.address, "origin.test": origin.address},
        # warn_after under first: the second attempt (at 0.9 s or later) warns.
        retry={"first": "1s", "max": "1s", "lifetime": "3s", "warn_after": "0.5s"}))
    peer_factory.ready()
    data = message("expiry")
    qid = send(mta, SENDER, ["slow@dest.test"], data)
    got = wait_dsns(origin, 2, timeout=20)
    wait_spool_empty(mta)
    assert len(dsns(origin)) == 2
    (_, delayed), (_, failed) = got

    assert delayed["Subject"] == "Delayed Mail (still being retried)"
    [block] = per_recipient(delayed).values()
    assert block["Action"] == "delayed"
    assert block["Status"] == "4.2.2"
    assert block["Diagnostic-Code"] == "smtp;452 4.2.2 Mailbox full"
    assert "Will-Retry-Until" in block
    assert list(delayed.iter_parts())[2].get_content_type() == "text/rfc822-headers"

    assert failed["Subject"] == "Undelivered Mail Returned to Sender"
    [block] = per_recipient(failed).values()
    assert block["Action"] == "failed"
    assert block["Status"] == "4.4.7"
    assert block["Diagnostic-Code"] == "smtp;452 4.2.2 Mailbox full"
    returned = list(failed.iter_parts())[2]
    assert returned.get_content_type() == "message/rfc822"
    assert returned.get_payload()[0]["Subject"] == "expiry"

    lines = delivery_lines(mta, qid)
    relay = re.escape(f"127.0.0.1[127.0.0.1]:{dest.port}")
    assert len(lines) >= 3, lines            # attempts at about 0 s, 1 s, 2 s and 3 s
    for n, line in enumerate(lines[:-1], 1):
        assert re.fullmatch(log_line_re(qid, "slow@dest.test", relay, attempts=n, dsn="4.2.2",
                                        status="deferred",
                                        reply=said("452 4.2.2 Mailbox full")),
                            line), lines
    assert re.fullmatch(log_line_re(qid, "slow@dest.test", relay, attempts=len(lines),
                                    dsn="4.4.7", status="expired"), lines[-1]), lines
    assert len(re.findall(rf"{qid}: sender delay notification", mta.log())) == 1
    assert len(re.findall(rf"{qid}: sender non-delivery notification", mta.log())) == 1
    assert dest.transactions() == []          # RCPT never accepted: no content sent


# --------------------------------------------------------------------------- no bounce loops

def test_failed_bounce_is_dropped(mta_factory, peer_factory):
    [dest] = peer_factory.spawn({"rcpt": {"bad@dest.test": "550 5.1.1 No such user"}})
    mta = mta_factory(extra=relay_config(routes={"dest.test": dest.address}))
    peer_factory.ready()
    qid = send(mta, "", ["bad@dest.test"], message("from null"))
    wait_spool_empty(mta)
    assert dest.transactions() == []
    assert re.search(rf"{qid}: bounce undeliverable, dropped", mta.log())
    assert "sender non-delivery notification" not in mta.log()
    # Nothing was attempted afterwards: this was the only delivery line.
    assert len([ln for ln in mta.log().splitlines() if " to=<" in ln]) == 1


def test_failed_bounce_goes_to_postmaster_once(mta_factory, peer_factory):
    dest, admin = peer_factory.spawn(
        {"rcpt": {"bad@dest.test": "550 5.1.1 No such user"}},
        None,
    )
    mta = mta_factory(extra=relay_config(routes={"dest.test": dest.address,
                                                 "admin.test": admin.address},
                                         relay={"postmaster": "postmaster@admin.test"}))
    peer_factory.ready()
    qid = send(mta, "", ["bad@dest.test"], message("null sender to postmaster"))
    [(tx, dsn)] = wait_dsns(admin, 1)
    wait_spool_empty(mta)
    assert len(admin.transactions()) == 1
    assert tx.rcpts == ["RCPT TO:<postmaster@admin.test> NOTIFY=NEVER"]
    [block] = per_recipient(dsn).values()
    assert block["Final-Recipient"] == "rfc822;bad@dest.test"
    assert block["Status"] == "5.1.1"
    assert len(re.findall(rf"{qid}: sender non-delivery notification", mta.log())) == 1


def test_failed_postmaster_report_is_not_reported_again(mta_factory, peer_factory):
    dest, admin = peer_factory.spawn(
        {"rcpt": {"bad@dest.test": "550 5.1.1 No such user"}},
        {"rcpt": {"postmaster@admin.test": "550 5.1.1 No postmaster here"}},
    )
    mta = mta_factory(extra=relay_config(routes={"dest.test": dest.address,
                                                 "admin.test": admin.address},
                                         relay={"postmaster": "postmaster@admin.test"}))
    peer_factory.ready()
    send(mta, "", ["bad@dest.test"], message("loop"))
    wait_spool_empty(mta)
    to_lines = [ln for ln in mta.log().splitlines() if " to=<" in ln]
    assert len(to_lines) == 2, to_lines      # the message, then its report to the postmaster
    assert "to=<postmaster@admin.test>" in to_lines[1] and "status=bounced" in to_lines[1]
    assert mta.log().count("notification:") == 1
    assert admin.transactions() == [] and dest.transactions() == []


# --------------------------------------------------------------------------- next hop limits

def test_next_hop_limits_bounce_without_mangling(mta_factory, peer_factory):
    base = ["PIPELINING", "ENHANCEDSTATUSCODES", "DSN"]
    small, ascii_only, seven_bit, origin = peer_factory.spawn(
        {"extensions": base + ["SIZE 1000", "8BITMIME", "SMTPUTF8"]},
        {"extensions": base + ["SIZE 100000", "8BITMIME"]},
        {"extensions": base + ["SIZE 100000", "SMTPUTF8"]},
        None,
    )
    mta = mta_factory(extra=relay_config(routes={"small.test": small.address,
                                                 "ascii.test": ascii_only.address,
                                                 "sevenbit.test": seven_bit.address,
                                                 "origin.test": origin.address}))
    peer_factory.ready()
    send(mta, SENDER, ["big@small.test"], message("big", b"x" * 70 + b"\r\n") * 40)
    send(mta, SENDER, ["j\u00f6rg@ascii.test"], message("utf8", b"Gr\xc3\xbc\xc3\x9fe\r\n"),
         ["SMTPUTF8", "BODY=8BITMIME"])
    # 8-bit in a header field: no 7-bit form exists (only SMTPUTF8 carries it).
    send(mta, SENDER, ["eight@sevenbit.test"],
         message("8bit", b"Hello\r\n", b"X-Note: Gr\xc3\xbc\xc3\x9fe\r\n"), ["BODY=8BITMIME"])
    got = wait_dsns(origin, 3)
    wait_spool_empty(mta)
    status = {}
    for _tx, dsn in got:
        for rcpt, block in per_recipient(dsn).items():
            status[rcpt] = (block["Status"], block["Diagnostic-Code"])
    assert status["big@small.test"][0] == "5.3.4"
    assert status["j\u00f6rg@ascii.test"][0] == "5.6.7"
    assert status["eight@sevenbit.test"][0] == "5.6.3"
    assert ("could not be converted: 8-bit octets in a header field"
            in " ".join(status["eight@sevenbit.test"][1].split()))
    # Nothing was sent to them: the client checked before MAIL.
    assert not (small.transactions() or ascii_only.transactions() or seven_bit.transactions())


def test_8bit_converted_for_next_hop_without_8bitmime(mta_factory, peer_factory):
    """RFC 6152 §3: 8-bit MIME text is converted (not bounced) for a next hop
    without 8BITMIME; a message only declared BODY=8BITMIME goes as it is."""
    seven_bit, origin = peer_factory.spawn(
        {"extensions": ["PIPELINING", "ENHANCEDSTATUSCODES", "DSN", "SIZE 100000"]}, None)
    mta = mta_factory(extra=relay_config(routes={"sevenbit.test": seven_bit.address,
                                                 "origin.test": origin.address}))
    peer_factory.ready()
    ascii_msg = message("declared only")
    send(mta, SENDER, ["ascii@sevenbit.test"], ascii_msg, ["BODY=8BITMIME"])
    mime = (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"XyZ\"\r\n")
    parts = (b"--XyZ\r\nContent-Type: text/plain; charset=utf-8\r\n"
             b"Content-Transfer-Encoding: 8bit\r\n\r\nGr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln\r\n"
             b"--XyZ\r\nContent-Type: text/plain\r\n\r\nascii part\r\n--XyZ--\r\n")
    send(mta, SENDER, ["mime@sevenbit.test"], message("mime", parts, mime), ["BODY=8BITMIME"])
    wait_spool_empty(mta)
    got = {tx.accepted[0]: tx for tx in seven_bit.transactions() if tx.complete}
    assert sorted(got) == ["ascii@sevenbit.test", "mime@sevenbit.test"]
    a, m = got["ascii@sevenbit.test"], got["mime@sevenbit.test"]
    assert "BODY" not in a.mail_params and "BODY" not in m.mail_params
    assert split_received(a.data)[1] == ascii_msg
    assert m.data.isascii()
    assert (b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
            b"Gr=C3=BC=C3=9Fe aus K=C3=B6ln\r\n--XyZ\r\n"
            b"Content-Type: text/plain\r\n\r\nascii part\r\n--XyZ--\r\n") in m.data
    assert not dsns(origin)


# --------------------------------------------------------------------------- connections, DSN params

def test_connection_reuse_and_recipient_limit(mta_factory, peer_factory):
    [dest] = peer_factory.spawn(None)
    mta = mta_factory(extra=relay_config(routes={"dest.test": dest.address},
                                         relay={"recipient_limit": 2, "per_destination": 1}))
    peer_factory.ready()
    for i in range(4):
        send(mta, SENDER, [f"r{i}@dest.test"], message(f"reuse {i}"))
        wait_for(lambda: len(dest.transactions()) == i + 1, DELIVERY, f"message {i}")
    # Five recipients, at most two per transaction: three transactions, one body.
    rcpts = [f"m{i}@dest.test" for i in range(5)]
    data = message("limit")
    send(mta, SENDER, rcpts, data)
    wait_spool_empty(mta)
    txs = dest.transactions()
    assert [t.accepted for t in txs[:4]] == [[f"r{i}@dest.test"] for i in range(4)]
    assert sorted(len(t.accepted) for t in txs[4:]) == [1, 2, 2]
    assert sorted(r for t in txs[4:] for r in t.accepted) == rcpts
    assert all(split_received(t.data)[1] == data for t in txs[4:])
    assert {t.connection for t in txs} == {1}     # one connection for all seven transactions


def test_dsn_parameters_passed_only_to_dsn_peer(mta_factory, peer_factory):
    with_dsn, without = peer_factory.spawn(
        None,
        {"extensions": [e for e in DEFAULT_EXTENSIONS if e != "DSN"]},
    )
    mta = mta_factory(extra=relay_config(routes={"dsn.test": with_dsn.address,
                                                 "plain.test": without.address}))
    peer_factory.ready()
    opts = lambda r: ["NOTIFY=FAILURE,DELAY", f"ORCPT=rfc822;{r.upper()}"]  # noqa: E731
    send(mta, SENDER, ["a@dsn.test", "b@plain.test"], message("params"),
         ["RET=HDRS", "ENVID=abc+2Bdef"], opts)
    wait_spool_empty(mta)
    [t1] = with_dsn.transactions()
    [t2] = without.transactions()
    assert t1.mail_params.get("RET") == "HDRS"
    assert t1.mail_params.get("ENVID") == "abc+2Bdef"
    assert t1.rcpt_params(0) == {"NOTIFY": "FAILURE,DELAY", "ORCPT": "rfc822;A@DSN.TEST"}
    assert "RET" not in t2.mail_params and "ENVID" not in t2.mail_params
    assert t2.rcpts == ["RCPT TO:<b@plain.test>"]


SLOW_PEER = Path(__file__).with_name("test_crash_relay.py")   # peers.py with a slow final reply


def test_concurrency_limits(mta_factory, peer_factory):
    slow = {"data_end_delay_min": 0.2, "data_end_delay": 0.3}
    one, three = peer_factory.spawn(slow, slow, program=SLOW_PEER)
    mta = mta_factory(extra=relay_config(
        relay={"per_destination": 2, "concurrency": 3},
        routes={"one.test": one.address, "a.test": three.address, "b.test": three.address,
                "c.test": three.address}))
    peer_factory.ready()
    with smtplib.SMTP(mta.host, mta.port, timeout=10) as s:
        for i in range(8):
            s.sendmail(SENDER, [f"r{i}@one.test"], message(f"one {i}"))
    wait_spool_empty(mta)
    # At most two deliveries to one domain at a time: two connections, reused.
    assert {t.connection for t in one.transactions()} == {1, 2}
    with smtplib.SMTP(mta.host, mta.port, timeout=10) as s:
        for i in range(12):
            s.sendmail(SENDER, [f"r{i}@{'abc'[i % 3]}.test"], message(f"three {i}"))
    wait_spool_empty(mta)
    # Three domains could have six deliveries under way; the global limit is three.
    txs = three.transactions()
    assert len(txs) == 12
    assert {t.connection for t in txs} <= {1, 2, 3}
    assert len({t.connection for t in txs}) >= 2


# --------------------------------------------------------------------------- stop and restart

def test_sigterm_during_stalled_delivery_stops_promptly_and_retries(mta_factory, peer_factory):
    # The first connection swallows the content and never answers the final dot.
    [dest] = peer_factory.spawn({"actions": {"DATA_END@1": "stall"}})
    mta = mta_factory(extra=relay_config(routes={"dest.test": dest.address},
                                         relay={"shutdown_grace": "0.5s"}))
    peer_factory.ready()
    data = message("stalled")
    qid = send(mta, SENDER, ["bob@dest.test"], data)
    wait_for(lambda: dest.transactions(), DELIVERY, "the content at the next hop")
    t = time.monotonic()
    mta.stop(timeout=10)                      # the grace, not the data_timeout (10 min)
    assert time.monotonic() - t < 5
    assert (f"{qid}: delivery to dest.test interrupted at shutdown; 1 recipient(s) queued "
            "again") in mta.log()
    [row] = rcpt_rows(mta, qid).values()
    assert row["state"] == "queued" and row["attempts"] == 0

    mta.start()
    wait_spool_empty(mta)
    # At least once: the next hop has it twice (the first copy was never acknowledged).
    txs = dest.transactions()
    assert [t.connection for t in txs] == [1, 2]
    assert all(split_received(t.data)[1] == data for t in txs)
    [line] = delivery_lines(mta, qid)
    assert "attempts=1" in line and "status=sent" in line


# --------------------------------------------------------------------------- Postfix smtp-sink

SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"   # tests/setup-deps installs it


class SmtpSink:
    """Postfix's smtp-sink on 127.0.0.1, dumping each transaction to a file.
    smtp-sink drops privileges (to nobody when we are root): its dump
    directory must be reachable and writable by that user."""

    def __init__(self, *options: str):
        assert os.access(SMTP_SINK, os.X_OK), f"{SMTP_SINK} missing: run tests/setup-deps"
        self.dump = Path(tempfile.mkdtemp(prefix="mta-sink-"))
        os.chmod(self.dump, 0o1777)
        self.proc = None
        for _ in range(5):
            self.port = free_port()
            args = [SMTP_SINK, "-d", f"{self.dump}/%M.", "-h", "sink.test", *options]
            if os.geteuid() == 0:
                args += ["-u", "nobody"]
            self.proc = subprocess.Popen(args + [f"127.0.0.1:{self.port}", "50"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                wait_for(lambda: self.proc.poll() is not None
                         or not refused("127.0.0.1", self.port), 10, "smtp-sink to listen")
            except AssertionError:
                self.proc.kill()
                raise
            if self.proc.poll() is None:
                break
        assert self.proc.poll() is None, self.proc.stderr.read()
        self.address = f"127.0.0.1:{self.port}"

    def dumped(self) -> list[bytes]:
        """Dump files are LF-terminated and end with an empty line once complete."""
        files = [p.read_bytes() for p in self.dump.iterdir() if p.is_file()]
        return [f for f in files if f.endswith(b"\n\n")]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        shutil.rmtree(self.dump, ignore_errors=True)


@pytest.fixture
def smtp_sink():
    sinks: list[SmtpSink] = []

    def start(*options: str) -> SmtpSink:
        sinks.append(SmtpSink(*options))
        return sinks[-1]
    yield start
    for sink in sinks:
        sink.stop()


def test_smtp_sink_as_next_hop(mta_factory, smtp_sink):
    sink = smtp_sink()
    port = sink.port
    mta = mta_factory(extra=relay_config(routes={"sink.test": sink.address}))
    sent = {}
    for i in range(5):
        data = message(f"sink {i}", b".leading dot\r\nline %d\r\n" % i)
        qid = send(mta, SENDER, [f"r{i}@sink.test", f"s{i}@sink.test"], data)
        sent[qid] = data
    wait_spool_empty(mta)
    files = wait_for(lambda: (lambda f: f if len(f) == 5 and all(b"line " in x for x in f)
                              else None)(sink.dumped()), DELIVERY, "5 dump files")
    for qid, data in sent.items():
        [dump_file] = [f for f in files if f"id {qid};".encode() in f]
        assert data.replace(b"\r\n", b"\n") in dump_file
        i = int(re.search(rb"Subject: sink (\d)", data).group(1))
        assert f"X-Rcpt-Args: <r{i}@sink.test>".encode() in dump_file
        assert f"X-Rcpt-Args: <s{i}@sink.test>".encode() in dump_file
        assert f"X-Mail-Args: <{SENDER}>".encode() in dump_file
        lines = delivery_lines(mta, qid)
        assert len(lines) == 2 and all("status=sent" in ln and "dsn=2.0.0" in ln
                                       and f"relay=127.0.0.1[127.0.0.1]:{port}" in ln
                                       for ln in lines), lines


def test_smtp_sinks_dsn_duty_and_8bit_conversion(mta_factory, peer_factory, smtp_sink):
    """Real next hops: smtp-sink with DSN and 8BITMIME, and one started with
    -N -8 (neither).  One 8-bit MIME message with NOTIFY=SUCCESS to both:
    the first gets it unchanged with NOTIFY passed on and owes the report;
    the second gets it converted to 7 bits; the sender gets exactly one
    report, "relayed", for the second only."""
    full, bare = smtp_sink(), smtp_sink("-N", "-8")
    [origin] = peer_factory.spawn(None)
    mta = mta_factory(extra=relay_config(routes={"full.test": full.address,
                                                 "bare.test": bare.address,
                                                 "origin.test": origin.address}))
    peer_factory.ready()
    mime = b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
    text = "Grüße aus Köln.\r\n.\r\nÇa va ?\r\n".encode()
    data = message("sinks", text, mime + b"Content-Transfer-Encoding: 8bit\r\n")
    qid = send(mta, SENDER, ["a@full.test", "b@bare.test"], data, ["BODY=8BITMIME"],
               ["NOTIFY=SUCCESS"])
    wait_spool_empty(mta)
    [got_full] = wait_for(lambda: full.dumped(), DELIVERY, "full sink dump")
    [got_bare] = wait_for(lambda: bare.dumped(), DELIVERY, "bare sink dump")
    assert f"id {qid};".encode() in got_full and f"id {qid};".encode() in got_bare
    assert b"X-Mail-Args: <alice@origin.test> BODY=8BITMIME" in got_full
    assert b"X-Rcpt-Args: <a@full.test> NOTIFY=SUCCESS" in got_full
    assert data.replace(b"\r\n", b"\n") in got_full                 # unchanged
    assert got_bare.isascii()
    assert b"X-Mail-Args: <alice@origin.test>\n" in got_bare         # no BODY=, no DSN
    # After smtp-sink's own header lines; it ends the dump with an empty line.
    converted = email.message_from_bytes(got_bare[got_bare.index(b"\nFrom: ") + 1:-1],
                                         policy=email.policy.default)
    assert converted["Content-Transfer-Encoding"] == "quoted-printable"
    assert converted.get_payload(decode=True) == text.replace(b"\r\n", b"\n")
    # Only the transfer encoding field changed in the header block.
    assert (b"Subject: sinks\n" in got_bare and b"MIME-Version: 1.0\nContent-Type: text/plain; "
            b"charset=utf-8\nContent-Transfer-Encoding: quoted-printable\n" in got_bare)
    [(_tx, dsn)] = dsns(origin)
    blocks = per_recipient(dsn)
    assert list(blocks) == ["b@bare.test"]
    assert blocks["b@bare.test"]["Action"] == "relayed"
