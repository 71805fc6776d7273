"""ATRN end to end (RFC 2645): the real daemon (``twistd -n mta``) with an
ODMR listener, and the customer's side scripted here on one socket: it
connects, says EHLO, AUTH PLAIN (plain text on loopback:
``allow_plaintext_on_loopback``), ATRN, and then acts as an SMTP server on
the same socket, recording byte for byte what arrives.

The mail for branch.test is routed to a dead loopback port, so the daemon's
own attempt defers it (DNS is a dead loopback port too): it waits for the
ATRN.  Debian's fetchmail in ODMR mode (``tests/setup-deps`` installs it)
is the real client at the end: it logs in with AUTH CRAM-MD5 and pipes the
turned connection to its smtphost, a scripted peer.
"""
from __future__ import annotations

import base64
import os
import shutil
import smtplib
import socket
import subprocess

import pytest

from conftest import free_port, wait_for

from mta.auth.passwords import cram_md5_secret, hash_password

PASSWORD = "night shift"
MESSAGE = (b"From: alice@example.test\r\nTo: bob@branch.test\r\nSubject: for the branch\r\n"
           b"\r\nhello branch\r\n.a line with a dot\r\n")


class Wire:
    """Our end of the customer's socket: lines in, bytes out, all recorded."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.buf = b""
        self.received = b""

    def _more(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("connection closed")
        self.buf += data
        self.received += data

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._more()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line + b"\r\n"

    def reply(self) -> bytes:
        out = b""
        while True:
            line = self.line()
            out += line
            if line[3:4] == b" ":
                return out

    def until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            self._more()
        i = self.buf.index(marker) + len(marker)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def closed(self) -> bool:
        try:
            self._more()
        except EOFError:
            return True
        return False


@pytest.fixture(params=[1, 2], ids=["1-process", "2-workers"])
def gateway(mta_factory, tmp_path, request):
    """The gateway daemon; with ``[server] workers = 2`` the ATRN listener
    is the delivering worker's, SMTP the accepting one's."""
    users = tmp_path / "users"
    # With a CRAM-MD5 secret (mta passwd add --cram-md5): fetchmail needs it.
    users.write_text(f"branch:{hash_password(PASSWORD, n=16)}:{cram_md5_secret(PASSWORD)}\n")
    atrn_port = free_port()
    dead = free_port()
    extra = f"""
[relay]
deliver = true

[routes]
"branch.test" = "127.0.0.1:{dead}"

[auth]
users_file = "{users}"
allow_plaintext_on_loopback = true

[gateway]
atrn_listen = ["tcp:{atrn_port}:interface=127.0.0.1"]
hold_domains = ["branch.test"]

