"""Schedule the nightly run: a crontab entry (default) or a systemd user timer.

The crontab entry is one line that ends with a marker comment naming this project folder
(cron hands the whole line to /bin/sh, for which ` # ...` is a comment), so `install`
replaces it, `remove` deletes it and other entries are left alone: a line is this project's
only if it carries the marker itself. Earlier versions put the marker on a line of its own
above the job; such a marker line is removed, and the line after it too only when it is this
project's nightly (it starts with `cd <this folder> &&`), so an unrelated job a user wrote
under a stale marker survives. The systemd variant writes a service and a timer unit under
~/.config/systemd/user/ and enables the timer with `systemctl --user`. Both raise
ScheduleError (a FactoryError: the CLI prints it) for a bad time, or with the command to
install when the tool is missing.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from factory.errors import FactoryError

UNIT = "slm-factory-nightly"


class ScheduleError(FactoryError):
    """A time that is not HH:MM, or no crontab / systemctl to schedule with."""


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
    """'HH:MM' -> (hour, minute); raises ScheduleError naming the bad value."""
    match = re.fullmatch(r"(\d{1,2}):(\d{2})", at)
    if not match or int(match[1]) > 23 or int(match[2]) > 59:
        raise ScheduleError(f"--at {at!r}: expected HH:MM (24-hour)")
    return int(match[1]), int(match[2])


def _crontab_bin() -> str:
    path = shutil.which("crontab")
    if path is None:
        raise ScheduleError("crontab not found: install cron (Debian: apt-get install cron) or use --systemd")
    return path


def _read_crontab() -> list[str]:
    done = subprocess.run([_crontab_bin(), "-l"], capture_output=True, text=True)
    return done.stdout.splitlines() if done.returncode == 0 else []


def _write_crontab(lines: list[str]) -> None:
    subprocess.run([_crontab_bin(), "-"], input="\n".join(lines) + "\n", text=True, check=True)


def _ours(line: str, previous: str, project: Path) -> bool:
    """Whether a crontab line belongs to this project's nightly: it ends with the marker (the
    marker alone included), or it is the job under a marker line of an earlier version."""
    marker = _marker(project)
    return line.endswith(marker) or (previous == marker and f" cd {shlex.quote(str(project))} && " in line)


def _split(lines: list[str], project: Path) -> tuple[list[str], list[str]]:
    """(this project's lines, every other line), each in crontab order."""
    ours, others = [], []
    for previous, line in zip(["", *lines], lines):
        (ours if _ours(line, previous, project) else others).append(line)
    return ours, others


def install_cron(project: Path, logs: list[Path], at: str) -> str:
    """Install (or replace) this project's nightly job; returns its crontab line."""
    hour, minute = parse_at(at)
    entry = f"{minute} {hour} * * * {command(project, logs)}  {_marker(project)}"
    _write_crontab(_split(_read_crontab(), project)[1] + [entry])
    return entry


def show_cron(project: Path) -> str | None:
    """This project's crontab job line, or None when none is installed."""
    ours = [line for line in _split(_read_crontab(), project)[0] if line != _marker(project)]
    return ours[-1] if ours else None


def remove_cron(project: Path) -> bool:
    """Delete this project's lines from the crontab; False when it had none."""
    ours, others = _split(_read_crontab(), project)
    if ours:
        _write_crontab(others)
    return bool(ours)


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
        raise ScheduleError(f"wrote {timer}, but systemctl is not available to enable it")
    subprocess.run([systemctl, "--user", "daemon-reload"], check=True)
    subprocess.run([systemctl, "--user", "enable", "--now", f"{UNIT}.timer"], check=True)
    return timer
