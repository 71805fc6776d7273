"""mta.epoll: the daemon's poll loop without Twisted's per-event log context.

Every daemon test runs on it; these check it on its own, in a fresh
interpreter with the epoll reactor installed: bytes still flow both ways
over real loopback sockets, and a handler that raises is logged while the
reactor goes on serving the other connections.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

from twisted.internet.testing import MemoryReactorClock

from mta import epoll

SCRIPT = textwrap.dedent("""
    import socket, sys
    from twisted.internet import epollreactor
    epollreactor.install()
    from twisted.internet import protocol, reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver
    from mta import epoll

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    print("streamlined", epoll.streamline(reactor), flush=True)

    class Echo(protocol.Protocol):
        def dataReceived(self, data):
            if data.startswith(b"boom"):
                raise RuntimeError("handler failed")
            self.transport.write(data.upper())

    f = protocol.ServerFactory.forProtocol(Echo)
    port = reactor.listenTCP(0, f, interface="127.0.0.1")
    n = port.getHost().port

    def client():
        bad = socket.create_connection(("127.0.0.1", n))
        bad.sendall(b"boom\\r\\n")
        out = []
        for word in (b"hello", b"again"):
            s = socket.create_connection(("127.0.0.1", n))
            s.sendall(word)
            out.append(s.recv(100))
            s.close()
        print(b" ".join(out).decode(), flush=True)
        reactor.callFromThread(reactor.stop)

    reactor.callWhenRunning(reactor.callInThread, client)
    reactor.run()
""")


def test_loopback_traffic_flows_and_a_failing_handler_is_logged():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["streamlined True", "HELLO AGAIN"]
    # Twisted's own Connection.doRead catches a protocol's exception and
    # drops that connection; the reactor goes on (the two later clients).
    assert "handler failed" in out.stderr


def test_other_reactors_are_left_alone():
    reactor = MemoryReactorClock()
    before = reactor.doIteration if hasattr(reactor, "doIteration") else None
    assert epoll.streamline(reactor) is False
    assert getattr(reactor, "doIteration", None) == before
