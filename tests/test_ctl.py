"""`presenced ctl` over the admin socket, reload and SIGHUP (server/ctl.py): a reload keeps live
sessions and new TLS connections (c2s, per-domain SNI, HTTPS) get the new certificate; kick and
announce reach real clients; systemd readiness datagrams."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest
import slixmpp
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from server.certs import generate_self_signed
from tests.conftest import PASSWORD, RunningServer, start_server, stop_server
from tests.process import drain, free_port, free_ports, presenced
from tests.rawclient import insecure_context
from tests.test_cli import env

ROOT = Path(__file__).resolve().parent.parent


async def ctl(config: Path, *args: str) -> tuple[int, str, str]:
    """presenced ctl as a subprocess, without blocking the server's loop in this process."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", "ctl", "--config", str(config), *args,
        env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def der(pem_path: Path) -> bytes:
    return x509.load_pem_x509_certificate(pem_path.read_bytes()).public_bytes(
        serialization.Encoding.DER)


async def served_certificate(host: str, port: int, server_name: str) -> bytes:
    """The certificate a new direct-TLS connection is shown (SNI: server_name)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    _reader, writer = await asyncio.wait_for(asyncio.open_connection(
        host, port, ssl=ctx, server_hostname=server_name), 10)
    try:
        peer = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        assert peer is not None
        return bytes(peer)
    finally:
        writer.close()


async def starttls_certificate(running: RunningServer, domain: str) -> bytes:
    """The certificate a new c2s connection is shown after STARTTLS."""
    client = await running.raw()
    try:
        await client.open(domain)
        await client.send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        await client.next()
        await client.writer.start_tls(insecure_context(), server_hostname=domain)  # SNI
        peer = client.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        assert peer is not None
        return bytes(peer)
    finally:
        await client.close()


async def still_alive(xmpp: slixmpp.ClientXMPP) -> None:
    """The session answers: an iq round trip to the server."""
    iq = xmpp.Iq(stype="get", sto=xmpp.boundjid.domain)
    iq.xml.append(ElementTree.Element("{urn:xmpp:ping}ping"))
    reply = await asyncio.wait_for(iq.send(), 10)
    assert reply["type"] == "result"


async def _with_sni(tmp_path: Path, b_cert: Path, b_key: Path) -> RunningServer:
    from server.app import Server
    from server.config import load_config
    from tests.conftest import write_config

    path = write_config(tmp_path, s2s_tls=f"127.0.0.1:{free_port()}")
    text = path.read_text().replace(
        "[tls]\n", f'[tls]\ndomain_certificates = {{ "b.test" = ["{b_cert}", "{b_key}"] }}\n')
    path.write_text(text)
    server = Server(load_config(path))
    await server.start()
    return RunningServer(server, tmp_path / "data", path)


async def test_reload_keeps_sessions_and_serves_new_certificates(tmp_path: Path) -> None:
    logging.getLogger("slixmpp").setLevel(logging.CRITICAL)
    b_cert, b_key = tmp_path / "b.pem", tmp_path / "b.key"
    generate_self_signed(["b.test"], b_cert, b_key)
    running = await _with_sni(tmp_path, b_cert, b_key)
    try:
        sock = running.data_dir / "presenced.sock"
        assert stat.S_ISSOCK(sock.stat().st_mode)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        await running.add_user("alice@a.test")
        alice = await running.client("alice@a.test")
        alice_tls = await running.client("alice@a.test", resource="tls", direct_tls=True)
        host, port = running.address("c2s_tls")
        a_cert = running.data_dir / "cert.pem"
        old_a, old_b = der(a_cert), der(b_cert)
        assert await served_certificate(host, port, "a.test") == old_a
        assert await served_certificate(host, port, "b.test") == old_b
        assert await starttls_certificate(running, "b.test") == old_b

        # Renewed files on disk: nothing changes until the reload.
        generate_self_signed(["a.test", "b.test"], a_cert, running.data_dir / "key.pem")
        generate_self_signed(["b.test"], b_cert, b_key)
        new_a, new_b = der(a_cert), der(b_cert)
        assert new_a != old_a and new_b != old_b
        assert await served_certificate(host, port, "a.test") == old_a

        code, out, err = await ctl(running.config_path, "reload")
        assert code == 0, err
        assert "reloaded" in out and "restart" not in out
        assert await served_certificate(host, port, "a.test") == new_a
        assert await served_certificate(host, port, "b.test") == new_b
        # STARTTLS and federation's direct TLS too, and the live sessions go on.
        assert await starttls_certificate(running, "a.test") == new_a
        assert await starttls_certificate(running, "b.test") == new_b
        s2s_host, s2s_port = running.address("s2s_tls")
        assert await served_certificate(s2s_host, s2s_port, "b.test") == new_b
        assert await served_certificate(s2s_host, s2s_port, "a.test") == new_a
        new_login = await running.client("alice@a.test", resource="after")
        await still_alive(new_login)
        await still_alive(alice)
        await still_alive(alice_tls)
        assert running.server.sessions.get(_jid("alice@a.test/slix")) is not None
    finally:
        await stop_server(running)


def _jid(text: str) -> Any:
    from server.jid import JID
    return JID.parse(text)


async def test_reload_names_what_needs_a_restart_and_refuses_bad_configs(
        tmp_path: Path) -> None:
    running = await start_server(tmp_path)
    try:
        config = running.config_path
        original = config.read_text()
        host, port = running.address("c2s_tls")
        served = await served_certificate(host, port, "a.test")
        # A change of admins applies at once; one of [limits] needs a restart.
        config.write_text(original.replace("[listen]", 'admins = ["root@a.test"]\n[listen]')
                          + "\n[limits]\nmax_stanza_size = 100000\n")
        code, out, err = await ctl(config, "reload")
        assert code == 0, err
        assert "needs a restart to take effect: limits" in out
        assert running.server.config.admins == ("root@a.test",)
        assert running.server.config.limits.max_stanza_size != 100000
        # A configuration with an error changes nothing, and says where the error is.
        config.write_text(original.replace("[listen]", "bogus_key = 1\n[listen]"))
        code, out, err = await ctl(config, "reload")
        assert code == 1 and "bogus_key" in err and "nothing changed" in err
        assert "Traceback" not in err
        assert running.server.config.admins == ("root@a.test",)
        # A certificate that cannot be read: the old one is still served.
        config.write_text(original)
        (running.data_dir / "cert.pem").write_text("not a certificate")
        code, out, err = await ctl(config, "reload")
        assert code == 1 and "certificates not reloaded" in err
        assert await served_certificate(host, port, "a.test") == served
    finally:
        await stop_server(running)


async def test_kick_announce_status_sessions_stats(tmp_path: Path) -> None:
    logging.getLogger("slixmpp").setLevel(logging.CRITICAL)
    running = await start_server(tmp_path)
    try:
        for user in ("alice@a.test", "bob@b.test"):
            await running.add_user(user)
        alice = await running.client("alice@a.test", resource="pc")
        bob = await running.client("bob@b.test")
        config = running.config_path

        code, out, _err = await ctl(config, "status")
        assert code == 0 and "sessions: 2" in out and "a.test, b.test" in out
        code, out, _err = await ctl(config, "sessions")
        assert code == 0
        assert [line.split()[0] for line in out.splitlines()] == ["alice@a.test/pc",
                                                                   "bob@b.test/slix"]
        assert "127.0.0.1" in out
        code, out, _err = await ctl(config, "stats")
        assert code == 0
        stats = dict(line.split() for line in out.splitlines())
        assert stats["sessions"] == "2" and stats["accounts_online"] == "2"
        assert int(stats["memory_rss_bytes"]) > 1 << 20

        # announce: both get it, each from its own domain.
        got: dict[str, asyncio.Future[Any]] = {}
        for name, xmpp in (("alice", alice), ("bob", bob)):
            got[name] = asyncio.get_running_loop().create_future()
            xmpp.add_event_handler(
                "message", lambda m, f=got[name]: f.done() or f.set_result(m))
        code, out, _err = await ctl(config, "announce", "back", "in", "five", "minutes")
        assert code == 0 and "sent to 2 session(s)" in out
        for name, domain in (("alice", "a.test"), ("bob", "b.test")):
            message = await asyncio.wait_for(got[name], 5)
            assert message["body"] == "back in five minutes"
            assert str(message["from"]) == domain

        # kick: alice's session is closed by the server; bob's goes on.
        gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        alice.add_event_handler("disconnected", lambda _e: gone.done() or gone.set_result(None))
        code, out, _err = await ctl(config, "kick", "alice@a.test/pc")
        assert code == 0 and "ended 1 session(s)" in out
        await asyncio.wait_for(gone, 10)
        await still_alive(bob)
        code, _out, err = await ctl(config, "kick", "alice@a.test")
        assert code == 1 and "has no session" in err
        code, _out, err = await ctl(config, "kick", "@@bad")
        assert code == 1 and "invalid JID" in err and "Traceback" not in err
        code, _out, err = await ctl(config, "kick")
        assert code == 1 and "needs JID" in err
    finally:
        await stop_server(running)


async def test_ctl_without_a_server_and_bad_requests(tmp_path: Path) -> None:
    running = await start_server(tmp_path)
    config, sock = running.config_path, running.data_dir / "presenced.sock"
    try:
        # Raw protocol: bad JSON and unknown commands are answered, the server goes on.
        for request, words in ((b"not json\n", "bad request"),
                               (b'{"command": "nope"}\n', "unknown command"),
                               (b'{"command": "kick", "args": []}\n', "takes 1")):
            reader, writer = await asyncio.open_unix_connection(str(sock))
            writer.write(request)
            answer = await asyncio.wait_for(reader.readline(), 5)
            writer.close()
            assert b'"ok": false' in answer and words.encode() in answer
    finally:
        await stop_server(running)
    assert not sock.exists()
    code, _out, err = await ctl(config, "status")
    assert code == 1 and "no running presenced" in err


def notify_socket(tmp_path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(30)
    return sock


def next_notification(sock: socket.socket) -> set[str]:
    return set(sock.recv(4096).decode().split("\n"))


async def test_sighup_reloads_a_running_process(tmp_path: Path) -> None:
    """A real `presenced serve` (Type=notify readiness): SIGHUP swaps the c2s and HTTPS
    certificates while a slixmpp session stays connected."""
    logging.getLogger("slixmpp").setLevel(logging.CRITICAL)
    c2s, c2s_tls, https = free_ports(3)
    data = tmp_path / "data"
    config = tmp_path / "presenced.toml"
    config.write_text(textwrap.dedent(f"""\
        domains = ["a.test"]
        data_dir = "{data}"
        [listen]
        c2s = ["127.0.0.1:{c2s}"]
        c2s_tls = ["127.0.0.1:{c2s_tls}"]
        https = ["127.0.0.1:{https}"]
        """))
    notify = notify_socket(tmp_path)
    proc_env = env() | {"NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
    proc = subprocess.Popen(presenced("serve", "--config", str(config)), cwd=tmp_path,
                            env=proc_env, stderr=subprocess.PIPE, text=True)
    try:
        assert "READY=1" in await asyncio.to_thread(next_notification, notify)
        assert proc.stderr is not None
        drain(proc)
        result = subprocess.run(presenced("adduser", "alice@a.test", "--config", str(config),
                                          "--password", PASSWORD), env=env(),
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        alice = slixmpp.ClientXMPP("alice@a.test/pc", PASSWORD)
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        alice.ssl_context = ctx
        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        alice.add_event_handler("session_start",
                                lambda _e: started.done() or started.set_result(None))
        alice.connect("127.0.0.1", c2s)
        await asyncio.wait_for(started, 20)

        old = der(data / "cert.pem")
        assert await served_certificate("127.0.0.1", c2s_tls, "a.test") == old
        assert await served_certificate("127.0.0.1", https, "a.test") == old
        generate_self_signed(["a.test"], data / "cert.pem", data / "key.pem")
        new = der(data / "cert.pem")
        os.kill(proc.pid, signal.SIGHUP)
        assert "RELOADING=1" in await asyncio.to_thread(next_notification, notify)
        assert "READY=1" in await asyncio.to_thread(next_notification, notify)
        assert await served_certificate("127.0.0.1", c2s_tls, "a.test") == new
        assert await served_certificate("127.0.0.1", https, "a.test") == new
        await still_alive(alice)
        alice.disconnect(wait=0.1)
        proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in await asyncio.to_thread(next_notification, notify)
        assert await asyncio.to_thread(proc.wait, 20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()


_AS_NOBODY = """
import json, socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    sock.connect(sys.argv[1])
except OSError as exc:
    print(type(exc).__name__)
    raise SystemExit
