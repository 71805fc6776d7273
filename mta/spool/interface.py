"""The spool's typed interface: what each component may ask of the queue,
and the records it gets back (no row dict leaves mta/spool/).  OpenSMTPD's
queue backend is the model: store, claim, record, requeue, and, for the
administrator, hold/release/delete/flush/bounce and list/summary.

Three parts, by who uses them:

* :class:`mta.message.MessageStore` -- ``store()``, for the SMTP server
  (defined next to InboundMessage, since mta/smtp/ must not import
  mta/spool/);
* :class:`DeliveryQueue` -- due, claim, record, requeue, for the queue
  runner (mta.delivery.scheduler);
* :class:`SpoolInterface` -- both, plus the gauges' summary, the
  server's free-space check and the listener that hears other processes'
  changes (the runner's wake-ups): what the daemon's
  :class:`mta.spool.Spool` is, and what the tests' fakes
  (tests/fakespool.py) are.

All of these answer with Deferreds and run off the reactor thread.
:class:`QueueAdmin` is ``mta queue``'s and ``mta sendmail``'s: synchronous
(a short-lived command, no reactor), one transaction per call, implemented
by :class:`mta.spool.admin.SpoolAdmin`.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from twisted.application.service import IService
from twisted.internet.defer import Deferred

from ..message import InboundMessage, MessageStore, QueuedMessage, QueuedRecipient

__all__ = [
    "MessageStore", "DeliveryQueue", "SpoolInterface", "QueueAdmin", "RecipientUpdate",
    "Claimed", "QueueSummary", "ListedRecipient", "ListedMessage", "QueueStats",
    "MessageChange", "Changed", "Flushed", "DSNMaker", "RELEASED", "Release", "is_released",
]


# --------------------------------------------------------------------------- delivery

@dataclass(slots=True)
class RecipientUpdate:
    """The outcome of one recipient's attempt, as recorded (its row id, new
    state, attempts so far, next attempt, last reply, delay DSN sent)."""
    rid: int
    state: str
    attempts: int
    next_attempt: float
    last_reply: str | None
    warned: bool = False


class Claimed(NamedTuple):
    """What a claim got: the recipients now in flight (in the order asked
    for; those no longer pending are left out) and their messages by queue id."""
    recipients: list[QueuedRecipient]
    messages: dict[str, QueuedMessage]


@dataclass(frozen=True, slots=True)
class QueueSummary:
    """For the queue gauges: recipients by state, the number of messages,
    and the arrival time of the oldest (None when the spool is empty)."""
    by_state: Mapping[str, int]
    messages: int
    oldest_arrival: float | None


#: The last reply of a recipient that a release (ETRN, ATRN, ``mta queue
#: flush --domain`` of a hold domain) made due: the queue runner relays a
#: hold domain's recipient so marked, that once, by SMTP (see
#: :func:`is_released`); its next outcome replaces the mark.
RELEASED = "released for delivery"


def is_released(r: QueuedRecipient) -> bool:
    """Was *r* made due by a release since its last attempt?"""
    return r.last_reply is not None and r.last_reply.startswith(RELEASED)


@dataclass(frozen=True, slots=True)
class Release:
    """What a release made due: how many messages and recipients, and
    their domains (mta.domain keys)."""
    messages: int
    recipients: int
    domains: tuple[str, ...]


class DeliveryQueue(Protocol):
    """What the queue runner asks of the spool."""

    def recover_inflight(self, now: float) -> Deferred[int]:
        """At start: the recipients this node left in flight (under the same
        node name) and those whose lease ran out at *now* are queued again;
        another node's live claims are left alone.  Fires with how many."""
        ...

    def due(self, now: float, limit: int,
            skip_domains: Sequence[str] = ()) -> Deferred[list[QueuedRecipient]]:
        """Up to *limit* recipients due at *now*, soonest first: pending, or
        in flight under another node's expired lease (a read: nothing is
        claimed).  Recipients at *skip_domains* (mta.domain key form; a
        hint, at most mta.spool.ops.MAX_SKIP honoured) are left out."""
        ...

    def claim_and_load(self, rids: Sequence[int], now: float) -> Deferred[Claimed]:
        """Claim for this node, for one lease from *now*, those of *rids*
        still claimable (pending, or another node's expired claim) and load
        their messages; what changed meanwhile (held, claimed by another
        node) is left out, never overwritten."""
        ...

    def renew(self, now: float) -> Deferred[int]:
        """Extend the lease of every recipient this node has in flight to
        one lease from *now*; fires with how many."""
        ...

    def claim_domains(self, domains: Sequence[str], hostname: str,
                      now: float) -> Deferred[Claimed]:
        """Claim for this node, for one lease from *now* (as
        :meth:`claim_and_load`), every pending recipient (queued or
        deferred, due or not) of *domains* (mta.domain.key form; a bare
        ``postmaster`` is *hostname*'s) and load their messages: what ATRN
        hands over."""
        ...

    def record(self, updates: Sequence[RecipientUpdate], new_messages: Sequence[InboundMessage],
               finished: Sequence[str]) -> Deferred[list[str]]:
        """In one transaction: the outcomes *updates* (of the recipients this
        node still holds: one whose claim another node took over after its
        lease ran out is that node's), the messages they owe (*new_messages*:
        DSNs), and the removal of each message of *finished* whose
        recipients are all final; fires with the queue ids removed.  Goes
        through the group commit (merged with other records)."""
        ...

    def record_again(self, updates: Sequence[RecipientUpdate],
                     new_messages: Sequence[InboundMessage],
                     finished: Sequence[str]) -> Deferred[list[str]]:
        """:meth:`record` for a result whose earlier write failed: written
        only if its recipients are still in flight (no DSN twice)."""
        ...

    def requeue(self, rids: Sequence[int]) -> Deferred[int]:
        """Recipients claimed but not attempted (or interrupted) are queued
        again, those this node still holds in flight only; fires with how many."""
        ...

    def release(self, domain: str, subdomains: bool, *, now: float, hostname: str,
                how: str) -> Deferred[Release]:
        """Make the queued and deferred recipients of *domain* (a mta.domain
        key; with *subdomains* also of the domains below it) due now, marked
        released (:data:`RELEASED`, "(*how*)"); *hostname* is the domain of a
        bare ``postmaster``."""
        ...


