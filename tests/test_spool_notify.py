"""Wake-ups across processes on one spool (mta.spool.notify), against a
real PostgreSQL (tests/pg.py):

* a store, a release (ETRN) by one node, and ``mta queue flush`` run in a
  subprocess wake another node's listener;
* a queue runner whose poll is an hour away delivers mail another node
  stored, woken by its listener;
* the listener survives a restart of the database: one line says it lost
  the connection, it reconnects by itself and is woken again;
* on SQLite there is no listener (the poll stays the only path).

The listener runs its thread for real; the reactor is :class:`Pumped` (a
task.Clock whose ``callFromThread`` queues the call for the test thread,
which plays the reactor thread while it waits).
"""
from __future__ import annotations

import queue
import time
from typing import Any, Callable

import pytest
from twisted.internet import task
from twisted.logger import LogLevel, globalLogPublisher

from fakespool import SyncSpool
from test_queuecmd import mta_command
from test_scheduler import FakePool, FakeRouter, smtp
from conftest import subprocess_env, toml_text
from waiting import wait_for

from mta.config import RelayConfig, RetryConfig
from mta.delivery.scheduler import QueueRunner
from mta.message import InboundMessage, Recipient, new_queue_id
from mta.spool import Spool
from mta.spool.notify import QueueListener

WAIT = 10          # seconds: generous for a loaded machine; a wake takes milliseconds


class Pumped(task.Clock):
    """A Clock that takes calls from other threads; :meth:`pump` runs them."""

    def __init__(self) -> None:
        super().__init__()
        self.from_threads: queue.SimpleQueue = queue.SimpleQueue()

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kw: Any) -> None:
        self.from_threads.put((f, args, kw))

    def pump(self) -> None:
        while True:
            try:
                f, args, kw = self.from_threads.get_nowait()
            except queue.Empty:
                return
            f(*args, **kw)


class Woken:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> None:
        self.n += 1


def until(reactor: Pumped, predicate: Callable[[], Any], what: str) -> None:
    wait_for(lambda: (reactor.pump(), predicate())[1], WAIT, what)


@pytest.fixture
def listening(pg_url):
    """(reactor, woken, listener) on pg_url, connected and listening."""
    reactor = Pumped()
    woken = Woken()
    listener = QueueListener(pg_url, woken, reactor=reactor, retry_first=0.05, retry_max=0.5)
    listener.startService()
    # Once connected it wakes once, for what it may have missed meanwhile.
    until(reactor, lambda: woken.n >= 1, "the listener to connect")
    yield reactor, woken, listener
    d = listener.stopService()
    stopped: list = []
    d.addBoth(stopped.append)
    until(reactor, lambda: stopped, "the listener to stop")


def message(now: float, rcpts=("bob@dest.test",)) -> InboundMessage:
    qid = new_queue_id(now)
    headers = b"Received: by us\r\nSubject: test\r\n\r\n"
    body = b"hello\r\n"
    return InboundMessage(queue_id=qid, sender="alice@example.test",
                          recipients=[Recipient(a) for a in rcpts], headers=headers, body=body,
                          arrival=now, client_address="127.0.0.1", helo="client",
                          protocol="ESMTP", size=len(headers) + len(body))


def test_a_store_on_another_node_wakes_the_listener(listening, pg_url):
    reactor, woken, _listener = listening
    other = SyncSpool(pg_url, node="B")
    try:
        before = woken.n
        other.store(message(time.time()))
        until(reactor, lambda: woken.n > before, "a wake-up for the new message")
    finally:
        other.engine.dispose()


def test_a_release_on_another_node_wakes_the_listener(listening, pg_url):
    reactor, woken, _listener = listening
    other = SyncSpool(pg_url, node="B")
    try:
        other.store(message(time.time() + 3600, rcpts=("carol@hold.test",)))
        until(reactor, lambda: woken.n >= 2, "a wake-up for the stored message")
        before = woken.n
        rel = other.release("hold.test", False, now=time.time(), hostname="mx.test",
                            how="ETRN from 192.0.2.7").result
        assert rel.recipients == 1
        until(reactor, lambda: woken.n > before, "a wake-up for the release")
    finally:
        other.engine.dispose()


