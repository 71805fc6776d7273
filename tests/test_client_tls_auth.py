"""Outbound TLS policies (none, may, encrypt, verify) and smarthost AUTH,
against scripted peers on loopback doing real TLS with certificates from
tests/tlsutil.py; plus the configuration keys, the router's part and the
wiring in tap.py.
"""
from __future__ import annotations

import base64
import os
import sys
import time
from pathlib import Path

from twisted.internet import defer, reactor, task
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from peers import ScriptedPeer, load_tls_options  # noqa: E402
from tlsutil import TestCA, self_signed  # noqa: E402

from mta.config import ConfigError, RelayConfig, RetryConfig, config_from_dict  # noqa: E402
from mta.delivery.router import Credentials, NextHop, Router  # noqa: E402
from mta.smtp.client import OutboundMessage, OutboundRecipient, load_trust_root  # noqa: E402
from mta.smtp.pool import ConnectionPool  # noqa: E402

HEADERS = b"From: <a@example.test>\r\nTo: <b@example.test>\r\nSubject: tls\r\n\r\n"
BODY = b"Hello over TLS.\r\n"
USER, PASSWORD = "relayuser", "s3cret pässword"
CRED = Credentials(USER, PASSWORD)


def _tmp(case) -> str:
    """A fresh path under the system temp dir (trial's mktemp() writes below
    the working directory when run by pytest)."""
    import shutil
    import tempfile
    base = tempfile.mkdtemp(prefix="mta-test-")
    case.addCleanup(shutil.rmtree, base, True)
    return os.path.join(base, "t")


def message(rcpts=("b@example.test",)) -> OutboundMessage:
    return OutboundMessage(queue_id="QTLS", sender="a@example.test",
                           recipients=[OutboundRecipient(r) for r in rcpts],
                           headers=HEADERS, body=BODY)


