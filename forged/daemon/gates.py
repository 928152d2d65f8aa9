"""Resource gates: is this a good moment to forge? Idle, on AC, memory, cool, disk, hours.

Each gate reads the machine through small probes. All probes go through one seam,
:class:`Probe` — how commands are run and files are read — so tests feed them the real
output formats of ``ioreg``, ``pmset``, ``sysctl``, ``loginctl`` and ``/proc``/``/sys``.

A probe never raises: anything it cannot read is ``unknown``, which :func:`all_open`
treats as closed and status shows with the reason. A gate turned off in ``[gates]``
reads ``off`` and counts as open.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from forged.common.config import GatesConfig

OPEN, CLOSED, UNKNOWN, OFF = "open", "closed", "unknown", "off"
COMMAND_TIMEOUT = 5.0
GIB = 1024**3
MIB = 1024**2


@dataclass
class GateReading:
    name: str
    state: str  # "open" | "closed" | "unknown" | "off"
    reading: str  # for humans: "idle 14 min (HIDIdleTime)"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _run_real(cmd: list[str]) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        err = (p.stderr or p.stdout).strip().splitlines()
        raise RuntimeError(f"{cmd[0]} exited {p.returncode}" + (f": {err[-1]}" if err else ""))
    return p.stdout


def _read_real(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


class Probe:
    """The one seam between gates and the machine.

    ``run(cmd) -> stdout`` raises on failure (missing command, non-zero exit, timeout);
    ``read(path) -> text`` raises OSError; ``listdir(path)`` lists a directory (for
    ``/sys/class/power_supply``); ``env`` stands for ``os.environ``. The real ones use
    subprocess with a timeout, ``open()`` and ``os.listdir``.
    """

    def __init__(
        self,
        run: Callable[[list[str]], str] | None = None,
        read: Callable[[str], str] | None = None,
        platform: str = sys.platform,
        now: Callable[[], datetime] | None = None,
        *,
        listdir: Callable[[str], list[str]] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        # Only a fully real probe may fall back to psutil, which reads the machine directly.
        self.real = run is None and read is None
        self.run = run or _run_real
        self.read = read or _read_real
        self.listdir = listdir or os.listdir
        self.platform = platform
        self.now = now or datetime.now
        self.env = dict(os.environ) if env is None else env

    def disk_free(self, path: Path) -> int:
        return shutil.disk_usage(path).free


# --- idle ---------------------------------------------------------------------------------


def _idle_macos(p: Probe) -> tuple[float, str]:
    out = p.run(["ioreg", "-c", "IOHIDSystem"])
    m = re.search(r'"HIDIdleTime"\s*=\s*(\d+)', out)
    if not m:
        raise ValueError("no HIDIdleTime in ioreg output")
    return int(m.group(1)) / 1e9, "HIDIdleTime"


_LOCAL_TYPES = {"x11", "wayland", "mir", "tty"}


def _props(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def _idle_display(p: Probe) -> tuple[float, str] | None:
    """X11 or GNOME (Wayland) idle time, where a tool can tell; None otherwise."""
    if p.env.get("DISPLAY"):
        try:
            return int(p.run(["xprintidle"]).strip()) / 1000, "xprintidle"
        except Exception:
            pass
    try:
        out = p.run([
            "gdbus", "call", "--session", "--dest", "org.gnome.Mutter.IdleMonitor",
            "--object-path", "/org/gnome/Mutter/IdleMonitor/Core",
            "--method", "org.gnome.Mutter.IdleMonitor.GetIdletime",
        ])
        m = re.search(r"uint64 (\d+)", out)
        if m:
            return int(m.group(1)) / 1000, "Mutter IdleMonitor"
    except Exception:
        pass
    return None


def _idle_linux(p: Probe) -> tuple[float, str]:
    """Seconds since the last user input on a local seat; inf when no one is logged in locally."""
    try:
        listing = p.run(["loginctl", "list-sessions", "--no-legend"])
    except Exception:
        listing = None
    if listing is None:
        # No logind (a container, a non-systemd distro): a display tool, else utmp.
        shown = _idle_display(p)
        if shown:
            return shown
        who = p.run(["who"])
        local = [ln for ln in who.splitlines() if ln.strip() and not re.search(r"\((?!:)[^)]*\)\s*$", ln)]
        if not local:
            return float("inf"), "no local user session (who)"
        raise ValueError(f"{len(local)} local login(s) and no logind to ask for idle time")

    now_us = p.now().timestamp() * 1e6
    idle: list[float] = []
    unreported = 0
    for line in listing.splitlines():
        fields = line.split()
        if not fields:
            continue
        props = _props(p.run([
            "loginctl", "show-session", fields[0],
            "-p", "Type", "-p", "Class", "-p", "Remote", "-p", "IdleHint", "-p", "IdleSinceHint",
        ]))
        if props.get("Class", "user") != "user" or props.get("Remote") == "yes":
            continue  # greeters, ssh logins: nobody at this machine's keyboard
        if props.get("Type") not in _LOCAL_TYPES:
            continue
        since = int(props.get("IdleSinceHint") or 0)
        if props.get("IdleHint") == "yes" and since > 0:
            idle.append(max(0.0, (now_us - since) / 1e6))
        elif since > 0:
            idle.append(0.0)  # the session reports idleness and is active now
        else:
            unreported += 1  # a session that never sets IdleHint: ask the display
    if unreported:
        shown = _idle_display(p)
        if shown is None:
            raise ValueError("a local session does not report IdleHint and no X/Wayland idle tool answered")
        idle.append(shown[0])
        return min(idle), shown[1] if min(idle) == shown[0] else "logind IdleHint"
    if not idle:
        return float("inf"), "no local user session"
    return min(idle), "logind IdleHint"


def gate_idle(cfg: GatesConfig, p: Probe) -> GateReading:
    if not cfg.idle:
        return GateReading("idle", OFF, "idle gate off")
    seconds, source = _idle_macos(p) if p.platform == "darwin" else _idle_linux(p)
    if seconds == float("inf"):
        return GateReading("idle", OPEN, f"{source}: counts as idle (a server)")
    minutes = seconds / 60
    state = OPEN if minutes >= cfg.min_idle_minutes else CLOSED
    return GateReading("idle", state, f"idle {minutes:.0f} min ({source}), need {cfg.min_idle_minutes:g}")


# --- power --------------------------------------------------------------------------------


def _low_power_macos(p: Probe) -> bool:
    out = p.run(["pmset", "-g"])
    m = re.search(r"^\s*lowpowermode\s+(\d+)", out, re.M)
    if m:
        return m.group(1) == "1"
    m = re.search(r"^\s*powermode\s+(\d+)", out, re.M)  # 0 automatic, 1 low, 2 high
    return bool(m and m.group(1) == "1")


def gate_power(cfg: GatesConfig, p: Probe) -> GateReading:
    if not cfg.power:
        return GateReading("power", OFF, "power gate off")
    if p.platform == "darwin":
        try:
            first = p.run(["pmset", "-g", "batt"]).strip().splitlines()
        except Exception:
            if not p.real:
                raise
            return _power_psutil()
        m = re.search(r"drawing from '([^']+)'", first[0] if first else "")
        if not m:
            raise ValueError("unexpected pmset -g batt output")
        source = m.group(1)
        pct = re.search(r"(\d+)%", "\n".join(first[1:]))
        detail = f"{source}" + (f", battery {pct.group(1)}%" if pct else "")
        if source != "AC Power":
            return GateReading("power", CLOSED, f"on {detail} (pmset)")
        if _low_power_macos(p):
            return GateReading("power", CLOSED, f"{detail}, Low Power Mode on")
        return GateReading("power", OPEN, f"{detail} (pmset)")
    return _power_linux(p)


def _power_psutil() -> GateReading:
    """psutil's own view (IOKit on macOS): the fallback when pmset cannot be run."""
    import psutil

    batt = psutil.sensors_battery()
    if batt is None:
        return GateReading("power", OPEN, "no battery: on AC (psutil)")
    plugged = bool(batt.power_plugged)
    return GateReading("power", OPEN if plugged else CLOSED, f"{'on AC' if plugged else 'on battery'}, battery {batt.percent:.0f}% (psutil)")


