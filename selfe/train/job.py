"""The training job's driver: cache -> Ray Train (FSDP2 workers) -> evaluation -> MLflow registry.

Runs where ``ray job submit`` puts the entrypoint (or locally, starting Ray itself).

The config's walk on this side (``benchmarks/config_walk.py`` traces it in a real run): ``run_training``
-> ``config.evaluation`` (which suite, its networks) -> ``data.cache`` (``cachekey`` names the cache;
``pool`` sizes the encoder actors, which load ``encoders``) -> ``tracking.runs`` (the MLflow run, the
config as params) -> ``handoff.worker_inputs`` -> ``fit`` / ``_trainer`` (Ray Train) -> ``export_model``
(``core.model``, ``generator.save_model_dir``) -> ``generator.ImageGenerator`` (``encoders.image``) ->
``evaluate_and_log``: 13 files, 9 returns to a file already left.

One batch's path: a source row (``data.sources``; the shapes world renders inside the encoder actor) ->
``data.transforms.EncodeBatch`` (decode, VAE latent, text embeddings) -> a Parquet file of the cache
(``data.cache``; columns named in ``data.contract``) -> ``load_cache`` / ``training_rows`` -> Ray Train's
ingest -> ``data.loader.shard_batches`` in the worker -> ``contract.batch_from_rows`` -> ``train.step``
-> ``core.objective`` -> ``core.model``.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import ray
import ray.train
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from selfe.config import Config
from selfe.configtools import ConfigError
from selfe.data.cache import build_cache, load_cache, read_null_text
from selfe.data.contract import CAPTION, STRING_COLUMNS, latent_shape
from selfe.storage import ensure_ray, train_storage
from selfe.encoders.text import TextEncoder
from selfe.eval.runner import evaluate_steps, progress_line, select_prompts, steps_table
from selfe.generator import ImageGenerator, save_model_dir
from selfe.core.model import build_model
from selfe.train.checkpoint import load_weights
from selfe.train.owner import run_owner
from selfe.train.resume import remove_unregistered, unusable_checkpoints
from selfe.train.sigterm import NoticeTorchConfig
from selfe.train.handoff import TrackingTarget, WorkerInputs, worker_inputs
from selfe.train.worker import train_loop_per_worker

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


def metrics_spool_dir(cfg: Config, run_name: str) -> Path:
    """Where a run's metrics are spooled before MLflow has them: under the run's storage folder when
    that is local (it outlives the process and a resume finds it), else a local folder per run."""
    if "://" not in cfg.train.storage_path:
        return Path(cfg.train.storage_path).resolve() / run_name / "mlflow-spool"
    from selfe.tracking.runlog import default_spool_dir

    return default_spool_dir() / run_name


class TrainingFailed(RuntimeError):
    """The Ray Train run ended with an error (after its retries) or without a checkpoint."""


def default_run_name() -> str:
    return time.strftime("selfe-%Y%m%d-%H%M%S")


def _mlflow_run(cfg: Config, run_name: str) -> str | None:
    """The MLflow run of this training run: reused when the same run name resumes."""
    if not cfg.tracking.enabled:
        return None
    from selfe.tracking.runs import find_or_start_run

    return find_or_start_run(cfg, run_name, match={RUN_NAME_TAG: run_name})


def tracking_target(cfg: Config, run_id: str | None) -> TrackingTarget | None:
    """Where the workers log ``run_id``'s metrics (None without a run)."""
    if run_id is None:
        return None
    from selfe.tracking.runs import resolve_tracking_uri

    return TrackingTarget(run_id, resolve_tracking_uri(cfg), str(metrics_spool_dir(cfg, cfg.train.run_name)))


def own_run(cfg: Config, run_name: str):
    """Hold ``run_name``'s owner marker in its storage folder for a ``with`` block (``selfe.train.owner``):
    a second job with the same name is refused. Re-entrant in one process, so a pipeline can claim the
    name before Ray starts and ``fit`` holds it again."""
    storage_path, _ = train_storage(cfg.train.storage_path, cfg.data.s3_endpoint)
    run_uri = f"{cfg.train.storage_path.rstrip('/')}/{run_name}" if "://" in cfg.train.storage_path \
        else f"{storage_path}/{run_name}"
    return run_owner(run_uri, run_name, cfg.data.s3_endpoint)


