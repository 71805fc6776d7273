"""A private Postfix instance for interop tests: the reference next hop (and
the reference client) that the issue asks every fix to be tested against.

``PostfixInstance(directory, main={...}, listeners={...})`` writes its own
config_directory (main.cf, master.cf), queue_directory and data_directory in
*directory* and runs ``postfix -c DIR start`` / ``postfix -c DIR stop``.  It
never reads or writes /etc/postfix/main.cf or the system queue, and it runs
as root only (``postfix -c`` with a directory that is not listed in the
default main.cf's ``alternate_config_directories`` is allowed for root; the
daemons still drop to ``mail_owner = postfix``).

What it is made of:

* SMTP listeners on free 127.0.0.1 ports, one per name in *listeners*, each
  an smtpd with its own ``-o`` overrides (``smtpd_discard_ehlo_keywords``,
  ``smtpd_recipient_limit``, ...) and its own ``syslog_name``
  (``postfix/NAME``), so that one instance serves several configurations
  without a reload.  ``port(name)``, ``address(name)`` (for mta ``[routes]``).
* Delivery: ``virtual_mailbox_domains`` (default ``pf.test origin.test``) are
  delivered by virtual(8) into one maildir; ``deliveries()`` returns what
  Postfix delivered, one ``Delivery`` per recipient, with the envelope it saw
  (Return-Path, X-Original-To, Delivered-To) and the content in SMTP form
  (CRLF).  Postfix's own reports (success DSNs, bounces) to those domains land
  there too.  Any other domain goes to ``relayhost`` (``configure()``).
* Its log: ``maillog_file`` in *directory* through the postlog service;
  ``log()``, ``transcript(name)`` (the SMTP dialogue, for listeners started
  with ``trace=True``: ``debug_peer_list``), ``problems()``.
* Its queue: ``queue()`` (``postqueue -c DIR -j``), ``postcat(queue_id)``.
* ``configure(**main_cf)``: ``postconf -c DIR -e`` and a reload that waits
  until every process of the old generation is gone; ``restore()`` undoes it.
* ``sendmail(...)``: ``/usr/sbin/sendmail -C DIR``.

Nothing sleeps a fixed time: every wait polls against a deadline.
"""
from __future__ import annotations

import email
import email.policy
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Iterator

import pytest

from ports import free_ports
from waiting import wait_for as _wait

POSTFIX = "/usr/sbin/postfix"
POSTCONF = "/usr/sbin/postconf"
POSTQUEUE = "/usr/sbin/postqueue"
POSTCAT = "/usr/sbin/postcat"
POSTSUPER = "/usr/sbin/postsuper"
SENDMAIL = "/usr/sbin/sendmail"
SWAKS = shutil.which("swaks") or "/usr/bin/swaks"
START_TIMEOUT = 30.0
HOSTNAME = "postfix.interop.test"
# Delivered mail is written by virtual(8) under this user (not root: virtual
# refuses uids below virtual_minimum_uid).
MAILBOX_USER = "nobody"

# The services a private instance needs (master.cf), all unchrooted: the
# instance's directories are not a chroot jail.
_MASTER_SERVICES = """\
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
proxywrite unix - - n - 1 proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
virtual   unix  - n n - - virtual
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
tlsmgr    unix  - - n 1000? 1 tlsmgr
"""

# The strict server of the issue: it refuses bare <LF>, unannounced
# pipelining and envelope addresses outside RFC 821 syntax, for loopback
# clients too (the bare-newline exclusions default to $mynetworks).
# smtpd_forbid_bare_newline: on Postfix 3.7.11 (as on 3.9) "yes" is an alias
# for "normalize" (bare <LF> accepted as a line end); "reject" answers
# 550 5.5.2 "bare <LF> received" (test_interop_postfix checks which).
STRICT: dict[str, str] = {
    "smtpd_forbid_bare_newline": "reject",
    "smtpd_forbid_bare_newline_exclusions": "",
    "smtpd_forbid_unauth_pipelining": "yes",
    "strict_rfc821_envelopes": "yes",
}


def missing_tools() -> list[str]:
    return [p for p in (POSTFIX, POSTCONF, POSTQUEUE, POSTCAT, POSTSUPER, SENDMAIL, SWAKS)
            if not os.access(p, os.X_OK)]


def require_tools() -> None:
    """A missing part fails the test (it never skips): `make test` installs
    them (tests/setup-deps)."""
    missing = missing_tools()
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: run tests/setup-deps as root "
                    "(make test does)", pytrace=False)
    if os.geteuid() != 0:
        pytest.fail("a private Postfix instance (postfix -c DIR) needs root", pytrace=False)


