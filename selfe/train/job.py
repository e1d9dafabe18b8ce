"""The training job's driver: cache -> Ray Train (FSDP2 workers) -> evaluation -> MLflow registry.

Runs where ``ray job submit`` puts the entrypoint (or locally, starting Ray itself).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import ray
import ray.train
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from selfe.config import Config
from selfe.data.cache import build_cache, load_cache, read_null_text
from selfe.data.sources import filesystem_for, s3_endpoint
from selfe.encoders.text import TextEncoder
from selfe.eval.runner import evaluate_steps, select_prompts, steps_table
from selfe.generator import ImageGenerator, save_model_dir
from selfe.model import build_model
from selfe.train.checkpoint import load_weights
from selfe.train.owner import run_owner
from selfe.train.resume import remove_unregistered
from selfe.train.worker import STRING_COLUMNS, train_loop_per_worker

RUN_NAME_TAG = "selfe.train_run_name"


@dataclass
class JobResult:
    run_name: str
    mlflow_run_id: str | None
    checkpoint_path: str
    final_step: int
    model_dir: str
    model_version: int | None
    geneval: dict
    train_seconds: float
    grid_path: str | None
    registration_error: str | None = None
    """Why the model was not registered (MLflow unreachable), with the command that registers it later."""


def ensure_ray(cfg: Config) -> None:
    """Connect to the cluster when one is there (RAY_ADDRESS / ray job submit), else start a local Ray."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):  # inside `ray job submit`, or pointed at a cluster
        ray.init()
    else:
        ray.init(include_dashboard=False)


def storage_filesystem(storage_path: str):
    """A pyarrow S3 filesystem for an ``s3://`` path on an S3-compatible store (AWS_ENDPOINT_URL);
    None for local paths and AWS S3 (Ray resolves those itself).

    It carries no keys: whoever unpickles it (the Train controller, workers, a restored Tuner) resolves
    credentials through the AWS chain of its own node, and no secret lands in pickled run state such
    as Tune's ``tuner.pkl`` in the sweep bucket."""
    if not storage_path.startswith("s3://") or not s3_endpoint():
        return None
    fs, _ = filesystem_for(storage_path)
    return fs


def _storage(storage_path: str) -> tuple[str, object]:
    fs = storage_filesystem(storage_path)
    if fs is not None:
        return storage_path.removeprefix("s3://"), fs
    if "://" not in storage_path:
        return str(Path(storage_path).resolve()), None
    return storage_path, None


def metrics_spool_dir(cfg: Config, run_name: str) -> Path:
    """Where a run's metrics are spooled before MLflow has them: under the run's storage folder when
    that is local (it outlives the process and a resume finds it), else a local folder per run."""
    if "://" not in cfg.train.storage_path:
        return Path(cfg.train.storage_path).resolve() / run_name / "mlflow-spool"
    from selfe.runlog import default_spool_dir

    return default_spool_dir() / run_name


def default_run_name() -> str:
    return time.strftime("selfe-%Y%m%d-%H%M%S")


def encoded_prompts(text: TextEncoder, records: list[dict], latent_size: int) -> dict:
    """Prompts the workers sample during training (grids, periodic eval), encoded once on the driver."""
    prompts = [r["prompt"] for r in records]
    emb = text.encode(prompts)
    return {"prompts": prompts, "records": records, "tokens": emb.tokens, "mask": emb.mask, "pooled": emb.pooled,
            "latent_size": latent_size}


def loop_inputs(cfg: Config, text: TextEncoder, null: dict, latent_size: int, mlflow_run_id: str | None) -> dict:
    """Everything ``train_loop_per_worker`` receives besides the dataset."""
    grid = select_prompts(cfg.eval.prompt_set, max_per_task=2)[: cfg.eval.grid_prompts]
    periodic = select_prompts(cfg.eval.prompt_set, max_per_task=cfg.eval.periodic_per_task)
    return {
        "config": asdict(cfg), "null_text": null, "mlflow_run_id": mlflow_run_id,
        "tracking_uri": os.environ.get("MLFLOW_TRACKING_URI", ""),
        "metrics_spool": str(metrics_spool_dir(cfg, cfg.train.run_name)),
        "grid": encoded_prompts(text, grid, latent_size) if cfg.train.sample_every else None,
        "periodic_eval": encoded_prompts(text, periodic, latent_size) if cfg.train.eval_every else None,
    }


