"""The queue runner against a real SQLite spool file, with a fake router and
a fake SMTP client, and task.Clock for time: retries, expiry, bounces."""
from __future__ import annotations

import email
import email.policy
import sqlite3

import pytest
from twisted.internet import defer, task

from mta.config import RelayConfig, RetryConfig
from mta.delivery.router import NextHop, RouteError
from mta.delivery.types import Route
from mta.delivery.scheduler import QueueRunner, backoff
from mta.delivery.smtp_courier import SMTPCourier
from mta.message import InboundMessage, Recipient, new_queue_id
from mta.smtp.client import DeliveryResult, RecipientResult
from mta.spool import ops
from fakespool import SyncSpool

HOP = NextHop("mx.dest.test", "127.0.0.1", 25)


class FakeRouter:
    def __init__(self):
        self.errors: dict[str, RouteError] = {}
        self.calls: list[str] = []

    def route(self, domain):
        self.calls.append(domain)
        if domain in self.errors:
            return defer.fail(self.errors[domain])
        return defer.succeed([HOP])

    def destination(self, domain):
        return domain

    def route_for(self, domain):
        return Route("smtp", self.destination(domain))

    def close(self):
        pass


class FakePool:
    """Answers per recipient address from a script: a list of (code, status)
    used one attempt after another (the last one repeats)."""

    def __init__(self):
        self.script: dict[str, list[tuple[int, str]]] = {}
        self.calls: list = []
        self.dsn_offered = True
        self.closed = False

    def deliver(self, hops, msg):
        self.calls.append((hops, msg))
        results = []
        for r in msg.recipients:
            seq = self.script.get(r.address, [(250, "2.0.0")])
            code, status = seq.pop(0) if len(seq) > 1 else seq[0]
            results.append(RecipientResult(r.address, code, status, f"{code} {status} reply for {r.address}"))
        return defer.succeed(DeliveryResult(results, hops[0], self.dsn_offered))

    def close(self):
        self.closed = True
        return defer.succeed(None)


def smtp(router, pool):
    """The couriers of a runner that relays through *pool* (a fake ConnectionPool)."""
    return {"smtp": SMTPCourier(router, pool, hostname="mx.example.test")}


@pytest.fixture
def env(tmp_path):
    clock = task.Clock()
    clock.advance(1_800_000_000)
    spool = SyncSpool(tmp_path / "spool.sqlite")
    router, pool = FakeRouter(), FakePool()
    # DSNs to the sender stay deferred in the spool, where the tests read them.
    pool.script["alice@example.test"] = [(451, "4.2.0")]
    retry = RetryConfig(first=300, max=3600, lifetime=5 * 86400, warn_after=None)

    def make(retry=retry, relay=RelayConfig()):
        runner = QueueRunner(spool, router, smtp(router, e.pool), hostname="mx.example.test",
                             retry=retry,
                             relay=relay, reactor=clock, rand=lambda: 0.5)
        runner.startService()
        e.runners.append(runner)
        return runner

    class Env:
        pass
    e = Env()
    e.clock, e.spool, e.router, e.pool, e.make = clock, spool, router, pool, make
    e.runners = []
    yield e
    # Stopped, not left to the garbage collector: a job coroutine closed
    # there would hand its delivery slot to a waiting one closed before it.
    for runner in e.runners:
        if runner.running:
            runner.stopService()
    clock.advance(3600)           # past every shutdown grace


def put(env, sender="alice@example.test", rcpts=("bob@dest.test",), notify=None, ret=None,
        envid=None, body=b"hello\r\n"):
    now = env.clock.seconds()
    qid = new_queue_id(now)
    headers = b"Received: by us\r\nSubject: test\r\nMessage-ID: <t@example.test>\r\n\r\n"
    env.spool.store(InboundMessage(
        queue_id=qid, sender=sender, recipients=[Recipient(a, notify) for a in rcpts],
        headers=headers, body=body, arrival=now, client_address="127.0.0.1", helo="client",
        protocol="ESMTP", size=len(headers) + len(body), ret=ret, envid=envid))
    return qid


def dsns(env):
    rows = env.spool.sql("SELECT m.queue_id, r.address, c.headers, c.body FROM messages m "
                         "JOIN recipients r USING (queue_id) JOIN contents c USING (queue_id) "
                         "WHERE m.sender = ''")
    return [(addr, email.message_from_bytes(bytes(h) + bytes(b), policy=email.policy.default))
            for _q, addr, h, b in rows]


def status_fields(msg):
    part = [p for p in msg.walk() if p.get_content_type() in
            ("message/delivery-status", "message/global-delivery-status")][0]
    raw = part.get_payload()
    if isinstance(raw, list):  # parsed as a list of header blocks
        return [dict(b.items()) for b in raw]
    return raw


