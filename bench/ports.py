"""Free TCP ports for servers that tests and benchmarks start, and may start again on the same
port (a restart after kill -9, Redis brought back).

A port the kernel hands out for ``bind(0)`` or an outgoing connection comes from the
ephemeral range (Linux: 32768-60999), so between a server's death and its restart any client
socket may take it. These come from below that range, from a block of its own per
pytest-xdist worker (``PYTEST_XDIST_WORKER``: gw0, gw1, ...), walked from a random start, each
checked by binding it: the workers of one run never pick the same port, and another run on
the machine rarely does (and is caught by the bind).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import socket

_FIRST = 10_000  # above the well-known ports the tests and peers use (5222, 5269, 5432, 6379)
_BLOCK = 1_500
_BLOCKS = 15  # 10,000 + 15 * 1,500 = 32,500 < 32,768
_next: dict[int, int] = {}


def _block() -> int:
    found = re.fullmatch(r"gw(\d+)", os.environ.get("PYTEST_XDIST_WORKER", ""))
    # not under xdist: the last block, shared with other runs (the bind check catches them)
    return int(found[1]) % (_BLOCKS - 1) if found else _BLOCKS - 1


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Distinct ports nothing listens on (or is bound to) at `host` right now."""
    block = _block()
    base = _FIRST + block * _BLOCK
    offset = _next.get(block, random.randrange(_BLOCK))
    chosen: list[int] = []
    with contextlib.ExitStack() as stack:
        for _ in range(_BLOCK):
            port = base + offset % _BLOCK
            offset += 1
            sock = stack.enter_context(socket.socket())
            try:
                sock.bind((host, port))
            except OSError:
                continue
            chosen.append(port)
            if len(chosen) == count:
                break
    _next[block] = offset % _BLOCK
    if len(chosen) < count:
        raise OSError(f"no {count} free ports at {host} in {base}-{base + _BLOCK - 1}")
    return chosen


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]
