"""/metrics in the Prometheus text format, or OpenMetrics when the scraper asks for it
(prometheus_client, one registry per server).

Read at scrape time: sessions (bound resources), client streams by transport (c2s,
websocket), s2s streams by direction. Counted as they happen: stanzas routed by kind (a
counting wrapper around Router.route: one dict increment per stanza), authentication
failures (the "auth-failed" hook event); what the limits did (server/limits.py: refused
connections, paused streams, refused and delayed authentications, addresses in their
authentication delay and limited addresses connected). Sampled: event-loop lag (a 0.5 s sleep that
overshoots) and storage latency (one primary-key read every 10 s), each the last value and the
largest since the previous scrape. Plus the process's CPU, memory and file descriptors.

With [cluster] (server/cluster), every node serves its own /metrics with a ``node`` label on
the cluster's gauges: live nodes as this node saw them at its last heartbeat, how overdue its
next heartbeat is and how many it missed, the age of its incarnation, stanzas sent to other
nodes' inboxes and received from its own, its inbox Stream's length and pending (read, not yet
acknowledged) entries (sampled from Redis every 2 s), and the size of its replica of the
directory (bare JIDs with sessions on other nodes it holds, and those sessions).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client import exposition as prometheus
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.openmetrics import exposition as openmetrics

if TYPE_CHECKING:
    from server.app import Server

_LAG_INTERVAL = 0.5
_STORAGE_INTERVAL = 10.0
_CLUSTER_INTERVAL = 2.0
_KINDS = {"{jabber:client}message": "message", "{jabber:client}presence": "presence",
          "{jabber:client}iq": "iq"}


class Metrics:
    def __init__(self, server: Server) -> None:
        self.server = server
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        ProcessCollector(namespace="presenced", registry=self.registry)
        self.stanzas: Counter[str] = Counter()
        self.auth_failures = 0
        self.loop_lag = self.loop_lag_max = 0.0
        self.storage_latency: float | None = None
        self.storage_latency_max = 0.0
        self.inbox_length: int | None = None   # XLEN of this node's inbox (None: not read)
        self.inbox_pending: int | None = None  # its entries read and not acknowledged
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        router = self.server.router
        route = router.route
        stanzas = self.stanzas

        def counting_route(stanza: Any, origin: Any) -> Any:
            stanzas[stanza.tag] += 1
            return route(stanza, origin)

        with contextlib.suppress(AttributeError):  # a router with __slots__: no counts
            router.route = counting_route  # type: ignore[method-assign]
        self.server.hooks.add("auth-failed", self._auth_failed)
        self._tasks = [asyncio.ensure_future(self._watch_loop()),
                       asyncio.ensure_future(self._watch_storage())]
        if self.server.cluster is not None:
            self._tasks.append(asyncio.ensure_future(self._watch_cluster()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    def _auth_failed(self, *_args: Any) -> None:
        self.auth_failures += 1

    async def _watch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(_LAG_INTERVAL)
            self.loop_lag = max(0.0, loop.time() - before - _LAG_INTERVAL)
            self.loop_lag_max = max(self.loop_lag_max, self.loop_lag)

    async def _watch_storage(self) -> None:
        domain = self.server.default_domain
        while True:
            started = time.perf_counter()
            try:
                await self.server.storage.accounts.exists("metrics-probe", domain)
            except Exception:
                self.storage_latency = None
            else:
                self.storage_latency = time.perf_counter() - started
                self.storage_latency_max = max(self.storage_latency_max, self.storage_latency)
            await asyncio.sleep(_STORAGE_INTERVAL)

    async def _watch_cluster(self) -> None:
        from server.cluster import keys

        cluster = self.server.cluster
        assert cluster is not None
        while True:
            stream = keys.inbox(cluster.membership.name)
            try:
                length = int(await cluster.redis.xlen(stream))
                pending = await cluster.redis.xpending(stream, keys.GROUP)
                self.inbox_length, self.inbox_pending = length, int(
                    pending.get("pending", 0) if isinstance(pending, dict) else pending[0])
            except asyncio.CancelledError:
                raise
            except Exception:  # Redis away (or the group not made yet): no sample
                self.inbox_length = self.inbox_pending = None
            await asyncio.sleep(_CLUSTER_INTERVAL)

    def render(self, accept: str) -> tuple[bytes, str]:
        """The exposition for this Accept header: (body, content type)."""
        if "application/openmetrics-text" in accept:
            return openmetrics.generate_latest(self.registry), openmetrics.CONTENT_TYPE_LATEST
        return prometheus.generate_latest(self.registry), prometheus.CONTENT_TYPE_LATEST


class _Collector:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        metrics = self.metrics
        server = metrics.server
        yield GaugeMetricFamily("presenced_sessions", "Bound client resources",
                                value=len(server.sessions))
        streams = GaugeMetricFamily("presenced_c2s_streams",
                                    "Client streams by transport (bound or not)",
                                    labels=["transport"])
        by_kind = Counter(conn.kind for conn in list(server.connections))
        for kind in ("c2s", "websocket", "bosh"):
            by_kind.setdefault(kind, 0)
        for kind, count in sorted(by_kind.items()):
            streams.add_metric([kind], count)
        yield streams
        s2s = GaugeMetricFamily("presenced_s2s_streams", "Server-to-server streams",
                                labels=["direction"])
        federation = server.federation
        s2s.add_metric(["in"], len(getattr(federation, "inbound", ()) or ()))
        s2s.add_metric(["out"], len(getattr(federation, "outbound", ()) or ()))
        yield s2s
        stanzas = CounterMetricFamily("presenced_stanzas_routed",
                                      "Stanzas routed, by kind", labels=["kind"])
        counts: Counter[str] = Counter()
        for tag, count in list(metrics.stanzas.items()):
            counts[_KINDS.get(tag, "other")] += count
        for kind in ("iq", "message", "presence"):
            stanzas.add_metric([kind], counts.get(kind, 0))
        if counts.get("other"):
            stanzas.add_metric(["other"], counts["other"])
        yield stanzas
        yield CounterMetricFamily("presenced_auth_failures", "Failed SASL authentications",
                                  value=metrics.auth_failures)
        yield from _limits(server)
        lag = GaugeMetricFamily("presenced_event_loop_lag_seconds",
                                "Event-loop lag: last sample and largest since the last scrape",
                                labels=["stat"])
        lag.add_metric(["last"], metrics.loop_lag)
        lag.add_metric(["max"], metrics.loop_lag_max)
        metrics.loop_lag_max = metrics.loop_lag
        yield lag
        storage = GaugeMetricFamily("presenced_storage_latency_seconds",
                                    "One primary-key read: last sample and largest since the "
                                    "last scrape", labels=["stat"])
        if metrics.storage_latency is not None:
            storage.add_metric(["last"], metrics.storage_latency)
            storage.add_metric(["max"], metrics.storage_latency_max)
            metrics.storage_latency_max = metrics.storage_latency
        yield storage
        if server.cluster is not None:
            yield from _cluster(metrics, server)


def _cluster(metrics: Metrics, server: Server) -> Iterator[Any]:
    cluster = server.cluster
    assert cluster is not None
    membership, node = cluster.membership, [cluster.membership.name]

    def gauge(name: str, text: str, value: float | None) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, text, labels=["node"])
        if value is not None:
            family.add_metric(node, value)
        return family

    def counter(name: str, text: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(name, text, labels=["node"])
        family.add_metric(node, value)
        return family

    yield gauge("presenced_cluster_live_nodes",
                "Live nodes of the cluster (this one included) at the last heartbeat",
                len(membership.live))
    heartbeat = membership.thread  # server/cluster/heartbeat.py
    yield gauge("presenced_cluster_heartbeat_late_seconds",
                "Seconds this node's next heartbeat is overdue (0 while on time; its key "
                "expires once this passes dead_after minus the heartbeat)", heartbeat.late())
    yield counter("presenced_cluster_heartbeats_missed",
                  "Heartbeats this node missed since it started (Redis slow or unreachable, "
                  "the process starved, paused, or its event loop hung)", heartbeat.missed)
    yield gauge("presenced_cluster_incarnation_age_seconds",
                "Seconds since this node (re)joined the cluster as its current incarnation",
                time.time() - membership.started)
    yield counter("presenced_cluster_stanzas_sent",
                  "Stanzas and commands added to other nodes' inboxes", cluster.inbox.sent)
    yield counter("presenced_cluster_stanzas_received",
                  "Stanzas and commands handed over from this node's inbox",
                  cluster.inbox.received)
    yield gauge("presenced_cluster_inbox_length", "Entries in this node's inbox Stream",
                metrics.inbox_length)
    yield gauge("presenced_cluster_inbox_pending",
                "Entries of this node's inbox read and not yet acknowledged",
                metrics.inbox_pending)
    # The directory's replica of other nodes' sessions (server/cluster/directory.py keeps it
    # as bare JID -> resource -> RemoteSession; read-only here).
    replica: dict[Any, dict[str, Any]] = getattr(cluster.directory, "_remote", {})
    yield gauge("presenced_cluster_directory_replica_jids",
                "Bare JIDs with sessions on other nodes held in this node's directory replica",
                len(replica))
    yield gauge("presenced_cluster_directory_replica_sessions",
                "Sessions on other nodes held in this node's directory replica",
                sum(len(sessions) for sessions in list(replica.values())))


def _limits(server: Server) -> Iterator[Any]:
    limiter = server.limiter
    refused = CounterMetricFamily("presenced_limit_refused_connections",
                                  "Client connections refused by a per-address limit",
                                  labels=["reason"])
    for reason in ("connections-per-ip", "unauthenticated-per-ip"):
        refused.add_metric([reason], limiter.refused.get(reason, 0))
    yield refused
    pauses = CounterMetricFamily("presenced_limit_read_pauses",
                                 "Streams paused because their read rate was used up",
                                 labels=["kind"])
    for kind in sorted({"c2s", "websocket", "bosh", "s2s-in", "component",
                        *limiter.read_pauses}):
        pauses.add_metric([kind], limiter.read_pauses.get(kind, 0))
    yield pauses
    yield CounterMetricFamily("presenced_limit_stanza_pauses",
                              "Client sessions paused because their stanza rate was used up",
                              value=limiter.stanza_pauses)
    yield CounterMetricFamily("presenced_limit_auth_refused",
                              "Authentications answered temporary-auth-failure unheard (the "
                              "address is in its delay)", value=limiter.auth_refused)
    yield CounterMetricFamily("presenced_limit_auth_delayed",
                              "Failed authentications answered late", value=limiter.auth_delayed)
    now = server.loop.time()
    yield GaugeMetricFamily("presenced_limit_blocked_addresses",
                            "Addresses in their authentication delay now",
                            value=limiter.auth_by_address.blocked(now))
    yield GaugeMetricFamily("presenced_limit_limited_addresses",
                            "Addresses (not trusted) with client connections open now",
                            value=len(limiter.connections))
