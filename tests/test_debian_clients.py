"""Real Debian clients against a real `presenced serve` process (go-sendxmpp)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import slixmpp

from tests.conftest import on_ci
from tests.process import free_ports, presenced, serving

GO_SENDXMPP = shutil.which("go-sendxmpp")
pytestmark = pytest.mark.skipif(GO_SENDXMPP is None and not on_ci(),
                                reason="go-sendxmpp is not installed (CI installs it)")


@contextlib.asynccontextmanager
async def receiver(jid: str, password: str, port: int) -> AsyncIterator[asyncio.Queue[str]]:
    xmpp = slixmpp.ClientXMPP(jid, password)
    xmpp.ssl_context.check_hostname = False
    xmpp.ssl_context.verify_mode = 0  # ssl.CERT_NONE: self-signed test certificate
    xmpp.enable_direct_tls = False
    bodies: asyncio.Queue[str] = asyncio.Queue()
    started = asyncio.get_running_loop().create_future()
    xmpp.add_event_handler("session_start", lambda _e: (xmpp.send_presence(),
                                                        started.done() or started.set_result(1)))
    xmpp.add_event_handler("message", lambda m: bodies.put_nowait(str(m["body"])))
    xmpp.connect("127.0.0.1", port)
    await asyncio.wait_for(started, 10)
    await asyncio.sleep(0.2)
    try:
        yield bodies
    finally:
        xmpp.disconnect(wait=0.1)


async def send_with_go_sendxmpp(*args: str, message: str) -> None:
    """go-sendxmpp reads the message body from standard input."""
    assert GO_SENDXMPP is not None
    proc = await asyncio.create_subprocess_exec(
        GO_SENDXMPP, *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(message.encode()), 30)
    assert proc.returncode == 0, (out + err).decode()


async def test_go_sendxmpp_starttls_and_direct_tls(tmp_path: Path) -> None:
    c2s, c2s_tls = free_ports(2)
    config = tmp_path / "presenced.toml"
    config.write_text(textwrap.dedent(f"""\
        domains = ["a.test"]
        data_dir = "data"
        [listen]
        c2s = ["127.0.0.1:{c2s}"]
        c2s_tls = ["127.0.0.1:{c2s_tls}"]
        https = []
        """))
    for user in ("alice", "bob"):
        subprocess.run(presenced("adduser", f"{user}@a.test", "--password", "pw-" + user,
                                 "--config", str(config)), check=True, cwd=tmp_path)
    with serving(["serve", "--config", str(config)], tmp_path):
        async with receiver("bob@a.test/desk", "pw-bob", c2s) as bodies:
            # STARTTLS on the c2s port, then direct TLS (XEP-0368) on the c2s_tls port.
            await send_with_go_sendxmpp("-u", "alice@a.test", "-p", "pw-alice", "-j",
                                        f"127.0.0.1:{c2s}", "-n", "bob@a.test",
                                        message="hello over starttls")
            assert await asyncio.wait_for(bodies.get(), 10) == "hello over starttls"
            await send_with_go_sendxmpp("-u", "alice@a.test", "-p", "pw-alice", "-j",
                                        f"127.0.0.1:{c2s_tls}", "-t", "-n", "bob@a.test",
                                        message="hello over direct tls")
            assert await asyncio.wait_for(bodies.get(), 10) == "hello over direct tls"


def _port_free(port: int) -> bool:
    try:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False


async def test_readme_default_serve_with_go_sendxmpp(tmp_path: Path,
                                                     hold_default_ports: None) -> None:
    """README: `presenced serve` with no config (domain localhost, self-signed, 5222/5223)."""
    if not all(_port_free(port) for port in (5222, 5223, 5281)):
        if on_ci():
            raise AssertionError("ports 5222/5223/5281 are taken on CI")
        pytest.skip("ports 5222/5223/5281 are in use on this machine")
    for user in ("alice", "bob"):
        subprocess.run(presenced("adduser", f"{user}@localhost", "--password", "pw-" + user),
                       check=True, cwd=tmp_path)
    with serving(["serve"], tmp_path):
        assert (tmp_path / "presenced-data" / "cert.pem").exists()
        async with receiver("bob@localhost/desk", "pw-bob", 5222) as bodies:
            await send_with_go_sendxmpp("-u", "alice@localhost", "-p", "pw-alice", "-n",
                                        "bob@localhost", message="hello from the README")
            assert await asyncio.wait_for(bodies.get(), 10) == "hello from the README"