def _cf_value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def _master_option(key: str, value: str) -> str:
    """One ``-o`` option of a master.cf entry; values with white space (or
    none) use the ``{ name = value }`` form (Postfix 3.0)."""
    if value == "" or re.search(r"[\s{}]", value):
        return f"-o {{ {key} = {value} }}"
    return f"-o {key}={value}"


@dataclass
class Delivery:
    """One message delivered by Postfix into the maildir (one recipient)."""
    path: Path
    return_path: str       # the envelope sender Postfix saw ("" for <>)
    recipient: str         # Delivered-To: the envelope recipient
    original_recipient: str
    content: bytes         # the message as Postfix got it (its Received first), CRLF line ends

    @property
    def without_postfix_received(self) -> bytes:
        """The content without the Received field Postfix prepended."""
        m = re.match(rb"Received: [^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*", self.content)
        assert m and b"(Postfix" in m.group(0), self.content[:300]
        return self.content[m.end():]

    @property
    def postfix_queue_id(self) -> str:
        m = re.match(rb"Received: [^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*", self.content)
        assert m, self.content[:300]
        q = re.search(rb"\bid ([0-9A-F]+)", m.group(0))
        assert q, m.group(0)
        return q.group(1).decode()

    def parsed(self) -> EmailMessage:
        return email.message_from_bytes(self.content, policy=email.policy.default)

    def is_report(self) -> bool:
        msg = self.parsed()
        return self.return_path == "" and msg.get_content_type() == "multipart/report"


