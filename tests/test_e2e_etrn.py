"""End-to-end: hold domains and ETRN with real parts only -- the real
``twistd mta`` (conftest.MTADaemon), scripted next hops (tests/peers.py)
and Debian's ``fetchmail`` in ETRN mode as the client that asks for the
mail (tests/setup-deps installs it; a missing fetchmail fails the test).

The hold domain's ``[routes]`` entry and a relay domain's point at one
peer, so the daemon has a cached connection to it when the ETRN comes: the
flushed mail must arrive on a new one."""
from __future__ import annotations

import os
import re
import shutil
import smtplib
import subprocess
from pathlib import Path

import pytest

from conftest import wait_for
from test_e2e_relay import (DELIVERY, SENDER, message, relay_config, send, split_received,
                            wait_spool_empty)

BRANCH = "branch.example"


def fetchmail() -> str:
    path = shutil.which("fetchmail") or ("/usr/bin/fetchmail"
                                         if os.path.exists("/usr/bin/fetchmail") else None)
    if path is None:
        pytest.fail("Debian's fetchmail is not installed: run `make test-deps` (or, as root, "
                    "tests/setup-deps), or `apt-get install fetchmail`", pytrace=False)
    return path


def run_fetchmail(tmp_path: Path, mta, *domains: str) -> subprocess.CompletedProcess:
    """``fetchmail --protocol ETRN --fetchdomains D,...`` against the daemon."""
    home = tmp_path / "fetchmail-home"
    home.mkdir(exist_ok=True)
    rc = home / ".fetchmailrc"
    rc.write_text("")
    rc.chmod(0o600)
    env = dict(os.environ, HOME=str(home), LC_ALL="C")
    return subprocess.run(
        [fetchmail(), "-f", str(rc), "--nosyslog", "--nodetach", "-v",
         "--idfile", str(home / ".fetchids"), "--pidfile", str(home / "fetchmail.pid"),
         "--protocol", "ETRN", "--port", str(mta.port), "--fetchdomains", ",".join(domains),
         mta.host],
        capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)


def gateway_config(peer, extra: dict | None = None) -> str:
    text = relay_config(routes={BRANCH: peer.address, "dest.test": peer.address})
    text += f'[gateway]\nhold_domains = ["{BRANCH}"]\n'
    for k, v in (extra or {}).items():
        text += f"{k} = {v}\n"
    return text


def rcpt_states(mta) -> list[tuple[str, str, str]]:
    return [(r["address"], r["state"], r["last_reply"] or "") for r in mta.rows(
        "SELECT address, state, last_reply FROM recipients ORDER BY id")]


def queue_list(mta) -> str:
    from conftest import ROOT, subprocess_env
    out = subprocess.run([str(ROOT / ".venv" / "bin" / "mta"), "queue", "--config",
                          str(mta.config_path), "list"], capture_output=True, text=True,
                         timeout=30, env=subprocess_env())
    assert out.returncode == 0, out.stderr
    return out.stdout


def held(mta) -> bool:
    rows = rcpt_states(mta)
    return bool(rows) and all(s == "deferred" and "waiting for ETRN/ATRN" in r
                              for _a, s, r in rows)


def test_fetchmail_etrn_flushes_held_mail_on_a_new_connection(tmp_path, mta_factory,
                                                              peer_factory):
    fetchmail()
    peer = peer_factory()
    mta = mta_factory(extra=gateway_config(peer))
    # Relay mail first: the daemon keeps its connection to the peer cached.
    send(mta, SENDER, ["carol@dest.test"], message("relay first"))
    wait_for(lambda: len(peer.transactions()) == 1, DELIVERY, "the relay delivery")
    # Mail for the hold domain, from outside the relay networks too (the
    # hold domain is accepted from anyone).
    data = message("for the branch", b".leading dot\r\nbody\r\n")
    qid = send(mta, SENDER, ["bob@branch.example", "Dan@Branch.Example"], data)
    wait_for(lambda: held(mta), DELIVERY, "the branch mail to be held")
    assert len(peer.transactions()) == 1
    listing = queue_list(mta)
    assert qid in listing and "(451 4.3.2 waiting for ETRN/ATRN for branch.example)" in listing

    out = run_fetchmail(tmp_path, mta, BRANCH)
    assert out.returncode == 0, (out.stdout, out.stderr)
    assert "ETRN branch.example" in out.stderr + out.stdout
    assert "253" in out.stderr + out.stdout

    wait_spool_empty(mta)
    first, tx = peer.transactions()
    assert first.connection == 1
    assert tx.connection == 2                  # a new connection, not the cached one
    assert sorted(tx.accepted) == ["Dan@Branch.Example", "bob@branch.example"]
    _received, rest = split_received(tx.data)
    assert rest == data                        # byte-exact
    assert re.search(r"etrn client=127\.0\.0\.1 node=branch\.example domains=branch\.example "
                     r"messages=1 recipients=2 result=started", mta.log())


