"""``twistd mta``: options and the service tree."""
from __future__ import annotations

import os
import signal
import sys
from typing import TYPE_CHECKING, Any, Callable

from twisted.application import internet, service
from twisted.internet import defer, endpoints, task
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python import usage

from . import epoll, gctune
from .config import Config, ConfigError, load_config
from .config_values import implicit_tls_endpoint

if TYPE_CHECKING:
    from .delivery.scheduler import QueueRunner
    from .delivery.types import Courier
    from .smtp.server import EtrnHandler
    from .local.directory import LocalDirectory
    from .spool.interface import DeliveryQueue, SpoolInterface

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
            self._cannot_listen(e.socketError)
        except OSError as e:     # unix: the lock file next to the socket
            self._cannot_listen(e)

    def bind_shared(self) -> None:
        """[server] workers > 1: the supervisor binds the shared socket
        (mta.workers.SharedEndpoint) with the errors of a single daemon."""
        failures: list[Any] = []
        self.endpoint.bind().addErrback(failures.append)
        if failures:
            try:
                failures[0].raiseException()
            except CannotListenError as e:
                self._cannot_listen(e.socketError)
            except OSError as e:
                self._cannot_listen(e)

    def _cannot_listen(self, reason: Any) -> None:
        text = getattr(reason, "strerror", None) or str(reason)
        path = getattr(self.endpoint, "_address", None)     # unix: endpoints
        if isinstance(path, (str, bytes)):
            directory = os.path.dirname(os.path.abspath(os.fsdecode(path)))
            if not os.path.isdir(directory):
                text += f" (directory {directory} does not exist)"
        _die(f"{self.where}: {self.description}: cannot listen: {text}")


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor

    from .auth.limiter import FailureLimiter
    from .policy import RelayPolicy
    from .smtp.server import SMTPServerFactory
    from .spool import Spool, SpoolError, listens
    from .spool.service import SpoolService

    config: Config = options.config
    s = config.server
    # [server] workers > 1: the listeners bound by the supervisor, shared by the workers.
    shared: list[_ListenService] | None = [] if s.workers > 1 else None
    # Certificate and users file first: their errors should stop startup
    # before anything else is opened.
    tls = _make_tls(config)
    portal, users, pool = _make_auth(config, reactor)
    metrics = _make_metrics(config, options, reactor)
    url = options["spool"] or config.spool.url
    where = "--spool" if options["spool"] else f"{config.path}: [spool] url"
    try:
        spool = Spool(url, node=config.cluster.node, lease=config.cluster.lease,
                      reactor=reactor, lock_timeout=config.spool.lock_timeout,
                      on_commit=metrics.commit_done if metrics is not None else None)
        spool.open()
    except SpoolError as e:
        _die(f"{where}: {e}")
    except Exception as e:  # bad driver name and the like
        _die(f"{where}: {url}: {e}")

    _chown_spool(options, url)
    _check_as_user(options, config, url, where)
    directory = local_directory(config)
    policy = RelayPolicy(config.policy.relay_networks, config.policy.relay_domains,
                         local=directory, hold_domains=config.gateway.hold_domains,
                         etrn_networks=config.etrn_networks,
                         routed=[name for name, _ in config.routes])
    # On PostgreSQL the other nodes' (and mta queue's) changes wake the
    # runner (spool.listener below): the poll is only the fallback there.
    poll = config.cluster.poll if listens(url) else POLL
    runner = (_make_runner(config, spool, reactor, directory, metrics=metrics,
                           poll_interval=poll)
              if config.relay.deliver else None)
    a = config.auth
    limiter = FailureLimiter(clock=reactor, delay=a.failure_delay, max_failures=a.max_failures,
                             lockout=a.lockout)
    # config.server is the server's settings (mta.smtp.settings.ServerSettings).
    factory = SMTPServerFactory(s, spool, policy, reactor=reactor, tls=tls,
                                portal=portal, limiter=limiter,
                                storage=spool.free_space(minfree=config.spool.queue_minfree,
                                                         max_message_size=s.max_message_size),
                                auth_plaintext_on_loopback=a.allow_plaintext_on_loopback,
                                cram_md5=users.has_cram_md5 if users is not None else None,
                                on_stored=runner.kick if runner is not None else None,
                                metrics=metrics,
                                etrn=_etrn_handler(runner) if runner is not None else None)
    # [server] workers > 1 in a daemon that accepts and delivers: one worker
    # delivers, the others accept (mta.workers); these are each role's parts.
    delivering: list[service.IService] = []
    accepting: list[service.IService] = []
    # Started in this order and stopped in the reverse one, each part after
    # the one before it has finished stopping (README "Stopping and
    # restarting"): the listeners; then the open sessions (421) and the
    # deliveries in progress (within [relay] shutdown_grace), side by side;
    # then the metrics; the spool last.
    top = OrderedMultiService()
    _ProcessTuning(reactor).setServiceParent(top)                   # started first
    worker = "mta worker" if shared is not None else "mta"
    _LogLine(stop=f"{worker} stopped").setServiceParent(top)        # stopped last
    if pool is not None:
        pool.setServiceParent(top)
    SpoolService(spool).setServiceParent(top)
    # Started after the spool, stopped before it (after the runner).
    listener = spool.listener(runner.kick) if runner is not None else None
    if listener is not None:
        listener.setServiceParent(top)
        delivering.append(listener)
    if metrics is not None:     # with workers: served by the delivering one
        delivering += _metrics_services(config, metrics, spool, reactor, top, shared)
    draining = service.MultiService()      # these two stop side by side
    draining.setServiceParent(top)
    if runner is not None:
        runner.setServiceParent(draining)
        delivering.append(runner)
    SessionDrain(factory, config.relay.shutdown_grace, reactor).setServiceParent(draining)
    front = service.MultiService()
    front.setServiceParent(top)
    where = "--listen" if options["listen"] else f"{config.path}: [server] listen"
    listen = list(options["listen"] or s.listen)
    for ep in listen:
        part = _listener(ep, where, factory, reactor, tls, submission=False, shared=shared)
        part.setServiceParent(front)
        accepting.append(part)
    if not listen and not s.submission:
        if not config.relay.deliver:
            _die(f"{config.path}: [server] listen and submission are empty and [relay] "
                 "deliver = false: this daemon would neither accept nor deliver mail")
        log.warn("{config}: no [server] listen or submission endpoints: accepting no mail "
                 "over SMTP, only delivering the queue (what sendmail puts there)",
                 config=config.path)
    for ep in s.submission:
        part = _listener(ep, f"{config.path}: [server] submission", factory, reactor, tls,
                         submission=True, shared=shared)
        part.setServiceParent(front)
        accepting.append(part)
    for ep in config.gateway.atrn_listen:
        part = _atrn_listener(ep, config, factory, runner, reactor, tls, shared=shared)
        part.setServiceParent(front)
        delivering.append(part)
    if s.submission and portal is None:
        log.warn("{config}: [server] submission is set but [auth] users_file is not: "
                 "nobody can submit mail there", config=config.path)
    if tls is not None or users is not None:
        _ReloadOnHangup(reactor, tls, users).setServiceParent(front)
    line = _start_line(config, listen, url)
    if shared is None:
        _LogLine(start=line, stop="mta stopping",
                 reactor=reactor).setServiceParent(top)       # started last, stopped first
        return top
    from .workers import Roles, WorkerSupervisor
    _LogLine(stop="mta worker stopping", reactor=reactor).setServiceParent(top)
    roles = Roles(deliver=tuple(delivering), accept=tuple(accepting)) \
        if runner is not None and accepting else None
    if runner is not None and roles is None and config.cluster.node:
        # Every worker would deliver, so each claims under its own name
        # (the generated one); with roles only worker 1 claims anything.
        _die(f"{config.path}: [cluster] node: {s.workers} workers that all deliver (no [server] "
             f"listen or submission) cannot share the one node name {config.cluster.node!r} "
             "(leave node empty: each worker gets its own)")
    workers = f"{s.workers} worker processes"
    if roles is not None:
        workers += f" (1 delivering, {s.workers - 1} accepting)"
    return WorkerSupervisor(top, shared, s.workers, reactor=reactor, roles=roles,
                            lines=_LogLine(start=f"{line}; {workers}",
                                           stop="mta stopping", reactor=reactor),
                            node=lambda: spool.node, twistd=getattr(options, "parent", None),
                            on_exit=metrics.process_gone if metrics is not None else None,
                            on_stopped=metrics.remove_shared if metrics is not None else None)


