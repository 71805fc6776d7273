"""The spool under real faults (issue 8, section 1), against the real daemon:

* its directory removed (``rm -rf``) while it runs: no ``250`` for a message
  that a restart will not find; the spool is recreated from the open
  database and everything acknowledged is still there after a restart;
* an immutable (``chattr +i``) spool: ``451``, and mail is taken again as
  soon as the file is writable, without a restart;
* a small tmpfs that fills: ``452 4.3.1`` at MAIL below the free-space
  reserve, while the mail already queued is still delivered and its results
  recorded;
* spool failures logged one line each, repeats summarised.

Plus unit tests of the pieces: the server's reply with a fake storage probe
(StringTransport), the probe itself (fake statvfs and clock), the summary of
repeated failures (task.Clock).
"""
from __future__ import annotations

import os
import re
import shutil
import smtplib
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent

from conftest import free_port, toml_text, wait_for
from mta.spool.faults import RepeatedFailures, SpoolWriteError, describe
from mta.spool.space import FreeSpace

DELIVERY = 20.0


# --------------------------------------------------------------------------- helpers

def send(mta, i: int, *, mail_options=()) -> tuple[int, str]:
    """One message; (reply code, queue id or the reply text).  A refusal at
    any step counts: its code is returned."""
    with smtplib.SMTP(mta.host, mta.port, local_hostname="client.e2e.test", timeout=30) as s:
        s.ehlo("client.e2e.test")
        code, text = s.mail("alice@origin.test", list(mail_options))
        if code != 250:
            return code, text.decode()
        code, text = s.rcpt("bob@dest.test")
        if code != 250:
            return code, text.decode()
        code, text = s.data(f"Subject: fault {i}\r\n\r\nmessage {i}\r\n".encode())
        if code == 250:
            m = re.search(r"queued as ([0-9A-Z]+)$", text.decode())
            assert m, text
            return code, m.group(1)
        return code, text.decode()


def mail_reply(mta, mail_options=()) -> tuple[int, str]:
    """The reply to MAIL alone (the transaction is then reset)."""
    with smtplib.SMTP(mta.host, mta.port, local_hostname="client.e2e.test", timeout=30) as s:
        s.ehlo("client.e2e.test")
        code, text = s.mail("alice@origin.test", list(mail_options))
        s.rset()
        return code, text.decode()


def stored_ids(mta) -> set[str]:
    return {r["queue_id"] for r in mta.rows("SELECT queue_id FROM messages")}


def assert_complete(mta, qids: set[str]) -> None:
    """Exactly *qids* in the spool, each with its content and its recipient."""
    assert stored_ids(mta) == qids
    assert mta.count("contents") == len(qids)
    assert mta.count("recipients") == len(qids)


def spool_lines(mta) -> list[str]:
    """The lines logged by the spool itself (namespace mta.spool)."""
    return [line for line in mta.all_logs().splitlines() if "[mta.spool#" in line]


def chattr(flag: str, *paths: Path) -> None:
    subprocess.run(["chattr", flag, *map(str, paths)], check=True, capture_output=True)


# --------------------------------------------------------------------------- rm -rf

def remove_spool(mta, what: str) -> None:
    if what == "directory":
        shutil.rmtree(mta.spool.parent)
    else:                  # the files only: rm mta.sqlite*
        for p in mta.spool.parent.glob(mta.spool.name + "*"):
            p.unlink()
    if what == "files, then opened by another program":
        # e.g. a command run meanwhile: an empty database at the path
        conn = sqlite3.connect(mta.spool)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.close()
        assert mta.spool.stat().st_size > 0


@pytest.mark.parametrize("what", ["directory", "files", "files, then opened by another program"])
def test_spool_removed_under_the_daemon_keeps_every_250(mta, what):
    code, first = send(mta, 0)
    assert code == 250
    remove_spool(mta, what)

    outcomes = [send(mta, i) for i in range(1, 21)]
    for code, what in outcomes:
        assert code == 250 or 400 <= code < 500, (code, what)
    accepted = {what for code, what in outcomes if code == 250}
    # The spool was recreated from the open database at the first write
    # after the removal: nothing had to be refused.
    assert len(accepted) == 20, outcomes
    assert mta.spool.exists()
    lines = [l for l in spool_lines(mta) if "was removed or replaced while in use" in l]
    assert len(lines) == 1, spool_lines(mta)
    assert "(1 messages)" in lines[0]

    mta.restart()
    assert_complete(mta, accepted | {first})


