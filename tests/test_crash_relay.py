"""Crash test of delivery: concurrent senders into the real daemon while it
relays to a (slow-ish) scripted next hop; ``kill -9`` at a random moment;
restart on the same spool with the same next hop; wait until the spool
drains.

Checked after every round:

* every recipient of every message that got a ``250`` was received by the
  next hop, or (for the recipients it refuses with 550) is named in a DSN
  the next hop received for the sender (none lost);
* a recipient was received more than once only if it was in flight when the
  daemon was killed (at-least-once delivery, README "What a crash
  mid-delivery can cause");
* everything the next hop received is whole: our Received line (with the
  queue id) followed by the message exactly as it was sent, and only for
  messages that were sent.

Run as a script, this file is the slow next hop: tests/peers.py whose reply
at the end of the content comes after a random delay between
``data_end_delay_min`` (default 0) and ``data_end_delay`` seconds (so
deliveries are in flight when the kill comes).
"""
from __future__ import annotations

import random
import re
import smtplib
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from conftest import LoopbackPeer, wait_for

ROUNDS = 3
SENDERS = 6
PER_ROUND = 60             # messages acknowledged per round before the senders pause
DOMAINS = ["d0.test", "d1.test", "d2.test"]
DATA_END_DELAY = 0.15      # the next hop's reply to the final dot: up to this late
BAD = [f"bad@{d}" for d in DOMAINS]      # the next hop answers 550 to these
TOKEN = re.compile(rb"Message-ID: <([^>]+)@crash-relay\.test>")
FINAL = re.compile(rb"Final-Recipient: rfc822;(\S+)")
QUEUE_ID = re.compile(rb"\A(?:.*\r\n)*?\tby [^ ]+ \(mta\) with \w+ id ([0-9A-Z]+)")


@dataclass
class Sent:
    token: str
    rcpts: list[str]
    data: bytes = field(repr=False)
    status: str = "pending"       # pending -> ok | unknown
    queue_id: str | None = None


class Load:
    def __init__(self, rnd: int, port: int, seed: int):
        self.round = rnd
        self.port = port
        self.seed = seed
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.sent: list[Sent] = []
        self.errors: list[str] = []

    @property
    def acked(self) -> int:
        with self.lock:
            return sum(s.status == "ok" for s in self.sent)

    def new(self, rng: random.Random, sender_no: int, n: int) -> Sent:
        token = f"r{self.round}s{sender_no}m{n}x{rng.getrandbits(32):08x}"
        rcpts = [f"u{i}.{token}@{DOMAINS[(sender_no + i) % len(DOMAINS)]}"
                 for i in range(rng.choice([0, 1, 1, 2, 3, 4]))]
        if not rcpts or rng.random() < 0.25:
            rcpts.append(rng.choice(BAD))        # rejected by the next hop: a bounce
        lines = [f"From: <{token}@origin.test>", f"To: <{rcpts[0]}>",
                 f"Subject: crash relay {token}", f"Message-ID: <{token}@crash-relay.test>", ""]
        size = rng.choice([200, 1500, 8000, 40000])
        i = 0
        while sum(len(x) + 2 for x in lines) < size:
            lines.append(f"{'.' if i % 5 == 0 else ''}{token} line {i} " + "y" * rng.randrange(70))
            i += 1
        item = Sent(token, rcpts, ("\r\n".join(lines) + "\r\n").encode())
        with self.lock:
            self.sent.append(item)
        return item


