"""Bad input, one table: every case is refused before any work with one line naming the problem."""

from __future__ import annotations

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
