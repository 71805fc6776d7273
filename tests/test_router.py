"""The router against a real authoritative DNS server on loopback (tests/dnsserver.py)
with the real reactor: trial ``TestCase``s, which pytest runs as they are.

Every Router here is given its nameservers explicitly: nothing but loopback is
ever asked.
"""
from __future__ import annotations

import random
import socket
import time

import pytest
from twisted.internet import reactor
from twisted.names import dns
from twisted.trial import unittest

from dnsserver import blackhole, parse_record, spawn_dns_server, start_dns_server
from mta.delivery.router import NextHop, RouteError, Router

PORT = 2525  # the SMTP port given to Router(port=...) so MX-found hops are recognisable


class DNSTestCase(unittest.TestCase):
    timeout = 20  # trial's per-test limit (seconds)

    def setUp(self) -> None:
        self.queries: list[tuple[str, str]] = []
        self.dns_port, stop = start_dns_server(reactor, query_log=self.queries)
        self.addCleanup(stop)

    def router(self, **kw) -> Router:
        kw.setdefault("nameservers", [f"127.0.0.1:{self.dns_port}"])
        kw.setdefault("timeout", (1,))
        kw.setdefault("port", PORT)
        r = Router(reactor=reactor, **kw)
        self.addCleanup(r.close)
        return r

    async def route_error(self, router: Router, domain: str) -> RouteError:
        try:
            hops = await router.route(domain)
        except RouteError as e:
            return e
        self.fail(f"route({domain!r}) gave {hops}, expected RouteError")


