"""Wake-ups across the processes that share a spool: PostgreSQL's
``LISTEN``/``NOTIFY`` on the channel ``mta_queue``.

* :func:`notify` -- in a write's transaction, ``pg_notify('mta_queue',
  what)``: PostgreSQL delivers it to every listener when (and only if) the
  transaction commits.  The spool's writes that make work due call it: new
  messages (:func:`mta.spool.ops.insert_messages`: the server's store, a
  DSN, ``mta sendmail``), a release (ETRN, ``mta queue flush --domain``),
  ``mta queue flush``/``release``/``requeue``.  On SQLite the same writes
  ring the runners' sockets instead, after their commit (mta.spool.doorbell).
* :class:`QueueListener` -- a Twisted service with a thread of its own, on
  a psycopg connection of its own, that ``LISTEN``\\ s and calls its
  *on_wake* on the reactor thread (once per burst of notifications, and
  once after each (re)connection, for what it may have missed).  When the
  database goes away it says so in one line (mta.spool.faults), reconnects
  with a backoff, and says when it listens again.

A notification is a hint, never the only path: whoever receives it looks
at the queue as its poll would (the queue runner's ``kick``), and the poll
goes on -- a notification lost while a listener was disconnected only
waits for the next poll.  :func:`listens` says whether a spool URL gets a
listener (PostgreSQL through psycopg 3; other drivers and SQLite poll only).
"""
from __future__ import annotations

import os
import select
import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection, make_url
from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger, LogLevel

from . import doorbell
from .faults import RepeatedFailures, describe

__all__ = ["CHANNEL", "notify", "listens", "QueueListener"]

log = Logger()

#: The channel every spool process notifies and listens on.
CHANNEL = "mta_queue"

_notify = text("SELECT pg_notify(:channel, :what)")


def notify(conn: Connection, what: str) -> None:
    """In *conn*'s transaction: tell the listeners, once it commits, that
    the queue has work due now (*what*: ``stored``, ``released``,
    ``flushed``, ``requeued`` -- for whoever watches the channel; the
    listeners do not read it).  On SQLite the connection is marked, and
    its committer rings the runners (mta.spool.doorbell)."""
    if conn.dialect.name == "postgresql":
        conn.execute(_notify, {"channel": CHANNEL, "what": what})
    elif conn.dialect.name == "sqlite":
        doorbell.mark(conn)


def listens(url: str) -> bool:
    """Whether a spool at *url* gets a :class:`QueueListener`: PostgreSQL
    through psycopg 3 (``postgresql+psycopg://``)."""
    try:
        u = make_url(url)
    except Exception:
        return False
    return u.get_backend_name() == "postgresql" and u.get_driver_name() == "psycopg"


def _connect_args(url: str) -> dict[str, Any]:
    """psycopg.connect()'s keyword arguments for the SQLAlchemy *url*, as
    SQLAlchemy's own dialect makes them (host, port, user, dbname, the
    query's parameters)."""
    u = make_url(url)
    cargs, cparams = u.get_dialect()().create_connect_args(u)
    if cargs:
        raise ValueError(f"unexpected positional connect arguments for {u.drivername}")
    params = dict(cparams)
    params.setdefault("connect_timeout", 10)
    return params


