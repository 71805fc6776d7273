"""The client side of the SMTP conversation over one connected
:class:`mta.smtp.client.SMTPClientProtocol` (the module docstring of
mta.smtp.client describes it and its choices): :class:`ClientSession` --
greeting, EHLO/HELO, STARTTLS, AUTH, what the next hop can take, the
transactions of a message within the hop's recipient limit -- and
:class:`TLSPolicy`, which TLS a hop gets.  Driven by mta.smtp.pool (and by
ATRN over a turned-around connection).
"""
from __future__ import annotations

import base64
import re
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from twisted.logger import Logger

from .. import domain
from .client import (DeadConnection, DeliveryResult, HopFailure, OutboundMessage,
                     OutboundRecipient, RecipientResult, Reply, SMTPClientProtocol, StepError,
                     StepLost, StepTimeout, TLSFailed, hop_name, parse_ehlo, step_failure_text)
from .content import Content
from .downgrade import DowngradeError
from .settings import Timeouts
from .types import NextHop, reply_kind

log = Logger(namespace="mta.smtp")

_PARAM_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e\u0080-\U0010ffff]+")  # esmtp-value (+ UTF-8)


def _step_failure(hop: NextHop, e: StepError) -> HopFailure:
    status, text = step_failure_text(hop_name(hop), e)
    return HopFailure.ours(hop, status, text)


def _is_limit_reply(r: Reply) -> bool:
    """A "too many recipients" reply (RFC 5321 §4.5.3.1.10): 452, enhanced
    status 4.5.3 or none."""
    return r.code == 452 and r.status in ("4.5.3", "4.0.0")


def _over_limit(replies: list[Reply]) -> int | None:
    """Where the next hop's recipient limit cut the RCPT replies of a
    transaction: k when ``replies[k]`` is a "too many recipients" 452 and
    every later reply is a 452, with k > 0 (a 452 for the first recipient is
    a real deferral); None when the limit was not reached."""
    k = len(replies)
    while k > 0 and replies[k - 1].code == 452:
        k -= 1
    while k < len(replies) and not _is_limit_reply(replies[k]):
        k += 1
    return k if 0 < k < len(replies) else None


def _refused_at_once(results: list[RecipientResult]) -> bool:
    """The first recipient of a transaction got a "too many recipients" 452
    from the next hop, and every other one a 452 too."""
    return bool(results) and all(r.code == 452 and r.remote is not None for r in results) and (
        results[0].status in ("4.5.3", "4.0.0"))


def _orcpt_for_ascii(orcpt: str) -> str:
    """An ORCPT with a utf-8 address as ``utf-8-addr-xtext`` (RFC 6533)."""
    atype, _, addr = orcpt.partition(";")
    out = []
    for ch in addr:
        o = ord(ch)
        if o > 126 or o < 33 or ch in "+=\\":
            out.append(f"\\x{{{o:X}}}")
        else:
            out.append(ch)
    return f"{atype};{''.join(out)}"


def _auth_mechanisms(ext: dict[str, str]) -> list[str]:
    """SASL mechanisms from EHLO: ``AUTH PLAIN LOGIN`` and the old ``AUTH=LOGIN`` form."""
    words = ext.get("AUTH", "").upper().split()
    for key, value in ext.items():
        if key.startswith("AUTH="):
            words += f"{key[5:]} {value}".upper().split()
    return words


#: How a session gets a new started connection to a hop (ConnectionPool._open).
Reopen = Callable[[NextHop, bool], Awaitable["SMTPClientProtocol"]]


