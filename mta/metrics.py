"""Prometheus metrics: the counters the server and the queue runner bump,
the queue gauges read from the spool every few seconds, and the HTTP page
that serves them (``[metrics] listen``).

Everything lives in one :class:`Metrics` object with its own
``CollectorRegistry`` (never the global one), handed to the server factory,
the queue runner and the spool; tests run several in one process.

With ``[server] workers`` > 1 the Metrics object is made *shared*
(prometheus_client's multiprocess mode, in a private directory the
supervisor creates and removes, :func:`shared_directory`; one that a
supervisor killed with ``-9``, or whose start failed, left behind is removed
by the next start, as its lock is free): each worker's values live in its own
mmap'ed files there, and the page, served by whichever worker holds the
listener, sums them -- counters and histograms over every worker that
ever ran (a dead worker's counts stay), the open connections over the
live ones, the queue gauges the most recent reading of a live one.  With
``[metrics] listen = ""`` no Metrics object exists and the hot paths test
one attribute for None.  On the hot paths the cost is a counter increment:
label children are looked up once and kept, the open-connections gauge moves
with each connection, and the queue
gauges come from a periodic ``GROUP BY`` on the spool's thread pool, never
from the request paths.

Metric names (all prefixed ``mta_``)::

    mta_smtp_connections_total                       counter
    mta_smtp_connections_current                     gauge
    mta_messages_accepted_total                      counter
    mta_messages_rejected_total{reason}              counter
    mta_delivery_recipients_total{status,domain}     counter  (delivered, deferred, bounced)
    mta_delivery_latency_seconds                     histogram (arrival -> delivered/bounced)
    mta_atrn_requests_total{result}                  counter  (ATRN commands answered: turned,
                                                               no_mail, denied, busy, failed)
    mta_atrn_recipients_total                        counter  (recipients handed over by ATRN)
    mta_queue_recipients{state}                      gauge
    mta_queue_messages                               gauge
    mta_queue_oldest_message_age_seconds             gauge
    mta_etrn_requests_total{result}                  counter  (started, already, no_mail, refused, unsupported, failed)
    mta_etrn_recipients_total                        counter  (recipients made due by ETRN)
    mta_spool_commit_seconds                         histogram (one group commit)
    mta_spool_commit_messages                        histogram (messages per group commit)
"""
from __future__ import annotations

import fcntl
import ipaddress
import os
import shutil
import stat
import tempfile
import threading
from typing import TYPE_CHECKING, Any, Callable

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge,
                               Histogram, generate_latest, multiprocess, values)
from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.web import resource, server

from .config import MetricsConfig

if TYPE_CHECKING:
    from .spool.interface import QueueSummary, SpoolInterface

log = Logger(namespace="mta.metrics")

#: Reasons a message (or, for relay_denied and too_many_recipients, a
#: recipient) is refused; each is exported from the start, at 0.
REJECT_REASONS = ("relay_denied", "too_big", "bare_newline", "long_line", "spool_error",
                  "too_many_recipients", "auth_required", "insufficient_storage",
                  "unknown_user", "lookup_failed")
#: Recipient states in the spool (see mta/spool/schema.py).
QUEUE_STATES = ("queued", "inflight", "deferred", "held", "delivered", "failed")
DELIVERY_STATUSES = ("delivered", "deferred", "bounced")
#: The results of an ETRN (mta.smtp.server), each exported from the start.
ETRN_RESULTS = ("started", "already", "no_mail", "refused", "unsupported", "failed")
OTHER_DOMAIN = "other"

_LATENCY_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400,
                    5 * 86400, float("inf"))
_COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                   5, 10, float("inf"))
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, float("inf"))


_SHARED_PREFIX = "mta-metrics-"
_SHARED_LOCK = "daemon.lock"
# The lock of each shared directory this process made: held (open, flock'ed)
# for the life of the daemon -- by twistd's daemonized child and the forked
# workers too, which inherit the descriptor -- and released by the kernel
# when the last of them is gone, whatever killed it.
_held: list[int] = []


