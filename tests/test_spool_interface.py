"""The spool's interface (mta.spool.interface) and what implements it: the
real Spool, the tests' SyncSpool and the server tests' MessageStore fakes
have exactly the Protocol's methods, signature for signature (annotations
included), so a fake cannot drift from the real thing; and the real Spool
answers each method with the typed record it promises."""
from __future__ import annotations

import inspect
import shutil
import tempfile
from typing import Protocol

import pytest
from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from fakespool import SyncSpool
from test_fuzz_server import ControlledSpool
from smtpwire import FakeSpool, RaisingSpool

from mta.message import InboundMessage, MessageStore, QueuedMessage, QueuedRecipient, Recipient
from mta.spool import Spool
from mta.spool.admin import SpoolAdmin
from mta.spool.interface import (Changed, Claimed, DeliveryQueue, Flushed, ListedMessage,
                                 MessageChange, QueueAdmin, QueueStats, QueueSummary,
                                 RecipientUpdate, SpoolInterface)


def _is_protocol(klass: type) -> bool:
    return klass is not Protocol and bool(getattr(klass, "_is_protocol", False))


def protocol_methods(proto: type) -> dict[str, inspect.Signature]:
    """The methods *proto* declares (with those of the protocols it extends)."""
    out = {}
    for klass in reversed(proto.__mro__):
        if not _is_protocol(klass):
            continue
        for name, value in vars(klass).items():
            if not name.startswith("_") and inspect.isfunction(value):
                out[name] = inspect.signature(value, eval_str=True)
    return out


def public_methods(cls: type) -> dict[str, inspect.Signature]:
    """The public methods *cls* defines itself (not a Protocol's stub)."""
    out = {}
    for klass in reversed(cls.__mro__):
        if klass is object or _is_protocol(klass):
            continue
        for name, value in vars(klass).items():
            if not name.startswith("_") and inspect.isfunction(value):
                out[name] = inspect.signature(value, eval_str=True)
    return out


CASES = [
    (SpoolInterface, Spool, {"open", "start", "stop", "count_messages"}),
    (SpoolInterface, SyncSpool, {"sql"}),
    (MessageStore, FakeSpool, {"fire", "fail"}),
    (MessageStore, ControlledSpool, {"release"}),
    (MessageStore, RaisingSpool, set()),
    (QueueAdmin, SpoolAdmin, set()),
]


def differences(proto: type, cls: type, own: set[str]) -> list[str]:
    """How *cls* differs from *proto*: methods missing, methods beyond the
    Protocol's and *own* (the implementation's alone: its lifecycle, what a
    test reads back), signatures that are not the Protocol's."""
    want, have = protocol_methods(proto), public_methods(cls)
    out = [f"lacks {name}" for name in sorted(set(want) - set(have))]
    out += [f"has {name}" for name in sorted(set(have) - set(want) - own)]
    out += [f"{name}{have[name]} is not {name}{sig}" for name, sig in want.items()
            if name in have and have[name] != sig]
    return out


@pytest.mark.parametrize("proto,cls,own", CASES,
                         ids=[f"{c.__name__}-{p.__name__}" for p, c, _o in CASES])
def test_implementations_have_the_protocols_methods_and_signatures(proto, cls, own):
    assert differences(proto, cls, own) == []


def test_a_drifted_fake_is_found():
    class Drifted:
        def store(self, msg, now=None):
            return None

        def requeue(self, rids: list[int]) -> int:
            return 0

    assert differences(MessageStore, Drifted, set()) == [
        "has requeue", "store(self, msg, now=None) is not "
        "store(self, msg: mta.message.InboundMessage) -> twisted.internet.defer.Deferred[str]"]


def message(qid: str, now: float, *rcpts: str) -> InboundMessage:
    headers, body = b"Subject: t\r\n\r\n", b"hi\r\n"
    return InboundMessage(qid, "a@origin.test", [Recipient(r) for r in rcpts], headers, body,
                          now, "127.0.0.1", "client.test", "ESMTP", len(headers) + len(body))