def test_spool_removed_then_the_daemon_stopped_keeps_its_mail(mta):
    qids = {send(mta, i)[1] for i in range(3)}
    shutil.rmtree(mta.spool.parent)
    mta.restart()          # no write in between: the stop itself carries it over
    assert_complete(mta, qids)


def test_spool_that_cannot_be_recreated_refuses_then_recovers(mta):
    code, first = send(mta, 0)
    assert code == 250
    directory = mta.spool.parent
    shutil.rmtree(directory)
    directory.write_text("a file where the spool directory was\n")   # makedirs fails

    refused = [send(mta, i) for i in range(1, 4)]
    assert [(code, text[:5]) for code, text in refused] == [(451, "4.3.0")] * 3, refused
    lines = [l for l in spool_lines(mta) if "cannot be recreated" in l]
    assert len(lines) == 1, spool_lines(mta)       # the repeats are counted, not logged

    directory.unlink()
    outcomes = [send(mta, i) for i in range(4, 7)]
    assert [code for code, _ in outcomes] == [250] * 3, outcomes
    wait_for(lambda: any("spool write succeeded again after 3 failure(s) in " in l
                         for l in spool_lines(mta)), 10, "the recovery line")

    mta.restart()
    assert_complete(mta, {first} | {qid for _, qid in outcomes})


