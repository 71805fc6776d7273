"""The queue runner: takes due recipients from the spool, routes them,
hands them to the SMTP client, and records per recipient what happened.

* new messages are attempted at once (the server kicks the runner after each
  commit), deferred recipients when their ``next_attempt`` is due;
* 2xx → delivered; 5xx → failed, with an RFC 3464 bounce; 4xx → deferred with
  :func:`backoff`, until ``lifetime`` runs out (then failed, status 4.4.7);
* the outcome, the DSNs it owes and the removal of finished messages are
  written in one transaction, so a message leaves the spool only when every
  recipient is final and every DSN it owes is spooled;
* a message from ``<>`` never gets a DSN (a failed bounce is logged and
  dropped, or reported to ``[relay] postmaster`` when that is set);
* NOTIFY=SUCCESS (RFC 3461 §6.2.7): a next hop that offers DSN got the
  parameters and takes over the duty, so we report nothing; one without DSN
  gets ``Action: relayed`` from us (``delivered`` is for final delivery);
* one report of each kind (failure, delay, success) per message and queue
  pass, even when its recipients went to several next hops in several jobs:
  see :class:`_Reports`.

Delivery is at least once: recipients in flight when the process dies are
attempted again after a restart (see README).
"""
from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

from ..message import InboundMessage, Recipient, new_queue_id, split_header_block
from ..spool import ops

log = Logger(namespace="mta.delivery")


def backoff(attempts: int, first: float, maximum: float, rand: float = 0.5) -> float:
    """Seconds to wait after the *attempts*-th failed attempt (1 = the first):
    ``first``, doubling each time, capped at ``maximum``, with ±10 % jitter
    (``rand`` in [0, 1)).  A pure function, so tests need no clock."""
    base = min(first * (2 ** min(max(attempts, 1) - 1, 40)), maximum)
    return base * (0.9 + 0.2 * rand)


def _notify_allows(notify: str | None, what: str) -> bool:
    """RFC 3461: no NOTIFY means failures (and, by our choice, delays) are
    reported, successes not."""
    if notify is None:
        return what in ("FAILURE", "DELAY")
    return what in notify.split(",")


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

    def take(self) -> tuple[list[ops.RecipientUpdate], dict[str, list]]:
        held, report = self.held, self.report
        self.held, self.report = [], defaultdict(list)
        return held, report


@dataclass
class Job:
    queue_id: str
    domain: str
    message: dict[str, Any]
    rcpts: list[dict[str, Any]] = field(default_factory=list)
    destination: str = ""       # Router.destination(): the concurrency key
    attempting: bool = False    # has a delivery slot and is under way
    recording: bool = False     # writing its outcome: not to be cancelled
    reports: _Reports = field(default_factory=lambda: _Reports(jobs=1))
    reported: bool = False      # has taken its share of `reports` (done or gone)


