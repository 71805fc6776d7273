"""End to end: STARTTLS, implicit TLS, AUTH and `mta passwd` against the real
``twistd mta``, with real TLS (a test CA made with ``cryptography``) and the
stdlib ``smtplib`` as the client.

Most tests share one daemon (module scope) with a plaintext ``listen``
port, a ``submission`` port with STARTTLS and an ``ssl:`` submission port.
Tests that make AUTH fail connect from their own loopback address
(127.0.0.2, 127.0.0.3, ...) since failures are counted per client address.
"""
from __future__ import annotations

import base64
import os
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from conftest import _TRACEBACK_MARKERS, MTADaemon, free_port, subprocess_env, wait_for
from mta.auth.passwords import hash_password
from tlsutil import TestCA

USER = "alice@example.test"
PASSWORD = "correct horse battery"
DELAY = 0.1          # [auth] failure_delay of the shared daemon
MAX_FAILURES = 3


def mta_command(*args: str) -> list[str]:
    script = Path(sys.executable).with_name("mta")
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-m", "mta.cli", *args]


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def toml_str(path: Path) -> str:
    return '"' + str(path).replace("\\", "\\\\") + '"'


class Env:
    def __init__(self, daemon: MTADaemon, ca: TestCA, tls_dir: Path, submission: int,
                 smtps: int):
        self.daemon = daemon
        self.ca = ca
        self.tls_dir = tls_dir
        self.submission = submission
        self.smtps = smtps

    @property
    def context(self) -> ssl.SSLContext:
        return self.ca.client_context()

    def smtp(self, port: int | None = None, source: str = "127.0.0.1") -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", port or self.submission, timeout=10,
                            source_address=(source, 0))

    def smtps_client(self, source: str = "127.0.0.1") -> smtplib.SMTP_SSL:
        return smtplib.SMTP_SSL("127.0.0.1", self.smtps, timeout=10, context=self.context,
                                source_address=(source, 0))

    def secure(self, source: str = "127.0.0.1") -> smtplib.SMTP:
        s = self.smtp(source=source)
        s.ehlo("client.e2e.test")
        s.starttls(context=self.context)
        s.ehlo("client.e2e.test")
        return s

    def stored(self, qid: str) -> bytes:
        rows = self.daemon.rows("SELECT headers FROM contents WHERE queue_id = ?", (qid,))
        assert rows, qid
        return bytes(rows[0]["headers"])


def send(s: smtplib.SMTP, sender: str, rcpt: str) -> str:
    code, _ = s.mail(sender)
    assert code == 250
    code, msg = s.rcpt(rcpt)
    assert code == 250, msg
    code, msg = s.data(b"Subject: test\r\n\r\nhello\r\n")
    assert code == 250, msg
    return re.search(rb"queued as (\S+)", msg).group(1).decode()


def stop_and_check(daemon: MTADaemon) -> None:
    status = daemon.stop()
    text = daemon.all_logs()
    print(f"===== {daemon.config_path} (exit status {status}) =====")
    print(text)
    if not daemon.expect_errors:
        assert not any(m in text for m in _TRACEBACK_MARKERS), "the daemon logged a traceback"


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("tlsauth")
    ca = TestCA()
    tls_dir = root / "tls"
    cert, key = ca.issue("mx.e2e.test", ip="127.0.0.1").write(tls_dir)
    users = root / "users"
    users.write_text(f"{USER}:{hash_password(PASSWORD, n=1024)}\n")
    submission, smtps = free_port(), free_port()
    extra = (f"[tls]\ncertificate = {toml_str(cert)}\nprivate_key = {toml_str(key)}\n"
             f"[auth]\nusers_file = {toml_str(users)}\nfailure_delay = {DELAY}\n"
             f"max_failures = {MAX_FAILURES}\nlockout = \"1h\"\n")
    daemon = MTADaemon(
        root / "mta",
        server={"submission": [f"tcp:{submission}:interface=127.0.0.1",
                               f"ssl:{smtps}:interface=127.0.0.1"]},
        policy={"relay_networks": [], "relay_domains": ["example.test"]},
        extra=extra)
    daemon.start()
    try:
        yield Env(daemon, ca, tls_dir, submission, smtps)
    finally:
        stop_and_check(daemon)


