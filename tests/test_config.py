import contextlib
import dataclasses
import os
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mta.config import (
    Config,
    ConfigError,
    LocalConfig,
    PolicyConfig,
    ServerConfig,
    SpoolConfig,
    config_from_dict,
    load_config,
)
from mta.config_values import parse_duration

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "etc" / "mta.toml"


def error_for(data, source="etc/mta.toml"):
    with pytest.raises(ConfigError) as info:
        config_from_dict(data, source)
    message = str(info.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------- defaults


def test_empty_config_has_defaults():
    config = config_from_dict({})
    assert config.path == "<config>"
    assert config.server == ServerConfig()
    assert config.server.hostname == socket.getfqdn()
    assert config.server.listen == ("tcp:2525:interface=127.0.0.1",)
    assert config.server.max_message_size == 36700160
    assert config.server.max_recipients == 1000
    assert config.server.max_connections == 1000
    assert config.server.max_connections_per_client == 50
    assert config.server.command_timeout == 300.0
    assert config.server.data_timeout == 300.0
    assert config.server.max_errors == 20
    assert config.server.bare_newlines == "reject"
    assert config.server.submission == ()
    assert config.policy == PolicyConfig(("127.0.0.0/8", "::1/128"), ())
    assert config.spool == SpoolConfig("sqlite:///spool/mta.sqlite")


def test_empty_sections_have_defaults():
    config = config_from_dict({"server": {}, "policy": {}, "spool": {}}, "x.toml")
    assert config == Config(path="x.toml")


def test_config_is_frozen():
    config = config_from_dict({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server.max_recipients = 5  # type: ignore[misc]


def test_empty_file(tmp_path):
    path = tmp_path / "empty.toml"
    path.write_text("")
    config = load_config(str(path))
    assert config.path == str(path)
    assert config.server.max_recipients == 1000


def test_no_global_reactor_installed():
    # Validating endpoint strings must not install the global reactor: twistd picks it.
    code = (
        "import sys; from mta.config import config_from_dict; "
        "config_from_dict({'server': {'listen': ['tcp:25', 'tcp6:26:interface=\\\\:\\\\:1']}}); "
        "sys.exit('twisted.internet.reactor' in sys.modules)"
    )
    import subprocess

    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT)
    assert result.returncode == 0


# ----------------------------------------------------------------- example file


def test_example_file_loads_with_contract_values():
    config = load_config(str(EXAMPLE))
    assert config.path == str(EXAMPLE)
    assert config.server.hostname == "mx.example.test"
    assert config.server.listen == ("tcp:2525:interface=127.0.0.1",)
    assert config.server.max_message_size == 36700160
    assert config.server.max_recipients == 1000
    assert config.policy.relay_networks == ("127.0.0.0/8", "::1/128")
    assert config.policy.relay_domains == ("example.test",)
    assert config.spool.url == "sqlite:///spool/mta.sqlite"
    assert config.server.submission == ("tcp:2587:interface=127.0.0.1",)
    assert (config.tls.certificate, config.tls.private_key) == ("", "")   # TLS off by default
    assert config.auth.users_file == "etc/users"
    # The commented keys are the defaults.
    defaults = ServerConfig(hostname="mx.example.test",
                            submission=("tcp:2587:interface=127.0.0.1",))
    assert config.server == defaults


def test_example_file_commented_keys_are_valid_and_default():
    # Uncommenting every "# key = value" line must give a valid file with the same values.
    # "# [local]" heads an optional section: uncommented too.
    setting = re.compile(r"# ([a-z_]+ = .*|\[[a-z_]+\])")
    lines = []
    for line in EXAMPLE.read_text().splitlines():
        match = setting.fullmatch(line)
        lines.append(match.group(1) if match else line)
    uncommented = "\n".join(lines)
    assert uncommented.count("max_connections_per_client = 50") == 1
    import tomllib

    data = tomllib.loads(uncommented)
    full = config_from_dict(data)
    assert full.local == LocalConfig()          # the optional section's keys are its defaults
    example = config_from_dict(tomllib.loads(EXAMPLE.read_text()))
    assert example.local is None
    assert dataclasses.replace(full, local=None) == example


def test_full_config(tmp_path):
    path = tmp_path / "mta.toml"
    path.write_text(
        """
[server]
hostname = "mail.example.org"
listen = ["tcp:25", "tcp6:25:interface=\\\\:\\\\:1", "unix:/tmp/mta.sock"]
max_message_size = 0
max_recipients = 1
max_connections = 1
max_connections_per_client = 1
command_timeout = "1m30s"
data_timeout = 120
max_errors = 0
bare_newlines = "normalize"
submission = ["tcp:587"]

[policy]
relay_networks = ["10.1.2.3/8", "2001:db8::/32"]
relay_domains = ["Example.ORG", ".Sub.Example.org", "trailing.example."]

[spool]
url = "postgresql+psycopg://mta@localhost/mta"
"""
    )
    config = load_config(path)
    assert config.server == ServerConfig(
        hostname="mail.example.org",
        listen=("tcp:25", "tcp6:25:interface=\\:\\:1", "unix:/tmp/mta.sock"),
        max_message_size=0,
        max_recipients=1,
        max_connections=1,
        max_connections_per_client=1,
        command_timeout=90.0,
        data_timeout=120.0,
        max_errors=0,
        bare_newlines="normalize",
        submission=("tcp:587",),
    )
    assert isinstance(config.server.data_timeout, float)
    assert config.policy.relay_networks == ("10.0.0.0/8", "2001:db8::/32")
    assert config.policy.relay_domains == ("example.org", ".sub.example.org", "trailing.example")
    assert config.spool.url == "postgresql+psycopg://mta@localhost/mta"


# ----------------------------------------------------------------- unknown names


def test_unknown_key():
    assert (
        error_for({"server": {"hostnme": "x"}})
        == "etc/mta.toml: [server] hostnme: unknown key"
    )


def test_unknown_key_in_policy():
    assert (
        error_for({"policy": {"relay_network": []}})
        == "etc/mta.toml: [policy] relay_network: unknown key"
    )


@pytest.mark.parametrize("section", ["serv", "delivery"])
def test_unknown_section(section):
    assert error_for({section: {}}) == f"etc/mta.toml: [{section}]: unknown section"


def test_top_level_key():
    assert error_for({"hostname": "x"}) == (
        "etc/mta.toml: hostname: unknown key (settings belong in a section such as [server])"
    )


def test_section_not_a_table():
    assert error_for({"server": 5}) == "etc/mta.toml: [server]: expected a table, got 5"


def test_unknown_key_from_file(tmp_path):
    path = tmp_path / "mta.toml"
    path.write_text('[server]\nhostname = "a"\nhostnme = "b"\n')
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value) == f"{path}: [server] hostnme: unknown key"
    assert info.value.source == str(path)
    assert info.value.where == "[server] hostnme"


def test_unknown_section_from_file(tmp_path):
    path = tmp_path / "mta.toml"
    path.write_text("[bogus]\nmax_age = '5d'\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value) == f"{path}: [bogus]: unknown section"


# ----------------------------------------------------------------- wrong types and values


def test_integer_from_string():
    assert error_for({"server": {"max_recipients": "abc"}}) == (
        "etc/mta.toml: [server] max_recipients: expected an integer, got 'abc'"
    )


@pytest.mark.parametrize("value", [True, False])
def test_bool_is_not_an_integer(value):
    assert error_for({"server": {"max_message_size": value}}) == (
        f"etc/mta.toml: [server] max_message_size: expected an integer, got {value!r}"
    )


def test_float_is_not_an_integer():
    assert error_for({"server": {"max_errors": 10.0}}) == (
        "etc/mta.toml: [server] max_errors: expected an integer, got 10.0"
    )


@pytest.mark.parametrize("key", ["max_message_size", "max_errors"])
def test_negative_integer(key):
    assert error_for({"server": {key: -1}}) == (
        f"etc/mta.toml: [server] {key}: must be at least 0, got -1"
    )


@pytest.mark.parametrize("key", ["max_connections", "max_connections_per_client"])
def test_zero_connections_is_refused(key):
    # 0 would refuse every connection: a typo, not a setting.
    assert error_for({"server": {key: 0}}) == (
        f"etc/mta.toml: [server] {key}: must be at least 1, got 0"
    )


@pytest.mark.parametrize("section, key, maximum", [
    ("server", "max_message_size", "536870912 (512 MiB)"),
    ("server", "max_recipients", "1000000"),
    ("server", "max_connections", "1000000"),
    ("server", "max_connections_per_client", "1000000"),
    ("server", "max_errors", "1000000"),
    ("server", "max_hops", "1000"),
    ("relay", "concurrency", "10000"),
    ("relay", "per_destination", "10000"),
    ("relay", "recipient_limit", "1000000"),
    ("auth", "max_failures", "1000000"),
    ("metrics", "max_domains", "100000"),
])
def test_absurd_integer(section, key, maximum):
    assert error_for({section: {key: 99999999999999999999}}) == (
        f"etc/mta.toml: [{section}] {key}: must be at most {maximum}, "
        "got 99999999999999999999")


def test_absurd_integer_from_the_file(tmp_path):
    path = tmp_path / "mta.toml"
    path.write_text("[server]\nmax_message_size = 99999999999999999999\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == (f"{path}: [server] max_message_size: must be at most "
                            "536870912 (512 MiB), got 99999999999999999999")


def test_largest_values_are_accepted():
    config = config_from_dict({"server": {"max_message_size": 512 * 1024 * 1024,
                                          "max_hops": 1000},
                               "retry": {"lifetime": "3650d"}})
    assert config.server.max_message_size == 536870912
    assert config.retry.lifetime == 3650 * 86400.0


@pytest.mark.parametrize("value", [99999999999999999999, "99999999999999999999", "3651d"])
def test_absurd_duration(value):
    assert error_for({"retry": {"lifetime": value}}) == (
        "etc/mta.toml: [retry] lifetime: must be at most 10 years (315360000 seconds), "
        f"got {value!r}")


def test_max_recipients_at_least_one():
    assert error_for({"server": {"max_recipients": 0}}) == (
        "etc/mta.toml: [server] max_recipients: must be at least 1, got 0"
    )


@pytest.mark.parametrize("value", ["", "mx example", "mx\texample", 5])
def test_bad_hostname(value):
    message = error_for({"server": {"hostname": value}})
    assert message.startswith("etc/mta.toml: [server] hostname: ")


def test_bare_newlines_choice():
    assert error_for({"server": {"bare_newlines": "strip"}}) == (
        "etc/mta.toml: [server] bare_newlines: expected one of 'reject', 'normalize', got 'strip'"
    )


def test_listen_not_a_list():
    assert error_for({"server": {"listen": "tcp:25"}}) == (
        "etc/mta.toml: [server] listen: expected a list of strings, got 'tcp:25'"
    )


def test_listen_element_not_a_string():
    assert error_for({"server": {"listen": ["tcp:25", 25]}}) == (
        "etc/mta.toml: [server] listen: expected a list of strings, got element 25"
    )


@pytest.mark.parametrize(
    "endpoint",
    ["tcp:abc", "bogus:25", "tcp", "tcp:25:colour=blue", "", "tcp:99999", "ssl:465:privateKey=/nonexistent.pem"],
)
def test_bad_endpoint(endpoint):
    message = error_for({"server": {"listen": [endpoint]}})
    assert message.startswith(f"etc/mta.toml: [server] listen: invalid endpoint {endpoint!r}: ")


def test_bad_endpoint_message():
    assert error_for({"server": {"listen": ["tcp:25", "tcp:abc"]}}) == (
        "etc/mta.toml: [server] listen: invalid endpoint 'tcp:abc': "
        "ValueError: invalid literal for int() with base 10: 'abc'"
    )


def test_bad_submission_endpoint():
    message = error_for({"server": {"submission": ["nope:1"]}})
    assert message.startswith("etc/mta.toml: [server] submission: invalid endpoint 'nope:1': ")


def test_bad_network():
    assert error_for({"policy": {"relay_networks": ["127.0.0.0/8", "10.0.0.300/8"]}}) == (
        "etc/mta.toml: [policy] relay_networks: invalid network '10.0.0.300/8': "
        "'10.0.0.300/8' does not appear to be an IPv4 or IPv6 network"
    )


def test_networks_not_a_list():
    message = error_for({"policy": {"relay_networks": "127.0.0.0/8"}})
    assert message == "etc/mta.toml: [policy] relay_networks: expected a list of strings, got '127.0.0.0/8'"


@pytest.mark.parametrize("domain", ["", ".", "a..b", "exa mple.org", "user@example.org", 7])
def test_bad_relay_domain(domain):
    message = error_for({"policy": {"relay_domains": [domain]}})
    assert message.startswith("etc/mta.toml: [policy] relay_domains: ")


@pytest.mark.parametrize("key", ["command_timeout", "data_timeout"])
def test_bad_duration(key):
    assert error_for({"server": {key: "5 minutes"}}) == (
        f"etc/mta.toml: [server] {key}: invalid duration '5 minutes' "
        '(use seconds or a string like "30s", "5m", "1h30m")'
    )


@pytest.mark.parametrize("value", [0, "0s", -5, True, [5]])
def test_duration_must_be_positive_number(value):
    message = error_for({"server": {"command_timeout": value}})
    assert message.startswith("etc/mta.toml: [server] command_timeout: ")


def test_bad_spool_url():
    message = error_for({"spool": {"url": "not a url"}})
    assert message.startswith("etc/mta.toml: [spool] url: invalid database URL 'not a url': ")


def test_spool_url_not_a_string():
    assert error_for({"spool": {"url": 1}}) == (
        "etc/mta.toml: [spool] url: expected a string, got 1"
    )


# ----------------------------------------------------------------- file errors


def test_missing_file(tmp_path):
    path = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value) == f"{path}: cannot read file: [Errno 2] No such file or directory"


def test_missing_file_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config("etc/mta.toml")
    assert str(info.value) == "etc/mta.toml: cannot read file: [Errno 2] No such file or directory"


def test_directory(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path))
    assert str(info.value).startswith(f"{tmp_path}: cannot read file: [Errno 21] ")


