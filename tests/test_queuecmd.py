"""``mta queue``: against a real spool -- a SQLite file, and a database on
a private PostgreSQL (tests/pg.py): the ``site`` fixture is both -- made
with mta.spool.Spool and filled with mta.spool.ops.insert_messages.

The commands a script relies on (exit statuses, JSON, raw --body, missing
ids) run as the installed ``mta`` script in a subprocess; the rest call
``mta.cli.main`` in this process (the same code, without a second's worth
of interpreter start-up per call).  The last test flushes a deferred message
out of a running daemon (``twistd mta``) to a scripted next hop.
"""
from __future__ import annotations

import email
import email.policy
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from conftest import subprocess_env, toml_text, wait_for
from mta.cli import main as mta_main
from mta.message import InboundMessage, Recipient, new_queue_id
from mta.spool import Spool
from mta.spool.ops import insert_messages

HOSTNAME = "mx.queue.test"
MTA = Path(sys.executable).with_name("mta")
FAR = 10 ** 10          # a next_attempt far in the future


def mta_command(*args: str) -> list[str]:
    return [str(MTA), *args] if MTA.exists() else [sys.executable, "-m", "mta.cli", *args]


class Site:
    """A configuration file and a spool with some messages in it."""

    def __init__(self, directory: Path, url: str | None = None):
        self.dir = directory
        self.db = directory / "spool" / "mta.sqlite"
        self.url = url or f"sqlite:///{self.db}"
        self.config = directory / "mta.toml"
        self.config.write_text(toml_text({"server": {"hostname": HOSTNAME},
                                          "spool": {"url": self.url}}))
        self.spool = Spool(self.url, node="test-node", lease=300.0, reactor=Clock())
        self.spool.open()

    def add(self, sender: str, rcpts: list[str], *, age: float = 0.0, notify: str | None = None,
            subject: str = "test", body: bytes = b"Hello.\r\n") -> str:
        now = time.time() - age
        qid = new_queue_id(now)
        headers = (f"Received: from client.test ([127.0.0.1]) by {HOSTNAME} (mta) with ESMTP "
                   f"id {qid};\r\n\tMon, 1 Jan 2024 00:00:00 +0000\r\n"
                   f"From: <{sender or 'MAILER-DAEMON@origin.test'}>\r\n"
                   f"Subject: {subject}\r\n\r\n").encode()
        msg = InboundMessage(qid, sender, [Recipient(r, notify) for r in rcpts], headers, body,
                             now, "127.0.0.1", "client.test", "ESMTP", len(headers) + len(body))
        with self.spool.engine.begin() as conn:
            insert_messages(conn, [msg])
        return qid

    def execute(self, sql: str, params: tuple = ()) -> None:
        self.rows(sql, params)

    def rows(self, sql: str, params: tuple = ()) -> list[dict]:
        """*sql* (``?`` placeholders) in one transaction of its own."""
        if self.spool.engine.dialect.name == "postgresql":
            sql = sql.replace("%", "%%").replace("?", "%s")
        with self.spool.engine.begin() as conn:
            res = conn.exec_driver_sql(sql, tuple(params))
            return [dict(r._mapping) for r in res] if res.returns_rows else []

    def rcpts(self, qid: str) -> dict[str, dict]:
        return {r["address"]: r for r in self.rows(
            "SELECT * FROM recipients WHERE queue_id = ? ORDER BY id", (qid,))}

    def set_rcpt(self, address: str, **values) -> None:
        sets = ", ".join(f"{k} = ?" for k in values)
        self.execute(f"UPDATE recipients SET {sets} WHERE address = ?", (*values.values(), address))

    def ids(self) -> set[str]:
        return {r["queue_id"] for r in self.rows("SELECT queue_id FROM messages")}

    # -- running the command ---------------------------------------------------------
    def run(self, capsys, *args: str) -> tuple[int, str, str]:
        """``mta queue --config ... ARGS`` in this process."""
        capsys.readouterr()
        code = mta_main(["queue", "--config", str(self.config), *args])
        out, err = capsys.readouterr()
        return code, out, err

    def proc(self, *args: str, config: bool = True, env: dict | None = None,
             text: bool = True) -> subprocess.CompletedProcess:
        """The installed ``mta`` script in a subprocess."""
        cmd = mta_command("queue", *(["--config", str(self.config)] if config else []), *args)
        e = subprocess_env()
        e.update(env or {})
        return subprocess.run(cmd, cwd=self.dir, capture_output=True, text=text, env=e,
                              stdin=subprocess.DEVNULL, timeout=60)


