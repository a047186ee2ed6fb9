"""MLflow artifacts on S3: a real S3 endpoint (`moto_server` on loopback) behind a SQLite
tracking store, and behind a real `mlflow server` that proxies artifacts to S3."""

from __future__ import annotations

import os
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from ml.config import config_from_dict
from ml.data.schema import ohlcv_array
from ml.data.sources import load_sample
from ml.pipeline import run_pipeline
from ml.release.registry import CHAMPION, alias_version
from ml.serving import Policy
from tests.servers import BIN, free_port, moto_s3, stop, wait_until_up
from tests.test_pipeline import TINY

pytestmark = pytest.mark.slow

BUCKET = "mlflow-artifacts"
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A real S3 HTTP endpoint with one bucket; the S3 settings MLflow reads are in the environment."""
    folder = tmp_path_factory.mktemp("moto")
    with moto_s3(folder / "moto.log") as url, pytest.MonkeyPatch.context() as env:
        for key, value in S3_ENV.items():
            env.setenv(key, value)
        env.setenv("MLFLOW_S3_ENDPOINT_URL", url)
        env.setenv("NO_PROXY", "127.0.0.1")
        env.setenv("AWS_CONFIG_FILE", str(folder / "no-aws-config"))  # no developer profile leaks in
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(folder / "no-aws-credentials"))
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        import boto3

        client = boto3.client("s3", endpoint_url=url, region_name=S3_ENV["AWS_DEFAULT_REGION"])
        client.create_bucket(Bucket=BUCKET)
        yield SimpleNamespace(url=url, client=client)


def bucket_keys(s3, prefix: str) -> set[str]:
    pages = s3.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {item["Key"] for page in pages for item in page.get("Contents", [])}


def decide_on_real_window(policy: Policy) -> float:
    ohlcv = ohlcv_array(load_sample("GSPC"))
    exposure = policy.decide(ohlcv[-policy.lookback:][None], np.zeros((1, 1), np.float32))
    assert exposure.shape == (1, 1) and -1.0 <= exposure[0, 0] <= 1.0
    return float(exposure[0, 0])


@pytest.fixture(scope="module")
def sqlite_run(s3, tmp_path_factory):
    out = tmp_path_factory.mktemp("s3run")
    config = config_from_dict({**TINY, "registry": {"artifact_root": f"s3://{BUCKET}/mlflow"}})
    return out, run_pipeline(config, out)


def test_sqlite_store_keeps_artifacts_in_s3(s3, sqlite_run, tmp_path):
    out, result = sqlite_run
    uri, name, run_id = result["tracking_uri"], result["model_name"], result["run_id"]
    assert uri.startswith("sqlite:///")
    assert result["gate"]["passed"] and result["champion"]
    assert alias_version(uri, name, CHAMPION) == result["version"]

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.artifact_uri.startswith(f"s3://{BUCKET}/mlflow/")
    run_prefix = run.info.artifact_uri[len(f"s3://{BUCKET}/"):]
    keys = bucket_keys(s3, run_prefix + "/")
    assert f"{run_prefix}/report/report.json" in keys
    assert f"{run_prefix}/report/plots/fold_sharpe.png" in keys
    # MLflow 3 keeps a logged model beside the run, under the experiment's models/ folder.
    model_source = client.get_model_version(name, result["version"]).source
    model_uri = client.get_logged_model(model_source.split("/")[-1]).artifact_location \
        if model_source.startswith("models:/") else model_source
    assert model_uri.startswith(f"s3://{BUCKET}/mlflow/"), model_uri
    assert f"{model_uri[len(f's3://{BUCKET}/'):]}/model.onnx" in bucket_keys(s3, "mlflow/")

    # Nothing was written to a local artifact store.
    assert not (out / "mlartifacts").exists()
    assert not list(out.rglob("mlruns"))

    policy = Policy.load(f"models:/{name}@champion", tracking_uri=uri, prefer_gpu=False)
    assert policy.metadata["mlflow_run_id"] == run_id
    decide_on_real_window(policy)


def test_tracking_server_proxies_artifacts_to_s3(s3, tmp_path, monkeypatch):
    """`mlflow server --serve-artifacts`: the client talks HTTP only, the server writes to S3."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server_env = dict(os.environ)  # S3 endpoint and credentials for the server
    log = open(tmp_path / "mlflow-server.log", "wb")
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", f"s3://{BUCKET}/served", "--serve-artifacts"],
        stdout=log, stderr=subprocess.STDOUT, env=server_env, cwd=tmp_path)
    try:
        # Its imports alone take about a minute on a busy 2-core machine.
        wait_until_up(f"{url}/health", server, "mlflow server", timeout=240)
        # The client gets no S3 endpoint: every artifact has to go through the server.
        monkeypatch.delenv("MLFLOW_S3_ENDPOINT_URL")
        config = config_from_dict({**TINY, "registry": {"tracking_uri": url}})
        result = run_pipeline(config, tmp_path / "run")
        name = result["model_name"]
        assert result["tracking_uri"] == url and result["champion"]
        assert alias_version(url, name, CHAMPION) == result["version"]
        run = MlflowClient(url).get_run(result["run_id"])
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/")

        keys = bucket_keys(s3, "served/")
        assert any(k.endswith(f"/{result['run_id']}/artifacts/report/report.json") for k in keys), sorted(keys)[:20]
        assert any(k.endswith("/artifacts/model.onnx") for k in keys), sorted(keys)[:20]
        assert not (tmp_path / "run" / "mlartifacts").exists()

        policy = Policy.load(f"models:/{name}@champion", tracking_uri=url, prefer_gpu=False)
        assert policy.metadata["mlflow_run_id"] == result["run_id"]
        decide_on_real_window(policy)
    finally:
        stop(server)
        log.close()
