"""Metrics and logs (Step 4 "Observability").

* unit tests of mta.metrics (label capping, several registries in one
  process, the server's counters on a StringTransport, the queue gauges);
* the real daemon with ``[metrics] listen`` on loopback, relaying to a
  scripted next hop: mail in, mail refused for several reasons, deliveries
  delivered/deferred/bounced; the page is scraped with urllib and the values
  checked;
* logs: one line per accepted message, ``twistd --logfile``, and JSON lines
  with ``twistd --logger mta.logging.json_observer``.
"""
from __future__ import annotations

import io
import json
import os
import re
import smtplib
import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import task
from twisted.logger import Logger, LogPublisher

from conftest import free_port, toml_text, wait_for
from daemonutil import use_twistd_args
from fakespool import SyncSpool
from test_scheduler import put
from smtpwire import Client, codes, make_factory

from mta.metrics import Metrics, QueueGauges, is_loopback_endpoint, shared_directory


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Scrape text -> {(sample name, sorted label items): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text_or_samples, name: str, **labels) -> float | None:
    got = samples(text_or_samples) if isinstance(text_or_samples, str) else text_or_samples
    return got.get((name, tuple(sorted(labels.items()))))


# --------------------------------------------------------------------------- units

def test_domain_labels_are_capped():
    m = Metrics(max_domains=2)
    for domain in ["a.test", "b.test", "c.test", "a.test", "d.test"]:
        m.recipient_done("delivered", domain, 1.0)
    m.recipient_done("deferred", "c.test")
    text = m.scrape().decode()
    assert value(text, "mta_delivery_recipients_total", status="delivered", domain="a.test") == 2
    assert value(text, "mta_delivery_recipients_total", status="delivered", domain="b.test") == 1
    assert value(text, "mta_delivery_recipients_total", status="delivered", domain="other") == 2
    assert value(text, "mta_delivery_recipients_total", status="deferred", domain="other") == 1
    assert value(text, "mta_delivery_latency_seconds_count") == 5


def test_shared_directory_sweeps_those_no_daemon_holds(tmp_path):
    """What a kill -9 of a supervisor (or its failed start) left in the
    temporary directory goes at the next start: a directory whose lock
    nobody holds.  One whose lock is held (a running daemon, whatever its
    pid now), one without a lock and anything else stay."""
    import fcntl
    left = tmp_path / "mta-metrics-abandoned"
    (left / "sub").mkdir(parents=True)
    (left / "daemon.lock").write_bytes(b"")
    (left / "counter_1.db").write_bytes(b"x")
    running = tmp_path / "mta-metrics-running"
    running.mkdir()
    (running / "daemon.lock").write_bytes(b"")
    holder = os.open(running / "daemon.lock", os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)                 # as a running daemon does
    unknown = tmp_path / "mta-metrics-unknown"         # no lock: not known to be ours
    unknown.mkdir()
    other = tmp_path / "other"
    other.mkdir()
    try:
        made = shared_directory(str(tmp_path))
        assert os.path.basename(made).startswith("mta-metrics-")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [running.name, unknown.name, other.name, os.path.basename(made)])
        again = shared_directory(str(tmp_path))       # ours is held: it stays
        assert again != made and os.path.isdir(made)
        assert os.listdir(made) == ["daemon.lock"]
    finally:
        os.close(holder)
    shared_directory(str(tmp_path))
    assert not running.exists()                        # released: now swept


def test_a_scrape_skips_a_worker_file_not_yet_sized(tmp_path):
    """A worker creates its value file, then sizes it: a scrape in between
    (of the workers' summed page) sees an empty file and must not fail."""
    from prometheus_client.values import MultiProcessValue
    from mta.metrics import _SharedCollector
    (tmp_path / "counter_999.db").write_bytes(b"")                 # just created
    value_class = MultiProcessValue(process_identifier=lambda: 1000)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path)
    try:
        v = value_class("counter", "mta_x_total", "mta_x_total", (), (), "help")
        v.inc(3)
    finally:
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]
    [family] = list(_SharedCollector(str(tmp_path)).collect())
    assert [(s.name, s.value) for s in family.samples] == [("mta_x_total", 3.0)]


def test_registries_are_separate():
    a, b = Metrics(), Metrics()
    a.accepted.inc()
    assert value(a.scrape().decode(), "mta_messages_accepted_total") == 1
    assert value(b.scrape().decode(), "mta_messages_accepted_total") == 0


