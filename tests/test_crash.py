"""Crash test: many concurrent senders, ``kill -9`` of the daemon at a random
moment, restart on the same spool.

Every message that got a 250 must be in the spool whole (envelope, recipient
rows, header block and body exactly as sent); nothing without a 250 may be
half there; nothing may be stored twice.  Repeated with different kill times
on the same spool, so later rounds also restart on a spool that was killed
before.
"""
from __future__ import annotations

import random
import re
import signal
import smtplib
import socket
import threading
import time
from dataclasses import dataclass, field

from conftest import wait_for

SENDERS = 20          # threads; every fourth one speaks BDAT over a raw socket
ROUNDS = 3
KILL_AFTER = 15       # messages acknowledged in a round before the kill may come
KILL_WINDOW = 0.6     # seconds: the kill comes at a random moment within this window
TOKEN = re.compile(rb"Message-ID: <([^>]+)@crash\.test>")


@dataclass
class Sent:
    token: str
    sender: str
    rcpts: list[str]
    data: bytes = field(repr=False)   # the message as the server must store it (unstuffed)
    status: str = "pending"           # pending -> ok | refused | unknown
    queue_id: str | None = None
    reply: str = ""


@dataclass
class Load:
    round: int
    port: int
    rng_seed: int
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    sent: list[Sent] = field(default_factory=list)
    acked: int = 0
    acked_before_stop: int = 0
    errors: list[str] = field(default_factory=list)

    def new(self, rng: random.Random, sender_no: int, n: int) -> Sent:
        token = f"r{self.round}s{sender_no}m{n}x{rng.getrandbits(32):08x}"
        rcpts = [f"rcpt{i}.{token}@dest{i % 3}.test" for i in range(rng.choice([1, 1, 2, 3, 5]))]
        size = rng.choice([300, 2000, 20000, 120000])
        lines = [f"From: <{token}@origin.test>", f"To: <{rcpts[0]}>",
                 f"Subject: crash test {token}", f"Message-ID: <{token}@crash.test>", ""]
        body_len = 0
        i = 0
        while body_len < size:
            line = f"{'.' if i % 7 == 0 else ''}{token} line {i} " + "x" * rng.randrange(0, 90)
            lines.append(line)
            body_len += len(line) + 2
            i += 1
        data = ("\r\n".join(lines) + "\r\n").encode()
        item = Sent(token, f"{token}@origin.test", rcpts, data)
        with self.lock:
            self.sent.append(item)
        return item

    def acknowledge(self, item: Sent, code: int, text: bytes) -> None:
        item.reply = f"{code} {text.decode(errors='replace')}"
        if code == 250:
            m = re.search(rb"queued as ([0-9A-Z]+)", text)
            assert m, text
            item.queue_id = m.group(1).decode()
            item.status = "ok"
            with self.lock:
                self.acked += 1
        else:
            item.status = "refused"


class ShuttingDown(Exception):
    """A 421 from the daemon: it is stopping, and the transaction in progress
    was not accepted (README "Stopping")."""


def expect_250(code: int, text: bytes, want: int = 250) -> None:
    if code == 421:
        raise ShuttingDown(text)
    assert code == want, text


def smtplib_sender(load: Load, sender_no: int) -> None:
    rng = random.Random(load.rng_seed * 1000 + sender_no)
    n = 0
    while not load.stop.is_set():
        item = None
        try:
            with smtplib.SMTP("127.0.0.1", load.port, timeout=15) as s:
                s.ehlo("sender%d.crash.test" % sender_no)
                for _ in range(rng.randrange(1, 6)):
                    if load.stop.is_set():
                        break
                    item = load.new(rng, sender_no, n)
                    n += 1
                    code, text = s.mail(item.sender, ["BODY=8BITMIME"])
                    expect_250(code, text)
                    for r in item.rcpts:
                        code, text = s.rcpt(r)
                        expect_250(code, text)
                    code, text = s.data(item.data)   # smtplib dot-stuffs
                    load.acknowledge(item, code, text)
                    item = None
        except ShuttingDown as e:
            if item is not None:
                item.status = "refused"
                item.reply = f"421 {e}"
            if not load.stop.is_set():
                load.stop.wait(0.01)
        except (OSError, smtplib.SMTPException) as e:
            if item is not None:
                item.status = "unknown"
                item.reply = repr(e)
            if not load.stop.is_set():
                load.stop.wait(0.01)   # the daemon is gone or going: retry until told to stop
        except AssertionError as e:
            load.errors.append(f"sender {sender_no}: {e}")
            return


