"""conf/presenced.service: systemd-analyze verify finds nothing to say about it, its sandboxing
rates well in systemd-analyze security, and it asks for what the server does (Type=notify:
server/ctl.py sends READY=1; ExecReload sends SIGHUP: a reload, see tests/test_ctl.py)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "conf" / "presenced.service"

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="systemd-analyze is not installed (Debian: systemd)")


def installed_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at an executable that exists here (verify checks it)."""
    exe = tmp_path / "presenced"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    unit = tmp_path / "presenced.service"
    text = UNIT.read_text()
    assert "ExecStart=/usr/bin/presenced serve --config " in text
    unit.write_text(text.replace("/usr/bin/presenced", str(exe)))
    return unit


def test_verify_is_silent(tmp_path: Path) -> None:
    unit = installed_copy(tmp_path)
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=60)
    # verify exits 0 even for unknown keys and bad values: any line about the unit is a fault.
    assert result.returncode == 0, result.stderr
    assert str(unit) not in result.stdout + result.stderr, result.stderr
    assert "presenced.service" not in result.stdout + result.stderr, result.stderr


def test_sandboxed(tmp_path: Path) -> None:
    unit = installed_copy(tmp_path)
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)],
                            capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for presenced\.service: ([0-9.]+)",
                      result.stdout + result.stderr)
    assert match, result.stdout + result.stderr
    assert float(match[1]) <= 2.0  # "OK" in systemd's scale (0 best, 10 worst)
    text = UNIT.read_text()
    for setting in ("Type=notify", "User=presenced", "ProtectSystem=strict",
                    "ExecReload=/bin/kill -HUP $MAINPID", "NoNewPrivileges=true"):
        assert f"\n{setting}\n" in text, setting
