"""``presenced serve --workers N``: N processes of one machine, each a node of the cluster.

The parent loads and checks the configuration once, then starts N copies of ``presenced serve``
(``--worker-node NAME``: the node name, derived) and supervises them; it serves nothing
itself. Every worker opens the same listeners with SO_REUSEPORT (server/listening.py), so the
kernel spreads new connections over them; what crosses workers goes through Redis like between
machines (server/cluster). Node names are ``<[cluster] node, or the host name>-w1`` … ``-wN``:
unique on the machine, the same after a restart of a worker (a new incarnation of that node).

The parent forwards SIGTERM, SIGINT (as SIGTERM) and SIGHUP (reload) to every worker, restarts a
worker that dies (after 1 s, doubling up to 30 s while it keeps dying within 10 s of its start;
after 5 such deaths in a row it stops them all and exits 1), and exits when all have stopped.
A worker that exits 0 of its own accord (``presenced ctl stop``) is not restarted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from server import ctl
from server.config import Config

log = logging.getLogger("presenced.workers")

QUICK_DEATH = 10.0   # seconds: a worker dying sooner after its start counts towards giving up
GIVE_UP_AFTER = 5    # quick deaths in a row
FIRST_DELAY, MAX_DELAY = 1.0, 30.0


def base_name(config: Config) -> str:
    """[cluster] node, else this machine's host name, as a node name (settings._NODE)."""
    if config.cluster.node is not None:
        return config.cluster.node[:58]
    host = socket.gethostname().split(".")[0]
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "-", host).lstrip("._-")
    return cleaned[:58] or "node"


def worker_names(config: Config, count: int) -> list[str]:
    base = base_name(config)
    return [f"{base}-w{i}" for i in range(1, count + 1)]


def problem(config: Config, count: int) -> str | None:
    """Why these workers cannot run with this configuration, or None."""
    if count < 1:
        return "--workers needs a number of at least 1"
    if not config.cluster.enabled:
        where = config.path or "the built-in defaults"
        return (f"--workers needs [cluster] redis in {where}: the workers are nodes of a cluster "
                "sharing Redis and PostgreSQL (see README, Running a cluster)")
    proxy = config.modules.get("proxy65")
    listens: tuple[object, ...] = tuple(getattr(proxy, "listen", ()))
    if listens and getattr(proxy, "enabled", None) is not False:
        return ("--workers cannot share [proxy65] listen: the two connections of a SOCKS5 "
                "pair must meet in one process (run the proxy on a server of its own)")
    return None


def worker_command(config_path: Path, name: str, debug: bool) -> list[str]:
    return [sys.executable, "-m", "server", *(["--debug"] if debug else []), "serve",
            "--config", str(config_path), "--worker-node", name]


async def supervise(commands: Mapping[str, Sequence[str]]) -> int:
    """Run one process per node name until SIGTERM/SIGINT; 0 when all stopped cleanly."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    running: dict[str, asyncio.subprocess.Process] = {}
    gave_up = False
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)  # systemd hears from the parent only (NotifyAccess=main)

    def forward(sig: signal.Signals) -> None:
        for proc in running.values():
            if proc.returncode is None:
                proc.send_signal(sig)

    def stop() -> None:
        if not stopping.is_set():
            log.info("event=workers-stopping workers=%d", len(running))
            ctl.notify("STOPPING=1")
        stopping.set()
        forward(signal.SIGTERM)

    def reload() -> None:
        log.info("event=workers-reload workers=%d", len(running))
        forward(signal.SIGHUP)

    loop.add_signal_handler(signal.SIGTERM, stop)
    loop.add_signal_handler(signal.SIGINT, stop)
    loop.add_signal_handler(signal.SIGHUP, reload)

    async def keep(name: str, command: Sequence[str]) -> int:
        nonlocal gave_up
        quick_deaths = 0
        while True:
            started = loop.time()
            proc = await asyncio.create_subprocess_exec(*command, env=env)
            running[name] = proc
            if stopping.is_set():
                proc.send_signal(signal.SIGTERM)
            log.info("event=worker-started node=%s pid=%d", name, proc.pid)
            code = await proc.wait()
            if stopping.is_set() or code == 0:
                log.info("event=worker-stopped node=%s pid=%d status=%d", name, proc.pid, code)
                return code
            quick_deaths = quick_deaths + 1 if loop.time() - started < QUICK_DEATH else 1
            if quick_deaths >= GIVE_UP_AFTER:
                log.error("event=worker-gave-up node=%s deaths=%d status=%d", name,
                          quick_deaths, code)
                gave_up = True
                stop()
                return code
            delay = min(MAX_DELAY, FIRST_DELAY * 2 ** (quick_deaths - 1))
            log.warning("event=worker-died node=%s pid=%d status=%d restart_in=%.0fs", name,
                        proc.pid, code, delay)
            try:
                await asyncio.wait_for(stopping.wait(), delay)
                return code
            except TimeoutError:
                pass

    tasks = [asyncio.ensure_future(keep(name, command)) for name, command in commands.items()]
    log.info("event=workers-started workers=%d nodes=%s", len(tasks), ",".join(commands))
    ctl.notify("READY=1", f"MAINPID={os.getpid()}")
    codes = await asyncio.gather(*tasks)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.remove_signal_handler(sig)
    log.info("event=workers-stopped statuses=%s", ",".join(map(str, codes)))
    return 1 if gave_up or any(code not in (0, -signal.SIGTERM) for code in codes) else 0
