"""An LMTP client (RFC 2033): hands a message to a local LMTP server
(Dovecot's, Cyrus's) and returns one result per recipient.

``LMTPClient(reactor, "unix:/run/dovecot/lmtp", lhlo_name=...)`` and
``deliver(sender, recipients, content)`` → Deferred firing with a list of
:class:`~mta.local.result.LocalResult`, one per recipient, same order.
It never fails (cancelling it aborts the connection and fails with
CancelledError).

The conversation reuses the SMTP client's protocol
(:class:`mta.smtp.client.SMTPClientProtocol`: replies read in order, each
step with its timeout, the content dot-stuffed as it is written):

* greeting (220), ``LHLO`` (RFC 2033 §4.1; there is no HELO fallback);
* ``MAIL``, every ``RCPT`` and ``DATA`` in one write when the server
  offers PIPELINING (RFC 2033 requires it of servers), one at a time
  otherwise;
* after the final dot, **one reply per accepted recipient**, in RCPT
  order (RFC 2033 §4.2): each recipient gets its own, so a 452 for one
  recipient defers only that one and the others are delivered and never
  sent again;
* QUIT; a new connection per delivery (the server is local).

Results: a server reply is the recipient's result with ``remote`` set to
the destination.  Our own results (``remote`` None): ``451 4.4.1`` when the
server cannot be connected to, ``451 4.4.2`` when it drops the connection
or times out before a recipient got its final reply, ``451 4.5.0`` for a
protocol error.  A greeting, LHLO, MAIL or DATA reply that is not a
welcome is given to every recipient still open, as it is.  As in
SMTP (RFC 5321 §4.5.3.2.6), a connection lost after the final dot may have
delivered recipients whose reply was not read: they are deferred and sent
again.

Content checks before MAIL: an SMTPUTF8 message for a server without
SMTPUTF8 → ``553 5.6.7``; BINARYMIME content is not sent over LMTP
(``554 5.6.3``; that would need BDAT).  ``BODY=8BITMIME`` is given when the
message was declared so and the server offers 8BITMIME (local LMTP servers
take 8-bit text either way).

Destinations: ``tcp:HOST:PORT`` or ``unix:PATH`` (mta.hostport.client_endpoint,
which the configuration checks them with), connected through Twisted endpoints
(``clientFromString``) on the injected reactor.
"""
from __future__ import annotations

import re
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import clientFromString
from twisted.logger import Logger

from ..smtp.client import (ConnectFactory, Reply, SMTPClientProtocol, StepError,
                           connect_failure_text, parse_ehlo, step_failure_text)
from ..smtp.settings import Timeouts
from ..hostport import client_endpoint
from ..smtp.types import NextHop
from .result import LocalResult

