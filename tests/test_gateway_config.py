"""``[gateway]``: the configuration of hold domains and ETRN, the relay
policy's answers for them, the spool's release operation and the hold
courier's reply."""
from __future__ import annotations

import pytest
from sqlalchemy import create_engine

from mta.address import parse_path
from mta.config import ConfigError, GatewayConfig, config_from_dict
from mta.delivery.hold_courier import HoldCourier
from mta.message import InboundMessage, QueuedMessage, QueuedRecipient, Recipient
from mta.policy import RelayPolicy
from mta.spool import admin, ops
from mta.spool.interface import Release, is_released
from mta.spool.schema import metadata


def test_defaults():
    c = config_from_dict({})
    assert c.gateway == GatewayConfig(hold_domains=(), etrn_networks=None)
    assert c.etrn_networks == c.policy.relay_networks


def test_etrn_networks_default_to_relay_networks():
    c = config_from_dict({"policy": {"relay_networks": ["10.0.0.0/8"]}})
    assert c.etrn_networks == ("10.0.0.0/8",)
    c = config_from_dict({"policy": {"relay_networks": ["10.0.0.0/8"]},
                          "gateway": {"etrn_networks": ["192.0.2.7/24"]}})
    assert c.etrn_networks == ("192.0.2.0/24",)
    assert config_from_dict({"gateway": {"etrn_networks": []}}).etrn_networks == ()


def test_hold_domains_are_normalised():
    c = config_from_dict({"gateway": {"hold_domains": ["Branch.Example.", "straße.de",
                                                       "branch.example"]}})
    assert c.gateway.hold_domains == ("branch.example", "xn--strae-oqa.de")


@pytest.mark.parametrize("gateway, message", [
    ({"hold_domains": [".branch.example"]}, "[gateway] hold_domains: invalid domain "
     "'.branch.example': list each hold domain by its name"),
    ({"hold_domains": ["[192.0.2.1]"]}, "[gateway] hold_domains: invalid domain"),
    ({"hold_domains": "branch.example"}, "[gateway] hold_domains: expected a list"),
    ({"etrn_networks": ["192.0.2.300/24"]}, "[gateway] etrn_networks: invalid network"),
    ({"hold": []}, "[gateway] hold: unknown key"),
])
def test_bad_values_are_one_line_errors(gateway, message):
    with pytest.raises(ConfigError) as e:
        config_from_dict({"gateway": gateway})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_hold_domain_cannot_be_local():
    with pytest.raises(ConfigError, match=r"\[gateway\] hold_domains: a\.example is also a "
                                          "local domain"):
        config_from_dict({"gateway": {"hold_domains": ["a.example"]},
                          "local": {"domains": ["a.example"]}})
    with pytest.raises(ConfigError, match="also a local domain"):
        config_from_dict({"server": {"hostname": "mx.a.example"},
                          "gateway": {"hold_domains": ["MX.a.example"]}})


def test_hold_domains_are_accepted_from_anyone():
    policy = RelayPolicy(["127.0.0.0/8"], [], hold_domains=["branch.example"])
    assert policy.check_recipient(parse_path("<bob@Branch.Example>"), client_ip="192.0.2.1") \
        is None
    refusal = policy.check_recipient(parse_path("<bob@x.branch.example>"), client_ip="192.0.2.1")
    assert refusal is not None and refusal.code == 554
    refusal = policy.check_recipient(parse_path("<a%b@branch.example>"), client_ip="192.0.2.1")
    assert refusal is not None and refusal.code == 554       # routing characters


def test_etrn_refusal():
    policy = RelayPolicy([], ["relay.example"], hold_domains=["branch.example"],
                         etrn_networks=["192.0.2.0/24"], routed=["routed.example"])
    assert policy.etrn_refusal("192.0.2.9", "branch.example") is None
    assert policy.etrn_refusal("::ffff:192.0.2.9", "routed.example") is None
    assert policy.etrn_refusal("192.0.2.9", "relay.example") is None
    assert policy.etrn_refusal("198.51.100.1", "branch.example") == \
        "client not in [gateway] etrn_networks"
    assert policy.etrn_refusal("192.0.2.9", "other.example") == "not a domain served here"
    assert policy.etrn_refusal("192.0.2.9", "example", subdomains=True) is None
    assert RelayPolicy([], [], hold_domains=["b.example"]).etrn_refusal(
        "127.0.0.1", "b.example") is not None                # no etrn_networks: nobody


def test_hold_courier_answers_temporarily_without_a_connection():
    courier = HoldCourier(hostname="mx.example")
    m = QueuedMessage("Q1", "a@example.org", b"", b"", 0.0)
    rcpts = [QueuedRecipient(1, "Q1", "bob@branch.example"),
             QueuedRecipient(2, "Q1", "dan@branch.example")]
    got = []
    courier.deliver(m, rcpts, "branch.example").addCallback(got.append)
    [outcomes] = got
    assert [(o.kind, o.code, o.status, o.text, o.remote) for o in outcomes] == [
        ("temporary", 451, "4.3.2", "451 4.3.2 waiting for ETRN/ATRN for branch.example",
         None)] * 2


def test_release_domain(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'spool.sqlite'}")
    metadata.create_all(engine)
    msgs = [InboundMessage(queue_id=f"Q{i}", sender="a@example.org",
                           recipients=[Recipient(a) for a in rcpts], headers=b"", body=b"",
                           arrival=100.0, client_address="127.0.0.1", helo="c",
                           protocol="ESMTP", size=0)
            for i, rcpts in enumerate([("a@branch.example", "b@x.branch.example"),
                                       ("c@branch.example", "d@relay.example"),
                                       ("e@branch.example",)])]
    with engine.begin() as conn:
        ops.insert_messages(conn, msgs)
        conn.exec_driver_sql("UPDATE recipients SET state='deferred', next_attempt=999")
        admin.hold_messages(conn, ["Q2"])
        rel = ops.release_domain(conn, "branch.example", False, 200.0, "mx.example",
                                 "ETRN from 192.0.2.7")
        assert rel == Release(2, 2, ("branch.example",))
        rows = conn.exec_driver_sql("SELECT address, state, next_attempt, last_reply "
                                    "FROM recipients ORDER BY id").fetchall()
        assert [tuple(r) for r in rows] == [
            ("a@branch.example", "deferred", 200.0, "released for delivery (ETRN from 192.0.2.7)"),
            ("b@x.branch.example", "deferred", 999.0, None),
            ("c@branch.example", "deferred", 200.0, "released for delivery (ETRN from 192.0.2.7)"),
            ("d@relay.example", "deferred", 999.0, None),
            ("e@branch.example", "held", 999.0, None)]
        rel = ops.release_domain(conn, "branch.example", True, 300.0, "mx.example", "ETRN")
        assert rel == Release(2, 3, ("branch.example", "x.branch.example"))
        assert conn.exec_driver_sql("SELECT next_attempt, last_reply FROM recipients "
                                    "WHERE address = 'b@x.branch.example'").one() == (
                                        300.0, "released for delivery (ETRN)")
        assert is_released(QueuedRecipient(1, "Q0", "a@branch.example",
                                           last_reply="released for delivery (ETRN)"))
