"""Local submission: ``sendmail`` / ``mta sendmail`` writing into a real
SQLite spool.  The installed scripts run in subprocesses for the paths a
caller sees (exit statuses, standard input); flag handling runs
``mta.sendmail.main`` in this process."""
from __future__ import annotations

import email
import email.policy
import io
import os
import pwd
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import subprocess_env, toml_text
from mta.sendmail import main as sendmail_main

HOSTNAME = "mx.local.test"
DOMAIN = "example.org"
BIN = Path(sys.executable).parent
USER = pwd.getpwuid(os.getuid()).pw_name


def command(name: str) -> list[str]:
    script = BIN / name
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "mta.sendmail" if name == "sendmail" else "mta.cli"]


class Site:
    def __init__(self, directory: Path, **sections):
        self.dir = directory
        self.db = directory / "spool" / "mta.sqlite"
        self.config = directory / "mta.toml"
        data = {"server": {"hostname": HOSTNAME}, "spool": {"url": f"sqlite:///{self.db}"},
                "sendmail": {"domain": DOMAIN}}
        for name, table in sections.items():
            data.setdefault(name, {}).update(table)
        self.config.write_text(toml_text(data))

    def run(self, capsys, *args: str, stdin: bytes = b"Subject: x\n\nHi.\n",
            config: bool = True) -> tuple[int, str]:
        """``sendmail --config ... ARGS`` in this process: (status, stderr)."""
        capsys.readouterr()
        argv = (["--config", str(self.config)] if config else []) + list(args)
        code = sendmail_main(argv, stdin=io.BytesIO(stdin))
        return code, capsys.readouterr().err

    def proc(self, name: str, *args: str, stdin: bytes = b"", env: dict | None = None):
        e = dict(subprocess_env(), MTA_CONFIG=str(self.config))
        e.update(env or {})
        return subprocess.run([*command(name), *args], cwd=self.dir, input=stdin,
                              capture_output=True, env=e, timeout=60)

    def messages(self) -> list[dict]:
        """Every message in the spool, oldest first, with its recipients and content."""
        if not self.db.exists():
            return []
        conn = sqlite3.connect(self.db, timeout=30)
        conn.row_factory = sqlite3.Row
        try:
            out = []
            for m in conn.execute("SELECT * FROM messages JOIN contents USING (queue_id) "
                                  "ORDER BY arrival"):
                d = dict(m)
                d["rcpts"] = [r["address"] for r in conn.execute(
                    "SELECT address FROM recipients WHERE queue_id = ? ORDER BY id",
                    (m["queue_id"],))]
                d["data"] = d["headers"] + d["body"]
                out.append(d)
            return out
        finally:
            conn.close()

    def last(self) -> dict:
        return self.messages()[-1]


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


def fields(data: bytes) -> list[tuple[str, str]]:
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    return [(k, " ".join(v.split())) for k, v in msg.items()]


# --------------------------------------------------------------------------- the scripts

def test_sendmail_t_as_installed(site):
    stdin = (b"From: Alice <alice@origin.test>\n"
             b"To: bob@dest.test, Carol <carol@dest.test>\n"
             b"Cc: root\n"
             b"Bcc: secret@hidden.test,\n\tother-secret@hidden.test\n"
             b"Subject: report\n"
             b"\n"
             b"Line one.\n"
             b"..leading dots stay as they are\n"
             b"Last line without newline")
    t0 = time.time()
    r = site.proc("sendmail", "-t", "-oi", "-f", "alice@origin.test", stdin=stdin)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")
    [m] = site.messages()
    assert m["sender"] == "alice@origin.test"
    assert m["rcpts"] == ["bob@dest.test", "carol@dest.test", f"root@{DOMAIN}",
                          "secret@hidden.test", "other-secret@hidden.test"]
    assert (m["protocol"], m["client_address"], m["body_type"], m["smtputf8"]) == (
        "local", "127.0.0.1", None, 0)
    assert t0 <= m["arrival"] <= time.time()
    data = m["data"]
    assert m["size"] == len(data)
    assert b"\n" not in data.replace(b"\r\n", b"")                   # CRLF everywhere
    assert b"Bcc" not in data and b"secret" not in data              # Bcc removed
    assert data.endswith(b"\r\n\r\nLine one.\r\n..leading dots stay as they are\r\n"
                         b"Last line without newline\r\n")
    qid = m["queue_id"]
    received = (f"Received: by {HOSTNAME} (mta, from userid {os.getuid()})\r\n"
                f"\twith local id {qid};\r\n\t").encode()
    assert data.startswith(received)                                  # prepended
    names = [k for k, _ in fields(data)]
    assert names == ["Received", "From", "To", "Cc", "Subject", "Date", "Message-ID"]
    f = dict(fields(data))
    assert f["From"] == "Alice <alice@origin.test>"                   # kept as it was
    assert re.fullmatch(rf"<\d{{14}}\.{qid}@{re.escape(HOSTNAME)}>", f["Message-ID"])
    assert abs(email.utils.parsedate_to_datetime(f["Date"]).timestamp() - m["arrival"]) < 2
    assert m["headers"].endswith(b"\r\n\r\n") and m["body"].startswith(b"Line one.")


