"""``[server] workers`` > 1: one supervising process and N forked workers.

The supervisor is twistd's process.  In privilegedStartService (still
root under ``--uid``, before any thread is started and before the reactor
runs) it binds every listener (:class:`SharedEndpoint`), then forks the
workers.  Each worker continues through twistd's normal startup with the
daemon's service tree (built by mta.tap, never started in the supervisor):
its listeners adopt the bound sockets instead of binding, its spool gets
its own node name at start (mta.spool.node: the configured ``[cluster]
node``, else one generated per process), so the workers share the spool as
Step 8's nodes do -- with *roles* only the delivering worker claims, so a
configured name stays one node.  The supervisor's own tree only supervises:

* SIGTERM/SIGINT: each worker gets SIGTERM and stops as a single daemon
  does; the supervisor exits once all of them have exited;
* SIGHUP is forwarded to every worker;
* a worker that exits while the supervisor is not stopping is logged and
  forked again, after a delay that doubles while workers keep dying young;
* a worker dies with its supervisor (PR_SET_PDEATHSIG), so a kill -9 of
  the supervisor leaves no worker holding the port or the spool.

With *roles* (a daemon that both accepts and delivers), the work is split:
worker 1 delivers (the queue runner, its wake-ups, the ATRN listeners) and
the others accept (the SMTP and submission listeners); each drops the
other role's services from its tree before it starts.  A message an
accepting worker stores rings the delivering one (mta.spool.doorbell on
SQLite, NOTIFY on PostgreSQL).  Why split rather than N workers that each
do everything: on one SQLite file the N group-commit writers take turns at
the one write lock, and a session's ``250`` waits behind deliveries on the
same reactor thread; split, the accepting workers' commits are the
messages alone and their reactors do nothing but SMTP (README
"Benchmarks").

A worker forked again later is forked from a running reactor: the child
gets a reactor state of its own (:func:`_own_reactor`) before it starts.
"""
from __future__ import annotations

import ctypes
import os
import select
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from twisted.application import service
from twisted.internet import defer, protocol, task
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from . import gctune

log = Logger(namespace="mta")

_PR_SET_PDEATHSIG = 1


class SharedListener(Protocol):
    """A listening service whose socket the supervisor binds (mta.tap)."""

    def bind_shared(self) -> None: ...


@dataclass(frozen=True)
class Roles:
    """The services only the delivering worker runs (*deliver*) and those
    only the accepting workers run (*accept*): see the module docstring."""
    deliver: tuple[service.IService, ...]
    accept: tuple[service.IService, ...]


class _Held(protocol.Factory):
    """The supervisor's factory on a shared socket: it never accepts."""
    noisy = False

    def logPrefix(self) -> str:
        return "shared listener"


@implementer(IStreamServerEndpoint)
class SharedEndpoint:
    """A server endpoint bound once by the supervisor (:meth:`bind`) and
    adopted by each worker (:meth:`listen`, reactor.adoptStreamPort)."""

    def __init__(self, reactor: Any, endpoint: Any):
        self.reactor = reactor
        self.endpoint = endpoint
        self._port: Any = None

    def bind(self) -> defer.Deferred:
        """Listen with a placeholder factory and stop reading at once: the
        supervisor holds the socket, the workers accept on it."""
        d = self.endpoint.listen(_Held())
        d.addCallback(self._bound)
        return d

    def _bound(self, port: Any) -> None:
        port.stopReading()
        self._port = port

    def listen(self, factory: Any) -> defer.Deferred:
        assert self._port is not None, "bind() first, in the supervisor"
        port = self.reactor.adoptStreamPort(self._port.fileno(), self._port.addressFamily,
                                            factory)
        return defer.succeed(port)


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when its parent dies (Linux prctl)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:       # died before the prctl took effect
        os._exit(1)


def _own_reactor(reactor: Any) -> None:
    """After fork: a poller and a waker of this process's own.  The epoll
    instance and the waker pipe are shared with the parent across fork; a
    registration made here would change the supervisor's poller."""
    poller = getattr(reactor, "_poller", None)
    if poller is not None:
        if isinstance(poller, getattr(select, "epoll", ())):
            poller.close()           # this process's descriptor only
            reactor._poller = select.epoll(1024)
        else:
            reactor._poller = type(poller)()
    for name in ("_reads", "_writes", "_selectables"):
        getattr(reactor, name, {}).clear()
    running = reactor.running
    if running:                      # the SIGCHLD waker: the parent's pipe
        reactor._signals.uninstall()
    waker = getattr(reactor, "waker", None)
    if waker is not None:
        reactor._internalReaders.discard(waker)
        for fd in (getattr(waker, "i", -1), getattr(waker, "o", -1)):
            if fd != -1:
                try:
                    os.close(fd)
                except OSError:
                    pass
        reactor.waker = None
        reactor.installWaker()
    # Whatever else the reactor had registered belongs to the parent.
    reactor._internalReaders.intersection_update({reactor.waker})
    for call in reactor.getDelayedCalls():
        call.cancel()
    if running:
        reactor._signals.install()


