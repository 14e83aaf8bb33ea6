"""Side-by-side benchmark: presenced, Prosody and ejabberd on loopback with the same parameters.

    python -m bench.run [--servers presenced,prosody,ejabberd] [--quick] [--pairs P] ...
    python -m bench.run --storage    # presenced on SQLite and on PostgreSQL: logins, offline

For each server in turn: start it on its own 127.0.0.N address, create the accounts (and the
rosters the presence scenario needs), run the scenarios, stop it. Then one table: one row per
figure, per server the absolute value and its ratio to Prosody's. Server CPU is read from
/proc (utime+stime of the server's process tree) over the measured window only, after a
warm-up; the generator's own CPU is shown next to it, since both share the machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from multiprocessing.connection import Connection
from typing import Any

from bench import loadgen
from bench.limit import LimitResult, stanza_floor
from bench.peers import (
    EjabberdPeer,
    Peer,
    PresencedPeer,
    ProsodyPeer,
    cpu_seconds,
    raise_nofile_limit,
)

SERVERS = ("presenced", "prosody", "ejabberd")
# Only when asked for (--servers, --storage): presenced on a private PostgreSQL cluster.
# presenced-limits: presenced with every [limits] accounting on (the cost of the limits).
OPTIONAL_SERVERS = ("presenced-pg", "presenced-limits")
ADDRESSES = {"presenced": "127.0.0.20", "prosody": "127.0.0.21", "ejabberd": "127.0.0.22",
             "presenced-pg": "127.0.0.23", "presenced-limits": "127.0.0.24"}
SCENARIOS = ("memory", "logins", "messages", "latency", "presence")
# Only when asked for: messages to users who are offline (each one stored).
OPTIONAL_SCENARIOS = ("offline",)
STORAGE_COMPARISON = (("presenced", "presenced-pg"), ("logins", "offline"))
DOMAIN = "bench.test"
PASSWORD = "bench-password"


@dataclass
class Params:
    servers: tuple[str, ...] = SERVERS
    scenarios: tuple[str, ...] = SCENARIOS
    procs: int = 1              # generator processes
    warmup: float = 2.0         # seconds excluded before each measurement
    duration: float = 8.0       # measured seconds per scenario
    clients: int = 32           # logins: concurrent clients
    pairs: int = 50             # 1:1 throughput: sender/receiver pairs
    window: int = 32            # ... messages in flight per pair
    latency_pairs: int = 10     # latency: pairs
    rate: float = 1000.0        # ... total messages/s
    users: int = 200            # presence: users online
    contacts: int = 10          # ... 'both' contacts each (even)
    presence_cap: int = 500     # ... notifications in flight per generator process
    idle: int = 1000            # memory: idle sessions
    limit_stanzas: int = 50000  # limit row: stanzas processed
    fresh: bool = True          # a freshly started server (same data) for each scenario

    @classmethod
    def quick(cls) -> Params:
        """CI smoke mode: a few seconds per server, nothing meaningful about speed."""
        return cls(warmup=0.3, duration=1.0, clients=4, pairs=4, window=16, latency_pairs=2,
                   rate=200.0, users=12, contacts=4, presence_cap=40, idle=20,
                   limit_stanzas=2000)

    @property
    def general_accounts(self) -> list[str]:
        count = max(2 * self.pairs, 2 * self.latency_pairs, self.clients, self.idle, 2)
        return [f"u{i:05d}" for i in range(count)]

    @property
    def fanout_accounts(self) -> list[str]:
        return [f"f{i:05d}" for i in range(self.users)]


# -- generator processes ------------------------------------------------------------------------


def shard(items: Sequence[Any], parts: int) -> list[list[Any]]:
    """Contiguous, nearly equal slices (ring neighbours stay in one process)."""
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        out.append(list(items[start:end]))
        start = end
    return out


@dataclass
class Window:
    """What happened between the end of warm-up and the end of a measurement."""

    seconds: float
    server_cpu: float
    generator_cpu: float
    results: list[dict[str, Any]]
    at_warm: Any = None


class Fleet:
    """Generator worker processes (bench.loadgen.worker_main), driven in lock step."""

    def __init__(self, procs: int) -> None:
        self.procs = procs
        self.conns: list[Connection] = []
        self.processes: list[multiprocessing.process.BaseProcess] = []
        self._spawn()

    def _spawn(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        for _ in range(self.procs):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=loadgen.worker_main, args=(child,), daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.processes.append(proc)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes if p.pid is not None]

    def _recv(self, conn: Connection, timeout: float) -> tuple[Any, ...]:
        if not conn.poll(timeout):
            raise TimeoutError(f"generator silent for {timeout:.0f} s")
        message: tuple[Any, ...] = conn.recv()
        return message

    def run(self, op: str, peer: Peer, target: loadgen.Target,
            shards: list[dict[str, Any] | None],
            warmup: float, duration: float, *, on_warm: Callable[[], Any] | None = None,
            setup_timeout: float = 300.0) -> Window:
        """One op on every generator with a shard; server and generator CPU are sampled at the
        end of warm-up and at the end."""
        try:
            return self._run(op, peer, target, shards, warmup, duration, on_warm,
                             setup_timeout)
        except (TimeoutError, EOFError, OSError):
            self.close()  # out of step with us: start afresh for the next op
            self._spawn()
            raise

    def _run(self, op: str, peer: Peer, target: loadgen.Target,
             shards: list[dict[str, Any] | None], warmup: float, duration: float,
             on_warm: Callable[[], Any] | None, setup_timeout: float) -> Window:
        active = [(conn, params) for conn, params in zip(self.conns, shards, strict=False)
                  if params is not None]
        for conn, params in active:
            conn.send(("op", op, asdict(target), params))
        replies = [self._recv(conn, setup_timeout) for conn, _ in active]
        failed = [r[1] for r in replies if r[0] == "error"]
        ready = [conn for (conn, _), r in zip(active, replies, strict=True) if r[0] == "ready"]
        if failed:
            now = time.monotonic()
            for conn in ready:
                conn.send(("go", now, now, now))
            for conn in ready:
                self._recv(conn, 60.0)
            raise RuntimeError(f"{op}: generator failed:\n{failed[0]}")
        start = time.monotonic() + 0.05
        warm, end = start + warmup, start + warmup + duration
        for conn in ready:
            conn.send(("go", start, warm, end))
        time.sleep(max(0.0, warm - time.monotonic()))
        cpu0, gen0, t0 = peer.cpu_seconds(), cpu_seconds(self.pids), time.monotonic()
        at_warm = on_warm() if on_warm is not None else None
        time.sleep(max(0.0, end - time.monotonic()))
        cpu1, gen1, t1 = peer.cpu_seconds(), cpu_seconds(self.pids), time.monotonic()
        results = [self._recv(conn, setup_timeout) for conn in ready]
        errors = [r[1] for r in results if r[0] == "error"]
        if errors:
            raise RuntimeError(f"{op}: generator failed:\n{errors[0]}")
        return Window(seconds=t1 - t0, server_cpu=cpu1 - cpu0, generator_cpu=gen1 - gen0,
                      results=[r[1] for r in results], at_warm=at_warm)

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(("quit",))
        for proc in self.processes:
            proc.join(5)
            if proc.is_alive():
                proc.kill()  # our own child, by its handle
                proc.join()
        for conn in self.conns:
            conn.close()
        self.conns, self.processes = [], []


# -- scenarios ----------------------------------------------------------------------------------


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def split(fleet: Fleet, key: str, items: Sequence[Any],
          **extra: Any) -> list[dict[str, Any] | None]:
    """Each generator's parameters: its slice of items under key (None: nothing to do)."""
    return [dict(extra, **{key: part}) if part else None
            for part in shard(items, len(fleet.conns))]


