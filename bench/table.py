"""README's benchmark table from one run (issue 25 item 7): the existing benchmarks side by side
against presenced, Prosody and ejabberd, one fresh server per measurement, and one Markdown
table with the machine (CPU, cores, load average at the start and the end, date), the command,
each row's figure per server and presenced's ratio to each peer.

    python -m bench.table [--quick] [--out bench/results/table.md] [--json FILE]
                          [--servers presenced,prosody,ejabberd] [--rows messages,sm,...]

Rows (the benchmark each one reuses):
  messages  1:1 messages per server CPU-s, archiving off, and presenced as shipped (archiving
            on) against the peers without an archive (bench.mam_messages' servers)
  sm        the same with stream management on (bench.sm_messages)
  muc       MUC groupchat deliveries per server CPU-s (bench.muc_fanout)
  pep       PEP notifications per server CPU-s (bench.pep_notify)
  ws        1:1 messages over WebSocket per server CPU-s (bench.ws_messages: no ejabberd)
  idle      KiB per idle session: bench.idle_memory (fresh heap, SM and CSI on) and
            bench.run's memory scenario (plain idle TLS sessions, all three servers)
  sessions  100,000 sessions: bench.many_sessions' JSON result, read, not run (too long)
  tsung     tsung's CPU per user and mean transaction times (bench.tsung)

Absolute figures vary 1.6x between machines (and with the load other work puts on a shared
one); the ratios are what carries over. On this 2-core machine the whole table took 9 minutes
at a load average of 3 (12.5 at 10: most of it is starting servers and making ejabberd's
accounts in-band), `--quick` (tiny parameters, nothing meaningful about speed) 3 minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import (
    feature,
    loadgen,
    mam_messages,
    muc_fanout,
    pep_notify,
    sm_messages,
    tsung,
    ws_messages,
)
from bench.feature import Variant
from bench.peers import REPO, Peer, raise_nofile_limit
from bench.run import Fleet, Params, _version, run_server

SERVERS = ("presenced", "prosody", "ejabberd")
NAMES = {"presenced": "presenced", "prosody": "Prosody", "ejabberd": "ejabberd"}
PEERS = ("prosody", "ejabberd")
# Addresses of the table's own servers, apart from those of the benchmarks it reuses (bench.run
# 127.0.0.20-24, fan-out 24-26, tsung 27-29): a helper running one of them meanwhile does not
# take the table's address.
ADDRESSES = {"presenced": "127.0.0.90", "prosody": "127.0.0.91", "ejabberd": "127.0.0.92"}
IDLE_ADDRESS = "127.0.0.93"  # bench.idle_memory's presenced
MANY_SESSIONS_JSON = Path("bench/results/many_sessions.json")
MANY_SESSIONS_COMMAND = "python -m bench.many_sessions --sessions 100000"


@dataclass(frozen=True)
class Settings:
    """Every benchmark's parameters for one table."""

    quick: bool = False
    servers: tuple[str, ...] = SERVERS
    groups: tuple[str, ...] = ()
    messages: Params = field(default_factory=lambda: replace(
        Params(), warmup=1.0, duration=5.0, scenarios=("messages",)))
    muc: muc_fanout.MucParams = field(default_factory=lambda: muc_fanout.MucParams(
        warmup=1.0, duration=5.0))
    pep: pep_notify.PepParams = field(default_factory=lambda: pep_notify.PepParams(
        warmup=1.0, duration=5.0))
    idle_sessions: int = 1000      # bench.idle_memory's (presenced only: accounts are cheap)
    idle_run_sessions: int = 500   # bench.run's memory scenario (ejabberd's accounts are not)
    tsung_params: tsung.Params = field(default_factory=tsung.Params)
    many_sessions: Path = MANY_SESSIONS_JSON
    # bench.idle_memory's figures by server, once per table (it may measure the peers too)
    idle_found: dict[str, float | str] = field(default_factory=dict)

    @classmethod
    def for_quick(cls) -> Settings:
        return cls(quick=True, messages=replace(Params.quick(), scenarios=("messages",)),
                   muc=muc_fanout.MucParams.quick(), pep=pep_notify.PepParams.quick(),
                   idle_sessions=20, idle_run_sessions=20,
                   tsung_params=tsung.Params(users=6, arrival=20.0, chat=1, think=0.2))


# A group measures each server once (or once per variant) and gives its figures by key; rows
# pick one figure each. A figure is a number, or a string saying why there is none.
Figures = dict[str, float | str]


