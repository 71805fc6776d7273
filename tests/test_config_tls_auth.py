"""The [tls] and [auth] sections, [server] submission, and implicit-TLS endpoints."""
from __future__ import annotations

import pytest

from mta.config import AuthConfig, ConfigError, TLSConfig, config_from_dict
from mta.config_values import implicit_tls_endpoint


def error_for(data, source="etc/mta.toml"):
    with pytest.raises(ConfigError) as info:
        config_from_dict(data, source)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults():
    config = config_from_dict({})
    assert config.tls == TLSConfig("", "", "1.2")
    assert not config.tls.enabled
    assert config.auth == AuthConfig("", False, 1.0, 5, 900.0)
    assert not config.auth.enabled


def test_contract_keys():
    config = config_from_dict({
        "server": {"submission": ["tcp:2587:interface=127.0.0.1"]},
        "tls": {"certificate": "etc/tls/cert.pem", "private_key": "etc/tls/key.pem",
                "min_version": "1.3"},
        "auth": {"users_file": "etc/users", "allow_plaintext_on_loopback": True,
                 "failure_delay": 0.5, "max_failures": 0,
                 "lockout": "1h"},
    })
    assert config.server.submission == ("tcp:2587:interface=127.0.0.1",)
    assert config.tls == TLSConfig("etc/tls/cert.pem", "etc/tls/key.pem", "1.3")
    assert config.tls.enabled
    assert config.auth == AuthConfig("etc/users", True, 0.5, 0, 3600.0)


def test_failure_delay_may_be_zero():
    assert config_from_dict({"auth": {"failure_delay": 0}}).auth.failure_delay == 0.0
    assert config_from_dict({"auth": {"failure_delay": "0"}}).auth.failure_delay == 0.0


@pytest.mark.parametrize("data, expected", [
    ({"tls": {"certificate": "c.pem"}},
     "etc/mta.toml: [tls] private_key: must be set when certificate is set"),
    ({"tls": {"private_key": "k.pem"}},
     "etc/mta.toml: [tls] certificate: must be set when private_key is set"),
    ({"tls": {"min_version": "1.1"}},
     "etc/mta.toml: [tls] min_version: expected one of '1.2', '1.3', got '1.1'"),
    ({"tls": {"certificate": 5}}, "etc/mta.toml: [tls] certificate: expected a string, got 5"),
    ({"tls": {"ciphers": "ALL"}}, "etc/mta.toml: [tls] ciphers: unknown key"),
    ({"auth": {"users_file": ["x"]}},
     "etc/mta.toml: [auth] users_file: expected a string, got ['x']"),
    ({"auth": {"allow_plaintext_on_loopback": "yes"}},
     "etc/mta.toml: [auth] allow_plaintext_on_loopback: expected true or false, got 'yes'"),
    ({"auth": {"max_failures": -1}}, "etc/mta.toml: [auth] max_failures: must be at least 0, got -1"),
    ({"auth": {"lockout": 0}}, "etc/mta.toml: [auth] lockout: must be greater than zero, got 0"),
    ({"server": {"listen": ["ssl:2465"]}},
     "etc/mta.toml: [server] listen: 'ssl:2465' is an implicit-TLS listener without "
     "privateKey=: set [tls] certificate and private_key"),
    ({"server": {"submission": ["ssl:2465:interface=127.0.0.1"]}},
     "etc/mta.toml: [server] submission: 'ssl:2465:interface=127.0.0.1' is an implicit-TLS "
     "listener without privateKey=: set [tls] certificate and private_key"),
])
def test_errors(data, expected):
    assert error_for(data) == expected


def test_ssl_endpoint_without_key_uses_tls_section():
    config = config_from_dict({"server": {"listen": ["ssl:2465:interface=127.0.0.1"]},
                               "tls": {"certificate": "c.pem", "private_key": "k.pem"}})
    assert config.server.listen == ("ssl:2465:interface=127.0.0.1",)


def test_ssl_endpoint_options_without_key():
    message = error_for({"server": {"listen": ["ssl:2465:extraCertChain=chain.pem"]},
                         "tls": {"certificate": "c.pem", "private_key": "k.pem"}})
    assert message.startswith("etc/mta.toml: [server] listen: invalid endpoint "
                              "'ssl:2465:extraCertChain=chain.pem': ValueError: extraCertChain= "
                              "needs privateKey=")


@pytest.mark.parametrize("description, expected", [
    ("ssl:465", "tcp:465"),
    ("ssl:465:interface=127.0.0.1:backlog=5", "tcp:465:interface=127.0.0.1:backlog=5"),
    ("ssl:port=465:interface=\\:\\:1", "tcp:port=465:interface=\\:\\:1"),
    ("ssl:465:privateKey=server.pem", None),
    ("ssl:465:certKey=c.pem:privateKey=k.pem", None),
    ("tcp:25", None),
    ("tcp6:25:interface=\\:\\:1", None),
    ("unix:/tmp/ssl:465", None),
])
def test_implicit_tls_endpoint(description, expected):
    assert implicit_tls_endpoint(description) == expected
