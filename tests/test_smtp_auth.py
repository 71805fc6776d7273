"""Protocol unit tests for STARTTLS (RFC 3207) and AUTH (RFC 4954) in the
inbound server: no sockets, no real TLS (tests/test_e2e_tls_auth.py has those).

The transport is a ``StringTransport`` that also provides ``ITLSTransport``
and records when ``startTLS`` was called; password checks run inline, or on
a runner whose Deferreds the test fires; the clock is a MemoryReactorClock.
"""
from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.python.failure import Failure

from mta.auth.checker import make_portal
from mta.auth.passwords import hash_password
from mta.auth.users import UsersFile
from mta.smtp.server import SMTPServer

from smtpwire import (HOST, INSIDE, OUTSIDE, PASSWORD, FakeSpool, FakeTLS, RecordingTransport,
                      TLSTransport, Wire, address, b64, code, codes, inline, make_factory, plain,
                      parse_replies)

BJORN = "bj\u00f6rn@example.test"


class ControlledRunner:
    """Runs password checks when the test says so."""

    def __init__(self):
        self.pending: list[tuple[defer.Deferred, object, tuple]] = []

    def __call__(self, f, *args):
        d: defer.Deferred = defer.Deferred()
        self.pending.append((d, f, args))
        return d

    def run_all(self) -> None:
        while self.pending:
            d, f, args = self.pending.pop(0)
            try:
                result = f(*args)
            except Exception:
                d.errback(Failure())
            else:
                d.callback(result)


@pytest.fixture
def users(tmp_path):
    path = tmp_path / "users"
    # Cheap hashes keep the tests fast; the parameters live in the hash string.
    path.write_text(f"alice:{hash_password(PASSWORD, n=16)}\n"
                    f"{BJORN}:{hash_password(PASSWORD, n=16)}\n", encoding="utf-8")
    return UsersFile(str(path))


class Session(Wire):
    """One server protocol on a TLS-capable StringTransport; *limits* are
    the AUTH failure limiter's settings (smtpwire.make_factory)."""

    def __init__(self, users: UsersFile | None = None, *, ip: str = OUTSIDE,
                 host: str = "192.0.2.25", tls: object | None = None, submission: bool = False,
                 implicit_tls: bool = False, runner=inline,
                 limits: dict[str, float] | None = None, factory=None, **settings):
        if factory is None:
            # as the daemon wires it (mta.tap)
            factory = make_factory(
                tls=tls, limits=limits,
                portal=make_portal(users, runner) if users is not None else None,
                cram_md5=users.has_cram_md5 if users is not None else None, **settings)
        self.factory = factory
        self.spool = factory.spool
        peer = address(ip, 1234)
        hostaddr = host if isinstance(host, UNIXAddress) else address(host, 25)
        proto: SMTPServer = factory.listener(
            submission=submission, implicit_tls=implicit_tls).buildProtocol(peer)
        super().__init__(proto, TLSTransport(peerAddress=peer, hostAddress=hostaddr),
                         factory.reactor)

    def ehlo(self) -> list[str]:
        return self.ehlo_keywords()

    def starttls(self) -> None:
        assert self.cmd("STARTTLS") == "220 2.0.0 Ready to start TLS"
        assert self.tr.tls_context is not None

    def login(self, user: str = "alice", password: str = PASSWORD) -> str:
        return self.cmd(f"AUTH PLAIN {plain(user, password)}")


# -- without TLS or AUTH configured --------------------------------------------------

def test_nothing_configured_offers_neither():
    s = Session()
    kws = s.ehlo()
    assert "STARTTLS" not in kws
    assert not any(k.startswith("AUTH") for k in kws)
    assert code(s.cmd("STARTTLS")) == "502 5.5.1"
    assert code(s.cmd(f"AUTH PLAIN {plain('alice')}")) == "503 5.5.1"
    assert s.tr.tls_context is None


