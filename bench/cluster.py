"""One domain on several nodes (issue 22): what the cluster costs per message, and what a second
worker process gives.

    python -m bench.cluster [--quick] [--pairs 50] [--window 32] [--duration 8] [--procs 1]
                            [--variants single,same,cross,workers1,workers2]

Side by side in one run, each variant on a fresh database of one private PostgreSQL (fsync off)
and a fresh Redis database, 1:1 messages between online users at saturation (bench.run's
messages scenario: `pairs` sender/receiver pairs, `window` messages in flight each), archiving
off as in bench.run (like with like; bench.mam_messages measures the archive):

- single: one `presenced serve`, no [cluster] (the single-process default, on PostgreSQL);
- same: two nodes (127.0.0.30 and .31) with [cluster], both ends of every pair on node 1;
- cross: the same two nodes, senders on node 1, receivers on node 2 (every message goes through
  node 2's Redis Stream);
- workers1 / workers2: `presenced serve --workers N` on one address (SO_REUSEPORT spreads the
  connections), delivered messages per second at saturation with the generator's CPU beside.

Server CPU counts every presenced process, PostgreSQL's and Redis's. The ratios the issue sets:
same-node within 15% of single (CPU per message), cross-node at most 2.5x same-node, 2 workers
at least 1.5x the throughput of 1 where the generator leaves a core free (on a 2-core machine it
does not: the generator's cores are shown so that the reader can judge).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

from bench import loadgen
from bench.peers import PresencedPeer, cpu_seconds
from bench.pgcluster import PostgresCluster
from bench.redisserver import RedisServer
from bench.run import DOMAIN, NO_ARCHIVE, PASSWORD, Fleet, pairs, split

NODES = ("127.0.0.30", "127.0.0.31")
VARIANTS = ("single", "same", "cross", "workers1", "workers2")


@dataclass(frozen=True)
class Params:
    pairs: int = 50
    window: int = 32
    warmup: float = 2.0
    duration: float = 8.0
    procs: int = 1
    variants: tuple[str, ...] = VARIANTS

    @classmethod
    def quick(cls) -> Params:
        return cls(pairs=4, window=8, warmup=0.3, duration=1.0)

    @property
    def users(self) -> list[str]:
        return [f"u{i:05d}" for i in range(2 * self.pairs)]


class Group:
    """The processes whose CPU is the server's: presenced nodes, PostgreSQL, Redis (duck-typed
    as a Peer for Fleet.run, which reads cpu_seconds)."""

    def __init__(self, nodes: list[PresencedPeer], pg: PostgresCluster,
                 redis: RedisServer | None) -> None:
        self.nodes, self.pg, self.redis = nodes, pg, redis

    def cpu_seconds(self) -> float:
        pids = [p for node in self.nodes for p in node.pid_tree()] + self.pg.pids()
        if self.redis is not None and self.redis.pid is not None:
            pids.append(self.redis.pid)
        return cpu_seconds(pids)


def _config(dsn: str, redis: str | None, node: str | None) -> str:
    text = f'{NO_ARCHIVE}[storage]\nbackend = "postgresql"\ndsn = "{dsn}"\npool_size = 10\n'
    if redis is not None:
        text += f'[cluster]\nredis = "{redis}"\n'
        if node is not None:
            text += f'node = "{node}"\n'
    return text


def _redis_count(redis: RedisServer, db: int, command: str) -> int:
    """A RESP integer reply (e.g. HLEN presenced:nodes), without a client library."""
    with socket.create_connection((redis.host, redis.port), 2) as sock:
        sock.sendall(f"SELECT {db}\r\n{command}\r\n".encode())
        reply = b""
        while reply.count(b"\r\n") < 2:
            chunk = sock.recv(256)
            if not chunk:
                break
            reply += chunk
    return int(reply.split(b"\r\n")[1].lstrip(b":") or 0)


def run_variant(name: str, p: Params, fleet: Fleet, pg: PostgresCluster, redis: RedisServer,
                db: int, log: Any = print) -> dict[str, Any]:
    dsn = pg.dsn(pg.create_database())
    url = redis.url(db)
    if name == "single":
        nodes = [PresencedPeer(host=NODES[0], domains=(DOMAIN,),
                               extra_config=_config(dsn, None, None))]
    elif name in ("same", "cross"):
        nodes = [PresencedPeer(host=host, domains=(DOMAIN,),
                               extra_config=_config(dsn, url, f"node{i + 1}"))
                 for i, host in enumerate(NODES)]
    else:
        workers = int(name.removeprefix("workers"))
        node = PresencedPeer(host=NODES[0], domains=(DOMAIN,),
                             extra_config=_config(dsn, url, "bench"))
        node.serve_args = ("--workers", str(workers))
        nodes = [node]
    group = Group(nodes, pg, None if name == "single" else redis)
    nodes[0].write_accounts(DOMAIN, p.users, PASSWORD)
    try:
        for node in nodes:
            node.start()
        if name.startswith("workers"):
            expected = int(name.removeprefix("workers"))
            deadline = time.monotonic() + 30
            while _redis_count(redis, db, "HLEN presenced:nodes") < expected:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name}: not every worker joined the cluster")
                time.sleep(0.2)
        target = loadgen.Target(NODES[0], 5222, DOMAIN, PASSWORD)
        extra: dict[str, Any] = {"window": p.window}
        if name == "cross":
            extra["receivers_at"] = asdict(loadgen.Target(NODES[1], 5222, DOMAIN, PASSWORD))
        shards = split(fleet, "pairs", pairs(p.users, p.pairs), **extra)
        window = fleet.run("messages", group, target, shards, p.warmup, p.duration)  # type: ignore[arg-type]
        delivered = sum(r["delivered"] for r in window.results)
        if delivered == 0:
            raise RuntimeError(f"{name}: no message was delivered")
        log(f"{name}: {delivered} delivered in {window.seconds:.1f} s")
        return {"per_s": delivered / window.seconds,
                "cpu_us": window.server_cpu / delivered * 1e6,
                "cores": window.server_cpu / window.seconds,
                "generator_cores": window.generator_cpu / window.seconds}
    finally:
        for node in nodes:
            node.stop()


def table(p: Params, results: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'variant':<9} {'delivered/s':>12} {'server CPU µs/msg':>18} {'ratio':>16} "
             f"{'cores server/gen':>17}", "-" * 76]
    base = {"same": "single", "cross": "same", "workers2": "workers1"}
    for name, r in results.items():
        if "error" in r:
            lines.append(f"{name:<9} {r['error']}")
            continue
        ratio = ""
        ref = results.get(base.get(name, ""), {})
        if "cpu_us" in ref and name in ("same", "cross"):
            ratio = f"CPU {r['cpu_us'] / ref['cpu_us']:.2f}x {base[name]}"
        elif "per_s" in ref and name == "workers2":
            ratio = f"rate {r['per_s'] / ref['per_s']:.2f}x w1"
        lines.append(f"{name:<9} {r['per_s']:>12,.0f} {r['cpu_us']:>18.1f} {ratio:>16} "
                     f"{r['cores']:>8.2f} / {r['generator_cores']:.2f}")
    lines.append(f"({p.pairs} pairs, {p.window} in flight each, {p.duration:g} s measured, "
                 f"{p.procs} generator process(es); server CPU = presenced + PostgreSQL + Redis;"
                 f" load average {os.getloadavg()[0]:.2f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    for field in ("pairs", "window", "procs"):
        ap.add_argument(f"--{field}", type=int)
    for field in ("warmup", "duration"):
        ap.add_argument(f"--{field}", type=float)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args(argv)
    p = Params.quick() if args.quick else Params()
    p = replace(p, variants=tuple(args.variants.split(",")), **{
        k: getattr(args, k) for k in ("pairs", "window", "procs", "warmup", "duration")
        if getattr(args, k) is not None})
    unknown = set(p.variants) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants: {', '.join(sorted(unknown))}")
    pg, redis = PostgresCluster().start(), RedisServer().start()
    fleet = Fleet(p.procs)
    results: dict[str, dict[str, Any]] = {}
    try:
        for db, name in enumerate(p.variants):
            try:
                results[name] = run_variant(name, p, fleet, pg, redis, db)
            except Exception as exc:
                results[name] = {"error": f"error: {exc}"[:300]}
                print(f"{name}: {exc}", file=sys.stderr)
    finally:
        fleet.close()
        redis.stop()
        pg.stop()
    print(table(p, results))
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
