"""Reliability: SIGKILL during ingest, mine, training and registration, of a Ray worker during ingest and curate, two trainings at
once on one store, PII/secret canaries through the whole loop, and runs that cannot fit
(too little data, a base model too large for memory, a disk too full).

Everything runs the real `factory` CLI in subprocesses inside a throw-away workspace
(tests/reliability/workspace.py) on a slice of the sample logs and the tiny random
model. Kill points are drawn from fixed seeds, so a failure reproduces. After each kill of
a `factory` run, no process of that run may remain (its pool workers, its launches). The
module prints its counts (faults injected, kills landed, kills that left a half-written
state, processes a killed run left behind (orphans), reruns matched, canaries planted /
found) at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import random
import shutil
import subprocess
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow import MlflowClient

from factory.curate import curate_store
from factory.ingest import ingest, read_records
from factory.catalog import load_catalog
from factory.io import SPLITS
from factory.registry import HISTORY_TAG, REGISTERED_TAG
from factory.resources import MIN_FREE_ENV
from reliability import canaries
from reliability.workspace import (SAMPLES, has_row, integrity, kill_at, leftovers, modified, random_delays, run,
                                   start, survivors, tiny_overrides)

COUNTS: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def print_counts(request):
    yield
    writer = request.config.pluginmanager.get_plugin("terminalreporter")
    kinds = ", ".join(f"{stage} {COUNTS['faults.' + stage]}" for stage in ("ingest", "ingest-ray", "curate-ray", "mine", "finetune",
                                                                   "register"))
    line = ("reliability: faults injected {faults} ({kinds}), kills landed {landed}, kills mid-write {partial}, "
            "orphans: {orphans}, reruns matched {matched}, canaries planted {planted}, canaries found {found}").format(
                kinds=kinds, **{k: COUNTS[k] for k in ("faults", "landed", "partial", "orphans", "matched", "planted",
                                                       "found")})
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if writer and capture:
        with capture.global_and_fixture_disabled():
            writer.write_line(f"\n{line}")


def _client(ws: Path) -> MlflowClient:
    uri = f"sqlite:///{ws / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A workspace after ingest, curate and mine of 240 proxy-log lines and the
    fine-tuning export, both carrying PII/secret canaries."""
    ws = tmp_path_factory.mktemp("prepared")
    logs = ws / "logs"
    logs.mkdir()
    proxy = (SAMPLES / "support-agent-2026-11-03.jsonl").read_text(errors="replace").splitlines()[:240]
    proxy, planted = canaries.plant_proxy(proxy)
    export, planted_ft = canaries.plant_finetune((SAMPLES / "finetune-export.jsonl").read_text().splitlines()[:40])
    (logs / "proxy.jsonl").write_text("\n".join(proxy) + "\n")
    (logs / "export.jsonl").write_text("\n".join(export) + "\n")
    COUNTS["planted"] = planted + planted_ft
    for args in (["ingest", "logs"], ["curate"], ["mine", "--min-examples", "20"]):
        done = run(ws, *args)
        assert done.returncode == 0, done.stdout + done.stderr
    return ws


def _kill(ws: Path, driver: subprocess.Popen, *when, **poll) -> bool:
    """`kill_at(driver, *when, **poll)`, then the run must leave no process behind: what is left of it
    (see `survivors`) counts as orphans, is killed, and fails the test. Returns whether the kill landed."""
    landed = kill_at(driver, *when, **poll)
    left = survivors(driver, ws)
    COUNTS["orphans"] += len(left)
    described = [f"{p.pid} {_title(p)}" for p in left]
    for process in left:
        with suppress(psutil.Error):
            process.kill()
    assert not left, f"the killed run left {len(left)} processes behind: {described}"
    return landed


def _copy(prepared: Path, dest: Path) -> Path:
    shutil.copytree(prepared, dest, ignore=shutil.ignore_patterns("cli-*.log"))
    return dest