[gateway.atrn]
"branch" = ["branch.test"]
"""
    daemon = mta_factory(server={"workers": request.param}, extra=extra)
    if request.param > 1:
        wait_for(lambda: "(1 delivering, 1 accepting)" in daemon.log()
                 and daemon.log().count(" started: pid ") == 2, 20, "the workers")
    daemon.atrn_port = atrn_port
    return daemon


def login(wire: Wire) -> None:
    assert wire.reply().startswith(b"220 ")
    wire.send(b"EHLO branch-gw.branch.test\r\n")
    ehlo = wire.reply()
    assert b"250-ATRN\r\n" in ehlo and b"AUTH PLAIN LOGIN" in ehlo
    token = base64.b64encode(b"\0branch\0" + PASSWORD.encode()).decode()
    wire.send(f"AUTH PLAIN {token}\r\n".encode())
    assert wire.reply() == b"235 2.7.0 Authentication successful\r\n"


def test_atrn_hands_the_queue_over_on_the_same_connection(gateway):
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=20) as c:
        c.sendmail("alice@example.test", ["bob@branch.test", "carol@branch.test"], MESSAGE)
    wait_for(lambda: gateway.rows("SELECT COUNT(*) FROM recipients WHERE state='deferred'"
                                  )[0][0] == 2, 20, "the daemon's own attempt to defer the mail",
             detail=gateway.log)

    wire = Wire(gateway.atrn_port)
    login(wire)
    wire.send(b"MAIL FROM:<x@example.test>\r\n")
    assert wire.reply().startswith(b"502 5.5.1 ")
    wire.send(b"ATRN\r\n")
    assert wire.reply() == b"250 2.0.0 OK now reversing the connection\r\n"
    # The roles turn: we are the SMTP server now.
    wire.received = b""
    wire.send(b"220 branch-gw.branch.test ESMTP\r\n")
    assert wire.line() == b"EHLO mx.e2e.test\r\n"
    wire.send(b"250-branch-gw.branch.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 DSN\r\n")
    assert wire.until(b"DATA\r\n") == (b"MAIL FROM:<alice@example.test>\r\n"
                                       b"RCPT TO:<bob@branch.test>\r\n"
                                       b"RCPT TO:<carol@branch.test>\r\n"
                                       b"DATA\r\n")
    wire.send(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n354 go ahead\r\n")
    content = wire.until(b"\r\n.\r\n")
    assert content.startswith(b"Received: from ")
    assert content.endswith(MESSAGE.replace(b"\r\n.a", b"\r\n..a") + b".\r\n")
    wire.send(b"250 2.0.0 Ok: queued at the branch\r\n")
    assert wire.line() == b"QUIT\r\n"
    wire.send(b"221 2.0.0 Bye\r\n")
    assert wire.closed()

    wait_for(lambda: gateway.count() == 0, 20, "the delivered message to leave the spool",
             detail=gateway.log)
    wait_for(lambda: "ATRN client=127.0.0.1 user=branch domains=branch.test recipients=2: "
                     "handed over" in gateway.log(), 20, "the ATRN log line")


def test_atrn_with_nothing_queued_and_for_a_domain_not_granted(gateway):
    wire = Wire(gateway.atrn_port)
    wire.send(b"EHLO x\r\n")
    login_reply = wire.reply()
    assert login_reply.startswith(b"220 ")
    assert wire.reply().startswith(b"250-")
    wire.send(b"ATRN\r\n")
    assert wire.reply() == b"530 5.7.0 Authentication required\r\n"
    token = base64.b64encode(b"\0branch\0" + PASSWORD.encode()).decode()
    wire.send(f"AUTH PLAIN {token}\r\n".encode())
    assert wire.reply().startswith(b"235 ")
    wire.send(b"ATRN elsewhere.test\r\n")
    assert wire.reply() == b"450 4.7.1 Access denied to mail for elsewhere.test\r\n"
    wire.send(b"ATRN branch.test\r\n")
    assert wire.reply() == b"453 4.3.0 You have no mail\r\n"
    wire.send(b"QUIT\r\n")
    assert wire.reply() == b"221 2.0.0 Bye\r\n"


def run_fetchmail(tmp_path, gateway, peer, user="branch", password=PASSWORD):
    """``fetchmail --protocol ODMR`` once, with an rc file (mode 0600, as
    fetchmail insists) and a HOME of its own; returns the CompletedProcess."""
    home = tmp_path / "fetchmail-home"
    home.mkdir(exist_ok=True)
    rc = home / ".fetchmailrc"
    rc.write_text(f'poll 127.0.0.1 service {gateway.atrn_port} protocol ODMR\n'
                  f'    user "{user}" password "{password}"\n'
                  f'    fetchdomains branch.test\n'
                  f'    smtphost 127.0.0.1/{peer.port}\n')
    rc.chmod(0o600)
    env = dict(os.environ, HOME=str(home), FETCHMAILHOME=str(home))
    return subprocess.run(["fetchmail", "-f", str(rc), "-v", "--nosyslog", "--nodetach",
                           "--pidfile", str(home / "pid"), "--idfile", str(home / "ids")],
                          env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(shutil.which("fetchmail") is None, reason="fetchmail is not installed")
def test_fetchmail_odmr_takes_the_mail(gateway, peer_factory, tmp_path):
    """Debian's fetchmail as the real ODMR client: it logs in, says ATRN for
    its fetchdomains and, once we turn the connection, pipes it to its
    smtphost (a scripted peer), which records what arrives."""
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=20) as c:
        c.sendmail("alice@example.test", ["bob@branch.test"], MESSAGE)
    wait_for(lambda: gateway.rows("SELECT COUNT(*) FROM recipients WHERE state='deferred'"
                                  )[0][0] == 1, 20, "the daemon's own attempt to defer the mail",
             detail=gateway.log)
    [(size,)] = [tuple(r) for r in gateway.rows("SELECT size FROM messages")]
    peer = peer_factory({"name": "branch-gw.branch.test"})
    done = run_fetchmail(tmp_path, gateway, peer)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "auth ok client=127.0.0.1 mechanism=CRAM-MD5 sasl_username=branch" in gateway.log()
    [t] = peer.transactions()
    assert t.mail == f"MAIL FROM:<alice@example.test> SIZE={size}"   # the peer offers SIZE
    assert t.rcpts == ["RCPT TO:<bob@branch.test>"]
    assert t.data.startswith(b"Received: from ") and t.data.endswith(MESSAGE)
    assert t.raw.endswith(MESSAGE.replace(b"\r\n.a", b"\r\n..a"))
    wait_for(lambda: gateway.count() == 0, 20, "the delivered message to leave the spool",
             detail=gateway.log)
