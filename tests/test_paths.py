"""Relative output settings: under $SELFE_HOME when set; refused inside Ray's working-directory copy."""

from __future__ import annotations

import pytest

from selfe.config import load_config
from selfe.configtools import ConfigError
from selfe.paths import HOME_ENV, RAY_JOB_ENV, anchor_outputs


@pytest.fixture
def clean_env(monkeypatch):
    for name in (HOME_ENV, RAY_JOB_ENV, "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_selfe_home_anchors_every_relative_setting(clean_env, tmp_path):
    clean_env.setenv(HOME_ENV, str(tmp_path / "home"))
    cfg = load_config(overrides=["--data.cache_root=/abs/cache"])
    out = anchor_outputs(cfg, "outputs")
    assert out == str(tmp_path / "home" / "outputs")
    assert cfg.train.storage_path == str(tmp_path / "home" / "outputs" / "ray_results")
    assert cfg.data.cache_root == "/abs/cache"  # absolute settings are left alone
    assert cfg.tracking.tracking_uri == f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"


def test_outside_a_ray_job_relative_settings_stay(clean_env, tmp_path):
    clean_env.chdir(tmp_path)
    cfg = load_config()
    assert anchor_outputs(cfg, "outputs") == "outputs" and cfg.train.storage_path == "outputs/ray_results"


def test_a_ray_job_copy_without_selfe_home_is_refused_naming_the_settings(clean_env, tmp_path):
    copy = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_x"
    copy.mkdir(parents=True)
    clean_env.chdir(copy)
    clean_env.setenv(RAY_JOB_ENV, "{}")
    with pytest.raises(ConfigError, match=r"set SELFE_HOME .* train.storage_path, data.cache_root, --out, "
                                          r"tracking.tracking_uri$"):
        anchor_outputs(load_config(), "outputs")
    cfg = load_config(overrides=[f"--train.storage_path={tmp_path}/r", f"--data.cache_root={tmp_path}/c",
                                 f"--tracking.tracking_uri=sqlite:///{tmp_path}/m.db"])
    assert anchor_outputs(cfg, str(tmp_path / "o")) == str(tmp_path / "o")  # all absolute: accepted
