"""The SMTP client session over a connection the pool did not open (as
ATRN needs): ClientSession.start and .send on an SMTPClientProtocol
attached to any transport, here a StringTransport."""
from __future__ import annotations

from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial import unittest

from mta.smtp.client import OutboundMessage, OutboundRecipient, SMTPClientProtocol
from mta.smtp.content import prepare_content
from mta.smtp.session import ClientSession, TLSPolicy
from mta.smtp.settings import Timeouts
from mta.smtp.types import NextHop

HOP = NextHop("branch.example.test", "192.0.2.9", 25)
EHLO = b"250-branch.example.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n"


class SessionOverAnyTransportTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.released: list = []
        self.quits: list = []
        self.session = ClientSession(helo_name="me.test", timeouts=Timeouts(),
                                     tls=TLSPolicy(starttls=False),
                                     release=self.released.append, quit=self.quits.append)
        self.proto = SMTPClientProtocol(MemoryReactorClock(), HOP)
        self.tr = StringTransport()
        self.proto.makeConnection(self.tr)   # connected by someone else, not the pool

    def take(self):
        v = self.tr.value()
        self.tr.clear()
        return v

    def start(self):
        d = defer.Deferred.fromCoroutine(self.session.start(self.proto, HOP, False))
        self.proto.dataReceived(b"220 branch.example.test ESMTP\r\n")
        self.assertEqual(self.take(), b"EHLO me.test\r\n")
        self.proto.dataReceived(EHLO)
        self.assertIs(self.successResultOf(d), self.proto)

    def message(self, *rcpts):
        return OutboundMessage(queue_id="Q1", sender="a@example.test",
                               recipients=[OutboundRecipient(r) for r in rcpts],
                               headers=b"Subject: t\r\n\r\n", body=b"hello\r\n")

    def test_a_transaction_over_a_connection_the_session_did_not_open(self):
        self.start()
        msg = self.message("x@branch.test", "y@branch.test")
        d = defer.Deferred.fromCoroutine(
            self.session.send(self.proto, HOP, msg, prepare_content(msg), False, False))
        self.assertEqual(self.take(), b"MAIL FROM:<a@example.test>\r\n"
                                      b"RCPT TO:<x@branch.test>\r\nRCPT TO:<y@branch.test>\r\n"
                                      b"DATA\r\n")
        self.proto.dataReceived(b"250 2.1.0 ok\r\n550 5.1.1 no such user\r\n250 2.1.5 ok\r\n"
                                b"354 go\r\n")
        self.assertEqual(self.take(), b"Subject: t\r\n\r\nhello\r\n.\r\n")
        self.proto.dataReceived(b"250 2.0.0 queued as B1\r\n")
        res = self.successResultOf(d)
        self.assertEqual([(r.code, r.status, r.remote) for r in res.results],
                         [(550, "5.1.1", HOP), (250, "2.0.0", HOP)])
        self.assertEqual(res.remote, HOP)
        self.assertEqual(self.released, [self.proto])   # handed back to its owner

    def test_without_reopen_the_rest_after_a_close_is_deferred(self):
        self.start()
        msg = self.message("x@branch.test", "y@branch.test")
        d = defer.Deferred.fromCoroutine(
            self.session.send(self.proto, HOP, msg, prepare_content(msg), False, False))
        self.take()
        # The limit of one recipient, then the peer closes after the data.
        self.proto.dataReceived(b"250 ok\r\n250 ok\r\n452 4.5.3 too many recipients\r\n"
                                b"354 go\r\n")
        self.take()
        self.proto.dataReceived(b"421 4.3.2 closing\r\n")
        res = self.successResultOf(d)
        self.assertEqual(res.results[0].code, 421)
        self.assertEqual((res.results[1].code, res.results[1].status, res.results[1].remote),
                         (451, "4.4.2", None))
        self.assertIn("closed before every recipient was sent", res.results[1].text)
