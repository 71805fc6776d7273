"""Config validated once, defaults defined once: what each component runs
with is what the config says, and a component built without the config
(a test, a tool) gets the config's defaults.  So the drift of Step 5
(``[server] data_timeout``: 10 minutes in the server, 5 in the config and
README) cannot come back unnoticed."""
from __future__ import annotations

import dataclasses
import inspect
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from twisted.application import service

from mta import tap
from mta.auth.limiter import FailureLimiter
from mta.config import (AuthConfig, Config, ConfigError, MetricsConfig, RelayConfig,
                        ServerConfig, SpoolConfig, TLSConfig, config_from_dict, load_config)
from mta.delivery.router import Router
from mta.metrics import Metrics
from mta.smtp.server import ServerSettings, SMTPServerFactory
from mta.smtp.settings import Timeouts
from mta.spool import Spool, make_engine
from mta.spool.admin import SpoolAdmin
from mta.tls import ServerTLS

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "etc" / "mta.toml"


def _defaults(fn: Any) -> dict[str, Any]:
    return {name: p.default for name, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


# --------------------------------------------------------------------------- defaults


def test_server_settings_defaults_are_the_config_defaults() -> None:
    settings, config = ServerSettings(), config_from_dict({}).server
    for f in dataclasses.fields(ServerSettings):
        assert getattr(settings, f.name) == getattr(config, f.name), f.name
    assert ServerSettings().data_timeout == 300.0     # README: data_timeout = "5m"
    assert isinstance(config, ServerSettings)          # the server is handed the section itself


def test_client_timeouts_defaults_are_the_relay_defaults() -> None:
    relay = RelayConfig()
    assert relay.timeouts == Timeouts()
    t = Timeouts()
    assert (relay.connect_timeout, relay.command_timeout, relay.data_timeout) == (
        t.connect, t.greeting, t.data_end)
    # RFC 5321 4.5.3.2: DATA initiation 2 min, data block 3 min, after the dot 10 min.
    assert (t.data_init, t.data_block, t.data_end) == (120.0, 180.0, 600.0)


def test_component_defaults_are_the_config_defaults() -> None:
    auth = AuthConfig()
    limiter = FailureLimiter(clock=None)
    assert (limiter.delay, limiter.max_failures, limiter.lockout) == (
        auth.failure_delay, auth.max_failures, auth.lockout)
    assert _defaults(Metrics.__init__)["max_domains"] == MetricsConfig().max_domains
    assert _defaults(ServerTLS.__init__)["min_version"] == TLSConfig().min_version
    router = _defaults(Router.__init__)
    assert (router["port"], router["tls"]) == (RelayConfig().port, RelayConfig().tls)
    assert _defaults(SMTPServerFactory.__init__)["auth_plaintext_on_loopback"] == \
        AuthConfig().allow_plaintext_on_loopback
    lock = SpoolConfig().lock_timeout       # the daemon, mta queue and sendmail pass it
    assert _defaults(Spool.__init__)["lock_timeout"] == lock
    assert _defaults(make_engine)["lock_timeout"] == lock
    assert _defaults(SpoolAdmin.open)["lock_timeout"] == lock


_COMMENTED = re.compile(r"^# ?([a-z_]+) = (.+)$")


def test_the_example_config_documents_the_defaults() -> None:
    """Every commented-out ``# key = value`` in etc/mta.toml is the default."""
    section = ""
    checked = 0
    defaults = config_from_dict({})
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        if m := re.fullmatch(r"(?:# )?\[([a-z_]+)\]", line):   # "# [local]": optional section
            section = m.group(1)
            continue
        m = _COMMENTED.match(line)
        if not m or section in ("routes", "route_tls"):
            continue
        key, raw = m.groups()
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            continue                      # prose that happens to look like a key
        documented = getattr(config_from_dict({section: {key: value}}), section)
        base = getattr(defaults, section) or type(documented)()   # [local]: None when absent
        assert getattr(documented, key) == getattr(base, key), f"[{section}] {key}"
        checked += 1
    assert checked >= 30


# --------------------------------------------------------------------------- effective


def _walk(svc: Any) -> list[Any]:
    out = [svc]
    if isinstance(svc, service.MultiService):
        for child in svc:
            out.extend(_walk(child))
    return out


def _build(tmp_path: Path, config: Config) -> dict[str, Any]:
    options = tap.Options()
    options.config = config
    options["spool"] = f"sqlite:///{tmp_path / 'spool.sqlite'}"
    try:
        top = tap.makeService(options)
    finally:
        from prometheus_client import enable_created_metrics
        enable_created_metrics()     # makeService turns them off process-wide
    services = _walk(top)
    drain = next(s for s in services if isinstance(s, tap.SessionDrain))
    runner = next((s for s in services if getattr(s, "name", None) == "queue-runner"), None)
    return {"top": top, "factory": drain.factory, "drain": drain, "runner": runner}


@pytest.mark.parametrize("source", ["defaults", "etc/mta.toml"])
def test_every_component_runs_with_the_config_values(tmp_path: Path, source: str) -> None:
    if source == "defaults":
        config = config_from_dict({"metrics": {"listen": "tcp:0:interface=127.0.0.1"}})
    else:
        # The shipped example, delivering, with metrics and a users file here.
        text = EXAMPLE.read_text(encoding="utf-8")
        text = text.replace("deliver = false", "deliver = true")
        text = text.replace('users_file = "etc/users"', f'users_file = "{tmp_path / "users"}"')
        text = text.replace('# listen = ""', 'listen = "tcp:0:interface=127.0.0.1"')
        path = tmp_path / "mta.toml"
        path.write_text(text, encoding="utf-8")
        config = load_config(path)
        assert config.relay.deliver and config.metrics.listen and config.auth.enabled
    built = _build(tmp_path, config)
    factory, runner = built["factory"], built["runner"]
    try:
        # The SMTP server: [server] itself, and [auth].
        for f in dataclasses.fields(ServerSettings):
            assert getattr(factory.settings, f.name) == getattr(config.server, f.name), f.name
        assert factory.auth_plaintext_on_loopback == config.auth.allow_plaintext_on_loopback
        a = config.auth
        assert (factory.limiter.delay, factory.limiter.max_failures, factory.limiter.lockout) \
            == (a.failure_delay, a.max_failures, a.lockout)
        assert built["drain"].grace == config.relay.shutdown_grace
        # Callbacks given in the constructors.
        assert factory.metrics is not None and factory.metrics.max_domains == \
            config.metrics.max_domains
        assert factory.spool.on_commit == factory.metrics.commit_done
        assert factory.on_stored == runner.kick
        # Delivery: [relay] and [retry] as they are, the client's timeouts from [relay].
        assert runner.relay is config.relay and runner.retry is config.retry
        assert runner.shutdown_grace == config.relay.shutdown_grace
        t, r = runner.couriers["smtp"].pool.timeouts, config.relay
        assert (t.connect, t.greeting, t.helo, t.mail, t.rcpt, t.data_end) == (
            r.connect_timeout, *[r.command_timeout] * 4, r.data_timeout)
        assert (t.data_init, t.data_block) == (min(r.command_timeout, 120.0),
                                               min(r.data_timeout, 180.0))
        assert runner.couriers["smtp"].pool.helo_name == config.server.hostname
        router = runner.router
        assert (router.port, router.tls) == (r.port, r.tls)
        assert router.smarthost is None and router.routes == {} and router.route_tls == {}
    finally:
        factory.spool.engine.dispose()


def test_router_gets_what_config_validated(tmp_path: Path) -> None:
    config = config_from_dict({
        "relay": {"smarthost": "Relay.Example.Test:587", "port": 2525, "tls": "encrypt"},
        "routes": {"a.test": "127.0.0.1", "b.test": "[::1]:2627"},
        "route_tls": {"b.test": "verify"},
        "dns": {"nameservers": ["127.0.0.1:5353"], "timeout": "3s"}})
    built = _build(tmp_path, config)
    try:
        router = built["runner"].router
        assert router.smarthost == ("relay.example.test", 587)
        assert router.routes == {"a.test": ("127.0.0.1", 2525), "b.test": ("::1", 2627)}
        assert router.route_tls == {"b.test": "verify"} and router.tls == "encrypt"
        assert router.nameservers == [("127.0.0.1", 5353)] and router.timeout == (3,)
    finally:
        built["factory"].spool.engine.dispose()


def test_local_section_reaches_the_local_courier(tmp_path: Path) -> None:
    (tmp_path / "aliases").write_text("team: bob\n")
    (tmp_path / "mailboxes").write_text("bob\n")
    config = config_from_dict({
        "server": {"hostname": "mx.local.test"},
        "local": {"domains": ["Example.ORG"], "aliases": str(tmp_path / "aliases"),
                  "mailboxes": str(tmp_path / "mailboxes"), "maildir": "/srv/{domain}/{user}",
                  "lmtp": "unix:/run/dovecot/lmtp"}})
    built = _build(tmp_path, config)
    try:
        local = built["runner"].couriers["local"]
        assert local.maildir == "/srv/{domain}/{user}"
        assert local.lmtp.destination == "unix:/run/dovecot/lmtp"
        assert local.lmtp.lhlo_name == "mx.local.test"
        assert local.lmtp.timeouts == config.relay.timeouts
        d = local.directory
        assert d.domains == {"example.org", "mx.local.test"} and d.configured
        assert d.exists("team", "example.org") and d.exists("bob", "example.org")
        assert not d.exists("carol", "example.org")
        # The policy and the router ask the same directory.
        assert built["factory"].policy.local is d
        assert built["runner"].router.route_for("example.org").courier == "local"
    finally:
        built["factory"].spool.engine.dispose()
    # Without [local]: the hostname's postmaster and root, Maildirs from the default template.
    built = _build(tmp_path, config_from_dict({"server": {"hostname": "mx.local.test"}}))
    try:
        local = built["runner"].couriers["local"]
        assert local.maildir == "mail/{domain}/{user}" and local.lmtp is None
        assert not local.directory.configured
        assert local.directory.domains == {"mx.local.test"}
    finally:
        built["factory"].spool.engine.dispose()


@pytest.mark.parametrize("data, where", [
    ({"relay": {"smarthost": "-bad-.test:25"}}, "[relay] smarthost"),
    ({"relay": {"smarthost": "[IPv6:::1]:99999"}}, "[relay] smarthost"),
    ({"routes": {"a.test": "10.1:25"}}, "[routes] a.test"),
    ({"dns": {"nameservers": ["[::1]:70000"]}}, "[dns] nameservers"),
    ({"relay": {"tls": "always"}}, "[relay] tls"),
])
def test_what_the_router_would_refuse_is_a_config_error(data: dict, where: str) -> None:
    """The router's parsers are the config's validators: a value the router
    cannot read is refused at load time, naming the key (it used to pass the
    config and stop the daemon with a "[relay]/[routes]/[dns]" line)."""
    with pytest.raises(ConfigError) as e:
        config_from_dict(data, "etc/mta.toml")
    assert str(e.value).startswith(f"etc/mta.toml: {where}: ")


# --------------------------------------------------------------------------- layers


def test_the_protocol_layer_does_not_import_the_config() -> None:
    code = ("import sys, mta.smtp.server, mta.smtp.client, mta.smtp.settings; "
            "print(sorted(m for m in sys.modules if m in ('mta.config', 'mta.tap')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=60, check=True).stdout
    assert out.strip() == "[]"


def test_server_config_adds_only_the_listeners() -> None:
    extra = {f.name for f in dataclasses.fields(ServerConfig)} - {
        f.name for f in dataclasses.fields(ServerSettings)}
    # ... and the processes that run them (mta.workers), none of the server's settings.
    assert extra == {"listen", "submission", "workers"}


def test_gateway_atrn_reaches_the_odmr_listener(tmp_path: Path) -> None:
    from mta.smtp.odmr import ODMRFactory

    config = config_from_dict({
        "auth": {"users_file": str(tmp_path / "users")},
        "relay": {"command_timeout": "42s", "data_timeout": "7m"},
        "gateway": {"atrn_listen": ["tcp:0:interface=127.0.0.1"],
                    "hold_domains": ["branch.example"],
                    "atrn": {"branch": ["Branch.Example"]}}})
    built = _build(tmp_path, config)
    try:
        [odmr] = [s.factory for s in _walk(built["top"])
                  if isinstance(getattr(s, "factory", None), ODMRFactory)]
        assert odmr.main is built["factory"]          # one server factory: limits, AUTH, stop
        assert odmr.grants("branch") == ("branch.example",) and odmr.grants("x") == ()
        assert odmr.timeouts == config.relay.timeouts
        assert not odmr.implicit_tls
    finally:
        built["factory"].spool.engine.dispose()


def test_gateway_section_reaches_the_policy_the_router_and_the_runner(tmp_path: Path) -> None:
    from mta.delivery.hold_courier import HoldCourier
    from mta.delivery.types import HOLD_COURIER, Route

    for gateway, etrn_client in (({"hold_domains": ["Branch.Example"]}, "10.1.2.3"),
                                 ({"hold_domains": ["branch.example"],
                                   "etrn_networks": ["192.0.2.0/24"]}, "192.0.2.7")):
        config = config_from_dict({"policy": {"relay_networks": ["10.0.0.0/8"]},
                                   "routes": {"routed.test": "127.0.0.1:2525"},
                                   "gateway": gateway})
        built = _build(tmp_path, config)
        try:
            runner, factory = built["runner"], built["factory"]
            assert runner.router.route_for("branch.example") == Route(HOLD_COURIER,
                                                                      "branch.example")
            assert isinstance(runner.couriers[HOLD_COURIER], HoldCourier)
            assert runner._fresh_connections == runner.couriers["smtp"].fresh_connections
            policy = factory.policy
            assert policy.is_hold_domain("branch.example")
            # etrn_networks: as set, else [policy] relay_networks
            assert policy.etrn_refusal(etrn_client, "branch.example") is None
            assert policy.etrn_refusal(etrn_client, "routed.test") is None
            assert policy.etrn_refusal("198.51.100.1", "branch.example") is not None
            assert factory.etrn is not None
        finally:
            factory.spool.engine.dispose()
    # No delivery, no flush: ETRN is not offered.
    built = _build(tmp_path, config_from_dict({"relay": {"deliver": False}}))
    try:
        assert built["runner"] is None and built["factory"].etrn is None
    finally:
        built["factory"].spool.engine.dispose()
