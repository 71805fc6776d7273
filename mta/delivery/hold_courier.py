"""The hold courier: the :class:`mta.delivery.types.Courier` of a hold
domain's mail (``[gateway] hold_domains``; ``Router.route_for`` gives it
``Route("hold", domain)``).

It opens no connection: every recipient gets the same temporary Outcome,
``451 4.3.2 waiting for ETRN/ATRN for <domain>``, so the scheduler's retry
rules apply unchanged -- the recipient is deferred with the usual backoff,
``mta queue list`` shows that reply as its last one, a delay DSN goes at
``[retry] warn_after`` and the mail bounces with 4.4.7 at ``[retry]
lifetime``.

Why 4.3.2 (RFC 3463 "System not accepting network messages": the host is
not taking mail now) and not a 4.4.x network status: nothing was tried and
nothing failed; the destination takes its mail when it asks for it.

The mail leaves only when its domain is released (ETRN, ATRN, ``mta queue
flush --domain``): the queue runner then routes it, that once, to the SMTP
courier (see ``QueueRunner.flush_domain``).
"""
from __future__ import annotations

from collections.abc import Sequence

from twisted.internet import defer
from twisted.internet.defer import Deferred

from ..address import domain_key
from .types import Outcome, QueuedMessage, QueuedRecipient

__all__ = ["HOLD_STATUS", "HoldCourier", "waiting_text"]

HOLD_STATUS = "4.3.2"


def waiting_text(domain: str) -> str:
    """The reply text (without code and status) of a held recipient."""
    return f"waiting for ETRN/ATRN for {domain}"


class HoldCourier:
    """Answers every hold-domain recipient with a temporary Outcome of our
    own; *hostname* qualifies a bare ``postmaster`` (never a hold domain in
    practice, but the domain is computed the one way)."""

    def __init__(self, *, hostname: str) -> None:
        self.hostname = hostname

    def deliver(self, message: QueuedMessage, recipients: Sequence[QueuedRecipient],
                destination: str) -> Deferred[list[Outcome]]:
        return defer.succeed([
            Outcome.ours(HOLD_STATUS, waiting_text(domain_key(r.address, self.hostname)))
            for r in recipients])

    def close(self) -> None:
        return None
