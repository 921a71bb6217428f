"""Where the record stages and the per-task trainings run: this process and its cores
(`local`), or a Ray cluster (`ray`).

The stages keep their per-record functions; this module only decides how they are mapped.

* `map_sorted_parquet` feeds the rows of a folder of Parquet partitions, sorted, in batches
  through a batch function and yields the results in order. `local` reads the partitions
  here (Arrow), sorts their sort columns, gathers each batch's rows into a table of its own,
  and maps the batches over a process pool of `local_workers()` processes (forked before the
  read, so each inherits the imports but not the records, and builds its own state once; one
  worker runs in this process, no pool). `ray` reads the partitions as a Ray Dataset
  (`ray.data.read_parquet`), sorts it there (materialised in the object store, which spills
  to disk), and maps the batches with `map_batches` over a pool of actors, one per CPU of
  the cluster (each builds its state once); the results stream back to this process in
  order. Either way at most a few batches per worker are in flight, so a worker's memory is
  one batch plus its own state. (`ray` sets this process's Ray Data context: ordered
  output, and the sort's partition count.)
* `map_batches` does the same over a table in memory with fixed batch boundaries (mining's
  embeddings): in this process (`local`), or one Ray actor per CPU (`ray`).
* `map_each` maps a function over small units of work read lazily (ingest's pieces of log
  lines), results in order: the same process pool, or one Ray task per unit (retried on
  another worker when its worker dies).
* `run_each` runs independent jobs (one task's train -> evaluate -> register) one after
  the other here (`local`), or as one Ray task each asking for that job's CPUs and GPUs
  (`ray`); a job that fails, or whose worker dies, is returned as its exception and the
  others go on.

The engine is `--engine`, else `FACTORY_ENGINE`, else `local`. With `ray` the cluster is
`RAY_ADDRESS` (e.g. ``ray://head:10001`` or ``127.0.0.1:6379``), else a cluster started on this
machine with `ray start`, else a new local one for this process. The factory's own
environment (FACTORY_*, MLFLOW_*, HF_*) and, for jobs, its working directory travel to
the workers; the Parquet paths are made absolute, so a multi-machine cluster needs the data
and registry folders on storage every node mounts at the same path.

Trade-offs: a batch crosses a process boundary both ways (pickled Arrow, cheap next to
Presidio's ~2 ms a record); `ray` pays the cluster's start (seconds), a sort through the
object store and its actors' start (each imports Presidio): ~25 s of fixed cost on a
2-core machine, so it is worth it when the records outgrow one machine's cores. A local worker
that dies breaks the pool (BrokenProcessPool: the stage fails and writes nothing; a rerun
starts over); Ray retries a batch whose actor died on a new actor, so the stage completes.
A local worker dies with the process that forked it (factory.procs; Linux only), so a stage
killed with SIGKILL leaves no worker behind.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from factory.errors import FactoryError
from factory.procs import die_with_parent, parent_death_kill

ENGINES = ("local", "ray")
_ENV_PREFIXES = ("FACTORY_", "MLFLOW_", "HF_", "TRANSFORMERS_", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
T = TypeVar("T")


def engine_name(name: str | None = None) -> str:
    """`name`, else $FACTORY_ENGINE, else "local". Raises FactoryError for another value."""
    chosen = name or os.environ.get("FACTORY_ENGINE") or "local"
    if chosen not in ENGINES:
        raise FactoryError(f"unknown engine {chosen!r} (--engine or FACTORY_ENGINE): one of {', '.join(ENGINES)}")
    return chosen


def local_workers() -> int:
    """$FACTORY_WORKERS, else the cores this process may run on. Raises FactoryError for a bad value."""
    value = os.environ.get("FACTORY_WORKERS")
    if value is None:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if not value.isdigit() or int(value) < 1:
        raise FactoryError(f"FACTORY_WORKERS must be a positive integer, got {value!r}")
    return int(value)


def _factory_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)}


def connect_ray() -> Any:
    """The `ray` module, connected (once per process) to $RAY_ADDRESS or a local cluster.

    Raises FactoryError when ray is not installed (`pip install 'slm-factory[ray]'`) or the
    cluster at $RAY_ADDRESS cannot be reached."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise FactoryError("the ray engine needs ray: pip install 'slm-factory[ray]'") from None
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or None
        try:
            ray.init(address=address, runtime_env={"env_vars": _factory_env()}, log_to_driver=False,
                     configure_logging=False)
        except ConnectionError as err:
            raise FactoryError(f"no Ray cluster at RAY_ADDRESS={address}: {err}") from None
        ray.data.DataContext.get_current().enable_progress_bars = False
    return ray


