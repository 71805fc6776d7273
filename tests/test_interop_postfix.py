"""Interop with a real Postfix (tests/postfix.py: a private instance, started
with ``postfix -c DIR start``, never the system one) as mta's next hop and as
the client that relays into mta.

The instance is strict (``smtpd_forbid_bare_newline``,
``smtpd_forbid_unauth_pipelining``, ``strict_rfc821_envelopes``, for loopback
clients too) and has one listener per configuration: all extensions, one
EHLO keyword discarded at a time, and ``smtpd_recipient_limit = 5``.  Every
listener logs its SMTP dialogue (``debug_peer_list``), so a test reads the
exact commands mta sent.  Postfix delivers ``pf.test`` and ``origin.test``
(the senders' domain: DSNs land there too, from either side) into a maildir.

mta routes both domains to the listener under test and has its resolver
pinned to a dead loopback port.  Nothing sleeps a fixed time.
"""
from __future__ import annotations

import email
import email.policy
import re
import shutil
import smtplib
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import wait_for
from postfix import SWAKS, Delivery, PostfixInstance
from tlsutil import TestCA
from test_e2e_relay import (body_with_dot_lines_at, delivery_lines, relay_config, report,
                            send, split_received, wait_spool_empty)

SENDER = "alice@origin.test"
MTA_HOSTNAME = "mx.e2e.test"       # conftest's default [server] hostname
DELIVERY = 20.0                    # seconds allowed for a delivery that should happen now

LISTENERS: dict[str, dict[str, str]] = {
    "smtp": {},
    "nochunking": {"smtpd_discard_ehlo_keywords": "chunking"},
    "nopipelining": {"smtpd_discard_ehlo_keywords": "pipelining"},
    "no8bitmime": {"smtpd_discard_ehlo_keywords": "8bitmime"},
    "nodsn": {"smtpd_discard_ehlo_keywords": "dsn"},
    "nosize": {"smtpd_discard_ehlo_keywords": "size"},
    "noenhanced": {"smtpd_discard_ehlo_keywords": "enhancedstatuscodes"},
    "rcpt5": {"smtpd_recipient_limit": "5"},
    # Every recipient refused by Postfix itself (a reply it really sends).
    "refuse": {"smtpd_recipient_restrictions": "reject"},
    # Everything received here goes to the hold queue (the queue helpers' test).
    "hold": {"smtpd_end_of_data_restrictions": "check_client_access static:HOLD"},
}


# The "tls" listener offers STARTTLS with a certificate for 127.0.0.1 from
# this CA (smtpd reads it as root, before it drops privileges).
CA = TestCA()
TLS_DIR = Path(tempfile.mkdtemp(prefix="mta-interop-tls-"))


@pytest.fixture(scope="module")
def postfix_instance(postfix_factory) -> PostfixInstance:
    cert, key = CA.issue("postfix.interop.test", ip="127.0.0.1").write(TLS_DIR)
    (TLS_DIR / "ca.pem").write_bytes(CA.cert_pem)
    listeners = {**LISTENERS, "tls": {"smtpd_tls_security_level": "may",
                                      "smtpd_tls_cert_file": str(cert),
                                      "smtpd_tls_key_file": str(key),
                                      "smtpd_tls_loglevel": "1"}}
    try:
        yield postfix_factory(listeners=listeners, trace=list(listeners),
                              mailbox_domains=("pf.test", "origin.test", "relayed.test"))
    finally:
        shutil.rmtree(TLS_DIR, ignore_errors=True)


@pytest.fixture
def pf(postfix_instance: PostfixInstance):
    """The module's Postfix, with nothing left from earlier tests; its log of
    this test is printed at teardown (shown when the test fails)."""
    postfix_instance.reset()
    yield postfix_instance
    print("===== Postfix maillog of this test =====")
    print(postfix_instance.log_summary())


def mta_to(mta_factory, pf: PostfixInstance, listener: str, routes: dict | None = None, **kw):
    """mta with pf.test and origin.test routed to one Postfix listener
    (and *routes*: domain -> listener)."""
    address = pf.address(listener)
    table = {"pf.test": address, "origin.test": address}
    table.update({domain: pf.address(name) for domain, name in (routes or {}).items()})
    return mta_factory(extra=relay_config(routes=table, **kw))


