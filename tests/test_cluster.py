"""Two nodes on one spool: two ``twistd mta`` daemons (tests/conftest.py
MTADaemon) sharing a real PostgreSQL database (tests/pg.py), relaying to
one slow scripted next hop (test_crash_relay's).  Concurrent senders into
both; both deliver; ``kill -9`` of one in the middle of deliveries; the
other goes on alone.

Checked, with test_crash_relay's accounting:

* the load was spread: both nodes had claims in flight, and the next hop
  received from both (by their EHLO names);
* every recipient of every message that got a ``250`` -- from either node
  -- was received by the next hop, or is named in a DSN the next hop
  received (the dead node's claims are taken over by the live one when
  their lease runs out: ``[cluster] lease``);
* the killed node, restarted once the live one has taken over, does not
  repeat the live one's deliveries;
* a recipient was received more than once only if the killed node had it
  in flight at the kill; the queue ends empty.
"""
from __future__ import annotations

import random
import threading
import time
from collections import Counter
from pathlib import Path

import test_crash_relay as relay
from conftest import wait_for
from test_crash_relay import BAD, DOMAINS, Load, Sent, delivered_by_token, receipts, sender

LEASE = 3            # seconds: [cluster] lease (the least allowed)
SENDERS = 3          # per node


def node_config(peer_port: int) -> str:
    routes = "".join(f'"{d}" = "127.0.0.1:{peer_port}"\n' for d in DOMAINS + ["origin.test"])
    return ("[relay]\nconcurrency = 6\nper_destination = 3\n"
            "[retry]\nfirst = \"1s\"\nmax = \"1s\"\n"
            f"[cluster]\nlease = \"{LEASE}s\"\n"
            "[routes]\n" + routes)


