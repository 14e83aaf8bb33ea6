"""tsung, ProcessOne's own XMPP load generator (Debian's `tsung` 1.7), against presenced, Prosody
and ejabberd in one go (issue 25 item 6): an independent check of bench/'s own figures.

    python -m bench.tsung [--users 200] [--arrival 50] [--chat 10] [--think 1]
                          [--servers presenced,prosody,ejabberd] [--out bench-tsung] [--dump]

One fresh server at a time, the same scenario for each: `users` sessions arrive at `arrival` per
second; each connects with TLS (direct, port 5223), logs in with SCRAM-SHA-1, binds, sends
initial presence, gets its roster, joins one of `users / 10` MUC rooms, then alternates `chat`
one-to-one messages to its partner (online: every session is paired with another) and groupchat
messages, then closes.
tsung 1.7 knows only PLAIN and DIGEST, so the SCRAM exchange is written here: raw `<auth/>` and
`<response/>` stanzas whose payloads tsung computes with Erlang code (`setdynvars
sourcetype="eval"`: PBKDF2, HMAC-SHA-1) from the server's challenge it captured.

Output: a table (sessions that logged in, mean and max of tsung's transaction times for connect,
login, roster, MUC join, messages sent, the server's CPU seconds and CPU per session, RSS at the
end) and, for each server, tsung's own log directory with its HTML report and graphs made by
`tsung_stats.pl` (`<out>/<server>/report.html`).

Where tsung's figures and bench/'s disagree: tsung's clients are Erlang processes of one VM with
think times (a user's life, not a saturation test), so its CPU per message includes logins and
presence; bench/ saturates one operation at a time. Compare per-session CPU here with
bench.run's login and message rows, not throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import html
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.muc_fanout import NO_RATE_LIMIT
from bench.peers import EjabberdPeer, Peer, PresencedPeer, ProsodyPeer
from bench.run import DOMAIN, PASSWORD

ADDRESSES = {"presenced": "127.0.0.27", "prosody": "127.0.0.28", "ejabberd": "127.0.0.29"}
SERVICE = f"muc.{DOMAIN}"
# Direct TLS (XEP-0368): tsung 1.7's STARTTLS hangs after <proceed/> on Debian's Erlang/OTP 25
# (against Prosody as against us), its type="ssl" transport works.
TLS_PORT = 5223
STATS = Path("/usr/lib/x86_64-linux-gnu/tsung/bin/tsung_stats.pl")
DTD = "/usr/share/tsung/tsung-1.0.dtd"

# SCRAM-SHA-1 (RFC 5802 §3) in Erlang, for tsung's eval dynamic variables. The client-first
# message is "n,,n=<user>,r=<cnonce>"; the proof is ClientKey XOR HMAC(StoredKey, AuthMessage).
_BIN = "B = fun(V) -> iolist_to_binary(V) end"
CLIENT_FIRST = f"""fun({{_Pid, D}}) -> {_BIN},
  {{ok, U}} = ts_dynvars:lookup(username, D), {{ok, C}} = ts_dynvars:lookup(cnonce, D),
  base64:encode(<<"n,,n=", (B(U))/binary, ",r=", (B(C))/binary>>) end."""
CLIENT_FINAL = f"""fun({{_Pid, D}}) -> {_BIN},
  {{ok, U}} = ts_dynvars:lookup(username, D), {{ok, P}} = ts_dynvars:lookup(password, D),
  {{ok, C}} = ts_dynvars:lookup(cnonce, D), {{ok, Ch}} = ts_dynvars:lookup(challenge, D),
  First = base64:decode(B(Ch)),
  Attrs = [list_to_tuple(binary:split(A, <<"=">>)) || A <- binary:split(First, <<",">>, [global])],
  R = proplists:get_value(<<"r">>, Attrs),
  Salt = base64:decode(proplists:get_value(<<"s">>, Attrs)),
  I = binary_to_integer(proplists:get_value(<<"i">>, Attrs)),
  Salted = crypto:pbkdf2_hmac(sha, B(P), Salt, I, 20),
  ClientKey = crypto:mac(hmac, sha, Salted, <<"Client Key">>),
  Final = <<"c=biws,r=", R/binary>>,
  Auth = <<"n=", (B(U))/binary, ",r=", (B(C))/binary, ",", First/binary, ",", Final/binary>>,
  Sig = crypto:mac(hmac, sha, crypto:hash(sha, ClientKey), Auth),
  base64:encode(<<Final/binary, ",p=", (base64:encode(crypto:exor(ClientKey, Sig)))/binary>>)
