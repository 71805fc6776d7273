"""Unit tests for mta.auth (hashes, users file, cred checker, failure limiter)
and mta.tls (loading the certificate and key)."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from twisted.cred import credentials, error
from twisted.internet import defer, task
from twisted.internet.testing import MemoryReactorClock

from mta.auth.checker import IMailUser, MailRealm, make_portal
from mta.auth.limiter import FailureLimiter
from mta.auth.passwords import (HashError, check_hash, dummy_verify, hash_password,
                                verify_password)
from mta.auth.users import (Entry, UsersFile, UsersFileError, edit_users_file, parse_lines,
                            valid_username)
from mta.tls import ServerTLS, TLSError

from tlsutil import TestCA, encrypted_key_pem

CHEAP = {"n": 16}   # parameters are stored in the hash: tests can use cheap ones


# -- password hashes -----------------------------------------------------------------------

def test_hash_format_and_roundtrip():
    h = hash_password("s3cret")
    assert h.startswith("$scrypt$n=16384,r=8,p=1$")
    assert verify_password("s3cret", h)
    assert not verify_password("s3cret ", h)
    assert not verify_password("", h)
    assert verify_password(b"s3cret", h)


def test_salts_differ():
    assert hash_password("x", **CHEAP) != hash_password("x", **CHEAP)


def test_unicode_password():
    h = hash_password("p\u00e4ss\u00f6rd", **CHEAP)
    assert verify_password("p\u00e4ss\u00f6rd", h)
    assert not verify_password("passord", h)


def test_parameters_are_read_from_the_hash():
    h = hash_password("x", n=32, r=4, p=2)
    assert h.startswith("$scrypt$n=32,r=4,p=2$")
    assert verify_password("x", h)


@pytest.mark.parametrize("bad", [
    "", "plain", "$2b$12$abcdefghijklmnopqrstuv", "$scrypt$n=16384,r=8,p=1$c2FsdA==",
    "$scrypt$n=16383,r=8,p=1$c2FsdA==$" + "A" * 44,           # n not a power of two
    "$scrypt$n=2097152,r=8,p=1$c2FsdA==$" + "A" * 44,         # n too large
    "$scrypt$n=16384,r=0,p=1$c2FsdA==$" + "A" * 44,
    "$scrypt$n=16384,r=8,p=99$c2FsdA==$" + "A" * 44,
    "$scrypt$n=16384,r=8,p=1$c2FsdA==$QUFB",                   # key too short
    "$scrypt$n=16384,r=8,p=1$c2FsdA=$" + "A" * 44,             # bad padding
])
def test_malformed_hashes(bad):
    with pytest.raises(HashError):
        check_hash(bad)
    with pytest.raises(HashError):
        verify_password("x", bad)


def test_dummy_verify_fails():
    assert dummy_verify("anything") is False


# -- users file ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name, ok", [
    ("alice", True), ("alice@example.test", True), ("bj\u00f6rn", True),
    ("", False), ("a:b", False), ("a b", False), ("a\tb", False), ("#x", False),
    ("a\x00b", False), ("x" * 257, False),
])
def test_valid_username(name, ok):
    assert (valid_username(name) is None) is ok


def test_parse_lines_reports_problems_with_line_numbers():
    good = hash_password("x", **CHEAP)
    text = (f"# comment\n\nalice:{good}\nbroken line\nbob:not-a-hash\n"
            f"alice:{good}\nc d:{good}\n")
    entries, problems = parse_lines(text, "etc/users")
    assert [e.user for e in entries if e.user] == ["alice"]
    assert len(entries) == 7            # every line kept, in order
    assert [p.split(": ", 1)[0] for p in problems] == [
        "etc/users:4", "etc/users:5", "etc/users:6", "etc/users:7"]
    assert all("\n" not in p for p in problems)


def test_users_file_reloads_when_changed(tmp_path):
    path = tmp_path / "users"
    uf = UsersFile(str(path))
    assert uf.lookup("alice") is None          # missing file: no users
    h1 = hash_password("one", **CHEAP)
    path.write_text(f"alice:{h1}\n")
    assert uf.lookup("alice") == h1
    loads = uf.loads
    assert uf.lookup("alice") == h1
    assert uf.loads == loads                   # unchanged: not read again
    h2 = hash_password("two", **CHEAP)

    def change(entries):
        entries[0].line = f"alice:{h2}"
        entries.append(Entry(f"bob:{h2}", "bob", h2))
        return True

    edit_users_file(str(path), change)
    assert uf.lookup("alice") == h2
    assert uf.lookup("bob") == h2
    path.unlink()
    assert uf.lookup("alice") is None


def test_users_file_problems_are_reported_not_fatal(tmp_path):
    path = tmp_path / "users"
    good = hash_password("x", **CHEAP)
    path.write_text(f"garbage\nalice:{good}\n")
    seen = []
    uf = UsersFile(str(path), on_problem=seen.append)
    assert uf.load() == [f"{path}:1: expected user:hash"]
    assert seen == [f"{path}:1: expected user:hash"]
    assert uf.lookup("alice") == good
    assert len(uf) == 1


def test_unreadable_users_file(tmp_path):
    directory = tmp_path / "users"
    directory.mkdir()                        # reading a directory fails, even as root
    uf = UsersFile(str(directory))
    with pytest.raises(UsersFileError) as info:
        uf.load()
    assert str(info.value).startswith(f"{directory}: cannot read file: ")


def test_unreadable_users_file_after_start_keeps_users(tmp_path):
    path = tmp_path / "users"
    good = hash_password("x", **CHEAP)
    path.write_text(f"alice:{good}\n")
    seen = []
    uf = UsersFile(str(path), on_problem=seen.append)
    uf.load()
    path.write_bytes(b"alice:\xff\xfe\n")     # not UTF-8
    assert uf.lookup("alice") == good
    assert seen and "not valid UTF-8" in seen[0]


def test_edit_keeps_comments_mode_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "users"
    good = hash_password("x", **CHEAP)
    path.write_text(f"# managed by mta passwd\nbroken line\nalice:{good}\n")
    path.chmod(0o640)
    edit_users_file(str(path), lambda entries: entries.append(
        Entry(f"bob:{good}", "bob", good)) or True)
    assert path.read_text() == (f"# managed by mta passwd\nbroken line\nalice:{good}\n"
                                f"bob:{good}\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert sorted(os.listdir(tmp_path)) == ["users"]


def test_new_users_file_is_private(tmp_path):
    path = tmp_path / "users"
    good = hash_password("x", **CHEAP)
    edit_users_file(str(path), lambda entries: entries.append(
        Entry(f"bob:{good}", "bob", good)) or True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_edit_in_missing_directory(tmp_path):
    with pytest.raises(UsersFileError) as info:
        edit_users_file(str(tmp_path / "nope" / "users"), lambda e: True)
    assert "does not exist" in str(info.value)


# -- twisted.cred ------------------------------------------------------------------------------

def _portal(tmp_path):
    path = tmp_path / "users"
    path.write_text(f"alice:{hash_password('pw', **CHEAP)}\n")
    return make_portal(UsersFile(str(path)), lambda f, *a: defer.maybeDeferred(f, *a))


def _result(d):
    out = []
    d.addBoth(out.append)
    assert out, "Deferred did not fire"
    return out[0]


def test_portal_login(tmp_path):
    portal = _portal(tmp_path)
    iface, avatar, logout = _result(portal.login(
        credentials.UsernamePassword(b"alice", b"pw"), None, IMailUser))
    assert iface is IMailUser and avatar.username == "alice"
    logout()


@pytest.mark.parametrize("user, password", [(b"alice", b"nope"), (b"bob", b"pw"),
                                            (b"\xff", b"pw"), (b"", b"")])
def test_portal_refuses(tmp_path, user, password):
    failure = _result(_portal(tmp_path).login(
        credentials.UsernamePassword(user, password), None, IMailUser))
    assert failure.check(error.UnauthorizedLogin)


def test_realm_only_gives_mail_users():
    with pytest.raises(NotImplementedError):
        MailRealm().requestAvatar("alice", None, object)


# -- failure limiter ---------------------------------------------------------------------------

def test_limiter_delays_double_up_to_16x():
    clock = task.Clock()
    lim = FailureLimiter(clock=clock, delay=0.5, max_failures=0, lockout=60)
    assert [lim.failed("192.0.2.1") for _ in range(7)] == [0.5, 1, 2, 4, 8, 8, 8]
    assert not lim.refused("192.0.2.1")       # max_failures=0: never refused


def test_limiter_refuses_then_forgets():
    clock = task.Clock()
    lim = FailureLimiter(clock=clock, delay=1, max_failures=3, lockout=60)
    for _ in range(3):
        assert not lim.refused("192.0.2.1")
        lim.failed("192.0.2.1")
    assert lim.refused("192.0.2.1")
    assert not lim.refused("192.0.2.2")
    clock.advance(59)
    assert lim.refused("192.0.2.1")
    clock.advance(1)
    assert not lim.refused("192.0.2.1")
    assert lim.failures("192.0.2.1") == 0
    assert lim.failed("192.0.2.1") == 1          # counting starts over


def test_limiter_counts_ipv6_per_64_and_mapped_ipv4_as_ipv4():
    lim = FailureLimiter(clock=task.Clock(), delay=1, max_failures=2, lockout=60)
    lim.failed("2001:db8:1:2::1")
    lim.failed("2001:db8:1:2:ffff::9")
    assert lim.refused("2001:db8:1:2::77")
    assert not lim.refused("2001:db8:1:3::1")
    lim.failed("::ffff:192.0.2.9")
    lim.failed("192.0.2.9")
    assert lim.refused("192.0.2.9")


def test_limiter_table_is_bounded():
    clock = task.Clock()
    lim = FailureLimiter(clock=clock, delay=1, max_failures=5, lockout=60, max_entries=100)
    for i in range(1000):
        clock.advance(0.001)
        lim.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(lim) <= 100
    assert lim.failures("10.0.3.231") == 1      # the newest survive


# -- TLS certificate loading ------------------------------------------------------------------

@pytest.fixture(scope="module")
def ca():
    return TestCA()


def test_server_tls_loads_chain(ca, tmp_path):
    cert, key = ca.issue("mx.example.test").write(tmp_path)
    # Append the CA as a chain certificate: allowed and sent along.
    cert.write_bytes(cert.read_bytes() + ca.cert_pem)
    tls = ServerTLS(str(cert), str(key))
    tls.load()
    assert tls.loaded and tls.subject == "CN=mx.example.test"
    assert not tls.expired()
    assert tls.getContext() is tls.getContext()


def test_server_tls_errors_name_key_and_file(ca, tmp_path):
    leaf = ca.issue("mx.example.test")
    cert, key = leaf.write(tmp_path)
    other_cert, other_key = ca.issue("other.example.test").write(tmp_path / "other")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello\n")
    enc = tmp_path / "enc.pem"
    enc.write_bytes(encrypted_key_pem(leaf))
    cases = [
        ((tmp_path / "missing.pem", key), "[tls] certificate: {c}: cannot read file: [Errno 2]"),
        ((cert, tmp_path / "missing.pem"), "[tls] private_key: {k}: cannot read file: [Errno 2]"),
        ((garbage, key), "[tls] certificate: {c}: not a PEM certificate chain"),
        ((cert, garbage), "[tls] private_key: {k}: not a PEM private key"),
        ((cert, other_key), "[tls] private_key: {k}: does not match the (first) certificate in {c}"),
        ((cert, enc), "[tls] private_key: {k}: the private key is encrypted"),
        ((key, cert), "[tls] certificate: {c}: not a PEM certificate chain"),
    ]
    for (c, k), expected in cases:
        with pytest.raises(TLSError) as info:
            ServerTLS(str(c), str(k)).load()
        message = str(info.value)
        assert "\n" not in message
        assert message.startswith(expected.format(c=c, k=k)), message


def test_server_tls_failed_reload_keeps_old_certificate(ca, tmp_path):
    cert, key = ca.issue("mx.example.test").write(tmp_path)
    tls = ServerTLS(str(cert), str(key))
    tls.load()
    ctx = tls.getContext()
    cert.write_text("oops")
    with pytest.raises(TLSError):
        tls.load()
    assert tls.getContext() is ctx
    ca.issue("new.example.test").write(tmp_path)
    tls.load()
    assert tls.subject == "CN=new.example.test"
    assert tls.getContext() is not ctx


def test_server_tls_expired_certificate_loads_but_says_so(ca, tmp_path):
    cert, key = ca.issue("old.example.test", expired=True).write(tmp_path)
    tls = ServerTLS(str(cert), str(key))
    tls.load()
    assert tls.expired()


def test_server_tls_minimum_version(ca, tmp_path):
    from OpenSSL import SSL

    cert, key = ca.issue("mx.example.test").write(tmp_path)
    for version, flag in (("1.2", SSL.OP_NO_TLSv1_1), ("1.3", SSL.OP_NO_TLSv1_2)):
        tls = ServerTLS(str(cert), str(key), version)
        tls.load()
        assert tls._options._options & flag, version


def test_limiter_counts_running_checks():
    lim = FailureLimiter(clock=task.Clock(), delay=1, max_failures=2, lockout=60)
    lim.started("192.0.2.1")
    assert not lim.refused("192.0.2.1")
    lim.started("192.0.2.1")
    assert lim.refused("192.0.2.1")          # two verdicts pending: no third attempt yet
    lim.finished("192.0.2.1")
    lim.finished("192.0.2.1")
    assert not lim.refused("192.0.2.1")      # both succeeded
    assert lim._running == {}