def test_two_nodes_share_the_queue_and_a_killed_ones_work_is_taken_over(
        mta_factory, peer_factory, pg_url):
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    rng = random.Random(seed)
    script = {"data_end_delay": 0.3, "data_end_delay_min": 0.05,
              "rcpt": {b: "550 5.1.1 No such user here" for b in BAD}}
    [peer] = peer_factory.spawn(script, program=Path(relay.__file__))
    peer_factory.ready()
    a = mta_factory(url=pg_url, hostname="mx-a.e2e.test", extra=node_config(peer.port))
    b = mta_factory(url=pg_url, hostname="mx-b.e2e.test", extra=node_config(peer.port))

    loads = [Load(0, a.port, seed), Load(1, b.port, seed + 1)]
    threads = [threading.Thread(target=sender, args=(load, i), daemon=True)
               for load in loads for i in range(SENDERS)]
    for t in threads:
        t.start()
    owners_seen: set[str] = set()

    def both_busy() -> bool:
        owners_seen.update(r["owner"] for r in a.rows(
            "SELECT DISTINCT owner FROM recipients WHERE state = 'inflight'"))
        helos = {tx.helo for tx in peer.transactions()}
        return (len(owners_seen) >= 2 and {"mx-a.e2e.test", "mx-b.e2e.test"} <= helos
                and all(load.acked >= 10 for load in loads))
    try:
        wait_for(both_busy, 30, "deliveries under way from both nodes", interval=0.02,
                 detail=lambda: f"owners {owners_seen}; acked {[l.acked for l in loads]}")
        deadline = time.monotonic() + rng.uniform(0.0, 0.5)
        while time.monotonic() < deadline and not any(load.errors for load in loads):
            time.sleep(0.005)
        a.kill()
        inflight = [(r["queue_id"], r["address"], r["owner"]) for r in a.rows(
            "SELECT queue_id, address, owner FROM recipients WHERE state = 'inflight'")]
    finally:
        for load in loads:
            load.stop.set()
        for t in threads:
            t.join(15)
    for load in loads:
        assert not load.errors, load.errors
    allowed_twice = {(q, r) for q, r, _o in inflight}
    dsn_in_flight = {r for _q, r, _o in inflight if r.endswith("@origin.test")}
    dead_claims = sum(1 for _q, _r, o in inflight if o.startswith(f"{_hostname()}-{a.pid}-"))

    dead_owner = f"{_hostname()}-{a.pid}-"

    def dead_left() -> int:
        return sum(1 for r in b.rows("SELECT owner FROM recipients WHERE state = 'inflight'")
                   if r["owner"].startswith(dead_owner))
    # B goes on alone: what A had in flight is B's once A's leases run out ...
    wait_for(lambda: dead_left() == 0, 30, "the live node to take over the dead one's claims",
             interval=0.05)
    # ... and A, restarted meanwhile, does not repeat what B has in flight now
    # (not in allowed_twice unless it was in flight at the kill too).
    b_live = b.rows("SELECT COUNT(*) FROM recipients WHERE state = 'inflight'")[0][0]
    a.start()
    wait_for(lambda: b.count("messages") == 0, 60, "the queue to drain",
             interval=0.1,
             detail=lambda: b.rows("SELECT state, owner, COUNT(*) FROM recipients "
                                   "GROUP BY state, owner"))
    assert b.count("recipients") == 0

    everything: dict[str, Sent] = {item.token: item for load in loads for item in load.sent}
    got, bounces = receipts(peer)
    counts = Counter((qid, rcpt) for _tok, qid, rcpt, _d in got)
    by_token = delivered_by_token(everything, got)
    for token, rcpt, _to in bounces:
        item = everything.get(token)
        assert item is not None and rcpt in BAD and rcpt in item.rcpts, (token, rcpt)
        by_token.setdefault(token, set()).add(rcpt)
    acked = [item for item in everything.values() if item.status == "ok"]
    for item in acked:
        missing = set(item.rcpts) - by_token.get(item.token, set())
        assert not missing, f"lost after a 250: {item.token} {item.queue_id} {missing}"
    twice = {k: n for k, n in counts.items() if n > 1}
    assert set(twice) <= allowed_twice, (
        f"duplicates of recipients that were not in flight at the kill: "
        f"{set(twice) - allowed_twice}")
    dsn_counts = Counter((token, rcpt) for token, rcpt, _to in bounces)
    for (token, rcpt), n in dsn_counts.items():
        item = everything[token]
        assert n == 1 or f"{token}@origin.test" in dsn_in_flight or any(
            q == item.queue_id for q, _r in allowed_twice), (
            f"{n} DSNs for {token} {rcpt}, none in flight at the kill")
    delivered_by = Counter(tx.helo for tx in peer.transactions())
    print(f"{len(acked)} acknowledged ({[l.acked for l in loads]} by node); "
          f"{len(inflight)} recipients in flight at the kill, {dead_claims} of them the killed "
          f"node's; {b_live} in flight on the live node when the killed one restarted; "
          f"{sum(n - 1 for n in twice.values())} duplicate deliveries; "
          f"transactions by node {dict(delivered_by)}")
    # The kill did hit the killed node's deliveries (else the test proved little).
    assert dead_claims > 0, inflight


def _hostname() -> str:
    import socket
    return socket.gethostname()


