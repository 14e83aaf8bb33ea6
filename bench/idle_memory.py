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
import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator

from bench import loadgen
from bench.peers import PresencedPeer, cpu_seconds, raise_nofile_limit, rss_kib
from bench.run import ADDRESSES, DOMAIN, PASSWORD


class FreshServer:
    """A private presenced (one process, SQLite; or ``serve --workers N`` on a private
    PostgreSQL and Redis) with its accounts, for the memory and session-count benchmarks."""

    def __init__(self, peer: PresencedPeer, processes: int, aux_pids: Callable[[], list[int]]):
        self.peer = peer
        self.processes = processes
        self._aux_pids = aux_pids
        self.aux_base_kib = 0

    def server_pids(self) -> list[int]:
        return self.peer.server_pids()

    def rss_kib(self) -> int:
        return rss_kib(self.server_pids())

    def aux_rss_kib(self) -> int:
        """PostgreSQL's and Redis's memory (workers only)."""
        return rss_kib(self._aux_pids())

    def cpu_seconds(self) -> float:
        """presenced's, and PostgreSQL's and Redis's: all of it is the server's work."""
        return self.peer.cpu_seconds() + cpu_seconds(self._aux_pids())

    def open_files(self) -> int:
        total = 0
        for pid in self.server_pids():
            with contextlib.suppress(OSError):
                total += len(os.listdir(f"/proc/{pid}/fd"))
        return total


@contextlib.contextmanager
def fresh_presenced(host: str, port: int, users: list[str], *, workers: int = 1,
                    extra_config: str = "", log: Callable[[str], None] = print
                    ) -> Iterator[FreshServer]:
    """Started with the accounts made in bulk (password PASSWORD), stopped on the way out."""
    if workers <= 1:
        peer = PresencedPeer(host=host, c2s_port=port, domains=(DOMAIN,), log_level="warning",
                             extra_config=extra_config)
        began = time.monotonic()
        peer.write_accounts(DOMAIN, users, PASSWORD)
        log(f"presenced: {len(users)} accounts made in {time.monotonic() - began:.0f} s")
        peer.start()
        try:
            yield FreshServer(peer, 1, list)
        finally:
            peer.stop()
        return
    from bench.cluster import _redis_count
    from bench.pgcluster import PostgresCluster
    from bench.redisserver import RedisServer

    pg, redis = PostgresCluster(), RedisServer()
    try:
        pg.start()
        redis.start()
        dsn = pg.dsn(pg.create_database())
        peer = PresencedPeer(
            host=host, c2s_port=port, domains=(DOMAIN,), log_level="warning",
            extra_config=(f'{extra_config}[storage]\nbackend = "postgresql"\n'
                          f'dsn = "{dsn}"\npool_size = 4\n'
                          f'[cluster]\nredis = "{redis.url(0)}"\nnode = "bench"\n'))
        peer.serve_args = ("--workers", str(workers))
        began = time.monotonic()
        peer.write_accounts(DOMAIN, users, PASSWORD)
        log(f"presenced: {len(users)} accounts made in {time.monotonic() - began:.0f} s")
        peer.start(timeout=120.0)
        try:
            deadline = time.monotonic() + 120
            while _redis_count(redis, 0, "HLEN presenced:nodes") < workers:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"not all {workers} workers joined the cluster")
                time.sleep(0.2)
            server = FreshServer(peer, workers, lambda: [
                *pg.pids(), *([redis.pid] if redis.pid is not None else [])])
            server.aux_base_kib = server.aux_rss_kib()
            yield server
        finally:
            peer.stop()
    finally:
        redis.stop()
        pg.stop()


SM_NS = "urn:xmpp:sm:3"
CSI_NS = "urn:xmpp:csi:0"


async def _sessions(target: loadgen.Target, users: list[str]) -> list[loadgen.Client]:
    clients = await loadgen.connect_many(target, users, limit=16)
    for c in clients:
        c.send(f"<enable xmlns='{SM_NS}' resume='true'/><inactive xmlns='{CSI_NS}'/>")
    for c in clients:
        await c.expect(lambda el: el.tag == f"{{{SM_NS}}}enabled")
    return clients


async def _measure(peer: FreshServer, target: loadgen.Target, users: list[str],
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
        began = time.monotonic()
        with fresh_presenced(host, 5222, users + warm, log=lambda _line: None) as server:
            per = asyncio.run(_measure(server, target, users, warm))
        print(f"presenced: {per:.1f} KiB RSS per idle TLS session with SM and CSI "
              f"({args.sessions} sessions, {time.monotonic() - began:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
