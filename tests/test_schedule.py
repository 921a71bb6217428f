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
