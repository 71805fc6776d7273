"""Configuration: one TOML file loaded into frozen dataclasses.

Every key has a default, so an empty file gives a working configuration.
Unknown sections and keys are errors, and every error is a :class:`ConfigError`
whose ``str()`` is one line naming the file and the key, e.g.::

    etc/mta.toml: [server] max_recipients: expected an integer, got 'abc'

This module (the sections, which key takes which converter, the checks
across keys, the loading) and mta.config_values (one converter per kind of
value) are the one validator of every value: components are handed their
section (or a settings object built from it here, e.g.
``RelayConfig.timeouts``) and do not check it again.  Where a component
parses a value itself, the converter calls that same parser
(``[relay] smarthost``, ``[routes]`` values, ``[dns] nameservers``:
mta.hostport; ``[routes]``/``[route_tls]`` domains: mta.domain; TLS
policies: mta.smtp.types), so the two cannot disagree.

Defaults are defined once.  The protocol layer (``mta/smtp/``) knows
nothing of this file, so its settings types live there
(mta.smtp.settings): ``ServerConfig`` *is* a ``ServerSettings`` (plus the
listeners) and the ``[relay]`` timeouts default to the client's
``Timeouts``.  Other defaults shared with a component come from that
component's module (``[auth]``: mta.auth.limiter; ``[tls] min_version``:
mta.tls) or are its defaults taken from here (mta.metrics).
``tests/test_settings_defaults.py`` checks that each component runs with
the value of its key.  To add a key: a field in its section's dataclass,
a converter (mta.config_values) for it in ``_SCHEMA``, a line in etc/mta.toml (and README.rst).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .auth.limiter import FAILURE_DELAY, LOCKOUT, MAX_FAILURES
from .smtp.settings import ServerSettings, Timeouts
from .tls import MIN_VERSIONS
from . import config_values as v
from . import domain as dom

__all__ = [
    "AuthConfig",
    "ClusterConfig",
    "Config",
    "GatewayConfig",
    "MetricsConfig",
    "ConfigError",
    "PolicyConfig",
    "SendmailConfig",
    "ServerConfig",
    "SpoolConfig",
    "TLSConfig",
    "config_from_dict",
    "load_config",
]


class ConfigError(Exception):
    """A configuration problem.  ``str()`` is a single line: ``source: [section] key: message``."""

    def __init__(self, source: str, where: str | None, message: str) -> None:
        self.source = source
        self.where = where
        self.message = v.one_line(message)
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.where:
            return f"{self.source}: {self.where}: {self.message}"
        return f"{self.source}: {self.message}"


@dataclass(frozen=True)
class ServerConfig(ServerSettings):
    """``[server]``: the SMTP server's settings (their defaults are those of
    :class:`mta.smtp.settings.ServerSettings`, which this *is*: the daemon
    hands this section to the server as it is) plus where to listen."""
    listen: tuple[str, ...] = ("tcp:2525:interface=127.0.0.1",)
    submission: tuple[str, ...] = ()  # endpoints where AUTH is required before MAIL (port 587)
    workers: int = 1                  # processes sharing the listeners and the spool; 0 at
                                      # load = one per CPU core (the loaded value is the count)


@dataclass(frozen=True)
class PolicyConfig:
    relay_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    relay_domains: tuple[str, ...] = ()


@dataclass(frozen=True)
class SpoolConfig:
    url: str = "sqlite:///spool/mta.sqlite"
    queue_minfree: int = 0            # bytes kept free on the spool's file system (and 1.5x
                                      # [server] max_message_size): below, MAIL gets 452 4.3.1
    lock_timeout: float = 30.0        # SQLite: seconds a write waits for a lock another
                                      # process holds before it fails (and is retried)


@dataclass(frozen=True)
class ClusterConfig:
    """``[cluster]``: several nodes on one spool database (PostgreSQL)."""
    node: str = ""                    # this node's name (owner of its claims); "" = host name
                                      # + a per-start suffix
    lease: float = 300.0              # how long a claimed recipient stays this node's without
                                      # renewal (renewed every lease/3 while it is delivered)
    poll: float = 5.0                 # PostgreSQL: seconds between queue runs besides those
                                      # LISTEN/NOTIFY starts (SQLite: every second)


@dataclass(frozen=True)
class RelayConfig:
    smarthost: str = ""               # "host:port": send everything there; "" = route by MX
    port: int = 25                    # TCP port for MX deliveries (and routes without a port)
    deliver: bool = True              # false: accept and queue only, attempt no delivery
    concurrency: int = 40             # simultaneous deliveries in total
    per_destination: int = 20         # simultaneous deliveries to one domain (Postfix's default)
    recipient_limit: int = 50         # recipients per outbound transaction
    connect_timeout: float = Timeouts.connect
    command_timeout: float = Timeouts.greeting  # greeting, EHLO, MAIL, RCPT (RFC 5321 4.5.3.2)
    data_timeout: float = Timeouts.data_end     # DATA and after the final dot
    postmaster: str = ""              # where failed bounces go; "" = log and drop
    tls: str = "may"                  # outbound TLS policy: none, may, encrypt, verify
    tls_ca_file: str = ""             # CAs (PEM) for policy "verify"; "" = the system's
    smarthost_user: str = ""          # AUTH PLAIN/LOGIN to the smarthost, over TLS only
    smarthost_password: str = ""
    smarthost_password_file: str = ""  # or: a file whose first line is the password
    shutdown_grace: float = 10.0      # at stop: seconds deliveries in progress may take to finish

    @property
    def timeouts(self) -> Timeouts:
        """The outbound client's timeouts for these settings (the one place they are built)."""
        return Timeouts.from_relay(connect=self.connect_timeout, command=self.command_timeout,
                                   data=self.data_timeout)