def test_starttls_not_offered_on_a_transport_without_starttls():
    f = make_factory(tls=FakeTLS())
    c_proto = f.buildProtocol(IPv4Address("TCP", OUTSIDE, 1))
    tr = RecordingTransport(peerAddress=IPv4Address("TCP", OUTSIDE, 1))
    c_proto.makeConnection(tr)
    c_proto.dataReceived(b"EHLO x\r\nSTARTTLS\r\n")
    ehlo, starttls = parse_replies(tr.value())[1:]
    assert "STARTTLS" not in ehlo
    assert code(starttls) == "502 5.5.1"


# -- STARTTLS ----------------------------------------------------------------------------

def test_starttls_offered_and_state_reset():
    s = Session(tls=FakeTLS())
    assert "STARTTLS" in s.ehlo()
    s.starttls()
    assert s.proto.tls
    # The session starts over: a new EHLO is needed.
    assert code(s.cmd("MAIL FROM:<a@example.org>")) == "503"
    kws = s.ehlo()
    assert "STARTTLS" not in kws
    assert code(s.cmd("MAIL FROM:<a@example.org>")) == "250 2.1.0"


def test_starttls_reply_is_written_before_tls_starts():
    s = Session(tls=FakeTLS())
    s.ehlo()
    s.proto.dataReceived(b"STARTTLS\r\n")
    out = s.tr.value()
    assert out == b"220 2.0.0 Ready to start TLS\r\n"
    assert s.tr.tls_at == len(out)   # all of it was out before startTLS


def test_plaintext_pipelined_after_starttls_is_discarded():
    s = Session(tls=FakeTLS())
    s.ehlo()
    replies = s.send("STARTTLS\r\nRSET\r\nMAIL FROM:<evil@example.org>\r\nRCPT TO:<u@example.test>\r\n")
    assert replies == ["220 2.0.0 Ready to start TLS"]
    # After the handshake: nothing of the injected transaction survived.
    assert s.send("EHLO again.example.org\r\nRCPT TO:<u@example.test>\r\n")[1].startswith("503")


def test_plaintext_in_a_later_read_before_tls_is_discarded_too():
    # STARTTLS processed while bytes were still buffered behind a pending spool write.
    s = Session(tls=FakeTLS())
    s.ehlo()
    assert code(s.cmd("MAIL FROM:<a@example.org>")) == "250 2.1.0"
    assert code(s.cmd("RCPT TO:<u@example.test>")) == "250 2.1.5"
    replies = s.send("DATA\r\nhi\r\n.\r\nSTARTTLS\r\nNOOP\r\nHELP\r\n")
    assert codes(replies) == ["354"]          # the spool write is outstanding
    s.spool.fire()
    assert codes(s.take()) == ["250 2.0.0", "220 2.0.0"]
    assert s.tr.tls_context is not None
    assert codes(s.send("NOOP\r\n")) == ["250"]   # only what came after TLS is answered


def test_starttls_twice_is_503():
    s = Session(tls=FakeTLS())
    s.ehlo()
    s.starttls()
    s.ehlo()
    assert code(s.cmd("STARTTLS")) == "503 5.5.1"


def test_starttls_with_argument_is_501():
    s = Session(tls=FakeTLS())
    s.ehlo()
    assert code(s.cmd("STARTTLS now")) == "501 5.5.4"
    assert s.tr.tls_context is None


def test_starttls_during_transaction_is_503():
    s = Session(tls=FakeTLS())
    s.ehlo()
    s.cmd("MAIL FROM:<a@example.org>")
    assert code(s.cmd("STARTTLS")) == "503 5.5.1"
    assert s.tr.tls_context is None


def test_starttls_with_broken_certificate_is_454():
    s = Session(tls=FakeTLS(broken=True))
    s.ehlo()
    assert code(s.cmd("STARTTLS")) == "454 4.7.0"
    assert s.tr.tls_context is None
    assert code(s.cmd("NOOP")) == "250 2.0.0"