def _ready_tasks(ws: Path) -> dict[str, dict]:
    catalog = yaml.safe_load((ws / "datasets" / "tasks.yaml").read_text())["tasks"]
    return {name: e for name, e in catalog.items() if e["status"] == "ready"}


# --- kill -9 during ingest -----------------------------------------------------------------


def _ingest_view(data: Path) -> tuple[list[str], int]:
    """What a reader sees: the sorted record ids, and the number of quarantined units."""
    ids = sorted(r.id for r in read_records(data / "records" / "raw"))
    quarantined = sum(len(p.read_bytes().splitlines()) for p in (data / "quarantine" / "ingest").glob("*.jsonl"))
    return ids, quarantined


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_during_ingest_then_rerun_matches_a_clean_run(tmp_path, seed):
    logs = tmp_path / "logs"
    logs.mkdir()
    for path in sorted(SAMPLES.glob("*.jsonl")):
        shutil.copy(path, logs)
    ref = tmp_path / "reference"
    ingest([logs], ref / "records" / "raw", ref / "quarantine" / "ingest", watermarks=ref / "records" / "watermarks.json")
    expected = _ingest_view(ref)

    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "logs").symlink_to(logs)
    for delay in random_delays(seed, 2, 0.0, 0.6):  # two kills in a row, then a full run
        COUNTS["faults"] += 1
        COUNTS["faults.ingest"] += 1
        COUNTS["landed"] += _kill(ws, start(ws, "ingest", "logs"), delay, lambda: (ws / "datasets").exists())
    done = run(ws, "ingest", "logs")
    assert done.returncode == 0, done.stdout + done.stderr
    ids, quarantined = _ingest_view(ws / "datasets")
    assert len(ids) == len(set(ids)), "duplicate records after the rerun"
    assert (ids, quarantined) == expected
    assert not [p for p in (ws / "datasets" / "records" / "raw").glob("*.parquet") if p.name.startswith(".")]
    again = run(ws, "ingest", "logs")
    assert again.returncode == 0 and _ingest_view(ws / "datasets") == expected
    COUNTS["matched"] += 1


# --- kill -9 of a Ray worker during curate ----------------------------------------------------

CURATED = ("curated.parquet", "curate.jsonl", "report.json")


def _curate(raw: Path, out: Path, engine: str, workers: int | None = None) -> dict:
    return curate_store(raw, *(out / name for name in CURATED), engine=engine, workers=workers)