def test_backoff_is_pure_doubling_capped_with_jitter():
    assert backoff(1, 300, 3600, 0.5) == 300
    assert backoff(2, 300, 3600, 0.5) == 600
    assert backoff(4, 300, 3600, 0.5) == 2400
    assert backoff(5, 300, 3600, 0.5) == 3600
    assert backoff(50, 300, 3600, 0.5) == 3600
    assert 270 <= backoff(1, 300, 3600, 0.0) <= backoff(1, 300, 3600, 0.999) <= 330


def test_delivered_message_leaves_the_spool(env):
    put(env, rcpts=("bob@dest.test", "carol@dest.test", "dave@other.test"))
    env.make()
    # one transaction per destination domain, recipients of that domain together
    assert sorted(env.router.calls) == ["dest.test", "other.test"]
    by_domain = {tuple(r.address for r in m.recipients) for _h, m in env.pool.calls}
    assert by_domain == {("bob@dest.test", "carol@dest.test"), ("dave@other.test",)}
    assert env.spool.sql("SELECT COUNT(*) FROM messages") == [(0,)]
    assert env.spool.sql("SELECT COUNT(*) FROM recipients") == [(0,)]
    assert env.spool.sql("SELECT COUNT(*) FROM contents") == [(0,)]


def test_deferral_retries_with_backoff_then_delivers(env):
    env.pool.script["bob@dest.test"] = [(451, "4.3.0"), (421, "4.4.2"), (250, "2.0.0")]
    qid = put(env)
    env.make()
    t0 = env.clock.seconds()
    [(state, attempts, nxt, reply)] = env.spool.sql(
        "SELECT state, attempts, next_attempt, last_reply FROM recipients")
    assert (state, attempts, nxt) == ("deferred", 1, t0 + 300)
    assert reply == "451 4.3.0 reply for bob@dest.test"
    env.clock.advance(299)
    assert len(env.pool.calls) == 1
    env.clock.advance(1)
    assert len(env.pool.calls) == 2
    [(state, attempts, nxt)] = env.spool.sql("SELECT state, attempts, next_attempt FROM recipients")
    assert (state, attempts, nxt) == ("deferred", 2, t0 + 300 + 600)
    env.clock.advance(600)
    assert len(env.pool.calls) == 3
    assert env.spool.sql("SELECT COUNT(*) FROM messages WHERE queue_id = ?", qid) == [(0,)]
    assert dsns(env) == []


def test_permanent_failure_bounces_to_sender(env):
    env.pool.script["bob@dest.test"] = [(550, "5.1.1")]
    put(env, rcpts=("bob@dest.test", "carol@dest.test"), envid="ENV+2B1")
    env.make()
    [(to, msg)] = dsns(env)
    assert to == "alice@example.test"
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    text = msg.as_string()
    assert "bob@dest.test" in text and "5.1.1" in text
    assert "carol@dest.test" not in str(status_fields(msg))
    # the original left the spool: the DSN was spooled in the same transaction
    assert env.spool.sql("SELECT COUNT(*) FROM messages WHERE sender != ''") == [(0,)]


def test_expiry_bounces_with_4_4_7(env):
    env.pool.script["bob@dest.test"] = [(451, "4.4.1")]
    env.make(retry=RetryConfig(first=10, max=20, lifetime=60, warn_after=None))
    put(env)
    env.clock.advance(0)
    for _ in range(4):  # past the lifetime (60 s), not past the bounce's own
        env.clock.advance(20)
    rows = env.spool.sql("SELECT COUNT(*) FROM messages WHERE sender != ''")
    assert rows == [(0,)]
    [(to, msg)] = dsns(env)
    assert "4.4.7" in msg.as_string()
    assert "Action: failed" in msg.as_string()


def test_no_bounce_for_null_sender(env):
    env.pool.script["bob@dest.test"] = [(550, "5.1.1")]
    put(env, sender="")
    env.make()
    assert env.spool.sql("SELECT COUNT(*) FROM messages") == [(0,)]


def test_notify_never_and_success(env):
    env.pool.script["bob@dest.test"] = [(550, "5.1.1")]
    put(env, rcpts=("bob@dest.test",), notify="NEVER")
    put(env, rcpts=("carol@dest.test",), notify="SUCCESS")
    env.pool.dsn_offered = False
    env.make()
    [(to, msg)] = dsns(env)
    assert "Action: relayed" in msg.as_string()
    assert "carol@dest.test" in msg.as_string()


