"""Ray Train + FSDP2 on CPU: sharding, checkpoints, resume and failure recovery."""

from __future__ import annotations

import json
import os

import pytest
import ray
import torch

from selfe.config import load_config
from selfe.core.model import build_model
from selfe.train.checkpoint import is_complete, load_checkpoint, load_weights
from selfe.train.job import fit
from selfe.train.step import build_optimizer
from tests.faults import GraphCount, KillOnce, TermOnce
from selfe.train.handoff import PLACEMENT_GROUP_KEY
from tests.synthetic import TINY_OVERRIDES, inputs, synthetic_dataset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _cfg(tmp_path, name, *extra):
    return load_config(overrides=[*TINY_OVERRIDES, f"--train.storage_path={tmp_path}", f"--train.run_name={name}",
                                  *extra])


def _fit(cfg, fault: KillOnce | None = None):
    return fit(cfg, cfg.train.run_name, {"train": synthetic_dataset()}, inputs(cfg, step_hooks=[fault] if fault else []))


def test_two_workers_shard_every_parameter(tmp_path):
    cfg = _cfg(tmp_path, "fsdp2", "--train.steps=3", "--train.num_workers=2", "--train.cpus_per_worker=0.5",
               "--train.checkpoint_every=3")
    result = _fit(cfg)
    assert result.error is None
    assert result.metrics["step"] == 3
    # rank 0 stores about half of every parameter (dim-0 shards, rounded up)
    assert 0.45 <= result.metrics["param_fraction"] <= 0.6
    # train.threads_per_worker = 0: the node's 2 CPUs (as Ray counts them) split between its 2 workers
    assert result.metrics["torch_threads"] == 1
    # The start-up timeline (benchmarks/train_overhead.py's breakdown) arrives in order with the last report.
    marks = [result.metrics[f"t_{k}"] for k in ("worker_start", "model_ready", "first_step", "checkpoint_start",
                                                 "checkpoint_saved")]
    assert marks == sorted(marks) and marks[-1] - marks[0] < 600
    with result.checkpoint.as_directory() as ckpt:
        assert is_complete(ckpt)
        files = sorted(p.name for p in __import__("pathlib").Path(ckpt).iterdir())
        assert "rng_rank0.safetensors" in files and "rng_rank1.safetensors" in files  # both ranks' parts merged
        ema, online = build_model(cfg.model), build_model(cfg.model)
        assert load_weights(ckpt, ema, "ema")["step"] == 3
        load_weights(ckpt, online, "model")
    # the EMA lags the online weights; neither is the initialisation any more
    init = build_model(cfg.model)
    diff_ema = sum((a - b).abs().sum() for a, b in zip(ema.parameters(), online.parameters()))
    moved = sum((a - b).abs().sum() for a, b in zip(online.parameters(), init.parameters()))
    assert diff_ema > 0 and moved > 0


def _final_state(cfg, result):
    model, ema = build_model(cfg.model), build_model(cfg.model)
    opt = build_optimizer(model, cfg.optim)
    with result.checkpoint.as_directory() as ckpt:
        progress = load_checkpoint(ckpt, model, ema, opt)
    exp_avg = torch.cat([opt.state[p]["exp_avg"].flatten() for p in model.parameters()])
    return progress, model, exp_avg


def test_resume_after_worker_failure_matches_uninterrupted_run(tmp_path):
    """Kill the worker after step 5; FailureConfig restarts it from the step-3 checkpoint. Data order,
    RNG streams, optimiser and EMA are restored, so the run ends where the uninterrupted one does."""
    common = ["--train.steps=6", "--train.checkpoint_every=3", "--train.max_failures=1"]
    ref_cfg = _cfg(tmp_path, "uninterrupted", *common)
    ref = _fit(ref_cfg)
    cfg = _cfg(tmp_path, "interrupted", *common)
    marker = tmp_path / "failed-once"
    res = _fit(cfg, fault=KillOnce(5, str(marker)))
    assert marker.exists(), "the injected failure did not happen"
    assert res.error is None
    p_ref, m_ref, adam_ref = _final_state(ref_cfg, ref)
    p_res, m_res, adam_res = _final_state(cfg, res)
    assert p_ref == p_res == {"step": 6, "epoch": 1, "batch_in_epoch": 1}
    # Same arithmetic in the same order on one CPU worker: equal up to float reassociation noise.
    for a, b in zip(m_ref.parameters(), m_res.parameters()):
        assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()
    assert torch.allclose(adam_ref, adam_res, atol=1e-7)
    assert res.metrics["loss"] == pytest.approx(ref.metrics["loss"], rel=1e-5)


def test_a_sigterm_to_a_worker_checkpoints_that_step_before_the_worker_exits(tmp_path):
    """SIGTERM to rank 1's process after step 5, with no checkpoint due until step 8: the workers write
    one at the next step boundary after the handler ran (5, or 6 when the worker's main thread takes
    the signal after step 5's check), rank 1 exits, and the restarted group resumes from there."""
    cfg = _cfg(tmp_path, "sigterm", "--train.steps=8", "--train.checkpoint_every=8", "--train.max_failures=1",
               "--train.num_workers=2", "--train.cpus_per_worker=0.5")
    marker = tmp_path / "terminated"
    res = fit(cfg, cfg.train.run_name, {"train": synthetic_dataset()},
              inputs(cfg, step_hooks=[TermOnce(5, str(marker))]))
    assert marker.exists(), "the SIGTERM was not sent"
    assert res.error is None
    resumed = res.metrics["resumed_from"]
    assert resumed in (5, 6) and res.metrics["step"] == 8
    steps = sorted(json.loads(p.read_text())["step"] for p in (tmp_path / "sigterm").glob("checkpoint_*/progress.json"))
    assert steps == [resumed, 8]
    with pytest.raises(ProcessLookupError):  # the signalled worker ended (after its checkpoint)
        os.kill(int(marker.read_text()), 0)


