"""Writing the SMTP server's replies to the socket at once (the one place
that looks inside Twisted's TCP transport).

``transport.write`` only buffers: the bytes go out in the reactor's next
iteration, after an ``epoll_ctl`` that registers the socket for writing
and before another that removes it -- two system calls and a pass through
the reactor for every SMTP reply, each of which fits in the socket's send
buffer anyway.  :func:`write` sends at once when nothing is buffered
before the data (so the order of the bytes cannot change), and hands
``transport.write`` whatever is left: the part the socket did not take, or
everything when the transport is not a plain TCP or Unix connection with
an empty buffer (TLS, a pull producer, a closing or an unknown transport,
a send that failed -- Twisted then sees the failure itself and closes the
connection as it always does).  A streaming producer (the SMTP server
registers itself) is still paused by ``transport.write`` when what is left
piles up.

Two writes in one reactor turn (a ``250``, then the ``221`` of a
pipelined QUIT) would otherwise meet Nagle's algorithm: the second waits
for the peer's delayed ACK (40 ms).  (The SMTP client does not write
eagerly: its content and final dot are such a pair, and with
``TCP_NODELAY`` it measured no faster -- README "Benchmarks".)  So a
protocol that writes eagerly calls :func:`connected` from its
``connectionMade``, which sets ``TCP_NODELAY``.
"""
from __future__ import annotations

import socket
from typing import Any

from twisted.internet import tcp

_TCP = (socket.AF_INET, socket.AF_INET6)


def connected(transport: Any) -> None:
    """A new connection that :func:`write` will write to: no Nagle delay."""
    if isinstance(transport, tcp.Connection) and transport.socket.family in _TCP:
        try:
            transport.setTcpNoDelay(True)
        except OSError:
            pass


def write(transport: Any, data: bytes) -> None:
    """*data* to *transport*: sent now where it can be, else buffered."""
    if (isinstance(transport, tcp.Connection) and not transport.TLS
            and transport.connected and not transport.disconnecting
            and not transport._writeDisconnected and not transport._aborting
            and (transport.producer is None or transport.streamingProducer)
            and not transport._tempDataLen and transport.offset == len(transport.dataBuffer)):
        sent = transport.writeSomeData(data)
        if not isinstance(sent, int):
            sent = 0              # lost: transport.write buffers, doWrite finds out
        if sent >= len(data):
            return
        data = data[sent:]
    transport.write(data)