def scenario_memory(p: Params, peer: Peer, fleet: Fleet, target: loadgen.Target,
                    out: dict[str, Any]) -> None:
    users = p.general_accounts[:p.idle]
    # Warm-up: sessions in and out, so that code loaded on first use is resident at the base.
    fleet.run("idle", peer, target, split(fleet, "users", users[:10]), 0.2, 0.0)
    time.sleep(max(1.0, p.warmup))
    base = peer.rss_kib()
    window = fleet.run("idle", peer, target, split(fleet, "users", users), 1.5, 0.2,
                       on_warm=peer.rss_kib)
    sessions = sum(r["sessions"] for r in window.results)
    out["rss_base_mib"] = base / 1024
    out["rss_idle_mib"] = window.at_warm / 1024
    out["rss_per_session_kib"] = (window.at_warm - base) / sessions


def scenario_logins(p: Params, peer: Peer, fleet: Fleet, target: loadgen.Target,
                    out: dict[str, Any]) -> None:
    shards = split(fleet, "users", p.general_accounts[:p.clients])
    for s in shards:
        if s is not None:
            s["concurrency"] = len(s["users"])
    window = fleet.run("logins", peer, target, shards, p.warmup, p.duration)
    count = sum(r["count"] for r in window.results)
    errors = sum(r["errors"] for r in window.results)
    if count == 0:
        first = next((r["first_error"] for r in window.results if r["first_error"]), "")
        raise RuntimeError(f"no login completed ({errors} errors: {first})")
    durations = sorted(d for r in window.results for d in r["durations"])
    out["logins_per_s"] = count / window.seconds
    out["login_cpu_ms"] = window.server_cpu / count * 1000
    out["login_p50_ms"] = _percentile(durations, 0.5) * 1000
    out["login_errors"] = errors
    out["logins_cpu"] = (window.server_cpu / window.seconds, window.generator_cpu / window.seconds)


