"""Stopping and privileges (Step 4 "Lifecycle").

* unit tests of the server's shutdown (StringTransport, a spool whose commit
  the test fires) and of the queue runner's grace period (task.Clock);
* "stop during load": concurrent senders while the real daemon relays to a
  slow next hop, SIGTERM in the middle, restart, drain, and a count on both
  sides: every message that got a 250 arrives exactly once, no other does;
* a delivery that outlives ``[relay] shutdown_grace`` is cancelled and its
  recipient left "queued" (not "inflight");
* an open session gets ``421 4.3.2`` at SIGTERM;
* ``twistd --uid nobody --gid nogroup`` (as root): the spool is handed to
  nobody and the daemon stores mail as nobody.
"""
from __future__ import annotations

import grp
import os
import pwd
import random
import re
import shutil
import smtplib
import socket
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from twisted.internet import defer, task

from conftest import wait_for
from daemonutil import python_for_user, use_twistd_args
from fakespool import SyncSpool
from test_scheduler import FakeRouter, put, smtp
from smtpwire import Client, codes, make_factory

from mta.config import RelayConfig, RetryConfig
from mta.delivery.scheduler import QueueRunner
from mta.smtp.client import DeliveryResult, RecipientResult


# --------------------------------------------------------------------------- the server

def dot_message(c: Client) -> list[str]:
    """A whole transaction up to the final dot (no reply to the dot yet)."""
    c.start()
    assert codes(c.send("DATA\r\n")) == ["354"]
    return c.send("Subject: x\r\n\r\nbody\r\n.\r\n")


def test_idle_session_gets_421_at_shutdown():
    c = Client()
    c.ehlo()
    c.factory.shutdown()
    assert codes(c.take()) == ["421 4.3.2"]
    assert c.closing
    assert c.factory.drained()


def test_new_connection_during_shutdown_is_refused():
    f = make_factory()
    f.shutdown()
    c = Client(f)
    assert codes(c.greeting) == ["421 4.3.2"]
    assert c.closing


def test_commit_pending_at_shutdown_still_gets_its_250():
    c = Client()
    assert dot_message(c) == []          # waiting for the commit
    # The client pipelined its next transaction behind the dot.
    c.send("MAIL FROM:<a@example.org>\r\n")
    c.factory.shutdown()
    assert c.take() == [] and not c.closing
    assert not c.factory.drained()
    c.factory.force_close()              # the grace period does not cut a commit short
    assert c.take() == [] and not c.closing
    c.spool.fire()
    assert codes(c.take()) == ["250 2.0.0", "421 4.3.2"]   # the MAIL is not obeyed
    assert c.closing
    assert c.factory.drained()
    assert len(c.spool.messages) == 1


def test_message_being_received_at_shutdown_is_not_taken():
    c = Client()
    c.start()
    assert codes(c.send("DATA\r\n")) == ["354"]
    c.send("Subject: x\r\n\r\nfirst half\r\n")
    c.factory.shutdown()
    assert codes(c.take()) == ["421 4.3.2"]
    assert c.closing and c.factory.drained()
    c.send("second half\r\n.\r\n")
    assert c.spool.messages == [] and c.take() == []


def test_bdat_between_chunks_at_shutdown():
    c = Client()
    c.start()
    assert codes(c.send("BDAT 5\r\nhello")) == ["250 2.0.0"]
    c.factory.shutdown()
    assert codes(c.take()) == ["421 4.3.2"]
    c.send("BDAT 3 LAST\r\nabc")
    assert c.spool.messages == []


def test_failed_auth_delay_does_not_hold_the_shutdown():
    c = Client()
    c.proto._busy = True                  # as while a 535 is held back
    c.proto._delayed = c.clock.callLater(16, lambda: None)
    c.factory.shutdown()
    assert codes(c.take()) == ["421 4.3.2"]
    assert c.factory.drained()


# --------------------------------------------------------------------------- the queue runner

