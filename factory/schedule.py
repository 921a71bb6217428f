"""Schedule the nightly run: a crontab entry (default) or a systemd user timer.

The crontab entry is one line tagged with a marker comment naming this project
folder, so `install` replaces it, `remove` deletes it and other entries are left
alone. The systemd variant writes a service and a timer unit under
~/.config/systemd/user/ and enables the timer with `systemctl --user`. Both raise
RuntimeError with the command to install when the tool is missing.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

UNIT = "slm-factory-nightly"


def _marker(project: Path) -> str:
    return f"# slm-factory nightly: {project}"


def command(project: Path, logs: list[Path]) -> str:
    """The shell command the scheduler runs: the factory of this venv, in the project folder."""
    factory = Path(sys.executable).with_name("factory")
    log = project / "registry" / "nightly" / "cron.log"
    args = " ".join(shlex.quote(str(p)) for p in logs)
    return (f"cd {shlex.quote(str(project))} && mkdir -p {shlex.quote(str(log.parent))} && "
            f"{shlex.quote(str(factory))} nightly {args} >> {shlex.quote(str(log))} 2>&1")


def parse_at(at: str) -> tuple[int, int]:
    """'HH:MM' -> (hour, minute); raises ValueError naming the bad value."""
    match = re.fullmatch(r"(\d{1,2}):(\d{2})", at)
    if not match or int(match[1]) > 23 or int(match[2]) > 59:
        raise ValueError(f"--at {at!r}: expected HH:MM (24-hour)")
    return int(match[1]), int(match[2])


def _crontab_bin() -> str:
    path = shutil.which("crontab")
    if path is None:
        raise RuntimeError("crontab not found: install cron (Debian: apt-get install cron) or use --systemd")
    return path


def _read_crontab() -> list[str]:
    done = subprocess.run([_crontab_bin(), "-l"], capture_output=True, text=True)
    return done.stdout.splitlines() if done.returncode == 0 else []


def _write_crontab(lines: list[str]) -> None:
    subprocess.run([_crontab_bin(), "-"], input="\n".join(lines) + "\n", text=True, check=True)


def _without_ours(lines: list[str], project: Path) -> list[str]:
    marker, kept, skip = _marker(project), [], False
    for line in lines:
        if line == marker:
            skip = True
            continue
        if skip:
            skip = False
            continue
        kept.append(line)
    return kept


def install_cron(project: Path, logs: list[Path], at: str) -> str:
    hour, minute = parse_at(at)
    entry = f"{minute} {hour} * * * {command(project, logs)}"
    _write_crontab(_without_ours(_read_crontab(), project) + [_marker(project), entry])
    return entry


def show_cron(project: Path) -> str | None:
    lines = _read_crontab()
    marker = _marker(project)
    return next((lines[i + 1] for i, line in enumerate(lines[:-1]) if line == marker), None)


def remove_cron(project: Path) -> bool:
    lines = _read_crontab()
    kept = _without_ours(lines, project)
    if kept != lines:
        _write_crontab(kept)
    return kept != lines


def _units_dir() -> Path:
    return Path.home() / ".config" / "systemd" / "user"


def install_systemd(project: Path, logs: list[Path], at: str) -> Path:
    hour, minute = parse_at(at)
    folder = _units_dir()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{UNIT}.service").write_text(
        f"[Unit]\nDescription=SLM Factory nightly retraining ({project})\n\n"
        f"[Service]\nType=oneshot\nExecStart=/bin/sh -c {shlex.quote(command(project, logs))}\n")
    timer = folder / f"{UNIT}.timer"
    timer.write_text(f"[Unit]\nDescription=SLM Factory nightly at {at}\n\n"
                     f"[Timer]\nOnCalendar=*-*-* {hour:02d}:{minute:02d}:00\nPersistent=true\n\n"
                     f"[Install]\nWantedBy=timers.target\n")
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        raise RuntimeError(f"wrote {timer}, but systemctl is not available to enable it")
    subprocess.run([systemctl, "--user", "daemon-reload"], check=True)
    subprocess.run([systemctl, "--user", "enable", "--now", f"{UNIT}.timer"], check=True)
    return timer