@pytest.fixture(params=["sqlite", "postgresql"])
def site(request, tmp_path: Path) -> Site:
    if request.param == "postgresql":
        return Site(tmp_path, request.getfixturevalue("pg_url"))
    return Site(tmp_path)


@pytest.fixture
def queue(site: Site) -> dict[str, str]:
    """Three messages: one deferred+queued, one bounce (from <>), one held."""
    ids = {
        "m1": site.add("alice@origin.test", ["bob@dest.test", "carol@other.test"], age=7200,
                       subject="first"),
        "m2": site.add("", ["postmaster@origin.test"], age=600, subject="bounce"),
        "m3": site.add("dave@origin.test", ["erin@Dest.Test"], age=5, subject="third"),
    }
    site.set_rcpt("bob@dest.test", state="deferred", attempts=2, next_attempt=FAR,
                  last_reply="451 4.3.0 Try again later")
    site.set_rcpt("postmaster@origin.test", state="deferred", attempts=1, next_attempt=FAR,
                  last_reply="421 4.4.2 Connection\r\n dropped")
    site.set_rcpt("erin@Dest.Test", state="held")
    return ids


# --------------------------------------------------------------------------- list

def test_list_json_and_text_as_scripts_see_them(site, queue):
    r = site.proc("list", "--json")
    assert (r.returncode, r.stderr) == (0, "")
    msgs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [m["queue_id"] for m in msgs] == [queue["m1"], queue["m2"], queue["m3"]]  # oldest first
    m1 = msgs[0]
    assert set(m1) == {"queue_id", "sender", "arrival", "size", "client_address", "helo",
                       "protocol", "body_type", "smtputf8", "ret", "envid", "recipients"}
    assert m1["sender"] == "alice@origin.test"
    assert time.time() - 7300 < m1["arrival"] < time.time() - 7100
    assert m1["size"] == site.rows("SELECT size FROM messages WHERE queue_id = ?",
                                   (queue["m1"],))[0]["size"]
    assert m1["recipients"] == [
        {"address": "bob@dest.test", "state": "deferred", "attempts": 2, "next_attempt": FAR,
         "last_reply": "451 4.3.0 Try again later", "notify": None, "orcpt": None},
        {"address": "carol@other.test", "state": "queued", "attempts": 0,
         "next_attempt": m1["arrival"], "last_reply": None, "notify": None, "orcpt": None},
    ]
    assert msgs[1]["sender"] == ""

    r = site.proc("list")
    assert (r.returncode, r.stderr) == (0, "")
    lines = r.stdout.splitlines()
    assert lines[0].startswith("Queue ID") and "Sender" in lines[0]
    assert lines[2].startswith(queue["m1"]) and lines[2].endswith("<alice@origin.test>")
    assert lines[3].split() == ["deferred", "2", time.strftime("%Y-%m-%d", time.localtime(FAR)),
                                time.strftime("%H:%M:%S", time.localtime(FAR)), "<bob@dest.test>"]
    assert lines[4].strip() == "(451 4.3.0 Try again later)"
    assert lines[5].split() == ["queued", "0", "now", "<carol@other.test>"]
    assert lines[6].startswith(queue["m2"]) and lines[6].endswith("<>")
    assert lines[8].strip() == "(421 4.4.2 Connection dropped)"      # one line
    assert lines[-2].split() == ["held", "0", "-", "<erin@Dest.Test>"]
    size = sum(r["size"] for r in site.rows("SELECT size FROM messages"))
    assert lines[-1] == f"-- 3 messages, 4 recipients, {size} bytes"


