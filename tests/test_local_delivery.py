"""Local delivery end to end (``[local]``): the real daemon, smtplib as the
client, Maildirs read back with Python's ``mailbox.Maildir``, scripted next
hops for what aliases forward and for the DSNs, and a real Dovecot LMTP
server (tests/dovecot.py) for ``[local] lmtp``.

What a sysadmin checks:

* anyone may send to a local domain, but only to users that exist there
  (``550 5.1.1`` at RCPT otherwise); ``postmaster`` always exists, bare or
  at the hostname or at a local domain;
* the Maildir file is the message byte for byte (LF line ends), with
  ``Return-Path`` and ``Delivered-To`` in front;
* an alias delivers to its local members and relays a copy to its remote
  ones; NOTIFY=SUCCESS gets "expanded" for an alias, "delivered" for a
  mailbox, and the expanded members are not given NOTIFY;
* with no ``[local]`` section, mail to postmaster and root at the hostname
  (``sendmail root`` too) lands in ``mail/<hostname>/<user>``; failed
  bounces for ``[relay] postmaster`` there too;
* with ``[local] lmtp``, Dovecot's LMTP server gets the mail, and its
  per-recipient refusals are honoured.
"""
from __future__ import annotations

import email
import email.policy
import mailbox
import shutil
import smtplib
import subprocess
import tempfile
from pathlib import Path

from conftest import subprocess_env, toml_text
from dovecot import DovecotLMTP
from test_e2e_relay import (SENDER, message, per_recipient, relay_config, send, wait_dsns,
                            wait_spool_empty)
from test_sendmail import command
from waiting import wait_for

HOSTNAME = "mx.e2e.test"
STRANGER = {"relay_networks": [], "relay_domains": []}   # 127.0.0.1 may not relay


def local_extra(tmp: Path, *, routes: dict[str, str], aliases: str | None = None,
                mailboxes: str | None = None, lmtp: str = "", relay: dict | None = None,
                retry: dict | None = None) -> tuple[str, Path]:
    """(config text with a [local] section for example.org, the Maildir root)."""
    root = tmp / "maildirs"
    local: dict = {"domains": ["example.org"], "maildir": f"{root}/{{domain}}/{{user}}"}
    if aliases is not None:
        (tmp / "aliases").write_text(aliases)
        local["aliases"] = str(tmp / "aliases")
    if mailboxes is not None:
        (tmp / "mailboxes").write_text(mailboxes)
        local["mailboxes"] = str(tmp / "mailboxes")
    if lmtp:
        local["lmtp"] = lmtp
    text = relay_config(routes=routes, relay=relay, retry=retry) + toml_text({"local": local})
    return text, root


def maildir_files(path: Path) -> list[bytes]:
    new = path / "new"
    return [p.read_bytes() for p in sorted(new.iterdir())] if new.is_dir() else []


def wait_files(path: Path, n: int, timeout: float = 15) -> list[bytes]:
    return wait_for(lambda: (lambda f: f if len(f) >= n else None)(maildir_files(path)),
                    timeout, f"{n} message(s) in {path}", interval=0.05)


def rcpt_replies(mta, rcpts: list[str]) -> dict[str, tuple[int, str]]:
    with smtplib.SMTP(mta.host, mta.port, local_hostname="client.e2e.test", timeout=10) as s:
        s.ehlo("client.e2e.test")
        assert s.mail(SENDER)[0] == 250
        out = {r: (lambda c, t: (c, t.decode()))(*s.rcpt(r)) for r in rcpts}
        s.rset()
    return out


BODY = (b"line one\r\n"
        b".leading dot\r\n"
        b"..two dots\r\n"
        b"caf\xc3\xa9 8-bit\r\n"
        b"last\r\n")


