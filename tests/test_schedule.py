"""`factory schedule` against the real crontab; the user's own entries are kept and restored."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from typer.testing import CliRunner

from factory.cli import app

if shutil.which("crontab") is None:
    pytest.fail("crontab is missing: install cron (apt-get install cron); .ci/run does", pytrace=False)


@pytest.fixture
def crontab():
    saved = subprocess.run(["crontab", "-l"], capture_output=True, text=True)
    subprocess.run(["crontab", "-"], input="# someone else's job\n15 4 * * * /bin/true\n", text=True, check=True)
    yield lambda: subprocess.run(["crontab", "-l"], capture_output=True, text=True).stdout
    if saved.returncode == 0:
        subprocess.run(["crontab", "-"], input=saved.stdout, text=True, check=True)
    else:
        subprocess.run(["crontab", "-r"], check=False)


def test_install_show_replace_and_remove(crontab, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    logs = tmp_path / "incoming"
    logs.mkdir()

    assert runner.invoke(app, ["schedule", "install", str(logs), "--at", "02:00"]).exit_code == 0
    assert runner.invoke(app, ["schedule", "install", str(logs), "--at", "03:30"]).exit_code == 0
    table = crontab()
    ours = [line for line in table.splitlines() if "factory nightly" in line and not line.startswith("#")]
    assert len(ours) == 1 and ours[0].startswith("30 3 * * * ") and str(logs) in ours[0]
    assert "15 4 * * * /bin/true" in table

    shown = runner.invoke(app, ["schedule", "show"])
    assert "30 3 * * *" in shown.output

    assert runner.invoke(app, ["schedule", "remove"]).exit_code == 0
    assert "slm-factory nightly" not in crontab()
    assert "15 4 * * * /bin/true" in crontab()


def test_a_bad_time_is_refused(crontab, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["schedule", "install", str(tmp_path), "--at", "25:00"])
    assert result.exit_code != 0 and "expected HH:MM" in result.output
    assert "slm-factory nightly" not in crontab()


def test_an_unrelated_job_under_a_stale_marker_survives(crontab, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = f"# slm-factory nightly: {tmp_path}"
    legacy = f"0 2 * * * cd {tmp_path} && mkdir -p registry/nightly && factory nightly logs"
    subprocess.run(["crontab", "-"], text=True, check=True,  # a user deleted our job and kept the marker above theirs
                   input=f"{marker}\n5 5 * * * /usr/bin/backup\n{marker}\n{legacy}\n15 4 * * * /bin/true\n")
    runner = CliRunner()
    assert runner.invoke(app, ["schedule", "show"]).output.strip() == legacy  # an earlier version's layout
    assert runner.invoke(app, ["schedule", "install", str(tmp_path), "--at", "01:00"]).exit_code == 0
    table = crontab().splitlines()
    assert table[:2] == ["5 5 * * * /usr/bin/backup", "15 4 * * * /bin/true"] and len(table) == 3
    assert table[2].startswith("0 1 * * * ") and table[2].endswith(f"  {marker}")
    assert runner.invoke(app, ["schedule", "remove"]).output.strip() == "removed"
    assert crontab().splitlines() == ["5 5 * * * /usr/bin/backup", "15 4 * * * /bin/true"]
    assert runner.invoke(app, ["schedule", "remove"]).output.strip() == "no nightly scheduled for this project"