def test_delay_warning_once(env):
    env.pool.script["bob@dest.test"] = [(451, "4.4.1")]
    env.make(retry=RetryConfig(first=10, max=10, lifetime=1000, warn_after=25))
    put(env)
    for _ in range(8):
        env.clock.advance(10)
    found = dsns(env)
    assert len(found) == 1
    assert "Action: delayed" in found[0][1].as_string()


def test_route_errors(env):
    env.router.errors["null.test"] = RouteError("5.1.10", "null MX")
    env.router.errors["tmp.test"] = RouteError("4.4.3", "DNS timeout")
    put(env, rcpts=("a@null.test", "b@tmp.test"))
    env.make()
    states = dict(env.spool.sql("SELECT address, state FROM recipients"))
    assert states["b@tmp.test"] == "deferred"
    [(to, msg)] = dsns(env)
    assert "5.1.10" in msg.as_string()


def test_inflight_recipients_are_recovered_at_start(env):
    qid = put(env)
    env.spool.sql("UPDATE recipients SET state='inflight'")
    env.make()
    assert len(env.pool.calls) == 1
    assert env.spool.sql("SELECT COUNT(*) FROM messages WHERE queue_id = ?", qid) == [(0,)]


def test_one_transaction_per_next_hop_not_per_domain(env):
    class SmarthostRouter(FakeRouter):
        def destination(self, domain):
            return "smarthost"
    env.router.__class__ = SmarthostRouter
    put(env, rcpts=("bob@dest.test", "dave@other.test", "erin@third.test"))
    env.make()
    assert len(env.pool.calls) == 1
    assert [r.address for r in env.pool.calls[0][1].recipients] == [
        "bob@dest.test", "dave@other.test", "erin@third.test"]
    assert env.spool.sql("SELECT COUNT(*) FROM messages") == [(0,)]


# ---------------------------------------------------------------- DSN duty, one report per pass

def actions(msg):
    """{final recipient: Action} of one DSN."""
    return {b["Final-Recipient"].split(";", 1)[1]: b["Action"] for b in status_fields(msg)[1:]}


def test_success_to_dsn_hop_passes_the_duty_no_report(env):
    # RFC 3461 §6.2.7: the next hop offers DSN and got NOTIFY=SUCCESS: it reports.
    qid = put(env, rcpts=("bob@dest.test",), notify="SUCCESS")
    env.pool.dsn_offered = True
    env.make()
    assert [r.notify for r in env.pool.calls[0][1].recipients] == ["SUCCESS"]
    assert dsns(env) == []
    assert env.spool.sql("SELECT COUNT(*) FROM messages WHERE queue_id = ?", qid) == [(0,)]


def test_success_to_hop_without_dsn_is_relayed(env):
    put(env, rcpts=("bob@dest.test",), notify="SUCCESS,FAILURE")
    env.pool.dsn_offered = False
    env.make()
    [(to, msg)] = dsns(env)
    assert to == "alice@example.test"
    assert actions(msg) == {"bob@dest.test": "relayed"}
    human = next(msg.iter_parts()).get_content()
    assert "passed on to the next mail system" in human and "was delivered" not in human


def test_one_report_per_message_when_recipients_went_to_two_next_hops(env):
    env.pool.dsn_offered = False
    env.pool.script["dave@other.test"] = [(550, "5.1.1")]
    env.pool.script["erin@other.test"] = [(550, "5.1.1")]
    qid = put(env, rcpts=("bob@dest.test", "carol@third.test", "dave@other.test",
                          "erin@other.test"), notify="SUCCESS,FAILURE")
    env.make()
    assert len(env.pool.calls) == 3                    # three next hops, three jobs
    found = dsns(env)
    kinds = sorted(m["Subject"] for _to, m in found)
    assert len(found) == 2, kinds                       # one success report, one bounce
    by_action = {}
    for _to, m in found:
        for rcpt, action in actions(m).items():
            by_action.setdefault(action, set()).add(rcpt)
    assert by_action == {"relayed": {"bob@dest.test", "carol@third.test"},
                         "failed": {"dave@other.test", "erin@other.test"}}
    assert env.spool.sql("SELECT COUNT(*) FROM messages WHERE queue_id = ?", qid) == [(0,)]


class HeldPool(FakePool):
    """Deliveries to the domains in ``hold`` wait until the test fires them."""

    def __init__(self):
        super().__init__()
        self.hold: set[str] = set()
        self.waiting: list = []

    def deliver(self, hops, msg):
        if msg.recipients[0].address.rsplit("@", 1)[1] not in self.hold:
            return super().deliver(hops, msg)
        d = defer.Deferred(lambda d: None)
        self.waiting.append((d, hops, msg))
        return d

    def fire(self):
        d, hops, msg = self.waiting.pop(0)
        super().deliver(hops, msg).chainDeferred(d)


def held_env(env):
    pool = HeldPool()
    pool.script = env.pool.script
    env.pool = pool
    return pool


