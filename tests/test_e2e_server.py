"""End-to-end tests of the inbound server: the real ``twistd mta`` on a loopback
port with a temporary SQLite spool (see conftest.py).  Python's smtplib and raw
sockets send; the tests read the spool with SQL and check envelope rows and
body bytes.
"""
from __future__ import annotations

import os
import re
import smtplib
import signal
import socket
import sqlite3
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import free_port, subprocess_env, twistd_command, wait_for
from mta.spool.schema import SCHEMA_VERSION

SMUGGLING = [b"\n.\n", b"\r\n.\r", b"\n.\r\n", b"\r.\r", b"\r.\r\n", b"\r\n.\n", b"\n..\n"]


# --------------------------------------------------------------------------- helpers

class Raw:
    """A raw SMTP client: send exact bytes, read complete replies."""

    def __init__(self, daemon, *, greet: bool = True, timeout: float = 10.0):
        self.sock = socket.create_connection((daemon.host, daemon.port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        self.buf = b""
        if greet:
            code, _ = self.reply()
            assert code == 220

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def _line(self) -> bytes:
        deadline = time.monotonic() + self.timeout
        while b"\r\n" not in self.buf:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed; unparsed: {self.buf!r}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def reply(self) -> tuple[int, list[bytes]]:
        """One reply: (code, [text of each line])."""
        lines = []
        while True:
            line = self._line()
            assert re.fullmatch(rb"\d{3}[ -].*", line, re.S), line
            lines.append(line)
            if line[3:4] == b" ":
                codes = {l[:3] for l in lines}
                assert len(codes) == 1, lines
                return int(line[:3]), [l[4:] for l in lines]

    def replies(self, n: int) -> list[tuple[int, bytes]]:
        out = []
        for _ in range(n):
            code, lines = self.reply()
            out.append((code, lines[-1]))
        return out

    def cmd(self, line: str | bytes) -> tuple[int, bytes]:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        code, lines = self.reply()
        return code, lines[-1]

    def ehlo(self, name: str = "raw.e2e.test") -> None:
        code, _ = self.cmd(f"EHLO {name}")
        assert code == 250

    def wait_closed(self) -> bytes:
        """Read until the server closes the connection; return what came."""
        deadline = time.monotonic() + self.timeout
        rest = self.buf
        self.buf = b""
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return rest
            if not chunk:
                return rest
            rest += chunk
        raise AssertionError(f"server did not close the connection; got {rest!r}")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Raw":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def queue_id_of(code: int, text: bytes) -> str:
    assert code == 250, (code, text)
    m = re.search(rb"queued as ([0-9A-Z]+)$", text)
    assert m, text
    return m.group(1).decode()


def message(mta, qid: str) -> sqlite3.Row:
    rows = mta.rows("SELECT * FROM messages WHERE queue_id = ?", (qid,))
    assert len(rows) == 1, qid
    return rows[0]


def content(mta, qid: str) -> tuple[bytes, bytes]:
    rows = mta.rows("SELECT headers, body FROM contents WHERE queue_id = ?", (qid,))
    assert len(rows) == 1, qid
    return bytes(rows[0]["headers"]), bytes(rows[0]["body"])


def recipients(mta, qid: str) -> list[sqlite3.Row]:
    return mta.rows("SELECT * FROM recipients WHERE queue_id = ? ORDER BY id", (qid,))


def stored_message(mta, qid: str) -> bytes:
    """The whole stored message, our Received line removed."""
    headers, body = content(mta, qid)
    return strip_received(headers) + body


def strip_received(headers: bytes) -> bytes:
    assert headers.startswith(b"Received: "), headers[:200]
    m = re.match(rb"Received: [^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*", headers)
    assert m, headers[:300]
    return headers[m.end():]


def smtp(mta, helo: str = "client.e2e.test") -> smtplib.SMTP:
    s = smtplib.SMTP(mta.host, mta.port, local_hostname=helo, timeout=10)
    s.ehlo(helo)
    return s


def send_with_smtplib(mta, sender: str, rcpts: list[str], data: bytes,
                      mail_options=(), rcpt_options=()) -> str:
    """One transaction with smtplib; returns the queue id of the 250 reply."""
    with smtp(mta) as s:
        code, text = s.mail(sender, list(mail_options))
        assert code == 250, text
        for r in rcpts:
            code, text = s.rcpt(r, list(rcpt_options))
            assert code == 250, (r, text)
        code, text = s.data(data)
        return queue_id_of(code, text)


def assert_spool_empty(mta) -> None:
    assert mta.count("messages") == 0
    assert mta.count("contents") == 0
    assert mta.count("recipients") == 0


def settle(mta) -> None:
    """A complete session after something that must leave nothing behind: by
    the time it has stored a message and said 250, the server has long
    handled whatever came before on other connections."""
    qid = send_with_smtplib(mta, "settle@e2e.test", ["settle@e2e.test"],
                            b"Subject: settle\r\n\r\nsettle\r\n")
    return qid


# --------------------------------------------------------------------------- envelope and content

def test_several_recipients_one_body(mta):
    data = (b"From: Sender <sender@origin.test>\r\n"
            b"To: a@dest.test\r\n"
            b"Subject: several recipients\r\n"
            b"Message-ID: <several@origin.test>\r\n"
            b"\r\n"
            b"first line\r\n"
            b".a line that starts with a dot\r\n"
            b"..two dots\r\n"
            b".\r\n."
            b"\r\n"
            b"\r\n"
            b"last line\r\n")
    rcpts = ["a@dest.test", "b@dest.test", "C.Person@other.test", "postmaster"]
    with smtp(mta, "client.e2e.test") as s:
        assert s.mail("sender@origin.test", ["BODY=8BITMIME", "RET=HDRS",
                                             "ENVID=env+2Bid-1", f"SIZE={len(data)}"])[0] == 250
        for i, r in enumerate(rcpts):
            opts = ["NOTIFY=SUCCESS,FAILURE", f"ORCPT=rfc822;{r}"] if i % 2 == 0 else []
            assert s.rcpt(r, opts)[0] == 250
        qid = queue_id_of(*s.data(data))

    m = message(mta, qid)
    assert m["sender"] == "sender@origin.test"
    assert m["body_type"] == "8BITMIME"
    assert m["smtputf8"] == 0
    assert m["ret"] == "HDRS"
    assert m["envid"] == "env+2Bid-1"
    assert m["size_param"] == len(data)
    assert m["auth"] is None
    assert m["client_address"] == "127.0.0.1"
    assert m["helo"] == "client.e2e.test"
    assert m["protocol"] == "ESMTP"
    assert abs(m["arrival"] - time.time()) < 60

    headers, body = content(mta, qid)
    assert mta.count("contents") == 1
    assert strip_received(headers) + body == data
    assert body == data[data.index(b"\r\n\r\n") + 4:]
    assert m["size"] == len(headers) + len(body)
    received = headers[:len(headers) - len(strip_received(headers))].decode()
    assert re.match(
        r"Received: from client\.e2e\.test \(\[127\.0\.0\.1\]\)\r\n"
        rf"\tby mx\.e2e\.test \(mta\) with ESMTP id {qid};\r\n"
        r"\t\w{3}, \d{1,2} \w{3} \d{4} \d\d:\d\d:\d\d [+-]\d{4}\r\n$", received), received
    for line in received.split("\r\n"):
        assert len(line) <= 78

    rows = recipients(mta, qid)
    assert [r["address"] for r in rows] == rcpts
    assert [r["notify"] for r in rows] == ["SUCCESS,FAILURE", None, "SUCCESS,FAILURE", None]
    assert [r["orcpt"] for r in rows] == ["rfc822;a@dest.test", None,
                                          "rfc822;C.Person@other.test", None]
    assert {r["state"] for r in rows} == {"queued"}
    assert {r["attempts"] for r in rows} == {0}
    assert all(r["last_reply"] is None for r in rows)
    assert all(abs(r["next_attempt"] - m["arrival"]) < 1 for r in rows)
    assert mta.count("messages") == 1


def test_single_recipient_received_for_and_helo_protocol(mta):
    data = b"Subject: helo\r\n\r\nbody\r\n"
    with smtplib.SMTP(mta.host, mta.port, timeout=10) as s:
        assert s.helo("old.e2e.test")[0] == 250
        assert s.mail("<>")[0] == 250
        assert s.rcpt("only@dest.test")[0] == 250
        qid = queue_id_of(*s.data(data))
    m = message(mta, qid)
    assert m["sender"] == ""
    assert m["protocol"] == "SMTP"
    assert m["helo"] == "old.e2e.test"
    assert m["body_type"] is None and m["ret"] is None and m["envid"] is None
    headers, body = content(mta, qid)
    assert headers.startswith(b"Received: from old.e2e.test ([127.0.0.1])\r\n"
                              b"\tby mx.e2e.test (mta) with SMTP id " + qid.encode() + b"\r\n"
                              b"\tfor <only@dest.test>;\r\n\t")
    assert strip_received(headers) + body == data


def test_eight_bit_body(mta):
    data = (b"Subject: 8bit\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n\r\n"
            b"caf\xc3\xa9 na\xc3\xafve \xe2\x82\xac\r\n"
            b"\x80\x81\xfe\xff raw high bytes\r\n"
            b"\x01\x02\x1b control bytes\r\n")
    qid = send_with_smtplib(mta, "s@origin.test", ["r@dest.test"], data,
                            mail_options=["BODY=8BITMIME"])
    assert stored_message(mta, qid) == data
    assert message(mta, qid)["body_type"] == "8BITMIME"


def test_smtputf8_addresses(mta):
    sender = "jörg@exämple.test"
    rcpts = ["用户@例子.test", "ñandú@dest.test"]
    data = "Subject: ünïcode\r\nFrom: jörg@exämple.test\r\n\r\nGrüße\r\n".encode()
    with smtp(mta) as s:
        assert s.has_extn("smtputf8")
        assert s.mail(sender, ["SMTPUTF8", "BODY=8BITMIME"])[0] == 250
        for r in rcpts:
            assert s.rcpt(r, ["ORCPT=utf-8;" + r])[0] == 250
        qid = queue_id_of(*s.data(data))
    m = message(mta, qid)
    assert m["sender"] == sender
    assert m["smtputf8"] == 1
    assert m["protocol"] == "UTF8SMTP"
    assert [r["address"] for r in recipients(mta, qid)] == rcpts
    assert [r["orcpt"] for r in recipients(mta, qid)] == ["utf-8;" + r for r in rcpts]
    headers, body = content(mta, qid)
    assert b" with UTF8SMTP id " + qid.encode() in headers
    assert strip_received(headers) + body == data


def test_non_ascii_address_without_smtputf8_is_refused(mta):
    with Raw(mta) as c:
        c.ehlo()
        code, text = c.cmd("MAIL FROM:<jörg@exämple.test>".encode())
        assert code == 553 and text.startswith(b"5.6.7"), text
        assert c.cmd("MAIL FROM:<a@origin.test>")[0] == 250
        code, text = c.cmd("RCPT TO:<用户@例子.test>".encode())
        assert code == 553 and text.startswith(b"5.6.7"), text
        assert c.cmd("QUIT")[0] == 221
    settle(mta)
    assert mta.count() == 1


def test_message_without_headers_and_empty_message(mta):
    with Raw(mta) as c:
        c.ehlo()
        for data in (b"no header here, just text\r\n", b""):
            assert c.cmd("MAIL FROM:<a@origin.test>")[0] == 250
            assert c.cmd("RCPT TO:<b@dest.test>")[0] == 250
            assert c.cmd("DATA")[0] == 354
            c.send(data + b".\r\n")
            qid = queue_id_of(*c.replies(1)[0])
            headers, body = content(mta, qid)
            assert strip_received(headers) == b""
            assert body == data


# --------------------------------------------------------------------------- pipelining

def test_pipelining_two_messages_in_two_bursts(mta):
    body1 = b"Subject: one\r\n\r\nfirst message\r\n..dot\r\n"
    body2 = b"Subject: two\r\n\r\nsecond message\r\n"
    with Raw(mta) as c:
        c.ehlo()
        c.send(b"MAIL FROM:<a@origin.test>\r\nRCPT TO:<b@dest.test>\r\n"
               b"RCPT TO:<c@dest.test>\r\nDATA\r\n")
        got = c.replies(4)
        assert [code for code, _ in got] == [250, 250, 250, 354]
        c.send(body1 + b".\r\n"
               b"MAIL FROM:<d@origin.test>\r\nRCPT TO:<e@dest.test>\r\nDATA\r\n"
               + body2 + b".\r\nQUIT\r\n")
        got = c.replies(6)
        assert [code for code, _ in got] == [250, 250, 250, 354, 250, 221], got
        qid1 = queue_id_of(*got[0])
        qid2 = queue_id_of(*got[4])
        assert c.wait_closed() == b""
    assert qid1 != qid2
    assert mta.count() == 2
    assert stored_message(mta, qid1) == body1.replace(b"\r\n..", b"\r\n.")
    assert stored_message(mta, qid2) == body2
    assert [r["address"] for r in recipients(mta, qid1)] == ["b@dest.test", "c@dest.test"]
    assert [r["address"] for r in recipients(mta, qid2)] == ["e@dest.test"]
    assert message(mta, qid2)["sender"] == "d@origin.test"


def test_pipelining_whole_session_in_one_send(mta):
    """Everything, EHLO to QUIT, in one write; errors in the middle of the burst
    do not upset the order of the replies."""
    with Raw(mta) as c:
        c.send(b"EHLO burst.e2e.test\r\n"
               b"MAIL FROM:<a@origin.test>\r\nRCPT TO:<bad address>\r\nRCPT TO:<b@dest.test>\r\n"
               b"NOOP\r\nDATA\r\nSubject: burst\r\n\r\nhello\r\n.\r\n"
               b"RSET\r\nMAIL FROM:<c@origin.test>\r\nRCPT TO:<d@dest.test>\r\n"
               b"BDAT 7 LAST\r\nchunk\r\n"
               b"VRFY x\r\nQUIT\r\n")
        got = c.replies(13)
        assert [code for code, _ in got] == [250, 250, 501, 250, 250, 354, 250,
                                             250, 250, 250, 250, 252, 221], got
        assert c.wait_closed() == b""
    assert mta.count() == 2


def test_pipelined_commands_split_at_every_byte(mta):
    """The end-of-data marker and the commands split across many TCP segments."""
    data = b"Subject: trickle\r\n\r\nline\r\n..stuffed\r\n"
    wire = (b"MAIL FROM:<a@origin.test>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n" + data
            + b".\r\nQUIT\r\n")
    with Raw(mta) as c:
        c.ehlo()
        for i in range(len(wire)):
            c.send(wire[i:i + 1])
        got = c.replies(5)
        assert [code for code, _ in got] == [250, 250, 354, 250, 221]
        qid = queue_id_of(*got[3])
    assert stored_message(mta, qid) == data.replace(b"\r\n..", b"\r\n.")


# --------------------------------------------------------------------------- BDAT

def test_bdat_chunks(mta):
    part1 = b"Subject: chunks\r\n\r\nfirst chunk\r\n.no unstuffing in BDAT\r\n"
    part2 = b"second\r\n.\r\nthe line above is just a dot\r\n"
    part3 = b"third and last\r\n"
    with Raw(mta) as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<a@origin.test> BODY=8BITMIME")[0] == 250
        assert c.cmd("RCPT TO:<b@dest.test>")[0] == 250
        c.send(f"BDAT {len(part1)}\r\n".encode() + part1)
        code, text = c.replies(1)[0]
        assert code == 250 and text.startswith(b"2.0.0"), text
        c.send(f"BDAT {len(part2)}\r\n".encode() + part2)
        assert c.replies(1)[0][0] == 250
        c.send(f"BDAT {len(part3)} LAST\r\n".encode() + part3)
        qid = queue_id_of(*c.replies(1)[0])

        # BDAT 0 LAST ends a transaction whose content came in earlier chunks.
        assert c.cmd("MAIL FROM:<c@origin.test>")[0] == 250
        assert c.cmd("RCPT TO:<d@dest.test>")[0] == 250
        c.send(b"BDAT 10\r\n0123456789BDAT 5\r\nabc\r\nBDAT 0 LAST\r\n")
        got = c.replies(3)
        assert [code for code, _ in got[:2]] == [250, 250]
        qid2 = queue_id_of(*got[2])

        # DATA is not allowed after BDAT in one transaction.
        assert c.cmd("MAIL FROM:<e@origin.test>")[0] == 250
        assert c.cmd("RCPT TO:<f@dest.test>")[0] == 250
        c.send(b"BDAT 3\r\nabc")
        assert c.replies(1)[0][0] == 250
        assert c.cmd("DATA")[0] == 503
        assert c.cmd("RSET")[0] == 250
        assert c.cmd("QUIT")[0] == 221
    assert stored_message(mta, qid) == part1 + part2 + part3
    assert message(mta, qid)["body_type"] == "8BITMIME"
    headers, body = content(mta, qid2)
    assert strip_received(headers) + body == b"0123456789abc\r\n"
    assert mta.count() == 2


def test_bdat_pipelined_with_commands(mta):
    chunk = b"Subject: piped bdat\r\n\r\nbody\r\n"
    with Raw(mta) as c:
        c.ehlo()
        c.send(b"MAIL FROM:<a@origin.test>\r\nRCPT TO:<b@dest.test>\r\nRCPT TO:<c@dest.test>\r\n"
               + f"BDAT {len(chunk)} LAST\r\n".encode() + chunk
               + b"MAIL FROM:<d@origin.test>\r\nRCPT TO:<e@dest.test>\r\n"
               + f"BDAT {len(chunk)} LAST\r\n".encode() + chunk + b"QUIT\r\n")
        got = c.replies(8)
        assert [code for code, _ in got] == [250, 250, 250, 250, 250, 250, 250, 221], got
        qids = [queue_id_of(*got[3]), queue_id_of(*got[6])]
    for qid in qids:
        assert stored_message(mta, qid) == chunk
    assert len(recipients(mta, qids[0])) == 2


def test_bdat_binarymime_keeps_bytes(mta):
    payload = b"Subject: bin\r\n\r\n\x00\x01bare\nLF and bare\rCR\r\n.\r\n\xff" * 3
    with Raw(mta) as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<a@origin.test> BODY=BINARYMIME")[0] == 250
        assert c.cmd("RCPT TO:<b@dest.test>")[0] == 250
        code, _ = c.cmd("DATA")
        assert code == 503  # BINARYMIME needs BDAT
        c.send(f"BDAT {len(payload)} LAST\r\n".encode() + payload)
        qid = queue_id_of(*c.replies(1)[0])
    assert stored_message(mta, qid) == payload
    assert message(mta, qid)["body_type"] == "BINARYMIME"


def test_bdat_without_recipients_keeps_in_step(mta):
    with Raw(mta) as c:
        c.ehlo()
        c.send(b"BDAT 14\r\nMAIL FROM:<>\r\n")  # the chunk is data, not a command
        code, _ = c.replies(1)[0]
        assert code == 503
        assert c.cmd("NOOP")[0] == 250
        assert c.cmd("MAIL FROM:<a@origin.test>")[0] == 250
        c.send(b"BDAT 12 LAST\r\nRCPT TO:<>\r\n")
        code, _ = c.replies(1)[0]
        assert code in (503, 554)
        assert c.cmd("NOOP")[0] == 250
    settle(mta)
    assert mta.count() == 1


# --------------------------------------------------------------------------- DATA hygiene

@pytest.mark.parametrize("bad", [b"line\nmore", b"line\rmore", b"end with bare LF\n"],
                         ids=["bare-LF", "bare-CR", "trailing-bare-LF"])
def test_bare_newline_in_data_is_refused(mta, bad):
    with Raw(mta) as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<a@origin.test>")[0] == 250
        assert c.cmd("RCPT TO:<b@dest.test>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: bare\r\n\r\n" + bad + b"\r\n.\r\n")
        code, text = c.replies(1)[0]
        assert 500 <= code < 600, text
        # The session goes on, in step.
        assert c.cmd("MAIL FROM:<a@origin.test>")[0] == 250
        assert c.cmd("RSET")[0] == 250
    assert_spool_empty(mta)


@pytest.mark.parametrize("pattern", SMUGGLING, ids=[repr(p)[2:-1] for p in SMUGGLING])
def test_smuggling_does_not_end_data(mta, pattern):
    smuggled = (b"MAIL FROM:<admin@bank.test>\r\nRCPT TO:<victim@dest.test>\r\nDATA\r\n"
                b"From: admin@bank.test\r\nSubject: smuggled\r\n\r\nsend money\r\n")
    with Raw(mta) as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<a@origin.test>")[0] == 250
        assert c.cmd("RCPT TO:<b@dest.test>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: innocent\r\n\r\nhello" + pattern + smuggled + b".\r\nQUIT\r\n")
        code, text = c.replies(1)[0]
        assert 500 <= code < 600, text   # bare CR/LF: refused, not stored
        assert c.replies(1)[0][0] == 221  # and no 250/354 for the smuggled commands
        assert c.wait_closed() == b""
    assert_spool_empty(mta)


@pytest.mark.mta_config(server={"bare_newlines": "normalize"})
@pytest.mark.parametrize("pattern", SMUGGLING, ids=[repr(p)[2:-1] for p in SMUGGLING])
def test_smuggling_with_normalize_is_one_message(mta, pattern):
    smuggled = (b"MAIL FROM:<admin@bank.test>\r\nRCPT TO:<victim@dest.test>\r\nDATA\r\n"
                b"Subject: smuggled\r\n\r\nsend money\r\n")
    with Raw(mta) as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<a@origin.test>")[0] == 250
        assert c.cmd("RCPT TO:<b@dest.test>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: innocent\r\n\r\nhello" + pattern + smuggled + b".\r\nQUIT\r\n")
        got = c.replies(2)
        assert [code for code, _ in got] == [250, 221], got
        qid = queue_id_of(*got[0])
    assert mta.count() == 1
    assert [r["address"] for r in recipients(mta, qid)] == ["b@dest.test"]
    headers, body = content(mta, qid)
    assert body.count(b"\r") == body.count(b"\n") == body.count(b"\r\n")  # no bare CR or LF left
    assert b"send money" in body


def test_long_text_line_is_refused_after_the_dot(mta):
    ok_line = b"x" * 998
    with Raw(mta) as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<a@origin.test>")[0] == 250
        assert c.cmd("RCPT TO:<b@dest.test>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: long\r\n\r\n" + b"y" * 999 + b"\r\nafter\r\n.\r\n")
        code, text = c.replies(1)[0]
        assert code == 554 and text.startswith(b"5.6.0 ") and b"1000 octets" in text, text
        # in step: the next transaction works, and 998 octets + CRLF is fine
        assert c.cmd("MAIL FROM:<a@origin.test>")[0] == 250
        assert c.cmd("RCPT TO:<b@dest.test>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: long\r\n\r\n" + ok_line + b"\r\n.\r\n")
        qid = queue_id_of(*c.replies(1)[0])
        # BDAT: the same refusal, after LAST.
        assert c.cmd("MAIL FROM:<a@origin.test>")[0] == 250
        assert c.cmd("RCPT TO:<b@dest.test>")[0] == 250
        long = b"Subject: long\r\n\r\n" + b"y" * 999 + b"\r\n"
        c.send(b"BDAT %d\r\n" % len(long) + long + b"BDAT 7 LAST\r\nafter\r\n")
        got = c.replies(2)
        assert got[0][0] == 250 and got[1][0] == 554 and got[1][1].startswith(b"5.6.0 "), got
    assert mta.count() == 1
    assert content(mta, qid)[1] == ok_line + b"\r\n"


def test_long_command_line(mta):
    with Raw(mta) as c:
        c.ehlo()
        code, text = c.cmd(b"NOOP " + b"x" * 600)
        assert code == 500 and text.startswith(b"5.5.2"), text
        # A huge line arriving in many pieces: one reply when it ends, still in step.
        for _ in range(20):
            c.send(b"y" * 10000)
        c.send(b"\r\n")
        code, text = c.replies(1)[0]
        assert code == 500 and text.startswith(b"5.5.2"), text
        assert c.cmd("NOOP")[0] == 250
        # 512 octets including CRLF is not too long (the address is refused for
        # its over-long local part, not the line for its length)
        line = b"MAIL FROM:<" + b"a" * (512 - 2 - len(b"MAIL FROM:<@origin.test>")) + b"@origin.test>"
        assert len(line) + 2 == 512
        code, text = c.cmd(line)
        assert code == 501, text
        assert c.cmd(b"NOOP " + b"n" * 505)[0] == 250


@pytest.mark.mta_config(server={"max_message_size": 10000})
def test_message_over_max_size(mta):
    with Raw(mta) as c:
        c.ehlo()
        c.send(b"EHLO again.e2e.test\r\n")
        _, lines = c.reply()
        assert b"SIZE 10000" in lines
        # SIZE= over the limit is refused at MAIL
        code, text = c.cmd("MAIL FROM:<a@origin.test> SIZE=10001")
        assert code == 552 and text.startswith(b"5.3.4"), text
        # Too big: refused after the dot, the session stays in step.
        assert c.cmd("MAIL FROM:<a@origin.test>")[0] == 250
        assert c.cmd("RCPT TO:<b@dest.test>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        big = b"Subject: big\r\n\r\n" + (b"z" * 98 + b"\r\n") * 200
        c.send(big + b".\r\n")
        code, text = c.replies(1)[0]
        assert code == 552 and text.startswith(b"5.3.4"), text
        # Much too big (the server stops keeping the text but reads to the end).
        assert c.cmd("MAIL FROM:<a@origin.test>")[0] == 250
        assert c.cmd("RCPT TO:<b@dest.test>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        for _ in range(50):
            c.send((b"w" * 98 + b"\r\n") * 100)
        c.send(b".\r\nNOOP\r\n")
        got = c.replies(2)
        assert [code for code, _ in got] == [552, 250], got
        # BDAT over the limit: 552, chunk read to its end.
        assert c.cmd("MAIL FROM:<a@origin.test>")[0] == 250
        assert c.cmd("RCPT TO:<b@dest.test>")[0] == 250
        c.send(b"BDAT 6000\r\n" + b"b" * 6000)
        assert c.replies(1)[0][0] == 250
        c.send(b"BDAT 6000 LAST\r\n" + b"b" * 6000)
        code, text = c.replies(1)[0]
        assert code == 552 and text.startswith(b"5.3.4"), text
        # Exactly at the limit is fine.
        assert c.cmd("MAIL FROM:<a@origin.test>")[0] == 250
        assert c.cmd("RCPT TO:<b@dest.test>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        exact = b"Subject: exact\r\n\r\n" + (b"e" * 98 + b"\r\n") * 99
        exact += b"f" * (10000 - len(exact) - 2) + b"\r\n"
        assert len(exact) == 10000
        c.send(exact + b".\r\n")
        qid = queue_id_of(*c.replies(1)[0])
        assert c.cmd("QUIT")[0] == 221
    assert mta.count() == 1
    assert stored_message(mta, qid) == exact


@pytest.mark.mta_config(server={"max_message_size": 10000, "max_errors": 20})
def test_oversized_message_in_pipelined_bdat_chunks_is_one_refusal(mta):
    # 40 chunks of 1000 octets in one burst, as a pipelining client sends
    # them: 10 fit, the 11th is refused 552, the 29 after it (LAST included)
    # are read, discarded and answered 552 too -- one error, not 30: the
    # session is still open afterwards and takes the next message.
    chunk = (b"c" * 98 + b"\r\n") * 10
    with Raw(mta) as c:
        c.ehlo()
        c.send(b"MAIL FROM:<a@origin.test>\r\nRCPT TO:<b@dest.test>\r\n"
               + b"".join(b"BDAT 1000\r\n" + chunk for _ in range(39))
               + b"BDAT 1000 LAST\r\n" + chunk + b"NOOP\r\n")
        got = c.replies(43)
        assert [code for code, _ in got] == [250, 250] + [250] * 10 + [552] * 30 + [250], got
        assert all(text.startswith(b"5.3.4") for code, text in got if code == 552), got
        assert c.cmd("MAIL FROM:<a@origin.test>")[0] == 250
        assert c.cmd("RCPT TO:<b@dest.test>")[0] == 250
        c.send(b"BDAT 1000 LAST\r\n" + chunk)
        qid = queue_id_of(*c.replies(1)[0])
        assert c.cmd("QUIT")[0] == 221
    assert mta.count() == 1
    assert stored_message(mta, qid) == chunk


# --------------------------------------------------------------------------- relay policy

@pytest.mark.mta_config(policy={"relay_networks": ["10.0.0.0/8"],
                                "relay_domains": ["example.test", ".sub.example.test"]})
def test_relay_denied_for_outside_client(mta):
    with Raw(mta) as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<someone@outside.test>")[0] == 250
        code, text = c.cmd("RCPT TO:<victim@elsewhere.test>")
        assert code == 554 and text.startswith(b"5.7.1"), text
        for routed in ("<user%elsewhere.test@example.test>", "<elsewhere.test!user@example.test>",
                       '<"user@elsewhere.test"@example.test>'):
            code, text = c.cmd(f"RCPT TO:{routed}")
            assert code == 554 and text.startswith(b"5.7.1"), (routed, text)
        code, text = c.cmd("RCPT TO:<user@[10.1.2.3]>")
        assert code == 554, text
        assert c.cmd("RCPT TO:<user@example.test>")[0] == 250
        assert c.cmd("RCPT TO:<User@Example.TEST>")[0] == 250
        assert c.cmd("RCPT TO:<other@deep.sub.example.test>")[0] == 250
        assert c.cmd("RCPT TO:<@relay.test,@other.test:routed@example.test>")[0] == 250
        assert c.cmd("RCPT TO:<postmaster>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: relay\r\n\r\nhi\r\n.\r\n")
        qid = queue_id_of(*c.replies(1)[0])
        # A transaction whose only recipient was refused has nothing to send.
        assert c.cmd("MAIL FROM:<someone@outside.test>")[0] == 250
        assert c.cmd("RCPT TO:<victim@elsewhere.test>")[0] == 554
        assert c.cmd("DATA")[0] in (503, 554)
    assert mta.count() == 1
    assert [r["address"] for r in recipients(mta, qid)] == [
        "user@example.test", "User@Example.TEST", "other@deep.sub.example.test",
        "routed@example.test", "postmaster"]


# --------------------------------------------------------------------------- failures

@pytest.mark.parametrize("where", ["mid-body", "before-final-dot", "after-dot-no-crlf", "reset"])
def test_disconnect_mid_data_leaves_nothing(mta, where):
    with Raw(mta) as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<a@origin.test>")[0] == 250
        assert c.cmd("RCPT TO:<b@dest.test>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        if where == "mid-body":
            c.send(b"Subject: cut\r\n\r\nsome text")
        elif where == "before-final-dot":
            c.send(b"Subject: cut\r\n\r\nall of the text\r\n")
        elif where == "after-dot-no-crlf":
            c.send(b"Subject: cut\r\n\r\nall of the text\r\n.")
        else:
            c.send(b"Subject: cut\r\n\r\nall of the text\r\n")
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    # the server may answer this session's EOF only after others; a later full
    # session that gets its 250 shows it is past it
    qid = settle(mta)
    assert mta.count() == 1
    assert [r["queue_id"] for r in mta.rows("SELECT queue_id FROM messages")] == [qid]
    assert mta.count("recipients") == 1


def test_disconnect_mid_bdat_leaves_nothing(mta):
    with Raw(mta) as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<a@origin.test>")[0] == 250
        assert c.cmd("RCPT TO:<b@dest.test>")[0] == 250
        c.send(b"BDAT 10\r\n0123456789")
        assert c.replies(1)[0][0] == 250
        c.send(b"BDAT 100 LAST\r\nonly part of it")
    settle(mta)
    assert mta.count() == 1


def test_spool_failure_is_temporary_and_session_goes_on(mta):
    mta.expect_errors = True  # the daemon logs the failed write
    mta.execute("CREATE TRIGGER e2e_fail BEFORE INSERT ON messages "
                "BEGIN SELECT RAISE(ABORT, 'e2e test failure'); END")
    data = b"Subject: spool failure\r\n\r\nbody\r\n"
    with Raw(mta) as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<a@origin.test>")[0] == 250
        assert c.cmd("RCPT TO:<b@dest.test>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(data + b".\r\n")
        code, text = c.replies(1)[0]
        assert code == 451 and text.startswith(b"4.3.0"), text
        # BDAT takes the same path
        assert c.cmd("MAIL FROM:<a@origin.test>")[0] == 250
        assert c.cmd("RCPT TO:<b@dest.test>")[0] == 250
        c.send(f"BDAT {len(data)} LAST\r\n".encode() + data)
        code, text = c.replies(1)[0]
        assert code == 451 and text.startswith(b"4.3.0"), text
        assert c.cmd("NOOP")[0] == 250
        assert_spool_empty(mta)

        mta.execute("DROP TRIGGER e2e_fail")
        assert c.cmd("MAIL FROM:<a@origin.test>")[0] == 250
        assert c.cmd("RCPT TO:<b@dest.test>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(data + b".\r\n")
        qid = queue_id_of(*c.replies(1)[0])
        assert c.cmd("QUIT")[0] == 221
    assert mta.count() == 1
    assert stored_message(mta, qid) == data
    assert len(recipients(mta, qid)) == 1
    assert "e2e test failure" in mta.log()


def test_restart_keeps_messages_and_clean_shutdown(mta):
    qid = send_with_smtplib(mta, "a@origin.test", ["b@dest.test"], b"Subject: keep\r\n\r\nme\r\n")
    assert mta.stop() in (0, -signal.SIGTERM)  # twistd exits by the signal it got
    mta.start()
    assert stored_message(mta, qid) == b"Subject: keep\r\n\r\nme\r\n"
    qid2 = send_with_smtplib(mta, "a@origin.test", ["b@dest.test"], b"Subject: two\r\n\r\n2\r\n")
    assert {r[0] for r in mta.rows("SELECT queue_id FROM messages")} == {qid, qid2}
    assert mta.rows("SELECT value FROM meta WHERE key = 'schema_version'")[0][0] == str(
        SCHEMA_VERSION)


# --------------------------------------------------------------------------- startup

def _spool_v99(path: Path) -> str:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE meta (key VARCHAR(64) PRIMARY KEY, value VARCHAR(255) NOT NULL)")
    conn.execute("INSERT INTO meta VALUES ('schema_version', '99')")
    conn.commit()
    conn.close()
    return f"sqlite:///{path}"


def _startup_cases():
    # (id, config text given tmp dir, words the one line must contain)
    yield "unknown-key", lambda d: '[server]\nbogus = 1\n', ["[server] bogus"]
    yield "unknown-section", lambda d: '[bogus]\nx = 1\n', ["[bogus]"]
    yield "wrong-type", lambda d: '[server]\nmax_message_size = "big"\n', ["[server] max_message_size"]
    yield "wrong-type-list", lambda d: '[server]\nlisten = "tcp:2525"\n', ["[server] listen"]
    yield "bad-endpoint", lambda d: '[server]\nlisten = ["tcp:notaport"]\n', ["[server] listen", "tcp:notaport"]
    yield "bad-endpoint-type", lambda d: '[server]\nlisten = ["nosuch:25"]\n', ["[server] listen", "nosuch:25"]
    yield "bad-network", lambda d: '[policy]\nrelay_networks = ["300.1.2.3/8"]\n', ["[policy] relay_networks"]
    yield "bad-toml", lambda d: '[server\nhostname = "x"\n', ["TOML"]
    yield "spool-under-file", lambda d: (
        (d / "regular-file").write_text("x"),
        f'[spool]\nurl = "sqlite:///{d}/regular-file/mta.sqlite"\n')[1], ["[spool] url"]
    yield "spool-under-file-deep", lambda d: (
        (d / "regular-file").write_text("x"),
        f'[spool]\nurl = "sqlite:///{d}/regular-file/sub/mta.sqlite"\n')[1], ["[spool] url"]
    yield "spool-is-directory", lambda d: f'[spool]\nurl = "sqlite:///{d}"\n', ["[spool] url"]
    yield "spool-not-a-database", lambda d: (
        (d / "junk.sqlite").write_bytes(b"this is not a database" * 100),
        f'[spool]\nurl = "sqlite:///{d}/junk.sqlite"\n')[1], ["[spool] url"]
    yield "spool-newer-schema", lambda d: (
        f'[spool]\nurl = "{_spool_v99(d / "v99.sqlite")}"\n'), ["[spool] url", "99"]
    yield "spool-bad-url", lambda d: '[spool]\nurl = "not a url"\n', ["[spool] url"]
    yield "spool-unknown-driver", lambda d: '[spool]\nurl = "nosuchdb://x/y"\n', ["[spool] url"]


_CASES = list(_startup_cases())


def _check_one_line(result, must_contain):
    stderr = result.stderr.decode(errors="replace")
    stdout = result.stdout.decode(errors="replace")
    assert result.returncode != 0, (stdout, stderr)
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr + stdout
    assert "Traceback" not in stderr + stdout, stderr + stdout
    for word in must_contain:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.mark.parametrize("make", [c[1] for c in _CASES], ids=[c[0] for c in _CASES])
def test_startup_error_is_one_line(twistd, tmp_path, make):
    must = dict((id(c[1]), c[2]) for c in _CASES)[id(make)]
    config = tmp_path / "bad.toml"
    text = make(tmp_path)
    if "[spool]" not in text:
        text += f'\n[spool]\nurl = "sqlite:///{tmp_path}/spool/ok.sqlite"\n'
    config.write_text(text)
    result = twistd("-n", "--pidfile=", "mta", "--config", str(config))
    line = _check_one_line(result, must)
    assert str(config) in line


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_unreadable_config_file(twistd, tmp_path, kind):
    path = tmp_path / "nope.toml" if kind == "missing" else tmp_path
    result = twistd("-n", "--pidfile=", "mta", "--config", str(path))
    line = _check_one_line(result, [])
    assert str(path) in line


def test_bad_listen_option(twistd, tmp_path):
    config = tmp_path / "ok.toml"
    config.write_text(f'[spool]\nurl = "sqlite:///{tmp_path}/ok.sqlite"\n')
    result = twistd("-n", "--pidfile=", "mta", "--config", str(config), "--listen", "tcp:xyz")
    _check_one_line(result, ["--listen", "tcp:xyz"])


def test_port_in_use_is_one_line(twistd, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        config = tmp_path / "busy.toml"
        config.write_text(f'[server]\nlisten = ["tcp:{port}:interface=127.0.0.1"]\n'
                          f'[spool]\nurl = "sqlite:///{tmp_path}/ok.sqlite"\n'
                          f'[relay]\ndeliver = false\n')
        result = twistd("-n", "--pidfile=", "mta", "--config", str(config))
    line = _check_one_line(result, ["[server] listen", str(port)])
    assert str(config) in line


def test_help_lists_options(twistd):
    result = twistd("mta", "--help")
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr
    for option in ("--config", "--listen", "--spool"):
        assert option in out, out
    assert "etc/mta.toml" in out


# --------------------------------------------------------------------------- limits and timeouts

@pytest.mark.mta_config(server={"max_recipients": 3})
def test_too_many_recipients(mta):
    with Raw(mta) as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<a@origin.test>")[0] == 250
        for i in range(3):
            assert c.cmd(f"RCPT TO:<r{i}@dest.test>")[0] == 250
        code, text = c.cmd("RCPT TO:<r3@dest.test>")
        assert code == 452 and text.startswith(b"4.5.3"), text
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: limit\r\n\r\nx\r\n.\r\n")
        qid = queue_id_of(*c.replies(1)[0])
    assert [r["address"] for r in recipients(mta, qid)] == ["r0@dest.test", "r1@dest.test",
                                                            "r2@dest.test"]


@pytest.mark.mta_config(server={"max_connections_per_client": 2})
def test_connection_limit_per_client(mta):
    first, second = Raw(mta), Raw(mta)
    try:
        third = Raw(mta, greet=False)
        code, text = third.reply()
        assert code == 421 and b"4.7.0" in text[-1], text
        assert third.wait_closed() == b""
        third.close()
        # the others are unaffected
        first.ehlo()
        second.ehlo()
        # once one goes, a new client is welcome again
        assert first.cmd("QUIT")[0] == 221
        first.wait_closed()

        def greeted() -> bool:
            with Raw(mta, greet=False) as c:
                return c.reply()[0] == 220
        wait_for(greeted, 10, "a free connection slot")
    finally:
        first.close()
        second.close()


@pytest.mark.mta_config(server={"max_connections": 2})
def test_connection_limit_total(mta):
    with Raw(mta), Raw(mta):
        with Raw(mta, greet=False) as third:
            code, text = third.reply()
            assert code == 421 and b"4.7.0" in text[-1], text
            assert third.wait_closed() == b""


@pytest.mark.mta_config(server={"max_errors": 3})
def test_too_many_errors_closes_the_session(mta):
    with Raw(mta) as c:
        c.ehlo()
        c.send(b"BOGUS\r\nBOGUS\r\nBOGUS\r\nNOOP\r\n")
        got = c.replies(3)
        assert [code for code, _ in got[:2]] == [500, 500]
        # the third error is answered, then 421 and the connection closes
        assert got[2][0] == 500
        code, text = c.reply()
        assert code == 421, text
        assert c.wait_closed() == b""


@pytest.mark.mta_config(server={"command_timeout": "1s", "data_timeout": "1s"})
def test_idle_timeouts(mta):
    with Raw(mta) as c:
        c.ehlo()
        code, text = c.reply()   # nothing sent: the server gives up
        assert code == 421 and text[-1].startswith(b"4.4.2"), text
        assert c.wait_closed() == b""
    with Raw(mta) as c:
        c.ehlo()
        assert c.cmd("MAIL FROM:<a@origin.test>")[0] == 250
        assert c.cmd("RCPT TO:<b@dest.test>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: slow\r\n\r\npart of it\r\n")
        code, text = c.reply()
        assert code == 421 and text[-1].startswith(b"4.4.2"), text
        assert c.wait_closed() == b""
    assert_spool_empty(mta)


# --------------------------------------------------------------------------- slow spool, IPv6, shutdown

SLOW_TRIGGER = ("CREATE TRIGGER e2e_slow BEFORE INSERT ON messages BEGIN "
                "SELECT count(*) FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL "
                "SELECT x + 1 FROM c WHERE x < 400000) SELECT x FROM c); END")


def test_pipelined_input_while_spool_write_outstanding(mta):
    """A slow spool: the client pipelines several transactions (well over the
    server's read-pause threshold) behind a final dot; every reply comes, in
    order, and every message is stored whole."""
    mta.execute(SLOW_TRIGGER)
    bodies = [b"Subject: slow %d\r\n\r\n" % i + (b"%d" % i * 97 + b"\r\n") * 3000 for i in range(5)]
    wire = b"".join(b"MAIL FROM:<s%d@origin.test>\r\nRCPT TO:<r%d@dest.test>\r\nDATA\r\n" % (i, i)
                    + body + b".\r\n" for i, body in enumerate(bodies))
    assert len(wire) > 1_000_000
    with Raw(mta, timeout=60) as c:
        c.ehlo()
        sender = threading.Thread(target=c.send, args=(wire + b"QUIT\r\n",))
        sender.start()
        got = c.replies(4 * len(bodies) + 1)
        sender.join(60)
    assert [code for code, _ in got] == [250, 250, 354, 250] * len(bodies) + [221], got
    qids = [queue_id_of(*got[4 * i + 3]) for i in range(len(bodies))]
    for i, (qid, body) in enumerate(zip(qids, bodies)):
        assert stored_message(mta, qid) == body
        assert message(mta, qid)["sender"] == f"s{i}@origin.test"


def test_disconnect_while_spool_write_outstanding(mta):
    """The client hangs up right after the final dot: the message was complete,
    so it is stored (the client will retry; a duplicate is SMTP's usual risk),
    and the server is not upset by answering a closed connection."""
    mta.execute(SLOW_TRIGGER)
    with Raw(mta) as c:
        c.ehlo()
        c.send(b"MAIL FROM:<a@origin.test>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n")
        assert [code for code, _ in c.replies(3)] == [250, 250, 354]
        c.send(b"Subject: gone\r\n\r\nbye\r\n.\r\n")
    mta.execute("DROP TRIGGER e2e_slow")
    settle(mta)
    wait_for(lambda: mta.count() == 2, 10, "both messages stored")


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
@pytest.mark.mta_config(host="::1", policy={"relay_networks": ["::1/128"]})
def test_ipv6_client(mta):
    with smtplib.SMTP(mta.host, mta.port, local_hostname="v6.e2e.test", timeout=10) as s:
        s.ehlo()
        assert s.mail("a@origin.test")[0] == 250
        assert s.rcpt("b@anywhere.test")[0] == 250   # ::1 may relay
        qid = queue_id_of(*s.data(b"Subject: v6\r\n\r\nhi\r\n"))
    m = message(mta, qid)
    assert m["client_address"] == "::1"
    headers, _ = content(mta, qid)
    assert headers.startswith(b"Received: from v6.e2e.test ([IPv6:::1])\r\n")


def test_sigterm_with_open_sessions_stops_promptly(mta):
    idle = Raw(mta)
    in_data = Raw(mta)
    try:
        in_data.ehlo()
        assert in_data.cmd("MAIL FROM:<a@origin.test>")[0] == 250
        assert in_data.cmd("RCPT TO:<b@dest.test>")[0] == 250
        assert in_data.cmd("DATA")[0] == 354
        in_data.send(b"Subject: interrupted\r\n\r\nhalf")
        t0 = time.monotonic()
        mta.stop(timeout=10)
        assert time.monotonic() - t0 < 10
    finally:
        idle.close()
        in_data.close()
    assert_spool_empty(mta)
    assert "Traceback" not in mta.log()


def _process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.split()[:2] == ["State:", "Z"] for line in f)  # zombie: exited
    except FileNotFoundError:
        return True


def _posix_lock_holders(path: Path) -> set[int]:
    """Pids holding a POSIX lock on *path*, from /proc/locks."""
    inode = path.stat().st_ino
    holders = set()
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if "->" in fields:
                fields.remove("->")
            if len(fields) >= 6 and fields[1] == "POSIX" and fields[5].endswith(f":{inode}"):
                holders.add(int(fields[4]))
    return holders


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs Linux /proc/locks")
def test_daemon_mode(tmp_path):
    """Without -n twistd forks into the background after makeService.  The
    daemon must hold SQLite's locks itself: a connection opened before the
    fork would leave them with the parent that exited, and another process
    (the admin CLI, a second reader) could then reset the WAL index under it."""
    port = free_port()
    spool = tmp_path / "spool" / "mta.sqlite"
    config = tmp_path / "mta.toml"
    config.write_text(f'[server]\nhostname = "mx.e2e.test"\n'
                      f'listen = ["tcp:{port}:interface=127.0.0.1"]\n'
                      f'[spool]\nurl = "sqlite:///{spool}"\n'
                      f'[relay]\ndeliver = false\n[dns]\nnameservers = ["127.0.0.1:9"]\n')
    pidfile, logfile = tmp_path / "twistd.pid", tmp_path / "twistd.log"
    result = subprocess.run(
        twistd_command(f"--pidfile={pidfile}", f"--logfile={logfile}", "mta", "--config", str(config)),
        cwd=tmp_path, capture_output=True, timeout=30, env=subprocess_env())
    assert result.returncode == 0, result
    pid = 0
    try:
        pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 20, "the pidfile"))

        def greets() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                    return s.recv(4).startswith(b"220")
            except OSError:
                return False
        wait_for(greets, 20, "the daemon to listen")
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            s.sendmail("a@origin.test", ["b@dest.test"], b"Subject: daemon\r\n\r\nbody\r\n")
        conn = sqlite3.connect(f"file:{spool}?mode=ro", uri=True)
        assert conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 1
        conn.close()
        shm = spool.with_name(spool.name + "-shm")
        assert pid in _posix_lock_holders(shm), (
            "the daemon uses the spool without holding SQLite's shared-memory lock")
    finally:
        if pid and not _process_gone(pid):
            os.kill(pid, signal.SIGTERM)
            wait_for(lambda: _process_gone(pid), 15, "the daemon to exit")
    print(logfile.read_text())
    assert "Traceback" not in logfile.read_text()


def test_bad_spool_option(twistd, tmp_path):
    config = tmp_path / "ok.toml"
    config.write_text(f'[spool]\nurl = "sqlite:///{tmp_path}/ok.sqlite"\n')
    (tmp_path / "file").write_text("x")
    for bad in ("not a url", f"sqlite:///{tmp_path}/file/mta.sqlite"):
        result = twistd("-n", "--pidfile=", "mta", "--config", str(config), "--spool", bad)
        line = _check_one_line(result, ["--spool"])
        assert "[spool] url" not in line, line


def test_spool_locked_by_another_process_waits_then_stores(mta):
    """Another process (the admin CLI, say) holds the write lock for a while:
    the message waits for it instead of failing, and gets its 250 after."""
    locker = sqlite3.connect(mta.spool, timeout=30, isolation_level=None)
    try:
        locker.execute("BEGIN IMMEDIATE")
        with Raw(mta) as c:
            c.ehlo()
            c.send(b"MAIL FROM:<a@origin.test>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n")
            assert [code for code, _ in c.replies(3)] == [250, 250, 354]
            c.send(b"Subject: locked\r\n\r\nwaiting\r\n.\r\n")
            c.sock.settimeout(0.5)
            with pytest.raises(socket.timeout):
                c.sock.recv(1)        # no reply while the lock is held
            locker.execute("COMMIT")
            qid = queue_id_of(*c.replies(1)[0])
    finally:
        locker.close()
    assert stored_message(mta, qid) == b"Subject: locked\r\n\r\nwaiting\r\n"