def pairs(users: list[str], count: int) -> list[tuple[str, str]]:
    return [(users[2 * i], users[2 * i + 1]) for i in range(count)]


def scenario_messages(p: Params, peer: Peer, fleet: Fleet, target: loadgen.Target,
                      out: dict[str, Any]) -> None:
    shards = split(fleet, "pairs", pairs(p.general_accounts, p.pairs), window=p.window)
    window = fleet.run("messages", peer, target, shards, p.warmup, p.duration)
    delivered = sum(r["delivered"] for r in window.results)
    out["msgs_delivered"] = delivered
    if delivered == 0:
        raise RuntimeError("no message was delivered")
    out["msgs_per_s"] = delivered / window.seconds
    out["cpu_per_1000"] = window.server_cpu / delivered * 1000
    out["msgs_cpu"] = (window.server_cpu / window.seconds, window.generator_cpu / window.seconds)


def scenario_latency(p: Params, peer: Peer, fleet: Fleet, target: loadgen.Target,
                     out: dict[str, Any]) -> None:
    shards = split(fleet, "pairs", pairs(p.general_accounts, p.latency_pairs))
    busy = [s for s in shards if s is not None]
    for s in busy:
        s["rate"] = p.rate / len(busy)
    window = fleet.run("latency", peer, target, shards, p.warmup, p.duration)
    samples = sorted(x / 1000 for r in window.results for x in r["latencies_us"])
    if not samples:
        raise RuntimeError("no message was delivered")
    out["lat_p50"] = _percentile(samples, 0.5)
    out["lat_p99"] = _percentile(samples, 0.99)
    out["lat_delivered"] = len(samples)


def scenario_presence(p: Params, peer: Peer, fleet: Fleet, target: loadgen.Target,
                      out: dict[str, Any]) -> None:
    if out.get("presence_unsupported"):
        raise _NotApplicable(out["presence_unsupported"])
    shards = split(fleet, "users", p.fanout_accounts, contacts=p.contacts,
                   cap=max(p.presence_cap, 2 * p.contacts))
    window = fleet.run("presence", peer, target, shards, p.warmup, p.duration)
    delivered = sum(r["delivered"] for r in window.results)
    if delivered == 0:
        raise RuntimeError("no presence notification was delivered")
    out["presence_per_s"] = delivered / window.seconds
    out["presence_cpu"] = (window.server_cpu / window.seconds,
                           window.generator_cpu / window.seconds)


