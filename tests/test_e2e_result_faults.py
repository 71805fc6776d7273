"""End-to-end: delivery results that the spool refuses for a while, with
real faults on the real daemon (conftest.MTADaemon) and a scripted next hop
(tests/peers.py, through test_crash_relay's slow-reply wrapper) that records
every transaction it is given.

While deliveries are under way (their final replies held by the next hop),
the spool stops taking writes: another process holds ``BEGIN EXCLUSIVE``
past the daemon's ``[spool] lock_timeout``, or the database and its WAL are made
immutable (``chattr +i``).  Once the spool takes writes again, every result
must be recorded in the same process: every recipient delivered exactly
once, none left in flight, nothing sent again after a restart.  And a queue
pass claims only what its slots can start: the rest stays queued.
"""
from __future__ import annotations

import errno
import shutil
import smtplib
import sqlite3
import subprocess
from collections import Counter
from pathlib import Path

from conftest import wait_for
from test_e2e_relay import SENDER, message, relay_config, wait_spool_empty

SLOW_PEER = Path(__file__).with_name("test_crash_relay.py")   # peers.py, final replies held
HOLD = {"data_end_delay_min": 3, "data_end_delay": 3.5}        # seconds a final reply is held
MESSAGES = 10                # two recipients each; per_destination (20) lets all go at once
RECORD_FAILED = "recording delivery results failed: "    # the queue runner's line
SPOOL_FAILED = "spool write failed (record_results)"      # the spool's own
CHATTR = shutil.which("chattr") or "/usr/bin/chattr"   # e2fsprogs: on every Debian


def delivered(peer) -> Counter:
    """How many times the next hop accepted each recipient of ours."""
    return Counter(r for tx in peer.transactions() if tx.mail_address == SENDER
                   for r in tx.accepted)


def start(mta_factory, peer_factory, **kw):
    [dest] = peer_factory.spawn(HOLD, program=SLOW_PEER)
    mta = mta_factory(extra=relay_config(routes={"dest.test": dest.address}), **kw)
    peer_factory.ready()
    # No traceback in the log (the fixture checks it at teardown): the
    # spool and the queue runner log one line per distinct failure.
    rcpts = []
    with smtplib.SMTP(mta.host, mta.port, timeout=10) as s:
        for i in range(MESSAGES):
            pair = [f"m{i}a@dest.test", f"m{i}b@dest.test"]
            assert s.sendmail(SENDER, pair, message(f"fault {i}")) == {}
            rcpts += pair
    # Every delivery under way (claimed: no claim is left to write): the next
    # hop has every content, its replies are held.
    wait_for(lambda: len(dest.transactions()) == MESSAGES, 15, "deliveries under way",
             interval=0.02)
    return mta, dest, rcpts


def sent_lines(mta) -> int:
    return sum(" status=sent " in ln for ln in mta.log().splitlines())


def record_failed(mta) -> bool:
    text = mta.log()
    return RECORD_FAILED in text or SPOOL_FAILED in text


def check_after_recovery(mta, dest, rcpts: list[str]) -> None:
    # Every result recorded in the same process: the spool drains, nothing in flight.
    wait_spool_empty(mta, timeout=90)
    assert delivered(dest) == Counter({r: 1 for r in rcpts})
    # Each distinct failure logged once, not once per try.
    trouble = [ln.split("] ", 1)[-1] for ln in mta.log().splitlines() if RECORD_FAILED in ln]
    assert trouble and len(trouble) == len(set(trouble)), trouble
    # Logged once the write that emptied the spool has been answered: a moment later.
    wait_for(lambda: "recording delivery results succeeded again after" in mta.log(), 10,
             "the recovery line", interval=0.05)
    # A restart finds nothing to attempt again; a new message after it goes
    # through (by then a re-sent one would have reached the next hop too).
    mta.restart()
    with smtplib.SMTP(mta.host, mta.port, timeout=10) as s:
        s.sendmail(SENDER, ["after@dest.test"], message("after the restart"))
    wait_for(lambda: delivered(dest)["after@dest.test"], 30, "the message after the restart",
             interval=0.05)
    wait_spool_empty(mta)
    assert delivered(dest) == Counter({r: 1 for r in rcpts + ["after@dest.test"]})
    assert "in flight at the last stop" not in mta.log()


