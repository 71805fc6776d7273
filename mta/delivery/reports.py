"""What a delivery owes besides its outcome: the delivery status
notifications (RFC 3464) of a message's recipients, built for the spool
(:func:`dsn_messages`; when NOTIFY asks for one: :func:`notify_allows`),
and the copy that relays a message to an alias's remote members
(:func:`forwarded_copy`).  Used by the queue runner (mta.delivery.scheduler)
and by ``mta queue`` (a bounce of recipients removed by hand).
"""
from __future__ import annotations

from collections.abc import Callable

from twisted.logger import Logger

from ..message import InboundMessage, Recipient, new_queue_id, split_header_block
from .types import Outcome, QueuedMessage

__all__ = ["dsn_messages", "forwarded_copy", "notify_allows"]

log = Logger(namespace="mta.delivery")


def notify_allows(notify: str | None, what: str) -> bool:
    """RFC 3461: no NOTIFY means failures (and, by our choice, delays) are
    reported, successes not."""
    if notify is None:
        return what in ("FAILURE", "DELAY")
    return what in notify.split(",")


def forwarded_copy(m: QueuedMessage, res: Outcome, now: float, *,
                   hostname: str) -> InboundMessage:
    """The new message that relays *m* to the remote members of an alias
    (``res.forward``): same sender, envelope and content, recipients with
    ``res.forward_notify`` / ``forward_orcpt`` (None: not passed on)."""
    return InboundMessage(
        queue_id=new_queue_id(now), sender=m.sender,
        recipients=[Recipient(a, res.forward_notify, res.forward_orcpt) for a in res.forward],
        headers=m.headers, body=m.body, arrival=now, client_address="127.0.0.1",
        helo=hostname, protocol="local", size=len(m.headers) + len(m.body),
        smtputf8=m.smtputf8, body_type=m.body_type, ret=m.ret, envid=m.envid)


def dsn_messages(m: QueuedMessage, report: dict[str, list], now: float, *, hostname: str,
                 postmaster: str = "", builder: Callable[..., bytes] | None = None) -> list:
    """The DSN messages (ready for the spool) that *report* owes for message
    row *m*: one per kind (failure, delay, success), from ``<>`` to the
    sender — or, for a failed bounce, to *postmaster* (or none)."""
    if not any(report.values()):
        return []
    from ..dsn import OriginalMessage, build_dsn, needs_smtputf8
    builder = builder or build_dsn
    sender = m.sender
    if sender == "":
        # Never a DSN for a DSN.  A failed bounce may go to the postmaster.
        failed = report.get("failure", [])
        pm = postmaster
        if not failed or not pm:
            if failed:
                log.warn("{queue_id}: bounce undeliverable, dropped (no DSN for <>)",
                         queue_id=m.queue_id)
            return []
        failed = [f for f in failed if f.final_recipient.lower() != pm.lower()]
        if not failed:
            return []
        report = {"failure": failed}
        to = pm
    else:
        to = sender
    original = OriginalMessage(
        queue_id=m.queue_id, sender=to, headers=m.headers, body=m.body, arrival=m.arrival,
        envid=m.envid, ret=m.ret, smtputf8=m.smtputf8)
    out = []
    for kind in ("failure", "delay", "success"):
        rcpts = report.get(kind)
        if not rcpts:
            continue
        data = builder(original, rcpts, reporting_mta=hostname, now=now)
        qid = new_queue_id(now)
        n = split_header_block(data)
        utf8 = needs_smtputf8(original, rcpts)
        out.append(InboundMessage(
            queue_id=qid, sender="", recipients=[Recipient(to, "NEVER")], headers=data[:n],
            body=data[n:], arrival=now, client_address="127.0.0.1", helo=hostname,
            protocol="local", size=len(data), smtputf8=utf8,
            body_type=None if data.isascii() else "8BITMIME"))
        log.info("{queue_id}: sender {kind} notification: {dsn_id}", queue_id=m.queue_id,
                 kind={"failure": "non-delivery", "delay": "delay",
                       "success": "delivery"}[kind], dsn_id=qid)
    return out
