"""The outbound client against a next hop with a recipient limit (RFC 5321
§4.5.3.1.10, Postfix's ``smtpd_recipient_limit``): the recipients refused
with ``452 4.5.3`` after the first one go out at once in further
transactions on the same connection, the limit is remembered for that
connection, and only a 452 for the first recipient of a transaction is a
real deferral.  Scripted peers on loopback (tests/peers.py)."""
from __future__ import annotations

import os
import sys

from twisted.internet import defer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_smtp_client import HEADERS, BODY, PeerTestCase, message  # noqa: E402

RCPTS = [f"r{i:02d}@example.test" for i in range(1, 13)]
TOO_MANY = "452 4.5.3 Error: too many recipients"


def verbs(peer) -> list[bytes]:
    return [c.split(b" ")[0] for _, c in peer.commands]


class RecipientLimitTests(PeerTestCase):
    @defer.inlineCallbacks
    def _twelve_to_five(self, extensions):
        peer = self.peer({"extensions": extensions, "max_rcpts": 5})
        pool = self.pool()
        result = yield pool.deliver([peer.hop()], message(rcpts=RCPTS))
        self.assertEqual([r.address for r in result.results], RCPTS)
        self.assertEqual([r.code for r in result.results], [250] * 12, result.results)
        self.assertTrue(all(r.from_remote for r in result.results))
        self.assertEqual(peer.connections, 1)
        self.assertEqual(len(peer.transactions), 3)
        self.assertEqual([t.accepted for t in peer.complete],
                         [RCPTS[:5], RCPTS[5:10], RCPTS[10:]])
        self.assertTrue(all(t.data == HEADERS + BODY for t in peer.complete))
        self.assertEqual(pool.idle_count(peer.hop()), 1)
        return peer, pool

    @defer.inlineCallbacks
    def test_pipelined_twelve_to_a_five_recipient_hop(self):
        peer, pool = yield self._twelve_to_five(["PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"])
        # All 12 RCPTs were pipelined in the first transaction (the 452s came
        # back for the 6th..12th); then the learned limit sized the others.
        self.assertGreater(peer.pipelined, 12)
        self.assertEqual([len(t.rcpts) for t in peer.transactions], [12, 5, 2])
        self.assertEqual(verbs(peer), [b"EHLO", b"MAIL"] + [b"RCPT"] * 12 + [b"DATA"]
                         + [b"MAIL"] + [b"RCPT"] * 5 + [b"DATA"]
                         + [b"MAIL"] + [b"RCPT"] * 2 + [b"DATA"])

        # The next message on the cached connection is split at the limit up front.
        before = len(peer.transactions)
        result = yield pool.deliver([peer.hop()], message(b"again\r\n", rcpts=RCPTS))
        self.assertEqual([r.code for r in result.results], [250] * 12)
        self.assertEqual(peer.connections, 1)
        self.assertEqual([len(t.rcpts) for t in peer.transactions[before:]], [5, 5, 2])
        self.assertEqual([t.accepted for t in peer.complete[before:]],
                         [RCPTS[:5], RCPTS[5:10], RCPTS[10:]])

    @defer.inlineCallbacks
    def test_lockstep_twelve_to_a_five_recipient_hop(self):
        peer, _pool = yield self._twelve_to_five(["8BITMIME", "ENHANCEDSTATUSCODES"])
        self.assertEqual(peer.pipelined, 0)
        # No RCPT after the first 452: the rest go in the next transaction.
        self.assertEqual([len(t.rcpts) for t in peer.transactions], [6, 5, 2])

    @defer.inlineCallbacks
    def test_452_for_the_first_recipient_is_a_deferral(self):
        for ext in (["PIPELINING", "ENHANCEDSTATUSCODES"], ["ENHANCEDSTATUSCODES"]):
            peer = self.peer({"extensions": ext, "actions": {"RCPT": TOO_MANY}})
            pool = self.pool()
            result = yield pool.deliver([peer.hop()], message(rcpts=RCPTS[:3]))
            for rr in result.results:
                self.assertResult(rr, 452, "4.5.3", TOO_MANY)
                self.assertEqual(rr.remote, peer.hop())
            self.assertEqual(verbs(peer).count(b"MAIL"), 1)
            self.assertEqual(peer.complete, [])
            self.assertEqual(verbs(peer)[-1], b"RSET")

    @defer.inlineCallbacks
    def test_first_recipient_452_in_a_later_transaction_is_a_deferral(self):
        # 2 per transaction; r03 always gets the 452, so it is the first
        # recipient of the second transaction: deferred, not tried again.
        peer = self.peer({"max_rcpts": 2, "rcpt": {RCPTS[2]: TOO_MANY}})
        pool = self.pool()
        result = yield pool.deliver([peer.hop()], message(rcpts=RCPTS[:5]))
        self.assertEqual([r.code for r in result.results], [250, 250, 452, 250, 250])
        self.assertResult(result.results[2], 452, "4.5.3", TOO_MANY)
        self.assertEqual([t.accepted for t in peer.complete],
                         [RCPTS[:2], [RCPTS[3]], [RCPTS[4]]])
        self.assertEqual([len(t.rcpts) for t in peer.transactions], [5, 2, 1])

    @defer.inlineCallbacks
    def test_other_452_replies_are_per_recipient(self):
        peer = self.peer({"rcpt": {RCPTS[1]: "452 4.2.2 Mailbox full"}})
        pool = self.pool()
        result = yield pool.deliver([peer.hop()], message(rcpts=RCPTS[:3]))
        self.assertEqual([r.code for r in result.results], [250, 452, 250])
        self.assertEqual(len(peer.transactions), 1)

    @defer.inlineCallbacks
    def test_rejected_then_limit_sends_the_rest(self):
        # The first transaction delivers nothing (5 refused, 7 over the
        # limit): RSET, then the 7 go out on the same connection.
        bad = {r: "550 5.1.1 No such user" for r in RCPTS[:5]}
        over = {f"RCPT@1#{n}": TOO_MANY for n in range(6, 13)}
        peer = self.peer({"rcpt": bad, "actions": over})
        pool = self.pool()
        result = yield pool.deliver([peer.hop()], message(rcpts=RCPTS))
        self.assertEqual([r.code for r in result.results[:5]], [550] * 5)
        self.assertEqual([r.code for r in result.results[5:]], [250] * 7)
        self.assertEqual(peer.connections, 1)
        self.assertEqual([t.accepted for t in peer.complete], [RCPTS[5:10], RCPTS[10:]])
        self.assertEqual(verbs(peer).count(b"RSET"), 1)

    @defer.inlineCallbacks
    def test_connection_closed_after_first_transaction_reconnects_for_the_rest(self):
        peer = self.peer({"max_rcpts": 5,
                          "actions": {"DATA_END@1#1": "421 4.3.2 Shutting down"}})
        pool = self.pool()
        result = yield pool.deliver([peer.hop()], message(rcpts=RCPTS))
        codes = [r.code for r in result.results]
        self.assertEqual(codes, [421] * 5 + [250] * 7)
        self.assertEqual(peer.connections, 2)
        # The new connection starts with the limit learned on the first one.
        self.assertEqual([len(t.rcpts) for t in peer.transactions], [12, 5, 2])

    @defer.inlineCallbacks
    def test_drop_in_a_later_transaction_never_tries_another_hop(self):
        peer = self.peer({"max_rcpts": 5, "actions": {"MAIL#2": "drop"}})
        other = self.peer()
        pool = self.pool()
        result = yield pool.deliver([peer.hop(), other.hop()], message(rcpts=RCPTS))
        self.assertEqual([r.code for r in result.results[:5]], [250] * 5)
        for rr in result.results[5:]:
            self.assertResult(rr, 451, "4.4.2")
            self.assertFalse(rr.from_remote)
            self.assertIn("lost connection", rr.text)
        self.assertEqual(other.connections, 0)      # nothing delivered twice
        self.assertEqual(result.remote, peer.hop())

    @defer.inlineCallbacks
    def test_hop_taking_no_more_recipients_defers_the_rest_without_sending(self):
        # 2 per transaction, then nothing more on this connection: the second
        # transaction is refused at its first recipient, so the fifth
        # recipient is not sent at all (no transaction per refused batch).
        peer = self.peer({"max_rcpts": 2,
                          "actions": {f"RCPT#{n}": TOO_MANY for n in range(3, 20)}})
        pool = self.pool()
        result = yield pool.deliver([peer.hop()], message(rcpts=RCPTS[:5]))
        self.assertEqual([r.code for r in result.results], [250, 250, 452, 452, 452])
        for rr in result.results[2:4]:
            self.assertResult(rr, 452, "4.5.3", TOO_MANY)
            self.assertTrue(rr.from_remote)
        self.assertFalse(result.results[4].from_remote)      # never sent: our own result
        self.assertIn("not sent", result.results[4].text)
        self.assertEqual([t.accepted for t in peer.complete], [RCPTS[:2]])
        self.assertEqual([len(t.rcpts) for t in peer.transactions], [5, 2])
        self.assertEqual(pool.idle_count(peer.hop()), 1)     # RSET, and kept