class TLSPolicy:
    """The outbound TLS policy (see the module docstring): the policy a next
    hop gets -- ``NextHop.tls``, but credentials make ``may`` behave as
    ``encrypt`` and ``starttls=False`` turns ``may`` into ``none`` -- and
    the client TLS options for it: ``tls_options`` (else an unverified
    context) for ``may``/``encrypt``, ``optionsForClientTLS`` against
    ``trust_root`` (else the system's) for ``verify``."""

    def __init__(self, *, starttls: bool = True, tls_options: Any = None,
                 trust_root: Any = None) -> None:
        self.starttls = starttls
        self._tls_options = tls_options
        self.trust_root = trust_root
        self._verify_options: dict[str, Any] = {}      # host -> optionsForClientTLS

    def policy(self, hop: NextHop) -> str:
        """The TLS policy applied to ``hop``: credentials require TLS."""
        policy = hop.tls
        if hop.auth is not None and policy == "may":
            policy = "encrypt"
        if policy == "may" and not self.starttls:
            policy = "none"
        return policy

    def options(self, hop: NextHop, policy: str = "may") -> Any:
        if policy == "verify":
            options = self._verify_options.get(hop.host)
            if options is None:
                from twisted.internet import ssl
                trust = self.trust_root if self.trust_root is not None else ssl.platformTrust()
                options = ssl.optionsForClientTLS(hop.host, trustRoot=trust)
                if len(self._verify_options) >= 1000:
                    self._verify_options.clear()
                self._verify_options[hop.host] = options
            return options
        if self._tls_options is None:
            from twisted.internet import ssl
            # Opportunistic and unauthenticated: no CA, no verification.
            self._tls_options = ssl.CertificateOptions(verify=False)
        return self._tls_options