def test_lock_held_past_the_lock_timeout_while_deliveries_finish(mta_factory, peer_factory):
    mta, dest, rcpts = start(mta_factory, peer_factory, spool_options={"lock_timeout": "2s"})
    lock = sqlite3.connect(mta.spool, timeout=30, isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")
        assert sent_lines(mta) < len(rcpts), \
            "every result was recorded before the lock was taken: the test proves nothing"
        # Held until a result failed to record ([spool] lock_timeout, 2 s, has passed).
        wait_for(lambda: record_failed(mta), 90, "a result that failed to record", interval=0.1)
        assert mta.rows("SELECT COUNT(*) FROM recipients WHERE state = 'inflight'")[0][0] > 0
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    check_after_recovery(mta, dest, rcpts)


def test_immutable_spool_files_while_deliveries_finish(mta_factory, peer_factory):
    mta, dest, rcpts = start(mta_factory, peer_factory)
    files = [str(mta.spool), f"{mta.spool}-wal"]
    subprocess.run([CHATTR, "+i", *files], check=True)
    try:
        assert sent_lines(mta) < len(rcpts), \
            "every result was recorded before the files were made immutable"
        # Every delivery finished while the files could not be written.
        wait_for(lambda: sent_lines(mta) >= len(rcpts) and record_failed(mta), 60,
                 "every delivery to finish", interval=0.1)
        assert mta.rows("SELECT COUNT(*) FROM recipients WHERE state = 'inflight'")[0][0] > 0
    finally:
        subprocess.run([CHATTR, "-i", *files], check=True)
    check_after_recovery(mta, dest, rcpts)


def fill(directory: Path) -> Path:
    """Fill the file system of *directory* to the last byte (ENOSPC)."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (1 << 20, 1 << 12, 1 << 9, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
    return filler


def test_disk_full_while_deliveries_finish(small_fs, mta_factory, peer_factory):
    # The spool on a 4 MiB tmpfs (conftest.small_fs); a small
    # message size limit keeps the free-space reserve (1.5 x) well under it.
    mta, dest, rcpts = start(mta_factory, peer_factory, spool=small_fs / "spool" / "mta.sqlite",
                             server={"max_message_size": 100_000})
    filler = fill(small_fs)
    try:
        assert sent_lines(mta) < len(rcpts), \
            "every result was recorded before the disk was full"
        wait_for(lambda: sent_lines(mta) >= len(rcpts) and record_failed(mta), 60,
                 "every delivery to finish", interval=0.1)
        assert "database or disk is full" in mta.log()
        assert mta.rows("SELECT COUNT(*) FROM recipients WHERE state = 'inflight'")[0][0] > 0
    finally:
        filler.unlink()
    check_after_recovery(mta, dest, rcpts)


def test_a_pass_claims_only_what_its_slots_can_start(mta_factory, peer_factory):
    # Not a fault, the same setting: 30 messages waiting for 3 delivery slots
    # stay queued (visible, flushable) instead of all in flight at once: in
    # flight are the 3 in delivery and one waiting for each (scheduler.AHEAD).
    [dest] = peer_factory.spawn({"data_end_delay_min": 0.3, "data_end_delay": 0.5},
                                program=SLOW_PEER)
    mta = mta_factory(extra=relay_config(routes={"dest.test": dest.address},
                                         relay={"concurrency": 3}))
    peer_factory.ready()
    rcpts = [f"r{i}@dest.test" for i in range(30)]
    with smtplib.SMTP(mta.host, mta.port, timeout=10) as s:
        for i, r in enumerate(rcpts):
            assert s.sendmail(SENDER, [r], message(f"claim {i}")) == {}
    seen: list[dict[str, int]] = []

    def drained() -> bool:
        seen.append({state: n for state, n in mta.rows(
            "SELECT state, COUNT(*) FROM recipients GROUP BY state")})
        return not seen[-1] and mta.count("messages") == 0
    wait_for(drained, 60, "the spool to drain", interval=0.02)
    assert max(s.get("inflight", 0) for s in seen) <= 6, seen
    assert max(s.get("queued", 0) for s in seen) >= 20, seen
    assert delivered(dest) == Counter({r: 1 for r in rcpts})


def test_stop_while_results_are_refused_logs_what_stays_in_flight(mta_factory, peer_factory):
    mta, dest, rcpts = start(mta_factory, peer_factory)
    files = [str(mta.spool), f"{mta.spool}-wal"]
    subprocess.run([CHATTR, "+i", *files], check=True)
    try:
        wait_for(lambda: sent_lines(mta) >= len(rcpts) and record_failed(mta), 60,
                 "every delivery to finish", interval=0.1)
        mta.stop()      # the last try is refused too
    finally:
        subprocess.run([CHATTR, "-i", *files], check=True)
    lines = [ln for ln in mta.log().splitlines() if "were not recorded (its last write failed" in ln]
    assert len(lines) == MESSAGES, lines
    assert sorted(r for ln in lines for r in ln.rsplit(": ", 1)[1].split(", ")) == sorted(rcpts)
    assert mta.rows("SELECT COUNT(*) FROM recipients WHERE state = 'inflight'")[0][0] == len(rcpts)
    # At least once: the next start attempts them again.
    mta.start()
    wait_spool_empty(mta, timeout=60)
    assert delivered(dest) == Counter({r: 2 for r in rcpts})
