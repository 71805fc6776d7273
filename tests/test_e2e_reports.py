"""What the sender and the sysadmin are told, end to end with the real
daemon (conftest.MTADaemon) and scripted next hops in subprocesses
(tests/peers.py):

* a bounce blames a remote host only for a reply that host really sent
  (``Remote-MTA`` + ``Diagnostic-Code: smtp; ...``, RFC 3464 §2.3.5/§2.3.6);
  mta's own decisions (a next hop without SMTPUTF8, too small for the
  message, not reachable) carry no Remote-MTA and are typed ``X-mta``, and
  the delivery log line says ``host ... said:`` only for remote replies;
* the delivery log line shows the TLS session: ``tls=none``,
  ``tls=TLSv1.3/<cipher>/unverified`` (opportunistic), ``.../verified``
  (policy ``verify``, certificate checked against ``tls_ca_file``);
* a next hop that takes 5 recipients per transaction gets all 12 of a
  message at once, on one connection.
"""
from __future__ import annotations

import re
import socket

from conftest import wait_for
from test_e2e_relay import (
    SENDER,
    delivery_lines,
    log_line_re,
    message,
    per_recipient,
    relay_config,
    said,
    send,
    wait_dsns,
    wait_spool_empty,
)
from test_smtp_client import closed_port
from tlsutil import TestCA

HOSTNAME = "mx.e2e.test"




def human_text(dsn) -> str:
    """The human-readable part, its lines joined (wrapping undone)."""
    return " ".join(list(dsn.iter_parts())[0].get_content().split())


def test_bounces_blame_a_remote_only_for_its_own_replies(mta_factory, peer_factory):
    base = ["PIPELINING", "ENHANCEDSTATUSCODES", "DSN", "8BITMIME"]
    reject = "550 5.1.1 <bad@dest.test>: Recipient address rejected: User unknown"
    ascii_only, small, dest, origin = peer_factory.spawn(
        {"extensions": base + ["SIZE 100000"]},
        {"extensions": base + ["SIZE 1000", "SMTPUTF8"]},
        {"rcpt": {"bad@dest.test": reject}},
        None,
    )
    dead = closed_port()
    mta = mta_factory(extra=relay_config(
        routes={"ascii.test": ascii_only.address, "small.test": small.address,
                "dest.test": dest.address, "refused.test": f"127.0.0.1:{dead}",
                "origin.test": origin.address},
        retry={"first": "1s", "max": "1s", "lifetime": "2s"}))
    peer_factory.ready()
    utf8 = send(mta, SENDER, ["j\u00f6rg@ascii.test"], message("utf8", b"Gr\xc3\xbc\xc3\x9fe\r\n"),
                ["SMTPUTF8", "BODY=8BITMIME"])
    big = send(mta, SENDER, ["big@small.test"], message("big", b"x" * 70 + b"\r\n") * 40)
    bad = send(mta, SENDER, ["bad@dest.test"], message("rejected"))
    gone = send(mta, SENDER, ["x@refused.test"], message("refused"))
    got = wait_dsns(origin, 4, timeout=30)
    wait_spool_empty(mta)

    by_rcpt = {}
    for _tx, dsn in got:
        for rcpt, block in per_recipient(dsn).items():
            by_rcpt[rcpt] = (block, human_text(dsn))
    assert set(by_rcpt) == {"j\u00f6rg@ascii.test", "big@small.test", "bad@dest.test",
                            "x@refused.test"}

    # The remote's own reply: Remote-MTA and an smtp diagnostic, "... said:".
    block, text = by_rcpt["bad@dest.test"]
    assert block["Status"] == "5.1.1"
    assert block["Remote-MTA"] == "dns;127.0.0.1"
    assert block["Diagnostic-Code"] == f"smtp;{reject}"
    assert f"127.0.0.1 said: {reject}" in text

    # Our own decisions: no Remote-MTA, no smtp diagnostic, nobody "said" it.
    ours = {
        "j\u00f6rg@ascii.test": ("5.6.7", "SMTPUTF8 is required, but was not offered by host "
                                          f"127.0.0.1[127.0.0.1]:{ascii_only.port}"),
        "big@small.test": ("5.3.4", "Message too big for next hop"),
        "x@refused.test": ("4.4.7", f"connect to 127.0.0.1[127.0.0.1]:{dead}: "
                                    "Connection refused"),
    }
    for rcpt, (status, reason) in ours.items():
        block, text = by_rcpt[rcpt]
        assert block["Status"] == status, (rcpt, block)
        assert "Remote-MTA" not in block, (rcpt, block)
        assert block["Diagnostic-Code"] == f"X-mta;{reason}", (rcpt, block)
        assert " said:" not in text, (rcpt, text)
        assert f"Reason given by {HOSTNAME}: {reason}" in text, (rcpt, text)
    assert not (ascii_only.transactions() or small.transactions())

    # The log line: "host ... said:" only for what the remote said.
    relay = re.escape(f"127.0.0.1[127.0.0.1]:{dest.port}")
    [line] = delivery_lines(mta, bad)
    assert re.fullmatch(log_line_re(bad, "bad@dest.test", relay, attempts=1, dsn="5.1.1",
                                    status="bounced", reply=said(reject)), line), line
    [line] = delivery_lines(mta, utf8)
    relay = re.escape(f"127.0.0.1[127.0.0.1]:{ascii_only.port}")
    assert re.fullmatch(log_line_re(utf8, "j\u00f6rg@ascii.test", relay, attempts=1, dsn="5.6.7",
                                    status="bounced",
                                    reply=re.escape(ours["j\u00f6rg@ascii.test"][1])), line), line
    [line] = delivery_lines(mta, big)
    assert line.endswith("status=bounced (Message too big for next hop)"), line
    lines = delivery_lines(mta, gone)
    assert len(lines) >= 2, lines
    refused = re.escape(ours["x@refused.test"][1])
    for n, line in enumerate(lines[:-1], 1):
        assert re.fullmatch(log_line_re(gone, "x@refused.test", "none", attempts=n, dsn="4.4.1",
                                        status="deferred", reply=refused), line), lines
    assert re.fullmatch(log_line_re(gone, "x@refused.test", "none", attempts=len(lines),
                                    dsn="4.4.7", status="expired",
                                    reply="delivery time expired; last reply: " + refused),
                        lines[-1]), lines


