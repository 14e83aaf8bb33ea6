"""ejabberd's outgoing s2s reaches a domain on a loopback address and port of our choosing
(EjabberdPeer(s2s_hosts=...)), without /etc/hosts or the system's DNS configuration."""

from __future__ import annotations

import asyncio
import re
import shutil

import pytest

from bench.peers import EjabberdPeer, PeerError, make_ca, make_certificates
from tests.process import free_port

EJABBERD_HOST = "127.0.0.31"
REMOTE_HOST = "127.0.0.32"


def need_ejabberd() -> None:
    if shutil.which("ejabberdctl") is None:
        pytest.skip("ejabberd is not installed (apt-get install ejabberd)")
    if shutil.which("dnsmasq") is None:
        pytest.skip("dnsmasq is not installed (apt-get install dnsmasq-base)")


async def test_ejabberd_opens_s2s_to_a_domain_on_a_loopback_address(tmp_path) -> None:
    need_ejabberd()
    headers: asyncio.Queue[bytes] = asyncio.Queue()

    async def remote(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Stands in for b.test: hands over what arrives up to the end of the stream header."""
        received = b""
        try:
            while not re.search(rb"<stream:stream[^>]*>", received):
                chunk = await reader.read(4096)
                if not chunk:
                    break
                received += chunk
            await headers.put(received)
        finally:
            writer.close()

    # Not 5269: the SRV record carries the port.
    port = free_port(REMOTE_HOST)
    listener = await asyncio.start_server(remote, REMOTE_HOST, port)
    ca = make_ca(tmp_path / "ca")
    certs = make_certificates(tmp_path / "certs", ["e.test"], ca=ca)
    peer = EjabberdPeer(host=EJABBERD_HOST, domains=("e.test",), c2s_port=None,
                        s2s_port=free_port(EJABBERD_HOST), certificates=certs,
                        cafile=ca.certificate, extra_modules={"mod_admin_extra": {}},
                        s2s_hosts={"b.test": (REMOTE_HOST, port)})
    try:
        await peer.astart()
        assert (peer.workdir / "inetrc").exists() and peer._dns is not None
        await asyncio.to_thread(peer.register, "alice", "e.test", "pw")
        await asyncio.to_thread(peer.ctl, "send_message", "chat", "alice@e.test",
                                "bob@b.test", "subject", "hello")
        try:
            header = await asyncio.wait_for(headers.get(), 10)
        except TimeoutError:
            pytest.fail(f"no s2s connection to b.test:\n{peer.log_tail(30)}")
        text = header.decode()
        assert re.search(r"<stream:stream[^>]*\bto=['\"]b\.test['\"]", text), text
        assert re.search(r"<stream:stream[^>]*\bfrom=['\"]e\.test['\"]", text), text
        assert "jabber:server" in text
        dns = peer._dns
    finally:
        await peer.astop()
        listener.close()
        await listener.wait_closed()
    assert not peer.running and peer._dns is None and dns.poll() is not None
    assert not peer.workdir.exists()


def test_s2s_hosts_must_be_ipv4_addresses(tmp_path) -> None:
    with pytest.raises(PeerError, match="IPv4"):
        EjabberdPeer(tmp_path / "e", domains=("e.test",), certificates=make_certificates(
            tmp_path / "certs", ["e.test"]), s2s_hosts={"b.test": ("::1", 5269)})