def test_starttls_forgets_authentication(users):
    s = Session(users, ip=INSIDE, host=INSIDE, tls=FakeTLS(), auth_plaintext_on_loopback=True)
    s.ehlo()
    assert code(s.login()) == "235 2.7.0"
    s.starttls()
    assert s.proto.authenticated is None
    s.ehlo()
    assert code(s.login()) == "235 2.7.0"


def test_implicit_tls_listener():
    s = Session(tls=None, implicit_tls=True)
    assert s.proto.tls
    assert "STARTTLS" not in s.ehlo()
    assert code(s.cmd("STARTTLS")) == "503 5.5.1"


def test_handshake_completed_records_version_and_cipher():
    class Handle:
        def get_protocol_version_name(self):
            return "TLSv1.3"

        def get_cipher_name(self):
            return "TLS_AES_256_GCM_SHA384"

        def get_cipher_bits(self):
            return 256

    s = Session(tls=FakeTLS())
    s.ehlo()
    s.starttls()
    s.tr.getHandle = lambda: Handle()
    s.proto.handshakeCompleted()
    assert (s.proto.tls_version, s.proto.tls_cipher) == ("TLSv1.3", "TLS_AES_256_GCM_SHA384")
    s.ehlo()
    s.cmd("MAIL FROM:<a@example.org>")
    s.cmd("RCPT TO:<u@example.test>")
    s.send("DATA\r\nhi\r\n.\r\n")
    [msg] = s.spool.messages
    assert msg.protocol == "ESMTPS"
    assert (b"\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256 bits))\r\n"
            in bytes(msg.headers))


# -- when AUTH is offered -----------------------------------------------------------------

def test_auth_not_offered_in_plaintext(users):
    s = Session(users, tls=FakeTLS())
    kws = s.ehlo()
    assert not any(k.startswith("AUTH") for k in kws)
    assert code(s.cmd(f"AUTH PLAIN {plain('alice')}")) == "538 5.7.11"
    s.starttls()
    assert "AUTH PLAIN LOGIN" in s.ehlo()


def test_auth_in_plaintext_only_on_loopback_when_allowed(users):
    # Allowed, and both ends on loopback.
    s = Session(users, ip=INSIDE, host=INSIDE, auth_plaintext_on_loopback=True)
    assert "AUTH PLAIN LOGIN" in s.ehlo()
    # Allowed, but the client is not on loopback.
    s = Session(users, ip=OUTSIDE, host="192.0.2.25", auth_plaintext_on_loopback=True)
    assert not any(k.startswith("AUTH") for k in s.ehlo())
    # On loopback but not allowed.
    s = Session(users, ip=INSIDE, host=INSIDE, auth_plaintext_on_loopback=False)
    assert not any(k.startswith("AUTH") for k in s.ehlo())
    assert code(s.cmd(f"AUTH PLAIN {plain('alice')}")) == "538 5.7.11"
    # IPv6 loopback and IPv4-mapped loopback count too.
    s = Session(users, ip="::1", host="::1", auth_plaintext_on_loopback=True)
    assert "AUTH PLAIN LOGIN" in s.ehlo()
    s = Session(users, ip="::ffff:127.0.0.1", host="::ffff:127.0.0.1",
                auth_plaintext_on_loopback=True)
    assert "AUTH PLAIN LOGIN" in s.ehlo()


def test_auth_offered_on_unix_socket_when_plaintext_loopback_allowed(users):
    s = Session(users, ip=INSIDE, host=UNIXAddress("/tmp/mta.sock"),
                auth_plaintext_on_loopback=True)
    assert "AUTH PLAIN LOGIN" in s.ehlo()


def tls_session(users, **kw) -> Session:
    s = Session(users, tls=FakeTLS(), **kw)
    s.ehlo()
    s.starttls()
    s.ehlo()
    return s


# -- the dialogues ------------------------------------------------------------------------