def shared_directory(parent: str | None = None) -> str:
    """A new private directory for the workers' shared metrics, in *parent*
    (the system's temporary directory by default), holding the lock that
    says a daemon uses it (see ``_held``).  First the directories there
    whose daemon is gone -- ours (same owner), their lock free -- are
    removed: what a ``kill -9`` of the supervisor or a failed start left."""
    parent = parent or tempfile.gettempdir()
    try:
        names = os.listdir(parent)
    except OSError:
        names = []
    for name in names:
        if name.startswith(_SHARED_PREFIX):
            _remove_if_abandoned(os.path.join(parent, name))
    path = tempfile.mkdtemp(prefix=_SHARED_PREFIX, dir=parent)
    fd = os.open(os.path.join(path, _SHARED_LOCK), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    _held.append(fd)
    return path


def _remove_if_abandoned(path: str) -> None:
    try:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            return
        fd = os.open(os.path.join(path, _SHARED_LOCK), os.O_RDWR | os.O_NOFOLLOW)
    except OSError:
        return                    # not ours, or no lock: never removed
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return                # a daemon holds it
        shutil.rmtree(path, ignore_errors=True)
    finally:
        os.close(fd)


class _SharedCollector:
    """prometheus_client's multiprocess collector, over the value files
    that are ready: a worker creates its file and only then gives it its
    size, and a scrape in between must not fail on the empty file (its
    values are all 0 then anyway)."""

    def __init__(self, path: str):
        self.path = path

    def collect(self) -> Any:
        files = []
        for name in os.listdir(self.path):
            if name.endswith(".db"):
                f = os.path.join(self.path, name)
                try:
                    if os.path.getsize(f) >= 8:      # its header: the used length
                        files.append(f)
                except OSError:
                    pass                             # gone meanwhile (a dead worker's gauge)
        return multiprocess.MultiProcessCollector.merge(files, accumulate=True)


def _share_values(directory: str) -> None:
    """Multiprocess mode for the metrics created from now on in this process
    and in the processes it forks (prometheus_client reads the directory
    from the environment when a value's file is first opened)."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue()


class Metrics:
    """*shared*: a directory for prometheus_client's multiprocess mode
    (``[server] workers`` > 1; see the module docstring), or None."""

    def __init__(self, registry: CollectorRegistry | None = None, *,
                 max_domains: int = MetricsConfig.max_domains,
                 clock: Callable[[], float] | None = None, shared: str | None = None):
        self.shared = shared
        if shared is not None:
            _share_values(shared)
        if registry is None:
            registry = CollectorRegistry()
        if clock is None:
            import time
            clock = time.time
        self.registry = registry
        self.max_domains = max_domains
        self.clock = clock
        r = registry
        self.connections = Counter("mta_smtp_connections", "Inbound SMTP connections accepted",
                                   registry=r)
        self.connections_current = Gauge("mta_smtp_connections_current",
                                         "Inbound SMTP connections open now", registry=r,
                                         multiprocess_mode="livesum")
        self.accepted = Counter("mta_messages_accepted",
                                "Messages accepted (250 after the final dot or BDAT LAST)",
                                registry=r)
        self.rejected = Counter("mta_messages_rejected",
                                "Messages refused, by reason (relay_denied and "
                                "too_many_recipients count refused recipients)",
                                ["reason"], registry=r)
        self.recipients = Counter("mta_delivery_recipients",
                                  "Outcomes of delivery attempts per recipient, by status "
                                  "(delivered, deferred, bounced) and destination domain "
                                  f"(the first {max_domains} domains seen, then "
                                  f"\"{OTHER_DOMAIN}\")", ["status", "domain"], registry=r)
        self.delivery_latency = Histogram("mta_delivery_latency_seconds",
                                          "Time from arrival to the final outcome (delivered "
                                          "or bounced) of a recipient", buckets=_LATENCY_BUCKETS,
                                          registry=r)
        latest = "livemostrecent"       # workers: the last reading of a live one
        self.queue = Gauge("mta_queue_recipients", "Recipients in the spool by state",
                           ["state"], registry=r, multiprocess_mode=latest)
        self.queue_messages = Gauge("mta_queue_messages", "Messages in the spool", registry=r,
                                    multiprocess_mode=latest)
        self.oldest = Gauge("mta_queue_oldest_message_age_seconds",
                            "Age of the oldest message in the spool (0 when empty; with "
                            "workers, as of the last queue reading)", registry=r,
                            multiprocess_mode=latest)
        self.spool_commit = Histogram("mta_spool_commit_seconds",
                                      "Duration of one group commit of the spool writer",
                                      buckets=_COMMIT_BUCKETS, registry=r)
        self.spool_batch = Histogram("mta_spool_commit_messages",
                                     "New messages written by one group commit",
                                     buckets=_BATCH_BUCKETS, registry=r)
        self.atrn = Counter("mta_atrn_requests", "ATRN commands (RFC 2645) by result: turned "
                            "(the connection was turned and the mail handed over), no_mail "
                            "(453), denied (450, 530), busy (451: another ATRN for the domain), "
                            "failed (451: a temporary problem)", ["result"], registry=r)
        self.atrn_recipients = Counter("mta_atrn_recipients",
                                       "Recipients handed over on turned ATRN connections",
                                       registry=r)
        self.etrn = Counter("mta_etrn_requests", "ETRN commands (RFC 1985) by result: started "
                            "(253), already (250: a flush of that node was under way), "
                            "no_mail (251), refused (459), unsupported (458 #queue), "
                            "failed (458)", ["result"], registry=r)
        self.etrn_recipients = Counter("mta_etrn_recipients",
                                       "Recipients made due by ETRN", registry=r)
        self._etrn = {result: self.etrn.labels(result) for result in ETRN_RESULTS}
        self._rejected = {reason: self.rejected.labels(reason) for reason in REJECT_REASONS}
        for state in QUEUE_STATES:
            self.queue.labels(state).set(0)
        self._oldest_arrival: float | None = None
        if shared is None:              # a function's value is not written to the files
            self.oldest.set_function(self._oldest_age)
        self._domains: dict[tuple[str, str], Any] = {}
        self._domain_names: set[str] = set()
        self._lock = threading.Lock()

    # -- called on the hot paths -----------------------------------------------------
    def connection_opened(self) -> None:
        self.connections.inc()
        self.connections_current.inc()

    def connection_closed(self) -> None:
        self.connections_current.dec()

    def message_rejected(self, reason: str) -> None:
        child = self._rejected.get(reason)
        if child is None:
            child = self._rejected[reason] = self.rejected.labels(reason)
        child.inc()

    def atrn_done(self, result: str, recipients: int = 0) -> None:
        """One ATRN command answered (see ``mta_atrn_requests``); *recipients*
        handed over on its turned connection."""
        self.atrn.labels(result).inc()
        if recipients:
            self.atrn_recipients.inc(recipients)
    def etrn_done(self, result: str, recipients: int) -> None:
        """One ETRN answered: *result* (ETRN_RESULTS), *recipients* made due."""
        child = self._etrn.get(result)
        if child is None:
            child = self._etrn[result] = self.etrn.labels(result)
        child.inc()
        if recipients:
            self.etrn_recipients.inc(recipients)

    def recipient_done(self, status: str, domain: str, latency: float | None = None) -> None:
        """One recipient's attempt ended: status delivered, deferred or bounced;
        *latency* (arrival to now) for the final ones."""
        key = (status, domain)
        child = self._domains.get(key)
        if child is None:
            child = self._domains[key] = self.recipients.labels(status, self._label(domain))
        child.inc()
        if latency is not None:
            self.delivery_latency.observe(max(0.0, latency))

    def _label(self, domain: str) -> str:
        """The domain's label: itself for the first max_domains domains, then "other"."""
        with self._lock:
            if domain in self._domain_names:
                return domain
            if len(self._domain_names) < self.max_domains:
                self._domain_names.add(domain)
                return domain
        return OTHER_DOMAIN

    def commit_done(self, seconds: float, messages: int) -> None:
        """One group commit (called on the spool writer thread)."""
        self.spool_commit.observe(seconds)
        if messages:
            self.spool_batch.observe(messages)

    # -- the queue gauges --------------------------------------------------------------
    def set_queue(self, by_state: dict[str, int], messages: int,
                  oldest_arrival: float | None) -> None:
        for state in set(QUEUE_STATES) | set(by_state):
            self.queue.labels(state).set(by_state.get(state, 0))
        self.queue_messages.set(messages)
        self._oldest_arrival = oldest_arrival
        if self.shared is not None:
            self.oldest.set(self._oldest_age())

    def _oldest_age(self) -> float:
        arrival = self._oldest_arrival
        return 0.0 if arrival is None else max(0.0, self.clock() - arrival)

    def scrape(self) -> bytes:
        if self.shared is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        registry.register(_SharedCollector(self.shared))
        return generate_latest(registry)

    # -- shared (workers): called by the supervisor --------------------------------------
    def process_gone(self, pid: int) -> None:
        """A worker exited: its open connections and queue readings no longer count."""
        if self.shared is not None:
            multiprocess.mark_process_dead(pid, self.shared)

    def remove_shared(self) -> None:
        """The daemon stopped: remove the shared directory."""
        if self.shared is not None:
            shutil.rmtree(self.shared, ignore_errors=True)


class QueueGauges(service.Service):
    """Reads the queue gauges from the spool every *interval* seconds (one
    GROUP BY on the spool's thread pool; never two at once)."""

    name = "metrics-queue"

    def __init__(self, metrics: Metrics, spool: SpoolInterface, interval: float,
                 reactor: Any):
        self.metrics = metrics
        self.spool = spool
        self.interval = interval
        self.reactor = reactor
        self._loop: task.LoopingCall | None = None
        self._pending: defer.Deferred | None = None

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(self.refresh)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=True)

    def refresh(self) -> defer.Deferred | None:
        if self._pending is not None:
            return None
        d = self.spool.summary()
        self._pending = d

        def got(s: QueueSummary) -> None:
            self.metrics.set_queue(dict(s.by_state), s.messages, s.oldest_arrival)

        def failed(f: Any) -> None:
            log.warn("reading the queue gauges failed: {error}", error=f.getErrorMessage())

        def done(_: Any) -> None:
            self._pending = None
        d.addCallbacks(got, failed)
        d.addBoth(done)
        return d

    def stopService(self) -> defer.Deferred | None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._pending is not None:   # let the query in progress end before the spool stops
            d: defer.Deferred = defer.Deferred()
            self._pending.addBoth(lambda r: (d.callback(None), r)[1])
            return d
        return None


