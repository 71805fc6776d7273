"""The outbound SMTP client (mta.smtp.client) against real peers on
loopback (tests/peers.py, and Postfix's smtp-sink), and
against a MemoryReactorClock + StringTransport for the timeout logic.

Nothing here sleeps: timeouts are driven with a Clock, even against a real
peer (the pool is given a reactor whose connectTCP is the real one and
whose callLater is a Clock's).
"""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, error, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from peers import ScriptedPeer, unstuff  # noqa: E402

from mta.smtp import client as client_module  # noqa: E402
from mta.smtp.client import (  # noqa: E402
    DeliveryResult,
    NextHop,
    OutboundMessage,
    OutboundRecipient,
    RecipientResult,
)
from mta.smtp.content import DotStuffer, dot_stuff  # noqa: E402
from mta.smtp.settings import Timeouts  # noqa: E402
from mta.smtp.pool import ConnectionPool  # noqa: E402

HEADERS = (b"From: <a@example.test>\r\nTo: <b@example.test>\r\n"
           b"Subject: test\r\nMessage-ID: <1@example.test>\r\n\r\n")
BODY = b"Hello.\r\n.A line with a leading dot\r\n..two dots\r\n.\r\nThe end.\r\n"
SMTP_SINK = "/usr/sbin/smtp-sink"


def message(body: bytes = BODY, *, headers: bytes = HEADERS, rcpts=("b@example.test",),
            sender: str = "a@example.test", **kw) -> OutboundMessage:
    return OutboundMessage(
        queue_id="Q1", sender=sender,
        recipients=[r if isinstance(r, OutboundRecipient) else OutboundRecipient(r)
                    for r in rcpts],
        headers=headers, body=body, **kw)