NOBODY = 65534


@contextlib.contextmanager
def not_root():
    """Root reads any file: run as root, the block runs with the effective
    uid of nobody (``seteuid``, undone at the end); else as it is."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(NOBODY)
    try:
        yield
    finally:
        os.seteuid(0)


def test_unreadable_file():
    # Not under tmp_path: its parents are root's, mode 700, and nobody could
    # not even look for the file; here only the file's own mode keeps it out.
    directory = Path(tempfile.mkdtemp(prefix="mta-test-config-"))
    try:
        directory.chmod(0o755)
        readable = directory / "mta.toml"
        readable.write_text('[server]\nhostname = "mx.example.test"\n')
        path = directory / "secret.toml"
        path.write_text("")
        path.chmod(0)
        with not_root():
            assert load_config(str(readable)).server.hostname == "mx.example.test"
            with pytest.raises(ConfigError) as info:
                load_config(str(path))
        assert str(info.value) == f"{path}: cannot read file: [Errno 13] Permission denied"
    finally:
        shutil.rmtree(directory)


def test_invalid_toml(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[server]\nhostname = \n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    message = str(info.value)
    assert message.startswith(f"{path}: invalid TOML: ")
    assert "line 2" in message
    assert "\n" not in message


def test_invalid_utf8(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_bytes(b'[server]\nhostname = "\xff"\n')
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value).startswith(f"{path}: file is not valid UTF-8: ")


def test_config_error_is_one_line_even_for_multiline_causes():
    error = ConfigError("f.toml", "[server] listen", "first\nsecond\n")
    assert str(error) == "f.toml: [server] listen: first second"


# ----------------------------------------------------------------- parse_duration


@pytest.mark.parametrize(
    "value, seconds",
    [
        (0, 0.0),
        (30, 30.0),
        (2.5, 2.5),
        ("30", 30.0),
        ("0", 0.0),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("5d", 432000.0),
        ("1h30m", 5400.0),
        ("1d2h3m4s", 93784.0),
        ("1.5h", 5400.0),
        (" 10s ", 10.0),
        ("10S", 10.0),
    ],
)
def test_parse_duration(value, seconds):
    result = parse_duration(value)
    assert result == seconds
    assert isinstance(result, float)


@pytest.mark.parametrize(
    "value",
    [
        "",
        " ",
        "s",
        "5x",
        "5 m",
        "m5",
        "5m5",
        "1h1h",
        "-5",
        "-5s",
        "1e3",
        "five",
        "inf",
        "nan",
        -1,
        float("inf"),
        float("nan"),
        True,
        None,
        [30],
    ],
)
def test_parse_duration_rejects(value):
    with pytest.raises(ValueError):
        parse_duration(value)


@settings(deadline=None)   # pure computation: a busy CI box must not trip a deadline
@given(
    d=st.integers(0, 30),
    h=st.integers(0, 23),
    m=st.integers(0, 59),
    s=st.integers(0, 59),
)
def test_parse_duration_composes(d, h, m, s):
    text = "".join(f"{n}{u}" for n, u in [(d, "d"), (h, "h"), (m, "m"), (s, "s")] if n) or "0s"
    assert parse_duration(text) == d * 86400 + h * 3600 + m * 60 + s


@settings(deadline=None)
@given(st.text(max_size=12))
def test_parse_duration_only_raises_value_error(text):
    try:
        result = parse_duration(text)
    except ValueError:
        return
    assert result >= 0


def test_step2_sections(tmp_path):
    cfg = config_from_dict({
        "relay": {"smarthost": "127.0.0.1:2626"},
        "routes": {"Example.Test": "127.0.0.1:2627", "other.test": "[::1]:25"},
        "dns": {"nameservers": ["127.0.0.1:5353", "::1"]},
        "retry": {"first": "5s", "max": "1m", "lifetime": "1h", "warn_after": ""},
    }, "t.toml")
    assert cfg.relay.smarthost == "127.0.0.1:2626"
    assert cfg.routes == (("example.test", "127.0.0.1:2627"), ("other.test", "[::1]:25"))
    assert cfg.dns.nameservers == ("127.0.0.1:5353", "::1")
    assert (cfg.retry.first, cfg.retry.max, cfg.retry.lifetime, cfg.retry.warn_after) == (5, 60, 3600, None)


@pytest.mark.parametrize("data, where", [
    ({"relay": {"smarthost": "host:99999"}}, "[relay] smarthost"),
    ({"routes": {"example.test": ""}}, "[routes] example.test"),
    ({"routes": {"example.test": 5}}, "[routes] example.test"),
    ({"dns": {"nameservers": ["ns.example.test"]}}, "[dns] nameservers"),
    ({"retry": {"first": "soon"}}, "[retry] first"),
])
def test_step2_errors(data, where):
    with pytest.raises(ConfigError) as info:
        config_from_dict(data, "t.toml")
    assert str(info.value).startswith(f"t.toml: {where}: ")


# ----------------------------------------------------------------- domain keys (mta.domain)

def test_domain_keys_are_idna_2008():
    cfg = config_from_dict({
        "policy": {"relay_domains": ["Stra\u00dfe.test", ".\u00d6BB.test.", "strasse.test"]},
        "routes": {"stra\u00dfe.test": "127.0.0.1:2627", "B\u00fccher.Test.": "[::1]:25"},
        "route_tls": {"XN--STRAE-OQA.test": "encrypt", "xn--bcher-kva.test": "none"},
        "sendmail": {"domain": "\u00d6BB.test"},
    }, "t.toml")
    assert cfg.policy.relay_domains == ("xn--strae-oqa.test", ".xn--bb-eka.test", "strasse.test")
    assert cfg.routes == (("xn--strae-oqa.test", "127.0.0.1:2627"), ("xn--bcher-kva.test", "[::1]:25"))
    assert cfg.route_tls == (("xn--strae-oqa.test", "encrypt"), ("xn--bcher-kva.test", "none"))
    assert cfg.sendmail.domain == "xn--bb-eka.test"


@pytest.mark.parametrize("data, where, why", [
    ({"routes": {"stra\u00dfe.test": "127.0.0.1:25", "XN--STRAE-OQA.TEST": "127.0.0.2:25"}},
     "[routes] XN--STRAE-OQA.TEST", "the same domain as 'stra\u00dfe.test' (xn--strae-oqa.test)"),
    ({"routes": {"stra\u00dfe.test": "127.0.0.1:25"},
      "route_tls": {"stra\u00dfe.test": "none", "xn--strae-oqa.test": "may"}},
     "[route_tls] xn--strae-oqa.test", "the same domain as 'stra\u00dfe.test' (xn--strae-oqa.test)"),
    ({"routes": {"stra\u00dfe.test": "127.0.0.1:25"}, "route_tls": {"strasse.test": "none"}},
     "[route_tls] strasse.test", "no [routes] entry for this domain"),
    ({"routes": {"\u2603.test": "127.0.0.1:25"}}, "[routes] \u2603.test", "invalid domain"),
    ({"routes": {"[127.0.0.1]": "127.0.0.1:25"}}, "[routes] [127.0.0.1]", "invalid domain"),
    ({"routes": {".sub.test": "127.0.0.1:25"}}, "[routes] .sub.test",
     "bad route domain '.sub.test'"),
    ({"policy": {"relay_domains": ["a\u05d0.test"]}}, "[policy] relay_domains", "invalid domain"),
    ({"server": {"hostname": "\u2603.test"}}, "[server] hostname", "invalid internationalized"),
])
def test_bad_domain_keys(data, where, why):
    message = error_for(data, "t.toml")
    assert message.startswith(f"t.toml: {where}: {why}"), message


def test_cluster_keys():
    from mta.config import ClusterConfig
    assert config_from_dict({}).cluster == ClusterConfig(node="", lease=300.0, poll=5.0)
    c = config_from_dict({"cluster": {"node": "mx1.example:2", "lease": "90s",
                                      "poll": "1m"}}).cluster
    assert (c.node, c.lease, c.poll) == ("mx1.example:2", 90.0, 60.0)
    for bad, why in [({"node": "mx 1"}, "[cluster] node: must be empty"),
                     ({"node": "-x"}, "[cluster] node: must be empty"),
                     ({"node": 1}, "[cluster] node: expected a string"),
                     ({"lease": "2s"}, "[cluster] lease: must be at least 3 seconds"),
                     ({"lease": "soon"}, "[cluster] lease: invalid duration"),
                     ({"poll": "0s"}, "[cluster] poll: must be greater than zero"),
                     ({"owner": "x"}, "[cluster] owner: unknown key")]:
        with pytest.raises(ConfigError) as e:
            config_from_dict({"cluster": bad})
        assert why in str(e.value)
