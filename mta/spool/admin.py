"""Queue administration: the SQL of ``mta queue`` and ``mta sendmail``,
behind :class:`SpoolAdmin` (their :class:`mta.spool.interface.QueueAdmin`,
answering with the typed records of mta.spool.interface).

These run in their own short-lived processes, next to a running daemon, on
the same database.  Each command is one short transaction on its own
engine (:func:`mta.spool.make_engine`: the same SQLite pragmas, so
``busy_timeout`` makes a command wait for the daemon's writer rather than
fail).  On SQLite a write starts with ``BEGIN IMMEDIATE``: the write lock is
taken before anything is read, so what a command reads cannot change under
it (the daemon claims recipients in its own write transactions), and a read
is one ``BEGIN`` (deferred) snapshot of the WAL.

Recipients in flight belong to a delivery in progress; the commands here
leave them alone (``hold``, ``requeue``, ``bounce``) except ``delete``,
which, as Postfix's ``postsuper -d``, removes the message anyway: the
daemon's later record of that attempt then updates no rows.

The functions of a Connection below are the statements; a SpoolAdmin
method runs them in one transaction (the check of which ids exist with
the change, so what it reports is what it did).
"""
from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import func, inspect, select, update
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import SQLAlchemyError

from .. import domain as dom
from ..address import domain_key
from ..message import InboundMessage, QueuedRecipient
from . import LOCK_TIMEOUT, SpoolError, doorbell, make_engine
from .faults import describe
from .interface import (Changed, DSNMaker, Flushed, ListedMessage, ListedRecipient,
                        MessageChange, QueueAdmin, QueueStats, RecipientUpdate)
from .notify import notify
from .ops import PENDING, delete_messages_rows, insert_messages, lock_messages, record_results, release_domain
from .schema import (SCHEMA_VERSION, SchemaTooNew, contents, messages, prepare, recipients,
                     version)

__all__ = ["SpoolAdmin", "AdminError", "STATES", "open_engine"]

STATES = ("queued", "inflight", "deferred", "delivered", "failed", "held")
#: States an administrator may move a recipient out of (not final, not in flight).
CHANGEABLE = ("queued", "deferred", "held")
_CHUNK = 500      # ids per IN (...): well under every database's parameter limit


class AdminError(Exception):
    """The spool cannot be used; ``str()`` is one line."""


# --------------------------------------------------------------------------- engine

def open_engine(url: str, *, create: bool = False,
                lock_timeout: float = LOCK_TIMEOUT) -> Engine:
    """An engine on the spool at *url*.  Without *create*, a SQLite spool
    that does not exist yet is an error (rather than an empty new one); with
    it, the file and the schema are created as the daemon would.  A write
    waits up to *lock_timeout* seconds (``[spool] lock_timeout``) for a lock
    another process holds."""
    try:
        u = make_url(url)
    except Exception as e:
        raise AdminError(f"{url}: invalid database URL: {e}") from None
    if u.get_backend_name() == "sqlite" and not create:
        db = u.database or ""
        if db and db != ":memory:" and not os.path.exists(db):
            raise AdminError(f"{url}: no spool at {os.path.abspath(db)} "
                             "(the daemon creates it when it first starts)")
    try:
        engine = make_engine(url, lock_timeout)
    except SpoolError as e:
        raise AdminError(str(e)) from None
    try:
        _check_schema(engine, url, create)
    except SQLAlchemyError as e:
        engine.dispose()
        raise AdminError(f"{url}: cannot use spool: {describe(e)}") from None
    except AdminError:
        engine.dispose()
        raise
    return engine


def _check_schema(engine: Engine, url: str, create: bool) -> None:
    try:
        with engine.connect() as conn:
            present = inspect(conn).has_table("messages")
            found = version(conn)
    except SchemaTooNew as e:
        raise AdminError(f"{url}: {e}") from None
    if not present and not create:
        raise AdminError(f"{url}: not an mta spool (no messages table)")
    if present and found == SCHEMA_VERSION:
        # Nothing to write: a read-only spool can still be listed.  (One the
        # mta before Alembic made is stamped by the daemon's next start.)
        return
    # Created, or upgraded in place from an earlier version, as the daemon does.
    try:
        with engine.begin() as conn:
            prepare(conn)
    except SchemaTooNew as e:
        raise AdminError(f"{url}: {e}") from None