@dataclass(frozen=True)
class DNSConfig:
    nameservers: tuple[str, ...] = ()  # "ip" or "ip:port"; empty = the system resolver
    timeout: float = 5.0


@dataclass(frozen=True)
class RetryConfig:
    first: float = 300.0
    max: float = 3600.0
    lifetime: float = 5 * 86400.0
    warn_after: float | None = None   # "" = never


@dataclass(frozen=True)
class TLSConfig:
    certificate: str = ""             # PEM chain, server certificate first; "" = no TLS
    private_key: str = ""             # PEM key (unencrypted) of that certificate
    min_version: str = MIN_VERSIONS[0]  # "1.2" or "1.3"

    @property
    def enabled(self) -> bool:
        return bool(self.certificate and self.private_key)


@dataclass(frozen=True)
class AuthConfig:
    users_file: str = ""              # user:hash lines, managed by `mta passwd`; "" = no AUTH
    allow_plaintext_on_loopback: bool = False  # offer AUTH without TLS on loopback connections
    failure_delay: float = FAILURE_DELAY  # the 535 for the n-th failure waits delay * 2**(n-1) (<= 16x)
    max_failures: int = MAX_FAILURES  # failures from one address before AUTH is refused (0 = never)
    lockout: float = LOCKOUT          # failures are forgotten this long after the last one

    @property
    def enabled(self) -> bool:
        return bool(self.users_file)


@dataclass(frozen=True)
class SendmailConfig:
    domain: str = ""                  # qualifies bare local names; "" = [server] hostname


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = ""                  # Twisted endpoint for Prometheus /metrics; "" = off
    queue_interval: float = 5.0       # how often the queue gauges are read from the spool
    max_domains: int = 50             # destination domains with their own label; then "other"


@dataclass(frozen=True)
class LocalConfig:
    """``[local]``: final delivery here (mta.local, mta.delivery.local_courier).
    Without the section (``Config.local`` None) the only local domain is
    ``[server] hostname`` and its only users are ``postmaster`` and ``root``,
    delivered to the Maildirs of the default ``maildir`` template."""
    domains: tuple[str, ...] = ()     # final destinations here (with [server] hostname)
    mailboxes: str = ""               # who exists: a file, one local part or address per line; "" = anyone
    maildir: str = "mail/{domain}/{user}"  # a mailbox's Maildir; {user}: the local part, lower case
    aliases: str = ""                 # aliases(5) file; "" = none
    lmtp: str = ""                    # "tcp:HOST:PORT" / "unix:PATH": LMTP server instead of Maildir