def scenario_offline(p: Params, peer: Peer, fleet: Fleet, target: loadgen.Target,
                     out: dict[str, Any]) -> None:
    accounts = p.general_accounts
    senders, recipients = accounts[:p.pairs], accounts[p.pairs:]
    shards = split(fleet, "senders", senders, recipients=recipients, batch=p.window)
    window = fleet.run("offline", peer, target, shards, p.warmup, p.duration)
    stored = sum(r["stored"] for r in window.results)
    errors = sum(r["errors"] for r in window.results)
    if stored <= 0 or errors:  # nothing is refused below the quota of 1000 per account
        raise RuntimeError(f"{max(stored, 0)} messages stored, {errors} refused")
    out["offline_per_s"] = stored / window.seconds
    out["offline_cpu_ms"] = window.server_cpu / stored * 1000
    out["offline_cpu"] = (window.server_cpu / window.seconds,
                          window.generator_cpu / window.seconds)


class _NotApplicable(Exception):
    pass


RUNNERS: dict[str, Callable[[Params, Peer, Fleet, loadgen.Target, dict[str, Any]], None]] = {
    "memory": scenario_memory,
    "logins": scenario_logins,
    "messages": scenario_messages,
    "latency": scenario_latency,
    "presence": scenario_presence,
    "offline": scenario_offline,
}


# -- one server ---------------------------------------------------------------------------------


NO_ARCHIVE = '[mam]\ndefault = "never"\n'
# Loopback is not trusted, so every read and stanza goes through its buckets and every
# connection and login through the per-address counts; the limits are high enough never to
# bite (the load comes from one address): what is measured is their accounting.
LIMITS_ON = ("[limits]\ntrusted = []\nmax_connections_per_ip = 1000000\n"
             "max_unauthenticated_per_ip = 1000000\nc2s_read_rate = 1000000000\n"
             "c2s_read_burst = 1000000000\nstanza_rate = 1000000000\n"
             "stanza_burst = 1000000000\nauth_failures_free = 1000000\n")


def make_peer(kind: str, host: str, port: int = 5222) -> Peer:
    if kind == "prosody":
        return ProsodyPeer(host=host, c2s_port=port, domains=(DOMAIN,))
    if kind == "ejabberd":
        return EjabberdPeer(host=host, c2s_port=port, domains=(DOMAIN,),
                            in_band_registration=True)
    # Like with like: Prosody and ejabberd run here without a message archive, so presenced
    # does too (its default archives every message); bench/mam_messages.py compares all three
    # with archiving on.
    if kind in ("presenced", "presenced-limits"):
        return PresencedPeer(host=host, c2s_port=port, domains=(DOMAIN,),
                             extra_config=NO_ARCHIVE + (LIMITS_ON if kind.endswith("limits")
                                                        else ""))
    if kind == "presenced-pg":
        from bench.pg import PostgresPresencedPeer

        return PostgresPresencedPeer(host=host, c2s_port=port, domains=(DOMAIN,),
                                     extra_config=NO_ARCHIVE)
    raise ValueError(kind)


def prepare_accounts(peer: Peer, target: loadgen.Target, users: list[str]) -> None:
    """Before start where files can be written directly; in-band (XEP-0077) otherwise."""
    if isinstance(peer, ProsodyPeer | PresencedPeer):
        if not peer.running:
            peer.write_accounts(DOMAIN, users, PASSWORD)
        return
    if peer.running:
        asyncio.run(loadgen.register_inband(target, users))