def test_mta_queue_flush_in_another_process_wakes_the_listener(listening, pg_url, tmp_path):
    import subprocess

    reactor, woken, _listener = listening
    other = SyncSpool(pg_url, node="B")
    try:
        other.store(message(time.time()))
        other.sql("UPDATE recipients SET state = 'deferred', next_attempt = ?", 10 ** 10)
        until(reactor, lambda: woken.n >= 2, "a wake-up for the stored message")
    finally:
        other.engine.dispose()
    before = woken.n
    config = tmp_path / "mta.toml"
    config.write_text(toml_text({"server": {"hostname": "mx.test"}, "spool": {"url": pg_url}}))
    r = subprocess.run(mta_command("queue", "--config", str(config), "flush", "--all"),
                       capture_output=True, text=True, env=subprocess_env(),
                       stdin=subprocess.DEVNULL, timeout=60)
    assert r.returncode == 0, r.stderr
    until(reactor, lambda: woken.n > before, "a wake-up for the flush")


def test_a_runner_with_an_hour_long_poll_delivers_what_another_node_stored(pg_url):
    reactor = Pumped()
    reactor.advance(time.time())
    spool = SyncSpool(pg_url, node="A")
    pool, router = FakePool(), FakeRouter()
    runner = QueueRunner(spool, router, smtp(router, pool), hostname="mx.example.test",
                         retry=RetryConfig(first=300, max=3600, lifetime=86400),
                         relay=RelayConfig(), reactor=reactor, rand=lambda: 0.5,
                         poll_interval=3600.0)
    listener = Spool(pg_url, node="A", lease=300.0, reactor=reactor).listener(runner.kick)
    assert isinstance(listener, QueueListener)
    other = SyncSpool(pg_url, node="B")
    runner.startService()          # its first poll: the queue is empty
    listener.startService()
    try:
        until(reactor, lambda: listener.wakes >= 1, "the listener to connect")
        assert pool.calls == []
        other.store(message(reactor.seconds()))
        # No time passes on the runner's clock: only the wake-up can start it.
        until(reactor, lambda: len(pool.calls) == 1, "the delivery, woken by the listener")
        until(reactor, lambda: spool.sql("SELECT COUNT(*) FROM messages") == [(0,)],
              "the message to be recorded delivered")
    finally:
        d = listener.stopService()
        stopped: list = []
        d.addBoth(stopped.append)
        until(reactor, lambda: stopped, "the listener to stop")
        runner.stopService()
        other.engine.dispose()
        spool.engine.dispose()


def test_the_listener_survives_a_database_restart(listening, pg_url, pg_server):
    reactor, woken, _listener = listening
    lines: list[str] = []

    def observe(event: dict) -> None:
        if event.get("log_namespace") == "mta.spool.notify" and \
                event.get("log_level") in (LogLevel.warn, LogLevel.error):
            lines.append((event.get("log_format", ""), event.get("log_failure")))
    globalLogPublisher.addObserver(observe)
    try:
        before = woken.n
        pg_server.restart()
        # It finds the connection gone, says so, reconnects and wakes (for
        # what it missed meanwhile) ...
        until(reactor, lambda: woken.n > before, "the listener to reconnect")
        assert lines, "the lost connection was not logged"
        assert all(f is None for _l, f in lines), "a traceback was logged"
        # ... and is woken by the next change again.
        other = SyncSpool(pg_url, node="B")
        try:
            before = woken.n
            other.store(message(time.time()))
            until(reactor, lambda: woken.n > before, "a wake-up after the restart")
        finally:
            other.engine.dispose()
    finally:
        globalLogPublisher.removeObserver(observe)


def test_on_sqlite_the_listener_is_the_doorbell(tmp_path):
    """SQLite has no NOTIFY: its wake-ups are mta.spool.doorbell's sockets
    (tests/test_spool_doorbell.py)."""
    from mta.spool.doorbell import DoorbellListener
    spool = Spool(f"sqlite:///{tmp_path / 'mta.sqlite'}", node="A", lease=300.0,
                  reactor=task.Clock())
    listener = spool.listener(lambda: None)
    assert isinstance(listener, DoorbellListener)
    assert listener.directory == f"{tmp_path / 'mta.sqlite'}-wake"