# --- record batches ------------------------------------------------------------------------

_worker_fn: Callable[[pa.Table], pa.Table] | None = None


def _init_worker(parent: int, factory: Callable[[], Callable[[pa.Table], pa.Table]]) -> None:
    """A pool worker's start: it dies with `parent` (the process that made the pool; see
    factory.procs), then builds its batch function."""
    global _worker_fn
    die_with_parent(parent)
    _worker_fn = factory()


def _call_worker(table: pa.Table) -> pa.Table:
    return _worker_fn(table)


def _local_batches(files: Sequence[Path], schema: pa.Schema, sort: list[str], batch_size: int) -> Iterator[pa.Table]:
    """The rows of `files` in sorted order, `batch_size` at a time. Only the sort columns are sorted;
    each batch gathers its rows from the files' record batches (row groups) into buffers of its own.
    Two pyarrow 25 costs avoided: a slice of one big table pickles to a worker with the whole
    buffers it views (a 256-record batch of a 1M-record table sent ~4 GB), and `take` on a table of
    many chunks concatenates each column first (a copy of every record per batch)."""
    chunks = [b for p in files for b in pq.read_table(p, schema=schema).to_batches() if b.num_rows]
    if not chunks:
        return
    keys = pa.Table.from_batches([b.select(sort) for b in chunks])
    order = pc.sort_indices(keys, sort_keys=[(key, "ascending") for key in sort]).to_numpy().astype(np.int64)
    starts = np.cumsum([0] + [b.num_rows for b in chunks])
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        chunk = np.searchsorted(starts, rows, side="right") - 1
        grouped = np.argsort(chunk, kind="stable")  # the batch's rows grouped by chunk, in order within each
        ids, firsts = np.unique(chunk[grouped], return_index=True)
        pieces = [chunks[c].take(pa.array(part - starts[c])) for c, part in zip(ids, np.split(rows[grouped], firsts[1:]))]
        yield pa.Table.from_batches(pieces, schema).take(pa.array(np.argsort(grouped)))


def _windowed(submit: Callable[[Any], Any], result: Callable[[Any], T], inputs: Iterable[Any],
              window: int) -> Iterator[T]:
    """`result(submit(x))` for each input, in order, with at most `window` submitted and not yet
    returned. When reading `inputs` raises, the results of the inputs read before it come first."""
    pending: deque = deque()
    iterator = iter(inputs)
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            break
        except Exception:
            while pending:
                yield result(pending.popleft())
            raise
        pending.append(submit(item))
        if len(pending) >= window:
            yield result(pending.popleft())
    while pending:
        yield result(pending.popleft())


def _map_local(factory: Callable[[], Callable[[Any], Any]], inputs: Iterable[Any], workers: int) -> Iterator[Any]:
    if workers == 1:
        fn = factory()
        yield from map(fn, inputs)
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                             initargs=(os.getpid(), factory)) as pool:
        # fork the workers now, before `inputs` reads the records: a worker forked later would
        # share this process's heap of that moment, and copy it page by page as it touches it
        pool.submit(int).result()
        yield from _windowed(partial(pool.submit, _call_worker), Future.result, inputs, 2 * workers)


class _RayBatchFn:
    """Ray Data's callable-class form: the function is built once per actor."""

    def __init__(self, factory: Callable[[], Callable[[pa.Table], pa.Table]]):
        self.fn = factory()

    def __call__(self, table: pa.Table) -> pa.Table:
        return self.fn(table)