def message(subject: str, body: bytes = b"Hello.\r\n", *, to: str = "bob@pf.test",
            headers: bytes = b"") -> bytes:
    mid = re.sub(r"[^A-Za-z0-9]+", "-", subject)
    return (b"From: Alice <alice@origin.test>\r\n"
            b"To: " + to.encode() + b"\r\n"
            b"Subject: " + subject.encode() + b"\r\n"
            b"Date: Wed, 02 Dec 2026 06:00:00 +0000\r\n"
            b"Message-ID: <" + mid.encode() + b"@origin.test>\r\n"
            + headers + b"\r\n" + body)


def after_mta_received(delivery: Delivery) -> bytes:
    """What Postfix got, less its own Received field and mta's."""
    ours, rest = split_received(delivery.without_postfix_received)
    assert f"by {MTA_HOSTNAME}".encode() in ours, ours
    return rest


def commands(pf: PostfixInstance, listener: str) -> list[str]:
    return [text for direction, text in pf.transcript(listener) if direction == "<"]


def replies(pf: PostfixInstance, listener: str) -> list[str]:
    return [text for direction, text in pf.transcript(listener) if direction == ">"]


def mta_name(per_message) -> str:
    """The host of a report's Reporting-MTA ("dns; host")."""
    kind, _, name = str(per_message["Reporting-MTA"]).partition(";")
    assert kind.strip().lower() == "dns", per_message["Reporting-MTA"]
    return name.strip()


def reports_to(pf: PostfixInstance, address: str) -> list[Delivery]:
    return [d for d in pf.deliveries() if d.recipient == address and d.is_report()]


def assert_clean(pf: PostfixInstance, listener: str) -> None:
    """Postfix complained about nothing and answered only 2xx/3xx."""
    assert pf.problems() == []
    bad = [r for r in replies(pf, listener) if not r[:1] in ("2", "3")]
    assert bad == [], bad


def settled(mta, pf: PostfixInstance) -> None:
    """Nothing left in flight on either side: whatever mta was going to send
    (reports included) has been delivered by Postfix."""
    wait_spool_empty(mta, DELIVERY)
    pf.wait_queue_empty(DELIVERY)


# --------------------------------------------------------------------------- the reference itself

