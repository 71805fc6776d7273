"""``[server] workers = N``: one twistd process supervising N workers that
share the listening sockets and the spool (mta.workers): in a daemon that
accepts and delivers, worker 1 delivers and the others accept.  Real
daemons (tests/conftest.py), a scripted next hop (tests/peers.py)."""
from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import MTADaemon, toml_text, wait_for
from mta.config import ConfigError, config_from_dict

WORKERS = {"workers": 2}
STARTED = re.compile(r"mta worker (\d+) of (\d+)(?: \((\w+)\))? started: pid (\d+), node (\S+)")


# --------------------------------------------------------------------------- config

def _error(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data, "etc/mta.toml")
    message = str(info.value)
    assert "\n" not in message
    return message


def test_workers_default_is_one_process() -> None:
    assert config_from_dict({}).server.workers == 1


def test_workers_zero_is_one_per_core() -> None:
    cores = len(os.sched_getaffinity(0))
    assert config_from_dict({"server": {"workers": 0}}).server.workers == cores


@pytest.mark.parametrize("value, words", [(-1, "at least 0"), ("2", "expected an integer"),
                                          (True, "expected an integer"), (100000, "at most")])
def test_workers_bad_values(value: object, words: str) -> None:
    message = _error({"server": {"workers": value}})
    assert message.startswith("etc/mta.toml: [server] workers: ") and words in message, message


def test_workers_with_a_node_name_are_a_configuration() -> None:
    """Only the delivering worker claims: it is the node of that name."""
    config = config_from_dict({"server": {"workers": 2}, "cluster": {"node": "mx1"}})
    assert (config.server.workers, config.cluster.node) == (2, "mx1")


def test_workers_that_all_deliver_cannot_share_a_node_name(twistd, tmp_path) -> None:
    """No listener: every worker would run the queue, each needs its own name."""
    config = tmp_path / "mta.toml"
    config.write_text(toml_text({
        "server": {"listen": [], "workers": 2},
        "spool": {"url": f"sqlite:///{tmp_path}/spool/mta.sqlite"},
        "dns": {"nameservers": ["127.0.0.1:9"]}, "cluster": {"node": "mx1"}}))
    done = twistd("-n", "--pidfile=", "mta", "--config", str(config))
    assert done.returncode == 1
    err = done.stderr.decode()
    assert re.fullmatch(r"mta: \S*mta\.toml: \[cluster\] node: 2 workers that all deliver "
                        r"\(no \[server\] listen or submission\) cannot share the one node name "
                        r"'mx1' \(leave node empty: each worker gets its own\)\n", err), err


# --------------------------------------------------------------------------- helpers

def workers_of(mta: MTADaemon) -> dict[int, int]:
    """worker number -> pid of the running workers, from the start lines of
    the current log (the last start of each number)."""
    found: dict[int, int] = {}
    for m in STARTED.finditer(mta.log()):
        found[int(m.group(1))] = int(m.group(4))
    return {n: pid for n, pid in found.items() if alive(pid)}