def test_owed_report_waits_for_the_last_job_and_a_crash_loses_nothing(env, tmp_path):
    pool = held_env(env)
    pool.hold = {"slow.test"}
    pool.script["bob@dest.test"] = [(550, "5.1.1")]
    qid = put(env, rcpts=("bob@dest.test", "carol@dest.test", "dave@slow.test"))
    runner = QueueRunner(env.spool, env.router, smtp(env.router, pool), hostname="mx.example.test",
                         retry=RetryConfig(first=300, max=3600, lifetime=86400),
                         relay=RelayConfig(), reactor=env.clock, rand=lambda: 0.5)
    runner.startService()
    states = dict(env.spool.sql("SELECT address, state FROM recipients WHERE queue_id = ?", qid))
    # carol owes nothing: recorded; bob's bounce waits for dave's job, in flight.
    assert states == {"bob@dest.test": "inflight", "carol@dest.test": "delivered",
                      "dave@slow.test": "inflight"}
    assert dsns(env) == []
    # A crash now: the restart attempts bob again, and his bounce is owed then.
    env.spool.recover_inflight(env.clock.seconds())
    pool2 = FakePool()
    pool2.script = {"bob@dest.test": [(550, "5.1.1")], "dave@slow.test": [(250, "2.0.0")],
                    "alice@example.test": [(451, "4.2.0")]}
    restarted = QueueRunner(env.spool, env.router, smtp(env.router, pool2),
                            hostname="mx.example.test",
                            retry=RetryConfig(first=300, max=3600, lifetime=86400),
                            relay=RelayConfig(), reactor=env.clock, rand=lambda: 0.5)
    restarted.startService()
    [(to, msg)] = dsns(env)
    assert actions(msg) == {"bob@dest.test": "failed"}
    assert env.spool.sql("SELECT COUNT(*) FROM messages WHERE queue_id = ?", qid) == [(0,)]


def test_last_job_writes_the_one_report(env):
    pool = held_env(env)
    pool.hold = {"slow.test"}
    pool.script["bob@dest.test"] = [(550, "5.1.1")]
    pool.script["dave@slow.test"] = [(550, "5.1.2")]
    qid = put(env, rcpts=("bob@dest.test", "dave@slow.test"))
    env.make()
    assert dsns(env) == []
    pool.fire()
    [(to, msg)] = dsns(env)
    assert actions(msg) == {"bob@dest.test": "failed", "dave@slow.test": "failed"}
    assert env.spool.sql("SELECT COUNT(*) FROM messages WHERE queue_id = ?", qid) == [(0,)]


def test_stop_cancelling_the_last_job_writes_the_held_report(env):
    pool = held_env(env)
    pool.hold = {"slow.test"}
    pool.script["bob@dest.test"] = [(550, "5.1.1")]
    qid = put(env, rcpts=("bob@dest.test", "dave@slow.test"))
    runner = env.make(relay=RelayConfig(shutdown_grace=0))
    d = runner.stopService()
    assert d.called
    [(to, msg)] = dsns(env)
    assert actions(msg) == {"bob@dest.test": "failed"}
    states = dict(env.spool.sql("SELECT address, state FROM recipients WHERE queue_id = ?", qid))
    assert states == {"bob@dest.test": "failed", "dave@slow.test": "queued"}


def test_one_report_when_recipient_limit_splits_a_destination(env):
    rcpts = tuple(f"r{i}@dest.test" for i in range(5))
    for r in rcpts:
        env.pool.script[r] = [(550, "5.1.1")]
    qid = put(env, rcpts=rcpts)
    env.make(relay=RelayConfig(recipient_limit=2))
    assert [len(m.recipients) for _h, m in env.pool.calls] == [2, 2, 1]
    [(to, msg)] = dsns(env)
    assert actions(msg) == {r: "failed" for r in rcpts}
    assert env.spool.sql("SELECT COUNT(*) FROM messages WHERE queue_id = ?", qid) == [(0,)]
# --------------------------------------------------------------------------- spool faults