class SpoolInterface(MessageStore, DeliveryQueue, Protocol):
    """The daemon's spool: the server's store, the runner's queue, the
    gauges' summary and the server's free-space check."""

    def summary(self) -> Deferred[QueueSummary]:
        ...

    def free_space(self, *, minfree: int,
                   max_message_size: int) -> Callable[[int], bool] | None:
        """The check the SMTP server makes at MAIL (may a message of *size*
        octets be taken now), or None when the spool is not a local file."""
        ...

    def listener(self, on_wake: Callable[[], object]) -> IService | None:
        """A service that calls *on_wake* (on the reactor thread) when a
        process on the spool -- another node, ``mta queue``, ``mta
        sendmail``, this one too -- made work due: new mail, a release
        (ETRN, ``mta queue flush --domain``), ``mta queue flush``/
        ``release``/``requeue``; and after each time it (re)connects.  None
        when the spool cannot tell (SQLite): then the runner's poll is the
        only path.  A hint, never the only path: the poll goes on either way."""
        ...


# --------------------------------------------------------------------------- administration

@dataclass(frozen=True, slots=True)
class ListedRecipient:
    """One recipient as ``mta queue`` shows it."""
    id: int
    queue_id: str
    address: str
    state: str
    attempts: int
    next_attempt: float
    last_reply: str | None
    notify: str | None
    orcpt: str | None
    warned: bool


