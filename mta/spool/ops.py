"""Spool operations, each a function of a Connection run inside a
transaction (by the group-commit writer for writes, the spool thread pool
for reads): the SQL behind mta.spool.Spool's methods (the interface is
mta.spool.interface).  The queue's SQL lives here and, for ``mta queue``,
in mta.spool.admin."""
from __future__ import annotations

import sqlite3
from typing import Any, Callable, Iterable, Mapping, Sequence

from sqlalchemy import Integer, and_, bindparam, delete, func, or_, select, union_all, update
from sqlalchemy.engine import Connection

from ..address import domain_key
from ..message import InboundMessage, QueuedMessage, QueuedRecipient
# RecipientUpdate is the interface's record, also known as ops.RecipientUpdate.
from . import fast
from .interface import RELEASED, Claimed, QueueSummary, RecipientUpdate, Release
from .notify import notify
from .schema import contents, messages, recipients

PENDING = ("queued", "deferred")
FINAL = ("delivered", "failed")

# The statements of the hot paths are built once: SQLAlchemy then finds their
# compiled form in its cache without building the statement and its cache key
# on every call.  Lists of ids are sent with executemany (one row each) or as
# one expanding IN; constant state lists are spelled out as bound values so no
# per-call post-compilation is needed.
_ins_messages = messages.insert()
_ins_contents = contents.insert()
# A large body on SQLite: the row is inserted with a zeroblob of the body's
# length, then the body written into it through incremental blob I/O
# (sqlite3 binds a blob parameter SQLITE_TRANSIENT -- one copy -- and then
# builds the record -- another: ~3x the body at peak, instead of ~1x).
_ins_contents_zeroblob = contents.insert().values(
    queue_id=bindparam("b_qid"), headers=bindparam("b_headers"),
    body=func.zeroblob(bindparam("b_len", type_=Integer)))
BLOB_THRESHOLD = 1024 * 1024    # bodies larger than this are written as blobs
BLOB_CHUNK = 1024 * 1024
_BLOBOPEN = hasattr(sqlite3.Connection, "blobopen")   # Python >= 3.11
_ins_recipients = recipients.insert()
_pending = or_(*(recipients.c.state == s for s in PENDING))
_not_final = and_(*(recipients.c.state != s for s in FINAL))
# A claim whose lease ran out: any other node may claim the recipient
# (its owner renews its own claims, never re-claims them: see claim_and_load).
_expired = and_(recipients.c.state == "inflight",
                or_(recipients.c.owner.is_(None), recipients.c.owner != bindparam("owner")),
                or_(recipients.c.lease_until.is_(None),
                    recipients.c.lease_until < bindparam("now")))
_claimable = or_(_pending, _expired)
_RCPT_COLS = (recipients.c.id, recipients.c.queue_id, recipients.c.address,
              recipients.c.notify, recipients.c.orcpt, recipients.c.attempts,
              recipients.c.warned, recipients.c.last_reply)


def _due_read(*extra: Any) -> Any:
    """The due read (see :func:`due_recipients`), with *extra* conditions.
    One ``SELECT`` per state, each in the order of the ``recipients_due``
    index (state, next_attempt), merged: the database reads the first
    *limit* rows of each and stops (SQLite: MERGE (UNION ALL); PostgreSQL:
    Merge Append).  One ``WHERE`` with the three states ORed instead reads
    and sorts every due row, on every pass: 3.5 ms at 3000 queued
    messages, 15 ms at 20000, against 0.3-0.5 ms (bench/due_read.py)."""
    def arm(*where: Any) -> Any:
        return (select(*_RCPT_COLS, messages.c.size.label("message_size"),
                       recipients.c.next_attempt.label("due_at"))
                .join(messages, messages.c.queue_id == recipients.c.queue_id)
                .where(*where, *extra))
    due_now = recipients.c.next_attempt <= bindparam("now")
    each = union_all(*(arm(recipients.c.state == s, due_now) for s in PENDING),
                     arm(_expired)).subquery("due")
    return select(each).order_by(each.c.due_at).limit(bindparam("limit"))

