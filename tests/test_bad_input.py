"""Bad input, one table: every case is refused before any work with one line naming the problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from selfe.config import load_config
from selfe.configtools import ConfigError
from selfe.sweep.space import load_space

# (override, fragment of the error)
CONFIG_CASES = [
    ("--optim.lr=nan", "optim.lr: expected a finite number"),
    ("--optim.lr=inf", "optim.lr: expected a finite number"),
    ("--train.checkpoint_every=0", "train.checkpoint_every must be >= 1"),
    ("--train.checkpoint_every=-1", "train.checkpoint_every must be >= 1"),
    ("--train.keep_checkpoints=0", "train.keep_checkpoints must be >= 1"),
    ("--train.log_every=-1", "train.log_every must be >= 1"),
    ("--train.max_failures=-2", "train.max_failures must be >= -1"),
    ("--eval.steps=0", "eval.steps must be a non-empty list of step counts in [1, 1000]"),
    ("--eval.steps=4,-2", "eval.steps must be a non-empty list"),
    ("--eval.max_prompts=-1", "eval.max_prompts must be >= 0"),
    ("--train.steps=2.5", "train.steps: expected an integer, got 2.5"),
    ("--train.steps=-5", "train.steps must be >= 1, got -5"),
    ("--train.run_name=../../x", "train.run_name='../../x' is not a valid name"),
    ("--train.run_name=a'b", "is not a valid name"),
    ("--tracking.registered_model=x y", "tracking.registered_model='x y' is not a valid name"),
    ("--train.batch_sise=4", "did you mean train.batch_size?"),
]


@pytest.mark.parametrize("override,fragment", CONFIG_CASES)
def test_bad_config_is_rejected_with_a_named_error(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_integral_values_still_parse():
    cfg = load_config(overrides=["--train.steps=1e3", "--train.run_name=run-1.b_2", "--train.max_failures=-1"])
    assert cfg.train.steps == 1000 and cfg.train.run_name == "run-1.b_2"


def test_sweep_name_is_checked(tmp_path):
    space = tmp_path / "s.toml"
    space.write_text('[sweep]\nname = "../up"\n[space]\n"objective.self_eval_weight" = { values = [0.5, 1.0] }\n')
    with pytest.raises(ConfigError, match="name='../up' is not a valid name"):
        load_space(space)


# (pipeline, arguments, fragment of the one-line error); every case exits 2 before loading a model,
# except the missing alias, which the registry reports.
CLI_CASES = [
    ("generate", ["--model", "models:/", "--prompt", "x"], "is neither a folder nor a model URI"),
    ("generate", ["--model", "models:selfe", "--prompt", "x"], "is neither a folder nor a model URI"),
    ("generate", ["--model", "models:/selfe/latest", "--prompt", "x"], "a version is a number"),
    ("generate", ["--model", "runs:/abc", "--prompt", "x"], "is incomplete"),
    ("generate", ["--model", "models:/selfe@x", "--prompt", "x", "--steps", "0"], "must be in [1, 1000], got 0"),
    ("generate", ["--model", "models:/selfe@x", "--prompt", "x", "--steps", "1001"], "must be in [1, 1000]"),
    ("generate", ["--model", "models:/selfe@x", "--prompt", "x", "--num", "0"], "must be in [1, 1024], got 0"),
    ("generate", ["--model", "models:/selfe@x", "--prompt", "x", "--guidance", "nan"], "expected a finite number"),
    ("generate", ["--model", "models:/selfe@x", "--prompt", "bad \udcff bytes"], "is not valid UTF-8"),
    ("generate", ["--model", "models:/selfe@nope", "--prompt", "x"], "cannot load model models:/selfe@nope"),
    ("evaluate", ["--model", "models:/selfe@x", "--max-per-task", "-1"], "must be >= 0, got -1"),
    ("evaluate", ["--model", "models:/selfe@x", "--steps", "2", "-2"], "must be in [1, 1000], got -2"),
    ("evaluate", ["--model", "models:/selfe@x", "--guidance", "inf"], "expected a finite number"),
    ("evaluate", ["--model", "models:/selfe@nope"], "cannot load model models:/selfe@nope"),
    ("evaluate", ["--model", "models:/selfe@x", "--tracking-uri", "sqlite:///nowhere/mlflow.db"],
     "no MLflow database at nowhere/mlflow.db"),
]


@pytest.fixture(scope="module")
def empty_registry(tmp_path_factory) -> str:
    """A tracking URI whose registry exists and holds nothing."""
    import mlflow

    uri = f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}"
    mlflow.MlflowClient(uri).search_registered_models()
    return uri


@pytest.mark.parametrize("pipeline,args,fragment", CLI_CASES)
def test_bad_cli_input_is_one_line_and_exit_2(pipeline, args, fragment, empty_registry, tmp_path, capsys,
                                              monkeypatch):
    import importlib

    monkeypatch.chdir(tmp_path)
    uri = empty_registry
    capsys.readouterr()
    main = importlib.import_module(f"pipelines.{pipeline}").main
    try:
        code = main(args if "--tracking-uri" in args else [*args, "--tracking-uri", uri])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert fragment in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out.png").exists()


def test_a_prompt_longer_than_the_encoder_limit_is_truncated_with_a_warning():
    from selfe.generator import ImageGenerator
    from selfe.core.model import build_model

    cfg = load_config(overrides=["--text.max_tokens=8"])
    gen = ImageGenerator(build_model(cfg.model), cfg)
    with pytest.warns(UserWarning, match="prompt truncated to the text encoder's 8 tokens"):
        gen.encode_prompts(["a photo of a red circle to the left of a blue square and a green triangle"])


def test_workers_that_would_starve_the_ingest_read_task_are_refused_before_work():
    """A 1-CPU local Ray (`--num-cpus 1`) with the default 1-CPU worker hung: the ingest's read task
    never got a CPU. It is refused with the fix in the message; a fractional worker fits."""
    from selfe.train.job import check_worker_cpus

    with pytest.raises(ConfigError, match=r"need 2 CPUs, but the Ray cluster has 1: lower train.cpus_per_worker"):
        check_worker_cpus(load_config(), 1.0)
    check_worker_cpus(load_config(), 2.0)
    check_worker_cpus(load_config(overrides=["--train.num_workers=2", "--train.cpus_per_worker=0.5"]), 2.0)
    with pytest.raises(ConfigError, match="need 3 CPUs"):
        check_worker_cpus(load_config(overrides=["--train.num_workers=2"]), 2.0)


# ------------------------------------------------------------------ outputs that cannot be written

# (module, arguments, the setting the one-line error names); "{x}" is a folder that cannot be created
# (a file is in its way: refused for root too, unlike a chmod). Each exits 2 before Ray starts or a
# model loads.
OUTPUT_CASES = [
    ("pipelines.train", ["--out", "{x}"], "--out = {x}: cannot write there"),
    ("pipelines.train", ["--train.storage_path={x}"], "train.storage_path = {x}: cannot write there"),
    ("pipelines.train", ["--data.cache_root={x}"], "data.cache_root = {x}: cannot write there"),
    ("pipelines.train", ["--tracking.tracking_uri=sqlite:///{x}/mlflow.db"], "tracking.tracking_uri (its folder) = {x}"),
    ("pipelines.preprocess", ["--out", "{x}"], "data.cache_root (--out) = {x}: cannot write there"),
    ("pipelines.generate", ["--model", "models:/selfe@x", "--prompt", "x", "--out", "{x}/a.png"], "--out (its folder) = {x}"),
    ("pipelines.evaluate", ["--model", "models:/selfe@x", "--out", "{x}"], "--out = {x}: cannot write there"),
    ("pipelines.export", ["--model", "models:/selfe@x", "--out", "{x}"], "--out = {x}: cannot write there"),
    ("pipelines.reproduce", ["--out", "{x}"], "--out = {x}: cannot write there"),
    ("pipelines.reproduce", ["--report", "{x}/results.md"], "--report (its folder) = {x}: cannot write there"),
    ("tune.sweep", ["--out", "{x}"], "--out = {x}: cannot write there"),
    ("tune.sweep", ["--storage-path", "{x}"], "[sweep] storage_path = {x}: cannot write there"),
]


@pytest.mark.parametrize("module,args,fragment", OUTPUT_CASES)
def test_an_unwritable_output_is_refused_before_any_work(module, args, fragment, tmp_path, capsys, monkeypatch):
    import importlib
    import time

    import ray

    (tmp_path / "file").write_text("in the way")
    blocked = str(tmp_path / "file" / "out")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    capsys.readouterr()
    t0 = time.time()
    try:
        code = importlib.import_module(module).main([a.replace("{x}", blocked) for a in args])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and fragment.replace("{x}", blocked) in err and len(err.splitlines()) == 1, err
    assert "a file is in the way" in err
    assert not ray.is_initialized() and time.time() - t0 < 20


def test_the_writability_probe_creates_the_folder_and_leaves_nothing_else(tmp_path):
    from selfe.storage import check_writable

    check_writable(str(tmp_path / "new" / "deeper"), "--out")
    assert (tmp_path / "new" / "deeper").is_dir() and list((tmp_path / "new" / "deeper").iterdir()) == []


def test_the_writability_probe_on_s3(s3_server):
    import boto3

    from selfe.storage import NotWritable, check_writable

    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="writable")
    check_writable("s3://writable/runs", "train.storage_path", s3_server)
    assert s3.list_objects_v2(Bucket="writable").get("KeyCount", 0) == 0  # the probe object is gone
    with pytest.raises(NotWritable, match=r"train.storage_path = s3://no-such-bucket/x: cannot write there "
                                          r"\(NoSuchBucket"):
        check_writable("s3://no-such-bucket/x", "train.storage_path", s3_server)


# ------------------------------------------------------------------ files that are not what they claim


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tests.tiny_models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("model") / "model")


def test_a_garbage_weights_file_is_one_line_and_exit_2(tiny_model, tmp_path, capsys):
    import shutil

    from pipelines.generate import main

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    (broken / "weights.safetensors").write_bytes(b"\x00garbage" * 100)
    capsys.readouterr()
    code = main(["--model", str(broken), "--prompt", "x", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "weights.safetensors is not this model's weights" in err and "export it again" in err


def test_a_long_prompt_says_how_much_of_it_the_model_read(tiny_model, tmp_path, capsys):
    from pipelines.generate import main

    prompt = "a photo of a red circle " * 417  # 10,008 characters
    capsys.readouterr()
    assert main(["--model", str(tiny_model), "--prompt", prompt, "--steps", "1", "--out", str(tmp_path / "x.png")]) == 0
    err = capsys.readouterr().err
    assert f"the model reads 55 of its {len(prompt)} characters (16 of 2504 tokens)" in err, err
    assert err.startswith("note: prompt truncated to the text encoder's 16 tokens") and len(err.splitlines()) == 1


def test_an_encoder_whose_weights_are_a_code_running_pickle_is_refused_without_torchs_advice(tmp_path):
    import os
    import shutil

    import torch
    from safetensors.torch import load_file

    from selfe.encoders.storage import MINILM, UnsafeWeightsError, resolve_model_dir
    from selfe.encoders.text import TextEncoder

    marker = tmp_path / "ran"

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    source = Path(resolve_model_dir(MINILM))
    evil = tmp_path / "encoder"
    shutil.copytree(source, evil)
    state = load_file(str(evil / "model.safetensors"))
    (evil / "model.safetensors").unlink()
    torch.save({**state, "extra": RunsCode()}, evil / "pytorch_model.bin")
    cfg = load_config(overrides=[f"--text.name={evil}"])
    with pytest.raises(UnsafeWeightsError) as err:
        TextEncoder(cfg.text)
    message = str(err.value)
    assert "asks to run code, refused (Trying to load unsupported GLOBAL posix.system" in message
    assert "keep weights_only on" in message and "set to `False`" not in message and "\n" not in message
    assert not marker.exists()


def test_preprocess_with_a_missing_source_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    from pipelines.preprocess import main

    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    code = main(["--source", str(tmp_path / "missing"), "--out", str(tmp_path / "cache")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "does not exist" in err, err


@pytest.mark.parametrize("module", ["pipelines.train", "pipelines.preprocess"])
def test_a_negative_cpu_count_is_refused_even_with_print_config(module, capsys):
    import importlib

    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(module).main(["--num-cpus", "-3", "--print-config"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.endswith("argument --num-cpus: must be >= 1, got -3")
    assert len(err.splitlines()) == 1
