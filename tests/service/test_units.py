"""The systemd units and example settings shipped in systemd/: systemd-analyze verify accepts
every unit (with ExecStart= pointing at this checkout's icbd-cache and man pointing at its
pages), and every example config file is one its command accepts."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import BIN, REPO

from icbdcache.cli import COMMANDS

UNITS = sorted((REPO / "systemd").glob("icbd-cache-*.s*"))
INSTALLED = "/opt/icbd-cache/bin/icbd-cache"


def verify(units: list[Path], tmp: Path) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze verify`` on copies of ``units`` that run this checkout's icbd-cache,
    with the repository's man pages on MANPATH (verify checks Documentation=man:...)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (package systemd)")
    copies = []
    for u in units:
        text = u.read_text()
        assert INSTALLED in text or u.suffix == ".socket", u
        dest = tmp / u.name
        dest.write_text(text.replace(INSTALLED, str(BIN / "icbd-cache")))
        copies.append(str(dest))
    return subprocess.run(["systemd-analyze", "verify", *copies], capture_output=True,
                          text=True, timeout=120, check=False,
                          env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin",
                               "MANPATH": str(REPO / "man")})


def test_every_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    names = {u.name for u in UNITS}
    assert names == {"icbd-cache-serve.service", "icbd-cache-serve.socket",
                     "icbd-cache-master.service", "icbd-cache-replica.service",
                     "icbd-cache-pxe.service"}
    p = verify(UNITS, tmp_path)
    assert p.returncode == 0 and not p.stdout.strip() and not p.stderr.strip(), (
        p.stdout, p.stderr)


def test_verify_reports_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key and a bad type are reported."""
    broken = tmp_path / "src" / "icbd-cache-broken.service"
    broken.parent.mkdir()
    text = (REPO / "systemd" / "icbd-cache-master.service").read_text()
    broken.write_text(text.replace("ProtectSystem=", "ProtectSytem=")
                      .replace("Type=notify", "Type=notifyy"))
    p = verify([broken], tmp_path)
    assert "ProtectSytem" in p.stderr and "notifyy" in p.stderr, p.stderr


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_units_are_hardened_and_notify(unit: Path) -> None:
    """What the issue asks of each service: Type=notify with a watchdog, a dedicated user,
    a read-only system with the store writable, no new privileges, no capability beyond
    binding port 69 (only where TFTP runs)."""
    keys: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            k, _, v = line.partition("=")
            keys.setdefault(k, []).append(v)
    if unit.suffix == ".socket":
        assert keys["ListenStream"] == ["10809"]
        return
    assert keys["Type"] == ["notify"] and keys["WatchdogSec"] == ["30"]
    assert keys["User"] == ["icbd-cache"] and keys["ProtectSystem"] == ["strict"]
    assert "/var/lib/icbd-cache" in keys["ReadWritePaths"][0].split()
    assert keys["NoNewPrivileges"] == ["yes"]
    tftp = unit.name in ("icbd-cache-serve.service", "icbd-cache-pxe.service")
    assert keys["CapabilityBoundingSet"] == (["CAP_NET_BIND_SERVICE"] if tftp else [""])


@pytest.mark.parametrize("command", ["serve", "master", "replica", "pxe serve"])
def test_example_configs_are_accepted(command: str) -> None:
    """systemd/NAME.toml, the example of /etc/icbd-cache/NAME.toml, is a valid --config file
    of its command (every key known, every value of the right kind)."""
    table = next(c for c in COMMANDS if c.name == command)
    path = REPO / "systemd" / f"{command.split()[-1] if command != 'pxe serve' else 'pxe'}.toml"
    settings = table.load_config(str(path))
    assert settings["store"].startswith("/var/lib/icbd-cache/")
    if command != "master":
        assert settings
    ini = (REPO / "systemd" / f"icbd-cache-{path.stem}.service").read_text()
    assert f"--config /etc/icbd-cache/{path.name}" in ini
