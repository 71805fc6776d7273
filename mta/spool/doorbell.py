"""Wake-ups across the processes on one SQLite spool file (PostgreSQL has
``LISTEN``/``NOTIFY``, mta.spool.notify): unix datagram sockets in a
directory next to the file, ``<spool file>-wake/``.

* :class:`DoorbellListener` -- the service of a process that runs a queue
  runner: it binds a socket in that directory named after its pid and
  calls *on_wake* (on the reactor thread) once per burst of datagrams.
* :func:`mark` / :func:`after_commit` -- a write that makes work due marks
  its connection (mta.spool.notify.notify does, on SQLite); whoever
  commits it calls :func:`after_commit` (mta.spool.admin's transactions)
  or :func:`pending` and later :func:`ring` (the spool's writer, once the
  sessions waiting for the commit are answered): every socket in the
  directory but the ringer's own is rung (its own runner is woken
  in-process) -- only after the commit, so the woken runner finds the rows.

As on PostgreSQL, a ring is a hint: the runner still polls, so a ring lost
(a full socket buffer, a directory it cannot write) waits for the next
poll.  A socket no process is bound to any more (its process was killed)
is removed by the first ring that finds it.
"""
from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import Connection
from twisted.application import service
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["wake_directory", "mark", "after_commit", "pending", "discard", "ring", "DoorbellListener"]

log = Logger()

_MARK = "mta.spool.wake"
#: sockaddr_un's sun_path: 108 bytes with the terminating NUL.
_MAX_PATH = 107


def wake_directory(db_path: str) -> str:
    """The directory of the wake-up sockets of the SQLite spool at *db_path*."""
    return os.path.abspath(db_path) + "-wake"


def mark(conn: Connection) -> None:
    """In a write's transaction on SQLite: ring the runners once it commits."""
    conn.info[_MARK] = True


def discard(conn: Connection) -> None:
    """After a rollback: nothing to ring."""
    conn.info.pop(_MARK, None)


def after_commit(conn: Connection) -> None:
    """After *conn* committed: ring if the transaction was :func:`mark`\\ ed."""
    directory = pending(conn)
    if directory is not None:
        ring(directory)


def pending(conn: Connection) -> str | None:
    """After *conn* committed: the directory to :func:`ring` if the
    transaction was :func:`mark`\\ ed, else None (and the mark is taken
    off).  For a committer that rings a little later: the spool's writer
    answers the waiting sessions first."""
    if conn.info.pop(_MARK, False) and conn.dialect.name == "sqlite":
        path = conn.engine.url.database
        if path and path != ":memory:":
            return wake_directory(path)
    return None


def ring(directory: str) -> int:
    """Send one datagram to every socket in *directory* but this process's
    own; returns how many were sent.  Never raises."""
    try:
        names = os.listdir(directory)
    except OSError:
        return 0                         # no runner has listened on this spool
    own = str(os.getpid())
    sent = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        for name in names:
            if name == own:
                continue
            path = os.path.join(directory, name)
            try:
                sock.sendto(b"!", path)
                sent += 1
            except BlockingIOError:
                pass                     # its buffer is full: it has wake-ups waiting
            except (ConnectionRefusedError, FileNotFoundError):
                try:                     # nobody bound to it: its process is gone
                    os.unlink(path)
                except OSError:
                    pass
            except OSError:
                pass                     # not ours to write (permissions): it polls
    return sent


class _Socket:
    """The IReadDescriptor of the bound socket."""

    def __init__(self, sock: socket.socket, on_read: Callable[[], None]):
        self.sock = sock
        self.on_read = on_read

    def fileno(self) -> int:
        return self.sock.fileno()

    def doRead(self) -> None:
        self.on_read()

    def connectionLost(self, reason: Failure) -> None:
        pass

    def logPrefix(self) -> str:
        return "spool doorbell"


class DoorbellListener(service.Service):
    """Binds ``<directory>/<pid>`` while running and calls *on_wake* once
    per burst of rings.  A directory it cannot create, or a path too long
    for a unix socket, is one warning line: the runner polls instead."""

    name = "spool-doorbell"

    def __init__(self, directory: str, on_wake: Callable[[], object], *, reactor: Any):
        self.directory = directory
        self.on_wake = on_wake
        self.reactor = reactor
        self._reader: _Socket | None = None
        self._path: str | None = None
        self.wakes = 0                   # calls of on_wake made (for tests)

    def startService(self) -> None:
        super().startService()
        path = os.path.join(self.directory, str(os.getpid()))
        if len(os.fsencode(path)) > _MAX_PATH:
            log.warn("spool wake-ups: {path} is too long for a unix socket; the queue "
                     "runner polls instead", path=path)
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            try:
                os.unlink(path)          # left by an earlier process with this pid
            except FileNotFoundError:
                pass
            sock.bind(path)
        except OSError as e:
            sock.close()
            log.warn("spool wake-ups: cannot listen on {path}: {error}; the queue runner "
                     "polls instead", path=path, error=e.strerror or e)
            return
        sock.setblocking(False)
        self._path = path
        self._reader = _Socket(sock, self._readable)
        self.reactor.addReader(self._reader)

    def stopService(self) -> None:
        super().stopService()
        reader, self._reader = self._reader, None
        if reader is not None:
            self.reactor.removeReader(reader)
            reader.sock.close()
        if self._path is not None:
            try:
                os.unlink(self._path)
            except OSError:
                pass
            self._path = None

    def _readable(self) -> None:
        reader = self._reader
        if reader is None:
            return
        while True:
            try:
                reader.sock.recv(64)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno != errno.EINTR:
                    break
        self.wakes += 1
        self.on_wake()