def bdat_sender(load: Load, sender_no: int) -> None:
    """Pipelined MAIL/RCPT/BDAT chunks over a raw socket."""
    rng = random.Random(load.rng_seed * 1000 + sender_no)
    n = 0
    while not load.stop.is_set():
        item = None
        try:
            with socket.create_connection(("127.0.0.1", load.port), timeout=15) as sock:
                f = sock.makefile("rb")

                def reply() -> tuple[int, bytes]:
                    while True:
                        line = f.readline()
                        if not line.endswith(b"\r\n"):
                            raise ConnectionError("connection closed")
                        if line[3:4] != b"-":
                            return int(line[:3]), line[4:].rstrip(b"\r\n")

                # A session opened just before the stop may get its 421 in
                # place of the greeting or the EHLO reply (README "Stopping").
                expect_250(*reply(), want=220)
                sock.sendall(b"EHLO bdat%d.crash.test\r\n" % sender_no)
                expect_250(*reply())
                for _ in range(rng.randrange(1, 6)):
                    if load.stop.is_set():
                        break
                    item = load.new(rng, sender_no, n)
                    n += 1
                    wire = [b"MAIL FROM:<%s> BODY=8BITMIME\r\n" % item.sender.encode()]
                    wire += [b"RCPT TO:<%s>\r\n" % r.encode() for r in item.rcpts]
                    cut = sorted(rng.sample(range(1, len(item.data)), 2))
                    chunks = [item.data[:cut[0]], item.data[cut[0]:cut[1]], item.data[cut[1]:]]
                    for i, chunk in enumerate(chunks):
                        last = b" LAST" if i == len(chunks) - 1 else b""
                        wire.append(b"BDAT %d%s\r\n" % (len(chunk), last) + chunk)
                    sock.sendall(b"".join(wire))
                    for _ in range(1 + len(item.rcpts) + len(chunks) - 1):
                        code, text = reply()
                        expect_250(code, text)
                    load.acknowledge(item, *reply())
                    item = None
                sock.sendall(b"QUIT\r\n")
        except ShuttingDown as e:
            if item is not None:
                item.status = "refused"
                item.reply = f"421 {e}"
            if not load.stop.is_set():
                load.stop.wait(0.01)
        except (OSError, ConnectionError) as e:
            if item is not None:
                item.status = "unknown"
                item.reply = repr(e)
            if not load.stop.is_set():
                load.stop.wait(0.01)
        except AssertionError as e:
            load.errors.append(f"bdat sender {sender_no}: {e}")
            return


def check_spool(mta, everything: list[Sent]) -> dict[str, int]:
    by_token = {s.token: s for s in everything}
    assert len(by_token) == len(everything)

    rows = mta.rows("SELECT queue_id, sender, body_type FROM messages")
    contents = {r["queue_id"]: (bytes(r["headers"]), bytes(r["body"]))
                for r in mta.rows("SELECT queue_id, headers, body FROM contents")}
    rcpts: dict[str, list] = {}
    for r in mta.rows("SELECT queue_id, address, state, attempts FROM recipients ORDER BY id"):
        rcpts.setdefault(r["queue_id"], []).append(r)
    message_ids = {r["queue_id"] for r in rows}

    assert mta.rows("PRAGMA integrity_check")[0][0] == "ok"
    assert set(contents) <= message_ids, "contents rows without a message row"
    assert set(rcpts) <= message_ids, "recipient rows without a message row"
    assert len(contents) == len(rows), "a message row without its contents row"

    seen: dict[str, str] = {}
    for row in rows:
        qid = row["queue_id"]
        headers, body = contents[qid]
        m = TOKEN.search(headers)
        assert m, f"{qid}: stored headers without our token: {headers[:300]!r}"
        token = m.group(1).decode()
        assert token not in seen, f"{token} stored twice: {seen[token]} and {qid}"
        seen[token] = qid
        sent = by_token[token]
        assert sent.status != "refused", f"{token} was refused ({sent.reply}) but is stored as {qid}"
        if sent.status == "ok":
            assert sent.queue_id == qid, f"{token}: 250 said {sent.queue_id}, spool has {qid}"
        assert headers.startswith(b"Received: "), qid
        end = re.match(rb"Received: [^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*", headers).end()
        assert headers[end:] + body == sent.data, f"{token} ({qid}) is not stored whole"
        assert row["sender"] == sent.sender
        assert row["body_type"] == "8BITMIME"
        stored_rcpts = rcpts.get(qid, [])
        assert [r["address"] for r in stored_rcpts] == sent.rcpts, f"{token}: recipients differ"
        assert {(r["state"], r["attempts"]) for r in stored_rcpts} == {("queued", 0)}

    missing = [s for s in everything if s.status == "ok" and s.token not in seen]
    assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {missing[0]}"
    return {"stored": len(rows),
            "acked": sum(s.status == "ok" for s in everything),
            "unknown_stored": sum(s.status == "unknown" and s.token in seen for s in everything),
            "unknown": sum(s.status in ("unknown", "pending") for s in everything)}


