"""Spool operations, each a function of a Connection run inside a
transaction (by the group-commit writer for writes, the spool thread pool
for reads).  All the queue's SQL lives here."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from sqlalchemy import bindparam, delete, func, select, update
from sqlalchemy.engine import Connection

from ..message import InboundMessage
from .schema import contents, messages, recipients

PENDING = ("queued", "deferred")
FINAL = ("delivered", "failed")

_upd_rcpt = (update(recipients).where(recipients.c.id == bindparam("rid"))
             .values(state=bindparam("b_state"), attempts=bindparam("b_attempts"),
                     next_attempt=bindparam("b_next"), last_reply=bindparam("b_reply"),
                     warned=bindparam("b_warned")))


def insert_messages(conn: Connection, msgs: list[InboundMessage]) -> None:
    mrows, crows, rrows = [], [], []
    for m in msgs:
        mrows.append({
            "queue_id": m.queue_id, "sender": m.sender, "body_type": m.body_type,
            "smtputf8": m.smtputf8, "size_param": m.size_param, "ret": m.ret,
            "envid": m.envid, "auth": m.auth, "client_address": m.client_address,
            "helo": m.helo, "protocol": m.protocol, "arrival": m.arrival, "size": m.size,
        })
        crows.append({"queue_id": m.queue_id, "headers": m.headers, "body": m.body})
        for r in m.recipients:
            rrows.append({
                "queue_id": m.queue_id, "address": r.address, "notify": r.notify,
                "orcpt": r.orcpt, "state": "queued", "attempts": 0,
                "next_attempt": m.arrival, "last_reply": None, "warned": False,
            })
    conn.execute(messages.insert(), mrows)
    conn.execute(contents.insert(), crows)
    if rrows:
        conn.execute(recipients.insert(), rrows)


def recover_inflight(conn: Connection) -> int:
    """After a restart, recipients that were in flight when the process died
    are attempted again (at-least-once delivery)."""
    res = conn.execute(update(recipients).where(recipients.c.state == "inflight")
                       .values(state="queued"))
    return res.rowcount or 0


def claim_due(conn: Connection, now: float, limit: int) -> list[dict[str, Any]]:
    """Mark up to *limit* due recipients in flight and return them."""
    q = (select(recipients.c.id, recipients.c.queue_id, recipients.c.address,
                recipients.c.notify, recipients.c.orcpt, recipients.c.attempts,
                recipients.c.warned, recipients.c.last_reply)
         .where(recipients.c.state.in_(PENDING), recipients.c.next_attempt <= now)
         .order_by(recipients.c.next_attempt).limit(limit))
    if conn.dialect.name == "postgresql":
        q = q.with_for_update(skip_locked=True)
    rows = [dict(r._mapping) for r in conn.execute(q)]
    if rows:
        conn.execute(update(recipients)
                     .where(recipients.c.id.in_([r["id"] for r in rows]))
                     .values(state="inflight"))
    return rows


def load_messages(conn: Connection, queue_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    ids = list(queue_ids)
    q = (select(messages, contents.c.headers, contents.c.body)
         .join(contents, contents.c.queue_id == messages.c.queue_id)
         .where(messages.c.queue_id.in_(ids)))
    return {r.queue_id: dict(r._mapping) for r in conn.execute(q)}


def next_due(conn: Connection) -> float | None:
    return conn.execute(select(func.min(recipients.c.next_attempt))
                        .where(recipients.c.state.in_(PENDING))).scalar()


@dataclass(slots=True)
class RecipientUpdate:
    rid: int
    state: str
    attempts: int
    next_attempt: float
    last_reply: str | None
    warned: bool = False


def record_results(conn: Connection, updates: list[RecipientUpdate],
                   new_messages: list[InboundMessage], queue_ids: Iterable[str]) -> list[str]:
    """Store the outcome of delivery attempts, the DSNs they owe, and remove
    every message of *queue_ids* whose recipients are all final — in one
    transaction, so a message goes only once its DSNs are spooled.
    Returns the queue ids removed."""
    if updates:
        conn.execute(_upd_rcpt, [{"rid": u.rid, "b_state": u.state, "b_attempts": u.attempts,
                                  "b_next": u.next_attempt, "b_reply": u.last_reply,
                                  "b_warned": u.warned} for u in updates])
    if new_messages:
        insert_messages(conn, new_messages)
    ids = list(set(queue_ids))
    if not ids:
        return []
    open_ids = {r[0] for r in conn.execute(
        select(recipients.c.queue_id).where(recipients.c.queue_id.in_(ids),
                                            recipients.c.state.not_in(FINAL)).distinct())}
    done = [q for q in ids if q not in open_ids]
    if done:
        conn.execute(delete(recipients).where(recipients.c.queue_id.in_(done)))
        conn.execute(delete(contents).where(contents.c.queue_id.in_(done)))
        conn.execute(delete(messages).where(messages.c.queue_id.in_(done)))
    return done
