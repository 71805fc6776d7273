"""AUTH CRAM-MD5 (RFC 2195): the MD5 state code, the stored secrets in the
users file, ``mta passwd add --cram-md5``, the server's dialogue (on a
StringTransport), and real clients — Python's smtplib and swaks — against a
real ``twistd mta``.

Expected digests come from the RFCs' test vectors, from the stdlib ``hmac``
(which knows nothing of our stored states) and from Dovecot's ``doveadm pw``,
whose ``CRAM-MD5`` scheme is the format we store.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import signal
import smtplib
import subprocess
from pathlib import Path

import pytest

from conftest import wait_for
from mta.auth.md5 import IV, compress, hmac_md5_finish, hmac_md5_states, md5_from
from mta.auth.passwords import (cram_md5_secret, hash_password, verify_cram_md5,
                                verify_password)
from mta.auth.users import Entry, UsersFile, edit_users_file, parse_lines, read_users_file
from postfix import SWAKS
from test_cli_passwd import mta
from test_e2e_tls_auth import mta_command, send, toml_str
from smtpwire import HOST, FakeTLS, b64, code, codes, plain
from test_smtp_auth import Session, tls_session

TIM, TIM_PASSWORD = "tim", "tanstaaftanstaaf"           # RFC 2195's example user
RFC2195_CHALLENGE = b"<1896.697170952@postoffice.reston.mci.net>"
RFC2195_RESPONSE = b"tim b913a602c7eda7a495b4e6e7334d3890"
# `doveadm pw -s CRAM-MD5 -p tanstaaftanstaaf` (Dovecot 2.3)
TIM_SECRET = "{CRAM-MD5}d06d4e1b26fccaa4b0b61801132340a354b21152711fb604ca3e035e7015116b"
ALICE_PASSWORD = "correct horse"


def cram_answer(challenge_line: str, user: str, password: str) -> str:
    """What a client sends back for the server's ``334 <base64 challenge>``."""
    assert challenge_line.startswith("334 "), challenge_line
    challenge = base64.b64decode(challenge_line[4:], validate=True)
    digest = hmac.new(password.encode("utf-8"), challenge, hashlib.md5).hexdigest()
    return b64(f"{user} {digest}")


# -- MD5 and HMAC-MD5 from stored states ------------------------------------------------

RFC1321_SUITE = [
    (b"", "d41d8cd98f00b204e9800998ecf8427e"),
    (b"a", "0cc175b9c0f1b6a831c399e269772661"),
    (b"abc", "900150983cd24fb0d6963f7d28e17f72"),
    (b"message digest", "f96b697d7cb7938d525a2f31aaf161d0"),
    (b"abcdefghijklmnopqrstuvwxyz", "c3fcd3d76192e4007dfb496cca67e13b"),
    (b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
     "d174ab98d277d9f5a5611c2c9f419d9f"),
    (b"1234567890" * 8, "57edf4a22be3c955ac49da2e2107b67a"),
]


@pytest.mark.parametrize("message, digest", RFC1321_SUITE)
def test_md5_rfc1321_test_suite(message, digest):
    assert md5_from(IV, 0, message).hex() == digest


@pytest.mark.parametrize("length", [55, 56, 63, 64, 65, 119, 120, 128, 1000])
def test_md5_at_padding_boundaries_matches_hashlib(length):
    data = os.urandom(length)
    assert md5_from(IV, 0, data) == hashlib.md5(data).digest()
    # Resuming from the state after the first block gives the same digest.
    if length >= 64:
        assert md5_from(compress(IV, data[:64]), 64, data[64:]) == hashlib.md5(data).digest()


def test_md5_rejects_partial_blocks():
    with pytest.raises(ValueError):
        compress(IV, b"x" * 63)
    with pytest.raises(ValueError):
        md5_from(IV, 10, b"")


RFC2202_HMAC_MD5 = [
    (b"\x0b" * 16, b"Hi There", "9294727a3638bb1c13f48ef8158bfc9d"),
    (b"Jefe", b"what do ya want for nothing?", "750c783e6ab0b503eaa86e310a5db738"),
    (b"\xaa" * 80, b"Test Using Larger Than Block-Size Key - Hash Key First",
     "6b1ab7fe4bd7bf8f0b62e6ce61b9d0cd"),
]


