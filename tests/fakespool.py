"""The tests' spool: :class:`SyncSpool` is mta.spool.interface.SpoolInterface
run synchronously (each call one transaction, its Deferred already fired)
on a real SQLite file (or a PostgreSQL database, given its URL), through
the same mta.spool.ops as the real Spool --
for the queue runner, the gauges and the lifecycle tests, with a task.Clock
and no threads.  tests/test_spool_interface.py checks that its methods are
the interface's, signature for signature, as the real Spool's are."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import IService
from twisted.internet import defer
from twisted.internet.defer import Deferred

from mta.message import InboundMessage, QueuedRecipient
from mta.spool import make_engine, ops
from mta.spool.interface import Claimed, QueueSummary, RecipientUpdate, Release
from mta.spool.schema import prepare


class SyncSpool:
    """The spool's interface, run synchronously on a real SQLite file (a
    path) or database (a ``postgresql+psycopg://`` URL), claiming as *node*."""

    def __init__(self, path: Any, *, node: str = "test-node", lease: float = 300.0):
        self.url = str(path) if str(path).startswith("postgresql") else f"sqlite:///{path}"
        self.node = node
        self.lease = lease
        self.engine = make_engine(self.url)
        with self.engine.begin() as conn:
            prepare(conn)

    # -- how each call runs (FlakySpool in test_scheduler overrides _write) ---------
    def _write(self, fn: Callable[..., Any], *args: Any) -> Deferred:
        with self.engine.begin() as conn:
            return defer.succeed(fn(conn, *args))

    def _run(self, fn: Callable[..., Any], *args: Any) -> Deferred:
        with self.engine.begin() as conn:
            return defer.succeed(fn(conn, *args))

    # -- mta.spool.interface.SpoolInterface --------------------------------------------
    def store(self, msg: InboundMessage) -> Deferred[str]:
        return self._write(ops.insert_messages, [msg]).addCallback(lambda _: msg.queue_id)

    def recover_inflight(self, now: float) -> Deferred[int]:
        return self._write(ops.recover_inflight, self.node, now)

    def due(self, now: float, limit: int,
            skip_domains: Sequence[str] = ()) -> Deferred[list[QueuedRecipient]]:
        return self._run(ops.due_recipients, now, limit, self.node, list(skip_domains))

    def claim_and_load(self, rids: Sequence[int], now: float) -> Deferred[Claimed]:
        return self._write(ops.claim_and_load, list(rids), self.node, now, now + self.lease)

    def renew(self, now: float) -> Deferred[int]:
        return self._write(ops.renew_leases, self.node, now + self.lease)

    def claim_domains(self, domains: Sequence[str], hostname: str,
                      now: float) -> Deferred[Claimed]:
        return self._write(ops.claim_domains, list(domains), hostname, self.node, now,
                           now + self.lease)

    def record(self, updates: Sequence[RecipientUpdate], new_messages: Sequence[InboundMessage],
               finished: Sequence[str]) -> Deferred[list[str]]:
        return self._write(ops.record_results, list(updates), list(new_messages),
                           list(finished), self.node)

    def record_again(self, updates: Sequence[RecipientUpdate],
                     new_messages: Sequence[InboundMessage],
                     finished: Sequence[str]) -> Deferred[list[str]]:
        return self._write(ops.record_results_again, list(updates), list(new_messages),
                           list(finished), self.node)

    def requeue(self, rids: Sequence[int]) -> Deferred[int]:
        return self._write(ops.requeue_inflight, list(rids), self.node)

    def release(self, domain: str, subdomains: bool, *, now: float, hostname: str,
                how: str) -> Deferred[Release]:
        return self._write(ops.release_domain, domain, subdomains, now, hostname, how)

    def summary(self) -> Deferred[QueueSummary]:
        return self._run(ops.queue_summary)

    def free_space(self, *, minfree: int,
                   max_message_size: int) -> Callable[[int], bool] | None:
        return None

    def listener(self, on_wake: Callable[[], object]) -> IService | None:
        return None            # the tests kick the runner themselves

    # -- for the tests ------------------------------------------------------------------
    def sql(self, query: str, *args: Any) -> list[tuple]:
        """Run *query* (``?`` placeholders) in its own transaction; its rows."""
        if self.engine.dialect.name == "postgresql":
            query = query.replace("%", "%%").replace("?", "%s")
        with self.engine.begin() as c:
            res = c.exec_driver_sql(query, tuple(args))
            return [tuple(r) for r in res] if res.returns_rows else []
