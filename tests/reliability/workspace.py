"""A throw-away factory workspace driven through the real `factory` CLI in subprocesses.

Every path the CLI writes is redirected into the workspace folder (FACTORY_DATA_DIR,
FACTORY_REGISTRY_DIR, MLFLOW_TRACKING_URI, FACTORY_ARTIFACT_ROOT, and the working
directory for reports/), so a test can kill a run with SIGKILL, rerun it and inspect
everything that was left on disk.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from factory.procs import parent_death_kill

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "datasets" / "samples" / "logs"
FACTORY = str(Path(sys.executable).with_name("factory"))
RECIPE = str(ROOT / "recipes" / "base" / "cpu-lora.yaml")


def env_for(workspace: Path) -> dict[str, str]:
    """The environment that keeps every write of the CLI inside `workspace`."""
    env = dict(os.environ)
    env.update(FACTORY_DATA_DIR=str(workspace / "datasets"), FACTORY_REGISTRY_DIR=str(workspace / "registry"),
               MLFLOW_TRACKING_URI=f"sqlite:///{workspace / 'mlflow.db'}",
               FACTORY_ARTIFACT_ROOT=str(workspace / "artifacts"), OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def tiny_overrides(tiny_model: Path, save_steps: int = 1000) -> list[str]:
    """Recipe flags that make a finetune of the tiny random model take seconds."""
    sets = [f"base_model={tiny_model}", "max_train_samples=16", "max_eval_samples=4", "max_new_tokens=4",
            f"save_steps={save_steps}", "batch_size=4", "torch_threads=1"]
    return ["--recipe", RECIPE] + [x for s in sets for x in ("--set", s)]


def start(workspace: Path, *args: str) -> subprocess.Popen:
    """Start `factory ARGS` in `workspace`, in a session of its own (its pid is the session id of
    every process it starts, even after they are re-parented: see `survivors`); output goes to a
    log file there. It is killed when this process dies (no terminal signal reaches it)."""
    log = open(workspace / f"cli-{time.monotonic_ns()}.log", "wb")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen([FACTORY, *args], cwd=workspace, env=env_for(workspace), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=parent_death_kill())


def run(workspace: Path, *args: str, timeout: float = 300,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `factory ARGS` in `workspace` to completion, with `env` added to the workspace's
    environment; returns the completed process (text output)."""
    return subprocess.run([FACTORY, *args], cwd=workspace, env={**env_for(workspace), **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def kill_at(process: subprocess.Popen, delay: float, ready: Callable[[], bool] = lambda: True,
            deadline: float = 240, poll: float = 0.05) -> bool:
    """SIGKILL `process` `delay` seconds after `ready()` first holds (checked every `poll`
    seconds). Returns True when the kill landed (the process was still running), False
    when it had already exited."""
    start = time.monotonic()
    while not ready():
        if process.poll() is not None or time.monotonic() - start > deadline:
            break
        time.sleep(poll)
    end = time.monotonic() + delay
    while time.monotonic() < end and process.poll() is None:
        time.sleep(min(poll, 0.02))
    alive = process.poll() is None
    if alive:
        process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    return alive


def _of_run(process: psutil.Process, session: int, workspace: Path) -> bool:
    """Whether `process` is alive (not a zombie) and belongs to the run: in its session, or
    working under its workspace."""
    try:
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return os.getsid(process.pid) == session or Path(process.cwd()).is_relative_to(workspace)
    except (psutil.Error, OSError):  # gone, or not ours to read
        return False


def survivors(driver: subprocess.Popen, workspace: Path, wait: float = 5.0) -> list[psutil.Process]:
    """The processes of a killed `factory` run (started by `start`) still alive after up to `wait`
    seconds: those in the driver's session or with a working directory under `workspace`."""
    workspace = workspace.resolve()
    deadline = time.monotonic() + wait
    while True:
        found = [p for p in psutil.process_iter() if p.pid != os.getpid() and _of_run(p, driver.pid, workspace)]
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def random_delays(seed: int, count: int, low: float, high: float) -> list[float]:
    rng = random.Random(seed)
    return [rng.uniform(low, high) for _ in range(count)]


def integrity(db: Path) -> str:
    """`PRAGMA integrity_check` of an sqlite file ('ok' when sound)."""
    with sqlite3.connect(db) as conn:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]


def leftovers(folder: Path) -> list[str]:
    """Temporary files or folders (`*.tmp*`) left anywhere under `folder`."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp" in p.name)


def modified(path: Path) -> Callable[[], bool]:
    """A `ready` predicate: True once `path`'s mtime differs from now (a first write to an sqlite file)."""
    before = path.stat().st_mtime_ns
    return lambda: path.stat().st_mtime_ns != before


def has_row(db: Path, query: str) -> Callable[[], bool]:
    """A `ready` predicate: True once `query` on the sqlite file `db` returns a non-zero first
    value (read-only, a short lock timeout; any error counts as not yet)."""
    def ready() -> bool:
        try:
            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.01)
        except sqlite3.Error:
            return False
        try:
            return bool(conn.execute(query).fetchone()[0])
        except sqlite3.Error:
            return False
        finally:
            conn.close()
    return ready