class HangingPool:
    """deliver() returns a Deferred the test fires; cancelling it records that."""

    def __init__(self):
        self.pending: list[tuple[defer.Deferred, object]] = []
        self.cancelled = 0

    def deliver(self, hops, msg):
        def cancel(d):
            self.cancelled += 1
        d = defer.Deferred(cancel)
        self.pending.append((d, msg))
        return d

    def answer(self, i=0, code=250):
        d, msg = self.pending[i]
        d.callback(DeliveryResult([RecipientResult(r.address, code, "2.0.0", f"{code} ok")
                                   for r in msg.recipients], None, True))

    def close(self):
        return defer.succeed(None)


@pytest.fixture
def runner_env(tmp_path):
    clock = task.Clock()
    clock.advance(1_800_000_000)
    spool = SyncSpool(tmp_path / "spool.sqlite")
    pool = HangingPool()

    class Env:
        pass
    e = Env()
    e.clock, e.spool, e.pool = clock, spool, pool

    def make(grace, concurrency=20):
        router = FakeRouter()
        runner = QueueRunner(spool, router, smtp(router, pool), hostname="mx.example.test",
                             retry=RetryConfig(), reactor=clock, rand=lambda: 0.5,
                             relay=RelayConfig(shutdown_grace=grace, concurrency=concurrency))
        runner.startService()
        return runner
    e.make = make
    return e


def states(env):
    return sorted(r[0] for r in env.spool.sql("SELECT state FROM recipients"))


def test_runner_stop_lets_a_delivery_finish_within_the_grace(runner_env):
    e = runner_env
    put(e, rcpts=("bob@dest.test",))
    runner = e.make(grace=10)
    assert len(e.pool.pending) == 1 and states(e) == ["inflight"]
    done = runner.stopService()
    e.clock.advance(5)
    assert not done.called
    e.pool.answer()
    assert done.called and e.pool.cancelled == 0
    assert states(e) == []                # delivered and gone


def test_runner_stop_cancels_after_the_grace_and_requeues(runner_env):
    e = runner_env
    put(e, rcpts=("bob@dest.test",))
    put(e, rcpts=("carol@other.test",))
    runner = e.make(grace=10, concurrency=1)
    # One slot: the second is claimed to wait for it (scheduler.AHEAD).
    assert len(e.pool.pending) == 1 and states(e) == ["inflight", "inflight"]
    done = runner.stopService()
    assert states(e) == ["inflight", "queued"]     # the waiting one is given back at once
    e.clock.advance(9.9)
    assert not done.called
    e.clock.advance(0.2)
    assert done.called and e.pool.cancelled == 1
    assert len(e.pool.pending) == 1
    assert states(e) == ["queued", "queued"]


def test_runner_stop_with_no_grace_cancels_at_once(runner_env):
    e = runner_env
    put(e)
    runner = e.make(grace=0)
    done = runner.stopService()
    assert done.called and e.pool.cancelled == 1
    assert states(e) == ["queued"]


# --------------------------------------------------------------------------- against the daemon

SENDERS = 6
DOMAINS = ["s0.test", "s1.test", "s2.test"]
TOKEN = re.compile(rb"Message-ID: <([^>]+)@stop-load\.test>")


@dataclass
class Item:
    token: str
    rcpts: list[str]
    data: bytes = field(repr=False)
    status: str = "pending"     # pending -> ok (250) | refused (421, reset, refused connection)