end."""

SASL = "urn:ietf:params:xml:ns:xmpp-sasl"


@dataclass(frozen=True)
class Params:
    users: int = 200       # sessions, paired for one-to-one chat
    arrival: float = 50.0  # new sessions per second
    chat: int = 10         # rounds of (one message to the partner, one to the room) per session
    think: float = 1.0     # seconds between rounds
    out: Path = Path("bench-tsung")
    dump: bool = False     # tsung's traffic dump (for debugging a scenario)

    @property
    def rooms(self) -> int:
        return max(1, self.users // 10)


def _raw(data: str, ack: str = "local") -> str:
    return f'<jabber type="raw" ack="{ack}" data={_attr(data)}/>'


def _attr(value: str) -> str:
    return '"' + html.escape(value, quote=True) + '"'


def scenario(p: Params, host: str) -> str:
    """The tsung configuration: users from users.csv (name;password;partner;room)."""
    chat_rounds = "\n".join(f"""
    <thinktime value="{p.think:g}" random="false"/>
    <transaction name="chat">
      <request subst="true">{_raw(
          "<message to='%%_partner%%@" + DOMAIN + "' type='chat' id='c" + str(i)
          + "'><body>tsung says hello, round " + str(i) + "</body></message>", "no_ack")}</request>
    </transaction>
    <transaction name="groupchat">
      <request subst="true">{_raw(
          "<message to='room%%_room%%@" + SERVICE + "' type='groupchat' id='g" + str(i)
          + "'><body>tsung in the room, round " + str(i) + "</body></message>", "no_ack")}</request>
    </transaction>""" for i in range(p.chat))
    # tsung ends a phase at its duration even when not every user was launched: room to spare
    # (maxnumber stops it at `users`)
    duration = math.ceil(p.users / p.arrival * 1.5) + 1
    dump = "true" if p.dump else "false"
    return f"""<?xml version="1.0"?>
<!DOCTYPE tsung SYSTEM "{DTD}">
<tsung loglevel="notice" dumptraffic="{dump}" version="1.0">
  <clients>
    <client host="localhost" use_controller_vm="true" maxusers="{p.users + 10}"/>
  </clients>
  <servers>
    <server host="{DOMAIN}" port="{TLS_PORT}" type="ssl"/>
  </servers>
  <load>
    <arrivalphase phase="1" duration="{duration}" unit="second">
      <users arrivalrate="{p.arrival:g}" unit="second" maxnumber="{p.users}"/>
    </arrivalphase>
  </load>
  <options>
    <option type="ts_jabber" name="domain" value="{DOMAIN}"/>
    <option type="ts_jabber" name="muc_service" value="{SERVICE}"/>
    <option type="ts_jabber" name="userid_max" value="0"/>
    <option name="file_server" id="userdb" value="{p.out.resolve()}/users.csv"/>
  </options>
  <sessions>
   <session probability="100" name="xmpp-user" type="ts_jabber">
    <setdynvars sourcetype="file" fileid="userdb" delimiter=";" order="iter">
      <var name="username"/><var name="password"/><var name="partner"/><var name="room"/>
    </setdynvars>
    <setdynvars sourcetype="random_string" length="24"><var name="cnonce"/></setdynvars>
    <transaction name="connect">
      <request subst="true"><jabber type="connect" ack="local">
        <xmpp_authenticate username="%%_username%%" passwd="%%_password%%"/></jabber></request>
    </transaction>
    <!-- "local" acks the first packet: the stream header; the features may follow in another,
         which must not be taken for the next answer (the SCRAM challenge) -->
    <thinktime value="0.2" random="false"/>
    <setdynvars sourcetype="eval" code={_attr(CLIENT_FIRST)}><var name="client_first"/></setdynvars>
    <transaction name="login">
      <request subst="true">
        <dyn_variable name="challenge" re="&lt;challenge[^&gt;]*&gt;([^&lt;]*)&lt;/challenge&gt;"/>
        {_raw(f"<auth xmlns='{SASL}' mechanism='SCRAM-SHA-1'>%%_client_first%%</auth>")}
      </request>
      <setdynvars sourcetype="eval" code={_attr(CLIENT_FINAL)}>
        <var name="client_final"/></setdynvars>
      <request subst="true">
        <match do="abort" when="match">failure</match>
        {_raw(f"<response xmlns='{SASL}'>%%_client_final%%</response>")}
      </request>
    </transaction>
    <request><jabber type="connect" ack="local"/></request>
    <thinktime value="0.2" random="false"/>
    <transaction name="bind">
      <request><jabber type="auth_sasl_bind" ack="local"/></request>
      <request><jabber type="auth_sasl_session" ack="local"/></request>
    </transaction>
    <request><jabber type="presence:initial" ack="no_ack"/></request>
    <transaction name="roster">
      <request><jabber type="iq:roster:get" ack="local"/></request>
    </transaction>
    <transaction name="muc_join">
      <request subst="true">
        <jabber type="muc:join" ack="local" room="room%%_room%%" nick="%%_username%%"/></request>
    </transaction>
    <!-- the room's creator unlocks it as an instant room (XEP-0045 §10.1.2); the others get
         forbidden, which changes nothing -->
    <request subst="true">{_raw(
        "<iq type='set' id='unlock' to='room%%_room%%@" + SERVICE + "'><query xmlns="
        "'http://jabber.org/protocol/muc#owner'><x xmlns='jabber:x:data' type='submit'/>"
        "</query></iq>", "no_ack")}</request>
    <!-- everyone is in before the talk starts (the partner is online) -->
    <thinktime value="{duration + 2}" random="false"/>{chat_rounds}
    <thinktime value="2" random="false"/>
    <transaction name="close">
      <request><jabber type="close" ack="no_ack"/></request>
    </transaction>
   </session>
  </sessions>