@dataclass(frozen=True)
class GatewayConfig:
    """``[gateway]``: the store-and-forward gateway (issue 10), for sites
    that are not always reachable.

    ``hold_domains`` (exact names, as mta.domain.to_ascii writes them): mail
    for them is accepted from anyone (like a relay domain's), stored, and
    not attempted until it is asked for -- by ETRN (RFC 1985), ATRN (RFC
    2645) or ``mta queue flush --domain`` (mta.delivery.hold_courier).
    ``etrn_networks``: the clients that may send ETRN; None (the key not
    set) means ``[policy] relay_networks`` (see Config.etrn_networks).

    ``atrn_listen``: the ODMR listeners (366 is the registered port); empty:
    no ATRN.  ``atrn`` is the ``[gateway.atrn]`` table: which user may take
    which domains' mail by ATRN, as (user, domains) pairs, the domains as
    mta.domain.to_ascii writes them.  Whether the user exists is not checked
    here (the users file can change under a running daemon): a user not in it
    cannot authenticate, so cannot ATRN."""
    hold_domains: tuple[str, ...] = ()
    etrn_networks: tuple[str, ...] | None = None
    atrn_listen: tuple[str, ...] = ()
    atrn: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def atrn_domains(self, user: str) -> tuple[str, ...]:
        """The domains *user* may take by ATRN (none: not granted any)."""
        for name, domains in self.atrn:
            if name == user:
                return domains
        return ()


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    routes: tuple[tuple[str, str], ...] = ()   # (domain, "host:port"), checked before smarthost/MX
    route_tls: tuple[tuple[str, str], ...] = ()  # (domain of routes, TLS policy)
    dns: DNSConfig = field(default_factory=DNSConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    sendmail: SendmailConfig = field(default_factory=SendmailConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    local: LocalConfig | None = None  # None: no [local] section (see LocalConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    path: str = "<config>"

    @property
    def etrn_networks(self) -> tuple[str, ...]:
        """The clients that may send ETRN: ``[gateway] etrn_networks``, by
        default ``[policy] relay_networks`` (the one place the default is applied)."""
        nets = self.gateway.etrn_networks
        return self.policy.relay_networks if nets is None else nets


# section name -> (dataclass, {key: converter}); keys equal the dataclass field names.
_SCHEMA: dict[str, tuple[type, dict[str, Callable[[object], Any]]]] = {
    "server": (
        ServerConfig,
        {
            "hostname": v.hostname,
            "listen": v.endpoints,
            "max_message_size": v.integer(0, v.MESSAGE_SIZE_MAX, " (512 MiB)"),
            "max_recipients": v.integer(1, v.COUNT_MAX),
            "max_connections": v.integer(1, v.COUNT_MAX),
            "max_connections_per_client": v.integer(1, v.COUNT_MAX),
            "command_timeout": v.duration,
            "data_timeout": v.duration,
            "max_errors": v.integer(0, v.COUNT_MAX),
            "bare_newlines": v.choice("reject", "normalize"),
            "max_hops": v.integer(1, 1000),
            "workers": v.integer(0, v.WORKERS_MAX),
            "submission": v.endpoints,
        },
    ),
    "policy": (
        PolicyConfig,
        {
            "relay_networks": v.networks,
            "relay_domains": v.domains,
        },
    ),
    "spool": (
        SpoolConfig,
        {
            "url": v.sqlalchemy_url,
            "queue_minfree": v.integer(0),
            "lock_timeout": v.lock_timeout,
        },
    ),
    "cluster": (
        ClusterConfig,
        {
            "node": v.node_name,
            "lease": v.lease,
            "poll": v.duration,
        },
    ),
    "relay": (
        RelayConfig,
        {
            "smarthost": v.hostport,
            "port": v.port,
            "deliver": v.boolean,
            "concurrency": v.integer(1, 10_000),
            "per_destination": v.integer(1, 10_000),
            "recipient_limit": v.integer(1, v.COUNT_MAX),
            "connect_timeout": v.duration,
            "command_timeout": v.duration,
            "data_timeout": v.duration,
            "postmaster": v.address,
            "tls": v.tls_policy,
            "tls_ca_file": v.path,
            "smarthost_user": v.user,
            "smarthost_password": v.secret,
            "smarthost_password_file": v.path,
            "shutdown_grace": v.nonnegative_duration,
        },
    ),
    "dns": (
        DNSConfig,
        {
            "nameservers": v.nameservers,
            "timeout": v.duration,
        },
    ),
    "retry": (
        RetryConfig,
        {
            "first": v.duration,
            "max": v.duration,
            "lifetime": v.duration,
            "warn_after": v.optional_duration,
        },
    ),
    "tls": (
        TLSConfig,
        {
            "certificate": v.path,
            "private_key": v.path,
            "min_version": v.choice(*MIN_VERSIONS),
        },
    ),
    "auth": (
        AuthConfig,
        {
            "users_file": v.path,
            "allow_plaintext_on_loopback": v.boolean,
            "failure_delay": v.nonnegative_duration,
            "max_failures": v.integer(0, v.COUNT_MAX),
            "lockout": v.duration,
        },
    ),
    "sendmail": (
        SendmailConfig,
        {
            "domain": v.optional_domain,
        },
    ),
    "local": (
        LocalConfig,
        {
            "domains": v.exact_domains,
            "mailboxes": v.path,
            "maildir": v.maildir_template,
            "aliases": v.path,
            "lmtp": v.lmtp_destination,
        },
    ),
    "metrics": (
        MetricsConfig,
        {
            "listen": v.optional_endpoint,
            "queue_interval": v.duration,
            "max_domains": v.integer(0, 100_000),
        },
    ),
    "gateway": (
        GatewayConfig,
        {
            "hold_domains": v.hold_domains,
            "etrn_networks": v.networks,
            "atrn_listen": v.endpoints,
            "atrn": v.atrn_grants,
        },
    ),
}


def _routes(source: str, table: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    out = []
    seen: dict[str, str] = {}
    for domain, value in table.items():
        try:
            (name,) = v.domains([domain])
            _route_key(name)
            out.append((name, v.required_hostport(value)))
        except v.Invalid as e:
            raise ConfigError(source, f"[routes] {domain}", str(e)) from None
        _unique_domain(source, f"[routes] {domain}", name, domain, seen)
    return tuple(out)


def _route_key(name: str) -> None:
    """A ``[routes]``/``[route_tls]`` domain must be one the router can look up."""
    try:
        dom.config_key(name, "route")
    except dom.DomainError as e:
        raise v.Invalid(str(e)) from None


def _unique_domain(source: str, where: str, name: str, key: str, seen: dict[str, str]) -> None:
    """Two keys that are one domain (``"straße.de"``, ``"XN--STRAE-OQA.de"``)."""
    if name in seen:
        raise ConfigError(source, where, f"the same domain as {seen[name]!r} ({name})")
    seen[name] = key


def _route_tls(source: str, table: Mapping[str, Any],
               routes: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """``[route_tls]``: domain -> TLS policy, for domains that have a ``[routes]`` entry."""
    routed = {name for name, _ in routes}
    out = []
    seen: dict[str, str] = {}
    for domain, value in table.items():
        where = f"[route_tls] {domain}"
        try:
            (name,) = v.domains([domain])
            _route_key(name)
            policy = v.tls_policy(value)
        except v.Invalid as e:
            raise ConfigError(source, where, str(e)) from None
        if name not in routed:
            raise ConfigError(source, where, "no [routes] entry for this domain "
                              "(a TLS policy is set per route; [relay] tls covers the rest)")
        _unique_domain(source, where, name, domain, seen)
        out.append((name, policy))
    return tuple(out)


def _check_relay(source: str, relay: RelayConfig) -> None:
    """Smarthost credentials: complete, for a smarthost, and never without TLS."""
    user = relay.smarthost_user
    secret = relay.smarthost_password or relay.smarthost_password_file
    if relay.smarthost_password and relay.smarthost_password_file:
        raise ConfigError(source, "[relay] smarthost_password_file",
                          "cannot be set together with smarthost_password (choose one)")
    if secret and not user:
        key = "smarthost_password" if relay.smarthost_password else "smarthost_password_file"
        raise ConfigError(source, "[relay] smarthost_user", f"must be set when {key} is set")
    if not user:
        return
    if not secret:
        raise ConfigError(source, "[relay] smarthost_password",
                          "must be set when smarthost_user is set (or smarthost_password_file)")
    if not relay.smarthost.strip():
        raise ConfigError(source, "[relay] smarthost_user",
                          "is set, but [relay] smarthost is empty (the credentials are only "
                          "used for the smarthost)")
    if relay.tls == "none":
        raise ConfigError(source, "[relay] tls",
                          "\"none\" cannot be used with smarthost_user: the password is only "
                          "sent over TLS (use \"may\", \"encrypt\" or \"verify\")")


# --------------------------------------------------------------------------- loading

def config_from_dict(data: Mapping[str, Any], source: str = "<config>") -> Config:
    """Build a Config from parsed TOML (a dict of sections); ``source`` names it in errors."""
    source = str(source)
    for name, value in data.items():
        if name not in _SCHEMA and name not in ("routes", "route_tls"):
            if isinstance(value, Mapping):
                raise ConfigError(source, f"[{name}]", "unknown section")
            raise ConfigError(source, name, "unknown key (settings belong in a section such as [server])")
        if not isinstance(value, Mapping):
            raise ConfigError(source, f"[{name}]", f"expected a table, got {value!r}")

    sections: dict[str, Any] = {}
    for name, (cls, converters) in _SCHEMA.items():
        table = data.get(name, {})
        kwargs: dict[str, Any] = {}
        for key, value in table.items():
            if key not in converters:
                raise ConfigError(source, f"[{name}] {key}", "unknown key")
            try:
                kwargs[key] = converters[key](value)
            except v.Invalid as e:
                raise ConfigError(source, f"[{name}] {key}", str(e)) from None
        sections[name] = cls(**kwargs)
    routes = _routes(source, data.get("routes", {}))
    route_tls = _route_tls(source, data.get("route_tls", {}), routes)
    sections["server"] = _check_workers(sections["server"])
    _check_tls(source, sections["tls"], sections["server"])
    _check_relay(source, sections["relay"])
    _check_atrn(source, sections["gateway"], sections["auth"], sections["tls"])
    if "local" not in data:
        sections["local"] = None
    else:
        _check_local(source, sections["local"], routes)
    _check_gateway(source, sections["gateway"], sections["local"], sections["server"])
    return Config(path=source, routes=routes, route_tls=route_tls, **sections)


def _check_workers(server: ServerConfig) -> ServerConfig:
    """``[server] workers``: 0 becomes one per CPU core.  (A ``[cluster]
    node`` name with several workers is checked by mta.tap, which knows
    whether more than one of them would deliver.)"""
    workers = server.workers
    if workers == 0:
        try:
            workers = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            workers = os.cpu_count() or 1
    return dataclasses.replace(server, workers=workers)


def _check_local(source: str, local: LocalConfig, routes: tuple[tuple[str, str], ...]) -> None:
    """A local domain is delivered here: it cannot also have a [routes] entry."""
    routed = {name for name, _ in routes}
    for name in local.domains:
        if name in routed:
            raise ConfigError(source, "[local] domains", f"{name} also has a [routes] entry "
                              "(a domain is either delivered here or routed elsewhere)")


def _check_atrn(source: str, gateway: GatewayConfig, auth: AuthConfig, tls: TLSConfig) -> None:
    """An ODMR listener needs logins (ATRN comes after AUTH) and someone to
    grant domains to; an implicit-TLS one without its own key needs [tls]."""
    if not gateway.atrn_listen:
        return
    if not auth.enabled:
        raise ConfigError(source, "[gateway] atrn_listen",
                          "ATRN needs AUTH: set [auth] users_file")
    if not gateway.atrn:
        raise ConfigError(source, "[gateway] atrn_listen",
                          "no [gateway.atrn] table: nobody may take mail by ATRN")
    if not tls.enabled:
        for description in gateway.atrn_listen:
            if v.implicit_tls_endpoint(description) is not None:
                raise ConfigError(
                    source, "[gateway] atrn_listen",
                    f"{description!r} is an implicit-TLS listener without privateKey=: "
                    "set [tls] certificate and private_key")


def _check_gateway(source: str, gateway: GatewayConfig, local: LocalConfig | None,
                   server: ServerConfig) -> None:
    """A hold domain is kept for another host: it cannot be delivered here.
    A domain taken by ATRN must be held: otherwise its mail would also leave
    by MX or route before the customer asks for it."""
    here = set(local.domains if local is not None else ()) | {dom.key(server.hostname)}
    for name in gateway.hold_domains:
        if name in here:
            raise ConfigError(source, "[gateway] hold_domains",
                              f"{name} is also a local domain ([local] domains or [server] "
                              "hostname: a domain is either delivered here or held for "
                              "another host)")
    held = set(gateway.hold_domains)
    for user, domains in gateway.atrn:
        for name in domains:
            if name not in held:
                raise ConfigError(source, f"[gateway.atrn] {user}",
                                  f"{name} is not in [gateway] hold_domains (mail taken by "
                                  "ATRN must be held for it, not relayed meanwhile)")


def _check_tls(source: str, tls: TLSConfig, server: ServerConfig) -> None:
    """Rules that span keys: the certificate and key come as a pair, and an
    ``ssl:`` listener without its own key needs them.  (The files themselves
    are read at startup, not here, so that ``mta passwd`` works without them.)"""
    if tls.certificate and not tls.private_key:
        raise ConfigError(source, "[tls] private_key", "must be set when certificate is set")
    if tls.private_key and not tls.certificate:
        raise ConfigError(source, "[tls] certificate", "must be set when private_key is set")
    if tls.enabled:
        return
    for key in ("listen", "submission"):
        for description in getattr(server, key):
            if v.implicit_tls_endpoint(description) is not None:
                raise ConfigError(
                    source, f"[server] {key}",
                    f"{description!r} is an implicit-TLS listener without privateKey=: "
                    "set [tls] certificate and private_key")


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the TOML file at ``path``; raise ConfigError on any problem."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            raw = f.read()
    except OSError as e:
        reason = f"[Errno {e.errno}] {e.strerror}" if e.errno is not None else str(e)
        raise ConfigError(source, None, f"cannot read file: {reason}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(source, None, f"file is not valid UTF-8: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, None, f"invalid TOML: {e}") from None
    return config_from_dict(data, source)