def _mlflow_run(cfg: Config, run_name: str) -> str | None:
    """The MLflow run of this training run: reused when the same run name resumes."""
    if not cfg.tracking.enabled:
        return None
    from mlflow.tracking import MlflowClient

    from selfe.tracking import get_or_create_experiment, setup_tracking, start_run, with_retries

    setup_tracking(cfg)

    def find_or_start() -> str:
        exp_id = get_or_create_experiment(cfg.tracking.experiment)
        found = MlflowClient().search_runs([exp_id], f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1)
        return found[0].info.run_id if found else start_run(cfg, run_name, tags={RUN_NAME_TAG: run_name})

    return with_retries(f"creating the run {run_name}", find_or_start)


def fit(cfg: Config, run_name: str, datasets: dict, loop_config: dict, callbacks: list | None = None) -> ray.train.Result:
    """Build and fit the TorchTrainer; resumes automatically when ``run_name`` has checkpoints under
    ``cfg.train.storage_path``. ``callbacks`` go to the RunConfig (e.g. Tune's TuneReportCallback)."""
    storage_path, fs = _storage(cfg.train.storage_path)
    run_uri = f"{cfg.train.storage_path.rstrip('/')}/{run_name}" if "://" in cfg.train.storage_path \
        else f"{storage_path}/{run_name}"
    with run_owner(run_uri, run_name, cfg.data.s3_endpoint):
        stray = remove_unregistered(f"{storage_path}/{run_name}", fs)
        if stray:
            print(f"[selfe] removed {len(stray)} checkpoint folder(s) Ray Train never registered: {', '.join(stray)}")
        return _trainer(cfg, run_name, storage_path, fs, datasets, loop_config, callbacks).fit()


def _trainer(cfg: Config, run_name: str, storage_path: str, fs, datasets: dict, loop_config: dict,
             callbacks: list | None) -> TorchTrainer:
    # iter_torch_batches cannot convert string columns (caption, spec): hand workers tensors only.
    datasets = {k: ds.select_columns([c for c in ds.schema().names if c not in STRING_COLUMNS])
                for k, ds in datasets.items()}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker, **cfg.train.worker_resources},
        ),
        run_config=RunConfig(
            name=run_name, storage_path=storage_path, storage_filesystem=fs,
            # Keep the most recent checkpoints (resume needs recency, not the best score).
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=callbacks,
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(execution_options=_ordered_ingest()),
    )


def _ordered_ingest():
    """Train ingest options with a fixed row order, so that a resumed run skips exactly the
    batches its checkpoint already trained on and sees the same batches afterwards."""
    opts = ray.train.DataConfig.default_ingest_options()
    opts.preserve_order = True
    return opts


def export_model(cfg: Config, checkpoint: ray.train.Checkpoint, out_dir: Path) -> tuple[torch.nn.Module, int]:
    """EMA weights of a (sharded) checkpoint -> an unsharded model saved in ``out_dir``."""
    model = build_model(cfg.model, "cpu")
    with checkpoint.as_directory() as ckpt_dir:
        progress = load_weights(ckpt_dir, model, "ema")
    save_model_dir(out_dir, model, cfg, {"step": progress["step"]})
    return model, progress["step"]