# The claim: lock the rows still claimable (PostgreSQL: in id order,
# skipping those another transaction holds -- a second node's claim, an
# administrator's change; SQLite has no FOR UPDATE and needs none: a write
# transaction holds the whole database), then the state-checked update.
_sel_claimable = (select(recipients.c.id)
                  .where(recipients.c.id.in_(bindparam("ids", expanding=True)), _claimable)
                  .order_by(recipients.c.id).with_for_update(skip_locked=True))
_upd_claim = (update(recipients)
              .where(recipients.c.id.in_(bindparam("ids", expanding=True)), _claimable)
              .values(state="inflight", owner=bindparam("owner"),
                      lease_until=bindparam("until"))
              .returning(*_RCPT_COLS))
_CHUNK = 500      # ids per IN (...): well under every database's parameter limit
# Who may record a recipient's result: its owner while it is in flight
# (the queue runner), or, for an administrator (owner None), a recipient
# that is not in flight and not final.
_owned = and_(recipients.c.state == "inflight", recipients.c.owner == bindparam("owner"))
_changeable = recipients.c.state.in_(("queued", "deferred", "held"))
_sel_owned = (select(recipients.c.id)
              .where(recipients.c.id.in_(bindparam("ids", expanding=True)), _owned)
              .order_by(recipients.c.id).with_for_update())
_sel_changeable = (select(recipients.c.id)
                   .where(recipients.c.id.in_(bindparam("ids", expanding=True)), _changeable)
                   .order_by(recipients.c.id).with_for_update())
_upd_rcpt = (update(recipients).where(recipients.c.id == bindparam("rid"))
             .values(state=bindparam("b_state"), attempts=bindparam("b_attempts"),
                     next_attempt=bindparam("b_next"), last_reply=bindparam("b_reply"),
                     warned=bindparam("b_warned"), owner=None, lease_until=None))
_lock_messages = (select(messages.c.queue_id)
                  .where(messages.c.queue_id.in_(bindparam("ids", expanding=True)))
                  .order_by(messages.c.queue_id).with_for_update())
_requeue = dict(state="queued", owner=None, lease_until=None)
_sel_messages = (select(messages, contents.c.headers, contents.c.body)
                 .join(contents, contents.c.queue_id == messages.c.queue_id)
                 .where(messages.c.queue_id.in_(bindparam("ids", expanding=True))))
_sel_open = (select(recipients.c.queue_id)
             .where(recipients.c.queue_id.in_(bindparam("ids", expanding=True)), _not_final)
             .distinct())
_del_messages = delete(messages).where(messages.c.queue_id == bindparam("qid"))


def insert_messages(conn: Connection, msgs: list[InboundMessage]) -> None:
    """Spool *msgs*, every recipient queued and due at its arrival; the
    other processes on the spool are notified at the commit
    (mta.spool.notify)."""
    if not msgs:
        return
    mrows, crows, rrows = [], [], []
    big: list[InboundMessage] = []
    blobs = _BLOBOPEN and conn.dialect.name == "sqlite" and conn.dialect.driver == "pysqlite"
    for m in msgs:
        mrows.append({
            "queue_id": m.queue_id, "sender": m.sender, "body_type": m.body_type,
            "smtputf8": m.smtputf8, "size_param": m.size_param, "ret": m.ret,
            "envid": m.envid, "auth": m.auth, "client_address": m.client_address,
            "helo": m.helo, "protocol": m.protocol, "arrival": m.arrival, "size": m.size,
        })
        if blobs and memoryview(m.body).nbytes > BLOB_THRESHOLD:
            big.append(m)
        else:
            crows.append({"queue_id": m.queue_id, "headers": m.headers, "body": m.body})
        for r in m.recipients:
            rrows.append({
                "queue_id": m.queue_id, "address": r.address, "notify": r.notify,
                "orcpt": r.orcpt, "state": "queued", "attempts": 0,
                "next_attempt": m.arrival, "last_reply": None, "warned": False,
            })
    fast.run(conn, _ins_messages, mrows)
    if crows:
        fast.run(conn, _ins_contents, crows)
    for m in big:
        _insert_contents_blob(conn, m)
    if rrows:
        fast.run(conn, _ins_recipients, rrows)
    notify(conn, "stored")


