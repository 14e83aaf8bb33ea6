"""The floor under any Python XMPP server: the per-stanza work no design can avoid.

For each stanza: feed its bytes to an incremental lxml parser (as a stream parser must), take
the completed element, serialise it again, write it to a loopback TCP socket and read it from
the other end. No routing, no TLS, no storage: what remains once everything else is free. The
inverse of its CPU time per stanza on one core is the best messages/s a Python server could
reach (each delivered message is one stanza in and one out; this counts one parse, one
serialisation and one write+read per stanza, i.e. per delivered message).
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

from lxml import etree

from bench.loadgen import BODY

HEADER = (b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
          b"xmlns:stream='http://etherx.jabber.org/streams' to='bench.test' version='1.0'>")
MESSAGE = (b"<message to='u00001@bench.test/bench' from='u00000@bench.test/bench' type='chat' "
           b"id='b42'><body>" + BODY.encode() + b"</body></message>")


@dataclass(frozen=True)
class LimitResult:
    stanzas: int
    cpu_seconds: float   # this thread's CPU time for the loop
    wall_seconds: float
    bytes_moved: int     # serialised bytes written to (and read back from) the socket
    io: bool = True

    @property
    def per_stanza_us(self) -> float:
        return self.cpu_seconds / self.stanzas * 1e6

    @property
    def stanzas_per_second(self) -> float:
        return self.stanzas / self.cpu_seconds


def _loopback_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    for s in (a, b):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return a, b


def stanza_floor(stanzas: int = 20000, message: bytes = MESSAGE, *,
                 io: bool = True) -> LimitResult:
    """Parse + serialise + socket write/read, one stanza at a time, on this thread. io=False
    leaves out the socket: the part that batching several stanzas per read or write cannot
    amortise."""
    parser = etree.XMLPullParser(events=("start", "end"), resolve_entities=False,
                                 no_network=True)
    parser.feed(HEADER)
    (_, root), = parser.read_events()
    writer, reader = _loopback_pair()
    moved = 0
    depth = 1
    try:
        wall, cpu = time.perf_counter(), time.thread_time()
        for _ in range(stanzas):
            parser.feed(message)
            for event, el in parser.read_events():
                if event == "start":
                    depth += 1
                    continue
                depth -= 1
                if depth != 1:
                    continue
                # Serialised while still in the tree, it declares the stream's namespaces
                # (detached first, lxml would invent ns0: prefixes, as a deep copy avoids).
                data = etree.tostring(el)
                root.remove(el)
                if not io:
                    moved += len(data)
                    continue
                writer.sendall(data)
                got = 0
                while got < len(data):
                    got += len(reader.recv(65536))
                moved += got
        cpu = time.thread_time() - cpu
        wall = time.perf_counter() - wall
    finally:
        writer.close()
        reader.close()
    return LimitResult(stanzas=stanzas, cpu_seconds=cpu, wall_seconds=wall, bytes_moved=moved,
                       io=io)
