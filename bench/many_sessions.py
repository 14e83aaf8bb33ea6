"""Many concurrent sessions (issue 25 item 5): a private presenced, N accounts made in bulk, then
N authenticated TLS sessions (STARTTLS, SCRAM-SHA-1, bind, initial presence) opened by generator
processes from several loopback source addresses and left connected; then a fresh client logs
in and pings the server. Reported: the login rate over time, server RSS and CPU per session
(and the generators' CPU per login beside it: the generator must cost less than the server or
it measures itself), the fresh client's ping round trips with all sessions connected, and what
limits the count (open files per process, memory, login CPU).

    python -m bench.many_sessions --sessions 100000 [--sources 4] [--rate R] [--procs P]
                                  [--workers W] [--pings 1000]

Each connection is a file descriptor on both sides; a process cannot hold more than its hard
RLIMIT_NOFILE (raising it needs CAP_SYS_RESOURCE, which is the administrator's). When N does
not fit under it, the server runs as ``serve --workers W`` (W processes behind one port, a
cluster on a private PostgreSQL and Redis) and the generators are as many processes. Each
source address gives the whole ephemeral port range (net.ipv4.ip_local_port_range) towards the
server's one address and port. Loopback only; the run ends by itself (--timeout).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import multiprocessing
import resource
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.idle_memory import fresh_presenced
from bench.peers import cpu_seconds, raise_nofile_limit, rss_kib
from bench.run import DOMAIN, PASSWORD

HOST = "127.0.0.33"  # the server's address (bench servers: 127.0.0.20-33)
SOURCES = "127.0.33.{}"  # the generators' source addresses: 127.0.33.1, .2, ...
FD_MARGIN = 1000  # open files a process keeps for other uses (logs, database, listeners)
PORTS_PER_SOURCE_FALLBACK = 28232  # Linux's default range, 32768-60999
ATTEMPTS = 3  # a login that fails (timeout under load) is tried again, then counted as failed


@dataclass(frozen=True)
class Params:
    sessions: int = 100_000
    sources: int = 0          # 0: as many as the ephemeral port range needs
    rate: float = 0.0         # logins/s over all generators; 0: as fast as they are answered
    procs: int = 0            # generator processes; 0: enough for the open-files limit, >= 2
    workers: int = 0          # server processes; 0: 1 if the sessions fit in one, else enough
    in_flight: int = 32       # logins under way at once per generator process
    pings: int = 1000         # from the fresh client, one after the other
    report: float = 10.0      # seconds between progress lines
    timeout: float = 1800.0   # the whole run, at most
    stall: float = 60.0       # no login done for this long: stop
    host: str = HOST
    port: int = 5222
    log: Callable[[str], None] = field(default=print, compare=False)

    @classmethod
    def quick(cls) -> Params:
        return cls(sessions=300, procs=1, pings=50, report=1.0, timeout=120.0, stall=30.0)


def hard_open_files() -> int:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 20 if hard == resource.RLIM_INFINITY else hard


def ports_per_source() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
        return high - low + 1
    except (OSError, ValueError):
        return PORTS_PER_SOURCE_FALLBACK


def plan(p: Params) -> Params:
    """Fill in the zeros: processes for the open-files limit, sources for the port range."""
    per_process = max(hard_open_files() - FD_MARGIN, 100)
    needed = math.ceil(p.sessions / per_process)
    workers = p.workers or needed
    procs = p.procs or max(2, needed)
    sources = p.sources or math.ceil(p.sessions / (ports_per_source() * 0.9))
    return replace(p, workers=workers, procs=procs, sources=max(1, sources))


def shares(users: list[str], parts: int) -> list[list[str]]:
    """Round-robin: every generator's share spans the whole run's users."""
    return [users[i::parts] for i in range(parts)]


# -- the generator processes -------------------------------------------------------------------


def generator_main(conn: Connection, target: dict[str, Any], users: list[str], rate: float,
                   in_flight: int) -> None:
    """Log the users in, reporting progress; keep them connected until told to close."""
    with asyncio.Runner(loop_factory=loadgen.new_event_loop) as runner:
        runner.run(_generate(conn, loadgen.Target(**target), users, rate, in_flight))


async def _generate(conn: Connection, target: loadgen.Target, users: list[str], rate: float,
                    in_flight: int) -> None:
    loop = asyncio.get_running_loop()
    clients: list[loadgen.Client] = []
    failed = retried = 0
    error = ""
    sources: set[str] = set()  # the local addresses the sessions came from
    slots = asyncio.Semaphore(in_flight)

    async def one(user: str) -> None:
        nonlocal failed, retried, error
        try:
            for attempt in range(1, ATTEMPTS + 1):
                client = loadgen.Client(target, user)
                try:
                    await client.login(presence=True, timeout=60.0)
                except (loadgen.XMPPError, OSError, TimeoutError) as exc:
                    client.close()
                    error = error or f"{user}: {type(exc).__name__}: {exc}"
                    if attempt == ATTEMPTS:
                        failed += 1
                        return
                    retried += 1
                    continue
                client.idle()
                clients.append(client)
                if client.transport is not None:
                    sources.add(client.transport.get_extra_info("sockname")[0])
                return
        finally:
            slots.release()

    def alive() -> int:
        return sum(1 for c in clients if c.alive)

    async def progress() -> None:
        while True:
            conn.send(("progress", alive(), failed, retried, error, len(clients)))
            await asyncio.sleep(0.5)

    conn.send(("ready",))  # imported and running: the parent starts the clock for all at once
    while not conn.poll():
        await asyncio.sleep(0.05)
    conn.recv()
    reporter = asyncio.create_task(progress())
    tasks: set[asyncio.Task[None]] = set()
    start = loop.time()
    for i, user in enumerate(users):
        if conn.poll():  # "stop": the run's time is up; the logins under way finish
            conn.recv()
            break
        if rate > 0:
            delay = start + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        await slots.acquire()
        task = loop.create_task(one(user))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    while tasks:
        await asyncio.wait(set(tasks))
    reporter.cancel()
    conn.send(("connected", alive(), failed, retried, error, len(clients), sorted(sources)))
    while True:  # connected and idle until the parent is done with the server
        while not conn.poll():
            await asyncio.sleep(0.2)
        if conn.recv()[0] == "close":
            break
    for c in clients:
        c.close()
    await asyncio.sleep(0.5)  # the closing bytes leave
    conn.send(("closed",))


@dataclass
class _Generator:
    process: multiprocessing.process.BaseProcess
    conn: Connection
    users: int
    done: int = 0
    failed: int = 0
    retried: int = 0
    logged_in: int = 0  # of which done (still connected) is what the server has not closed
    error: str = ""
    connected: bool = False
    sources: list[str] = field(default_factory=list)


@contextlib.contextmanager
def generators(p: Params, users: list[str]) -> Iterator[list[_Generator]]:
    ctx = multiprocessing.get_context("spawn")
    started: list[_Generator] = []
    try:
        for i, share in enumerate(shares(users, p.procs)):
            target = loadgen.Target(p.host, p.port, DOMAIN, PASSWORD,
                                    source=SOURCES.format(i % p.sources + 1))
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=generator_main, daemon=True, args=(
                child, asdict(target), share, p.rate / p.procs, p.in_flight))
            proc.start()
            child.close()
            started.append(_Generator(proc, parent, len(share)))
        for g in started:
            if not g.conn.poll(120.0):
                raise RuntimeError("a generator process did not start within 120 s")
            g.conn.recv()
        for g in started:
            g.conn.send(("go",))
        yield started
    finally:
        for g in started:
            with contextlib.suppress(OSError):
                g.conn.send(("close",))
        deadline = time.monotonic() + 60
        for g in started:
            with contextlib.suppress(OSError, EOFError):
                if g.conn.poll(max(0.1, deadline - time.monotonic())):
                    g.conn.recv()
            g.process.join(max(0.1, deadline - time.monotonic()))
            if g.process.is_alive():
                g.process.kill()  # our own child, by its handle
                g.process.join()
            g.conn.close()


def _drain(gens: list[_Generator]) -> None:
    for g in gens:
        with contextlib.suppress(EOFError, OSError):
            while g.conn.poll():
                message = g.conn.recv()
                if message[0] in ("progress", "connected"):
                    g.done, g.failed, g.retried, g.error, g.logged_in = message[1:6]
                    if message[0] == "connected":
                        g.sources = message[6]
                    g.connected = g.connected or message[0] == "connected"
        if not g.connected and not g.process.is_alive():
            raise RuntimeError(f"a generator exited (status {g.process.exitcode}) before "
                               f"its {g.users} users were connected")


# -- the run ------------------------------------------------------------------------------------


@dataclass
class Sample:
    t: float           # seconds since the first login began
    connected: int
    failed: int
    server_cpu: float  # seconds, cumulative (presenced, and PostgreSQL and Redis with workers)
    generator_cpu: float
    rss_kib: int       # presenced's processes
    logged_in: int = 0  # logins done, whether or not the session is still connected


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def ping_from_fresh_client(p: Params, pings: int) -> tuple[float, list[float]]:
    """A new client logs in (its login time) and pings the server pings times in a row (the
    round trips, in ms)."""
    client = loadgen.Client(loadgen.Target(p.host, p.port, DOMAIN, PASSWORD), "fresh")
    began = time.perf_counter()
    await client.login(presence=True, timeout=60.0)
    login_ms = (time.perf_counter() - began) * 1000
    rtts = []
    try:
        for _ in range(pings):
            began = time.perf_counter()
            await client.iq(f"<ping xmlns='{loadgen.PING_NS}'/>", to=DOMAIN, timeout=30.0)
            rtts.append((time.perf_counter() - began) * 1000)
    finally:
        client.close()
    return login_ms, rtts


def run(p: Params) -> dict[str, Any]:
    """The whole run; its figures."""
    p = plan(p)
    raise_nofile_limit(hard_open_files())  # the generators inherit it
    users = [f"m{i:06d}" for i in range(p.sessions)]
    with fresh_presenced(p.host, p.port, [*users, "fresh"], workers=p.workers,
                         extra_config='[limits]\nidle_timeout = 86400.0\n',
                         log=p.log) as server:
        base_rss = server.rss_kib()
        p.log(f"presenced: {server.processes} process(es) on {p.host}:{p.port}, base RSS "
              f"{base_rss / 1024:.0f} MiB; {p.sessions} sessions from {p.procs} generator "
              f"process(es) over {p.sources} source address(es)"
              + (f" at {p.rate:g} logins/s" if p.rate else ", as fast as answered"))
        with generators(p, users) as gens:
            samples, stopped = _login_phase(p, server, gens)
            failed = sum(g.failed for g in gens)
            retried = sum(g.retried for g in gens)
            error = next((g.error for g in gens if g.error), "")
            if failed > max(p.sessions // 100, samples[-1].connected // 10):
                raise RuntimeError(f"{failed} login(s) failed; the first error: {error}")
            time.sleep(2.0)  # idle: every read over, every write flushed
            # Sessions the server closed after their login (none should be) are not counted.
            _drain(gens)
            dropped = sum(g.logged_in - g.done for g in gens)
            generator_kib = rss_kib(g.process.pid for g in gens if g.process.pid is not None)
            connected_rss = server.rss_kib()
            aux_kib = server.aux_rss_kib() - server.aux_base_kib
            login_ms, rtts = asyncio.run(ping_from_fresh_client(p, p.pings))
            open_now = server.open_files()
    last = samples[-1]
    rates = [(b.logged_in - a.logged_in) / (b.t - a.t) for a, b in itertools.pairwise(samples)
             if b.t > a.t]
    kept = max(last.connected, 1)
    per_session_kib = (connected_rss - base_rss) / kept
    mem = _mem_available_kib()
    return {
        "sessions": last.connected, "seconds": last.t, "workers": p.workers,
        "failed": failed, "retried": retried, "error": error, "dropped": dropped,
        "sources_seen": sorted({a for g in gens for a in g.sources}),
        "generator_kib_per_session": generator_kib / kept,
        "procs": p.procs, "sources": p.sources,
        "logins_per_s": last.logged_in / last.t,
        "rates": rates,
        "server_ms_per_login": last.server_cpu / max(last.logged_in, 1) * 1000,
        "generator_ms_per_login": last.generator_cpu / max(last.logged_in, 1) * 1000,
        "server_cores": last.server_cpu / last.t,
        "base_rss_mib": base_rss / 1024, "connected_rss_mib": connected_rss / 1024,
        "kib_per_session": per_session_kib,
        "aux_kib_per_session": aux_kib / kept, "stopped": stopped,
        "wanted": p.sessions,
        "fresh_login_ms": login_ms,
        "ping_p50_ms": _percentile(rtts, 0.50), "ping_p99_ms": _percentile(rtts, 0.99),
        "ping_max_ms": max(rtts), "pings": len(rtts),
        "open_files": open_now, "hard_open_files": hard_open_files(),
        "sessions_by_memory": int(mem / max(per_session_kib + aux_kib / kept, 0.1)),
        "samples": samples,
    }


def _mem_available_kib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    return 0


def _login_phase(p: Params, server: Any, gens: list[_Generator]
                 ) -> tuple[list[Sample], str]:
    gen_pids = [g.process.pid for g in gens if g.process.pid is not None]
    cpu0, gcpu0 = server.cpu_seconds(), cpu_seconds(gen_pids)
    began = time.monotonic()
    samples = [Sample(0.0, 0, 0, 0.0, 0.0, server.rss_kib())]
    last_report = began
    last_progress, progressed_at = 0, began
    while True:
        time.sleep(0.5)
        _drain(gens)
        now = time.monotonic()
        connected = sum(g.done for g in gens)
        failed = sum(g.failed for g in gens)
        if connected + failed > last_progress:
            last_progress, progressed_at = connected + failed, now
        done = all(g.connected for g in gens)
        if done or now - last_report >= p.report:
            sample = Sample(now - began, connected, failed, server.cpu_seconds() - cpu0,
                            cpu_seconds(gen_pids) - gcpu0, server.rss_kib(),
                            sum(g.logged_in for g in gens))
            prev = samples[-1]
            samples.append(sample)
            last_report = now
            rate = (sample.logged_in - prev.logged_in) / max(sample.t - prev.t, 1e-9)
            cores = (sample.server_cpu - prev.server_cpu) / max(sample.t - prev.t, 1e-9)
            gcores = (sample.generator_cpu - prev.generator_cpu) / max(sample.t - prev.t, 1e-9)
            dropped = sum(g.logged_in for g in gens) - connected
            p.log(f"t={sample.t:6.0f}s connected={connected:7d} failed={failed} "
                  f"dropped={dropped} "
                  f"logins/s={rate:6.0f} rss={sample.rss_kib / 1024:7.0f}MiB "
                  f"server_cores={cores:.2f} generator_cores={gcores:.2f}")
        if done:
            return samples, ""
        stopped = (f"no login done for {p.stall:.0f} s" if now - progressed_at > p.stall else
                   f"time up after {p.timeout:.0f} s" if now - began > p.timeout else "")
        if stopped:
            # What is connected stays, and is measured: how far it got is the finding.
            p.log(f"presenced: stopping the logins at {connected} connected: {stopped}")
            for g in gens:
                g.conn.send(("stop",))
            deadline = time.monotonic() + 120
            while not all(g.connected for g in gens) and time.monotonic() < deadline:
                time.sleep(0.5)
                _drain(gens)
            samples.append(Sample(time.monotonic() - began, sum(g.done for g in gens),
                                  sum(g.failed for g in gens), server.cpu_seconds() - cpu0,
                                  cpu_seconds(gen_pids) - gcpu0, server.rss_kib(),
                                  sum(g.logged_in for g in gens)))
            return samples, stopped


def describe(r: dict[str, Any], p: Params) -> str:
    rates = r["rates"][:-1] if len(r["rates"]) > 2 else r["rates"]  # the last: partial
    tenth = max(1, len(rates) // 10)
    lines = [
        f"presenced: {r['sessions']:,} authenticated TLS sessions in {r['seconds']:.0f} s "
        f"({r['workers']} server process(es), {r['procs']} generator process(es), "
        f"{r['sources']} source address(es))"
        + (f"; stopped at {r['sessions']:,} of {r['wanted']:,}: {r['stopped']}"
           if r["stopped"] else ""),
        f"  logins/s: {r['logins_per_s']:,.0f} on average; per {p.report:g} s: min "
        f"{min(rates):,.0f}, max {max(rates):,.0f}, first tenth {sum(rates[:tenth]) / tenth:,.0f}"
        f", last tenth {sum(rates[-tenth:]) / tenth:,.0f}",
        f"  failed logins: {r['failed']} (tried again: {r['retried']}); closed by the server "
        f"after logging in: {r['dropped']}"
        + (f"; the first error: {r['error']}" if r["error"] else ""),
        f"  CPU per login: server {r['server_ms_per_login']:.2f} ms "
        f"({r['server_cores']:.2f} cores), generators {r['generator_ms_per_login']:.2f} ms",
        f"  RSS: base {r['base_rss_mib']:,.0f} MiB, all connected {r['connected_rss_mib']:,.0f} "
        f"MiB: {r['kib_per_session']:.1f} KiB per session"
        + (f" (+ {r['aux_kib_per_session']:.1f} KiB in PostgreSQL and Redis)"
           if r["workers"] > 1 else "")
        + f"; generators {r['generator_kib_per_session']:.1f} KiB per client",
        f"  with all connected, a fresh client: login {r['fresh_login_ms']:.0f} ms, "
        f"{r['pings']} pings p50 {r['ping_p50_ms']:.2f} ms, p99 {r['ping_p99_ms']:.2f} ms, "
        f"max {r['ping_max_ms']:.2f} ms",
        f"  limits: open files {r['hard_open_files']:,} per process (hard limit; presenced "
        f"holds {r['open_files']:,} now); memory available for about "
        f"{r['sessions_by_memory']:,} more sessions",
    ]
    return "\n".join(lines)


def parse(argv: list[str] | None) -> Params:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    defaults = Params()
    ap.add_argument("--sessions", type=int, default=defaults.sessions)
    ap.add_argument("--sources", type=int, default=0,
                    help="source addresses 127.0.33.x (default: as the port range needs)")
    ap.add_argument("--rate", type=float, default=0.0,
                    help="logins per second in all (default: as fast as answered)")
    ap.add_argument("--procs", type=int, default=0, help="generator processes")
    ap.add_argument("--workers", type=int, default=0,
                    help="server processes (default: 1 when the sessions fit in one)")
    ap.add_argument("--in-flight", type=int, default=defaults.in_flight,
                    help="logins under way at once per generator process")
    ap.add_argument("--pings", type=int, default=defaults.pings)
    ap.add_argument("--report", type=float, default=defaults.report)
    ap.add_argument("--timeout", type=float, default=defaults.timeout,
                    help="seconds of logins at most; then what is connected is measured")
    ap.add_argument("--stall", type=float, default=defaults.stall,
                    help="seconds without a login done before the logins stop")
    ap.add_argument("--json", metavar="FILE",
                    help="also write the figures there (bench.table reads "
                         "bench/results/many_sessions.json)")
    args = ap.parse_args(argv)
    if args.sessions < 1 or args.pings < 1:
        ap.error("--sessions and --pings must be at least 1")
    return Params(sessions=args.sessions, sources=args.sources, rate=args.rate,
                  procs=args.procs, workers=args.workers, in_flight=args.in_flight,
                  pings=args.pings, report=args.report, timeout=args.timeout,
                  stall=args.stall)


def _say(line: str) -> None:
    print(line, flush=True)  # progress is read while the run goes on (often from a file)


def main(argv: list[str] | None = None) -> int:
    # SIGTERM ends the run as an exception would: generators, servers and databases stopped.
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(143))
    p = replace(parse(argv), log=_say)
    json_out = argparse.ArgumentParser(add_help=False)
    json_out.add_argument("--json")
    path = json_out.parse_known_args(argv)[0].json
    result = run(p)
    print(describe(result, plan(p)), flush=True)
    if path:
        Path(path).write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
