"""Memory per idle session on a fresh heap (issue 25 item 4): a fresh presenced, ten sessions in
and out first (code loaded on first use is then resident in the base), then N authenticated TLS
sessions with stream management (XEP-0198, resumable) and CSI (XEP-0352, inactive) enabled,
left idle; VmRSS of the server process before and after, divided by N. RSS is what the machine
pays and a loaded machine does not distort it; no message burst precedes the sessions, so no
freed heap hides their cost.

    python -m bench.idle_memory [--sessions 1000] [--rounds 1]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from bench import loadgen
from bench.peers import PresencedPeer, raise_nofile_limit
from bench.run import ADDRESSES, DOMAIN, PASSWORD

SM_NS = "urn:xmpp:sm:3"
CSI_NS = "urn:xmpp:csi:0"


async def _sessions(target: loadgen.Target, users: list[str]) -> list[loadgen.Client]:
    clients = await loadgen.connect_many(target, users, limit=16)
    for c in clients:
        c.send(f"<enable xmlns='{SM_NS}' resume='true'/><inactive xmlns='{CSI_NS}'/>")
    for c in clients:
        await c.expect(lambda el: el.tag == f"{{{SM_NS}}}enabled")
    return clients


async def _measure(peer: PresencedPeer, target: loadgen.Target, users: list[str],
                   warm: list[str]) -> float:
    for c in await _sessions(target, warm):
        c.close()
    await asyncio.sleep(2.0)
    base = peer.rss_kib()
    clients = await _sessions(target, users)
    await asyncio.sleep(2.0)  # idle: every read over, every write flushed
    after = peer.rss_kib()
    for c in clients:
        c.close()
    return (after - base) / len(users)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=1, help="fresh servers, one figure each")
    args = ap.parse_args(argv)
    raise_nofile_limit()
    host = ADDRESSES["presenced"]
    users = [f"idle{i:05d}" for i in range(args.sessions)]
    warm = [f"warm{i:02d}" for i in range(10)]
    target = loadgen.Target(host, 5222, DOMAIN, PASSWORD)
    for _ in range(args.rounds):
        peer = PresencedPeer(host=host, c2s_port=5222, domains=(DOMAIN,), log_level="warning")
        peer.write_accounts(DOMAIN, users + warm, PASSWORD)
        began = time.monotonic()
        peer.start()
        try:
            per = asyncio.run(_measure(peer, target, users, warm))
        finally:
            peer.stop()
        print(f"presenced: {per:.1f} KiB RSS per idle TLS session with SM and CSI "
              f"({args.sessions} sessions, {time.monotonic() - began:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
