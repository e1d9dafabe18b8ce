"""Real-data evaluation: FID math, CLIP score, feature networks loaded from disk and S3, the held-out
slice, and the suite/metric configuration."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from scipy.linalg import sqrtm

from selfe.configtools import ConfigError
from selfe.eval.clip_score import ClipScorer, clip_score_from_embeddings
from selfe.eval.feature_nets import load_feature_net
from selfe.eval.fid import GaussianStats, fid_from_features, frechet_distance, gaussian_stats
from selfe.eval.heldout import drop_heldout, heldout_mask, heldout_unit, read_heldout
from selfe.config.evaluation import resolve_suite
from selfe.eval.metrics import ranking_metric
from selfe.eval.realdata import build_scorer

# ------------------------------------------------------------------ FID math


def _random_cov(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_matches_closed_form():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * np.real(sqrtm(s1 @ s2)))
    got = frechet_distance(GaussianStats(mu1, s1, 100), GaussianStats(mu2, s2, 100))
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_diagonal_gaussians():
    # Commuting covariances: FID = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2 exactly.
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    mu1, mu2 = np.array([0.0, 0.0, 0.0]), np.array([3.0, 0.0, 4.0])
    got = frechet_distance(GaussianStats(mu1, np.diag(a), 2), GaussianStats(mu2, np.diag(b), 2))
    assert got == pytest.approx(25.0 + 1.0 + 1.0, abs=1e-12)


def test_fid_of_samples_approaches_the_population_value():
    rng = np.random.default_rng(1)
    mu1, mu2 = np.zeros(3), np.array([1.0, 0.0, 0.0])
    s1, s2 = np.diag([1.0, 1.0, 1.0]), np.diag([4.0, 1.0, 1.0])  # population FID = 1 + (2 - 1)^2 = 2
    x = rng.multivariate_normal(mu1, s1, size=200_000)
    y = rng.multivariate_normal(mu2, s2, size=200_000)
    assert fid_from_features(x, y) == pytest.approx(2.0, abs=0.05)


def test_fid_invariances():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 8))
    y = rng.normal(size=(300, 8)) @ np.diag(np.linspace(0.5, 2, 8)) + 0.3
    rotation, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    shift = rng.normal(size=8) * 5
    base = fid_from_features(x, y)
    assert base > 0.5
    assert fid_from_features(x, x) == pytest.approx(0.0, abs=1e-9)
    assert fid_from_features(y, x) == pytest.approx(base, rel=1e-9)
    assert fid_from_features(x @ rotation + shift, y @ rotation + shift) == pytest.approx(base, rel=1e-7)
    assert fid_from_features(2 * x, 2 * y) == pytest.approx(4 * base, rel=1e-7)  # quadratic in scale


def test_fid_with_fewer_samples_than_dimensions_is_finite():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(10, 64)), rng.normal(size=(10, 64)) + 1.0
    value = fid_from_features(x, y)
    assert np.isfinite(value) and value > 64 * 0.5  # the mean term alone is 64
    assert fid_from_features(x, x) == pytest.approx(0.0, abs=1e-7)


def test_fid_rejects_bad_features():
    with pytest.raises(ValueError, match="at least 2 images"):
        gaussian_stats(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="same feature network"):
        fid_from_features(np.zeros((3, 4)) + np.arange(3)[:, None], np.zeros((3, 5)) + np.arange(3)[:, None])


# ------------------------------------------------------------------ CLIP score formula


def test_clip_score_formula():
    img = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    txt = torch.tensor([[2.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    scores = clip_score_from_embeddings(img, txt)
    assert scores.tolist() == pytest.approx([100.0, 100.0 / np.sqrt(2), 0.0])  # negative cos -> 0


# ------------------------------------------------------------------ tiny networks on disk


def save_tiny_clip(path: Path, seed: int = 0) -> Path:
    """A randomly initialised CLIP (width 32, 32x32 images) with a byte-level BPE tokenizer and processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)} | {f"{c}</w>": len(chars) + i for i, c in enumerate(chars)}
    bos, eos = len(vocab), len(vocab) + 1
    vocab |= {"<|startoftext|>": bos, "<|endoftext|>": eos}
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=40, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(seed)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(path)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