def run_server(kind: str, p: Params, fleet: Fleet, log: Callable[[str], None] = print,
               host: str | None = None, port: int = 5222) -> dict[str, Any]:
    """All scenarios against one server; figures (or "error: ..." strings) by key."""
    host = host or ADDRESSES[kind]
    peer = make_peer(kind, host, port)
    target = loadgen.Target(host, port, DOMAIN, PASSWORD)
    users = p.general_accounts + (p.fanout_accounts if "presence" in p.scenarios else [])
    out: dict[str, Any] = {}
    began = time.monotonic()
    prepare_accounts(peer, target, users)
    peer.start()
    try:
        prepare_accounts(peer, target, users)
        log(f"{kind}: up with {len(users)} accounts in {time.monotonic() - began:.1f} s")
        used = kind == "ejabberd"  # registration sessions came and went
        if "presence" in p.scenarios:
            t = time.monotonic()
            try:
                asyncio.run(loadgen.make_rosters(target, p.fanout_accounts, p.contacts))
                log(f"{kind}: rosters of {p.users} users x {p.contacts} contacts in "
                    f"{time.monotonic() - t:.1f} s")
            except loadgen.Unsupported as exc:
                out["presence_unsupported"] = str(exc)
            used = True
        for name in p.scenarios:
            if used and p.fresh:
                # No heap, caches or garbage left over from the scenario before: the order of
                # scenarios does not change the figures.
                peer.restart()
            used = True
            t = time.monotonic()
            try:
                RUNNERS[name](p, peer, fleet, target, out)
            except _NotApplicable as exc:
                out[f"{name}_error"] = f"n/a: {exc}"
            except Exception as exc:
                out[f"{name}_error"] = f"error: {exc}"
                log(f"{kind}: {name} failed: {exc}")
            else:
                log(f"{kind}: {name} done in {time.monotonic() - t:.1f} s")
            if not peer.running:
                out.setdefault(f"{name}_error", "error: the server died")
                log(f"{kind}: the server died:\n{peer.log_tail()}")
                break
    finally:
        t = time.monotonic()
        peer.stop()
        log(f"{kind}: stopped in {time.monotonic() - t:.1f} s")
    return out


# -- the table ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    label: str
    key: str
    scenario: str
    digits: int = 0
    ratio: bool = True


def rows(p: Params) -> list[Row]:
    return [
        Row(f"logins/s (C={p.clients})", "logins_per_s", "logins"),
        Row("  server CPU ms per login", "login_cpu_ms", "logins", 2),
        Row("  login time p50, ms", "login_p50_ms", "logins", 1),
        Row("  CPU cores server / generator", "logins_cpu", "logins", ratio=False),
        Row(f"1:1 messages delivered/s (P={p.pairs}, W={p.window})", "msgs_per_s", "messages"),
        Row("  server CPU s per 1000 messages", "cpu_per_1000", "messages", 3),
        Row("  CPU cores server / generator", "msgs_cpu", "messages", ratio=False),
        Row(f"latency p50, ms ({p.rate:g} msg/s, {p.latency_pairs} pairs)", "lat_p50",
            "latency", 2),
        Row("latency p99, ms", "lat_p99", "latency", 2),
        Row(f"presence notifications/s (U={p.users}, R={p.contacts})", "presence_per_s",
            "presence"),
        Row("  CPU cores server / generator", "presence_cpu", "presence", ratio=False),
        Row("RSS with 0 sessions, MiB", "rss_base_mib", "memory", 1),
        Row(f"RSS with {p.idle} idle TLS sessions, MiB", "rss_idle_mib", "memory", 1),
        Row("  KiB per idle session", "rss_per_session_kib", "memory", 1),
        Row(f"messages to offline users stored/s (S={p.pairs}, batch {p.window})",
            "offline_per_s", "offline"),
        Row("  server CPU ms per stored message", "offline_cpu_ms", "offline", 3),
        Row("  CPU cores server / generator", "offline_cpu", "offline", ratio=False),
    ]


