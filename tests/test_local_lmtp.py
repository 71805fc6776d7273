"""The LMTP client (mta/local/lmtp.py), against a scripted LMTP peer
(per-recipient replies after the data, failures, drops) and a real Dovecot
LMTP server (tests/dovecot.py) whose Maildir must hold the message."""
from __future__ import annotations

import mailbox
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, protocol, reactor
from twisted.trial import unittest

from dovecot import DovecotLMTP
from mta.hostport import client_endpoint
from mta.local.lmtp import LMTPClient
from mta.smtp.settings import Timeouts

CONTENT = (b"From: alice@example.net\r\n"
           b"To: bob@example.org\r\n"
           b"Subject: LMTP test\r\n"
           b"\r\n"
           b"line one\r\n"
           b".leading dot\r\n"
           b"..two\r\n"
           b"caf\xc3\xa9 8-bit\r\n"
           b"last\r\n")


class LMTPPeer(protocol.Protocol):
    """A strict little LMTP server that does what ``factory.script`` says:

    ``pipelining`` (True), ``greeting`` ("220 lmtp.test LMTP"),
    ``rcpt`` {address: reply}, ``data`` {address: reply after the dot},
    ``drop_after`` n: close after n end-of-data replies.
    """

    def connectionMade(self) -> None:
        self.s = self.factory.script
        self.buf = b""
        self.in_data = False
        self.data = b""
        self.accepted: list[str] = []
        self.factory.connections += 1
        self.transport.write((self.s.get("greeting", "220 lmtp.test LMTP") + "\r\n").encode())

    def reply(self, text: str) -> None:
        self.transport.write(text.encode() + b"\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        while True:
            if self.in_data:
                end = self.buf.find(b"\r\n.\r\n")
                if self.data == b"" and self.buf.startswith(b".\r\n"):
                    end, self.buf = -2, b"\r\n" + self.buf
                if end < 0 and not self.buf.startswith(b"\r\n.\r\n"):
                    return
                body = self.buf[:end + 2] if end >= 0 else b""
                self.buf = self.buf[end + 5:]
                self.in_data = False
                self.end_of_data(body.replace(b"\r\n..", b"\r\n."))
                continue
            nl = self.buf.find(b"\r\n")
            if nl < 0:
                return
            line, self.buf = self.buf[:nl].decode(), self.buf[nl + 2:]
            self.factory.commands.append(line)
            if not self.s.get("pipelining", True) and self.buf:
                self.factory.violations.append(f"pipelined after {line}")
            self.command(line)

    def command(self, line: str) -> None:
        verb = line.split(" ", 1)[0].upper()
        if verb == "LHLO":
            ext = ["8BITMIME", "ENHANCEDSTATUSCODES"] + (
                ["PIPELINING"] if self.s.get("pipelining", True) else [])
            self.reply("\r\n".join([f"250-lmtp.test"] + [f"250-{e}" for e in ext[:-1]]
                                   + [f"250 {ext[-1]}"]))
        elif verb == "MAIL":
            self.accepted = []
            self.reply(self.s.get("mail", "250 2.1.0 OK"))
        elif verb == "RCPT":
            addr = line[line.index("<") + 1:line.rindex(">")]
            r = self.s.get("rcpt", {}).get(addr, "250 2.1.5 OK")
            if r.startswith("2"):
                self.accepted.append(addr)
            self.reply(r)
        elif verb == "DATA":
            if not self.accepted:
                self.reply("503 5.5.1 No valid recipients")
                return
            self.in_data = True
            self.data = b""
            self.reply("354 OK")
        elif verb == "QUIT":
            self.reply("221 2.0.0 Bye")
            self.transport.loseConnection()
        elif verb == "RSET":
            self.reply("250 2.0.0 OK")
        else:
            self.reply("500 5.5.2 Unknown command")

    def end_of_data(self, body: bytes) -> None:
        self.factory.messages.append(body)
        for n, addr in enumerate(self.accepted):
            if n == self.s.get("drop_after", -1):
                self.transport.loseConnection()
                return
            self.reply(self.s.get("data", {}).get(addr, f"250 2.0.0 <{addr}> Saved"))


class PeerFactory(protocol.ServerFactory):
    protocol = LMTPPeer

    def __init__(self, script: dict[str, Any]):
        self.script = script
        self.commands: list[str] = []
        self.messages: list[bytes] = []
        self.violations: list[str] = []
        self.connections = 0


class ScriptedPeerTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="mta-lmtp-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def peer(self, script: dict[str, Any], tcp: bool = False) -> tuple[PeerFactory, str]:
        f = PeerFactory(script)
        if tcp:
            port = reactor.listenTCP(0, f, interface="127.0.0.1")
            dest = f"tcp:127.0.0.1:{port.getHost().port}"
        else:
            path = os.path.join(self.dir, "lmtp")
            port = reactor.listenUNIX(path, f)
            dest = f"unix:{path}"
        self.addCleanup(port.stopListening)
        return f, dest

    def client(self, dest: str, **kw: Any) -> LMTPClient:
        return LMTPClient(reactor, dest, lhlo_name="mx.example.org", **kw)

    @defer.inlineCallbacks
    def test_per_recipient_replies_after_the_data(self):
        f, dest = self.peer({"rcpt": {"nobody@example.org": "550 5.1.1 <nobody> User doesn't exist"},
                             "data": {"carol@example.org": "452 4.2.2 <carol> Mailbox is full"}})
        results = yield self.client(dest).deliver(
            "alice@example.net", ["bob@example.org", "nobody@example.org", "carol@example.org",
                                  "dave@example.org"], CONTENT)
        self.assertEqual([r.text for r in results], [
            "250 2.0.0 <bob@example.org> Saved",
            "550 5.1.1 <nobody> User doesn't exist",
            "452 4.2.2 <carol> Mailbox is full",
            "250 2.0.0 <dave@example.org> Saved"])
        self.assertEqual([(r.delivered, r.temporary, r.permanent) for r in results],
                         [(True, False, False), (False, False, True), (False, True, False),
                          (True, False, False)])
        self.assertEqual({r.remote for r in results}, {dest})
        self.assertEqual(f.commands, ["LHLO mx.example.org", "MAIL FROM:<alice@example.net>",
                                      "RCPT TO:<bob@example.org>", "RCPT TO:<nobody@example.org>",
                                      "RCPT TO:<carol@example.org>", "RCPT TO:<dave@example.org>",
                                      "DATA", "QUIT"])
        self.assertEqual(f.messages, [CONTENT])       # unstuffed by the peer: byte for byte
        self.assertEqual(f.connections, 1)

    @defer.inlineCallbacks
    def test_without_pipelining_one_command_at_a_time(self):
        f, dest = self.peer({"pipelining": False,
                             "data": {"b@example.org": "451 4.3.0 Temporary failure"}}, tcp=True)
        results = yield self.client(dest).deliver("", ["a@example.org", "b@example.org"],
                                                  b"Subject: x\r\n\r\nno final newline")
        self.assertEqual([r.code for r in results], [250, 451])
        self.assertEqual(f.violations, [])
        self.assertEqual(f.commands[1], "MAIL FROM:<>")
        self.assertEqual(f.messages, [b"Subject: x\r\n\r\nno final newline\r\n"])

    @defer.inlineCallbacks
    def test_mail_refused_goes_to_every_recipient(self):
        f, dest = self.peer({"mail": "451 4.3.0 Try later"})
        results = yield self.client(dest).deliver("a@b.c", ["x@example.org", "y@example.org"],
                                                  CONTENT)
        self.assertEqual([r.text for r in results], ["451 4.3.0 Try later"] * 2)
        self.assertEqual(f.messages, [])

    @defer.inlineCallbacks
    def test_no_recipient_accepted_sends_no_data(self):
        f, dest = self.peer({"rcpt": {"x@example.org": "550 5.1.1 no"}})
        results = yield self.client(dest).deliver("a@b.c", ["x@example.org"], CONTENT)
        self.assertEqual([r.text for r in results], ["550 5.1.1 no"])
        self.assertEqual(f.messages, [])

    @defer.inlineCallbacks
    def test_drop_after_the_first_reply_defers_only_the_rest(self):
        f, dest = self.peer({"drop_after": 1})
        results = yield self.client(dest).deliver("a@b.c", ["x@example.org", "y@example.org",
                                                            "z@example.org"], CONTENT)
        self.assertEqual(results[0].text, "250 2.0.0 <x@example.org> Saved")
        self.assertEqual(results[0].remote, dest)
        for r in results[1:]:
            self.assertEqual((r.code, r.status, r.remote), (451, "4.4.2", None))
            self.assertEqual(r.text, f"451 4.4.2 lost connection with {dest} while waiting for "
                                     "the reply for <y@example.org>")

    @defer.inlineCallbacks
    def test_greeting_refused(self):
        f, dest = self.peer({"greeting": "554 5.3.2 not now"})
        results = yield self.client(dest).deliver("a@b.c", ["x@example.org"], CONTENT)
        self.assertEqual([r.text for r in results], ["554 5.3.2 not now"])

    @defer.inlineCallbacks
    def test_connect_refused(self):
        dest = f"unix:{self.dir}/nothing-here"
        results = yield self.client(dest).deliver("a@b.c", ["x@example.org"], CONTENT)
        self.assertEqual((results[0].code, results[0].status, results[0].remote),
                         (451, "4.4.1", None))
        self.assertTrue(results[0].text.startswith(f"451 4.4.1 connect to {dest}: "))

    @defer.inlineCallbacks
    def test_timeout_waiting_for_a_reply(self):
        f, dest = self.peer({"data": {}, "drop_after": 99})
        f.script["mail"] = "250 2.1.0 OK"

        # A peer that never answers the end of data.
        def end_of_data(self_: LMTPPeer, body: bytes) -> None:
            f.messages.append(body)
        self.patch(LMTPPeer, "end_of_data", end_of_data)
        t = Timeouts(data_end=0.5)
        results = yield self.client(dest, timeouts=t).deliver("a@b.c", ["x@example.org"], CONTENT)
        self.assertEqual((results[0].code, results[0].status), (451, "4.4.2"))
        self.assertIn("timed out while waiting for the reply for <x@example.org>",
                      results[0].text)

    @defer.inlineCallbacks
    def test_local_refusals(self):
        f, dest = self.peer({})
        c = self.client(dest)
        results = yield c.deliver("a@b.c", ["x@example.org"], CONTENT, body_type="BINARYMIME")
        self.assertEqual(results[0].text, "554 5.6.3 BINARYMIME content cannot be sent over LMTP")
        results = yield c.deliver("a@b.c", ["x@example.org"], CONTENT, smtputf8=True)
        self.assertEqual(results[0].text, f"553 5.6.7 LMTP server {dest} does not support "
                                          "SMTPUTF8")
        results = yield c.deliver("a@b.c", ["x@example.org\r\nRSET", "y@example.org"], CONTENT)
        self.assertEqual([r.code for r in results], [553, 250])
        self.assertNotIn("RSET", f.commands)


def test_client_endpoint() -> None:
    assert client_endpoint("tcp:127.0.0.1:24") == "tcp:host=127.0.0.1:port=24"
    assert client_endpoint("tcp:[::1]:24") == "tcp:host=\\:\\:1:port=24"
    assert client_endpoint("unix:/run/dovecot/lmtp") == "unix:path=/run/dovecot/lmtp"
    for bad in ("", "lmtp.example:24", "tcp:host", "tcp:h:0", "tcp:h:99999", "unix:relative",
                "ssl:h:24"):
        with pytest.raises(ValueError):
            client_endpoint(bad)


# --------------------------------------------------------------------------- real Dovecot

class DovecotTests(unittest.TestCase):
    """Debian's Dovecot LMTP server as the peer (tests/setup-deps installs it)."""

    def setUp(self) -> None:
        root = Path(tempfile.mkdtemp(prefix="mta-dovecot-"))
        self.addCleanup(shutil.rmtree, root, True)
        self.dc = DovecotLMTP(root, users=["bob", "carol"]).start()
        self.addCleanup(self.dc.stop)

    def stored(self, user: str) -> list[bytes]:
        box = self.dc.maildir(user)
        if not box.exists():
            return []
        mb = mailbox.Maildir(str(box), factory=None, create=False)
        return [mb.get_bytes(k) for k in sorted(mb.keys())]

    def strip_added(self, data: bytes) -> tuple[list[bytes], bytes]:
        """Dovecot's own header fields (Return-Path, Delivered-To, Received)
        and the rest of the file."""
        added = []
        lines = data.split(b"\n")
        i = 0
        while i < len(lines):
            if lines[i].startswith((b"Return-Path:", b"Delivered-To:", b"Received:")):
                added.append(lines[i])
                i += 1
                while i < len(lines) and lines[i].startswith((b" ", b"\t")):
                    i += 1
                continue
            break
        return added, b"\n".join(lines[i:])

    @defer.inlineCallbacks
    def check(self, dest: str):
        c = LMTPClient(reactor, dest, lhlo_name="mx.example.org")
        results = yield c.deliver("alice@example.net", ["bob@example.org", "nobody@example.org",
                                                        "carol@example.org"], CONTENT,
                                  body_type="8BITMIME")
        self.assertEqual([r.code for r in results], [250, 550, 250], self.dc.log_text())
        self.assertEqual(results[1].status, "5.1.1")
        self.assertEqual({r.remote for r in results}, {dest})
        for user in ("bob", "carol"):
            [data] = self.stored(user)
            added, rest = self.strip_added(data)
            # Dovecot stores LF line ends (mail_save_crlf = no): the content
            # is the message byte for byte, CRLF as LF, dot-unstuffed.
            self.assertEqual(rest, CONTENT.replace(b"\r\n", b"\n"))
            self.assertEqual(added[0], b"Return-Path: <alice@example.net>")

    def test_unix_socket(self):
        return self.check(f"unix:{self.dc.socket}")

    def test_loopback_port(self):
        return self.check(f"tcp:127.0.0.1:{self.dc.port}")
