"""The files in deploy/ are accepted by the real systemd tools (systemd-analyze, -sysusers, -tmpfiles).

``systemd-analyze verify`` checks that ExecStart= names an executable file, and the unit names
``/opt/fracture-node/venv/bin/fracture-node`` (where deploy/README.md installs it). The tests copy
the unit into a temporary folder with ExecStart= pointing at this checkout's ``fracture-node``
console script and verify that copy: every other line is verified as shipped. Unknown keys are
only warnings for systemd, so a test also requires that verify prints nothing at all.

The Debian package ``systemd`` provides the three tools; no running systemd is needed. The
tmpfiles test creates folders owned by another user, so it needs root (as in the CI container).
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
INSTALLED = "/opt/fracture-node/venv/bin/fracture-node"


def local_unit(folder: Path) -> Path:
    """The unit with ExecStart= pointing at this environment's fracture-node."""
    script = Path(sys.executable).parent / "fracture-node"
    assert script.is_file(), f"the fracture-node console script is missing at {script}"
    text = (DEPLOY / "fracture-node.service").read_text()
    assert INSTALLED in text
    unit = folder / "fracture-node.service"
    unit.write_text(text.replace(INSTALLED, str(script)))
    return unit


def verify(unit: Path, unit_path: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if unit_path is not None:
        env["SYSTEMD_UNIT_PATH"] = f"{unit_path}:"  # trailing colon: also the usual paths
    return subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, env=env, timeout=60, check=False)


def directives(path: Path) -> dict[str, list[str]]:
    parser = configparser.ConfigParser(strict=False, interpolation=None,
                                       dict_type=_MultiDict)  # type: ignore[arg-type]
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    return {f"{section}.{key}": value.split("\n")
            for section in parser.sections() for key, value in parser[section].items()}


class _MultiDict(dict):  # type: ignore[type-arg]
    """Keeps repeated keys of a unit file (configparser would keep only the last)."""

    def __setitem__(self, key: str, value: object) -> None:
        if isinstance(value, list) and key in self:
            self[key].extend(value)
        else:
            super().__setitem__(key, value)


def test_unit_verifies_cleanly(tmp_path: Path) -> None:
    """systemd-analyze verify accepts the unit without an error or a warning."""
    result = verify(local_unit(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "" and result.stdout.strip() == ""


def test_gpu_drop_in_verifies_cleanly(tmp_path: Path) -> None:
    """The GPU drop-in is accepted when applied to the unit."""
    unit = local_unit(tmp_path)
    dropins = tmp_path / "fracture-node.service.d"
    dropins.mkdir()
    shutil.copy(DEPLOY / "fracture-node-gpu.conf", dropins / "gpu.conf")
    result = verify(unit, unit_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""


def test_unit_settings() -> None:
    """The unit is Type=notify with the watchdog, a fixed user, the state folder and no capabilities."""
    d = directives(DEPLOY / "fracture-node.service")
    expected = {
        "Service.Type": "notify", "Service.NotifyAccess": "main", "Service.WatchdogSec": "30",
        "Service.User": "fracture-node", "Service.DynamicUser": "no",
        "Service.StateDirectory": "fracture-node", "Service.ConfigurationDirectory": "fracture-node",
        "Service.Restart": "on-failure", "Service.KillSignal": "SIGTERM",
        "Service.ProtectSystem": "strict", "Service.NoNewPrivileges": "yes",
        "Service.PrivateDevices": "yes", "Service.CapabilityBoundingSet": "",
        "Service.RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6", "Service.UMask": "0077",
        "Service.ExecStart": f"{INSTALLED} serve --config /etc/fracture-node/config.toml",
    }
    assert {k: d[k][-1] for k in expected} == expected
    assert int(d["Service.TimeoutStopSec"][-1]) > 120  # above [node] network_timeout_s


def test_sysusers_creates_the_user(tmp_path: Path) -> None:
    """systemd-sysusers creates the fracture-node system user with no login shell."""
    (tmp_path / "etc").mkdir()
    subprocess.run(["systemd-sysusers", f"--root={tmp_path}",
                    str(DEPLOY / "fracture-node.sysusers.conf")],
                   check=True, capture_output=True, timeout=60)
    entry = next(line.split(":") for line in (tmp_path / "etc" / "passwd").read_text().splitlines()
                 if line.startswith("fracture-node:"))
    assert int(entry[2]) < 1000
    assert entry[5:] == ["/var/lib/fracture-node", "/usr/sbin/nologin"]


def test_tmpfiles_create_private_folders(tmp_path: Path) -> None:
    """systemd-tmpfiles creates the state folder 0700 and the config folder 0750, owned as listed."""
    (tmp_path / "etc").mkdir()
    subprocess.run(["systemd-sysusers", f"--root={tmp_path}",
                    str(DEPLOY / "fracture-node.sysusers.conf")],
                   check=True, capture_output=True, timeout=60)
    subprocess.run(["systemd-tmpfiles", f"--root={tmp_path}", "--create",
                    str(DEPLOY / "fracture-node.tmpfiles.conf")],
                   check=True, capture_output=True, timeout=60)
    uid, gid = next((int(line.split(":")[2]), int(line.split(":")[3]))
                    for line in (tmp_path / "etc" / "passwd").read_text().splitlines()
                    if line.startswith("fracture-node:"))
    state = (tmp_path / "var" / "lib" / "fracture-node").stat()
    config = (tmp_path / "etc" / "fracture-node").stat()
    assert (oct(state.st_mode & 0o777), state.st_uid, state.st_gid) == ("0o700", uid, gid)
    assert (oct(config.st_mode & 0o777), config.st_uid, config.st_gid) == ("0o750", 0, gid)


@pytest.mark.parametrize("name", ["fracture-node.service", "fracture-node-gpu.conf",
                                  "fracture-node.sysusers.conf", "fracture-node.tmpfiles.conf"])
def test_deploy_readme_mentions_each_file(name: str) -> None:
    """deploy/README.md explains where each shipped file goes."""
    assert name in (DEPLOY / "README.md").read_text()