def _title(process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:  # gone, or a zombie
        return ""


def _kill_one_while(running, cluster, title: str, stage: str) -> int | None:
    """SIGKILL the first process of the Ray cluster whose command line holds `title`, while
    `running` runs; its pid, or None when the run ended first."""
    COUNTS["faults"] += 1
    COUNTS[f"faults.{stage}"] += 1
    while not running.done():
        busy = [p for p in cluster.processes() if title in _title(p)]
        if busy:
            os.kill(busy[0].pid, signal.SIGKILL)
            return busy[0].pid
        time.sleep(0.02)
    return None


def test_kill_a_ray_worker_during_curate_and_the_output_matches_one_core(tmp_path, ray_cluster):
    """A Ray worker (a scrub actor) killed with SIGKILL mid-stage: Ray restarts it and retries
    its batch, and the stage writes the bytes one local core writes: nothing lost, nothing twice."""
    ingest([SAMPLES / "support-agent-2026-11-03.jsonl"], tmp_path / "raw", tmp_path / "quarantine")
    expected = _curate(tmp_path / "raw", tmp_path / "local", "local", 1)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(_curate, tmp_path / "raw", tmp_path / "ray", "ray")
        killed = _kill_one_while(running, ray_cluster, "MapWorker", "curate-ray")
        assert running.result(timeout=300) == expected
    assert killed is not None, "the curate finished before a worker could be killed"
    COUNTS["landed"] += 1
    for name in CURATED:
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    COUNTS["matched"] += 1


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_kill_a_ray_worker_during_ingest_and_the_store_matches_one_core(tmp_path, ray_cluster, monkeypatch):
    """A Ray worker parsing a piece of log lines killed with SIGKILL: Ray retries the piece on
    another worker, and the records and the quarantine are the bytes one local core writes."""
    monkeypatch.setattr("factory.ingest.PIECE_BYTES", 4 << 10)  # ~1,500 pieces: time to land a kill
    monkeypatch.setenv("FACTORY_WORKERS", "1")
    local = tmp_path / "local"
    expected = ingest([SAMPLES], local / "raw", local / "quarantine", engine="local")
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(ingest, [SAMPLES], tmp_path / "ray" / "raw", tmp_path / "ray" / "quarantine",
                              engine="ray")
        killed = _kill_one_while(running, ray_cluster, "_apply", "ingest-ray")  # a task's title: ray::_apply
        assert running.result(timeout=300) == expected
    assert killed is not None, "the ingest finished before a worker could be killed"
    COUNTS["landed"] += 1
    for folder in ("raw", "quarantine"):
        assert _files(tmp_path / "ray" / folder) == _files(local / folder), folder
    COUNTS["matched"] += 1


# --- kill -9 during mine --------------------------------------------------------------------

MINE_INPUTS = {"records", "quarantine", "curate-report.json", ".mine.lock"}  # what mine reads, and its lock


def _mine_outputs(data: Path) -> dict[str, bytes]:
    """Every file mine wrote under `data` (the catalog, the dataset versions, any temp file), with its bytes."""
    return {str(p.relative_to(data)): p.read_bytes() for p in sorted(data.rglob("*"))
            if p.is_file() and p.relative_to(data).parts[0] not in MINE_INPUTS}


def _mine_progress(data: Path) -> tuple[set[str], int]:
    """What a mine run has published so far (cheap enough to poll every millisecond): the visible version
    folders, and the catalog's mtime (0 while there is none)."""
    versions = {f"{p.name}/{q.name}" for p in data.iterdir() if p.is_dir() and p.name not in MINE_INPUTS
                for q in p.iterdir() if not q.name.startswith(".")}
    catalog = data / "tasks.yaml"
    return versions, catalog.stat().st_mtime_ns if catalog.exists() else 0


def _published(data: Path, versions: int):
    """A `ready` predicate: `versions` more dataset versions became visible, or the catalog was (re)written."""
    before_versions, before_catalog = _mine_progress(data)

    def ready() -> bool:
        now_versions, now_catalog = _mine_progress(data)
        return len(now_versions - before_versions) >= versions or now_catalog != before_catalog
    return ready


def _visible_versions_are_whole(data: Path) -> None:
    """A reader sees no partial dataset: each version folder is complete and named by its splits' hash, and the
    catalog (if any) is whole and points at existing versions."""
    for version in data.glob("*/*"):
        if version.name.startswith(".") or not version.is_dir() or version.parent.name in MINE_INPUTS:
            continue
        files = {p.name for p in version.iterdir() if not p.name.startswith(".")}
        assert files == {f"{s}.jsonl" for s in SPLITS} | {"card.md", "centroid.npy"}, (version, files)
        blob = b"".join((version / f"{s}.jsonl").read_bytes() for s in SPLITS)
        assert hashlib.sha256(blob).hexdigest()[:12] == version.name, f"{version} does not hold its content"
    catalog = load_catalog(data / "tasks.yaml")
    for name, entry in catalog.items():
        if entry["status"] == "ready":
            assert (data / name / entry["dataset_version"] / "card.md").exists(), name


def test_kill_during_mine_then_rerun_matches_a_clean_run(prepared, tmp_path):
    """Three kills in a row, each as a seeded number (1 or 2) of new dataset versions became visible or the
    catalog was written, plus a seeded 0-2 ms (mine computes for ~20 s, then writes its five versions and the
    catalog in ~30 ms). After each, no partial version is visible; then the rerun publishes the same catalog
    and the same dataset versions, byte for byte, as the uninterrupted mine of `prepared`."""
    expected = _mine_outputs(prepared / "datasets")
    assert "tasks.yaml" in expected and any(k.endswith("/train.jsonl") for k in expected)
    ws = _copy(prepared, tmp_path / "ws")
    data = ws / "datasets"
    for name in _mine_outputs(data):
        (data / name).unlink()
    for folder in [p for p in data.iterdir() if p.is_dir() and p.name not in MINE_INPUTS]:
        shutil.rmtree(folder)
    assert _mine_outputs(data) == {}

    for seed in (0, 1, 2):
        ready = _published(data, random.Random(seed).randint(1, 2))
        COUNTS["faults"] += 1
        COUNTS["faults.mine"] += 1
        COUNTS["landed"] += _kill(ws, start(ws, "mine", "--min-examples", "20"), random_delays(seed, 1, 0.0, 0.002)[0],
                                  ready, poll=0.001)
        _visible_versions_are_whole(data)
        COUNTS["partial"] += _mine_outputs(data) not in ({}, expected)  # between the first write and the last

    done = run(ws, "mine", "--min-examples", "20")
    assert done.returncode == 0, done.stdout + done.stderr
    assert _mine_outputs(data) == expected
    assert leftovers(data) == []
    COUNTS["matched"] += 1


# --- kill -9 during training ---------------------------------------------------------------


def _training_dirs(ws: Path, task: str) -> list[Path]:
    return list((ws / "registry" / "training" / task).glob("*"))


def _checkpointed(ws: Path, task: str):
    return lambda: any(d.glob("checkpoint-*") for d in _training_dirs(ws, task))


def _adapter_published(ws: Path, task: str):
    return lambda: any((d / "adapter").is_dir() for d in _training_dirs(ws, task))


@pytest.mark.parametrize("point", ["after-a-checkpoint", "adapter-published"])
def test_kill_during_finetune_then_rerun_registers_one_version(prepared, tmp_path, tiny_model_dir, point):
    ws = _copy(prepared, tmp_path / "ws")
    task = "classify-intent"
    args = ["finetune", task, *tiny_overrides(tiny_model_dir, save_steps=1)]
    ready = _checkpointed(ws, task) if point == "after-a-checkpoint" else _adapter_published(ws, task)
    delay = random_delays(3, 1, 0.0, 1.0)[0] if point == "after-a-checkpoint" else 0.0
    COUNTS["faults"] += 1
    COUNTS["faults.finetune"] += 1
    COUNTS["landed"] += _kill(ws, start(ws, *args), delay, ready)

    done = run(ws, *args)
    assert done.returncode == 0, done.stdout + done.stderr
    again = run(ws, *args)
    assert again.returncode == 0, again.stdout + again.stderr
    versions = _client(ws).search_model_versions(f"name='{task}'")
    assert len(versions) == 1, [v.version for v in versions]
    (run_dir,) = _training_dirs(ws, task)
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    assert json.loads((run_dir / "train.json").read_text())["task"] == task
    assert integrity(ws / "mlflow.db") == "ok"
    assert leftovers(ws / "registry") == [] and leftovers(ws / "reports") == []
    COUNTS["matched"] += 1


# --- kill -9 during register ----------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluated(prepared, tmp_path_factory, tiny_model_dir) -> tuple[Path, list[str]]:
    """A copy of `prepared` where classify-intent is trained and evaluated, not registered, and the
    `factory register` arguments for it. The truth file gives every test call a label other than the
    teacher's, so the teacher scores 0 too and the gates promote the version: registration runs to its end."""
    ws = _copy(prepared, tmp_path_factory.mktemp("evaluated") / "ws")
    task = "classify-intent"
    entry = _ready_tasks(ws)[task]
    labels = entry["output_schema"]["labels"]
    rows = [json.loads(line) for line in
            (ws / "datasets" / task / entry["dataset_version"] / "test.jsonl").read_text().splitlines()]
    (ws / "truth.jsonl").write_text("".join(json.dumps(
        {"id": r["source_id"], "output": {"content": next(x for x in labels if x != r["output"]["content"])}}) + "\n"
        for r in rows))
    args = [task, *tiny_overrides(tiny_model_dir)]
    for command, extra in (("train", []), ("eval", ["--truth", "truth.jsonl"])):
        done = run(ws, command, *args, *extra)
        assert done.returncode == 0, done.stdout + done.stderr
    return ws, [*args, "--truth", "truth.jsonl"]


def test_kill_during_register_then_rerun_leaves_one_promoted_version(evaluated, tmp_path):
    """Three kills in a row, one per step of `register`: logging the model takes ~2.5 s from the run's first
    write to the store, then the version, the challenger alias, the promotion and the done tag take ~0.3 s.
    The first kill falls at a seeded point within 2 s of the first write (while the model is logged), the
    second within 0.25 s of the version's creation (mid-registration), the third the moment the done tag is
    written (a done mark written before the work it vouches for shows here). The store stays sound after each,
    and the rerun ends with one version, challenger and champion, promoted once."""
    ws, args = evaluated
    ws = _copy(ws, tmp_path / "ws")
    task = args[0]
    client = _client(ws)
    db = ws / "mlflow.db"
    version_created = has_row(db, "SELECT count(*) FROM model_versions")
    done_tag = has_row(db, f"SELECT count(*) FROM model_version_tags WHERE key = '{REGISTERED_TAG}'")
    points = [(lambda: modified(db), random_delays(0, 1, 0.0, 2.0)[0]),
              (lambda: version_created, random_delays(1, 1, 0.0, 0.25)[0]),
              (lambda: done_tag, 0.0)]
    for ready, delay in points:
        COUNTS["faults"] += 1
        COUNTS["faults.register"] += 1
        COUNTS["landed"] += _kill(ws, start(ws, "register", *args), delay, ready(), poll=0.005)
        assert integrity(ws / "mlflow.db") == "ok"
        versions = client.search_model_versions(f"name='{task}'")
        assert len(versions) <= 1, [v.version for v in versions]
        COUNTS["partial"] += bool(versions) and REGISTERED_TAG not in versions[0].tags

    done = run(ws, "register", *args)
    assert done.returncode == 0, done.stdout + done.stderr
    (version,) = client.search_model_versions(f"name='{task}'")
    version = client.get_model_version(task, version.version)
    assert version.tags.get(REGISTERED_TAG) == "true" and "score" in version.tags and "promoted_at" in version.tags
    assert sorted(version.aliases) == ["challenger", "champion"]
    assert json.loads(client.get_registered_model(task).tags[HISTORY_TAG]) == [str(version.version)]
    assert f"registered {task} v{version.version} (aliases: challenger, champion)" in " ".join(done.stdout.split())
    assert integrity(ws / "mlflow.db") == "ok"
    assert leftovers(ws / "registry") == [] and leftovers(ws / "artifacts") == []
    COUNTS["matched"] += 1


# --- two trainings at once; canaries ------------------------------------------------------


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory, tiny_model_dir):
    """A copy of `prepared` where two tasks were finetuned at the same time on one store."""
    ws = _copy(prepared, tmp_path_factory.mktemp("trained") / "ws")
    tasks = ["classify-intent", "draft-reply"]
    assert set(tasks) <= set(_ready_tasks(ws))
    procs = {t: start(ws, "finetune", t, *tiny_overrides(tiny_model_dir)) for t in tasks}
    codes = {t: p.wait(timeout=600) for t, p in procs.items()}
    return ws, codes