class TLSAuthTestCase(unittest.TestCase):
    timeout = 20

    def setUp(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.dir = _tmp(self)
        os.makedirs(self.dir)

    def peer(self, script=None, *, leaf=None) -> ScriptedPeer:
        tls_options = None
        if leaf is not None:
            cert, key = leaf.write(Path(self.dir) / str(id(leaf)))
            tls_options = load_tls_options(str(cert), str(key))
        p = ScriptedPeer(script or {}, tls_options=tls_options)
        p.start()
        self.addCleanup(p.stop)
        self.addCleanup(lambda: self.assertEqual(p.violations, []))
        return p

    def pool(self, **kw) -> ConnectionPool:
        kw.setdefault("helo_name", "client.example.test")
        kw.setdefault("reactor", reactor)
        pool = ConnectionPool(**kw)
        self.addCleanup(pool.close)
        return pool

    def ca_file(self, ca: TestCA) -> str:
        path = os.path.join(self.dir, "ca.pem")
        with open(path, "wb") as f:
            f.write(ca.cert_pem)
        return path

    def hop(self, peer, host="mx.tls.test", **kw) -> NextHop:
        return NextHop(host, "127.0.0.1", peer.port, **kw)

    def logged(self, level=None) -> list[str]:
        return [formatEvent(e) for e in self.events
                if level is None or e.get("log_level") == level]

    def verbs(self, peer) -> list[str]:
        return [raw.split(b" ")[0].decode().upper() for _n, raw in peer.commands]

    def assertAll(self, result, code, status):
        self.assertTrue(result.results)
        for r in result.results:
            self.assertEqual((r.code, r.status), (code, status), r)


class TLSPolicyTests(TLSAuthTestCase):
    @defer.inlineCallbacks
    def test_encrypt_without_starttls_defers_4_7_5(self):
        peer = self.peer({})
        pool = self.pool()
        result = yield pool.deliver([self.hop(peer, tls="encrypt")], message(["x@d.test",
                                                                               "y@d.test"]))
        self.assertAll(result, 451, "4.7.5")
        self.assertIn("STARTTLS not offered", result.results[0].text)
        self.assertFalse(result.results[0].from_remote)
        self.assertEqual(peer.transactions, [])
        self.assertNotIn("MAIL", self.verbs(peer))
        self.assertTrue(any("TLS policy encrypt not met" in line
                            for line in self.logged(LogLevel.warn)))

    @defer.inlineCallbacks
    def test_encrypt_accepts_any_certificate(self):
        peer = self.peer({"starttls": True}, leaf=self_signed("whatever.test"))
        pool = self.pool()
        result = yield pool.deliver([self.hop(peer, tls="encrypt")], message())
        self.assertAll(result, 250, "2.0.0")
        self.assertTrue(peer.complete[0].tls)

    @defer.inlineCallbacks
    def test_encrypt_handshake_failure_defers_without_plaintext_retry(self):
        peer = self.peer({"tls_fail": True})
        pool = self.pool()
        result = yield pool.deliver([self.hop(peer, tls="encrypt")], message())
        self.assertAll(result, 451, "4.7.5")
        self.assertIn("TLS handshake failed", result.results[0].text)
        self.assertEqual(peer.connections, 1)
        self.assertEqual(peer.transactions, [])

    @defer.inlineCallbacks
    def test_encrypt_starttls_refused_defers(self):
        peer = self.peer({"starttls": True,
                          "actions": {"STARTTLS": "454 4.7.0 TLS not available"}})
        pool = self.pool()
        result = yield pool.deliver([self.hop(peer, tls="encrypt")], message())
        self.assertAll(result, 451, "4.7.5")
        self.assertIn("454 4.7.0 TLS not available", result.results[0].text)
        self.assertEqual(peer.transactions, [])

    @defer.inlineCallbacks
    def test_verify_matching_name_with_ca_file(self):
        ca = TestCA()
        peer = self.peer({"starttls": True}, leaf=ca.issue("mx.tls.test", ip=None))
        pool = self.pool(trust_root=load_trust_root(self.ca_file(ca)))
        result = yield pool.deliver([self.hop(peer, tls="verify")], message())
        self.assertAll(result, 250, "2.0.0")
        [tx] = peer.complete
        self.assertTrue(tx.tls)
        self.assertEqual(tx.data, HEADERS + BODY)

    @defer.inlineCallbacks
    def test_verify_ip_address_host(self):
        """A route written as an IP address is checked against the IP SAN."""
        ca = TestCA()
        peer = self.peer({"starttls": True}, leaf=ca.issue("mx.tls.test", ip="127.0.0.1"))
        pool = self.pool(trust_root=load_trust_root(self.ca_file(ca)))
        result = yield pool.deliver([self.hop(peer, host="127.0.0.1", tls="verify")], message())
        self.assertAll(result, 250, "2.0.0")
        self.assertTrue(peer.complete[0].tls)

    @defer.inlineCallbacks
    def test_verify_name_mismatch_defers_4_7_5(self):
        ca = TestCA()
        peer = self.peer({"starttls": True}, leaf=ca.issue("other.test", ip=None))
        pool = self.pool(trust_root=load_trust_root(self.ca_file(ca)))
        result = yield pool.deliver([self.hop(peer, tls="verify")], message(["x@d.test",
                                                                              "y@d.test"]))
        self.assertAll(result, 451, "4.7.5")
        self.assertIn("certificate does not match the name mx.tls.test", result.results[0].text)
        self.assertEqual(peer.transactions, [])
        self.assertEqual(peer.connections, 1)      # never retried in plain text
        self.assertNotIn("MAIL", self.verbs(peer))
        warnings = [line for line in self.logged(LogLevel.warn) if "policy verify" in line]
        self.assertTrue(warnings, self.logged())

    @defer.inlineCallbacks
    def test_verify_untrusted_issuer_defers(self):
        ca = TestCA()
        peer = self.peer({"starttls": True}, leaf=self_signed("mx.tls.test"))
        pool = self.pool(trust_root=load_trust_root(self.ca_file(ca)))
        result = yield pool.deliver([self.hop(peer, tls="verify")], message())
        self.assertAll(result, 451, "4.7.5")
        self.assertEqual(peer.transactions, [])

    @defer.inlineCallbacks
    def test_verify_without_ca_file_uses_the_system_store(self):
        """Our test CA is not in the platform trust store: the hop fails."""
        ca = TestCA()
        peer = self.peer({"starttls": True}, leaf=ca.issue("mx.tls.test"))
        pool = self.pool()
        result = yield pool.deliver([self.hop(peer, tls="verify")], message())
        self.assertAll(result, 451, "4.7.5")

    @defer.inlineCallbacks
    def test_verify_failure_tries_the_next_hop(self):
        ca = TestCA()
        bad = self.peer({"starttls": True}, leaf=ca.issue("other.test", ip=None))
        good = self.peer({"starttls": True}, leaf=ca.issue("mx2.tls.test", ip=None))
        pool = self.pool(trust_root=load_trust_root(self.ca_file(ca)))
        result = yield pool.deliver([self.hop(bad, tls="verify"),
                                     self.hop(good, host="mx2.tls.test", tls="verify")],
                                    message())
        self.assertAll(result, 250, "2.0.0")
        self.assertEqual(result.remote.port, good.port)
        self.assertEqual(len(good.complete), 1)

    @defer.inlineCallbacks
    def test_none_never_sends_starttls(self):
        peer = self.peer({"starttls": True})
        pool = self.pool()
        result = yield pool.deliver([self.hop(peer, tls="none")], message())
        self.assertAll(result, 250, "2.0.0")
        self.assertNotIn("STARTTLS", self.verbs(peer))
        self.assertFalse(peer.complete[0].tls)

    @defer.inlineCallbacks
    def test_may_with_self_signed_certificate(self):
        peer = self.peer({"starttls": True}, leaf=self_signed("mx.tls.test"))
        pool = self.pool()
        result = yield pool.deliver([self.hop(peer, tls="may")], message())
        self.assertAll(result, 250, "2.0.0")
        self.assertTrue(peer.complete[0].tls)

    @defer.inlineCallbacks
    def test_may_without_starttls_and_with_failing_tls_still_delivers(self):
        plain = self.peer({})
        broken = self.peer({"tls_fail": True})
        pool = self.pool()
        r1 = yield pool.deliver([self.hop(plain)], message())
        r2 = yield pool.deliver([self.hop(broken)], message())
        self.assertAll(r1, 250, "2.0.0")
        self.assertAll(r2, 250, "2.0.0")
        self.assertEqual(broken.connections, 2)   # failed handshake, then plain text

    @defer.inlineCallbacks
    def test_cached_connection_not_reused_for_a_stricter_policy(self):
        peer = self.peer({"starttls": True})
        pool = self.pool()
        yield pool.deliver([self.hop(peer, tls="none")], message())
        self.assertEqual(pool.idle_count(self.hop(peer, tls="none")), 1)
        self.assertEqual(pool.idle_count(self.hop(peer, tls="encrypt")), 0)
        result = yield pool.deliver([self.hop(peer, tls="encrypt")], message())
        self.assertAll(result, 250, "2.0.0")
        self.assertEqual(peer.connections, 2)
        self.assertEqual([t.tls for t in peer.complete], [False, True])
        # and each is reused for its own policy
        yield pool.deliver([self.hop(peer, tls="encrypt")], message())
        yield pool.deliver([self.hop(peer, tls="none")], message())
        self.assertEqual(peer.connections, 2)
        self.assertEqual([t.tls for t in peer.complete], [False, True, True, False])


class SmarthostAuthTests(TLSAuthTestCase):
    SCRIPT = {"starttls": True, "auth": ["PLAIN", "LOGIN"], "users": {USER: PASSWORD},
              "auth_after_tls": True, "auth_required": True}

    @defer.inlineCallbacks
    def test_auth_plain_over_tls(self):
        peer = self.peer(self.SCRIPT)
        pool = self.pool()
        hop = self.hop(peer, host="smarthost.test", auth=CRED)
        result = yield pool.deliver([hop], message(["x@d.test", "y@e.test"]))
        self.assertAll(result, 250, "2.0.0")
        self.assertEqual(peer.auths, [(1, "PLAIN", USER, PASSWORD, True)])
        [tx] = peer.complete
        self.assertTrue(tx.tls)
        self.assertEqual(tx.auth, USER)
        # the connection stays logged in for the next message
        result = yield pool.deliver([hop], message())
        self.assertAll(result, 250, "2.0.0")
        self.assertEqual(peer.connections, 1)
        self.assertEqual(len(peer.auths), 1)
        self.assertEqual(peer.complete[1].auth, USER)
        # the password is in no log line
        self.assertFalse([line for line in self.logged() if PASSWORD in line])

    @defer.inlineCallbacks
    def test_auth_login_when_only_login_offered(self):
        peer = self.peer(dict(self.SCRIPT, auth=["LOGIN"]))
        pool = self.pool()
        result = yield pool.deliver([self.hop(peer, auth=CRED)], message())
        self.assertAll(result, 250, "2.0.0")
        self.assertEqual(peer.auths, [(1, "LOGIN", USER, PASSWORD, True)])

    @defer.inlineCallbacks
    def test_auth_with_verify_policy(self):
        ca = TestCA()
        peer = self.peer(self.SCRIPT, leaf=ca.issue("smarthost.test", ip=None))
        pool = self.pool(trust_root=load_trust_root(self.ca_file(ca)))
        hop = self.hop(peer, host="smarthost.test", tls="verify", auth=CRED)
        result = yield pool.deliver([hop], message())
        self.assertAll(result, 250, "2.0.0")
        self.assertEqual(peer.auths, [(1, "PLAIN", USER, PASSWORD, True)])

    @defer.inlineCallbacks
    def test_no_tls_means_no_password(self):
        """AUTH offered in plain text, no STARTTLS: the password is never sent."""
        peer = self.peer({"auth": ["PLAIN", "LOGIN"], "users": {USER: PASSWORD}})
        pool = self.pool()
        result = yield pool.deliver([self.hop(peer, auth=CRED)], message(["x@d.test",
                                                                          "y@d.test"]))
        self.assertAll(result, 451, "4.7.5")
        self.assertEqual(peer.auths, [])
        self.assertNotIn("AUTH", self.verbs(peer))
        self.assertNotIn("MAIL", self.verbs(peer))
        sent = b"\n".join(raw for _n, raw in peer.commands)
        for secret in (PASSWORD.encode(), base64.b64encode(PASSWORD.encode()),
                       base64.b64encode(b"\0" + USER.encode() + b"\0" + PASSWORD.encode())):
            self.assertNotIn(secret, sent)

    @defer.inlineCallbacks
    def test_tls_handshake_failure_means_no_password(self):
        peer = self.peer({"tls_fail": True, "auth": ["PLAIN"], "users": {USER: PASSWORD}})
        pool = self.pool()
        result = yield pool.deliver([self.hop(peer, auth=CRED)], message())
        self.assertAll(result, 451, "4.7.5")
        self.assertEqual(peer.connections, 1)      # no plain-text retry with credentials
        self.assertEqual(peer.auths, [])

    @defer.inlineCallbacks
    def test_no_usable_mechanism_defers(self):
        peer = self.peer(dict(self.SCRIPT, auth=["CRAM-MD5"]))
        pool = self.pool()
        result = yield pool.deliver([self.hop(peer, auth=CRED)], message())
        self.assertAll(result, 451, "4.7.0")
        self.assertIn("CRAM-MD5", result.results[0].text)
        self.assertEqual(peer.auths, [])

    @defer.inlineCallbacks
    def test_no_auth_offered_defers(self):
        peer = self.peer({"starttls": True})
        pool = self.pool()
        result = yield pool.deliver([self.hop(peer, auth=CRED)], message())
        self.assertAll(result, 451, "4.7.0")
        self.assertEqual(peer.transactions, [])

    @defer.inlineCallbacks
    def test_rejected_login_defers_everything_4_7_8_loudly(self):
        peer = self.peer(dict(self.SCRIPT, users={USER: "another password"}))
        second = self.peer(self.SCRIPT)
        pool = self.pool()
        hops = [self.hop(peer, host="smarthost.test", auth=CRED),
                self.hop(second, host="smarthost.test", auth=CRED)]
        rcpts = ["x@d.test", "y@e.test", "z@f.test"]
        result = yield pool.deliver(hops, message(rcpts))
        self.assertEqual([r.address for r in result.results], rcpts)
        self.assertAll(result, 451, "4.7.8")
        self.assertIn("535 5.7.8", result.results[0].text)
        self.assertEqual(peer.auths, [(1, "PLAIN", USER, PASSWORD, True)])
        self.assertEqual(peer.transactions, [])
        self.assertEqual(second.connections, 0)    # the same login is not tried elsewhere
        errors = self.logged(LogLevel.error)
        self.assertEqual(len(errors), 1, errors)
        self.assertIn("LOGIN REJECTED", errors[0])
        self.assertIn(USER, errors[0])
        self.assertNotIn(PASSWORD, errors[0])
        # Held: the next delivery with these credentials fails at once, no new login.
        result = yield pool.deliver(hops, message())
        self.assertAll(result, 451, "4.7.8")
        self.assertIn("not tried again", result.results[0].text)
        self.assertEqual(peer.connections, 1)
        self.assertEqual(len(self.logged(LogLevel.error)), 1)

    @defer.inlineCallbacks
    def test_hold_expires(self):
        clock = task.Clock()

        class Clocked:
            def connectTCP(self, *a, **kw):
                return reactor.connectTCP(*a, **kw)

            def callLater(self, *a, **kw):
                return reactor.callLater(*a, **kw)

            def seconds(self):
                return clock.seconds()

        peer = self.peer(dict(self.SCRIPT, actions={"AUTH@1": "535 5.7.8 nope"}))
        pool = self.pool(reactor=Clocked(), auth_failure_hold=60)
        hop = self.hop(peer, auth=CRED)
        result = yield pool.deliver([hop], message())
        self.assertAll(result, 451, "4.7.8")
        clock.advance(59)
        result = yield pool.deliver([hop], message())
        self.assertAll(result, 451, "4.7.8")
        self.assertEqual(len(peer.auths), 1)
        clock.advance(1)
        result = yield pool.deliver([hop], message())
        self.assertAll(result, 250, "2.0.0")
        self.assertEqual(len(peer.auths), 2)

    @defer.inlineCallbacks
    def test_temporary_auth_failure_is_a_hop_failure(self):
        peer = self.peer(dict(self.SCRIPT, actions={"AUTH": "454 4.7.0 Try again later"}))
        second = self.peer(self.SCRIPT)
        pool = self.pool()
        result = yield pool.deliver([self.hop(peer, auth=CRED), self.hop(second, auth=CRED)],
                                    message())
        self.assertAll(result, 250, "2.0.0")
        self.assertEqual(len(second.auths), 1)
        self.assertEqual(self.logged(LogLevel.error), [])

    @defer.inlineCallbacks
    def test_credentials_only_on_hops_that_carry_them(self):
        peer = self.peer(dict(self.SCRIPT, auth_required=False))
        pool = self.pool()
        result = yield pool.deliver([self.hop(peer)], message())
        self.assertAll(result, 250, "2.0.0")
        self.assertEqual(peer.auths, [])
        self.assertNotIn("AUTH", self.verbs(peer))

    def test_password_not_in_repr(self):
        hop = NextHop("smarthost.test", "127.0.0.1", 25, tls="verify", auth=CRED)
        self.assertNotIn(PASSWORD, repr(hop))
        self.assertNotIn(PASSWORD, repr(CRED))
        self.assertNotIn(PASSWORD, str(hop))


class RouterPolicyTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_policies_and_credentials_on_hops(self):
        r = Router(routes={"a.test": "127.0.0.1:2626", "b.test": "[::1]:2627"},
                   route_tls={"A.test": "verify"}, tls="encrypt",
                   smarthost="127.0.0.1:2525", smarthost_auth=CRED, reactor=reactor)
        [a] = yield r.route("a.test")
        [b] = yield r.route("b.test")
        [c] = yield r.route("c.test")
        [lit] = yield r.route("[192.0.2.1]")
        self.assertEqual((a.tls, a.auth, a.port), ("verify", None, 2626))
        self.assertEqual((b.tls, b.auth), ("encrypt", None))
        self.assertEqual((c.tls, c.auth, c.port), ("encrypt", CRED, 2525))
        self.assertEqual((lit.tls, lit.auth, lit.port), ("encrypt", CRED, 2525))

    @defer.inlineCallbacks
    def test_defaults_unchanged(self):
        r = Router(routes={"a.test": "127.0.0.1:2626"}, reactor=reactor)
        [a] = yield r.route("a.test")
        self.assertEqual(a, NextHop("127.0.0.1", "127.0.0.1", 2626))
        self.assertEqual((a.tls, a.auth), ("may", None))

    def test_bad_policy(self):
        # Refused by the config, its one validator (the Router takes what it validated).
        for data, where in [({"relay": {"tls": "strict"}}, "[relay] tls"),
                            ({"routes": {"a.test": "127.0.0.1"},
                              "route_tls": {"a.test": "maybe"}}, "[route_tls] a.test")]:
            with self.assertRaises(ConfigError) as cm:
                config_from_dict(data, "etc/mta.toml")
            self.assertTrue(str(cm.exception).startswith(f"etc/mta.toml: {where}: expected one of"))


class ConfigTests(unittest.SynchronousTestCase):
    def error(self, data) -> str:
        with self.assertRaises(ConfigError) as cm:
            config_from_dict(data, "etc/mta.toml")
        text = str(cm.exception)
        self.assertNotIn("\n", text)
        self.assertTrue(text.startswith("etc/mta.toml: "), text)
        return text

    def test_defaults(self):
        c = config_from_dict({})
        self.assertEqual((c.relay.tls, c.relay.tls_ca_file, c.relay.smarthost_user), ("may", "", ""))
        self.assertEqual(c.route_tls, ())

    def test_valid(self):
        c = config_from_dict({
            "relay": {"smarthost": "relay.example.test:587", "tls": "verify",
                      "tls_ca_file": "etc/ca.pem", "smarthost_user": USER,
                      "smarthost_password": PASSWORD},
            "routes": {"Example.test": "127.0.0.1:2626", "other.test": "[::1]:25"},
            "route_tls": {"example.test": "encrypt", "other.test": "none"}})
        self.assertEqual(c.relay.tls, "verify")
        self.assertEqual(c.route_tls, (("example.test", "encrypt"), ("other.test", "none")))
        self.assertEqual(c.routes[0], ("example.test", "127.0.0.1:2626"))  # still strings

    def test_errors(self):
        self.assertIn("[relay] tls: expected one of",
                      self.error({"relay": {"tls": "required"}}))
        self.assertIn("[route_tls] nowhere.test: no [routes] entry",
                      self.error({"routes": {"a.test": "127.0.0.1"},
                                  "route_tls": {"nowhere.test": "verify"}}))
        self.assertIn("[route_tls] a.test: expected one of",
                      self.error({"routes": {"a.test": "127.0.0.1"},
                                  "route_tls": {"a.test": "yes"}}))
        self.assertIn("[relay] smarthost_user: is set, but [relay] smarthost is empty",
                      self.error({"relay": {"smarthost_user": "u", "smarthost_password": "p"}}))
        self.assertIn("[relay] smarthost_password: must be set",
                      self.error({"relay": {"smarthost": "h:25", "smarthost_user": "u"}}))
        self.assertIn("[relay] smarthost_user: must be set when smarthost_password is set",
                      self.error({"relay": {"smarthost": "h:25", "smarthost_password": "p"}}))
        self.assertIn("[relay] smarthost_password_file: cannot be set together",
                      self.error({"relay": {"smarthost": "h:25", "smarthost_user": "u",
                                            "smarthost_password": "p",
                                            "smarthost_password_file": "f"}}))
        self.assertIn("[relay] tls: \"none\" cannot be used with smarthost_user",
                      self.error({"relay": {"smarthost": "h:25", "smarthost_user": "u",
                                            "smarthost_password": "p", "tls": "none"}}))
        self.assertIn("[relay] smarthost_password: must not contain NUL",
                      self.error({"relay": {"smarthost_password": "a\0b"}}))


class WiringTests(unittest.SynchronousTestCase):
    def runner(self, relay: dict, **extra):
        from mta import tap
        cfg = config_from_dict({"server": {"hostname": "me.test"}, "relay": relay, **extra},
                               "etc/mta.toml")
        return tap._make_runner(cfg, object(), reactor)

    def test_make_runner_wires_policy_credentials_and_ca(self):
        ca = TestCA()
        d = _tmp(self)
        os.makedirs(d)
        ca_path, pw_path = os.path.join(d, "ca.pem"), os.path.join(d, "pw")
        with open(ca_path, "wb") as f:
            f.write(ca.cert_pem)
        with open(pw_path, "w") as f:
            f.write(PASSWORD + "\n")
        runner = self.runner({"smarthost": "127.0.0.1:2525", "tls": "verify",
                              "tls_ca_file": ca_path, "smarthost_user": USER,
                              "smarthost_password_file": pw_path},
                             routes={"a.test": "127.0.0.1:2626"}, route_tls={"a.test": "none"})
        self.assertEqual(runner.router.tls, "verify")
        self.assertEqual(runner.router.route_tls, {"a.test": "none"})
        self.assertEqual(runner.router.smarthost_auth, Credentials(USER, PASSWORD))
        self.assertIsNotNone(runner.couriers["smtp"].pool.trust_root)

    def test_unreadable_files_stop_startup(self):
        missing = os.path.join(_tmp(self), "nothing")
        with self.assertRaises(SystemExit):
            self.runner({"tls_ca_file": missing})
        with self.assertRaises(SystemExit):
            self.runner({"smarthost": "h:25", "smarthost_user": "u",
                         "smarthost_password_file": missing})


class QueueRunnerTests(TLSAuthTestCase):
    """Through the queue runner and a real SQLite spool: a policy failure
    leaves the recipients deferred with 4.7.5, no bounce."""

    @defer.inlineCallbacks
    def test_policy_failure_defers_in_the_spool(self):
        from mta.delivery.scheduler import QueueRunner
        from fakespool import SyncSpool
        from mta.message import InboundMessage, Recipient, new_queue_id

        peer = self.peer({})
        spool = SyncSpool(f"{self.dir}/spool.sqlite")
        engine = spool.engine
        self.addCleanup(engine.dispose)

        router = Router(routes={"d.test": f"127.0.0.1:{peer.port}"}, route_tls={"d.test": "encrypt"},
                        reactor=reactor)
        pool = ConnectionPool(helo_name="me.test", reactor=reactor)
        from mta.delivery.smtp_courier import SMTPCourier
        runner = QueueRunner(spool, router,
                             {"smtp": SMTPCourier(router, pool, hostname="me.test")},
                             hostname="me.test",
                             retry=RetryConfig(), relay=RelayConfig(), poll_interval=3600,
                             reactor=reactor)
        now = time.time()
        msg = InboundMessage(
            queue_id=new_queue_id(now), sender="a@example.test",
            recipients=[Recipient("x@d.test"), Recipient("y@d.test")], headers=HEADERS,
            body=BODY, arrival=now, client_address="127.0.0.1", helo="c", protocol="ESMTP",
            size=len(HEADERS + BODY))
        spool.store(msg)
        runner.startService()
        self.addCleanup(runner.stopService)

        def states():
            with engine.connect() as c:
                return c.exec_driver_sql(
                    "SELECT state, last_reply FROM recipients ORDER BY address").fetchall()
        for _ in range(2000):
            if all(s == "deferred" for s, _r in states()):
                break
            yield task.deferLater(reactor, 0.005, lambda: None)
        rows = states()
        self.assertEqual([s for s, _ in rows], ["deferred", "deferred"], rows)
        self.assertTrue(all(r.startswith("451 4.7.5 ") for _, r in rows), rows)
        with engine.connect() as c:
            self.assertEqual(c.exec_driver_sql("SELECT COUNT(*) FROM messages").scalar(), 1)
        self.assertEqual(peer.transactions, [])


class TLSInfoTests(TLSAuthTestCase):
    """DeliveryResult.tls: what the delivery log line shows (tls=...)."""

    @defer.inlineCallbacks
    def test_tls_session_of_each_policy(self):
        ca = TestCA()
        plain = self.peer({})
        may = self.peer({"starttls": True}, leaf=self_signed("whatever.test"))
        good = self.peer({"starttls": True}, leaf=ca.issue("mx.tls.test"))
        pool = self.pool(trust_root=load_trust_root(self.ca_file(ca)))
        none = yield pool.deliver([self.hop(plain)], message())
        self.assertIsNone(none.tls)
        unverified = yield pool.deliver([self.hop(may)], message())
        self.assertEqual(unverified.tls.version, "TLSv1.3")
        self.assertRegex(unverified.tls.cipher, r"^TLS_[A-Z0-9_]+$")
        self.assertFalse(unverified.tls.verified)
        self.assertEqual(str(unverified.tls),
                         f"TLSv1.3/{unverified.tls.cipher}/unverified")
        verified = yield pool.deliver([self.hop(good, tls="verify")], message())
        self.assertAll(verified, 250, "2.0.0")
        self.assertTrue(verified.tls.verified)
        self.assertTrue(str(verified.tls).endswith("/verified"))
        # Reused connections keep saying what they are.
        again = yield pool.deliver([self.hop(good, tls="verify")], message())
        self.assertEqual(again.tls, verified.tls)
        self.assertEqual(good.connections, 1)

    @defer.inlineCallbacks
    def test_hop_failure_after_tls_reports_the_session(self):
        peer = self.peer({"starttls": True, "actions": {"MAIL": "451 4.3.0 Not now"}},
                         leaf=self_signed("whatever.test"))
        pool = self.pool()
        result = yield pool.deliver([self.hop(peer, tls="encrypt")], message())
        self.assertAll(result, 451, "4.3.0")
        self.assertEqual(result.remote, self.hop(peer, tls="encrypt"))
        self.assertEqual(result.results[0].remote, self.hop(peer, tls="encrypt"))
        self.assertIsNotNone(result.tls)
        self.assertFalse(result.tls.verified)