def sender(load: Load, sender_no: int) -> None:
    rng = random.Random(load.seed * 1000 + sender_no)
    n = 0
    while not load.stop.is_set():
        item = None
        try:
            with smtplib.SMTP("127.0.0.1", load.port, timeout=10) as s:
                s.ehlo(f"sender{sender_no}.crash.test")
                for _ in range(rng.randrange(1, 5)):
                    while load.acked >= PER_ROUND and not load.stop.is_set():
                        load.stop.wait(0.01)      # enough for this round: wait for the kill
                    if load.stop.is_set():
                        break
                    item = load.new(rng, sender_no, n)
                    n += 1
                    code, text = s.mail(f"{item.token}@origin.test")
                    assert code == 250, text
                    for r in item.rcpts:
                        code, text = s.rcpt(r)
                        assert code == 250, text
                    code, text = s.data(item.data)
                    assert code == 250, text
                    m = re.search(rb"queued as ([0-9A-Z]+)", text)
                    assert m, text
                    item.queue_id = m.group(1).decode()
                    item.status = "ok"
                    item = None
        except (OSError, smtplib.SMTPException):
            if item is not None:
                item.status = "unknown"       # the daemon died during the transaction
            if not load.stop.is_set():
                load.stop.wait(0.01)
        except AssertionError as e:
            load.errors.append(f"sender {sender_no}: {e}")
            return


def receipts(peer: LoopbackPeer) -> tuple[list[tuple[str, str, str, bytes]],
                                          list[tuple[str, str, str]]]:
    """What the next hop received in full: (token, queue id, recipient,
    content) for every recipient of every message, and (token of the
    original, bounced recipient, DSN recipient) for every DSN."""
    delivered, bounced = [], []
    for tx in peer.transactions():
        assert tx.complete, tx
        m = TOKEN.search(tx.data)
        assert m, tx.data[:400]
        token = m.group(1).decode()
        if tx.mail_address == "":
            assert tx.accepted == [f"{token}@origin.test"], (tx.accepted, token)
            for f in FINAL.findall(tx.data):
                bounced.append((token, f.decode(), tx.accepted[0]))
            continue
        q = QUEUE_ID.match(tx.data)
        assert q, tx.data[:400]
        for rcpt in tx.accepted:
            delivered.append((token, q.group(1).decode(), rcpt, tx.data))
    return delivered, bounced


def delivered_by_token(everything: dict[str, Sent],
                       got: list[tuple[str, str, str, bytes]]) -> dict[str, set[str]]:
    """The recipients the next hop got for each sent message (by token),
    checking that each delivery is of a message we sent, to one of its good
    recipients, under its queue id, with its content whole."""
    by_token: dict[str, set[str]] = {}
    for token, qid, rcpt, data in got:
        item = everything.get(token)
        assert item is not None, f"the next hop got a message nobody sent: {token}"
        assert rcpt in item.rcpts and rcpt not in BAD, (token, rcpt)
        if item.queue_id is not None:
            assert qid == item.queue_id, (token, qid, item.queue_id)
        assert strip_received(data) == item.data, f"{token}: content not whole"
        by_token.setdefault(token, set()).add(rcpt)
    return by_token


def strip_received(data: bytes) -> bytes:
    m = re.match(rb"Received: [^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*", data)
    assert m, data[:300]
    return data[m.end():]


