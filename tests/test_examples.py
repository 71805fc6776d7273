"""The four deployments of README.rst "Sysadmin's guide", from their
``etc/examples/*.toml``:

* each example loads with ``mta.config.load_config`` and says what the
  guide says it does;
* the real daemon starts with each, with only what ties it to a machine
  overridden (listen addresses -> free loopback ports, the spool -> a
  temporary file, the smarthost/internal server/MX hosts -> scripted loopback
  peers, DNS -> the loopback test server, certificates -> a test
  certificate), and a message travels the deployment's way: through the
  smarthost with STARTTLS and AUTH, to the internal server by [routes], to
  a recipient domain's MX found in DNS, to the branch office that takes its
  mail by ATRN over STARTTLS.  The metrics page counts it.

Nothing leaves loopback, and no daemon uses the system resolver.
"""
from __future__ import annotations

import copy
import re
import smtplib
import ssl
import tomllib
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from conftest import ROOT, MTADaemon, free_port, stop_daemons, wait_for
from tlsutil import self_signed

from mta.config import config_from_dict, load_config

EXAMPLES = ROOT / "etc" / "examples"
NAMES = ["lan-relay-smarthost", "gateway", "outbound-mx", "branch-gateway"]


def example(name: str) -> Path:
    return EXAMPLES / f"{name}.toml"


# --------------------------------------------------------------------------- loading