class QueueListener(service.Service):
    """Listens on :data:`CHANNEL` of the PostgreSQL spool at *url* and calls
    *on_wake* (on the reactor thread) for each burst of notifications and
    after each (re)connection.  Its thread waits on the connection's socket
    and a pipe of its own, so :meth:`stopService` ends it at once; an idle
    connection is checked every *check* seconds (``SELECT 1``), so a
    database that went away silently is found too.  Reconnection waits
    *retry_first* seconds, doubling up to *retry_max*."""

    name = "queue-listener"
    STOP_WAIT = 5.0

    def __init__(self, url: str, on_wake: Callable[[], object], *, reactor: Any,
                 check: float = 10.0, retry_first: float = 0.5, retry_max: float = 10.0):
        self.url = url
        self.on_wake = on_wake
        self.reactor = reactor
        self.check = check
        self.retry_first = retry_first
        self.retry_max = retry_max
        self._params = _connect_args(url)
        self._run: _Run | None = None
        self._trouble = RepeatedFailures(
            log, reactor, what="listening for queue notifications (PostgreSQL LISTEN "
            f"{CHANNEL})", consequence="the queue is polled meanwhile; reconnecting",
            level=LogLevel.warn)
        self.wakes = 0            # calls of on_wake made (for tests)

    # -- lifecycle -------------------------------------------------------------
    def startService(self) -> None:
        super().startService()
        if self._run is None:
            self._run = _Run()
            threading.Thread(target=self._loop, args=(self._run,), name="mta-queue-listener",
                             daemon=True).start()

    def stopService(self) -> defer.Deferred[None] | None:
        """Ends the thread at once (it waits on a pipe too); fires when it
        has closed its connection, or after STOP_WAIT seconds at most (a
        connection attempt to an unreachable host: the thread, a daemon
        thread, ends on its own)."""
        super().stopService()
        run, self._run = self._run, None
        if run is None:
            return None
        self._trouble.close()
        done: defer.Deferred[None] = defer.Deferred()
        timer = self.reactor.callLater(self.STOP_WAIT, lambda: done.called or done.callback(None))
        run.ended = lambda: done.called or done.callback(None)
        run.stop()
        done.addBoth(lambda r: (timer.active() and timer.cancel(), r)[1])
        return done

    # -- on the reactor thread ------------------------------------------------------
    def _wake(self) -> None:
        if not self.running:
            return
        self.wakes += 1
        try:
            self.on_wake()
        except Exception:
            log.failure("handling a queue notification")

    def _from_thread(self, run: _Run, fn: Callable[..., object], *args: Any) -> None:
        if not run.stopping.is_set():
            self.reactor.callFromThread(fn, *args)

    # -- the listener's thread ---------------------------------------------------------
    def _loop(self, run: _Run) -> None:
        try:
            self._listen_until_stopped(run)
        finally:
            run.close()
            self.reactor.callFromThread(lambda: run.ended and run.ended())

    def _listen_until_stopped(self, run: _Run) -> None:
        import psycopg

        delay = self.retry_first
        while not run.stopping.is_set():
            conn = None
            try:
                conn = psycopg.connect(**self._params, autocommit=True)
                conn.execute(f"LISTEN {CHANNEL}")
                self._from_thread(run, self._trouble.succeeded)
                delay = self.retry_first
                self._from_thread(run, self._wake)    # what was missed while not listening
                self._listen(run, conn)
            except Exception as e:   # psycopg.Error: the database went away; else a bug
                if run.stopping.is_set():
                    break
                self._from_thread(run, self._trouble.failed, describe(e))
            finally:
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:
                        pass
            if run.stopping.wait(delay):
                break
            delay = min(delay * 2, self.retry_max)

    def _listen(self, run: _Run, conn: Any) -> None:
        """Until the stop (returns) or the connection fails (raises
        psycopg.Error): one wake-up per burst of notifications."""
        while not run.stopping.is_set():
            ready, _w, _x = select.select([conn.fileno(), run.stop_fd], [], [], self.check)
            if run.stop_fd in ready:
                return
            if not ready:
                conn.execute("SELECT 1")      # still there?  (notifications are kept)
            got = sum(1 for _n in conn.notifies(timeout=0))
            if conn.closed:
                raise _closed()
            if got:
                self._from_thread(run, self._wake)


class _Run:
    """One run of the listener's thread: its stop flag and the pipe that
    wakes it from its wait; the thread closes the pipe when it ends."""

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self.stop_fd, self._write_fd = os.pipe()
        self._lock = threading.Lock()
        self._closed = False
        self.ended: Callable[[], object] | None = None   # called on the reactor thread

    def stop(self) -> None:
        self.stopping.set()
        with self._lock:
            if not self._closed:
                os.write(self._write_fd, b"x")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            os.close(self.stop_fd)
            os.close(self._write_fd)


def _closed() -> Exception:
    import psycopg
    return psycopg.OperationalError("the connection was closed")