def _power_linux(p: Probe) -> GateReading:
    """What psutil.sensors_battery() reads, read through the probe: /sys/class/power_supply."""
    base = "/sys/class/power_supply"
    try:
        names = sorted(p.listdir(base))
    except FileNotFoundError:
        names = []
    mains: list[bool] = []
    batteries: list[tuple[str, str, str]] = []
    for n in names:
        d = f"{base}/{n}"
        kind = _try_read(p, f"{d}/type")
        if kind == "Battery":
            if _try_read(p, f"{d}/scope") == "Device":
                continue  # a mouse or headset battery, not the machine's
            batteries.append((n, _try_read(p, f"{d}/status") or "Unknown", _try_read(p, f"{d}/capacity")))
        elif kind is not None:  # Mains, USB, USB_C, ...
            online = _try_read(p, f"{d}/online")
            if online is not None:
                mains.append(online == "1")
    profile = _try_read(p, "/sys/firmware/acpi/platform_profile")
    if not batteries:
        if mains and not any(mains):
            return GateReading("power", CLOSED, "power supply reports offline and no battery")
        state, text = OPEN, "no battery: on AC"
    elif any(mains):
        state, text = OPEN, "on AC" + _batt_text(batteries)
    elif mains:  # a mains supply exists and is offline
        state, text = CLOSED, "on battery" + _batt_text(batteries)
    else:  # no mains entry: judge from the battery status
        discharging = any(s == "Discharging" for _, s, _ in batteries)
        state = CLOSED if discharging else OPEN
        text = ("on battery" if discharging else "on AC") + _batt_text(batteries)
    if state == OPEN and profile == "low-power":
        return GateReading("power", CLOSED, text + ", platform profile low-power")
    return GateReading("power", state, text)


