"""[cluster]: one domain served by several processes sharing Redis and PostgreSQL.

Without ``redis`` the table is off and nothing of server/cluster is imported or run: one process,
no Redis, SQLite allowed. With it, ``node`` names this process among the others (unique per
process; optional with ``serve --workers``, which derives one per worker) and ``[storage]
backend`` must be "postgresql" (every node reads the one database).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from server.config.options import Invalid, option, seconds_option

_NODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_NODE_EXPECTED = "a node name (letters, digits, '.', '_', '-'; at most 64)"
_REDIS_EXPECTED = 'a "redis://host:port/db" URL'


def _redis_url(value: Any, _ctx: Any) -> str:
    if not isinstance(value, str) or "\0" in value:
        raise Invalid
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in ("redis", "rediss", "unix") or not rest:
        raise Invalid(f"not a Redis URL: {value!r}")
    return value


def _node(value: Any, _ctx: Any) -> str:
    if not isinstance(value, str) or not _NODE.fullmatch(value):
        raise Invalid
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterSettings:
    redis: str | None = field(metadata=option(_REDIS_EXPECTED, _redis_url))
    node: str | None = field(metadata=option(_NODE_EXPECTED, _node))
    # Membership: a node refreshes its key every `heartbeat` seconds; one whose key is older
    # than `dead_after` is dead (and, if it is still running, fences itself and rejoins).
    heartbeat: float = field(metadata=seconds_option(1.0))
    dead_after: float = field(metadata=seconds_option(5.0))

    @property
    def enabled(self) -> bool:
        return self.redis is not None

    @staticmethod
    def _finish(values: dict[str, Any], given: dict[str, Any],
                report: Callable[[str, str, str | None], None]) -> None:
        # node may be left out: serve --workers derives the workers' names (<host>-w1 …);
        # a plain serve refuses to start without it (server/cli.py).
        if given and "redis" not in given:
            report("redis", _REDIS_EXPECTED, "missing: [cluster] needs it")
        heartbeat, dead_after = values.get("heartbeat"), values.get("dead_after")
        if heartbeat is not None and dead_after is not None and dead_after <= 2 * heartbeat:
            report("dead_after", "more than twice heartbeat", f"{dead_after} <= 2 × {heartbeat}")


def storage_problem(values: dict[str, Any], document: dict[str, Any]) -> tuple[tuple[str, ...],
                                                                             str, str] | None:
    """A cluster shares one database: (key path, expected, problem) when [cluster] is on and
    [storage] is not PostgreSQL (the key named is [storage] backend when given, else [cluster]
    redis)."""
    cluster, storage = values.get("cluster"), values.get("storage")
    if cluster is None or storage is None or not cluster.enabled:
        return None
    if storage.backend == "postgresql":
        return None
    given = isinstance(document.get("storage"), dict) and "backend" in document["storage"]
    return (("storage", "backend") if given else ("cluster", "redis"), '"postgresql"',
            "[cluster] needs the shared PostgreSQL database, not SQLite")