@dataclass(frozen=True)
class Row:
    group: str
    label: str
    key: str
    higher_is_better: bool = True
    digits: int = 0
    peer_key: str | None = None  # the peers' figure, where it is not `key` (archiving on)
    command: str = ""            # the benchmark reused, where it is not the group's


@dataclass(frozen=True)
class Group:
    name: str
    command: str                # the benchmark reused, to run it alone
    servers: tuple[str, ...]    # the servers it can run
    measure: Callable[[str, Settings, Fleet], Figures]
    describe: Callable[[Settings], str]


def _on_fresh(kind: str, variant: Variant, p: Params, fleet: Fleet,
              measure: feature.Measure | None = None) -> dict[str, Any]:
    """One variant of a bench/feature.py comparison, on a fresh server at the table's address."""
    how: feature.Measure = measure or (lambda v, p, peer, fleet, target:
                                       feature.messages(v.op, p, peer, fleet, target))
    peer: Peer = variant.servers[kind](ADDRESSES[kind], 5222)

    def measured(peer: Peer, target: loadgen.Target) -> dict[str, Any]:
        return how(variant, p, peer, fleet, target)
    return feature.on_fresh_server(peer, p.general_accounts, measured)


def measure_messages(kind: str, s: Settings, fleet: Fleet) -> Figures:
    off, on = mam_messages.VARIANTS
    out: Figures = {"off": _on_fresh(kind, off, s.messages, fleet)["per_cpu_s"]}
    if kind == "presenced":  # the peers run without an archive, as bench.run runs them
        out["on"] = _on_fresh(kind, on, s.messages, fleet)["per_cpu_s"]
    return out


def measure_sm(kind: str, s: Settings, fleet: Fleet) -> Figures:
    on = next(v for v in sm_messages.VARIANTS if v.op == "messages_sm")
    return {"on": _on_fresh(kind, on, s.messages, fleet)["per_cpu_s"]}


def measure_muc(kind: str, s: Settings, fleet: Fleet) -> Figures:
    return {"per_cpu_s": muc_fanout.run(kind, s.muc, fleet, host=ADDRESSES[kind])["per_cpu_s"]}


def measure_pep(kind: str, s: Settings, fleet: Fleet) -> Figures:
    got = pep_notify.run(kind, s.pep, fleet, host=ADDRESSES[kind])
    return {"per_cpu_s": got["per_cpu_s"]}


def measure_ws(kind: str, s: Settings, fleet: Fleet) -> Figures:
    websocket = next(v for v in ws_messages.VARIANTS if v.op == "websocket")
    return {"per_cpu_s": _on_fresh(kind, websocket, s.messages, fleet,
                                   ws_messages.measure)["per_cpu_s"]}


IDLE_LINE = re.compile(r"^(?P<kind>[\w-]+): (?P<kib>[0-9.]+) KiB", re.MULTILINE)


def idle_memory(sessions: int) -> dict[str, float]:
    """bench.idle_memory as its command line runs it (its printed figures, by server), in a
    process of its own whose bench.run.ADDRESSES (which it reads) puts presenced on the table's
    IDLE_ADDRESS: a benchmark running meanwhile on bench.run's addresses does not collide."""
    code = ("import sys\nfrom bench import idle_memory, run\n"
            "run.ADDRESSES['presenced'] = sys.argv[1]\n"
            "sys.exit(idle_memory.main(sys.argv[2:]))\n")
    for attempt in range(3):
        done = subprocess.run([sys.executable, "-c", code, IDLE_ADDRESS, "--sessions",
                               str(sessions)], capture_output=True, text=True, cwd=REPO,
                              timeout=600)
        found = {m["kind"]: float(m["kib"]) for m in IDLE_LINE.finditer(done.stdout)}
        if done.returncode == 0 and found:
            return found
        last = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        _log(f"table: bench.idle_memory failed ({done.returncode}): "
             f"{last[-1] if last else ''}")
        time.sleep(10 * (attempt + 1))
    raise RuntimeError(f"bench.idle_memory failed ({done.returncode}): "
                       f"{last[-1][:200] if last else ''}")


def measure_idle(kind: str, s: Settings, fleet: Fleet) -> Figures:
    out: Figures = {}
    if not s.idle_found:  # once per table: it may measure the peers too
        try:
            s.idle_found.update(idle_memory(s.idle_sessions))
        except Exception as exc:
            s.idle_found["error"] = f"error: {exc}".splitlines()[0][:120]
    out["fresh"] = s.idle_found.get(kind, s.idle_found.get("error",
                                                            "not in bench.idle_memory"))
    p = replace(s.messages, scenarios=("memory",), idle=s.idle_run_sessions)
    got = run_server(kind, p, fleet, log=_log, host=ADDRESSES[kind])
    out["run"] = got.get("rss_per_session_kib", got.get("memory_error", "error"))
    return out