def test_mta_sendmail_and_the_dot(site):
    # Without -i a line with only a dot ends the message (the rest is not read).
    r = site.proc("mta", "sendmail", "bob@dest.test", stdin=b"Subject: a\n\nbefore\n.\nafter\n")
    assert (r.returncode, r.stderr) == (0, b"")
    assert site.last()["body"] == b"before\r\n"
    r = site.proc("mta", "sendmail", "-i", "--", "bob@dest.test",
                  stdin=b"Subject: b\n\nbefore\n.\nafter\n")
    assert (r.returncode, r.stderr) == (0, b"")
    assert site.last()["body"] == b"before\r\n.\r\nafter\r\n"
    # Usage errors exit 64 with a line naming the command.
    r = site.proc("mta", "sendmail", "-Y", "bob@dest.test")
    assert r.returncode == 64
    assert r.stderr.splitlines()[0] == b"mta: sendmail: unknown option -Y"


@pytest.mark.parametrize("args", [
    ["<bob@dest.test> trailing"],                  # text after the address
    ["Foo <x@dest.test>@c"],                       # ... even when it looks like a domain
    ["bob@dest.test\nevil: carol@dest.test"],      # a newline would make a group of it
    ["undisclosed: bob@dest.test;"],               # a group
    ["<<bob@dest.test>>"], ["bob@dest.test>"], ["bob@dest.test <carol@dest.test>"],
    ["bob@dest.test; carol@dest.test"],
    ["-f", "<alice@origin.test> trailing", "bob@dest.test"],
    ["-f", "Foo <x@origin.test>@c", "bob@dest.test"],
    ["-f", "alice@origin.test\nevil: x@y", "bob@dest.test"],
    ["-f", "a@origin.test, b@origin.test", "bob@dest.test"],
    ["-r", "undisclosed: a@origin.test;", "bob@dest.test"],
    ["-F", "Evil\r\nX-Injected: yes", "bob@dest.test"],   # a header field of its own
])
def test_malformed_address_arguments_exit_64(site, args):
    r = site.proc("sendmail", *args, stdin=b"Subject: x\n\nHi.\n")
    assert (r.returncode, r.stdout) == (64, b""), r.stderr
    assert r.stderr.startswith(b"sendmail: bad ") and len(r.stderr.splitlines()) == 1, r.stderr
    assert site.messages() == []


def test_well_formed_address_arguments(site):
    # addr, <addr>, Name <addr> (comments and quoted names too), and lists of them;
    # for -f one of the same forms.
    r = site.proc("sendmail", "-f", "Alice Admin <alice@origin.test>", "bob@dest.test",
                  "<carol@dest.test>", "Dave Q. Public <dave@dest.test> (work)",
                  '"Erin, Jr." <erin@dest.test>, frank', stdin=b"Subject: x\n\nHi.\n")
    assert (r.returncode, r.stderr) == (0, b"")
    m = site.last()
    assert m["sender"] == "alice@origin.test"
    assert m["rcpts"] == ["bob@dest.test", "carol@dest.test", "dave@dest.test",
                          "erin@dest.test", f"frank@{DOMAIN}"]
    r = site.proc("sendmail", "-f", "<alice@origin.test>", "José <jose@dest.test>",
                  stdin=b"Subject: x\n\nHi.\n")
    assert (r.returncode, r.stderr) == (0, b"")
    assert (site.last()["sender"], site.last()["rcpts"]) == ("alice@origin.test",
                                                             ["jose@dest.test"])