class MetricsPage(resource.Resource):
    """``GET /metrics``: the text exposition format."""
    isLeaf = True

    def __init__(self, metrics: Metrics):
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return self.metrics.scrape()

    render_HEAD = render_GET


class _Root(resource.Resource):
    def __init__(self, metrics: Metrics):
        super().__init__()
        self.putChild(b"metrics", MetricsPage(metrics))

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"mta: metrics at /metrics\n"

    def getChild(self, path: bytes, request: Any) -> resource.Resource:
        if path == b"":
            return self
        return super().getChild(path, request)


class MetricsSite(server.Site):
    """The metrics web site; scrapes are not written to the log."""
    noisy = False

    def __init__(self, metrics: Metrics):
        super().__init__(_Root(metrics))

    def log(self, request: Any) -> None:
        pass

    def logPrefix(self) -> str:   # "metrics starting on 9025"
        return "metrics"


def is_loopback_endpoint(description: str) -> bool:
    """Whether a tcp:/tcp6:/unix: server endpoint string listens on loopback only."""
    from .config_values import split_endpoint
    parts = split_endpoint(description)
    kind = parts[0].lower()
    if kind == "unix":
        return True
    if kind not in ("tcp", "tcp6", "ssl"):
        return False
    for part in parts[1:]:
        key, eq, value = part.partition("=")
        if eq and key == "interface":
            try:
                return ipaddress.ip_address(value.replace("\\:", ":").split("%")[0]).is_loopback
            except ValueError:
                return False
    return False