def test_local_recipients_maildir_byte_exact(tmp_path, mta_factory, peer_factory):
    [origin] = peer_factory.spawn(None)
    extra, root = local_extra(tmp_path, routes={"origin.test": origin.address},
                              mailboxes="bob\ncarol\n", aliases="postmaster: bob\n")
    mta = mta_factory(policy=STRANGER, extra=extra)
    peer_factory.ready()

    replies = rcpt_replies(mta, ["bob@example.org", "BOB@Example.ORG", "nobody@example.org",
                                 "postmaster", "postmaster@example.org",
                                 f"postmaster@{HOSTNAME}", "someone@elsewhere.test"])
    assert replies["bob@example.org"][0] == 250
    assert replies["BOB@Example.ORG"][0] == 250
    assert replies["nobody@example.org"][0] == 550
    assert replies["nobody@example.org"][1].startswith("5.1.1 <nobody@example.org>: Recipient "
                                                       "address rejected: User unknown")
    for pm in ("postmaster", "postmaster@example.org", f"postmaster@{HOSTNAME}"):
        assert replies[pm][0] == 250, (pm, replies[pm])
    assert replies["someone@elsewhere.test"][0] == 554    # still no relaying for strangers
    # The files are re-read when they change: a new user, a new alias.
    (tmp_path / "mailboxes").write_text("bob\ncarol\ndave\n")
    (tmp_path / "aliases").write_text("postmaster: bob\nstaff: bob\n")
    later = rcpt_replies(mta, ["dave@example.org", "staff@example.org", "eve@example.org"])
    assert [later[a][0] for a in ("dave@example.org", "staff@example.org",
                                  "eve@example.org")] == [250, 250, 550]

    data = message("to bob", BODY)
    qid = send(mta, SENDER, ["bob@example.org"], data, ["BODY=8BITMIME"])
    [got] = wait_files(root / "example.org" / "bob", 1)
    head = b"Return-Path: <alice@origin.test>\nDelivered-To: bob@example.org\nReceived: "
    assert got.startswith(head), got[:200]
    assert got.endswith(b"\n" + data.replace(b"\r\n", b"\n")), got   # byte for byte, LF ends
    assert b"\r" not in got
    received = got[len(head) - len(b"Received: "):-len(data.replace(b"\r\n", b"\n"))]
    assert received.count(b"\nReceived:") == 0 and f"id {qid}".encode() in received, received

    # Python's mailbox module reads it as a mailbox reader would.
    [msg] = list(mailbox.Maildir(str(root / "example.org" / "bob"), create=False))
    assert msg["Subject"] == "to bob"
    assert msg["Delivered-To"] == "bob@example.org"
    assert msg.get_payload(decode=True) == BODY.replace(b"\r\n", b"\n")
    assert not list((root / "example.org" / "bob" / "tmp").iterdir())

    # The bare postmaster is postmaster@<hostname>: its alias sends it to bob there.
    send(mta, SENDER, ["postmaster"], message("to the postmaster"))
    [pm] = wait_files(root / HOSTNAME / "bob", 1)
    assert b"Delivered-To: bob@" + HOSTNAME.encode() + b"\n" in pm
    wait_spool_empty(mta)
    lines = [ln for ln in mta.log().splitlines() if f"{qid}: to=<bob@example.org>" in ln]
    assert len(lines) == 1 and "relay=local " in lines[0] and "status=sent" in lines[0], lines


def test_aliases_expand_forward_and_report(tmp_path, mta_factory, peer_factory):
    origin, remote = peer_factory.spawn(None, None)
    extra, root = local_extra(
        tmp_path, routes={"origin.test": origin.address, "remote.test": remote.address},
        mailboxes="bob\ncarol\n",
        aliases=("# the team\n"
                 "team: bob, carol,\n"
                 "  ext@remote.test\n"
                 "solo: ext@remote.test\n"
                 "loop1: loop2\n"
                 "loop2: loop1\n"
                 "pipe: |/bin/true\n"))
    mta = mta_factory(policy=STRANGER, extra=extra)
    peer_factory.ready()

    team = send(mta, SENDER, ["team@example.org"], message("team"),
                rcpt_options=["NOTIFY=SUCCESS", "ORCPT=rfc822;team@example.org"])
    carol = send(mta, SENDER, ["carol@example.org"], message("carol"),
                 rcpt_options=["NOTIFY=SUCCESS,FAILURE"])
    solo = send(mta, SENDER, ["solo@example.org"], message("solo"),
                rcpt_options=["NOTIFY=SUCCESS,FAILURE"])
    send(mta, SENDER, ["loop1@example.org", "pipe@example.org"], message("broken"))

    assert len(wait_files(root / "example.org" / "bob", 1)) == 1
    assert len(wait_files(root / "example.org" / "carol", 2)) == 2
    # The remote members: one copy each of team and solo, relayed.
    txs = wait_for(lambda: (lambda t: t if len(t) >= 2 else None)(
        [t for t in remote.transactions() if t.complete]), 15, "the forwarded copies")
    subjects = {}
    for tx in txs:
        assert tx.mail_address == SENDER
        assert tx.accepted == ["ext@remote.test"]
        subjects[email.message_from_bytes(tx.data)["Subject"]] = tx
    assert set(subjects) == {"team", "solo"}
    # Several members: NOTIFY is not passed on; one member: NOTIFY and ORCPT go with it.
    assert "NOTIFY" not in subjects["team"].rcpt_params(0)
    assert subjects["solo"].rcpt_params(0)["NOTIFY"] == "SUCCESS,FAILURE"
    assert subjects["solo"].rcpt_params(0)["ORCPT"] == "rfc822;solo@example.org"

    # Reports to the sender: "expanded" for the alias, "delivered" for the
    # mailbox, a failure for the loop and the pipe; none for solo (the relay
    # of its copy reports, it was given NOTIFY).
    got = wait_dsns(origin, 3)
    blocks = {}
    for _tx, dsn in got:
        blocks.update(per_recipient(dsn))
    assert blocks["team@example.org"]["Action"] == "expanded"
    assert blocks["team@example.org"]["Status"] == "2.0.0"
    assert blocks["carol@example.org"]["Action"] == "delivered"
    assert blocks["loop1@example.org"]["Action"] == "failed"
    assert blocks["loop1@example.org"]["Status"] == "5.4.6"
    assert blocks["pipe@example.org"]["Status"] == "5.3.5"
    assert "solo@example.org" not in blocks
    wait_spool_empty(mta)
    assert len(maildir_files(root / "example.org" / "carol")) == 2
    assert {team, carol, solo}