def test_plain_with_initial_response(users):
    s = tls_session(users)
    assert s.login() == "235 2.7.0 Authentication successful"
    assert s.proto.authenticated == "alice"


def test_plain_without_initial_response(users):
    s = tls_session(users)
    assert s.cmd("AUTH PLAIN") == "334 "
    assert code(s.cmd(plain("alice"))) == "235 2.7.0"


def test_plain_utf8_user_and_lowercase_mechanism(users):
    s = tls_session(users)
    assert code(s.cmd(f"auth plain {plain(BJORN)}")) == "235 2.7.0"
    assert s.proto.authenticated == BJORN


def test_login_dialogue(users):
    s = tls_session(users)
    assert s.cmd("AUTH LOGIN") == "334 VXNlcm5hbWU6"
    assert s.cmd(b64("alice")) == "334 UGFzc3dvcmQ6"
    assert code(s.cmd(b64(PASSWORD))) == "235 2.7.0"


def test_login_with_initial_response(users):
    s = tls_session(users)
    assert s.cmd(f"AUTH LOGIN {b64('alice')}") == "334 UGFzc3dvcmQ6"
    assert code(s.cmd(b64(PASSWORD))) == "235 2.7.0"


def test_pipelined_login_dialogue_in_one_write(users):
    s = tls_session(users)
    replies = s.send(f"AUTH LOGIN\r\n{b64('alice')}\r\n{b64(PASSWORD)}\r\nNOOP\r\n")
    assert codes(replies) == ["334", "334", "235 2.7.0", "250 2.0.0"]


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN"])
def test_cancel(users, mech):
    s = tls_session(users)
    assert s.cmd(f"AUTH {mech}").startswith("334")
    assert s.cmd("*") == "501 5.7.0 Authentication cancelled"
    # Back to commands, and AUTH may be tried again.
    assert code(s.cmd("NOOP")) == "250 2.0.0"
    assert code(s.login()) == "235 2.7.0"


def test_cancel_after_login_username(users):
    s = tls_session(users)
    s.cmd("AUTH LOGIN")
    s.cmd(b64("alice"))
    assert code(s.cmd("*")) == "501 5.7.0"
    assert s.proto.authenticated is None


@pytest.mark.parametrize("response", ["not base64!", "YWJj=x", "\u00e9"])
def test_bad_base64(users, response):
    s = tls_session(users)
    s.cmd("AUTH PLAIN")
    assert code(s.cmd(response)) == "501 5.5.2"
    assert code(s.cmd("NOOP")) == "250 2.0.0"


def test_bad_base64_initial_response(users):
    s = tls_session(users)
    assert code(s.cmd("AUTH PLAIN !!!")) == "501 5.5.2"
    assert code(s.cmd("AUTH PLAIN *")) == "501 5.5.2"


def test_plain_response_without_two_nuls(users):
    s = tls_session(users)
    no_authzid = b64("alice" + chr(0) + PASSWORD)
    assert code(s.cmd(f"AUTH PLAIN {no_authzid}")) == "501 5.5.2"
    assert code(s.cmd("AUTH PLAIN =")) == "501 5.5.2"


def test_wrong_password_and_unknown_user(users):
    s = tls_session(users)
    assert s.login("alice", "wrong") == "535 5.7.8 Authentication credentials invalid"
    assert code(s.login("mallory", PASSWORD)) == "535 5.7.8"
    assert code(s.login("ALICE", PASSWORD)) == "535 5.7.8"   # names are exact
    assert s.proto.authenticated is None
    assert code(s.login()) == "235 2.7.0"


def test_authzid_for_someone_else_fails(users):
    s = tls_session(users)
    assert code(s.cmd(f"AUTH PLAIN {plain('alice', authzid=BJORN)}")) == "535 5.7.8"
    assert code(s.cmd(f"AUTH PLAIN {plain('alice', authzid='alice')}")) == "235 2.7.0"