class Dialogue:
    """A raw SMTP client that reads whole replies (no sleeps)."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")
        self.reply()                    # the greeting

    def reply(self) -> str:
        lines = []
        while True:
            line = self.file.readline()
            assert line, f"connection closed after {lines}"
            lines.append(line.decode().rstrip("\r\n"))
            if line[3:4] != b"-":
                return "\n".join(lines)

    def send(self, data: bytes) -> str:
        self.sock.sendall(data)
        return self.reply()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def test_reference_postfix_is_private_and_strict(pf):
    # Its own directories, never /etc/postfix or the system queue.
    dirs = pf.postconf("config_directory", "queue_directory", "data_directory")
    assert dirs["config_directory"] == str(pf.config_directory)
    assert all(Path(d).is_relative_to(pf.directory) for d in dirs.values()), dirs
    master = pf.master_pid()
    environ = Path(f"/proc/{master}/environ").read_bytes().split(b"\0")
    assert f"MAIL_CONFIG={pf.config_directory}".encode() in environ
    assert Path(f"/proc/{master}/cwd").resolve() == pf.queue_directory

    # strict_rfc821_envelopes, then a bare <LF> in the content.
    d = Dialogue(pf.port("smtp"))
    assert d.send(b"EHLO client.test\r\n").startswith("250-")
    assert d.send(b"MAIL FROM: alice@origin.test\r\n").startswith("501 5.1.7")
    assert d.send(b"MAIL FROM:<alice@origin.test>\r\n").startswith("250 ")
    assert d.send(b"RCPT TO:<bob@pf.test>\r\n").startswith("250 ")
    assert d.send(b"DATA\r\n").startswith("354 ")
    assert d.send(b"Subject: x\r\n\r\nbare\nLF\r\n.\r\n") == \
        f"550 5.5.2 {pf.hostname} Error: bare <LF> received"
    d.close()
    # Commands sent ahead of the reply to EHLO.
    d = Dialogue(pf.port("nopipelining"))
    assert d.send(b"EHLO client.test\r\nMAIL FROM:<alice@origin.test>\r\n") == \
        "554 5.5.0 Error: SMTP protocol synchronization"
    d.close()
    assert [p for p in pf.problems() if "bare <LF> received" in p]
    # Postfix logs the pipelining complaint when that session ends.
    wait_for(lambda: [p for p in pf.problems() if "improper command pipelining" in p], 10,
             "Postfix to log the improper pipelining")
    assert pf.deliveries() == []

    # The queue helpers: a message held by Postfix.
    with smtplib.SMTP("127.0.0.1", pf.port("hold"), local_hostname="client.test") as s:
        s.sendmail(SENDER, ["bob@pf.test"], message("held"))
    [held] = pf.queue()
    assert held["queue_name"] == "hold" and held["sender"] == SENDER
    assert [r["address"] for r in held["recipients"]] == ["bob@pf.test"]
    assert "Subject: held" in pf.postcat(held["queue_id"])
    assert f"{held['queue_id']}!" in pf.mailq()          # "!": on hold


# --------------------------------------------------------------------------- (a) mta -> strict Postfix

@pytest.mark.parametrize("listener", ["smtp", "nochunking", "nopipelining", "nosize", "nodsn",
                                      "noenhanced"])
def test_strict_postfix_receives_byte_exact(mta_factory, pf, listener):
    mta = mta_to(mta_factory, pf, listener)
    sent = {
        "dots": (message(f"dots {listener}", body_with_dot_lines_at([65536, 131072], 200_000)),
                 ["bob@pf.test"]),
        "three": (message(f"three {listener}", b"One body, three recipients.\r\n"),
                  ["carol@pf.test", "dave@pf.test", "erin@pf.test"]),
        "empty-body": (message(f"empty {listener}", b""), ["frank@pf.test"]),
    }
    opts = {"mail_options": ["SIZE=300000"], "rcpt_options": ["NOTIFY=FAILURE"]}
    for data, rcpts in sent.values():
        send(mta, SENDER, rcpts, data, **opts)
    got = pf.wait_deliveries(5, DELIVERY)
    settled(mta, pf)

    assert sorted(d.recipient for d in pf.deliveries()) == sorted(
        r for _, rcpts in sent.values() for r in rcpts)      # exactly once each
    for data, rcpts in sent.values():
        for d in (d for d in got if d.recipient in rcpts):
            assert d.return_path == SENDER
            assert after_mta_received(d) == data, d.recipient
    # Clean 250s, no complaint about bare newlines or pipelining.
    assert_clean(pf, listener)
    sent_lines = pf.log_lines(r"status=sent")
    assert len(sent_lines) == 5 and all("dsn=2.0.0" in ln for ln in sent_lines)
    ours = [ln for ln in mta.log().splitlines() if " to=<" in ln]
    assert len(ours) == 5
    for line in ours:       # (Postfix keeps its enhanced codes when it does not announce them)
        assert "status=sent" in line and "dsn=2.0.0" in line, line
        assert re.search(r"\(250 2\.0\.0 Ok: queued as [0-9A-F]+\)$", line), line
    # What the hop did not announce, mta did not use.
    cmds = [c.upper() for c in commands(pf, listener)]
    if listener == "nochunking":
        assert not any(c.startswith("BDAT") for c in cmds)
    if listener == "nosize":
        assert not any(" SIZE=" in c for c in cmds)
    if listener == "nodsn":
        assert not any(re.search(r" (NOTIFY|ORCPT|RET|ENVID)=", c) for c in cmds)
    else:
        assert any(" NOTIFY=FAILURE" in c for c in cmds)


# --------------------------------------------------------------------------- (b) DSN duty (issue §2)

def test_notify_success_to_dsn_capable_postfix_gives_one_report_from_postfix(mta_factory, pf):
    # The duty to report passes with the parameters (RFC 3461 §4.2 / §6.2.7):
    # Postfix, the final server, sends the only "delivered" report.
    mta = mta_to(mta_factory, pf, "smtp")
    send(mta, SENDER, ["bob@pf.test"], message("notify success to dsn hop"),
         mail_options=["ENVID=env-1", "RET=HDRS"],
         rcpt_options=["NOTIFY=SUCCESS", "ORCPT=rfc822;bob@pf.test"])
    pf.wait_deliveries(1, DELIVERY, match=lambda d: d.recipient == "bob@pf.test")
    pf.wait_deliveries(1, DELIVERY, what="Postfix's success report",
                       match=lambda d: d.recipient == SENDER)
    settled(mta, pf)

    [rcpt] = [c for c in commands(pf, "smtp") if c.lower().startswith("rcpt to:<bob@")]
    assert "NOTIFY=SUCCESS" in rcpt and "ORCPT=rfc822;bob@pf.test" in rcpt
    reports = reports_to(pf, SENDER)
    by = [mta_name(report(d.parsed())[0]) for d in reports]
    assert by == [pf.hostname], f"reports to the sender came from {by}"
    [bob] = [d for d in pf.deliveries() if d.recipient == "bob@pf.test"]
    assert after_mta_received(bob) == message("notify success to dsn hop")


def test_notify_success_to_postfix_without_dsn_gives_one_relayed_report(mta_factory, pf):
    mta = mta_to(mta_factory, pf, "nodsn")
    send(mta, SENDER, ["bob@pf.test"], message("notify success to hop without dsn"),
         rcpt_options=["NOTIFY=SUCCESS"])
    [rep] = pf.wait_deliveries(1, DELIVERY, what="mta's relayed report",
                               match=lambda d: d.recipient == SENDER)
    settled(mta, pf)

    assert not any("NOTIFY=" in c.upper() for c in commands(pf, "nodsn"))
    assert len(reports_to(pf, SENDER)) == 1
    per_message, blocks = report(rep.parsed())
    assert mta_name(per_message) == MTA_HOSTNAME
    assert [b["Action"] for b in blocks] == ["relayed"]
    assert len([d for d in pf.deliveries() if d.recipient == "bob@pf.test"]) == 1


def test_notify_success_split_over_dsn_and_non_dsn_hops_gives_one_report_each(mta_factory, pf):
    # bob's hop offers DSN (the duty passes to Postfix); carol's does not
    # (mta reports "relayed" for her, and only for her, in one report).
    mta = mta_to(mta_factory, pf, "smtp", routes={"relayed.test": "nodsn"})
    send(mta, SENDER, ["bob@pf.test", "carol@relayed.test"], message("split over two hops"),
         rcpt_options=["NOTIFY=SUCCESS"])
    pf.wait_deliveries(2, DELIVERY, what="bob and carol",
                       match=lambda d: d.recipient in ("bob@pf.test", "carol@relayed.test"))
    pf.wait_deliveries(2, DELIVERY, what="Postfix's report for bob and mta's for carol",
                       match=lambda d: d.recipient == SENDER)
    settled(mta, pf)

    reports = {}
    for d in reports_to(pf, SENDER):
        per_message, blocks = report(d.parsed())
        reports.setdefault(mta_name(per_message), []).append(
            {str(b["Final-Recipient"]).split(";", 1)[1].strip(): str(b["Action"]) for b in blocks})
    assert reports == {pf.hostname: [{"bob@pf.test": "delivered"}],
                       MTA_HOSTNAME: [{"carol@relayed.test": "relayed"}]}, reports


# --------------------------------------------------------------------------- (c) 8BITMIME (issue §3)

def assert_delivered_not_refused(mta, qid: str, pf: PostfixInstance, rcpt: str) -> None:
    """Wait until Postfix delivered *qid* to *rcpt*, or mta gave up on it or
    deferred it; it must be the former."""
    def outcome() -> list[str] | None:
        if any(d.recipient == rcpt for d in pf.deliveries()):
            return ["delivered"]
        return [ln for ln in delivery_lines(mta, qid)
                if f"to=<{rcpt}>" in ln and "status=sent" not in ln] or None
    got = wait_for(outcome, DELIVERY, f"delivery to {rcpt} or a refusal by mta", interval=0.05)
    assert got == ["delivered"], f"mta did not deliver: {got}; report:\n{bounce_text(pf)}"


def bounce_text(pf: PostfixInstance) -> str:
    return "\n".join(d.content.decode(errors="replace")[:1500] for d in reports_to(pf, SENDER))


TEXT = "Grüße aus Köln — déjà vu.\n.A line that starts with a dot\nLast line, ASCII.\n"
ATTACHMENT = (b"iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIA\r\n"
              b"X8jx0gAAAABJRU5ErkJggg==\r\n")


def test_8bit_text_to_postfix_without_8bitmime_is_converted_and_delivered(mta_factory, pf):
    mta = mta_to(mta_factory, pf, "no8bitmime")
    body = (b"--b1\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n\r\n"
            + TEXT.replace("\n", "\r\n").encode() +
            b"--b1\r\n"
            b"Content-Type: image/png; name=dot.png\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n"
            + ATTACHMENT +
            b"--b1--\r\n")
    data = message("eight bit text", body,
                   headers=b"MIME-Version: 1.0\r\n"
                           b"Content-Type: multipart/mixed; boundary=\"b1\"\r\n")
    qid = send(mta, SENDER, ["bob@pf.test"], data, mail_options=["BODY=8BITMIME"])
    assert_delivered_not_refused(mta, qid, pf, "bob@pf.test")
    settled(mta, pf)

    [mail] = [c for c in commands(pf, "no8bitmime") if c.lower().startswith("mail from:")]
    assert "BODY=8BITMIME" not in mail.upper()
    [bob] = pf.deliveries()
    content = after_mta_received(bob)
    assert max(content) < 0x80, "8-bit bytes sent to a hop without 8BITMIME"
    parsed = email.message_from_bytes(content, policy=email.policy.default)
    text, image = list(parsed.iter_parts())
    assert text.get_content_type() == "text/plain"
    assert text["Content-Transfer-Encoding"].lower() in ("quoted-printable", "base64")
    # What the original part holds (RFC 2046 §5.1.1: the CRLF before a
    # boundary belongs to the boundary), decoded: the same text after conversion.
    original = email.message_from_bytes(data, policy=email.policy.default)
    original_text = next(original.iter_parts()).get_payload(decode=True)
    assert original_text.decode("utf-8") == TEXT.rstrip("\n").replace("\n", "\r\n")
    assert text.get_payload(decode=True) == original_text
    # Everything but the converted part is as it was, byte for byte.
    head = data[:data.index(b"\r\n\r\n") + 4]
    assert content.startswith(head)
    assert (b"Content-Type: image/png; name=dot.png\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + ATTACHMENT + b"--b1--\r\n") in content
    assert_clean(pf, "no8bitmime")


def test_ascii_message_declared_8bitmime_to_postfix_without_8bitmime_is_sent_as_is(
        mta_factory, pf):
    mta = mta_to(mta_factory, pf, "no8bitmime")
    data = message("ascii declared 8bitmime", b"Plain ASCII, but the client said BODY=8BITMIME.\r\n")
    qid = send(mta, SENDER, ["bob@pf.test"], data, mail_options=["BODY=8BITMIME"])
    assert_delivered_not_refused(mta, qid, pf, "bob@pf.test")
    settled(mta, pf)

    [bob] = pf.deliveries()
    assert after_mta_received(bob) == data
    [mail] = [c for c in commands(pf, "no8bitmime") if c.lower().startswith("mail from:")]
    assert "BODY=8BITMIME" not in mail.upper()
    assert_clean(pf, "no8bitmime")


# --------------------------------------------------------------------------- (c2) who said it (issue §4)

def test_bounces_name_postfix_only_for_what_postfix_said(mta_factory, pf):
    # bob: Postfix refuses him itself.  eve: mta refuses to send (an 8-bit
    # header field for a hop without 8BITMIME: nothing to convert it to).
    mta = mta_to(mta_factory, pf, "refuse", routes={"origin.test": "smtp",
                                                    "seven.test": "no8bitmime"})
    send(mta, SENDER, ["bob@pf.test"], message("refused by postfix"))
    send(mta, SENDER, ["eve@seven.test"],
         message("not convertible", headers=b"X-Note: Gr\xc3\xbc\xc3\x9fe\r\n"),
         mail_options=["BODY=8BITMIME"])
    pf.wait_deliveries(2, DELIVERY, what="mta's two bounces",
                       match=lambda d: d.recipient == SENDER)
    settled(mta, pf)

    [postfix_said] = [r for r in replies(pf, "refuse") if "Recipient address rejected" in r]
    assert postfix_said.startswith("554 5.7.1 ")
    blocks = {}
    for d in reports_to(pf, SENDER):
        per_message, got = report(d.parsed())
        assert mta_name(per_message) == MTA_HOSTNAME
        text = " ".join(list(d.parsed().iter_parts())[0].get_content().split())
        for b in got:
            blocks[str(b["Final-Recipient"]).split(";", 1)[1].strip()] = (b, text)
    assert set(blocks) == {"bob@pf.test", "eve@seven.test"}

    bob, text = blocks["bob@pf.test"]
    assert str(bob["Remote-MTA"]) == "dns;127.0.0.1"
    assert " ".join(str(bob["Diagnostic-Code"]).split()) == f"smtp;{postfix_said}"
    assert f"127.0.0.1 said: {postfix_said}" in text

    eve, text = blocks["eve@seven.test"]
    assert eve["Status"] == "5.6.3"
    assert "Remote-MTA" not in eve
    diag = " ".join(str(eve["Diagnostic-Code"]).split())
    assert diag.startswith("X-mta;message has 8-bit content the next hop does not accept "
                           "(8BITMIME) and it could not be converted: "), diag
    assert " said:" not in text and f"Reason given by {MTA_HOSTNAME}:" in text
    # Postfix was never given eve's message.
    assert not any(c.lower().startswith("mail from:") for c in commands(pf, "no8bitmime"))


# --------------------------------------------------------------------------- (c3) outbound TLS in the log (issue §6)

def test_delivery_log_shows_tls_with_postfix(mta_factory, pf):
    # pf.test: opportunistic TLS (any certificate); relayed.test: policy
    # verify against the CA; origin.test: Postfix without TLS.
    extra = relay_config(routes={"pf.test": pf.address("tls"), "relayed.test": pf.address("tls"),
                                 "origin.test": pf.address("smtp")},
                         relay={"tls_ca_file": str(TLS_DIR / "ca.pem")})
    extra += '[route_tls]\n"relayed.test" = "verify"\n'
    mta = mta_factory(extra=extra)
    qids = {rcpt: send(mta, SENDER, [rcpt], message(f"tls {rcpt}", to=rcpt))
            for rcpt in ("bob@pf.test", "carol@relayed.test", "dave@origin.test")}
    pf.wait_deliveries(3, DELIVERY)
    settled(mta, pf)

    tls = {}
    for rcpt, qid in qids.items():
        [line] = delivery_lines(mta, qid)
        assert "status=sent" in line, line
        tls[rcpt] = re.search(r" tls=(\S+) ", line).group(1)
    assert re.fullmatch(r"TLSv1\.[23]/[A-Z0-9_-]+/unverified", tls["bob@pf.test"]), tls
    assert re.fullmatch(r"TLSv1\.[23]/[A-Z0-9_-]+/verified", tls["carol@relayed.test"]), tls
    assert tls["dave@origin.test"] == "none", tls
    # Postfix agrees: two TLS sessions on the tls listener, none elsewhere.
    established = pf.log_lines(r"postfix/tls/smtpd.*TLS connection established")
    assert len(established) == 2, established
    assert not pf.log_lines(r"postfix/smtp/smtpd.*TLS connection established")


# --------------------------------------------------------------------------- (d) 452 too many recipients (issue §5)

def test_recipient_limit_5_twelve_recipients_all_delivered_at_once(mta_factory, pf):
    # [retry] first is long: a recipient deferred by the 452 would not come back
    # within this test.
    mta = mta_to(mta_factory, pf, "rcpt5", retry={"first": "10m"})
    rcpts = [f"r{i:02d}@pf.test" for i in range(12)]
    data = message("twelve recipients")
    qid = send(mta, SENDER, rcpts, data)

    def done() -> bool:
        lines = delivery_lines(mta, qid)
        return len(pf.deliveries()) == 12 or any("status=deferred" in ln for ln in lines)
    wait_for(done, DELIVERY, "all 12 delivered, or a deferral", interval=0.05)
    deferred = [ln for ln in delivery_lines(mta, qid) if "status=deferred" in ln]
    assert deferred == [], f"{len(deferred)} recipients deferred:\n" + "\n".join(deferred)
    settled(mta, pf)

    got = pf.deliveries()
    assert sorted(d.recipient for d in got) == rcpts           # each exactly once
    assert all(after_mta_received(d) == data for d in got)
    # Postfix took at most 5 per transaction: three transactions or more.
    transactions = {d.postfix_queue_id for d in got}
    assert len(transactions) >= 3
    assert pf.log_lines(r"status=(deferred|bounced)") == []


# --------------------------------------------------------------------------- (e) Postfix relays into mta

def stored(mta) -> dict[str, tuple[str, list[str], bytes]]:
    """message-id -> (sender, recipients, whole stored content) for mta's spool."""
    out = {}
    for row in mta.rows("SELECT m.queue_id, m.sender, c.headers, c.body FROM messages m "
                        "JOIN contents c ON c.queue_id = m.queue_id"):
        rcpts = [r["address"] for r in mta.rows(
            "SELECT address FROM recipients WHERE queue_id = ? ORDER BY id", (row["queue_id"],))]
        content = bytes(row["headers"]) + bytes(row["body"])
        m = re.search(rb"^Message-ID: <([^>]*)>", content, re.M | re.I)
        out[m.group(1).decode() if m else row["queue_id"]] = (row["sender"], rcpts, content)
    return out


