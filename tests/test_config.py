"""Typed configs: presets, TOML files, dotted overrides, validation and dump."""

import pytest

from selfe.config import Config, load_config
from selfe.configtools import ConfigError


def test_defaults_and_overrides():
    cfg = load_config(overrides=["--optim.lr=1e-4", "--train.steps", "100", "--objective.renorm_target=false"])
    assert cfg.preset == "tiny" and cfg.optim.lr == 1e-4 and cfg.train.steps == 100
    assert cfg.objective.renorm_target is False
    assert cfg.objective.anneal_steps == 42  # anneal_fraction 0.42 of the run
    assert cfg.model.patch_size == 2 and cfg.codec.pixel_downsample == 2 and cfg.model.width == 128


def test_explicit_anneal_steps_win():
    assert load_config(overrides=["--objective.anneal_steps=7"]).objective.anneal_steps == 7


def test_toml_file_then_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[train]\nsteps = 300\nbatch_size = 16\n[eval]\nsteps = [1, 2]\n[data]\ntask_weights = { counting = 2.0 }\n')
    cfg = load_config(path, ["--train.batch_size=8"])
    assert cfg.train.steps == 300 and cfg.train.batch_size == 8 and cfg.eval.steps == [1, 2]
    assert cfg.data.task_weights == {"counting": 2.0}


@pytest.mark.parametrize(
    "override,message",
    [
        ("--optim.lrr=1", "did you mean optim.lr"),
        ("--optimizer.lr=1", "unknown config key 'optimizer'"),
        ("--train.steps=ten", "expected an integer"),
        ("--train.fsdp=maybe", "expected true/false"),
        ("--objective.p_s_equals_t=1.5", r"in \[0, 1\]"),
        ("--sampler.landing=halfway", "landing"),
        ("--train.batch_size=7", "does not divide over 2 workers"),  # sharded order; global takes any batch
        ("--model.head_dim=48", "divisible"),
        ("--preset=huge", "unknown preset"),
        ("--train", "is a section"),
    ],
)
def test_bad_config_is_rejected_with_a_clear_message(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override, "--train.num_workers=2"] if "batch_size" in override else [override])


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_dump_round_trips(tmp_path):
    cfg = load_config(overrides=["--optim.lr=2e-4", "--eval.steps=1,4"])
    path = tmp_path / "resolved.toml"
    path.write_text(cfg.dump())
    again = load_config(path)
    assert again == cfg


def test_large_presets_resolve():
    cfg = load_config(preset="0.5b")
    assert cfg.model.width == 1024 and cfg.model.double_blocks == 8 and cfg.train.use_gpu
    assert isinstance(cfg, Config)


def test_dotted_override_sets_one_mapping_entry():
    cfg = load_config(overrides=["--train.worker_resources.trainer=1", "--data.task_weights.counting=2"])
    assert cfg.train.worker_resources == {"trainer": 1.0} and cfg.data.task_weights == {"counting": 2.0}
    with pytest.raises(ConfigError, match="expected a number"):
        load_config(overrides=["--data.task_weights.counting=lots"])


def test_pixel_downsample_needs_a_resolution_it_and_the_patch_divide() -> None:
    with pytest.raises(ConfigError, match="must be divisible by codec.pixel_downsample=3 x model.patch_size=2"):
        load_config(overrides=["--codec.pixel_downsample=3"])
    with pytest.raises(ConfigError, match="codec.pixel_downsample must be >= 1"):
        load_config(overrides=["--codec.pixel_downsample=0"])
    cfg = load_config(overrides=["--codec.pixel_downsample=2", "--model.patch_size=2"])
    assert cfg.codec.pixel_downsample == 2


def test_retired_keys_in_saved_files_load_but_are_rejected_as_overrides(tmp_path):
    saved = tmp_path / "config.toml"  # as an older version wrote it into a model folder
    saved.write_text('[sampler]\nshift_base_len = 256\n[model]\nconv_head = 0\nwidth = 96\n')
    assert load_config(saved).model.width == 96
    for key in ("--sampler.shift_base_len=256", "--model.conv_head=0"):
        with pytest.raises(ConfigError, match="unknown"):
            load_config(overrides=[key])
