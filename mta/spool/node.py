"""The names of the nodes that share a spool: what a claim's ``owner`` is.

A node is named by ``[cluster] node``, or, when that is empty, by its host
name, its process id and a random suffix, so that each start is a new node:
two daemons on one host never share a name, and a restarted daemon does
not renew or record what its predecessor claimed.  What that predecessor
left in flight is still taken back at once: a name of this host whose
process is gone (:func:`left_by_a_dead_process`) is an earlier start here.
"""
from __future__ import annotations

import os
import re
import secrets
import socket

_GENERATED = re.compile(r"(?P<host>.+)-(?P<pid>[0-9]{1,10})-[0-9a-f]{6}")


def node_name(configured: str) -> str:
    """*configured*, or a name for this start of this process."""
    return configured or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def left_by_a_dead_process(owner: str) -> bool:
    """True when *owner* is a generated name (see :func:`node_name`) of this
    host whose process no longer runs: a daemon here that died or stopped."""
    m = _GENERATED.fullmatch(owner)
    if m is None or m.group("host") != socket.gethostname():
        return False
    pid = int(m.group("pid"))
    if pid == os.getpid():
        return True               # an earlier process that had our pid: not us
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False              # exists (another user's), or cannot tell
    return _zombie(pid)


def _zombie(pid: int) -> bool:
    """True when *pid* has exited but is not yet reaped (Linux /proc): an
    orphaned [server] workers process after a kill -9 of its supervisor
    stays one until init reaps it, and holds no lock nor connection."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in (b"Z", b"X")