def strip_trace(content: bytes, n: int) -> tuple[list[bytes], bytes]:
    fields = []
    for _ in range(n):
        field, content = split_received(content)
        fields.append(field)
    return fields, content


def test_postfix_relays_into_mta_byte_exact(mta_factory, pf):
    mta = mta_factory()               # [relay] deliver = false: what arrives stays in the spool
    pf.configure(relayhost=f"[127.0.0.1]:{mta.port}")
    body = (".Leading dot\r\n..two dots\r\nGrüße, 8-bit UTF-8 text\r\n" + "x" * 900 + "\r\n"
            ).encode()
    by_sendmail = message("relayed by postfix via sendmail", body, to="carol@mta.test",
                          headers=b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8"
                                  b"\r\nContent-Transfer-Encoding: 8bit\r\n")
    pf.sendmail(SENDER, ["carol@mta.test"], by_sendmail.replace(b"\r\n", b"\n"))

    by_swaks = message("relayed by postfix via swaks", b".dot\r\nplain\r\n", to="dave@mta.test")
    tmp = Path(tempfile.mkdtemp(prefix="mta-swaks-"))
    try:
        # swaks ends the data with CRLF "." CRLF of its own (and dot-stuffs).
        (tmp / "msg").write_bytes(by_swaks[:-2])
        proc = subprocess.run([SWAKS, "--server", pf.address("smtp"), "--helo", "client.interop.test",
                               "--from", SENDER, "--to", "dave@mta.test",
                               "--data", str(tmp / "msg")],
                              capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout.decode(errors="replace")
    assert b"<-  250 2.0.0 Ok: queued as" in proc.stdout

    got = wait_for(lambda: (lambda s: s if len(s) == 2 else None)(stored(mta)), DELIVERY,
                   "two messages relayed by Postfix into mta's spool", interval=0.05)
    pf.wait_queue_empty(DELIVERY)

    sender, rcpts, content = got["relayed-by-postfix-via-sendmail@origin.test"]
    assert (sender, rcpts) == (SENDER, ["carol@mta.test"])
    (ours, theirs), rest = strip_trace(content, 2)
    assert f"by {MTA_HOSTNAME}".encode() in ours and b"(Postfix, from userid 0)" in theirs
    assert rest == by_sendmail

    sender, rcpts, content = got["relayed-by-postfix-via-swaks@origin.test"]
    assert (sender, rcpts) == (SENDER, ["dave@mta.test"])
    (ours, theirs), rest = strip_trace(content, 2)
    assert b"from client.interop.test" in theirs and b"by postfix.interop.test (Postfix)" in theirs
    assert rest == by_swaks

    relayed = pf.log_lines(r"status=sent")
    assert len(relayed) == 2 and all(f"relay=127.0.0.1[127.0.0.1]:{mta.port}" in ln
                                     and "250 2.0.0" in ln for ln in relayed), relayed
    assert pf.problems() == []
