"""The text form of where to connect: ``host:port`` and nameservers (mta.hostport),
as the config checks them and the router reads them."""
from __future__ import annotations

import pytest

from mta.hostport import parse_hostport, parse_nameserver


@pytest.mark.parametrize("value, expected", [
    ("mx.example.test", ("mx.example.test", 25)),
    ("MX.Example.Test.:2525", ("mx.example.test", 2525)),
    ("192.0.2.1", ("192.0.2.1", 25)),
    ("192.0.2.1:587", ("192.0.2.1", 587)),
    ("[2001:db8::1]:2525", ("2001:db8::1", 2525)),
    ("[2001:DB8:0::1]", ("2001:db8::1", 25)),
    ("[IPv6:2001:db8::1]:26", ("2001:db8::1", 26)),
    ("[192.0.2.1]:26", ("192.0.2.1", 26)),
    ("::1", ("::1", 25)),
    ("b\u00fccher.test:25", ("xn--bcher-kva.test", 25)),
    ("localhost", ("localhost", 25)),
])
def test_parse_hostport(value: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(value) == expected


@pytest.mark.parametrize("value", [
    "", " ", "host:", "host:0", "host:65536", "host:x", "[::1", "[::1]x", "[nothost]:25",
    "[::1]:", "bad host", "-:25", "a..b", "127.0.0.300", "1:2:3", "x" * 64 + ".test",
])
def test_parse_hostport_rejects(value: str) -> None:
    with pytest.raises(ValueError):
        parse_hostport(value)


def test_parse_hostport_default_port() -> None:
    assert parse_hostport("relay.test", default_port=587) == ("relay.test", 587)


@pytest.mark.parametrize("value, expected", [
    ("127.0.0.1", ("127.0.0.1", 53)),
    ("127.0.0.1:5353", ("127.0.0.1", 5353)),
    ("[::1]:5353", ("::1", 5353)),
    ("::1", ("::1", 53)),
])
def test_parse_nameserver(value: str, expected: tuple[str, int]) -> None:
    assert parse_nameserver(value) == expected


@pytest.mark.parametrize("value", ["ns.example.test", "ns.example.test:53", "", "127.0.0.1:0"])
def test_parse_nameserver_rejects(value: str) -> None:
    with pytest.raises(ValueError):
        parse_nameserver(value)
