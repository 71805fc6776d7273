"""The delivery types, in one place: what the scheduler, the router and the
couriers exchange.

The pipeline: the scheduler claims due recipients from the spool
(:class:`QueuedMessage` / :class:`QueuedRecipient`, typed records built by
``mta.spool.ops`` -- no row dict leaves ``mta/spool/``), asks the router for
each recipient's :class:`Route` (which courier, which destination), groups
the recipients of a message by route, hands each group to that
:class:`Courier` and records the :class:`Outcome` it returns for each.

Where each type lives, so that the layers point one way (smtp and spool
below delivery; ``farm-studio look`` shows no arrow back up):

* ``NextHop``, ``Credentials``, ``TLSInfo``, ``TLS_POLICIES`` and the one
  classification of a reply code, :func:`reply_kind`, are SMTP-level: they
  live in :mod:`mta.smtp.types`, since the SMTP client takes and gives them
  and must not import ``mta/delivery/``.  Re-exported here.
* ``QueuedMessage`` and ``QueuedRecipient`` live in :mod:`mta.message` next
  to ``InboundMessage``, since the spool builds them and must not import
  ``mta/delivery/`` either.  Re-exported here.
* ``Outcome``, ``Route`` and ``Courier`` are delivery-level: defined here.

Temporary vs permanent is decided once: by :func:`reply_kind` on the reply
code, through :meth:`Outcome.from_reply` (a reply a server sent) and
:meth:`Outcome.ours` (our own decision, in the same form).  The scheduler
then only applies the retry rules (backoff, lifetime, delay warnings) to
``Outcome.kind``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from twisted.internet.defer import Deferred

from ..message import QueuedMessage, QueuedRecipient
from ..smtp.types import (TLS_POLICIES, Credentials, Kind, NextHop, TLSInfo, reply_detail,
                          reply_kind)

__all__ = ["HOLD_COURIER", "LOCAL_DESTINATION", "TLS_POLICIES", "Courier", "Credentials", "Kind",
           "NextHop", "Outcome", "RouteMap",
           "QueuedMessage", "QueuedRecipient", "Route", "TLSInfo",
           "reply_kind"]


#: The destination of every local recipient (one concurrency limit for the
#: local courier: ``[relay] per_destination``).
LOCAL_DESTINATION = "local"

#: The courier of a hold domain's mail (mta.delivery.hold_courier): it keeps
#: it until the domain is released (ETRN, ATRN, ``mta queue flush --domain``).
HOLD_COURIER = "hold"


@dataclass(frozen=True)
class Route:
    """Where one recipient goes: the name of the courier (a key of the
    scheduler's ``couriers`` mapping, e.g. ``"smtp"``) and the destination
    key.  Recipients of a message with the same route travel together (one
    ``Courier.deliver`` call) and share a concurrency limit
    (``[relay] per_destination``).  For ``"smtp"`` the destination is
    ``Router.destination(domain)``: the domain, ``"smarthost"`` or
    ``"route:host:port:tls"``."""
    courier: str
    destination: str


@dataclass(frozen=True)
class Outcome:
    """What became of one recipient in one attempt.

    ``kind``: delivered | temporary | permanent (see :func:`reply_kind`);
    ``status``: the RFC 3463 enhanced status; ``text``: the full reply,
    "250 2.0.0 Ok: queued as X" -- also for our own decisions, e.g. "451
    4.4.1 connect to mx.example[192.0.2.1]:25: Connection refused";
    ``code``: its reply code.

    ``remote``: the MTA that sent ``text`` as its reply, None when we made
    it ourselves -- then it must never be reported as a remote MTA's words
    (RFC 3464 §2.3.5, §2.3.6).

    For the log line and the DSN duty: ``relay`` is the ``relay=`` text
    (the next hop the attempt reached, ``host[address]:port``, or "none");
    ``tls`` the TLS session used (``tls=``, None: plain text or none);
    ``dsn_passed``: the receiver was given NOTIFY/ORCPT/ENVID/RET (it offered
    DSN) and now owes a success report, so we send none (RFC 3461 §6.2.7);
    ``final``: delivered into a mailbox here (a success report then says
    ``delivered``; otherwise ``relayed``).

    Local delivery of an alias: ``expanded`` -- it stood for several
    addresses (the success report says ``expanded``, RFC 3461 §6.2.7.3);
    ``forward``: the remote addresses among them, which the scheduler
    spools as a new message (same sender and content, written in the same
    transaction as this outcome) to be relayed like any other mail, with
    ``forward_notify`` / ``forward_orcpt`` as their NOTIFY and ORCPT (None
    when not passed on).
    """
    kind: Kind
    status: str
    text: str
    remote: NextHop | None = None
    code: int = 0
    relay: str = "none"
    tls: TLSInfo | None = None
    dsn_passed: bool = False
    final: bool = False
    expanded: bool = False
    forward: tuple[str, ...] = ()
    forward_notify: str | None = None
    forward_orcpt: str | None = None

    @classmethod
    def from_reply(cls, code: int, status: str, text: str, remote: NextHop | None, *,
                   relay: str = "none", tls: TLSInfo | None = None, dsn_passed: bool = False,
                   final: bool = False, expanded: bool = False, forward: tuple[str, ...] = (),
                   forward_notify: str | None = None,
                   forward_orcpt: str | None = None) -> "Outcome":
        """The outcome of a reply (``remote`` sent it, or None: we made it in
        the same form): its kind is :func:`reply_kind` of *code*."""
        return cls(reply_kind(code), status, text, remote, code, relay, tls, dsn_passed, final,
                   expanded, forward, forward_notify, forward_orcpt)

    @classmethod
    def ours(cls, status: str, text: str, *, relay: str = "none") -> "Outcome":
        """Our own decision with enhanced *status* ("5.1.10", "4.4.3", ...)
        and *text* without a code: 550 for a 5.x.y status, 451 for a 4.x.y
        one (2.x.y: 250)."""
        code = {"2": 250, "5": 550}.get(status[:1], 451)
        return cls.from_reply(code, status, f"{code} {status} {text}", None, relay=relay)

    @property
    def detail(self) -> str:
        """``text`` without its leading reply code and enhanced status (for
        our own outcomes: "connect to mx[192.0.2.1]:25: Connection refused")."""
        return reply_detail(self.text)


class Courier(Protocol):
    """A way out of the spool (chasquid's two-method Courier): SMTP relay
    (:class:`mta.delivery.smtp_courier.SMTPCourier`), and local delivery.

    ``deliver(message, recipients, destination)`` attempts *recipients* (all
    of *message*, all with the same :class:`Route`, whose ``destination``
    is given) and fires with one :class:`Outcome` per recipient, in the same
    order.  It should not fail: trouble is a temporary Outcome (a failure is
    logged by the scheduler and the recipients stay in flight until the
    next start).  Cancelling the Deferred (the stop, after ``[relay]
    shutdown_grace``) must abort the attempt and fail it with
    CancelledError; the recipients are then queued again.

    ``close()``: release what the courier keeps (cached connections); called
    once at the stop, after the last delivery ended; may return a Deferred.
    """

    def deliver(self, message: QueuedMessage, recipients: Sequence[QueuedRecipient],
                destination: str) -> Deferred[list[Outcome]]: ...

    def close(self) -> Deferred[None] | None: ...


class RouteMap(Protocol):
    """What the scheduler asks of the router (mta.delivery.router.Router):
    each recipient domain's :class:`Route`; ``close()`` at the stop."""

    def route_for(self, domain: str) -> Route: ...

    def relay_route(self, domain: str) -> Route:
        """The SMTP relay route of *domain*: a hold domain's, once released."""
        ...

    def close(self) -> None: ...