def test_two_finetunes_at_once_both_finish_and_the_store_is_sound(trained):
    ws, codes = trained
    logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in ws.glob("cli-*.log"))
    assert codes == {"classify-intent": 0, "draft-reply": 0}, logs
    client = _client(ws)
    for task in codes:
        assert len(client.search_model_versions(f"name='{task}'")) == 1
        assert (ws / "reports" / task / "eval.json").exists()
    assert integrity(ws / "mlflow.db") == "ok"


def test_no_canary_survives_the_loop(trained):
    ws, codes = trained
    assert 0 in codes.values(), "no finetune finished: nothing to scan"
    data = ws / "datasets"
    raw = canaries.scan([data / "records" / "raw"])
    assert set(raw) == set(canaries.CANARIES), "the canaries never reached the raw store: the test proves nothing"
    outputs = [p for p in data.iterdir() if p.name not in {"records", "quarantine"}]
    outputs += [data / "records" / "curated.parquet", data / "quarantine" / "curate.jsonl",
                ws / "reports", ws / "registry", ws / "artifacts", ws / "mlflow.db"]
    found = canaries.scan(outputs)
    COUNTS["found"] = sum(len(v) for v in found.values())
    print(f"canaries planted: {COUNTS['planted']}, found: {COUNTS['found']}")
    assert found == {}