def test_server_counts_connections_acceptances_and_refusals():
    m = Metrics()
    factory = make_factory(max_message_size=1000, metrics=m)
    c = Client(factory)
    c.start(rcpts=("<u@example.test>",))
    assert codes(c.send("RCPT TO:<x@elsewhere.test>\r\n")) == ["554 5.7.1"]   # from outside
    c.send("DATA\r\n")
    c.send("Subject: a\r\n\r\nbare\nnewline\r\n.\r\n")
    c.start(rcpts=("<u@example.test>",), esmtp=True)
    c.send("DATA\r\n")
    c.send("Subject: a\r\n\r\nfine\r\n.\r\n")
    c.spool.fire()
    assert codes(c.take()) == ["250 2.0.0"]
    c.after_reply()
    assert codes(c.send("MAIL FROM:<a@example.org> SIZE=5000\r\n")) == ["552 5.3.4"]
    c.start(rcpts=("<u@example.test>",), esmtp=True)
    c.send("DATA\r\n")
    c.send("Subject: a\r\n\r\n" + "x" * 1200 + "\r\n.\r\n")
    text = m.scrape().decode()
    assert value(text, "mta_smtp_connections_total") == 1
    assert value(text, "mta_smtp_connections_current") == 1
    assert value(text, "mta_messages_accepted_total") == 1
    for reason, n in [("relay_denied", 1), ("bare_newline", 1), ("too_big", 2),
                      ("long_line", 0), ("spool_error", 0)]:
        assert value(text, "mta_messages_rejected_total", reason=reason) == n, reason
    c.lose()
    assert value(m.scrape().decode(), "mta_smtp_connections_current") == 0


def test_queue_gauges_come_from_the_spool(tmp_path):
    clock = task.Clock()
    clock.advance(1_800_000_000)

    class Env:
        pass
    e = Env()
    e.clock, e.spool = clock, SyncSpool(tmp_path / "spool.sqlite")
    put(e, rcpts=("a@x.test", "b@y.test"))
    clock.advance(30)
    put(e, rcpts=("c@x.test",))
    e.spool.sql("UPDATE recipients SET state = 'deferred' WHERE address = 'b@y.test'")
    m = Metrics(clock=clock.seconds)
    gauges = QueueGauges(m, e.spool, 5.0, reactor=clock)
    gauges.startService()
    clock.advance(10)
    text = m.scrape().decode()
    assert value(text, "mta_queue_recipients", state="queued") == 2
    assert value(text, "mta_queue_recipients", state="deferred") == 1
    assert value(text, "mta_queue_recipients", state="inflight") == 0
    assert value(text, "mta_queue_messages") == 2
    assert value(text, "mta_queue_oldest_message_age_seconds") == 40
    gauges.stopService()


@pytest.mark.parametrize("endpoint, loopback", [
    ("tcp:9025:interface=127.0.0.1", True), ("tcp6:9025:interface=\\:\\:1", True),
    ("tcp:9025", False), ("tcp:9025:interface=0.0.0.0", False), ("unix:/run/mta.sock", True),
])
def test_loopback_endpoint_check(endpoint, loopback):
    assert is_loopback_endpoint(endpoint) is loopback


def test_json_observer_writes_one_object_per_line():
    from mta.logging import json_observer
    out = io.StringIO()
    log = Logger(namespace="mta.smtpd", observer=LogPublisher(json_observer(out)))
    log.info("{queue_id}: client={client} size={size}", queue_id="Q1", client="127.0.0.1",
             size=12)
    log.warn("second")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["text"] == "Q1: client=127.0.0.1 size=12"
    assert (first["queue_id"], first["size"], first["level"]) == ("Q1", 12, "info")
    assert first["log_namespace"] == "mta.smtpd"
    assert json.loads(lines[1])["level"] == "warn"


# --------------------------------------------------------------------------- the daemon

def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        return r.read().decode()