def test_spool_replaced_by_another_programs_spool_keeps_both(mta):
    # rm -rf, then sendmail (a cron job, say) makes a spool of its own at the
    # path before the daemon writes again: the daemon must not overwrite it,
    # and must not lose what it had acknowledged before the removal either.
    qids = {send(mta, i)[1] for i in range(3)}
    shutil.rmtree(mta.spool.parent)
    proc = subprocess.run([sys.executable, "-m", "mta.sendmail", "--config", str(mta.config_path),
                           "root@dest.test"], input=b"Subject: cron\n\nfrom cron\n",
                          capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    refused = [send(mta, i) for i in range(3, 5)]
    assert [code for code, _ in refused] == [451] * 2, refused
    mta.stop()
    saved = list(mta.spool.parent.glob(mta.spool.name + ".saved-*"))
    assert len(saved) == 1, list(mta.spool.parent.iterdir())
    assert any(f"the 3 messages of the removed one are saved in {saved[0]}" in l
               for l in spool_lines(mta)), spool_lines(mta)
    conn = sqlite3.connect(saved[0])
    try:
        assert {r[0] for r in conn.execute("SELECT queue_id FROM messages")} == qids
        assert conn.execute("SELECT COUNT(*) FROM recipients").fetchone()[0] == 3
    finally:
        conn.close()
    # sendmail's spool is where it was, with sendmail's message.
    assert stored_ids(mta).isdisjoint(qids) and mta.count() == 1


# --------------------------------------------------------------------------- read-only

def test_immutable_spool_is_used_again_once_writable_without_restart(mta):
    # The spool's writer opens its connection (and so the -wal file) in its
    # thread just after the start: until then there is no -wal to make
    # immutable, and one created after the look below would take the
    # commits (durably: a correct 250, but not the immutable spool this is about).
    wait_for(lambda: Path(f"{mta.spool}-wal").exists(), 10, "the spool's -wal file")
    # Not -shm: it is mapped into memory, and writing to a mapped page of an
    # immutable file is SIGBUS, not an error SQLite could report.
    files = [p for p in (mta.spool, Path(f"{mta.spool}-wal")) if p.exists()]
    chattr("+i", *files)
    try:
        refused = [send(mta, i) for i in range(3)]
    finally:
        chattr("-i", *files)
    assert [(code, text[:5]) for code, text in refused] == [(451, "4.3.0")] * 3, refused

    outcomes = [send(mta, i) for i in range(3, 6)]
    assert [code for code, _ in outcomes] == [250] * 3, outcomes
    mta.restart()
    assert_complete(mta, {qid for _, qid in outcomes})


def test_spool_made_immutable_while_in_use_recovers(mta):
    code, first = send(mta, 0)
    assert code == 250
    files = [p for p in (mta.spool, Path(f"{mta.spool}-wal")) if p.exists()]
    chattr("+i", *files)
    try:
        refused = [send(mta, i) for i in range(1, 4)]
    finally:
        chattr("-i", *files)
    assert [code for code, _ in refused] == [451] * 3, refused
    outcomes = [send(mta, i) for i in range(4, 7)]
    assert [code for code, _ in outcomes] == [250] * 3, outcomes
    mta.restart()
    assert_complete(mta, {first} | {qid for _, qid in outcomes})


# --------------------------------------------------------------------------- logging

def relay_to_nowhere() -> str:
    """``extra`` config: delivery on, dest.test routed to a port where
    nothing listens (every attempt deferred, retried each second)."""
    extra = toml_text({"relay": {}, "retry": {"first": "1s", "max": "1s"},
                       "dns": {"nameservers": ["127.0.0.1:9"], "timeout": "1s"}})
    return extra + f'[routes]\n"dest.test" = "127.0.0.1:{free_port()}"\n'


def test_spool_failures_are_one_line_each_and_repeats_are_summarised(mta_factory):
    mta = mta_factory(extra=relay_to_nowhere())
    code, qid = send(mta, 0)
    assert code == 250
    wait_for(lambda: mta.rows("SELECT attempts FROM recipients")[0]["attempts"] >= 1,
             DELIVERY, "the first (deferred) attempt")
    # The queue runner cannot claim work (its recipient is due again within a
    # second, and stays due), then new messages cannot be stored either.
    mta.execute("CREATE TRIGGER e2e_claim BEFORE UPDATE ON recipients "
                "BEGIN SELECT RAISE(ABORT, 'e2e claim trouble'); END")
    wait_for(lambda: any("(claim_and_load): IntegrityError: e2e claim trouble" in l
                         for l in spool_lines(mta)), DELIVERY, "a failed claim")
    mta.execute("CREATE TRIGGER e2e_store BEFORE INSERT ON messages "
                "BEGIN SELECT RAISE(ABORT, 'e2e disk trouble'); END")
    refused = [send(mta, i) for i in range(1, 6)]
    assert [code for code, _ in refused] == [451] * 5
    mta.execute("DROP TRIGGER e2e_store")
    mta.execute("DROP TRIGGER e2e_claim")
    code, _ = send(mta, 6)
    assert code == 250
    wait_for(lambda: any("succeeded again" in l for l in spool_lines(mta)), 10, "recovery line")

    lines = spool_lines(mta)
    failed = [l for l in lines if "e2e disk trouble" in l]
    assert len(failed) == 2, lines
    assert re.search(r"\[mta\.spool#error\] spool write failed \([0-9A-Z]+\): "
                     r"IntegrityError: e2e disk trouble$", failed[0]), failed
    assert re.search(r"\[mta\.spool#error\] spool write failed: IntegrityError: e2e disk "
                     r"trouble \(repeated 4 times in the last \d+ s\)$", failed[1]), failed
    claims = [l for l in lines if "e2e claim trouble" in l]
    assert 1 <= len(claims) <= 2, lines          # the first, and the summary of repeats
    m = re.search(r"spool write succeeded again after (\d+) failure\(s\) in \d+ s$", lines[-1])
    assert m and int(m.group(1)) >= 6, lines
    # No traceback anywhere (the fixture checks the whole log too), nothing
    # more from the queue runner about the failed claims, and the server's
    # line for each refused message is one line without the SQL.
    log = mta.all_logs()
    assert "Traceback" not in log
    assert "queue run failed" not in log
    server = [l for l in log.splitlines() if "[mta.smtpd#error] spool failure" in l]
    assert len(server) == 5
    assert all(l.endswith("spool write failed: IntegrityError: e2e disk trouble")
               for l in server), server


class _Captured:
    def __init__(self) -> None:
        self.events: list[dict] = []
        self.log = Logger(namespace="test.faults", observer=self.events.append)

    @property
    def lines(self) -> list[str]:
        return [formatEvent(e) for e in self.events]


def test_repeated_failures_one_line_then_one_summary_per_window():
    clock, out = Clock(), _Captured()
    faults = RepeatedFailures(out.log, clock, what="spool write", window=60.0)
    full = "OperationalError: database or disk is full"
    for i in range(120):                       # twice a second for a minute
        faults.failed(full, "claim_due_and_load" if i % 2 else f"QID{i}")
        clock.advance(0.5)
    assert out.lines == ["spool write failed (QID0): OperationalError: database or disk is full",
                         "spool write failed: OperationalError: database or disk is full "
                         "(repeated 119 times in the last 60 s)"]
    faults.failed("OperationalError: database is locked", "QIDX")     # another failure
    assert out.lines[-1] == "spool write failed (QIDX): OperationalError: database is locked"
    clock.advance(10)
    faults.failed(full, "QIDY")
    faults.succeeded()
    assert out.lines[2:] == [
        "spool write failed (QIDX): OperationalError: database is locked",
        "spool write failed: OperationalError: database or disk is full "
        "(repeated 1 times in the last 10 s)",
        "spool write succeeded again after 122 failure(s) in 70 s"]
    assert clock.getDelayedCalls() == []
    n = len(out.lines)
    faults.succeeded()                          # nothing to say
    assert len(out.lines) == n
    # Quiet for a whole window: the next one is logged in full again.
    faults.failed(full, "Q1")
    clock.advance(61)
    faults.failed(full, "Q2")
    assert out.lines[n:] == [f"spool write failed (Q1): {full}", f"spool write failed (Q2): {full}"]


def test_describe_is_one_line_without_the_sql():
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError
    engine = create_engine("sqlite://")
    with engine.connect() as conn:
        try:
            conn.execute(text("INSERT INTO nowhere VALUES (:x)"), {"x": b"\n" * 10})
        except OperationalError as e:
            error = e
    assert describe(error) == "OperationalError: no such table: nowhere"
    assert describe(OSError(28, "No space left on device")) == \
        "OSError: [Errno 28] No space left on device"
    # The spool's own errors already say what failed, in one line.
    assert describe(SpoolWriteError("spool write failed:\n OSError: gone")) == \
        "spool write failed: OSError: gone"


def test_repeated_failures_with_a_consequence_and_many_distinct_errors():
    clock, out = Clock(), _Captured()
    faults = RepeatedFailures(out.log, clock, what="a queue run",
                              consequence="tried again at the next queue run")
    for i in range(RepeatedFailures.MAX_ERRORS + 5):
        faults.failed(f"error {i}")
    lines = out.lines
    assert lines[0] == "a queue run failed: error 0; tried again at the next queue run"
    assert len(lines) == RepeatedFailures.MAX_ERRORS         # the rest only counted
    clock.advance(2)
    faults.succeeded()
    assert out.lines[-1] == (f"a queue run succeeded again after "
                             f"{RepeatedFailures.MAX_ERRORS + 5} failure(s) in 2 s")


# --------------------------------------------------------------------------- reserve: units

class FakeFS:
    def __init__(self, free: int, frsize: int = 4096):
        self.free = free
        self.frsize = frsize
        self.calls = 0
        self.error: OSError | None = None

    def __call__(self, path: str):
        self.calls += 1
        if self.error is not None:
            raise self.error
        return SimpleNamespace(f_bavail=self.free // self.frsize, f_frsize=self.frsize)


def test_free_space_floor_size_and_cache():
    now = [1000.0]
    fs = FakeFS(free=16 * 4096 * 1000)                      # 65,536,000 bytes
    probe = FreeSpace("/spool", minfree=0, max_message_size=40_000_000, clock=lambda: now[0],
                      statvfs=fs)
    assert probe.floor == 60_000_000                        # 1.5 x max_message_size
    assert probe(0) and probe(40_000_000)                   # SIZE within the limit fits
    assert fs.calls == 1                                    # cached
    fs.free = 59_000_000
    assert probe(0)                                         # still the cached value
    now[0] += 1.0
    assert not probe(0) and not probe(1000)
    assert fs.calls == 2

    # queue_minfree larger than the 1.5x rule; and SIZE counts on top of it.
    probe = FreeSpace("/spool", minfree=100_000_000, max_message_size=10_000_000,
                      clock=lambda: now[0], statvfs=FakeFS(free=120_000_000))
    assert probe.floor == 100_000_000
    assert probe(0) and probe(19_000_000) and not probe(21_000_000)

    # No size limit: only SIZE tells (1.5 x SIZE, and minfree + SIZE).
    probe = FreeSpace("/spool", minfree=0, max_message_size=0, clock=lambda: now[0],
                      statvfs=FakeFS(free=30_000_000))
    assert probe(0) and probe(19_000_000) and not probe(21_000_000)

    # A file system that cannot be read: the write itself will tell.
    broken = FakeFS(free=0)
    broken.error = PermissionError(13, "Permission denied")
    probe = FreeSpace("/spool", minfree=0, max_message_size=1000, clock=lambda: now[0],
                      statvfs=broken)
    assert probe(0)


def test_free_space_of_a_removed_directory_is_its_parents():
    seen = []
    fs = FakeFS(free=10_000_000)

    def statvfs(path):
        seen.append(path)
        if path != "/":
            raise FileNotFoundError(2, "No such file or directory")
        return fs(path)
    probe = FreeSpace("/var/spool/mta", minfree=0, max_message_size=1_000_000,
                      clock=lambda: 0.0, statvfs=statvfs)
    assert probe(0)
    assert seen == ["/var/spool/mta", "/var/spool", "/var", "/"]


def test_server_refuses_mail_with_452_when_storage_says_no():
    from twisted.internet.testing import MemoryReactorClock

    from mta.policy import RelayPolicy
    from mta.smtp.server import ServerSettings, SMTPServerFactory
    from smtpwire import Client, FakeSpool

    asked: list[int] = []
    room = [True]

    def storage(size: int) -> bool:
        asked.append(size)
        return room[0] and size <= 5000

    factory = SMTPServerFactory(ServerSettings(hostname="mx.example.test", max_message_size=10000),
                                FakeSpool(auto=True), RelayPolicy(["127.0.0.0/8"], []),
                                reactor=MemoryReactorClock(), storage=storage)
    c = Client(factory, ip="127.0.0.1")
    c.ehlo()
    assert c.cmd("MAIL FROM:<a@example.org> SIZE=6000") == "452 4.3.1 Insufficient system storage"
    assert c.cmd("RCPT TO:<u@example.test>").startswith("503 5.5.1")
    assert c.cmd("MAIL FROM:<a@example.org> SIZE=20000").startswith("552 5.3.4")  # limit first
    assert c.cmd("MAIL FROM:<a@example.org> SIZE=5000").startswith("250 2.1.0")
    assert c.cmd("RSET").startswith("250")
    room[0] = False
    assert c.cmd("MAIL FROM:<a@example.org>") == "452 4.3.1 Insufficient system storage"
    room[0] = True
    assert c.cmd("MAIL FROM:<a@example.org>").startswith("250 2.1.0")
    assert asked == [6000, 5000, 0, 0]
    # A 4xx does not count towards max_errors, and the session goes on.
    assert c.cmd("NOOP").startswith("250")


# --------------------------------------------------------------------------- reserve: e2e

def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_full_disk_refuses_new_mail_at_mail_and_queued_mail_still_drains(
        small_fs, mta_factory, peer_factory):
    port = free_port()       # nothing listens there yet: deliveries are deferred
    limit = 1_000_000        # reserve: 1.5 MB free
    extra = toml_text({"relay": {}, "retry": {"first": "1s", "max": "1s"},
                       "dns": {"nameservers": ["127.0.0.1:9"], "timeout": "1s"}})
    extra += f'[routes]\n"dest.test" = "127.0.0.1:{port}"\n'
    mta = mta_factory(spool=small_fs / "spool" / "mta.sqlite",
                      server={"max_message_size": limit}, extra=extra)
    queued = [send(mta, i) for i in range(3)]
    assert [code for code, _ in queued] == [250] * 3, queued
    qids = {qid for _, qid in queued}
    wait_for(lambda: all(r["attempts"] >= 1 for r in mta.rows("SELECT attempts FROM recipients")),
             DELIVERY, "a first (failed) attempt for each")

    # Fill the file system to below the reserve, leaving room to drain.
    with open(small_fs / "filler", "wb") as f:
        f.write(b"\0" * (free_bytes(small_fs) - 1_000_000))
    assert free_bytes(small_fs) < 1.5 * limit

    def refused() -> tuple[int, str] | None:
        code, text = mail_reply(mta)
        assert code in (250, 452), (code, text)
        return (code, text) if code == 452 else None
    code, text = wait_for(refused, 10, "452 at MAIL", interval=0.2)
    assert text == "4.3.1 Insufficient system storage"
    assert send(mta, 100, mail_options=["SIZE=1000"]) == (452, "4.3.1 Insufficient system storage")
    assert any("below the reserve of 1500000 bytes" in l for l in spool_lines(mta))

    # The queued mail still goes, and its results are recorded.
    peer = peer_factory(port=port)
    wait_for(lambda: mta.count() == 0, DELIVERY, "the queue to drain")
    assert mta.count("recipients") == 0
    got = peer.transactions()
    # Exactly the three queued messages, once each.
    assert len(got) == 3, got
    assert all(tx.accepted == ["bob@dest.test"] for tx in got), got
    assert {re.search(rb"id ([0-9A-Z]+)", tx.data).group(1).decode() for tx in got} == qids

    # Room again: mail is taken again.
    (small_fs / "filler").unlink()
    wait_for(lambda: mail_reply(mta)[0] == 250, 10, "250 once there is room", interval=0.2)
    assert send(mta, 101)[0] == 250
    assert any("free again" in l for l in spool_lines(mta))


def test_queue_minfree_config_key():
    from mta.config import ConfigError, config_from_dict, load_config
    assert config_from_dict({}).spool.queue_minfree == 0
    assert config_from_dict({"spool": {"queue_minfree": 200_000_000}}).spool.queue_minfree == \
        200_000_000
    for bad in (-1, "100M", 1.5, True):
        with pytest.raises(ConfigError) as e:
            config_from_dict({"spool": {"queue_minfree": bad}}, "x.toml")
        assert str(e.value).startswith("x.toml: [spool] queue_minfree: "), str(e.value)
    example = Path(__file__).resolve().parent.parent / "etc" / "mta.toml"
    text = example.read_text()
    assert "# queue_minfree = 0" in text
    assert load_config(example).spool.queue_minfree == 0


def test_lock_timeout_config_key():
    from mta.config import ConfigError, config_from_dict
    assert config_from_dict({}).spool.lock_timeout == 30.0
    assert config_from_dict({"spool": {"lock_timeout": "2s"}}).spool.lock_timeout == 2.0
    for bad in (0, -1, "2h", "soon", True):
        with pytest.raises(ConfigError) as e:
            config_from_dict({"spool": {"lock_timeout": bad}}, "x.toml")
        assert str(e.value).startswith("x.toml: [spool] lock_timeout: "), str(e.value)


def test_lock_timeout_is_the_sqlite_busy_timeout(tmp_path):
    from mta.spool import make_engine
    engine = make_engine(f"sqlite:///{tmp_path / 'mta.sqlite'}", 2.5)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 2500
    engine.dispose()


def test_mta_queue_and_sendmail_wait_the_configured_lock_timeout(tmp_path, monkeypatch):
    """[spool] lock_timeout is what ``mta queue`` and sendmail wait for the
    write lock too, not only the daemon."""
    import argparse
    import io
    from mta import queuecmd
    from mta.sendmail import main as sendmail_main
    from mta.spool import admin
    opened = []
    real = admin.open_engine

    def spy(url, **kw):
        engine = real(url, **kw)
        with engine.connect() as conn:
            opened.append(conn.exec_driver_sql("PRAGMA busy_timeout").scalar())
        return engine
    monkeypatch.setattr(admin, "open_engine", spy)
    config = tmp_path / "mta.toml"
    spool = tmp_path / "mta.sqlite"
    config.write_text('[server]\nhostname = "mx.example.test"\n'
                      f'[spool]\nurl = "sqlite:///{spool}"\nlock_timeout = "7s"\n')
    assert sendmail_main(["--config", str(config), "b@example.test"],
                         stdin=io.BytesIO(b"Subject: x\n\nHi.\n")) == 0
    queuecmd._Queue(argparse.Namespace(config=str(config)))
    assert opened == [7000, 7000]
