"""`presenced ctl`: the running server's local admin socket, and what it and the XEP-0133
commands (server/modules/admin_adhoc.py) do to a running server.

The socket is ``<data_dir>/presenced.sock``, a Unix stream socket with mode 0600 in a data_dir
of mode 0700, and it also checks that the peer runs as the server's user (or root, SO_PEERCRED):
only the account that runs presenced can use it. One request per connection, a JSON line
``{"command": "kick", "args": ["alice@example.org"]}``, answered by one JSON line
``{"ok": true, "output": "..."}``. Commands:

  status          version, pid, uptime, domains, sessions, federation links
  sessions        one line per session: full JID, peer address, transport
  kick JID        end a session (full JID) or every session of an account (bare JID)
  reload          re-read the configuration and the certificates, keeping every session
  announce TEXT   a message from the domain to every online session
  stats           counters: sessions, accounts online, connections, s2s links, memory

``reload`` (and SIGHUP) swap the TLS contexts (c2s STARTTLS and direct TLS, per-domain SNI
ones, federation's, the HTTPS listener's) so that new connections get the new certificate,
apply ``admins`` and ``[log] level`` at once, and name every other changed setting as needing
a restart, in the reply and in the log. A configuration with errors changes nothing.

Readiness for systemd (Type=notify): `sd_notify` sends READY=1, RELOADING=1 and STOPPING=1 as
a datagram to $NOTIFY_SOCKET (sd_notify(3)), with no library.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import resource
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server import listening
from server.jid import JID, InvalidJID
from server.xml import ns
from server.xml import stanza as st

if TYPE_CHECKING:
    from lxml.etree import _Element

    from server.app import Server
    from server.config import Config
    from server.module import ModuleContext

log = logging.getLogger("presenced")

SOCKET_NAME = "presenced.sock"
_MAX_REQUEST = 64 * 1024
# Settings applied by a reload; every other changed one needs a restart.
_LIVE = ("path", "admins", "log", "tls")


def socket_path(config: Config) -> Path:
    return config.data_dir / SOCKET_NAME


# -- what the commands do ----------------------------------------------------------------------


def end_sessions(server: ModuleContext, jid: JID, condition: str, text: str) -> int:
    """Close the session of a full JID, or every session of a bare one, with a stream error
    (RFC 6120 §4.9.3); how many there were."""
    sessions = ([s] if (s := server.sessions.get(jid)) is not None else []) if jid.resource \
        else server.sessions.resources(jid)
    for session in sessions:
        log.info("event=session-ended jid=%s condition=%s", session.jid_str, condition)
        session.close(condition, text)
    return len(sessions)


def server_message(domain: str, to: str, body: str, subject: str | None = None) -> _Element:
    message = st.element(st.MESSAGE, {"from": domain, "to": to, "type": "normal"})
    if subject:
        st.child(message, ns.q(ns.CLIENT, "subject"), text=subject)
    st.child(message, ns.q(ns.CLIENT, "body"), text=body)
    return message


def announce(server: ModuleContext, domain: str | None, body: str,
             subject: str | None = None) -> int:
    """A message from the domain to each online session (of every domain when None); how many
    were sent."""
    count = 0
    for session in server.sessions.all():
        if domain is None or session.jid.domain == domain:
            session.send(server_message(session.jid.domain, session.jid_str, body, subject))
            count += 1
    log.info("event=announced domain=%s sessions=%d", domain or "*", count)
    return count


def _changed(old: Config, new: Config) -> list[str]:
    """The settings that differ and that a reload does not apply."""
    changed = [f.name for f in dataclasses.fields(old)
               if f.name not in _LIVE and f.name != "modules"
               and getattr(old, f.name) != getattr(new, f.name)]
    changed += [f"[{name}]" for name in sorted(set(old.modules) | set(new.modules))
                if old.modules.get(name) != new.modules.get(name)]
    return changed


async def reload(server: Server) -> tuple[bool, str]:
    """Re-read the configuration file and the certificates. (ok, a report for the admin)."""
    from server.config import ConfigErrors, load_config

    notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
    try:
        old = server.config
        new = old
        if old.path is not None:
            sections = {name: type(settings) for name, settings in old.modules.items()}
            try:
                new = load_config(old.path, sections=sections)
                if listening.ports_shared():  # a worker of serve --workers: its derived name
                    new = dataclasses.replace(new, cluster=dataclasses.replace(
                        new.cluster, node=old.cluster.node))
            except ConfigErrors as exc:
                for error in exc.errors:
                    log.error("event=reload-failed error=%s", str(error).replace(" ", "_"))
                return False, "\n".join(["configuration not reloaded, nothing changed:",
                                         *(str(e) for e in exc.errors)])
        try:
            server.reload_tls(new.tls)
        except Exception as exc:  # unreadable files, a key that is not the certificate's, ...
            log.error("event=reload-failed reason=tls error=%s", type(exc).__name__)
            return False, f"certificates not reloaded, nothing changed: {exc}"
        restart = _changed(old, new)
        server.config = dataclasses.replace(old, admins=new.admins, log=new.log, tls=new.tls)
        if new.log.level != old.log.level:
            logging.getLogger().setLevel(new.log.level.upper())
        lines = ["reloaded: certificates, admins, [log]"]
        if restart:
            lines.append(f"needs a restart to take effect: {', '.join(restart)}")
        log.info("event=reloaded restart_needed=%s", ",".join(restart) or "-")
        return True, "\n".join(lines)
    finally:
        notify("READY=1")


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _s2s_links(server: Server) -> tuple[int, int]:
    federation = server.federation
    if federation is None:
        return 0, 0
    return len(federation.inbound), len(federation.outbound)


# -- the socket --------------------------------------------------------------------------------


class AdminSocket:
    def __init__(self, server: Server) -> None:
        self.server = server
        self.path = socket_path(server.config)
        self.started = time.monotonic()
        self._listener: asyncio.AbstractServer | None = None
        self.commands: dict[str, tuple[int, Callable[[list[str]], Awaitable[tuple[bool, str]]]]]
        self.commands = {  # name -> (number of arguments, run)
            "status": (0, self._status), "sessions": (0, self._sessions),
            "kick": (1, self._kick), "reload": (0, self._reload),
            "announce": (1, self._announce), "stats": (0, self._stats),
        }

    async def start(self) -> None:
        self.started = time.monotonic()
        path = self.path
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.is_socket():
            if _answers(path):
                log.error("event=ctl-socket-in-use path=%s", path)
                return  # another presenced on this data_dir: leave it its socket
            path.unlink()
        try:
            self._listener = await asyncio.start_unix_server(self._serve, path=str(path),
                                                              limit=_MAX_REQUEST)
        except OSError as exc:  # a path too long for sun_path, a read-only directory, ...
            log.error("event=ctl-socket-failed path=%s error=%s", path,
                      (exc.strerror or str(exc)).replace(" ", "_"))
            return
        os.chmod(path, 0o600)
        log.info("event=listening kind=ctl address=%s", path)

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            self.path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                    struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
            if uid not in (0, os.getuid()):
                log.info("event=ctl-refused uid=%d", uid)
                return await _reply(writer, False, "not the server's user")
            try:
                line = await asyncio.wait_for(reader.readline(), 10)
            except (TimeoutError, ValueError):  # ValueError: longer than the limit
                return await _reply(writer, False, "no request")
            ok, output = await self.handle(line)
            await _reply(writer, ok, output)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def handle(self, line: bytes) -> tuple[bool, str]:
        try:
            request = json.loads(line)
            name, args = request["command"], request.get("args", [])
            if not isinstance(name, str) or not isinstance(args, list) or \
                    not all(isinstance(a, str) for a in args):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            log.info("event=ctl-bad-request")
            return False, "bad request: expected {\"command\": NAME, \"args\": [STRING, ...]}"
        command = self.commands.get(name)
        if command is None:
            return False, f"unknown command {name!r}; known: {', '.join(self.commands)}"
        if len(args) != command[0]:
            return False, f"{name} takes {command[0]} argument(s)"
        log.info("event=ctl-command command=%s", name)
        return await command[1](args)

    async def _status(self, _args: list[str]) -> tuple[bool, str]:
        from server.cli import version

        server = self.server
        inbound, outbound = _s2s_links(server)
        return True, "\n".join([
            f"presenced {version()} running, pid {os.getpid()}",
            f"uptime: {int(time.monotonic() - self.started)} s",
            f"domains: {', '.join(server.config.domains)}",
            f"sessions: {len(server.sessions)}",
            f"s2s links: {inbound} in, {outbound} out",
        ])

    async def _sessions(self, _args: list[str]) -> tuple[bool, str]:
        lines = []
        for session in sorted(self.server.sessions.all(), key=lambda s: s.jid_str):
            transport = session.transport
            peer = getattr(transport, "peer", "") or "-"
            kind = getattr(transport, "kind", None) or ("detached" if transport is None
                                                         else type(transport).__name__)
            lines.append(f"{session.jid_str} {peer} {kind}")
        return True, "\n".join(lines) if lines else "no sessions"

    async def _kick(self, args: list[str]) -> tuple[bool, str]:
        try:
            jid = JID.parse(args[0])
        except InvalidJID as exc:
            return False, f"invalid JID {args[0]!r}: {exc}"
        count = end_sessions(self.server, jid, "policy-violation",
                             "session ended by an administrator")
        return (True, f"ended {count} session(s) of {jid}") if count else \
            (False, f"{jid} has no session")

    async def _reload(self, _args: list[str]) -> tuple[bool, str]:
        return await self.server.reload()

    async def _announce(self, args: list[str]) -> tuple[bool, str]:
        if not args[0].strip():
            return False, "empty announcement"
        return True, f"sent to {announce(self.server, None, args[0])} session(s)"

    async def _stats(self, _args: list[str]) -> tuple[bool, str]:
        server = self.server
        inbound, outbound = _s2s_links(server)
        accounts = {s.bare_str for s in server.sessions.all()}
        return True, "\n".join([
            f"sessions {len(server.sessions)}",
            f"accounts_online {len(accounts)}",
            f"c2s_connections {len(server.connections)}",
            f"s2s_inbound {inbound}",
            f"s2s_outbound {outbound}",
            f"memory_rss_bytes {_rss_bytes()}",
            f"uptime_seconds {int(time.monotonic() - self.started)}",
        ])


async def _reply(writer: asyncio.StreamWriter, ok: bool, output: str) -> None:
    writer.write(json.dumps({"ok": ok, "output": output}).encode() + b"\n")
    await writer.drain()


def _answers(path: Path) -> bool:
    """Whether a server listens on this socket (else it is a stale one, left by a crash)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


# -- the client: presenced ctl -----------------------------------------------------------------


def call(path: Path, command: str, args: list[str], timeout: float = 30.0) -> tuple[bool, str]:
    """Send one command to a running server. OSError when there is none on that socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(json.dumps({"command": command, "args": args}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    try:
        answer: Any = json.loads(data)
        return bool(answer["ok"]), str(answer["output"])
    except (ValueError, KeyError, TypeError):
        return False, "the server gave no answer"


# -- systemd readiness -------------------------------------------------------------------------


def notify(*fields: str) -> bool:
    """sd_notify(3) without libsystemd: a datagram to $NOTIFY_SOCKET (a path, or an abstract
    socket when it starts with '@'). Whether it was sent (False when not run by systemd)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or address[0] not in "/@":
        return False
    target = "\0" + address[1:] if address[0] == "@" else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(fields).encode(), target)
    except OSError as exc:
        log.warning("event=sd-notify-failed error=%s", (exc.strerror or "").replace(" ", "_"))
        return False
    return True
