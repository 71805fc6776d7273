"""``mta queue``: see and steer the queue, while the daemon runs or not.

::

    mta queue [--config PATH] list [--state S] [--domain D] [--sender A]
                                   [--older-than DURATION] [--json]
    mta queue show ID [--body | --json]
    mta queue flush [ID... | --domain D | --all]     (--domain: also releases a hold domain)
    mta queue delete ID... | --all-deferred
    mta queue hold ID...
    mta queue release ID...
    mta queue requeue ID...
    mta queue bounce ID...
    mta queue stats [--json]

The configuration is ``--config PATH``, else ``$MTA_CONFIG``, else
``etc/mta.toml``.  Every command is one short transaction on the spool
(:class:`mta.spool.interface.QueueAdmin`, :class:`mta.spool.admin.SpoolAdmin`);
the running daemon sees the changes at its next poll (every second), or,
on PostgreSQL, at once: a flush, release or requeue notifies the daemons
(mta.spool.notify; their poll is every ``[cluster] poll`` there).

Exit status: 0 done; 1 an error, one line ``mta: ...`` on stderr (a queue id
that is not in the queue: ``mta: queue: no such message: ID``; the other ids
given are still acted on); 2 a usage error.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Any, Callable

from .cli import CommandError, add_config_option, load_config

if TYPE_CHECKING:
    from .message import InboundMessage, QueuedMessage, QueuedRecipient
    from .spool.interface import Changed, ListedMessage, ListedRecipient, QueueAdmin

BOUNCE_STATUS = "5.0.0"
BOUNCE_REPLY = f"550 {BOUNCE_STATUS} message returned by the mail system administrator"


# --------------------------------------------------------------------------- arguments

def _duration(text: str) -> float:
    from .config_values import parse_duration
    try:
        return parse_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r} (seconds, or e.g. 30m, 2h, 1d)") from None


def _states(text: str) -> list[str]:
    from .spool.admin import STATES
    out = [s.strip().lower() for s in text.split(",") if s.strip()]
    for s in out:
        if s not in STATES:
            raise argparse.ArgumentTypeError(
                f"invalid state {s!r} (choose from {', '.join(STATES)})")
    return out


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "queue", help="list and manage the queue",
        description="List and manage the messages in the spool (also while the daemon runs).")
    add_config_option(p)
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        a = sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")
        # SUPPRESS: an option given before the action is not reset by the action's default.
        add_config_option(a, argparse.SUPPRESS)
        a.set_defaults(func=func, parser=a)
        return a

    a = add("list", run_list, "list the messages and their recipients, like mailq")
    a.add_argument("--state", type=_states, action="append", metavar="STATE",
                   help="only recipients in this state (repeatable, or a comma list)")
    a.add_argument("--domain", metavar="DOMAIN", help="only recipients at this domain")
    a.add_argument("--sender", metavar="ADDRESS",
                   help="only messages from this sender (<> for bounces, @domain for a domain)")
    a.add_argument("--older-than", type=_duration, metavar="DURATION",
                   help="only messages that arrived at least this long ago (e.g. 30m, 2h, 1d)")
    a.add_argument("--json", action="store_true",
                   help="one JSON object per message and line (JSON Lines)")

    a = add("show", run_show, "show one message: envelope, recipients and header")
    a.add_argument("queue_id", metavar="ID")
    g = a.add_mutually_exclusive_group()
    g.add_argument("--body", action="store_true",
                   help="write the whole message as it will be sent (raw bytes), nothing else")
    g.add_argument("--json", action="store_true", help="the envelope and header as JSON")

    a = add("flush", run_flush, "make queued and deferred recipients due now")
    a.add_argument("queue_ids", nargs="*", metavar="ID")
    g = a.add_mutually_exclusive_group()
    g.add_argument("--domain", metavar="DOMAIN", help="only recipients at this domain")
    g.add_argument("--all", action="store_true", help="every message (the default)")

    a = add("delete", run_delete, "remove messages without notice")
    a.add_argument("queue_ids", nargs="*", metavar="ID")
    a.add_argument("--all-deferred", action="store_true",
                   help="every message with a deferred recipient")

    a = add("hold", run_hold, "stop delivery attempts for messages until released")
    a.add_argument("queue_ids", nargs="+", metavar="ID")
    a = add("release", run_release, "let held messages be delivered again, now")
    a.add_argument("queue_ids", nargs="+", metavar="ID")
    a = add("requeue", run_requeue, "attempt messages again now, as if new (attempts reset)")
    a.add_argument("queue_ids", nargs="+", metavar="ID")
    a = add("bounce", run_bounce,
            "fail messages now: a delivery status notification goes to each sender")
    a.add_argument("queue_ids", nargs="+", metavar="ID")

    a = add("stats", run_stats, "counts by state and by destination domain, oldest message")
    a.add_argument("--json", action="store_true", help="as one JSON object")


class _Queue:
    """The configuration and the spool's QueueAdmin."""

    def __init__(self, args: argparse.Namespace):
        from .spool.admin import AdminError, SpoolAdmin
        self.config = load_config(getattr(args, "config", None))
        try:
            self.spool: QueueAdmin = SpoolAdmin.open(
                self.config.spool.url, hostname=self.config.server.hostname,
                lock_timeout=self.config.spool.lock_timeout)
        except AdminError as e:
            raise CommandError(f"queue: {e}") from None

    def close(self) -> None:
        self.spool.close()


