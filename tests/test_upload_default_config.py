"""HTTP File Upload with the shipped defaults (issue 19 item 3: the slot URLs named
https://127.0.0.1:5281, which the generated certificate does not cover, and Dino and Gajim
refused every upload). The server runs on the built-in defaults (domain localhost, a generated
self-signed certificate, HTTPS with upload) with only the listeners' ports free ones; a client
that checks the certificate as Dino and Gajim do — trusting the generated certificate, host name
from the URL — uploads and downloads. The URL's host is resolved to 127.0.0.1 by the client
itself (no /etc/hosts)."""

from __future__ import annotations

import socket
import ssl
import textwrap
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver

from server.app import Server
from server.certs import ensure_certificate
from server.config import load_config
from tests.conftest import RunningServer, stop_server

UPLOAD = "urn:xmpp:http:upload:0"


class Loopback(AbstractResolver):
    """Every name is 127.0.0.1: the URL's host name is what TLS checks, not what it resolves
    to."""

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[dict[str, Any]]:
        return [{"hostname": host, "host": "127.0.0.1", "port": port, "family": socket.AF_INET,
                 "proto": 0, "flags": socket.AI_NUMERICHOST}]

    async def close(self) -> None:
        pass


async def test_default_config_upload_urls_pass_certificate_checks(tmp_path: Path) -> None:
    path = tmp_path / "presenced.toml"
    path.write_text(textwrap.dedent("""\
        [listen]
        c2s = ["127.0.0.1:0"]
        c2s_tls = ["127.0.0.1:0"]
        https = ["127.0.0.1:0"]
        """))  # everything else as shipped: data_dir ./presenced-data next to it, [tls] generated
    config = load_config(path)
    assert config.tls.generated and config.domains == ("localhost",)
    ensure_certificate(config)  # as `presenced serve` does
    server = Server(config)
    await server.start()
    running = RunningServer(server, config.data_dir, path)
    try:
        await running.add_user("alice@localhost")
        client = await running.raw_login("alice@localhost")
        reply = await client.ask(
            f"<iq type='get' to='upload.localhost' id='slot'><request xmlns='{UPLOAD}' "
            "filename='cat.png' size='9' content-type='image/png'/></iq>")
        slot = reply.find(f"{{{UPLOAD}}}slot")
        assert slot is not None
        put_url = slot.find(f"{{{UPLOAD}}}put").get("url")
        get_url = slot.find(f"{{{UPLOAD}}}get").get("url")
        # Dino and Gajim: the certificate must name the URL's host (and be trusted).
        trusted = ssl.create_default_context(cafile=str(config.tls.certificate))
        connector = aiohttp.TCPConnector(resolver=Loopback(), ssl=trusted)
        async with aiohttp.ClientSession(connector=connector) as http:
            async with http.put(put_url, data=b"\x89PNG\r\n\x1a\n!",
                                headers={"Content-Type": "image/png"}) as put:
                assert put.status == 201, await put.text()
            async with http.get(get_url) as got:
                assert got.status == 200 and await got.read() == b"\x89PNG\r\n\x1a\n!"
        _kind, _host, port = next(a for a in server.bound_addresses() if a[0] == "https")
        assert urlsplit(get_url).hostname == "localhost" and urlsplit(get_url).port == port
    finally:
        await stop_server(running)