def measure_tsung(kind: str, s: Settings, fleet: Fleet) -> Figures:
    got = tsung.run_one(kind, s.tsung_params, log=_log, host=ADDRESSES[kind])
    tr = got["tr"]
    logged = tr.get("bind", (0, 0.0, 0.0))[0]  # a failed SCRAM aborts before binding
    if not logged:
        raise RuntimeError(f"no tsung user logged in (errors: {got['errors']})")
    out: Figures = {"cpu_ms_per_user": got["cpu"] * 1000 / logged, "logged": logged}
    for name in TSUNG_TRANSACTIONS:
        count, mean, _ = tr.get(name, (0, 0.0, 0.0))
        out[name] = mean if count else "-"
    return out


TSUNG_TRANSACTIONS = ("connect", "login", "roster", "muc_join")


def _many_sessions(kind: str, s: Settings, fleet: Fleet) -> Figures:
    raise AssertionError("read, not run")  # measure_group reads the JSON instead


# bench.many_sessions' figures shown in the row, in this order, where its result has them.
MANY_SESSIONS_KEYS = (("sessions", "sessions", 0), ("logins_per_s", "logins/s", 0),
                      ("server_ms_per_login", "server CPU ms per login", 2),
                      ("kib_per_session", "KiB per session", 1),
                      ("ping_p99_ms", "ping p99 ms", 1), ("stopped", "stopped", 0))


def read_many_sessions(path: Path) -> tuple[str, dict[str, Any] | None]:
    """bench.many_sessions' result: (a one-line summary, its figures) or ("not run: …", None).
    A JSON object (its run()'s dict) gives the figures of MANY_SESSIONS_KEYS (or, with none of
    them, its scalar ones); any other text (its output) gives its report, on one line."""
    if not path.exists():
        return f"not run (`{MANY_SESSIONS_COMMAND}`)", None
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"unreadable {path}: {exc}", None
    try:
        data = json.loads(text)
    except ValueError:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        # its report follows the progress lines: from its last "presenced: …" line on
        heads = [i for i, line in enumerate(lines) if line.startswith("presenced: ")]
        return "; ".join(lines[heads[-1] if heads else 0:])[:600] or f"{path} is empty", None
    if not isinstance(data, dict):
        return f"unreadable {path}: not a JSON object", None

    def shown(value: Any, digits: int) -> str:
        return _number(value, digits) if isinstance(value, int | float) else str(value)
    cells = [f"{label} {shown(data[key], digits)}" for key, label, digits in MANY_SESSIONS_KEYS
             if data.get(key) not in (None, "")]
    if not cells:
        cells = [f"{k} {shown(v, 1)}" for k, v in data.items()
                 if isinstance(v, int | float | str) and len(str(v)) < 60][:10]
    return "; ".join(cells) or "(no figures)", data


def _describe_messages(s: Settings) -> str:
    p = s.messages
    return (f"{p.pairs} TLS pairs, <= {p.window} messages in flight each, {p.warmup:g} s "
            f"warm-up, {p.duration:g} s measured; the peers without an archive in both rows "
            "(presenced as shipped archives every message: `[mam] default = \"always\"`)")


def _describe_tsung(s: Settings) -> str:
    t = s.tsung_params
    return (f"{t.users} users arriving at {t.arrival:g}/s: SCRAM login over direct TLS, "
            f"roster, presence, MUC join, {t.chat} rounds of 1:1 + groupchat {t.think:g} s "
            f"apart; presenced as shipped (archiving on); tsung's own reports in {t.out}/")


