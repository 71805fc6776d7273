"""``twistd mta``: options and the service tree."""
from __future__ import annotations

import signal
import sys
from typing import Any

from twisted.application import internet, service
from twisted.internet import endpoints
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python import usage

from .config import Config, ConfigError, implicit_tls_endpoint, load_config

log = Logger(namespace="mta")


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = ("Run the mta mail transfer agent: an ESMTP server on the endpoints of "
                "[server] listen (and submission), storing mail in the spool named by "
                "[spool] url.  SIGHUP reloads the TLS certificate and the users file.")
    optParameters = [
        ["config", "c", "etc/mta.toml", "Path to the TOML configuration file."],
        ["spool", None, None, "Override [spool] url (a SQLAlchemy URL)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, endpoint: str) -> None:
        """Listen on this Twisted endpoint instead of [server] listen (repeatable),
        e.g. tcp:2525:interface=127.0.0.1"""
        self["listen"].append(endpoint)

    def postOptions(self) -> None:
        try:
            self.config = load_config(self["config"])
        except ConfigError as e:
            _die(str(e))
        from twisted.internet import reactor
        for ep in self["listen"]:
            try:
                endpoints.serverFromString(reactor, implicit_tls_endpoint(ep) or ep)
            except Exception as e:
                _die(f"--listen {ep}: bad endpoint: {e}")


def _die(message: str) -> None:
    """One line on stderr and a non-zero exit: twistd would otherwise print a
    usage text or a traceback."""
    # Once twistd has started logging, sys.stderr is redirected into the log;
    # the one line belongs on the real stderr.
    err = sys.__stderr__ or sys.stderr
    err.write(f"mta: {message}\n")
    err.flush()
    raise SystemExit(1)


class _ListenService(internet.StreamServerEndpointService):
    """strports.service(), but a port that cannot be bound (in use, no
    permission, no such address) stops startup with one line, not a traceback."""

    def __init__(self, description: str, where: str, factory, reactor,
                 endpoint: Any = None) -> None:
        if endpoint is None:
            endpoint = endpoints.serverFromString(reactor, description)
        super().__init__(endpoint, factory)
        self._raiseSynchronously = True
        self.description = description
        self.where = where

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            reason = e.socketError
            text = getattr(reason, "strerror", None) or str(reason)
            _die(f"{self.where}: {self.description}: cannot listen: {text}")


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor

    from .policy import RelayPolicy
    from .smtp.server import ServerSettings, SMTPServerFactory
    from .spool import Spool, SpoolError
    from .spool.service import SpoolService

    config: Config = options.config
    # Certificate and users file first: their errors should stop startup
    # before anything else is opened.
    tls = _make_tls(config)
    portal, users, pool = _make_auth(config, reactor)
    url = options["spool"] or config.spool.url
    where = "--spool" if options["spool"] else f"{config.path}: [spool] url"
    try:
        spool = Spool(url, reactor=reactor)
        spool.open()
    except SpoolError as e:
        _die(f"{where}: {e}")
    except Exception as e:  # bad driver name and the like
        _die(f"{where}: {url}: {e}")

    s = config.server
    settings = ServerSettings(
        hostname=s.hostname, max_message_size=s.max_message_size,
        max_recipients=s.max_recipients, max_connections=s.max_connections,
        max_connections_per_client=s.max_connections_per_client,
        command_timeout=s.command_timeout, data_timeout=s.data_timeout,
        max_errors=s.max_errors, bare_newlines=s.bare_newlines,
        auth_plaintext_on_loopback=config.auth.allow_plaintext_on_loopback)
    policy = RelayPolicy(config.policy.relay_networks, config.policy.relay_domains)
    top = service.MultiService()
    if pool is not None:
        pool.setServiceParent(top)
    from .auth.limiter import FailureLimiter
    a = config.auth
    limiter = FailureLimiter(clock=reactor, delay=a.failure_delay, max_failures=a.max_failures,
                             lockout=a.lockout)
    factory = SMTPServerFactory(settings, spool, policy, reactor=reactor, tls=tls,
                                portal=portal, limiter=limiter)

    SpoolService(spool).setServiceParent(top)
    if config.relay.deliver:
        runner = _make_runner(config, spool, reactor)
        runner.setServiceParent(top)
        factory.on_stored = runner.kick
    where = "--listen" if options["listen"] else f"{config.path}: [server] listen"
    for ep in options["listen"] or s.listen:
        _listener(ep, where, factory, reactor, tls, submission=False).setServiceParent(top)
    for ep in s.submission:
        _listener(ep, f"{config.path}: [server] submission", factory, reactor, tls,
                  submission=True).setServiceParent(top)
    if s.submission and portal is None:
        log.warn("{config}: [server] submission is set but [auth] users_file is not: "
                 "nobody can submit mail there", config=config.path)
    if tls is not None or users is not None:
        _ReloadOnHangup(reactor, tls, users).setServiceParent(top)
    return top


def _listener(description: str, where: str, factory: Any, reactor: Any, tls: Any, *,
              submission: bool) -> _ListenService:
    """A listening service.  ``ssl:`` strings without their own privateKey=
    listen on the matching tcp: endpoint with TLS from the [tls] certificate
    (reloadable), wrapped around the session factory."""
    try:
        tcp = implicit_tls_endpoint(description)
    except ValueError as e:
        _die(f"{where}: {description}: {e}")
    implicit = tcp is not None or description.startswith("ssl:")
    session_factory = factory.listener(submission=submission, implicit_tls=implicit)
    if tcp is None:
        return _ListenService(description, where, session_factory, reactor)
    if tls is None:
        _die(f"{where}: {description}: implicit TLS needs [tls] certificate and private_key")
    from twisted.protocols.tls import TLSMemoryBIOFactory
    wrapped = TLSMemoryBIOFactory(tls, False, session_factory)
    return _ListenService(description, where, wrapped, reactor,
                          endpoint=endpoints.serverFromString(reactor, tcp))


def _make_tls(config: Config) -> Any:
    """The [tls] certificate as a context factory, or None; unusable files stop
    startup with one line naming the key and the file."""
    t = config.tls
    if not t.enabled:
        return None
    from .tls import ServerTLS, TLSError
    tls = ServerTLS(t.certificate, t.private_key, t.min_version)
    try:
        tls.load()
    except TLSError as e:
        _die(f"{config.path}: {e}")
    log.info("TLS certificate {path} loaded: subject={subject} expires={expires}",
             path=t.certificate, subject=tls.subject, expires=tls.not_after)
    if tls.expired():
        log.warn("TLS certificate {path} expired on {expires}", path=t.certificate,
                 expires=tls.not_after)
    return tls


def _make_auth(config: Config, reactor: Any) -> tuple[Any, Any, Any]:
    """(portal, users file, thread pool service), or Nones when [auth] users_file is unset."""
    a = config.auth
    if not a.enabled:
        return None, None, None
    import os

    from .auth.checker import AuthPool, make_portal
    from .auth.users import UsersFile, UsersFileError

    def problem(message: str) -> None:
        # May be called on the password-check thread; log on the reactor thread.
        reactor.callFromThread(log.warn, "users file: {problem}", problem=message)

    users = UsersFile(a.users_file, on_problem=problem)
    try:
        users.load()
    except UsersFileError as e:
        _die(f"{config.path}: [auth] users_file: {e}")
    if not os.path.exists(a.users_file):
        log.warn("{path} does not exist: no user can authenticate until `mta passwd add` "
                 "creates it", path=a.users_file)
    else:
        log.info("{path}: {n} user(s)", path=a.users_file, n=len(users))
    pool = AuthPool(reactor)
    return make_portal(users, pool.run), users, pool


class _ReloadOnHangup(service.Service):
    """SIGHUP: load the TLS certificate and the users file again.  A
    certificate that fails to load is reported and the old one kept."""

    def __init__(self, reactor: Any, tls: Any, users: Any):
        self.reactor = reactor
        self.tls = tls
        self.users = users
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        try:
            self._previous = signal.signal(signal.SIGHUP, self._on_signal)
        except ValueError:  # not the main thread (tests)
            self._previous = None

    def stopService(self) -> None:
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reload)

    def reload(self) -> None:
        if self.tls is not None:
            from .tls import TLSError
            try:
                self.tls.load()
            except TLSError as e:
                log.error("SIGHUP: {error}; keeping the previous certificate", error=str(e))
            else:
                log.info("SIGHUP: TLS certificate reloaded: subject={subject} "
                         "expires={expires}", subject=self.tls.subject,
                         expires=self.tls.not_after)
        if self.users is not None:
            from .auth.users import UsersFileError
            try:
                self.users.load()
            except UsersFileError as e:
                log.error("SIGHUP: {error}; keeping the previous users", error=str(e))
            else:
                log.info("SIGHUP: users file {path} reloaded: {n} user(s)",
                         path=self.users.path, n=len(self.users))


def _make_runner(config: Config, spool: object, reactor: object) -> service.IService:
    from .delivery.router import Router
    from .delivery.scheduler import QueueRunner
    from .smtp.client import ConnectionPool, Timeouts

    relay = config.relay
    trust_root, credentials = _relay_tls_auth(config)
    try:
        router = Router(smarthost=relay.smarthost, routes=dict(config.routes),
                        nameservers=list(config.dns.nameservers), reactor=reactor,
                        port=relay.port,
                        timeout=(max(1, round(config.dns.timeout)),),
                        tls=relay.tls, route_tls=dict(config.route_tls),
                        smarthost_auth=credentials)
    except ValueError as e:
        _die(f"{config.path}: [relay]/[routes]/[dns]: {e}")
    t = relay.command_timeout
    timeouts = Timeouts(connect=relay.connect_timeout, greeting=t, helo=t, mail=t, rcpt=t,
                        data_init=min(t, 120.0), data_block=min(relay.data_timeout, 180.0),
                        data_end=relay.data_timeout)
    # Cache as many idle connections per next hop as can be busy at once (with a
    # smarthost every delivery goes to one host), so none is closed and reopened
    # under steady load just for want of room in the cache.
    pool = ConnectionPool(helo_name=config.server.hostname, reactor=reactor, timeouts=timeouts,
                          max_idle_per_host=max(4, relay.concurrency), trust_root=trust_root)
    return QueueRunner(spool, router, pool, hostname=config.server.hostname,
                       retry=config.retry, relay=relay, reactor=reactor)


def _relay_tls_auth(config: Config) -> tuple[Any, Any]:
    """(trust root for TLS policy "verify", smarthost Credentials), each None
    when not configured.  An unreadable CA or password file stops startup
    with one line naming the key."""
    from .delivery.router import Credentials
    from .smtp.client import load_trust_root

    relay = config.relay
    trust_root = None
    if relay.tls_ca_file:
        try:
            trust_root = load_trust_root(relay.tls_ca_file)
        except ValueError as e:
            _die(f"{config.path}: [relay] tls_ca_file: {e}")
    credentials = None
    if relay.smarthost_user:
        password = relay.smarthost_password
        if relay.smarthost_password_file:
            path = relay.smarthost_password_file
            try:
                with open(path, encoding="utf-8") as f:
                    password = f.readline().rstrip("\r\n")
            except (OSError, UnicodeDecodeError) as e:
                why = getattr(e, "strerror", None) or str(e)
                _die(f"{config.path}: [relay] smarthost_password_file: {path}: cannot read: {why}")
            if not password or "\x00" in password:
                _die(f"{config.path}: [relay] smarthost_password_file: {path}: the first line "
                     "must be the password (empty, or contains NUL)")
            import os
            try:
                if os.stat(path).st_mode & 0o077:
                    log.warn("{path}: the smarthost password file is readable by others "
                             "(chmod 600 it)", path=path)
            except OSError:
                pass
        credentials = Credentials(relay.smarthost_user, password)
        log.info("smarthost {host}: AUTH as {user}, over TLS only", host=relay.smarthost,
                 user=relay.smarthost_user)
    return trust_root, credentials
