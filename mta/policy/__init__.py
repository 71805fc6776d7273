"""Policy: who may relay where.  The server asks, the policy answers.

Decisions are pure functions of the client and the address, so they can be
tested alone.  Like Postfix's ``permit_mynetworks, reject_unauth_destination``:

* a client in ``relay_networks`` (or, later, an authenticated one) may send
  to any domain;
* anyone may send to a domain in ``relay_domains`` (an entry ``.example.test``
  also covers its subdomains) and to the bare ``postmaster``;
* for clients that may not relay, a recipient whose local part carries
  sender-specified routing (``%``, ``!``, ``@``) is refused even for a relay
  domain, because the next hop might act on it; address literals are never
  relay domains;
* anyone may send to a hold domain (``[gateway] hold_domains``: mail kept
  for a host that takes it by ETRN or ATRN), as to a relay domain;
* a local domain (mta.local.directory: ``[local] domains`` and the
  hostname) is a final destination for anyone, and only for recipients
  that exist there: ``550 5.1.1`` otherwise, ``451 4.3.0`` while the
  aliases or mailboxes file cannot be read; ``postmaster`` always exists.

:meth:`RelayPolicy.check_recipient` is what the server asks: None (accept)
or a :class:`Refusal` (the reply, and the reason counted in the metrics).
:meth:`RelayPolicy.etrn_refusal` answers who may start a flush by ETRN (RFC
1985): a client in ``etrn_networks``, for a domain served here (a hold,
relay or routed domain).
"""
from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from .. import domain as dom
from ..address import Mailbox
from ..local.directory import LocalDirectory, TableUnavailable

_ROUTING_CHARS = ("%", "!", "@")


@dataclass(frozen=True)
class Refusal:
    """Why a recipient is refused: the SMTP reply and the metrics reason."""
    code: int
    status: str
    text: str
    reason: str             # "relay_denied", "unknown_user", "lookup_failed"


class RelayPolicy:
    """``relay_networks`` / ``relay_domains``: [policy]; ``hold_domains``:
    [gateway] (exact names); ``etrn_networks``: who may send ETRN (the
    daemon passes Config.etrn_networks; None: nobody); ``routed``: the
    domains of [routes] (served, for ETRN)."""

    def __init__(self, relay_networks: Iterable[str], relay_domains: Iterable[str],
                 local: LocalDirectory | None = None, *, hold_domains: Iterable[str] = (),
                 etrn_networks: Iterable[str] | None = None, routed: Iterable[str] = ()):
        self.local = local
        self._networks = [ipaddress.ip_network(n, strict=False) for n in relay_networks]
        self._etrn_networks = [ipaddress.ip_network(n, strict=False)
                               for n in (etrn_networks or ())]
        self._hold = frozenset(dom.key(d) for d in hold_domains)
        self._routed = frozenset(dom.key(d) for d in routed)
        exact: set[str] = set()
        parents: list[str] = []
        for d in relay_domains:
            d = d.strip()
            if d.startswith("."):
                parents.append(dom.to_ascii(d[1:]))
            else:
                exact.add(dom.to_ascii(d))
        self._domains = frozenset(exact)
        self._parents = tuple("." + p for p in parents)
        self._cache: dict[str, bool] = {}

    def client_may_relay(self, client_ip: str) -> bool:
        hit = self._cache.get(client_ip)
        if hit is None:
            hit = _in_networks(client_ip, self._networks)
            if len(self._cache) > 10000:
                self._cache.clear()
            self._cache[client_ip] = hit
        return hit

    def is_hold_domain(self, domain: str) -> bool:
        """Is *domain* one whose mail waits until its host asks (ETRN/ATRN)?"""
        return bool(self._hold) and _key(domain) in self._hold

    def serves(self, domain: str, *, subdomains: bool = False) -> bool:
        """Is *domain* one we keep or pass on mail for (a hold, relay or
        routed domain)?  With *subdomains* (``ETRN @domain``) also when one
        of those lies below it."""
        d = _key(domain)
        if not d:
            return False
        if d in self._hold or d in self._routed or self.is_relay_domain(d):
            return True
        if subdomains:
            below = "." + d
            return (any(n.endswith(below) for n in (*self._hold, *self._routed, *self._domains))
                    or any(p.endswith(below) for p in self._parents))
        return False

    def etrn_refusal(self, client_ip: str, domain: str, *, subdomains: bool = False
                     ) -> str | None:
        """None if *client_ip* may start a flush of *domain* by ETRN, else
        why not (for the log; the client gets ``459``)."""
        if not _in_networks(client_ip, self._etrn_networks):
            return "client not in [gateway] etrn_networks"
        if not self.serves(domain, subdomains=subdomains):
            return "not a domain served here"
        return None

    def is_relay_domain(self, domain: str) -> bool:
        if not domain or dom.is_literal(domain):
            return False
        try:
            d = dom.to_ascii(domain)
        except dom.DomainError:
            return False
        return d in self._domains or (bool(self._parents) and d.endswith(self._parents))

    def recipient_allowed(self, rcpt: Mailbox, *, client_ip: str,
                          authenticated: bool = False) -> bool:
        """May this client hand us mail for *rcpt*?"""
        if authenticated or self.client_may_relay(client_ip):
            return True
        if not rcpt.domain:          # bare <postmaster>, RFC 5321 §4.5.1
            return True
        if any(c in rcpt.local_text for c in _ROUTING_CHARS):
            return False
        return self.is_relay_domain(rcpt.domain) or self.is_hold_domain(rcpt.domain)

    def check_recipient(self, rcpt: Mailbox, *, client_ip: str,
                        authenticated: bool = False) -> Refusal | None:
        """None to accept *rcpt* from this client, or the Refusal."""
        local = self.local
        if local is not None and local.is_local(rcpt.domain):
            try:
                known = local.exists(rcpt.local_text, rcpt.domain)
            except TableUnavailable as e:
                return Refusal(451, "4.3.0", f"<{rcpt}>: Temporary lookup failure ({e})",
                               "lookup_failed")
            if known:
                return None
            return Refusal(550, "5.1.1", f"<{rcpt}>: Recipient address rejected: "
                           "User unknown in local recipient table", "unknown_user")
        if self.recipient_allowed(rcpt, client_ip=client_ip, authenticated=authenticated):
            return None
        return Refusal(554, "5.7.1", f"<{rcpt}>: Relay access denied", "relay_denied")


def _key(domain: str) -> str:
    """The domain's mta.domain key, "" for a literal or an invalid name."""
    if not domain or dom.is_literal(domain):
        return ""
    try:
        return dom.to_ascii(domain)
    except dom.DomainError:
        return ""


def _in_networks(client_ip: str, networks: list) -> bool:
    try:
        addr = ipaddress.ip_address(client_ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return any(addr in net for net in networks)