def test_without_local_section_postmaster_and_root_have_a_home(tmp_path, mta_factory,
                                                                peer_factory):
    [dest] = peer_factory.spawn({"rcpt": {"gone@dest.test": "550 5.1.1 no such user"}})
    mta = mta_factory(extra=relay_config(    # loopback may relay (the default policy)
        routes={"dest.test": dest.address}, relay={"postmaster": f"postmaster@{HOSTNAME}"}))
    peer_factory.ready()
    home = mta.directory / "mail" / HOSTNAME

    replies = rcpt_replies(mta, ["postmaster", f"root@{HOSTNAME}", f"bob@{HOSTNAME}"])
    assert replies["postmaster"][0] == 250
    assert replies[f"root@{HOSTNAME}"][0] == 250
    assert replies[f"bob@{HOSTNAME}"][0] == 550

    send(mta, SENDER, ["postmaster"], message("hello postmaster"))
    [got] = wait_files(home / "postmaster", 1)
    assert b"Subject: hello postmaster\n" in got

    # sendmail root: qualified with the hostname, delivered here.
    env = {"MTA_CONFIG": str(mta.config_path)}
    run = subprocess.run([*command("sendmail"), "root"], input=b"Subject: cron\n\nout\n",
                         cwd=mta.directory, env=dict(subprocess_env(), **env),
                         capture_output=True, timeout=60)
    assert run.returncode == 0, run.stderr
    [cron] = wait_files(home / "root", 1)
    assert cron.startswith(b"Return-Path: <") and b"Delivered-To: root@" + HOSTNAME.encode()
    assert cron.endswith(b"\n\nout\n")

    # A bounce that cannot be delivered goes to [relay] postmaster: here.
    send(mta, "", ["gone@dest.test"], message("a bounce"))
    files = wait_files(home / "postmaster", 2)
    report = email.message_from_bytes(files[1].split(b"\n", 2)[2], policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    assert "gone@dest.test" in files[1].decode(errors="replace")
    wait_spool_empty(mta)


def test_lmtp_to_dovecot(tmp_path, mta_factory, peer_factory):
    [origin] = peer_factory.spawn(None)
    # Outside pytest's tmp_path, which only root may enter (Dovecot's auth
    # process reads the users file as user dovecot).
    top = Path(tempfile.mkdtemp(prefix="mta-dovecot-"))
    try:
        _lmtp_to_dovecot(tmp_path, top, mta_factory, peer_factory, origin)
    finally:
        shutil.rmtree(top, True)


def _lmtp_to_dovecot(tmp_path, top, mta_factory, peer_factory, origin) -> None:
    with DovecotLMTP(top, ["bob", "carol"]) as dove:
        extra, _root = local_extra(tmp_path, routes={"origin.test": origin.address},
                                   aliases="team: bob, carol\n",
                                   lmtp=f"tcp:127.0.0.1:{dove.port}")
        mta = mta_factory(policy=STRANGER, extra=extra)
        peer_factory.ready()
        data = message("over lmtp", BODY)
        send(mta, SENDER, ["bob@example.org", "team@example.org", "nosuch@example.org"], data,
             ["BODY=8BITMIME"])
        # bob: his own copy and the team's (two recipients, one delivery each).
        wait_files(dove.maildir("bob"), 1)
        wait_files(dove.maildir("carol"), 1)
        [(tx, dsn)] = wait_dsns(origin, 1)
        blocks = per_recipient(dsn)
        assert set(blocks) == {"nosuch@example.org"}
        assert blocks["nosuch@example.org"]["Action"] == "failed"
        assert blocks["nosuch@example.org"]["Status"].startswith("5.1.1")
        assert blocks["nosuch@example.org"]["Diagnostic-Code"].startswith("smtp;550")
        wait_spool_empty(mta)
        bob = list(mailbox.Maildir(str(dove.maildir("bob")), create=False))
        carol = list(mailbox.Maildir(str(dove.maildir("carol")), create=False))
        assert len(bob) == 1 and len(carol) == 1      # one mailbox, one copy per job
        for msg in bob + carol:
            assert msg["Subject"] == "over lmtp"
            assert msg.get_payload(decode=True).replace(b"\r\n", b"\n") == BODY.replace(
                b"\r\n", b"\n")
