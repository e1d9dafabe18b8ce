"""Sizing the preprocessing actor pool from the cluster (no Ray needed: the plan is a pure function)."""

from __future__ import annotations

import pytest

from selfe.config import load_config
from selfe.data.pool import EncoderPool, plan_encoder_pool, starved_message


def data_cfg(*overrides: str):
    return load_config(overrides=list(overrides)).data


def test_two_cores_get_two_fractional_actors_beside_the_render_task() -> None:
    pool = plan_encoder_pool(data_cfg(), "shapes", {"CPU": 2.0})  # the default job: 6000 rows
    assert pool == EncoderPool(actors=2, cpus=0.75, gpus=0.0, task_cpus=0.5)
    assert starved_message(pool, 2.0) is None


def test_parquet_sources_keep_a_whole_cpu_for_the_file_listing_task() -> None:
    for source_format in ("parquet", "img2dataset"):  # img2dataset's Parquet output reads through it too
        pool = plan_encoder_pool(data_cfg(), source_format, {"CPU": 2.0})
        assert (pool.actors, pool.cpus, pool.task_cpus) == (1, 1.0, 1.0)
        assert starved_message(pool, 2.0) is None


def test_larger_cpu_nodes_get_one_actor_per_spare_cpu() -> None:
    pool = plan_encoder_pool(data_cfg(), "imagefolder", {"CPU": 16.0})
    assert (pool.actors, pool.cpus) == (16, 0.96)  # 15.5 spare CPUs over 16 actors, rounded down
    assert pool.actors * pool.cpus + pool.task_cpus <= 16.0


def test_small_shapes_builds_do_not_start_actors_that_get_no_batch() -> None:
    # The renderer hands out 256-row blocks, each to one actor: 600 rows are 3 blocks, 40 rows one.
    pool = plan_encoder_pool(data_cfg("--data.num_samples=600"), "shapes", {"CPU": 8.0})
    assert (pool.actors, pool.cpus) == (3, 2.5)
    pool = plan_encoder_pool(data_cfg("--data.num_samples=40"), "shapes", {"CPU": 8.0})
    assert (pool.actors, pool.cpus) == (1, 7.5)


def test_gpu_clusters_get_one_actor_per_gpu_at_one_cpu() -> None:
    pool = plan_encoder_pool(data_cfg(), "webdataset", {"CPU": 128.0, "GPU": 8.0})
    assert pool == EncoderPool(actors=8, cpus=1.0, gpus=1.0, task_cpus=0.5)
    half = plan_encoder_pool(data_cfg("--data.encode_gpus=0.5"), "webdataset", {"CPU": 128.0, "GPU": 8.0})
    assert (half.actors, half.gpus) == (16, 0.5)


def test_explicit_settings_win_and_a_starving_pool_is_named() -> None:
    pool = plan_encoder_pool(data_cfg("--data.encode_actors=2", "--data.encode_cpus=1"), "shapes", {"CPU": 2.0})
    assert (pool.actors, pool.cpus) == (2, 1.0)
    message = starved_message(pool, 2.0)
    assert message and "2 x 1 CPUs" in message and "would wait forever" in message
    # Only the actor count given: the CPUs are still split to fit.
    pool = plan_encoder_pool(data_cfg("--data.encode_actors=3"), "shapes", {"CPU": 2.0})
    assert (pool.actors, pool.cpus) == (3, 0.5) and starved_message(pool, 2.0) is None


def test_a_cluster_without_cpus_yet_falls_back_to_one_cpu_actors() -> None:
    pool = plan_encoder_pool(data_cfg(), "imagefolder", {})  # autoscaling head, workers not joined
    assert (pool.actors, pool.cpus, pool.gpus) == (1, 1.0, 0.0)


@pytest.mark.parametrize("override, match", [
    ("--data.encode_actors=0", "data.encode_actors must be >= 1"),
    ("--data.encode_cpus=0", "data.encode_cpus and data.decode_cpus must be > 0"),
])
def test_bad_pool_settings_are_rejected(override: str, match: str) -> None:
    from selfe.configtools import ConfigError

    with pytest.raises(ConfigError, match=match):
        data_cfg(override)


def test_several_nodes_get_whole_cpu_actors_that_fit_on_one_node() -> None:
    # Three 1-CPU nodes: a 2.5-CPU actor would fit on none, and 0.83-CPU fractions would leave no node
    # the 0.5 CPUs a write task needs.
    pool = plan_encoder_pool(data_cfg("--data.num_samples=48"), "shapes", {"CPU": 3.0}, nodes=3)
    assert (pool.actors, pool.cpus) == (1, 1.0)
    pool = plan_encoder_pool(data_cfg(), "imagefolder", {"CPU": 3.0}, nodes=3)
    assert (pool.actors, pool.cpus) == (2, 1.0) and starved_message(pool, 3.0) is None