class MXTests(DNSTestCase):
    async def test_preference_order_and_addresses(self) -> None:
        hops = await self.router().route("mx3.test")
        hosts = [h.host for h in hops]
        # Two hosts at preference 10 (either order), then the one at 20.
        first_two = [h for h in dict.fromkeys(hosts)][:2]
        self.assertEqual(sorted(first_two), ["mx-a.mx3.test", "mx-b.mx3.test"])
        first = first_two[0]
        own = {"mx-a.mx3.test": "127.0.0.11", "mx-b.mx3.test": "127.0.0.12"}
        # IPv4 before IPv6 per host; ::1 (shared by all three hosts) only once,
        # with the first host that has it.
        expected = [
            NextHop(first, own[first], PORT),
            NextHop(first, "::1", PORT),
            NextHop(first_two[1], own[first_two[1]], PORT),
            NextHop("mx-c.mx3.test", "127.0.0.13", PORT),
        ]
        self.assertEqual(hops, expected)
        self.assertEqual(str(hops[-1]), "mx-c.mx3.test[127.0.0.13]:2525")

    async def test_random_order_among_equal_preference(self) -> None:
        router = self.router()
        firsts = set()
        for _ in range(30):
            hops = await router.route("mx3.test")
            firsts.add(hops[0].host)
            self.assertEqual(hops[-1].host, "mx-c.mx3.test")  # preference 20 always last
        self.assertEqual(firsts, {"mx-a.mx3.test", "mx-b.mx3.test"})

    async def test_seeded_random_is_reproducible(self) -> None:
        a = await self.router(random=random.Random(7)).route("mx3.test")
        b = await self.router(random=random.Random(7)).route("mx3.test")
        self.assertEqual(a, b)

    async def test_case_and_trailing_dot(self) -> None:
        hops = await self.router().route("Real.TEST.")
        self.assertEqual(hops, [NextHop("mx.real.test", "127.0.0.21", PORT)])

    async def test_domain_is_cname_to_mx_domain(self) -> None:
        want = [NextHop("mx.real.test", "127.0.0.21", PORT)]
        self.assertEqual(await self.router().route("alias.test"), want)
        self.assertEqual(await self.router().route("alias2.test"), want)  # two steps
        self.assertIn(("real.test", "MX"), self.queries)

    async def test_mx_host_is_cname(self) -> None:
        hops = await self.router().route("cnamemx.test")
        self.assertEqual(hops, [NextHop("hostalias.test", "127.0.0.21", PORT)])

    async def test_cname_loop_is_temporary(self) -> None:
        e = await self.route_error(self.router(), "loop1.test")
        self.assertEqual(e.status, "4.4.3")
        self.assertFalse(e.permanent)
        self.assertIn("CNAME loop", e.text)

    async def test_implicit_mx(self) -> None:
        hops = await self.router().route("implicit.test")
        self.assertEqual(hops, [NextHop("implicit.test", "127.0.0.31", PORT),
                                NextHop("implicit.test", "::1", PORT)])

    async def test_implicit_mx_through_cname(self) -> None:
        hops = await self.router().route("implicit-alias.test")
        self.assertEqual([h.address for h in hops], ["127.0.0.31", "::1"])
        self.assertEqual(hops[0].host, "implicit-alias.test")

    async def test_null_mx(self) -> None:
        e = await self.route_error(self.router(), "nullmx.test")
        self.assertEqual((e.status, e.permanent), ("5.1.10", True))
        self.assertNotIn(("nullmx.test", "A"), self.queries)  # no implicit-MX fallback

    async def test_nxdomain(self) -> None:
        e = await self.route_error(self.router(), "nosuchdomain.test")
        self.assertEqual((e.status, e.permanent), ("5.1.2", True))
        self.assertIn("NXDOMAIN", e.text)

    async def test_cname_to_nxdomain(self) -> None:
        port, stop = start_dns_server(reactor, extra_records=["dangling.test CNAME gone.test"])
        self.addCleanup(stop)
        e = await self.route_error(self.router(nameservers=[f"127.0.0.1:{port}"]), "dangling.test")
        self.assertEqual(e.status, "5.1.2")

    async def test_mx_host_without_addresses(self) -> None:
        e = await self.route_error(self.router(), "noaddr.test")
        self.assertEqual((e.status, e.permanent), ("5.4.4", True))
        self.assertIn("empty.noaddr.test", e.text)

    async def test_mx_host_nxdomain(self) -> None:
        e = await self.route_error(self.router(), "nxmx.test")
        self.assertEqual((e.status, e.permanent), ("5.4.4", True))
        self.assertIn("missing.test", e.text)

    async def test_unusable_mx_host_is_skipped(self) -> None:
        hops = await self.router().route("partial.test")
        self.assertEqual(hops, [NextHop("mx-c.mx3.test", "127.0.0.13", PORT),
                                NextHop("mx-c.mx3.test", "::1", PORT)])

    async def test_no_mx_no_address(self) -> None:
        e = await self.route_error(self.router(), "nodata.test")
        self.assertEqual((e.status, e.permanent), ("5.4.4", True))

    async def test_servfail(self) -> None:
        e = await self.route_error(self.router(), "x.servfail.test")
        self.assertEqual((e.status, e.permanent), ("4.4.3", False))
        self.assertIn("SERVFAIL", e.text)

    async def test_idna_u_label(self) -> None:
        hops = await self.router().route("b\u00fccher.test")
        self.assertEqual(hops, [NextHop("mx.real.test", "127.0.0.21", PORT)])
        self.assertIn(("xn--bcher-kva.test", "MX"), self.queries)

    async def test_truncated_udp_answer_retried_over_tcp(self) -> None:
        hops = await self.router().route("many.test")
        self.assertEqual(hops, [NextHop("host00-with-a-long-label-to-fill-the-packet.many.test",
                                        "127.0.0.51", PORT)])
        self.assertEqual(self.queries.count(("many.test", "MX")), 2)  # UDP, then TCP

    async def test_address_literals(self) -> None:
        router = self.router()
        self.assertEqual(await router.route("[127.0.0.7]"), [NextHop("127.0.0.7", "127.0.0.7", PORT)])
        self.assertEqual(await router.route("[IPv6:::1]"), [NextHop("::1", "::1", PORT)])
        e = await self.route_error(router, "[foo:bar]")
        self.assertEqual(e.status, "5.1.2")
        self.assertEqual(self.queries, [])

    async def test_bad_domain(self) -> None:
        e = await self.route_error(self.router(), "bad domain.test")
        self.assertEqual(e.status, "5.1.2")
        self.assertEqual(self.queries, [])