def _map_ray(factory: Callable[[], Callable[[pa.Table], pa.Table]], files: Sequence[Path], schema: pa.Schema,
             sort: list[str], batch_size: int) -> Iterator[pa.Table]:
    """Read and sort first (`materialize`: the sorted blocks wait in the object store, which
    spills to disk), then map over one actor per cluster CPU: an actor pool started beside a
    running sort would hold the CPUs the sort waits for."""
    if not files:
        return
    ray = connect_ray()
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in files)
    blocks = max(cpus, min(len(files) + cpus, -(-rows // (4 * batch_size))))  # a few batches a block
    context.default_hash_shuffle_parallelism = blocks  # the sort's partitions (else 200 tiny ones)
    dataset = ray.data.read_parquet([str(Path(p).resolve()) for p in files], schema=schema,
                                    override_num_blocks=blocks)
    dataset = dataset.sort(sort).materialize()
    dataset = dataset.map_batches(_RayBatchFn, fn_constructor_args=(factory,), batch_size=batch_size,
                                  batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=cpus),
                                  zero_copy_batch=True)
    for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        if batch.num_rows:
            yield batch


def map_sorted_parquet(factory: Callable[[], Callable[[pa.Table], pa.Table]], files: Sequence[Path],
                       schema: pa.Schema, sort: list[str], batch_size: int, engine: str | None = None,
                       workers: int | None = None) -> Iterator[pa.Table]:
    """`factory()`'s function over the rows of `files` sorted by the `sort` columns (ascending),
    `batch_size` rows at a time; yields its output tables in row order.

    `factory` is pickled to each worker and called there once; it must be a module-level
    callable (or a functools.partial of one). `workers` (local engine): default
    `local_workers()`. The output tables' batch boundaries differ between engines; their
    concatenation does not. Raises FactoryError at once for an unknown engine or a bad
    FACTORY_WORKERS, and, while iterating, for a missing ray or an unreachable cluster, and
    what the batch function raises.
    """
    if engine_name(engine) == "ray":
        return _map_ray(factory, files, schema, sort, batch_size)
    return _map_local(factory, _local_batches(files, schema, sort, batch_size), workers or local_workers())


def map_batches(factory: Callable[[], Callable[[pa.Table], pa.Table]], table: pa.Table, batch_size: int,
                engine: str | None = None) -> Iterator[pa.Table]:
    """`factory()`'s function over `table` (in this process's memory), `batch_size` rows at a time;
    yields its output tables in row order. Unlike `map_sorted_parquet`, the batches are the same
    rows on every engine (slices of `batch_size`), for functions whose results depend on what
    shares their batch (a model's padded batch). `local` runs them in this process, whose torch
    already uses every core; `ray` sends each slice to an actor (one per cluster CPU). `factory`
    as for `map_sorted_parquet`. Raises FactoryError as it does, and what the function raises."""
    slices = [table.slice(start, batch_size) for start in range(0, table.num_rows, batch_size)]
    if engine_name(engine) == "local":
        fn = factory()
        yield from map(fn, slices)
        return
    if not slices:
        return
    ray = connect_ray()
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    dataset = ray.data.from_arrow(slices).map_batches(  # one block per slice: a batch is a block
        _RayBatchFn, fn_constructor_args=(factory,), batch_size=batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=min(cpus, len(slices))), zero_copy_batch=True)
    for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        if batch.num_rows:
            yield batch


def _same(fn: Callable[[Any], T]) -> Callable[[Any], T]:
    return fn


def _apply(fn: Callable[[Any], T], value: Any) -> T:
    return fn(value)


def map_each(fn: Callable[[Any], T], inputs: Iterable[Any], engine: str | None = None,
             workers: int | None = None) -> Iterator[T]:
    """`fn` of each input, yielded in the order of `inputs`, which are read lazily (a few per
    worker in flight, so memory holds a few inputs per worker, not all of them).

    For small units of work that are not rows of a table (ingest's pieces of log lines). `local`:
    a process pool of `workers` (default `local_workers()`), `fn` in this process when one;
    `ray`: one Ray task per input (a task whose worker dies is retried on another). `fn` and the
    inputs are pickled: `fn` must be a module-level function or a functools.partial of one.
    Raises FactoryError for an unknown engine; while iterating, what `fn` raises, and what
    reading `inputs` raises, after the results of the inputs read before it."""
    if engine_name(engine) == "local":
        return _map_local(partial(_same, fn), inputs, workers or local_workers())
    return _each_ray(fn, inputs)


def _each_ray(fn: Callable[[Any], T], inputs: Iterable[Any]) -> Iterator[T]:
    ray = connect_ray()
    remote = ray.remote(_apply)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    fn_ref = ray.put(fn)
    yield from _windowed(lambda value: remote.remote(fn_ref, value), ray.get, inputs, 2 * cpus)


# --- independent jobs ----------------------------------------------------------------------


def _run_job(job: Callable[[], T], env: dict[str, str], cwd: str) -> T:
    """`job` on a Ray worker, under the caller's factory environment and, where the folder
    exists there (one machine, a shared file system), its working directory (recipes/ is
    found relative to it)."""
    os.environ.update(env)
    if os.path.isdir(cwd):
        os.chdir(cwd)
    return job()


def run_each(jobs: Sequence[Callable[[], T]], resources: Sequence[dict[str, float]],
             engine: str | None = None) -> list[T | BaseException]:
    """Each job's result, or the exception it raised, in the order of `jobs`.

    `resources[i]` is what job i asks the cluster for (`num_cpus`, `num_gpus`); the local
    engine runs the jobs one after the other in this process and ignores it. With ray, a job
    whose worker dies is retried once, then returned as ray's error.
    """
    if engine_name(engine) == "local":
        results: list[T | BaseException] = []
        for job in jobs:
            try:
                results.append(job())
            except Exception as err:  # noqa: BLE001 - the caller reports each job's failure
                results.append(err)
        return results
    ray = connect_ray()
    remote = ray.remote(max_retries=1)(_run_job)
    env, cwd = _factory_env(), os.getcwd()
    refs = [remote.options(**res).remote(job, env, cwd) for job, res in zip(jobs, resources)]
    results = []
    for ref in refs:
        try:
            results.append(ray.get(ref))
        except ray.exceptions.RayTaskError as err:
            results.append(err.as_instanceof_cause())
        except ray.exceptions.RayError as err:  # the worker died, the node went away
            results.append(err)
    return results


@contextmanager
def loopback_cluster(temp: Path, nodes: int = 2, object_store_bytes: int = 100_000_000) -> Iterator[SimpleNamespace]:
    """A throwaway Ray cluster on 127.0.0.1 (the tests, the bench, trying `--engine ray` on one
    machine): a head and `nodes - 1` workers of 1 CPU each, started with `ray start --block` so
    the `ray start` processes own their cluster; Ray's files under `temp` (keep its path short:
    Ray's socket paths must fit). Sets RAY_ADDRESS and connects this process; yields `address`
    and `processes()` (the cluster's processes now, its workers included; psutil). On exit it
    disconnects, stops every process it started and restores RAY_ADDRESS. Starting takes ~10 s
    on a quiet 2-core machine. Raises RuntimeError when the cluster does not come up in 120 s.
    """
    import psutil
    import ray

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    ray_bin = str(Path(sys.executable).with_name("ray"))
    common = ["--block", "--node-ip-address=127.0.0.1", "--num-cpus=1", f"--object-store-memory={object_store_bytes}",
              "--disable-usage-stats"]
    temp.mkdir(parents=True, exist_ok=True)
    logs = open(temp / "ray-start.log", "wb")
    started = [subprocess.Popen([ray_bin, "start", "--head", f"--port={address.rsplit(':', 1)[1]}",
                                 "--include-dashboard=false", f"--temp-dir={temp}", *common], stdout=logs, stderr=logs,
                                preexec_fn=parent_death_kill())]
    previous = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = address

    def processes() -> list:
        return [child for node in started for child in psutil.Process(node.pid).children(recursive=True)]

    try:
        for _ in range(nodes - 1):
            started.append(subprocess.Popen([ray_bin, "start", f"--address={address}", *common],
                                            stdout=logs, stderr=logs, preexec_fn=parent_death_kill()))
        deadline = time.monotonic() + 120
        while True:
            try:
                connect_ray()
                if sum(n["Alive"] for n in ray.nodes()) == nodes:
                    break
            except FactoryError:  # the head is not up yet
                pass
            if time.monotonic() > deadline or any(node.poll() is not None for node in started):
                raise RuntimeError(f"the Ray cluster on loopback did not start: see {logs.name}")
            time.sleep(1)
        yield SimpleNamespace(address=address, processes=processes)
    finally:
        ray.shutdown()
        children = processes()
        for process in children:
            try:
                process.terminate()
            except psutil.NoSuchProcess:
                pass
        for process in psutil.wait_procs(children, timeout=5)[1]:
            process.kill()
        for node in started:  # `ray start --block` exits once its processes are gone; it reaps them
            try:
                node.wait(5)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
        logs.close()
        if previous is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = previous