GROUPS = {g.name: g for g in (
    Group("messages", "python -m bench.mam_messages", SERVERS, measure_messages,
          _describe_messages),
    Group("sm", "python -m bench.sm_messages", SERVERS, measure_sm,
          lambda s: "as above, every client with XEP-0198 enabled (acks per batch)"),
    Group("muc", "python -m bench.muc_fanout", SERVERS, measure_muc,
          lambda s: f"{s.muc.rooms} rooms x {s.muc.occupants} occupants, all talking, "
                    f"<= {s.muc.window} in flight per room, {s.muc.duration:g} s measured; "
                    "groupchat messages received"),
    Group("pep", "python -m bench.pep_notify", SERVERS, measure_pep,
          lambda s: f"{s.pep.users} users x {s.pep.contacts} contacts publishing tunes, "
                    f"<= {s.pep.window} in flight, {s.pep.duration:g} s measured; "
                    "notifications received"),
    Group("ws", "python -m bench.ws_messages", ("presenced", "prosody"), measure_ws,
          lambda s: f"{s.messages.pairs} pairs over wss:// (RFC 7395), one generator process"),
    Group("idle", "python -m bench.idle_memory", SERVERS, measure_idle,
          lambda s: f"idle authenticated TLS sessions, VmRSS after minus before, per session, "
                    f"on a fresh server: {s.idle_sessions} with SM and CSI enabled "
                    f"(bench.idle_memory: presenced), {s.idle_run_sessions} plain ones "
                    "(bench.run's memory scenario: all three)"),
    Group("sessions", MANY_SESSIONS_COMMAND, ("presenced",), _many_sessions,
          lambda s: f"read from {s.many_sessions} (written by bench.many_sessions)"),
    Group("tsung", "python -m bench.tsung", SERVERS, measure_tsung,
          _describe_tsung),
)}

ROWS = (
    Row("messages", "1:1 messages per server CPU-s, archiving off", "off"),
    Row("messages", "1:1 messages per server CPU-s, presenced as shipped (archiving on), "
        "peers without archive", "on", peer_key="off"),
    Row("sm", "1:1 messages per server CPU-s, stream management on", "on"),
    Row("muc", "MUC fan-out: groupchat deliveries per server CPU-s", "per_cpu_s"),
    Row("pep", "PEP fan-out: notifications per server CPU-s", "per_cpu_s"),
    Row("ws", "WebSocket: 1:1 messages per server CPU-s", "per_cpu_s"),
    Row("idle", "KiB per idle session, fresh heap, SM + CSI", "fresh",
        higher_is_better=False, digits=1, command="python -m bench.idle_memory"),
    Row("idle", "KiB per idle TLS session", "run", higher_is_better=False, digits=1,
        command="python -m bench.run --scenarios memory"),
    Row("sessions", "Many sessions (issue 25: 100,000), as bench.many_sessions reported",
        "summary"),
    Row("tsung", "tsung: server CPU ms per user", "cpu_ms_per_user", higher_is_better=False,
        digits=1),
    *(Row("tsung", f"tsung: {name} mean ms", name, higher_is_better=False, digits=1)
      for name in TSUNG_TRANSACTIONS),
)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _number(value: float, digits: int) -> str:
    return f"{value:,.{digits}f}"


def measure_group(group: Group, s: Settings, fleet: Fleet) -> dict[str, Figures | str]:
    """Each server of the table that the group can run, measured; a failure is a string."""
    out: dict[str, Figures | str] = {}
    if group.name == "sessions":
        summary, data = read_many_sessions(s.many_sessions)
        out["presenced"] = {"summary": summary, **({"data": json.dumps(data)} if data else {})}
        return out
    for kind in s.servers:
        if kind not in group.servers:
            out[kind] = f"not in `{group.command}`"
            continue
        began = time.monotonic()
        try:
            out[kind] = group.measure(kind, s, fleet)
        except Exception as exc:
            out[kind] = f"error: {exc}".splitlines()[0][:120]
        _log(f"table: {group.name} {kind} in {time.monotonic() - began:.0f} s: {out[kind]}")
    return out


def ratio(row: Row, mine: Any, theirs: Any) -> str:
    if (isinstance(mine, int | float) and isinstance(theirs, int | float) and theirs
            and not (math.isnan(mine) or math.isnan(theirs))):
        return f"{mine / theirs:.2f}x"
    return "-"


def cell(figures: Figures | str | None, key: str, digits: int) -> tuple[str, Any]:
    if figures is None:
        return "-", None
    if isinstance(figures, str):
        return figures, None
    value = figures.get(key)
    if isinstance(value, int | float):
        return _number(value, digits), value
    return (value if isinstance(value, str) else "-"), None


def machine() -> str:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, Python {sys.version.split()[0]}"


def _commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, cwd=REPO)
    return done.stdout.strip() or "?"


