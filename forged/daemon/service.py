"""Install forged as a per-user service: a launchd agent on macOS, a systemd user unit on Linux."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

from forged.common import paths

LABEL = "dev.forged.daemon"
TEMPLATES = Path(__file__).resolve().parents[2] / "launchd"


@dataclass
class Plan:
    unit_path: Path
    content: str
    commands: list[list[str]]


def _template(name: str) -> str:
    # Installed wheels carry no launchd/ folder: fall back to the copy in the package data.
    for d in (TEMPLATES, Path(__file__).resolve().parent / "templates"):
        if (d / name).exists():
            return (d / name).read_text()
    raise FileNotFoundError(f"service template {name} not found in {TEMPLATES}")


def _env_passthrough() -> dict[str, str]:
    return {k: os.environ[k] for k in ("FORGED_HOME", "FORGED_CONFIG") if k in os.environ}


def render_plist(p: paths.Paths, python: str = sys.executable) -> str:
    extra = "".join(f"    <key>{escape(k)}</key>\n    <string>{escape(v)}</string>\n"
                    for k, v in _env_passthrough().items())
    return _template(f"{LABEL}.plist.template").format(
        label=LABEL, python=escape(str(Path(python).absolute())), workdir=escape(str(Path.home())),
        path_env=escape("/usr/local/bin:/opt/homebrew/bin:/usr/bin:/bin:/usr/sbin:/sbin"),
        log_dir=escape(str(p.log_dir.absolute())), extra_env=extra)


def render_systemd(p: paths.Paths, python: str = sys.executable) -> str:
    extra = "".join(f"Environment={k}={shlex.quote(v)}\n" for k, v in _env_passthrough().items())
    return _template("forged.service.template").format(
        python=str(Path(python).absolute()), workdir=str(Path.home()),
        path_env=os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"), extra_env=extra)


def plan(action: str, p: paths.Paths, platform: str = sys.platform) -> Plan:
    if platform == "darwin":
        unit = Path.home() / "Library" / "LaunchAgents" / f"{LABEL}.plist"
        domain = f"gui/{os.getuid()}"
        if action == "install":
            cmds = [["launchctl", "bootout", f"{domain}/{LABEL}"], ["launchctl", "bootstrap", domain, str(unit)]]
        else:
            cmds = [["launchctl", "bootout", f"{domain}/{LABEL}"]]
        return Plan(unit, render_plist(p), cmds)
    unit = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "systemd" / "user" / "forged.service"
    if action == "install":
        cmds = [["systemctl", "--user", "daemon-reload"], ["systemctl", "--user", "enable", "--now", "forged.service"]]
    else:
        cmds = [["systemctl", "--user", "disable", "--now", "forged.service"], ["systemctl", "--user", "daemon-reload"]]
    return Plan(unit, render_systemd(p), cmds)


def main(action: str, dry_run: bool, p: paths.Paths) -> int:
    pl = plan(action, p)
    if dry_run:
        print(f"# would {'write' if action == 'install' else 'remove'} {pl.unit_path}")
        if action == "install":
            print(pl.content)
        for c in pl.commands:
            print("$ " + shlex.join(c))
        return 0
    p.ensure()
    if action == "install":
        pl.unit_path.parent.mkdir(parents=True, exist_ok=True)
        pl.unit_path.write_text(pl.content)
        print(f"wrote {pl.unit_path}")
    for i, c in enumerate(pl.commands):
        if shutil.which(c[0]) is None:
            print(f"forgectl: {c[0]} not found; run by hand: {shlex.join(c)}", file=sys.stderr)
            return 1
        r = subprocess.run(c, capture_output=True, text=True)
        # bootout of an agent that is not loaded fails; that is fine before a bootstrap.
        if r.returncode != 0 and not (action == "install" and i == 0 and c[1] == "bootout"):
            print(f"forgectl: {shlex.join(c)} failed: {r.stderr.strip() or r.stdout.strip()}", file=sys.stderr)
            return 1
    if action == "uninstall":
        pl.unit_path.unlink(missing_ok=True)
        print(f"removed {pl.unit_path} (state, logs and models are kept)")
    else:
        print("forged is installed and started; check it with: forgectl status")
    return 0