def _start_line(config: Config, listen: list[str], url: str) -> str:
    from sqlalchemy.engine import make_url

    from . import __version__
    try:
        spool = make_url(url).render_as_string(hide_password=True)
    except Exception:
        spool = url
    parts = [f"listening on {', '.join(listen) or 'nothing'}"]
    if config.server.submission:
        parts.append(f"submission on {', '.join(config.server.submission)}")
    if config.gateway.atrn_listen:
        parts.append(f"ATRN on {', '.join(config.gateway.atrn_listen)}")
    parts.append(f"spool {spool}")
    r = config.relay
    if not r.deliver:
        parts.append("not delivering ([relay] deliver = false)")
    elif r.smarthost:
        parts.append(f"delivering to smarthost {r.smarthost}")
    else:
        ns = ", ".join(config.dns.nameservers) or "the system resolver"
        parts.append(f"delivering by MX ({ns})"
                     + (f" and {len(config.routes)} route(s)" if config.routes else ""))
    return f"mta {__version__} started: " + "; ".join(parts)


class _ProcessTuning(service.Service):
    """At the start of the process that runs the tree (a worker's, with
    ``[server] workers``): Python's collector settled (mta.gctune) and the
    reactor's poll without the legacy log context (mta.epoll).  A service,
    not a reactor trigger, so that building the tree (as tests do) changes
    nothing of the process."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def startService(self) -> None:
        super().startService()
        gctune.settle()
        epoll.streamline(self.reactor)


class _LogLine(service.Service):
    """A line at start and/or at stop.  The one that logs the stop also
    makes a second SIGTERM/SIGINT during the stop one log line (Twisted's
    handler would call reactor.stop() again: a ReactorNotRunning traceback),
    and its start drops Twisted's chatter for each DNS query from the log."""

    def __init__(self, start: str | None = None, stop: str | None = None,
                 reactor: Any = None) -> None:
        self.start_line = start
        self.stop_line = stop
        self.reactor = reactor

    def startService(self) -> None:
        super().startService()
        if self.start_line is not None:
            from .logging import quiet_dns_chatter
            quiet_dns_chatter()
            log.info("{line}", line=self.start_line)

    def stopService(self) -> None:
        super().stopService()
        if self.stop_line is not None:
            log.info("{line}", line=self.stop_line)
        if self.reactor is not None:
            for signum in (signal.SIGTERM, signal.SIGINT):
                try:
                    signal.signal(signum, self._again)
                except ValueError:      # not the main thread (tests)
                    pass

    def _again(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        self.reactor.callFromThread(log.info, "{signal}: already stopping", signal=name)


class OrderedMultiService(service.MultiService):
    """A MultiService whose children stop one after another, in the reverse
    order of their start, each once the one after it has finished stopping
    (Twisted's MultiService stops them all at once).  A child that fails to
    stop is logged and the others still stop."""

    def stopService(self) -> defer.Deferred:
        service.Service.stopService(self)
        d: defer.Deferred = defer.succeed(None)
        for child in reversed(list(self)):
            d.addCallback(self._stop_child, child)
        return d

    @staticmethod
    def _stop_child(_: Any, child: service.IService) -> defer.Deferred:
        d = defer.maybeDeferred(child.stopService)
        d.addErrback(lambda f: log.failure("stopping {service} failed", f, service=child))
        return d


class SessionDrain(service.Service):
    """At stop (after the listeners): every open session is told to finish
    (see SMTPServerFactory.shutdown): idle ones and those still receiving a
    message get 421 at once, those waiting for a commit (or a password
    check) after its reply.  Fires when no session waits for a commit any
    more, so the spool stops only after every 250 it owes.  After *grace*
    seconds every session not waiting for the spool is closed, and after
    *hard_limit* more the stop goes on regardless."""

    name = "smtp-sessions"
    poll = 0.05
    hard_limit = 10.0     # after the grace: how much longer a pending commit may take

    def __init__(self, factory: Any, grace: float, reactor: Any):
        self.factory = factory
        self.grace = grace
        self.reactor = reactor

    def stopService(self) -> defer.Deferred | None:
        super().stopService()
        f = self.factory
        f.shutdown()
        if f.drained():
            return None
        n = sum(1 for session in f.sessions if not session.finished())
        log.info("stopping: {n} SMTP session(s) finishing their transaction", n=n)
        done: defer.Deferred = defer.Deferred()
        start = self.reactor.seconds()
        forced = False

        def check() -> None:
            nonlocal forced
            waited = self.reactor.seconds() - start
            if f.drained():
                pass
            elif not forced and waited >= self.grace:
                forced = True
                f.force_close()
                if not f.drained():
                    return
            elif forced and waited >= self.grace + self.hard_limit:
                log.warn("stopping: {n} SMTP session(s) still wait for the spool; "
                         "stopping anyway", n=sum(1 for x in f.sessions if not x.finished()))
            else:
                return
            loop.stop()
            done.callback(None)
        loop = task.LoopingCall(check)
        loop.clock = self.reactor
        loop.start(self.poll, now=False)
        return done


def _make_metrics(config: Config, options: Options, reactor: Any) -> Any:
    """The Prometheus metrics, when [metrics] listen is set (else None);
    with ``[server] workers`` > 1 shared by the workers through a private
    directory (given to the ``--uid`` user), removed when the daemon stops."""
    m = config.metrics
    if not m.listen:
        return None
    from prometheus_client import disable_created_metrics

    from .metrics import Metrics, shared_directory
    disable_created_metrics()     # no *_created series: they only double the page
    shared = None
    if config.server.workers > 1:
        shared = shared_directory()
        target = _target_user(options)
        if target is not None:
            uid, gid, _euid = target
            os.chown(shared, *_chown_ids(uid, gid))
    return Metrics(max_domains=m.max_domains, clock=reactor.seconds, shared=shared)


def _metrics_services(config: Config, metrics: Any, spool: SpoolInterface, reactor: Any,
                      parent: service.MultiService,
                      shared: list[_ListenService] | None) -> list[service.IService]:
    """The metrics' queue gauges and their web page (a listener shared by
    the workers when *shared* is a list); returns both."""
    from .metrics import MetricsSite, QueueGauges, is_loopback_endpoint
    m = config.metrics
    gauges = QueueGauges(metrics, spool, m.queue_interval, reactor)
    gauges.setServiceParent(parent)
    where = f"{config.path}: [metrics] listen"
    if not is_loopback_endpoint(m.listen):
        log.warn("{where}: {endpoint} is not a loopback address: anyone who can reach it "
                 "can read the metrics", where=where, endpoint=m.listen)
    if shared is None:
        page = _ListenService(m.listen, where, MetricsSite(metrics), reactor)
    else:
        page = _serve(m.listen, where, reactor, None, lambda _implicit: MetricsSite(metrics),
                      shared=shared)
    page.setServiceParent(parent)
    return [gauges, page]


def _target_user(options: Options) -> tuple[int | None, int | None, bool] | None:
    """(uid, gid, euid) twistd will switch to after privilegedStartService
    (``--uid``/``--gid``/``--euid``, gid defaulting as twistd does), or None
    when it will not switch (no such option, or not running as root)."""
    parent = getattr(options, "parent", None)
    if parent is None or not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    uid, gid = parent.get("uid"), parent.get("gid")
    if uid is None and gid is None:
        return None
    if uid is not None and gid is None:
        import pwd
        try:
            gid = pwd.getpwuid(uid).pw_gid
        except KeyError:
            gid = None
    return uid, gid, bool(parent.get("euid"))


def _chown_ids(uid: int | None, gid: int | None) -> tuple[int, int]:
    """*uid* and *gid* for os.chown: -1 (leave it) for None."""
    return (-1 if uid is None else uid), (-1 if gid is None else gid)


def _check_as_user(options: Options, config: Config, url: str, where: str) -> None:
    """Under ``--uid``/``--gid``: as that user (a forked child, see
    mta.usercheck), open the spool for writing, read the files read again
    after the switch, and run every import the daemon does; the first
    problem stops startup with one line."""
    target = _target_user(options)
    if target is None:
        return
    uid, gid, euid = target
    from twisted.internet import reactor

    from . import usercheck
    from .spool import Spool

    def spool() -> None:
        try:
            Spool(url, node=config.cluster.node, lease=config.cluster.lease,
                  reactor=reactor).open()
        except Exception as e:
            raise usercheck.Problem(f"{where}: {e} (the spool file and its directory must "
                                    "be writable by this user)") from None

    def files() -> None:
        if config.tls.enabled:
            usercheck.check_readable(config.tls.certificate, f"{config.path}: [tls] certificate")
            usercheck.check_readable(config.tls.private_key, f"{config.path}: [tls] private_key")
        if config.auth.enabled:
            usercheck.check_readable(config.auth.users_file, f"{config.path}: [auth] users_file")

    imports = usercheck.daemon_imports()
    problem = usercheck.run_as_user(
        uid, gid, [spool, files, lambda: usercheck.check_imports(imports)], euid=euid)
    if problem is not None:
        _die(f"as uid {uid} gid {gid} (twistd --uid/--gid): {problem}")
    log.info("startup checks as uid {uid} gid {gid} passed: spool writable, "
             "{n} imports, files readable", uid=uid, gid=gid, n=len(imports))


def _chown_spool(options: Options, url: str) -> None:
    """When twistd is to drop privileges (``--uid``/``--gid``, run as root), the
    spool must belong to that user: the database and its -wal/-shm/-journal
    files, its -lock and -wake (mta.spool), and the directory they are in (SQLite creates those files there)
    when it holds nothing else.  makeService runs as root, before the switch."""
    target = _target_user(options)
    if target is None:
        return
    uid, gid, _euid = target
    from sqlalchemy.engine import make_url
    u = make_url(url)
    if u.get_backend_name() != "sqlite" or not u.database:
        return
    db = os.path.abspath(u.database)
    directory = os.path.dirname(db)
    base = os.path.basename(db)
    owner, group = _chown_ids(uid, gid)
    try:
        # SQLite's files, and mta.spool's write lock and wake-up directory.
        for suffix in ("", "-wal", "-shm", "-journal", "-lock", "-wake"):
            if os.path.exists(db + suffix):
                os.chown(db + suffix, owner, group)
        entries = os.listdir(directory)
        if all(e == base or e.startswith(base + "-") for e in entries):
            os.chown(directory, owner, group)
        else:
            st = os.stat(directory)
            if uid is not None and st.st_uid != uid and not st.st_mode & 0o002:
                log.warn("spool directory {dir} holds other files, so it was not given to "
                         "uid {uid}; unless that user can write there (chown {uid}:{gid} "
                         "{dir}), SQLite cannot create its -wal/-shm files",
                         dir=directory, uid=uid, gid=gid if gid is not None else "")
    except OSError as e:
        _die(f"{url}: cannot give the spool to uid {uid} gid {gid}: {e.strerror}: "
             f"{e.filename}")
    log.info("spool {db} belongs to uid {uid} gid {gid}", db=db, uid=uid, gid=gid)


def _listener(description: str, where: str, factory: Any, reactor: Any, tls: Any, *,
              submission: bool, shared: list[_ListenService] | None = None) -> _ListenService:
    """A listening SMTP service (see :func:`_serve`)."""
    return _serve(description, where, reactor, tls,
                  lambda implicit: factory.listener(submission=submission,
                                                    implicit_tls=implicit), shared=shared)


def _serve(description: str, where: str, reactor: Any, tls: Any,
           build: Callable[[bool], Any],
           shared: list[_ListenService] | None = None) -> _ListenService:
    """A listening service for the session factory ``build(implicit_tls)``.
    ``ssl:`` strings without their own privateKey= listen on the matching
    tcp: endpoint with TLS from the [tls] certificate (reloadable), wrapped
    around the session factory.  With *shared* (``[server] workers`` > 1)
    the endpoint is a mta.workers.SharedEndpoint, and the service is
    appended to *shared* for the supervisor to bind."""
    try:
        tcp = implicit_tls_endpoint(description)
    except ValueError as e:
        _die(f"{where}: {description}: {e}")
    implicit = tcp is not None or description.startswith("ssl:")
    session_factory = build(implicit)
    if tcp is not None and tls is None:
        _die(f"{where}: {description}: implicit TLS needs [tls] certificate and private_key")
    endpoint = endpoints.serverFromString(reactor, tcp or description)
    if shared is not None:
        if not isinstance(endpoint, (endpoints.TCP4ServerEndpoint, endpoints.TCP6ServerEndpoint,
                                     endpoints.UNIXServerEndpoint)):
            _die(f"{where}: {description}: [server] workers > 1 can share only tcp:, tcp6:, "
                 "unix: and ssl: with the [tls] certificate")
        from .workers import SharedEndpoint
        endpoint = SharedEndpoint(reactor, endpoint)
    if tcp is None:
        service_ = _ListenService(description, where, session_factory, reactor,
                                  endpoint=endpoint)
    else:
        from twisted.protocols.tls import TLSMemoryBIOFactory
        wrapped = TLSMemoryBIOFactory(tls, False, session_factory)
        service_ = _ListenService(description, where, wrapped, reactor, endpoint=endpoint)
    if shared is not None:
        shared.append(service_)
    return service_


def _atrn_listener(description: str, config: Config, factory: Any, runner: Any,
                   reactor: Any, tls: Any,
                   shared: list[_ListenService] | None = None) -> _ListenService:
    """An ODMR listener (``[gateway] atrn_listen``, RFC 2645): sessions of
    mta.smtp.odmr sharing the SMTP server factory; an ATRN hands the mail
    over through the queue runner's ``deliver_over``, with a TurnedCourier
    over the turned connection."""
    from .delivery.smtp_courier import TurnedCourier
    from .smtp.odmr import ODMRFactory, Turn

    where = f"{config.path}: [gateway] atrn_listen"
    if runner is None:
        _die(f"{where}: ATRN hands over the queue, but [relay] deliver = false runs no "
             "queue runner (hold the domains instead: they are never attempted)")
    hostname = config.server.hostname

    def atrn(domains: Any, turn: Turn) -> defer.Deferred:
        async def courier(n: int) -> TurnedCourier:
            return TurnedCourier(await turn(n), hostname=hostname)
        return runner.deliver_over(domains, courier)

    return _serve(description, where, reactor, tls,
                  lambda implicit: ODMRFactory(factory, grants=config.gateway.atrn_domains,
                                               atrn=atrn, timeouts=config.relay.timeouts,
                                               implicit_tls=implicit), shared=shared)


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


def local_directory(config: Config) -> LocalDirectory:
    """The local domains and users (mta.local.directory) of *config*."""
    from .local.directory import LocalDirectory

    local = config.local
    return LocalDirectory(
        hostname=config.server.hostname, domains=local.domains if local else (),
        aliases=local.aliases if local else None, mailboxes=local.mailboxes if local else None,
        configured=local is not None, routed=[name for name, _ in config.routes])


def _local_courier(config: Config, reactor: Any, directory: LocalDirectory) -> Courier:
    from .config import LocalConfig
    from .delivery.local_courier import LocalCourier
    from .local.lmtp import LMTPClient

    local = config.local or LocalConfig()
    lmtp = (LMTPClient(reactor, local.lmtp, lhlo_name=config.server.hostname,
                       timeouts=config.relay.timeouts) if local.lmtp else None)
    return LocalCourier(directory, maildir=local.maildir, hostname=config.server.hostname,
                        reactor=reactor, lmtp=lmtp)


def _etrn_handler(runner: QueueRunner) -> EtrnHandler:
    """ETRN (mta.smtp.server) starts the runner's flush of the domain."""
    from .smtp.server import EtrnStarted

    def etrn(domain: str, subdomains: bool, client: str) -> defer.Deferred[EtrnStarted]:
        already = runner.flush_under_way(domain, subdomains)
        d = runner.flush_domain(domain, subdomains, how=f"ETRN from {client}")
        return d.addCallback(lambda rel: EtrnStarted(rel.messages, rel.recipients,
                                                     rel.domains, already))
    return etrn


#: Seconds between the queue runner's polls of a spool that cannot notify
#: (SQLite); on PostgreSQL LISTEN/NOTIFY wakes it and ``[cluster] poll`` is
#: the fallback.
POLL = 1.0


def _make_runner(config: Config, spool: DeliveryQueue, reactor: Any,
                 directory: LocalDirectory | None = None,
                 metrics: Any = None, poll_interval: float = POLL) -> QueueRunner:
    from .delivery.hold_courier import HoldCourier
    from .delivery.router import Router
    from .delivery.scheduler import QueueRunner
    from .delivery.smtp_courier import SMTPCourier
    from .delivery.types import HOLD_COURIER
    from .smtp.pool import ConnectionPool

    relay = config.relay
    if directory is None:
        directory = local_directory(config)
    trust_root, credentials = _relay_tls_auth(config)
    # The values were validated by mta.config (with the router's own parsers).
    router = Router(smarthost=relay.smarthost, routes=config.routes,
                    nameservers=config.dns.nameservers, reactor=reactor, port=relay.port,
                    timeout=(max(1, round(config.dns.timeout)),),
                    tls=relay.tls, route_tls=config.route_tls, smarthost_auth=credentials,
                    is_local=directory.is_local, hold_domains=config.gateway.hold_domains)
    # Cache as many idle connections per next hop as can be busy at once (with a
    # smarthost every delivery goes to one host), so none is closed and reopened
    # under steady load just for want of room in the cache.
    pool = ConnectionPool(helo_name=config.server.hostname, reactor=reactor,
                          timeouts=relay.timeouts,
                          max_idle_per_host=max(4, relay.concurrency), trust_root=trust_root)
    smtp = SMTPCourier(router, pool, hostname=config.server.hostname)
    couriers = {"smtp": smtp, "local": _local_courier(config, reactor, directory),
                HOLD_COURIER: HoldCourier(hostname=config.server.hostname)}
    return QueueRunner(spool, router, couriers, hostname=config.server.hostname,
                       retry=config.retry, relay=relay, reactor=reactor,
                       poll_interval=poll_interval, lease=config.cluster.lease, metrics=metrics,
                       fresh_connections=smtp.fresh_connections)


def _relay_tls_auth(config: Config) -> tuple[Any, Any]:
    """(trust root for TLS policy "verify", smarthost Credentials), each None
    when not configured.  An unreadable CA or password file stops startup
    with one line naming the key."""
    from .delivery.types import Credentials
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
