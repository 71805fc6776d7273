"""A scripted SMTP peer for tests: a strict little ESMTP server of our own
(not twisted.mail) that records everything it is told and does what the
script says.

In a test's reactor::

    peer = ScriptedPeer({"extensions": ["PIPELINING", "SIZE 1000"],
                         "rcpt": {"bad@example.test": "550 5.1.1 No such user"},
                         "actions": {"MAIL#2": "drop"}})
    port = peer.start()            # 127.0.0.1, an ephemeral port
    ...
    yield peer.stop()              # closes every connection and the port

As a process (for end-to-end tests against the real daemon)::

    python tests/peers.py --port-file PATH --script JSON --record FILE.jsonl

prints ``PORT n`` on stdout, writes *n* to PATH, appends one JSON object per
finished transaction to FILE.jsonl, and runs until SIGTERM/SIGINT.
:class:`PeerProcess` wraps that for tests (no sleeping: it reads the PORT
line from the pipe).  Only a process, not a thread: Twisted allows one
reactor per process, and the test runner owns it.

The script (a dict, JSON-able):

``name``         the host name in the greeting and EHLO reply ("peer.test")
``extensions``   EHLO keywords to advertise (default DEFAULT_EXTENSIONS);
                 each one changes behaviour: without PIPELINING a command
                 sent before the previous reply is a violation, without
                 CHUNKING BDAT is refused, ``SIZE n`` refuses bigger MAIL
                 SIZE= and bigger messages, ...
``ehlo``         False: EHLO is answered 502 (the client must use HELO)
``starttls``     True: advertise STARTTLS and do it (self-signed cert for
                 peer.test, or ``ScriptedPeer(tls_options=...)``, or the
                 PEM files named by ``certificate`` and ``private_key``)
``tls_fail``     True: answer STARTTLS 220, then send garbage and close
``auth``         SASL mechanisms to advertise (["PLAIN", "LOGIN"]): AUTH is
                 done (RFC 4954, initial response or 334 dialogue) and each
                 attempt recorded in ``auths`` as (connection, mechanism,
                 user, password, tls); ``users`` {"user": "password"} get
                 235, anyone else 535 5.7.8 (or the "AUTH" action's reply)
``auth_after_tls`` True: advertise AUTH only after STARTTLS
``auth_required`` True: MAIL before a successful AUTH gets 530 5.7.0
``actions``      {"STEP": ACTION}; STEP is one of greeting EHLO HELO STARTTLS
                 AUTH MAIL RCPT DATA DATA_END BDAT RSET NOOP QUIT, optionally
                 "#n" (only the nth such command on a connection) and/or
                 "@c" (only on the cth connection), e.g. "MAIL@1#2".
                 DATA_END is the end of the content (final dot or BDAT LAST).
                 ACTION: "drop" (close without answering), "stall" (never
                 answer, read nothing more), or a reply "451 4.3.0 text"
                 (multi-line: "451 4.3.0 first\\nsecond", continuation lines
                 without the code), or "raw:TEXT" to send TEXT + CRLF as is.
``rcpt``         {"address": ACTION} per recipient (case-insensitive)
``max_rcpts``    n: recipients accepted per transaction, as Postfix's
                 ``smtpd_recipient_limit``; each RCPT after the nth accepted one
                 gets ``452 4.5.3 Error: too many recipients``
``data_reply``   the reply at the end of the content
                 (default "250 2.0.0 Ok: queued as {id}")

It is strict: a bare CR or LF in a command or in the content (except a
BINARYMIME BDAT body), a command line over 512 octets or a content line over
1000, pipelining without PIPELINING, and BDAT or 8-bit content or SMTPUTF8
without the extension are recorded in ``violations``.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from twisted.internet import defer, protocol

DEFAULT_EXTENSIONS = ["PIPELINING", "SIZE 36700160", "8BITMIME", "ENHANCEDSTATUSCODES",
                      "SMTPUTF8", "DSN", "CHUNKING", "BINARYMIME"]

_STEPS = {"greeting", "EHLO", "HELO", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA", "DATA_END",
          "BDAT", "RSET", "NOOP", "QUIT"}
_ACTION_KEY = re.compile(r"([A-Za-z_]+)(?:@(\d+))?(?:#(\d+))?")
_ADDR = re.compile(r"(?i)(?:FROM|TO):\s*<([^>]*)>(.*)")
_BDAT = re.compile(r"(?i)BDAT +(\d+)( +LAST)? *")


@dataclass
class Transaction:
    connection: int                  # 1-based connection number
    helo: str | None                 # the EHLO/HELO argument
    tls: bool
    mail: str                        # the MAIL command line, without CRLF
    rcpts: list[str] = field(default_factory=list)      # RCPT command lines
    accepted: list[str] = field(default_factory=list)   # accepted recipient addresses
    method: str | None = None        # "DATA" or "BDAT" once content arrives
    raw: bytes = b""                 # content as received (stuffed; BDAT chunks joined)
    data: bytes = b""                # content after unstuffing
    chunks: list[int] = field(default_factory=list)     # BDAT chunk sizes
    reply: str | None = None         # the reply given at the end of the content
    complete: bool = False           # the content was received in full
    auth: str | None = None          # the user authenticated on the connection at MAIL

    @property
    def mail_address(self) -> str:
        m = _ADDR.match(self.mail[5:])
        return m.group(1) if m else ""

    @property
    def mail_params(self) -> dict[str, str | None]:
        return _params(self.mail[5:])

    def rcpt_params(self, i: int) -> dict[str, str | None]:
        return _params(self.rcpts[i][5:])

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["raw"] = base64.b64encode(self.raw).decode()
        d["data"] = base64.b64encode(self.data).decode()
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Transaction":
        d = dict(d)
        d["raw"] = base64.b64decode(d["raw"])
        d["data"] = base64.b64decode(d["data"])
        return cls(**d)


def _params(arg: str) -> dict[str, str | None]:
    m = _ADDR.match(arg)
    if not m:
        return {}
    out: dict[str, str | None] = {}
    for item in m.group(2).split():
        k, eq, v = item.partition("=")
        out[k.upper()] = v if eq else None
    return out


def unstuff(raw: bytes) -> bytes:
    """Undo dot-stuffing of DATA content (which starts at a line start)."""
    return (b"\r\n" + raw).replace(b"\r\n.", b"\r\n")[2:]


def bare_newline(data: bytes) -> bool:
    n = data.count(b"\r\n")
    return data.count(b"\r") != n or data.count(b"\n") != n


_tls_cache: Any = None


def server_tls_options() -> Any:
    """A self-signed certificate for peer.test, made once per process."""
    global _tls_cache
    if _tls_cache is None:
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
        from OpenSSL import crypto
        from twisted.internet import ssl

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "peer.test")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=30))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName("peer.test")]),
                               critical=False)
                .sign(key, hashes.SHA256()))
        try:  # pyOpenSSL >= 24.3 takes cryptography objects directly
            _tls_cache = ssl.CertificateOptions(privateKey=key, certificate=cert)
            _tls_cache.getContext()
        except Exception:
            _tls_cache = ssl.CertificateOptions(
                privateKey=crypto.PKey.from_cryptography_key(key),
                certificate=crypto.X509.from_cryptography(cert))
    return _tls_cache


def load_tls_options(certificate: str, private_key: str) -> Any:
    """Server TLS options from PEM files (the certificate file may hold a chain)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from OpenSSL import crypto
    from twisted.internet import ssl

    with open(certificate, "rb") as f:
        certs = x509.load_pem_x509_certificates(f.read())
    with open(private_key, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), None)
    try:  # pyOpenSSL >= 24.3 takes cryptography objects directly
        options = ssl.CertificateOptions(privateKey=key, certificate=certs[0],
                                         extraCertChain=certs[1:])
        options.getContext()
    except Exception:
        options = ssl.CertificateOptions(
            privateKey=crypto.PKey.from_cryptography_key(key),
            certificate=crypto.X509.from_cryptography(certs[0]),
            extraCertChain=[crypto.X509.from_cryptography(c) for c in certs[1:]])
    return options


