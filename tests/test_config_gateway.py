"""``[gateway]`` ATRN keys (``atrn_listen``, ``[gateway.atrn]``): validated
once, each problem one line naming the key."""
from __future__ import annotations

import pytest

from mta.config import ConfigError, GatewayConfig, config_from_dict, load_config

AUTH = {"users_file": "etc/users"}


def test_default_is_off():
    assert config_from_dict({}).gateway == GatewayConfig(atrn_listen=(), atrn=())


def test_grants_are_domain_keys(tmp_path):
    path = tmp_path / "mta.toml"
    path.write_text('[auth]\nusers_file = "u"\n[gateway]\natrn_listen = ["tcp:366"]\n'
                    'hold_domains = ["branch.example", "xn--strae-oqa.test", "night.example"]\n'
                    '[gateway.atrn]\n"branch" = ["Branch.Example.", "stra\u00dfe.test"]\n'
                    '"night" = ["night.example"]\n', encoding="utf-8")
    g = load_config(path).gateway
    assert g.atrn_listen == ("tcp:366",)
    assert g.atrn_domains("branch") == ("branch.example", "xn--strae-oqa.test")
    assert g.atrn_domains("night") == ("night.example",)
    assert g.atrn_domains("someone") == ()


@pytest.mark.parametrize("data, message", [
    ({"gateway": {"atrn_listen": ["tcp:366"], "atrn": {"b": ["b.test"]}}},
     "<config>: [gateway] atrn_listen: ATRN needs AUTH: set [auth] users_file"),
    ({"auth": AUTH, "gateway": {"atrn_listen": ["tcp:366"]}},
     "<config>: [gateway] atrn_listen: no [gateway.atrn] table: nobody may take mail by ATRN"),
    ({"auth": AUTH, "gateway": {"atrn_listen": ["ssl:366"], "atrn": {"b": ["b.test"]}}},
     "<config>: [gateway] atrn_listen: 'ssl:366' is an implicit-TLS listener without "
     "privateKey=: set [tls] certificate and private_key"),
    ({"gateway": {"atrn_listen": ["nonsense:1"]}}, "[gateway] atrn_listen: invalid endpoint"),
    ({"gateway": {"atrn": {"a": ["x.test"], "b": ["X.test"]}}},
     "<config>: [gateway] atrn: b: x.test is already granted to a"),
    ({"gateway": {"atrn": {"a": [".x.test"]}}}, "no \".\" wildcard"),
    ({"gateway": {"atrn": {"a": []}}}, "<config>: [gateway] atrn: a: no domain listed"),
    ({"gateway": {"atrn": {"a": ["bad..name"]}}}, "[gateway] atrn: a: invalid domain"),
    ({"gateway": {"atrn": {"a:b": ["x.test"]}}}, "user 'a:b': user name contains ':'"),
    ({"gateway": {"atrn": ["x.test"]}}, "expected a table of user = [domains]"),
    ({"gateway": {"atrn_turn": True}}, "<config>: [gateway] atrn_turn: unknown key"),
    ({"gateway": {"hold_domains": ["a.test"], "atrn": {"u": ["a.test", "b.test"]}}},
     "<config>: [gateway.atrn] u: b.test is not in [gateway] hold_domains"),
])
def test_bad_gateway_values(data, message):
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    assert message in str(e.value)
    assert "\n" not in str(e.value)