def _insert_contents_blob(conn: Connection, m: InboundMessage) -> None:
    """Insert the contents row of *m* with a zeroblob for its body, then
    write the body into it in chunks -- in the current transaction (blob
    writes are part of it: a rollback takes the row and its body back)."""
    body = memoryview(m.body)
    if body.ndim != 1 or body.itemsize != 1:
        body = body.cast("B")
    n = body.nbytes
    res = conn.execute(_ins_contents_zeroblob,
                       {"b_qid": m.queue_id, "b_headers": m.headers, "b_len": n})
    rowid = res.lastrowid
    with conn.connection.dbapi_connection.blobopen("contents", "body", rowid) as blob:
        for off in range(0, n, BLOB_CHUNK):
            blob.write(body[off:off + BLOB_CHUNK])


def recover_inflight(conn: Connection, owner: str, now: float,
                     former: Callable[[str], bool] | None = None) -> int:
    """At a node's start: the recipients it left in flight itself (claimed
    under the same *owner* name, or a name *former* says was an earlier
    start of it) and those whose lease has run out (a node that died, a
    version-1 spool) are queued again -- at-least-once delivery.  Those
    another node holds under a live lease are its own."""
    taken = [owner]
    if former is not None:
        live = conn.execute(select(recipients.c.owner).distinct()
                            .where(recipients.c.state == "inflight",
                                   recipients.c.owner.is_not(None),
                                   recipients.c.owner != owner,
                                   recipients.c.lease_until >= now)).scalars().all()
        taken += [o for o in live if former(o)]
    res = conn.execute(update(recipients)
                       .where(recipients.c.state == "inflight",
                              or_(recipients.c.owner.in_(taken), recipients.c.owner.is_(None),
                                  recipients.c.lease_until.is_(None),
                                  recipients.c.lease_until < now))
                       .values(**_requeue))
    return res.rowcount or 0


def requeue_inflight(conn: Connection, rids: Sequence[int], owner: str) -> int:
    """Recipients *owner* claimed for an attempt that did not happen (or was
    interrupted by a stop) are queued again.  Only rows it still owns: a
    result recorded meanwhile, or a claim another node took over, stands."""
    if not rids:
        return 0
    n = 0
    for i in range(0, len(rids), _CHUNK):
        res = conn.execute(update(recipients)
                           .where(recipients.c.id.in_(list(rids[i:i + _CHUNK])),
                                  recipients.c.state == "inflight",
                                  recipients.c.owner == owner)
                           .values(**_requeue))
        n += res.rowcount or 0
    if n:
        notify(conn, "requeued")      # another node may take them now
    return n


def renew_leases(conn: Connection, owner: str, until: float) -> int:
    """Every recipient *owner* has in flight is its own until *until*;
    answers how many."""
    res = conn.execute(update(recipients)
                       .where(recipients.c.owner == owner, recipients.c.state == "inflight")
                       .values(lease_until=until))
    return res.rowcount or 0


def queue_summary(conn: Connection) -> QueueSummary:
    """For the metrics: recipients by state, the number of messages, and the
    arrival time of the oldest (None when the spool is empty)."""
    by_state = {state: n for state, n in conn.execute(
        select(recipients.c.state, func.count()).group_by(recipients.c.state))}
    count, oldest = conn.execute(select(func.count(), func.min(messages.c.arrival))
                                 .select_from(messages)).one()
    return QueueSummary(by_state, int(count or 0), oldest)


def queued_recipient(row: Mapping[str, Any]) -> QueuedRecipient:
    """The typed record of a recipients row (or a mapping with its columns)."""
    return QueuedRecipient(id=row["id"], queue_id=row["queue_id"], address=row["address"],
                           notify=row["notify"], orcpt=row["orcpt"],
                           attempts=row["attempts"], warned=bool(row["warned"]),
                           last_reply=row.get("last_reply"),
                           message_size=row.get("message_size") or 0)


