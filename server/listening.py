"""The flags every TCP listener of the server is opened with (c2s, s2s, components, HTTP).

``presenced serve --workers N`` runs N processes of one machine behind the same ports: each
worker calls ``share_ports()`` before its server starts, and its listeners then set SO_REUSEPORT
(the kernel spreads new connections over the processes). A process of its own keeps the port to
itself: a second server started by mistake on the same address fails with "address in use"
instead of silently taking half of the connections.
"""

from __future__ import annotations

_shared = False


def share_ports() -> None:
    """This process is one of several workers behind the same listening ports."""
    global _shared
    _shared = True


def ports_shared() -> bool:
    """reuse_port of every listener (loop.create_server, aiohttp's TCPSite)."""
    return _shared