class ClientSession:
    """The client side of the SMTP conversation over one connected
    SMTPClientProtocol, whoever connected it: the pool's ``connectTCP``, or
    any transport a protocol was attached to (a connection turned around,
    as ATRN needs).

    ``start(conn, hop, use_tls)``: greeting, EHLO/HELO, STARTTLS as the
    :class:`TLSPolicy` says, AUTH.  ``send(conn, hop, msg, content, reused,
    use_tls, reopen)``: every recipient of the message, in as many
    transactions as the next hop's recipient limit needs; when the
    connection closes before every recipient was sent, ``reopen(hop,
    use_tls)`` gives a new started connection (None: the rest are deferred).

    The connection's owner gets it back through two callables: ``release``
    (ready for another transaction) and ``quit`` (to be closed with QUIT).
    """

    def __init__(self, *, helo_name: str, timeouts: Timeouts, tls: TLSPolicy,
                 release: Callable[[SMTPClientProtocol], None],
                 quit: Callable[[SMTPClientProtocol], None]) -> None:
        self.helo_name = helo_name
        self.timeouts = timeouts
        self.tls = tls
        self.release = release
        self.quit = quit

    async def start(self, conn: SMTPClientProtocol, hop: NextHop,
                    use_tls: bool) -> SMTPClientProtocol:
        """Greeting, EHLO/HELO, STARTTLS (as the TLS policy says for *hop*;
        not when *use_tls* is false) and AUTH (``hop.auth``) on the freshly
        connected *conn*.  Raises HopFailure (or TLSFailed: a failed
        handshake under policy ``may``, to be tried again without TLS)."""
        t = self.timeouts
        try:
            greeting = (await conn.command(
                None, [(t.greeting, "receiving the initial server greeting")]))[0]
            if greeting.code != 220:
                self.quit(conn)
                raise HopFailure.from_reply(hop, greeting, permanent_ok=True)
            await self._hello(conn, hop)
            policy = self.tls.policy(hop)
            required = policy in ("encrypt", "verify")
            if use_tls and "STARTTLS" in conn.extensions and hasattr(conn.transport, "startTLS"):
                r = (await conn.command(b"STARTTLS\r\n", [(t.helo, "sending STARTTLS")]))[0]
                if r.code == 220:
                    conn.tls_verified = policy == "verify"
                    conn.start_tls(self.tls.options(hop, policy))
                    conn.extensions = {}
                    try:
                        await self._hello(conn, hop)
                    except (StepLost, StepTimeout) as e:
                        if conn.tls_pending or getattr(e, "tls_failed", False):
                            conn.abort()
                            why = (getattr(e, "reason", "") or
                                   ("timed out" if isinstance(e, StepTimeout) else ""))
                            if required:
                                raise self._tls_policy_failure(
                                    hop, policy, f"TLS handshake failed"
                                                 f"{f' ({why})' if why else ''}") from None
                            raise TLSFailed(why) from None
                        raise
                elif required:
                    self.quit(conn)
                    raise self._tls_policy_failure(hop, policy, f"STARTTLS refused: {r.text}")
            elif required:
                self.quit(conn)
                offered = "STARTTLS" in conn.extensions
                raise self._tls_policy_failure(
                    hop, policy, "STARTTLS not offered" if not offered else
                    "TLS not possible on this transport")
            if hop.auth is not None:
                if not conn.tls:
                    # Only reachable with policy "none": never send the password in clear.
                    self.quit(conn)
                    raise self._tls_policy_failure(hop, policy,
                                                   "not sending the password without TLS")
                try:
                    await self._authenticate(conn, hop)
                except HopFailure as e:
                    e.tls = conn.tls_info
                    raise
        except StepError as e:
            conn.abort()
            raise _step_failure(hop, e) from None
        return conn

    async def _hello(self, conn: SMTPClientProtocol, hop: NextHop) -> None:
        t = self.timeouts
        name = (self.helo_name if self.helo_name.isascii()
                else domain.to_ascii(self.helo_name)).encode("ascii")
        r = (await conn.command(b"EHLO " + name + b"\r\n", [(t.helo, "sending EHLO")]))[0]
        if r.ok:
            conn.esmtp = True
            conn.extensions = parse_ehlo(r)
            return
        if reply_kind(r.code) != "permanent":
            self.quit(conn)
            raise HopFailure.from_reply(hop, r, permanent_ok=False)
        r = (await conn.command(b"HELO " + name + b"\r\n", [(t.helo, "sending HELO")]))[0]
        if not r.ok:
            self.quit(conn)
            raise HopFailure.from_reply(hop, r, permanent_ok=True)
        conn.esmtp = False
        conn.extensions = {}

    def _tls_policy_failure(self, hop: NextHop, policy: str, why: str) -> HopFailure:
        text = f"TLS is required (policy {policy}) with {hop_name(hop)}: {why}"
        log.warn("{hop}: TLS policy {policy} not met: {why}", hop=hop_name(hop),
                 policy=policy, why=why)
        return HopFailure.ours(hop, "4.7.5", text)

    async def _authenticate(self, conn: SMTPClientProtocol, hop: NextHop) -> None:
        """AUTH PLAIN (or LOGIN) with ``hop.auth``; raises HopFailure unless accepted."""
        t = self.timeouts
        cred = hop.auth
        assert cred is not None
        mechanisms = _auth_mechanisms(conn.extensions)
        user, password = cred.user.encode("utf-8"), cred.password.encode("utf-8")
        step = [(t.helo, "authenticating")]
        if "PLAIN" in mechanisms:
            mech = "PLAIN"
            token = base64.b64encode(b"\0" + user + b"\0" + password)
            r = (await conn.command(b"AUTH PLAIN " + token + b"\r\n", step))[0]
        elif "LOGIN" in mechanisms:
            mech = "LOGIN"
            r = (await conn.command(b"AUTH LOGIN\r\n", step))[0]
            for secret in (user, password):
                if r.code != 334:
                    break
                r = (await conn.command(base64.b64encode(secret) + b"\r\n", step))[0]
        else:
            self.quit(conn)
            offered = " ".join(mechanisms) or "no AUTH"
            raise HopFailure.ours(hop, "4.7.0", f"{hop_name(hop)} offers no AUTH mechanism we "
                                   f"use (PLAIN, LOGIN): {offered}")
        if r.ok:
            log.debug("{hop}: authenticated as {user} ({mech})", hop=hop_name(hop),
                      user=cred.user, mech=mech)
            return
        if r.code == 334:
            # More challenges than the mechanism has: cancel (RFC 4954 "*").
            try:
                await conn.command(b"*\r\n", step)
            except StepError:
                conn.abort()
            else:
                self.quit(conn)
            raise HopFailure.ours(hop, "4.7.0", f"unexpected AUTH {mech} dialogue with "
                                   f"{hop_name(hop)}: {r.text}")
        self.quit(conn)
        if reply_kind(r.code) != "permanent":
            raise HopFailure.from_reply(hop, r, permanent_ok=False)
        status = "4.7.8" if r.code == 535 else "4" + r.status[1:]
        why = f"login as {cred.user} to {hop_name(hop)} (AUTH {mech}) rejected: {r.text}"
        log.error("SMARTHOST LOGIN REJECTED: {hop} refused user {user} (AUTH {mech}): {reply}; "
                  "mail for it is deferred, not bounced; check the credentials in the "
                  "configuration", hop=hop_name(hop), user=cred.user, mech=mech, reply=r.text)
        raise HopFailure.ours(hop, status, why, final=True, login_rejected=True)

    def _local_check(self, conn: SMTPClientProtocol, msg: OutboundMessage,
                     content: Content) -> tuple[int, str, str] | Content:
        """The content to send to this hop (converted to 7 bits when it
        needs that), or our refusal (code, status, text)."""
        ext = conn.extensions
        if self._needs_utf8(msg) and "SMTPUTF8" not in ext:
            return (553, "5.6.7", f"SMTPUTF8 is required, but was not offered by host "
                                  f"{hop_name(conn.hop)}")
        if content.binary and not ("BINARYMIME" in ext and "CHUNKING" in ext):
            return (554, "5.6.3", f"message has binary content (BINARYMIME) the next hop "
                                  f"{hop_name(conn.hop)} does not accept (CHUNKING and "
                                  f"BINARYMIME) and it could not be converted: binary content "
                                  f"is never converted")
        if content.eightbit and "8BITMIME" not in ext:
            try:
                content = content.seven_bit()
            except DowngradeError as e:
                return (554, "5.6.3", f"message has 8-bit content the next hop does not accept "
                                      f"(8BITMIME) and it could not be converted: {e}")
            log.info("{queue_id}: {hop} does not offer 8BITMIME: 8-bit content converted to "
                     "7 bits", queue_id=msg.queue_id, hop=hop_name(conn.hop))
        limit = ext.get("SIZE", "").strip()
        if "SIZE" in ext and limit.isdigit() and 0 < int(limit) < content.size:
            return (552, "5.3.4", "Message too big for next hop")
        return content

    @staticmethod
    def _needs_utf8(msg: OutboundMessage) -> bool:
        return msg.smtputf8 or not msg.sender.isascii() or not all(
            r.address.isascii() for r in msg.recipients)

    def _mail_line(self, conn: SMTPClientProtocol, msg: OutboundMessage,
                   content: Content) -> bytes:
        ext = conn.extensions
        params: list[str] = []
        if "SIZE" in ext:
            params.append(f"SIZE={content.size}")
        if content.binary:
            params.append("BODY=BINARYMIME")
        elif "8BITMIME" in ext:
            if content.eightbit or content.declared_8bit:
                params.append("BODY=8BITMIME")
            elif (msg.body_type or "").upper() == "7BIT":
                params.append("BODY=7BIT")
        if "SMTPUTF8" in ext and self._needs_utf8(msg):
            params.append("SMTPUTF8")
        if "DSN" in ext:
            if msg.ret and _PARAM_VALUE.fullmatch(msg.ret):
                params.append(f"RET={msg.ret}")
            if msg.envid and _PARAM_VALUE.fullmatch(msg.envid) and msg.envid.isascii():
                params.append(f"ENVID={msg.envid}")
        line = f"MAIL FROM:<{msg.sender}>" + "".join(" " + p for p in params) + "\r\n"
        return line.encode("utf-8")

    def _rcpt_line(self, conn: SMTPClientProtocol, msg: OutboundMessage,
                   rcpt: OutboundRecipient, utf8: bool) -> bytes:
        params: list[str] = []
        if "DSN" in conn.extensions:
            if rcpt.notify and _PARAM_VALUE.fullmatch(rcpt.notify):
                params.append(f"NOTIFY={rcpt.notify}")
            if rcpt.orcpt:
                orcpt = rcpt.orcpt
                if not orcpt.isascii() and not utf8:
                    orcpt = _orcpt_for_ascii(orcpt)
                if _PARAM_VALUE.fullmatch(orcpt):
                    params.append(f"ORCPT={orcpt}")
        line = f"RCPT TO:<{rcpt.address}>" + "".join(" " + p for p in params) + "\r\n"
        return line.encode("utf-8")

    async def send(self, conn: SMTPClientProtocol, hop: NextHop, msg: OutboundMessage,
                   content: Content, reused: bool, use_tls: bool,
                   reopen: Reopen | None = None) -> DeliveryResult:
        """Every recipient of *msg* to *hop* over *conn*, in as many
        transactions as the next hop's recipient limit needs (RFC 5321
        §4.5.3.1.10): recipients refused with a "too many recipients" 452
        after the first one are sent at once in a further transaction, on
        the same connection (a new one to the same hop if it was closed),
        and the limit is remembered for the connection."""
        dsn = "DSN" in conn.extensions
        tls = conn.tls_info
        local = self._local_check(conn, msg, content)
        if isinstance(local, Content):
            content = local
        else:
            self.release(conn)
            return DeliveryResult(self._local_results(msg.recipients, local), hop, dsn, tls)
        n = len(msg.recipients)
        results: list[RecipientResult | None] = [None] * n
        pending = list(range(n))
        first = True
        while True:
            limit = conn.rcpt_limit
            batch = pending[:limit] if limit else pending
            part = msg if len(batch) == n else replace(
                msg, recipients=[msg.recipients[i] for i in batch])
            try:
                got, over, clean = await self._transaction(conn, hop, part, content,
                                                           reused and first)
            except HopFailure as e:
                if first:
                    raise
                # Earlier transactions of this delivery have their results:
                # the others get this failure, never another hop's attempt
                # (which would duplicate what was delivered).
                for i in pending:
                    results[i] = e.result(msg.recipients[i].address)
                break
            first = False
            for j, i in enumerate(batch):
                results[i] = got[j]
            if over:
                took = len(batch) - len(over)
                if conn.rcpt_limit is None or took < conn.rcpt_limit:
                    conn.rcpt_limit = took
                    log.info("{queue_id}: {hop} takes {n} recipients per transaction; sending "
                             "the other {left} in further transactions", queue_id=msg.queue_id,
                             hop=hop_name(hop), n=took, left=len(pending) - took)
            pending = [batch[j] for j in over] + pending[len(batch):]
            if pending and _refused_at_once(got):
                # Not a recipient of this transaction was taken: the next hop
                # takes no more now (a per-connection or rate limit).  The
                # rest wait for the next attempt instead of one refused
                # transaction each.
                for i in pending:
                    results[i] = RecipientResult(
                        msg.recipients[i].address, 452, got[0].status,
                        f"452 {got[0].status} not sent: {hop_name(hop)} took no more "
                        f"recipients ({got[0].text})")
                pending = []
            if clean and conn._early:
                conn.abort()            # the server said more than it was asked
                clean = False
            if not pending:
                if clean:
                    self.release(conn)
                break
            if clean:
                continue
            # The connection is gone: one new connection to the same hop for the rest.
            limit = conn.rcpt_limit
            failure: HopFailure | None = None
            try:
                if reopen is None:
                    raise HopFailure.ours(hop, "4.4.2", f"connection with {hop_name(hop)} "
                                           "closed before every recipient was sent")
                conn = await reopen(hop, use_tls)
            except HopFailure as e:
                failure = e
            except TLSFailed as e:
                failure = HopFailure.ours(hop, "4.4.2", f"TLS handshake with {hop_name(hop)} "
                                           f"failed ({e.reason or 'no reason given'})")
            if failure is not None:
                for i in pending:
                    results[i] = failure.result(msg.recipients[i].address)
                break
            conn.rcpt_limit = limit
            local = self._local_check(conn, msg, content)
            if isinstance(local, Content):
                content = local
            else:
                self.release(conn)
                for i, rr in zip(pending, self._local_results(
                        [msg.recipients[i] for i in pending], local)):
                    results[i] = rr
                break
        final = [r for r in results if r is not None]
        assert len(final) == n
        return DeliveryResult(final, hop, dsn, tls)

    @staticmethod
    def _local_results(rcpts: list[OutboundRecipient],
                       local: tuple[int, str, str]) -> list[RecipientResult]:
        code, status, text = local
        return [RecipientResult(r.address, code, status, f"{code} {status} {text}")
                for r in rcpts]

    async def _transaction(self, conn: SMTPClientProtocol, hop: NextHop, msg: OutboundMessage,
                           content: Content, reused: bool
                           ) -> tuple[list[RecipientResult], list[int], bool]:
        """One transaction: (a result per recipient, the positions of the
        recipients refused for the recipient limit, whether the connection
        is ready for another MAIL).  Raises HopFailure when the hop did not
        take the message (MAIL refused, connection lost or timed out)."""
        t = self.timeouts
        pipelining = "PIPELINING" in conn.extensions
        use_bdat = content.binary
        utf8 = "SMTPUTF8" in conn.extensions and self._needs_utf8(msg)
        mail = self._mail_line(conn, msg, content)
        rcpts = [self._rcpt_line(conn, msg, r, utf8) for r in msg.recipients]
        n = len(rcpts)
        mail_step = (t.mail, "sending MAIL FROM")
        rcpt_step = (t.rcpt, "sending RCPT TO")
        data_step = (t.data_init, "sending DATA")
        data_reply: Reply | None = None
        try:
            if pipelining:
                steps = [mail_step] + [rcpt_step] * n
                data = mail + b"".join(rcpts)
                if not use_bdat:
                    steps.append(data_step)
                    data += b"DATA\r\n"
                try:
                    replies = await conn.command(data, steps)
                except StepLost as e:
                    if reused and e.got == 0:
                        raise DeadConnection() from None
                    raise
                mail_reply = replies[0]
                if reused and mail_reply.code == 421:
                    raise DeadConnection()
                rcpt_replies = replies[1:1 + n]
                if not use_bdat:
                    data_reply = replies[-1]
                if not mail_reply.ok:
                    if data_reply is not None and data_reply.code == 354:
                        conn.write(b".\r\n")   # a broken server wants a message: give it nothing
                    self.quit(conn)
                    raise HopFailure.from_reply(hop, mail_reply, permanent_ok=True)
            else:
                try:
                    mail_reply = (await conn.command(mail, [mail_step]))[0]
                except StepLost:
                    if reused:
                        raise DeadConnection() from None
                    raise
                if reused and mail_reply.code == 421:
                    raise DeadConnection()
                if not mail_reply.ok:
                    self.quit(conn)
                    raise HopFailure.from_reply(hop, mail_reply, permanent_ok=True)
                rcpt_replies = []
                for line in rcpts:
                    rep = (await conn.command(line, [rcpt_step]))[0]
                    rcpt_replies.append(rep)
                    if _is_limit_reply(rep) and _over_limit(rcpt_replies) is not None:
                        break       # the limit is reached: the rest go in another transaction

            results = [RecipientResult(r.address, rep.code, rep.status, rep.text, hop)
                       for r, rep in zip(msg.recipients, rcpt_replies)]
            k = _over_limit(rcpt_replies)
            over = list(range(k, n)) if k is not None else []
            for r in msg.recipients[len(results):]:     # not sent (the limit was reached)
                results.append(RecipientResult(
                    r.address, 452, "4.5.3", f"452 4.5.3 not sent: the recipient limit of "
                    f"{hop_name(hop)} was reached"))
            accepted = [i for i, rep in enumerate(rcpt_replies) if rep.ok]
            if not accepted:
                if data_reply is not None and data_reply.code == 354:
                    # RFC 2920 §3.1: all RCPTs failed but DATA was accepted.
                    await conn.command(b".\r\n", [(t.data_end, "sending end of data")])
                return results, over, await self._rset(conn)

            if use_bdat:
                conn.write(f"BDAT {content.size} LAST\r\n".encode())
                await conn.send_content(content.parts, stuff=False, block_timeout=t.data_block)
                final = (await conn.command(None, [(t.data_end, "sending end of data")]))[0]
            else:
                if data_reply is None:
                    data_reply = (await conn.command(b"DATA\r\n", [data_step]))[0]
                if data_reply.code != 354:
                    for i in accepted:
                        results[i] = RecipientResult(msg.recipients[i].address, data_reply.code,
                                                     data_reply.status, data_reply.text, hop)
                    return results, over, await self._rset(conn)
                await conn.send_content(content.parts, stuff=True, block_timeout=t.data_block)
                final = (await conn.command(b".\r\n", [(t.data_end, "sending end of data")]))[0]
        except StepError as e:
            conn.abort()
            raise _step_failure(hop, e) from None
        for i in accepted:
            results[i] = RecipientResult(msg.recipients[i].address, final.code, final.status,
                                         final.text, hop)
        conn.transactions += 1
        if final.code == 421:
            self.quit(conn)
            return results, over, False
        return results, over, conn.usable

    async def _rset(self, conn: SMTPClientProtocol) -> bool:
        """RSET; True when the connection can take another transaction (else it is closed)."""
        try:
            r = (await conn.command(b"RSET\r\n", [(self.timeouts.helo, "sending RSET")]))[0]
        except StepError:
            conn.abort()
            return False
        if r.ok:
            return conn.usable
        self.quit(conn)
        return False
