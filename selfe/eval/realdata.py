"""The ``clip_fid`` suite: CLIP score and FID of generated images on a held-out slice of real data.

For N held-out rows (captions c_i, cache latents z_i) and each step count k:

* generated images x_i^k = decode(sample_k(c_i)), uint8 (N, H, W, 3);
* reference images r_i = decode(z_i) through the same codec (so FID measures the generator, not the
  codec's reconstruction error);
* ``clip_score`` = 100 * mean_i max(cos(CLIP_img(x_i^k), CLIP_txt(c_i)), 0);
* ``fid`` = Fréchet distance between the features of {x_i^k} and of {r_i} (``selfe.eval.fid``).

The reference statistics are computed once and reused for every step count.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfe.eval.clip_score import ClipScorer
from selfe.eval.feature_nets import batched_features, load_feature_net
from selfe.eval.fid import GaussianStats, frechet_distance, gaussian_stats
from selfe.eval.heldout import HeldoutSlice


def decode_latents(codec: Any, latents: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Cache latents (N, C, h, w) -> uint8 images (N, H, W, 3) through ``codec`` (an ``ImageCodec``)."""
    from selfe.encoders.image import tensor_to_images

    device = getattr(codec, "device", "cpu")
    chunks = []
    for i in range(0, len(latents), batch_size):
        z = torch.from_numpy(np.asarray(latents[i:i + batch_size], dtype=np.float32)).to(device)
        with torch.no_grad():
            chunks.append(tensor_to_images(codec.decode(z)))
    return np.concatenate(chunks, axis=0)


@dataclass
class RealDataScorer:
    """CLIP model, FID feature network and the reference statistics of the held-out images."""

    clip: ClipScorer
    features: Any
    """A ``selfe.eval.feature_nets`` network: uint8 (N, H, W, 3) -> (N, D)."""
    reference: GaussianStats
    batch_size: int = 64

    def score(self, images: np.ndarray, captions: Sequence[str]) -> tuple[dict[str, float], np.ndarray]:
        """({"clip_score", "fid", "count"}, per-image CLIP scores (N,)) of uint8 images vs captions."""
        per_image = self.clip.per_image(images, captions, self.batch_size)
        generated = gaussian_stats(batched_features(self.features, images, self.batch_size))
        summary = {"clip_score": float(per_image.mean()), "fid": frechet_distance(generated, self.reference),
                   "count": len(images)}
        return summary, per_image


def build_scorer(clip_model: str, fid_features: str, reference_images: np.ndarray,
                 device: str | torch.device = "cpu", batch_size: int = 64) -> RealDataScorer:
    """Load both networks (local path, s3:// or hub id) and compute the reference statistics."""
    clip = ClipScorer(clip_model, device)
    features = load_feature_net(fid_features, device)
    reference = gaussian_stats(batched_features(features, reference_images, batch_size))
    return RealDataScorer(clip, features, reference, batch_size)


def evaluate_realdata_steps(
    gen: Any,
    heldout: HeldoutSlice,
    steps_list: Sequence[int],
    scorer: RealDataScorer,
    guidance: float | None = None,
    seed: int = 1234,
    out_dir: str | Path | None = None,
    batch_size: int = 64,
    **sampler_kw,
) -> dict[int, dict]:
    """Score ``gen`` (an ``ImageGenerator``) on the held-out captions at each step count. Returns
    {steps: {"clip_score", "fid", "count", "nfe"}}; writes ``clip_fid_{steps}steps.jsonl`` (one
    {"caption", "clip_score"} record per image) into ``out_dir`` when given."""
    results: dict[int, dict] = {}
    for steps in steps_list:
        images, nfe = gen.generate(heldout.captions, steps=steps, guidance=guidance, seed=seed,
                                   batch_size=batch_size, **sampler_kw)
        summary, per_image = scorer.score(images, heldout.captions)
        results[steps] = {**summary, "nfe": nfe}
        if out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            with open(Path(out_dir) / f"clip_fid_{steps}steps.jsonl", "w", encoding="utf-8") as handle:
                for caption, value in zip(heldout.captions, per_image.tolist()):
                    handle.write(json.dumps({"caption": caption, "clip_score": value}) + "\n")
    return results


def realdata_table(results: dict) -> str:
    """Markdown table: one row per step count with NFE, CLIP score (higher is better), FID (lower)."""
    if not results:
        return ""
    rows = ["| steps | NFE | images | CLIP score | FID |", "|---|---|---|---|---|"]
    for steps, s in results.items():
        rows.append(f"| {steps} | {s.get('nfe', '')} | {s['count']} | {s['clip_score']:.2f} | {s['fid']:.2f} |")
    return "\n".join(rows)