class ConfiguredRouteTests(DNSTestCase):
    async def test_route_ip_literal_makes_no_query(self) -> None:
        router = self.router(routes={"Real.Test": "127.0.0.9:2626", "v6.test": "[::1]:2727"})
        self.assertEqual(await router.route("real.test"), [NextHop("127.0.0.9", "127.0.0.9", 2626)])
        self.assertEqual(await router.route("REAL.test."), [NextHop("127.0.0.9", "127.0.0.9", 2626)])
        self.assertEqual(await router.route("v6.test"), [NextHop("::1", "::1", 2727)])
        self.assertEqual(self.queries, [])
        self.assertIsNone(router._resolver)  # never even created

    async def test_route_host_name_resolved_by_address_only(self) -> None:
        router = self.router(routes={"mx3.test": "relay.test"})  # relay.test also has an MX
        hops = await router.route("mx3.test")
        self.assertEqual(hops, [NextHop("relay.test", "127.0.0.41", PORT),
                                NextHop("relay.test", "::1", PORT)])
        self.assertEqual(sorted(self.queries), [("relay.test", "A"), ("relay.test", "AAAA")])

    async def test_route_wins_over_smarthost_which_wins_over_mx(self) -> None:
        router = self.router(routes={"real.test": "127.0.0.9:2626"}, smarthost="127.0.0.8:2525")
        self.assertEqual(await router.route("real.test"), [NextHop("127.0.0.9", "127.0.0.9", 2626)])
        self.assertEqual(await router.route("mx3.test"), [NextHop("127.0.0.8", "127.0.0.8", 2525)])
        self.assertEqual(await router.route("nosuchdomain.test"),
                         [NextHop("127.0.0.8", "127.0.0.8", 2525)])
        self.assertEqual(await router.route("[127.0.0.1]"), [NextHop("127.0.0.8", "127.0.0.8", 2525)])
        self.assertEqual(self.queries, [])

    async def test_smarthost_by_name(self) -> None:
        hops = await self.router(smarthost="relay.test:587").route("mx3.test")
        self.assertEqual([str(h) for h in hops], ["relay.test[127.0.0.41]:587", "relay.test[::1]:587"])
        self.assertNotIn(("mx3.test", "MX"), self.queries)

    async def test_route_host_unresolvable_is_temporary(self) -> None:
        router = self.router(routes={"a.test": "missing.test:25", "b.test": "empty.noaddr.test"})
        for domain in ("a.test", "b.test"):
            e = await self.route_error(router, domain)
            self.assertEqual((e.status, e.permanent), ("4.4.3", False))

    async def test_localhost_route(self) -> None:
        hops = await self.router(smarthost="localhost:2525").route("real.test")
        self.assertEqual(hops, [NextHop("localhost", "127.0.0.1", 2525),
                                NextHop("localhost", "::1", 2525)])
        self.assertEqual(self.queries, [])

    async def test_idna_route_key(self) -> None:
        router = self.router(routes={"b\u00fccher.test": "127.0.0.9"})
        self.assertEqual(await router.route("xn--bcher-kva.test"), [NextHop("127.0.0.9", "127.0.0.9", PORT)])
        self.assertEqual(await router.route("B\u00dcCHER.test"), [NextHop("127.0.0.9", "127.0.0.9", PORT)])

    async def test_idna_2008_route_key(self) -> None:
        # IDNA 2008: straße is xn--strae-oqa, not strasse (IDNA 2003), which is another domain.
        router = self.router(routes={"stra\u00dfe.test": "127.0.0.9", "[IPv6:::1]": "127.0.0.8"})
        for name in ("stra\u00dfe.test", "xn--strae-oqa.test", "STRA\u00dfE.TEST.",
                     "XN--STRAE-OQA.test"):
            self.assertEqual(await router.route(name), [NextHop("127.0.0.9", "127.0.0.9", PORT)])
            self.assertTrue(router.destination(name).startswith("route:127.0.0.9:"))
        self.assertEqual(router.destination("strasse.test"), "strasse.test")
        self.assertEqual(await router.route("[IPv6:0:0::1]"), [NextHop("127.0.0.8", "127.0.0.8", PORT)])
        self.assertEqual(self.queries, [])