def fit(cfg: Config, run_name: str, datasets: dict, inputs: WorkerInputs,
        callbacks: list | None = None) -> ray.train.Result:
    """Build and fit the TorchTrainer; resumes automatically when ``run_name`` has checkpoints under
    ``cfg.train.storage_path``. ``callbacks`` go to the RunConfig (e.g. Tune's TuneReportCallback)."""
    storage_path, fs = train_storage(cfg.train.storage_path, cfg.data.s3_endpoint)
    with own_run(cfg, run_name):
        stray = remove_unregistered(f"{storage_path}/{run_name}", fs)
        if stray:
            print(f"[selfe] removed {len(stray)} checkpoint folder(s) Ray Train never registered: {', '.join(stray)}")
        aside = unusable_checkpoints(f"{storage_path}/{run_name}", fs)
        if aside:
            print(f"[selfe] {len(aside)} checkpoint(s) set aside as unusable, kept out of train.keep_checkpoints: "
                  f"{', '.join(aside)}")
        return _trainer(cfg, run_name, storage_path, fs, datasets, inputs, callbacks, len(aside)).fit()


def _trainer(cfg: Config, run_name: str, storage_path: str, fs, datasets: dict, inputs: WorkerInputs,
             callbacks: list | None, set_aside: int = 0) -> TorchTrainer:
    datasets = {k: training_rows(ds, cfg) for k, ds in datasets.items()}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"inputs": inputs},
        torch_config=NoticeTorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo",
                                       sigterm_grace_s=cfg.train.preemption_grace_s),
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers if not cfg.train.elastic else cfg.train.worker_range,
            elastic_resize_monitor_interval_s=cfg.train.resize_interval_s, use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker, **cfg.train.worker_resources},
        ),
        run_config=RunConfig(
            name=run_name, storage_path=storage_path, storage_filesystem=fs,
            # Keep the most recent checkpoints (resume needs recency, not the best score); the set-aside
            # unusable ones take no usable checkpoint's place.
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints + set_aside),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=callbacks,
        ),
        datasets=datasets,
        # Global order: every worker reads the whole stream and keeps its rows of each global batch.
        dataset_config=ray.train.DataConfig(datasets_to_split=[] if cfg.train.global_order else "all",
                                            execution_options=_ordered_ingest()),
    )


def training_rows(ds: ray.data.Dataset, cfg: Config) -> ray.data.Dataset:
    """The rows workers train on: without the held-out evaluation rows of the clip_fid suite
    (``selfe.eval.heldout``), and without the string columns (caption, spec), which
    ``iter_torch_batches`` cannot convert."""
    if cfg.eval.resolved_suite(cfg.data.source) == "clip_fid" and CAPTION in ds.schema().names:
        from selfe.eval.heldout import drop_heldout

        # Default resources: fuses with the read task instead of asking Ray for another CPU.
        ds = ds.map_batches(drop_heldout, batch_format="pyarrow", fn_kwargs={"fraction": cfg.eval.heldout_fraction})
    return ds.select_columns([c for c in ds.schema().names if c not in STRING_COLUMNS])


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


INGEST_READ_CPUS = 1.0
"""What the training ingest's read task asks for (``ray.data.read_parquet``'s file listing: 1 CPU)."""


def check_worker_cpus(cfg: Config, cluster_cpus: float) -> None:
    """Refuse a run whose workers would hold the CPUs the training ingest's read task needs: Ray
    would wait for them forever (a 1-CPU local Ray with the default 1-CPU worker hung silently)."""
    fewest = cfg.train.worker_range[0]  # an elastic run starts with the low end of its range
    held = fewest * cfg.train.cpus_per_worker
    if held + INGEST_READ_CPUS > cluster_cpus:
        raise ConfigError(
            f"train.num_workers={fewest} x train.cpus_per_worker={cfg.train.cpus_per_worker:g} "
            f"CPUs plus {INGEST_READ_CPUS:g} for Ray Data's read task need {held + INGEST_READ_CPUS:g} CPUs, but "
            f"the Ray cluster has {cluster_cpus:g}: lower train.cpus_per_worker (fractions are fine) or give "
            "Ray more CPUs (--num-cpus, or add nodes)")


