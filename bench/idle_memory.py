"""Memory per idle session on a fresh heap (issue 25 item 4): a fresh presenced, ten sessions in
and out first (code loaded on first use is then resident in the base), then N authenticated TLS
sessions with stream management (XEP-0198, resumable) and CSI (XEP-0352, inactive) enabled,
left idle; VmRSS of the server process before and after, divided by N. RSS is what the machine
pays and a loaded machine does not distort it; no message burst precedes the sessions, so no
freed heap hides their cost.

    python -m bench.idle_memory [--sessions 1000] [--rounds 1] [--tls]

--tls adds the share of it that is OpenSSL's, measured in this process (no server): N server
TLSLayers (server/stream/tls.py) after a TLS 1.3 handshake and a stanza each way, idle, as
glibc's malloc counts the bytes in use (mallinfo2), once with the stdlib's client (the
loadgen's, OpenSSL of the system: X25519) and once with a pyOpenSSL client (the OpenSSL that
cryptography bundles, which offers the X25519MLKEM768 hybrid that current clients use), and
what SSL_new alone allocates. No Python object of ours can shrink that part.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import os
import ssl
import sys
import tempfile
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


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _malloc_in_use() -> int:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    return int(libc.mallinfo2().uordblks)


def tls_share(sessions: int) -> list[str]:
    """KiB of malloc per idle server TLS session (see the module's docstring), one line each."""
    from OpenSSL import SSL
    from OpenSSL._util import ffi, lib

    from server.certs import generate_self_signed
    from server.stream.tls import TLSLayer, server_context

    with tempfile.TemporaryDirectory() as tmp:
        cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        generate_self_signed([DOMAIN], cert, key)
        context = server_context(cert, key)  # type: ignore[arg-type]
    stdlib = loadgen.client_context()
    bundled = SSL.Context(SSL.TLS_CLIENT_METHOD)

    def handshake(server: TLSLayer, to_server: Callable[[], bytes],
                  from_server: Callable[[bytes], object], done: Callable[[], bool]) -> None:
        for _ in range(8):
            if done():
                break
            data = to_server()
            if data:
                _plain, out = server.receive(data)
                if out:
                    from_server(out)

    def stdlib_pair() -> tuple[TLSLayer, object]:
        server = TLSLayer(context)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        client = stdlib.wrap_bio(incoming, outgoing)

        def step() -> bool:
            try:
                client.do_handshake()
            except ssl.SSLWantReadError:
                return False
            return True

        handshake(server, lambda: (step(), outgoing.read())[1], incoming.write,
                  lambda: server.handshake_done and not outgoing.pending)
        client.write(b"<presence/>")
        plain, out = server.receive(outgoing.read())
        assert plain == b"<presence/>", plain
        incoming.write(out + server.send(b"<presence/>"))
        assert client.read(64) == b"<presence/>"
        return server, client

    def bundled_pair() -> tuple[TLSLayer, object]:
        server = TLSLayer(context)
        client = SSL.Connection(bundled, None)
        client.set_connect_state()

        def pending() -> bytes:
            with contextlib.suppress(SSL.WantReadError):
                client.do_handshake()
            try:
                return client.bio_read(65536)
            except SSL.WantReadError:
                return b""

        handshake(server, pending, client.bio_write, lambda: False)
        client.sendall(b"<presence/>")
        plain, out = server.receive(client.bio_read(65536))
        assert plain == b"<presence/>", plain
        client.bio_write(out + server.send(b"<presence/>"))
        assert client.recv(64) == b"<presence/>"
        return server, client

    lines = []
    for name, pair in (("stdlib client", stdlib_pair), ("pyOpenSSL client", bundled_pair)):
        for _ in range(10):
            pair()  # code and caches loaded first
        gc.collect()
        before = _malloc_in_use()
        pairs = [pair() for _ in range(sessions)]
        servers = [server for server, _client in pairs]
        del pairs
        gc.collect()
        per = (_malloc_in_use() - before) / sessions / 1024
        group = ffi.string(lib.SSL_get0_group_name(servers[0]._conn._ssl)).decode()
        lines.append(f"OpenSSL ({SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()}): "
                     f"{per:.1f} KiB malloc per idle {servers[0].version} server session, "
                     f"{name}, key exchange {group} ({sessions} sessions)")
        del servers
        gc.collect()
    before = _malloc_in_use()
    bare = [TLSLayer(context) for _ in range(sessions)]
    per = (_malloc_in_use() - before) / sessions / 1024
    del bare
    lines.append(f"OpenSSL: {per:.1f} KiB malloc per TLSLayer before any byte (SSL_new, two "
                 f"memory BIOs)")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=1, help="fresh servers, one figure each")
    ap.add_argument("--tls", action="store_true",
                    help="also OpenSSL's share, measured in this process")
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
    if args.tls:
        for line in tls_share(args.sessions):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