class PostfixInstance:
    """One private Postfix (see the module docstring)."""

    def __init__(self, directory: Path, *, main: dict[str, Any] | None = None,
                 listeners: dict[str, dict[str, Any]] | None = None,
                 trace: tuple[str, ...] | list[str] = (),
                 mailbox_domains: tuple[str, ...] = ("pf.test", "origin.test"),
                 hostname: str = HOSTNAME):
        self.directory = Path(directory)
        self.config_directory = self.directory / "conf"
        self.queue_directory = self.directory / "queue"
        self.data_directory = self.directory / "data"
        self.mailbox_base = self.directory / "mail"
        self.maildir = self.mailbox_base / "box"
        self.maillog = self.directory / "maillog"
        self.hostname = hostname
        self.mailbox_domains = tuple(mailbox_domains)
        self.main_options = {k: _cf_value(v) for k, v in (main or {}).items()}
        self.listeners = {name: {k: _cf_value(v) for k, v in (opts or {}).items()}
                          for name, opts in (listeners or {"smtp": {}}).items()}
        self.traced = set(trace)
        unknown = self.traced - set(self.listeners)
        assert not unknown, f"trace names no listener: {unknown}"
        self.ports: dict[str, int] = {}
        self.running = False
        self._log_mark = 0
        self._saved: dict[str, str] = {}

    # -- configuration --------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["MAIL_CONFIG"] = str(self.config_directory)
        return env

    def _main_cf(self) -> str:
        box = pwd.getpwnam(MAILBOX_USER)
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_directory),
            "data_directory": str(self.data_directory),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": self.hostname,
            "mydomain": self.hostname.split(".", 1)[1],
            "myorigin": "$myhostname",
            "mydestination": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            # Loopback only, never the system resolver.
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "smtpd_peername_lookup": "no",
            "relayhost": "",
            # No local(8) users, no aliases, no biff.
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "local_transport": "error:no local delivery here",
            "biff": "no",
            # Mail from SMTP clients is not rewritten (no Message-Id/Date added,
            # no header address rewriting): what the client sent is what we read.
            "local_header_rewrite_clients": "",
            "smtputf8_enable": "no",
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(self.directory),
            "virtual_mailbox_domains": " ".join(self.mailbox_domains),
            "virtual_mailbox_base": str(self.mailbox_base),
            "virtual_mailbox_maps": "static:box/",          # one maildir for everyone
            "virtual_uid_maps": f"static:{box.pw_uid}",
            "virtual_gid_maps": f"static:{box.pw_gid}",
            "virtual_mailbox_limit": "0",
            "message_size_limit": "52428800",
            # Prompt: a deferral is retried soon, not in 5 minutes.
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            **STRICT,
        }
        settings.update(self.main_options)
        return "".join(f"{k} = {v}\n" for k, v in settings.items())

    def _master_cf(self) -> str:
        out = []
        for name, opts in self.listeners.items():
            options = {"syslog_name": f"postfix/{name}", **opts}
            if name in self.traced:
                options.setdefault("debug_peer_list", "127.0.0.0/8")
            line = f"127.0.0.1:{self.ports[name]} inet n - n - - smtpd"
            out.append(line + "".join(f"\n  {_master_option(k, v)}" for k, v in options.items()))
        return "\n".join(out) + "\n" + _MASTER_SERVICES

    def _write(self) -> None:
        postfix_user = pwd.getpwnam("postfix")
        box = pwd.getpwnam(MAILBOX_USER)
        self.directory.mkdir(parents=True, exist_ok=True)
        # The daemons run as postfix (and virtual as nobody) after their
        # chdir: every directory on the way must be searchable.
        os.chmod(self.directory, 0o755)
        for d in (self.config_directory, self.queue_directory):
            d.mkdir(exist_ok=True)
            os.chmod(d, 0o755)
        self.data_directory.mkdir(exist_ok=True)
        os.chown(self.data_directory, postfix_user.pw_uid, postfix_user.pw_gid)
        os.chmod(self.data_directory, 0o700)
        self.mailbox_base.mkdir(exist_ok=True)
        os.chown(self.mailbox_base, box.pw_uid, box.pw_gid)
        os.chmod(self.mailbox_base, 0o755)
        self.ports = free_ports(self.listeners)
        (self.config_directory / "main.cf").write_text(self._main_cf())
        (self.config_directory / "master.cf").write_text(self._master_cf())

    # -- commands ---------------------------------------------------------------
    def run(self, *args: str, input: bytes | None = None, check: bool = True,
            timeout: float = 60.0) -> subprocess.CompletedProcess:
        """A Postfix command (``postfix``, ``postconf``, ...) for this instance:
        ``-c DIR`` is added, and MAIL_CONFIG is set."""
        program, *rest = args
        argv = [program, "-c", str(self.config_directory), *rest]
        proc = subprocess.run(argv, input=input, capture_output=True, env=self.env,
                              timeout=timeout, stdin=None if input is not None else subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}:\n"
                                 f"{proc.stdout.decode(errors='replace')}"
                                 f"{proc.stderr.decode(errors='replace')}\n{self.log_tail()}")
        return proc

    def postconf(self, *names: str) -> dict[str, str]:
        out = self.run(POSTCONF, *names).stdout.decode()
        return dict(line.split(" = ", 1) if " = " in line else (line.rstrip(" ="), "")
                    for line in out.splitlines())

    # -- process ----------------------------------------------------------------
    def start(self, timeout: float = START_TIMEOUT) -> "PostfixInstance":
        assert not self.running
        for attempt in range(3):
            self._write()
            proc = self.run(POSTFIX, "start", check=False, timeout=timeout)
            if proc.returncode == 0:
                self.running = True
                try:
                    for name in self.listeners:
                        self._wait_greeting(name, timeout)
                except AssertionError:
                    self.stop()
                    raise
                return self
            if "Address already in use" in self.log():
                continue        # a port was taken between choosing and binding it
            raise AssertionError(f"postfix -c {self.config_directory} start failed:\n"
                                 f"{proc.stdout.decode(errors='replace')}"
                                 f"{proc.stderr.decode(errors='replace')}\n{self.log()}")
        raise AssertionError(f"no free ports for Postfix:\n{self.log()}")

    def _wait_greeting(self, name: str, timeout: float) -> None:
        """The listener answers 220 (its smtpd starts: no configuration error)."""
        deadline = time.monotonic() + timeout
        last: Exception | bytes | None = None
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.ports[name]), timeout=5) as s:
                    s.settimeout(10)
                    f = s.makefile("rb")
                    banner = f.readline()
                    if banner.startswith(b"220 "):
                        s.sendall(b"QUIT\r\n")
                        f.readline()
                        return
                    last = banner
            except OSError as e:
                last = e
            time.sleep(0.02)
        raise AssertionError(f"Postfix listener {name} (port {self.ports[name]}) did not "
                             f"greet within {timeout}s: {last!r}\n{self.log()}")

    def master_pid(self) -> int | None:
        try:
            return int((self.queue_directory / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def children(self) -> set[int]:
        """Process ids of the master's children (the running daemons)."""
        master = self.master_pid()
        found = set()
        if master is None:
            return found
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[1]) == master and fields[0] != "Z":
                found.add(int(entry))
        return found

    def reload(self, timeout: float = 20.0) -> None:
        """``postfix reload``, and wait until every daemon of the old
        configuration has exited (the next connection gets the new one)."""
        old = self.children()
        self.run(POSTFIX, "reload")
        _wait(lambda: not (old & self.children()), timeout, "the old Postfix daemons to exit")
        for name in self.listeners:
            self._wait_greeting(name, timeout)

    def configure(self, **settings: Any) -> None:
        """Change main.cf (``postconf -e``) and reload; ``restore()`` undoes it."""
        current = self.postconf(*settings)
        for key in settings:
            self._saved.setdefault(key, current.get(key, ""))
        self.run(POSTCONF, "-e", *(f"{k}={_cf_value(v)}" for k, v in settings.items()))
        self.reload()

    def restore(self) -> None:
        if self._saved:
            saved, self._saved = self._saved, {}
            self.run(POSTCONF, "-e", *(f"{k}={v}" for k, v in saved.items()))
            self.reload()

    def stop(self, timeout: float = 30.0) -> None:
        if not self.running:
            return
        master = self.master_pid()
        proc = self.run(POSTFIX, "stop", check=False, timeout=timeout)
        self.running = False
        if master is not None and _alive(master):
            try:
                _wait(lambda: not _alive(master), timeout, "the Postfix master to exit")
            except AssertionError:
                os.kill(master, signal.SIGKILL)
                raise AssertionError(f"postfix stop did not stop master {master}: "
                                     f"{proc.stderr.decode(errors='replace')}")

    # -- state between tests ------------------------------------------------------
    def reset(self) -> None:
        """Forget what earlier tests left: settings, delivered mail, queue, log."""
        self.restore()
        self.run(POSTSUPER, "-d", "ALL")
        for sub in ("new", "cur", "tmp"):
            d = self.maildir / sub
            if d.is_dir():
                for p in d.iterdir():
                    p.unlink()
        self._log_mark = self._log_size()

    # -- log ----------------------------------------------------------------------
    def _log_size(self) -> int:
        try:
            return self.maillog.stat().st_size
        except FileNotFoundError:
            return 0

    def log(self, everything: bool = False) -> str:
        """The maillog since the last reset() (or all of it)."""
        try:
            with open(self.maillog, "rb") as f:
                if not everything:
                    f.seek(self._log_mark)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    _VERBOSE = re.compile(r"^[^\]]*\]: (?![<>] |(dis)?connect from|[0-9A-F]{6,}: |warning:|error:|"
                          r"fatal:|panic:|NOQUEUE|improper|lost connection|timeout|too many|"
                          r"discarding|daemon started|starting|stopping|reload|refresh)")

    def log_summary(self) -> str:
        """log() less the debug_peer_list chatter (lookups, attributes), keeping
        the SMTP dialogue, queue events and anything that looks like trouble."""
        return "\n".join(ln for ln in self.log().splitlines() if not self._VERBOSE.search(ln))

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log(everything=True).splitlines()[-lines:])

    def log_lines(self, pattern: str) -> list[str]:
        return [ln for ln in self.log().splitlines() if re.search(pattern, ln)]

    def problems(self) -> list[str]:
        """Log lines about anything that is not clean: warnings, rejects,
        protocol complaints, errors, and lost connections."""
        bad = re.compile(r"warning:|error:|fatal:|panic:|reject:|NOQUEUE|improper command "
                         r"pipelining|bare <?(CR|LF|newline)|lost connection|timeout after|"
                         r"too many errors|status=(deferred|bounced)", re.I)
        return [ln for ln in self.log().splitlines() if bad.search(ln)]

    def transcript(self, name: str) -> list[tuple[str, str]]:
        """The SMTP dialogue on a traced listener since the last reset():
        ``("<", command)`` from the client, ``(">", reply line)`` from Postfix."""
        assert name in self.traced, f"listener {name} is not traced"
        pat = re.compile(rf" postfix/{re.escape(name)}/smtpd\[\d+\]: ([<>]) [^:]*\[[^\]]*\]: (.*)$")
        return [(m.group(1), m.group(2)) for m in map(pat.search, self.log().splitlines()) if m]

    # -- queue ----------------------------------------------------------------------
    def queue(self) -> list[dict]:
        """The messages in Postfix's queue (``postqueue -j``): queue_name,
        queue_id, sender, recipients [{address, delay_reason}]."""
        out = self.run(POSTQUEUE, "-j").stdout.decode()
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def mailq(self) -> str:
        """``postqueue -p``: the queue as an operator reads it."""
        return self.run(POSTQUEUE, "-p").stdout.decode(errors="replace")

    def wait_queue_empty(self, timeout: float = 20.0) -> None:
        _wait(lambda: not self.queue(), timeout, "Postfix's queue to empty", interval=0.05,
              detail=lambda: f"{self.queue()}\n{self.log_tail()}")

    def postcat(self, queue_id: str) -> str:
        return self.run(POSTCAT, "-q", queue_id).stdout.decode(errors="replace")

    # -- delivered mail ------------------------------------------------------------------
    def deliveries(self) -> list[Delivery]:
        """What Postfix delivered (since the last reset()), oldest first."""
        new = self.maildir / "new"
        if not new.is_dir():
            return []
        out = []
        for path in sorted(new.iterdir(), key=lambda p: (p.stat().st_mtime_ns, p.name)):
            raw = path.read_bytes()
            fields: dict[str, str] = {}
            # virtual(8) prepends Return-Path, X-Original-To and Delivered-To.
            while True:
                m = re.match(rb"(Return-Path|X-Original-To|Delivered-To): ([^\n]*)\n", raw)
                if not m or m.group(1).decode() in fields:
                    break
                fields[m.group(1).decode()] = m.group(2).decode()
                raw = raw[m.end():]
            out.append(Delivery(
                path=path, return_path=fields.get("Return-Path", "").strip("<>"),
                recipient=fields.get("Delivered-To", ""),
                original_recipient=fields.get("X-Original-To", ""),
                content=raw.replace(b"\n", b"\r\n")))
        return out

    def wait_deliveries(self, n: int, timeout: float = 20.0, *,
                        what: str = "", match: Any = None) -> list[Delivery]:
        """Wait until at least *n* deliveries (for which *match* is true)."""
        def enough() -> list[Delivery] | None:
            got = [d for d in self.deliveries() if match is None or match(d)]
            return got if len(got) >= n else None
        return _wait(enough, timeout, what or f"{n} deliveries by Postfix", interval=0.05,
                     detail=lambda: f"delivered: {[d.recipient for d in self.deliveries()]}\n"
                                    f"queue: {self.queue()}\n{self.log_tail()}")

    # -- injection -------------------------------------------------------------------------
    def sendmail(self, sender: str, recipients: list[str], data: bytes) -> None:
        """``sendmail -C DIR -f sender -- rcpt...`` (a local submission)."""
        proc = subprocess.run([SENDMAIL, "-C", str(self.config_directory), "-i", "-f", sender,
                               "--", *recipients], input=data, capture_output=True,
                              env=self.env, timeout=60)
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")

    def address(self, name: str = "smtp") -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def port(self, name: str = "smtp") -> int:
        return self.ports[name]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[0] != "Z"


