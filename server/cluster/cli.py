"""`presenced cluster status`: the nodes of the cluster, their age, sessions and rooms, from
Redis."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from server.cluster.membership import status
from server.config import load_config
from server.xml.numbers import NumberError, parse_int


def add_command(sub: Any, common: argparse.ArgumentParser) -> None:
    """The `cluster` command and its subcommands, on the CLI's subparsers."""
    cluster = sub.add_parser("cluster", help="a cluster's nodes ([cluster])",
                             description="a cluster's nodes ([cluster])")
    cluster_sub = cluster.add_subparsers(dest="cluster_command", required=True,
                                         metavar="COMMAND")
    show = cluster_sub.add_parser(
        "status", parents=[common],
        help="list the nodes: alive, age, heartbeat, sessions, rooms, beats missed",
        description="list every node that joined the cluster of this configuration's "
                    "[cluster] redis: whether it is alive, its age, the age of its last "
                    "heartbeat, its sessions, the MUC rooms it holds and the heartbeats it "
                    "missed since its process started")
    show.add_argument("--json", action="store_true", help="one JSON object per node")
    show.set_defaults(run=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    from server.cli import CLIError
    from server.cluster import connect

    config = load_config(args.config)
    if config.cluster.redis is None:
        raise CLIError("no [cluster] in the configuration (its redis key is not set)")

    async def run() -> list[dict[str, Any]]:
        redis = connect(config.cluster.redis)  # type: ignore[arg-type]
        try:
            return await status(redis)
        finally:
            await redis.aclose()

    try:
        nodes = asyncio.run(run())
    except OSError as exc:
        raise CLIError(f"Redis at {config.cluster.redis} is not reachable: {exc}") from None
    except Exception as exc:
        if type(exc).__module__.startswith("redis"):
            raise CLIError(f"Redis at {config.cluster.redis}: {exc}") from None
        raise
    if args.json:
        for node in nodes:
            print(json.dumps(node))
        return 0
    print(f"{'NODE':<20} {'STATE':<6} {'AGE':>10} {'HEARTBEAT':>10} {'SESSIONS':>9} "
          f"{'ROOMS':>7} {'MISSED':>7}  INCARNATION")
    for node in nodes:
        beat = node["heartbeat_age"]
        print(f"{node['node']:<20} {'alive' if node['alive'] else 'dead':<6} "
              f"{_duration(node['age']):>10} {'-' if beat is None else f'{beat:.1f}s':>10} "
              f"{node['sessions']:>9} {node['rooms']:>7} {node['missed']:>7}  "
              f"{node['incarnation']}")
    return 0


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


MIN_REDIS = (6, 2)  # Streams with consumer groups, and XAUTOCLAIM (server/cluster/inbox.py)


async def probe(url: str, timeout: float = 5.0) -> str | None:
    """Why the Redis of [cluster] cannot be used (not reachable, refuses us, too old), or None:
    for presenced check."""
    from server.cluster import connect

    redis = connect(url)
    try:
        info = await asyncio.wait_for(redis.info("server"), timeout)
    except TimeoutError:
        return f"Redis at {url} did not answer within {timeout:.0f} s"
    except OSError as exc:
        return f"Redis at {url} is not reachable: {exc}"
    except Exception as exc:  # redis.exceptions.*: connection refused, auth, unknown db
        from redis import exceptions
        if isinstance(exc, exceptions.AuthenticationError | exceptions.ResponseError):
            return f"Redis at {url} refuses us: {exc}"
        if isinstance(exc, exceptions.RedisError):
            return f"Redis at {url} is not reachable: {exc}"
        raise
    finally:
        await redis.aclose()
    version = str(info.get("redis_version", "0"))
    try:
        parts = tuple(parse_int(p, maximum=100000, name="version") for p in version.split(".")[:2])
    except NumberError:
        parts = (0,)
    if parts < MIN_REDIS:
        return (f"Redis at {url} is version {version}: the cluster needs "
                f"{'.'.join(map(str, MIN_REDIS))} or later")
    return None
