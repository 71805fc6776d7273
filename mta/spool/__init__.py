"""The spool: the only code that speaks SQL.

:class:`Spool` is the daemon's spool: it is
:class:`mta.spool.interface.SpoolInterface`, with thin methods over the SQL
of mta.spool.ops.  Every call runs off the reactor thread.  Writes go
through one writer thread that takes every pending write, runs them all in
one transaction and commits once (group commit), then answers each caller.
The Deferred returned by :meth:`Spool.store` fires only after the commit
returned, so the server says ``250`` only for durable messages.
"""
from __future__ import annotations

import fcntl
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import SQLAlchemyError
from twisted.application.service import IService
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from ..message import InboundMessage, QueuedRecipient
from . import doorbell, fast, ops
from .faults import RepeatedFailures, SpoolError, SpoolWriteError, describe
from .interface import Claimed, QueueSummary, RecipientUpdate, Release, SpoolInterface
from .node import left_by_a_dead_process, node_name
from .notify import QueueListener, listens
from .ops import MERGEABLE, insert_messages
from .schema import SchemaTooNew, prepare

log = Logger()
_STOP = object()


def _failure(exc: BaseException, cause: BaseException | None = None) -> Failure:
    """A Failure of *exc* without frames: whoever logs it logs one line."""
    if cause is not None:
        exc.__cause__ = cause
    return Failure(exc, type(exc), None)


def _remove(*paths: str) -> None:
    """Best effort: what cannot be removed stays."""
    for p in paths:
        try:
            os.unlink(p)
        except OSError:
            pass


def _empty_spool(path: str) -> bool:
    """True when *path* holds no message (an empty file, or a spool without
    messages, such as one a command created meanwhile)."""
    try:
        if os.path.getsize(path) == 0:
            return True
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            if conn.execute("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' "
                            "AND name = 'messages'").fetchone()[0] == 0:
                return True       # opened by someone, never given a schema
            return conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0
        finally:
            conn.close()
    except (OSError, sqlite3.Error):
        return False


def sqlite_path(url: str) -> str | None:
    """The absolute path of a SQLite spool's database file, or None."""
    u = make_url(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    return os.path.abspath(u.database)


LOCK_TIMEOUT = 30.0   # seconds, the default of [spool] lock_timeout


def _sqlite_pragmas(lock_timeout: float) -> Callable[[Any, Any], None]:
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        # The timeout first: switching a new file to WAL takes a lock too, and
        # another process may be creating the same spool at that moment.
        cur.execute(f"PRAGMA busy_timeout={max(1, round(lock_timeout * 1000))}")
        # Switching a new file to WAL while another connection does the same
        # may fail at once ("database is locked": SQLite's busy handler is
        # not called there): tried again, within the same timeout.
        deadline = time.monotonic() + lock_timeout
        while True:
            try:
                cur.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.005)
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()
    return on_connect


_SYNC = "mta_synchronous"   # conn.info key: the PRAGMA synchronous the connection has


def _durability(conn: Connection, stores: bool) -> None:
    """Before a group commit on SQLite: fsync the WAL at the commit
    (``synchronous=FULL``) only when the batch stores a new message -- the
    ``250`` waits for it.  The queue runner's own writes (claims, leases,
    delivery results, bounces with the result they follow from) are
    committed without (``NORMAL``: safe against a crash of the process, and
    made durable by the next fsync, which takes every earlier frame of the
    WAL with it).  A power failure can take back only such a tail: redone,
    at least once -- a delivery recorded there is attempted again, as
    Postfix does with a queue file whose "done" marks had not reached the
    disk; never a message lost."""
    want = "FULL" if stores else "NORMAL"
    if conn.info.get(_SYNC, "FULL") != want:
        fast.plain(conn, f"PRAGMA synchronous={want}")
        conn.info[_SYNC] = want


def make_engine(url: str, lock_timeout: float = LOCK_TIMEOUT) -> Engine:
    """The engine of the spool at *url*; on SQLite a write waits up to
    *lock_timeout* seconds for a lock another process holds."""
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
        event.listen(engine, "connect", _sqlite_pragmas(lock_timeout))
        return engine
    return create_engine(u, pool_pre_ping=True)


