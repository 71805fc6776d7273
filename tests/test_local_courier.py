"""The local courier (mta/delivery/local_courier.py), the local directory
(mta/local/directory.py), the RCPT-time policy for local domains and the
``[local]`` configuration -- without a daemon: real Maildirs in a temp
dir, a scripted LMTP server object implementing the courier's LMTP
interface, and the policy answering as the server would reply."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock

from mta.address import Mailbox
from mta.config import ConfigError, config_from_dict
from mta.delivery.local_courier import LocalCourier
from mta.delivery.router import Router
from mta.delivery.types import Route
from mta.local.directory import LocalDirectory
from mta.local.result import LocalResult
from mta.message import QueuedMessage, QueuedRecipient
from mta.policy import RelayPolicy

HOST = "mx.local.test"
MSG = QueuedMessage(queue_id="Q1", sender="alice@origin.test",
                    headers=b"Subject: hi\r\n\r\n", body=b"body\r\n.dot\r\n", arrival=0.0)


def rcpts(*addresses: str, notify: str | None = None) -> list[QueuedRecipient]:
    return [QueuedRecipient(id=i, queue_id="Q1", address=a, notify=notify)
            for i, a in enumerate(addresses, 1)]


class ScriptedLMTP:
    """Per-mailbox results, as an LMTP server gives one reply per recipient."""
    destination = "unix:/run/test/lmtp"

    def __init__(self, results: dict[str, tuple[int, str]]):
        self.results = results
        self.calls: list[list[str]] = []

    def deliver(self, sender, recipients, content, *, body_type=None, smtputf8=False):
        self.calls.append(list(recipients))
        out = []
        for r in recipients:
            code, status = self.results.get(r, (250, "2.0.0"))
            out.append(LocalResult.make(code, status, f"<{r}> result", self.destination))
        return defer.succeed(out)


def directory(tmp: Path, aliases: str = "", mailboxes: str | None = "bob\ncarol\n",
              configured: bool = True) -> LocalDirectory:
    (tmp / "aliases").write_text(aliases)
    if mailboxes is not None:
        (tmp / "mailboxes").write_text(mailboxes)
    return LocalDirectory(hostname=HOST, domains=["example.org", "Stra\u00dfe.de"],
                          aliases=str(tmp / "aliases"),
                          mailboxes=str(tmp / "mailboxes") if mailboxes is not None else None,
                          configured=configured)


def courier(tmp: Path, d: LocalDirectory, lmtp=None) -> LocalCourier:
    return LocalCourier(d, maildir=str(tmp / "mail" / "{domain}" / "{user}"), hostname=HOST,
                        reactor=None, lmtp=lmtp, run_in_thread=defer.maybeDeferred)


def result(d: defer.Deferred):
    out = []
    d.addCallback(out.append)
    assert out, "the courier did not finish"
    return out[0]


# -- the directory and the policy ------------------------------------------------

def test_local_domains_and_users(tmp_path):
    d = directory(tmp_path, aliases="team: bob, x@remote.test\n")
    assert d.is_local("example.org") and d.is_local("EXAMPLE.org.")
    assert d.is_local("xn--strae-oqa.de") and d.is_local("stra\u00dfe.de")
    assert d.is_local(HOST) and d.is_local("")          # the hostname; a bare postmaster
    assert not d.is_local("remote.test") and not d.is_local("[127.0.0.1]")
    assert d.exists("bob", "example.org") and d.exists("Team", "example.org")
    assert d.exists("postmaster", "example.org")         # always, not in the mailboxes file
    assert not d.exists("nobody", "example.org")


def test_a_routed_hostname_is_not_local(tmp_path):
    d = LocalDirectory(hostname=HOST, routed=[HOST])
    assert not d.is_local(HOST)


def test_without_local_section_only_postmaster_and_root(tmp_path):
    d = LocalDirectory(hostname=HOST, configured=False)
    assert d.is_local(HOST) and not d.is_local("example.org")
    assert d.exists("postmaster", HOST) and d.exists("root", HOST) and d.exists("ROOT", HOST)
    assert not d.exists("bob", HOST)


def test_policy_replies_for_local_recipients(tmp_path):
    d = directory(tmp_path)
    policy = RelayPolicy([], [], local=d)        # a stranger: may not relay
    ask = lambda box: policy.check_recipient(box, client_ip="192.0.2.7")  # noqa: E731
    assert ask(Mailbox("bob", "example.org")) is None
    assert ask(Mailbox("postmaster", "")) is None
    assert ask(Mailbox("Postmaster", HOST)) is None
    unknown = ask(Mailbox("nobody", "example.org"))
    assert (unknown.code, unknown.status, unknown.reason) == (550, "5.1.1", "unknown_user")
    denied = ask(Mailbox("bob", "remote.test"))
    assert (denied.code, denied.status, denied.reason) == (554, "5.7.1", "relay_denied")
    # The mailboxes file cannot be read now: try again later, do not bounce.
    os.unlink(tmp_path / "mailboxes")
    later = ask(Mailbox("bob", "example.org"))
    assert (later.code, later.status, later.reason) == (451, "4.3.0", "lookup_failed")
    assert ask(Mailbox("postmaster", "example.org")) is None


def test_router_sends_local_domains_to_the_local_courier(tmp_path):
    d = directory(tmp_path)
    router = Router(is_local=d.is_local, routes={"remote.test": "127.0.0.1:2525"},
                    reactor=MemoryReactorClock())
    assert router.route_for("example.org") == Route("local", "local")
    assert router.route_for(HOST) == Route("local", "local")
    assert router.route_for("remote.test").courier == "smtp"


# -- the courier -----------------------------------------------------------------

def test_maildir_delivery_per_recipient(tmp_path):
    d = directory(tmp_path)
    c = courier(tmp_path, d)
    out = result(c.deliver(MSG, rcpts("bob@example.org", "nobody@example.org", "postmaster"),
                           "local"))
    assert [o.kind for o in out] == ["delivered", "permanent", "delivered"]
    assert out[0].final and out[0].remote is None and out[0].relay == "local"
    assert out[1].status == "5.1.1"
    [f] = (tmp_path / "mail" / "example.org" / "bob" / "new").iterdir()
    assert f.read_bytes() == (b"Return-Path: <alice@origin.test>\nDelivered-To: bob@example.org\n"
                              b"Subject: hi\n\nbody\n.dot\n")
    assert len(list((tmp_path / "mail" / HOST / "postmaster" / "new").iterdir())) == 1


def test_alias_outcome_expanded_with_forward(tmp_path):
    d = directory(tmp_path, aliases="team: bob, carol, x@remote.test, y@remote.test\n"
                                    "one: x@remote.test\n")
    c = courier(tmp_path, d)
    team, one = result(c.deliver(MSG, rcpts("team@example.org", "one@example.org",
                                            notify="SUCCESS"), "local"))
    assert team.kind == "delivered" and team.expanded and team.final
    assert team.forward == ("x@remote.test", "y@remote.test")
    assert team.forward_notify is None and team.forward_orcpt is None
    assert one.kind == "delivered" and not one.expanded and one.dsn_passed
    assert one.forward == ("x@remote.test",)
    assert one.forward_notify == "SUCCESS" and one.forward_orcpt == "rfc822;one@example.org"


def test_lmtp_per_recipient_results_and_one_copy_per_mailbox(tmp_path):
    d = directory(tmp_path, aliases="team: bob, carol\n")
    lmtp = ScriptedLMTP({"carol@example.org": (452, "4.2.2")})
    c = courier(tmp_path, d, lmtp)
    bob, carol, team = result(c.deliver(
        MSG, rcpts("bob@example.org", "carol@example.org", "team@example.org"), "local"))
    # One transaction, each mailbox once.
    assert lmtp.calls == [["bob@example.org", "carol@example.org"]]
    assert bob.kind == "delivered" and bob.remote is not None
    assert bob.relay == "lmtp[unix:/run/test/lmtp]"
    # A 452 for carol defers only carol -- and the alias that contains her.
    assert carol.kind == "temporary" and carol.status == "4.2.2"
    assert team.kind == "temporary"


def test_alias_problems(tmp_path):
    d = directory(tmp_path, aliases="a: b\nb: a\npipe: |/bin/true\nmixed: bob, |/bin/true\n")
    c = courier(tmp_path, d)
    loop, pipe, mixed = result(c.deliver(
        MSG, rcpts("a@example.org", "pipe@example.org", "mixed@example.org"), "local"))
    assert (loop.kind, loop.status) == ("permanent", "5.4.6")
    assert (pipe.kind, pipe.status) == ("permanent", "5.3.5")
    assert mixed.kind == "delivered"     # bob got it; the pipe is logged as not delivered
    os.unlink(tmp_path / "aliases")
    [later] = result(c.deliver(MSG, rcpts("bob@example.org"), "local"))
    assert (later.kind, later.status) == ("temporary", "4.3.0")


# -- configuration -------------------------------------------------------------------

def test_local_config():
    c = config_from_dict({"local": {"domains": ["Example.ORG"], "lmtp": "unix:/run/lmtp"}})
    assert c.local.domains == ("example.org",) and c.local.lmtp == "unix:/run/lmtp"
    assert c.local.maildir == "mail/{domain}/{user}"
    assert config_from_dict({}).local is None
    for table, where in [({"maildir": "/var/mail/{nobody}"}, "[local] maildir"),
                         ({"lmtp": "smtp:host"}, "[local] lmtp"),
                         ({"domains": [".example.org"]}, "[local] domains"),
                         ({"mailbox": "x"}, "[local] mailbox")]:
        with pytest.raises(ConfigError) as e:
            config_from_dict({"local": table}, "t.toml")
        assert str(e.value).startswith(f"t.toml: {where}: "), str(e.value)
    with pytest.raises(ConfigError, match=r"\[local\] domains: example.org also has a \[routes\]"):
        config_from_dict({"local": {"domains": ["example.org"]},
                          "routes": {"example.org": "127.0.0.1:25"}}, "t.toml")