def test_unknown_mechanism_and_syntax(users):
    s = tls_session(users)
    assert code(s.cmd("AUTH CRAM-MD5")) == "504 5.5.4"
    assert code(s.cmd("AUTH")) == "501 5.5.4"
    assert code(s.cmd("AUTH PLAIN a b")) == "501 5.5.4"


def test_auth_twice_is_503(users):
    s = tls_session(users)
    assert code(s.login()) == "235 2.7.0"
    assert code(s.login()) == "503 5.5.1"
    # RSET and EHLO keep the authentication.
    s.cmd("RSET")
    s.ehlo()
    assert s.proto.authenticated == "alice"
    assert code(s.login()) == "503 5.5.1"


def test_auth_during_transaction_is_503(users):
    s = tls_session(users)
    s.cmd("MAIL FROM:<a@example.org>")
    assert code(s.login()) == "503 5.5.1"


def test_auth_needs_ehlo(users):
    s = Session(users, tls=FakeTLS())
    s.ehlo()
    s.starttls()
    assert code(s.login()) == "503"        # no EHLO since TLS: no enhanced codes either
    s.cmd("HELO client.example.org")
    assert code(s.login()) == "503"


def test_long_auth_lines_are_allowed_up_to_12288(users):
    s = tls_session(users)
    long_password = "x" * 3000
    assert code(s.cmd(f"AUTH PLAIN {plain('alice', long_password)}")) == "535 5.7.8"
    s.cmd("AUTH PLAIN")
    assert code(s.cmd(plain("alice", long_password))) == "535 5.7.8"
    # Over the limit: the exchange ends with 500 5.5.6.
    s.cmd("AUTH PLAIN")
    assert code(s.cmd("A" * 13000)) == "500 5.5.6"
    assert code(s.cmd("NOOP")) == "250 2.0.0"
    # Other commands keep the 512 limit.
    assert code(s.cmd("NOOP " + "x" * 600)) == "500 5.5.2"


# -- after AUTH -----------------------------------------------------------------------------

def test_authenticated_client_may_relay_and_keeps_auth_param(users):
    s = tls_session(users)
    assert code(s.cmd("RCPT TO:<x@elsewhere.example>")) == "503 5.5.1"
    s.cmd("MAIL FROM:<a@example.org>")
    assert code(s.cmd("RCPT TO:<x@elsewhere.example>")) == "554 5.7.1"
    s.cmd("RSET")
    assert code(s.login()) == "235 2.7.0"
    assert code(s.cmd("MAIL FROM:<alice@example.org> AUTH=alice+40example.org")) == "250 2.1.0"
    assert code(s.cmd("RCPT TO:<x@elsewhere.example>")) == "250 2.1.5"
    s.send("DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n")
    [msg] = s.spool.messages
    assert msg.auth == "alice+40example.org"
    assert msg.protocol == "ESMTPSA"


def test_unauthenticated_auth_param_becomes_null(users):
    s = tls_session(users)
    s.cmd("MAIL FROM:<a@example.org> AUTH=alice+40example.org")
    s.cmd("RCPT TO:<u@example.test>")
    s.send("DATA\r\nhi\r\n.\r\n")
    [msg] = s.spool.messages
    assert msg.auth == "<>"
    assert msg.protocol == "ESMTPS"


def test_esmtpa_without_tls(users):
    s = Session(users, ip=INSIDE, host=INSIDE, auth_plaintext_on_loopback=True)
    s.ehlo()
    assert code(s.login()) == "235 2.7.0"
    s.cmd("MAIL FROM:<a@example.org>")
    s.cmd("RCPT TO:<u@example.test>")
    s.send("DATA\r\nhi\r\n.\r\n")
    [msg] = s.spool.messages
    assert msg.protocol == "ESMTPA"
    assert b"with ESMTPA id" in bytes(msg.headers)


# -- submission listeners -------------------------------------------------------------------

