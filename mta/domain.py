"""Domain names: this module owns them.

Every place that compares, routes, groups or filters by domain -- the relay
policy, the router's ``[routes]``/``[route_tls]`` keys and MX lookups, the
queue runner's grouping, the queue CLI's ``--domain``, config validation --
goes through :func:`to_ascii`, so that one spelling of a domain has one key:

* IDNA 2008 with the UTS #46 mapping, non-transitional (the ``idna``
  package): ``straße.de`` is ``xn--strae-oqa.de`` (IDNA 2003 would have made
  it ``strasse.de``, another domain), ``ÖBB.at`` is ``xn--bb-eka.at``;
  full-width letters and ideographic full stops are mapped as UTS #46 says;
* lower case; one trailing dot (the root) dropped;
* ASCII labels are letters, digits, hyphens (not first or last) and ``_``
  (found in real host names); they are taken as they are, so an ``xn--``
  label is not decoded to be checked -- DNS compares ASCII, and so do we;
* at most 63 octets per label and 253 for the name (RFC 1035);
* address literals (RFC 5321 §4.1.3) are kept as literals, written one way:
  ``[192.0.2.1]``, ``[IPv6:2001:db8::1]`` (the address in its RFC 5952
  form), ``[tag:content]`` as given.

Invalid names raise :class:`DomainError` (a ``ValueError``); callers turn it
into their own answer (501 at RCPT, 5.1.2 when routing, a config error).
:func:`key` never raises: for names read back from the spool, which must
still group and filter.

This module imports nothing from ``mta``.
"""
from __future__ import annotations

import functools
import ipaddress
import re

import idna
# idna loads its UTS #46 table on first use; load it now, with the daemon's
# other modules (before twistd switches user, see mta.usercheck).
import idna.uts46data  # noqa: F401

__all__ = ["MAX_LENGTH", "DomainError", "config_key", "is_literal", "key", "literal_ip",
           "to_ascii", "to_unicode"]

#: Octets of a domain name in text form, without the trailing dot (RFC 1035 §2.3.4).
MAX_LENGTH = 253
MAX_LABEL = 63

_ASCII_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?")
_GENERAL_LITERAL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?:[\x21-\x5a\x5e-\x7e]+")


class DomainError(ValueError):
    """Not a valid domain name or address literal: ``str()`` is a sentence
    that names it, ``reason`` the why alone ("" when it is only that a
    character is not allowed)."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


def is_literal(domain: str) -> bool:
    """An address literal, ``[...]``, rather than a domain name."""
    return domain.strip().startswith("[")


@functools.lru_cache(maxsize=4096)  # the same few domains, RCPT after RCPT
def to_ascii(domain: str) -> str:
    """The one form of *domain* for comparisons, routing, grouping and DNS:
    lower-case A-labels without a trailing dot, or a normalised address
    literal.  Raises :class:`DomainError`."""
    text = domain.strip()
    if text.startswith("["):
        return _literal(text)
    if text.endswith("."):
        text = text[:-1]
    if not text:
        raise DomainError("empty domain name", "empty")
    if text.isascii():
        text = text.lower()
        labels = text.split(".")
    else:
        try:
            mapped = idna.uts46_remap(text, std3_rules=False, transitional=False)
        except idna.IDNAError as e:
            raise DomainError(f"invalid domain name {domain!r}: {e}", str(e)) from None
        if mapped.endswith("."):  # a mapped full stop at the end: the root too
            mapped = mapped[:-1]
        labels = mapped.split(".")
        for i, label in enumerate(labels):
            if label and not label.isascii():
                try:
                    labels[i] = idna.alabel(label).decode("ascii")
                except (idna.IDNAError, UnicodeError) as e:
                    raise DomainError(f"invalid internationalized domain name "
                                      f"{domain!r}: {e}", str(e)) from None
    for label in labels:
        if not label:
            raise DomainError(f"empty label in domain name {domain!r}", "empty label")
        if len(label) > MAX_LABEL:
            raise DomainError(f"label longer than {MAX_LABEL} octets in {domain!r}",
                              f"label longer than {MAX_LABEL} octets")
        if not _ASCII_LABEL.fullmatch(label):
            raise DomainError(f"invalid domain name {domain!r}")
    name = ".".join(labels)
    if len(name) > MAX_LENGTH:
        raise DomainError(f"domain name longer than {MAX_LENGTH} octets",
                          f"longer than {MAX_LENGTH} octets")
    return name


def config_key(domain: str, what: str) -> str:
    """A domain configured as a lookup key (``[routes]``, ``[route_tls]``):
    :func:`to_ascii`, with an error that says *what* the domain was
    configured as ("bad route domain '.example.org': ...")."""
    try:
        return to_ascii(domain)
    except DomainError as e:
        raise DomainError(f"bad {what} domain {domain!r}: {e}", e.reason) from None


def to_unicode(domain: str) -> str:
    """*domain* for display: U-labels where an A-label decodes (and encodes
    back to itself), everything else as :func:`to_ascii` writes it.
    ``to_ascii(to_unicode(d)) == to_ascii(d)``.  Raises :class:`DomainError`."""
    name = to_ascii(domain)
    if name.startswith("[") or "xn--" not in name:
        return name
    out = []
    for label in name.split("."):
        if label.startswith("xn--"):
            try:
                u = idna.ulabel(label)
                if idna.alabel(u).decode("ascii") == label:
                    label = u
            except (idna.IDNAError, UnicodeError):
                pass
        out.append(label)
    return ".".join(out)


def key(domain: str) -> str:
    """:func:`to_ascii`, or for a name it rejects, the name in lower case
    without its trailing dot: never raises (for domains read from the spool
    or typed on a command line, which still have to group and compare)."""
    try:
        return to_ascii(domain)
    except DomainError:
        text = domain.strip()
        return text if text.startswith("[") else text.rstrip(".").lower()


def literal_ip(domain: str) -> str | None:
    """The IP address (text) of an IPv4 or IPv6 address literal; ``None`` for
    a general address literal ``[tag:content]`` or a domain name.  Raises
    :class:`DomainError` for a malformed literal."""
    if not is_literal(domain):
        return None
    lit = _literal(domain.strip())
    if lit.startswith("[IPv6:"):
        return lit[6:-1]
    if ":" in lit:
        return None
    return lit[1:-1]


def _literal(text: str) -> str:
    if not text.endswith("]") or len(text) < 3:
        raise DomainError(f"bad address literal {text}")
    body = text[1:-1]
    if body[:5].lower() == "ipv6:":
        # ipaddress takes a zone id (fe80::1%eth0); RFC 5321 has none
        if "%" in body:
            raise DomainError(f"bad IPv6 address literal {text}")
        try:
            return f"[IPv6:{ipaddress.IPv6Address(body[5:])}]"
        except ValueError:
            raise DomainError(f"bad IPv6 address literal {text}") from None
    if re.fullmatch(r"[0-9.]+", body):
        try:
            return f"[{ipaddress.IPv4Address(body)}]"
        except ValueError:
            raise DomainError(f"bad IPv4 address literal {text}") from None
    # General-address-literal: Standardized-tag ":" 1*dcontent
    if not _GENERAL_LITERAL.fullmatch(body):
        raise DomainError(f"bad address literal {text}")
    return text