class TimeoutTests(DNSTestCase):
    async def test_nameserver_never_answers(self) -> None:
        port, close = blackhole()
        self.addCleanup(close)
        router = self.router(nameservers=[f"127.0.0.1:{port}"], timeout=(0.5,))
        started = time.monotonic()
        e = await self.route_error(router, "real.test")
        elapsed = time.monotonic() - started
        self.assertEqual((e.status, e.permanent), ("4.4.3", False))
        self.assertIn("timeout", e.text)
        self.assertLess(elapsed, 2)

    async def test_second_nameserver_answers(self) -> None:
        port, close = blackhole()
        self.addCleanup(close)
        router = self.router(nameservers=[f"127.0.0.1:{port}", f"127.0.0.1:{self.dns_port}"],
                             timeout=(0.5, 0.5))
        self.assertEqual(await router.route("real.test"), [NextHop("mx.real.test", "127.0.0.21", PORT)])

    async def test_mx_host_timeout_skipped_when_another_works(self) -> None:
        hops = await self.router(timeout=(0.5,)).route("tempmx.test")
        self.assertEqual(hops, [NextHop("mx.real.test", "127.0.0.21", PORT)])

    async def test_only_mx_host_times_out(self) -> None:
        e = await self.route_error(self.router(timeout=(0.5,)), "alltempmx.test")
        self.assertEqual((e.status, e.permanent), ("4.4.3", False))


class IPv6NameserverTests(unittest.TestCase):
    async def test_ipv6_nameserver(self) -> None:
        try:
            port, stop = start_dns_server(reactor, interface="::1")
        except Exception as e:  # pragma: no cover - host without IPv6 loopback
            raise unittest.SkipTest(f"no ::1: {e}")
        self.addCleanup(stop)
        router = Router(nameservers=[f"[::1]:{port}"], reactor=reactor, timeout=(1,))
        self.addCleanup(router.close)
        self.assertEqual(await router.route("real.test"), [NextHop("mx.real.test", "127.0.0.21", 25)])


# ----------------------------------------------------------------------------- no DNS


def test_route_error() -> None:
    e = RouteError("5.1.10", "null MX")
    assert e.permanent and e.status == "5.1.10" and e.text == "null MX"
    assert str(e) == "5.1.10 null MX"
    assert not RouteError("4.4.3", "timeout").permanent


def test_router_accepts_config_pairs() -> None:
    r = Router(routes=(("Example.Test", "127.0.0.1:2626"),), reactor=reactor)
    assert r.routes == {"example.test": ("127.0.0.1", 2626)}


def test_router_rejects_bad_configuration() -> None:
    with pytest.raises(ValueError):
        Router(smarthost="bad host:25", reactor=reactor)
    with pytest.raises(ValueError):
        Router(routes={"example.test": "host:99999"}, reactor=reactor)
    with pytest.raises(ValueError):
        Router(nameservers=["ns.example.test"], reactor=reactor)  # must be an IP
    r = Router(nameservers=["127.0.0.1", "127.0.0.1:5353", "[::1]:5353", "::1"], reactor=reactor)
    assert r.nameservers == [("127.0.0.1", 53), ("127.0.0.1", 5353), ("::1", 5353), ("::1", 53)]


def test_parse_record() -> None:
    name, rec = parse_record("dest.test MX 10 mx.dest.test.")
    assert name == "dest.test" and rec.preference == 10 and rec.name.name == b"mx.dest.test"


def test_standalone_server_subprocess(tmp_path) -> None:
    """``python tests/dnsserver.py --port-file`` for tests that run the daemon as a
    subprocess; queried here with a plain socket (no reactor in this test)."""
    port, proc = spawn_dns_server(tmp_path, records=["dest.test MX 10 mx.dest.test",
                                                     "mx.dest.test A 127.0.0.1"])
    try:
        query = dns.Message(id=4711, recDes=False)
        query.queries = [dns.Query(b"dest.test", dns.MX, dns.IN)]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(5)
            s.sendto(query.toStr(), ("127.0.0.1", port))
            reply = dns.Message()
            reply.fromStr(s.recv(4096))
        assert reply.id == 4711 and reply.rCode == dns.OK
        assert [(a.payload.preference, a.payload.name.name) for a in reply.answers] == \
            [(10, b"mx.dest.test")]
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # TCP listens on the same port
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