try:
    sock.sendall(b'{"command": "status"}\\n')
except BrokenPipeError:  # answered and closed before reading a request
    pass
print(sock.makefile().readline().strip())
"""


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/bin/setpriv").exists()
                    or not Path("/usr/bin/python3").exists(),
                    reason="needs root, setpriv and /usr/bin/python3 to act as another user")
async def test_other_users_are_refused(tmp_path: Path) -> None:
    """The socket is 0600; and were it opened up by mistake, the server still answers only
    its own user (SO_PEERCRED)."""
    import tempfile

    base = Path(tempfile.mkdtemp(dir="/tmp", prefix="presenced-ctl-"))
    try:
        base.chmod(0o755)
        running = await start_server(base)
        try:
            (base / "data").chmod(0o755)
            sock = running.data_dir / "presenced.sock"

            async def as_nobody() -> str:
                proc = await asyncio.create_subprocess_exec(
                    "/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                    "/usr/bin/python3", "-c", _AS_NOBODY, str(sock),
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                out, err = await asyncio.wait_for(proc.communicate(), 30)
                assert proc.returncode == 0, err
                return out.decode().strip()

            assert await as_nobody() == "PermissionError"
            sock.chmod(0o666)
            answer = await as_nobody()
            assert '"ok": false' in answer and "not the server's user" in answer
            code, out, _err = await ctl(running.config_path, "status")  # root still may
            assert code == 0 and "sessions: 0" in out
        finally:
            await stop_server(running)
    finally:
        shutil.rmtree(base)
