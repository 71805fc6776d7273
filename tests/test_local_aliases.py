"""aliases(5) and the mailboxes list (mta/local/aliases.py): parser vectors,
recursive expansion, loops, :include:, unsupported targets, reload when a
file changes."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from twisted.logger import globalLogPublisher

from mta.local.aliases import (AliasTable, MailboxList, Problem, TableUnavailable, Target,
                               is_local_recipient, parse_aliases, parse_mailboxes)

LOCAL = {"example.org", "example.com"}


def table(tmp_path: Path, text: str, **kw) -> AliasTable:
    p = tmp_path / "aliases"
    p.write_text(text)
    return AliasTable(str(p), is_local=LOCAL.__contains__, **kw)


def values(text: str) -> dict[str, list[tuple[str, str]]]:
    entries, _ = parse_aliases(text, "al")
    return {k: [(t.kind, t.value + ("!" if t.noexpand else "")) for t in v.targets]
            for k, v in entries.items()}


# --------------------------------------------------------------------------- parser

@pytest.mark.parametrize("text,expected", [
    ("a: b", {"a": [("address", "b")]}),
    ("a:b,c ,  d@remote.example", {"a": [("address", "b"), ("address", "c"),
                                         ("address", "d@remote.example")]}),
    ("A: B", {"a": [("address", "B")]}),                      # the name is folded
    ("a: b c", {"a": [("address", "b"), ("address", "c")]}),  # blanks separate too
    ("a: b,", {"a": [("address", "b")]}),
    ("a: Bob Smith <bob@remote.example>", {"a": [("address", "bob@remote.example")]}),
    ('"john doe": john', {"john doe": [("address", "john")]}),
    ('"a:b": x', {"a:b": [("address", "x")]}),
    ('a: "odd, name"@remote.example', {"a": [("address", '"odd, name"@remote.example')]}),
    ("a: \\a, b", {"a": [("address", "a!"), ("address", "b")]}),
    ("a: :include:/etc/mail/list", {"a": [("include", "/etc/mail/list")]}),
    ('a: ":include:/etc/my list"', {"a": [("include", "/etc/my list")]}),
    ("a: |/usr/bin/vacation a", {"a": [("command", "|/usr/bin/vacation a")]}),
    ('a: "|/usr/bin/procmail -f-", b', {"a": [("command", "|/usr/bin/procmail -f-"),
                                              ("address", "b")]}),
    ("a: /var/spool/a.mbox", {"a": [("file", "/var/spool/a.mbox")]}),
    ("a: b\n  c,\n\td", {"a": [("address", "b"), ("address", "c"), ("address", "d")]}),
    ("a: b,\n# a comment between continuation lines\n  c",
     {"a": [("address", "b"), ("address", "c")]}),
    ("# comment\n\n   \na: b # not a comment\n", {"a": [("address", "b"), ("address", "#"),
                                                        ("address", "not"), ("address", "a"),
                                                        ("address", "comment")]}),
    ("a: b\na: c", {"a": [("address", "b")]}),                # the first one counts
])
def test_parser_vectors(text: str, expected: dict) -> None:
    assert values(text) == expected


@pytest.mark.parametrize("text,warning", [
    ("no colon here", "al:1: no ':' after the name: ignored"),
    ("a@b: c", "al:1: bad name 'a@b' (a local part; quote special characters): ignored"),
    (": c", "al:1: bad name '' (a local part; quote special characters): ignored"),
    ("a: b\na: c", "al:2: duplicate alias 'a' (first at al:1): ignored"),
    ("x: y\na: <<bad>>", "al:2: bad address '<<bad>>' (syntax error in path <<<bad>>@localhost>): "
     "ignored"),
    ("x: y\n\na: |cmd", "al:3: alias a: command target '|cmd' refused: delivery to commands and "
     "files is not supported"),
    ("a: /dev/null", "al:1: alias a: file target '/dev/null' refused: delivery to commands and "
     "files is not supported"),
    ("a:", "al:1: alias a has no usable value"),
])
def test_parser_warnings(text: str, warning: str) -> None:
    _, warnings = parse_aliases(text, "al")
    assert warning in warnings


def test_mailboxes_parser() -> None:
    names, warnings = parse_mailboxes(
        "# who exists\nBob\ncarol@Example.ORG\n\n  dave   # the admin\nx y\nbad@@x\n", "mb")
    assert names == {"bob", "carol@example.org", "dave", "x"}
    assert warnings == ["mb:6: one mailbox per line: 'y' ignored",
                        "mb:7: bad mailbox 'bad@@x' (syntax error in path <bad@@x>): ignored"]


# --------------------------------------------------------------------------- expansion

def test_plain_local_name_is_its_mailbox(tmp_path: Path) -> None:
    t = table(tmp_path, "root: bob\n")
    e = t.expand("Carol", "Example.ORG")
    assert (e.expanded, e.mailboxes, e.remote, e.problems, e.failure) == (
        False, ["Carol@example.org"], [], [], None)


def test_recursive_expansion_local_and_remote(tmp_path: Path) -> None:
    t = table(tmp_path, (
        "postmaster: root\n"
        "root: bob, admins\n"
        "admins: carol@example.com, Dave@Remote.Example, bob\n"
        "carol: \\carol, eve@remote.example\n"))
    e = t.expand("PostMaster", "example.org")
    assert e.expanded and e.failure is None and e.problems == []
    # Depth first, in file order, each address once; a bare name takes the
    # domain of the recipient, a local domain stays local (and is expanded:
    # carol@example.com -> \\carol, eve@remote.example).
    assert e.mailboxes == ["bob@example.org", "carol@example.com"]
    assert e.remote == ["eve@remote.example", "Dave@Remote.Example"]
    assert t.lookup("ROOT").source == f"{tmp_path / 'aliases'}:2"
    assert t.lookup("nobody") is None


def test_self_reference_is_the_mailbox(tmp_path: Path) -> None:
    t = table(tmp_path, "root: root, admin@remote.example\nbob: Bob\n")
    e = t.expand("root", "example.org")
    assert (e.mailboxes, e.remote, e.problems) == (["root@example.org"],
                                                   ["admin@remote.example"], [])
    e = t.expand("bob", "example.org")
    assert (e.expanded, e.mailboxes, e.problems) == (True, ["Bob@example.org"], [])


def test_loops_are_stopped(tmp_path: Path) -> None:
    t = table(tmp_path, "a: b, x@remote.example\nb: c\nc: a\nloop1: loop2\nloop2: loop1\n")
    e = t.expand("a", "example.org")
    assert e.remote == ["x@remote.example"] and e.mailboxes == []
    assert e.problems == [Problem("5.4.6", "mail forwarding loop: a -> b -> c -> a")]
    assert e.failure is None                    # x@remote.example still gets it
    e = t.expand("loop1", "example.org")
    assert e.failure == Problem("5.4.6", "mail forwarding loop: loop1 -> loop2 -> loop1")
    assert not e.failure.temporary


def test_depth_limit(tmp_path: Path) -> None:
    t = table(tmp_path, "".join(f"n{i}: n{i + 1}\n" for i in range(30)), max_depth=5)
    e = t.expand("n0", "example.org")
    assert e.mailboxes == []
    assert e.failure == Problem("5.4.6", "mail forwarding loop: alias expansion deeper than "
                                "5 levels at n5")


def test_include(tmp_path: Path) -> None:
    (tmp_path / "staff").write_text("# the staff\nbob, carol\n  dave@remote.example\n"
                                    ":include:more\n")
    (tmp_path / "more").write_text("erin\n")
    t = table(tmp_path, "staff: :include:staff\nall: staff, frank\n")
    e = t.expand("all", "example.org")
    assert e.mailboxes == ["bob@example.org", "carol@example.org", "erin@example.org",
                           "frank@example.org"]
    assert e.remote == ["dave@remote.example"] and e.problems == []


def test_include_loop_and_missing_include(tmp_path: Path) -> None:
    (tmp_path / "self").write_text("bob\n:include:self\n")
    t = table(tmp_path, f"a: :include:{tmp_path / 'self'}\nb: bob, :include:/nonexistent/list\n")
    e = t.expand("a", "example.org")
    assert e.mailboxes == ["bob@example.org"]
    assert [p.status for p in e.problems] == ["5.4.6"]
    assert e.failure is None
    # An include that cannot be read now defers the whole recipient
    # (nothing is delivered, so the retry cannot duplicate).
    e = t.expand("b", "example.org")
    assert e.mailboxes == ["bob@example.org"]
    assert e.failure == Problem("4.3.0", "alias b: cannot read /nonexistent/list: "
                                "No such file or directory")
    assert e.failure.temporary


def test_unsupported_targets_refused_and_logged(tmp_path: Path) -> None:
    seen: list[str] = []

    def observer(event: dict) -> None:
        if event.get("log_namespace") == "mta.local":
            seen.append(event["log_format"].format(**event))
    globalLogPublisher.addObserver(observer)
    try:
        t = table(tmp_path, 'a: "|/usr/bin/procmail", /var/mail/a.mbox, bob\nc: |/bin/cat\n')
        e = t.expand("a", "example.org")
    finally:
        globalLogPublisher.removeObserver(observer)
    path = tmp_path / "aliases"
    assert seen == [
        f"{path}:1: alias a: command target '|/usr/bin/procmail' refused: delivery to commands "
        "and files is not supported",
        f"{path}:1: alias a: file target '/var/mail/a.mbox' refused: delivery to commands and "
        "files is not supported",
        f"{path}:2: alias c: command target '|/bin/cat' refused: delivery to commands and files "
        "is not supported"]
    assert e.mailboxes == ["bob@example.org"] and e.failure is None
    assert [p.status for p in e.problems] == ["5.3.5", "5.3.5"]
    e = t.expand("c", "example.org")
    assert e.failure == Problem("5.3.5", f"alias c ({path}:2): command target '|/bin/cat' is "
                                "not supported")


def test_members_checked_against_mailboxes(tmp_path: Path) -> None:
    (tmp_path / "mailboxes").write_text("bob\ncarol@example.com\n")
    boxes = MailboxList(str(tmp_path / "mailboxes"))
    t = table(tmp_path, "team: bob, carol@example.com, carol, ghost\n")
    e = t.expand("team", "example.org", exists=boxes.exists)
    assert e.mailboxes == ["bob@example.org", "carol@example.com"]
    assert e.problems == [Problem("5.1.1", "no mailbox carol@example.org"),
                          Problem("5.1.1", "no mailbox ghost@example.org")]
    assert e.failure is None
    assert is_local_recipient(t, boxes, "TEAM", "example.org")
    assert is_local_recipient(t, boxes, "Bob", "example.com")
    assert is_local_recipient(t, boxes, "carol", "EXAMPLE.com")
    assert not is_local_recipient(t, boxes, "carol", "example.org")
    assert not is_local_recipient(t, boxes, "ghost", "example.org")
    everyone = MailboxList(None)
    assert everyone.exists("anyone", "example.org")


def test_no_aliases_file(tmp_path: Path) -> None:
    t = AliasTable(None, is_local=LOCAL.__contains__)
    assert t.lookup("root") is None
    assert t.expand("root", "example.org").mailboxes == ["root@example.org"]


def test_unreadable_file_is_temporary(tmp_path: Path) -> None:
    t = AliasTable(str(tmp_path / "missing"), is_local=LOCAL.__contains__)
    with pytest.raises(TableUnavailable) as e:
        t.lookup("root")
    assert e.value.status == "4.3.0"
    assert str(e.value) == f"cannot read {tmp_path / 'missing'}: No such file or directory"
    assert t.expand("root", "example.org").failure.status == "4.3.0"
    with pytest.raises(TableUnavailable):
        MailboxList(str(tmp_path / "missing")).exists("bob", "example.org")


# --------------------------------------------------------------------------- reload

class FakeFS:
    """stat and read for a file whose content and stat fields the test sets."""

    def __init__(self) -> None:
        self.text = ""
        self.ino = 1
        self.mtime_ns = 1_000_000_000
        self.stats = 0
        self.reads = 0

    def stat(self, path: str) -> os.stat_result:
        self.stats += 1
        return os.stat_result((0o100644, self.ino, 1, 1, 0, 0, len(self.text.encode()),
                               0, 0, 0, 0, 0, 0, self.mtime_ns, self.mtime_ns, self.mtime_ns))

    def read(self, path: str) -> str:
        self.reads += 1
        return self.text


def test_reread_when_the_file_changes() -> None:
    fs = FakeFS()
    fs.text = "a: b\n"
    t = AliasTable("/etc/aliases", is_local=LOCAL.__contains__, stat=fs.stat, read=fs.read)
    assert t.expand("a", "example.org").mailboxes == ["b@example.org"]
    for _ in range(5):
        t.lookup("a")
    assert (fs.stats, fs.reads) == (6, 1)   # one stat per lookup or expansion, one read
    # Edited in place, same size, new mtime.
    fs.text, fs.mtime_ns = "a: c\n", fs.mtime_ns + 1
    assert t.expand("a", "example.org").mailboxes == ["c@example.org"]
    assert fs.reads == 2
    # Replaced by another file (rename over it), same size and mtime.
    fs.text, fs.ino = "a: d\n", 2
    assert t.expand("a", "example.org").mailboxes == ["d@example.org"]
    # Grown.
    fs.text = "a: e\nb: f\n"
    assert t.lookup("b").targets == (Target("address", "f", source="/etc/aliases:2"),)
    assert fs.reads == 4


def test_reload_real_files(tmp_path: Path) -> None:
    p = tmp_path / "aliases"
    t = table(tmp_path, "a: b\n")
    assert t.lookup("a") is not None
    new = tmp_path / "aliases.new"
    new.write_text("x: y\n")
    os.replace(new, p)                              # how editors and scripts replace it
    assert t.lookup("a") is None and t.lookup("x") is not None
    (tmp_path / "inc").write_text("bob\n")
    p.write_text("list: :include:inc\n")
    assert t.expand("list", "example.org").mailboxes == ["bob@example.org"]
    (tmp_path / "inc").write_text("bob, carol\n")   # an include is watched too
    assert t.expand("list", "example.org").mailboxes == ["bob@example.org", "carol@example.org"]
    mb = tmp_path / "mailboxes"
    mb.write_text("bob\n")
    boxes = MailboxList(str(mb))
    assert not boxes.exists("carol", "example.org")
    mb.write_text("bob\ncarol\n")
    assert boxes.exists("carol", "example.org")
