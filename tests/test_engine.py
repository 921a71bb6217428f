"""The engines: ingest and curate write the same bytes on one core, on every core and on Ray, and
so does mining with its embeddings on Ray; Ray runs
independent jobs with a failure stopping none of the others; the nightly's tasks run as Ray
tasks with the same summary; a local pool's workers, and a command started with
`parent_death_kill`, die with the process that started them. The Ray
tests share one real two-node cluster (`ray_cluster`)."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import psutil
import pytest

import mlflow
from mlflow import MlflowClient

from factory.curate import curate_store
from factory.engine import engine_name, local_workers, run_each
from factory.errors import FactoryError
from factory.ingest import MAX_RECORD_BYTES, ingest
from factory.nightly import NightlyConfig, Paths, nightly

ROOT = Path(__file__).resolve().parents[1]
DAY = ROOT / "datasets" / "samples" / "logs" / "support-agent-2026-11-03.jsonl"
OUTPUTS = ("curated.parquet", "curate.jsonl", "report.json")


def curate_with(raw: Path, out: Path, **engine) -> dict:
    return curate_store(raw, out / OUTPUTS[0], out / OUTPUTS[1], out / OUTPUTS[2], **engine)


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """One day of the sample logs ingested (523 records: PII, failures, duplicates)."""
    root = tmp_path_factory.mktemp("engine")
    ingest([DAY], root / "raw", root / "quarantine")
    return root / "raw"


def test_an_unknown_engine_or_worker_count_is_refused_by_name(monkeypatch):
    with pytest.raises(FactoryError, match="unknown engine 'spark'.*FACTORY_ENGINE"):
        engine_name("spark")
    monkeypatch.setenv("FACTORY_ENGINE", "ray")
    assert engine_name() == "ray" and engine_name("local") == "local"
    monkeypatch.setenv("FACTORY_WORKERS", "0")
    with pytest.raises(FactoryError, match="FACTORY_WORKERS"):
        local_workers()


# a driver whose two pool workers sleep, piece after piece, until it is killed
POOL_DRIVER = """
import time
from factory.engine import map_each
results = map_each(time.sleep, iter(lambda: 0.05, None), engine="local", workers=2)
next(results)
print("running", flush=True)
for _ in results:
    pass