class Load:
    def __init__(self, port: int):
        self.port = port
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.items: list[Item] = []
        self.errors: list[str] = []

    @property
    def acked(self) -> int:
        with self.lock:
            return sum(i.status == "ok" for i in self.items)

    def run(self, no: int) -> None:
        rng = random.Random(no)
        n = 0
        while not self.stop.is_set():
            item = None
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=15) as s:
                    s.ehlo(f"sender{no}.stop.test")
                    for _ in range(rng.randrange(1, 6)):
                        if self.stop.is_set():
                            break
                        token = f"s{no}m{n}x{rng.getrandbits(32):08x}"
                        n += 1
                        rcpts = [f"u{i}.{token}@{DOMAINS[(no + i) % len(DOMAINS)]}"
                                 for i in range(rng.choice([1, 1, 2, 3]))]
                        data = (f"From: <{token}@origin.test>\r\nTo: <{rcpts[0]}>\r\n"
                                f"Subject: stop during load\r\n"
                                f"Message-ID: <{token}@stop-load.test>\r\n\r\n"
                                + f"{token} body line\r\n" * rng.randrange(1, 200)).encode()
                        item = Item(token, rcpts, data)
                        with self.lock:
                            self.items.append(item)
                        code, text = s.mail(f"{token}@origin.test")
                        if code == 421:
                            item.status, item = "refused", None
                            break
                        assert code == 250, (code, text)
                        for r in rcpts:
                            code, text = s.rcpt(r)
                            if code == 421:
                                break
                            assert code == 250, (code, text)
                        if code == 421:
                            item.status, item = "refused", None
                            break
                        code, text = s.data(data)
                        if code == 421:
                            item.status, item = "refused", None
                            break
                        assert code == 250, (code, text)
                        item.status, item = "ok", None
            except (OSError, smtplib.SMTPException):
                pass
            except AssertionError as e:
                self.errors.append(f"sender {no}: {e}")
                return
            if item is not None:
                item.status = "refused"   # the connection went before the dot's reply
            if not self.stop.is_set():
                self.stop.wait(0.005)


def test_stop_during_load_loses_and_duplicates_nothing(mta_factory, peer_factory):
    # The next hop answers each final dot up to 0.15 s late, so deliveries are in
    # flight when SIGTERM comes; all finish well within the 10 s grace.
    program = Path(__file__).with_name("test_crash_relay.py")
    [peer] = peer_factory.spawn({"data_end_delay": 0.15, "data_end_delay_min": 0.03},
                                program=program)
    peer_factory.ready()
    routes = "".join(f'"{d}" = "{peer.address}"\n' for d in DOMAINS)
    mta = mta_factory(extra="[relay]\nconcurrency = 24\nper_destination = 8\n"
                            "shutdown_grace = \"10s\"\n[routes]\n" + routes)
    load = Load(mta.port)
    threads = [threading.Thread(target=load.run, args=(i,), daemon=True) for i in range(SENDERS)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: load.acked >= 40 and len(peer.transactions()) >= 10 or load.errors,
                 30, "mail flowing through", interval=0.01)
        inflight_before = mta.rows("SELECT COUNT(*) FROM recipients WHERE state = 'inflight'")[0][0]
        started = time.monotonic()
        status = mta.stop()            # SIGTERM while the senders go on
        took = time.monotonic() - started
    finally:
        load.stop.set()
        for t in threads:
            t.join(20)
    assert not load.errors, load.errors
    assert status in (0, -15), mta.log()     # twistd ends by re-raising SIGTERM
    log = mta.log()
    # The stop waited for the deliveries instead of cutting them off.
    assert "interrupted at shutdown" not in log, log
    assert re.search(r"stopping: waiting up to 10(\.0)?s for \d+ deliveries in progress", log), log
    assert took < 8, took
    left = dict(tuple(r) for r in mta.rows("SELECT state, COUNT(*) FROM recipients "
                                            "GROUP BY state"))
    assert "inflight" not in left, left
    refused = [i for i in load.items if i.status == "refused"]
    acked = [i for i in load.items if i.status == "ok"]
    print(f"{len(acked)} acknowledged, {len(refused)} refused at the stop, "
          f"{inflight_before} recipients in flight just before SIGTERM, left queued: {left}")

    mta.start()
    wait_for(lambda: mta.count("messages") == 0, 30, "the spool to drain after the restart",
             interval=0.05)

    got = Counter()
    for tx in peer.transactions():
        m = TOKEN.search(tx.data)
        assert m, tx.data[:300]
        for rcpt in tx.accepted:
            got[(m.group(1).decode(), rcpt)] += 1
    twice = {k: n for k, n in got.items() if n > 1}
    assert not twice, f"delivered more than once: {twice}"
    by_token = {i.token: i for i in load.items}
    for (token, rcpt) in got:
        item = by_token.get(token)
        assert item is not None and rcpt in item.rcpts, (token, rcpt)
        assert item.status == "ok", f"{token} was delivered but never got its 250 ({item.status})"
    for item in acked:
        missing = [r for r in item.rcpts if (item.token, r) not in got]
        assert not missing, f"{item.token} got a 250 but {missing} never arrived"