def run_load_until(mta, rnd: int, seed: int, rng: random.Random, stop) -> Load:
    """Run the senders against *mta*; once KILL_AFTER messages are acknowledged,
    wait a random moment within KILL_WINDOW and call ``stop()`` while the load
    still runs."""
    load = Load(round=rnd, port=mta.port, rng_seed=seed + rnd)
    threads = [threading.Thread(target=bdat_sender if i % 4 == 3 else smtplib_sender,
                                args=(load, i), name=f"sender-{i}", daemon=True)
               for i in range(SENDERS)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: load.acked >= KILL_AFTER or load.errors, 20,
                 f"{KILL_AFTER} acknowledged messages in round {rnd}")
        assert not load.errors, load.errors
        time.sleep(rng.uniform(0, KILL_WINDOW))  # the random moment, not a wait for an event
        load.acked_before_stop = load.acked
        stop()
    finally:
        load.stop.set()
        for t in threads:
            t.join(30)
    assert not any(t.is_alive() for t in threads), "a sender thread hung"
    assert not load.errors, load.errors
    return load


def test_kill_9_under_load_loses_nothing_acknowledged(mta_factory):
    mta = mta_factory(hostname="mx.crash.test")
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    print(f"crash test seed {seed}")
    everything: list[Sent] = []

    for rnd in range(ROUNDS):
        load = run_load_until(mta, rnd, seed, rng, mta.kill)
        everything.extend(load.sent)
        mta.start()   # restart on the same spool: must come up cleanly
        stats = check_spool(mta, everything)
        print(f"round {rnd}: {load.acked_before_stop}+ acknowledged before the kill; {stats}")
        assert stats["acked"] >= KILL_AFTER * (rnd + 1)

    # and the restarted daemon takes mail as usual
    with smtplib.SMTP(mta.host, mta.port, timeout=10) as s:
        s.sendmail("after@crash.test", ["rcpt@dest.test"],
                   b"Message-ID: <after@crash.test>\r\n\r\nafter the crashes\r\n")
    assert mta.rows("SELECT COUNT(*) FROM messages")[0][0] == stats["stored"] + 1


def test_sigterm_under_load_loses_nothing_acknowledged(mta_factory):
    """The orderly stop: twistd exits promptly with sessions and spool writes
    in flight, and the same guarantees hold."""
    mta = mta_factory(hostname="mx.crash.test")
    seed = random.randrange(1 << 30)
    print(f"sigterm test seed {seed}")
    timing: list[float] = []

    def stop() -> None:
        t0 = time.monotonic()
        status = mta.stop(timeout=15)
        timing.append(time.monotonic() - t0)
        assert status in (0, -signal.SIGTERM), status

    load = run_load_until(mta, 0, seed, random.Random(seed), stop)
    assert timing[0] < 10, f"twistd took {timing[0]:.1f}s to stop"
    mta.start()
    stats = check_spool(mta, load.sent)
    print(f"{load.acked_before_stop}+ acknowledged before SIGTERM; {stats}; stop took {timing[0]:.2f}s")