</tsung>
"""


def users_csv(p: Params) -> str:
    rows = []
    for i in range(p.users):
        partner = i ^ 1 if (i ^ 1) < p.users else i
        rows.append(f"t{i:05d};{PASSWORD};t{partner:05d};{i % p.rooms}")
    return "\n".join(rows) + "\n"


def make_peer(kind: str, host: str | None = None) -> Peer:
    host = host or ADDRESSES[kind]
    if kind == "presenced":  # as shipped: every message archived, rooms archived
        return PresencedPeer(host=host, c2s_port=5222, c2s_direct_tls_port=TLS_PORT,
                             domains=(DOMAIN,),
                             extra_config=NO_RATE_LIMIT)
    if kind == "prosody":
        return ProsodyPeer(host=host, c2s_port=5222, c2s_direct_tls_port=TLS_PORT,
                             domains=(DOMAIN,),
                           components={SERVICE: "muc"})
    if kind == "ejabberd":
        return EjabberdPeer(host=host, c2s_port=5222, c2s_direct_tls_port=TLS_PORT,
                             domains=(DOMAIN,),
                            in_band_registration=True,
                            extra_modules={"mod_muc": {"hosts": [SERVICE]}})
    raise ValueError(kind)


def parse_log(log_dir: Path) -> dict[str, Any]:
    """tsung.log's last cumulative figures: transactions (count, mean ms, max ms), requests,
    errors, users connected at most."""
    text = (log_dir / "tsung.log").read_text(errors="replace")
    out: dict[str, Any] = {"tr": {}, "errors": {}}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 2 or parts[0] != "stats:":
            continue
        name = parts[1]
        if name.startswith("tr_") and len(parts) >= 9:
            # stats: name count mean stddev max min meanfb countfb: the interval's figures, then
            # the cumulative mean and count; max is the highest seen so far
            total = out["tr"].setdefault(name[3:], [0, 0.0, 0.0])
            total[0], total[1] = int(parts[8]) + int(parts[2]), float(parts[3]) if not int(
                parts[8]) else (float(parts[7]) * int(parts[8]) + float(parts[3]) * int(
                    parts[2])) / (int(parts[8]) + int(parts[2]))
            total[2] = max(total[2], float(parts[5]))
        elif name.startswith("error_") or name in ("error_abort", "error_connect_econnrefused"):
            out["errors"][name] = out["errors"].get(name, 0) + int(parts[2])
        elif name == "users":
            out["users_max"] = max(out.get("users_max", 0), int(parts[3]))
        elif name == "request" and len(parts) >= 3:
            out["requests"] = out.get("requests", 0) + int(parts[2])
    return out


def _tsung(argv: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """tsung in a session of its own: on timeout its Erlang VM goes too (a leftover controller
    would hold the node name and the next run would refuse to start)."""
    env = dict(os.environ, ERL_FLAGS=f"-kernel inetrc '\"{cwd / 'inetrc'}\"'")
    process = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True, env=env)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise RuntimeError(f"tsung did not finish within {timeout:.0f} s") from None
    return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)


def run_one(kind: str, p: Params, log: Any = print, host: str | None = None) -> dict[str, Any]:
    """tsung's scenario against one fresh server (on host, by default its own address):
    tsung.log's figures (parse_log) with the server's CPU seconds, RSS and tsung's log dir."""
    peer = make_peer(kind, host)
    users = [f"t{i:05d}" for i in range(p.users)]
    target = loadgen.Target(peer.host, 5222, DOMAIN, PASSWORD)
    if isinstance(peer, ProsodyPeer | PresencedPeer):
        peer.write_accounts(DOMAIN, users, PASSWORD)
    peer.start()
    try:
        if isinstance(peer, EjabberdPeer):
            asyncio.run(loadgen.register_inband(target, users))
            peer.restart()
        out_dir = (p.out / kind).resolve()
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
        config = out_dir / "scenario.xml"
        config.write_text(scenario(p, peer.host))
        cpu0, began = peer.cpu_seconds(), time.monotonic()
        # tsung connects to the domain's name, so that its TLS client sends SNI for it (with
        # the address, Prosody and ejabberd refuse the handshake: unrecognized_name); Erlang's
        # resolver is given the loopback address through an inetrc file.
        inetrc = out_dir / "inetrc"
        inetrc.write_text(f'{{host, {{{peer.host.replace(".", ",")}}}, ["{DOMAIN}"]}}.\n'
                          '{lookup, [file, native]}.\n')
        done = _tsung(["tsung", "-n", "-i", f"bench{os.getpid()}", "-f", str(config),
                       "-l", str(out_dir), "start"], out_dir,
                      timeout=120 + p.users / p.arrival + p.chat * p.think * 2)
        cpu = peer.cpu_seconds() - cpu0
        seconds = time.monotonic() - began
        rss = peer.rss_kib()
        if done.returncode != 0:
            raise RuntimeError(f"tsung failed ({done.returncode}): {done.stdout[-2000:]}"
                               f"{done.stderr[-2000:]}")
        runs = [d for d in out_dir.iterdir() if d.is_dir() and (d / "tsung.log").exists()]
        if not runs:
            raise RuntimeError(f"tsung wrote no log: {done.stdout[-2000:]}")
        run_dir = max(runs, key=lambda d: d.stat().st_mtime)
        figures = parse_log(run_dir)
        if STATS.exists():
            subprocess.run(["perl", str(STATS)], cwd=run_dir, capture_output=True, timeout=300,
                           check=False)
            report = run_dir / "report.html"
            if report.exists():
                (out_dir / "report.html").unlink(missing_ok=True)
                (out_dir / "report.html").symlink_to(report)
        figures.update(cpu=cpu, seconds=seconds, rss_kib=rss, log_dir=str(run_dir))
        log(f"{kind}: tsung done in {seconds:.1f} s, server CPU {cpu:.2f} s")
        return figures
    finally:
        peer.stop()