@pytest.mark.parametrize("name, args, shown", [
    ("sendmail", [b"\xff@dest.test"], b"\\xff@dest.test"),
    ("sendmail", [b"-f", b"al\xffce@origin.test", b"bob@dest.test"], b"al\\xffce@origin.test"),
    ("sendmail", [b"-F", b"Jos\xe9", b"bob@dest.test"], b"Jos\\xe9"),
    ("sendmail", [b"-qI\xff"], b"\\xff"),
    ("mta", [b"sendmail", b"bob@dest.test", b"\xff"], b"\\xff"),
])
def test_arguments_that_are_not_utf8_exit_64(site, name, args, shown):
    # What the shell passes for $'\xff': bytes that are not UTF-8.
    r = site.proc(name, *args, stdin=b"Subject: x\n\nHi.\n")
    prog = b"mta: sendmail" if name == "mta" else b"sendmail"
    assert (r.returncode, r.stdout, r.stderr) == (
        64, b"", prog + b": argument '" + shown + b"' is not valid UTF-8 text\n")
    assert site.messages() == []


def test_exit_75_when_the_spool_cannot_take_it(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    site = Site(tmp_path, spool={"url": f"sqlite:///{tmp_path}/file/mta.sqlite"})
    r = site.proc("sendmail", "bob@dest.test", stdin=b"Subject: x\n\nHi.\n")
    assert r.returncode == 75
    assert r.stderr.startswith(b"sendmail: cannot queue the message: ")
    assert len(r.stderr.splitlines()) == 1
    # The database file cannot be opened (here: it is a directory).
    os.makedirs(tmp_path / "spool" / "mta.sqlite")
    site = Site(tmp_path)
    r = site.proc("sendmail", "bob@dest.test", stdin=b"Subject: x\n\nHi.\n")
    assert r.returncode == 75 and b"cannot queue the message" in r.stderr


# --------------------------------------------------------------------------- flags

def test_recipients_senders_and_qualification(site, capsys):
    assert site.run(capsys, "bob", "carol@dest.test, Dave <dave@dest.test>") == (0, "")
    m = site.last()
    assert m["rcpts"] == [f"bob@{DOMAIN}", "carol@dest.test", "dave@dest.test"]
    assert m["sender"] == f"{USER}@{DOMAIN}"                       # the invoking user
    assert dict(fields(m["data"]))["From"] == f"{USER}@{DOMAIN}"
    assert b"for <" not in m["headers"]                              # several recipients

    assert site.run(capsys, "-f", "alice", "-F", "Alice Q. Admin", "bob@dest.test") == (0, "")
    m = site.last()
    assert m["sender"] == f"alice@{DOMAIN}"
    assert dict(fields(m["data"]))["From"] == f'"Alice Q. Admin" <alice@{DOMAIN}>'
    assert b"\tfor <bob@dest.test>;\r\n" in m["headers"]            # one recipient

    assert site.run(capsys, "-r", "<>", "-FJosé", "bob@dest.test") == (0, "")
    m = site.last()
    assert m["sender"] == ""
    parsed = email.message_from_bytes(m["data"], policy=email.policy.default)
    [author] = parsed["From"].addresses
    assert (author.display_name, author.addr_spec) == ("José", f"{USER}@{DOMAIN}")

    assert site.run(capsys, "-f", "", "bob@dest.test") == (0, "")
    assert site.last()["sender"] == ""
    # -F does not replace a From: that is there; Date and Message-ID are kept too.
    stdin = (b"From: Real <real@origin.test>\nDate: Mon, 1 Jan 2024 00:00:00 +0000\n"
             b"Message-ID: <kept@origin.test>\n\nbody\n")
    assert site.run(capsys, "-F", "Other", "bob@dest.test", stdin=stdin) == (0, "")
    f = fields(site.last()["data"])
    assert f[1:] == [("From", "Real <real@origin.test>"),
                     ("Date", "Mon, 1 Jan 2024 00:00:00 +0000"),
                     ("Message-ID", "<kept@origin.test>")]


def test_domain_defaults_to_the_hostname(tmp_path, capsys):
    site = Site(tmp_path, sendmail={"domain": ""})
    assert site.run(capsys, "root") == (0, "")
    assert site.last()["rcpts"] == [f"root@{HOSTNAME}"]
    assert site.last()["sender"] == f"{USER}@{HOSTNAME}"


def test_t_details(site, capsys):
    # Recipients on the command line are added to the header's; duplicates go.
    stdin = b"To: bob@dest.test\nCC: BOB@dest.test, carol@dest.test\n\nx\n"
    assert site.run(capsys, "-ti", "dave@dest.test", stdin=stdin) == (0, "")
    assert site.last()["rcpts"] == ["dave@dest.test", "bob@dest.test", "carol@dest.test"]
    # Resent- fields, when present, name the recipients (a re-sent message).
    stdin = b"To: bob@dest.test\nResent-To: erin@dest.test\nResent-Bcc: frank@dest.test\n\nx\n"
    assert site.run(capsys, "-t", stdin=stdin) == (0, "")
    m = site.last()
    assert m["rcpts"] == ["erin@dest.test", "frank@dest.test"]
    assert b"frank" not in m["data"]
    # A group with no members, and an mbox "From " line (dropped).
    stdin = b"From alice Mon Jan  1 00:00:00 2024\nTo: undisclosed-recipients:;\n\nx\n"
    assert site.run(capsys, "-t", "bob@dest.test", stdin=stdin) == (0, "")
    m = site.last()
    assert m["rcpts"] == ["bob@dest.test"]
    assert fields(m["data"])[1] == ("To", "undisclosed-recipients:;")


def test_message_shapes(site, capsys):
    # No header at all: ours are added, then the empty line, then the body.
    assert site.run(capsys, "bob@dest.test", stdin=b"just a body\n") == (0, "")
    m = site.last()
    assert m["body"] == b"just a body\r\n" and m["headers"].endswith(b"\r\n\r\n")
    assert [k for k, _ in fields(m["data"])] == ["Received", "From", "Date", "Message-ID"]
    # Empty input: a message of our header fields only.
    assert site.run(capsys, "bob@dest.test", stdin=b"") == (0, "")
    assert site.last()["body"] == b""
    # Bare CR and LF become CRLF; 8-bit content is marked 8BITMIME; a UTF-8 address SMTPUTF8.
    stdin = "Subject: café\r\n\rbody\ré\n".encode()
    assert site.run(capsys, "jöran@dest.test", stdin=stdin) == (0, "")
    m = site.last()
    assert "\r\nSubject: café\r\n".encode() in m["headers"]
    assert m["body"] == "body\r\né\r\n".encode()
    assert (m["body_type"], m["smtputf8"], m["rcpts"]) == ("8BITMIME", 1, ["jöran@dest.test"])


def test_ignored_flags(site, capsys):
    args = ["-oem", "-odb", "-oQ/var/spool/x", "-o", "x", "-B8BITMIME", "-N", "never",
            "-R", "hdrs", "-X", "/tmp/log", "-Ltag", "-h", "5", "-Am", "-U", "-G", "-n", "-m",
            "-C/etc/mail/sendmail.cf", "-V", "envid", "-OTimeout=5", "-d0.1", "-bm",
            "bob@dest.test", "-v"]
    code, err = site.run(capsys, *args)
    m = site.last()
    assert (code, err) == (0, f"sendmail: queued as {m['queue_id']}\n")    # -v
    assert m["rcpts"] == ["bob@dest.test"]
    assert m["body"] == b"Hi.\r\n"


@pytest.mark.parametrize("args, stdin, status, message", [
    (["-Y", "bob@dest.test"], b"", 64, "unknown option -Y"),
    (["--bogus"], b"", 64, "unknown option --bogus"),
    ([], b"x\n", 64, "no recipients given"),
    (["-f"], b"", 64, "option -f requires an argument"),
    (["-bs"], b"", 64, "-bs is not supported"),
    (["bad address@dest.test"], b"", 64, "bad address"),
    (["-f", "a b@c", "bob@dest.test"], b"", 64, "bad address"),
    (["-t"], b"Subject: none\n\nx\n", 65, "no recipient addresses found in the message header"),
    (["-t"], b"To: <bad@@dest.test>\n\nx\n", 65, "To: bad address"),
    (["-t"], b"To: bob@dest.test\nCc: foo bar\n\nx\n", 65, "Cc: bad address 'foo bar'"),
    (["bob@dest.test"], b"Subject: x\n\n" + b"y" * 1000 + b"\n", 65, "line longer than 998"),
])
def test_errors(site, capsys, args, stdin, status, message):
    code, err = site.run(capsys, *args, stdin=stdin)
    assert code == status
    assert err.startswith("sendmail: ") and message in err.splitlines()[0]
    assert site.messages() == []


def test_size_limit_and_config_errors(tmp_path, capsys):
    site = Site(tmp_path, server={"max_message_size": 1000})
    code, err = site.run(capsys, "bob@dest.test", stdin=b"x" * 900 + b"\n")
    assert code == 65 and "larger than the limit of 1000 octets" in err
    code, err = site.run(capsys, "bob@dest.test", stdin=b"x\n" * 5000)
    assert code == 65 and site.messages() == []
    # The configuration: --config, else $MTA_CONFIG; a bad one is EX_CONFIG.
    code, err = site.run(capsys, "--config", str(tmp_path / "missing.toml"), "bob@dest.test",
                         config=False)
    assert code == 78 and "missing.toml: cannot read file" in err
    (tmp_path / "bad.toml").write_text('[sendmail]\ndomain = "bad domain"\n')
    code, err = site.run(capsys, "--config", str(tmp_path / "bad.toml"), "bob", config=False)
    assert (code, err) == (78, f"sendmail: {tmp_path}/bad.toml: [sendmail] domain: "
                               "invalid domain 'bad domain'\n")
    os.environ["MTA_CONFIG"] = str(site.config)
    try:
        assert site.run(capsys, "bob@dest.test", config=False) == (0, "")
    finally:
        del os.environ["MTA_CONFIG"]
    assert site.last()["rcpts"] == ["bob@dest.test"]


def test_bp_q_bi(site, capsys):
    assert site.run(capsys, "-bi") == (0, "")
    assert site.run(capsys, "bob@dest.test", "carol@other.test") == (0, "")
    qid = site.last()["queue_id"]
    conn = sqlite3.connect(site.db)
    conn.execute("UPDATE recipients SET state = 'deferred', next_attempt = 1e10")
    conn.commit()
    capsys.readouterr()
    assert sendmail_main(["--config", str(site.config), "-bp"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[2].startswith(qid) and "deferred" in out

    due = lambda: [r[0] for r in conn.execute(  # noqa: E731
        "SELECT address FROM recipients WHERE next_attempt <= ? ORDER BY id", (time.time(),))]
    assert sendmail_main(["--config", str(site.config), "-qRother.test"]) == 0
    assert due() == ["carol@other.test"]
    assert sendmail_main(["--config", str(site.config), "-q"]) == 0
    assert capsys.readouterr().out == "1 recipient due now\n2 recipients due now\n"
    assert due() == ["bob@dest.test", "carol@other.test"]
    conn.close()


def test_sendmail_and_the_queue_on_a_postgresql_spool(tmp_path, pg_url, capsys):
    """sendmail stores into a PostgreSQL spool (what another node then
    delivers), and -bp lists it from there."""
    from mta.spool.admin import SpoolAdmin, open_engine
    config = tmp_path / "mta.toml"
    config.write_text(toml_text({"server": {"hostname": HOSTNAME}, "spool": {"url": pg_url},
                                 "sendmail": {"domain": DOMAIN}}))
    code = sendmail_main(["--config", str(config), "-f", "alice", "bob@example.net", "root"],
                         stdin=io.BytesIO(b"Subject: over pg\n\nHi.\n"))
    assert code == 0, capsys.readouterr().err
    engine = open_engine(pg_url)
    try:
        [m] = SpoolAdmin(engine, hostname=HOSTNAME).list_messages()
        assert m.sender == f"alice@{DOMAIN}"
        assert [r.address for r in m.recipients] == ["bob@example.net", f"root@{DOMAIN}"]
        full = SpoolAdmin(engine, hostname=HOSTNAME).show(m.queue_id)
        assert b"Subject: over pg\r\n" in full.headers and full.body == b"Hi.\r\n"
    finally:
        engine.dispose()
    capsys.readouterr()
    assert sendmail_main(["--config", str(config), "-bp"]) == 0
    assert m.queue_id in capsys.readouterr().out