def test_kill_during_delivery_loses_nothing(mta_factory, peer_factory, tmp_path):
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    rng = random.Random(seed)
    script = {"data_end_delay": DATA_END_DELAY,
              "rcpt": {b: "550 5.1.1 No such user here" for b in BAD}}
    [peer] = peer_factory.spawn(script, program=Path(__file__))
    peer_factory.ready()
    # The senders' domain is routed to the same next hop: it gets the bounces too.
    routes = "".join(f'"{d}" = "127.0.0.1:{peer.port}"\n' for d in DOMAINS + ["origin.test"])
    mta = mta_factory(extra="[relay]\nconcurrency = 8\nper_destination = 4\n"
                            "[retry]\nfirst = \"1s\"\nmax = \"1s\"\n[routes]\n" + routes)
    everything: dict[str, Sent] = {}
    allowed_twice: set[tuple[str, str]] = set()    # (queue id, recipient) in flight at a kill
    dsn_in_flight: set[str] = set()                # DSN recipients in flight at a kill
    in_flight_at_kill = []

    for rnd in range(ROUNDS):
        load = Load(rnd, mta.port, seed + rnd)
        threads = [threading.Thread(target=sender, args=(load, i), daemon=True)
                   for i in range(SENDERS)]
        for t in threads:
            t.start()
        try:
            # Let deliveries get going, then kill at a random moment while the
            # next hop is in the middle of some of them.
            before = len(peer.transactions())
            wait_for(lambda: load.acked >= 8 and len(peer.transactions()) > before + 2, 20,
                     "deliveries under way", interval=0.005)
            deadline = time.monotonic() + rng.uniform(0.0, 0.6)
            while time.monotonic() < deadline and not load.errors:
                time.sleep(0.005)
            mta.kill()
        finally:
            load.stop.set()
            for t in threads:
                t.join(15)
        assert not load.errors, load.errors
        inflight = [(r["queue_id"], r["address"]) for r in
                    mta.rows("SELECT queue_id, address FROM recipients WHERE state = 'inflight'")]
        in_flight_at_kill.append(len(inflight))
        allowed_twice.update(inflight)
        dsn_in_flight.update(a for _q, a in inflight if a.endswith("@origin.test"))
        for item in load.sent:
            everything[item.token] = item

        mta.start()
        wait_for(lambda: mta.count("messages") == 0, 30, "the spool to drain after restart",
                 interval=0.05)

        got, bounces = receipts(peer)
        counts = Counter((qid, rcpt) for _tok, qid, rcpt, _d in got)
        by_token = delivered_by_token(everything, got)
        dsn_counts = Counter((token, rcpt) for token, rcpt, _to in bounces)
        for token, rcpt, to in bounces:
            item = everything.get(token)
            assert item is not None and rcpt in BAD and rcpt in item.rcpts, (token, rcpt)
            by_token.setdefault(token, set()).add(rcpt)
        for item in everything.values():
            if item.status == "ok":
                missing = set(item.rcpts) - by_token.get(item.token, set())
                assert not missing, f"lost after a 250: {item.token} {item.queue_id} {missing}"
        twice = {k: n for k, n in counts.items() if n > 1}
        assert set(twice) <= allowed_twice, (
            f"duplicates of recipients that were not in flight at a kill: "
            f"{set(twice) - allowed_twice}")
        for (token, rcpt), n in dsn_counts.items():
            item = everything[token]
            assert n == 1 or f"{token}@origin.test" in dsn_in_flight or any(
                a == rcpt for _q, a in allowed_twice if _q == item.queue_id), (
                f"{n} DSNs for {token} {rcpt}, none in flight at a kill")
        print(f"round {rnd}: {len(load.sent)} messages sent, {load.acked} acknowledged, "
              f"{len(inflight)} recipients in flight at the kill, "
              f"{sum(n - 1 for n in twice.values())} duplicate deliveries and "
              f"{len(dsn_counts)} bounces so far")

    assert mta.count("recipients") == 0
    # The kills did hit deliveries in flight at least once (else the test proved little).
    assert any(in_flight_at_kill), in_flight_at_kill


# --------------------------------------------------------------------------- the slow next hop

def _slow_peer_main() -> None:
    import peers

    class SlowConnection(peers.PeerConnection):
        """Holds every reply from the end of the content on for a random
        moment (replies stay in order; the content is recorded at once)."""

        holding = False

        def perform(self, step, default, action=None):
            r = super().perform(step, default, action)
            delay = float(self.script.get("data_end_delay", 0))
            if step == "DATA_END" and delay > 0 and self.mode not in ("closed", "stalled"):
                self.holding = True
                low = float(self.script.get("data_end_delay_min", 0))
                self.peer.reactor.callLater(random.uniform(low, delay), self._release)
            return r

        def flush(self) -> None:
            if not self.holding:
                super().flush()

        def _release(self) -> None:
            self.holding = False
            if self.mode != "closed":
                self.flush()

    peers.PeerConnection = SlowConnection    # ScriptedPeer.buildProtocol looks it up here
    peers.main()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    _slow_peer_main()
