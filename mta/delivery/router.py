"""Where a domain's mail goes next: a configured route, the smarthost, or DNS MX.

``Router.route_for(domain)`` answers, per recipient, its
:class:`~mta.delivery.types.Route` (which courier, which destination key:
recipients with the same route share a transaction).  ``Router.route(domain)``
answers with the ordered list of :class:`NextHop` to try (the SMTP courier
tries them in order until one takes the message), or fails with
:class:`RouteError` carrying an enhanced status code.

Order of decisions:

1. ``routes[domain]`` (domains compared by their mta.domain.to_ascii key);
2. else ``smarthost`` when set -- it takes *everything*, address literals
   included (a smarthost is usually there because direct port 25 is blocked);
3. else an address literal ``[192.0.2.1]`` / ``[IPv6:2001:db8::1]`` goes straight
   to that address;
4. else DNS (``twisted.names``, RFC 5321 section 5.1):

   * MX records in preference order, random order among equal preference,
     then for each MX host all its addresses -- **IPv4 (A) before IPv6 (AAAA)
     for each host** -- de-duplicated by address (the first, most preferred
     host name keeps it);
   * no MX (NOERROR/NODATA) -> the domain's own A/AAAA (implicit MX);
   * a CNAME at the domain (or at an MX host) is followed, up to
     ``MAX_CNAME_CHAIN`` steps; a loop or a longer chain is a temporary DNS
     failure (4.4.3), as a recursive resolver would SERVFAIL;
   * null MX (RFC 7505: only MX records whose exchange is the root ".")
     -> ``5.1.10``; null MX records mixed with real ones are ignored;
   * NXDOMAIN for the domain -> ``5.1.2``;
   * timeout, SERVFAIL, REFUSED or any other resolver error -> ``4.4.3``;
   * MX hosts that cannot be resolved are skipped as long as one host has an
     address.  When none has one: if any host lookup failed temporarily ->
     ``4.4.3``; if every host is NXDOMAIN or has no A/AAAA -> ``5.4.4``
     ("unable to route", Postfix's "Host or domain name not found").  Same
     for an implicit MX whose domain has no address at all.

Host names given in ``routes`` and ``smarthost`` are resolved by A/AAAA only
(never MX).  Any failure to resolve them is temporary (4.4.3): a broken
relay configuration or DNS outage must queue mail, not bounce it.
``localhost`` / ``*.localhost`` there mean 127.0.0.1 then ::1 (RFC 6761)
without asking DNS.

Only a definitive answer bounces: NXDOMAIN, null MX, or hosts that the
authoritative data says have no address.  Nothing is cached here; each
``route()`` asks the resolver (the scheduler groups recipients by domain, so
one lookup serves a whole batch).

Every NextHop carries the TLS policy the client applies to it (``tls``:
``Router(tls=...)``, i.e. ``[relay] tls``, or the ``route_tls`` entry of a
routed domain) and, for the smarthost's hops only, the login credentials
(``auth``, ``[relay] smarthost_user``); see mta.smtp.client.

Not done (yet): discarding MX records that point at this MTA itself (RFC
5321 5.1 "loops back to myself"), DNSSEC/DANE.
"""
from __future__ import annotations

import functools
import ipaddress
import random as _random
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.names import client, dns
from twisted.names import error as dns_error

from .. import domain as dom
from ..hostport import parse_hostport, parse_nameserver
from ..smtp.types import Credentials, NextHop, reply_kind
from .types import HOLD_COURIER, LOCAL_DESTINATION, Route

__all__ = ["Credentials", "NextHop", "RouteError", "Router"]

log = Logger()

#: How many CNAMEs a lookup follows before giving up (temporary failure).
MAX_CNAME_CHAIN = 8