def test_metrics_endpoint_of_the_daemon(mta_factory, peer_factory):
    [peer] = peer_factory.spawn({"rcpt": {"bad@dest.test": "550 5.1.1 No such user",
                                          "later@dest2.test": "451 4.3.0 Try again later"}})
    peer_factory.ready()
    mport = free_port()
    mta = mta_factory(
        server={"max_message_size": 10000},
        policy={"relay_networks": [], "relay_domains": ["dest.test", "dest2.test"]},
        extra=f'[relay]\n[routes]\n"dest.test" = "{peer.address}"\n'
              f'"dest2.test" = "{peer.address}"\n'
              f'[metrics]\nlisten = "tcp:{mport}:interface=127.0.0.1"\nqueue_interval = "0.2s"\n')
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=10) as s:
        for i in range(3):
            s.sendmail("", ["ok@dest.test"], f"Subject: {i}\r\n\r\nbody\r\n".encode())
        s.sendmail("", ["bad@dest.test"], b"Subject: bounce\r\n\r\nbody\r\n")
        s.sendmail("", ["later@dest2.test"], b"Subject: later\r\n\r\nbody\r\n")
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            s.sendmail("", ["x@elsewhere.test"], b"Subject: relay\r\n\r\nbody\r\n")
        with pytest.raises(smtplib.SMTPDataError):
            s.sendmail("", ["ok@dest.test"], b"Subject: bare\r\n\r\nbare\nLF\r\n")
        code, _ = s.docmd("RSET")
        code, _ = s.mail("", ["SIZE=20000"])
        assert code == 552
        # While this session is open it is a current connection.
        wait_for(lambda: value(scrape(mport), "mta_smtp_connections_current") == 1, 10,
                 "one open connection")

    def settled():
        got = samples(scrape(mport))
        ok = (value(got, "mta_delivery_recipients_total", status="delivered",
                    domain="dest.test") == 3
              and value(got, "mta_delivery_recipients_total", status="bounced",
                        domain="dest.test") == 1
              and value(got, "mta_delivery_recipients_total", status="deferred",
                        domain="dest2.test") == 1
              and value(got, "mta_queue_recipients", state="deferred") == 1)
        return got if ok else None
    got = wait_for(settled, 15, "the deliveries to show in the metrics", interval=0.1)
    assert value(got, "mta_smtp_connections_total") == 2   # with conftest's readiness probe
    assert value(got, "mta_messages_accepted_total") == 5
    assert value(got, "mta_messages_rejected_total", reason="relay_denied") == 1
    assert value(got, "mta_messages_rejected_total", reason="bare_newline") == 1
    assert value(got, "mta_messages_rejected_total", reason="too_big") == 1
    assert value(got, "mta_delivery_latency_seconds_count") == 4      # the final ones
    assert value(got, "mta_spool_commit_seconds_count") >= 5
    assert value(got, "mta_spool_commit_messages_sum") == 5
    assert value(got, "mta_queue_messages") == 1
    assert value(got, "mta_queue_recipients", state="queued") == 0
    assert value(got, "mta_queue_oldest_message_age_seconds") > 0
    assert "mta_messages_accepted_created" not in scrape(mport)
    # The page has a home; anything else is 404.
    with urllib.request.urlopen(f"http://127.0.0.1:{mport}/", timeout=10) as r:
        assert b"/metrics" in r.read()
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{mport}/nope", timeout=10)
    assert e.value.code == 404
    # Scrapes do not fill the log.
    assert "GET /metrics" not in mta.log()


def test_metrics_port_in_use_stops_startup(twistd, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = tmp_path / "mta.toml"
        config.write_text(toml_text({
            "server": {"listen": [f"tcp:{free_port()}:interface=127.0.0.1"]},
            "spool": {"url": f"sqlite:///{tmp_path}/spool/mta.sqlite"},
            "relay": {"deliver": False}, "dns": {"nameservers": ["127.0.0.1:9"]},
            "metrics": {"listen": f"tcp:{port}:interface=127.0.0.1"}}))
        done = twistd("-n", "--pidfile=", "mta", "--config", str(config))
    assert done.returncode == 1
    assert re.search(rf"mta: .*mta\.toml: \[metrics\] listen: tcp:{port}:interface=127\.0\.0\.1: "
                     r"cannot listen: Address already in use", done.stderr.decode()), done


ACCEPTED = re.compile(r"([0-9A-Z]{10,}): client=127\.0\.0\.1 helo=\S+ from=<a@origin\.test> "
                      r"size=\d+ nrcpt=2 proto=ESMTP")


def test_logfile_and_one_line_per_accepted_message(mta_factory, tmp_path):
    logfile = tmp_path / "mta.log"
    mta = use_twistd_args(mta_factory(start=False), f"--logfile={logfile}")
    mta.start()
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=10) as s:
        s.sendmail("a@origin.test", ["b@dest.test", "c@dest.test"], b"Subject: x\r\n\r\nx\r\n")
    mta.stop()
    text = logfile.read_text()
    assert len(ACCEPTED.findall(text)) == 1, text
    assert mta.log() == ""             # nothing on standard output


def test_json_log_via_twistd_logger(mta_factory, tmp_path):
    path = tmp_path / "mta.json"
    mta = use_twistd_args(mta_factory(start=False), "--logger", "mta.logging.json_observer",
                          env={"MTA_LOG_JSON": str(path)})
    mta.start()
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=10) as s:
        s.sendmail("a@origin.test", ["b@dest.test", "c@dest.test"], b"Subject: x\r\n\r\nx\r\n")
    mta.stop()
    events = [json.loads(line) for line in path.read_text().splitlines()]
    accepted = [e for e in events if ACCEPTED.fullmatch(e.get("text", ""))]
    assert len(accepted) == 1, events
    e = accepted[0]
    assert (e["client"], e["sender"], e["nrcpt"], e["level"]) == ("127.0.0.1", "a@origin.test",
                                                                   2, "info")
    assert e["queue_id"] == ACCEPTED.fullmatch(e["text"]).group(1)
    assert any("starting up" in e["text"] for e in events)