def test_fetchmail_sees_251_when_nothing_waits(tmp_path, mta_factory, peer_factory):
    fetchmail()
    peer = peer_factory()
    mta = mta_factory(extra=gateway_config(peer))
    out = run_fetchmail(tmp_path, mta, BRANCH, "dest.test")
    text = out.stdout + out.stderr
    # 251: no mail for the first domain, and fetchmail stops its list there.
    assert "251" in text and "No messages waiting for branch.example" in text, text
    assert out.returncode in (0, 1), text      # 1: PS_NOMAIL (6.4.37 ends with status 0)
    assert "ETRN dest.test" not in text        # the list stopped at the 251
    assert peer.transactions() == []


def test_etrn_from_outside_etrn_networks_is_459(tmp_path, mta_factory, peer_factory):
    fetchmail()
    peer = peer_factory()
    mta = mta_factory(extra=gateway_config(peer, {"etrn_networks": '["192.0.2.0/24"]'}))
    send(mta, SENDER, ["bob@branch.example"], message("held"))
    wait_for(lambda: held(mta), DELIVERY, "the branch mail to be held")
    out = run_fetchmail(tmp_path, mta, BRANCH)
    assert "459" in out.stdout + out.stderr
    assert out.returncode != 0
    with smtplib.SMTP(mta.host, mta.port, timeout=10) as s:
        s.ehlo("client.e2e.test")
        assert s.has_extn("etrn")
        assert s.docmd("ETRN", BRANCH) == (459, b"4.7.1 branch.example: not allowed")
    assert held(mta) and peer.transactions() == []


def test_queue_flush_domain_releases_a_hold_domain(mta_factory, peer_factory):
    peer = peer_factory()
    mta = mta_factory(extra=gateway_config(peer))
    data = message("flushed by the admin")
    send(mta, SENDER, ["bob@branch.example"], data)
    wait_for(lambda: held(mta), DELIVERY, "the branch mail to be held")
    from conftest import ROOT, subprocess_env
    mta_cmd = str(ROOT / ".venv" / "bin" / "mta")
    out = subprocess.run([mta_cmd, "queue", "--config", str(mta.config_path), "flush", "--all"],
                         capture_output=True, text=True, timeout=30, env=subprocess_env())
    assert out.returncode == 0, out.stderr
    out = subprocess.run([mta_cmd, "queue", "--config", str(mta.config_path), "flush",
                          "--domain", BRANCH], capture_output=True, text=True, timeout=30,
                         env=subprocess_env())
    assert out.returncode == 0 and out.stdout == "1 recipient due now\n", out
    wait_spool_empty(mta)
    [tx] = peer.transactions()
    assert split_received(tx.data)[1] == data


def test_etrn_to_an_accepting_worker_is_flushed_by_the_delivering_one(tmp_path, mta_factory,
                                                                      peer_factory):
    """``[server] workers = 2``: fetchmail's ETRN reaches the accepting
    worker, which releases the domain in the spool and rings the delivering
    worker; that one relays the held mail."""
    fetchmail()
    peer = peer_factory()
    mta = mta_factory(server={"workers": 2}, extra=gateway_config(peer))
    wait_for(lambda: "(1 delivering, 1 accepting)" in mta.log(), DELIVERY, "the workers")
    data = message("for the branch")
    qid = send(mta, SENDER, ["bob@branch.example"], data)
    wait_for(lambda: held(mta), DELIVERY, "the branch mail to be held")
    assert qid in queue_list(mta) and peer.transactions() == []
    out = run_fetchmail(tmp_path, mta, BRANCH)
    assert out.returncode == 0, (out.stdout, out.stderr)
    assert "253" in out.stderr + out.stdout
    wait_spool_empty(mta)
    [tx] = peer.transactions()
    assert tx.accepted == ["bob@branch.example"]
    assert split_received(tx.data)[1] == data
    assert re.search(r"etrn client=127\.0\.0\.1 node=branch\.example domains=branch\.example "
                     r"messages=1 recipients=1 result=started", mta.log())