# -- STARTTLS + AUTH on the submission port ---------------------------------------------------

def test_submission_starttls_login_and_relay(env):
    with env.smtp() as s:
        s.ehlo("client.e2e.test")
        assert s.has_extn("starttls")
        assert not s.has_extn("auth")            # not over plaintext
        code, msg = s.starttls(context=env.context)
        assert (code, msg) == (220, b"2.0.0 Ready to start TLS")
        assert isinstance(s.sock, ssl.SSLSocket)
        s.ehlo("client.e2e.test")
        assert not s.has_extn("starttls")
        assert s.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        assert s.login(USER, PASSWORD) == (235, b"2.7.0 Authentication successful")
        qid = send(s, "alice@example.test", "someone@elsewhere.example")
    headers = env.stored(qid)
    assert re.match(rb"Received: from client\.e2e\.test \(\[127\.0\.0\.1\]\)\r\n"
                    rb"\t\(using TLSv1\.[23] with cipher [A-Z0-9_-]+ \(\d+ bits\)\)\r\n"
                    rb"\tby mx\.e2e\.test \(mta\) with ESMTPSA id " + qid.encode(), headers), headers
    log = env.daemon.log()
    assert re.search(r"TLS established client=127\.0\.0\.1 version=TLSv1\.[23] cipher=\S+", log)
    assert f"sasl_username={USER}" in log


def test_login_mechanism(env):
    with env.secure() as s:
        s.user, s.password = USER, PASSWORD
        assert s.auth("LOGIN", s.auth_login)[0] == 235


def test_submission_needs_auth_before_mail(env):
    with env.secure() as s:
        code, msg = s.mail("alice@example.test")
        assert (code, msg) == (530, b"5.7.0 Authentication required")


def test_bad_password_is_535(env):
    with env.secure(source="127.0.0.3") as s:
        code, msg = s.docmd("AUTH", "PLAIN " + plain(USER, "wrong"))
        assert (code, msg) == (535, b"5.7.8 Authentication credentials invalid")
        with pytest.raises(smtplib.SMTPAuthenticationError) as info:
            s.login("nobody@example.test", PASSWORD)
        assert info.value.smtp_code == 535


# -- the plaintext listen port ------------------------------------------------------------------

def test_listen_port_offers_no_auth_in_plaintext(env):
    with env.smtp(env.daemon.port) as s:
        s.ehlo("client.e2e.test")
        assert s.has_extn("starttls") and not s.has_extn("auth")
        code, msg = s.docmd("AUTH", "PLAIN " + plain(USER, PASSWORD))
        assert code == 538 and msg.startswith(b"5.7.11 ")
        # Not authenticated: no relaying, but local domains are fine and AUTH is optional.
        assert s.mail("a@example.org")[0] == 250
        assert s.rcpt("x@elsewhere.example")[0] == 554
        assert s.rcpt("u@example.test")[0] == 250
        s.rset()
        s.starttls(context=env.context)
        s.ehlo("client.e2e.test")
        assert s.has_extn("auth")
        qid = send(s, "a@example.org", "u@example.test")     # still no AUTH needed here
    assert b" with ESMTPS id " in env.stored(qid)


def test_starttls_argument_and_twice(env):
    with env.smtp() as s:
        s.ehlo("client.e2e.test")
        assert s.docmd("STARTTLS", "now")[0] == 501
        s.starttls(context=env.context)
        s.ehlo("client.e2e.test")
        assert s.docmd("STARTTLS") == (503, b"5.5.1 TLS already active")