def test_every_example_is_tested():
    assert sorted(p.stem for p in EXAMPLES.glob("*.toml")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_example_loads(name):
    config = load_config(example(name))
    assert config.spool.url == "sqlite:////var/spool/mta/mta.sqlite"
    assert config.metrics.listen == "tcp:9025:interface=127.0.0.1"
    assert config.relay.shutdown_grace == 10
    assert config.relay.deliver
    for endpoint in config.server.listen:
        assert endpoint.startswith("tcp:25:")


def test_lan_relay_sends_everything_to_the_smarthost_over_tls_with_auth():
    c = load_config(example("lan-relay-smarthost"))
    assert c.relay.smarthost == "smtp.provider.example.net:587"
    assert c.relay.tls == "verify" and c.relay.smarthost_user
    assert c.relay.smarthost_password_file and not c.relay.smarthost_password
    assert "192.168.1.0/24" in c.policy.relay_networks and c.policy.relay_domains == ()
    assert c.routes == ()


def test_gateway_routes_every_domain_it_accepts_to_the_internal_server():
    c = load_config(example("gateway"))
    routes = dict(c.routes)
    assert c.policy.relay_domains and set(c.policy.relay_domains) == set(routes)
    assert set(routes.values()) == {"10.0.0.5:25"}
    assert "10.0.0.5/32" in c.policy.relay_networks
    assert c.tls.enabled and c.relay.smarthost == ""


def test_outbound_mx_relay_delivers_by_mx_with_opportunistic_tls():
    c = load_config(example("outbound-mx"))
    assert c.relay.smarthost == "" and c.routes == () and c.relay.tls == "may"
    assert "10.20.0.0/16" in c.policy.relay_networks and c.policy.relay_domains == ()
    assert c.server.submission and c.auth.enabled and c.tls.enabled


def test_branch_gateway_keeps_the_branch_mail_for_atrn():
    c = load_config(example("branch-gateway"))
    assert c.policy.relay_domains == () and c.gateway.hold_domains == ("branch.example.org",)
    assert c.etrn_networks == ("198.51.100.7/32",)
    assert dict(c.routes) == {"branch.example.org": "198.51.100.7:25"}
    assert [p for p in c.gateway.atrn_listen] == ["tcp:366:interface=203.0.113.25"]
    assert c.gateway.atrn_domains("branch") == ("branch.example.org",)
    assert c.auth.enabled and c.tls.enabled
    assert c.retry.warn_after == 86400 and c.retry.lifetime == 7 * 86400


# --------------------------------------------------------------------------- running them

def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(value)


def dump_toml(data: dict[str, dict[str, Any]], prefix: str = "") -> str:
    out = []
    for section, table in data.items():
        out.append(f"[{prefix}{section}]")
        out.extend(f"{_toml(key)} = {_toml(value)}" for key, value in table.items()
                   if not isinstance(value, dict))
        out.append("")
        subtables = {k: v for k, v in table.items() if isinstance(v, dict)}   # [a.b]
        if subtables:
            out.append(dump_toml(subtables, f"{prefix}{section}."))
    return "\n".join(out)


def loopback(endpoint: str, port: int) -> str:
    """The same kind of endpoint (tcp: or implicit-TLS ssl:) on 127.0.0.1:port."""
    kind = endpoint.split(":", 1)[0]
    return f"{kind}:{port}:interface=127.0.0.1"


class ExampleDaemon(MTADaemon):
    """``twistd mta`` with an example's configuration and *overrides*
    (section -> {key: value}; a value of None removes the key)."""

    def __init__(self, directory: Path, name: str, overrides: dict[str, dict[str, Any]]):
        super().__init__(directory)
        self.name = name
        data = tomllib.loads(example(name).read_text())
        for section, table in overrides.items():
            target = data.setdefault(section, {})
            for key, value in table.items():
                if value is None:
                    target.pop(key, None)
                else:
                    target[key] = value
        self.data = data
        self.extra_ports: dict[str, int] = {}

    def write_config(self) -> None:
        data = copy.deepcopy(self.data)
        server = data["server"]
        listen = [loopback(server["listen"][0], self.port)]
        for i, ep in enumerate(server["listen"][1:] + server.get("submission", [])):
            self.extra_ports[ep] = free_port()
            listen.append(loopback(ep, self.extra_ports[ep]))
        n = len(server["listen"])
        server["listen"], server["submission"] = listen[:n], listen[n:]
        data["spool"]["url"] = self.spool_url
        config_from_dict(data, str(self.config_path))        # valid as written
        self.config_path.write_text(dump_toml(data))


@pytest.fixture
def example_daemon(tmp_path: Path) -> Iterator[Callable[..., ExampleDaemon]]:
    daemons: list[ExampleDaemon] = []

    def make(name: str, **overrides: dict[str, Any]) -> ExampleDaemon:
        d = ExampleDaemon(tmp_path / name, name, overrides)
        daemons.append(d)
        return d.start()

    yield make

    stop_daemons(daemons, label=lambda d: f"{d.name}: {d.config_path}")


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[str, str]:
    cert, key = self_signed("mx.example.org").write(tmp_path / "tls")
    return str(cert), str(key)


def metrics_of(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def accepted(port: int) -> float:
    m = re.search(r"^mta_messages_accepted_total (\S+)$", metrics_of(port), re.M)
    return float(m.group(1)) if m else -1


def wait_delivered(peer, n: int = 1) -> list:
    return wait_for(lambda: len(peer.transactions()) >= n and peer.transactions(), 20,
                    f"{n} transaction(s) at the next hop")


MESSAGE = b"From: <a@example.org>\r\nSubject: deployment\r\n\r\nhello\r\n"


def test_lan_relay_to_smarthost_runs(example_daemon, peer_factory, tmp_path):
    [smarthost] = peer_factory.spawn({"starttls": True, "auth": ["PLAIN", "LOGIN"],
                                      "auth_after_tls": True, "auth_required": True,
                                      "users": {"office-relay@example.org": "s3cret"}})
    password = tmp_path / "smarthost.password"
    password.write_text("s3cret\n")
    password.chmod(0o600)
    mport = free_port()
    mta = example_daemon(
        "lan-relay-smarthost",
        relay={"smarthost": smarthost.address, "smarthost_password_file": str(password),
               "tls": "encrypt"},        # the peer's certificate is self-signed
        dns={"nameservers": ["127.0.0.1:9"]},
        metrics={"listen": f"tcp:{mport}:interface=127.0.0.1"})
    peer_factory.ready()
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=10) as s:
        s.sendmail("cron@relay.office.example.org", ["someone@elsewhere.test"], MESSAGE)
    [tx] = wait_delivered(smarthost)
    assert tx.accepted == ["someone@elsewhere.test"]
    assert tx.tls and tx.auth == "office-relay@example.org"
    assert accepted(mport) == 1
    # The second listener (the LAN address in the example) works too.
    [other] = mta.extra_ports.values()
    with smtplib.SMTP("127.0.0.1", other, timeout=10) as s:
        assert s.ehlo()[0] == 250


def test_gateway_runs(example_daemon, peer_factory, certificate):
    [internal] = peer_factory.spawn(None)
    cert, key = certificate
    mport = free_port()
    mta = example_daemon(
        "gateway",
        routes={"example.org": internal.address, "sub.example.org": internal.address},
        dns={"nameservers": ["127.0.0.1:9"]},
        tls={"certificate": cert, "private_key": key},
        metrics={"listen": f"tcp:{mport}:interface=127.0.0.1"})
    peer_factory.ready()
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=10) as s:
        s.ehlo("outside.test")
        assert s.has_extn("starttls")
        s.starttls(context=ssl._create_unverified_context())
        s.sendmail("someone@outside.test", ["user@example.org", "ops@sub.example.org"], MESSAGE)
    txs = wait_delivered(internal, 1)          # same next hop: one transaction for both
    assert [sorted(tx.accepted) for tx in txs] == [["ops@sub.example.org", "user@example.org"]]
    assert not any(tx.tls for tx in txs)          # [route_tls] "none" for the internal hop
    assert accepted(mport) == 1


