"""Gates fed the real output formats of ioreg, pmset, sysctl, loginctl, /proc and /sys.

Only the commands and files that cannot exist on this Linux box are faked, all through
the one seam (:class:`forged.gates.Probe`'s run/read/listdir).
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from forged.common.config import GatesConfig
from forged.daemon.gates import GateReading, Probe, all_open, closed, read_gates

FIX = Path(__file__).parent / "fixtures" / "gates"
GIB = 1024**3
# 14 minutes after the IdleSinceHint in the loginctl fixtures (2024-05-01 10:00 UTC).
NOW = datetime(2024, 5, 1, 10, 14, tzinfo=UTC)


class Machine:
    """Answers commands from fixtures; serves /sys from a fixture tree and /proc from files."""

    def __init__(self, commands: dict[str, str | Exception] | None = None, *, sys_tree: str | None = None,
                 files: dict[str, str] | None = None) -> None:
        self.commands = commands or {}
        self.sys_root = FIX / "sys" / sys_tree if sys_tree else None
        self.files = files or {}
        self.calls: list[list[str]] = []

    def run(self, cmd: list[str]) -> str:
        self.calls.append(cmd)
        key = " ".join(cmd)
        for pattern, answer in self.commands.items():
            if key == pattern or key.startswith(pattern + " "):
                if isinstance(answer, Exception):
                    raise answer
                return (FIX / answer).read_text()
        raise FileNotFoundError(f"[Errno 2] No such file or directory: '{cmd[0]}'")

    def _sys(self, path: str) -> Path:
        if self.sys_root is None or not path.startswith("/sys/"):
            raise FileNotFoundError(path)
        return self.sys_root / path.removeprefix("/sys/")

    def read(self, path: str) -> str:
        if path in self.files:
            return (FIX / self.files[path]).read_text()
        p = self._sys(path)
        if not p.is_file():
            raise FileNotFoundError(path)
        return p.read_text()

    def listdir(self, path: str) -> list[str]:
        return os.listdir(self._sys(path))

    def probe(self, platform: str, now: datetime = NOW, env: dict[str, str] | None = None) -> Probe:
        return Probe(self.run, self.read, platform, lambda: now, listdir=self.listdir, env=env or {})


LINUX_OK_FILES = {"/proc/meminfo": "proc_meminfo.txt", "/proc/pressure/memory": "proc_pressure_memory_calm.txt"}


def gates(probe: Probe, tmp_path: Path, **cfg: object) -> dict[str, GateReading]:
    return read_gates(GatesConfig(**cfg), need_memory_bytes=2 * GIB, disk_path=tmp_path, probe=probe)


# --- macOS --------------------------------------------------------------------------------

MAC_OK = {
    "ioreg -c IOHIDSystem": "ioreg_IOHIDSystem.txt",
    "pmset -g batt": "pmset_batt_ac.txt",
    "pmset -g therm": "pmset_therm_normal.txt",
    "pmset -g": "pmset_g_normal.txt",
    "sysctl -n kern.memorystatus_vm_pressure_level": "sysctl_vm_pressure_level_normal.txt",
    "vm_stat": "vm_stat.txt",
}


def test_macos_all_open(tmp_path: Path) -> None:
    r = gates(Machine(MAC_OK).probe("darwin"), tmp_path, min_free_disk_gb=0.001)
    assert {k: v.state for k, v in r.items()} == {
        "idle": "open", "power": "open", "memory": "open", "thermal": "open", "disk": "open", "quiet_hours": "off",
    }
    assert r["idle"].reading == "idle 14 min (HIDIdleTime), need 10"
    assert r["memory"].reading.startswith("6.2 GiB available, need 3.0 GiB")
    assert all_open(r) and closed(r) == []


def test_macos_idle_threshold(tmp_path: Path) -> None:
    r = gates(Machine(MAC_OK).probe("darwin"), tmp_path, min_idle_minutes=20)
    assert r["idle"].state == "closed" and not all_open(r)
    assert closed(r) == ["idle: idle 14 min (HIDIdleTime), need 20"]


@pytest.mark.parametrize("batt, pmset_g, state, text", [
    ("pmset_batt_battery.txt", "pmset_g_normal.txt", "closed", "on Battery Power, battery 76% (pmset)"),
    ("pmset_batt_ac.txt", "pmset_g_lowpower.txt", "closed", "AC Power, battery 100%, Low Power Mode on"),
    ("pmset_batt_desktop.txt", "pmset_g_normal.txt", "open", "AC Power (pmset)"),
])
def test_macos_power(tmp_path: Path, batt: str, pmset_g: str, state: str, text: str) -> None:
    m = Machine({**MAC_OK, "pmset -g batt": batt, "pmset -g": pmset_g})
    r = gates(m.probe("darwin"), tmp_path)["power"]
    assert (r.state, r.reading) == (state, text)


def test_macos_thermal_limited(tmp_path: Path) -> None:
    r = gates(Machine({**MAC_OK, "pmset -g therm": "pmset_therm_limited.txt"}).probe("darwin"), tmp_path)
    assert r["thermal"].state == "closed" and "CPU speed limited to 35%" in r["thermal"].reading
    r = gates(Machine({**MAC_OK, "pmset -g therm": "pmset_therm_recovered.txt"}).probe("darwin"), tmp_path)
    assert r["thermal"].state == "open"


def test_macos_memory_pressure_and_size(tmp_path: Path) -> None:
    m = Machine({**MAC_OK, "sysctl -n kern.memorystatus_vm_pressure_level": "sysctl_vm_pressure_level_warning.txt"})
    r = gates(m.probe("darwin"), tmp_path)["memory"]
    assert r.state == "closed" and "memory pressure warning" in r.reading
    r = read_gates(GatesConfig(), need_memory_bytes=8 * GIB, disk_path=tmp_path, probe=Machine(MAC_OK).probe("darwin"))
    assert r["memory"].state == "closed" and "need 9.0 GiB" in r["memory"].reading


def test_failing_probes_read_unknown_never_raise(tmp_path: Path) -> None:
    m = Machine({"ioreg -c IOHIDSystem": TimeoutError("ioreg timed out"), "pmset -g batt": "vm_stat.txt"})
    r = gates(m.probe("darwin"), tmp_path)
    assert r["idle"] == GateReading("idle", "unknown", "probe failed: ioreg timed out")
    assert r["power"].state == "unknown" and "pmset" in r["power"].reading
    assert r["memory"].state == "unknown" and r["thermal"].state == "unknown"
    assert not all_open(r)
    assert all("\n" not in x for x in closed(r))


def test_off_gates_count_as_open(tmp_path: Path) -> None:
    m = Machine({})  # every command fails
    r = gates(m.probe("darwin"), tmp_path, idle=False, power=False, memory=False, thermal=False, disk=False)
    assert all(v.state == "off" for v in r.values()) and all_open(r)
    assert m.calls == []  # an off gate runs nothing


# --- Linux --------------------------------------------------------------------------------

LINUX_SESSIONS = {
    "loginctl list-sessions --no-legend": "loginctl_list_sessions.txt",
    "loginctl show-session c1": "loginctl_show_session_c1.txt",
    "loginctl show-session 5": "loginctl_show_session_5.txt",
}


@pytest.mark.parametrize("session2, minutes, state", [
    ("loginctl_show_session_2_idle.txt", 10, "open"),
    ("loginctl_show_session_2_idle.txt", 15, "closed"),
    ("loginctl_show_session_2_active.txt", 10, "closed"),
])
def test_linux_idle_from_logind(tmp_path: Path, session2: str, minutes: float, state: str) -> None:
    m = Machine({**LINUX_SESSIONS, "loginctl show-session 2": session2}, sys_tree="laptop_on_ac", files=LINUX_OK_FILES)
    r = gates(m.probe("linux"), tmp_path, min_idle_minutes=minutes)["idle"]
    assert r.state == state and "logind IdleHint" in r.reading


def test_linux_idle_unreported_session_asks_the_display(tmp_path: Path) -> None:
    cmds = {**LINUX_SESSIONS, "loginctl show-session 2": "loginctl_show_session_2_unreported.txt"}
    m = Machine({**cmds, "xprintidle": "xprintidle.txt"})
    r = gates(m.probe("linux", env={"DISPLAY": ":0"}), tmp_path)["idle"]
    assert (r.state, r.reading) == ("open", "idle 15 min (xprintidle), need 10")
    m = Machine({**cmds, "gdbus call": "gdbus_mutter_idletime.txt"})
    r = gates(m.probe("linux"), tmp_path)["idle"]
    assert (r.state, r.reading) == ("open", "idle 12 min (Mutter IdleMonitor), need 10")
    r = gates(Machine(cmds).probe("linux"), tmp_path)["idle"]
    assert r.state == "unknown" and "does not report IdleHint" in r.reading


def test_linux_server_without_local_sessions_is_idle(tmp_path: Path) -> None:
    m = Machine({"loginctl list-sessions --no-legend": "loginctl_list_sessions_ssh_only.txt",
                 "loginctl show-session 5": "loginctl_show_session_5.txt"})
    r = gates(m.probe("linux"), tmp_path)["idle"]
    assert r.state == "open" and "no local user session" in r.reading
    # No logind at all (a container): utmp via `who` decides.
    r = gates(Machine({"who": "who_ssh_only.txt"}).probe("linux"), tmp_path)["idle"]
    assert r.state == "open" and "(who)" in r.reading
    r = gates(Machine({"who": "who_console.txt"}).probe("linux"), tmp_path)["idle"]
    assert r.state == "unknown" and "1 local login" in r.reading


@pytest.mark.parametrize("tree, state, text", [
    ("laptop_on_ac", "open", "on AC, BAT0 81% charging"),
    ("laptop_on_battery", "closed", "on battery, BAT0 64% discharging"),
    ("laptop_usbc", "closed", "on AC, BAT1 80% not charging, platform profile low-power"),
    ("desktop_with_mouse", "open", "no battery: on AC"),
])
def test_linux_power(tmp_path: Path, tree: str, state: str, text: str) -> None:
    r = gates(Machine(sys_tree=tree, files=LINUX_OK_FILES).probe("linux"), tmp_path)["power"]
    assert (r.state, r.reading) == (state, text)


def test_linux_no_power_supply_dir_means_ac(tmp_path: Path) -> None:
    r = gates(Machine(files=LINUX_OK_FILES).probe("linux"), tmp_path)["power"]
    assert r.state == "open"


def test_linux_memory(tmp_path: Path) -> None:
    r = gates(Machine(files=LINUX_OK_FILES).probe("linux"), tmp_path)["memory"]
    assert (r.state, r.reading) == ("open", "6.0 GiB available, need 3.0 GiB; PSI some avg10 0.0%")
    high = {**LINUX_OK_FILES, "/proc/pressure/memory": "proc_pressure_memory_high.txt"}
    r = gates(Machine(files=high).probe("linux"), tmp_path)["memory"]
    assert r.state == "closed" and r.reading == "memory pressure: PSI some avg10 37.5% > 10%"
    no_psi = {"/proc/meminfo": "proc_meminfo.txt"}
    r = gates(Machine(files=no_psi).probe("linux"), tmp_path, memory_headroom_mb=5 * 1024)["memory"]
    assert r.state == "closed" and r.reading.endswith("need 7.0 GiB; no PSI")


def test_linux_thermal(tmp_path: Path) -> None:
    r = gates(Machine(sys_tree="thermal_cool").probe("linux"), tmp_path)["thermal"]
    assert (r.state, r.reading) == ("open", "hottest x86_pkg_temp 52°C, below trip points")
    r = gates(Machine(sys_tree="thermal_hot").probe("linux"), tmp_path)["thermal"]
    assert r.state == "closed" and "at its passive trip point 95°C" in r.reading
    r = gates(Machine().probe("linux"), tmp_path)["thermal"]
    assert r.state == "open" and "no thermal sensors" in r.reading


# --- disk and quiet hours (real disk) ---------------------------------------------------------


def test_disk(tmp_path: Path) -> None:
    p = Machine().probe("linux")
    assert gates(p, tmp_path, min_free_disk_gb=0.001)["disk"].state == "open"
    r = gates(p, tmp_path, min_free_disk_gb=1e9)["disk"]
    assert r.state == "closed" and "GiB free on" in r.reading
    r = read_gates(GatesConfig(min_free_disk_gb=0.001), disk_path=tmp_path / "not" / "yet", probe=p)
    assert r["disk"].state == "open" and str(tmp_path) in r["disk"].reading


@pytest.mark.parametrize("now, windows, state", [
    (datetime(2024, 5, 1, 10, 30), ["09:00-12:00"], "closed"),
    (datetime(2024, 5, 1, 12, 0), ["09:00-12:00"], "open"),
    (datetime(2024, 5, 1, 23, 30), ["22:00-07:00"], "closed"),
    (datetime(2024, 5, 1, 6, 59), ["13:00-14:00", "22:00-07:00"], "closed"),
    (datetime(2024, 5, 1, 7, 0), ["22:00-07:00"], "open"),
])
def test_quiet_hours(tmp_path: Path, now: datetime, windows: list[str], state: str) -> None:
    r = gates(Machine().probe("linux", now=now), tmp_path, quiet_hours=windows)["quiet_hours"]
    assert r.state == state, r.reading


def test_real_probe_on_this_machine_never_raises(tmp_path: Path) -> None:
    r = read_gates(GatesConfig(), disk_path=tmp_path)
    assert set(r) == {"idle", "power", "memory", "thermal", "disk", "quiet_hours"}
    assert all(v.state in ("open", "closed", "unknown", "off") for v in r.values())
    assert r["disk"].state == "open" or "GiB free" in r["disk"].reading