@contextmanager
def transaction(engine: Engine, *, write: bool) -> Iterator[Connection]:
    """One transaction: committed (a write) or rolled back (a read) at the end.
    SQLAlchemy errors become :class:`AdminError`."""
    try:
        with engine.connect() as conn:
            if conn.dialect.name == "sqlite":
                conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield conn
            except BaseException:
                doorbell.discard(conn)
                conn.rollback()
                raise
            if write:
                conn.commit()
                doorbell.after_commit(conn)
            else:
                conn.rollback()
    except SQLAlchemyError as e:
        raise AdminError(f"{engine.url.render_as_string(hide_password=True)}: "
                         f"{describe(e)}") from None


# --------------------------------------------------------------------------- helpers

def _chunks(items: Sequence[Any], n: int = _CHUNK) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _domain_arg(domain: str) -> str:
    """A domain given on the command line (``example.org``, ``@example.org``),
    as mta.domain.key writes it: what recipients' domains compare to."""
    return dom.key(domain.strip().removeprefix("@"))


def _sender_matches(sender: str, wanted: str) -> bool:
    """``<>``/``""`` is the null sender; ``@domain`` any sender there;
    otherwise the address, case-insensitively."""
    w = wanted.strip()
    if w.startswith("<") and w.endswith(">"):
        w = w[1:-1]
    if not w:
        return sender == ""
    if w.startswith("@"):
        return "@" in sender and dom.key(sender.rsplit("@", 1)[1]) == _domain_arg(w)
    return sender.lower() == w.lower()


_MSG_COLS = (messages.c.queue_id, messages.c.sender, messages.c.arrival, messages.c.size,
             messages.c.client_address, messages.c.helo, messages.c.protocol,
             messages.c.body_type, messages.c.smtputf8, messages.c.size_param, messages.c.ret,
             messages.c.envid, messages.c.auth)
_RCPT_COLS = (recipients.c.id, recipients.c.queue_id, recipients.c.address, recipients.c.state,
              recipients.c.attempts, recipients.c.next_attempt, recipients.c.last_reply,
              recipients.c.notify, recipients.c.orcpt, recipients.c.warned)


def _recipient(row: Any) -> ListedRecipient:
    return ListedRecipient(id=row.id, queue_id=row.queue_id, address=row.address,
                           state=row.state, attempts=row.attempts,
                           next_attempt=row.next_attempt, last_reply=row.last_reply,
                           notify=row.notify, orcpt=row.orcpt, warned=bool(row.warned))


def _message(row: Any, rcpts: Iterable[ListedRecipient], headers: bytes | None = None,
             body: bytes | None = None) -> ListedMessage:
    return ListedMessage(queue_id=row.queue_id, sender=row.sender, arrival=row.arrival,
                         size=row.size, client_address=row.client_address, helo=row.helo,
                         protocol=row.protocol, body_type=row.body_type,
                         smtputf8=bool(row.smtputf8), size_param=row.size_param, ret=row.ret,
                         envid=row.envid, auth=row.auth, recipients=tuple(rcpts),
                         headers=headers, body=body)


def _queued_recipient(r: ListedRecipient) -> QueuedRecipient:
    return QueuedRecipient(id=r.id, queue_id=r.queue_id, address=r.address, notify=r.notify,
                           orcpt=r.orcpt, attempts=r.attempts, warned=r.warned,
                           last_reply=r.last_reply)


# --------------------------------------------------------------------------- reads

def list_queue(conn: Connection, *, hostname: str, states: Iterable[str] | None = None,
               domain: str | None = None, sender: str | None = None,
               arrived_before: float | None = None) -> list[ListedMessage]:
    """Messages, oldest first, each with the recipients that pass the
    filters (``states``, destination ``domain``); a message with none, or
    whose sender or arrival does not pass, is left out."""
    q = select(*_MSG_COLS).order_by(messages.c.arrival, messages.c.queue_id)
    if arrived_before is not None:
        q = q.where(messages.c.arrival <= arrived_before)
    found: dict[str, tuple[Any, list[ListedRecipient]]] = {}
    for row in conn.execute(q):
        if sender is not None and not _sender_matches(row.sender, sender):
            continue
        found[row.queue_id] = (row, [])
    rq = select(*_RCPT_COLS).order_by(recipients.c.id)
    states = list(states or ())
    if states:
        rq = rq.where(recipients.c.state.in_(states))
    want = _domain_arg(domain) if domain else None
    for row in conn.execute(rq):
        m = found.get(row.queue_id)
        if m is None or (want is not None and domain_key(row.address, hostname) != want):
            continue
        m[1].append(_recipient(row))
    return [_message(row, rcpts) for row, rcpts in found.values() if rcpts]


