"""What the SMTP client takes and gives, below every user of it.

These are SMTP-level values: where to connect (:class:`NextHop`, with its TLS
policy and login :class:`Credentials`), the TLS session a conversation used
(:class:`TLSInfo`), and how a reply code is classified (:func:`reply_kind`).
They live in ``mta/smtp/`` so that the client needs nothing from
``mta/delivery/`` (the layers point one way: delivery -> smtp).
``mta.delivery.types`` re-exports them next to the delivery-level types
(``Outcome``, ``Route``, ``Courier``), which is where delivery code takes
them from.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["TLS_POLICIES", "Credentials", "Kind", "NextHop", "TLSInfo", "reply_detail",
           "reply_kind"]

#: Outbound TLS policies (see mta.smtp.client): never STARTTLS; opportunistic;
#: TLS required, any certificate; TLS required, certificate must match NextHop.host.
TLS_POLICIES = ("none", "may", "encrypt", "verify")

#: What became of a recipient: taken, to be tried again, or never (bounce).
Kind = Literal["delivered", "temporary", "permanent"]


def reply_kind(code: int) -> Kind:
    """The one classification of a reply code (RFC 5321 §4.2.1): 2xx
    delivered, 5xx permanent, anything else (4xx, and what should not be a
    final reply at all) temporary.  Every permanent/temporary decision of the
    client and of the delivery code is made with this function."""
    if 200 <= code < 300:
        return "delivered"
    if 500 <= code < 600:
        return "permanent"
    return "temporary"


_CODE_PREFIX = re.compile(r"[2-5][0-9][0-9](?: +[245]\.[0-9]{1,3}\.[0-9]{1,3})?(?: +|$)")


def reply_detail(text: str) -> str:
    """A reply's *text* without its leading code and enhanced status ("451
    4.4.1 connect to mx[192.0.2.1]:25: Connection refused" -> "connect to
    mx[192.0.2.1]:25: Connection refused")."""
    m = _CODE_PREFIX.match(text)
    return text[m.end():] if m and m.end() < len(text) else text


@dataclass(frozen=True)
class Credentials:
    """What the client logs in with (AUTH PLAIN/LOGIN, over TLS only)."""
    user: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class NextHop:
    host: str     # MX host name (or the route/smarthost host as configured, or the IP): logs, SNI
    address: str  # IP address to connect to
    port: int
    tls: str = "may"                    # one of TLS_POLICIES; "verify" checks ``host``
    auth: Credentials | None = field(default=None, repr=False)  # smarthost login

    def __str__(self) -> str:
        """Postfix's ``relay=`` form: ``host[address]:port``."""
        return f"{self.host}[{self.address}]:{self.port}"


@dataclass(frozen=True)
class TLSInfo:
    """The TLS session of the connection a delivery used."""
    version: str                    # "TLSv1.3"
    cipher: str                     # "TLS_AES_256_GCM_SHA384"
    verified: bool                  # certificate checked (policy verify): chain and name

    def __str__(self) -> str:
        """The log form: ``TLSv1.3/TLS_AES_256_GCM_SHA384/verified`` (or ``/unverified``)."""
        return f"{self.version}/{self.cipher}/{'verified' if self.verified else 'unverified'}"
