"""Wake-ups across processes on one SQLite spool (mta.spool.doorbell): a
real unix datagram socket, rung by other processes (a subprocess, ``mta
queue``); the reactor is a MemoryReactor whose reader is driven by hand."""
from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
from pathlib import Path

from twisted.internet.testing import MemoryReactor

from mta.spool.doorbell import DoorbellListener, wake_directory

RING = "import sys; from mta.spool.doorbell import ring; print(ring(sys.argv[1]))"


def ring_from_another_process(directory: str) -> int:
    out = subprocess.run([sys.executable, "-c", RING, directory], check=True,
                         capture_output=True, text=True).stdout
    return int(out)


def readable(listener: DoorbellListener, reactor: MemoryReactor) -> bool:
    [reader] = reactor.readers
    return bool(select.select([reader.fileno()], [], [], 5)[0])


def started(tmp_path: Path) -> tuple[DoorbellListener, MemoryReactor, list[int]]:
    reactor = MemoryReactor()
    wakes: list[int] = []
    listener = DoorbellListener(wake_directory(str(tmp_path / "mta.sqlite")),
                                lambda: wakes.append(1), reactor=reactor)
    listener.startService()
    return listener, reactor, wakes


def test_a_ring_from_another_process_wakes_the_listener_once_per_burst(tmp_path: Path) -> None:
    listener, reactor, wakes = started(tmp_path)
    directory = tmp_path / "mta.sqlite-wake"
    assert os.listdir(directory) == [str(os.getpid())]
    assert ring_from_another_process(str(directory)) == 1
    assert ring_from_another_process(str(directory)) == 1
    assert readable(listener, reactor)
    [reader] = reactor.readers
    reader.doRead()
    assert wakes == [1]                  # two rings waiting: one wake, both drained
    assert not select.select([reader.fileno()], [], [], 0)[0]
    listener.stopService()
    assert reactor.readers == set() and os.listdir(directory) == []


def test_the_ringer_skips_its_own_socket_and_removes_dead_ones(tmp_path: Path) -> None:
    from mta.spool.doorbell import ring
    listener, reactor, wakes = started(tmp_path)
    directory = tmp_path / "mta.sqlite-wake"
    assert ring(str(directory)) == 0     # this process's own runner is kicked in-process
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dead.bind(str(directory / "999999999"))
    dead.close()                         # as a killed process leaves it
    assert ring_from_another_process(str(directory)) == 1
    assert sorted(os.listdir(directory)) == [str(os.getpid())]
    listener.stopService()


def test_a_spool_with_no_listener_rings_nobody(tmp_path: Path) -> None:
    assert ring_from_another_process(str(tmp_path / "none-wake")) == 0


ADMIN = """
import sys, time
from mta.message import InboundMessage, Recipient
from mta.spool.admin import SpoolAdmin
a = SpoolAdmin.open(sys.argv[1], hostname="mx.test")
if sys.argv[2] == "submit":
    a.submit([InboundMessage(queue_id="Q1", sender="a@example.org",
                             recipients=[Recipient("b@dest.test")], headers=b"", body=b"x",
                             arrival=time.time(), client_address="127.0.0.1", helo="c",
                             protocol="ESMTP", size=1)])
else:
    print(a.flush(now=time.time()).recipients)
a.close()
"""


def admin(url: str, what: str) -> str:
    return subprocess.run([sys.executable, "-c", ADMIN, url, what], check=True,
                          capture_output=True, text=True).stdout


def test_sendmail_and_mta_queue_flush_ring_the_daemon(tmp_path: Path) -> None:
    """A message written by another process (``mta sendmail``) and ``mta
    queue flush`` ring after their commit: the daemon's runner is woken at
    once instead of at its next poll."""
    from mta.spool.admin import SpoolAdmin
    url = f"sqlite:///{tmp_path / 'mta.sqlite'}"
    SpoolAdmin.open(url, hostname="mx.test", create=True).close()
    listener, reactor, wakes = started(tmp_path)
    [reader] = reactor.readers
    assert admin(url, "flush").split() == ["0"]     # nothing changed: no ring
    assert not select.select([reader.fileno()], [], [], 0.1)[0]
    admin(url, "submit")
    assert readable(listener, reactor)
    reader.doRead()
    assert admin(url, "flush").split() == ["1"]
    assert readable(listener, reactor)
    reader.doRead()
    assert wakes == [1, 1]
    listener.stopService()
