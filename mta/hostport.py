"""Where to connect, as the config writes it: ``host:port``, nameservers, and
stream destinations (``tcp:HOST:PORT`` / ``unix:PATH``: ``[local] lmtp``).

This module owns the text form of a host and port: the config validates
``[relay] smarthost``, ``[routes]`` values and ``[dns] nameservers`` with
these functions, and the router parses the same values with them, so what
the config accepts is what the router reads.

Host names are normalised by :mod:`mta.domain`; IP addresses are written in
their canonical text form.  Everything else raises ``ValueError``.

This module imports nothing from ``mta`` but :mod:`mta.domain`.
"""
from __future__ import annotations

import ipaddress

from . import domain as dom

__all__ = ["DNS_PORT", "client_endpoint", "parse_hostport", "parse_nameserver"]

DNS_PORT = 53


def _port(text: str, value: str) -> int:
    if not text.isdigit() or not 0 < int(text) <= 65535:
        raise ValueError(f"bad port in {value!r}")
    return int(text)


def parse_hostport(value: str, default_port: int = 25) -> tuple[str, int]:
    """``"host"``, ``"host:port"``, ``"192.0.2.1:25"``, ``"[2001:db8::1]:25"``,
    ``"[IPv6:2001:db8::1]"`` or a bare ``"2001:db8::1"`` -> ``(host, port)``.

    The host comes back normalised: an IP address in its canonical text form,
    or a host name as mta.domain.to_ascii writes it.  Raises ``ValueError`` on
    anything else (for config validation).
    """
    text = value.strip()
    if not text:
        raise ValueError("empty host")
    port = default_port
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"missing ']' in {value!r}")
        inner, rest = text[1:end], text[end + 1:]
        if inner[:5].lower() == "ipv6:":
            inner = inner[5:]
        try:
            host = str(ipaddress.ip_address(inner))
        except ValueError:
            raise ValueError(f"bad address literal in {value!r}") from None
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"unexpected {rest!r} after ']' in {value!r}")
            port = _port(rest[1:], value)
        return host, port
    if text.count(":") > 1:  # a bare IPv6 address cannot carry a port
        try:
            return str(ipaddress.IPv6Address(text)), port
        except ValueError:
            raise ValueError(f"bad IPv6 address {value!r} (write \"[address]:port\")") from None
    if ":" in text:
        text, p = text.rsplit(":", 1)
        port = _port(p, value)
    try:
        return str(ipaddress.IPv4Address(text)), port
    except ValueError:
        pass
    try:
        host = dom.to_ascii(text)
    except dom.DomainError as e:
        raise ValueError(f"bad host in {value!r}: {e}") from None
    if host.rsplit(".", 1)[-1].isdigit():  # "127.0.0.300", "10.1": not an IP, not a host name
        raise ValueError(f"bad host in {value!r}: neither an IP address nor a host name")
    return host, port


def parse_nameserver(value: str) -> tuple[str, int]:
    """A DNS server: ``"ip"``, ``"ip:port"`` or ``"[ipv6]:port"`` -> ``(ip, port)``,
    port 53 when none is given.  A host name is refused (``ValueError``): the
    resolver cannot ask DNS where DNS is."""
    host, port = parse_hostport(value, DNS_PORT)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"nameserver must be an IP address (\"ip\" or \"ip:port\"), "
                         f"got {value!r}") from None
    return host, port


def _escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def client_endpoint(dest: str) -> str:
    """The Twisted client endpoint description (``clientFromString``) for
    ``tcp:HOST:PORT`` (the host as :func:`parse_hostport` reads it, a port
    required) or ``unix:/PATH``; ValueError (one line) otherwise."""
    kind, _, rest = dest.partition(":")
    if kind == "unix" and rest.startswith("/"):
        return f"unix:path={_escape(rest)}"
    if kind == "tcp" and rest:
        try:
            host, port = parse_hostport(rest, default_port=0)
        except ValueError:
            port = 0
        if port:
            return f"tcp:host={_escape(host)}:port={port}"
    raise ValueError(f"{dest!r} is not tcp:HOST:PORT or unix:/PATH")