def _batt_text(batteries: list[tuple[str, str, str]]) -> str:
    return "".join(f", {n} {c + '% ' if c else ''}{s.lower()}" for n, s, c in batteries)


def _try_read(p: Probe, path: str) -> str | None:
    try:
        return p.read(path).strip()
    except (OSError, ValueError):
        return None


# --- memory -------------------------------------------------------------------------------


def _available_linux(p: Probe) -> int:
    for line in p.read("/proc/meminfo").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise ValueError("no MemAvailable in /proc/meminfo")


def _available_macos(p: Probe) -> int:
    out = p.run(["vm_stat"])
    m = re.search(r"page size of (\d+) bytes", out)
    page = int(m.group(1)) if m else 4096
    pages = {k.strip(): int(v.strip().rstrip(".")) for k, v in re.findall(r"^(Pages [^:]+):\s+(\d+)\.?$", out, re.M)}
    # Like psutil: free + inactive (vm_stat's "free" already excludes speculative pages).
    return (pages["Pages free"] + pages["Pages inactive"]) * page


def gate_memory(cfg: GatesConfig, p: Probe, need_bytes: int) -> GateReading:
    if not cfg.memory:
        return GateReading("memory", OFF, "memory gate off")
    want = need_bytes + cfg.memory_headroom_mb * MIB
    if p.platform == "darwin":
        level = int(p.run(["sysctl", "-n", "kern.memorystatus_vm_pressure_level"]).strip())
        names = {1: "normal", 2: "warning", 4: "critical"}
        if level != 1:
            return GateReading("memory", CLOSED, f"memory pressure {names.get(level, level)} (kern.memorystatus_vm_pressure_level={level})")
        avail, pressure = _available_macos(p), "pressure normal"
    else:
        avail = _available_linux(p)
        pressure = "no PSI"
        try:
            psi = p.read("/proc/pressure/memory")
        except OSError:
            psi = ""  # kernels before 4.20 or PSI disabled: judge by available memory alone
        if psi:
            m = re.search(r"^some avg10=([\d.]+)", psi, re.M)
            if not m:
                raise ValueError("unexpected /proc/pressure/memory format")
            some = float(m.group(1))
            pressure = f"PSI some avg10 {some:.1f}%"
            if some > cfg.max_memory_pressure:
                return GateReading("memory", CLOSED, f"memory pressure: {pressure} > {cfg.max_memory_pressure:g}%")
    text = f"{avail / GIB:.1f} GiB available, need {want / GIB:.1f} GiB; {pressure}"
    return GateReading("memory", OPEN if avail >= want else CLOSED, text)


# --- thermal ------------------------------------------------------------------------------


def gate_thermal(cfg: GatesConfig, p: Probe) -> GateReading:
    if not cfg.thermal:
        return GateReading("thermal", OFF, "thermal gate off")
    if p.platform == "darwin":
        out = p.run(["pmset", "-g", "therm"])
        problems = []
        m = re.search(r"CPU_Speed_Limit\s*=\s*(\d+)", out)
        if m and int(m.group(1)) < 100:
            problems.append(f"CPU speed limited to {m.group(1)}%")
        m = re.search(r"CPU_Scheduler_Limit\s*=\s*(\d+)", out)
        if m and int(m.group(1)) < 100:
            problems.append(f"CPU scheduler limit {m.group(1)}%")
        for kind in ("thermal", "performance"):
            m = re.search(rf"{kind} warning level (?:set to|is) (\d+)", out, re.I)
            if m and int(m.group(1)) > 0:
                problems.append(f"{kind} warning level {m.group(1)}")
        if problems:
            return GateReading("thermal", CLOSED, "; ".join(problems) + " (pmset -g therm)")
        return GateReading("thermal", OPEN, "no CPU speed limit or thermal warning (pmset -g therm)")
    return _thermal_linux(p)


