"""The queue runner: takes due recipients from the spool, asks the router
for each one's route (courier and destination), hands each group to its
courier (mta.delivery.types.Courier: SMTP relay, local delivery), and
records the Outcome of each recipient.

* new messages are attempted at once (the server kicks the runner after each
  commit), deferred recipients when their ``next_attempt`` is due;
* Outcome ``delivered`` → delivered; ``permanent`` → failed, with an RFC
  3464 bounce; ``temporary`` → deferred with :func:`backoff`, until
  ``lifetime`` runs out (then failed, status 4.4.7).  The kind is decided
  once, by the courier's Outcome (``reply_kind`` of the reply code);
* the outcome, the DSNs it owes and the removal of finished messages are
  written in one transaction, so a message leaves the spool only when every
  recipient is final and every DSN it owes is spooled;
* a message from ``<>`` never gets a DSN (a failed bounce is logged and
  dropped, or reported to ``[relay] postmaster`` when that is set);
* NOTIFY=SUCCESS (RFC 3461 §6.2.7): a next hop that offers DSN got the
  parameters and takes over the duty (``Outcome.dsn_passed``), so we report
  nothing; one without DSN gets ``Action: relayed`` from us (``delivered``
  is for final delivery: ``Outcome.final``);
* one report of each kind (failure, delay, success) per message and queue
  pass, even when its recipients went to several next hops in several jobs:
  see :class:`_Reports`;
* ATRN (RFC 2645): :meth:`QueueRunner.deliver_over` claims the pending
  recipients of some domains and hands them to a one-off courier over the
  customer's own connection, recording the outcomes like any job's.

Hold domains (``[gateway] hold_domains``; mta.delivery.hold_courier): the
router routes them to the ``"hold"`` courier, which defers them without a
connection, so their lifetime and delay warnings run as for any mail.  A
release (:meth:`QueueRunner.flush_domain` for ETRN, ``mta queue flush
--domain``: DeliveryQueue.release, QueueAdmin.release_domain) makes a
domain's pending recipients due now and marks them released: this runner
relays a released recipient of a hold domain, that once, by ``"smtp"``
(``RouteMap.relay_route``), on a connection opened after the release (the
``fresh_connections`` hook: the SMTP courier does not reuse one cached
before).  A domain whose flush is under way is not flushed again.

Delivery is at least once: a claimed recipient is this node's for one
lease (``[cluster] lease``), renewed every third of it while deliveries
run; recipients in flight when the process dies are attempted again by
whichever node finds their lease expired, or by this one at its restart
(see README).  Within one process a
delivery happens once: a result the spool refuses (disk full, a read-only
file, a lock held past the busy timeout) is kept and written again until the
spool takes it, its recipients staying in flight -- claimed by nobody --
meanwhile.  A pass claims only what can start at once (free delivery slots,
per destination too); the rest stays queued or deferred, where ``mta queue``
sees and flushes it.
"""
from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Awaitable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from .. import domain as dom
from ..address import domain_key
from ..config import RelayConfig, RetryConfig
from ..message import InboundMessage
from ..spool import SpoolWriteError, ops
from ..spool.faults import RepeatedFailures, describe
from ..spool.interface import DeliveryQueue, Release, is_released
from .reports import dsn_messages, forwarded_copy, notify_allows
from .types import (HOLD_COURIER, Courier, Outcome, QueuedMessage, QueuedRecipient, Route,
                    RouteMap)

log = Logger(namespace="mta.delivery")

# A spool write that failed (recovery at start, a delivery result) is tried
# again after RETRY_FIRST seconds, doubling up to RETRY_MAX.
RETRY_FIRST = 1.0
RETRY_MAX = 30.0

# An ATRN that comes while the runner recovers at its start waits this long
# (seconds) for the recovery before it is answered 451.
RECOVERY_WAIT = 10.0

# A queue pass reads SCAN_PER_SLOT due recipients per free delivery slot
# (of SCAN_FIRST_SLOTS at most at first), SCAN_GROWTH times more while that
# leaves slots free and more is due, at most [relay] recipient_limit per slot.
SCAN_PER_SLOT = 4
SCAN_GROWTH = 4
SCAN_FIRST_SLOTS = 4
# Transactions claimed per delivery slot: the one in delivery and AHEAD more
# waiting for it (claimed and loaded), so that a connection goes on with the
# next message the moment it has an answer, without waiting for a queue
# pass (a read, a claim) in between.  Only messages of AHEAD_SIZE octets at
# most wait so (in memory): a bigger one is claimed when a slot is free.
# In flight at most: [relay] concurrency x (1 + AHEAD) transactions,
# per_destination x (1 + AHEAD) to one destination.
AHEAD = 1
AHEAD_SIZE = 256 * 1024


def backoff(attempts: int, first: float, maximum: float, rand: float = 0.5) -> float:
    """Seconds to wait after the *attempts*-th failed attempt (1 = the first):
    ``first``, doubling each time, capped at ``maximum``, with ±10 % jitter
    (``rand`` in [0, 1)).  A pure function, so tests need no clock."""
    base = min(first * (2 ** min(max(attempts, 1) - 1, 40)), maximum)
    return base * (0.9 + 0.2 * rand)


# The status label of mta_delivery_recipients_total for each outcome.
_METRIC_STATUS = {"sent": "delivered", "deferred": "deferred", "bounced": "bounced",
                  "expired": "bounced"}