def closed_port() -> int:
    """A loopback port nobody listens on (connections are refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def filler(n: int) -> bytes:
    """*n* octets of short CRLF-terminated lines (n >= 2)."""
    assert n >= 2
    out = []
    while n >= 156:
        out.append(b"a" * 76 + b"\r\n")
        n -= 78
    if n >= 78:
        half = n // 2
        out.append(b"b" * (half - 2) + b"\r\n")
        n -= half
    out.append(b"c" * (n - 2) + b"\r\n")
    return b"".join(out)


@defer.inlineCallbacks
def wait_until(condition, turns=10000):
    """Let the real reactor turn until *condition()* holds (no sleeping)."""
    for _ in range(turns):
        if condition():
            return
        yield task.deferLater(reactor, 0, lambda: None)
    raise AssertionError("condition never became true")


class _ClockedReactor:
    """The real reactor for the network, a Clock for time."""

    def __init__(self, clock: task.Clock):
        self.clock = clock

    def connectTCP(self, *a, **kw):
        return reactor.connectTCP(*a, **kw)

    def callLater(self, *a, **kw):
        return self.clock.callLater(*a, **kw)

    def seconds(self):
        return self.clock.seconds()


# ---------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------

TRICKY = (b".start\r\n\r\n.\r\n..\r\n...\r\nx.\r\n.x\r\n\r\n\r\n.\r\n"
          b"a\r\n.\r\n.\r\n\r\n..\r\n.")


class DotStuffingTests(unittest.SynchronousTestCase):
    def test_whole_buffer(self):
        self.assertEqual(dot_stuff(b".a\r\n.b\r\nc.\r\n..\r\n"),
                         b"..a\r\n..b\r\nc.\r\n...\r\n")
        self.assertEqual(dot_stuff(b""), b"")

    def test_every_two_way_split(self):
        want = dot_stuff(TRICKY)
        for i in range(len(TRICKY) + 1):
            s = DotStuffer()
            self.assertEqual(s.feed(TRICKY[:i]) + s.feed(TRICKY[i:]), want, i)

    def test_every_three_way_split(self):
        want = dot_stuff(TRICKY)
        n = len(TRICKY)
        for i in range(n + 1):
            for j in range(i, n + 1):
                s = DotStuffer()
                got = s.feed(TRICKY[:i]) + s.feed(TRICKY[i:j]) + s.feed(TRICKY[j:])
                self.assertEqual(got, want, (i, j))

    def test_one_octet_at_a_time(self):
        s = DotStuffer()
        got = b"".join(s.feed(TRICKY[i:i + 1]) for i in range(len(TRICKY)))
        self.assertEqual(got, dot_stuff(TRICKY))

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.sampled_from([b".", b"\r\n", b"a", b"\r\n.", b".\r\n", b".."]),
                    max_size=40),
           st.lists(st.integers(min_value=0, max_value=200), max_size=10))
    def test_random_chunking_round_trips(self, pieces, cuts):
        data = b"".join(pieces)
        cuts = sorted(c % (len(data) + 1) for c in cuts)
        s = DotStuffer()
        out = b""
        prev = 0
        for c in cuts + [len(data)]:
            out += s.feed(data[prev:c])
            prev = c
        self.assertEqual(out, dot_stuff(data))
        if data.endswith(b"\r\n") or not data:
            self.assertNotIn(b"\r\n.\r\n", b"\r\n" + out[:-2] if out else b"")
            self.assertEqual(unstuff(out), data)


class ReplyParsingTests(unittest.SynchronousTestCase):
    def test_enhanced_status(self):
        r = client_module._make_reply(250, ["2.0.0 Ok: queued as X"])
        self.assertEqual((r.code, r.status, r.text), (250, "2.0.0", "250 2.0.0 Ok: queued as X"))

    def test_no_enhanced_status(self):
        r = client_module._make_reply(550, ["No such user"])
        self.assertEqual((r.status, r.text), ("5.0.0", "550 No such user"))
        r = client_module._make_reply(451, [""])
        self.assertEqual((r.status, r.text), ("4.0.0", "451"))

    def test_status_class_must_match_code(self):
        r = client_module._make_reply(550, ["2.1.1 odd"])
        self.assertEqual(r.status, "5.0.0")

    def test_multi_line_joined(self):
        r = client_module._make_reply(550, ["5.1.1 first", "5.1.1 second", "third"])
        self.assertEqual(r.text, "550 5.1.1 first second third")
        self.assertEqual(r.lines, ("5.1.1 first", "5.1.1 second", "third"))


# ---------------------------------------------------------------------------
# Against scripted peers on loopback
# ---------------------------------------------------------------------------

class PeerTestCase(unittest.TestCase):
    timeout = 60

    def peer(self, script=None, *, strict=True) -> ScriptedPeer:
        p = ScriptedPeer(script or {})
        p.start()
        self.addCleanup(p.stop)
        if strict:
            self.addCleanup(lambda: self.assertEqual(p.violations, []))
        return p

    def pool(self, **kw) -> ConnectionPool:
        kw.setdefault("helo_name", "client.example.test")
        kw.setdefault("reactor", reactor)
        pool = ConnectionPool(**kw)
        self.addCleanup(pool.close)
        return pool

    def assertResult(self, rr: RecipientResult, code: int, status: str, text: str | None = None):
        self.assertEqual((rr.code, rr.status), (code, status), rr)
        if text is not None:
            self.assertEqual(rr.text, text)


class BasicDeliveryTests(PeerTestCase):
    @defer.inlineCallbacks
    def test_byte_exact_delivery(self):
        peer = self.peer()
        pool = self.pool()
        msg = message()
        result = yield pool.deliver([peer.hop()], msg)
        self.assertIsInstance(result, DeliveryResult)
        self.assertEqual(result.remote, peer.hop())
        self.assertTrue(result.dsn_offered)
        self.assertEqual(len(result.results), 1)
        self.assertResult(result.results[0], 250, "2.0.0", "250 2.0.0 Ok: queued as Q1")
        self.assertTrue(result.results[0].from_remote)
        [tx] = peer.complete
        self.assertEqual(tx.helo, "client.example.test")
        self.assertEqual(tx.data, HEADERS + BODY)
        self.assertEqual(tx.raw, dot_stuff(HEADERS + BODY))
        self.assertEqual(tx.method, "DATA")
        self.assertEqual(tx.mail_address, "a@example.test")
        self.assertEqual(tx.mail_params, {"SIZE": str(len(HEADERS + BODY))})
        self.assertEqual(tx.rcpts, ["RCPT TO:<b@example.test>"])

    @defer.inlineCallbacks
    def test_null_sender_and_many_recipients(self):
        peer = self.peer()
        pool = self.pool()
        rcpts = [f"r{i}@example.test" for i in range(30)]
        result = yield pool.deliver([peer.hop()], message(sender="", rcpts=rcpts))
        self.assertEqual([r.address for r in result.results], rcpts)
        self.assertTrue(all(r.code == 250 for r in result.results))
        [tx] = peer.complete
        self.assertEqual(tx.mail_address, "")
        self.assertEqual(tx.accepted, rcpts)

    @defer.inlineCallbacks
    def test_content_not_ending_in_crlf_gets_one(self):
        peer = self.peer()
        pool = self.pool()
        result = yield pool.deliver([peer.hop()], message(b"no newline at the end"))
        self.assertEqual(result.results[0].code, 250)
        self.assertEqual(peer.complete[0].data, HEADERS + b"no newline at the end\r\n")
        self.assertEqual(peer.complete[0].mail_params["SIZE"], str(len(HEADERS) + 23))

    @defer.inlineCallbacks
    def test_empty_body_and_empty_message(self):
        peer = self.peer()
        pool = self.pool()
        yield pool.deliver([peer.hop()], message(b""))
        yield pool.deliver([peer.hop()], message(b"", headers=b""))
        self.assertEqual([t.data for t in peer.complete], [HEADERS, b""])

    @defer.inlineCallbacks
    def test_bare_newlines_are_never_sent(self):
        peer = self.peer()
        pool = self.pool()
        result = yield pool.deliver([peer.hop()], message(b"one\ntwo\rthree\r\n.four\n"))
        self.assertEqual(result.results[0].code, 250)
        self.assertEqual(peer.complete[0].data, HEADERS + b"one\r\ntwo\r\nthree\r\n.four\r\n")

    @defer.inlineCallbacks
    def test_end_of_data_lookalikes_inside_content(self):
        peer = self.peer()
        pool = self.pool()
        body = b"a\r\n.\r\nQUIT\r\n.\r\n\r\n.\r\n.\r\n..\r\n"
        yield pool.deliver([peer.hop()], message(body))
        [tx] = peer.complete
        self.assertEqual(tx.data, HEADERS + body)
        self.assertEqual(peer.transactions, [tx])

    @defer.inlineCallbacks
    def test_content_starting_with_a_dot(self):
        peer = self.peer()
        pool = self.pool()
        yield pool.deliver([peer.hop()], message(b".\r\n", headers=b""))
        yield pool.deliver([peer.hop()], message(b".hidden\r\n", headers=b""))
        self.assertEqual([t.data for t in peer.complete], [b".\r\n", b".hidden\r\n"])
        self.assertEqual([t.raw for t in peer.complete], [b"..\r\n", b"..hidden\r\n"])

    @defer.inlineCallbacks
    def test_dot_on_every_chunk_boundary(self):
        """With tiny write chunks every line start falls on every boundary."""
        peer = self.peer()
        pool = self.pool()
        headers = b"Subject: dots\r\n\r\n"
        body = b".\r\n..\r\n.x\r\n\r\n.\r\nab\r\n.\r\n...\r\n.y\r\n"
        for size in range(1, 14):
            self.patch(client_module, "CHUNK", size)
            result = yield pool.deliver([peer.hop()], message(body, headers=headers))
            self.assertEqual(result.results[0].code, 250, size)
            self.assertEqual(peer.complete[-1].data, headers + body, size)
            self.assertEqual(peer.complete[-1].raw, dot_stuff(headers + body), size)
        self.assertEqual(len(peer.complete), 13)

    @defer.inlineCallbacks
    def test_dot_at_real_chunk_boundaries(self):
        peer = self.peer()
        pool = self.pool()
        chunk = client_module.CHUNK
        for where in range(chunk - 3, chunk + 4):
            # The "." that must be stuffed sits at offset `where` of the body.
            body = filler(where) + b".dot\r\n" + filler(100) + b".\r\n"
            assert body[where:where + 1] == b"."
            result = yield pool.deliver([peer.hop()], message(body))
            self.assertEqual(result.results[0].code, 250)
            self.assertEqual(peer.complete[-1].data, HEADERS + body, where)

    @defer.inlineCallbacks
    def test_large_message_is_written_in_pieces(self):
        peer = self.peer()
        pool = self.pool()
        line = b"0123456789" * 7 + b"\r\n"
        body = line * (6 * 1024 * 1024 // len(line)) + b".last\r\n"
        result = yield pool.deliver([peer.hop()], message(body))
        self.assertEqual(result.results[0].code, 250)
        self.assertEqual(peer.complete[0].data, HEADERS + body)

    @defer.inlineCallbacks
    def test_memoryview_and_bytearray_content(self):
        peer = self.peer()
        pool = self.pool()
        msg = message(memoryview(b"x\r\n.y\r\n"), headers=bytearray(HEADERS))
        yield pool.deliver([peer.hop()], msg)
        self.assertEqual(peer.complete[0].data, HEADERS + b"x\r\n.y\r\n")


class EnvelopeSafetyTests(PeerTestCase):
    @defer.inlineCallbacks
    def test_control_characters_in_addresses_are_never_sent(self):
        peer = self.peer()
        pool = self.pool()
        rcpts = ["ok@example.test", "evil@example.test>\r\nRSET", "ok2@example.test"]
        result = yield pool.deliver([peer.hop()], message(rcpts=rcpts))
        self.assertEqual([(r.code, r.status) for r in result.results],
                         [(250, "2.0.0"), (553, "5.1.3"), (250, "2.0.0")])
        self.assertEqual(peer.complete[0].accepted, ["ok@example.test", "ok2@example.test"])
        result = yield pool.deliver([peer.hop()], message(sender="a@example.test\r\nRSET"))
        self.assertEqual((result.results[0].code, result.results[0].status), (553, "5.1.7"))
        result = yield pool.deliver([peer.hop()], message(rcpts=["\n@example.test"]))
        self.assertEqual(result.results[0].code, 553)
        self.assertEqual(len(peer.complete), 1)

    @defer.inlineCallbacks
    def test_malformed_dsn_parameters_are_dropped(self):
        peer = self.peer()
        pool = self.pool()
        rcpts = [OutboundRecipient("a@example.test", "SUCCESS FAILURE", "rfc822;a b@x")]
        yield pool.deliver([peer.hop()], message(rcpts=rcpts, ret="FULL\r\n", envid="a b"))
        tx = peer.complete[0]
        self.assertEqual(tx.mail, f"MAIL FROM:<a@example.test> SIZE={len(HEADERS + BODY)}")
        self.assertEqual(tx.rcpts, ["RCPT TO:<a@example.test>"])


class HopSelectionTests(PeerTestCase):
    @defer.inlineCallbacks
    def test_first_hop_refusing_second_used(self):
        peer = self.peer()
        pool = self.pool()
        dead = NextHop("dead.test", "127.0.0.1", closed_port())
        result = yield pool.deliver([dead, peer.hop()], message())
        self.assertEqual(result.remote, peer.hop())
        self.assertEqual(result.results[0].code, 250)
        self.assertEqual(len(peer.complete), 1)

    @defer.inlineCallbacks
    def test_no_hop_reachable(self):
        pool = self.pool()
        hops = [NextHop("a.test", "127.0.0.1", closed_port()),
                NextHop("b.test", "127.0.0.1", closed_port())]
        result = yield pool.deliver(hops, message(rcpts=["x@example.test", "y@example.test"]))
        self.assertIsNone(result.remote)
        for rr in result.results:
            self.assertResult(rr, 451, "4.4.1")
            self.assertFalse(rr.from_remote)
            self.assertRegex(rr.text, r"^451 4\.4\.1 connect to b\.test\[127\.0\.0\.1\]:\d+: "
                                      r"Connection refused$")

    @defer.inlineCallbacks
    def test_ipv6_loopback(self):
        try:
            s = socket.socket(socket.AF_INET6)
            s.bind(("::1", 0))
            s.close()
        except OSError:
            raise unittest.SkipTest("no IPv6 loopback")
        peer = ScriptedPeer({})
        peer.start(interface="::1")
        self.addCleanup(peer.stop)
        pool = self.pool()
        hop = NextHop("v6.test", "::1", peer.port)
        result = yield pool.deliver([hop], message())
        self.assertEqual(result.results[0].code, 250)
        self.assertEqual(peer.complete[0].data, HEADERS + BODY)

    @defer.inlineCallbacks
    def test_no_hops_at_all(self):
        pool = self.pool()
        result = yield pool.deliver([], message())
        self.assertResult(result.results[0], 451, "4.4.1")

    @defer.inlineCallbacks
    def test_greeting_4xx_next_hop(self):
        busy = self.peer({"actions": {"greeting": "421 4.3.2 Busy, come back later"}})
        good = self.peer()
        pool = self.pool()
        result = yield pool.deliver([busy.hop("busy.test"), good.hop()], message())
        self.assertEqual(result.results[0].code, 250)
        self.assertEqual(result.remote, good.hop())
        self.assertEqual(busy.transactions, [])

    @defer.inlineCallbacks
    def test_greeting_5xx_everywhere_is_permanent(self):
        a = self.peer({"actions": {"greeting": "554 5.7.1 No SMTP service here"}})
        b = self.peer({"actions": {"greeting": "554 5.7.1 Go away"}})
        pool = self.pool()
        result = yield pool.deliver([a.hop("a.test"), b.hop("b.test")], message())
        self.assertResult(result.results[0], 554, "5.7.1", "554 5.7.1 Go away")
        self.assertTrue(result.results[0].from_remote)
        self.assertEqual(result.remote, b.hop("b.test"))
        # We say QUIT after a 554 greeting (RFC 5321 §3.1).
        self.assertIn((1, b"QUIT"), a.commands)

    @defer.inlineCallbacks
    def test_5xx_and_unreachable_mixed_is_temporary(self):
        a = self.peer({"actions": {"greeting": "554 5.7.1 Go away"}})
        dead = NextHop("dead.test", "127.0.0.1", closed_port())
        pool = self.pool()
        result = yield pool.deliver([a.hop("a.test"), dead], message())
        # The last error from a hop that was reached, made temporary.
        self.assertResult(result.results[0], 451, "4.7.1", "554 5.7.1 Go away")
        self.assertEqual(result.remote, a.hop("a.test"))

    @defer.inlineCallbacks
    def test_ehlo_4xx_next_hop(self):
        a = self.peer({"actions": {"EHLO": "421 4.7.0 Too many connections"}})
        b = self.peer()
        pool = self.pool()
        result = yield pool.deliver([a.hop("a.test"), b.hop("b.test")], message())
        self.assertEqual(result.remote, b.hop("b.test"))
        self.assertEqual(result.results[0].code, 250)

    @defer.inlineCallbacks
    def test_mail_4xx_next_hop(self):
        a = self.peer({"actions": {"MAIL": "451 4.3.0 Try again later"}})
        b = self.peer()
        pool = self.pool()
        result = yield pool.deliver([a.hop("a.test"), b.hop("b.test")], message())
        self.assertEqual(result.remote, b.hop("b.test"))
        self.assertEqual(result.results[0].code, 250)
        self.assertEqual(len(b.complete), 1)
        self.assertEqual(a.complete, [])

    @defer.inlineCallbacks
    def test_mail_5xx_everywhere(self):
        a = self.peer({"actions": {"MAIL": "553 5.7.1 Sender rejected"}})
        b = self.peer({"actions": {"MAIL": "550 5.7.1 Sender rejected too"}})
        pool = self.pool()
        result = yield pool.deliver([a.hop("a.test"), b.hop("b.test")],
                                    message(rcpts=["x@example.test", "y@example.test"]))
        for rr in result.results:
            self.assertResult(rr, 550, "5.7.1", "550 5.7.1 Sender rejected too")

    @defer.inlineCallbacks
    def test_mail_4xx_then_5xx_is_temporary(self):
        a = self.peer({"actions": {"MAIL": "451 4.3.0 Later"}})
        b = self.peer({"actions": {"MAIL": "550 5.7.1 No"}})
        pool = self.pool()
        result = yield pool.deliver([a.hop("a.test"), b.hop("b.test")], message())
        self.assertResult(result.results[0], 451, "4.7.1", "550 5.7.1 No")

    @defer.inlineCallbacks
    def test_drop_at_end_of_data_next_hop(self):
        a = self.peer({"actions": {"DATA_END": "drop"}})
        b = self.peer()
        pool = self.pool()
        result = yield pool.deliver([a.hop("a.test"), b.hop("b.test")], message())
        self.assertEqual(result.remote, b.hop("b.test"))
        self.assertEqual(result.results[0].code, 250)

    @defer.inlineCallbacks
    def test_drop_at_each_step_only_hop(self):
        for step in ("greeting", "EHLO", "MAIL", "RCPT", "DATA", "DATA_END"):
            peer = self.peer({"actions": {step: "drop"}})
            pool = self.pool()
            result = yield pool.deliver([peer.hop()], message())
            rr = result.results[0]
            self.assertResult(rr, 451, "4.4.2")
            self.assertFalse(rr.from_remote)
            self.assertIn("lost connection with peer.test[127.0.0.1]", rr.text)
            self.assertEqual(result.remote, peer.hop())

    @defer.inlineCallbacks
    def test_unparseable_reply_is_a_hop_failure(self):
        peer = self.peer({"actions": {"MAIL": "raw:hello there"}})
        pool = self.pool()
        result = yield pool.deliver([peer.hop()], message())
        self.assertResult(result.results[0], 451, "4.5.0")


class RecipientTests(PeerTestCase):
    SCRIPT = {"rcpt": {"soft@example.test": "450 4.2.1 Mailbox busy",
                       "hard@example.test": "550 5.1.1 No such user\nreally, none"}}

    @defer.inlineCallbacks
    def _mixed(self, extensions):
        peer = self.peer(dict(self.SCRIPT, extensions=extensions))
        pool = self.pool()
        rcpts = ["ok1@example.test", "soft@example.test", "hard@example.test",
                 "ok2@example.test"]
        result = yield pool.deliver([peer.hop()], message(rcpts=rcpts))
        r = result.results
        self.assertEqual([x.address for x in r], rcpts)
        self.assertResult(r[0], 250, "2.0.0", "250 2.0.0 Ok: queued as Q1")
        self.assertResult(r[1], 450, "4.2.1", "450 4.2.1 Mailbox busy")
        self.assertResult(r[2], 550, "5.1.1", "550 5.1.1 No such user really, none")
        self.assertResult(r[3], 250, "2.0.0")
        [tx] = peer.complete
        self.assertEqual(tx.accepted, ["ok1@example.test", "ok2@example.test"])
        self.assertEqual(tx.data, HEADERS + BODY)
        return peer

    def test_mixed_pipelined(self):
        return self._mixed(["PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"])

    def test_mixed_without_pipelining(self):
        return self._mixed(["8BITMIME", "ENHANCEDSTATUSCODES"])

    @defer.inlineCallbacks
    def test_all_rejected_no_data_then_rset_and_reuse(self):
        peer = self.peer({"extensions": ["8BITMIME"], "rcpt": {"x@example.test": "550 5.1.1 no"}})
        pool = self.pool()
        result = yield pool.deliver([peer.hop()], message(rcpts=["x@example.test"]))
        self.assertResult(result.results[0], 550, "5.1.1")
        verbs = [c.split(b" ")[0] for _, c in peer.commands]
        self.assertEqual(verbs, [b"EHLO", b"MAIL", b"RCPT", b"RSET"])
        result = yield pool.deliver([peer.hop()], message())
        self.assertEqual(result.results[0].code, 250)
        self.assertEqual(peer.connections, 1)

    @defer.inlineCallbacks
    def test_all_rejected_pipelined(self):
        peer = self.peer({"rcpt": {"x@example.test": "550 5.1.1 no"}})
        pool = self.pool()
        result = yield pool.deliver([peer.hop()], message(rcpts=["x@example.test"]))
        self.assertResult(result.results[0], 550, "5.1.1")
        self.assertEqual(peer.complete, [])
        self.assertEqual(peer.commands[-1], (1, b"RSET"))
        result = yield pool.deliver([peer.hop()], message())
        self.assertEqual(result.results[0].code, 250)
        self.assertEqual(peer.connections, 1)

    @defer.inlineCallbacks
    def test_data_command_rejected(self):
        for ext in (["PIPELINING"], []):
            peer = self.peer({"extensions": ext, "actions": {"DATA": "451 4.3.0 Not now"}})
            pool = self.pool()
            result = yield pool.deliver([peer.hop()], message(rcpts=["a@example.test",
                                                                     "b@example.test"]))
            for rr in result.results:
                self.assertResult(rr, 451, "4.3.0", "451 4.3.0 Not now")
            self.assertEqual(peer.commands[-1], (1, b"RSET"))

    @defer.inlineCallbacks
    def test_end_of_data_reply_applies_to_accepted_only(self):
        peer = self.peer({"rcpt": {"bad@example.test": "550 5.1.1 no"},
                          "actions": {"DATA_END": "554 5.7.1 Spam"}})
        pool = self.pool()
        result = yield pool.deliver([peer.hop()], message(rcpts=["a@example.test",
                                                                 "bad@example.test"]))
        self.assertResult(result.results[0], 554, "5.7.1", "554 5.7.1 Spam")
        self.assertResult(result.results[1], 550, "5.1.1")
        # A 5xx after the content is per-recipient, not a hop failure.
        self.assertEqual(result.remote, peer.hop())


class ExtensionTests(PeerTestCase):
    @defer.inlineCallbacks
    def test_helo_fallback(self):
        peer = self.peer({"ehlo": False})
        pool = self.pool()
        rcpt = OutboundRecipient("b@example.test", "SUCCESS", "rfc822;b@example.test")
        msg = message(rcpts=[rcpt],
                      ret="HDRS", envid="X1", body_type="7BIT")
        result = yield pool.deliver([peer.hop()], msg)
        self.assertEqual(result.results[0].code, 250)
        self.assertFalse(result.dsn_offered)
        [tx] = peer.complete
        self.assertEqual(tx.mail, "MAIL FROM:<a@example.test>")
        self.assertEqual(tx.rcpts, ["RCPT TO:<b@example.test>"])
        self.assertEqual([c for _, c in peer.commands][:2],
                         [b"EHLO client.example.test", b"HELO client.example.test"])

    @defer.inlineCallbacks
    def test_helo_fallback_refused(self):
        peer = self.peer({"ehlo": False, "actions": {"HELO": "550 5.7.1 Not you"}})
        pool = self.pool()
        result = yield pool.deliver([peer.hop()], message())
        self.assertResult(result.results[0], 550, "5.7.1")

    @defer.inlineCallbacks
    def test_no_pipelining_means_lockstep(self):
        # The peer records a violation for any command sent before its reply.
        peer = self.peer({"extensions": ["8BITMIME"]})
        pool = self.pool()
        yield pool.deliver([peer.hop()], message(rcpts=["a@example.test", "b@example.test"]))
        self.assertEqual(peer.pipelined, 0)
        self.assertEqual(len(peer.complete), 1)

    @defer.inlineCallbacks
    def test_pipelining_used_when_offered(self):
        peer = self.peer({"extensions": ["PIPELINING"]})
        pool = self.pool()
        yield pool.deliver([peer.hop()], message(rcpts=["a@example.test", "b@example.test"]))
        # MAIL, RCPT, RCPT arrived with more input behind them (DATA was last).
        self.assertGreaterEqual(peer.pipelined, 3)

    @defer.inlineCallbacks
    def test_size_too_big_for_next_hop(self):
        peer = self.peer({"extensions": ["PIPELINING", "SIZE 100", "8BITMIME"]})
        pool = self.pool()
        result = yield pool.deliver([peer.hop()], message(b"x" * 200 + b"\r\n",
                                                          rcpts=["a@example.test",
                                                                 "b@example.test"]))
        for rr in result.results:
            self.assertResult(rr, 552, "5.3.4", "552 5.3.4 Message too big for next hop")
            self.assertFalse(rr.from_remote)
        self.assertEqual(peer.transactions, [])
        self.assertEqual(result.remote, peer.hop())
        # The connection is still good for the next message.
        result = yield pool.deliver([peer.hop()], message(b"small\r\n", headers=b""))
        self.assertEqual(result.results[0].code, 250)
        self.assertEqual(peer.complete[0].mail_params, {"SIZE": "7"})
        self.assertEqual(peer.connections, 1)

    @defer.inlineCallbacks
    def test_size_exactly_at_limit_and_size_zero(self):
        content = b"x" * 98 + b"\r\n"
        peer = self.peer({"extensions": ["SIZE 100"]})
        pool = self.pool()
        result = yield pool.deliver([peer.hop()], message(content, headers=b""))
        self.assertEqual(result.results[0].code, 250)
        peer0 = self.peer({"extensions": ["SIZE 0"]})
        result = yield pool.deliver([peer0.hop()], message(content * 10, headers=b""))
        self.assertEqual(result.results[0].code, 250)
        self.assertEqual(peer0.complete[0].mail_params, {"SIZE": "1000"})
        peer_bare = self.peer({"extensions": ["SIZE"]})
        result = yield pool.deliver([peer_bare.hop()], message(content * 10, headers=b""))
        self.assertEqual(result.results[0].code, 250)

    @defer.inlineCallbacks
    def test_no_size_param_when_not_offered(self):
        peer = self.peer({"extensions": ["8BITMIME"]})
        pool = self.pool()
        yield pool.deliver([peer.hop()], message())
        self.assertEqual(peer.complete[0].mail_params, {})

    @defer.inlineCallbacks
    def test_8bitmime_passed_on(self):
        peer = self.peer()
        pool = self.pool()
        body = "Grüße\r\n".encode()
        yield pool.deliver([peer.hop()], message(body, body_type="8BITMIME"))
        self.assertEqual(peer.complete[0].mail_params["BODY"], "8BITMIME")
        self.assertEqual(peer.complete[0].data, HEADERS + body)

    @defer.inlineCallbacks
    def test_8bit_content_without_body_param_is_labelled(self):
        peer = self.peer()
        pool = self.pool()
        yield pool.deliver([peer.hop()], message("é\r\n".encode()))
        self.assertEqual(peer.complete[0].mail_params["BODY"], "8BITMIME")

    @defer.inlineCallbacks
    def test_7bit_passed_on(self):
        peer = self.peer()
        pool = self.pool()
        yield pool.deliver([peer.hop()], message(body_type="7BIT"))
        self.assertEqual(peer.complete[0].mail_params["BODY"], "7BIT")

    @defer.inlineCallbacks
    def test_ascii_declared_8bitmime_to_hop_without_8bitmime_goes_as_is(self):
        # Postfix and most MUAs declare BODY=8BITMIME on everything (RFC 6152 §3).
        peer = self.peer({"extensions": ["PIPELINING", "SIZE 1000000"]})
        pool = self.pool()
        result = yield pool.deliver([peer.hop()], message(body_type="8BITMIME"))
        self.assertResult(result.results[0], 250, "2.0.0")
        [tx] = peer.complete
        self.assertEqual(tx.data, HEADERS + BODY)
        self.assertEqual(tx.mail_params, {"SIZE": str(len(HEADERS + BODY))})

    @defer.inlineCallbacks
    def test_ascii_declared_8bitmime_keeps_its_body_param_where_offered(self):
        peer = self.peer()
        pool = self.pool()
        yield pool.deliver([peer.hop()], message(body_type="8BITMIME"))
        self.assertEqual(peer.complete[0].mail_params["BODY"], "8BITMIME")

    @defer.inlineCallbacks
    def test_8bit_mime_text_converted_for_hop_without_8bitmime(self):
        peer = self.peer({"extensions": ["PIPELINING", "SIZE 1000000", "DSN"]})
        pool = self.pool()
        headers = (b"From: <a@example.test>\r\nMIME-Version: 1.0\r\n"
                   b"Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n")
        ascii_part = (b"Content-Type: application/octet-stream\r\n"
                      b"Content-Transfer-Encoding: base64\r\n\r\nAAEC\r\n")
        body = (b"preamble\r\n--b1\r\nContent-Type: text/plain; charset=utf-8\r\n"
                b"Content-Transfer-Encoding: 8bit\r\n\r\n" + "Grüße\r\n.\r\n".encode()
                + b"\r\n--b1\r\n" + ascii_part + b"\r\n--b1--\r\nepilogue\r\n")
        result = yield pool.deliver([peer.hop()], message(body, headers=headers,
                                                          body_type="8BITMIME"))
        self.assertResult(result.results[0], 250, "2.0.0")
        [tx] = peer.complete
        self.assertEqual(tx.data, headers + (
            b"preamble\r\n--b1\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\nGr=C3=BC=C3=9Fe\r\n=2E\r\n"
            b"\r\n--b1\r\n" + ascii_part + b"\r\n--b1--\r\nepilogue\r\n"))
        self.assertNotIn("BODY", tx.mail_params)
        self.assertEqual(tx.mail_params["SIZE"], str(len(tx.data)))   # the size as sent

    @defer.inlineCallbacks
    def test_8bit_plain_message_converted_as_text_plain(self):
        peer = self.peer({"extensions": ["PIPELINING"]})
        pool = self.pool()
        result = yield pool.deliver([peer.hop()], message("é\r\n".encode()))
        self.assertResult(result.results[0], 250, "2.0.0")
        self.assertEqual(peer.complete[0].data, HEADERS[:-2] + (
            b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\n=C3=A9\r\n"))
        self.assertEqual(peer.complete[0].mail_params, {})

    @defer.inlineCallbacks
    def test_8bit_that_cannot_be_converted_bounces_and_says_why(self):
        peer = self.peer({"extensions": ["PIPELINING", "SIZE 1000000"]})
        pool = self.pool()
        cases = [
            (message(b"x\r\n", headers="Subject: Grüße\r\n\r\n".encode()),
             "8-bit octets in a header field"),
            (message("é\r\n".encode(), headers=b"MIME-Version: 1.0\r\n"
                     b"Content-Type: multipart/mixed; boundary=zz\r\n\r\n"),
             "a multipart with no boundary delimiter in its body"),
        ]
        for msg, why in cases:
            result = yield pool.deliver([peer.hop()], msg)
            rr = result.results[0]
            self.assertResult(rr, 554, "5.6.3", "554 5.6.3 message has 8-bit content the next "
                              "hop does not accept (8BITMIME) and it could not be converted: "
                              + why + (" (only SMTPUTF8 could carry them)"
                                       if "header" in why else ""))
            self.assertFalse(rr.from_remote)
        result = yield pool.deliver([peer.hop()], message(b"\x00\xff\r\n",
                                                          body_type="BINARYMIME"))
        self.assertResult(result.results[0], 554, "5.6.3")
        self.assertIn("could not be converted", result.results[0].text)
        self.assertEqual(peer.transactions, [])
        # 7-bit content still goes.
        result = yield pool.deliver([peer.hop()], message())
        self.assertEqual(result.results[0].code, 250)
        self.assertNotIn("BODY", peer.complete[0].mail_params)

    @defer.inlineCallbacks
    def test_converted_size_checked_against_hop_limit(self):
        # 82 octets fit; as base64 with the added MIME fields they do not.
        body = "é".encode() * 40 + b"\r\n"
        peer = self.peer({"extensions": ["SIZE %d" % (len(HEADERS) + 200)]})
        pool = self.pool()
        result = yield pool.deliver([peer.hop()], message(body))
        self.assertResult(result.results[0], 552, "5.3.4")
        self.assertEqual(peer.transactions, [])

    @defer.inlineCallbacks
    def test_smtputf8(self):
        peer = self.peer()
        pool = self.pool()
        headers = "Subject: Grüße\r\n\r\n".encode()
        msg = message(headers=headers, sender="jörg@exämple.test", rcpts=["ärger@exämple.test"],
                      smtputf8=True, body_type="8BITMIME")
        result = yield pool.deliver([peer.hop()], msg)
        self.assertEqual(result.results[0].code, 250)
        tx = peer.complete[0]
        self.assertIn("SMTPUTF8", tx.mail_params)
        self.assertEqual(tx.mail_address, "jörg@exämple.test")
        self.assertEqual(tx.rcpts, ["RCPT TO:<ärger@exämple.test>"])

    @defer.inlineCallbacks
    def test_smtputf8_not_sent_when_not_needed(self):
        peer = self.peer()
        pool = self.pool()
        yield pool.deliver([peer.hop()], message())
        self.assertNotIn("SMTPUTF8", peer.complete[0].mail_params)

    @defer.inlineCallbacks
    def test_smtputf8_to_hop_without_it_fails(self):
        peer = self.peer({"extensions": ["PIPELINING", "8BITMIME"]})
        pool = self.pool()
        for msg in (message(smtputf8=True), message(rcpts=["ärger@exämple.test"])):
            result = yield pool.deliver([peer.hop()], msg)
            self.assertResult(result.results[0], 553, "5.6.7")
        self.assertEqual(peer.transactions, [])

    @defer.inlineCallbacks
    def test_binarymime_uses_bdat(self):
        peer = self.peer()
        pool = self.pool()
        body = b"\x00\x01\n.\r\n.bare\rdot\r\n\xff" + bytes(range(256))
        result = yield pool.deliver([peer.hop()], message(body, body_type="BINARYMIME"))
        self.assertEqual(result.results[0].code, 250)
        [tx] = peer.complete
        self.assertEqual(tx.method, "BDAT")
        self.assertEqual(tx.raw, HEADERS + body)       # no stuffing, no newline changes
        self.assertEqual(tx.mail_params["BODY"], "BINARYMIME")
        self.assertEqual(tx.chunks, [len(HEADERS + body)])

    @defer.inlineCallbacks
    def test_binarymime_large(self):
        peer = self.peer()
        pool = self.pool()
        body = os.urandom(3 * 1024 * 1024 + 17)
        yield pool.deliver([peer.hop()], message(body, body_type="BINARYMIME"))
        self.assertEqual(peer.complete[0].raw, HEADERS + body)

    @defer.inlineCallbacks
    def test_binarymime_without_chunking_fails(self):
        for ext in (["PIPELINING", "8BITMIME", "BINARYMIME"], ["PIPELINING", "CHUNKING"]):
            peer = self.peer({"extensions": ext})
            pool = self.pool()
            result = yield pool.deliver([peer.hop()], message(b"\x00\r\n", body_type="BINARYMIME"))
            self.assertResult(result.results[0], 554, "5.6.3")
            self.assertEqual(peer.transactions, [])

    @defer.inlineCallbacks
    def test_binarymime_rejected_recipients(self):
        peer = self.peer({"extensions": ["CHUNKING", "BINARYMIME"],
                          "rcpt": {"x@example.test": "550 5.1.1 no"}})
        pool = self.pool()
        result = yield pool.deliver([peer.hop()], message(b"\x00\r\n", body_type="BINARYMIME",
                                                          rcpts=["x@example.test",
                                                                 "y@example.test"]))
        self.assertEqual([r.code for r in result.results], [550, 250])
        result = yield pool.deliver([peer.hop()], message(b"\x00\r\n", body_type="BINARYMIME",
                                                          rcpts=["x@example.test"]))
        self.assertEqual([r.code for r in result.results], [550])
        self.assertEqual(len(peer.complete), 1)

    @defer.inlineCallbacks
    def test_dsn_parameters_passed_on(self):
        peer = self.peer()
        pool = self.pool()
        rcpts = [OutboundRecipient("a@example.test", "SUCCESS,FAILURE",
                                   "rfc822;orig+2Ba@example.test"),
                 OutboundRecipient("b@example.test", "NEVER"),
                 OutboundRecipient("c@example.test")]
        result = yield pool.deliver([peer.hop()], message(rcpts=rcpts, ret="HDRS", envid="ENV+2B1"))
        self.assertTrue(result.dsn_offered)
        tx = peer.complete[0]
        self.assertEqual(tx.mail_params["RET"], "HDRS")
        self.assertEqual(tx.mail_params["ENVID"], "ENV+2B1")
        self.assertEqual(tx.rcpts, [
            "RCPT TO:<a@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;orig+2Ba@example.test",
            "RCPT TO:<b@example.test> NOTIFY=NEVER",
            "RCPT TO:<c@example.test>"])

    @defer.inlineCallbacks
    def test_dsn_parameters_omitted_without_dsn(self):
        peer = self.peer({"extensions": ["PIPELINING", "8BITMIME"]})
        pool = self.pool()
        rcpts = [OutboundRecipient("a@example.test", "SUCCESS", "rfc822;a@example.test")]
        result = yield pool.deliver([peer.hop()], message(rcpts=rcpts, ret="FULL", envid="E"))
        self.assertFalse(result.dsn_offered)
        self.assertEqual(result.results[0].code, 250)
        tx = peer.complete[0]
        self.assertEqual(tx.mail, "MAIL FROM:<a@example.test>")
        self.assertEqual(tx.rcpts, ["RCPT TO:<a@example.test>"])

    @defer.inlineCallbacks
    def test_utf8_orcpt_encoded_without_smtputf8(self):
        peer = self.peer()
        pool = self.pool()
        rcpts = [OutboundRecipient("a@example.test", None, "utf-8;ärger@exämple.test")]
        yield pool.deliver([peer.hop()], message(rcpts=rcpts))
        self.assertEqual(peer.complete[0].rcpt_params(0)["ORCPT"],
                         "utf-8;\\x{E4}rger@ex\\x{E4}mple.test")


class TLSTests(PeerTestCase):
    @defer.inlineCallbacks
    def test_opportunistic_starttls(self):
        peer = self.peer({"starttls": True})
        pool = self.pool()
        result = yield pool.deliver([peer.hop()], message())
        self.assertEqual(result.results[0].code, 250)
        [tx] = peer.complete
        self.assertTrue(tx.tls)
        self.assertEqual(tx.data, HEADERS + BODY)
        verbs = [c.split(b" ")[0] for _, c in peer.commands]
        self.assertEqual(verbs[:3], [b"EHLO", b"STARTTLS", b"EHLO"])
        # Reused, still encrypted.
        yield pool.deliver([peer.hop()], message())
        self.assertTrue(peer.complete[1].tls)
        self.assertEqual(peer.connections, 1)

    @defer.inlineCallbacks
    def test_starttls_disabled(self):
        peer = self.peer({"starttls": True})
        pool = self.pool(starttls=False)
        yield pool.deliver([peer.hop()], message())
        self.assertFalse(peer.complete[0].tls)

    @defer.inlineCallbacks
    def test_tls_handshake_failure_retries_in_plaintext(self):
        peer = self.peer({"tls_fail": True})
        pool = self.pool()
        result = yield pool.deliver([peer.hop()], message())
        self.assertEqual(result.results[0].code, 250)
        self.assertEqual(peer.connections, 2)
        [tx] = peer.complete
        self.assertFalse(tx.tls)
        self.assertEqual(tx.connection, 2)

    @defer.inlineCallbacks
    def test_starttls_refused_continues_in_plaintext(self):
        peer = self.peer({"starttls": True, "actions": {"STARTTLS": "454 4.7.0 TLS not available"}})
        pool = self.pool()
        result = yield pool.deliver([peer.hop()], message())
        self.assertEqual(result.results[0].code, 250)
        self.assertEqual(peer.connections, 1)
        self.assertFalse(peer.complete[0].tls)


class ReuseTests(PeerTestCase):
    @defer.inlineCallbacks
    def test_two_messages_one_connection(self):
        peer = self.peer()
        pool = self.pool()
        r1 = yield pool.deliver([peer.hop()], message(b"one\r\n"))
        self.assertEqual(pool.idle_count(peer.hop()), 1)
        r2 = yield pool.deliver([peer.hop()], message(b"two\r\n"))
        self.assertEqual([r1.results[0].code, r2.results[0].code], [250, 250])
        self.assertEqual(peer.connections, 1)
        self.assertEqual(pool.connections_made, 1)
        self.assertEqual([t.data for t in peer.complete],
                         [HEADERS + b"one\r\n", HEADERS + b"two\r\n"])
        self.assertEqual(pool.idle_count(), 1)
        yield pool.close()
        self.assertEqual(pool.idle_count(), 0)
        self.assertEqual(peer.commands[-1], (1, b"QUIT"))

    @defer.inlineCallbacks
    def test_opened_after_never_reuses_a_connection_cached_before(self):
        # A flush after ETRN (RFC 1985) goes out on a new connection; the
        # connections opened since are reused as usual.
        from twisted.internet import reactor
        peer = self.peer()
        pool = self.pool()
        yield pool.deliver([peer.hop()], message(b"one\r\n"))
        since = reactor.seconds()
        yield pool.deliver([peer.hop()], message(b"two\r\n"), opened_after=since)
        yield pool.deliver([peer.hop()], message(b"three\r\n"), opened_after=since)
        self.assertEqual(pool.connections_made, 2)
        self.assertEqual([t.connection for t in peer.complete], [1, 2, 2])
        self.assertEqual(pool.idle_count(peer.hop()), 1)
        yield pool.close()

    @defer.inlineCallbacks
    def test_concurrent_deliveries_use_separate_connections(self):
        peer = self.peer()
        pool = self.pool(max_idle_per_host=1)
        results = yield defer.gatherResults([pool.deliver([peer.hop()], message(b"%d\r\n" % i))
                                             for i in range(3)])
        self.assertTrue(all(r.results[0].code == 250 for r in results))
        self.assertEqual(peer.connections, 3)
        self.assertEqual(pool.idle_count(), 1)   # the others were QUIT

    @defer.inlineCallbacks
    def test_idle_connection_to_later_hop_preferred(self):
        peer = self.peer()
        other = self.peer()
        pool = self.pool()
        yield pool.deliver([peer.hop()], message())
        result = yield pool.deliver([other.hop("other.test"), peer.hop()], message())
        self.assertEqual(result.remote, peer.hop())
        self.assertEqual(other.connections, 0)

    @defer.inlineCallbacks
    def test_dead_cached_connection_reconnects_transparently(self):
        # The peer drops the connection when the second MAIL arrives on it.
        for ext in (["PIPELINING"], []):
            peer = self.peer({"extensions": ext, "actions": {"MAIL@1#2": "drop"}})
            pool = self.pool()
            yield pool.deliver([peer.hop()], message(b"one\r\n"))
            other = NextHop("never.test", "127.0.0.1", closed_port())
            result = yield pool.deliver([peer.hop(), other], message(b"two\r\n"))
            self.assertEqual(result.results[0].code, 250)
            self.assertEqual(result.remote, peer.hop())
            self.assertEqual(peer.connections, 2)
            self.assertEqual([t.data for t in peer.complete],
                             [HEADERS + b"one\r\n", HEADERS + b"two\r\n"])

    @defer.inlineCallbacks
    def test_cached_connection_answering_421_reconnects(self):
        peer = self.peer({"actions": {"MAIL@1#2": "421 4.4.2 Idle too long"}})
        pool = self.pool()
        yield pool.deliver([peer.hop()], message())
        result = yield pool.deliver([peer.hop()], message())
        self.assertEqual(result.results[0].code, 250)
        self.assertEqual(peer.connections, 2)

    @defer.inlineCallbacks
    def test_connection_closed_by_peer_while_idle(self):
        peer = self.peer()
        pool = self.pool()
        yield pool.deliver([peer.hop()], message())
        self.assertEqual(pool.idle_count(), 1)
        lost = list(pool._idle.values())[0][0].when_lost()
        for conn in list(peer._open):
            conn.transport.loseConnection()
        yield lost
        self.assertEqual(pool.idle_count(), 0)
        result = yield pool.deliver([peer.hop()], message())
        self.assertEqual(result.results[0].code, 250)
        self.assertEqual(peer.connections, 2)

    @defer.inlineCallbacks
    def test_no_caching_after_close(self):
        peer = self.peer()
        pool = self.pool()
        yield pool.close()
        yield pool.deliver([peer.hop()], message())
        self.assertEqual(pool.idle_count(), 0)


class PeerProcessTests(PeerTestCase):
    @defer.inlineCallbacks
    def test_peer_as_a_process(self):
        from peers import PeerProcess
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp, True)
        script = {"rcpt": {"no@example.test": "550 5.1.1 No such user"}}
        proc = PeerProcess(script, record=os.path.join(tmp, "rec.jsonl"))
        port = proc.start()
        self.addCleanup(proc.stop)
        pool = self.pool()
        hop = NextHop("proc.test", "127.0.0.1", port)
        result = yield pool.deliver([hop], message(rcpts=["yes@example.test", "no@example.test"]))
        self.assertEqual([r.code for r in result.results], [250, 550])
        [tx] = proc.transactions()
        self.assertEqual(tx.data, HEADERS + BODY)
        self.assertEqual(tx.accepted, ["yes@example.test"])
        self.assertEqual(proc.violations(), [])

    def test_port_file(self):
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp, True)
        port_file = os.path.join(tmp, "port")
        peers_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers.py")
        proc = subprocess.Popen([sys.executable, peers_py,
                                 "--port-file", port_file, "--script", "{}"],
                                stdout=subprocess.PIPE, text=True)
        try:
            line = proc.stdout.readline()
            with open(port_file) as f:
                self.assertEqual(line, f"PORT {f.read().strip()}\n")
        finally:
            proc.terminate()
            proc.wait(10)
            proc.stdout.close()
        self.assertEqual(proc.returncode, 0)


class StallTests(PeerTestCase):
    """A real peer that never answers; time runs on a Clock."""

    def clocked_pool(self, **kw):
        clock = task.Clock()
        return clock, self.pool(reactor=_ClockedReactor(clock), **kw)

    @defer.inlineCallbacks
    def _stall(self, step, timeout, expect_step, script_extra=None):
        script = {"actions": {step: "stall"}}
        script.update(script_extra or {})
        peer = self.peer(script)
        clock, pool = self.clocked_pool()
        stalled = peer.when_stalled()
        d = pool.deliver([peer.hop()], message())
        yield stalled
        # The peer may see the connection before we do; the step's timer runs
        # once we are connected (the other steps' commands were sent after
        # their timers were started).
        yield wait_until(lambda: pool.connections_made == 1)
        clock.advance(timeout - 0.5)
        self.assertFalse(d.called)
        clock.advance(0.5)
        result = yield d
        rr = result.results[0]
        self.assertResult(rr, 451, "4.4.2")
        self.assertIn(f"timed out while {expect_step}", rr.text)
        self.assertEqual(result.remote, peer.hop())
        self.assertEqual(pool.idle_count(), 0)

    def test_stall_greeting(self):
        return self._stall("greeting", 300, "receiving the initial server greeting")

    def test_stall_ehlo(self):
        return self._stall("EHLO", 300, "sending EHLO")

    def test_stall_mail(self):
        return self._stall("MAIL", 300, "sending MAIL FROM")

    # Without PIPELINING, so that the timer of the stalled step is known to be
    # running when the peer stalls (pipelined timers: see ClockTests).
    def test_stall_rcpt(self):
        return self._stall("RCPT", 300, "sending RCPT TO", {"extensions": []})

    def test_stall_data(self):
        return self._stall("DATA", 120, "sending DATA", {"extensions": []})

    def test_stall_end_of_data(self):
        return self._stall("DATA_END", 600, "sending end of data")

    def test_stall_starttls(self):
        return self._stall("STARTTLS", 300, "sending STARTTLS", {"starttls": True})

    @defer.inlineCallbacks
    def test_stalled_hop_then_next(self):
        stuck = self.peer({"actions": {"greeting": "stall"}})
        good = self.peer()
        clock, pool = self.clocked_pool()
        stalled = stuck.when_stalled()
        d = pool.deliver([stuck.hop("stuck.test"), good.hop()], message())
        yield stalled
        yield wait_until(lambda: pool.connections_made == 1)
        clock.advance(300)
        result = yield d
        self.assertEqual(result.results[0].code, 250)
        self.assertEqual(result.remote, good.hop())


class SmtpSinkTests(PeerTestCase):
    def sink(self, *options):
        # A missing smtp-sink fails (tests/setup-deps installs it): no skip.
        self.assertTrue(os.access(SMTP_SINK, os.X_OK), f"{SMTP_SINK} missing: run tests/setup-deps")
        port = closed_port()
        dump = tempfile.mkdtemp(prefix="smtp-sink-")
        os.chmod(dump, 0o777)
        self.addCleanup(shutil.rmtree, dump, True)
        args = [SMTP_SINK]
        if os.getuid() == 0:
            args += ["-u", "nobody"]
        args += ["-c", "-d", os.path.join(dump, "%M."), *options, f"127.0.0.1:{port}", "100"]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def stop():
            proc.terminate()
            proc.wait(10)
        self.addCleanup(stop)
        return NextHop("sink.test", "127.0.0.1", port), dump

    @defer.inlineCallbacks
    def deliver_when_up(self, pool, hop, msg):
        """smtp-sink gives no sign when it listens: retry while refused."""
        for _ in range(200):
            result = yield pool.deliver([hop], msg)
            if "Connection refused" not in result.results[0].text:
                return result
            yield task.deferLater(reactor, 0.025, lambda: None)
        self.fail("smtp-sink did not start")

    @defer.inlineCallbacks
    def test_delivery_to_smtp_sink(self):
        hop, dump = self.sink()
        pool = self.pool()
        body = b".leading dot\r\nline\r\n..two\r\n" + filler(200_000) + b".\r\n"
        rcpts = [OutboundRecipient("a@example.test", "SUCCESS", "rfc822;a@example.test"),
                 OutboundRecipient("b@example.test")]
        result = yield self.deliver_when_up(pool, hop, message(body, rcpts=rcpts, envid="E1",
                                                               ret="HDRS"))
        self.assertEqual([r.code for r in result.results], [250, 250])
        self.assertTrue(result.dsn_offered)
        self.assertEqual(result.remote, hop)
        result = yield pool.deliver([hop], message(b"second\r\n"))
        self.assertEqual(result.results[0].code, 250)
        self.assertEqual(pool.connections_made, 1)
        yield pool.close()
        dumps = []
        for name in glob.glob(os.path.join(dump, "*")):
            with open(name, "rb") as f:
                dumps.append(f.read())
        self.assertEqual(len(dumps), 2)
        [dumped] = [d for d in dumps if b".leading dot" in d]
        # smtp-sink writes its own headers, then the unstuffed content with LF
        # line ends, then an empty line.
        head = dumped[:dumped.index(b"\nFrom: ") + 1].decode()
        self.assertIn("X-Mail-Args: <a@example.test> RET=HDRS ENVID=E1\n", head)
        self.assertIn("X-Rcpt-Args: <a@example.test> NOTIFY=SUCCESS "
                      "ORCPT=rfc822;a@example.test\nX-Rcpt-Args: <b@example.test>\n", head)
        content = (HEADERS + body).replace(b"\r\n", b"\n")
        self.assertTrue(dumped == head.encode() + content + b"\n", "content differs")

    @defer.inlineCallbacks
    def test_smtp_sink_without_pipelining_and_esmtp(self):
        hop, dump = self.sink("-e")
        pool = self.pool()
        result = yield self.deliver_when_up(pool, hop, message())
        self.assertEqual(result.results[0].code, 250)
        self.assertFalse(result.dsn_offered)

    @defer.inlineCallbacks
    def test_8bit_converted_for_smtp_sink_without_8bitmime(self):
        import email
        import email.policy
        hop, dump = self.sink("-8")
        pool = self.pool()
        headers = (b"From: <a@example.test>\r\nSubject: mixed\r\nMIME-Version: 1.0\r\n"
                   b"Content-Type: multipart/alternative; boundary=\"=_b\"\r\n\r\n")
        plain = "Grüße, ça va?\r\n.\r\n".encode()
        html = "<p>Привет мир</p>\r\n".encode()
        body = (b"--=_b\r\nContent-Type: text/plain; charset=utf-8\r\n"
                b"Content-Transfer-Encoding: 8bit\r\n\r\n" + plain +
                b"\r\n--=_b\r\nContent-Type: text/html; charset=utf-8\r\n\r\n" + html +
                b"\r\n--=_b--\r\n")
        result = yield self.deliver_when_up(pool, hop, message(body, headers=headers,
                                                               body_type="8BITMIME"))
        self.assertEqual(result.results[0].code, 250)
        yield pool.close()
        [name] = glob.glob(os.path.join(dump, "*"))
        with open(name, "rb") as f:
            dumped = f.read()
        self.assertTrue(dumped.isascii())
        head, _, content = dumped.partition(b"\nFrom: ")
        self.assertIn(b"X-Mail-Args: <a@example.test>\n", head + b"\n")   # no BODY=
        got = email.message_from_bytes(b"From: " + content, policy=email.policy.default)
        plain_part, html_part = got.iter_parts()
        self.assertEqual(plain_part["Content-Transfer-Encoding"], "quoted-printable")
        self.assertEqual(plain_part.get_payload(decode=True), plain.replace(b"\r\n", b"\n"))
        self.assertEqual(html_part["Content-Transfer-Encoding"], "base64")   # mostly 8-bit
        self.assertEqual(html_part.get_payload(decode=True), html)

    @defer.inlineCallbacks
    def test_smtp_sink_soft_rejects(self):
        hop, dump = self.sink("-r", "RCPT")
        pool = self.pool()
        result = yield self.deliver_when_up(pool, hop, message())
        self.assertEqual(result.results[0].code, 450)
        self.assertTrue(result.results[0].from_remote)


# ---------------------------------------------------------------------------
# Timeout and state logic on a MemoryReactorClock with StringTransport
# ---------------------------------------------------------------------------

EHLO_OK = (b"250-mx.example.test\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n"
           b"250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n")
EHLO_LOCKSTEP = b"250-mx.example.test\r\n250 8BITMIME\r\n"
HOP = NextHop("mx.example.test", "192.0.2.1", 25)
HOP2 = NextHop("mx2.example.test", "192.0.2.2", 25)


class PausingTransport(StringTransport):
    """Like a socket whose peer stopped reading: pauses after every write."""

    def write(self, data):
        super().write(data)
        if self.producer is not None and self.streaming:
            self.producer.pauseProducing()


class ClockTests(unittest.TestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.timeouts = Timeouts()
        self.pool = ConnectionPool(helo_name="me.test", reactor=self.reactor,
                                   timeouts=self.timeouts)

    def connect(self, index=-1, transport=None):
        host, port, factory, timeout, bind = self.reactor.tcpClients[index]
        proto = factory.buildProtocol(IPv4Address("TCP", host, port))
        tr = transport or StringTransport()
        proto.makeConnection(tr)
        return proto, tr

    def take(self, tr):
        v = tr.value()
        tr.clear()
        return v

    def greet(self, ehlo=EHLO_OK, transport=None):
        proto, tr = self.connect(transport=transport)
        proto.dataReceived(b"220 mx.example.test ESMTP\r\n")
        self.assertEqual(self.take(tr), b"EHLO me.test\r\n")
        proto.dataReceived(ehlo)
        return proto, tr

    def lose(self, proto, tr):
        tr.disconnecting = True
        proto.connectionLost(Failure(error.ConnectionDone()))

    def result(self, d):
        return self.successResultOf(d)

    def test_connect_goes_to_the_hop_address(self):
        self.pool.deliver([HOP], message())
        host, port, factory, timeout, bind = self.reactor.tcpClients[0]
        self.assertEqual((host, port, timeout), ("192.0.2.1", 25, 30))

    def test_connect_timeout(self):
        d = self.pool.deliver([HOP, HOP2], message())
        self.reactor.advance(29.9)
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.reactor.advance(0.1)
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)
        self.assertEqual(len(self.reactor.tcpClients), 2)   # on to the next hop
        self.reactor.advance(30)
        r = self.result(d)
        self.assertIsNone(r.remote)
        self.assertEqual((r.results[0].code, r.results[0].status), (451, "4.4.1"))
        self.assertIn("mx2.example.test[192.0.2.2]:25: Connection timed out", r.results[0].text)

    def test_connection_refused(self):
        d = self.pool.deliver([HOP], message())
        host, port, factory, timeout, bind = self.reactor.tcpClients[0]
        factory.clientConnectionFailed(self.reactor.connectors[0],
                                       Failure(error.ConnectionRefusedError()))
        r = self.result(d)
        self.assertEqual((r.results[0].code, r.results[0].status), (451, "4.4.1"))
        self.assertIn("Connection refused", r.results[0].text)

    def _timeout_at(self, advance_to_step, seconds, step_text):
        d = self.pool.deliver([HOP], message())
        proto, tr = advance_to_step()
        self.reactor.advance(seconds - 0.01)
        self.assertNoResult(d)
        self.reactor.advance(0.01)
        r = self.result(d)
        self.assertEqual((r.results[0].code, r.results[0].status), (451, "4.4.2"))
        self.assertIn(f"mx.example.test[192.0.2.1]:25 timed out while {step_text}",
                      r.results[0].text)
        self.assertTrue(tr.disconnected)     # aborted
        self.assertEqual(r.remote, HOP)
        self.assertEqual(self.pool.idle_count(), 0)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_greeting_timeout(self):
        self._timeout_at(self.connect, 300, "receiving the initial server greeting")

    def test_ehlo_timeout(self):
        def step():
            proto, tr = self.connect()
            proto.dataReceived(b"220 hi\r\n")
            return proto, tr
        self._timeout_at(step, 300, "sending EHLO")

    def test_mail_timeout(self):
        self._timeout_at(self.greet, 300, "sending MAIL FROM")

    def test_rcpt_timeout(self):
        def step():
            proto, tr = self.greet()
            self.reactor.advance(299)      # the RCPT timer starts at the MAIL reply
            proto.dataReceived(b"250 2.1.0 Ok\r\n")
            return proto, tr
        self._timeout_at(step, 300, "sending RCPT TO")

    def test_data_init_timeout(self):
        def step():
            proto, tr = self.greet()
            proto.dataReceived(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n")
            return proto, tr
        self._timeout_at(step, 120, "sending DATA")

    def test_data_end_timeout(self):
        def step():
            proto, tr = self.greet()
            proto.dataReceived(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n")
            self.assertTrue(tr.value().endswith(b"\r\n.\r\n"))
            return proto, tr
        self._timeout_at(step, 600, "sending end of data")

    def test_data_block_timeout(self):
        def step():
            proto, tr = self.greet(transport=PausingTransport())
            proto.dataReceived(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n")
            return proto, tr
        self.patch(client_module, "CHUNK", 16)
        self._timeout_at(step, 180, "sending message content")

    def test_data_block_timer_restarts_on_progress(self):
        self.patch(client_module, "CHUNK", 16)
        d = self.pool.deliver([HOP], message())
        proto, tr = self.greet(transport=PausingTransport())
        proto.dataReceived(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n")
        # The peer reads a block every 179 s: slow, but never stuck for 180.
        while not tr.value().endswith(b"\r\n.\r\n"):
            self.reactor.advance(179)
            self.assertNoResult(d)
            tr.producer.resumeProducing()
        proto.dataReceived(b"250 2.0.0 Ok: queued\r\n")
        r = self.result(d)
        self.assertEqual(r.results[0].code, 250)
        wire = tr.value()
        content = wire[wire.index(b"From:"):]
        self.assertTrue(content.endswith(b"\r\n.\r\n"))
        self.assertEqual(unstuff(content[:-3]), HEADERS + BODY)

    def test_pipelined_commands_in_one_write(self):
        d = self.pool.deliver([HOP], message(rcpts=["a@example.test", "b@example.test"],
                                             body_type="8BITMIME"))
        proto, tr = self.greet()
        self.assertEqual(self.take(tr),
                         b"MAIL FROM:<a@example.test> SIZE=%d BODY=8BITMIME\r\n"
                         b"RCPT TO:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n"
                         % len(HEADERS + BODY))
        # Replies split anywhere are still read in order.
        for piece in (b"250 2.1.0", b" Ok\r\n250-2.1.5 Ok\r\n2", b"50 2.1.5 still ok\r\n",
                      b"550 5.1.1 no such user\r\n354 go ahead\r", b"\n"):
            proto.dataReceived(piece)
        self.assertEqual(self.take(tr), dot_stuff(HEADERS + BODY) + b".\r\n")
        proto.dataReceived(b"250 2.0.0 Ok: queued as 7\r\n")
        r = self.result(d)
        self.assertEqual([(x.code, x.text) for x in r.results],
                         [(250, "250 2.0.0 Ok: queued as 7"),
                          (550, "550 5.1.1 no such user")])

    def test_lockstep_without_pipelining(self):
        d = self.pool.deliver([HOP], message(rcpts=["a@example.test", "b@example.test"]))
        proto, tr = self.greet(EHLO_LOCKSTEP)
        self.assertEqual(self.take(tr), b"MAIL FROM:<a@example.test>\r\n")
        proto.dataReceived(b"250 Ok\r\n")
        self.assertEqual(self.take(tr), b"RCPT TO:<a@example.test>\r\n")
        proto.dataReceived(b"250 Ok\r\n")
        self.assertEqual(self.take(tr), b"RCPT TO:<b@example.test>\r\n")
        proto.dataReceived(b"250 Ok\r\n")
        self.assertEqual(self.take(tr), b"DATA\r\n")
        proto.dataReceived(b"354 Go\r\n")
        self.assertEqual(self.take(tr), dot_stuff(HEADERS + BODY) + b".\r\n")
        proto.dataReceived(b"250 Ok\r\n")
        r = self.result(d)
        self.assertEqual([x.code for x in r.results], [250, 250])
        self.assertEqual([x.status for x in r.results], ["2.0.0", "2.0.0"])

    def test_idle_connection_expires_with_quit(self):
        d = self.pool.deliver([HOP], message())
        proto, tr = self.greet()
        proto.dataReceived(b"250 Ok\r\n250 Ok\r\n354 Go\r\n250 Ok\r\n")
        self.result(d)
        tr.clear()
        self.assertEqual(self.pool.idle_count(HOP), 1)
        self.reactor.advance(9.9)
        self.assertEqual(tr.value(), b"")
        self.reactor.advance(0.1)
        self.assertEqual(tr.value(), b"QUIT\r\n")
        self.assertEqual(self.pool.idle_count(), 0)
        proto.dataReceived(b"221 Bye\r\n")
        self.assertTrue(tr.disconnecting)
        closed = self.pool.close()
        self.assertNoResult(closed)          # waits for the QUIT to finish
        self.lose(proto, tr)
        self.successResultOf(closed)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_quit_timeout(self):
        d = self.pool.deliver([HOP], message())
        proto, tr = self.greet()
        proto.dataReceived(b"250 Ok\r\n250 Ok\r\n354 Go\r\n250 Ok\r\n")
        self.result(d)
        closed = self.pool.close()
        self.assertTrue(tr.value().endswith(b"QUIT\r\n"))
        self.reactor.advance(self.timeouts.quit)
        self.assertTrue(tr.disconnecting)
        self.lose(proto, tr)
        self.successResultOf(closed)

    def test_reuse_and_unsolicited_421_while_idle(self):
        d = self.pool.deliver([HOP], message())
        proto, tr = self.greet()
        proto.dataReceived(b"250 Ok\r\n250 Ok\r\n354 Go\r\n250 Ok\r\n")
        self.result(d)
        # Reused: no new connection, straight to MAIL.
        tr.clear()
        d = self.pool.deliver([HOP], message())
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.assertTrue(tr.value().startswith(b"MAIL FROM:"))
        proto.dataReceived(b"250 Ok\r\n250 Ok\r\n354 Go\r\n250 Ok\r\n")
        self.assertEqual(self.result(d).results[0].code, 250)
        # The server gives up on us while idle.
        proto.dataReceived(b"421 4.4.2 Timeout\r\n")
        self.assertTrue(tr.disconnected)
        self.lose(proto, tr)
        self.assertEqual(self.pool.idle_count(), 0)
        self.pool.deliver([HOP], message())
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_reused_connection_dead_on_mail_reconnects(self):
        d = self.pool.deliver([HOP, HOP2], message())
        proto, tr = self.greet()
        proto.dataReceived(b"250 Ok\r\n250 Ok\r\n354 Go\r\n250 Ok\r\n")
        self.result(d)
        d = self.pool.deliver([HOP, HOP2], message())
        self.lose(proto, tr)               # the write went nowhere
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.assertEqual(self.reactor.tcpClients[1][:2], ("192.0.2.1", 25))  # same hop
        proto2, tr2 = self.greet()
        proto2.dataReceived(b"250 Ok\r\n250 Ok\r\n354 Go\r\n250 Ok\r\n")
        r = self.result(d)
        self.assertEqual((r.results[0].code, r.remote), (250, HOP))

    def test_max_idle_per_host(self):
        pool = ConnectionPool(helo_name="me.test", reactor=self.reactor, max_idle_per_host=1)
        d1 = pool.deliver([HOP], message())
        d2 = pool.deliver([HOP], message())
        conns = [self.connect(0), self.connect(1)]
        for proto, tr in conns:
            proto.dataReceived(b"220 hi\r\n" + EHLO_OK)
        for proto, tr in conns:
            tr.clear()
            proto.dataReceived(b"250 Ok\r\n250 Ok\r\n354 Go\r\n250 Ok\r\n")
        self.result(d1), self.result(d2)
        self.assertEqual(pool.idle_count(), 1)
        self.assertTrue(conns[1][1].value().endswith(b".\r\nQUIT\r\n"))

    def test_malformed_and_overlong_replies(self):
        d = self.pool.deliver([HOP], message())
        proto, tr = self.connect()
        proto.dataReceived(b"220 hi\r\n")
        proto.dataReceived(b"x" * 5000)
        r = self.result(d)
        self.assertEqual((r.results[0].code, r.results[0].status), (451, "4.5.0"))
        self.assertTrue(tr.disconnected)

    def test_multiline_greeting_and_mixed_codes(self):
        d = self.pool.deliver([HOP], message())
        proto, tr = self.connect()
        proto.dataReceived(b"220-hi\r\n220-there\r\n220 ready\r\n")
        self.assertEqual(self.take(tr), b"EHLO me.test\r\n")
        proto.dataReceived(b"250-mx\r\n251 odd\r\n")
        r = self.result(d)
        self.assertEqual(r.results[0].status, "4.5.0")

    def test_cancel_aborts_the_connection(self):
        d = self.pool.deliver([HOP, HOP2], message())
        proto, tr = self.greet()
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertTrue(tr.disconnected)
        self.assertEqual(len(self.reactor.tcpClients), 1)   # no next hop tried
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_cancel_while_connecting(self):
        d = self.pool.deliver([HOP, HOP2], message())
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_cancel_while_sending_content(self):
        self.patch(client_module, "CHUNK", 16)
        d = self.pool.deliver([HOP], message())
        proto, tr = self.greet(transport=PausingTransport())
        proto.dataReceived(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n")
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertTrue(tr.disconnected)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_data_final_421_not_cached(self):
        d = self.pool.deliver([HOP], message())
        proto, tr = self.greet()
        proto.dataReceived(b"250 Ok\r\n250 Ok\r\n354 Go\r\n421 4.3.0 shutting down\r\n")
        r = self.result(d)
        self.assertEqual((r.results[0].code, r.results[0].status), (421, "4.3.0"))
        self.assertEqual(self.pool.idle_count(), 0)