def format_table(s: Settings, results: dict[str, dict[str, Figures | str]], command: str,
                 started: tuple[datetime, tuple[float, ...]],
                 ended: tuple[datetime, tuple[float, ...]]) -> str:
    servers = list(s.servers)
    peers = [k for k in servers if k != "presenced"]
    mine = "presenced" in servers
    header = ["", *(NAMES[k] for k in servers),
              *(f"presenced ÷ {NAMES[k]}" for k in peers if mine), "benchmark"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in ROWS:
        if row.group not in results:
            continue
        got = results[row.group]
        cells, values = [], {}
        for kind in servers:
            key = row.key if kind == "presenced" else (row.peer_key or row.key)
            text, values[kind] = cell(got.get(kind), key, row.digits)
            cells.append(text.replace("|", "/"))
        ratios = [ratio(row, values.get("presenced"), values[k]) for k in peers if mine]
        label = row.label + ("" if row.higher_is_better else " (lower is better)")
        lines.append("| " + " | ".join([label, *cells, *ratios,
                                        f"`{row.command or GROUPS[row.group].command}`"])
                     + " |")
    versions = ", ".join(f"{NAMES[k]} {_version(k) if k != 'presenced' else _commit()}"
                         for k in servers)
    (t0, load0), (t1, load1) = started, ended
    minutes = (t1 - t0).total_seconds() / 60
    out = [
        f"Command: `{command}`{' (smoke parameters: the figures mean nothing)' if s.quick else ''}",
        "",
        f"Machine: {machine()}; load average (1, 5, 15 min) "
        f"{' '.join(f'{x:.2f}' for x in load0)} at the start, "
        f"{' '.join(f'{x:.2f}' for x in load1)} at the end",
        "",
        f"Date: {t0:%Y-%m-%d %H:%M} – {t1:%H:%M} UTC ({minutes:.1f} minutes); servers: "
        f"{versions}",
        "",
        *lines,
        "",
        "Ratios are presenced's figure divided by the peer's (above 1: presenced higher; for "
        "the rows where lower is better, below 1 is presenced ahead). Absolute figures vary "
        "1.6x between machines and with the load other work puts on this one: only the "
        "ratios carry over. Server CPU is utime+stime of the server's process tree from /proc "
        "over the measured window; one fresh server per measurement, one at a time.",
        "",
        *(f"- {g}: {GROUPS[g].describe(s)}" for g in GROUPS if g in results),
    ]
    return "\n".join(out) + "\n"


def run(s: Settings) -> dict[str, dict[str, Figures | str]]:
    raise_nofile_limit()  # inherited by the servers and the generators
    results: dict[str, dict[str, Figures | str]] = {}
    fleet = Fleet(s.messages.procs)
    try:
        for name in s.groups:
            results[name] = measure_group(GROUPS[name], s, fleet)
    finally:
        fleet.close()
    return results


def parse_args(argv: Sequence[str] | None) -> tuple[Settings, Path, Path | None]:
    ap = argparse.ArgumentParser(prog="python -m bench.table",
                                 description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="tiny parameters, a few minutes (a smoke run)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/table.md"),
                    help="the Markdown table (default bench/results/table.md); tsung's "
                         "reports go to tsung/ beside it")
    ap.add_argument("--json", type=Path, default=None, help="every figure, as JSON")
    ap.add_argument("--servers", default=",".join(SERVERS))
    ap.add_argument("--rows", default=",".join(GROUPS),
                    help="row groups, among " + ", ".join(GROUPS))
    ap.add_argument("--many-sessions", type=Path, default=MANY_SESSIONS_JSON,
                    help=f"bench.many_sessions' JSON result (default {MANY_SESSIONS_JSON})")
    args = ap.parse_args(argv)
    servers = tuple(k.strip() for k in args.servers.split(",") if k.strip())
    groups = tuple(g.strip() for g in args.rows.split(",") if g.strip())
    for k in servers:
        if k not in SERVERS:
            ap.error(f"unknown server {k!r}")
    for g in groups:
        if g not in GROUPS:
            ap.error(f"unknown row group {g!r}")
    s = Settings.for_quick() if args.quick else Settings()
    s = replace(s, servers=servers, groups=groups, many_sessions=args.many_sessions,
                tsung_params=replace(s.tsung_params, out=args.out.parent / "tsung"))
    return s, args.out, args.json


def main(argv: Sequence[str] | None = None) -> int:
    s, out, json_out = parse_args(argv)
    command = shlex.join(["python", "-m", "bench.table",
                          *(sys.argv[1:] if argv is None else argv)])
    started = (datetime.now(UTC), os.getloadavg())
    if "tsung" in s.groups:
        s.tsung_params.out.mkdir(parents=True, exist_ok=True)
        (s.tsung_params.out / "users.csv").write_text(tsung.users_csv(s.tsung_params))
    results = run(s)
    text = format_table(s, results, command, started, (datetime.now(UTC), os.getloadavg()))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    if json_out is not None:
        json_out.write_text(json.dumps({"command": command, "results": results}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