def table(p: Params, results: dict[str, dict[str, Any]]) -> str:
    names = ("connect", "login", "bind", "roster", "muc_join", "chat", "groupchat")
    head = (f"{'server':<10} {'logged in':>9} " + " ".join(f"{n + ' ms':>13}" for n in names)
            + f" {'CPU s':>7} {'CPU ms/user':>11} {'RSS MiB':>8} errors")
    lines = [head, "-" * len(head)]
    for kind, r in results.items():
        if "error" in r:
            lines.append(f"{kind:<10} {r['error']}")
            continue
        tr = r["tr"]

        def cell(name: str, tr: dict[str, list[Any]] = tr) -> str:
            count, mean, mx = tr.get(name, (0, 0.0, 0.0))
            return f"{mean:6.1f}/{mx:<6.0f}" if count else f"{'-':>13}"
        logged = tr.get("bind", (0, 0, 0))[0]  # a failed SCRAM aborts before binding
        errors = ",".join(f"{k}={v}" for k, v in sorted(r["errors"].items())) or "-"
        lines.append(f"{kind:<10} {logged:>9} " + " ".join(f"{cell(n):>13}" for n in names)
                     + f" {r['cpu']:>7.2f} {r['cpu'] * 1000 / max(1, logged):>11.2f}"
                     f" {r['rss_kib'] / 1024:>8.1f} {errors}")
    lines.append(f"(transaction times: mean/max ms as tsung measured them; {p.users} users at "
                 f"{p.arrival:g}/s, {p.chat} rounds of 1:1 + groupchat, {p.think:g} s apart; "
                 f"presenced as shipped: archiving on; reports under {p.out}/<server>/)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--users", type=int, default=Params.users)
    parser.add_argument("--arrival", type=float, default=Params.arrival)
    parser.add_argument("--chat", type=int, default=Params.chat)
    parser.add_argument("--think", type=float, default=Params.think)
    parser.add_argument("--servers", default="presenced,prosody,ejabberd")
    parser.add_argument("--out", type=Path, default=Params.out)
    parser.add_argument("--dump", action="store_true", help="tsung's traffic dump")
    args = parser.parse_args(argv)
    if shutil.which("tsung") is None:
        print("tsung is not installed (apt-get install tsung)", file=sys.stderr)
        return 2
    p = Params(users=args.users + args.users % 2, arrival=args.arrival, chat=args.chat,
               think=args.think, out=args.out, dump=args.dump)
    p.out.mkdir(parents=True, exist_ok=True)
    (p.out / "users.csv").write_text(users_csv(p))
    results: dict[str, dict[str, Any]] = {}
    for kind in args.servers.split(","):
        try:
            results[kind] = run_one(kind, p)
        except Exception as exc:
            results[kind] = {"error": f"error: {exc}"[:400]}
            print(f"{kind}: {exc}", file=sys.stderr)
    print(table(p, results))
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