def get_message(conn: Connection, queue_id: str, *, content: bool = True) -> ListedMessage | None:
    """One message: envelope, recipients and (with *content*) ``headers`` and ``body``."""
    row = conn.execute(select(*_MSG_COLS).where(messages.c.queue_id == queue_id)).first()
    if row is None:
        return None
    rcpts = [_recipient(r) for r in conn.execute(
        select(*_RCPT_COLS).where(recipients.c.queue_id == queue_id).order_by(recipients.c.id))]
    if not content:
        return _message(row, rcpts)
    c = conn.execute(select(contents.c.headers, contents.c.body)
                     .where(contents.c.queue_id == queue_id)).first()
    return _message(row, rcpts, bytes(c.headers) if c is not None else b"",
                    bytes(c.body) if c is not None else b"")


def existing_ids(conn: Connection, queue_ids: Sequence[str]) -> set[str]:
    out: set[str] = set()
    ids = list(dict.fromkeys(queue_ids))
    for chunk in _chunks(ids):
        out.update(r[0] for r in conn.execute(
            select(messages.c.queue_id).where(messages.c.queue_id.in_(chunk))))
    return out


def deferred_queue_ids(conn: Connection) -> list[str]:
    """Every message with a deferred recipient."""
    return [r[0] for r in conn.execute(
        select(recipients.c.queue_id).where(recipients.c.state == "deferred")
        .distinct().order_by(recipients.c.queue_id))]


def queue_stats(conn: Connection, *, now: float, hostname: str) -> QueueStats:
    by_state = {s: 0 for s in STATES}
    by_domain: dict[str, dict[str, int]] = defaultdict(lambda: {s: 0 for s in STATES})
    for address, state in conn.execute(select(recipients.c.address, recipients.c.state)):
        by_state[state] = by_state.get(state, 0) + 1
        counts = by_domain[domain_key(address, hostname)]
        counts[state] = counts.get(state, 0) + 1
    n, size, oldest = conn.execute(
        select(func.count(), func.coalesce(func.sum(messages.c.size), 0),
               func.min(messages.c.arrival))).one()
    oldest_id = None
    if oldest is not None:
        oldest_id = conn.execute(select(messages.c.queue_id)
                                 .where(messages.c.arrival == oldest)
                                 .order_by(messages.c.queue_id).limit(1)).scalar()
    domains = {}
    for d in sorted(by_domain, key=lambda d: (-sum(by_domain[d].values()), d)):
        domains[d] = dict(by_domain[d], total=sum(by_domain[d].values()))
    return QueueStats(messages=int(n), recipients=sum(by_state.values()), size=int(size),
                      oldest_queue_id=oldest_id, oldest_arrival=oldest,
                      oldest_age=None if oldest is None else max(0.0, now - oldest),
                      by_state=by_state, by_domain=domains)


# --------------------------------------------------------------------------- writes

def flush_recipients(conn: Connection, *, now: float, hostname: str,
                     queue_ids: Sequence[str] | None = None,
                     domain: str | None = None) -> int:
    """Make queued and deferred recipients due now (of *queue_ids*, or to
    *domain*, or all); returns how many."""
    q = select(recipients.c.id, recipients.c.address).where(recipients.c.state.in_(PENDING))
    rows: list[Any] = []
    if queue_ids is not None:
        for chunk in _chunks(list(queue_ids)):
            rows.extend(conn.execute(q.where(recipients.c.queue_id.in_(chunk))))
    else:
        rows = list(conn.execute(q))
    if domain:
        want = _domain_arg(domain)
        rows = [r for r in rows if domain_key(r.address, hostname) == want]
    ids = [r.id for r in rows]
    for chunk in _chunks(ids):
        conn.execute(update(recipients)
                     .where(recipients.c.id.in_(chunk), recipients.c.state.in_(PENDING))
                     .values(next_attempt=now))
    if ids:
        notify(conn, "flushed")
    return len(ids)


