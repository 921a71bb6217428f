"""A local MLflow team server: PostgreSQL backend store, S3-compatible artifact store, `mlflow server`.

    python -m factory.teamserver      (what `make mlflow-server` runs)

starts the three on loopback, prints the `MLFLOW_TRACKING_URI` to export, and on Ctrl-C
stops them and deletes their data. Every `factory` command then works against the
server exactly as against the embedded sqlite store: runs, model versions, aliases and
tags go to PostgreSQL, artifacts (adapters, pyfunc models, routing JSON) go through the
server (`--artifacts-destination`, proxied: clients need no S3 credentials) to the bucket.

Parts, each a context manager usable on its own (the integration test uses them):

* `postgres`: PostgreSQL from Debian's packages (`apt-get install postgresql`), a
  fresh cluster made by `initdb` in a temporary folder, listening on 127.0.0.1 on a free
  port with a random password (scram-sha-256). PostgreSQL refuses to run as root, so
  as root the cluster is owned by and run as the `postgres` system user (`runuser`).
* `s3`: moto's S3 server (`moto[server]` from PyPI) on a free loopback port, with one
  bucket. Trade-off: moto keeps objects in memory, so this is a server to try team mode
  and to test it, not one to keep a team's models in; Debian ships no S3 server and
  MinIO is not packaged for pip. A real team points the same `mlflow server` command
  at its own PostgreSQL and bucket (see the README's "Team mode").
* `mlflow_server`: `mlflow server` (uvicorn, one worker) over the two; waits for
  `/health`, which also means the schema migrations on PostgreSQL have run.

Raises `FileNotFoundError` when the PostgreSQL binaries are missing (naming the package
to install) and `RuntimeError` with the tail of the process log when a part fails to start.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from factory.procs import parent_death_kill

HOST = "127.0.0.1"
BUCKET = "factory-artifacts"
PG_USER, PG_DATABASE = "factory", "mlflow"
# moto accepts any key pair; the server's boto3 needs some to sign requests.
S3_ENV = {"AWS_ACCESS_KEY_ID": "factory", "AWS_SECRET_ACCESS_KEY": "factory-secret",
          "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass(frozen=True)
class TeamServer:
    tracking_uri: str
    backend_store_uri: str
    s3_endpoint: str
    artifacts_destination: str


def free_port() -> int:
    """A TCP port free on the loopback interface right now (another process may take it later)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def postgres_bindir() -> Path:
    """The folder with initdb/pg_ctl: $FACTORY_PG_BINDIR, else the newest /usr/lib/postgresql/*/bin, else PATH.

    Raises FileNotFoundError when PostgreSQL's server binaries are not installed.
    """
    candidates = [Path(os.environ["FACTORY_PG_BINDIR"])] if os.environ.get("FACTORY_PG_BINDIR") else []
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name)
                         if p.parent.name.isdigit() else 0, reverse=True)
    if shutil.which("initdb"):
        candidates.append(Path(shutil.which("initdb")).resolve().parent)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    raise FileNotFoundError("PostgreSQL server binaries (initdb, pg_ctl) not found: install Debian's "
                            "package (`apt-get install -y postgresql`) or set FACTORY_PG_BINDIR")


def _as_postgres_user(command: list[str]) -> list[str]:
    """Root cannot run PostgreSQL: run the command as the `postgres` system user instead."""
    if os.geteuid() != 0:
        return command
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise RuntimeError("running as root, but there is no `postgres` user to run PostgreSQL as "
                           "(install Debian's `postgresql` package, which creates it)") from None
    return ["runuser", "-u", "postgres", "--", *command]


def _give_to_postgres(path: Path) -> None:
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(path, user.pw_uid, user.pw_gid)


def _run(command: list[str], what: str, env: dict[str, str] | None = None) -> None:
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed ({' '.join(command)}):\n{(done.stdout + done.stderr)[-2000:]}")