def queued_message(row: Mapping[str, Any]) -> QueuedMessage:
    """The typed record of a message row joined with its contents."""
    return QueuedMessage(queue_id=row["queue_id"], sender=row["sender"],
                         headers=bytes(row["headers"]), body=bytes(row["body"]),
                         arrival=row["arrival"], body_type=row.get("body_type"),
                         smtputf8=bool(row.get("smtputf8")), ret=row.get("ret"),
                         envid=row.get("envid"))


def due_recipients(conn: Connection, now: float, limit: int, owner: str = "",
                   skip_domains: Sequence[str] = ()) -> list[QueuedRecipient]:
    """Up to *limit* due recipients, soonest first: queued or deferred with
    ``next_attempt`` <= *now*, and those in flight whose lease (not
    *owner*'s) ran out -- a read: nothing is claimed (see :func:`claim_and_load`).
    Addresses ending in ``@`` one of *skip_domains* (ASCII case-insensitive;
    at most :data:`MAX_SKIP`) are left out, in SQL: the queue runner's
    destinations that have no slot free, whose backlog would otherwise be
    read, row by row, on every pass."""
    skip = list(skip_domains)[:MAX_SKIP]
    params: dict[str, Any] = {"now": now, "limit": limit, "owner": owner}
    for i, d in enumerate(skip):
        params[f"skip{i}"] = "%@" + _like_escape(d)
    return [queued_recipient(r) for r in fast.run(conn, _due_skipping(len(skip)), params).mappings()]


#: At most this many domains are left out of one due read.
MAX_SKIP = 32
_due_statements: dict[int, Any] = {}


def _due_skipping(n: int) -> Any:
    """The due read leaving out *n* domains (built once per *n*)."""
    stmt = _due_statements.get(n)
    if stmt is None:
        stmt = _due_statements[n] = _due_read(
            *(recipients.c.address.not_ilike(bindparam(f"skip{i}"), escape="\\")
              for i in range(n)))
    return stmt


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def claim_and_load(conn: Connection, rids: Sequence[int], owner: str, now: float,
                   until: float) -> Claimed:
    """Claim for *owner*, until *until*, those of the recipients *rids*
    (read by :func:`due_recipients`) that are still claimable at *now* --
    pending, or in flight under another owner's expired lease; an
    administrator may have held, flushed or deleted some meanwhile, another
    node claimed them -- and return them (fresh, in the order of *rids*)
    with their messages (queue id -> message with its headers and body), in
    one transaction.  The update re-checks the state: what changed since
    the read is left alone, never overwritten."""
    return _claim(conn, rids, owner, now, until)


def _claim(conn: Connection, rids: Sequence[int], owner: str, now: float,
           until: float) -> Claimed:
    found: dict[int, QueuedRecipient] = {}
    args = {"owner": owner, "now": now}
    # SQLite: the write transaction holds the whole file, and the update
    # checks the state itself -- no rows to lock first.
    lock = conn.dialect.name != "sqlite"
    for i in range(0, len(rids), _CHUNK):
        chunk = list(rids[i:i + _CHUNK])
        ids = [r[0] for r in conn.execute(_sel_claimable, {**args, "ids": chunk})] \
            if lock else chunk
        if not ids:
            continue
        for r in fast.run(conn, _upd_claim, {**args, "ids": ids, "until": until}).mappings():
            found[r["id"]] = queued_recipient(r)
    rows = [found[rid] for rid in rids if rid in found]
    if not rows:
        return Claimed(rows, {})
    loaded = load_messages(conn, {r.queue_id for r in rows})
    return Claimed(rows, {qid: queued_message(m) for qid, m in loaded.items()})


