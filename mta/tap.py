"""``twistd mta``: options and the service tree."""
from __future__ import annotations

import sys

from twisted.application import internet, service
from twisted.internet import endpoints
from twisted.internet.error import CannotListenError
from twisted.python import usage

from .config import Config, ConfigError, load_config


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = ("Run the mta mail transfer agent: an ESMTP server on the endpoints of "
                "[server] listen, storing mail in the spool named by [spool] url.")
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
                endpoints.serverFromString(reactor, ep)
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

    def __init__(self, description: str, where: str, factory, reactor) -> None:
        super().__init__(endpoints.serverFromString(reactor, description), factory)
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
        max_errors=s.max_errors, bare_newlines=s.bare_newlines)
    policy = RelayPolicy(config.policy.relay_networks, config.policy.relay_domains)
    factory = SMTPServerFactory(settings, spool, policy, reactor=reactor)

    top = service.MultiService()
    SpoolService(spool).setServiceParent(top)
    if config.relay.deliver:
        runner = _make_runner(config, spool, reactor)
        runner.setServiceParent(top)
        factory.on_stored = runner.kick
    where = "--listen" if options["listen"] else f"{config.path}: [server] listen"
    for ep in options["listen"] or s.listen:
        svc = _ListenService(ep, where, factory, reactor)
        svc.setServiceParent(top)
    return top


def _make_runner(config: Config, spool: object, reactor: object) -> service.IService:
    from .delivery.router import Router
    from .delivery.scheduler import QueueRunner
    from .smtp.client import ConnectionPool, Timeouts

    relay = config.relay
    try:
        router = Router(smarthost=relay.smarthost, routes=dict(config.routes),
                        nameservers=list(config.dns.nameservers), reactor=reactor,
                        timeout=(max(1, round(config.dns.timeout)),))
    except ValueError as e:
        _die(f"{config.path}: [relay]/[routes]/[dns]: {e}")
    t = relay.command_timeout
    timeouts = Timeouts(connect=relay.connect_timeout, greeting=t, helo=t, mail=t, rcpt=t,
                        data_init=min(t, 120.0), data_block=min(relay.data_timeout, 180.0),
                        data_end=relay.data_timeout)
    pool = ConnectionPool(helo_name=config.server.hostname, reactor=reactor, timeouts=timeouts)
    return QueueRunner(spool, router, pool, hostname=config.server.hostname,
                       retry=config.retry, relay=relay, reactor=reactor)