@contextlib.contextmanager
def postgres(workdir: Path) -> Iterator[str]:
    """A throwaway PostgreSQL cluster under `workdir`; yields its SQLAlchemy URI (database `mlflow`)."""
    bindir = postgres_bindir()
    os.chmod(workdir, 0o711)  # the postgres user must reach its folder inside (as root)
    data, password = workdir / "pgdata", secrets.token_hex(16)
    data.mkdir(mode=0o700)
    _give_to_postgres(data)
    pwfile = workdir / "pgpass"
    pwfile.write_text(password + "\n")
    pwfile.chmod(0o600)
    _give_to_postgres(pwfile)
    _run(_as_postgres_user([str(bindir / "initdb"), "-D", str(data), "-U", PG_USER, f"--pwfile={pwfile}",
                            "--auth=scram-sha-256", "-E", "UTF8", "--no-locale"]), "initdb")
    port = free_port()
    options = f"-p {port} -k {data} -c listen_addresses={HOST} -c fsync=off"
    _run(_as_postgres_user([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(data / "server.log"),
                            "-w", "-t", "60", "-o", options, "start"]), "starting PostgreSQL")
    try:
        env = {**os.environ, "PGPASSWORD": password}
        _run([str(bindir / "createdb") if (bindir / "createdb").exists() else "createdb",
              "-h", HOST, "-p", str(port), "-U", PG_USER, PG_DATABASE], "createdb", env)
        yield f"postgresql+psycopg2://{PG_USER}:{password}@{HOST}:{port}/{PG_DATABASE}"
    finally:
        subprocess.run(_as_postgres_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
                       capture_output=True)


@contextlib.contextmanager
def _process(command: list[str], log: Path, env: dict[str, str], ready, what: str,
             timeout: float) -> Iterator[subprocess.Popen]:
    """Run `command` in its own process group until the block ends; `ready()` says when it serves."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=parent_death_kill())
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                state = (f"exited with {proc.returncode}" if proc.returncode is not None
                         else f"not ready in {timeout:.0f} s")
                raise RuntimeError(f"{what} {state}; last log lines ({log}):\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def s3(workdir: Path, bucket: str = BUCKET) -> Iterator[str]:
    """moto's S3 server on loopback with `bucket` created; yields the endpoint URL."""
    import boto3

    port = free_port()
    endpoint = f"http://{HOST}:{port}"
    command = [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)]
    with _process(command, workdir / "s3.log", {**os.environ, **S3_ENV}, lambda: _answers(f"{endpoint}/moto-api/"),
                  "the S3 server (moto)", timeout=60):
        boto3.client("s3", endpoint_url=endpoint, **boto_keys()).create_bucket(Bucket=bucket)
        yield endpoint


def boto_keys() -> dict[str, str]:
    return {"aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
            "region_name": S3_ENV["AWS_DEFAULT_REGION"]}


@contextlib.contextmanager
def mlflow_server(workdir: Path, backend_store_uri: str, artifacts_destination: str, s3_endpoint: str,
                  port: int | None = None) -> Iterator[str]:
    """`mlflow server` over the backend store and the bucket (artifacts proxied); yields its URL."""
    port = port or free_port()
    url = f"http://{HOST}:{port}"
    command = [sys.executable, "-m", "mlflow", "server", "--host", HOST, "--port", str(port), "--workers", "1",
               "--backend-store-uri", backend_store_uri, "--artifacts-destination", artifacts_destination,
               "--uvicorn-opts", "--timeout-graceful-shutdown 3"]  # clients' keep-alive would hold a stop
    env = {**os.environ, **S3_ENV, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint}
    env.pop("MLFLOW_TRACKING_URI", None)
    with _process(command, workdir / "mlflow.log", env, lambda: _answers(f"{url}/health"), "mlflow server",
                  timeout=180):
        yield url


@contextlib.contextmanager
def team_server(port: int | None = None) -> Iterator[TeamServer]:
    """PostgreSQL + S3 (moto) + mlflow server, all on loopback; everything is deleted on exit."""
    workdir = Path(tempfile.mkdtemp(prefix="factory-team-"))
    try:
        with postgres(workdir) as backend, s3(workdir) as endpoint, \
                mlflow_server(workdir, backend, f"s3://{BUCKET}", endpoint, port) as url:
            yield TeamServer(url, backend, endpoint, f"s3://{BUCKET}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m factory.teamserver", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=5000, help="the mlflow server's port (default 5000)")
    port = parser.parse_args(argv).port
    # SIGTERM unwinds like Ctrl-C, so the context managers stop the three servers and delete the data
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("starting PostgreSQL, the S3 server (moto) and mlflow server on 127.0.0.1 ...", flush=True)
    try:
        with team_server(port) as server:
            print(f"\nMLflow team server ready at {server.tracking_uri}\n"
                  f"  backend store  {server.backend_store_uri.split('@')[-1]} (PostgreSQL)\n"
                  f"  artifacts      {server.artifacts_destination} on {server.s3_endpoint} (moto, in memory)\n\n"
                  f"In another shell:  export MLFLOW_TRACKING_URI={server.tracking_uri}\n"
                  "Ctrl-C stops the server and deletes its data.", flush=True)
            while True:
                signal.pause()
    except (KeyboardInterrupt, SystemExit):
        pass
    print("stopped", flush=True)


if __name__ == "__main__":
    main()
