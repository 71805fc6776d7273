"""The spool: the only code that speaks SQL.

Every call runs off the reactor thread.  Writes of new messages go through
one writer thread that takes every pending message, inserts them all in one
transaction and commits once (group commit), then answers each caller.  The
Deferred returned by :meth:`Spool.store` fires only after the commit
returned, so the server says ``250`` only for durable messages.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from typing import Any, Callable

from sqlalchemy import create_engine, event, select, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import SQLAlchemyError
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from ..message import InboundMessage
from .ops import MERGEABLE, insert_messages
from .schema import SCHEMA_VERSION, meta, metadata

log = Logger()
_STOP = object()


class SpoolError(Exception):
    """The spool cannot be opened or used."""


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def make_engine(url: str) -> Engine:
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        db = u.database
        if not db or db == ":memory:":
            raise SpoolError(f"{url}: the spool must be a file, not an in-memory database")
        parent = os.path.dirname(os.path.abspath(db))
        if os.path.exists(parent) and not os.path.isdir(parent):
            raise SpoolError(f"{url}: spool directory {parent} is not a directory")
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as e:
            raise SpoolError(f"{url}: cannot create spool directory {parent}: {e.strerror}") from None
        engine = create_engine(u, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(u, pool_pre_ping=True)


class Spool:
    def __init__(self, url: str, *, reactor: Any = None, threads: int = 4):
        if reactor is None:
            from twisted.internet import reactor as _r
            reactor = _r
        self.url = url
        self.reactor = reactor
        self.engine = make_engine(url)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._pool = ThreadPool(minthreads=0, maxthreads=threads, name="mta-spool")
        self.batches = 0     # commits done by the writer (for benchmarks/tests)
        self.stored = 0
        # Called on the writer thread after each group commit with its duration
        # in seconds and the number of new messages in it (metrics), or None.
        self.on_commit: Callable[[float, int], None] | None = None

    # -- lifecycle ---------------------------------------------------------
    def open(self) -> None:
        """Create the schema if needed and check its version.  Synchronous:
        called once at startup, before the reactor runs."""
        try:
            with self.engine.begin() as conn:
                metadata.create_all(conn)
                row = conn.execute(select(meta.c.value).where(meta.c.key == "schema_version")).first()
                if row is None:
                    conn.execute(meta.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
                else:
                    found = int(row[0])
                    if found > SCHEMA_VERSION:
                        raise SpoolError(
                            f"{self.url}: spool schema version {found} is newer than this mta "
                            f"supports ({SCHEMA_VERSION}); upgrade mta")
                    # A write, so an unwritable spool is found now, not at the first 250.
                    conn.execute(meta.update().where(meta.c.key == "schema_version")
                                 .values(value=str(found)))
        except SQLAlchemyError as e:
            raise SpoolError(f"{self.url}: cannot use spool: {e.orig if getattr(e, 'orig', None) else e}") from None
        finally:
            # No connection may survive into twistd's daemonizing fork: SQLite's
            # POSIX locks stay with the parent, so the daemon would use the
            # database unlocked (https://sqlite.org/howtocorrupt.html#fork).
            self.engine.dispose()

    def start(self) -> None:
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name="mta-spool-writer",
                                            daemon=True)
            self._writer.start()
        self._pool.start()

    def stop(self) -> None:
        """Finish every write already submitted, then stop the threads."""
        if self._writer is not None:
            self._queue.put(_STOP)
            self._writer.join()
            self._writer = None
        self._pool.stop()
        self.engine.dispose()

    # -- writes ------------------------------------------------------------
    def store(self, msg: InboundMessage) -> defer.Deferred:
        """Durably store *msg*; fires with its queue id after the commit."""
        d: defer.Deferred = defer.Deferred()
        self._queue.put((None, msg, d))
        return d

    def write(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred:
        """Run ``fn(conn, *args)`` on the writer thread, inside the next group
        commit; fires with its result after the commit returned."""
        d: defer.Deferred = defer.Deferred()
        self._queue.put((fn, args, d))
        return d

    def _write_loop(self) -> None:
        conn: Connection | None = None
        stop = False
        while not stop:
            item = self._queue.get()
            if item is _STOP:
                break
            batch = [item]
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            try:
                if conn is None:
                    conn = self.engine.connect()
                observe = self.on_commit
                if observe is None:
                    results = self._commit_batch(conn, batch)
                else:
                    started = time.perf_counter()
                    results = self._commit_batch(conn, batch)
                    try:
                        observe(time.perf_counter() - started,
                                sum(1 for fn, _a, _d in batch if fn is None))
                    except Exception:
                        pass
            except Exception:  # connection-level trouble: fail the batch, reconnect next time
                f = Failure()
                results = [(d, None, f) for _fn, _a, d in batch]
                if conn is not None:
                    try:
                        conn.invalidate()
                        conn.close()
                    except Exception:
                        pass
                    conn = None
            self.reactor.callFromThread(self._answer, results)
        if conn is not None:
            conn.close()

    def _commit_batch(self, conn: Connection, batch: list) -> list:
        try:
            out = self._run_batch(conn, batch)
        except Exception:
            f = Failure()
            if len(batch) == 1:
                fn, arg, d = batch[0]
                log.failure("spool write failed ({what})", f,
                            what=arg.queue_id if fn is None else getattr(fn, "__name__", fn))
                return [(d, None, f)]
            # One bad write must not fail its neighbours: retry one by one.
            return [r for item in batch for r in self._commit_batch(conn, [item])]
        self.batches += 1
        return out

    def _run_batch(self, conn: Connection, batch: list) -> list:
        try:
            msgs = [arg for fn, arg, _d in batch if fn is None]
            if msgs:
                insert_messages(conn, msgs)
            out: list = [None] * len(batch)
            # Calls of a MERGEABLE write run as one, at the place of the first.
            steps: list[int | Callable[..., Any]] = []
            merged: dict[Callable[..., Any], list[int]] = {}
            for i, (fn, arg, d) in enumerate(batch):
                if fn is None:
                    out[i] = (d, arg.queue_id, None)
                elif fn in MERGEABLE:
                    if fn not in merged:
                        merged[fn] = []
                        steps.append(fn)
                    merged[fn].append(i)
                else:
                    steps.append(i)
            for step in steps:
                if isinstance(step, int):
                    fn, arg, d = batch[step]
                    out[step] = (d, fn(conn, *arg), None)
                    continue
                idx = merged[step]
                if len(idx) == 1:
                    _fn, arg, d = batch[idx[0]]
                    out[idx[0]] = (d, step(conn, *arg), None)
                    continue
                merge, split = MERGEABLE[step]
                calls = [batch[i][1] for i in idx]
                result = step(conn, *merge(calls))
                for i, call in zip(idx, calls):
                    out[i] = (batch[i][2], split(result, call), None)
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        self.stored += len(msgs)
        return out

    def _answer(self, results: list) -> None:
        for d, queue_id, failure in results:
            if failure is None:
                d.callback(queue_id)
            else:
                d.errback(failure)

    # -- other work, on the spool's thread pool ----------------------------
    def run(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> defer.Deferred:
        """Run ``fn(conn, *args, **kw)`` in a transaction on the spool pool."""
        def work() -> Any:
            with self.engine.begin() as conn:
                return fn(conn, *args, **kw)
        return threads.deferToThreadPool(self.reactor, self._pool, work)

    def count_messages(self) -> defer.Deferred:
        return self.run(lambda c: c.execute(text("SELECT COUNT(*) FROM messages")).scalar_one())