class FlakySpool(SyncSpool):
    """SyncSpool whose writes of some operations fail: ``fail[fn] = n`` fails
    the next n writes of ``fn`` as the real Spool does (the transaction rolled
    back, the Deferred failing with SQLAlchemy's OperationalError); with
    ``hold = True`` a write of a failing operation waits in ``held`` until
    the test answers it."""

    def __init__(self, path):
        super().__init__(path)
        self.fail: dict = {}
        self.writes: list = []          # (fn name, ok) of every write of a failing fn
        self.hold = False
        self.held: list = []

        self.committed_anyway = False   # a failing write is committed, then reported failed

    @staticmethod
    def _key(fn):
        # A result written again fails as its first write did.
        return ops.record_results if fn is ops.record_results_again else fn

    def _write(self, fn, *args):
        if self._key(fn) in self.fail:
            if self.hold:
                d = defer.Deferred()
                self.held.append((fn, args, d))
                return d
            return self._write_now(fn, args)
        return super()._write(fn, *args)

    def _write_now(self, fn, args):
        key = self._key(fn)
        if self.fail.get(key, 0) > 0:
            self.fail[key] -= 1
            self.writes.append((fn.__name__, False))
            if self.committed_anyway:
                super()._write(fn, *args)
            from sqlalchemy.exc import OperationalError
            return defer.fail(OperationalError(
                "UPDATE recipients ...", {}, sqlite3.OperationalError("database is locked")))
        self.writes.append((fn.__name__, True))
        return super()._write(fn, *args)

    def answer(self):
        """Answer the oldest held write (fails while fail[fn] > 0)."""
        fn, args, d = self.held.pop(0)
        self._write_now(fn, args).chainDeferred(d)


class HoldingPool(FakePool):
    """Deliveries that wait until the test answers them (all 250)."""

    def __init__(self):
        super().__init__()
        self.pending: list = []

    def deliver(self, hops, msg):
        self.calls.append((hops, msg))
        d = defer.Deferred()
        self.pending.append((d, hops, msg))
        return d

    def answer(self, n=1):
        for _ in range(n):
            d, hops, msg = self.pending.pop(0)
            d.callback(DeliveryResult([RecipientResult(r.address, 250, "2.0.0", "250 ok")
                                       for r in msg.recipients], hops[0], True))


@pytest.fixture
def logged():
    """The text of every mta.delivery log event while the test runs."""
    from twisted.logger import formatEvent, globalLogPublisher
    events: list[str] = []

    def observe(event):
        if event.get("log_namespace") == "mta.delivery":
            events.append(formatEvent(event))
    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


@pytest.fixture
def flaky(env, tmp_path):
    env.spool = FlakySpool(tmp_path / "flaky.sqlite")
    return env


def make_runner(env, pool=None, relay=None, retry=None):
    runner = QueueRunner(env.spool, env.router, smtp(env.router, pool or env.pool),
                         hostname="mx.example.test",
                         retry=retry or RetryConfig(first=300, max=3600, lifetime=5 * 86400),
                         relay=relay or RelayConfig(), reactor=env.clock, rand=lambda: 0.5)
    runner.startService()
    env.runners.append(runner)
    return runner


def state_counts(env):
    return dict(env.spool.sql("SELECT state, COUNT(*) FROM recipients GROUP BY state"))


def test_unrecorded_result_is_written_again_once_the_spool_takes_it(flaky, logged):
    env = flaky
    env.spool.fail[ops.record_results] = 6      # fails for 1+2+4+8+16 s, then 30 s more
    qid = put(env, rcpts=("bob@dest.test", "carol@dest.test"))
    make_runner(env)
    assert len(env.pool.calls) == 1
    # Not recorded: the recipients stay in flight, and nobody claims them again.
    assert state_counts(env) == {"inflight": 2}
    for step in (1, 2, 4, 8, 16):
        env.clock.advance(step - 0.01)
        assert [ok for _f, ok in env.spool.writes].count(False) == 1 + (step.bit_length() - 1)
        env.clock.advance(0.01)
    assert [ok for _f, ok in env.spool.writes] == [False] * 6
    env.clock.advance(29.9)                    # capped at 30 s
    assert len(env.spool.writes) == 6 and state_counts(env) == {"inflight": 2}
    env.clock.advance(0.1)
    assert env.spool.writes[-1] == ("record_results_again", True)
    assert len(env.pool.calls) == 1            # sent once, recorded once
    assert env.spool.sql("SELECT COUNT(*) FROM messages WHERE queue_id = ?", qid) == [(0,)]
    assert env.spool.sql("SELECT COUNT(*) FROM recipients") == [(0,)]
    env.clock.advance(3600)
    assert len(env.pool.calls) == 1
    # One line for the error, one summary of its repeats at the end of the
    # minute, one when the episode is over; not one per try.
    trouble = [e for e in logged if "recording delivery results" in e]
    assert len(trouble) == 3, trouble
    assert "failed: OperationalError: database is locked; the results are kept" in trouble[0]
    assert "failed: OperationalError: database is locked (repeated 5 times in the last " \
        in trouble[1]
    assert trouble[2].endswith("succeeded again after 6 failure(s) in 61 s")