def test_a_compiled_ray_train_run_recompiles_nothing_after_warm_up(tmp_path):
    """The tiny recipe's step under Ray Train (FSDP2 on one rank, the online model and the EMA compiled
    per block, aot_eager: the guards of inductor without its code generation), tau annealing from step 3
    so the self-evaluation batch changes size: every variant compiles during the first steps, none after
    (tests/test_compile.py checks the same in one process, with the sampler's batches)."""
    warm_up, steps = 5, 14
    cfg = _cfg(tmp_path, "compiled", f"--train.steps={steps}", f"--train.checkpoint_every={steps}",
               "--train.compile=true", "--train.compile_backend=aot_eager", "--objective.anneal_steps=3",
               "--train.log_every=7")
    log = tmp_path / "graphs.txt"
    res = fit(cfg, cfg.train.run_name, {"train": synthetic_dataset()}, inputs(cfg, step_hooks=[GraphCount(str(log))]))
    assert res.error is None
    graphs = [int(line) for line in log.read_text().split()]
    assert len(graphs) == steps and graphs[0] > 0
    assert graphs[warm_up - 1:] == [graphs[warm_up - 1]] * (steps - warm_up + 1), graphs
    assert res.metrics["compiled_graphs"] == graphs[-1]  # what MLflow gets with every log


def test_a_corrupt_latest_checkpoint_resumes_from_the_older_one(tmp_path):
    """Truncate a shard of the latest checkpoint, rerun the same run name for longer: the workers skip
    it (its manifest no longer matches), resume from the older checkpoint and finish."""
    common = ["--train.checkpoint_every=3", "--train.keep_checkpoints=2"]
    res = _fit(_cfg(tmp_path, "corrupt", "--train.steps=6", *common))
    assert res.error is None and res.metrics["resumed_from"] == -1
    assert int(res.metrics[PLACEMENT_GROUP_KEY], 16) > 0  # the workers' group, for a sweep to give back
    run_dir = tmp_path / "corrupt"
    checkpoints = [p for p in run_dir.glob("checkpoint_*") if p.is_dir()]
    latest = max(checkpoints, key=lambda p: json.loads((p / "progress.json").read_text())["step"])
    shard = next(latest.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    (run_dir / "checkpoint_2000-01-01_00-00-00.000000").mkdir()  # a folder Ray never registered
    res = _fit(_cfg(tmp_path, "corrupt", "--train.steps=9", *common))
    assert res.error is None
    assert res.metrics["resumed_from"] == 3 and res.metrics["step"] == 9
    assert not (run_dir / "checkpoint_2000-01-01_00-00-00.000000").exists()


def test_an_autoencoder_kl_run_logs_tokens_per_second_and_mfu(tmp_path):
    """Throughput comes from the cache's latent shape whatever the codec: a run on a tiny random
    diffusers VAE (4 x 16 x 16 latents of 32 x 32 images, 2 x 2 patches: 64 tokens) logs tokens/s and,
    with a configured device peak, MFU."""
    from selfe.data.cache import build_cache, load_cache, read_null_text
    from selfe.data.contract import latent_shape
    from selfe.perf import train_flops_per_image
    from selfe.train.handoff import WorkerInputs
    from tests.synthetic import save_tiny_vae

    vae = save_tiny_vae(tmp_path / "vae", seed=0)
    cfg = _cfg(tmp_path, "vae", "--codec.kind=autoencoder_kl", f"--codec.path={vae}", "--model.in_channels=4",
               "--model.patch_size=2", "--data.num_samples=32", f"--data.cache_root={tmp_path / 'cache'}",
               "--data.encode_actors=1", "--train.steps=2", "--train.checkpoint_every=2", "--train.peak_tflops=0.5")
    cache_path, manifest = build_cache(cfg)
    shape = latent_shape(manifest)
    assert shape == (4, 16, 16)
    res = fit(cfg, "vae", {"train": load_cache(cache_path, cfg)}, WorkerInputs(cfg, read_null_text(cache_path), shape))
    assert res.error is None
    m = res.metrics
    print(f"autoencoder_kl run: {m['images_per_s']:.1f} img/s, {m['tokens_per_s']:.0f} tokens/s, "
          f"{m['tflops_per_s']:.4f} TFLOP/s, MFU {m['mfu']:.4%} of a configured 0.5 TFLOP/s")
    assert m["tokens_per_s"] == pytest.approx(m["images_per_s"] * 64)
    flops = train_flops_per_image(cfg.model, 64, cfg.text.max_tokens, cfg.objective.method, cfg.objective.p_s_equals_t)
    assert m["tflops_per_s"] == pytest.approx(flops * 8 / m["compute_s"] / 1e12, rel=1e-6)  # batch 8, one step
    assert m["mfu"] == pytest.approx(m["tflops_per_s"] / 0.5) and m["mfu"] > 0
    assert m["torch_threads"] == 2  # one worker on a node Ray gives 2 CPUs uses both
