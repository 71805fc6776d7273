"""Maildir delivery (mta/local/maildir.py): the files a user's mail reader
finds, byte for byte, read back with Python's ``mailbox.Maildir``; unique
names under concurrent writers; a crash never leaves a partial file in
``new/``; errors are temporary results."""
from __future__ import annotations

import errno
import mailbox
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path
from typing import Iterator

import pytest

from mta.local import maildir as md
from mta.local.maildir import MaildirPathError, check_template, deliver, maildir_for

ROOT = Path(__file__).resolve().parent.parent

CONTENT = (b"From: Alice <alice@example.net>\r\n"
           b"To: bob@example.org\r\n"
           b"Subject: caf\xc3\xa9\r\n"
           b"\r\n"
           b"first line\r\n"
           b".a line that was dot-stuffed on the wire\r\n"
           b"..two dots\r\n"
           b"\r\n"
           b"trailing spaces   \r\n"
           b"last line\r\n")


def files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir()) if d.exists() else []


def test_file_content_byte_for_byte_and_read_back(tmp_path: Path) -> None:
    box = tmp_path / "mail" / "example.org" / "bob"
    r = deliver(str(box), CONTENT, sender="alice@example.net", recipient="bob@example.org")
    assert (r.code, r.status, r.delivered, r.remote) == (250, "2.0.0", True, None)
    [f] = files(box / "new")
    assert r.text == f"250 2.0.0 delivered to maildir as {f}"
    expected = (b"Return-Path: <alice@example.net>\n"
                b"Delivered-To: bob@example.org\n"
                + CONTENT.replace(b"\r\n", b"\n"))
    assert f.read_bytes() == expected
    assert files(box / "tmp") == [] and files(box / "cur") == []
    # What a mail reader sees.
    mb = mailbox.Maildir(str(box), factory=None, create=False)
    [key] = mb.keys()
    assert mb.get_bytes(key) == expected
    msg = mb[key]
    assert msg["Return-Path"] == "<alice@example.net>"
    assert msg["Delivered-To"] == "bob@example.org"
    assert msg.get_payload().startswith("first line\n.a line")
    assert msg.get_subdir() == "new"


def test_null_sender_and_crlf_kept_when_asked(tmp_path: Path) -> None:
    box = tmp_path / "bob"
    binary = b"Content-Type: application/octet-stream\r\n\r\n\x00\r\x01\n\r\n\xff"
    r = deliver(str(box), binary, sender="", recipient="bob@example.org", lf=False)
    assert r.delivered
    [f] = files(box / "new")
    assert f.read_bytes() == b"Return-Path: <>\r\nDelivered-To: bob@example.org\r\n" + binary