class Spool(SpoolInterface):
    """The spool at a SQLAlchemy *url*: writes through one group-commit
    writer thread (:meth:`store` and every write below), reads on a small
    thread pool.  Recipients are claimed for this node -- *node*, or when
    that is "" a name of this process, given at :meth:`start` (after
    twistd's daemonizing fork): see mta.spool.node -- for *lease* seconds
    at a time (renewed by :meth:`renew`)."""

    def __init__(self, url: str, *, node: str, lease: float, reactor: Any,
                 threads: int = 4, idle_check: float = 5.0, lock_timeout: float = LOCK_TIMEOUT,
                 on_commit: Callable[[float, int], None] | None = None):
        self.url = url
        self._configured_node = node
        self.node = node_name(node)
        self.lease = lease
        self.reactor = reactor
        self.engine = make_engine(url, lock_timeout)
        self._db_path = sqlite_path(url)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        # The writer thread's connection, the (st_dev, st_ino) of the file it
        # has open, and whether it failed last time (then it is replaced).
        self._conn: Connection | None = None
        self._ident: tuple[int, int] | None = None
        self._suspect = False
        self._lock_fd: int | None = None   # see _lock_file
        # The wake-up directory to ring once the writer has answered (a
        # commit made work due; see mta.spool.doorbell.pending).
        self._ring: str | None = None
        self._saved: str | None = None   # where the removed spool was saved (see _recover)
        self.idle_check = idle_check   # seconds: how often an idle writer checks its file
        self._faults = RepeatedFailures(log, reactor, what="spool write")
        self._pool = ThreadPool(minthreads=0, maxthreads=threads, name="mta-spool")
        self.batches = 0     # commits done by the writer (for benchmarks/tests)
        self.stored = 0
        # Called on the writer thread after each group commit with its duration
        # in seconds and the number of new messages in it (metrics), or None.
        self.on_commit = on_commit

    # -- lifecycle ---------------------------------------------------------
    def open(self) -> None:
        """Create the schema if needed and check its version.  Synchronous:
        called once at startup, before the reactor runs."""
        try:
            with self.engine.begin() as conn:
                prepare(conn)
        except SchemaTooNew as e:
            raise SpoolError(f"{self.url}: {e}") from None
        except SQLAlchemyError as e:
            raise SpoolError(f"{self.url}: cannot use spool: {e.orig if getattr(e, 'orig', None) else e}") from None
        finally:
            # No connection may survive into twistd's daemonizing fork: SQLite's
            # POSIX locks stay with the parent, so the daemon would use the
            # database unlocked (https://sqlite.org/howtocorrupt.html#fork).
            self.engine.dispose()

    def start(self) -> None:
        if self._writer is None:
            self.node = node_name(self._configured_node)   # this process's
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
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self._pool.stop()
        self.engine.dispose()

    # -- the interface (mta.spool.interface) --------------------------------
    def store(self, msg: InboundMessage) -> defer.Deferred[str]:
        """Durably store *msg*; fires with its queue id after the commit."""
        d: defer.Deferred = defer.Deferred()
        self._queue.put((None, msg, d))
        return d

    def recover_inflight(self, now: float) -> defer.Deferred[int]:
        return self._write(ops.recover_inflight, self.node, now, left_by_a_dead_process)

    def due(self, now: float, limit: int,
            skip_domains: Sequence[str] = ()) -> defer.Deferred[list[QueuedRecipient]]:
        return self._run(ops.due_recipients, now, limit, self.node, list(skip_domains))

    def claim_and_load(self, rids: Sequence[int], now: float) -> defer.Deferred[Claimed]:
        return self._write(ops.claim_and_load, list(rids), self.node, now, now + self.lease)

    def renew(self, now: float) -> defer.Deferred[int]:
        return self._write(ops.renew_leases, self.node, now + self.lease)

    def claim_domains(self, domains: Sequence[str], hostname: str,
                      now: float) -> defer.Deferred[Claimed]:
        return self._write(ops.claim_domains, list(domains), hostname, self.node, now,
                           now + self.lease)

    def record(self, updates: Sequence[RecipientUpdate], new_messages: Sequence[InboundMessage],
               finished: Sequence[str]) -> defer.Deferred[list[str]]:
        # ops.record_results is MERGEABLE: the writer runs the records of one
        # batch as one call.
        return self._write(ops.record_results, list(updates), list(new_messages),
                           list(finished), self.node)

    def record_again(self, updates: Sequence[RecipientUpdate],
                     new_messages: Sequence[InboundMessage],
                     finished: Sequence[str]) -> defer.Deferred[list[str]]:
        return self._write(ops.record_results_again, list(updates), list(new_messages),
                           list(finished), self.node)

    def requeue(self, rids: Sequence[int]) -> defer.Deferred[int]:
        return self._write(ops.requeue_inflight, list(rids), self.node)

    def release(self, domain: str, subdomains: bool, *, now: float, hostname: str,
                how: str) -> defer.Deferred[Release]:
        return self._write(ops.release_domain, domain, subdomains, now, hostname, how)

    def summary(self) -> defer.Deferred[QueueSummary]:
        return self._run(ops.queue_summary)

    def listener(self, on_wake: Callable[[], object]) -> IService | None:
        """What wakes this process's runner when another process makes work
        due: on PostgreSQL (psycopg) a :class:`mta.spool.notify.QueueListener`
        on a connection of its own, on a SQLite file a
        :class:`mta.spool.doorbell.DoorbellListener`; else None (it polls)."""
        if listens(self.url):
            return QueueListener(self.url, on_wake, reactor=self.reactor)
        if self._db_path:
            return doorbell.DoorbellListener(doorbell.wake_directory(self._db_path), on_wake,
                                             reactor=self.reactor)
        return None

    # -- writes ------------------------------------------------------------
    def _write(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred:
        """Run ``fn(conn, *args)`` on the writer thread, inside the next group
        commit; fires with its result after the commit returned."""
        d: defer.Deferred = defer.Deferred()
        self._queue.put((fn, args, d))
        return d

    # -- the writer thread -------------------------------------------------
    # Its connection is held open from the start: it is what still holds the
    # data if the spool file is removed under us (rm -rf), so that it can be
    # carried over into a new file at the same path.
    def _write_loop(self) -> None:
        events: list = []
        try:
            self._open_writer(events)
        except SpoolWriteError:
            pass                   # the first write will try again and report it
        if events:
            self.reactor.callFromThread(self._answer, [], events)
        stop = False
        while not stop:
            try:
                item = self._queue.get(timeout=self.idle_check)
            except queue.Empty:
                events = []
                try:
                    self._check_file(events)
                except Exception as e:
                    events.append(("failed", "checking the spool file", describe(e)))
                if events:
                    self.reactor.callFromThread(self._answer, [], events)
                continue
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
            events = []
            try:
                results = self._write_batch(batch, events)
            except Exception as e:     # a bug: the batch fails, the writer goes on
                error = describe(e)
                events.append(("failed", "writer", error))
                f = _failure(SpoolWriteError(f"spool write failed: {error}"), e)
                results = [(d, None, f) for _fn, _a, d in batch]
                self._suspect = True
            self.reactor.callFromThread(self._answer, results, events)
            if self._ring is not None:
                # After the answer: the sessions' 250s do not wait for it.
                directory, self._ring = self._ring, None
                doorbell.ring(directory)
        events = []
        try:
            self._check_file(events)      # removed since the last write: carry it over
        except Exception as e:
            events.append(("failed", "checking the spool file", describe(e)))
        if events:
            self.reactor.callFromThread(self._answer, [], events)
        self.reactor.callFromThread(self._faults.close)
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
            self._conn = None

    def _write_batch(self, batch: list, events: list) -> list:
        """Commit *batch*; the (Deferred, result, Failure) of each of its writes."""
        try:
            conn = self._writer_connection(events)
        except SpoolWriteError as e:
            events.append(("failed", "opening the spool", str(e)))
            f = _failure(e)
            return [(d, None, f) for _fn, _a, d in batch]
        observe = self.on_commit
        started = time.perf_counter()
        results = self._commit_batch(conn, batch, events)
        if observe is not None and any(fail is None for _d, _v, fail in results):
            try:
                observe(time.perf_counter() - started,
                        sum(1 for fn, _a, _d in batch if fn is None))
            except Exception:
                pass
        # The commit went into the file we hold open: is it still the spool?
        # (checked after the commit, before anyone is answered)
        try:
            self._check_file(events, raise_=True)
        except SpoolWriteError as e:
            events.append(("failed", "recreating the spool file", str(e)))
            f = _failure(e)
            results = [(d, None, fail or f) for d, _v, fail in results]
        if any(fail is not None for _d, _v, fail in results):
            self._suspect = True       # open a fresh connection before the next batch
        else:
            events.append(("ok",))
        return results

    def _commit_batch(self, conn: Connection, batch: list, events: list | None = None) -> list:
        try:
            out = self._run_batch(conn, batch)
        except Exception as e:
            if len(batch) == 1:
                fn, arg, d = batch[0]
                what = arg.queue_id if fn is None else getattr(fn, "__name__", str(fn))
                error = describe(e)
                if events is not None:
                    events.append(("failed", what, error))
                return [(d, None, _failure(SpoolWriteError(f"spool write failed: {error}"), e))]
            # One bad write must not fail its neighbours: retry one by one.
            return [r for item in batch for r in self._commit_batch(conn, [item], events)]
        self.batches += 1
        return out

    # -- the writer's connection and the file it has open -------------------
    def _writer_connection(self, events: list) -> Connection:
        """The writer's connection, opened (again) when needed; raises
        SpoolWriteError when there is none that can be used."""
        if self._conn is None:
            self._open_writer(events)
        else:
            self._check_file(events, raise_=True)
            if self._suspect:
                # After a failure: a new connection, in case the old one is
                # stuck (a file opened read-only stays read-only).  The old
                # one is closed only once the new one is open.
                try:
                    self._open_writer(events)
                except SpoolWriteError:
                    pass           # keep the old one; this batch tells
        assert self._conn is not None
        return self._conn

    def _open_writer(self, events: list) -> None:
        path = self._db_path
        fresh = False
        if path is not None:
            parent = os.path.dirname(path)
            try:
                os.makedirs(parent, exist_ok=True)
            except OSError as e:
                raise SpoolWriteError(f"cannot create spool directory {parent}: "
                                      f"{describe(e)}") from None
            fresh = not os.path.exists(path)
        try:
            conn = self.engine.connect()
        except Exception as e:
            raise SpoolWriteError(f"cannot open the spool: {describe(e)}") from None
        ident = None
        try:
            if fresh:
                with conn.begin():
                    prepare(conn)
                events.append(("warn", "spool {path} did not exist: created an empty spool "
                               "there", {"path": path}))
            if path is not None:
                st = os.stat(path)
                ident = (st.st_dev, st.st_ino)
        except Exception as e:
            try:
                conn.close()
            except Exception:
                pass
            raise SpoolWriteError(f"cannot open the spool: {describe(e)}") from None
        old, self._conn, self._ident, self._suspect = self._conn, conn, ident, False
        if old is not None:
            try:
                old.invalidate()
            except Exception:
                pass

    def _moved(self) -> bool:
        """True when the file the writer has open is no longer the one at the
        spool's path (removed, or replaced)."""
        if self._conn is None or self._ident is None or self._db_path is None:
            return False
        try:
            st = os.stat(self._db_path)
        except (FileNotFoundError, NotADirectoryError):
            return True
        except OSError:
            return False           # cannot tell
        return (st.st_dev, st.st_ino) != self._ident

    def _check_file(self, events: list, raise_: bool = False) -> None:
        """When the spool file was removed or replaced under the open
        connection, recreate it at its path from what that connection still
        holds, and go on there.  If that fails, raise SpoolWriteError
        (*raise_*) or note the failure."""
        if not self._moved():
            return
        try:
            self._recover(events)
        except SpoolWriteError as e:
            if raise_:
                raise
            events.append(("failed", "recreating the spool file", str(e)))

    def _recover(self, events: list) -> None:
        path = self._db_path
        assert path is not None and self._conn is not None
        parent = os.path.dirname(path)
        tmp = f"{path}.recovering"
        raw = self._conn.connection.dbapi_connection
        try:
            os.makedirs(parent, exist_ok=True)
            _remove(tmp, tmp + "-journal", tmp + "-wal", tmp + "-shm")
            dst = sqlite3.connect(tmp)
            try:
                raw.backup(dst)
                dst.execute("PRAGMA journal_mode=WAL")
                n = dst.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
            finally:
                dst.close()
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            replace = os.path.exists(path)
            if replace and not _empty_spool(path):
                # Another program (sendmail, say) made a spool of its own at
                # the path and put mail in it: neither is overwritten.  What
                # only the open database still holds -- mail acknowledged
                # before the removal -- is kept next to it, once, for the
                # administrator, instead of vanishing at the stop.
                if self._saved is None and n:
                    saved = f"{path}.saved-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
                    os.link(tmp, saved)
                    self._saved = saved
                    events.append(("warn", "spool file {path} was replaced by another spool "
                                   "while in use: the {n} messages of the removed one are saved "
                                   "in {saved} (stop mta and put it in place to deliver them)",
                                   {"path": path, "n": n, "saved": saved}))
                kept = f" (its messages are saved in {self._saved})" if self._saved else ""
                raise SpoolWriteError(
                    f"spool file {path} was replaced by another spool while in use; "
                    f"not overwriting it{kept}: new mail is refused until a restart")
            # What is left of the file that was there (its -wal, -shm) must
            # not be taken for the new file's.
            _remove(path + "-wal", path + "-shm", path + "-journal")
            if replace:           # an empty spool someone opened meanwhile
                os.replace(tmp, path)
            else:
                os.link(tmp, path)    # not over a file that appeared meanwhile
                os.unlink(tmp)
            dfd = os.open(parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except SpoolWriteError:
            _remove(tmp)
            raise
        except (OSError, sqlite3.Error) as e:
            _remove(tmp)
            raise SpoolWriteError(f"spool file {path} was removed while in use and cannot be "
                                  f"recreated: {describe(e)}") from None
        events.append(("warn", "spool file {path} was removed or replaced while in use: "
                       "recreated it from the open database ({n} messages)",
                       {"path": path, "n": n}))
        # From now on every connection opens the new file.  The old ones are
        # closed without a checkpoint (SQLite sees the path belongs to
        # another file), so nothing of the new file is touched.
        self.engine.dispose()
        self._ident = None
        self._open_writer(events)

    def _run_batch(self, conn: Connection, batch: list) -> list:
        lock = self._lock_file()
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return self._run_batch_locked(conn, batch)
        finally:
            if lock is not None:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _lock_file(self) -> int | None:
        """SQLite: the file ``<spool>-lock`` whose flock(2) the writers of
        every process on the spool take around a write transaction.  SQLite's
        own lock is what keeps the file consistent; but a writer that finds it
        taken sleeps and retries (1, 2, 5, 10 ... ms: its busy handler),
        while one waiting in flock is woken the moment the other commits --
        with ``[server] workers`` > 1 that wait is in every ``250``.  None
        (SQLite's lock alone) when the file cannot be opened."""
        if self._db_path is None:
            return None
        if self._lock_fd is None:
            try:
                self._lock_fd = os.open(self._db_path + "-lock",
                                        os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError:
                return None
        return self._lock_fd

    def _run_batch_locked(self, conn: Connection, batch: list) -> list:
        try:
            msgs = [arg for fn, arg, _d in batch if fn is None]
            if conn.dialect.name == "sqlite":
                _durability(conn, bool(msgs))
                # The write lock before anything is read: what a write reads
                # (which recipients this node still owns, which are final)
                # cannot change under it -- another process on the file
                # (``mta queue``, a second daemon) waits, as with row locks.
                fast.plain(conn, "BEGIN IMMEDIATE")
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
                merged, split = MERGEABLE[step]
                calls = [batch[i][1] for i in idx]
                result = merged(conn, calls)
                for i, call in zip(idx, calls):
                    out[i] = (batch[i][2], split(result, call), None)
            conn.commit()
        except BaseException:
            doorbell.discard(conn)
            conn.rollback()
            raise
        self._ring = doorbell.pending(conn) or self._ring
        self.stored += len(msgs)
        return out

    def _answer(self, results: list, events: list = ()) -> None:
        """On the reactor thread: log what the writer noted, then answer."""
        for event in events:
            kind = event[0]
            if kind == "failed":
                self._faults.failed(event[2], where=event[1])
            elif kind == "ok":
                self._faults.succeeded()
            elif kind == "warn":
                log.warn(event[1], **event[2])
        for d, queue_id, failure in results:
            if failure is None:
                d.callback(queue_id)
            else:
                d.errback(failure)

    # -- other work, on the spool's thread pool ----------------------------
    def _run(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> defer.Deferred:
        """Run ``fn(conn, *args, **kw)`` in a transaction on the spool pool."""
        def work() -> Any:
            with self.engine.begin() as conn:
                return fn(conn, *args, **kw)
        return threads.deferToThreadPool(self.reactor, self._pool, work)

    def free_space(self, *, minfree: int,
                   max_message_size: int) -> Callable[[int], bool] | None:
        """The check the SMTP server makes at MAIL: whether a message of
        *size* octets (0: not declared) may be taken while keeping the
        free-space reserve (see mta.spool.space); None when the spool is not
        a local file."""
        if self._db_path is None:
            return None
        from .space import FreeSpace
        return FreeSpace(os.path.dirname(self._db_path), minfree=minfree,
                         max_message_size=max_message_size, clock=self.reactor.seconds)

    def count_messages(self) -> defer.Deferred[int]:
        return self._run(lambda c: c.execute(text("SELECT COUNT(*) FROM messages")).scalar_one())