@pytest.mark.parametrize("key, message, digest", RFC2202_HMAC_MD5)
def test_hmac_md5_from_states_rfc2202(key, message, digest):
    inner, outer = hmac_md5_states(key)
    assert hmac_md5_finish(inner, outer, message).hex() == digest


def test_rfc2195_example():
    inner, outer = hmac_md5_states(TIM_PASSWORD.encode())
    digest = hmac_md5_finish(inner, outer, RFC2195_CHALLENGE).hex()
    assert f"tim {digest}".encode() == RFC2195_RESPONSE
    secret = cram_md5_secret(TIM_PASSWORD)
    assert secret == TIM_SECRET                         # Dovecot stores the same
    assert TIM_PASSWORD.encode().hex() not in secret
    assert verify_cram_md5(secret, RFC2195_CHALLENGE, RFC2195_RESPONSE.split()[1])
    assert verify_cram_md5(secret, RFC2195_CHALLENGE, RFC2195_RESPONSE.split()[1].upper())
    assert not verify_cram_md5(secret, RFC2195_CHALLENGE + b"x", RFC2195_RESPONSE.split()[1])
    for bad in (b"", b"b913a602", b"z" * 32, RFC2195_RESPONSE.split()[1] + b"0"):
        assert not verify_cram_md5(secret, RFC2195_CHALLENGE, bad)


@pytest.mark.parametrize("password", ["tanstaaftanstaaf", "p\u00e4ss w\u00f6rd", "x" * 64,
                                      "long " * 30])