def children(pid: int) -> set[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return set()
    return {int(x) for x in text.split()}


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def two_workers(mta: MTADaemon, n: int = 2) -> dict[int, int]:
    return wait_for(lambda: (lambda w: w if len(w) == n and set(w.values()) ==
                             children(mta.pid) else None)(workers_of(mta)),
                    20, f"{n} workers started", detail=mta.log)


def send(port: int, rcpt: str, n: int) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("client.workers.test")
        code, text = s.mail(f"sender{n}@origin.test")
        assert code == 250, text
        code, text = s.rcpt(rcpt)
        assert code == 250, text
        code, text = s.data(f"Subject: w{n}\r\nMessage-ID: <w{n}@workers.test>\r\n\r\n"
                            f"body {n}\r\n".encode())
        assert code == 250, text
        m = re.search(rb"queued as ([0-9A-Z]+)", text)
        assert m, text
        return m.group(1).decode()


def owner(server_port: int, client_port: int, pids: list[int]) -> int | None:
    """The pid among *pids* holding the server side of the connection from
    *client_port* (/proc/net/tcp's inode, found among the processes' fds)."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if (int(f[1].rsplit(":", 1)[1], 16) == server_port
                and int(f[2].rsplit(":", 1)[1], 16) == client_port):
            inode = f[9]
    if inode is None:
        return None
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
            except OSError:
                pass
    return None


def send_until_each_accepted(mta: MTADaemon, pids: list[int], rcpt: str,
                             tries: int = 200) -> tuple[list[str], dict[int, int]]:
    """Messages sent one connection after another until each of *pids* has
    accepted at least one (the kernel hands each connection on the shared
    socket to whichever worker accepts first).  Returns the Message-ID tokens
    sent and how many connections each pid accepted."""
    accepted = dict.fromkeys(pids, 0)
    sent = []
    for n in range(tries):
        with smtplib.SMTP("127.0.0.1", mta.port, timeout=10) as s:
            s.ehlo("client.workers.test")
            who = owner(mta.port, s.sock.getsockname()[1], pids)
            assert who in accepted, (who, pids)
            accepted[who] += 1
            assert s.mail(f"sender{n}@origin.test")[0] == 250
            assert s.rcpt(rcpt)[0] == 250
            code, text = s.data(f"Subject: w{n}\r\nMessage-ID: <w{n}@workers.test>\r\n\r\n"
                                f"body {n}\r\n".encode())
            assert code == 250, text
            sent.append(f"w{n}")
        if all(accepted.values()):
            return sent, accepted
    raise AssertionError(f"after {tries} connections not every worker accepted one: {accepted}")


def delivering(mta_factory, peer_factory, server=WORKERS, **kw):
    [peer] = peer_factory.spawn({})
    peer_factory.ready()
    mta = mta_factory(server=server,
                      extra='[relay]\n[retry]\nfirst = "1s"\nmax = "1s"\n[routes]\n'
                            f'"dest.test" = "{peer.address}"\n', **kw)
    return mta, peer


def received(peer) -> list[str]:
    out = []
    for tx in peer.transactions():
        m = re.search(rb"Message-ID: <(w\d+)@workers\.test>", tx.data)
        assert m, tx.data[:300]
        out.extend(m.group(1).decode() for _ in tx.accepted)
    return out


# --------------------------------------------------------------------------- daemons

def test_accepting_workers_share_the_port_and_the_delivering_one_delivers_once(
        mta_factory, peer_factory):
    mta, peer = delivering(mta_factory, peer_factory, server={"workers": 3})
    workers = two_workers(mta, 3)
    log = mta.log()
    assert re.search(r"mta \S+ started: .*; 3 worker processes \(1 delivering, 2 accepting\)",
                     log), log
    roles = {int(m.group(1)): m.group(3) for m in STARTED.finditer(log)}
    assert roles == {1: "delivering", 2: "accepting", 3: "accepting"}, log
    nodes = {m.group(5) for m in STARTED.finditer(log)}
    assert len(nodes) == 3, log                      # a spool node of its own each
    sent, accepted = send_until_each_accepted(mta, [workers[2], workers[3]], "u@dest.test")
    print(f"connections accepted per accepting worker pid: {accepted}")
    wait_for(lambda: mta.count("messages") == 0, 30, "the spool to drain", detail=mta.log)
    assert sorted(received(peer)) == sorted(sent)    # each once
    assert mta.stop() in (0, -15), mta.log()
    assert not [p for p in workers.values() if alive(p)]
    assert "[mta#info] mta stopped" in mta.log()


def test_without_delivery_every_worker_accepts(mta_factory):
    mta = mta_factory(server=WORKERS, extra="[relay]\ndeliver = false\n")
    workers = two_workers(mta)
    assert not re.search(r"accepting\)|delivering\)", mta.log()), mta.log()
    send_until_each_accepted(mta, list(workers.values()), "someone@example.test")
    assert mta.stop() in (0, -15), mta.log()


def test_sigterm_stops_every_worker_and_loses_nothing(mta_factory, peer_factory):
    [peer] = peer_factory.spawn({"actions": {"DATA_END": "stall"}})
    peer_factory.ready()
    mta = mta_factory(server=WORKERS,
                      extra='[relay]\nshutdown_grace = "0.3s"\n[routes]\n'
                            f'"dest.test" = "{peer.address}"\n')
    pids = list(two_workers(mta).values())
    queued = [send(mta.port, "u@dest.test", i) for i in range(4)]
    wait_for(lambda: peer.transactions(), 20, "a delivery in flight", detail=mta.log)
    status = mta.stop()
    assert status in (0, -15), mta.log()
    assert not [p for p in pids if alive(p)], mta.log()
    log = mta.log()
    for n in (1, 2):
        assert re.search(rf"mta worker {n} \(pid \d+\) stopped", log), log
    assert "[mta#info] mta stopped" in log
    # Nothing lost: every acknowledged message is still in the spool (the next
    # hop never answered), none of its recipients left in flight.
    left = {r[0] for r in mta.rows("SELECT queue_id FROM messages")}
    assert set(queued) <= left
    assert mta.rows("SELECT COUNT(*) FROM recipients WHERE state = 'inflight'")[0][0] == 0


def test_kill_9_of_the_supervisor_takes_the_workers_and_restart_delivers(mta_factory,
                                                                        peer_factory):
    [peer] = peer_factory.spawn({"actions": {"DATA_END": "stall"}})
    peer_factory.ready()
    extra = ('[relay]\n[retry]\nfirst = "1s"\nmax = "1s"\n[routes]\n'
             f'"dest.test" = "{peer.address}"\n')
    mta = mta_factory(server=WORKERS, extra=extra)
    pids = list(two_workers(mta).values())
    for i in range(5):
        send(mta.port, "u@dest.test", i)
    wait_for(lambda: peer.transactions(), 20, "a delivery in flight", detail=mta.log)
    mta.kill()
    wait_for(lambda: not [p for p in pids if alive(p)], 10, "the workers to die with it")
    # The same spool, now with a next hop that answers.
    peer.stop()
    [peer2] = peer_factory.spawn({})
    peer_factory.ready()
    mta.extra = extra.replace(peer.address, peer2.address)
    mta.start()
    two_workers(mta)
    wait_for(lambda: mta.count("messages") == 0, 30, "the spool to drain after restart",
             detail=lambda: [tuple(r) for r in mta.rows("SELECT * FROM recipients")])
    assert sorted(set(received(peer2))) == [f"w{i}" for i in range(5)]


def test_a_named_node_s_delivering_worker_takes_its_claims_back_at_once(mta_factory,
                                                                       peer_factory):
    """[cluster] node with workers: the delivering worker claims under that
    name, and the one forked after it was killed is the same node, so it
    queues what was in flight again at once -- not a lease (1 h) later."""
    [peer] = peer_factory.spawn({"actions": {"DATA_END": "stall"}})
    peer_factory.ready()
    mta = mta_factory(server=WORKERS,
                      extra='[cluster]\nnode = "mx1"\nlease = "1h"\n[relay]\n[routes]\n'
                            f'"dest.test" = "{peer.address}"\n')
    workers = two_workers(mta)
    assert re.findall(r"mta worker \d of 2 \((\w+)\) started: pid \d+, node (\S+)",
                      mta.log()) in ([("delivering", "mx1"), ("accepting", "mx1")],
                                     [("accepting", "mx1"), ("delivering", "mx1")]), mta.log()
    for i in range(3):
        send(mta.port, "u@dest.test", i)
    inflight = "SELECT owner FROM recipients WHERE state = 'inflight'"
    wait_for(lambda: [tuple(r) for r in mta.rows(inflight)] == [("mx1",)] * 3, 20,
             "three deliveries in flight", detail=mta.log)
    os.kill(workers[1], signal.SIGKILL)
    wait_for(lambda: re.search(r"requeued 3 recipients that were in flight at the last stop",
                               mta.log()), 20, "the claims taken back", detail=mta.log)
    wait_for(lambda: [tuple(r) for r in mta.rows(inflight)] == [("mx1",)] * 3, 20,
             "the three in flight again", detail=mta.log)
    assert mta.count("messages") == 3


@pytest.mark.parametrize("number", [1, 2])
def test_a_killed_worker_is_forked_again(mta_factory, peer_factory, number):
    """The delivering worker (1) or an accepting one (2), forked again in
    its role: mail accepted afterwards is delivered."""
    mta, peer = delivering(mta_factory, peer_factory)
    workers = two_workers(mta)
    os.kill(workers[number], signal.SIGKILL)
    wait_for(lambda: re.search(rf"mta worker {number} \(pid \d+\) died \(killed by SIGKILL\)",
                               mta.log()), 10, "the death logged", detail=mta.log)
    again = wait_for(lambda: (lambda w: w if len(w) == 2 and w[number] != workers[number]
                              else None)(workers_of(mta)),
                     20, f"worker {number} forked again", detail=mta.log)
    other = 3 - number
    assert again[other] == workers[other]
    sent, accepted = send_until_each_accepted(mta, [again[2]], "u@dest.test")
    wait_for(lambda: mta.count("messages") == 0, 30, "the spool to drain", detail=mta.log)
    assert sorted(received(peer)) == sorted(sent)
    assert mta.stop() in (0, -15), mta.log()
    assert not [p for p in again.values() if alive(p)]


def test_sighup_reaches_every_worker(mta_factory, tmp_path):
    users = tmp_path / "users"
    users.write_text("")
    mta = mta_factory(server=WORKERS, extra=f'[auth]\nusers_file = "{users}"\n')
    two_workers(mta)
    os.kill(mta.pid, signal.SIGHUP)
    wait_for(lambda: mta.log().count("SIGHUP: users file") == 2, 10,
             "both workers reloading the users file", detail=mta.log)
    assert mta.stop() in (0, -15), mta.log()


def test_metrics_are_summed_across_workers(mta_factory, peer_factory):
    """[metrics] listen with workers: the page (served by the delivering
    worker) counts what the accepting worker accepted and what the delivering
    one delivered, and keeps a killed worker's counts; the shared directory
    is gone once the daemon has stopped."""
    from conftest import free_port
    from test_observability import scrape, value
    mport = free_port()
    [peer] = peer_factory.spawn({})
    peer_factory.ready()
    mta = mta_factory(server={"workers": 3},
                      extra=f'[metrics]\nlisten = "tcp:{mport}:interface=127.0.0.1"\n'
                            'queue_interval = "0.2s"\n[relay]\n[routes]\n'
                            f'"dest.test" = "{peer.address}"\n')
    workers = two_workers(mta, 3)
    probes = value(scrape(mport), "mta_smtp_connections_total")   # the harness's start probe
    sent, accepted = send_until_each_accepted(mta, [workers[2], workers[3]], "u@dest.test")
    n = len(sent)
    wait_for(lambda: mta.count("messages") == 0, 30, "the spool to drain", detail=mta.log)
    text = wait_for(lambda: (lambda t: t if value(
        t, "mta_delivery_recipients_total", status="delivered", domain="dest.test") == n
        else None)(scrape(mport)), 20, f"{n} deliveries counted", detail=lambda: scrape(mport))
    assert value(text, "mta_messages_accepted_total") == n, text
    assert value(text, "mta_smtp_connections_total") == probes + n, text
    assert value(text, "mta_smtp_connections_current") == 0, text
    assert value(text, "mta_delivery_latency_seconds_count") == n, text
    wait_for(lambda: value(scrape(mport), "mta_queue_messages") == 0, 10, "the queue gauge")
    # An open session counts once, in whichever worker holds it.
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=10) as s:
        s.ehlo("client.workers.test")
        assert value(scrape(mport), "mta_smtp_connections_current") == 1
    wait_for(lambda: value(scrape(mport), "mta_smtp_connections_current") == 0, 10,
             "the session closed")
    # A killed accepting worker's counts stay; its forked successor adds to them.
    os.kill(workers[2], signal.SIGKILL)
    again = wait_for(lambda: (lambda w: w if len(w) == 3 and w[2] != workers[2]
                              else None)(workers_of(mta)),
                     20, "worker 2 forked again", detail=mta.log)
    more, _ = send_until_each_accepted(mta, [again[2], again[3]], "u@dest.test")
    wait_for(lambda: value(scrape(mport), "mta_messages_accepted_total") == n + len(more), 20, "the new acceptances counted", detail=lambda: scrape(mport))
    tmp = tempfile.gettempdir()          # where the daemon (same environment) made it
    shared = [d for d in os.listdir(tmp) if d.startswith("mta-metrics-")]
    mine = [d for d in shared if os.path.exists(os.path.join(tmp, d, f"counter_{workers[1]}.db"))]
    assert len(mine) == 1, shared
    # Another start on this machine sweeps only directories no daemon holds.
    from mta.metrics import shared_directory
    other = shared_directory()
    try:
        assert os.path.isdir(os.path.join(tmp, mine[0]))
    finally:
        shutil.rmtree(other)
    assert mta.stop() in (0, -15), mta.log()
    assert not os.path.exists(os.path.join(tmp, mine[0]))
