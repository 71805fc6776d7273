"""mta.smtp.eager: a reply goes to the socket at once when nothing is
buffered before it, never out of order, and what the socket does not take
is left to Twisted's buffer.  A real loopback TCP connection under Twisted's
own TCP transport, with a MemoryReactor for its reader/writer registrations
(so nothing runs a reactor: what the peer has is what was sent at once)."""
from __future__ import annotations

import socket

import pytest
from twisted.internet import protocol, tcp
from twisted.internet.testing import MemoryReactor, StringTransport

from mta.smtp import eager


@pytest.fixture
def pair():
    """(our transport, the peer's socket, the memory reactor)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        peer = socket.create_connection(listener.getsockname())
        ours, addr = listener.accept()
    ours.setblocking(False)
    peer.settimeout(5)
    reactor = MemoryReactor()
    transport = tcp.Server(ours, protocol.Protocol(), addr, None, 1, reactor)
    yield transport, peer, reactor
    peer.close()
    ours.close()


def received(peer: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = peer.recv(n - len(out))
        assert chunk, out
        out += chunk
    return out


def test_sent_at_once_without_the_reactor(pair):
    transport, peer, reactor = pair
    eager.connected(transport)
    assert transport.getTcpNoDelay()
    eager.write(transport, b"250 2.0.0 Ok\r\n")
    assert received(peer, 14) == b"250 2.0.0 Ok\r\n"
    assert transport not in reactor.getWriters()      # nothing left for doWrite


def test_behind_buffered_data_it_waits_its_turn(pair):
    transport, peer, reactor = pair
    transport.write(b"first\r\n")                     # buffered: the reactor would send it
    eager.write(transport, b"second\r\n")
    assert transport in reactor.getWriters()
    peer.setblocking(False)
    with pytest.raises(BlockingIOError):
        peer.recv(100)                                # not "second" before "first"
    peer.settimeout(5)
    transport.doWrite()
    assert received(peer, 15) == b"first\r\nsecond\r\n"


def test_what_the_socket_does_not_take_is_buffered_in_order(pair):
    transport, peer, reactor = pair
    data = bytes(range(256)) * 40000                  # ~10 MB: more than the socket takes
    eager.write(transport, data)
    assert transport in reactor.getWriters()
    got = b""
    while len(got) < len(data):
        transport.doWrite()
        peer.settimeout(0.5)
        try:
            got += peer.recv(1 << 20)
        except TimeoutError:
            pass
    assert got == data


def test_a_closing_transport_is_left_to_twisted(pair):
    transport, peer, reactor = pair
    transport.write(b"221 2.0.0 Bye\r\n")
    transport.loseConnection()
    eager.write(transport, b"late\r\n")               # buffered behind it, as Twisted would
    transport.doWrite()
    assert received(peer, 21) == b"221 2.0.0 Bye\r\nlate\r\n"


def test_other_transports_just_write():
    t = StringTransport()
    eager.connected(t)
    eager.write(t, b"220 mx ESMTP\r\n")
    assert t.value() == b"220 mx ESMTP\r\n"