class PeerConnection(protocol.Protocol):
    factory: "ScriptedPeer"

    def __init__(self, peer: "ScriptedPeer", number: int):
        self.peer = peer
        self.number = number
        self.script = peer.script
        self.buf = b""
        self.mode = "cmd"            # cmd, data, bdat, stalled, closed
        self.counts: dict[str, int] = {}
        self.helo: str | None = None
        self.tls = False
        self.tx: Transaction | None = None
        self.ext = self._extensions()
        self.data_buf = bytearray()
        self.data_scan = 0
        self.bdat_left = 0
        self.bdat_last = False
        self.bdat_refused = False
        self.out: list[bytes] = []
        self.ext_size = 0
        self._size_limit()
        self.body_type: str | None = None
        self.utf8 = False
        self.authenticated: str | None = None
        self.sasl: Callable[[str], None] | None = None   # the AUTH dialogue's next line
        self.sasl_parts: list[str] = []

    def _size_limit(self) -> None:
        self.ext_size = 0
        for e in self.ext:
            if e.upper().startswith("SIZE ") and e[5:].strip().isdigit():
                self.ext_size = int(e[5:])

    def _extensions(self) -> list[str]:
        ext = list(self.script.get("extensions", DEFAULT_EXTENSIONS))
        if self.script.get("starttls") or self.script.get("tls_fail"):
            ext.append("STARTTLS")
        mechanisms = self.script.get("auth")
        if mechanisms and (self.tls or not self.script.get("auth_after_tls")):
            ext.append("AUTH " + " ".join(mechanisms))
        return ext

    def has(self, word: str) -> bool:
        return any(e.split(" ")[0].upper() == word for e in self.ext)

    # -- script ---------------------------------------------------------------
    def action(self, step: str) -> str | None:
        """The scripted action for this occurrence of *step* (counts it)."""
        n = self.counts[step] = self.counts.get(step, 0) + 1
        found = None
        for key, value in self.script.get("actions", {}).items():
            m = _ACTION_KEY.fullmatch(key)
            if not m or m.group(1) != step:
                continue
            if m.group(2) and int(m.group(2)) != self.number:
                continue
            if m.group(3) and int(m.group(3)) != n:
                continue
            # The most specific key wins.
            rank = bool(m.group(2)) + bool(m.group(3))
            if found is None or rank > found[0]:
                found = (rank, value)
        return found[1] if found else None

    def violation(self, what: str) -> None:
        self.peer.violations.append(f"connection {self.number}: {what}")

    def reply(self, text: str) -> None:
        lines = text.split("\n")
        code = lines[0][:3]
        out = []
        for i, line in enumerate(lines):
            if i == 0:
                line = line[4:] if len(line) > 3 else ""
            sep = " " if i == len(lines) - 1 else "-"
            out.append(f"{code}{sep}{line}\r\n")
        self.out.append("".join(out).encode("utf-8"))

    def flush(self) -> None:
        if self.out and self.transport is not None:
            self.transport.write(b"".join(self.out))
        self.out.clear()

    def perform(self, step: str, default: str | Callable[[], str],
                action: str | None = None) -> str | None:
        """Answer *step* as scripted; returns the reply given, or None."""
        if action is None:
            action = self.action(step)
        if action == "drop":
            self.flush()
            self.mode = "closed"
            self.transport.loseConnection()
            return None
        if action == "stall":
            self.flush()
            self.mode = "stalled"
            self.peer._stalled(self)
            return None
        if action and action.startswith("raw:"):
            self.out.append(action[4:].encode("utf-8") + b"\r\n")
            return action
        text = action if action else (default() if callable(default) else default)
        self.reply(text)
        return text

    # -- connection -------------------------------------------------------------
    def connectionMade(self) -> None:
        self.peer.connections += 1
        self.peer._open.add(self)
        name = self.script.get("name", "peer.test")
        self.perform("greeting", f"220 {name} ESMTP scripted peer")
        self.flush()

    def connectionLost(self, reason: Any = protocol.connectionDone) -> None:
        self.mode = "closed"
        self.peer._open.discard(self)
        if not self.peer._open:
            waiters, self.peer._lost = self.peer._lost, []
            for d in waiters:
                d.callback(None)

    def dataReceived(self, data: bytes) -> None:
        if self.mode in ("closed", "stalled"):
            return
        self.buf += data
        self.process()
        self.flush()

    def process(self) -> None:
        while self.buf and self.mode not in ("closed", "stalled"):
            if self.mode == "cmd":
                j = self.buf.find(b"\n")
                if j < 0:
                    if len(self.buf) > 4096:
                        self.violation("command line too long")
                        self.buf = b""
                    return
                line = self.buf[:j]
                self.buf = self.buf[j + 1:]
                if line.endswith(b"\r"):
                    line = line[:-1]
                else:
                    self.violation(f"bare LF in command: {line[:80]!r}")
                if b"\r" in line:
                    self.violation(f"bare CR in command: {line[:80]!r}")
                if len(line) > 510:
                    self.violation(f"command line over 512 octets: {len(line) + 2}")
                if self.buf:
                    self.peer.pipelined += 1
                if self.buf and not self.has("PIPELINING"):
                    # Our reply to this line is not sent yet: the client did not wait.
                    if not line[:5].upper().startswith(b"BDAT "):
                        self.violation(f"pipelined without PIPELINING after {line[:40]!r}")
                self.command(line)
            elif self.mode == "data":
                self.read_data()
            elif self.mode == "bdat":
                self.read_bdat()

    # -- commands -------------------------------------------------------------------
    def command(self, raw: bytes) -> None:
        self.peer.commands.append((self.number, raw))
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            self.reply("500 5.5.2 Bad characters")
            return
        if self.sasl is not None:
            handler_, self.sasl = self.sasl, None
            if line == "*":
                self.reply("501 5.0.0 Authentication cancelled")
            else:
                handler_(line)
            return
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        handler = getattr(self, "do_" + verb, None)
        if handler is None:
            self.reply("500 5.5.1 Command unrecognized")
            return
        handler(arg, line)

    def do_EHLO(self, arg: str, line: str) -> None:
        if self.script.get("ehlo", True) is False:
            self.perform("EHLO", "502 5.5.1 EHLO not implemented")
            return
        name = self.script.get("name", "peer.test")

        ext = [e for e in self._extensions() if not (self.tls and e.upper() == "STARTTLS")]
        r = self.perform("EHLO", "\n".join([f"250 {name} greets {arg}"] + ext))
        if r and r.startswith("250"):
            self.helo = arg
            self.tx = None
            self.ext = ext
            self._size_limit()

    def do_HELO(self, arg: str, line: str) -> None:
        name = self.script.get("name", "peer.test")
        r = self.perform("HELO", f"250 {name}")
        if r and r.startswith("250"):
            self.helo = arg
            self.ext = []
            self.ext_size = 0
            self.tx = None

    def do_STARTTLS(self, arg: str, line: str) -> None:
        if not self.has("STARTTLS") or self.tls:
            self.reply("502 5.5.1 STARTTLS not available")
            return
        r = self.perform("STARTTLS", "220 2.0.0 Ready to start TLS")
        if not r or not r.startswith("220"):
            return
        if self.buf:
            self.violation("data pipelined after STARTTLS")
        self.buf = b""
        self.flush()
        if self.script.get("tls_fail"):
            self.transport.write(b"this is not a TLS server hello\r\n" * 4)
            self.mode = "closed"
            self.transport.loseConnection()
            return
        self.transport.startTLS(self.peer.tls_options or server_tls_options())
        self.tls = True
        self.authenticated = None
        self.helo = None
        self.tx = None
        self.ext = [e for e in self._extensions() if e.upper() != "STARTTLS"]

    # -- AUTH (RFC 4954) -----------------------------------------------------------
    def do_AUTH(self, arg: str, line: str) -> None:
        if not self.has("AUTH"):
            self.reply("502 5.5.1 AUTH not available")
            return
        if self.helo is None:
            self.reply("503 5.5.1 Send EHLO first")
            return
        if self.authenticated is not None or self.tx is not None:
            self.reply("503 5.5.1 Already authenticated or in a transaction")
            return
        mech, _, initial = arg.strip().partition(" ")
        mech = mech.upper()
        if mech not in [m.upper() for m in self.script.get("auth", [])]:
            self.reply("504 5.5.4 Unrecognized authentication type")
            return
        self.sasl_parts = []
        if mech == "PLAIN":
            if initial:
                self._sasl_plain(initial)
            else:
                self.reply("334 ")
                self.sasl = self._sasl_plain
        else:
            if initial:
                self._sasl_login(initial)
            else:
                self.reply("334 VXNlcm5hbWU6")
                self.sasl = self._sasl_login

    @staticmethod
    def _b64(text: str) -> str | None:
        try:
            return base64.b64decode(text.strip(), validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return None

    def _sasl_plain(self, text: str) -> None:
        decoded = "" if text.strip() == "=" else self._b64(text)
        parts = decoded.split("\0") if decoded is not None else []
        if len(parts) != 3:
            self.reply("501 5.5.2 Cannot decode the AUTH PLAIN response")
            return
        self._sasl_done("PLAIN", parts[1], parts[2])

    def _sasl_login(self, text: str) -> None:
        decoded = self._b64(text)
        if decoded is None:
            self.reply("501 5.5.2 Cannot decode the AUTH LOGIN response")
            return
        self.sasl_parts.append(decoded)
        if len(self.sasl_parts) == 1:
            self.reply("334 UGFzc3dvcmQ6")
            self.sasl = self._sasl_login
            return
        self._sasl_done("LOGIN", self.sasl_parts[0], self.sasl_parts[1])

    def _sasl_done(self, mech: str, user: str, password: str) -> None:
        self.peer.auths.append((self.number, mech, user, password, self.tls))
        users = self.script.get("users", {})
        good = user in users and users[user] == password
        r = self.perform("AUTH", "235 2.7.0 Authentication successful" if good
                         else "535 5.7.8 Authentication credentials invalid")
        if r and r.startswith("235"):
            self.authenticated = user

    def do_MAIL(self, arg: str, line: str) -> None:
        if self.helo is None:
            self.reply("503 5.5.1 Send HELO/EHLO first")
            return
        if self.script.get("auth_required") and self.authenticated is None:
            self.reply("530 5.7.0 Authentication required")
            return
        if self.tx is not None:
            self.reply("503 5.5.1 Sender already specified")
            return
        m = _ADDR.match(arg)
        if not m or not arg.upper().startswith("FROM:"):
            self.reply("501 5.5.2 Syntax: MAIL FROM:<address>")
            return
        params = _params(arg)
        if "SMTPUTF8" in params and not self.has("SMTPUTF8"):
            self.violation("SMTPUTF8 without the extension")
        if not line.isascii() and "SMTPUTF8" not in params:
            self.violation("non-ASCII MAIL without SMTPUTF8")
        body = (params.get("BODY") or "").upper() or None
        if body == "8BITMIME" and not self.has("8BITMIME"):
            self.violation("BODY=8BITMIME without the extension")
        if body == "BINARYMIME" and not self.has("BINARYMIME"):
            self.violation("BODY=BINARYMIME without the extension")
        for key in ("RET", "ENVID"):
            if key in params and not self.has("DSN"):
                self.violation(f"{key} without DSN")
        if "SIZE" in params and not self.has("SIZE"):
            self.violation("SIZE without the extension")
        size = params.get("SIZE")
        default = "250 2.1.0 Ok"
        if self.ext_size and size and size.isdigit() and int(size) > self.ext_size:
            default = "552 5.3.4 Message size exceeds fixed maximum message size"
        r = self.perform("MAIL", default)
        tx = Transaction(self.number, self.helo, self.tls, line, auth=self.authenticated)
        self.peer.transactions.append(tx)
        if r and r.startswith("2"):
            self.tx = tx
            self.body_type = body
            self.utf8 = "SMTPUTF8" in params

    def do_RCPT(self, arg: str, line: str) -> None:
        if self.tx is None:
            self.reply("503 5.5.1 Need MAIL command")
            return
        m = _ADDR.match(arg)
        if not m or not arg.upper().startswith("TO:"):
            self.reply("501 5.5.2 Syntax: RCPT TO:<address>")
            return
        if not line.isascii() and not self.utf8:
            self.violation("non-ASCII RCPT without SMTPUTF8")
        params = _params(arg)
        for key in ("NOTIFY", "ORCPT"):
            if key in params and not self.has("DSN"):
                self.violation(f"{key} without DSN")
        self.tx.rcpts.append(line)
        addr = m.group(1)
        per = {k.lower(): v for k, v in self.script.get("rcpt", {}).items()}
        step_action = self.action("RCPT")
        action = per.get(addr.lower(), step_action)
        limit = self.script.get("max_rcpts")
        if limit and len(self.tx.accepted) >= limit:
            action = "452 4.5.3 Error: too many recipients"
        # (An explicit action: perform() must not count this RCPT a second time.)
        r = self.perform("RCPT", "250 2.1.5 Ok", action=action or "250 2.1.5 Ok")
        if r and r.startswith("2"):
            self.tx.accepted.append(addr)

    def do_DATA(self, arg: str, line: str) -> None:
        if self.tx is None:
            self.reply("503 5.5.1 Need MAIL command")
            return
        if not self.tx.accepted:
            self.reply("554 5.5.1 No valid recipients")
            return
        if self.body_type == "BINARYMIME":
            self.reply("503 5.5.1 BINARYMIME requires BDAT")
            return
        r = self.perform("DATA", "354 End data with <CR><LF>.<CR><LF>")
        if self.buf:
            self.violation("content sent before the 354 reply")
        if r and r.startswith("354"):
            self.mode = "data"
            self.tx.method = "DATA"
            self.data_buf = bytearray(b"\r\n")
            self.data_scan = 0

    def read_data(self) -> None:
        buf = self.data_buf
        buf += self.buf
        self.buf = b""
        i = buf.find(b"\r\n.\r\n", self.data_scan)
        if i < 0:
            self.data_scan = max(0, len(buf) - 4)
            return
        self.buf = bytes(buf[i + 5:])
        raw = bytes(buf[2:i + 2])
        self.data_buf = bytearray()
        self.mode = "cmd"
        self.end_of_content(raw, unstuff(raw))

    def do_BDAT(self, arg: str, line: str) -> None:
        m = _BDAT.fullmatch(line)
        if not m:
            self.reply("501 5.5.4 Syntax: BDAT size [LAST]")
            return
        self.bdat_left = int(m.group(1))
        self.bdat_last = bool(m.group(2))
        self.bdat_refused = False
        if not self.has("CHUNKING"):
            self.violation("BDAT without CHUNKING")
            self.bdat_refused = True
        elif self.tx is None or not self.tx.accepted:
            self.bdat_refused = True
        else:
            if self.tx.method != "BDAT":
                self.tx.method = "BDAT"
                self.data_buf = bytearray()
            self.tx.chunks.append(self.bdat_left)
        self.mode = "bdat"
        if self.bdat_left == 0:
            self.read_bdat()

    def read_bdat(self) -> None:
        take = min(self.bdat_left, len(self.buf))
        if take and not self.bdat_refused:
            self.data_buf += self.buf[:take]
        self.buf = self.buf[take:]
        self.bdat_left -= take
        if self.bdat_left:
            return
        self.mode = "cmd"
        if self.bdat_refused:
            self.reply("503 5.5.1 No transaction for BDAT" if self.has("CHUNKING")
                       else "500 5.5.1 Command unrecognized")
            if self.bdat_last:
                self.tx = None
            return
        if not self.bdat_last:
            action = self.action("BDAT")
            self.perform("BDAT", f"250 2.0.0 {len(self.data_buf)} octets received", action)
            return
        raw = bytes(self.data_buf)
        self.data_buf = bytearray()
        self.end_of_content(raw, raw)

    def end_of_content(self, raw: bytes, data: bytes) -> None:
        tx = self.tx
        assert tx is not None
        tx.raw = raw
        tx.data = data
        tx.complete = True
        binary = self.body_type == "BINARYMIME"
        if not binary:
            if bare_newline(raw):
                self.violation("bare CR or LF in message content")
            if raw and max(map(len, raw.split(b"\r\n"))) > 998:
                self.violation("content line over 1000 octets")
            if not data.isascii() and not (self.body_type == "8BITMIME" or self.utf8):
                self.violation("8-bit content without BODY=8BITMIME")
            if data and not data.endswith(b"\r\n"):
                self.violation("content does not end with CRLF")
        self.tx = None
        self.peer.number += 1
        default = self.script.get("data_reply", "250 2.0.0 Ok: queued as {id}")
        if self.ext_size and len(data) > self.ext_size:
            default = "552 5.3.4 Message too big"
        tx.reply = self.perform("DATA_END", default.replace("{id}", f"Q{self.peer.number}"))
        self.peer._finished(tx)

    def do_RSET(self, arg: str, line: str) -> None:
        r = self.perform("RSET", "250 2.0.0 Ok")
        if r:
            self.tx = None

    def do_NOOP(self, arg: str, line: str) -> None:
        self.perform("NOOP", "250 2.0.0 Ok")

    def do_QUIT(self, arg: str, line: str) -> None:
        r = self.perform("QUIT", "221 2.0.0 Bye")
        if r:
            self.flush()
            self.mode = "closed"
            self.transport.loseConnection()


class ScriptedPeer(protocol.Factory):
    """The listening side; one PeerConnection per client connection."""

    def __init__(self, script: dict[str, Any] | None = None, *, reactor: Any = None,
                 on_transaction: Callable[[Transaction], None] | None = None,
                 tls_options: Any = None):
        if reactor is None:
            from twisted.internet import reactor as _r
            reactor = _r
        self.reactor = reactor
        self.script = script or {}
        for key, value in self.script.get("actions", {}).items():
            m = _ACTION_KEY.fullmatch(key)
            if m is None or m.group(1) not in _STEPS:
                raise ValueError(f"unknown step in script: {key!r}")
            if (value not in ("drop", "stall") and not value.startswith("raw:")
                    and not re.match(r"[2-5]\d\d( |$)", value)):
                raise ValueError(f"bad action for {key!r}: {value!r}")
        self.connections = 0
        self.transactions: list[Transaction] = []
        self.violations: list[str] = []
        self.commands: list[tuple[int, bytes]] = []
        self.number = 0
        self.port: int | None = None
        self._listener: Any = None
        self._open: set[PeerConnection] = set()
        self._lost: list[defer.Deferred] = []
        self._stall_waiters: list[defer.Deferred] = []
        self.stalls = 0
        self.pipelined = 0               # commands that arrived with more input behind them
        self._on_transaction = on_transaction
        self.auths: list[tuple[int, str, str, str, bool]] = []  # (conn, mech, user, password, tls)
        if tls_options is None and self.script.get("certificate"):
            tls_options = load_tls_options(self.script["certificate"],
                                           self.script["private_key"])
        self.tls_options = tls_options   # for STARTTLS; None: the self-signed peer.test one

    def buildProtocol(self, addr: Any) -> PeerConnection:
        p = PeerConnection(self, self.connections + 1)
        p.factory = self
        return p

    def start(self, interface: str = "127.0.0.1", port: int = 0) -> int:
        self._listener = self.reactor.listenTCP(port, self, interface=interface)
        self.port = self._listener.getHost().port
        return self.port

    def stop(self) -> defer.Deferred:
        """Stop listening and close every connection; fires when all are gone."""
        ds = []
        if self._listener is not None:
            ds.append(defer.maybeDeferred(self._listener.stopListening))
            self._listener = None
        if self._open:
            d: defer.Deferred = defer.Deferred()
            self._lost.append(d)
            ds.append(d)
            for conn in list(self._open):
                conn.transport.abortConnection()
        return defer.gatherResults(ds).addCallback(lambda _: None)

    def hop(self, host: str = "peer.test") -> Any:
        from mta.smtp.client import NextHop
        return NextHop(host=host, address="127.0.0.1", port=self.port)

    @property
    def complete(self) -> list[Transaction]:
        """Transactions whose content arrived in full."""
        return [t for t in self.transactions if t.complete]

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def when_stalled(self) -> defer.Deferred:
        """Fires (with the connection number) the next time a connection stalls."""
        d: defer.Deferred = defer.Deferred()
        self._stall_waiters.append(d)
        return d

    def _stalled(self, conn: PeerConnection) -> None:
        self.stalls += 1
        waiters, self._stall_waiters = self._stall_waiters, []
        for d in waiters:
            d.callback(conn.number)

    def _finished(self, tx: Transaction) -> None:
        if self._on_transaction is not None:
            self._on_transaction(tx)


# ---------------------------------------------------------------------------
# As a separate process
# ---------------------------------------------------------------------------

class PeerProcess:
    """Runs ``tests/peers.py`` in a child process (blocking; for end-to-end tests).

    ::

        with PeerProcess({"rcpt": {...}}, record=tmp_path / "rec.jsonl") as peer:
            ... deliver to 127.0.0.1:peer.port ...
            peer.transactions()
    """

    def __init__(self, script: dict[str, Any] | None = None, *, record: str | os.PathLike,
                 port: int = 0, python: str = sys.executable):
        self.script = script or {}
        self.record = Path(record)
        self.port_wanted = port
        self.python = python
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    def start(self) -> int:
        self.proc = subprocess.Popen(
            [self.python, str(Path(__file__).resolve()), "--script", json.dumps(self.script),
             "--record", str(self.record), "--port", str(self.port_wanted)],
            stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("PORT "):
            self.stop()
            raise RuntimeError(f"peer did not start: {line!r}")
        self.port = int(line.split()[1])
        return self.port

    def transactions(self) -> list[Transaction]:
        if not self.record.exists():
            return []
        out = []
        for line in self.record.read_text().splitlines():
            d = json.loads(line)
            if d.get("kind") == "transaction":
                out.append(Transaction.from_json(d["transaction"]))
        return out

    def violations(self) -> list[str]:
        if not self.record.exists():
            return []
        return [json.loads(x)["violation"] for x in self.record.read_text().splitlines()
                if json.loads(x).get("kind") == "violation"]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None

    def __enter__(self) -> "PeerProcess":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="scripted SMTP peer for tests")
    ap.add_argument("--script", default="{}", help="JSON script (see the module docstring)")
    ap.add_argument("--port-file", help="write the listening port here")
    ap.add_argument("--record", help="append JSON lines: transactions and violations")
    ap.add_argument("--interface", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args(argv)
    script = json.loads(args.script)

    from twisted.internet import reactor
    record = open(args.record, "a", buffering=1) if args.record else None

    def on_tx(tx: Transaction) -> None:
        if record is not None:
            record.write(json.dumps({"kind": "transaction", "transaction": tx.to_json()}) + "\n")

    peer = ScriptedPeer(script, reactor=reactor, on_transaction=on_tx)

    class _Violations(list):
        def append(self, item: str) -> None:  # type: ignore[override]
            super().append(item)
            if record is not None:
                record.write(json.dumps({"kind": "violation", "violation": item}) + "\n")
    peer.violations = _Violations()

    def shutdown(*_: Any) -> None:
        reactor.callFromThread(reactor.stop)
    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    port = peer.start(args.interface, args.port)
    if args.port_file:
        tmp = args.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{port}\n")
        os.replace(tmp, args.port_file)
    print(f"PORT {port}", flush=True)
    reactor.run(installSignalHandlers=False)
    if record is not None:
        record.close()


if __name__ == "__main__":
    main()