def test_submission_requires_auth_before_mail(users):
    s = tls_session(users, submission=True)
    assert s.cmd("MAIL FROM:<a@example.org>") == "530 5.7.0 Authentication required"
    assert code(s.login()) == "235 2.7.0"
    assert code(s.cmd("MAIL FROM:<a@example.org>")) == "250 2.1.0"


def test_submission_without_auth_configured_refuses_mail():
    s = Session(None, tls=FakeTLS(), submission=True)
    s.ehlo()
    assert code(s.cmd("MAIL FROM:<a@example.org>")) == "530 5.7.0"


def test_listen_listener_does_not_require_auth(users):
    s = tls_session(users)
    assert code(s.cmd("MAIL FROM:<a@example.org>")) == "250 2.1.0"


# -- checks off the reactor thread, in order -------------------------------------------------

def test_pipelined_input_waits_for_the_check(users):
    runner = ControlledRunner()
    s = tls_session(users, runner=runner, submission=True)
    replies = s.send(f"AUTH PLAIN {plain('alice')}\r\nMAIL FROM:<a@example.org>\r\n"
                     "RCPT TO:<x@elsewhere.example>\r\n")
    assert replies == []                      # nothing until the check is done
    assert s.proto._busy
    runner.run_all()
    assert codes(s.take()) == ["235 2.7.0", "250 2.1.0", "250 2.1.5"]


def test_connection_lost_during_check(users):
    runner = ControlledRunner()
    s = tls_session(users, runner=runner)
    s.send(f"AUTH PLAIN {plain('alice')}\r\n")
    s.proto.connectionLost(Failure(ConnectionError("gone")))
    runner.run_all()
    assert s.take() == []


def test_checker_error_is_454(users):
    def broken(f, *args):
        return defer.fail(OSError(5, "Input/output error"))

    s = tls_session(users, runner=broken)
    assert code(s.login()) == "454 4.7.0"
    assert code(s.cmd("NOOP")) == "250 2.0.0"   # the session goes on


# -- slowing down and refusing guessers ------------------------------------------------------

def test_failures_are_delayed_then_refused(users):
    limits = dict(delay=1.0, max_failures=3, lockout=600)
    s = tls_session(users, limits=limits)
    # 1st failure: 1 s; pipelined input waits behind it.
    assert s.send(f"AUTH PLAIN {plain('alice', 'x')}\r\nNOOP\r\n") == []
    s.clock.advance(0.99)
    assert s.take() == []
    s.clock.advance(0.01)
    assert codes(s.take()) == ["535 5.7.8", "250 2.0.0"]
    # 2nd: 2 s.
    assert s.send(f"AUTH PLAIN {plain('alice', 'x')}\r\n") == []
    s.clock.advance(1.5)
    assert s.take() == []
    s.clock.advance(0.5)
    assert codes(s.take()) == ["535 5.7.8"]
    # 3rd: 4 s; then refused, even with the right password and on a new connection.
    s.send(f"AUTH PLAIN {plain('alice', 'x')}\r\n")
    s.clock.advance(4)
    assert codes(s.take()) == ["535 5.7.8"]
    assert s.login() == "454 4.7.0 Too many authentication failures, try again later"
    s2 = Session(factory=s.factory, tls=FakeTLS())
    s2.ehlo()
    s2.starttls()
    s2.ehlo()
    assert code(s2.login()) == "454 4.7.0"
    # Another address is not affected.
    s3 = Session(factory=s.factory, ip="198.51.100.7")
    s3.ehlo()
    s3.starttls()
    s3.ehlo()
    assert code(s3.login()) == "235 2.7.0"
    # The refusal ends `lockout` after the last failure.
    s.clock.advance(600)
    s4 = Session(factory=s.factory)
    s4.ehlo()
    s4.starttls()
    s4.ehlo()
    assert code(s4.login()) == "235 2.7.0"