log = Logger(namespace="mta.local")

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class LMTPClient:
    """Delivers messages to one LMTP server."""

    def __init__(self, reactor: Any, destination: str, *, lhlo_name: str,
                 timeouts: Timeouts = Timeouts()):
        self.reactor = reactor
        self.destination = destination
        self._endpoint = clientFromString(reactor, client_endpoint(destination))
        self.lhlo_name = lhlo_name
        self.timeouts = timeouts
        # SMTPClientProtocol names its peer by a NextHop (logs only here).
        self._hop = NextHop(host=destination, address=destination, port=0, tls="none")

    def deliver(self, sender: str, recipients: list[str], content: bytes, *,
                body_type: str | None = None, smtputf8: bool = False) -> defer.Deferred:
        """Send *content* (the stored message, CRLF line ends, not
        dot-stuffed) from *sender* ("" for ``<>``) to *recipients*."""
        return defer.ensureDeferred(self._deliver(sender, list(recipients), bytes(content),
                                                  (body_type or "").upper(), smtputf8))

    # ------------------------------------------------------------------------
    def _ours(self, code: int, status: str, detail: str) -> LocalResult:
        return LocalResult.make(code, status, detail)

    def _theirs(self, reply: Reply) -> LocalResult:
        return LocalResult(reply.code, reply.status, reply.text, self.destination)

    async def _connect(self) -> SMTPClientProtocol:
        proto = SMTPClientProtocol(self.reactor, self._hop)
        d = self._endpoint.connect(ConnectFactory(proto))
        d.addTimeout(self.timeouts.connect, self.reactor)
        await d
        return proto

    async def _deliver(self, sender: str, rcpts: list[str], content: bytes, body_type: str,
                       smtputf8: bool) -> list[LocalResult]:
        results: list[LocalResult | None] = [None] * len(rcpts)

        def fill(r: LocalResult) -> list[LocalResult]:
            return [x if x is not None else r for x in results]

        if _CONTROL.search(sender):
            return [self._ours(553, "5.1.7", "sender address has a control character")] * len(rcpts)
        for i, a in enumerate(rcpts):
            if _CONTROL.search(a):
                results[i] = self._ours(553, "5.1.3", "recipient address has a control character")
        if body_type == "BINARYMIME":
            return fill(self._ours(554, "5.6.3", "BINARYMIME content cannot be sent over LMTP"))
        t = self.timeouts
        try:
            conn = await self._connect()
        except defer.CancelledError:
            raise
        except Exception as e:
            why = connect_failure_text(e)
            log.warn("LMTP {dest}: cannot connect: {why}", dest=self.destination, why=why)
            return fill(self._ours(451, "4.4.1", f"connect to {self.destination}: {why}"))
        step = "reading the greeting"
        try:
            greeting = (await conn.command(None, [(t.greeting, step)]))[0]
            if greeting.code != 220:
                await self._quit(conn)
                return fill(self._refused(greeting, "greeting"))
            step = "sending LHLO"
            lhlo = (await conn.command(f"LHLO {self.lhlo_name}\r\n".encode(),
                                       [(t.helo, step)]))[0]
            if lhlo.code != 250:
                await self._quit(conn)
                return fill(self._refused(lhlo, "LHLO"))
            ext = parse_ehlo(lhlo)
            if smtputf8 and "SMTPUTF8" not in ext:
                await self._quit(conn)
                return fill(self._ours(553, "5.6.7", f"LMTP server {self.destination} does not "
                                                     "support SMTPUTF8"))
            params = ""
            if body_type == "8BITMIME" and "8BITMIME" in ext:
                params += " BODY=8BITMIME"
            if smtputf8:
                params += " SMTPUTF8"
            todo = [i for i, r in enumerate(results) if r is None]
            if not todo:
                await self._quit(conn)
                return [r for r in results if r is not None]
            mail = f"MAIL FROM:<{sender}>{params}\r\n".encode("utf-8")
            rcpt_lines = [f"RCPT TO:<{rcpts[i]}>\r\n".encode("utf-8") for i in todo]
            if "PIPELINING" in ext:
                step = "sending MAIL, RCPT and DATA"
                replies = await conn.command(
                    mail + b"".join(rcpt_lines) + b"DATA\r\n",
                    [(t.mail, "sending MAIL")] + [(t.rcpt, "sending RCPT")] * len(todo)
                    + [(t.data_init, "sending DATA")])
                mail_r, rcpt_rs, data_r = replies[0], replies[1:-1], replies[-1]
            else:
                step = "sending MAIL"
                mail_r = (await conn.command(mail, [(t.mail, step)]))[0]
                rcpt_rs = []
                data_r = None
                if mail_r.ok:
                    step = "sending RCPT"
                    for line in rcpt_lines:
                        rcpt_rs.append((await conn.command(line, [(t.rcpt, step)]))[0])
                    if any(r.ok for r in rcpt_rs):
                        step = "sending DATA"
                        data_r = (await conn.command(b"DATA\r\n", [(t.data_init, step)]))[0]
            if not mail_r.ok:
                if data_r is not None and data_r.code == 354:
                    conn.abort()    # it wants content for a refused transaction
                else:
                    await self._quit(conn)
                return fill(self._theirs(mail_r))
            accepted = []
            for i, r in zip(todo, rcpt_rs):
                if r.ok:
                    accepted.append(i)
                else:
                    results[i] = self._theirs(r)
            if not accepted:
                if data_r is not None and data_r.code == 354:
                    conn.abort()    # a broken server wants a message for nobody
                else:
                    await self._quit(conn)
                return [r for r in results if r is not None]
            assert data_r is not None
            if data_r.code != 354:
                await self._quit(conn)
                return fill(self._theirs(data_r))
            step = "sending message content"
            parts = [content] if content else []
            if content and not content.endswith(b"\r\n"):
                parts.append(b"\r\n")
            await conn.send_content(parts, stuff=True, block_timeout=t.data_block)
            step = "reading the replies after the end of data"
            # RFC 2033 §4.2: one reply per accepted recipient, in order; each
            # is stored as it arrives, so a later failure leaves it alone.
            for n, i in enumerate(accepted):
                data = b".\r\n" if n == 0 else None
                reply = (await conn.command(data, [(t.data_end, f"waiting for the reply for "
                                                                f"<{rcpts[i]}>")]))[0]
                results[i] = self._theirs(reply)
            await self._quit(conn)
            return [r for r in results if r is not None]
        except StepError as e:
            conn.abort()
            r = self._ours(451, *step_failure_text(self.destination, e))
            log.warn("LMTP {dest}: {text}", dest=self.destination, text=r.text)
            return fill(r)
        except defer.CancelledError:
            conn.abort()
            raise

    def _refused(self, reply: Reply, what: str) -> LocalResult:
        """A greeting or LHLO that is not a welcome: every recipient gets
        the reply (temporary when it is not a 5xx)."""
        log.warn("LMTP {dest}: {what} refused: {text}", dest=self.destination, what=what,
                 text=reply.text)
        return self._theirs(reply)

    async def _quit(self, conn: SMTPClientProtocol) -> None:
        """QUIT and wait until the connection is closed (deliver fires after)."""
        try:
            await conn.quit(self.timeouts.quit)
        except Exception:
            conn.abort()