def claim_domains(conn: Connection, domains: Iterable[str], hostname: str, owner: str,
                  now: float, until: float) -> Claimed:
    """Claim for *owner*, until *until* (as :func:`claim_and_load` does),
    every pending recipient (queued or deferred, due or not) whose domain
    is one of *domains* (mta.domain.key form; a bare ``postmaster`` is
    *hostname*'s) and return them in the order they arrived, with their
    messages -- in one transaction: what ATRN hands over (RFC 2645).  Held
    recipients (``mta queue hold``) stay where the administrator put them;
    another node's claims are left to it."""
    want = set(domains)
    q = (select(recipients.c.id, recipients.c.address).where(_pending)
         .order_by(recipients.c.id))
    rids = [r.id for r in conn.execute(q) if domain_key(r.address, hostname) in want]
    return _claim(conn, rids, owner, now, until)


def load_messages(conn: Connection, queue_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    ids = list(queue_ids)
    return {r["queue_id"]: r for r in fast.run(conn, _sel_messages, {"ids": ids}).mappings()}


def next_due(conn: Connection) -> float | None:
    return conn.execute(select(func.min(recipients.c.next_attempt))
                        .where(recipients.c.state.in_(PENDING))).scalar()


def lock_messages(conn: Connection, queue_ids: Iterable[str]) -> None:
    """Lock the rows of messages *queue_ids* until the end of the
    transaction, always in queue id order, so that two transactions that
    each take several never wait for each other in a circle.  Nothing to do
    on SQLite, which has no row locks: a write transaction there holds the
    whole database (the spool's writer and ``mta queue`` begin theirs with
    ``BEGIN IMMEDIATE``, before they read)."""
    if conn.dialect.name == "sqlite":
        return
    ids = sorted(set(queue_ids))
    for i in range(0, len(ids), _CHUNK):
        conn.execute(_lock_messages, {"ids": ids[i:i + _CHUNK]}).all()


#: One record: (updates, new messages, queue ids to remove when finished, owner).
RecordCall = tuple[Sequence[RecipientUpdate], Sequence[InboundMessage], Iterable[str],
                   str | None]


def record_calls(conn: Connection, calls: Sequence[RecordCall]) -> list[str]:
    """Several records in one transaction (the group commit merges them):
    see :func:`record_results`.  Each call's updates are written for the
    recipients its owner still holds, its new messages (DSNs, forwarded
    copies) only if it has no update or one of them is written -- a result
    that lost its claim to another node is that node's to make, with its
    DSNs.  Returns the queue ids removed."""
    qids = {q for c in calls for q in c[2]}
    # Finishing a message: its row is locked first, so that two nodes that
    # record its last recipients at once do it one after the other -- the
    # second sees the first's update and removes the message.
    lock_messages(conn, qids)
    updates: list[RecipientUpdate] = []
    new: list[InboundMessage] = []
    by_owner: dict[str | None, list[int]] = {}
    for ups, _m, _q, owner in calls:
        by_owner.setdefault(owner, []).extend(u.rid for u in ups)
    ok = {owner: _writable(conn, rids, owner) for owner, rids in by_owner.items()}
    for ups, msgs, _q, owner in calls:
        mine = [u for u in ups if u.rid in ok[owner]]
        updates += mine
        if mine or not ups:
            new += msgs
    if updates:
        fast.run(conn, _upd_rcpt, [{"rid": u.rid, "b_state": u.state, "b_attempts": u.attempts,
                                  "b_next": u.next_attempt, "b_reply": u.last_reply,
                                  "b_warned": u.warned} for u in updates])
    if new:
        insert_messages(conn, new)
    ids = sorted(qids)
    if not ids:
        return []
    open_ids = set(fast.run(conn, _sel_open, {"ids": ids}).scalars())
    done = [q for q in ids if q not in open_ids]
    if done:
        delete_messages_rows(conn, done)
    return done


def delete_messages_rows(conn: Connection, queue_ids: Sequence[str]) -> None:
    """Remove messages *queue_ids* with their contents and recipients: the
    message rows, the others by ``ON DELETE CASCADE`` (every spool schema
    has it; SQLite's connections turn foreign keys on, mta.spool.make_engine)."""
    fast.run(conn, _del_messages, [{"qid": q} for q in queue_ids])


def _writable(conn: Connection, rids: Sequence[int], owner: str | None) -> set[int]:
    """Those of *rids* whose result may be written (locked until the end
    of the transaction): in flight and held by *owner*, or, for an
    administrator (*owner* None), neither in flight nor final."""
    out: set[int] = set()
    q = _sel_changeable if owner is None else _sel_owned
    for i in range(0, len(rids), _CHUNK):
        out.update(fast.run(conn, q, {"ids": list(rids[i:i + _CHUNK]),
                                      "owner": owner}).scalars())
    return out


def record_results(conn: Connection, updates: Sequence[RecipientUpdate],
                   new_messages: Sequence[InboundMessage], queue_ids: Iterable[str],
                   owner: str | None = None) -> list[str]:
    """Store the outcome of delivery attempts, the DSNs they owe, and remove
    every message of *queue_ids* whose recipients are all final — in one
    transaction, so a message goes only once its DSNs are spooled.  Only
    recipients *owner* still holds in flight are updated (owner None: an
    administrator's, of recipients neither in flight nor final); see
    :func:`record_calls`.  Returns the queue ids removed."""
    return record_calls(conn, [(updates, new_messages, list(queue_ids), owner)])


def record_results_again(conn: Connection, updates: Sequence[RecipientUpdate],
                         new_messages: Sequence[InboundMessage],
                         queue_ids: Iterable[str], owner: str | None = None) -> list[str]:
    """record_results for a result whose earlier write failed: the same
    check of who holds each recipient finds those that write recorded after
    all (or that were removed meanwhile) -- and then nothing is written
    again, above all no DSN twice."""
    return record_calls(conn, [(updates, new_messages, list(queue_ids), owner)])


def release_domain(conn: Connection, domain: str, subdomains: bool, now: float,
                   hostname: str, how: str) -> Release:
    """Make the pending (queued, deferred) recipients of *domain* -- a
    mta.domain key; with *subdomains* also those of the domains below it --
    due now, marked released (last reply ``RELEASED (how)``, e.g. "released
    for delivery (ETRN from 192.0.2.7)"): the queue runner relays a hold
    domain's once instead of holding them again (for other domains the mark
    changes nothing; their next attempt, now, replaces it).  Recipients held
    by an administrator (``mta queue hold``) stay held."""
    below = "." + domain
    ids: list[int] = []
    qids: set[str] = set()
    domains: set[str] = set()
    for r in conn.execute(select(recipients.c.id, recipients.c.queue_id, recipients.c.address)
                          .where(_pending)):
        d = domain_key(r.address, hostname)
        if d != domain and not (subdomains and d.endswith(below)):
            continue
        ids.append(r.id)
        qids.add(r.queue_id)
        domains.add(d)
    due = update(recipients).where(recipients.c.id.in_(bindparam("ids", expanding=True)),
                                   _pending)
    for i in range(0, len(ids), _CHUNK):
        conn.execute(due.values(next_attempt=now, last_reply=f"{RELEASED} ({how})"),
                     {"ids": ids[i:i + _CHUNK]})
    if ids:
        notify(conn, "released")
    return Release(len(qids), len(ids), tuple(sorted(domains)))


def _split_record_results(removed: list[str], call: tuple) -> list[str]:
    gone = set(removed)
    return [q for q in dict.fromkeys(call[2]) if q in gone]


def _record_merged(conn: Connection, calls: list[tuple]) -> list[str]:
    """The calls of record_results in one batch, as one (their recipients
    are disjoint; each keeps its own owner check)."""
    return record_calls(conn, [(c[0], c[1], c[2], c[3] if len(c) > 3 else None)
                               for c in calls])


# Writes that the group-commit writer may run as one call when several are in
# the same batch: fn -> (run the argument tuples of all as one, in a
# Connection; one caller's share of the result).
MERGEABLE: dict[Callable[..., Any], tuple[Callable[[Connection, list[tuple]], Any],
                                          Callable[[Any, tuple], Any]]] = {
    record_results: (_record_merged, _split_record_results),
}