def test_connection_lost_during_delay(users):
    limits = dict(delay=5.0, max_failures=0, lockout=600)
    s = tls_session(users, limits=limits)
    s.send(f"AUTH PLAIN {plain('alice', 'x')}\r\n")
    assert s.clock.getDelayedCalls()
    s.proto.connectionLost(Failure(ConnectionError("gone")))
    assert not any(c.active() and c.func == s.proto._resume for c in s.clock.getDelayedCalls())
    s.clock.advance(10)
    assert s.take() == []


def test_failures_count_towards_max_errors(users):
    s = tls_session(users, max_errors=3)
    s.login("alice", "x")
    s.login("alice", "x")
    replies = s.send(f"AUTH PLAIN {plain('alice', 'x')}\r\n")
    assert codes(replies) == ["535 5.7.8", "421 4.7.0"]
    assert s.tr.disconnecting


def test_timeout_while_reply_is_held_back(users):
    limits = dict(delay=8.0, max_failures=0, lockout=600)
    s = tls_session(users, limits=limits, command_timeout=5.0)
    s.send(f"AUTH PLAIN {plain('alice', 'x')}\r\n")
    s.clock.advance(5)      # the timeout fires while we are busy: it waits for us
    assert s.take() == []
    s.clock.advance(3)
    assert codes(s.take()) == ["535 5.7.8"]
    assert not s.tr.disconnecting


def test_ehlo_keywords_order_and_help_unchanged(users):
    s = Session(users, tls=FakeTLS())
    kws = s.ehlo()
    assert kws[-1] == "STARTTLS"
    s.starttls()
    kws = s.ehlo()
    assert kws[-1] == "AUTH PLAIN LOGIN"
    assert HOST
    assert isinstance(s.spool, FakeSpool)


def test_parallel_attempts_cannot_outrun_the_limit(users):
    runner = ControlledRunner()
    limits = dict(delay=0.0, max_failures=2, lockout=600)
    first = tls_session(users, runner=runner, limits=limits)
    sessions = [first] + [Session(factory=first.factory) for _ in range(2)]
    for s in sessions[1:]:
        s.ehlo()
        s.starttls()
        s.ehlo()
    for s in sessions[:2]:
        assert s.send(f"AUTH PLAIN {plain('alice', 'guess')}\r\n") == []
    # Two checks are running from this address: a third attempt is refused at once.
    assert code(sessions[2].login("alice", "guess")) == "454 4.7.0"
    runner.run_all()
    assert [codes(s.take()) for s in sessions[:2]] == [["535 5.7.8"], ["535 5.7.8"]]


# -- property: any bytes in the AUTH exchange get well-formed replies -------------------------

from hypothesis import given, settings as hsettings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_USERS_TEXT = f"alice:{hash_password(PASSWORD, n=16)}\n"


@hsettings(max_examples=150, deadline=None)
@given(mech=st.sampled_from(["PLAIN", "LOGIN", "plain", "XOAUTH2", ""]),
       initial=st.one_of(st.just(""), st.just("="), st.text(max_size=40)),
       lines=st.lists(st.binary(max_size=60).filter(lambda b: b"\n" not in b), max_size=4))
def test_auth_exchange_never_breaks(tmp_path_factory, mech, initial, lines):
    path = tmp_path_factory.getbasetemp() / "prop-users"
    if not path.exists():
        path.write_text(_USERS_TEXT)
    s = tls_session(UsersFile(str(path)))
    first = f"AUTH {mech} {initial}".rstrip(" ").replace("\r", "").replace("\n", "") + "\r\n"
    s.proto.dataReceived(first.encode("utf-8"))
    for line in lines:
        s.proto.dataReceived(line + b"\r\n")
    s.proto.dataReceived(b"NOOP\r\n")
    replies = parse_replies(s.tr.value())   # asserts every reply is well formed
    assert replies, "no reply at all"
    assert s.proto._sasl_mech is None or replies[-1].startswith("334")