def run_training(cfg: Config, promote: bool = False, out_root: str = "outputs") -> JobResult:
    """The whole job. Prints where the samples, the MLflow run and the model are."""
    run_name = cfg.train.run_name or default_run_name()
    cfg.train.run_name = run_name
    cfg.eval.require_networks(cfg.data.source)  # before hours of training, not after
    ensure_ray()
    check_worker_cpus(cfg, ray.cluster_resources().get("CPU", 0.0))
    cache_path, manifest = build_cache(cfg)
    text = TextEncoder(cfg.text)
    mlflow_run_id = _mlflow_run(cfg, run_name)
    try:
        res = _train_and_publish(cfg, run_name, cache_path, manifest, text, mlflow_run_id, promote, out_root)
    except BaseException as e:
        # Whatever ends the job early (an error, Ctrl-C, `ray job stop`'s SIGTERM) ends its MLflow run too:
        # a run left RUNNING looks alive forever. Ray Train turns Ctrl-C during fit() into sys.exit(0).
        if mlflow_run_id:
            stopped = isinstance(e, (KeyboardInterrupt, SystemExit))
            _end_run_quietly(mlflow_run_id, "KILLED" if stopped else "FAILED")
        raise
    if mlflow_run_id and res.registration_error is None:
        _end_run_quietly(mlflow_run_id, "FINISHED")
    return res