class RouteError(Exception):
    """No next hop: ``status`` is an RFC 3463 code, "5.x.x" permanent, "4.x.x" temporary."""

    def __init__(self, status: str, text: str):
        super().__init__(status, text)
        self.status = status
        self.text = text

    @property
    def code(self) -> int:
        """The reply code that goes with ``status``: 550 or 451."""
        return 550 if self.status.startswith("5") else 451

    @property
    def permanent(self) -> bool:
        return reply_kind(self.code) == "permanent"

    def __str__(self) -> str:
        return f"{self.status} {self.text}"


# --------------------------------------------------------------------------- names


@functools.lru_cache(maxsize=256)   # asked of the configured hosts, per delivery
def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _dname(name: dns.Name) -> str:
    # A name off the wire: ASCII already, compared case-insensitively (RFC 4343).
    return name.name.decode("latin-1").lower().rstrip(".")


def _record_address(rec: Any) -> str | None:
    if isinstance(rec, dns.Record_A):
        text = rec.dottedQuad()
    elif isinstance(rec, dns.Record_AAAA):
        text = socket.inet_ntop(socket.AF_INET6, rec.address)
    else:
        return None
    ip = ipaddress.ip_address(text)
    if ip.is_unspecified or ip.is_multicast:
        return None
    return str(ip)


# --------------------------------------------------------------------------- router