def test_a_result_written_after_all_is_not_written_twice(flaky):
    # The spool said the write failed, but it was committed: writing it again
    # must not store its bounce a second time.
    env = flaky
    env.pool.script["bob@dest.test"] = [(550, "5.1.1")]
    env.spool.fail[ops.record_results] = 1
    env.spool.committed_anyway = True
    put(env, rcpts=("bob@dest.test", "carol@dest.test"))
    make_runner(env)
    env.clock.advance(1)
    assert env.spool.writes[:2] == [("record_results", False), ("record_results_again", True)]
    [(to, msg)] = dsns(env)
    assert to == "alice@example.test" and "5.1.1" in msg.as_string()
    assert env.spool.sql("SELECT COUNT(*) FROM messages WHERE sender != ''") == [(0,)]
    assert [m.sender for _h, m in env.pool.calls] == ["alice@example.test", ""]  # the DSN's


def test_a_successful_write_retries_the_kept_results_at_once(flaky):
    env = flaky
    pool = HoldingPool()
    put(env, rcpts=("bob@dest.test",))
    put(env, rcpts=("carol@other.test",))
    make_runner(env, pool)
    env.spool.fail[ops.record_results] = 1
    pool.answer()                               # bob: its result is refused
    assert state_counts(env) == {"inflight": 2}
    pool.answer()                               # carol: recorded, and bob's again with it
    assert env.spool.sql("SELECT COUNT(*) FROM recipients") == [(0,)]
    assert len(pool.calls) == 2


def test_stop_gives_kept_results_one_last_try(flaky, logged):
    env = flaky
    env.spool.fail[ops.record_results] = 2
    put(env)
    runner = make_runner(env, relay=RelayConfig(shutdown_grace=10))
    assert state_counts(env) == {"inflight": 1}
    done = runner.stopService()                  # the last try: refused once more
    assert done.called
    assert state_counts(env) == {"inflight": 1}
    [line] = [e for e in logged if "were not recorded" in e]
    assert "bob@dest.test" in line and "attempted again at the next start" in line
    # Nothing is attempted after the stop, and the next start attempts it again.
    env.clock.advance(60)
    assert len(env.pool.calls) == 1
    make_runner(env)
    assert len(env.pool.calls) == 2
    assert env.spool.sql("SELECT COUNT(*) FROM recipients") == [(0,)]


def test_stop_records_kept_results_when_the_spool_takes_them(flaky):
    env = flaky
    env.spool.fail[ops.record_results] = 1
    put(env)
    runner = make_runner(env, relay=RelayConfig(shutdown_grace=10))
    assert state_counts(env) == {"inflight": 1}
    done = runner.stopService()
    assert done.called
    assert env.spool.sql("SELECT COUNT(*) FROM recipients") == [(0,)]


def test_stop_does_not_wait_past_the_grace_for_a_last_try(flaky, logged):
    env = flaky
    env.spool.fail[ops.record_results] = 5
    env.spool.hold = True
    put(env)
    runner = make_runner(env, relay=RelayConfig(shutdown_grace=10))
    env.spool.answer()                        # the first write fails
    env.clock.advance(1)
    env.spool.answer()                        # the retry after 1 s fails too
    done = runner.stopService()               # the last try: the spool does not answer
    assert len(env.spool.held) == 1
    env.clock.advance(9.9)
    assert not done.called
    env.clock.advance(0.2)
    assert done.called
    [line] = [e for e in logged if "were not recorded" in e]
    assert "shutdown grace (10s" in line
    env.spool.fail[ops.record_results] = 0
    env.spool.answer()                        # the spool's stop finishes it after all
    assert env.spool.sql("SELECT COUNT(*) FROM recipients") == [(0,)]
    assert any("recorded after all" in e for e in logged)


def test_failed_recovery_at_start_is_tried_again(flaky, logged):
    env = flaky
    env.spool.fail[ops.recover_inflight] = 3
    put(env)
    env.spool.sql("UPDATE recipients SET state='inflight'")
    runner = make_runner(env)
    assert not runner.ready.called and env.pool.calls == []
    env.clock.advance(1)
    env.clock.advance(2)
    assert not runner.ready.called and env.pool.calls == []
    env.clock.advance(4)
    assert runner.ready.called
    assert len(env.pool.calls) == 1
    assert env.spool.sql("SELECT COUNT(*) FROM recipients") == [(0,)]
    trouble = [e for e in logged if "recovering the recipients in flight" in e]
    assert len(trouble) == 3 and "database is locked; no delivery starts" in trouble[0], trouble
    assert "(repeated 2 times in the last 7 s)" in trouble[1]      # pending at the recovery
    assert trouble[2].endswith("succeeded again after 3 failure(s) in 7 s")