class QueueRunner(service.Service):
    name = "queue-runner"

    def __init__(self, spool: Any, router: Any, pool: Any, *, hostname: str, retry: Any,
                 relay: Any, reactor: Any = None, rand: Callable[[], float] = random.random,
                 poll_interval: float = 1.0, dsn_builder: Callable[..., bytes] | None = None,
                 metrics: Any = None):
        if reactor is None:
            from twisted.internet import reactor as _r
            reactor = _r
        self.spool = spool
        self.router = router
        self.pool = pool
        self.hostname = hostname
        self.retry = retry
        self.relay = relay
        self.reactor = reactor
        self.rand = rand
        self.poll_interval = poll_interval
        self._dsn_builder = dsn_builder
        self._global = defer.DeferredSemaphore(relay.concurrency)
        self._per_dest: dict[str, defer.DeferredSemaphore] = {}
        self._running = False
        self._again = False
        self._loop: task.LoopingCall | None = None
        self._jobs: dict[defer.Deferred, Job] = {}
        self._queued_jobs = 0
        self._run_d: defer.Deferred | None = None        # a queue run in progress
        self.shutdown_grace = float(getattr(relay, "shutdown_grace", 0.0))
        self.metrics = metrics                            # mta.metrics.Metrics or None
        self.ready: defer.Deferred = defer.Deferred()   # fires once recovery is done
        self._recovered = False

    # -- lifecycle -------------------------------------------------------------
    def startService(self) -> None:
        super().startService()
        d = self.spool.write(ops.recover_inflight)
        d.addCallback(self._recovered_cb)
        d.addErrback(lambda f: log.failure("recovering in-flight recipients failed", f))

    def _recovered_cb(self, n: int) -> None:
        if n:
            log.info("requeued {n} recipients that were in flight at the last stop", n=n)
        self._recovered = True
        if not self.running:
            return
        self._loop = task.LoopingCall(self.kick)
        self._loop.clock = self.reactor
        self._loop.start(self.poll_interval, now=True)
        self.ready.callback(None)

    def stopService(self) -> defer.Deferred | None:
        """No new deliveries start; those in progress may finish within
        ``[relay] shutdown_grace`` seconds, then they are cancelled (their
        connections aborted).  The recipients of every cancelled or unstarted
        delivery are queued again before this fires, so the spool (which the
        service tree stops after the runner) must still be up; a result that
        is being written is always let through."""
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
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
            return self.pool.close()
        d = defer.DeferredList(waits, consumeErrors=True)
        d.addBoth(finished)
        close_router = getattr(self.router, "close", None)
        if close_router is not None:
            d.addBoth(lambda _: close_router())
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
        d.addErrback(lambda f: None if f.check("mta.spool.SpoolWriteError") else log.failure("queue run failed", f))  # the spool logged it
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
        backlog = self._queued_jobs
        limit = max(0, self.relay.concurrency * self.relay.recipient_limit * 2 - backlog)
        if limit == 0:
            return
        now = self.reactor.seconds()
        rows, msgs = await self.spool.write(ops.claim_due_and_load, now, limit)
        if not rows:
            return
        if not self.running:   # stopped meanwhile: give them back
            await self.spool.write(ops.requeue_inflight, [r["id"] for r in rows])
            return
        if len(rows) >= limit:
            self._again = True
        groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        for r in rows:
            groups[(r["queue_id"], self._destination_of(r["address"]))].append(r)
        orphans = []
        jobs: list[Job] = []
        reports: dict[str, _Reports] = {}
        for (qid, destination), rcpts in groups.items():
            msg = msgs.get(qid)
            if msg is None:  # should not happen: recipients without their message
                orphans.extend(rcpts)
                continue
            share = reports.setdefault(qid, _Reports())
            step = self.relay.recipient_limit
            for i in range(0, len(rcpts), step):
                part = rcpts[i:i + step]
                share.jobs += 1
                jobs.append(Job(qid, self._domain_of(part[0]["address"]), msg, part,
                                destination=destination, reports=share))
        for job in jobs:
            self._start(job)
        if orphans:
            log.error("{n} recipients without a message row; marking failed", n=len(orphans))
            await self.spool.write(ops.record_results, [
                ops.RecipientUpdate(r["id"], "failed", r["attempts"], now, "message missing")
                for r in orphans], [], [])

    def _destination_of(self, address: str) -> str:
        """Recipients with the same destination travel together (see
        Router.destination); a router without that notion groups by domain."""
        domain = self._domain_of(address)
        dest = getattr(self.router, "destination", None)
        return dest(domain) if dest is not None else domain

    def _domain_of(self, address: str) -> str:
        if "@" not in address:  # bare postmaster
            return self.hostname.lower()
        domain = address.rsplit("@", 1)[1]
        if domain.startswith("["):
            return domain
        try:
            from ..address import domain_to_ascii
            return domain_to_ascii(domain)
        except UnicodeError:
            return domain.lower()

    def _start(self, job: Job) -> None:
        if not self.running:  # stopping: the claimed recipients are requeued at the next start
            self._job_gone(job)
            return
        self._queued_jobs += 1
        d = defer.Deferred.fromCoroutine(self._run_job(job))
        self._jobs[d] = job

        def done(result: Any) -> Any:
            self._jobs.pop(d, None)
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
        held, report = share.take()
        dsns = self._make_dsns(job.message, report, self.reactor.seconds())
        d = self.spool.write(ops.record_results, held, dsns, [job.queue_id])

        def failed(f: Any) -> None:
            log.warn("{queue_id}: recording {n} result(s) that owe a report failed; they stay "
                     "in flight until the next start ({error})", queue_id=job.queue_id,
                     n=len(held), error=f.getErrorMessage())
        return d.addCallbacks(lambda _: self.kick() if dsns else None, failed)

    def _requeue(self, job: Job) -> defer.Deferred:
        """A delivery cancelled by the stop (or never started): its recipients
        go back to "queued" (unless their result was recorded meanwhile)."""
        was = "interrupted" if job.attempting else "not started"
        d = self.spool.write(ops.requeue_inflight, [r["id"] for r in job.rcpts])

        def logged(n: int) -> None:
            log.info("{queue_id}: delivery to {domain} {was} at shutdown; {n} recipient(s) "
                     "queued again", queue_id=job.queue_id, domain=job.domain, was=was, n=n)

        def failed(f: Any) -> None:
            log.warn("{queue_id}: delivery to {domain} {was} at shutdown; its recipients stay "
                     "in flight until the next start ({error})", queue_id=job.queue_id,
                     domain=job.domain, was=was, error=f.getErrorMessage())
        return d.addCallbacks(logged, failed)

    async def _run_job(self, job: Job) -> None:
        sem = self._per_dest.get(job.destination or job.domain)
        if sem is None:
            sem = self._per_dest[job.destination or job.domain] = defer.DeferredSemaphore(self.relay.per_destination)
        await sem.acquire()
        try:
            await self._global.acquire()
            try:
                self._queued_jobs -= 1
                if not self.running:      # stopping: no new attempt
                    raise defer.CancelledError()
                job.attempting = True
                await self._attempt(job)
            finally:
                self._global.release()
        finally:
            sem.release()
            if not sem.waiting and sem.tokens == sem.limit:
                self._per_dest.pop(job.destination or job.domain, None)

    # -- one attempt ------------------------------------------------------------------
    async def _attempt(self, job: Job) -> None:
        from ..smtp.client import OutboundMessage, OutboundRecipient, RecipientResult
        from .router import RouteError

        m = job.message
        remote = None
        dsn_offered = False
        tls = None
        try:
            hops = await self.router.route(job.domain)
        except RouteError as e:
            code = 550 if e.permanent else 451
            results = [RecipientResult(r["address"], code, e.status, f"{code} {e.status} {e.text}")
                       for r in job.rcpts]
        except Exception as e:  # resolver trouble we did not foresee: try again later
            log.failure("routing {domain} failed", domain=job.domain)
            results = [RecipientResult(r["address"], 451, "4.4.3", f"451 4.4.3 routing failed: {e}")
                       for r in job.rcpts]
        else:
            out = OutboundMessage(
                queue_id=job.queue_id, sender=m["sender"],
                recipients=[OutboundRecipient(self._outbound_address(r["address"]), r["notify"],
                                              r["orcpt"]) for r in job.rcpts],
                headers=bytes(m["headers"]), body=bytes(m["body"]), body_type=m["body_type"],
                smtputf8=bool(m["smtputf8"]), ret=m["ret"], envid=m["envid"])
            res = await self.pool.deliver(hops, out)
            results, remote, dsn_offered = res.results, res.remote, res.dsn_offered
            tls = res.tls
        await self._record(job, results, remote, dsn_offered, tls)

    def _outbound_address(self, address: str) -> str:
        return address if "@" in address else f"{address}@{self.hostname}"

    async def _record(self, job: Job, results: list, remote: Any, dsn_offered: bool,
                      tls: Any = None) -> None:
        from ..dsn import DSNRecipient

        m = job.message
        now = self.reactor.seconds()
        age = now - m["arrival"]
        lifetime = self.retry.lifetime
        relay_txt = f"{remote.host}[{remote.address}]:{remote.port}" if remote else "none"
        tls_txt = str(tls) if tls is not None else "none"
        updates: list[ops.RecipientUpdate] = []
        report: dict[str, list] = defaultdict(list)  # kind -> DSNRecipient list
        owing: set[int] = set()                      # rows that add to the report
        for row, res in zip(job.rcpts, results):
            attempts = row["attempts"] + 1
            notify = row["notify"]
            warned = bool(row["warned"])
            reply = res.text
            # Only a reply the next hop really sent is its Diagnostic-Code with
            # Remote-MTA; our own decisions are reported as ours (RFC 3464 §2.3.5).
            said_by = res.remote
            dsn_common = dict(final_recipient=row["address"], original_recipient=row["orcpt"],
                              remote_mta=said_by.host if said_by else None,
                              diagnostic_code=reply if said_by else None,
                              reason=None if said_by else res.detail, last_attempt=now)
            said = (f"host {said_by.host}[{said_by.address}] said: {res.text}"
                    if said_by and res.code >= 300 else res.text if said_by else res.detail)
            if 200 <= res.code < 300:
                status_word = "sent"
                state, nxt = "delivered", now
                # RFC 3461 §6.2.7: a next hop with DSN was given NOTIFY (and
                # ORCPT, ENVID, RET) and now owes the report; ``delivered`` is
                # for a final delivery, which the relay does not make.
                if _notify_allows(notify, "SUCCESS") and not dsn_offered:
                    owing.add(row["id"])
                    report["success"].append(DSNRecipient(action="relayed",
                                                          status=res.status or "2.0.0",
                                                          **dsn_common))
                dsn_status = res.status or "2.0.0"
            elif res.code >= 500 or age >= lifetime:
                expired = res.code < 500
                status_word = "expired" if expired else "bounced"
                state, nxt = "failed", now
                dsn_status = "4.4.7" if expired else (res.status or "5.0.0")
                if expired:
                    reply = f"delivery time expired; last reply: {res.text}"
                    said = f"delivery time expired; last reply: {said}"
                if _notify_allows(notify, "FAILURE"):
                    owing.add(row["id"])
                    report["failure"].append(DSNRecipient(action="failed", status=dsn_status,
                                                          **dsn_common))
            else:
                status_word = "deferred"
                state = "deferred"
                dsn_status = res.status or "4.0.0"
                delay = backoff(attempts, self.retry.first, self.retry.max, self.rand())
                nxt = min(now + delay, m["arrival"] + lifetime)
                warn = self.retry.warn_after
                if (warn is not None and not warned and age >= warn
                        and _notify_allows(notify, "DELAY")):
                    warned = True
                    owing.add(row["id"])
                    report["delay"].append(DSNRecipient(
                        action="delayed", status=dsn_status,
                        will_retry_until=m["arrival"] + lifetime, **dsn_common))
            updates.append(ops.RecipientUpdate(row["id"], state, attempts, nxt, reply, warned))
            if self.metrics is not None:
                self.metrics.recipient_done(
                    _METRIC_STATUS[status_word], self._domain_of(row["address"]),
                    age if state != "deferred" else None)
            log.info("{queue_id}: to=<{rcpt}> relay={relay} tls={tls} delay={delay:.1f} "
                     "attempts={attempts} dsn={dsn} status={status} ({reply})",
                     queue_id=job.queue_id, rcpt=row["address"], relay=relay_txt, tls=tls_txt,
                     delay=age, attempts=attempts, dsn=dsn_status, status=status_word,
                     reply=said)
        # One report per message and pass (see _Reports): the rows that owe
        # one wait for the message's last job, which writes them with the DSNs.
        if m["sender"] == "" and not self.relay.postmaster:
            owing.clear()       # nobody to report to: nothing to wait for
        share = job.reports
        job.reported = True
        share.jobs -= 1
        share.held += [u for u in updates if u.rid in owing]
        for kind, rcpts in report.items():
            share.report[kind] += rcpts
        updates = [u for u in updates if u.rid not in owing]
        dsns: list = []
        if share.jobs == 0:
            held, report = share.take()
            updates += held
            dsns = self._make_dsns(m, report, now)
        if not updates and not dsns:
            return
        job.recording = True
        await self.spool.write(ops.record_results, updates, dsns, [job.queue_id])
        if dsns:
            self.kick()

    def _make_dsns(self, m: dict[str, Any], report: dict[str, list], now: float) -> list:
        return dsn_messages(m, report, now, hostname=self.hostname,
                            postmaster=self.relay.postmaster, builder=self._dsn_builder)