def test_delivery_log_shows_outbound_tls(mta_factory, peer_factory, tmp_path):
    ca = TestCA()
    cert, key = ca.issue("verify.peer.test", ip="127.0.0.1").write(tmp_path / "peer-tls")
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.cert_pem)
    plain, may, verify, origin = peer_factory.spawn(
        None,
        {"starttls": True},                              # a self-signed certificate
        {"starttls": True, "certificate": str(cert), "private_key": str(key)},
        None,
    )
    extra = relay_config(routes={"plain.test": plain.address, "may.test": may.address,
                                 "verify.test": verify.address, "origin.test": origin.address},
                         relay={"tls_ca_file": str(ca_file)})
    extra += '[route_tls]\n"verify.test" = "verify"\n'
    mta = mta_factory(extra=extra)
    peer_factory.ready()
    qids = {d: send(mta, SENDER, [f"bob@{d}"], message(f"tls {d}"))
            for d in ("plain.test", "may.test", "verify.test")}
    wait_spool_empty(mta)
    assert [t.tls for t in plain.transactions()] == [False]
    assert [t.tls for t in may.transactions()] == [True]
    assert [t.tls for t in verify.transactions()] == [True]

    expect = {"plain.test": ("none", plain),
              "may.test": (r"TLSv1\.[23]/[A-Z0-9_-]+/unverified", may),
              "verify.test": (r"TLSv1\.[23]/[A-Z0-9_-]+/verified", verify)}
    for domain, (tls, peer) in expect.items():
        [line] = delivery_lines(mta, qids[domain])
        relay = re.escape(f"127.0.0.1[127.0.0.1]:{peer.port}")
        assert re.fullmatch(log_line_re(qids[domain], f"bob@{domain}", relay, attempts=1,
                                        dsn="2.0.0", status="sent", tls=tls), line), line
    # TLS 1.3 is what both ends speak here.
    assert "tls=TLSv1.3/" in delivery_lines(mta, qids["verify.test"])[0]


def test_recipient_limit_of_the_next_hop(mta_factory, peer_factory):
    [dest] = peer_factory.spawn({"max_rcpts": 5})
    mta = mta_factory(extra=relay_config(routes={"dest.test": dest.address}))
    peer_factory.ready()
    rcpts = [f"r{i:02d}@dest.test" for i in range(1, 13)]
    qid = send(mta, SENDER, rcpts, message("twelve"))
    wait_spool_empty(mta)
    txs = dest.transactions()
    assert [sorted(t.accepted) for t in txs] == [rcpts[:5], rcpts[5:10], rcpts[10:]]
    assert {t.connection for t in txs} == {1}
    lines = delivery_lines(mta, qid)
    assert len(lines) == 12 and all("attempts=1" in ln and "status=sent" in ln
                                    for ln in lines), lines
    wait_for(lambda: "takes 5 recipients per transaction" in mta.log(), 5, "the log line")
