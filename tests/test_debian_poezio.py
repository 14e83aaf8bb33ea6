"""Debian's poezio 0.14 (on Debian's slixmpp 1.8.3) logs in with SCRAM at the first try
(issue 19 item 6: it used to get "too many authentication failures" and fall back to PLAIN).

poezio is a curses client: it runs in a tmux session of its own (its own socket), as an
unprivileged user (poezio refuses to run as root), with a configuration file that names our
address and trusts our test certificate. What counts is seen on the server: the account's
session bound after authenticating with SCRAM, with no PLAIN and no more than the two -PLUS
attempts slixmpp 1.8.3 makes with tls-unique (which TLS 1.3 has not), and its available
presence. CI installs poezio and tmux (.ci/run)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.jid import JID
from tests.conftest import PASSWORD, RunningServer, on_ci, start_server, stop_server

POEZIO, TMUX = shutil.which("poezio"), shutil.which("tmux")
pytestmark = pytest.mark.skipif((POEZIO is None or TMUX is None) and not on_ci(),
                                reason="poezio and tmux are not installed (CI installs them)")


def unprivileged() -> tuple[str, int, int]:
    """poezio exits at once when run as root: a user without rights ('nobody')."""
    entry = pwd.getpwuid(os.geteuid()) if os.geteuid() != 0 else pwd.getpwnam("nobody")
    return entry.pw_name, entry.pw_uid, entry.pw_gid


class Tmux:
    def __init__(self, home: Path, user: str) -> None:
        self.socket = home / "tmux.sock"
        self.user = user
        self.home = home
        self.errors: list[str] = []

    def command(self, *args: str) -> list[str]:
        prefix = [] if os.geteuid() != 0 else ["runuser", "-u", self.user, "--"]
        # SHELL: tmux runs a pane's command with $SHELL -c, else the user's login shell, which
        # for 'nobody' is nologin (exit status 1, nothing on stderr): CI has no $SHELL.
        env = ["env", f"HOME={self.home}", "SHELL=/bin/sh", "LANG=C.UTF-8", "LC_ALL=C.UTF-8",
               "TERM=xterm",
               f"XDG_CONFIG_HOME={self.home}/config", f"XDG_DATA_HOME={self.home}/data",
               f"XDG_CACHE_HOME={self.home}/cache", f"TMUX_TMPDIR={self.home}"]
        assert TMUX is not None
        return [*prefix, *env, TMUX, "-S", str(self.socket), *args]

    def run(self, *args: str) -> str:
        done = subprocess.run(self.command(*args), capture_output=True, text=True, timeout=20,
                              check=False)
        if done.returncode != 0:
            self.errors.append(f"tmux {' '.join(args[:2])}: rc={done.returncode} "
                               f"{done.stderr.strip()}")
        return done.stdout

    def start(self, command: str) -> None:
        """A session that stays after its program exits (remain-on-exit), so that a poezio
        which died at start leaves its last screen and exit status to be shown."""
        self.run("-f", "/dev/null", "new-session", "-d", "-s", "poezio", "-x", "140",
                 "-y", "40", "sh", "-c", "sleep 3600", ";",
                 "set-option", "-g", "remain-on-exit", "on", ";",
                 "set-option", "-g", "default-shell", "/bin/sh", ";",
                 "respawn-pane", "-k", "-t", "poezio", command)

    def dead(self) -> str | None:
        """The exit status of the pane's program when it has exited, else None."""
        state = self.run("list-panes", "-t", "poezio", "-F", "#{pane_dead} #{pane_dead_status}")
        dead, _, status = state.strip().partition(" ")
        return status or "?" if dead == "1" else None

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", "poezio")



@pytest.fixture
def tmux() -> Iterator[Tmux]:
    # Not under pytest's tmp_path: that is private to root (0700), the user could not enter.
    user, uid, gid = unprivileged()
    home = Path(tempfile.mkdtemp(prefix="poezio-"))
    for sub in ("", "config", "data", "cache"):
        (home / sub).mkdir(exist_ok=True)
        os.chown(home / sub, uid, gid)
    session = Tmux(home, user)
    try:
        yield session
    finally:
        # poezio outlives its terminal: after tmux's kill-server it spins on the lost tty
        # (SIGHUP ignored), so its process group is killed too, by the pane's pid.
        panes = [int(p) for p in session.run("list-panes", "-a", "-F", "#{pane_pid}").split()
                 if p.isascii() and p.isdigit()]
        session.run("kill-server")
        for pid in panes:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        shutil.rmtree(home, ignore_errors=True)


async def test_poezio_logs_in_with_scram(tmp_path: Path, tmux: Tmux,
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="presenced")
    running: RunningServer = await start_server(tmp_path / "server", domains=("localhost",))
    try:
        await running.add_user("alice@localhost")
        host, port = running.address("c2s")
        config = tmux.home / "poezio.cfg"
        certificate = tmp_path / "server" / "data" / "cert.pem"
        shutil.copy(certificate, tmux.home / "ca.pem")
        config.write_text(textwrap.dedent(f"""\
            [Poezio]
            jid = alice@localhost
            password = {PASSWORD}
            custom_host = {host}
            custom_port = {port}
            ca_cert_path = {tmux.home / "ca.pem"}
            rooms =
            use_bookmarks_method = local
            """))
        for path in (config, tmux.home / "ca.pem"):
            os.chown(path, *unprivileged()[1:])
        assert POEZIO is not None
        errors = tmux.home / "poezio.stderr"
        alice = JID.parse("alice@localhost")
        bound = []
        # A second start only when the first poezio died before it connected (seen once in
        # CI, with nothing to tell why); what it printed is kept for the failure message.
        for attempt in range(2):
            if attempt:
                tmux.run("respawn-pane", "-k", "-t", "poezio", f"{POEZIO} -f {config} 2>>{errors}")
            else:
                tmux.start(f"{POEZIO} -f {config} 2>>{errors}")
            for _ in range(600):  # 60 s at most; a login takes well under a second
                bound = running.server.sessions.resources(alice)
                if bound and bound[0].presence is not None:
                    break
                if tmux.dead() is not None:
                    break
                await asyncio.sleep(0.1)
            # it logged in, or got as far as authenticating (no second try then)
            if (bound and bound[0].presence is not None) or any(
                    "event=auth" in r.getMessage() for r in caplog.records):
                break
        if not (bound and bound[0].presence is not None):
            stderr = errors.read_text(errors="replace") if errors.exists() else ""
            pytest.fail(f"poezio did not log in (exit status {tmux.dead()}); tmux: "
                        f"{tmux.errors}\nscreen:\n{tmux.screen().rstrip()}\nstderr:\n{stderr[-3000:]}")
        lines = [r.getMessage() for r in caplog.records if "event=auth" in r.getMessage()]
        authenticated = [line for line in lines if "event=authenticated" in line]
        assert len(authenticated) == 1, lines
        mechanism = authenticated[0].rsplit("mechanism=", 1)[1]
        assert mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-1"), lines
        failed = [line for line in lines if "event=auth-failed" in line]
        assert len(failed) <= 2, lines  # the two -PLUS tries with tls-unique, no more
    finally:
        await stop_server(running)