class WorkerSupervisor(service.Service):
    """Forks *count* workers, each running *tree* on the *listeners*'
    shared sockets (see the module docstring).  In a worker this service
    stands for *tree*; in the supervisor it owns the workers.  *lines* logs
    the supervisor's start and "stopping" lines; *twistd* is twistd's
    options (a worker must not remove the pid file nor report startup);
    *on_exit* is called in the supervisor with the pid of each worker that
    exited, *on_stopped* once all of them have (the shared metrics)."""

    name = "workers"
    poll = 0.1                  # seconds between checks for exited workers
    restart_delay = 1.0         # first delay before a dead worker is forked again
    max_restart_delay = 30.0
    young = 10.0                # a worker that lived less than this died young

    def __init__(self, tree: service.IService, listeners: list[SharedListener], count: int, *,
                 reactor: Any, lines: service.IService, node: Callable[[], str],
                 twistd: Any = None, roles: Roles | None = None,
                 on_exit: Callable[[int], None] | None = None,
                 on_stopped: Callable[[], None] | None = None):
        self.tree = tree
        self.roles = roles
        self.listeners = listeners
        self.count = count
        self.reactor = reactor
        self.lines = lines
        self.node = node
        self.twistd = twistd
        self.on_exit = on_exit
        self.on_stopped = on_stopped
        self.worker: int | None = None          # in a worker: its number (1..count)
        self._supervisor = os.getpid()
        self._pids: dict[int, int] = {}          # pid -> worker number
        self._born: dict[int, float] = {}        # worker number -> fork time
        self._delay: dict[int, float] = {}       # worker number -> next restart delay
        self._pending: dict[int, Any] = {}       # worker number -> scheduled restart
        self._stopping = False
        self._all_gone: defer.Deferred | None = None
        self._reap = task.LoopingCall(self._check)
        self._reap.clock = reactor
        self._previous_hup: Any = None

    # -- startup --------------------------------------------------------------
    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        for listener in self.listeners:
            listener.bind_shared()
        self._supervisor = os.getpid()
        # Before the fork, so that the start-up heap, frozen, stays shared:
        # the workers' collections never touch (and so never copy) it.
        gctune.settle()
        for number in range(1, self.count + 1):
            if self._fork(number):
                return                          # this process is worker *number*

    def _fork(self, number: int) -> bool:
        """Fork worker *number*; True in the worker."""
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        pid = os.fork()
        if pid == 0:
            self._become(number)
            return True
        self._pids[pid] = number
        self._born[number] = time.monotonic()
        return False

    def _become(self, number: int) -> None:
        self.worker = number
        _die_with_parent(self._supervisor)
        running = self.reactor.running
        _own_reactor(self.reactor)
        self._pids.clear()
        if self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
        if self.twistd is not None:             # twistd's job, the supervisor's
            self.twistd["pidfile"] = ""
            self.twistd["statusPipe"] = None
        if self.roles is not None:
            drop = self.roles.accept if self.delivers else self.roles.deliver
            for part in drop:
                part.disownServiceParent()
        self.tree.privilegedStartService()
        if running:                             # forked again: start now
            self._start_worker()

    def startService(self) -> None:
        super().startService()
        if self.worker is not None:
            self._start_worker()
            return
        try:
            self._previous_hup = signal.signal(signal.SIGHUP, self._on_hangup)
        except ValueError:                      # not the main thread (tests)
            pass
        self._reap.start(self.poll, now=False)
        self.lines.startService()

    @property
    def delivers(self) -> bool:
        """In a worker with *roles*: whether it is the delivering one."""
        return self.worker == 1

    def _start_worker(self) -> None:
        self.tree.startService()
        role = "" if self.roles is None else \
            (" (delivering)" if self.delivers else " (accepting)")
        log.info("mta worker {n} of {count}{role} started: pid {pid}, node {node}",
                 n=self.worker, count=self.count, role=role, pid=os.getpid(), node=self.node())

    # -- supervision ----------------------------------------------------------
    def _on_hangup(self, signum: int, frame: Any) -> None:
        for pid in list(self._pids):
            try:
                os.kill(pid, signal.SIGHUP)
            except ProcessLookupError:
                pass

    def _check(self) -> None:
        for pid, number in list(self._pids.items()):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done == 0:
                continue
            del self._pids[pid]
            if self.on_exit is not None:
                self.on_exit(pid)
            self._exited(pid, number, status)
        if self._stopping and not self._pids and self._all_gone is not None:
            d, self._all_gone = self._all_gone, None
            self._reap.stop()
            d.callback(None)

    def _exited(self, pid: int, number: int, status: int) -> None:
        if os.WIFSIGNALED(status):
            how = f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
        else:
            how = f"exit status {os.waitstatus_to_exitcode(status)}"
        if self._stopping:
            log.info("mta worker {n} (pid {pid}) stopped: {how}", n=number, pid=pid, how=how)
            return
        lived = time.monotonic() - self._born.get(number, 0.0)
        delay = self._delay.get(number, self.restart_delay) if lived < self.young \
            else self.restart_delay
        self._delay[number] = min(delay * 2, self.max_restart_delay)
        log.warn("mta worker {n} (pid {pid}) died ({how}); forking it again in {delay:g}s",
                 n=number, pid=pid, how=how, delay=delay)
        self._pending[number] = self.reactor.callLater(delay, self._restart, number)

    def _restart(self, number: int) -> None:
        del self._pending[number]
        if self._stopping:
            return
        self._fork(number)

    # -- stop -----------------------------------------------------------------
    def stopService(self) -> defer.Deferred | None:
        super().stopService()
        if self.worker is not None:
            return self.tree.stopService()
        self.lines.stopService()                # "mta stopping"
        self._stopping = True
        for call in self._pending.values():
            call.cancel()
        self._pending.clear()
        if self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
        for pid in list(self._pids):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        d: defer.Deferred = defer.Deferred()
        if not self._pids:
            d.callback(None)
        else:
            self._all_gone = d
        if self.on_stopped is not None:
            d.addCallback(lambda _: self.on_stopped())
        return d.addCallback(lambda _: log.info("mta stopped"))