def _count_by_message(conn: Connection, queue_ids: Sequence[str],
                      states: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for chunk in _chunks(list(queue_ids)):
        for qid, n in conn.execute(
                select(recipients.c.queue_id, func.count())
                .where(recipients.c.queue_id.in_(chunk), recipients.c.state.in_(states))
                .group_by(recipients.c.queue_id)):
            out[qid] = int(n)
    return out


def _change(conn: Connection, queue_ids: Sequence[str], from_states: Sequence[str],
            **values: Any) -> list[MessageChange]:
    """Set *values* on the recipients of *queue_ids* in *from_states*; for
    each message, how many were changed and how many are in flight."""
    changed: dict[str, int] = defaultdict(int)
    for chunk in _chunks(list(queue_ids)):
        # State-checked (and, on PostgreSQL, re-checked after waiting for a
        # row another transaction holds): a recipient a node claimed
        # meanwhile is left to its delivery, never overwritten.
        for (qid,) in conn.execute(update(recipients)
                                   .where(recipients.c.queue_id.in_(chunk),
                                          recipients.c.state.in_(from_states))
                                   .values(**values).returning(recipients.c.queue_id)):
            changed[qid] += 1
    inflight = _count_by_message(conn, queue_ids, ("inflight",))
    return [MessageChange(q, changed=changed.get(q, 0), inflight=inflight.get(q, 0))
            for q in queue_ids]


def hold_messages(conn: Connection, queue_ids: Sequence[str]) -> list[MessageChange]:
    """queued/deferred → held (the queue runner never claims held recipients)."""
    return _change(conn, queue_ids, PENDING, state="held")


def release_messages(conn: Connection, queue_ids: Sequence[str],
                     *, now: float) -> list[MessageChange]:
    """held → queued, due now."""
    done = _change(conn, queue_ids, ("held",), state="queued", next_attempt=now)
    if any(c.changed for c in done):
        notify(conn, "released")
    return done


def requeue_messages(conn: Connection, queue_ids: Sequence[str],
                     *, now: float) -> list[MessageChange]:
    """queued/deferred/held → queued with no attempts so far, due now."""
    done = _change(conn, queue_ids, CHANGEABLE, state="queued", attempts=0, next_attempt=now)
    if any(c.changed for c in done):
        notify(conn, "requeued")
    return done


def delete_messages(conn: Connection, queue_ids: Sequence[str]) -> list[MessageChange]:
    """Remove messages with their content and recipients; for each, how
    many recipients were in flight."""
    lock_messages(conn, queue_ids)      # as a record does: see mta.spool.ops.record_calls
    inflight = _count_by_message(conn, queue_ids, ("inflight",))
    delete_messages_rows(conn, queue_ids)
    return [MessageChange(q, inflight=inflight.get(q, 0)) for q in queue_ids]


def bounce_messages(conn: Connection, queue_ids: Sequence[str], *, now: float, reply: str,
           make_dsns: DSNMaker) -> list[MessageChange]:
    """Fail the queued, deferred and held recipients of each message now,
    with *reply* as their last reply, spool the DSNs *make_dsns* builds for
    them, and remove each message whose recipients are then all final (as
    the queue runner does: :func:`mta.spool.ops.record_results`)."""
    found: list[tuple[str, int, int, tuple[str, ...]]] = []
    updates: list[RecipientUpdate] = []
    dsns: list[InboundMessage] = []
    lock_messages(conn, queue_ids)      # as a record does: see mta.spool.ops.record_calls
    for chunk in _chunks(list(queue_ids)):
        # What is read below stays so: no node can claim these meanwhile.
        conn.execute(select(recipients.c.id)
                     .where(recipients.c.queue_id.in_(chunk), recipients.c.state.in_(CHANGEABLE))
                     .order_by(recipients.c.id).with_for_update()).all()
    for qid in queue_ids:
        m = get_message(conn, qid)
        if m is None:
            continue
        rows = [r for r in m.recipients if r.state in CHANGEABLE]
        made = make_dsns(m.queued(), [_queued_recipient(r) for r in rows], now) if rows else []
        dsns.extend(made)
        updates.extend(RecipientUpdate(r.id, "failed", r.attempts, now, reply, r.warned)
                       for r in rows)
        found.append((qid, len(rows), sum(r.state == "inflight" for r in m.recipients),
                      tuple(d.queue_id for d in made)))
    removed = set(record_results(conn, updates, dsns, [f[0] for f in found]))
    return [MessageChange(qid, changed=n, inflight=inflight, dsns=made, removed=qid in removed)
            for qid, n, inflight, made in found]


def store_messages(conn: Connection, msgs: Sequence[InboundMessage]) -> None:
    """Spool new messages (local submission), all recipients queued and due."""
    insert_messages(conn, list(msgs))


# --------------------------------------------------------------------------- the interface

class SpoolAdmin(QueueAdmin):
    """:class:`mta.spool.interface.QueueAdmin` on an engine (from
    :func:`open_engine`): each method one transaction, SQLAlchemy errors
    raised as :class:`AdminError`.  *hostname* is the server's: what a bare
    recipient (``postmaster``) is at, for ``--domain`` and the stats."""

    def __init__(self, engine: Engine, *, hostname: str):
        self.engine = engine
        self.hostname = hostname

    @classmethod
    def open(cls, url: str, *, hostname: str, create: bool = False,
             lock_timeout: float = LOCK_TIMEOUT) -> SpoolAdmin:
        return cls(open_engine(url, create=create, lock_timeout=lock_timeout),
                   hostname=hostname)

    def _changes(self, queue_ids: Sequence[str],
                 change: Callable[[Connection, list[str]], list[MessageChange]]) -> Changed:
        with transaction(self.engine, write=True) as conn:
            found = existing_ids(conn, queue_ids)
            ids = [q for q in dict.fromkeys(queue_ids) if q in found]
            done = change(conn, ids) if ids else []
        return Changed(tuple(done), tuple(q for q in dict.fromkeys(queue_ids) if q not in found))

    def list_messages(self, *, states: Sequence[str] | None = None, domain: str | None = None,
             sender: str | None = None,
             arrived_before: float | None = None) -> list[ListedMessage]:
        with transaction(self.engine, write=False) as conn:
            return list_queue(conn, hostname=self.hostname, states=states, domain=domain,
                              sender=sender, arrived_before=arrived_before)

    def show(self, queue_id: str) -> ListedMessage | None:
        with transaction(self.engine, write=False) as conn:
            return get_message(conn, queue_id)

    def stats(self, *, now: float) -> QueueStats:
        with transaction(self.engine, write=False) as conn:
            return queue_stats(conn, now=now, hostname=self.hostname)

    def flush(self, *, now: float, queue_ids: Sequence[str] | None = None,
              domain: str | None = None) -> Flushed:
        with transaction(self.engine, write=True) as conn:
            if queue_ids is None:
                return Flushed(flush_recipients(conn, now=now, hostname=self.hostname,
                                                domain=domain))
            found = existing_ids(conn, queue_ids)
            ids = [q for q in dict.fromkeys(queue_ids) if q in found]
            n = flush_recipients(conn, now=now, hostname=self.hostname, queue_ids=ids) if ids else 0
        return Flushed(n, tuple(q for q in dict.fromkeys(queue_ids) if q not in found))

    def release_domain(self, domain: str, *, now: float, how: str) -> Flushed:
        with transaction(self.engine, write=True) as conn:
            rel = release_domain(conn, _domain_arg(domain), False, now, self.hostname, how)
        return Flushed(rel.recipients)

    def hold(self, queue_ids: Sequence[str]) -> Changed:
        return self._changes(queue_ids, hold_messages)

    def release(self, queue_ids: Sequence[str], *, now: float) -> Changed:
        return self._changes(queue_ids, lambda c, ids: release_messages(c, ids, now=now))

    def requeue(self, queue_ids: Sequence[str], *, now: float) -> Changed:
        return self._changes(queue_ids, lambda c, ids: requeue_messages(c, ids, now=now))

    def delete(self, queue_ids: Sequence[str]) -> Changed:
        return self._changes(queue_ids, delete_messages)

    def delete_deferred(self) -> Changed:
        with transaction(self.engine, write=True) as conn:
            ids = deferred_queue_ids(conn)
            return Changed(tuple(delete_messages(conn, ids)) if ids else ())

    def bounce(self, queue_ids: Sequence[str], *, now: float, reply: str,
               make_dsns: DSNMaker) -> Changed:
        return self._changes(queue_ids, lambda c, ids: bounce_messages(
            c, ids, now=now, reply=reply, make_dsns=make_dsns))

    def submit(self, msgs: Sequence[InboundMessage]) -> None:
        with transaction(self.engine, write=True) as conn:
            store_messages(conn, msgs)

    def close(self) -> None:
        self.engine.dispose()