def test_list_filters(site, queue, capsys):
    def listed(*args: str) -> list[tuple[str, list[str]]]:
        code, out, err = site.run(capsys, "list", "--json", *args)
        assert (code, err) == (0, "")
        return [(m["queue_id"], [r["address"] for r in m["recipients"]])
                for m in map(json.loads, out.splitlines())]

    m1, m2, m3 = queue["m1"], queue["m2"], queue["m3"]
    assert listed("--state", "deferred") == [(m1, ["bob@dest.test"]),
                                             (m2, ["postmaster@origin.test"])]
    assert listed("--state", "held,queued") == [(m1, ["carol@other.test"]),
                                                (m3, ["erin@Dest.Test"])]
    assert listed("--state", "held", "--state", "deferred") == [
        (m1, ["bob@dest.test"]), (m2, ["postmaster@origin.test"]), (m3, ["erin@Dest.Test"])]
    assert listed("--domain", "DEST.test") == [(m1, ["bob@dest.test"]), (m3, ["erin@Dest.Test"])]
    assert listed("--sender", "Alice@Origin.Test") == [(m1, ["bob@dest.test", "carol@other.test"])]
    assert listed("--sender", "<>") == [(m2, ["postmaster@origin.test"])]
    assert listed("--sender", "@origin.test") == [(m1, ["bob@dest.test", "carol@other.test"]),
                                                  (m3, ["erin@Dest.Test"])]
    assert [q for q, _ in listed("--older-than", "5m")] == [m1, m2]
    assert [q for q, _ in listed("--older-than", "1h")] == [m1]
    assert listed("--older-than", "1d") == []
    assert listed("--state", "inflight") == []

    code, out, _ = site.run(capsys, "list", "--domain", "nowhere.test")
    assert (code, out) == (0, "No matching messages\n")


def test_empty_queue(site, capsys):
    assert site.run(capsys, "list") == (0, "Mail queue is empty\n", "")
    assert site.run(capsys, "list", "--json") == (0, "", "")
    code, out, _ = site.run(capsys, "stats", "--json")
    stats = json.loads(out)
    assert (stats["messages"], stats["recipients"], stats["oldest_age"]) == (0, 0, None)
    assert set(stats["by_state"].values()) == {0}


# --------------------------------------------------------------------------- show

def test_show(site, queue, capsys):
    r = site.proc("show", queue["m1"], "--body", text=False)
    assert (r.returncode, r.stderr) == (0, b"")
    stored = site.rows("SELECT headers, body FROM contents WHERE queue_id = ?", (queue["m1"],))[0]
    assert r.stdout == stored["headers"] + stored["body"]          # raw bytes, as it will be sent

    code, out, err = site.run(capsys, "show", queue["m1"].lower())   # ids are case-insensitive
    assert (code, err) == (0, "")
    assert f"Queue ID:   {queue['m1']}\n" in out
    assert "Sender:     <alice@origin.test>\n" in out
    assert "Client:     127.0.0.1 (helo client.test) with ESMTP\n" in out
    assert "  <bob@dest.test> deferred attempts=2 next=" in out
    assert "      (451 4.3.0 Try again later)\n" in out
    assert out.endswith("\nFrom: <alice@origin.test>\nSubject: first\n\n")  # the header block
    assert "Hello." not in out

    code, out, err = site.run(capsys, "show", "--json", queue["m2"])
    d = json.loads(out)
    assert d["queue_id"] == queue["m2"] and d["sender"] == ""
    assert d["headers"].endswith("Subject: bounce\r\n\r\n")
    assert d["recipients"][0]["last_reply"] == "421 4.4.2 Connection\r\n dropped"


def test_missing_id_is_a_clear_error(site, queue):
    r = site.proc("show", "NOSUCHID")
    assert (r.returncode, r.stdout, r.stderr) == (1, "", "mta: queue: no such message: NOSUCHID\n")
    # With several ids, the ones that exist are still acted on.
    r = site.proc("hold", "GONE1", queue["m1"], "GONE2")
    assert r.returncode == 1
    assert r.stderr == ("mta: queue: no such message: GONE1\n"
                        "mta: queue: no such message: GONE2\n")
    assert r.stdout == f"{queue['m1']}: held 2 recipients\n"
    assert {r["state"] for r in site.rcpts(queue["m1"]).values()} == {"held"}