def _read_line(sock: socket.socket) -> bytes:
    """One line from a plain socket, byte by byte, so nothing after it is consumed."""
    line = b""
    while not line.endswith(b"\n"):
        c = sock.recv(1)
        if not c:
            raise ConnectionError(f"closed after {line!r}")
        line += c
    return line


def test_plaintext_injected_after_starttls_is_not_obeyed(env):
    raw = socket.create_connection(("127.0.0.1", env.submission), timeout=10)
    assert _read_line(raw).startswith(b"220 ")
    raw.sendall(b"EHLO client.e2e.test\r\n")
    while not _read_line(raw).startswith(b"250 "):
        pass
    # One write: STARTTLS and a command the attacker slipped in behind it.
    raw.sendall(b"STARTTLS\r\nRSET\r\n")
    assert _read_line(raw) == b"220 2.0.0 Ready to start TLS\r\n"
    with env.context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tf = tls.makefile("rb")
        tls.sendall(b"HELP\r\n")
        # The first reply after the handshake answers HELP: the RSET was dropped.
        line = tf.readline()
        assert line.startswith(b"214"), line
        while not line.startswith(b"214 "):
            line = tf.readline()
        tls.sendall(b"QUIT\r\n")
        assert tf.readline().startswith(b"221")
    wait_for(lambda: "discarded 6 octets pipelined after STARTTLS" in env.daemon.log(), 5,
             "the log line about the discarded octets")


# -- implicit TLS (RFC 8314) ------------------------------------------------------------------

def test_implicit_tls_submission(env):
    with env.smtps_client() as s:
        s.ehlo("client.e2e.test")
        assert not s.has_extn("starttls")
        assert s.has_extn("auth")
        assert s.mail("alice@example.test")[0] == 530
        s.rset()
        s.login(USER, PASSWORD)
        qid = send(s, "alice@example.test", "someone@elsewhere.example")
    assert b" with ESMTPSA id " in env.stored(qid)


# -- guessing -------------------------------------------------------------------------------------

def test_password_guessing_is_slowed_then_refused(env):
    with env.secure(source="127.0.0.2") as s:
        took = []
        for _ in range(MAX_FAILURES):
            start = time.monotonic()
            assert s.docmd("AUTH", "PLAIN " + plain(USER, "guess"))[0] == 535
            took.append(time.monotonic() - start)
        # The delays double: DELAY, 2*DELAY, 4*DELAY.
        assert took[-1] >= 4 * DELAY * 0.9, took
        code, msg = s.docmd("AUTH", "PLAIN " + plain(USER, PASSWORD))
        assert code == 454 and msg.startswith(b"4.7.0 Too many authentication failures")
    # A new connection from that address is refused too; others are not.
    with env.secure(source="127.0.0.2") as s:
        assert s.docmd("AUTH", "PLAIN " + plain(USER, PASSWORD))[0] == 454
    with env.secure(source="127.0.0.1") as s:
        assert s.docmd("AUTH", "PLAIN " + plain(USER, PASSWORD))[0] == 235


# -- the users file changes under a running daemon ------------------------------------------------

def test_mta_passwd_changes_are_seen_without_restart(env):
    config = str(env.daemon.config_path)
    run = lambda *a, **kw: subprocess.run(mta_command(*a), capture_output=True, text=True,  # noqa: E731
                                          env=subprocess_env(), timeout=30, **kw)
    r = run("passwd", "add", "bob", "--password-stdin", "--config", config, input="bobs pw\n")
    assert r.returncode == 0, r.stderr
    with env.secure() as s:
        assert s.login("bob", "bobs pw")[0] == 235
    r = run("passwd", "remove", "bob", "--config", config)
    assert r.returncode == 0, r.stderr
    with env.secure(source="127.0.0.4") as s:
        assert s.docmd("AUTH", "PLAIN " + plain("bob", "bobs pw"))[0] == 535


# -- SIGHUP --------------------------------------------------------------------------------------------