"""


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_local_pool_worker_dies_when_its_driver_is_killed():
    """kill -9 (or the OOM killer) of a stage that runs a local pool leaves no worker behind:
    the kernel kills the workers within seconds, where they used to live on under init."""
    driver = subprocess.Popen([sys.executable, "-c", POOL_DRIVER], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert driver.stdout.readline() == "running\n"
        workers = psutil.Process(driver.pid).children()
        assert len(workers) == 2, workers
    finally:
        driver.kill()
        driver.wait()
    deadline = time.monotonic() + 5
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [w.pid for w in workers if _alive(w)]
    for pid in left:
        os.kill(pid, 9)
    assert left == [], f"pool workers {left} outlived their killed driver"


# a process that starts `sleep` the way train.py starts `accelerate launch`, then waits to be killed
STARTER = """
import subprocess, sys
from factory.procs import parent_death_kill
print(subprocess.Popen(["sleep", "600"], preexec_fn=parent_death_kill()).pid, flush=True)
sys.stdin.read()
"""


def test_a_command_started_with_parent_death_kill_dies_with_its_starter():
    starter = subprocess.Popen([sys.executable, "-c", STARTER], cwd=ROOT, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    child = psutil.Process(int(starter.stdout.readline()))
    starter.kill()
    starter.wait()
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(child):
        child.kill()
        pytest.fail(f"`sleep` {child.pid} outlived its killed starter")


def test_a_process_whose_parent_is_already_gone_exits_at_once():
    """The race: the parent died before the child asked to die with it (the child was re-parented)."""
    late = subprocess.run([sys.executable, "-c", "import os; from factory.procs import die_with_parent;"
                           "die_with_parent(os.getppid() + 1); print('ran on')"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (late.returncode, late.stdout) == (1, "")


def test_curate_on_every_core_writes_the_same_bytes_as_one_core(raw, tmp_path):
    """(Ray's bytes are checked against one core's in test_reliability.py, with a worker killed.)"""
    one = curate_with(raw, tmp_path / "one", engine="local", workers=1)
    assert one["read"] == 523 and 0 < one["kept"] < one["read"] and one["pii_placeholders"]
    assert curate_with(raw, tmp_path / "all", engine="local", workers=2) == one
    for name in OUTPUTS:
        assert (tmp_path / "all" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


def _ingested(root: Path) -> dict[str, bytes]:
    """Every file an ingest wrote under `root`, the watermarks without their times."""
    files = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    marks = json.loads(files.pop("records/watermarks.json"))
    return {**files, "records/watermarks.json": json.dumps({k: {**m, "updated": ""} for k, m in marks.items()}).encode()}


def test_ingest_writes_the_same_files_in_one_piece_on_one_core_every_core_and_ray(ray_cluster, tmp_path, monkeypatch):
    """Ingest's parsing is mapped in pieces of lines; wherever the pieces run, and however small
    they are, the records, the quarantine and the watermarks are the same bytes."""
    logs = tmp_path / "logs"
    shutil.copytree(ROOT / "datasets" / "samples" / "logs", logs / "samples")
    shutil.copytree(ROOT / "tests" / "fixtures" / "formats", logs / "formats")  # documents: parsed by the driver
    (logs / "day.jsonl.gz").write_bytes(gzip.compress(DAY.read_bytes()[:200_000]))
    long = b'{"pad": "' + b"x" * MAX_RECORD_BYTES + b'"}\n'  # over the record limit, and 64 pieces long
    (logs / "torn.jsonl").write_bytes(DAY.read_bytes()[:150_000] + b"\n[1]\n{bad\n\n" + long + b"\n" + long[:-1]
                                      + DAY.read_bytes()[:70_000] + b"\n" + DAY.read_bytes()[-3000:-10])
    runs = {}
    for label, piece, workers, engine in (("one piece", 1 << 30, "1", "local"), ("one core", 16 << 10, "1", "local"),
                                          ("every core", 16 << 10, "2", "local"), ("ray", 16 << 10, "1", "ray")):
        monkeypatch.setattr("factory.ingest.PIECE_BYTES", piece)
        monkeypatch.setenv("FACTORY_WORKERS", workers)
        out = tmp_path / label
        stats = ingest([logs], out / "records" / "raw", out / "quarantine", engine=engine)
        runs[label] = stats, _ingested(out)
    stats, files = runs["one piece"]
    assert stats.accepted > 3000 and stats.duplicates and stats.quarantined >= 15 and len(stats.formats) >= 5
    assert stats.reasons["line is over the N byte limit"] == 2
    assert json.loads(files["records/watermarks.json"])[str((logs / "torn.jsonl").resolve())]["tail"]
    for label, (other_stats, other_files) in runs.items():
        assert other_stats == stats, label
        assert other_files.keys() == files.keys(), label
        for name in files:
            assert other_files[name] == files[name], (label, name)


def test_local_batches_come_sorted_across_files_and_carry_only_their_own_rows(tmp_path):
    """A worker is sent its batch alone: a slice of the whole sorted table would pickle with all of its
    buffers (a 1M-record curate sent ~4 GB per 256-record batch)."""
    import pickle

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from factory.engine import _local_batches

    rng = np.random.default_rng(0)
    tables = []
    for i in range(4):
        n = int(rng.integers(1, 2000))
        tables.append(pa.table({"timestamp": [f"2026-11-{d:02d}" for d in rng.integers(1, 28, n)],
                                "id": [f"{x:012x}" for x in rng.integers(0, 1 << 40, n)],
                                "text": ["x" * int(k) for k in rng.integers(1, 200, n)]}))
        pq.write_table(tables[-1], tmp_path / f"part-{i}.parquet", row_group_size=500)
    whole = pa.concat_tables(tables).sort_by([("timestamp", "ascending"), ("id", "ascending")])
    batches = list(_local_batches(sorted(tmp_path.glob("*.parquet")), whole.schema, ["timestamp", "id"], 256))
    assert pa.concat_tables(batches).equals(whole)
    assert all(b.num_rows <= 256 for b in batches)
    assert max(len(pickle.dumps(b)) for b in batches) < 256 * 300


def test_ray_runs_each_job_on_a_worker_and_a_failed_one_stops_no_other(ray_cluster):
    import ray

    jobs = [os.getpid, partial(engine_name, "spark"), partial(os._exit, 3), os.getpid]
    results = run_each(jobs, [{"num_cpus": 1}] * 4, "ray")
    assert all(isinstance(pid, int) and pid != os.getpid() for pid in (results[0], results[3]))
    assert isinstance(results[1], FactoryError) and "unknown engine" in str(results[1])
    assert isinstance(results[2], ray.exceptions.RayError)  # its worker died twice (one retry)


def test_the_nightly_trains_its_tasks_as_ray_tasks(ray_cluster, tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    monkeypatch.setenv("FACTORY_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "day1.jsonl").write_bytes(DAY.read_bytes())
    paths = Paths(tmp_path / "datasets", tmp_path / "registry", tmp_path / "reports")
    config = NightlyConfig(recipe=str(ROOT / "recipes" / "base" / "cpu-lora.yaml"), overrides=(
        f"base_model={tiny_model_dir}", "max_train_samples=8", "max_eval_samples=4", "max_new_tokens=4",
        "save_steps=1000"), max_tasks=2, engine="ray")
    summary = nightly([tmp_path / "logs"], paths, config)

    assert [t.action for t in summary.tasks].count("trained") == 2, summary.tasks
    assert [t.reason.startswith("over tonight's budget") for t in summary.tasks].count(True) == 2
    client = MlflowClient()
    for task in summary.trained:
        assert [int(v.version) for v in client.search_model_versions(f"name='{task}'")] == [1]
    assert (paths.registry / "nightly" / "latest.md").read_text().count("| trained |") == 2


def test_mining_on_ray_writes_the_same_datasets_as_local(ray_cluster, raw, tmp_path):
    """The embeddings (anchors, centroids) run on the cluster's actors: same tasks, same bytes, except the
    centroids' last float bits (a Ray worker's BLAS threads sum in another order)."""
    import pyarrow.parquet as pq

    from factory.mine import mine
    from factory.records import from_table

    curate_with(raw, tmp_path / "curated", engine="local", workers=1)
    records = from_table(pq.read_table(tmp_path / "curated" / OUTPUTS[0]))
    local = mine(records, tmp_path / "local", engine="local")
    assert mine(records, tmp_path / "ray", engine="ray") == local
    assert [e["status"] for e in local.values()].count("ready") >= 2
    files = sorted(p.relative_to(tmp_path / "local") for p in (tmp_path / "local").rglob("*") if p.is_file()
                   and not p.name.startswith("."))
    assert any(f.name == "centroid.npy" for f in files)
    for name in files:
        if name.suffix == ".npy":
            np.testing.assert_allclose(np.load(tmp_path / "ray" / name), np.load(tmp_path / "local" / name), atol=1e-6)
            continue
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name


def test_the_cli_names_a_bad_engine_and_writes_nothing(raw, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from factory.cli import app

    data = tmp_path / "datasets"
    (data / "records").mkdir(parents=True)
    (data / "records" / "raw").symlink_to(raw)
    monkeypatch.setenv("FACTORY_DATA_DIR", str(data))
    done = CliRunner().invoke(app, ["curate", "--engine", "spark"])
    assert done.exit_code == 1 and "unknown engine 'spark'" in done.output, done.output
    assert not (data / "records" / "curated.parquet").exists()