def test_outbound_mx_relay_runs(example_daemon, peer_factory, dns_factory, certificate,
                                tmp_path):
    [mx] = peer_factory.spawn(None)
    dns_port = dns_factory(["dest.example.test MX 10 mx.dest.example.test",
                            "mx.dest.example.test A 127.0.0.1"])
    cert, key = certificate
    mport = free_port()
    mta = example_daemon(
        "outbound-mx",
        relay={"port": mx.port_wanted},       # the MX host listens there
        dns={"nameservers": [f"127.0.0.1:{dns_port}"], "timeout": "2s"},
        tls={"certificate": cert, "private_key": key},
        auth={"users_file": str(tmp_path / "users")},
        metrics={"listen": f"tcp:{mport}:interface=127.0.0.1"})
    peer_factory.ready()
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=10) as s:
        s.sendmail("app@example.com", ["bob@dest.example.test"], MESSAGE)
    [tx] = wait_delivered(mx)
    assert tx.accepted == ["bob@dest.example.test"]
    assert accepted(mport) == 1
    # Submission (587 semantics): STARTTLS then AUTH before MAIL; and implicit TLS.
    ports = mta.extra_ports
    with smtplib.SMTP("127.0.0.1", ports["tcp:587"], timeout=10) as s:
        s.starttls(context=ssl._create_unverified_context())
        s.ehlo()
        assert s.has_extn("auth")
        assert s.mail("app@example.com")[0] == 530
    with smtplib.SMTP_SSL("127.0.0.1", ports["ssl:465"], timeout=10,
                          context=ssl._create_unverified_context()) as s:
        assert s.ehlo()[0] == 250


def test_branch_gateway_runs(example_daemon, certificate, tmp_path):
    """The branch is offline (its route a dead port), so the mail waits; the
    branch's server comes online, logs in over STARTTLS on the ATRN port and
    takes it over the same TLS connection, byte for byte."""
    import base64
    import socket

    from mta.auth.passwords import hash_password

    users = tmp_path / "users"
    users.write_text(f"branch:{hash_password('night shift', n=16)}\n")
    cert, key = certificate
    mport, aport, dead = free_port(), free_port(), free_port()
    mta = example_daemon(
        "branch-gateway",
        routes={"branch.example.org": f"127.0.0.1:{dead}"},
        dns={"nameservers": ["127.0.0.1:9"]},
        tls={"certificate": cert, "private_key": key},
        auth={"users_file": str(users)},
        gateway={"atrn_listen": [f"tcp:{aport}:interface=127.0.0.1"]},
        metrics={"listen": f"tcp:{mport}:interface=127.0.0.1"})
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=10) as s:
        s.sendmail("someone@outside.test", ["clerk@branch.example.org"], MESSAGE)
    wait_for(lambda: mta.rows("SELECT COUNT(*) FROM recipients WHERE state='deferred'")[0][0],
             20, "the branch's mail to wait (deferred)", detail=mta.log)

    sock = socket.create_connection(("127.0.0.1", aport), timeout=10)
    f = sock.makefile("rb")

    def reply(f) -> bytes:
        out = b""
        while True:
            line = f.readline()
            out += line
            if line[3:4] != b"-":
                return out
    assert reply(f).startswith(b"220 mx.example.org ")
    sock.sendall(b"EHLO branch-gw.branch.example.org\r\n")
    assert b"250-STARTTLS\r\n" in reply(f)
    sock.sendall(b"STARTTLS\r\n")
    assert reply(f).startswith(b"220 ")
    tls = ssl._create_unverified_context().wrap_socket(sock, server_hostname="mx.example.org")
    f = tls.makefile("rb")
    tls.sendall(b"EHLO branch-gw.branch.example.org\r\n")
    ehlo = reply(f)
    assert b"AUTH PLAIN LOGIN\r\n" in ehlo and b"ATRN\r\n" in ehlo
    token = base64.b64encode(b"\0branch\0night shift")
    tls.sendall(b"AUTH PLAIN " + token + b"\r\n")
    assert reply(f).startswith(b"235 ")
    tls.sendall(b"ATRN branch.example.org\r\n")
    assert reply(f) == b"250 2.0.0 OK now reversing the connection\r\n"
    # Now we are the branch's SMTP server, on the same TLS connection.
    tls.sendall(b"220 branch-gw.branch.example.org ESMTP\r\n")
    assert f.readline() == b"EHLO mx.example.org\r\n"
    tls.sendall(b"250-branch-gw.branch.example.org\r\n250 PIPELINING\r\n")
    commands = b"".join(f.readline() for _ in range(3))
    assert commands == (b"MAIL FROM:<someone@outside.test>\r\n"
                        b"RCPT TO:<clerk@branch.example.org>\r\nDATA\r\n")
    tls.sendall(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go ahead\r\n")
    content = b""
    while not content.endswith(b"\r\n.\r\n"):
        content += f.readline()
    assert content.startswith(b"Received: from ") and content.endswith(MESSAGE + b".\r\n")
    tls.sendall(b"250 2.0.0 Ok: queued at the branch\r\n")
    assert f.readline() == b"QUIT\r\n"
    tls.sendall(b"221 2.0.0 Bye\r\n")
    tls.close()
    wait_for(lambda: mta.count() == 0, 20, "the delivered message to leave the spool",
             detail=mta.log)
    assert re.search(r'^mta_atrn_recipients_total 1\.0$', metrics_of(mport), re.M)
    assert "ATRN client=127.0.0.1 user=branch domains=branch.example.org recipients=1" in mta.log()
