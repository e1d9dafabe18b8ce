"""The server's batching and settings without Ray: jobs of mixed settings batched together draw what
each draws alone, the embedding cache is a bounded LRU, and settings are checked before anything starts."""

from __future__ import annotations

import numpy as np
import pytest

from selfe.configtools import ConfigError
from selfe.generator import load_generator
from selfe.serve.batching import Job, TextCache, run_batch
from selfe.serve.settings import ServeSettings
from tests.tiny_models import save_tiny_model


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    return load_generator(save_tiny_model(tmp_path_factory.mktemp("tiny") / "model"), device="cpu")


def test_a_mixed_batch_draws_what_each_job_draws_alone(gen):
    jobs = [Job("a red circle", 2, 7, 2, 2.0), Job("two blue squares", 1, 0, 4, 2.0),
            Job("a red circle", 1, 3, 2, 2.0), Job("a green triangle", 3, 1, 2, 3.0)]
    cache = TextCache(16)
    results = run_batch(gen, cache, jobs, max_rows=3)  # chunks of 3 rows: the 2-step, omega-2 group is split
    for job, result in zip(jobs, results):
        alone, nfe = gen.generate([job.prompt] * job.num_images, steps=job.steps, guidance=job.guidance, seed=job.seed)
        np.testing.assert_array_equal(result.images, alone)
        assert result.nfe == nfe and result.eta == gen.sampler(job.steps, job.guidance).eta
    assert [r.batch_images for r in results] == [3, 1, 3, 3]
    assert cache.misses == 3 and cache.hits == 4  # "a red circle" x3, "a green triangle" x3 -> 2 + 2 hits


def test_the_embedding_cache_keeps_the_most_recent_prompts(gen):
    cache = TextCache(2)
    cache.encode(gen, ["a", "b"])
    cache.encode(gen, ["a"])  # a is now the most recent
    cache.encode(gen, ["c"])  # evicts b
    before = cache.misses
    cond, cut = cache.encode(gen, ["a", "c", "b"])
    assert cache.misses - before == 1 and cond.tokens.shape[0] == 3 and cut == [False] * 3
    long = "a red circle " * 200
    assert cache.encode(gen, [long])[1] == [True]  # longer than the text encoder reads


def test_settings_are_checked_before_anything_starts():
    assert ServeSettings.from_dict({"max_batch_size": "8", "poll_s": "0"}).max_batch_size == 8
    with pytest.raises(ConfigError, match=r"unknown serve setting\(s\) \['batch'\]; known: model"):
        ServeSettings.from_dict({"batch": 8})
    with pytest.raises(ConfigError, match="max_batch_size=.eight.: expected int"):
        ServeSettings.from_dict({"max_batch_size": "eight"})
    with pytest.raises(ConfigError, match=r"max_images \(8\) exceeds max_batch_size \(4\)"):
        ServeSettings(max_batch_size=4, max_images=8).validate()
    for key, value in (("max_images", 0), ("request_timeout_s", float("inf")), ("poll_s", -1.0)):
        with pytest.raises(ConfigError, match=key):
            ServeSettings(**{key: value}).validate()
