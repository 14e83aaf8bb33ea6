"""slixmpp's own integration tests (the itests/ of its sdist) against a `presenced serve`, as
slixmpp's authors run them against Prosody: two accounts on `localhost` (their client finds the
server by DNS: localhost's A record, port 5222) with a certificate from a test CA they trust
through SSL_CERT_FILE. One subprocess per itest file; each prints a closing
`<tests ran='N' errors='N' fails='N'/>` line.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.peers import make_ca, make_certificates
from tests.conftest import PASSWORD, default_ports

VERSION = "1.17.0"
# Every itest whose XEPs presenced serves (not test_sos: XEP-0455 service outage status).
ITESTS = ("basic_connect_and_message", "blocking", "bob", "chatmarkers", "component", "disco",
          "httpupload", "ibb", "last_activity", "mam", "moderate", "muc", "pep", "ping",
          "privatestorage", "quickresponse", "reactions", "reconnect", "retract", "selfping",
          "slow_filters", "tls_check", "user_avatar", "vcard", "vcard_avatar", "version")
_SUMMARY = re.compile(r"<tests [^>]*ran='(\d+)' errors='(\d+)' fails='(\d+)'")


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"presenced exited with {proc.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"presenced is not listening on {port}")


@pytest.fixture(scope="module")
def itests_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """slixmpp's sdist, unpacked (from $SLIXMPP_SDIST, else downloaded from PyPI by pip)."""
    where = tmp_path_factory.mktemp("slixmpp-sdist")
    sdist = os.environ.get("SLIXMPP_SDIST")
    if not sdist:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                               "--no-binary", ":all:", f"slixmpp=={VERSION}", "-d", str(where)],
                              capture_output=True, text=True, timeout=300)
        found = list(where.glob("slixmpp-*.tar.gz"))
        if not found:
            pytest.skip(f"cannot download slixmpp's sdist: {proc.stderr.strip()[-300:]}")
        sdist = str(found[0])
    with tarfile.open(sdist) as archive:
        archive.extractall(where, filter="data")
    (root,) = [p for p in where.iterdir() if p.is_dir()]
    return root


@pytest.fixture(scope="module")
def localhost_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """presenced serving localhost on 127.0.0.1:5222 (direct TLS on 5223, https on 5281 for
    upload), where slixmpp looks by default."""
    with default_ports():
        yield from _localhost_server(tmp_path_factory)


def _localhost_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    if not (_free(5222) and _free(5223) and _free(5281)):
        pytest.skip("127.0.0.1:5222, :5223 or :5281 is taken on this machine")
    tmp = tmp_path_factory.mktemp("itests-server")
    ca = make_ca(tmp / "ca")
    certs = make_certificates(tmp / "certs", ["localhost", "upload.localhost", "muc.localhost",
                                              "pubsub.localhost"], ca=ca)
    config = tmp / "presenced.toml"
    config.write_text(f'domains = ["localhost"]\ndata_dir = "{tmp / "data"}"\n'
                      '[listen]\nc2s = ["127.0.0.1:5222"]\nc2s_tls = ["127.0.0.1:5223"]\n'
                      'https = ["127.0.0.1:5281"]\n'
                      f'[tls]\ncertificate = "{certs.certificate}"\nkey = "{certs.key}"\n'
                      '[http]\nexternal_url = "https://localhost:5281"\n')
    for user in ("alice", "bob"):
        subprocess.run([sys.executable, "-m", "server", "adduser", f"{user}@localhost", "-p",
                        PASSWORD, "-c", str(config)], check=True, capture_output=True)
    log = (tmp / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "server", "serve", "-c", str(config)],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        _wait_listening(5222, proc)
        yield {"CI_ACCOUNT1": "alice@localhost", "CI_ACCOUNT1_PASSWORD": PASSWORD,
               "CI_ACCOUNT2": "bob@localhost", "CI_ACCOUNT2_PASSWORD": PASSWORD,
               "CI_MUC_SERVER": "muc.localhost", "SSL_CERT_FILE": str(ca.certificate)}
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        log.close()


@pytest.mark.parametrize("name", ITESTS)
def test_slixmpp_itest(name: str, itests_dir: Path, localhost_server: dict[str, str]) -> None:
    env = {**os.environ, **localhost_server}
    proc = subprocess.run([sys.executable, "run_integration_tests.py", f"itests/test_{name}.py"],
                          cwd=itests_dir, env=env, capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    summary = _SUMMARY.search(output)
    assert summary is not None, output[-3000:]
    ran, errors, fails = map(int, summary.groups())
    assert ran > 0 and errors == 0 and fails == 0, output[-3000:]