class RealSpoolTests(unittest.TestCase):
    """The real Spool through its writer thread and pool, as the daemon
    uses it, on SQLite (this class) and PostgreSQL (the next)."""

    def spool_url(self) -> str:
        base = tempfile.mkdtemp(prefix="mta-test-")   # not trial's mktemp: the cwd
        self.addCleanup(shutil.rmtree, base, True)
        return f"sqlite:///{base}/mta.sqlite"

    @defer.inlineCallbacks
    def test_the_real_spool_answers_with_typed_records(self):
        spool = Spool(self.spool_url(), node="node-a", lease=300.0, reactor=reactor)
        spool.open()
        spool.start()
        self.addCleanup(threads.deferToThread, spool.stop)
        assert (yield spool.store(message("QID1", 100.0, "b@dest.test", "c@dest.test"))) == "QID1"
        assert (yield spool.recover_inflight(150.0)) == 0
        due = yield spool.due(200.0, 10)
        assert [type(r) for r in due] == [QueuedRecipient, QueuedRecipient]
        claimed = yield spool.claim_and_load([r.id for r in due], 200.0)
        assert isinstance(claimed, Claimed)
        rows, msgs = claimed
        assert [r.address for r in rows] == ["b@dest.test", "c@dest.test"]
        assert isinstance(msgs["QID1"], QueuedMessage) and msgs["QID1"].body == b"hi\r\n"
        assert (yield spool.renew(250.0)) == 2
        assert (yield spool.requeue([rows[1].id])) == 1
        assert (yield spool.summary()) == QueueSummary({"inflight": 1, "queued": 1}, 1, 100.0)
        done = RecipientUpdate(rows[0].id, "delivered", 1, 200.0, "250 ok")
        assert (yield spool.record([done], [], ["QID1"])) == []
        assert (yield spool.record_again([done], [], ["QID1"])) == []   # recorded already
        rest = (yield spool.claim_and_load([rows[1].id], 260.0)).recipients
        failed = RecipientUpdate(rest[0].id, "failed", 1, 200.0, "550 no")
        removed = yield spool.record([failed], [message("QID2", 200.0, "a@origin.test")],
                                     ["QID1"])
        assert removed == ["QID1"]
        assert (yield spool.summary()) == QueueSummary({"queued": 1}, 1, 200.0)
        assert (yield spool.count_messages()) == 1

    @defer.inlineCallbacks
    def test_records_of_one_batch_are_merged_each_with_its_owner_check(self):
        spool = Spool(self.spool_url(), node="node-a", lease=300.0, reactor=reactor)
        spool.open()
        spool.start()
        self.addCleanup(threads.deferToThread, spool.stop)
        yield defer.gatherResults([spool.store(message(f"Q{i}", 100.0, f"r{i}@dest.test"))
                                   for i in range(3)])
        rows = (yield spool.claim_and_load([r.id for r in (yield spool.due(200.0, 10))],
                                           200.0)).recipients
        assert len(rows) == 3
        # Three records at once: one group commit; each removes its message.
        got = yield defer.gatherResults([
            spool.record([RecipientUpdate(r.id, "delivered", 1, 200.0, "250 ok")], [],
                         [r.queue_id]) for r in rows])
        assert got == [[r.queue_id] for r in rows]
        assert (yield spool.count_messages()) == 0


class RealSpoolPostgresTests(RealSpoolTests):
    """The same on a private PostgreSQL (tests/pg.py)."""

    @pytest.fixture(autouse=True)
    def _database(self, pg_url):
        self._pg_url = pg_url

    def spool_url(self) -> str:
        return self._pg_url


@pytest.fixture(params=["sqlite", "postgresql"])
def spool_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'mta.sqlite'}"
    return request.getfixturevalue("pg_url")


def test_the_admin_answers_with_typed_records(spool_url):
    admin = SpoolAdmin.open(spool_url, hostname="mx.test", create=True)
    try:
        admin.submit([message("QID1", 100.0, "b@dest.test"), message("QID2", 100.0, "c@x.test")])
        listed = admin.list_messages(domain="dest.test")
        assert [type(m) for m in listed] == [ListedMessage]
        assert [r.address for r in listed[0].recipients] == ["b@dest.test"]
        assert listed[0].headers is None
        shown = admin.show("QID1")
        assert shown is not None and shown.body == b"hi\r\n"
        assert admin.hold(["QID1", "NOPE"]) == Changed((MessageChange("QID1", changed=1),),
                                                       ("NOPE",))
        stats = admin.stats(now=160.0)
        assert isinstance(stats, QueueStats) and stats.by_state["held"] == 1
        assert stats.oldest_age == 60.0
        assert admin.flush(now=200.0) == Flushed(1)
    finally:
        admin.close()