def _thermal_linux(p: Probe) -> GateReading:
    base = "/sys/class/thermal"
    try:
        zones = sorted(n for n in p.listdir(base) if n.startswith("thermal_zone"))
    except FileNotFoundError:
        zones = []
    hottest: tuple[float, str] | None = None
    for z in zones:
        d = f"{base}/{z}"
        temp = _try_read(p, f"{d}/temp")
        if not temp or not temp.lstrip("-").isdigit():
            continue
        t = int(temp) / 1000
        kind = _try_read(p, f"{d}/type") or z
        hottest = max(hottest or (t, kind), (t, kind))
        for i in range(16):  # trip points are numbered from 0
            ttype = _try_read(p, f"{d}/trip_point_{i}_type")
            if ttype is None:
                break
            trip = _try_read(p, f"{d}/trip_point_{i}_temp")
            if ttype in ("passive", "hot", "critical") and trip and trip.isdigit() and int(trip) > 0 and t * 1000 >= int(trip):
                return GateReading("thermal", CLOSED, f"{kind} at {t:.0f}°C, at its {ttype} trip point {int(trip) / 1000:.0f}°C")
    if hottest is None:
        return GateReading("thermal", OPEN, "no thermal sensors exposed (not checked)")
    return GateReading("thermal", OPEN, f"hottest {hottest[1]} {hottest[0]:.0f}°C, below trip points")


# --- disk and hours -----------------------------------------------------------------------


def gate_disk(cfg: GatesConfig, p: Probe, path: Path, need_bytes: int) -> GateReading:
    if not cfg.disk:
        return GateReading("disk", OFF, "disk gate off")
    # The state dir may not exist yet: measure the nearest existing parent.
    probe_path = path
    while not probe_path.exists() and probe_path != probe_path.parent:
        probe_path = probe_path.parent
    free = p.disk_free(probe_path)
    want = need_bytes + cfg.min_free_disk_gb * GIB
    text = f"{free / GIB:.1f} GiB free on {probe_path}, need {want / GIB:.1f} GiB"
    return GateReading("disk", OPEN if free >= want else CLOSED, text)


def _minutes(hhmm: str) -> int:
    h, m = hhmm.split(":")
    return int(h) * 60 + int(m)


def gate_quiet_hours(cfg: GatesConfig, p: Probe) -> GateReading:
    if not cfg.quiet_hours:
        return GateReading("quiet_hours", OFF, "no quiet hours set")
    now = p.now()
    t = now.hour * 60 + now.minute
    for window in cfg.quiet_hours:
        start, end = (_minutes(x) for x in window.split("-"))
        inside = start <= t < end if start <= end else (t >= start or t < end)  # wraps midnight
        if inside:
            return GateReading("quiet_hours", CLOSED, f"{now:%H:%M} is inside quiet hours {window}")
    return GateReading("quiet_hours", OPEN, f"{now:%H:%M} is outside quiet hours {', '.join(cfg.quiet_hours)}")


# --- all together -------------------------------------------------------------------------


def _safe(name: str, fn: Callable[[], GateReading]) -> GateReading:
    try:
        return fn()
    except Exception as e:  # a probe never takes the daemon down: unknown, shown in status
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return GateReading(name, UNKNOWN, f"probe failed: {msg}")


def read_gates(
    cfg: GatesConfig,
    *,
    need_memory_bytes: int = 0,
    disk_path: Path | None = None,
    probe: Probe | None = None,
    need_disk_bytes: int = 0,
) -> dict[str, GateReading]:
    """Read every gate. Never raises; a probe that fails reads ``unknown``."""
    p = probe or Probe()
    disk = Path(disk_path) if disk_path is not None else Path.home()
    return {
        "idle": _safe("idle", lambda: gate_idle(cfg, p)),
        "power": _safe("power", lambda: gate_power(cfg, p)),
        "memory": _safe("memory", lambda: gate_memory(cfg, p, need_memory_bytes)),
        "thermal": _safe("thermal", lambda: gate_thermal(cfg, p)),
        "disk": _safe("disk", lambda: gate_disk(cfg, p, disk, need_disk_bytes)),
        "quiet_hours": _safe("quiet_hours", lambda: gate_quiet_hours(cfg, p)),
    }


def all_open(readings: dict[str, GateReading]) -> bool:
    """True when every gate is open or off; unknown counts as closed."""
    return all(r.state in (OPEN, OFF) for r in readings.values())


def closed(readings: dict[str, GateReading]) -> list[str]:
    """'name: reading' for each gate holding a cycle back (for status and logs)."""
    return [f"{r.name}: {r.reading}" for r in readings.values() if r.state not in (OPEN, OFF)]