@dataclass(frozen=True, slots=True)
class ListedMessage:
    """One message as ``mta queue`` shows it: the envelope, the recipients
    (those that passed the filters, for a list) and, for ``show``, the
    content (None otherwise)."""
    queue_id: str
    sender: str
    arrival: float
    size: int
    client_address: str
    helo: str
    protocol: str
    body_type: str | None
    smtputf8: bool
    size_param: int | None
    ret: str | None
    envid: str | None
    auth: str | None
    recipients: tuple[ListedRecipient, ...]
    headers: bytes | None = None
    body: bytes | None = None

    def queued(self) -> QueuedMessage:
        """As delivery sees it (for the DSNs of ``mta queue bounce``);
        needs the content."""
        return QueuedMessage(queue_id=self.queue_id, sender=self.sender,
                             headers=self.headers or b"", body=self.body or b"",
                             arrival=self.arrival, body_type=self.body_type,
                             smtputf8=self.smtputf8, ret=self.ret, envid=self.envid)


@dataclass(frozen=True, slots=True)
class QueueStats:
    """``mta queue stats``: counts by state and by destination domain (each
    domain's counts by state plus ``total``, busiest first), the oldest message."""
    messages: int
    recipients: int
    size: int
    oldest_queue_id: str | None
    oldest_arrival: float | None
    oldest_age: float | None
    by_state: Mapping[str, int]
    by_domain: Mapping[str, Mapping[str, int]]


@dataclass(frozen=True, slots=True)
class MessageChange:
    """What a command did to one message."""
    queue_id: str
    changed: int = 0             # recipients held, released, requeued or bounced
    inflight: int = 0            # recipients in flight, left to their delivery
    dsns: tuple[str, ...] = ()   # bounce: the queue ids of the DSNs spooled
    removed: bool = False        # bounce: the message is gone (all recipients final)


@dataclass(frozen=True, slots=True)
class Changed:
    """The messages a command changed (in the order given, without those
    not in the queue), and the ids given that are not in the queue."""
    messages: tuple[MessageChange, ...]
    missing: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Flushed:
    recipients: int              # made due now
    missing: tuple[str, ...] = ()


#: make_dsns(message, recipients bounced, now) -> the DSN messages to spool
DSNMaker = Callable[[QueuedMessage, list[QueuedRecipient], float], list[InboundMessage]]


class QueueAdmin(Protocol):
    """What ``mta queue`` and ``mta sendmail`` ask of the spool, next to a
    running daemon: each call one short transaction.  Queue ids are as
    given (the command normalises them); ``missing`` lists those not in the
    queue, the others are still acted on."""

    def list_messages(self, *, states: Sequence[str] | None = None, domain: str | None = None,
             sender: str | None = None,
             arrived_before: float | None = None) -> list[ListedMessage]:
        ...

    def show(self, queue_id: str) -> ListedMessage | None:
        ...

    def stats(self, *, now: float) -> QueueStats:
        ...

    def flush(self, *, now: float, queue_ids: Sequence[str] | None = None,
              domain: str | None = None) -> Flushed:
        ...

    def release_domain(self, domain: str, *, now: float, how: str) -> Flushed:
        """``flush --domain`` of a hold domain: its queued and deferred
        recipients due now, marked released (see DeliveryQueue.release)."""
        ...

    def hold(self, queue_ids: Sequence[str]) -> Changed:
        ...

    def release(self, queue_ids: Sequence[str], *, now: float) -> Changed:
        ...

    def requeue(self, queue_ids: Sequence[str], *, now: float) -> Changed:
        ...

    def delete(self, queue_ids: Sequence[str]) -> Changed:
        ...

    def delete_deferred(self) -> Changed:
        ...

    def bounce(self, queue_ids: Sequence[str], *, now: float, reply: str,
               make_dsns: DSNMaker) -> Changed:
        ...

    def submit(self, msgs: Sequence[InboundMessage]) -> None:
        ...

    def close(self) -> None:
        ...