# --------------------------------------------------------------------------- fixtures

TMP_PREFIX = "mta-postfix-"


def sweep_stale_instances() -> None:
    """Stop and remove instances left by a test run that was killed before its
    teardown (its pid, in the instance's ``owner`` file, is gone); instances
    of runs still going are left alone."""
    for directory in Path("/tmp").glob(TMP_PREFIX + "*"):
        try:
            owner = int((directory / "owner").read_text())
        except (OSError, ValueError):
            continue
        if _alive(owner):
            continue
        if (directory / "conf" / "main.cf").exists():
            subprocess.run([POSTFIX, "-c", str(directory / "conf"), "stop"],
                           capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
        shutil.rmtree(directory, ignore_errors=True)


class PostfixFactory:
    """``postfix_factory(main={...}, listeners={...}, trace=[...])`` starts a
    private instance; all are stopped (and their directories removed) at the
    end of the fixture's scope."""

    def __init__(self) -> None:
        self.instances: list[PostfixInstance] = []

    def __call__(self, **kw: Any) -> PostfixInstance:
        require_tools()
        if not self.instances:
            sweep_stale_instances()
        # Not under pytest's basetemp (mode 0700): the daemons run as postfix.
        directory = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir="/tmp"))
        (directory / "owner").write_text(str(os.getpid()))
        instance = PostfixInstance(directory, **kw)
        self.instances.append(instance)
        return instance.start()

    def close(self) -> None:
        problems = []
        for instance in self.instances:
            try:
                instance.stop()
            except AssertionError as e:
                problems.append(str(e))
            print(f"===== Postfix {instance.config_directory} =====")
            print(instance.log(everything=True))
            shutil.rmtree(instance.directory, ignore_errors=True)
        if problems:
            pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture(scope="module")
def postfix_factory() -> Iterator[PostfixFactory]:
    """Private Postfix instances for one test module (see PostfixInstance)."""
    factory = PostfixFactory()
    yield factory
    factory.close()
