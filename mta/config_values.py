"""The validator of each kind of configuration value (mta.config's
``_SCHEMA`` names one per key): a converter takes the value as TOML gave it
and returns it checked and normalised, or raises :class:`Invalid` with a
one-line reason, which mta.config turns into a ConfigError naming the file
and the key.  Where a component parses a value itself, the converter here
calls that same parser (mta.hostport, mta.domain, mta.smtp.types), so the
two cannot disagree.  Also :func:`parse_duration` ("5m", "1h30m") and
:func:`implicit_tls_endpoint`, which other modules use too.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable, Mapping

from . import domain as dom
from .hostport import client_endpoint, parse_hostport, parse_nameserver
from .smtp.types import TLS_POLICIES

_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_PLAIN_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def parse_duration(value: object) -> float:
    """Return a duration in seconds.

    Accepts a non-negative int or float (seconds), or a string: a plain number of
    seconds ("30") or one or more number+unit parts with units s, m, h, d
    ("30s", "5m", "1h", "5d", "1h30m").  Raises ValueError for anything else.
    """
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        if _PLAIN_NUMBER.fullmatch(text):
            seconds = float(text)
        else:
            pos = 0
            seconds = 0.0
            seen: set[str] = set()
            for match in _DURATION_PART.finditer(text):
                unit = match.group(2)
                if match.start() != pos or unit in seen:
                    raise ValueError(f"invalid duration {value!r}")
                seen.add(unit)
                seconds += float(match.group(1)) * _DURATION_UNITS[unit]
                pos = match.end()
            if pos == 0 or pos != len(text):
                raise ValueError(f"invalid duration {value!r}")
    else:
        raise ValueError(f"invalid duration {value!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"invalid duration {value!r}")
    return seconds


class Invalid(Exception):
    """Raised by a field converter; wrapped into ConfigError with the file and key."""


def one_line(text: str) -> str:
    return " ".join(str(text).split())


INT64_MAX = 2**63 - 1      # the largest integer SQLite (and most code) can hold
WORKERS_MAX = 256          # [server] workers: processes, not connections
COUNT_MAX = 1_000_000      # connections, recipients, errors: more is a typo, not a setting
MESSAGE_SIZE_MAX = 512 * 1024 * 1024   # one SQLite blob holds at most 1 GB (body + DSN copies)
DURATION_MAX = 10 * 365 * 86400.0


def integer(minimum: int = 0, maximum: int = INT64_MAX,
            why: str = "") -> Callable[[object], int]:
    def convert(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid(f"expected an integer, got {value!r}")
        if value < minimum:
            raise Invalid(f"must be at least {minimum}, got {value!r}")
        if value > maximum:
            raise Invalid(f"must be at most {maximum}{why}, got {value!r}")
        return value

    return convert


def boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"expected true or false, got {value!r}")
    return value


def string(value: object) -> str:
    if not isinstance(value, str):
        raise Invalid(f"expected a string, got {value!r}")
    return value


def string_list(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise Invalid(f"expected a list of strings, got {value!r}")
    for item in value:
        if not isinstance(item, str):
            raise Invalid(f"expected a list of strings, got element {item!r}")
    return tuple(value)


def duration(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise Invalid(f"expected a duration (seconds or a string like \"5m\"), got {value!r}")
    try:
        seconds = parse_duration(value)
    except ValueError:
        raise Invalid(
            f"invalid duration {value!r} (use seconds or a string like \"30s\", \"5m\", \"1h30m\")"
        ) from None
    if seconds <= 0:
        raise Invalid(f"must be greater than zero, got {value!r}")
    if seconds > DURATION_MAX:
        raise Invalid(f"must be at most 10 years ({DURATION_MAX:.0f} seconds), got {value!r}")
    return seconds


_LOCK_TIMEOUT_MAX = 3600.0


def lock_timeout(value: object) -> float:
    seconds = duration(value)
    if seconds > _LOCK_TIMEOUT_MAX:
        raise Invalid(f"must be at most 1 hour, got {value!r}")
    return seconds


_LEASE_MIN = 3.0      # renewed every third: once a second at most


def lease(value: object) -> float:
    seconds = duration(value)
    if seconds < _LEASE_MIN:
        raise Invalid(f"must be at least {_LEASE_MIN:g} seconds, got {value!r}")
    return seconds


_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,99}")


def node_name(value: object) -> str:
    name = string(value)
    if name and not _NODE_NAME.fullmatch(name):
        raise Invalid("must be empty (host name + a per-start suffix) or up to 100 letters, "
                      f"digits and . _ : - (starting with a letter or digit), got {name!r}")
    return name


def port(value: object) -> int:
    port = integer(1)(value)
    if port > 65535:
        raise Invalid(f"must be a TCP port (1-65535), got {value!r}")
    return port


def hostname(value: object) -> str:
    host = string(value)
    if not host:
        raise Invalid("must not be empty")
    if any(ch.isspace() or not ch.isprintable() for ch in host):
        raise Invalid(f"must not contain spaces or control characters, got {host!r}")
    if not host.isascii():  # it goes out in EHLO as A-labels (mta.domain.to_ascii)
        try:
            dom.to_ascii(host)
        except dom.DomainError as e:
            raise Invalid(str(e)) from None
    return host


def choice(*choices: str) -> Callable[[object], str]:
    def convert(value: object) -> str:
        text = string(value)
        if text not in choices:
            options = ", ".join(repr(c) for c in choices)
            raise Invalid(f"expected one of {options}, got {text!r}")
        return text

    return convert


def split_endpoint(description: str) -> list[str]:
    """Split a Twisted endpoint string on its unescaped colons (escapes kept)."""
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(description):
        c = description[i]
        if c == "\\" and i + 1 < len(description):
            cur.append(description[i:i + 2])
            i += 2
            continue
        if c == ":":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


_SSL_KEY_OPTIONS = {"privateKey", "certKey"}
_SSL_ONLY_OPTIONS = {"sslmethod", "extraCertChain", "dhParameters"}


def implicit_tls_endpoint(description: str) -> str | None:
    """For an ``ssl:`` endpoint string without its own ``privateKey=``/``certKey=``,
    the ``tcp:`` string to listen on (TLS is then added with the ``[tls]``
    certificate); None for any other endpoint string.  Raises ValueError for an
    ``ssl:`` string that sets other TLS options but no key."""
    parts = split_endpoint(description)
    if parts[0] != "ssl":
        return None
    keys = {p.split("=", 1)[0] for p in parts[1:] if "=" in p}
    if keys & _SSL_KEY_OPTIONS:
        return None
    stray = sorted(keys & _SSL_ONLY_OPTIONS)
    if stray:
        raise ValueError(f"{stray[0]}= needs privateKey= in the endpoint "
                         "(or drop it to use [tls] certificate and private_key)")
    return ":".join(["tcp", *parts[1:]])


def endpoints(value: object) -> tuple[str, ...]:
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactor

    # serverFromString only parses (ssl: also reads the certificate files); it does not
    # listen.  A MemoryReactor keeps this from installing the global reactor, which
    # twistd must be free to choose.
    reactor = MemoryReactor()
    descriptions = string_list(value)
    for description in descriptions:
        try:
            # "ssl:465" without privateKey= takes the [tls] certificate (checked
            # in config_from_dict); parse it as the tcp: endpoint it listens on.
            tcp = implicit_tls_endpoint(description)
            endpoint = serverFromString(reactor, tcp or description)
        except Exception as e:
            raise Invalid(
                f"invalid endpoint {description!r}: {type(e).__name__}: {e}"
            ) from None
        port = getattr(endpoint, "_port", None)
        if isinstance(port, int) and not 0 <= port <= 65535:
            raise Invalid(f"invalid endpoint {description!r}: port {port} out of range")
    return descriptions


def optional_endpoint(value: object) -> str:
    """One server endpoint string, or "" (off)."""
    text = string(value).strip()
    if text:
        endpoints([text])
    return text


def networks(value: object) -> tuple[str, ...]:
    result = []
    for item in string_list(value):
        try:
            network = ipaddress.ip_network(item.strip(), strict=False)
        except ValueError as e:
            raise Invalid(f"invalid network {item!r}: {e}") from None
        result.append(str(network))
    return tuple(result)


def domains(value: object) -> tuple[str, ...]:
    """Domain names (``.example.org``: its subdomains), as mta.domain.to_ascii
    writes them, so that config keys compare equal to what they match."""
    result = []
    for item in string_list(value):
        text = item.strip()
        dot = "." if text.startswith(".") else ""
        name = text[len(dot):]
        if dom.is_literal(name):
            raise Invalid(f"invalid domain {item!r}: an address literal is not a domain name")
        try:
            result.append(dot + dom.to_ascii(name))
        except dom.DomainError as e:
            raise Invalid(f"invalid domain {item!r}" + (f": {e.reason}" if e.reason else "")
                          ) from None
    return tuple(result)


def optional_domain(value: object) -> str:
    text = string(value).strip()
    if not text:
        return ""
    if text.startswith("."):
        raise Invalid(f"invalid domain {value!r}")
    return domains([text])[0]


def sqlalchemy_url(value: object) -> str:
    from sqlalchemy.engine import make_url

    url = string(value)
    try:
        make_url(url)
    except Exception as e:
        raise Invalid(f"invalid database URL {url!r}: {e}") from None
    return url


def hostport(value: object) -> str:
    """``"host:port"`` (or ``"host"``, ``"[IPv6]:port"``), checked with the
    parser that the router reads it with (mta.hostport)."""
    text = string(value).strip()
    if not text:
        return ""
    try:
        parse_hostport(text)
    except ValueError as e:
        raise Invalid(f"expected \"host:port\": {e}") from None
    return text


def required_hostport(value: object) -> str:
    text = hostport(value)
    if not text:
        raise Invalid("must not be empty")
    return text


def nameservers(value: object) -> tuple[str, ...]:
    items = string_list(value)
    for item in items:
        try:
            parse_nameserver(item)
        except ValueError as e:
            raise Invalid(f"expected \"ip\" or \"ip:port\", got {item!r} ({e})") from None
    return items


def optional_duration(value: object) -> float | None:
    if value == "":
        return None
    return duration(value)


def nonnegative_duration(value: object) -> float:
    if value == 0 or value == "0":
        return 0.0
    return duration(value)


def path(value: object) -> str:
    text = string(value)
    if "\x00" in text:
        raise Invalid("must not contain NUL")
    return text


def secret(value: object) -> str:
    text = string(value)
    if "\x00" in text:
        raise Invalid("must not contain NUL")
    return text


def user(value: object) -> str:
    text = string(value)
    if any(not ch.isprintable() for ch in text):
        raise Invalid(f"must not contain control characters, got {text!r}")
    return text


def tls_policy(value: object) -> str:
    """An outbound TLS policy: one of ``mta.smtp.types.TLS_POLICIES``."""
    return choice(*TLS_POLICIES)(value)


def address(value: object) -> str:
    text = string(value).strip()
    if text and ("@" not in text or any(c.isspace() for c in text)):
        raise Invalid(f"expected an address like postmaster@example.test, got {text!r}")
    return text


def maildir_template(value: object) -> str:
    from .local.maildir import check_template
    text = path(value)
    try:
        check_template(text)
    except ValueError as e:
        raise Invalid(str(e).removeprefix("maildir: ")) from None
    return text


def lmtp_destination(value: object) -> str:
    text = string(value).strip()
    if text:
        try:
            client_endpoint(text)
        except ValueError as e:
            raise Invalid(str(e)) from None
    return text


def exact_domains(value: object, what: str = "local") -> tuple[str, ...]:
    names = domains(value)
    for name in names:
        if name.startswith("."):
            raise Invalid(f"invalid domain {name!r}: list each {what} domain by its name "
                          "(no \".\" wildcard)")
    return names


def hold_domains(value: object) -> tuple[str, ...]:
    return tuple(dict.fromkeys(exact_domains(value, "hold")))


def atrn_grants(value: object) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``[gateway.atrn]``: user -> the domains (exact names, no "." wildcard)
    that user takes by ATRN.  A domain is granted to one user only: two
    customers taking one domain's mail would each get part of it."""
    if not isinstance(value, Mapping):
        raise Invalid(f"expected a table of user = [domains], got {value!r}")
    out = []
    owner: dict[str, str] = {}
    for user, listed in value.items():
        from .auth.users import valid_username
        problem = valid_username(user)
        if problem is not None:
            raise Invalid(f"user {user!r}: {problem}")
        name = user
        try:
            names = domains(listed)
        except Invalid as e:
            raise Invalid(f"{user}: {e}") from None
        if not names:
            raise Invalid(f"{user}: no domain listed")
        for d in names:
            if d.startswith("."):
                raise Invalid(f"{user}: invalid domain {d!r}: list each domain by its name "
                              "(no \".\" wildcard)")
            if d in owner:
                raise Invalid(f"{user}: {d} is already granted to {owner[d]}")
            owner[d] = name
        out.append((name, tuple(dict.fromkeys(names))))
    return tuple(out)
