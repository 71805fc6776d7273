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
  relay domains.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from .. import domain as dom
from ..address import Mailbox

_ROUTING_CHARS = ("%", "!", "@")


class RelayPolicy:
    def __init__(self, relay_networks: Iterable[str], relay_domains: Iterable[str]):
        self._networks = [ipaddress.ip_network(n, strict=False) for n in relay_networks]
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
            try:
                addr = ipaddress.ip_address(client_ip.split("%", 1)[0])
            except ValueError:
                hit = False
            else:
                if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
                    addr = addr.ipv4_mapped
                hit = any(addr in net for net in self._networks)
            if len(self._cache) > 10000:
                self._cache.clear()
            self._cache[client_ip] = hit
        return hit

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
        return self.is_relay_domain(rcpt.domain)