class Router:
    """Resolve a destination domain to the next hops to try, in order.

    ``nameservers``: ``"ip"`` / ``"ip:port"`` / ``"[ipv6]:port"``; empty means
    the system's (/etc/hosts, then /etc/resolv.conf).  ``timeout`` is the
    per-query retry schedule of ``twisted.names.client.Resolver`` (seconds;
    the query fails after their sum).  ``port`` is the SMTP port for next hops
    found by MX/implicit MX/address literal and for routes without a port.
    ``random`` may be a seeded ``random.Random`` for reproducible ordering.

    ``tls`` is the TLS policy (``mta.smtp.types.TLS_POLICIES``) given to every next hop,
    except those of a domain in ``route_tls`` (domain -> policy, for domains
    of ``routes``); ``smarthost_auth`` is given to the smarthost's next hops
    only.

    The values are those of the config (``[relay]``, ``[routes]``,
    ``[route_tls]``, ``[dns]``), which ``mta.config`` validated with the same
    functions (``mta.hostport.parse_hostport`` / ``parse_nameserver``,
    ``mta.domain.config_key``, ``mta.smtp.types.TLS_POLICIES``): they are
    parsed here, not checked again.  (Text that does not parse still raises ``ValueError``.)  The
    defaults of ``port`` and ``tls`` are those of ``[relay]``
    (``tests/test_settings_defaults.py``).
    """

    def __init__(
        self,
        *,
        smarthost: str = "",
        routes: Mapping[str, str] | Iterable[tuple[str, str]] = {},
        nameservers: Sequence[str] = (),
        reactor: Any,
        port: int = 25,
        timeout: Sequence[float] = (1, 3, 5),
        random: _random.Random | None = None,
        tls: str = "may",
        route_tls: Mapping[str, str] | Iterable[tuple[str, str]] = {},
        smarthost_auth: Credentials | None = None,
        is_local: Callable[[str], bool] | None = None,
        hold_domains: Iterable[str] = (),
    ) -> None:
        self._reactor = reactor
        self.port = port
        self.timeout = tuple(timeout)
        self._random = random if random is not None else _random.Random()
        self.routes: dict[str, tuple[str, int]] = {}
        pairs = routes.items() if isinstance(routes, Mapping) else routes  # or config's pairs
        for domain, value in pairs:
            self.routes[dom.config_key(domain, "route")] = parse_hostport(value, port)
        self.smarthost: tuple[str, int] | None = (
            parse_hostport(smarthost, port) if smarthost.strip() else None)
        self.nameservers: list[tuple[str, int]] = [parse_nameserver(n) for n in nameservers]
        self._resolver: Any = None
        self.tls = tls
        self.route_tls: dict[str, str] = {}
        pairs = route_tls.items() if isinstance(route_tls, Mapping) else route_tls
        for domain, policy in pairs:
            self.route_tls[dom.config_key(domain, "route_tls")] = policy
        self.smarthost_auth = smarthost_auth
        self._is_local = is_local
        self.hold_domains = frozenset(dom.key(d) for d in hold_domains)
        self._logged: dict[str, tuple[str, tuple[NextHop, ...]]] = {}  # domain -> last route logged

    # -- resolver ------------------------------------------------------------------
    def _get_resolver(self) -> Any:
        # Created on first use, so a Router that never needs DNS (IP-literal routes or
        # smarthost) opens nothing and schedules nothing.
        if self._resolver is None:
            if self.nameservers:
                self._resolver = client.Resolver(
                    servers=list(self.nameservers), reactor=self._reactor, timeout=self.timeout)
            else:
                from twisted.names import hosts, resolve

                self._resolver = resolve.ResolverChain([
                    hosts.Resolver(b"/etc/hosts"),
                    client.Resolver(resolv=b"/etc/resolv.conf", reactor=self._reactor,
                                    timeout=self.timeout),
                ])
        return self._resolver

    def close(self) -> None:
        """Drop the resolver's TCP connections (kept open after a truncated UDP
        answer) and its resolv.conf re-read timer.  For service shutdown and tests;
        the router still works afterwards (it reconnects when needed)."""
        r = self._resolver
        if r is None:
            return
        for res in getattr(r, "resolvers", [r]):
            for proto in list(getattr(res, "connections", ())):
                proto.transport.abortConnection()
            call = getattr(res, "_parseCall", None)
            if call is not None and call.active():
                call.cancel()
        self._resolver = None

    # -- public API ----------------------------------------------------------------
    def _configured_hop(self, domain: str) -> tuple[str | None, tuple[str, int] | None, str]:
        """(the domain's to_ascii key or None when it is no valid name, the
        configured next hop -- its [routes] entry, else the smarthost -- or
        None, and which of the two: "route" / "smarthost")."""
        try:
            key: str | None = dom.to_ascii(domain)
        except dom.DomainError:
            key = None
        hostport = self.routes.get(key) if key is not None else None
        if hostport is not None:
            return key, hostport, "route"
        return key, self.smarthost, "smarthost"

    def destination(self, domain: str) -> str:
        """The key under which recipients of *domain* share a transaction and
        a concurrency limit: the configured next hop for a route or the
        smarthost (so one message to several domains makes one transaction
        to it), else the domain itself."""
        key, hostport, how = self._configured_hop(domain)
        if hostport is None:
            return key if key is not None else dom.key(domain)
        if how == "smarthost":
            return "smarthost"
        return f"route:{hostport[0]}:{hostport[1]}:{self.route_tls.get(key, self.tls)}"

    def route_for(self, domain: str) -> Route:
        """The route of a recipient of *domain*: which courier takes it and
        the destination it shares a transaction with.  A local domain
        (*is_local*, mta.local.directory) goes to the ``"local"`` courier; a
        hold domain (``[gateway] hold_domains``) to the ``"hold"`` courier,
        which keeps it until its host asks (the queue runner routes a
        released one by :meth:`relay_route`); anything else is relayed by
        ``"smtp"`` to :meth:`destination`."""
        if self._is_local is not None and self._is_local(domain):
            return Route("local", LOCAL_DESTINATION)
        if self.hold_domains and dom.key(domain) in self.hold_domains:
            return Route(HOLD_COURIER, dom.key(domain))
        return self.relay_route(domain)

    def relay_route(self, domain: str) -> Route:
        """The SMTP relay route of *domain* (also a hold domain's, when it is released)."""
        return Route("smtp", self.destination(domain))

    def route(self, domain: str) -> Deferred[list[NextHop]]:
        """The next hops for ``domain``, most preferred first; fails with RouteError."""
        return Deferred.fromCoroutine(self._route(domain))

    async def _route(self, domain: str) -> list[NextHop]:
        key, hostport, how = self._configured_hop(domain)
        if hostport is not None:
            hops = await self._configured(hostport[0], hostport[1], how)
        elif key is None:
            raise RouteError("5.1.2", f"bad destination domain {domain!r}")
        elif dom.is_literal(key):
            hops = [self._literal(key)]
            how = "literal"
        else:
            hops = await self._mx(key)
            how = "mx"
        tls = self.route_tls.get(key, self.tls) if how == "route" else self.tls
        auth = self.smarthost_auth if how == "smarthost" else None
        if tls != "may" or auth is not None:
            hops = [replace(h, tls=tls, auth=auth) for h in hops]
        # Logged when a domain's route changes, not for every delivery (the same
        # debug line per message costs more than the routing itself).
        route = (how, tuple(hops))
        if self._logged.get(domain) != route:
            if len(self._logged) >= 10000:
                self._logged.clear()
            self._logged[domain] = route
            log.debug("route {domain} via {how}: {hops}", domain=domain, how=how,
                      hops=" ".join(map(str, hops)))
        return hops

    # -- the cases -----------------------------------------------------------------
    def _literal(self, literal: str) -> NextHop:
        address = dom.literal_ip(literal)  # *literal* is to_ascii's: well formed
        if address is None:
            raise RouteError("5.1.2", f"unsupported address literal {literal}")
        return NextHop(address, address, self.port)

    async def _configured(self, host: str, port: int, how: str) -> list[NextHop]:
        if _is_ip(host):
            return [NextHop(host, host, port)]
        if host == "localhost" or host.endswith(".localhost"):
            addresses = ["127.0.0.1", "::1"]
        else:
            try:
                addresses = await self._host_addresses(host)
            except RouteError as e:
                raise RouteError("4.4.3", f"cannot resolve {how} host {host}: {e.text}") from None
            if not addresses:
                raise RouteError("4.4.3", f"{how} host {host} has no A/AAAA record")
        return [NextHop(host, a, port) for a in addresses]

    async def _mx(self, domain: str) -> list[NextHop]:
        _canonical, records = await self._lookup(domain, dns.MX)  # NXDOMAIN -> 5.1.2
        if not records:
            # RFC 5321 5.1: no MX -> the domain itself is the implicit MX (preference 0).
            try:
                addresses = await self._host_addresses(domain)
            except RouteError as e:
                if e.permanent:
                    raise RouteError("5.4.4", f"{domain} has no MX and no address: {e.text}") from None
                raise
            if not addresses:
                raise RouteError("5.4.4", f"{domain} has no MX and no A/AAAA records")
            return self._hops([(domain, addresses)])

        mx = [(r.preference, _dname(r.name)) for r in records]
        usable = [(pref, host) for pref, host in mx if host]
        if not usable:
            raise RouteError("5.1.10", f"{domain} does not accept mail (null MX, RFC 7505)")
        by_pref: dict[int, list[str]] = {}
        for pref, host in sorted(usable):
            by_pref.setdefault(pref, []).append(host)
        ordered: list[str] = []
        for pref in sorted(by_pref):
            group = by_pref[pref]
            self._random.shuffle(group)
            ordered += [h for h in group if h not in ordered]

        results = await defer.DeferredList(
            [Deferred.fromCoroutine(self._host_addresses(h)) for h in ordered],
            consumeErrors=True)
        found: list[tuple[str, list[str]]] = []
        temporary: list[RouteError] = []
        missing: list[str] = []
        for host, (ok, value) in zip(ordered, results):
            if ok and value:
                found.append((host, value))
            elif ok:
                missing.append(f"{host}: no A/AAAA record")
            elif isinstance(value.value, RouteError):
                (missing.append(value.value.text) if value.value.permanent
                 else temporary.append(value.value))
            else:
                value.raiseException()
        if found:
            if temporary or missing:
                log.info("route {domain}: skipping MX hosts: {skipped}", domain=domain,
                         skipped="; ".join([e.text for e in temporary] + missing))
            return self._hops(found)
        if temporary:
            raise RouteError("4.4.3", f"MX hosts of {domain}: {temporary[0].text}")
        raise RouteError("5.4.4", f"no MX host of {domain} has an address: {'; '.join(missing)}")

    def _hops(self, hosts: list[tuple[str, list[str]]]) -> list[NextHop]:
        seen: set[str] = set()
        hops = []
        for host, addresses in hosts:
            for a in addresses:
                if a not in seen:
                    seen.add(a)
                    hops.append(NextHop(host, a, self.port))
        return hops

    # -- DNS -----------------------------------------------------------------------
    async def _host_addresses(self, host: str) -> list[str]:
        """A then AAAA addresses of ``host`` (looked up in parallel).

        [] when the name exists without addresses; RouteError when neither lookup
        gave an address and one failed (a temporary failure wins over NXDOMAIN).
        """
        results = await defer.DeferredList(
            [Deferred.fromCoroutine(self._lookup(host, dns.A)),
             Deferred.fromCoroutine(self._lookup(host, dns.AAAA))],
            consumeErrors=True)
        addresses: list[str] = []
        errors: list[RouteError] = []
        for ok, value in results:
            if ok:
                for rec in value[1]:
                    a = _record_address(rec)
                    if a is not None and a not in addresses:
                        addresses.append(a)
            elif isinstance(value.value, RouteError):
                errors.append(value.value)
            else:
                value.raiseException()
        if addresses or not errors:
            return addresses
        raise next((e for e in errors if not e.permanent), errors[0])

    async def _lookup(self, name: str, rtype: int) -> tuple[str, list[Any]]:
        """Records of ``rtype`` at ``name``, following CNAMEs.

        Returns (canonical name, payloads); payloads is [] for NOERROR/NODATA.
        The CNAME chain is followed inside one answer as far as the server gave
        it (twisted.names' authority adds only the target's addresses), then by
        asking again for the last target.
        """
        chain = [name]
        qname = name
        while True:
            answers = await self._query(qname, rtype)
            current = qname
            while True:
                records = [rr.payload for rr in answers
                           if rr.type == rtype and _dname(rr.name) == current]
                if records:
                    return current, records
                target = next((_dname(rr.payload.name) for rr in answers
                               if rr.type == dns.CNAME and _dname(rr.name) == current), None)
                if target is None:
                    break
                if target in chain:
                    raise RouteError("4.4.3", f"CNAME loop: {' -> '.join(chain + [target])}")
                chain.append(target)
                if len(chain) > MAX_CNAME_CHAIN + 1:
                    raise RouteError("4.4.3", f"more than {MAX_CNAME_CHAIN} CNAMEs from {name}")
                current = target
            if current == qname:
                return current, []
            qname = current

    async def _query(self, name: str, rtype: int) -> list[Any]:
        what = f"{name}/{dns.QUERY_TYPES.get(rtype, rtype)}"
        query = dns.Query(name.encode("latin-1"), rtype, dns.IN)
        try:
            answers, _authority, _additional = await self._get_resolver().query(
                query, timeout=self.timeout)
        except defer.CancelledError:
            raise
        except (dns_error.DNSNameError, dns_error.AuthoritativeDomainError):
            raise RouteError("5.1.2", f"Host or domain name not found: {what}: NXDOMAIN") from None
        except defer.TimeoutError:
            raise RouteError("4.4.3", f"DNS lookup {what}: timeout") from None
        except dns_error.DNSServerError:
            raise RouteError("4.4.3", f"DNS lookup {what}: SERVFAIL") from None
        except dns_error.DNSQueryRefusedError:
            raise RouteError("4.4.3", f"DNS lookup {what}: REFUSED") from None
        except Exception as e:
            raise RouteError("4.4.3", f"DNS lookup {what}: {e.__class__.__name__}: {e}") from None
        return list(answers)