# --- resources ------------------------------------------------------------------------------


def test_an_empty_training_split_fails_clearly_before_training(prepared, tmp_path, tiny_model_dir):
    ws = _copy(prepared, tmp_path / "ws")
    entry = _ready_tasks(ws)["classify-intent"]
    (ws / "datasets" / "classify-intent" / entry["dataset_version"] / "train.jsonl").write_text("")
    done = run(ws, "train", "classify-intent", *tiny_overrides(tiny_model_dir))
    assert done.returncode == 1
    assert "Traceback" not in done.stdout + done.stderr
    assert "classify-intent" in done.stdout and "train" in done.stdout
    assert not list((ws / "registry" / "training").glob("*/*/checkpoint-*"))


def test_a_base_model_too_large_for_memory_fails_in_seconds_and_registers_nothing(prepared, tmp_path,
                                                                                   tiny_model_dir, too_large_config):
    config, parameters = too_large_config
    big = tmp_path / "llama-3-70b"
    big.mkdir()
    (big / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):  # a loadable tokenizer
        shutil.copy(tiny_model_dir / name, big)
    ws = _copy(prepared, tmp_path / "ws")
    task = "classify-intent"
    began = time.monotonic()
    done = run(ws, "finetune", task, *tiny_overrides(big), env={"CUDA_VISIBLE_DEVICES": ""})
    seconds = time.monotonic() - began
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 1, output
    assert "Traceback" not in output
    assert f"base model '{big}' is too large for this machine's memory" in output, output
    assert f"{parameters / 1e9:.2f}B parameters" in output and "GiB is available" in output, output
    assert seconds < 120, f"took {seconds:.0f} s to refuse"
    assert _client(ws).search_model_versions(f"name='{task}'") == []
    assert not list((ws / "registry" / "training").glob(f"{task}/*/*")), "the run wrote training files"


def test_a_disk_too_full_fails_ingest_before_writing_anything(tmp_path):
    ws = tmp_path / "ws"
    (ws / "logs").mkdir(parents=True)
    shutil.copy(SAMPLES / "support-agent-2026-11-03.jsonl", ws / "logs")
    free_mb = shutil.disk_usage(tmp_path).free // 2**20
    done = run(ws, "ingest", "logs", env={MIN_FREE_ENV: str(free_mb + 1024)})
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 1, output
    assert "Traceback" not in output
    assert f"disk too full to write {ws / 'datasets' / 'records' / 'raw'}" in output, output
    assert MIN_FREE_ENV in output and "is free there" in output, output
    assert not (ws / "datasets").exists(), "ingest wrote files"