def _cell(value: Any, digits: int) -> str:
    if isinstance(value, tuple):
        return " / ".join(f"{v:.2f}" for v in value)
    if isinstance(value, float) and math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}"


def format_table(p: Params, results: dict[str, dict[str, Any]],
                 limit: tuple[LimitResult, LimitResult] | None = None) -> str:
    servers = [s for s in p.servers if s in results]
    reference = results.get("prosody")
    header = ["scenario", *servers]
    lines: list[list[str]] = []
    for row in rows(p):
        if row.scenario not in p.scenarios:
            continue
        cells = [row.label]
        for server in servers:
            got = results[server]
            value = got.get(row.key)
            if value is None:
                cells.append(got.get(f"{row.scenario}_error", "-").split("\n")[0][:40])
                continue
            text = _cell(value, row.digits)
            ref = reference.get(row.key) if reference is not None else None
            if (row.ratio and server != "prosody" and isinstance(value, int | float)
                    and isinstance(ref, int | float) and ref):
                text += f" ({value / ref:.2f}x)"
            cells.append(text)
        lines.append(cells)
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in lines]
    if limit is not None:
        full, bare = limit
        text = (f"limit (Python, 1 core, per stanza: lxml incremental parse + tostring + "
                f"loopback write/read, no TLS): {full.per_stanza_us:.1f} us = "
                f"{full.stanzas_per_second:,.0f}/s")
        ref = reference.get("msgs_per_s") if reference is not None else None
        if isinstance(ref, float) and ref:
            text += f" = {full.stanzas_per_second / ref:.1f}x Prosody's msg/s"
        text += (f"; parse + tostring alone (I/O batched away): {bare.per_stanza_us:.1f} us = "
                 f"{bare.stanzas_per_second:,.0f}/s")
        out.append(text)
    out.append("ratios (Nx) are against Prosody; CPU = utime+stime from /proc over the measured "
               "window")
    return "\n".join(out)


def describe(p: Params) -> str:
    versions = {k: _version(k) for k in p.servers}
    try:
        import uvloop  # noqa: F401
        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    return "\n".join([
        f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, generator: "
        f"{p.procs} process(es) on {loop}",
        "servers: " + ", ".join(f"{k} {versions[k]} on {ADDRESSES[k]}:5222" for k in p.servers),
        "all: STARTTLS (TLS 1.3, EC P-256), SCRAM-SHA-1 (4096 iterations), info log to a file, "
        "no MAM, TCP_NODELAY (Prosody: network_settings nagle = false)",
        f"each scenario: {'a freshly started server (same data), ' if p.fresh else ''}"
        f"{p.warmup:g} s warm-up (not counted), then {p.duration:g} s measured",
        f"logins: {p.clients} clients, each in a loop: connect, STARTTLS, SASL, bind, initial "
        "presence, ping, close",
        f"1:1: {p.pairs} pairs, each sender at full speed with <= {p.window} messages in flight "
        "(100-byte body), to the receiver's full JID",
        f"latency: {p.latency_pairs} pairs at {p.rate:g} msg/s in total, send-to-receipt time",
        f"presence: {p.users} users online, each with {p.contacts} mutual ('both') contacts "
        f"made by subscription handshakes beforehand, changing presence in turn "
        f"(<= {p.presence_cap} notifications in flight)",
        f"memory: VmRSS of the server process (lua / beam.smp / python), 0 vs {p.idle} idle "
        "authenticated TLS sessions",
        *([f"offline: {p.pairs} senders, each sending batches of {p.window} messages to users "
           "who are offline, then a ping; counted when the ping is answered (all stored)"]
          if "offline" in p.scenarios else []),
        *(["presenced-pg: presenced with [storage] on a private PostgreSQL cluster (fsync off, "
           "as SQLite's synchronous=NORMAL); its server CPU includes PostgreSQL's processes"]
          if "presenced-pg" in p.servers else []),
        *(["presenced-limits: presenced with loopback not trusted, so every [limits] count and "
           "bucket is in use, at rates that never bite (their cost, not their effect)"]
          if "presenced-limits" in p.servers else []),
    ])


