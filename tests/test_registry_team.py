"""Team mode: register / promote / rollback / routes against a real `mlflow server` on loopback,
with a PostgreSQL backend store (Debian's packages, a throwaway cluster) and an S3 artifact store
(moto's server), started by `factory.teamserver` exactly as `make mlflow-server` starts them.

Without PostgreSQL's binaries the test skips locally, and fails under CI (`CI` set), where
.ci/run installs them: a team-mode regression must not pass silently.
"""

from __future__ import annotations

import json
import os

import pytest
from mlflow import MlflowClient
from test_registry import TASK, another_version, cli, recipe_args, write_records

from factory import teamserver


@pytest.fixture(scope="module")
def server():
    try:
        teamserver.postgres_bindir()
    except FileNotFoundError as err:
        if os.environ.get("CI"):
            pytest.fail(f"team mode cannot be tested in CI: {err}")
        pytest.skip(str(err))
    with teamserver.team_server() as running:
        yield running


def test_register_promote_rollback_and_routes_against_a_postgres_and_s3_backed_server(
        server, tmp_path, monkeypatch, tiny_model_dir):
    import boto3
    import psycopg2

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FACTORY_DATA_DIR", str(tmp_path / "datasets"))
    monkeypatch.setenv("FACTORY_REGISTRY_DIR", str(tmp_path / "registry"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.tracking_uri)
    monkeypatch.delenv("FACTORY_ARTIFACT_ROOT", raising=False)
    write_records(tmp_path / "datasets", 60)
    cli("mine", "--min-examples", "20")

    cli("train", TASK, *recipe_args(tiny_model_dir, 0))
    cli("register", TASK, *recipe_args(tiny_model_dir, 0))
    cli("register", TASK, *recipe_args(tiny_model_dir, 0))  # the same run: still one version
    client = MlflowClient()
    assert [str(v.version) for v in client.search_model_versions(f"name='{TASK}'")] == ["1"]
    refused = cli("promote", TASK, ok=False)
    assert "under 80% of the teacher's" in refused.text
    cli("promote", TASK, "--min-teacher-share", "0")
    another_version(tmp_path, [f"base_model={tiny_model_dir}"], recipe_digest="seed-1")  # v2, no retraining
    cli("promote", TASK, "--force", "--reason", "team test")
    assert str(client.get_model_version_by_alias(TASK, "champion").version) == "2"
    assert client.get_model_version(TASK, "2").tags["forced_reason"] == "team test"

    cli("routes", "--export", "vllm")
    route = json.loads((tmp_path / "registry" / "routes.json").read_text())["tasks"][TASK]
    assert route["version"] == "2"
    assert (tmp_path / "registry" / "adapters" / TASK / "v2" / "adapter_config.json").exists()
    cli("rollback", TASK, "--reason", "back to v1")
    client.set_registered_model_alias(TASK, "challenger", "2")  # the UI may move any alias
    cli("routes")
    assert json.loads((tmp_path / "registry" / "routes.json").read_text())["tasks"][TASK]["version"] == "1"

    # the metadata is in PostgreSQL, the artifacts are in the bucket
    with psycopg2.connect(server.backend_store_uri.replace("+psycopg2", "")) as conn, conn.cursor() as cur:
        cur.execute("SELECT version FROM model_versions WHERE name = %s ORDER BY version", (TASK,))
        assert [row[0] for row in cur.fetchall()] == [1, 2]
        cur.execute("SELECT alias, version FROM registered_model_aliases WHERE name = %s ORDER BY alias", (TASK,))
        assert cur.fetchall() == [("challenger", 2), ("champion", 1)]
    s3 = boto3.client("s3", endpoint_url=server.s3_endpoint, **teamserver.boto_keys())
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=teamserver.BUCKET)
            for o in page.get("Contents", [])]
    assert any(k.endswith("/routing.json") for k in keys)
    assert any(k.endswith("adapter/adapter_model.safetensors") for k in keys)