def test_secret_is_dovecots(password):
    # Dovecot is installed by tests/setup-deps (its LMTP server is a test peer).
    r = subprocess.run(["doveadm", "pw", "-s", "CRAM-MD5", "-p", password],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == cram_md5_secret(password)


# -- the users file --------------------------------------------------------------------------

def test_users_file_third_field_round_trip(tmp_path):
    path = tmp_path / "users"
    alice = hash_password(ALICE_PASSWORD, n=16)
    tim = hash_password(TIM_PASSWORD, n=16)
    text = (f"# a comment\nalice:{alice}\n{TIM}:{tim}:{TIM_SECRET}\n"
            f"broken:{alice}:{{CRAM-MD5}}abc\nempty:{alice}:\n")
    entries, problems = parse_lines(text, "users")
    assert [(e.user, e.cram) for e in entries] == [
        (None, None), ("alice", None), (TIM, TIM_SECRET), (None, None), (None, None)]
    assert problems == [
        "users:4: user 'broken': bad CRAM-MD5 secret: not a {CRAM-MD5} followed by 64 hex digits",
        "users:5: user 'empty': bad CRAM-MD5 secret: not a {CRAM-MD5} followed by 64 hex digits"]
    path.write_text(text)

    # An edit keeps every line, and rewrites the changed user's line whole.
    def change(entries: list[Entry]) -> bool:
        entries.append(Entry.for_user("new", alice, cram_md5_secret("new pw")))
        return True
    edit_users_file(str(path), change)
    assert path.read_text() == text + f"new:{alice}:{cram_md5_secret('new pw')}\n"

    uf = UsersFile(str(path))
    uf.load()
    assert uf.lookup(TIM) == tim and uf.lookup_cram_md5(TIM) == TIM_SECRET
    assert uf.lookup("alice") == alice and uf.lookup_cram_md5("alice") is None
    assert uf.lookup_cram_md5("broken") is None and uf.has_cram_md5()
    assert len(uf) == 3


def test_old_files_load_and_have_no_cram_users(tmp_path):
    path = tmp_path / "users"
    path.write_text(f"alice:{hash_password(ALICE_PASSWORD, n=16)}\n")
    uf = UsersFile(str(path))
    assert uf.load() == []
    assert verify_password(ALICE_PASSWORD, uf.lookup("alice"))
    assert not uf.has_cram_md5()
    # The daemon notices a CRAM-MD5 user added later (the next EHLO asks).
    path.write_text(path.read_text() + f"{TIM}:{hash_password(TIM_PASSWORD, n=16)}:{TIM_SECRET}\n")
    assert uf.has_cram_md5()


# -- mta passwd add --cram-md5 ------------------------------------------------------------

@pytest.fixture
def site(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "mta.toml").write_text('[auth]\nusers_file = "etc/users"\n')
    return tmp_path


def test_passwd_add_cram_md5(site):
    r = mta("passwd", "add", TIM, "--password-stdin", "--cram-md5", cwd=site,
            stdin=TIM_PASSWORD + "\n")
    assert (r.returncode, r.stdout, r.stderr) == (
        0, "etc/users: added user tim (with a CRAM-MD5 secret)\n", "")
    r = mta("passwd", "add", "alice", "--password-stdin", cwd=site, stdin="pw\n")
    assert r.returncode == 0, r.stderr
    text = (site / "etc" / "users").read_text()
    assert TIM_PASSWORD not in text
    line = text.splitlines()[0]
    assert line.startswith("tim:$scrypt$") and line.endswith(":" + TIM_SECRET)
    entries, problems = read_users_file(str(site / "etc" / "users"))
    assert problems == []
    tim = entries[0]
    assert verify_password(TIM_PASSWORD, tim.hash) and tim.cram == TIM_SECRET
    r = mta("passwd", "list", cwd=site)
    assert (r.returncode, r.stdout) == (0, "tim\nalice\n")

    # A new password without --cram-md5 drops the old password's secret.
    r = mta("passwd", "add", TIM, "--password-stdin", cwd=site, stdin="new one\n")
    assert (r.returncode, r.stdout) == (0, "etc/users: changed password of user tim\n")
    entries, _ = read_users_file(str(site / "etc" / "users"))
    assert [(e.user, e.cram) for e in entries] == [(TIM, None), ("alice", None)]
    assert verify_password("new one", entries[0].hash)
    r = mta("passwd", "add", TIM, "--password-stdin", "--cram-md5", cwd=site, stdin="third\n")
    assert r.returncode == 0, r.stderr
    entries, _ = read_users_file(str(site / "etc" / "users"))
    assert entries[0].cram == cram_md5_secret("third") and len(entries) == 2


# -- the server's dialogue ------------------------------------------------------------------

@pytest.fixture
def cram_users(tmp_path) -> UsersFile:
    path = tmp_path / "users"
    path.write_text(f"alice:{hash_password(ALICE_PASSWORD, n=16)}\n"
                    f"{TIM}:{hash_password(TIM_PASSWORD, n=16)}:{cram_md5_secret(TIM_PASSWORD)}\n")
    return UsersFile(str(path))


@pytest.fixture
def plain_users(tmp_path) -> UsersFile:
    path = tmp_path / "plain-users"
    path.write_text(f"alice:{hash_password(ALICE_PASSWORD, n=16)}\n")
    return UsersFile(str(path))


def auth_line(keywords: list[str]) -> list[str] | None:
    found = [k for k in keywords if k.startswith("AUTH")]
    return found[0].split()[1:] if found else None


def test_ehlo_offers_cram_md5_only_when_a_cram_user_exists(cram_users, plain_users):
    s = Session(cram_users, tls=FakeTLS())
    assert auth_line(s.ehlo()) == ["CRAM-MD5"]            # no TLS: not PLAIN or LOGIN
    s.starttls()
    assert auth_line(s.ehlo()) == ["PLAIN", "LOGIN", "CRAM-MD5"]
    s = Session(plain_users, tls=FakeTLS())
    assert auth_line(s.ehlo()) is None
    assert code(s.cmd("AUTH CRAM-MD5")) == "538 5.7.11"
    s.starttls()
    assert auth_line(s.ehlo()) == ["PLAIN", "LOGIN"]
    assert code(s.cmd("AUTH CRAM-MD5")) == "504 5.5.4"
    # Plaintext AUTH on loopback (when allowed) adds PLAIN and LOGIN.
    s = Session(cram_users, ip="127.0.0.1", host="127.0.0.1", auth_plaintext_on_loopback=True)
    assert auth_line(s.ehlo()) == ["PLAIN", "LOGIN", "CRAM-MD5"]
    # No users file at all: no AUTH.
    s = Session(None)
    assert auth_line(s.ehlo()) is None


def test_ehlo_follows_the_users_file(cram_users, plain_users):
    s = Session(plain_users)
    assert auth_line(s.ehlo()) is None
    Path(plain_users.path).write_text(Path(cram_users.path).read_text())
    assert auth_line(s.ehlo()) == ["CRAM-MD5"]


def test_cram_md5_success(cram_users):
    s = Session(cram_users)
    s.ehlo()
    challenge = s.cmd("AUTH CRAM-MD5")
    decoded = base64.b64decode(challenge[4:], validate=True).decode()
    assert re.fullmatch(rf"<\d+\.\d+@{re.escape(HOST)}>", decoded), decoded
    assert s.cmd(cram_answer(challenge, TIM, TIM_PASSWORD)) == "235 2.7.0 Authentication successful"
    assert s.proto.authenticated == TIM
    assert code(s.cmd("AUTH CRAM-MD5")) == "503 5.5.1"
    # Authenticated: relaying is allowed.
    assert code(s.cmd("MAIL FROM:<tim@example.test>")) == "250 2.1.0"
    assert code(s.cmd("RCPT TO:<x@elsewhere.example>")) == "250 2.1.5"
    # Challenges are not reused.
    s2 = Session(cram_users)
    s2.ehlo()
    assert s2.cmd("AUTH CRAM-MD5") != challenge


def test_cram_md5_failures_are_535(cram_users):
    s = Session(cram_users)
    s.ehlo()
    for user, password in [(TIM, "wrong"), ("alice", ALICE_PASSWORD), ("nobody", TIM_PASSWORD),
                           ("tim\u00e4", TIM_PASSWORD)]:
        challenge = s.cmd("AUTH CRAM-MD5")
        assert s.cmd(cram_answer(challenge, user, password)) == \
            "535 5.7.8 Authentication credentials invalid"
    # An answer to another challenge (a replay) fails.
    old = s.cmd("AUTH CRAM-MD5")
    s.cmd("*")
    s.cmd("AUTH CRAM-MD5")
    assert code(s.cmd(cram_answer(old, TIM, TIM_PASSWORD))) == "535 5.7.8"
    # A digest that is not hex fails the same way; invalid UTF-8 in the name too.
    s.cmd("AUTH CRAM-MD5")
    assert code(s.cmd(b64("tim not-a-digest"))) == "535 5.7.8"
    s.cmd("AUTH CRAM-MD5")
    assert code(s.cmd(b64(b"\xff\xfe " + b"0" * 32))) == "535 5.7.8"
    assert s.proto.authenticated is None
    # PLAIN is not offered in plaintext, even with CRAM-MD5 offered.
    assert code(s.cmd(f"AUTH PLAIN {plain(TIM, TIM_PASSWORD)}")) == "538 5.7.11"


def test_cram_md5_upper_case_digest(cram_users):
    s = Session(cram_users)
    s.ehlo()
    challenge = s.cmd("AUTH CRAM-MD5")
    user, digest = base64.b64decode(cram_answer(challenge, TIM, TIM_PASSWORD)).split()
    assert code(s.cmd(b64(user + b" " + digest.upper()))) == "235 2.7.0"


def test_cram_md5_cancel_and_bad_responses(cram_users):
    s = Session(cram_users)
    s.ehlo()
    assert code(s.cmd("AUTH CRAM-MD5")) == "334"
    assert s.cmd("*") == "501 5.7.0 Authentication cancelled"
    assert code(s.cmd("AUTH CRAM-MD5")) == "334"
    assert s.cmd("not base64!") == "501 5.5.2 Cannot decode response"
    assert code(s.cmd("AUTH CRAM-MD5")) == "334"
    assert s.cmd(b64("tim")) == "501 5.5.2 Invalid CRAM-MD5 response"
    assert code(s.cmd("AUTH CRAM-MD5")) == "334"
    assert code(s.cmd(b64(" " + "0" * 32))) == "501 5.5.2"
    # The server speaks first: an initial response is refused.
    assert code(s.cmd(f"AUTH CRAM-MD5 {b64('tim 00')}")) == "501 5.5.4"
    # After all that, the session is in command mode and AUTH still works.
    assert code(s.cmd("NOOP")) == "250 2.0.0"
    challenge = s.cmd("AUTH CRAM-MD5")
    assert code(s.cmd(cram_answer(challenge, TIM, TIM_PASSWORD))) == "235 2.7.0"


def test_cram_md5_in_plaintext_then_tls(cram_users):
    # STARTTLS forgets everything, the offer is made again.
    s = Session(cram_users, tls=FakeTLS())
    s.ehlo()
    challenge = s.cmd("AUTH CRAM-MD5")
    s.cmd("*")
    s.starttls()
    s.ehlo()
    assert code(s.cmd(cram_answer(challenge, TIM, TIM_PASSWORD))) == "500 5.5.1"   # no exchange
    challenge = s.cmd("AUTH CRAM-MD5")
    assert code(s.cmd(cram_answer(challenge, TIM, TIM_PASSWORD))) == "235 2.7.0"


def test_cram_md5_failures_are_delayed_then_refused(cram_users):
    limits = dict(delay=1.0, max_failures=3, lockout=600)
    s = Session(cram_users, limits=limits, tls=FakeTLS())
    s.ehlo()
    # 1st failure: 535 after 1 s; pipelined input waits behind it.
    challenge = s.cmd("AUTH CRAM-MD5")
    assert s.send(cram_answer(challenge, TIM, "guess") + "\r\nNOOP\r\n") == []
    s.clock.advance(0.99)
    assert s.take() == []
    s.clock.advance(0.01)
    assert codes(s.take()) == ["535 5.7.8", "250 2.0.0"]
    # 2nd: 2 s.
    challenge = s.cmd("AUTH CRAM-MD5")
    assert s.send(cram_answer(challenge, TIM, "guess") + "\r\n") == []
    s.clock.advance(2)
    assert codes(s.take()) == ["535 5.7.8"]
    # A PLAIN failure (after STARTTLS elsewhere) counts towards the same limit.
    t = tls_session(cram_users, factory=s.factory)
    t.send(f"AUTH PLAIN {plain(TIM, 'guess')}\r\n")
    s.clock.advance(4)
    assert codes(t.take()) == ["535 5.7.8"]
    # Now refused without a challenge, even for the right password.
    assert s.cmd("AUTH CRAM-MD5") == "454 4.7.0 Too many authentication failures, try again later"
    assert code(t.cmd(f"AUTH PLAIN {plain(TIM, TIM_PASSWORD)}")) == "454 4.7.0"
    # Another address is not affected.
    other = Session(factory=s.factory, ip="10.9.9.9")
    other.ehlo()
    challenge = other.cmd("AUTH CRAM-MD5")
    assert code(other.cmd(cram_answer(challenge, TIM, TIM_PASSWORD))) == "235 2.7.0"
    # The lockout ends (on a new connection: this one timed out meanwhile).
    s.clock.advance(600)
    again = Session(factory=s.factory)
    again.ehlo()
    challenge = again.cmd("AUTH CRAM-MD5")
    assert code(again.cmd(cram_answer(challenge, TIM, TIM_PASSWORD))) == "235 2.7.0"


# -- real clients against twistd mta -----------------------------------------------------

@pytest.fixture
def cram_daemon(mta_factory, tmp_path):
    users = tmp_path / "users"
    users.write_text(f"alice:{hash_password(ALICE_PASSWORD, n=1024)}\n"
                     f"{TIM}:{hash_password(TIM_PASSWORD, n=1024)}:{cram_md5_secret(TIM_PASSWORD)}\n")
    daemon = mta_factory(
        policy={"relay_networks": [], "relay_domains": ["example.test"]},
        extra=f"[auth]\nusers_file = {toml_str(users)}\nfailure_delay = 0.05\n"
              f"max_failures = 3\n")
    daemon.users = users
    return daemon


def smtp(daemon, source: str = "127.0.0.1") -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", daemon.port, timeout=10, source_address=(source, 0))


def test_smtplib_logs_in_with_cram_md5(cram_daemon):
    with smtp(cram_daemon) as s:
        s.ehlo("client.e2e.test")
        assert s.esmtp_features["auth"].split() == ["CRAM-MD5"]   # plaintext, no TLS
        assert s.login(TIM, TIM_PASSWORD) == (235, b"2.7.0 Authentication successful")
        qid = send(s, "tim@example.test", "someone@elsewhere.example")
    rows = cram_daemon.rows("SELECT protocol FROM messages WHERE queue_id = ?", (qid,))
    assert rows[0]["protocol"] == "ESMTPA"
    assert "auth ok client=127.0.0.1 mechanism=CRAM-MD5 sasl_username=tim" in cram_daemon.log()
    with smtp(cram_daemon, "127.0.0.6") as s:
        s.ehlo("client.e2e.test")
        with pytest.raises(smtplib.SMTPAuthenticationError) as info:
            s.login(TIM, "wrong")
        assert (info.value.smtp_code, info.value.smtp_error) == (
            535, b"5.7.8 Authentication credentials invalid")
        s.user, s.password = "alice", ALICE_PASSWORD     # has no CRAM-MD5 secret
        with pytest.raises(smtplib.SMTPAuthenticationError) as info:
            s.auth("CRAM-MD5", s.auth_cram_md5, initial_response_ok=False)
        assert info.value.smtp_code == 535


def test_passwd_and_sighup_under_a_running_daemon(cram_daemon):
    config = str(cram_daemon.config_path)
    r = subprocess.run(mta_command("passwd", "add", "branch", "--password-stdin", "--cram-md5",
                                   "--config", config), input="branch pw\n", capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    with smtp(cram_daemon) as s:
        s.ehlo("client.e2e.test")
        assert s.login("branch", "branch pw")[0] == 235
    # Edited by hand, then SIGHUP: read again at once (not only at the next AUTH).
    text = cram_daemon.users.read_text()
    cram_daemon.users.write_text(text.replace(cram_md5_secret("branch pw"),
                                              cram_md5_secret("other pw")))
    os.kill(cram_daemon.pid, signal.SIGHUP)
    wait_for(lambda: "SIGHUP: users file" in cram_daemon.log(), 10, "the users file reload")
    assert "reloaded: 3 user(s)" in cram_daemon.log()
    with smtp(cram_daemon) as s:
        s.ehlo("client.e2e.test")
        assert s.login("branch", "other pw")[0] == 235
    with smtp(cram_daemon, "127.0.0.7") as s:
        s.ehlo("client.e2e.test")
        with pytest.raises(smtplib.SMTPAuthenticationError):
            s.login("branch", "branch pw")


def swaks(daemon, user: str, password: str) -> subprocess.CompletedProcess:
    return subprocess.run([SWAKS, "--server", f"127.0.0.1:{daemon.port}",
                           "--helo", "client.e2e.test", "--from", "tim@example.test",
                           "--to", "someone@elsewhere.example", "--auth", "CRAM-MD5",
                           "--auth-user", user, "--auth-password", password],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_swaks_cram_md5(cram_daemon):
    # tests/setup-deps installs swaks and Digest::HMAC_MD5, which it needs for CRAM-MD5.
    r = swaks(cram_daemon, TIM, TIM_PASSWORD)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "<-  235 2.7.0 Authentication successful" in r.stdout
    assert re.search(r"<-  250 2\.0\.0 .*queued as", r.stdout), r.stdout
    r = swaks(cram_daemon, TIM, "wrong")
    assert r.returncode != 0
    assert "<** 535 5.7.8 Authentication credentials invalid" in r.stdout, r.stdout