def _version(kind: str) -> str:
    if kind == "presenced-pg":
        from bench.pgcluster import bin_dir

        found = bin_dir()
        return f"(this tree), PostgreSQL {found.parent.name if found else '?'}"
    package = {"prosody": "prosody", "ejabberd": "ejabberd"}.get(kind)
    if package is None:
        return "(this tree)"
    if shutil.which("dpkg-query") is None:
        return "?"
    done = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package],
                          capture_output=True, text=True)
    return done.stdout.strip()


# -- command line -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> Params:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    ap.add_argument("--servers", default=None,
                    help="comma-separated, among " + ", ".join(SERVERS + OPTIONAL_SERVERS) +
                    " (default: " + ",".join(SERVERS) + ")")
    ap.add_argument("--scenarios", default=None,
                    help="comma-separated, among " + ", ".join(SCENARIOS + OPTIONAL_SCENARIOS)
                    + " (default: " + ",".join(SCENARIOS) + ")")
    ap.add_argument("--storage", action="store_true",
                    help="the storage comparison: presenced on SQLite and on PostgreSQL, "
                         "logins and messages to offline users (servers and scenarios unless "
                         "given)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny parameters, seconds per server (the CI smoke run)")
    ap.add_argument("--no-restart", dest="fresh", action="store_false", default=None,
                    help="run all scenarios in one server process (default: restart the "
                         "server before each scenario)")
    defaults = Params()
    for name, kind in (("procs", int), ("warmup", float), ("duration", float),
                       ("clients", int), ("pairs", int), ("window", int),
                       ("latency-pairs", int), ("rate", float), ("users", int),
                       ("contacts", int), ("presence-cap", int), ("idle", int)):
        ap.add_argument(f"--{name}", type=kind, default=None,
                        help=f"default {getattr(defaults, name.replace('-', '_'))}")
    args = ap.parse_args(argv)
    p = Params.quick() if args.quick else Params()
    default_servers, default_scenarios = STORAGE_COMPARISON if args.storage else (SERVERS,
                                                                                  SCENARIOS)
    servers = tuple(s.strip() for s in (args.servers or ",".join(default_servers)).split(",")
                    if s.strip())
    scenarios = tuple(s.strip() for s in
                      (args.scenarios or ",".join(default_scenarios)).split(",") if s.strip())
    for s in servers:
        if s not in SERVERS + OPTIONAL_SERVERS:
            ap.error(f"unknown server {s!r}")
    for s in scenarios:
        if s not in SCENARIOS + OPTIONAL_SCENARIOS:
            ap.error(f"unknown scenario {s!r}")
    overrides = {k: v for k, v in vars(args).items()
                 if v is not None and k in asdict(p)
                 and k not in ("servers", "scenarios", "storage")}
    p = replace(p, servers=servers, scenarios=scenarios, **overrides)
    if p.contacts % 2 or p.contacts >= p.users:
        ap.error("--contacts must be even and smaller than --users")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = parse_args(argv)
    raise_nofile_limit()  # inherited by the servers and the generators
    print(describe(p), flush=True)
    limit = (stanza_floor(p.limit_stanzas), stanza_floor(p.limit_stanzas, io=False))
    results: dict[str, dict[str, Any]] = {}
    fleet = Fleet(p.procs)
    try:
        for kind in p.servers:
            try:
                results[kind] = run_server(kind, p, fleet,
                                           log=lambda m: print(m, file=sys.stderr, flush=True))
            except Exception as exc:
                print(f"{kind}: could not run: {exc}", file=sys.stderr)
                results[kind] = {f"{s}_error": "error: not run" for s in p.scenarios}
    finally:
        fleet.close()
    print()
    print(format_table(p, results, limit))
    return 0


if __name__ == "__main__":
    sys.exit(main())