@dataclass
class _Reports:
    """What one message owes in DSNs from one queue pass, shared by its jobs
    (one per next hop and recipient_limit slice), so that the sender gets one
    report of each kind however its recipients were split.

    A job records the recipients that owe nothing at once; those that owe a
    report are *held* here, still ``inflight`` in the spool, and the last
    job of the message to finish writes them together with the DSNs, in the
    same transaction (record_results), which is also the only one that can
    remove the message.  So a crash loses no owed DSN (the held recipients
    are attempted again after the restart, as any in flight are), and a
    message never leaves the spool before its DSNs are in it."""
    jobs: int = 0                                   # jobs of the message not finished
    report: dict[str, list] = field(default_factory=lambda: defaultdict(list))
    held: list[ops.RecipientUpdate] = field(default_factory=list)
    held_forwards: list[InboundMessage] = field(default_factory=list)  # of held recipients

    def take(self) -> tuple[list[ops.RecipientUpdate], list[InboundMessage], dict[str, list]]:
        held, forwards, report = self.held, self.held_forwards, self.report
        self.held, self.held_forwards, self.report = [], [], defaultdict(list)
        return held, forwards, report


@dataclass
class Job:
    queue_id: str
    domain: str                 # of the first recipient (for the log)
    message: QueuedMessage
    rcpts: list[QueuedRecipient] = field(default_factory=list)
    route: Route = Route("smtp", "")   # the courier, and the concurrency key
    attempting: bool = False    # has a delivery slot and is under way
    recording: bool = False     # writing its outcome: not to be cancelled
    reports: _Reports = field(default_factory=lambda: _Reports(jobs=1))
    reported: bool = False      # has taken its share of `reports` (done or gone)


@dataclass(eq=False)
class _Flush:
    """One flush by :meth:`QueueRunner.flush_domain` (one ETRN argument),
    started at *at*: *result* is its Release once the spool made the
    recipients due (the *waiters* get it, or the *failure*); it is over
    once none of its domains is being flushed any more."""
    at: float
    result: Release | None = None
    failure: Failure | None = None
    waiters: list[defer.Deferred] = field(default_factory=list)


@dataclass(eq=False)
class _Unrecorded:
    """The result of *job* that the spool refused (the arguments of
    DeliveryQueue.record): kept, and written again until it is recorded or
    the stop gives up on it; *done* fires then, and the job ends."""
    job: Job
    args: tuple
    done: defer.Deferred = field(default_factory=defer.Deferred)
    writing: bool = False       # a write of it is under way
    final: bool = False         # its last try (at the stop) was made