def test_delivery_outliving_the_grace_is_requeued(mta_factory, peer_factory):
    [peer] = peer_factory.spawn({"actions": {"DATA_END": "stall"}})
    peer_factory.ready()
    mta = mta_factory(extra=f'[relay]\nshutdown_grace = "0.3s"\n[routes]\n'
                            f'"slow.test" = "{peer.address}"\n')
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=10) as s:
        s.sendmail("a@origin.test", ["b@slow.test"], b"Subject: slow\r\n\r\nbody\r\n")
    wait_for(lambda: [tuple(r) for r in mta.rows("SELECT state FROM recipients")] == [
        ("inflight",)], 10, "the delivery to start")
    assert mta.stop() in (0, -15)
    assert [tuple(r) for r in mta.rows("SELECT address, state FROM recipients")] == [
        ("b@slow.test", "queued")]
    log = mta.log()
    assert "waiting up to 0.3s for 1 deliveries in progress" in log, log
    assert re.search(r"delivery to slow\.test interrupted at shutdown; 1 recipient\(s\) queued "
                     r"again", log), log


def test_open_session_gets_421_at_sigterm(mta):
    with socket.create_connection(("127.0.0.1", mta.port), timeout=10) as s:
        f = s.makefile("rb")
        assert f.readline().startswith(b"220 ")
        s.sendall(b"EHLO client.test\r\n")
        while not f.readline().startswith(b"250 "):
            pass
        mta.proc.send_signal(15)
        assert f.readline() == b"421 4.3.2 Service shutting down\r\n"
        assert f.readline() == b""
    assert mta.proc.wait(15) in (0, -15)


# --------------------------------------------------------------------------- --uid/--gid

def _proc_ids(pid: int) -> tuple[int, int]:
    uid = gid = -1
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                uid = int(line.split()[2])      # effective
            elif line.startswith("Gid:"):
                gid = int(line.split()[2])
    return uid, gid


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root")
def test_uid_drop_hands_the_spool_to_the_user(mta_factory, tmp_path):
    nobody = pwd.getpwnam("nobody")
    nogroup = grp.getgrnam("nogroup").gr_gid
    # The spool lives where nobody can reach it (pytest's temporary directory
    # is root's alone); the directory is new, so only spool files are in it.
    base = Path(tempfile.mkdtemp(prefix="mta-uid-"))
    try:
        base.chmod(0o755)
        spool = base / "spool" / "mta.sqlite"
        mta = mta_factory(start=False, spool=spool)
        # First as root, without --uid: the spool is created owned by root.
        mta.start()
        with smtplib.SMTP("127.0.0.1", mta.port, timeout=10) as s:
            s.sendmail("a@origin.test", ["first@dest.test"], b"Subject: 1\r\n\r\none\r\n")
        mta.stop()
        assert spool.stat().st_uid == 0

        # An interpreter nobody can read: the daemon checks that at startup.
        use_twistd_args(mta, "--uid", "nobody", "--gid", "nogroup", python=python_for_user())
        mta.start()
        assert _proc_ids(mta.pid) == (nobody.pw_uid, nogroup)
        with smtplib.SMTP("127.0.0.1", mta.port, timeout=10) as s:
            s.sendmail("a@origin.test", ["second@dest.test"], b"Subject: 2\r\n\r\ntwo\r\n")
        assert sorted(r[0] for r in mta.rows("SELECT address FROM recipients")) == [
            "first@dest.test", "second@dest.test"]
        for path in [spool.parent, *spool.parent.iterdir()]:
            st = path.stat()
            assert (st.st_uid, st.st_gid) == (nobody.pw_uid, nogroup), path
        assert f"set uid/gid {nobody.pw_uid}/{nogroup}" in mta.log()
        assert mta.stop() in (0, -15)
    finally:
        shutil.rmtree(base, ignore_errors=True)
