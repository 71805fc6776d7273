"""The courier interface (mta.delivery.types): one Outcome per recipient,
the kind decided once, the scheduler routing recipients to several
couriers, and the layers (mta/smtp/ knows nothing of mta/delivery/)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
from twisted.internet import defer

from test_scheduler import FakePool, FakeRouter, dsns, env, put, smtp  # noqa: F401 (fixture)

from mta.config import RelayConfig, RetryConfig
from mta.delivery.router import RouteError
from mta.delivery.scheduler import QueueRunner
from mta.delivery.smtp_courier import SMTPCourier
from mta.delivery.types import NextHop, Outcome, Route, reply_kind
from mta.message import QueuedMessage, QueuedRecipient

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("code,kind", [(250, "delivered"), (251, "delivered"),
                                       (451, "temporary"), (421, "temporary"),
                                       (354, "temporary"), (550, "permanent"),
                                       (554, "permanent")])
def test_reply_kind_is_the_one_classification(code, kind):
    assert reply_kind(code) == kind
    assert Outcome.from_reply(code, "x.0.0", f"{code} text", None).kind == kind


def test_our_outcomes_have_the_reply_form():
    o = Outcome.ours("5.1.10", "null MX")
    assert (o.kind, o.code, o.text, o.detail, o.remote) == (
        "permanent", 550, "550 5.1.10 null MX", "null MX", None)
    o = Outcome.ours("4.4.3", "DNS timeout")
    assert (o.kind, o.code, o.text) == ("temporary", 451, "451 4.4.3 DNS timeout")
    assert RouteError("5.1.2", "x").permanent and not RouteError("4.4.3", "x").permanent


def test_smtp_courier_gives_one_outcome_per_recipient_in_order():
    pool = FakePool()
    pool.script["b@d.test"] = [(550, "5.1.1")]
    courier = SMTPCourier(FakeRouter(), pool, hostname="me.test")
    msg = QueuedMessage("Q1", "a@s.test", b"Subject: x\r\n\r\n", b"hi\r\n", 0.0)
    rcpts = [QueuedRecipient(1, "Q1", "a@d.test"), QueuedRecipient(2, "Q1", "b@d.test"),
             QueuedRecipient(3, "Q1", "postmaster")]
    got = courier.deliver(msg, rcpts, "d.test")
    outcomes = got.result
    assert [o.kind for o in outcomes] == ["delivered", "permanent", "delivered"]
    assert [o.relay for o in outcomes] == ["mx.dest.test[127.0.0.1]:25"] * 3
    assert outcomes[1].text == "550 5.1.1 reply for b@d.test"
    # a bare postmaster goes out with our host name
    assert [r.address for r in pool.calls[0][1].recipients] == [
        "a@d.test", "b@d.test", "postmaster@me.test"]


def test_smtp_courier_route_error_is_our_outcome():
    router = FakeRouter()
    router.errors["null.test"] = RouteError("5.1.10", "null MX")
    courier = SMTPCourier(router, FakePool(), hostname="me.test")
    msg = QueuedMessage("Q1", "a@s.test", b"\r\n", b"", 0.0)
    [o] = courier.deliver(msg, [QueuedRecipient(1, "Q1", "x@null.test")], "null.test").result
    assert (o.kind, o.text, o.remote) == ("permanent", "550 5.1.10 null MX", None)


class FakeLocalCourier:
    """A courier of another kind: records what it got, delivers finally."""

    def __init__(self, fail: set[str] = frozenset()):
        self.calls: list = []
        self.fail = fail
        self.closed = False

    def deliver(self, message, recipients, destination):
        self.calls.append((message, [r.address for r in recipients], destination))
        return defer.succeed([
            Outcome.ours("5.1.1", "no such mailbox", relay="local") if r.address in self.fail
            else Outcome.from_reply(250, "2.0.0", "250 2.0.0 delivered to Maildir", None,
                                    relay="local", final=True)
            for r in recipients])

    def close(self):
        self.closed = True


class LocalRouter(FakeRouter):
    """Routes local.test to the "local" courier, the rest to SMTP by domain."""

    def route_for(self, domain):
        return Route("local", "maildir") if domain == "local.test" else Route("smtp", domain)


def test_scheduler_groups_by_route_and_uses_each_routes_courier(env):
    router, local = LocalRouter(), FakeLocalCourier(fail={"nobody@local.test"})
    couriers = {**smtp(router, env.pool), "local": local}
    qid = put(env, rcpts=("u1@local.test", "bob@dest.test", "nobody@local.test",
                          "u2@local.test"), notify="SUCCESS,FAILURE")
    env.pool.dsn_offered = True
    runner = QueueRunner(env.spool, router, couriers, hostname="mx.example.test",
                         retry=RetryConfig(first=300, max=3600, lifetime=86400),
                         relay=RelayConfig(), reactor=env.clock, rand=lambda: 0.5)
    runner.startService()
    # One call to the local courier with its three recipients, in order; one SMTP call.
    assert [(rcpts, dest) for _m, rcpts, dest in local.calls] == [
        (["u1@local.test", "nobody@local.test", "u2@local.test"], "maildir")]
    assert local.calls[0][0].queue_id == qid and local.calls[0][0].body == b"hello\r\n"
    assert [[r.address for r in m.recipients] for _h, m in env.pool.calls] == [["bob@dest.test"]]
    assert env.spool.sql("SELECT COUNT(*) FROM messages WHERE queue_id = ?", qid) == [(0,)]
    # One report per kind: "delivered" for the final deliveries (the DSN hop owes bob's),
    # "failed" for the unknown mailbox.
    from test_scheduler import actions
    found = {tuple(sorted(actions(m).items())) for _to, m in dsns(env)}
    assert found == {(("u1@local.test", "delivered"), ("u2@local.test", "delivered")),
                     (("nobody@local.test", "failed"),)}
    runner.stopService()
    assert local.closed and env.pool.closed


def test_a_route_to_a_missing_courier_defers(env):
    class Nowhere(FakeRouter):
        def route_for(self, domain):
            return Route("lmtp", "x")
    router = Nowhere()
    put(env)
    runner = QueueRunner(env.spool, router, smtp(router, env.pool), hostname="mx.example.test",
                         retry=RetryConfig(first=300, max=3600, lifetime=86400),
                         relay=RelayConfig(), reactor=env.clock, rand=lambda: 0.5)
    runner.startService()
    assert env.spool.sql("SELECT state, last_reply FROM recipients") == [
        ("deferred", "451 4.3.5 no courier 'lmtp' configured")]
    assert env.pool.calls == []


def _imports(path: Path) -> set[str]:
    """The modules *path* imports, resolved to absolute names."""
    pkg = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = pkg.split(".")
            if node.level:
                base = base[:len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.add(name)
    return out


@pytest.mark.parametrize("layer,forbidden", [("mta/smtp", ("mta.delivery", "mta.spool",
                                                           "mta.config")),
                                             ("mta/spool", ("mta.delivery",))])
def test_layers_point_one_way(layer, forbidden):
    for path in sorted((ROOT / layer).glob("*.py")):
        bad = [m for m in _imports(path) if m.startswith(forbidden)]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_next_hop_is_one_type_for_router_client_and_couriers():
    from mta.delivery import router
    from mta.smtp import client, types
    assert router.NextHop is client.NextHop is types.NextHop is NextHop