def test_stop_during_failed_recovery_ends_the_retries(flaky):
    env = flaky
    env.spool.fail[ops.recover_inflight] = 100
    runner = make_runner(env)
    assert runner.stopService() is not None
    n = len(env.spool.writes)
    env.clock.advance(600)
    assert len(env.spool.writes) == n


# --------------------------------------------------------------------------- what a pass claims

def test_a_pass_claims_what_its_slots_can_start_one_transaction_ahead(env):
    pool = HoldingPool()
    for i in range(30):
        put(env, rcpts=(f"r{i}@dest{i % 3}.test",))
    make_runner(env, pool, relay=RelayConfig(concurrency=5, per_destination=10))
    assert len(pool.pending) == 5                 # 5 in delivery, 5 claimed waiting for them
    assert state_counts(env) == {"inflight": 10, "queued": 20}
    pool.answer(2)                                # the two waiting start at once, two more claimed
    assert len(pool.pending) == 5
    assert state_counts(env) == {"inflight": 10, "queued": 18}
    while pool.pending:
        pool.answer()
    assert env.spool.sql("SELECT COUNT(*) FROM recipients") == [(0,)]
    assert len(pool.calls) == 30


def test_a_big_message_waits_queued_for_a_slot_not_claimed_ahead(env):
    from mta.delivery.scheduler import AHEAD_SIZE
    pool = HoldingPool()
    big = b"x" * AHEAD_SIZE + b"\r\n"
    first, second = put(env, body=big), put(env, body=big)
    small = put(env, rcpts=("carol@dest.test",))
    env.spool.sql("UPDATE recipients SET next_attempt = next_attempt - 100 + id")  # in order
    make_runner(env, pool, relay=RelayConfig(concurrency=1))
    # The slot delivers the first; only a small message is claimed to wait for it.
    assert [m.queue_id for _d, _h, m in pool.pending] == [first]
    assert state_counts(env) == {"inflight": 2, "queued": 1}
    assert env.spool.sql("SELECT queue_id FROM recipients WHERE state = 'queued'") == [(second,)]
    pool.answer()
    assert [m.queue_id for _d, _h, m in pool.pending] == [small]
    while pool.pending:
        pool.answer()
    assert [m.queue_id for _h, m in pool.calls] == [first, small, second]
    assert env.spool.sql("SELECT COUNT(*) FROM recipients") == [(0,)]


def test_a_pass_claims_within_each_destinations_limit(env):
    pool = HoldingPool()
    for i in range(6):
        put(env, rcpts=(f"r{i}@busy.test",))
    put(env, rcpts=("other@quiet.test",))
    env.spool.sql("UPDATE recipients SET next_attempt = next_attempt - 100 + id")  # in order
    env.spool.sql("UPDATE recipients SET state = 'deferred', attempts = 1 "
                  "WHERE address LIKE '%@busy.test' AND address > 'r3'")
    make_runner(env, pool, relay=RelayConfig(concurrency=20, per_destination=1))
    started = sorted(r.address for _d, _h, m in pool.pending for r in m.recipients)
    assert started == ["other@quiet.test", "r0@busy.test"]     # r1 claimed, waiting for r0
    # The rest keeps its state (deferred ones too), where `mta queue` sees it.
    assert state_counts(env) == {"inflight": 3, "queued": 1, "deferred": 3}


def test_a_big_message_is_claimed_one_transaction_per_free_slot(env):
    pool = HoldingPool()
    put(env, rcpts=tuple(f"r{i:02d}@dest.test" for i in range(10)))
    make_runner(env, pool, relay=RelayConfig(concurrency=1, recipient_limit=3))
    assert [len(m.recipients) for _d, _h, m in pool.pending] == [3]    # and 3 waiting for it
    assert state_counts(env) == {"inflight": 6, "queued": 4}
    while pool.pending:
        pool.answer()
    assert [len(m.recipients) for _h, m in pool.calls] == [3, 3, 3, 1]
    assert env.spool.sql("SELECT COUNT(*) FROM recipients") == [(0,)]


def test_a_busy_destination_is_left_out_of_the_read_and_others_still_start(env):
    """per_destination deliveries to one domain under way, a backlog behind
    them, and one message to another domain at its end: the passes leave
    the busy domain out of the read (in SQL, whatever its case), so they
    read a few rows, not the backlog, and the other message starts at once."""
    pool = HoldingPool()
    reads: list[tuple[int, list[str], int]] = []
    real_due = env.spool.due

    def due(now, limit, skip_domains=()):
        d = real_due(now, limit, skip_domains)
        d.addCallback(lambda rows: reads.append((limit, list(skip_domains), len(rows))) or rows)
        return d
    env.spool.due = due
    for i in range(100):
        put(env, rcpts=(f"r{i}@{'Busy' if i % 2 else 'busy'}.test",))
    other = put(env, rcpts=("x@other_1.test",))
    make_runner(env, pool, relay=RelayConfig(concurrency=5, per_destination=2))
    started = [m.queue_id for _d, _h, m in pool.pending]
    assert len(started) == 3 and other in started
    # Once busy.test was full, the reads left it out and found only other_1.test's row.
    assert ["busy.test"] in [skip for _l, skip, _n in reads], reads
    assert all(n <= 1 for _l, skip, n in reads if skip), reads
    pool.answer()                      # a slot of busy.test is free: it is read again
    assert len(pool.pending) == 3
    while pool.pending:
        pool.answer()
    assert env.spool.sql("SELECT COUNT(*) FROM recipients") == [(0,)]
    assert len(pool.calls) == 101


