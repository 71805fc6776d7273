"""A real authoritative DNS server for the tests: ``twisted.names`` on loopback.

It serves the zone ``test.`` below over UDP and TCP on one port of
127.0.0.1 (or ::1), so the router's lookups go through the real
``twisted.names.client.Resolver`` and real sockets -- never the system
resolver.

Three ways to run it:

* in the running reactor (trial / pytest-twisted tests)::

      port, stop = start_dns_server(reactor, query_log=queries)
      ...
      await stop()

* as a subprocess, for tests that run the daemon as a subprocess::

      port, proc = spawn_dns_server(tmp_path)     # python tests/dnsserver.py --port-file ...
      ...
      proc.terminate(); proc.wait()

  or by hand: ``python tests/dnsserver.py --port-file PATH [--interface ::1]
  [--record "mx.dest.test A 127.0.0.1"] [--record "dest.test MX 10 mx.dest.test"]``.
  The port is written to PATH (atomically) once both sockets listen; the
  process runs until SIGTERM/SIGINT.

* a nameserver that never answers: ``blackhole()`` binds a UDP socket on
  127.0.0.1 that nobody reads, so queries sent there time out (no ICMP
  "port unreachable" either, since the port is bound).

Special subtrees, handled before the zone:

* ``*.drop.test.``      -- queries are read and never answered (per-name timeout)
* ``*.servfail.test.``  -- answered with SERVFAIL (rcode 2)

Everything else under ``test.`` that is not in ZONE is NXDOMAIN.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.names import authority, dns, server

TTL = 60
ORIGIN = "test"

A, AAAA, MX, CNAME, TXT = dns.Record_A, dns.Record_AAAA, dns.Record_MX, dns.Record_CNAME, dns.Record_TXT

#: The test zone: owner name -> records.  Addresses are all loopback.
ZONE: dict[str, list[Any]] = {
    # Three MX: two at preference 10 (random order between them), one at 20.
    # Every host also has AAAA ::1, so ::1 appears once after de-duplication.
    "mx3.test": [MX(10, "mx-a.mx3.test", ttl=TTL), MX(10, "mx-b.mx3.test", ttl=TTL),
                 MX(20, "mx-c.mx3.test", ttl=TTL)],
    "mx-a.mx3.test": [A("127.0.0.11", ttl=TTL), AAAA("::1", ttl=TTL)],
    "mx-b.mx3.test": [A("127.0.0.12", ttl=TTL), AAAA("::1", ttl=TTL)],
    "mx-c.mx3.test": [A("127.0.0.13", ttl=TTL), AAAA("::1", ttl=TTL)],
    # A plain MX domain, and CNAMEs to it (one step, two steps) and a loop.
    "real.test": [MX(10, "mx.real.test", ttl=TTL)],
    "mx.real.test": [A("127.0.0.21", ttl=TTL)],
    "alias.test": [CNAME("real.test", ttl=TTL)],
    "alias2.test": [CNAME("alias.test", ttl=TTL)],
    "loop1.test": [CNAME("loop2.test", ttl=TTL)],
    "loop2.test": [CNAME("loop1.test", ttl=TTL)],
    # An MX whose exchange is itself a CNAME (RFC 2181 10.3 says don't; people do).
    "cnamemx.test": [MX(10, "hostalias.test", ttl=TTL)],
    "hostalias.test": [CNAME("mx.real.test", ttl=TTL)],
    # No MX, but addresses: implicit MX (RFC 5321 5.1); and the same through a CNAME.
    "implicit.test": [A("127.0.0.31", ttl=TTL), AAAA("::1", ttl=TTL), TXT(b"no MX here", ttl=TTL)],
    "implicit-alias.test": [CNAME("implicit.test", ttl=TTL)],
    # Null MX (RFC 7505): "MX 0 ." -- the root name is the empty name on the wire.
    "nullmx.test": [MX(0, b"", ttl=TTL)],
    # MX hosts without addresses: one exists with no A/AAAA (NODATA), one is NXDOMAIN.
    "noaddr.test": [MX(10, "empty.noaddr.test", ttl=TTL)],
    "empty.noaddr.test": [TXT(b"exists, but no address", ttl=TTL)],
    "nxmx.test": [MX(10, "missing.test", ttl=TTL)],
    # First MX host unusable (NXDOMAIN), second fine.
    "partial.test": [MX(10, "missing.test", ttl=TTL), MX(20, "mx-c.mx3.test", ttl=TTL)],
    # First MX host's address lookups never answered (timeout), second fine; and only that one.
    "tempmx.test": [MX(10, "host.drop.test", ttl=TTL), MX(20, "mx.real.test", ttl=TTL)],
    "alltempmx.test": [MX(10, "host.drop.test", ttl=TTL)],
    # Exists, but has neither MX nor addresses.
    "nodata.test": [TXT(b"nothing to deliver to", ttl=TTL)],
    # A host name for [routes] / smarthost tests (resolved by A/AAAA, never MX).
    "relay.test": [A("127.0.0.41", ttl=TTL), AAAA("::1", ttl=TTL),
                   MX(10, "mx.real.test", ttl=TTL)],
    # IDNA: buecher with u-umlaut -> xn--bcher-kva.
    "xn--bcher-kva.test": [MX(10, "mx.real.test", ttl=TTL)],
    # Enough MX records that the UDP answer (512 octets) is truncated: the
    # client must retry over TCP.
    "many.test": [MX(10 + i, f"host{i:02d}-with-a-long-label-to-fill-the-packet.many.test", ttl=TTL)
                  for i in range(20)],
    "host00-with-a-long-label-to-fill-the-packet.many.test": [A("127.0.0.51", ttl=TTL)],
}

NEVER_ANSWERED = "drop.test"
SERVFAIL = "servfail.test"


def _under(name: str, zone: str) -> bool:
    return name == zone or name.endswith("." + zone)


class ZoneAuthority(authority.FileAuthority):
    """``FileAuthority`` filled from a dict instead of a file."""

    def __init__(self, records: dict[str, list[Any]]):
        self._source = records
        super().__init__(ORIGIN)

    def loadFile(self, filename: object) -> None:
        soa = dns.Record_SOA(mname="ns.test", rname="hostmaster.test", serial=1,
                             refresh=60, retry=60, expire=60, minimum=60, ttl=TTL)
        self.soa = (ORIGIN.encode(), soa)
        self.records = {ORIGIN.encode(): [soa]}
        for owner, recs in self._source.items():
            self.records.setdefault(owner.lower().encode("ascii"), []).extend(recs)


class ZoneServerFactory(server.DNSServerFactory):
    """An authoritative-only server (no recursion) with the special subtrees."""

    def __init__(self, records: dict[str, list[Any]], query_log: list[tuple[str, str]] | None):
        super().__init__(authorities=[ZoneAuthority(records)], verbose=0)
        self.query_log = query_log if query_log is not None else []

    def handleQuery(self, message: dns.Message, protocol: Any, address: Any) -> None:
        if message.queries:
            q = message.queries[0]
            name = q.name.name.decode("latin-1").lower().rstrip(".")
            self.query_log.append((name, dns.QUERY_TYPES.get(q.type, str(q.type))))
            if _under(name, NEVER_ANSWERED):
                return
            if _under(name, SERVFAIL):
                # Answer directly: the base class would log.err() the failure,
                # which trial reports as an error of the test.
                self.sendReply(protocol, self._responseFromMessage(message=message, rCode=dns.ESERVER),
                               address)
                return
        super().handleQuery(message, protocol, address)

    def sendReply(self, protocol: Any, message: dns.Message, address: Any) -> None:
        # twisted.names never truncates (its decoder sets maxSize=0); a real
        # server does at 512 octets without EDNS, and the client then asks
        # again over TCP.  Do the same so the TCP path is exercised.
        if address is not None and len(message.toStr()) > 512:
            message.answers, message.authority, message.additional = [], [], []
            message.trunc = 1
        super().sendReply(protocol, message, address)


def parse_record(text: str) -> tuple[str, Any]:
    """``"name TYPE data..."`` -> (name, record), for ``--record`` and ``extra_records``.

    Types: A, AAAA, MX (``pref exchange``; ``.`` for null MX), CNAME, TXT.
    """
    parts = text.split()
    if len(parts) < 3:
        raise ValueError(f"expected 'name TYPE data', got {text!r}")
    name, rtype, data = parts[0].lower().rstrip("."), parts[1].upper(), parts[2:]
    if rtype == "A":
        return name, A(data[0], ttl=TTL)
    if rtype == "AAAA":
        return name, AAAA(data[0], ttl=TTL)
    if rtype == "MX":
        exchange = data[1].rstrip(".")
        return name, MX(int(data[0]), exchange.encode("ascii"), ttl=TTL)
    if rtype == "CNAME":
        return name, CNAME(data[0].rstrip("."), ttl=TTL)
    if rtype == "TXT":
        return name, TXT(" ".join(data).encode(), ttl=TTL)
    raise ValueError(f"unsupported record type {rtype!r} in {text!r}")


def _zone_with(extra: Iterable[tuple[str, Any] | str]) -> dict[str, list[Any]]:
    zone = {k: list(v) for k, v in ZONE.items()}
    for item in extra:
        name, rec = parse_record(item) if isinstance(item, str) else item
        zone.setdefault(name.lower().rstrip("."), []).append(rec)
    return zone


def start_dns_server(
    reactor: Any = None,
    *,
    interface: str = "127.0.0.1",
    extra_records: Iterable[tuple[str, Any] | str] = (),
    query_log: list[tuple[str, str]] | None = None,
) -> tuple[int, Callable[[], defer.Deferred[None]]]:
    """Listen on UDP and TCP (same port number) on ``interface`` in the running
    reactor; return ``(port, stop)``.  ``stop()`` returns a Deferred that fires
    once both ports are closed and open TCP connections are dropped.

    ``query_log``, if given, receives ``(name, type)`` for every query.
    """
    if reactor is None:
        from twisted.internet import reactor
    factory = ZoneServerFactory(_zone_with(extra_records), query_log)
    factory.noisy = False
    for _ in range(50):
        udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory, reactor=reactor),
                                interface=interface)
        port = udp.getHost().port
        try:
            tcp = reactor.listenTCP(port, factory, interface=interface)
        except CannotListenError:
            udp.stopListening()
            continue
        break
    else:  # pragma: no cover - 50 collisions in a row
        raise RuntimeError("no port free for both UDP and TCP")

    def stop() -> defer.Deferred[None]:
        for proto in list(factory.connections):
            proto.transport.abortConnection()
        d = defer.gatherResults([defer.maybeDeferred(udp.stopListening),
                                 defer.maybeDeferred(tcp.stopListening)])
        return d.addCallback(lambda _: None)

    return port, stop


def blackhole(interface: str = "127.0.0.1") -> tuple[int, Callable[[], None]]:
    """A nameserver that never answers: a bound UDP socket nobody reads.

    Returns ``(port, close)``.  Works with or without a reactor running.
    """
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((interface, 0))
    return sock.getsockname()[1], sock.close


def spawn_dns_server(
    directory: str | os.PathLike[str],
    *,
    interface: str = "127.0.0.1",
    records: Iterable[str] = (),
    timeout: float = 10.0,
) -> tuple[int, subprocess.Popen[bytes]]:
    """Run this module as a subprocess; return ``(port, process)`` once it listens.

    The caller stops it with ``process.terminate(); process.wait()``.
    """
    port_file = Path(directory) / f"dns-{os.getpid()}-{time.monotonic_ns()}.port"
    args = [sys.executable, str(Path(__file__).resolve()), "--port-file", str(port_file),
            "--interface", interface]
    for r in records:
        args += ["--record", r]
    proc = subprocess.Popen(args)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_file.exists():
            return int(port_file.read_text()), proc
        if proc.poll() is not None:
            raise RuntimeError(f"dnsserver exited with status {proc.returncode}")
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    raise RuntimeError("dnsserver did not start in time")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Test DNS server for the zone 'test.'")
    parser.add_argument("--port-file", required=True, help="write the UDP/TCP port here")
    parser.add_argument("--interface", default="127.0.0.1")
    parser.add_argument("--record", action="append", default=[],
                        help='extra record, e.g. "dest.test MX 10 mx.dest.test"')
    args = parser.parse_args(argv)
    for r in args.record:  # fail before listening
        parse_record(r)

    from twisted.internet import reactor

    port, stop = start_dns_server(reactor, interface=args.interface, extra_records=args.record)
    tmp = Path(args.port_file + ".tmp")
    tmp.write_text(f"{port}\n")
    os.replace(tmp, args.port_file)

    def shutdown(signum: int, frame: object) -> None:
        reactor.callFromThread(reactor.stop)

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    reactor.run(installSignalHandlers=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