def run_training(cfg: Config, promote: bool = False, out_root: str = "outputs") -> JobResult:
    """The whole job. Prints where the samples, the MLflow run and the model are."""
    run_name = cfg.train.run_name or default_run_name()
    cfg.train.run_name = run_name
    ensure_ray(cfg)
    cache_path, manifest = build_cache(cfg)
    null = read_null_text(cache_path, cfg.data.s3_endpoint)
    text = TextEncoder(cfg.text)
    latent_size = manifest["columns"]["latent"]["shape"][-1]
    mlflow_run_id = _mlflow_run(cfg, run_name)
    loop_config = loop_inputs(cfg, text, null, latent_size, mlflow_run_id)
    t0 = time.time()
    result = fit(cfg, run_name, {"train": load_cache(cache_path, cfg)}, loop_config)
    train_seconds = time.time() - t0
    if result.error is not None:
        raise RuntimeError(f"training run {run_name} failed: {result.error}") from result.error
    out_dir = Path(out_root) / run_name
    model, step = export_model(cfg, result.checkpoint, out_dir / "model")
    gen = ImageGenerator(model, cfg, text=text)
    geneval, grid_path = evaluate_and_log(cfg, gen, out_dir, mlflow_run_id)
    version, registration_error = None, None
    if mlflow_run_id:
        from selfe.runlog import RunLogger
        from selfe.tracking import TrackingUnavailable, log_and_register, with_retries

        logger = RunLogger(mlflow_run_id, spool_dir=metrics_spool_dir(cfg, run_name))
        logger.log_metrics({"train_wall_s": train_seconds}, step)
        logger.close()
        promote_now = promote or cfg.tracking.promote_champion
        try:
            version = with_retries("registering the model", lambda: log_and_register(
                mlflow_run_id, out_dir / "model", cfg.tracking.registered_model, cfg.tracking.alias, promote_now))
        except TrackingUnavailable as e:
            registration_error = (
                f"{e}. The model is saved; register it once MLflow is back: python pipelines/register.py "
                f"--model-dir {out_dir / 'model'} --run-id {mlflow_run_id} --name {cfg.tracking.registered_model} "
                f"--alias {cfg.tracking.alias}{' --promote' if promote_now else ''}")
    res = JobResult(run_name, mlflow_run_id, result.checkpoint.path, step, str(out_dir / "model"), version,
                    geneval, train_seconds, grid_path, registration_error)
    (out_dir / "result.json").write_text(json.dumps(asdict(res), indent=2, default=str))
    return res


def evaluate_and_log(cfg: Config, gen: ImageGenerator, out_dir: Path, run_id: str | None) -> tuple[dict, str | None]:
    """GenEval-lite at cfg.eval.steps, the untrained-model reference at 4 steps, and a sample grid."""
    from selfe.runlog import RunLogger
    from selfe.tracking import grid_image, png_bytes

    logger = RunLogger(run_id, spool_dir=metrics_spool_dir(cfg, cfg.train.run_name)) if run_id else None
    results: dict = {}
    grid_path = None
    if cfg.eval.steps:
        records = select_prompts(cfg.eval.prompt_set, cfg.eval.max_prompts)
        results = evaluate_steps(gen, records, cfg.eval.steps, seed=cfg.eval.seed, out_dir=out_dir / "eval",
                                 batch_size=cfg.eval.batch_size)
        if cfg.eval.untrained_reference:
            untrained = ImageGenerator(build_model(cfg.model), cfg, text=gen.text, codec=gen.codec)
            ref = evaluate_steps(untrained, records, [4], seed=cfg.eval.seed, batch_size=cfg.eval.batch_size)[4]
            results["untrained@4"] = ref
        table = steps_table(results)
        (out_dir / "geneval_lite.md").write_text(table + "\n")
        print(table, flush=True)
        grid_prompts = [r["prompt"] for r in records[:: max(len(records) // cfg.eval.grid_prompts, 1)]][: cfg.eval.grid_prompts]
        rows = {s: gen.generate(grid_prompts, steps=s, seed=cfg.eval.seed)[0] for s in cfg.eval.steps}
        grid_path = str(out_dir / "samples.png")
        Path(grid_path).write_bytes(png_bytes(grid_image(rows)))
        (out_dir / "samples.txt").write_text("rows: steps " + ", ".join(map(str, sorted(rows))) +
                                             "\ncolumns:\n" + "\n".join(grid_prompts) + "\n")
        if logger:
            for steps, s in results.items():
                steps = "untrained_4" if steps == "untrained@4" else steps
                metrics = {f"geneval_{steps}steps_overall": s["overall"], f"nfe_{steps}steps": s["nfe"]}
                metrics.update({f"geneval_{steps}steps_{k}": v for k, v in s["per_task"].items()})
                if s.get("heldout") is not None:
                    metrics[f"geneval_{steps}steps_heldout"] = s["heldout"]
                logger.log_metrics(metrics, 0)
            logger.log_artifact_bytes(table.encode(), "eval/geneval_lite.md")
            logger.log_artifact_bytes(Path(grid_path).read_bytes(), "samples/final_grid.png")
    if logger:
        logger.close()
    return results, grid_path