def test_the_database_going_away_gives_451_then_everything_is_delivered(
        mta_factory, peer_factory, pg_server, pg_url):
    """The database stopped under load, then started again: while it is
    away, new mail gets ``451 4.3.0`` (never a 250 for a message not
    stored); then the node reconnects by itself, takes mail again, and
    everything acknowledged, before and after, is delivered once."""
    script = {"data_end_delay": 0.1}
    [peer] = peer_factory.spawn(script, program=Path(relay.__file__))
    peer_factory.ready()
    node = mta_factory(url=pg_url, extra=node_config(peer.port))
    node.expect_errors = False
    replies: list[tuple[int, str]] = []      # (code, token) of every message tried
    stop = threading.Event()
    problems: list[str] = []

    def send_loop() -> None:
        import smtplib
        n = 0
        while not stop.is_set():
            token = f"db{n}x{random.getrandbits(32):08x}"
            n += 1
            try:
                with smtplib.SMTP("127.0.0.1", node.port, timeout=30) as s:
                    s.ehlo("sender.db.test")
                    code, text = s.mail(f"{token}@origin.test")
                    if code == 250:
                        code, text = s.rcpt(f"u.{token}@{DOMAINS[n % len(DOMAINS)]}")
                    if code == 250:
                        code, text = s.data(f"From: <{token}@origin.test>\r\nMessage-ID: "
                                            f"<{token}@crash-relay.test>\r\nSubject: db\r\n\r\n"
                                            f"{token}\r\n".encode())
                    if code not in (250, 451):
                        problems.append(f"{token}: {code} {text!r}")
                    elif code == 451 and b"4.3.0" not in text:
                        problems.append(f"{token}: {code} {text!r}")
                    replies.append((code, token))
            except (OSError, smtplib.SMTPException) as e:
                problems.append(f"{token}: {e!r}")
    t = threading.Thread(target=send_loop, daemon=True)
    t.start()
    try:
        wait_for(lambda: sum(c == 250 for c, _t in replies) >= 10, 30, "mail taken")
        pg_server.stop("fast")
        try:
            seen = len(replies)
            wait_for(lambda: sum(c == 451 for c, _t in replies[seen:]) >= 3, 60,
                     "451 while the database is away", detail=lambda: replies[seen:])
        finally:
            pg_server.start()
        seen = len(replies)
        wait_for(lambda: sum(c == 250 for c, _t in replies[seen:]) >= 10, 60,
                 "mail taken again once the database is back",
                 detail=lambda: (replies[seen:], node.log()[-3000:]))
    finally:
        stop.set()
        t.join(30)
    assert not problems, problems
    wait_for(lambda: node.count("messages") == 0, 60, "the queue to drain", interval=0.1)
    got = Counter(relay.TOKEN.search(tx.data).group(1).decode() for tx in peer.transactions())
    acked = {tok for c, tok in replies if c == 250}
    refused = {tok for c, tok in replies if c == 451}
    assert acked <= set(got), f"lost after a 250: {acked - set(got)}"
    assert not (refused & set(got)), f"delivered after a 451: {refused & set(got)}"
    print(f"{len(acked)} acknowledged, {len(refused)} refused with 451 while the database "
          f"was away; duplicates {[k for k, n in got.items() if n > 1]}")


def test_mail_accepted_on_one_node_is_delivered_by_another_woken_by_notify(
        mta_factory, peer_factory, pg_url):
    """LISTEN/NOTIFY between nodes (mta.spool.notify): A only accepts
    (``[relay] deliver = false``: no queue runner of its own), B delivers
    and polls once an hour -- so only A's notification can start B's
    queue run, and the next hop gets each message from B."""
    import smtplib

    [peer] = peer_factory.spawn({}, program=Path(relay.__file__))
    peer_factory.ready()
    b = mta_factory(url=pg_url, hostname="mx-b.e2e.test",
                    extra=node_config(peer.port).replace(f"lease = \"{LEASE}s\"\n",
                                                         f"lease = \"{LEASE}s\"\npoll = \"1h\"\n"))
    a = mta_factory(url=pg_url, hostname="mx-a.e2e.test", extra="[cluster]\npoll = \"1h\"\n")
    for n in range(2):      # the second one long after B's first (and only) poll
        with smtplib.SMTP("127.0.0.1", a.port, timeout=30) as s:
            s.sendmail("origin@origin.test", [f"user{n}@d0.test"],
                       f"Subject: notify {n}\r\n\r\nhello\r\n")
        wait_for(lambda: any(f"user{n}@d0.test" in tx.accepted for tx in peer.transactions()),
                 30, f"B to deliver message {n}", interval=0.05,
                 detail=lambda: a.rows("SELECT address, state, owner FROM recipients"))
    assert {tx.helo for tx in peer.transactions()} == {"mx-b.e2e.test"}
    wait_for(lambda: a.count("messages") == 0, 30, "the queue to be empty")