def dsn_messages(m: dict[str, Any], report: dict[str, list], now: float, *, hostname: str,
                 postmaster: str = "", builder: Callable[..., bytes] | None = None) -> list:
    """The DSN messages (ready for the spool) that *report* owes for message
    row *m*: one per kind (failure, delay, success), from ``<>`` to the
    sender — or, for a failed bounce, to *postmaster* (or none)."""
    if not any(report.values()):
        return []
    from ..dsn import OriginalMessage, build_dsn, needs_smtputf8
    builder = builder or build_dsn
    sender = m["sender"]
    if sender == "":
        # Never a DSN for a DSN.  A failed bounce may go to the postmaster.
        failed = report.get("failure", [])
        pm = postmaster
        if not failed or not pm:
            if failed:
                log.warn("{queue_id}: bounce undeliverable, dropped (no DSN for <>)",
                         queue_id=m["queue_id"])
            return []
        failed = [f for f in failed if f.final_recipient.lower() != pm.lower()]
        if not failed:
            return []
        report = {"failure": failed}
        to = pm
    else:
        to = sender
    original = OriginalMessage(
        queue_id=m["queue_id"], sender=to, headers=bytes(m["headers"]),
        body=bytes(m["body"]), arrival=m["arrival"], envid=m["envid"], ret=m["ret"],
        smtputf8=bool(m["smtputf8"]))
    out = []
    for kind in ("failure", "delay", "success"):
        rcpts = report.get(kind)
        if not rcpts:
            continue
        data = builder(original, rcpts, reporting_mta=hostname, now=now)
        qid = new_queue_id(now)
        n = split_header_block(data)
        utf8 = needs_smtputf8(original, rcpts)
        out.append(InboundMessage(
            queue_id=qid, sender="", recipients=[Recipient(to, "NEVER")], headers=data[:n],
            body=data[n:], arrival=now, client_address="127.0.0.1", helo=hostname,
            protocol="local", size=len(data), smtputf8=utf8,
            body_type=None if data.isascii() else "8BITMIME"))
        log.info("{queue_id}: sender {kind} notification: {dsn_id}", queue_id=m["queue_id"],
                 kind={"failure": "non-delivery", "delay": "delay",
                       "success": "delivery"}[kind], dsn_id=qid)
    return out