def test_usage_and_configuration_errors(site, tmp_path):
    r = site.proc()
    assert r.returncode == 2 and "usage: mta queue" in r.stderr
    r = site.proc("list", "--state", "bogus")
    assert r.returncode == 2 and "invalid state 'bogus'" in r.stderr
    r = site.proc("list", "--older-than", "soon")
    assert r.returncode == 2 and "invalid duration 'soon'" in r.stderr
    r = site.proc("delete")
    assert r.returncode == 2 and "give queue ids or --all-deferred" in r.stderr
    # The configuration: --config, else $MTA_CONFIG; a bad one is one line.
    r = site.proc("list", config=False, env={"MTA_CONFIG": str(site.config)})
    assert (r.returncode, r.stdout) == (0, "Mail queue is empty\n")
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nhostnme = 1\n")
    r = site.proc("list", config=False, env={"MTA_CONFIG": str(bad)})
    assert (r.returncode, r.stderr) == (1, f"mta: {bad}: [server] hostnme: unknown key\n")
    nospool = tmp_path / "nospool.toml"
    nospool.write_text(f'[spool]\nurl = "sqlite:///{tmp_path}/none/mta.sqlite"\n'
                       f'[server]\nhostname = "{HOSTNAME}"\n')
    r = site.proc("stats", "--config", str(nospool))
    assert r.returncode == 1
    assert r.stderr.startswith(f"mta: queue: sqlite:///{tmp_path}/none/mta.sqlite: no spool at ")
    assert not (tmp_path / "none").exists()          # not created by looking