def _with_queue(fn: Callable[[_Queue, argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from .spool.admin import AdminError
        q = _Queue(args)
        try:
            return fn(q, args)
        except AdminError as e:
            raise CommandError(f"queue: {e}") from None
        finally:
            q.close()
    run.__name__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


def _ids(raw: list[str]) -> list[str]:
    return list(dict.fromkeys(i.strip().upper() for i in raw if i.strip()))


def _missing(missing: tuple[str, ...]) -> int:
    """Say which ids are not in the queue; the exit status."""
    for i in missing:
        print(f"mta: queue: no such message: {i}", file=sys.stderr)
    return 1 if missing else 0


def _warn(text: str) -> None:
    print(f"mta: queue: {text}", file=sys.stderr)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# --------------------------------------------------------------------------- formatting

def format_time(t: float | None) -> str:
    if t is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def format_age(seconds: float) -> str:
    s = int(max(0, seconds))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d{h:02d}h"
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split())


def _next_text(r: ListedRecipient, now: float) -> str:
    if r.state not in ("queued", "deferred"):
        return "-"
    return "now" if r.next_attempt <= now else format_time(r.next_attempt)


def recipient_json(r: ListedRecipient) -> dict[str, Any]:
    return {"address": r.address, "state": r.state, "attempts": r.attempts,
            "next_attempt": r.next_attempt, "last_reply": r.last_reply,
            "notify": r.notify, "orcpt": r.orcpt}


def message_json(m: ListedMessage) -> dict[str, Any]:
    return {"queue_id": m.queue_id, "sender": m.sender, "arrival": m.arrival,
            "size": m.size, "client_address": m.client_address, "helo": m.helo,
            "protocol": m.protocol, "body_type": m.body_type, "smtputf8": m.smtputf8,
            "ret": m.ret, "envid": m.envid,
            "recipients": [recipient_json(r) for r in m.recipients]}


# --------------------------------------------------------------------------- list / show / stats

LIST_HEADER = ("Queue ID                   Size  Arrival              Sender\n"
               "      State      Tries  Next attempt         Recipient")


def print_list(msgs: list[ListedMessage], *, now: float, filtered: bool) -> None:
    out = sys.stdout
    if not msgs:
        print("No matching messages" if filtered else "Mail queue is empty", file=out)
        return
    print(LIST_HEADER, file=out)
    nrcpt = size = 0
    for m in msgs:
        size += m.size
        print(f"{m.queue_id:<20} {m.size:>10}  {format_time(m.arrival)}  "
              f"<{m.sender}>", file=out)
        for r in m.recipients:
            nrcpt += 1
            print(f"      {r.state:<9} {r.attempts:>6}  {_next_text(r, now):<19}  "
                  f"<{r.address}>", file=out)
            if r.last_reply:
                print(f"{'':24}({_one_line(r.last_reply)})", file=out)
    print(f"-- {_plural(len(msgs), 'message')}, {_plural(nrcpt, 'recipient')}, "
          f"{size} bytes", file=out)


@_with_queue
def run_list(q: _Queue, args: argparse.Namespace) -> int:
    now = time.time()
    states = [s for group in (args.state or []) for s in group]
    msgs = q.spool.list_messages(
        states=states or None, domain=args.domain, sender=args.sender,
        arrived_before=None if args.older_than is None else now - args.older_than)
    if args.json:
        for m in msgs:
            sys.stdout.write(json.dumps(message_json(m), sort_keys=True) + "\n")
        return 0
    filtered = bool(states or args.domain or args.sender is not None or args.older_than is not None)
    print_list(msgs, now=now, filtered=filtered)
    return 0


@_with_queue
def run_show(q: _Queue, args: argparse.Namespace) -> int:
    qid = _ids([args.queue_id])
    m = q.spool.show(qid[0]) if qid else None
    if m is None:
        raise CommandError(f"queue: no such message: {args.queue_id.strip()}")
    content_headers, body = m.headers or b"", m.body or b""
    if args.body:
        sys.stdout.flush()
        sys.stdout.buffer.write(content_headers + body)
        sys.stdout.buffer.flush()
        return 0
    headers = content_headers.decode("utf-8", "replace")
    if args.json:
        d = message_json(m)
        d.update(size_param=m.size_param, auth=m.auth, headers=headers)
        print(json.dumps(d, sort_keys=True))
        return 0
    now = time.time()
    lines = [
        f"Queue ID:   {m.queue_id}",
        f"Sender:     <{m.sender}>",
        f"Arrival:    {format_time(m.arrival)} ({format_age(now - m.arrival)} ago)",
        f"Size:       {m.size} bytes",
        f"Client:     {m.client_address} (helo {m.helo}) with {m.protocol}",
    ]
    params = [f"{k.upper()}={v}" for k, v in (("body_type", m.body_type),
                                              ("size_param", m.size_param), ("ret", m.ret),
                                              ("envid", m.envid), ("auth", m.auth))
              if v is not None]
    if m.smtputf8:
        params.append("SMTPUTF8")
    if params:
        lines.append(f"Parameters: {' '.join(params)}")
    lines.append("Recipients:")
    for r in m.recipients:
        extra = "".join(f" {k.upper()}={v}" for k, v in (("notify", r.notify),
                                                          ("orcpt", r.orcpt)) if v)
        lines.append(f"  <{r.address}> {r.state} attempts={r.attempts} "
                     f"next={_next_text(r, now)}{extra}")
        if r.last_reply:
            lines.append(f"      ({_one_line(r.last_reply)})")
    lines.append("")
    print("\n".join(lines))
    sys.stdout.write(headers.replace("\r\n", "\n"))
    return 0


@_with_queue
def run_stats(q: _Queue, args: argparse.Namespace) -> int:
    import dataclasses

    from .spool.admin import STATES
    s = q.spool.stats(now=time.time())
    if args.json:
        print(json.dumps(dataclasses.asdict(s), sort_keys=True))
        return 0
    out = [f"Messages:   {s.messages}", f"Recipients: {s.recipients}",
           f"Size:       {s.size} bytes"]
    if s.oldest_queue_id is not None and s.oldest_arrival is not None:
        out.append(f"Oldest:     {s.oldest_queue_id}, arrived "
                   f"{format_time(s.oldest_arrival)} ({format_age(s.oldest_age or 0.0)} ago)")
    out.append("")
    out.append(f"{'State':<10} {'Count':>8}")
    out.extend(f"{state:<10} {s.by_state[state]:>8}" for state in STATES)
    if s.by_domain:
        out.append("")
        width = max(24, *(len(d) for d in s.by_domain))
        out.append(f"{'Domain':<{width}} {'total':>7} "
                   + " ".join(f"{state:>9}" for state in STATES))
        for d, counts in s.by_domain.items():
            out.append(f"{d:<{width}} {counts['total']:>7} "
                       + " ".join(f"{counts[state]:>9}" for state in STATES))
    print("\n".join(out))
    return 0


# --------------------------------------------------------------------------- changes

@_with_queue
def run_flush(q: _Queue, args: argparse.Namespace) -> int:
    ids = _ids(args.queue_ids)
    if ids and (args.all or args.domain):
        args.parser.error("give queue ids, or --domain, or --all, not both")
    if ids:
        done = q.spool.flush(now=time.time(), queue_ids=ids)
    elif args.domain and _is_hold_domain(q, args.domain):
        # A hold domain's mail leaves only when released: relayed once, at
        # the daemon's next queue pass.
        done = q.spool.release_domain(args.domain, now=time.time(), how="mta queue flush")
    else:
        done = q.spool.flush(now=time.time(), domain=args.domain)
    status = _missing(done.missing)
    print(f"{_plural(done.recipients, 'recipient')} due now")
    return status


def _is_hold_domain(q: _Queue, domain: str) -> bool:
    """Is *domain* (``example.org``, ``@example.org``) one of [gateway] hold_domains?"""
    from . import domain as dom
    return dom.key(domain.strip().removeprefix("@")) in q.config.gateway.hold_domains


@_with_queue
def run_delete(q: _Queue, args: argparse.Namespace) -> int:
    ids = _ids(args.queue_ids)
    if bool(ids) == bool(args.all_deferred):
        args.parser.error("give queue ids or --all-deferred")
    done = q.spool.delete_deferred() if args.all_deferred else q.spool.delete(ids)
    status = _missing(done.missing)
    for m in done.messages:
        print(f"{m.queue_id}: deleted")
        if m.inflight:
            _warn(f"{m.queue_id}: {_plural(m.inflight, 'recipient')} in flight: "
                  "a delivery in progress may still complete")
    if args.all_deferred:
        print(f"{_plural(len(done.messages), 'message')} deleted")
    return status


def _report(done: Changed, verb: str, *, left: str | None = None) -> int:
    """One line per message changed (and a warning for its recipients in
    flight, which *left* says what became of); the exit status."""
    status = _missing(done.missing)
    for m in done.messages:
        print(f"{m.queue_id}: {verb} {_plural(m.changed, 'recipient')}")
        if m.inflight and left is not None:
            _warn(f"{m.queue_id}: {_plural(m.inflight, 'recipient')} in flight, {left}")
    return status


@_with_queue
def run_hold(q: _Queue, args: argparse.Namespace) -> int:
    return _report(q.spool.hold(_ids(args.queue_ids)), "held", left="not held")


@_with_queue
def run_release(q: _Queue, args: argparse.Namespace) -> int:
    return _report(q.spool.release(_ids(args.queue_ids), now=time.time()), "released")


@_with_queue
def run_requeue(q: _Queue, args: argparse.Namespace) -> int:
    return _report(q.spool.requeue(_ids(args.queue_ids), now=time.time()), "requeued",
                   left="not requeued")


def dsn_maker(config: Any) -> Callable[[QueuedMessage, list[QueuedRecipient], float],
                                       list[InboundMessage]]:
    """DSNs for recipients failed by the administrator, built and spooled
    exactly as the queue runner does for its failures (with NOTIFY
    respected); none for a message from ``<>``."""
    from .delivery.reports import dsn_messages, notify_allows
    from .dsn import DSNRecipient

    def make(m: QueuedMessage, rows: list[QueuedRecipient], now: float) -> list[InboundMessage]:
        if m.sender == "":
            return []
        failed = []
        for r in rows:
            if not notify_allows(r.notify, "FAILURE"):
                continue
            # Our own decision, not a reply of a remote MTA (RFC 3464 §2.3.6).
            reason = BOUNCE_REPLY.split(" ", 2)[2]
            if r.last_reply:
                reason += f"; last attempt: {_one_line(r.last_reply)}"
            failed.append(DSNRecipient(final_recipient=r.address, action="failed",
                                       status=BOUNCE_STATUS, original_recipient=r.orcpt,
                                       reason=reason))
        if not failed:
            return []
        return dsn_messages(m, {"failure": failed}, now, hostname=config.server.hostname,
                            postmaster=config.relay.postmaster)

    return make


@_with_queue
def run_bounce(q: _Queue, args: argparse.Namespace) -> int:
    done = q.spool.bounce(_ids(args.queue_ids), now=time.time(), reply=BOUNCE_REPLY,
                          make_dsns=dsn_maker(q.config))
    status = _missing(done.missing)
    for m in done.messages:
        dsn = f"DSN {', '.join(m.dsns)}" if m.dsns else "no DSN"
        print(f"{m.queue_id}: bounced {_plural(m.changed, 'recipient')} ({dsn})")
        if m.inflight:
            _warn(f"{m.queue_id}: {_plural(m.inflight, 'recipient')} in flight, left to their "
                  "delivery attempt; the message goes when they are done")
    return status