def _last_line(error: BaseException) -> str:
    """The innermost exception's line of a Ray Train error (its message ends with the worker's traceback)."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:400]


def _end_run_quietly(run_id: str, status: str) -> None:
    """End ``run_id`` with ``status``; a tracking store that is down is not the error to report."""
    from selfe.tracking.runs import end_run

    with contextlib.suppress(Exception):
        end_run(run_id, status)


def _train_and_publish(cfg: Config, run_name: str, cache_path: str, manifest: dict, text: TextEncoder,
                       mlflow_run_id: str | None, promote: bool, out_root: str) -> JobResult:
    """Fit, export, evaluate and register: the part of the job that runs under its MLflow run."""
    inputs = worker_inputs(cfg, text, read_null_text(cache_path, cfg.data.s3_endpoint), latent_shape(manifest),
                           tracking_target(cfg, mlflow_run_id), cache_path=cache_path)
    t0 = time.time()
    try:
        result = fit(cfg, run_name, {"train": load_cache(cache_path, cfg)}, inputs)
    except ray.train.TrainingFailedError as e:  # the workers' error, after train.max_failures restarts
        raise TrainingFailed(f"run {run_name}: {_last_line(e)}") from e
    train_seconds = time.time() - t0
    if result.error is not None:
        raise TrainingFailed(f"run {run_name}: {_last_line(result.error)}") from result.error
    if result.checkpoint is None:
        raise TrainingFailed(f"run {run_name} ended without a checkpoint to export")
    out_dir = Path(out_root) / run_name
    model, step = export_model(cfg, result.checkpoint, out_dir / "model")
    gen = ImageGenerator(model, cfg, text=text)
    geneval, grid_path = evaluate_and_log(cfg, gen, out_dir, mlflow_run_id, cache_path)
    version, registration_error = None, None
    if mlflow_run_id:
        from selfe.tracking.runlog import RunLogger
        from selfe.tracking.registry import log_and_register
        from selfe.tracking.runs import TrackingUnavailable, with_retries

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


def evaluate_and_log(cfg: Config, gen: ImageGenerator, out_dir: Path, run_id: str | None,
                     cache_path: str = "") -> tuple[dict, str | None]:
    """The suite's table at cfg.eval.steps (GenEval-lite, or CLIP score + FID on the held-out rows of
    the cache at ``cache_path``), the untrained-model reference at 4 steps, and a sample grid."""
    from selfe.tracking.runlog import RunLogger
    from selfe.tracking.images import grid_image, png_bytes

    from selfe.eval.metrics import suite_metrics

    logger = RunLogger(run_id, spool_dir=metrics_spool_dir(cfg, cfg.train.run_name)) if run_id else None
    suite = cfg.eval.resolved_suite(cfg.data.source)
    results, prompts, table = (_geneval_table if suite == "geneval_lite" else _realdata_table)(cfg, gen, out_dir,
                                                                                             cache_path)
    name = "geneval_lite" if suite == "geneval_lite" else "clip_fid"
    (out_dir / f"{name}.md").write_text(table + "\n")
    print(table, flush=True)
    grid_prompts = prompts[:: max(len(prompts) // cfg.eval.grid_prompts, 1)][: cfg.eval.grid_prompts]
    rows = {s: gen.generate(grid_prompts, steps=s, seed=cfg.eval.seed)[0] for s in cfg.eval.steps}
    grid_path = str(out_dir / "samples.png")
    Path(grid_path).write_bytes(png_bytes(grid_image(rows)))
    (out_dir / "samples.txt").write_text("rows: steps " + ", ".join(map(str, sorted(rows))) +
                                         "\ncolumns:\n" + "\n".join(grid_prompts) + "\n")
    if logger:
        logger.log_metrics(suite_metrics(suite, results), 0)
        logger.log_artifact_bytes(table.encode(), f"eval/{name}.md")
        logger.log_artifact_bytes(Path(grid_path).read_bytes(), "samples/final_grid.png")
        logger.close()
    return results, grid_path


def _untrained(cfg: Config, gen: ImageGenerator) -> ImageGenerator:
    """An untrained model with the same encoders: the floor every table shows at 4 steps."""
    return ImageGenerator(build_model(cfg.model), cfg, text=gen.text, codec=gen.codec)


def _geneval_table(cfg: Config, gen: ImageGenerator, out_dir: Path, cache_path: str) -> tuple[dict, list[str], str]:
    """GenEval-lite results {steps: summary}, the prompts, the markdown table."""
    records = select_prompts(cfg.eval.prompt_set, cfg.eval.max_prompts)
    show = lambda label: lambda steps, summary: print(progress_line(label, steps, summary), flush=True)  # noqa: E731
    results = evaluate_steps(gen, records, cfg.eval.steps, seed=cfg.eval.seed, out_dir=out_dir / "eval",
                             batch_size=cfg.eval.batch_size, on_result=show("GenEval-lite"))
    if cfg.eval.untrained_reference:
        results["untrained@4"] = evaluate_steps(_untrained(cfg, gen), records, [4], seed=cfg.eval.seed,
                                                batch_size=cfg.eval.batch_size,
                                                on_result=show("GenEval-lite, untrained model"))[4]
    return results, [r["prompt"] for r in records], steps_table(results)


def _realdata_table(cfg: Config, gen: ImageGenerator, out_dir: Path, cache_path: str) -> tuple[dict, list[str], str]:
    """CLIP score and FID results {steps: summary} on the held-out rows, their captions, the table."""
    from selfe.eval.heldout import read_heldout
    from selfe.eval.realdata import build_scorer, decode_latents, evaluate_realdata_steps, realdata_table

    e = cfg.eval
    heldout = read_heldout(cache_path, e.heldout_fraction, e.num_images, cfg.data.s3_endpoint)
    reference = decode_latents(gen.codec, heldout.latents, e.batch_size)
    scorer = build_scorer(e.clip_model, e.fid_features, reference, gen.device, e.batch_size)
    results = evaluate_realdata_steps(gen, heldout, e.steps, scorer, seed=e.seed, out_dir=out_dir / "eval",
                                      batch_size=e.batch_size)
    if e.untrained_reference:
        results["untrained@4"] = evaluate_realdata_steps(_untrained(cfg, gen), heldout, [4], scorer, seed=e.seed,
                                                         batch_size=e.batch_size)[4]
    return results, heldout.captions, realdata_table(results)