def test_sighup_reloads_the_certificate(env):
    def served_serial() -> int:
        with env.smtps_client() as s:
            der = s.sock.getpeercert(binary_form=True)
        from cryptography import x509
        return x509.load_der_x509_certificate(der).serial_number

    new = env.ca.issue("mx.e2e.test", ip="127.0.0.1")
    assert served_serial() != new.serial
    new.write(env.tls_dir)
    os.kill(env.daemon.pid, signal.SIGHUP)
    wait_for(lambda: "SIGHUP: TLS certificate reloaded" in env.daemon.log(), 10, "the reload")
    assert served_serial() == new.serial
    with env.secure() as s:                     # STARTTLS uses it too
        assert s.login(USER, PASSWORD)[0] == 235


# -- a daemon without TLS that allows plaintext AUTH on loopback ----------------------------------

def test_plaintext_auth_on_loopback_when_allowed(mta_factory, tmp_path):
    users = tmp_path / "users"
    users.write_text(f"{USER}:{hash_password(PASSWORD, n=1024)}\n")
    submission = free_port()
    daemon = mta_factory(
        server={"submission": [f"tcp:{submission}:interface=127.0.0.1"]},
        policy={"relay_networks": []},
        extra=f"[auth]\nusers_file = {toml_str(users)}\nallow_plaintext_on_loopback = true\n")
    with smtplib.SMTP("127.0.0.1", submission, timeout=10) as s:
        s.ehlo("client.e2e.test")
        assert not s.has_extn("starttls")
        assert s.docmd("STARTTLS")[0] == 502
        assert s.has_extn("auth")
        s.login(USER, PASSWORD)
        qid = send(s, "alice@example.test", "x@elsewhere.example")
    rows = daemon.rows("SELECT protocol FROM messages WHERE queue_id = ?", (qid,))
    assert rows[0]["protocol"] == "ESMTPA"


# -- startup errors --------------------------------------------------------------------------------------

def _one_line(result) -> str:
    stderr = result.stderr.decode(errors="replace")
    stdout = result.stdout.decode(errors="replace")
    assert result.returncode != 0, (stdout, stderr)
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr + stdout
    assert "Traceback" not in stderr + stdout
    return lines[0]


@pytest.mark.parametrize("case", ["missing-cert", "wrong-key", "users-dir", "ssl-without-tls"])
def test_startup_errors_are_one_line(twistd, tmp_path, case):
    ca = TestCA()
    cert, key = ca.issue("mx.e2e.test").write(tmp_path / "tls")
    _, other_key = ca.issue("other.e2e.test").write(tmp_path / "other")
    port = free_port()
    tls = f"[tls]\ncertificate = {toml_str(cert)}\nprivate_key = {toml_str(key)}\n"
    listen = f"tcp:{port}:interface=127.0.0.1"
    auth = ""
    if case == "missing-cert":
        tls = tls.replace(str(cert), str(tmp_path / "nope.pem"))
        expect = f"[tls] certificate: {tmp_path / 'nope.pem'}: cannot read file: [Errno 2]"
    elif case == "wrong-key":
        tls = tls.replace(str(key), str(other_key))
        expect = f"[tls] private_key: {other_key}: does not match the (first) certificate"
    elif case == "users-dir":
        auth = f"[auth]\nusers_file = {toml_str(tmp_path)}\n"
        expect = f"[auth] users_file: {tmp_path}: cannot read file:"
    else:
        tls = ""
        listen = f"ssl:{port}:interface=127.0.0.1"
        expect = "[server] listen: 'ssl:"
    config = tmp_path / "mta.toml"
    config.write_text(f'[server]\nlisten = ["{listen}"]\n'
                      f'[spool]\nurl = "sqlite:///{tmp_path}/spool.sqlite"\n'
                      f"[relay]\ndeliver = false\n{tls}{auth}")
    line = _one_line(twistd("-n", "--pidfile=", "mta", "--config", str(config)))
    assert line.startswith(f"mta: {config}: "), line
    assert expect in line, line