@pytest.mark.parametrize("args", [
    [b"show", b"\xff"], [b"show", b"\xff", b"--json"], [b"delete", b"\xff"],
    [b"hold", b"\xff"], [b"release", b"\xff"], [b"requeue", b"\xff"], [b"bounce", b"\xff"],
    [b"flush", b"\xff"], [b"flush", b"--domain", b"\xff"], [b"list", b"--domain", b"\xff"],
    [b"list", b"--sender", b"\xff"],
])
def test_arguments_that_are_not_utf8_are_a_usage_error(site, queue, args):
    # `mta queue show $'\xff'`: the shell hands over bytes that are not UTF-8.
    r = subprocess.run(mta_command("queue", "--config", str(site.config)) + args, cwd=site.dir,
                       capture_output=True, env=subprocess_env(), stdin=subprocess.DEVNULL,
                       timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (
        2, b"", b"mta: argument '\\xff' is not valid UTF-8 text\n")
    assert site.ids() == set(queue.values())
    assert site.rcpts(queue["m1"])["bob@dest.test"]["state"] == "deferred"


def test_a_file_name_may_be_any_bytes(site, queue):
    # Only text arguments must be UTF-8: a configuration file's name need not be.
    path = bytes(site.dir) + b"/conf-\xff.toml"
    with open(path, "wb") as f:
        f.write(site.config.read_bytes())
    r = subprocess.run(mta_command("queue", "--config") + [path, "show", queue["m1"]],
                       cwd=site.dir, capture_output=True, env=subprocess_env(),
                       stdin=subprocess.DEVNULL, timeout=60)
    assert (r.returncode, r.stderr) == (0, b"")
    assert r.stdout.startswith(f"Queue ID:   {queue['m1']}\n".encode())


def test_output_closed_by_its_reader_is_no_traceback(site):
    # `mta queue list | head -1`: the reader goes away.  More output than a
    # pipe holds, so the writer meets the closed pipe whatever the timing.
    site.add("alice@origin.test", [f"r{i}@dest.test" for i in range(1500)])
    p = subprocess.Popen(mta_command("queue", "--config", str(site.config), "list"),
                         cwd=site.dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL, env=subprocess_env())
    p.stdout.read(10)
    p.stdout.close()
    err = p.stderr.read()
    assert (p.wait(timeout=60), err) == (141, b"")


# --------------------------------------------------------------------------- changes

def test_flush(site, queue, capsys):
    m4 = site.add("alice@origin.test", ["frank@dest.test"])
    site.set_rcpt("frank@dest.test", state="deferred", next_attempt=FAR)
    site.set_rcpt("carol@other.test", next_attempt=FAR)          # queued, not yet due

    t0 = time.time()
    assert site.run(capsys, "flush", "--domain", "dest.test") == (0, "2 recipients due now\n", "")
    t1 = time.time()
    due = lambda a: t0 <= site.rows("SELECT next_attempt FROM recipients WHERE address = ?",  # noqa
                                    (a,))[0]["next_attempt"] <= t1
    assert due("bob@dest.test") and due("frank@dest.test")
    assert not due("carol@other.test") and not due("postmaster@origin.test")
    assert site.rcpts(queue["m3"])["erin@Dest.Test"]["state"] == "held"     # held: not touched
    assert site.rcpts(m4)["frank@dest.test"]["state"] == "deferred"        # only due now

    t0 = time.time()
    assert site.run(capsys, "flush", queue["m2"]) == (0, "1 recipient due now\n", "")
    t1 = time.time()
    assert due("postmaster@origin.test") and not due("carol@other.test")

    t0 = time.time()
    assert site.run(capsys, "flush") == (0, "4 recipients due now\n", "")  # default: --all
    t1 = time.time()
    assert due("carol@other.test")
    with pytest.raises(SystemExit) as info:
        site.run(capsys, "flush", queue["m1"], "--all")
    assert info.value.code == 2


def test_hold_release_requeue(site, queue, capsys):
    m1 = queue["m1"]
    site.set_rcpt("carol@other.test", state="inflight")
    code, out, err = site.run(capsys, "hold", m1)
    assert (code, out) == (0, f"{m1}: held 1 recipient\n")
    assert err == f"mta: queue: {m1}: 1 recipient in flight, not held\n"
    rc = site.rcpts(m1)
    assert (rc["bob@dest.test"]["state"], rc["carol@other.test"]["state"]) == ("held", "inflight")

    # Held recipients are never claimed: flush leaves them alone.
    assert site.run(capsys, "flush", m1) == (0, "0 recipients due now\n", "")

    t0 = time.time()
    assert site.run(capsys, "release", m1) == (0, f"{m1}: released 1 recipient\n", "")
    bob = site.rcpts(m1)["bob@dest.test"]
    assert bob["state"] == "queued" and bob["attempts"] == 2 and t0 <= bob["next_attempt"] <= time.time()

    site.set_rcpt("carol@other.test", state="deferred", attempts=3, next_attempt=FAR)
    site.set_rcpt("bob@dest.test", state="deferred", next_attempt=FAR)
    t0 = time.time()
    assert site.run(capsys, "requeue", m1, queue["m3"]) == (
        0, f"{m1}: requeued 2 recipients\n{queue['m3']}: requeued 1 recipient\n", "")
    rows = list(site.rcpts(m1).values()) + list(site.rcpts(queue["m3"]).values())
    assert [(r["state"], r["attempts"]) for r in rows] == [("queued", 0)] * 3
    assert all(t0 <= r["next_attempt"] <= time.time() for r in rows)


def test_delete(site, queue, capsys):
    m1, m2, m3 = queue["m1"], queue["m2"], queue["m3"]
    code, out, err = site.run(capsys, "delete", "--all-deferred")     # m1 and m2 have one
    assert (code, out, err) == (0, f"{m1}: deleted\n{m2}: deleted\n2 messages deleted\n", "")
    assert site.ids() == {m3}
    for table in ("recipients", "contents"):
        assert {r["queue_id"] for r in site.rows(f"SELECT queue_id FROM {table}")} == {m3}

    # A message with a recipient in flight goes too; the daemon's later
    # record of that attempt updates no rows.
    site.set_rcpt("erin@Dest.Test", state="inflight")
    code, out, err = site.run(capsys, "delete", m3)
    assert (code, out) == (0, f"{m3}: deleted\n")
    assert "1 recipient in flight" in err
    assert site.ids() == set() and site.rows("SELECT * FROM contents") == []
    assert site.run(capsys, "delete", m3)[0] == 1


def test_bounce(site, queue, capsys):
    m1, m2 = queue["m1"], queue["m2"]
    m5 = site.add("grace@origin.test", ["heidi@dest.test", "ivan@dest.test"], notify="NEVER")
    site.set_rcpt("ivan@dest.test", state="inflight")

    code, out, err = site.run(capsys, "bounce", m1, m2, m5)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith(f"{m1}: bounced 2 recipients (DSN ")
    assert lines[1:] == [f"{m2}: bounced 1 recipient (no DSN)",          # no DSN for a DSN
                         f"{m5}: bounced 1 recipient (no DSN)"]          # NOTIFY=NEVER
    assert "ivan" not in out and "1 recipient in flight, left to their delivery attempt" in err
    dsn_id = lines[0].split("(DSN ")[1].rstrip(")")

    # m1 and m2 are gone; m5 stays until its recipient in flight is done.
    assert site.ids() == {queue["m3"], m5, dsn_id}
    assert {a: r["state"] for a, r in site.rcpts(m5).items()} == {"heidi@dest.test": "failed",
                                                                  "ivan@dest.test": "inflight"}
    # The DSN: from <> to the sender, spooled as the queue runner spools its own.
    [env] = site.rows("SELECT * FROM messages WHERE queue_id = ?", (dsn_id,))
    assert (env["sender"], env["protocol"], env["client_address"]) == ("", "local", "127.0.0.1")
    [rcpt] = site.rcpts(dsn_id).values()
    assert (rcpt["address"], rcpt["notify"], rcpt["state"]) == ("alice@origin.test", "NEVER",
                                                                 "queued")
    [c] = site.rows("SELECT headers, body FROM contents WHERE queue_id = ?", (dsn_id,))
    msg = email.message_from_bytes(c["headers"] + c["body"], policy=email.policy.default)
    assert msg["To"] == "alice@origin.test"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg.get_content_type() == "multipart/report"
    text, status, original = msg.iter_parts()
    assert "returned by the mail system administrator" in " ".join(text.get_content().split())
    blocks = status.get_payload()
    assert [(b["Final-Recipient"], b["Action"], b["Status"]) for b in blocks[1:]] == [
        ("rfc822;bob@dest.test", "failed", "5.0.0"), ("rfc822;carol@other.test", "failed", "5.0.0")]
    assert "last attempt: 451 4.3.0 Try again later" in str(blocks[1]["Diagnostic-Code"])
    # The administrator's decision is ours, not a remote MTA's reply (RFC 3464 §2.3.6).
    assert str(blocks[1]["Diagnostic-Code"]).startswith("X-mta;message returned by")
    assert "Remote-MTA" not in blocks[1]
    assert original.get_content_type() == "message/rfc822"
    assert b"Subject: first" in original.as_bytes()


def test_stats(site, queue, capsys):
    code, out, err = site.run(capsys, "stats", "--json")
    s = json.loads(out)
    assert (code, err) == (0, "")
    assert (s["messages"], s["recipients"]) == (3, 4)
    assert s["by_state"] == {"queued": 1, "inflight": 0, "deferred": 2, "delivered": 0,
                             "failed": 0, "held": 1}
    assert s["by_domain"]["dest.test"] == {"queued": 0, "inflight": 0, "deferred": 1,
                                           "delivered": 0, "failed": 0, "held": 1, "total": 2}
    assert s["by_domain"]["origin.test"]["deferred"] == 1
    assert s["by_domain"]["other.test"]["total"] == 1
    assert s["oldest_queue_id"] == queue["m1"] and 7190 < s["oldest_age"] < 7300
    assert s["size"] == sum(r["size"] for r in site.rows("SELECT size FROM messages"))

    code, out, err = site.run(capsys, "stats")
    assert "Messages:   3\n" in out and "Recipients: 4\n" in out
    assert f"Oldest:     {queue['m1']}, arrived " in out and "(2h00m ago)" in out
    assert [line.split() for line in out.splitlines() if line.startswith("deferred")] == [
        ["deferred", "2"]]
    [dest] = [line.split() for line in out.splitlines() if line.startswith("dest.test")]
    assert dest == ["dest.test", "2", "0", "0", "1", "0", "0", "1"]


def test_domain_filters_know_idna_2008(site, capsys):
    """``--domain stra\u00dfe.test`` is xn--strae-oqa.test whichever way the
    recipient was written, and not strasse.test (IDNA 2003's reading)."""
    a_label = site.add("alice@origin.test", ["bob@xn--strae-oqa.test"])
    u_label = site.add("alice@origin.test", ["carol@STRA\u00dfE.test"])
    other = site.add("alice@origin.test", ["dave@strasse.test"])
    for rcpt in ("bob@xn--strae-oqa.test", "carol@STRA\u00dfE.test", "dave@strasse.test"):
        site.set_rcpt(rcpt, state="deferred", next_attempt=FAR)

    def listed(*args: str) -> list[str]:
        code, out, err = site.run(capsys, "list", "--json", *args)
        assert (code, err) == (0, "")
        return [m["queue_id"] for m in map(json.loads, out.splitlines())]

    for name in ("stra\u00dfe.test", "xn--strae-oqa.test", "XN--STRAE-OQA.TEST.", "@Stra\u00dfe.test"):
        assert listed("--domain", name) == [a_label, u_label], name
    assert listed("--domain", "strasse.test") == [other]

    # The installed script, with the U-label in its argv, says the same.
    r = site.proc("list", "--json", "--domain", "stra\u00dfe.test")
    assert (r.returncode, r.stderr) == (0, "")
    assert [json.loads(line)["queue_id"] for line in r.stdout.splitlines()] == [a_label, u_label]

    assert site.run(capsys, "flush", "--domain", "stra\u00dfe.test") == (
        0, "2 recipients due now\n", "")
    assert site.rcpts(other)["dave@strasse.test"]["next_attempt"] == FAR

    code, out, err = site.run(capsys, "stats", "--json")
    by_domain = json.loads(out)["by_domain"]
    assert (by_domain["xn--strae-oqa.test"]["total"], by_domain["strasse.test"]["total"]) == (2, 1)


# --------------------------------------------------------------------------- with the daemon

def test_flush_reaches_the_running_daemon(mta_factory, peer_factory, tmp_path):
    """A message deferred for an hour is delivered a moment after ``flush``;
    it was submitted with ``sendmail`` and listed while the daemon ran."""
    later = "451 4.3.0 Try again later"
    [dest] = peer_factory.spawn({"actions": {"RCPT@1#1": later, "RCPT@1#2": later}})
    daemon = mta_factory(extra=(
        '[relay]\n[retry]\nfirst = "1h"\nmax = "1h"\n'
        '[dns]\nnameservers = ["127.0.0.1:9"]\ntimeout = "1s"\n'
        f'[routes]\n"dest.test" = "{dest.address}"\n'))
    peer_factory.ready()
    config = str(daemon.config_path)
    sendmail = Path(sys.executable).with_name("sendmail")
    cmd = [str(sendmail)] if sendmail.exists() else [sys.executable, "-m", "mta.sendmail"]
    r = subprocess.run([*cmd, "-t", "-f", "alice@origin.test"], cwd=tmp_path,
                       input=b"To: bob@dest.test\nBcc: carol@dest.test\nSubject: flush me\n\nHi.\n",
                       capture_output=True, env=dict(subprocess_env(), MTA_CONFIG=config),
                       timeout=60)
    assert (r.returncode, r.stderr) == (0, b"")

    def deferred():
        rows = daemon.rows("SELECT * FROM recipients")
        return rows if rows and all(r["state"] == "deferred" for r in rows) else None

    rows = wait_for(deferred, 15, "the first attempt to be deferred", interval=0.05)
    assert len(rows) == 2 and all(r["next_attempt"] > time.time() + 3000 for r in rows)
    r = subprocess.run(mta_command("queue", "--config", config, "list", "--state", "deferred",
                                   "--json"),
                       capture_output=True, text=True, env=subprocess_env(), timeout=60)
    [m] = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["last_reply"] for x in m["recipients"]] == ["451 4.3.0 Try again later"] * 2

    r = subprocess.run(mta_command("queue", "--config", config, "flush"), capture_output=True,
                       text=True, env=subprocess_env(), timeout=60)
    assert (r.returncode, r.stdout) == (0, "2 recipients due now\n")
    wait_for(lambda: daemon.count("messages") == 0, 10, "the flushed message to be delivered",
             interval=0.05)
    [tx] = dest.transactions()
    assert sorted(tx.accepted) == ["bob@dest.test", "carol@dest.test"]
    assert b"Subject: flush me\r\n" in tx.data and b"Bcc" not in tx.data
    assert tx.data.startswith(f"Received: by {daemon.hostname} (mta, from userid ".encode())
    assert tx.mail_address == "alice@origin.test"