class TinyInception(torch.nn.Module):
    """NVlabs' calling convention: uint8 (N, 3, H, W), return_features=True -> (N, 12)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(12, 12)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(x.float() / 255.0, 2).flatten(1)  # (N, 12)
        return self.proj(pooled) if return_features else pooled.sum(1)


def save_tiny_inception(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(TinyInception()), str(folder / "inception-tiny.pt"))
    return folder


@pytest.fixture(scope="module")
def nets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("nets")
    return {"clip": save_tiny_clip(root / "clip"), "inception": save_tiny_inception(root / "inception")}


def _images(seed: int, n: int = 6, size: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_clip_scorer_computes_the_formula_with_the_saved_model(nets):
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    scorer = ClipScorer(str(nets["clip"]))
    images, captions = _images(0), [f"a photo of thing {i}" for i in range(6)]
    model = CLIPModel.from_pretrained(nets["clip"]).eval()
    with torch.no_grad():
        tokens = AutoTokenizer.from_pretrained(nets["clip"])(captions, padding=True, return_tensors="pt")
        t = model.get_text_features(**tokens).pooler_output
        pixels = CLIPImageProcessor.from_pretrained(nets["clip"])(images=list(images), return_tensors="pt")
        i = model.get_image_features(pixel_values=pixels["pixel_values"]).pooler_output
    cos = torch.nn.functional.cosine_similarity(i, t, dim=-1).double()
    expected = float((100 * cos.clamp(min=0)).mean())
    assert scorer.score(images, captions, batch_size=4) == pytest.approx(expected, rel=1e-5)
    # The same embeddings (the clamp can hide differences: a random CLIP's cosines may all be < 0).
    assert torch.allclose(scorer.image_embeddings(images), i, atol=1e-5)
    assert torch.allclose(scorer.text_embeddings(captions), t, atol=1e-5)


def test_clip_score_prefers_matching_captions(nets):
    """With a CLIP whose towers see the same signal (the image's mean brightness / the caption's
    length), matching pairs score higher than shuffled ones."""
    scorer = ClipScorer(str(nets["clip"]))
    with torch.no_grad():
        for proj in (scorer.model.visual_projection, scorer.model.text_projection):
            proj.weight.zero_()
    brightness = lambda x: torch.tensor(x).float().mean(dim=(1, 2, 3)) / 255.0 * 2 - 1  # noqa: E731
    scorer.image_embeddings = lambda x: torch.stack([torch.ones(len(x)), brightness(x)], 1)  # type: ignore
    scorer.text_embeddings = lambda c: torch.stack(  # type: ignore
        [torch.ones(len(c)), torch.tensor([len(s) / 10 - 1 for s in c])], 1)
    images = np.stack([np.full((8, 8, 3), v, np.uint8) for v in (0, 64, 128, 191, 255)])
    captions = ["x" * n for n in (0, 5, 10, 15, 20)]  # length/10 - 1 tracks brightness
    assert scorer.score(images, captions) > scorer.score(images, captions[::-1]) + 5


def test_feature_nets_load_from_folder_file_and_transformers(nets, tmp_path):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    images = _images(1)
    from_folder = load_feature_net(str(nets["inception"]))(images)
    from_file = load_feature_net(str(nets["inception"] / "inception-tiny.pt"))(images)
    assert from_folder.shape == (6, 12) and np.array_equal(from_folder, from_file)
    vit = tmp_path / "vit"
    CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     image_size=32, patch_size=8)).save_pretrained(vit)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(vit)
    features = load_feature_net(str(vit))(images)
    assert features.shape == (6, 16) and np.isfinite(features).all()
    with pytest.raises(ValueError, match="eval.fid_features is empty"):
        load_feature_net("")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="TorchScript"):
        load_feature_net(str(tmp_path / "empty"))


def _upload(folder: Path, bucket: str, prefix: str, endpoint: str) -> str:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=bucket)
    for path in folder.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")
    return f"s3://{bucket}/{prefix}"


def test_networks_load_from_s3(nets, s3_server, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    monkeypatch.setenv("SELFE_MODEL_CACHE", str(tmp_path / "mirror"))
    clip_uri = _upload(nets["clip"], "evalnets", "clip", s3_server)
    inception_uri = _upload(nets["inception"], "evalnets", "inception", s3_server)
    images, captions = _images(2), [f"caption {i}" for i in range(6)]
    scorer = build_scorer(clip_uri, inception_uri, images)
    local = build_scorer(str(nets["clip"]), str(nets["inception"]), images)
    same, _ = scorer.score(images, captions)
    assert same["fid"] == pytest.approx(0.0, abs=1e-6)  # the reference set itself
    assert same["clip_score"] == pytest.approx(local.score(images, captions)[0]["clip_score"], rel=1e-6)
    assert scorer.score(_images(3), captions)[0]["fid"] > 1e-4
    assert (tmp_path / "mirror" / "evalnets" / "clip" / "config.json").is_file()


# ------------------------------------------------------------------ held-out slice


def test_heldout_split_is_deterministic_and_about_the_fraction():
    captions = [f"caption number {i}" for i in range(20_000)]
    mask = heldout_mask(captions, 0.05)
    assert mask.mean() == pytest.approx(0.05, abs=0.006)
    assert np.array_equal(mask, heldout_mask(captions, 0.05))
    assert not heldout_mask(captions, 0.0).any()
    assert np.all(heldout_mask(captions, 0.1)[mask])  # nested: a larger fraction keeps the smaller one's rows
    assert heldout_unit("a cat") == heldout_unit("a cat") != heldout_unit("a dog")


def test_drop_heldout_keeps_only_training_rows():
    captions = [f"c{i}" for i in range(200)]
    table = pa.table({"caption": captions, "x": list(range(200))})
    kept = drop_heldout(table, 0.2)
    held = heldout_mask(captions, 0.2)
    assert kept.column("x").to_pylist() == [i for i in range(200) if not held[i]]
    assert 0 < held.sum() < 200


def _tensor_column(array: np.ndarray) -> pa.Array:
    return pa.LargeListArray.from_arrays(np.arange(0, array.size + 1, array[0].size), array.reshape(-1))


def write_tiny_cache(root: Path, captions: list[str], files: int = 2) -> Path:
    """A cache folder with the real layout (manifest + Parquet files) and known tensors per row."""
    n = len(captions)
    latents = np.arange(n, dtype=np.float16)[:, None, None, None] * np.ones((n, 3, 2, 2), np.float16)
    tokens = np.arange(n, dtype=np.float16)[:, None, None] * np.ones((n, 4, 5), np.float16)
    names = []
    for k, rows in enumerate(np.array_split(np.arange(n), files)):
        name = f"data/part-{k}.parquet"
        (root / "data").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({
            "latent": _tensor_column(latents[rows]), "text_tokens": _tensor_column(tokens[rows]),
            "text_mask": _tensor_column(np.ones((len(rows), 4), bool)),
            "text_pooled": _tensor_column(tokens[rows][:, 0]),
            "caption": [captions[i] for i in rows], "spec": [""] * len(rows)}), root / name)
        names.append(name)
    columns = {"latent": {"shape": [3, 2, 2]}, "text_tokens": {"shape": [4, 5]}, "text_mask": {"shape": [4]},
               "text_pooled": {"shape": [5]}}
    (root / "manifest.json").write_text(json.dumps({"rows": n, "files": names, "columns": columns}))
    return root


def test_read_heldout_returns_the_held_out_rows_in_order(tmp_path):
    captions = [f"row {i}" for i in range(300)]
    cache = write_tiny_cache(tmp_path / "cache", captions)
    expected = [i for i, held in enumerate(heldout_mask(captions, 0.1)) if held]
    rows = read_heldout(str(cache), 0.1, limit=1000)
    assert rows.captions == [captions[i] for i in expected]
    assert rows.latents.shape == (len(expected), 3, 2, 2) and rows.latents[:, 0, 0, 0].tolist() == expected
    assert rows.cond.tokens.shape == (len(expected), 4, 5) and rows.cond.mask.dtype == torch.bool
    assert rows.cond.pooled[:, 0].tolist() == expected
    assert read_heldout(str(cache), 0.1, limit=3).captions == [captions[i] for i in expected[:3]]
    with pytest.raises(ValueError, match="no held-out row"):
        read_heldout(str(cache), 1e-9, limit=10)


# ------------------------------------------------------------------ configuration


def test_suite_follows_the_source_and_names_the_ranking_metric():
    from selfe.config import load_config

    assert resolve_suite("auto", "shapes") == "geneval_lite" and ranking_metric("geneval_lite") == "geneval_fewstep"
    assert resolve_suite("auto", "s3://b/imgs") == "clip_fid" and ranking_metric("clip_fid") == "fid_fewstep"
    cfg = load_config(overrides=["--data.source=/data/imgs"])
    assert cfg.eval.resolved_suite(cfg.data.source) == "clip_fid"
    with pytest.raises(ConfigError, match="eval.clip_model and eval.fid_features"):
        cfg.eval.require_networks(cfg.data.source)
    for bad, message in ((["--eval.suite=fid"], "eval.suite must be"),
                         (["--data.source=/d", "--eval.suite=geneval_lite"], "use eval.suite=clip_fid"),
                         (["--data.source=/d", "--eval.heldout_fraction=0"], "set eval.heldout_fraction"),
                         (["--eval.heldout_fraction=0.9"], r"\[0, 0.5\]"), (["--eval.num_images=1"], "num_images")):
        with pytest.raises(ConfigError, match=message):
            load_config(overrides=bad)


def test_sweep_ranks_real_data_trials_by_fid(tmp_path):
    from selfe.sweep.space import load_space

    space = tmp_path / "space.toml"
    space.write_text('[base]\n"data.source" = "/data/imgs"\n"train.eval_every" = 10\n"train.steps" = 40\n'
                     '"eval.clip_model" = "/m/clip"\n"eval.fid_features" = "/m/inception"\n'
                     '[space]\n"objective.self_eval_weight" = { values = [1.0] }\n')
    spec = load_space(space)
    assert (spec.metric, spec.mode) == ("fid_fewstep", "min")
    with pytest.raises(ConfigError, match="mode = 'min'"):
        load_space(space, mode="max")
    with pytest.raises(ConfigError, match="not reported by the eval suite"):
        load_space(space, metric="geneval_fewstep")
    assert load_space(space, metric="clip_fewstep").mode == "max"