class QueueRunner(service.Service):
    name = "queue-runner"

    """``router`` answers each recipient's Route (``route_for(domain)``,
    mta.delivery.types.RouteMap); ``couriers`` maps a Route's courier name
    to the Courier that delivers it.  The router's ``close()`` and every
    courier's are called at the stop.

    ``fresh_connections(domain, since)``: called when a flush of *domain*
    starts (SMTPCourier.fresh_connections): its deliveries must use
    connections opened at *since* or later (ETRN: a new connection)."""

    def __init__(self, spool: DeliveryQueue, router: RouteMap, couriers: Mapping[str, Courier], *,
                 hostname: str, retry: RetryConfig, relay: RelayConfig, reactor: Any,
                 rand: Callable[[], float] = random.random, poll_interval: float = 1.0,
                 lease: float = 300.0,
                 dsn_builder: Callable[..., bytes] | None = None, metrics: Any = None,
                 fresh_connections: Callable[[str, float], None] | None = None):
        self.spool = spool
        self.router = router
        self.couriers: dict[str, Courier] = dict(couriers)
        self.hostname = hostname
        self.retry = retry
        self.relay = relay
        self.reactor = reactor
        self.rand = rand
        self.poll_interval = poll_interval
        self.renew_interval = lease / 3   # the claims' leases are renewed this often
        self._renew_loop: task.LoopingCall | None = None
        self._renewing = False
        self._handovers = 0                # ATRN deliveries under way (not in _jobs)
        self._renew_trouble = RepeatedFailures(
            log, reactor, what="renewing the leases of the recipients in delivery",
            consequence="tried again at the next renewal; once a lease has run out another "
            "node may deliver its recipient too", level=LogLevel.warn)
        self._dsn_builder = dsn_builder
        self._global = defer.DeferredSemaphore(relay.concurrency)
        self._per_dest: dict[Route, defer.DeferredSemaphore] = {}
        self._running = False
        self._again = False
        self._loop: task.LoopingCall | None = None
        self._jobs: dict[defer.Deferred, Job] = {}
        self._run_d: defer.Deferred | None = None        # a queue run in progress
        self.shutdown_grace = relay.shutdown_grace
        self.metrics = metrics                            # mta.metrics.Metrics or None
        self.ready: defer.Deferred = defer.Deferred()   # fires once recovery is done
        self._recovered = False
        self._recover_call: Any = None       # the next try of a failed recovery
        self._recover_tries = 0
        self._recover_trouble = RepeatedFailures(
            log, reactor, what="recovering the recipients in flight at the last stop",
            consequence="no delivery starts until it succeeds "
            f"(tried again every {RETRY_MAX:.0f}s at most)", level=LogLevel.warn)
        self._run_trouble = RepeatedFailures(
            log, reactor, what="a queue run", consequence="tried again at the next queue run",
            level=LogLevel.warn)
        self._unrecorded: list[_Unrecorded] = []  # results the spool refused, oldest first
        self._record_call: Any = None        # the next round of writing them again
        self._record_rounds = 0
        self._record_trouble = RepeatedFailures(
            log, reactor, what="recording delivery results",
            consequence="the results are kept and written again (every "
            f"{RETRY_MAX:.0f}s at most); their recipients stay in flight meanwhile",
            level=LogLevel.warn)
        self._grace_over = False             # stopping, and the grace has run out
        # Flushes (ETRN, mta queue flush --domain): the domains being flushed
        # (domain key -> since when) and the flushes asked for, by argument.
        self._fresh_connections = fresh_connections
        self._flushing: dict[str, float] = {}
        self._flushes: dict[tuple[str, bool], _Flush] = {}

    # -- lifecycle -------------------------------------------------------------
    def startService(self) -> None:
        super().startService()
        self._grace_over = False
        self._recover()

    def _recover(self) -> None:
        """Requeue what was in flight at the last stop; until that succeeded
        (a spool locked or read-only at start) it is tried again, with a
        backoff, and no delivery starts."""
        self._recover_call = None
        if not self.running or self._recovered:
            return
        d = self.spool.recover_inflight(self.reactor.seconds())
        d.addCallbacks(self._recovered_cb, self._recover_failed)
        d.addErrback(lambda f: log.failure("starting the queue runner failed", f))

    def _recover_failed(self, f: Any) -> None:
        self._recover_tries += 1
        self._recover_trouble.failed(describe(f.value))
        if self.running:
            delay = backoff(self._recover_tries, RETRY_FIRST, RETRY_MAX, self.rand())
            self._recover_call = self.reactor.callLater(delay, self._recover)

    def _recovered_cb(self, n: int) -> None:
        self._recover_trouble.succeeded()
        if n:
            log.info("requeued {n} recipients that were in flight at the last stop", n=n)
        self._recovered = True
        if not self.running:
            return
        self._loop = task.LoopingCall(self.kick)
        self._loop.clock = self.reactor
        self._loop.start(self.poll_interval, now=True)
        self._renew_loop = task.LoopingCall(self._renew)
        self._renew_loop.clock = self.reactor
        self._renew_loop.start(self.renew_interval, now=False)
        self.ready.callback(None)

    def _renew(self) -> None:
        """Renew the leases of this node's claims (all of them, in one
        write), while it has any: deliveries under way, results waiting to
        be written."""
        if self._renewing or not (self._jobs or self._unrecorded or self._handovers):
            return
        self._renewing = True

        def done(result: Any) -> None:
            self._renewing = False
            if isinstance(result, Failure):
                self._renew_trouble.failed(describe(result.value))
            else:
                self._renew_trouble.succeeded()
        self.spool.renew(self.reactor.seconds()).addBoth(done)

    def stopService(self) -> defer.Deferred | None:
        """No new deliveries start; those in progress may finish within
        ``[relay] shutdown_grace`` seconds, then they are cancelled (their
        connections aborted).  The recipients of every cancelled or unstarted
        delivery are queued again before this fires, so the spool (which the
        service tree stops after the runner) must still be up; a result that
        is being written is always let through.  A result the spool refused
        earlier gets one last try now; if that fails, or has not answered
        when the grace is over, its recipients are logged: they stay in
        flight, and are attempted again at the next start."""
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._recover_call is not None and self._recover_call.active():
            self._recover_call.cancel()
        self._recover_call = None
        if self._record_call is not None and self._record_call.active():
            self._record_call.cancel()
        self._record_call = None
        if self._unrecorded:
            log.info("stopping: {n} delivery result(s) the spool refused so far get one last try",
                     n=len(self._unrecorded))
            for entry in list(self._unrecorded):
                if not entry.writing:
                    self._last_try(entry)
        jobs = dict(self._jobs)
        for d, job in jobs.items():
            if not job.attempting and not d.called:  # waiting for a delivery slot: not now
                d.cancel()
        busy = [job for job in jobs.values() if job.attempting]
        waits = list(jobs)
        if self._run_d is not None:      # a claim in progress: its rows are queued again
            waits.append(self._run_d)
        timer = None
        if busy:
            log.info("stopping: waiting up to {grace}s for {n} deliveries in progress",
                     grace=self.shutdown_grace, n=len(busy))

            def expire() -> None:
                self._grace_over = True
                for entry in list(self._unrecorded):
                    self._abandon(entry, f"not recorded within the shutdown grace "
                                         f"({self.shutdown_grace:g}s; its last write may still "
                                         "succeed)")
                left = [(d, job) for d, job in self._jobs.items()
                        if not job.recording and not d.called]
                if left:
                    log.info("stopping: cancelling {n} deliveries still in progress after "
                             "{grace}s", n=len(left), grace=self.shutdown_grace)
                for d, _job in left:
                    d.cancel()
            if self.shutdown_grace > 0:
                timer = self.reactor.callLater(self.shutdown_grace, expire)
            else:
                expire()

        def finished(_: Any) -> Any:
            if timer is not None and timer.active():
                timer.cancel()
            if self._renew_loop is not None and self._renew_loop.running:
                self._renew_loop.stop()     # nothing of ours is in delivery any more
            for trouble in (self._recover_trouble, self._run_trouble, self._record_trouble,
                            self._renew_trouble):
                trouble.close()
            return defer.DeferredList([defer.maybeDeferred(c.close)
                                       for c in self.couriers.values()], consumeErrors=True)
        d = defer.DeferredList(waits, consumeErrors=True)
        d.addBoth(finished)
        d.addBoth(lambda _: self.router.close())
        return d

    def kick(self, *_: Any) -> None:
        """Look for due work now (called on a timer and after each new message)."""
        if not self.running or not self._recovered:
            return
        if self._running:
            self._again = True
            return
        self._running = True
        d = defer.Deferred.fromCoroutine(self._run_once())
        # A spool write that failed was logged by the spool (one line per
        # distinct failure); anything else is a bug worth its traceback.
        d.addErrback(lambda f: None if f.check(SpoolWriteError) else log.failure("queue run failed", f))
        self._run_d = d
        d.addBoth(self._after_run)

    def _after_run(self, _: Any) -> None:
        self._running = False
        self._run_d = None
        if self._again:
            self._again = False
            self.reactor.callLater(0, self.kick)

    # -- one pass over the due work ---------------------------------------------
    async def _run_once(self) -> None:
        """Claim the due recipients that can be attempted now -- as many
        transactions as there are free delivery slots, within each
        destination's own limit -- and start them.  The rest is not touched:
        it stays queued or deferred (visible to ``mta queue``) for the next
        pass, which the end of every delivery starts."""
        free = self.relay.concurrency * (1 + AHEAD) - len(self._jobs)
        if free <= 0:
            return
        now = self.reactor.seconds()
        # Read a few due rows per free slot (of SCAN_FIRST_SLOTS at first) --
        # enough when each message has a recipient or a few -- and more (up
        # to a full transaction per slot) only when that did not fill the
        # slots: a pass costs what it starts, not the size of the backlog
        # (nor, when one busy destination frees one slot at a time, the
        # number of slots the others have free).
        most = free * self.relay.recipient_limit
        scan = min(min(free, SCAN_FIRST_SLOTS) * SCAN_PER_SLOT, most)
        # The domains of destinations with no slot free are left out of the
        # read (in SQL): under a backlog to one destination (a smarthost)
        # the pass would otherwise read and drop those rows every time.
        skip = self._saturated_domains()
        read: dict[int, QueuedRecipient] = {}      # every row read in this pass
        while True:
            try:
                rows = await self.spool.due(now, scan, sorted(skip))
            except Exception as e:
                self._run_trouble.failed(describe(e))
                return
            for r in rows:
                read.setdefault(r.id, r)
            due = list(read.values())
            plan, full = self._plan(due, free)
            if len(plan) >= free or len(rows) < scan or scan >= most:
                break
            # Read further, leaving out the domains this plan fills.
            skip |= self._saturated_domains(due, full)
            scan = min(scan * SCAN_GROWTH, most)
        self._track_flushes(due, complete=len(rows) < scan, since=now, unseen=skip)
        if not plan:
            self._run_trouble.succeeded()
            return
        try:
            rows, msgs = await self.spool.claim_and_load(
                [r.id for _d, part in plan for r in part], now)
        except SpoolWriteError:
            return             # logged by the spool; tried again at the next queue run
        except Exception as e:
            self._run_trouble.failed(describe(e))
            return
        self._run_trouble.succeeded()
        if not rows:
            return
        if not self.running:   # stopped meanwhile: give them back
            await self.spool.requeue([r.id for r in rows])
            return
        if len(rows) >= scan:  # there may be more due work beyond what was read
            self._again = True
        claimed = {r.id: r for r in rows}
        orphans = []
        jobs: list[Job] = []
        reports: dict[str, _Reports] = {}
        for route, part in plan:
            part = [claimed[r.id] for r in part if r.id in claimed]
            if not part:       # changed by an administrator meanwhile
                continue
            qid = part[0].queue_id
            msg = msgs.get(qid)
            if msg is None:  # should not happen: recipients without their message
                orphans.extend(part)
                continue
            share = reports.setdefault(qid, _Reports())
            share.jobs += 1
            jobs.append(Job(qid, self._domain_of(part[0].address), msg, part,
                            route=route, reports=share))
        for job in jobs:
            self._start(job)
        if orphans:
            log.error("{n} recipients without a message row; marking failed", n=len(orphans))
            await self.spool.record([
                ops.RecipientUpdate(r.id, "failed", r.attempts, now, "message missing")
                for r in orphans], [], [])

    def _plan(self, due: Sequence[QueuedRecipient], free: int
              ) -> tuple[list[tuple[Route, list[QueuedRecipient]]], set[Route]]:
        """The transactions (route, recipients) to claim now among the
        *due* recipients (soonest first): those of one message with one
        route travel together, ``recipient_limit`` at most, and no more
        than *free* transactions in all and than each route's destination
        may have (``per_destination`` slots; and AHEAD waiting for each, of
        messages of AHEAD_SIZE at most).  And the routes that can take no
        more of the due work."""
        groups: dict[tuple[str, Route], list[QueuedRecipient]] = defaultdict(list)
        routes: dict[tuple[str, bool], Route] = {}     # (domain key, released) -> Route
        for r in due:
            key = (self._domain_of(r.address), is_released(r))
            route = routes.get(key)
            if route is None:
                route = routes[key] = self._route_of_recipient(r)
            groups[(r.queue_id, route)].append(r)
        busy = Counter(job.route for job in self._jobs.values())
        slots = self.relay.concurrency - len(self._jobs)   # free ones; the rest would wait
        step = self.relay.recipient_limit
        plan: list[tuple[Route, list[QueuedRecipient]]] = []
        full: set[Route] = set()
        for (_qid, route), rcpts in groups.items():
            for i in range(0, len(rcpts), step):
                if len(plan) >= free:
                    return plan, full
                waits = busy[route] >= self.relay.per_destination or len(plan) >= slots
                if busy[route] >= self._route_jobs or (
                        waits and rcpts[0].message_size > AHEAD_SIZE):
                    full.add(route)
                    break
                busy[route] += 1
                plan.append((route, rcpts[i:i + step]))
        return plan, full

    def _saturated_domains(self, due: Sequence[QueuedRecipient] = (),
                           planned_full: Collection[Route] = ()) -> set[str]:
        """The domains (of the jobs in progress, and of *due*) whose route
        has all the transactions it may have (``per_destination`` x (1 +
        AHEAD)) under way, or that a plan found full (*planned_full*)."""
        busy = Counter(job.route for job in self._jobs.values())
        # (Not the hold courier's: a released recipient of a hold domain goes
        # to another route, and must not be hidden by its domain's others.)
        full = {route for route in set(busy) | set(planned_full)
                if (route in planned_full or busy[route] >= self._route_jobs)
                and route.courier != HOLD_COURIER}
        if not full:
            return set()
        domains = {self._domain_of(r.address) for job in self._jobs.values()
                   if job.route in full for r in job.rcpts}
        for r in due:
            d = self._domain_of(r.address)
            if d not in domains and self._route_of_recipient(r) in full:
                domains.add(d)
        return domains

    @property
    def _route_jobs(self) -> int:
        """The most transactions of one route claimed at a time."""
        return self.relay.per_destination * (1 + AHEAD)

    def _route_of(self, address: str) -> Route:
        """The recipient's Route (RouteMap.route_for of its domain)."""
        return self.router.route_for(self._domain_of(address))

    def _domain_of(self, address: str) -> str:
        return domain_key(address, self.hostname)

    # -- flushes: ETRN, mta queue flush --domain (hold domains) -------------------------
    def _route_of_recipient(self, r: QueuedRecipient) -> Route:
        """:meth:`_route_of`, but a hold domain's recipient that a release
        made due goes to the SMTP courier -- that once: its outcome replaces
        the mark (mta.spool.interface.is_released)."""
        route = self._route_of(r.address)
        if route.courier == HOLD_COURIER and is_released(r):
            return self.router.relay_route(self._domain_of(r.address))
        return route

    def is_flushing(self, domain: str) -> bool:
        """Is a flush of *domain* (a mta.domain key) under way?"""
        return domain in self._flushing

    def flush_under_way(self, domain: str, subdomains: bool = False) -> bool:
        """Was this flush (the same ETRN argument) asked for and is not over?"""
        return (dom.key(domain), subdomains) in self._flushes

    def flush_domain(self, domain: str, subdomains: bool = False, *,
                     how: str = "ETRN") -> defer.Deferred[Release]:
        """Release *domain* (with *subdomains*: and the domains below it,
        ``ETRN @domain``): its queued and deferred recipients become due now,
        a hold domain's are relayed once (see the module docstring), on new
        connections.  Fires with the mta.spool.interface.Release (messages,
        recipients, domains).  While a flush of the same argument is under
        way (until its recipients are claimed), it is not started again: a
        flood of ETRNs costs one flush per domain, and each gets its answer."""
        if not self.running:
            # A process that only accepts ([server] workers > 1): the release
            # rings the delivering process, which flushes it (as it does
            # what ``mta queue flush --domain`` released).
            return self.spool.release(dom.key(domain), subdomains, now=self.reactor.seconds(),
                                      hostname=self.hostname, how=how)
        key = (dom.key(domain), subdomains)
        f = self._flushes.get(key)
        if f is None:
            f = self._start_flush(key, how)
        if f.failure is not None:
            return defer.fail(f.failure)
        if f.result is not None:
            return defer.succeed(f.result)
        d: defer.Deferred = defer.Deferred()
        f.waiters.append(d)
        return d

    def _start_flush(self, key: tuple[str, bool], how: str) -> _Flush:
        now = self.reactor.seconds()
        f = self._flushes[key] = _Flush(now)

        def released(rel: Release) -> None:
            f.result = rel
            for d in rel.domains:
                self._flush_started(d, now)
            self.kick()
            for w in f.waiters:
                w.callback(rel)

        def failed(failure: Failure) -> None:
            f.failure = failure
            if self._flushes.get(key) is f:
                del self._flushes[key]   # not done: the next ETRN tries again
            for w in f.waiters:
                w.errback(failure)
        self.spool.release(key[0], key[1], now=now, hostname=self.hostname,
                           how=how).addCallbacks(released, failed)
        return f

    def _flush_started(self, domain: str, since: float) -> None:
        if domain in self._flushing:
            return
        self._flushing[domain] = since
        if self._fresh_connections is not None:
            self._fresh_connections(domain, since)

    def _track_flushes(self, due: Sequence[QueuedRecipient], *, complete: bool,
                       since: float, unseen: set[str] = frozenset()) -> None:
        """Per queue pass: a hold domain released by another process
        (``mta queue flush --domain``) starts being flushed here; with a
        *complete* view of the due work (but for the *unseen* domains, left
        out of the read), a domain none of whose recipients is due any more
        (all claimed) is no longer being flushed, and flushes all of whose
        domains are over end."""
        due_domains: set[str] = set(unseen)
        for r in due:
            d = self._domain_of(r.address)
            due_domains.add(d)
            if is_released(r):
                self._flush_started(d, since)
        if not complete:
            return
        for d, started in list(self._flushing.items()):
            # A flush that started after this pass read the spool is not judged by it.
            if d not in due_domains and started < since:
                del self._flushing[d]
        for key, f in list(self._flushes.items()):
            if (f.result is not None and f.at < since
                    and not any(d in self._flushing for d in f.result.domains)):
                del self._flushes[key]

    def _start(self, job: Job) -> None:
        if not self.running:  # stopping: the claimed recipients are requeued at the next start
            self._job_gone(job)
            return
        d = defer.Deferred.fromCoroutine(self._run_job(job))
        self._jobs[d] = job

        def done(result: Any) -> Any:
            self._jobs.pop(d, None)
            self.kick()          # a slot is free: claim what can use it
            return result
        def failed(f: Any) -> Any:
            if f.check(defer.CancelledError):
                return self._requeue(job).addBoth(lambda _: self._job_gone(job))
            else:
                log.failure("delivery of {queue_id} to {domain} failed", f,
                            queue_id=job.queue_id, domain=job.domain)
                return self._job_gone(job)
        d.addErrback(failed)
        d.addBoth(done)

    def _job_gone(self, job: Job) -> defer.Deferred | None:
        """A job ended without recording a result (cancelled, or an error):
        if it was the last of its message in this pass, the reports the
        others hold are written now."""
        if job.reported:
            return None
        job.reported = True
        share = job.reports
        share.jobs -= 1
        if share.jobs > 0 or not share.held:
            return None
        held, forwards, report = share.take()
        dsns = forwards + self._make_dsns(job.message, report, self.reactor.seconds())
        # Written like any result: kept and written again if the spool refuses it.
        d = defer.Deferred.fromCoroutine(self._write_results(job, held, dsns))
        return d.addCallback(lambda _: self.kick() if dsns else None)

    def _requeue(self, job: Job) -> defer.Deferred:
        """A delivery cancelled by the stop (or never started): its recipients
        go back to "queued" (unless their result was recorded meanwhile)."""
        was = "interrupted" if job.attempting else "not started"
        d = self.spool.requeue([r.id for r in job.rcpts])

        def logged(n: int) -> None:
            log.info("{queue_id}: delivery to {domain} {was} at shutdown; {n} recipient(s) "
                     "queued again", queue_id=job.queue_id, domain=job.domain, was=was, n=n)

        def failed(f: Any) -> None:
            log.warn("{queue_id}: delivery to {domain} {was} at shutdown; its recipients stay "
                     "in flight until the next start ({error})", queue_id=job.queue_id,
                     domain=job.domain, was=was, error=f.getErrorMessage())
        return d.addCallbacks(logged, failed)

    async def _run_job(self, job: Job) -> None:
        sem = self._per_dest.get(job.route)
        if sem is None:
            sem = self._per_dest[job.route] = defer.DeferredSemaphore(self.relay.per_destination)
        await sem.acquire()
        try:
            await self._global.acquire()
            try:
                if not self.running:      # stopping: no new attempt
                    raise defer.CancelledError()
                job.attempting = True
                outcomes = await self._attempt(job)
            finally:
                self._global.release()
        finally:
            # The slot is free once the courier has answered: the next
            # transaction waiting for it starts while this one's results
            # are written.
            sem.release()
            if not sem.waiting and sem.tokens == sem.limit:
                self._per_dest.pop(job.route, None)
        await self._record(job, outcomes)

    # -- one attempt ------------------------------------------------------------------
    async def _attempt(self, job: Job) -> Sequence[Outcome]:
        """The courier's outcome of each of *job*'s recipients."""
        courier = self.couriers.get(job.route.courier)
        if courier is None:     # a route to a courier not configured: a bug, not a bounce
            log.error("{queue_id}: no courier {name!r} for {domain}", queue_id=job.queue_id,
                      name=job.route.courier, domain=job.domain)
            outcomes = [Outcome.ours("4.3.5", f"no courier {job.route.courier!r} configured")
                        ] * len(job.rcpts)
        else:
            outcomes = await courier.deliver(job.message, job.rcpts, job.route.destination)
            if len(outcomes) != len(job.rcpts):
                raise RuntimeError(f"courier {job.route.courier!r} returned {len(outcomes)} "
                                   f"outcomes for {len(job.rcpts)} recipients")
        return outcomes

    async def _record(self, job: Job, outcomes: Sequence[Outcome]) -> None:
        from ..dsn import DSNRecipient

        m = job.message
        now = self.reactor.seconds()
        age = now - m.arrival
        lifetime = self.retry.lifetime
        updates: list[ops.RecipientUpdate] = []
        report: dict[str, list] = defaultdict(list)  # kind -> DSNRecipient list
        owing: set[int] = set()                      # rows that add to the report
        forwards: dict[int, InboundMessage] = {}     # row -> the copy its aliases relay
        for row, res in zip(job.rcpts, outcomes):
            attempts = row.attempts + 1
            notify = row.notify
            warned = row.warned
            reply = res.text
            # Only a reply the next hop really sent is its Diagnostic-Code with
            # Remote-MTA; our own decisions are reported as ours (RFC 3464 §2.3.5).
            said_by = res.remote
            dsn_common = dict(final_recipient=row.address, original_recipient=row.orcpt,
                              remote_mta=said_by.host if said_by else None,
                              diagnostic_code=reply if said_by else None,
                              reason=None if said_by else res.detail, last_attempt=now)
            said = (f"host {said_by.host}[{said_by.address}] said: {res.text}"
                    if said_by and res.kind != "delivered" else res.text if said_by
                    else res.detail)
            if res.kind == "delivered":
                status_word = "sent"
                state, nxt = "delivered", now
                # RFC 3461 §6.2.7: a next hop with DSN was given NOTIFY (and
                # ORCPT, ENVID, RET) and now owes the report; ``delivered`` is
                # for a final delivery, which the relay does not make.
                if notify_allows(notify, "SUCCESS") and not res.dsn_passed:
                    owing.add(row.id)
                    report["success"].append(DSNRecipient(
                        action=("expanded" if res.expanded else
                                "delivered" if res.final else "relayed"),
                        status=res.status or "2.0.0", **dsn_common))
                if res.forward:
                    forwards[row.id] = forwarded_copy(m, res, now, hostname=self.hostname)
                dsn_status = res.status or "2.0.0"
            elif res.kind == "permanent" or age >= lifetime:
                expired = res.kind != "permanent"
                status_word = "expired" if expired else "bounced"
                state, nxt = "failed", now
                dsn_status = "4.4.7" if expired else (res.status or "5.0.0")
                if expired:
                    reply = f"delivery time expired; last reply: {res.text}"
                    said = f"delivery time expired; last reply: {said}"
                if notify_allows(notify, "FAILURE"):
                    owing.add(row.id)
                    report["failure"].append(DSNRecipient(action="failed", status=dsn_status,
                                                          **dsn_common))
            else:
                status_word = "deferred"
                state = "deferred"
                dsn_status = res.status or "4.0.0"
                delay = backoff(attempts, self.retry.first, self.retry.max, self.rand())
                nxt = min(now + delay, m.arrival + lifetime)
                warn = self.retry.warn_after
                if (warn is not None and not warned and age >= warn
                        and notify_allows(notify, "DELAY")):
                    warned = True
                    owing.add(row.id)
                    report["delay"].append(DSNRecipient(
                        action="delayed", status=dsn_status,
                        will_retry_until=m.arrival + lifetime, **dsn_common))
            updates.append(ops.RecipientUpdate(row.id, state, attempts, nxt, reply, warned))
            # Held mail waiting for its domain to ask is not a deferral worth an alert.
            if self.metrics is not None and not (state == "deferred"
                                                 and job.route.courier == HOLD_COURIER):
                self.metrics.recipient_done(
                    _METRIC_STATUS[status_word], self._domain_of(row.address),
                    age if state != "deferred" else None)
            tls = str(res.tls) if res.tls is not None else "none"
            # Formatted here, the fields kept for the JSON log: Twisted's own
            # formatting of a template (string.Formatter, in Python) costs
            # ~10 µs a field, on every delivery (see mta.logging).
            log.info("{line}", line=f"{job.queue_id}: to=<{row.address}> relay={res.relay} "
                     f"tls={tls} delay={age:.1f} attempts={attempts} dsn={dsn_status} "
                     f"status={status_word} ({said})",
                     queue_id=job.queue_id, rcpt=row.address, relay=res.relay, tls=tls,
                     delay=age, attempts=attempts, dsn=dsn_status, status=status_word,
                     reply=said)
        # One report per message and pass (see _Reports): the rows that owe
        # one wait for the message's last job, which writes them with the DSNs.
        if m.sender == "" and not self.relay.postmaster:
            owing.clear()       # nobody to report to: nothing to wait for
        share = job.reports
        job.reported = True
        share.jobs -= 1
        share.held += [u for u in updates if u.rid in owing]
        share.held_forwards += [f for rid, f in forwards.items() if rid in owing]
        for kind, rcpts in report.items():
            share.report[kind] += rcpts
        updates = [u for u in updates if u.rid not in owing]
        # A forwarded copy is written with its recipient's outcome, never apart.
        new: list[InboundMessage] = [f for rid, f in forwards.items() if rid not in owing]
        dsns: list = []
        if share.jobs == 0:
            held, held_forwards, report = share.take()
            updates += held
            new += held_forwards
            dsns = self._make_dsns(m, report, now)
        if new:
            for f in new:
                log.info("{queue_id}: forwarded as {new_id} to {rcpts}", queue_id=m.queue_id,
                         new_id=f.queue_id, rcpts=", ".join(r.address for r in f.recipients))
        dsns = new + dsns
        if not updates and not dsns:
            return
        job.recording = True
        await self._write_results(job, updates, dsns)
        if dsns:
            self.kick()

    # -- ATRN: deliveries over a connection the customer opened ----------------------
    def deliver_over(self, domains: Sequence[str],
                     courier: Callable[[int], Awaitable[Courier]]) -> defer.Deferred[int]:
        """Hand over the mail of *domains* (mta.domain.key form) on a
        connection someone else opened: ATRN (RFC 2645, mta.smtp.odmr).

        Claims every pending recipient of those domains -- queued or
        deferred, due or not (ops.claim_domains) -- and fires with 0 when
        there is none.  Otherwise ``courier(n)`` (n: the recipients claimed)
        gives the one-off Courier of that connection (the ODMR side sends its
        250 and turns the connection in there); the recipients go to it a
        message at a time (``recipient_limit`` per transaction), outside the
        delivery slots (the connection is the customer's), and each outcome
        is recorded exactly like any job's (:meth:`_record`: 4xx deferred,
        there for the next ATRN or attempt; 5xx bounced; the DSNs they owe).
        Fires with the number of recipients delivered.  When no courier
        comes (the connection was lost before the turn) or one fails, the
        recipients not recorded are queued again, as a stop's are."""
        return defer.Deferred.fromCoroutine(self._deliver_over(list(domains), courier))

    async def _deliver_over(self, domains: list[str],
                            open_courier: Callable[[int], Awaitable[Courier]]) -> int:
        # Just started: the recovery of the last run's claims comes first
        # (a moment); wait for it rather than refuse the customer.
        waited = 0.0
        while self.running and not self._recovered and waited < RECOVERY_WAIT:
            await task.deferLater(self.reactor, 0.05, lambda: None)
            waited += 0.05
        if not self.running or not self._recovered:
            raise RuntimeError("the queue runner is not running (starting or stopping)")
        rows, msgs = await self.spool.claim_domains(domains, self.hostname,
                                                    self.reactor.seconds())
        if not rows:
            return 0
        self._handovers += 1          # its claims are renewed meanwhile (see _renew)
        try:
            return await self._hand_over(domains, open_courier, rows, msgs)
        finally:
            self._handovers -= 1

    async def _hand_over(self, domains: list[str],
                         open_courier: Callable[[int], Awaitable[Courier]],
                         rows: list[QueuedRecipient], msgs: Mapping[str, QueuedMessage]) -> int:
        jobs: list[Job] = []
        by_message: dict[str, list[QueuedRecipient]] = defaultdict(list)
        for row in rows:
            by_message[row.queue_id].append(row)
        orphans: list[QueuedRecipient] = []
        step = self.relay.recipient_limit
        for qid, part in by_message.items():
            msg = msgs.get(qid)
            if msg is None:     # should not happen: recipients without their message
                orphans.extend(part)
                continue
            share = _Reports()
            for i in range(0, len(part), step):
                share.jobs += 1
                chunk = part[i:i + step]
                domain = self._domain_of(chunk[0].address)
                jobs.append(Job(qid, domain, msg, chunk, route=Route("atrn", domain),
                                reports=share))
        if orphans:
            log.error("{n} recipients without a message row; marking failed", n=len(orphans))
            now = self.reactor.seconds()
            await self.spool.record([
                ops.RecipientUpdate(r.id, "failed", r.attempts, now, "message missing")
                for r in orphans], [], [])
        delivered = 0
        left = list(jobs)
        try:
            courier = await open_courier(len(rows) - len(orphans))
            while left:
                job = left[0]
                job.attempting = True
                outcomes = await courier.deliver(job.message, job.rcpts, job.route.destination)
                if len(outcomes) != len(job.rcpts):
                    raise RuntimeError(f"the ATRN courier returned {len(outcomes)} outcomes "
                                       f"for {len(job.rcpts)} recipients")
                left.pop(0)
                delivered += sum(1 for o in outcomes if o.kind == "delivered")
                await self._record(job, outcomes)
        except BaseException:
            if left:
                n = await self.spool.requeue([r.id for job in left for r in job.rcpts])
                log.info("ATRN for {domains}: {n} recipient(s) not handed over, queued again",
                         domains=",".join(domains), n=n)
                for job in left:
                    self._job_gone(job)
            raise
        return delivered

    # -- results the spool refused --------------------------------------------------
    async def _write_results(self, job: Job, updates: list, dsns: list) -> None:
        """Record the results of *job* (DeliveryQueue.record).  One the spool
        refuses is kept and written again -- the job, its delivery slot and
        its recipients (in flight in the spool, so no pass claims them) wait
        -- until it is recorded, or the stop gives up on it (see stopService)."""
        args = (updates, dsns, [job.queue_id])
        try:
            await self.spool.record(*args)
        except Exception as e:
            entry = _Unrecorded(job, args)
            self._unrecorded.append(entry)
            self._unrecorded_failed(entry, e)
            await entry.done
        else:
            if self._unrecorded and self.running:   # the spool takes writes again
                self._retry_unrecorded()

    def _write_unrecorded(self, entry: _Unrecorded) -> None:
        entry.writing = True
        d = self.spool.record_again(*entry.args)
        d.addCallbacks(lambda _: self._unrecorded_written(entry),
                       lambda f: self._unrecorded_failed(entry, f.value))
        d.addErrback(lambda f: log.failure("writing a delivery result again failed", f))

    def _unrecorded_failed(self, entry: _Unrecorded, error: BaseException) -> None:
        entry.writing = False
        if entry.done.called:      # given up at the stop meanwhile
            return
        text = describe(error)
        self._record_trouble.failed(text)
        if self.running:
            if self._record_call is None:
                self._record_rounds += 1
                delay = backoff(self._record_rounds, RETRY_FIRST, RETRY_MAX, self.rand())
                self._record_call = self.reactor.callLater(delay, self._retry_unrecorded)
        elif not entry.final and not self._grace_over:
            self._last_try(entry)
        else:
            self._abandon(entry, f"its last write failed: {text}")

    def _unrecorded_written(self, entry: _Unrecorded) -> None:
        entry.writing = False
        if entry in self._unrecorded:
            self._unrecorded.remove(entry)
        if entry.done.called:      # given up at the stop, and recorded after all
            log.info("{queue_id}: the results of {n} recipient(s) were recorded after all",
                     queue_id=entry.job.queue_id, n=len(entry.args[0]))
            return
        entry.done.callback(None)
        if not self._unrecorded:
            self._record_trouble.succeeded()
            self._record_rounds = 0
        elif self.running:
            self._retry_unrecorded()

    def _retry_unrecorded(self) -> None:
        """Write every kept result again (each its own write: one the spool
        keeps refusing does not hold the others back)."""
        if self._record_call is not None and self._record_call.active():
            self._record_call.cancel()
        self._record_call = None
        if not self.running:
            return
        for entry in list(self._unrecorded):
            if not entry.writing:
                self._write_unrecorded(entry)

    def _last_try(self, entry: _Unrecorded) -> None:
        entry.final = True
        self._write_unrecorded(entry)

    def _abandon(self, entry: _Unrecorded, why: str) -> None:
        """At the stop: give up on a result the spool refused.  Its
        recipients stay in flight; the next start attempts them again."""
        if entry in self._unrecorded:
            self._unrecorded.remove(entry)
        if entry.done.called:
            return
        job = entry.job
        log.warn("{queue_id}: the results of {n} recipient(s) to {domain} were not recorded "
                 "({why}); they stay in flight and are attempted again at the next start: "
                 "{rcpts}", queue_id=job.queue_id, n=len(job.rcpts), domain=job.domain, why=why,
                 rcpts=", ".join(r.address for r in job.rcpts))
        entry.done.callback(None)

    def _make_dsns(self, m: QueuedMessage, report: dict[str, list], now: float) -> list:
        return dsn_messages(m, report, now, hostname=self.hostname,
                            postmaster=self.relay.postmaster, builder=self._dsn_builder)
