"""The main job end to end on a tiny config: cache -> Ray Train -> eval -> MLflow registry -> generate."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from selfe.config import load_config
from selfe.train.job import run_training
from tests.conftest import job_sandbox

pytestmark = pytest.mark.slow

TINY = [
    "--data.num_samples=48", "--model.double_blocks=1", "--model.single_blocks=1", "--model.width=64",
    "--model.head_dim=16", "--train.steps=4", "--train.batch_size=8", "--train.checkpoint_every=2",
    "--train.log_every=1", "--train.sample_every=4", "--optim.warmup_steps=2", "--eval.steps=1,2",
    "--eval.max_prompts=1", "--eval.grid_prompts=3", "--text.max_tokens=16", "--train.compile=false",
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, s3_server):
    # s3_server first: its credentials must be in the environment Ray's workers start with (the S3
    # filesystem carries no keys; each process resolves them itself).
    with job_sandbox(tmp_path_factory.mktemp("job")) as root:
        yield root


@pytest.fixture(scope="module")
def trained(workdir):
    cfg = load_config(overrides=[*TINY, "--train.run_name=e2e", f"--data.cache_root={workdir / 'cache'}",
                                 f"--train.storage_path={workdir / 'ray'}"])
    return cfg, run_training(cfg, promote=True, out_root=str(workdir / "outputs"))


def test_run_is_tracked_and_registered(trained):
    cfg, res = trained
    assert res.final_step == 4 and res.model_version == 1
    client = MlflowClient()
    run = client.get_run(res.mlflow_run_id)
    assert run.info.status == "FINISHED"  # ended by the job, not left RUNNING
    assert run.data.params["train.steps"] == "4" and run.data.params["objective.method"] == "self_e"
    history = client.get_metric_history(res.mlflow_run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3, 4]  # rank 0 logged every step
    assert "geneval_1steps_overall" in run.data.metrics and "geneval_untrained_4steps_overall" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(res.mlflow_run_id, "samples")}
    assert "samples/final_grid.png" in artifacts and "samples/grid_step0000004.png" in artifacts
    for alias in ("candidate", "champion"):
        assert str(client.get_model_version_by_alias("selfe", alias).version) == "1"
    grid = np.asarray(Image.open(res.grid_path))
    assert grid.shape[0] > 2 * 32 and grid.std() > 0  # two rows of samples, not a blank image
    assert json.loads((Path(res.model_dir) / "model_info.json").read_text())["step"] == 4


def test_pyfunc_model_generates_images(trained):
    # Logged from code: the folder holds this package's model file and no pickled model object.
    logged = Path(mlflow.artifacts.download_artifacts("models:/selfe@champion"))
    assert not list(logged.rglob("*.pkl")) and "pyfunc.py" in (logged / "MLmodel").read_text()
    model = mlflow.pyfunc.load_model("models:/selfe@champion")
    images = model.predict(["a photo of a red circle", "a photo of two squares"], params={"steps": 2, "seed": 3})
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    again = model.predict(["a photo of a red circle"], params={"steps": 2, "seed": 3})
    assert np.array_equal(again[0], images[0])  # seeded per image


def test_generate_and_evaluate_cli(trained, workdir):
    import pipelines.evaluate as evaluate
    import pipelines.generate as generate

    out = workdir / "one.png"
    assert generate.main(["--model", "models:/selfe@champion", "--prompt", "a photo of a red circle",
                          "--steps", "2", "--out", str(out)]) == 0
    assert Image.open(out).size == (128, 128)  # 32 px at the default 4x preview scale
    eval_dir = workdir / "eval"
    assert evaluate.main(["--model", "models:/selfe/1", "--steps", "1", "--max-per-task", "1",
                          "--out", str(eval_dir)]) == 0
    records = [json.loads(line) for line in (eval_dir / "geneval_lite_1steps.jsonl").read_text().splitlines()]
    assert len(records) == 9 and all({"correct", "reason", "prompt"} <= set(r) for r in records)


def test_resubmitting_the_run_name_resumes_the_same_mlflow_run(trained, workdir):
    cfg, first = trained
    longer = load_config(overrides=[*TINY, "--train.steps=6", "--train.run_name=e2e", "--eval.steps=1",
                                    "--eval.untrained_reference=false",
                                    f"--data.cache_root={workdir / 'cache'}", f"--train.storage_path={workdir / 'ray'}"])
    second = run_training(longer, out_root=str(workdir / "outputs"))
    assert second.mlflow_run_id == first.mlflow_run_id and second.final_step == 6
    steps = [m.step for m in MlflowClient().get_metric_history(second.mlflow_run_id, "loss")]
    assert steps == [1, 2, 3, 4, 5, 6]  # continued from the step-4 checkpoint, nothing repeated
    assert str(MlflowClient().get_model_version_by_alias("selfe", "candidate").version) == "2"


def test_checkpoints_on_s3(workdir, s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="ckpts")
    cfg = load_config(overrides=[*TINY, "--train.steps=2", "--train.run_name=on-s3", "--eval.steps=1",
                                 "--eval.untrained_reference=false", "--tracking.enabled=false",
                                 f"--data.cache_root={workdir / 'cache'}", "--train.storage_path=s3://ckpts/runs"])
    res = run_training(cfg, out_root=str(workdir / "outputs"))
    assert res.final_step == 2
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_server).list_objects_v2(
        Bucket="ckpts", Prefix="runs/on-s3/")["Contents"]]
    assert any(k.endswith(".metadata") for k in keys) and any(k.endswith("rng_rank0.safetensors") for k in keys)


def test_the_storage_filesystem_pickles_without_secrets(s3_server, monkeypatch):
    import pickle

    from selfe.storage import train_storage

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sekrit-value-123")
    _, fs = train_storage("s3://ckpts/runs")
    assert fs is not None and b"sekrit-value-123" not in pickle.dumps(fs)


def test_credentials_in_uris_are_not_logged(workdir):
    from selfe.tracking.runs import start_run

    cfg = load_config(overrides=["--tracking.tracking_uri=http://alice:pw-123@127.0.0.1:9/",
                                 "--data.s3_endpoint=https://key:secret-456@minio.internal:9000"])
    run_id = start_run(cfg, "redaction")
    run = MlflowClient().get_run(run_id)
    logged = json.dumps(run.data.params) + Path(mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="config.toml")).read_text()
    assert "pw-123" not in logged and "secret-456" not in logged
    assert run.data.params["tracking.tracking_uri"] == "http://***@127.0.0.1:9/"


def test_metrics_survive_an_unreachable_tracking_server(tmp_path, monkeypatch):
    """A server that is down, with MLflow's default retries: logging neither blocks nor raises,
    ``close`` keeps its deadline, and the next logger for the run delivers everything once the
    server is back."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from selfe.tracking.runlog import RunLogger

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    db = tmp_path / "server.db"
    # Create the run in the server's database directly, as the driver would have before the outage.
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    exp = MlflowClient().create_experiment("outage", artifact_location=(tmp_path / "art").as_uri())
    run_id = MlflowClient().create_run(exp).info.run_id
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)  # the defaults: one call retries for minutes
    mlflow.set_tracking_uri(uri)
    logger = RunLogger(run_id, spool_dir=tmp_path, retry_s=1.0)
    t0 = time.time()
    for step in range(1, 6):
        logger.log_metrics({"loss": 1.0 / step}, step)
    assert time.time() - t0 < 1  # logging did not wait for the server
    with pytest.warns(UserWarning, match="5 metrics did not reach MLflow"):
        assert not logger.close(timeout_s=3)
    assert time.time() - t0 < 6  # close kept its deadline although a send is stuck in retries
    assert len((tmp_path / f"selfe-metrics-{run_id}.jsonl").read_text().splitlines()) == 5
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{db}", "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        resumed = RunLogger(run_id, spool_dir=tmp_path, retry_s=1.0)  # e.g. the job, resubmitted
        resumed.log_metrics({"loss": 0.1}, 6)
        assert resumed.replayed == 5 and resumed.close(timeout_s=60)
        history = MlflowClient(tracking_uri=uri).get_metric_history(run_id, "loss")
        assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]
    finally:
        server.terminate()
        server.wait(30)