def test_a_pass_after_one_delivery_reads_a_few_rows_not_a_read_per_free_slot(env):
    """One busy destination frees one slot at a time while 60 others are
    free: each pass begins with a small read (SCAN_FIRST_SLOTS), not
    SCAN_PER_SLOT rows for each of the 60."""
    from mta.delivery.scheduler import SCAN_FIRST_SLOTS, SCAN_PER_SLOT
    pool = HoldingPool()
    reads: list[int] = []          # rows each read returned
    real_due = env.spool.due

    def due(now, limit, skip_domains=()):
        return real_due(now, limit, skip_domains).addCallback(
            lambda rows: reads.append(len(rows)) or rows)
    env.spool.due = due
    for i in range(100):
        put(env, rcpts=(f"r{i}@busy.test",))
    make_runner(env, pool, relay=RelayConfig(concurrency=40, per_destination=2))
    assert len(pool.pending) == 2
    del reads[:]
    pool.answer()
    assert len(pool.pending) == 2
    assert SCAN_FIRST_SLOTS * SCAN_PER_SLOT <= 16      # (the backlog is 96 rows)
    assert reads and sum(reads) <= SCAN_FIRST_SLOTS * SCAN_PER_SLOT, reads
    while pool.pending:
        pool.answer()
    assert env.spool.sql("SELECT COUNT(*) FROM recipients") == [(0,)]


def test_the_due_read_leaves_out_domains_exactly(tmp_path):
    """skip_domains is matched on the address's end, ASCII case-insensitive,
    with LIKE's wildcards escaped (``a_b.test`` leaves out no ``axb.test``)."""
    spool = SyncSpool(tmp_path / "spool.sqlite")
    addrs = ["u@a_b.test", "u@axb.test", "u@A_B.TEST", "u@sub.a_b.test", "a_b.test@c.test"]
    for a in addrs:
        spool.store(InboundMessage(
            queue_id=new_queue_id(1.0), sender="s@x.test", recipients=[Recipient(a)],
            headers=b"", body=b"", arrival=1.0, client_address="127.0.0.1", helo="h",
            protocol="ESMTP", size=0))
    rows = spool.due(2.0, 100, ["a_b.test"])
    got = sorted(r.address for r in (rows.result if hasattr(rows, "result") else rows))
    assert got == ["a_b.test@c.test", "u@axb.test", "u@sub.a_b.test"]


def test_a_pass_reads_what_it_can_start_not_the_backlog(env):
    """With 200 messages due and 2 free slots, a pass reads a few rows per
    slot (not concurrency x recipient_limit); a message with more recipients
    than that still travels in one transaction."""
    from mta.delivery.scheduler import AHEAD, SCAN_PER_SLOT
    limits: list[int] = []
    real_due = env.spool.due

    def due(now, limit, skip_domains=()):
        limits.append(limit)
        return real_due(now, limit, skip_domains)
    env.spool.due = due
    big = put(env, rcpts=tuple(f"r{i}@dest.test" for i in range(30)))
    for _ in range(200):
        put(env)
    runner = env.make(relay=RelayConfig(concurrency=2, per_destination=2))
    # The first pass: 2 slots, each with AHEAD transactions waiting: 16 rows
    # read, then more (the big message's 30 recipients fill one) -- never 4 x 50.
    slots = 2 * (1 + AHEAD)
    assert limits[0] == slots * SCAN_PER_SLOT
    assert max(limits) <= slots * RelayConfig().recipient_limit
    assert sorted(len(m.recipients) for _h, m in env.pool.calls)[-1] == 30
    assert [m.queue_id for _h, m in env.pool.calls if len(m.recipients) == 30] == [big]
    for _ in range(400):               # the passes that each finished delivery starts
        env.clock.advance(0)
    assert env.spool.sql("SELECT COUNT(*) FROM messages WHERE sender != ''") == [(0,)]
    assert len(env.pool.calls) == 201 and max(limits) <= slots * RelayConfig().recipient_limit
    runner.stopService()