def test_missing_maildir_created_0700(tmp_path: Path) -> None:
    box = tmp_path / "a" / "b" / "bob"
    assert deliver(str(box), b"x\r\n", sender="a@b.c", recipient="bob@b.c").delivered
    for d in (box, box / "cur", box / "new", box / "tmp"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    [f] = files(box / "new")
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    # An existing Maildir is used as it is: a second message lands next to the first.
    assert deliver(str(box), b"y\r\n", sender="a@b.c", recipient="bob@b.c").delivered
    assert len(files(box / "new")) == 2


def test_unique_names_under_concurrent_writers(tmp_path: Path) -> None:
    box = tmp_path / "bob"
    results: list = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def writer(t: int) -> None:
        barrier.wait()
        for i in range(25):
            r = deliver(str(box), f"Subject: {t}-{i}\r\n\r\nbody {t}-{i}\r\n".encode(),
                        sender="a@b.c", recipient="bob@b.c", hostname="host")
            with lock:
                results.append(r)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert [r.code for r in results] == [250] * 200
    names = [f.name for f in files(box / "new")]
    assert len(names) == len(set(names)) == 200
    assert files(box / "tmp") == []
    mb = mailbox.Maildir(str(box), factory=None, create=False)
    subjects = sorted(mb[k]["Subject"] for k in mb.keys())
    assert subjects == sorted(f"{t}-{i}" for t in range(8) for i in range(25))


def test_unique_name_form() -> None:
    a = md.unique_name("mx/1:a", now=1700000000.25)
    b = md.unique_name("mx/1:a", now=1700000000.25)
    assert a != b
    sec, rest = a.split(".", 1)
    assert sec == "1700000000"
    assert rest.startswith(f"M250000P{os.getpid()}Q")
    assert a.endswith(".mx\\0571\\072a") and "/" not in a and ":" not in a


def test_taken_names_are_never_overwritten(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    box = tmp_path / "bob"
    md.ensure_maildir(str(box))
    (box / "tmp" / "taken").write_bytes(b"someone else's tmp file")
    (box / "new" / "taken2").write_bytes(b"someone else's message")
    names = iter(["taken", "taken2", "free1", "free2"])
    monkeypatch.setattr(md, "unique_name", lambda hostname=None, now=None: next(names))
    r = deliver(str(box), b"mine\r\n", sender="a@b.c", recipient="bob@b.c")
    assert r.delivered
    # tmp name "taken" was busy: tmp got "taken2"; new/taken2 was busy: new got "free1".
    assert (box / "tmp" / "taken").read_bytes() == b"someone else's tmp file"
    assert (box / "new" / "taken2").read_bytes() == b"someone else's message"
    assert (box / "new" / "free1").read_bytes().endswith(b"\nmine\n")
    assert sorted(p.name for p in files(box / "tmp")) == ["taken"]


def test_rename_when_no_hard_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_link(src: str, dst: str) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(os, "link", no_link)
    box = tmp_path / "bob"
    assert deliver(str(box), b"x\r\n", sender="a@b.c", recipient="bob@b.c").delivered
    assert len(files(box / "new")) == 1 and files(box / "tmp") == []


CRASH = textwrap.dedent("""
    import os, sys
    from mta.local import maildir
    where = sys.argv[2]
    if where == "write":
        real_write = os.write
        def write(fd, data):
            real_write(fd, bytes(data[:len(data) // 2]))
            os._exit(9)                       # dies in the middle of the write
        os.write = write
    else:
        def fsync(fd):
            os._exit(9)                       # dies before the file is durable
        os.fsync = fsync
    maildir.deliver(sys.argv[1], b"Subject: crash\\r\\n\\r\\n" + b"x" * 100000 + b"\\r\\n",
                    sender="a@b.c", recipient="bob@b.c")
    os._exit(0)
""")


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_crash_leaves_nothing_partial_in_new(tmp_path: Path, where: str) -> None:
    box = tmp_path / "bob"
    md.ensure_maildir(str(box))
    p = subprocess.run([sys.executable, "-c", CRASH, str(box), where], cwd=ROOT,
                       capture_output=True, timeout=60)
    assert p.returncode == 9, p.stderr.decode()
    [t] = files(box / "tmp")                  # the dead writer's file stays in tmp/
    assert 0 < t.stat().st_size < 100000 or where == "fsync"
    assert files(box / "new") == []
    assert len(mailbox.Maildir(str(box), factory=None, create=False)) == 0
    # The next delivery is unaffected.
    assert deliver(str(box), b"ok\r\n", sender="a@b.c", recipient="bob@b.c").delivered
    assert len(mailbox.Maildir(str(box), factory=None, create=False)) == 1


def _deliver_as_nobody(box: Path) -> tuple[str, str]:
    """deliver() in a forked child that runs as nobody: (code status temporary, text)."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(rfd)
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            r = deliver(str(box), b"x\r\n", sender="a@b.c", recipient="bob@b.c")
            os.write(wfd, f"{r.code} {r.status} {r.temporary}\n{r.text}".encode())
        finally:
            os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    first, _, text = out.partition("\n")
    return first, text


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory that nobody can reach (pytest's tmp_path is under a 0700 one)."""
    d = Path(tempfile.mkdtemp(prefix="mta-maildir-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d)


def test_permission_error_is_temporary(open_dir: Path) -> None:
    # A real EACCES: the Maildir belongs to root, the writer is nobody (who
    # may look into it but not write).
    assert os.geteuid() == 0, "this test drops privileges: run as root"
    tmp_path = open_dir
    box = tmp_path / "bob"
    md.ensure_maildir(str(box))
    for d in (box, box / "tmp", box / "new", box / "cur"):
        os.chmod(d, 0o755)
    first, text = _deliver_as_nobody(box)
    assert first == "451 4.2.0 True"
    assert text == (f"451 4.2.0 cannot deliver to maildir {box}: create file in tmp/: "
                    "Permission denied")
    assert files(box / "new") == [] and files(box / "tmp") == []
    # A missing Maildir in a directory nobody cannot write: same, at its creation.
    first, text = _deliver_as_nobody(tmp_path / "carol")
    assert first == "451 4.2.0 True"
    assert text.endswith(": create maildir: Permission denied")


def test_path_component_not_a_directory_is_temporary(tmp_path: Path) -> None:
    (tmp_path / "example.org").write_text("a file where a directory should be")
    r = deliver(str(tmp_path / "example.org" / "bob"), b"x\r\n", sender="", recipient="bob@b.c")
    assert (r.code, r.status, r.temporary) == (451, "4.2.0", True)


@pytest.mark.parametrize("err,code,status", [(errno.ENOSPC, 452, "4.3.1"),
                                              (errno.EDQUOT, 452, "4.2.2"),
                                              (errno.EIO, 451, "4.3.0")])
def test_write_errors_are_temporary_and_leave_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      err: int, code: int, status: str) -> None:
    box = tmp_path / "bob"
    md.ensure_maildir(str(box))

    def write(fd: int, data: bytes) -> int:
        raise OSError(err, os.strerror(err))
    monkeypatch.setattr(os, "write", write)
    r = deliver(str(box), b"x\r\n", sender="a@b.c", recipient="bob@b.c")
    assert (r.code, r.status, r.temporary, r.permanent) == (code, status, True, False)
    assert r.detail.startswith(f"cannot deliver to maildir {box}: write file in tmp/: ")
    assert files(box / "new") == [] and files(box / "tmp") == []


def test_directory_fsync_failure_takes_the_file_back(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    box = tmp_path / "bob"
    md.ensure_maildir(str(box))
    real = md._fsync_dir

    def fsync_dir(path: str) -> None:
        if path.endswith("new"):
            raise OSError(errno.EIO, "Input/output error")
        real(path)
    monkeypatch.setattr(md, "_fsync_dir", fsync_dir)
    r = deliver(str(box), b"x\r\n", sender="a@b.c", recipient="bob@b.c")
    assert (r.code, r.status) == (451, "4.3.0")
    # Not in new/: the retry this causes does not make a second copy.
    assert files(box / "new") == [] and files(box / "tmp") == []


def test_control_characters_never_reach_a_header(tmp_path: Path) -> None:
    r = deliver(str(tmp_path / "b"), b"x\r\n", sender="a@b.c",
                recipient="bob@b.c\r\nBcc: x@evil")
    assert (r.code, r.status, r.permanent) == (553, "5.1.3", True)
    r = deliver(str(tmp_path / "b"), b"x\r\n", sender="a\n@b.c", recipient="bob@b.c")
    assert (r.code, r.status) == (553, "5.1.7")
    assert not (tmp_path / "b").exists()


def test_maildir_for_template() -> None:
    t = "/var/mail/{domain}/{user}"
    assert maildir_for(t, "Bob.Smith", "Example.ORG") == "/var/mail/example.org/bob.smith"
    assert maildir_for(t, "jöhn", "xn--strae-oqa.de") == "/var/mail/xn--strae-oqa.de/jöhn"
    assert maildir_for("/srv/{user}/Maildir", "x+tag", "d") == "/srv/x+tag/Maildir"
    assert maildir_for(t, "a b", "[192.0.2.1]") == "/var/mail/[192.0.2.1]/a b"


@pytest.mark.parametrize("local,domain", [("../../etc", "example.org"), ("a/b", "example.org"),
                                          ("..", "example.org"), (".", "example.org"),
                                          (".hidden", "example.org"), ("", "example.org"),
                                          ("a\x00b", "example.org"), ("a\nb", "example.org"),
                                          ("bob", ".."), ("bob", "a/../b"), ("bob", "")])
def test_maildir_for_refuses_traversal(local: str, domain: str) -> None:
    with pytest.raises(MaildirPathError) as e:
        maildir_for("/var/mail/{domain}/{user}", local, domain)
    assert e.value.status == "5.1.3"


@pytest.mark.parametrize("template,ok", [("/var/mail/{domain}/{user}", True),
                                         ("/var/mail/{user}", True), ("/var/mail/all", True),
                                         ("/var/mail/{login}", False), ("/m/{user!r}", False),
                                         ("/m/{user:>9}", False), ("/m/{", False), ("", False),
                                         ("/m/{0}", False)])
def test_check_template(template: str, ok: bool) -> None:
    if ok:
        check_template(template)
    else:
        with pytest.raises(ValueError) as e:
            check_template(template)
        assert str(e.value).startswith("maildir: ")
