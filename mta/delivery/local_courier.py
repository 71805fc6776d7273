"""The local courier: final delivery here, a :class:`mta.delivery.types.Courier`
for the recipients of local domains (``Route("local", "local")``, see
mta.local.directory for which domains and users are local).

For each recipient of a job:

1. the aliases expansion (``LocalDirectory.expand``): the local mailboxes
   and remote addresses it stands for (a name without an alias is its own
   mailbox).  A temporary problem (an unreadable file) defers it, a
   recipient left with no member fails (5.1.1 unknown, 5.4.6 loop, 5.3.5
   unsupported ``|command`` / ``/file`` target);
2. the mailboxes of the whole job, each once, are delivered: into its
   Maildir (``[local] maildir``; mta.local.maildir, run in a thread, off the
   reactor) or, with ``[local] lmtp``, to that LMTP server in one
   transaction (mta.local.lmtp: one reply per recipient);
3. each recipient's Outcome:

   * a mailbox of its own: that mailbox's result, ``final`` (a success
     report says ``delivered``);
   * an alias: temporary if one of its mailboxes failed temporarily (the
     retry delivers the whole alias again, so a mailbox written before may
     get a second copy: the price of never losing one, as with Postfix's
     local(8)); else delivered when any member was delivered or is to be
     relayed, the members that failed for good being logged; the remote
     members are ``forward``-ed: spooled by the scheduler as a new message
     (same sender) in the same transaction as the outcome.  Several members:
     ``expanded`` (RFC 3461 §6.2.7.3: a success report says ``expanded``,
     and NOTIFY/ORCPT are not passed on); one member: NOTIFY and ORCPT go
     with it, and it reports for itself.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from twisted.internet import defer, threads
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from ..address import AddressError, parse_path
from ..local import maildir as md
from ..local.aliases import Expansion, Problem
from ..local.directory import LocalDirectory
from ..local.result import LocalResult
from .types import NextHop, Outcome, QueuedMessage, QueuedRecipient

__all__ = ["LocalCourier"]

log = Logger(namespace="mta.delivery")


class LMTP(Protocol):
    """What the courier needs of mta.local.lmtp.LMTPClient."""
    destination: str

    def deliver(self, sender: str, recipients: list[str], content: bytes, *,
                body_type: str | None = None, smtputf8: bool = False) -> Deferred: ...


RunInThread = Callable[..., Deferred]


class LocalCourier:
    """Final delivery for local recipients.

    *directory*: who is local and what aliases stand for; *maildir*: the
    ``[local] maildir`` template; *lmtp*: an LMTP client (mailboxes go there
    instead of to Maildirs), or None; *hostname*: ours (the bare
    postmaster's domain, and the Maildir file names); *run_in_thread*:
    ``f(*args, **kw) -> Deferred`` running a blocking call off the reactor
    (default: the reactor's thread pool)."""

    def __init__(self, directory: LocalDirectory, *, maildir: str, hostname: str,
                 reactor: Any, lmtp: LMTP | None = None,
                 run_in_thread: RunInThread | None = None) -> None:
        self.directory = directory
        self.maildir = maildir
        self.hostname = hostname
        self.reactor = reactor
        self.lmtp = lmtp
        if run_in_thread is None:
            def run_in_thread(f: Callable[..., Any], *a: Any, **kw: Any) -> Deferred:
                return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *a, **kw)
        self._run = run_in_thread
        self._relay = f"lmtp[{lmtp.destination}]" if lmtp is not None else "local"
        self._hop = (NextHop(host=lmtp.destination, address=lmtp.destination, port=0,
                             tls="none") if lmtp is not None else None)

    def deliver(self, message: QueuedMessage, recipients: Sequence[QueuedRecipient],
                destination: str) -> Deferred[list[Outcome]]:
        return Deferred.fromCoroutine(self._deliver(message, list(recipients)))

    def close(self) -> None:
        return None

    # ------------------------------------------------------------------------
    def _expand(self, address: str) -> Expansion:
        try:
            box = parse_path(f"<{address}>", utf8=True, allow_postmaster=True)
        except AddressError as e:
            exp = Expansion(address)
            exp.problems.append(Problem("5.1.3", f"bad recipient address: {e}"))
            return exp
        assert box is not None
        return self.directory.expand(box.local_text, box.domain or self.hostname)

    async def _deliver(self, m: QueuedMessage, rcpts: list[QueuedRecipient]) -> list[Outcome]:
        expansions = [self._expand(r.address) for r in rcpts]
        boxes: list[str] = []
        for exp in expansions:
            if exp.failure is None:
                boxes += [b for b in exp.mailboxes if b not in boxes]
        results = dict(zip(boxes, await self._deliver_boxes(m, boxes))) if boxes else {}
        return [self._outcome(r, exp, results) for r, exp in zip(rcpts, expansions)]

    async def _deliver_boxes(self, m: QueuedMessage, boxes: list[str]) -> list[LocalResult]:
        content = bytes(m.headers) + bytes(m.body)
        if self.lmtp is not None:
            return list(await self.lmtp.deliver(m.sender, boxes, content,
                                                body_type=m.body_type, smtputf8=m.smtputf8))
        lf = (m.body_type or "").upper() != "BINARYMIME"
        ds = []
        for box in boxes:
            local, _, domain = box.rpartition("@")
            try:
                path = md.maildir_for(self.maildir, local, domain)
            except md.MaildirPathError as e:
                ds.append(defer.succeed(LocalResult.make(e.code, e.status, str(e))))
                continue
            ds.append(self._run(md.deliver, path, content, sender=m.sender, recipient=box,
                                lf=lf, hostname=self.hostname))
        return list(await defer.gatherResults(ds, consumeErrors=True))

    def _from_result(self, res: LocalResult) -> Outcome:
        return Outcome.from_reply(res.code, res.status, res.text,
                                  self._hop if res.remote is not None else None,
                                  relay=self._relay, final=True)

    def _outcome(self, r: QueuedRecipient, exp: Expansion,
                 results: dict[str, LocalResult]) -> Outcome:
        problem = exp.failure
        if problem is not None:
            return Outcome.ours(problem.status, problem.text, relay=self._relay)
        if not exp.expanded:
            return self._from_result(results[exp.mailboxes[0]])
        mine = [(b, results[b]) for b in exp.mailboxes]
        for _b, res in mine:
            if res.temporary:
                return self._from_result(res)
        failed = [f"{b}: {res.text}" for b, res in mine if res.permanent]
        failed += [f"{p.status} {p.text}" for p in exp.problems]
        delivered = [b for b, res in mine if res.delivered]
        if not delivered and not exp.remote:
            return self._from_result(mine[0][1]) if mine else Outcome.ours(
                "5.3.5", f"alias {exp.address} has no usable member", relay=self._relay)
        if failed:
            log.warn("alias {alias}: {n} member(s) not delivered: {why}", alias=exp.address,
                     n=len(failed), why="; ".join(failed))
        members = len(exp.mailboxes) + len(exp.remote)
        several = members > 1
        text = (f"250 2.0.0 alias {exp.address} expanded to {members} address(es): "
                f"{len(delivered)} delivered here, {len(exp.remote)} forwarded")
        if failed:
            text += f", {len(failed)} failed"
        return Outcome.from_reply(
            250, "2.0.0", text, None, relay=self._relay, final=True, expanded=several,
            forward=tuple(exp.remote),
            # One member: the alias is a new name for it, which reports for
            # itself (a forwarded copy carries NOTIFY and ORCPT on).
            dsn_passed=not several and not delivered,
            forward_notify=None if several else r.notify,
            forward_orcpt=None if several else (r.orcpt or f"rfc822;{r.address}"))
