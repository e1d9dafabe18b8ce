"""The fixed GenEval-lite prompt sets: how they are built, and loading the committed copies.

A prompt set is a JSONL file, one ``{"id", "prompt", "task", "spec", "split"}`` object a line,
with prompts in GenEval's exact templates. Sets are versioned: ``geneval_lite_v1.jsonl`` is built
by ``build_prompt_set_v1`` and committed; a test checks the two still agree, so a change to the
shapes-world sampler that would silently change the benchmark fails instead (make a v2).

``geneval_lite_dev.jsonl`` (``build_prompt_set_dev``) is a second draw for choosing defaults.
Regenerate with ``python -m selfe.eval.prompts``.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np

from selfe.data.shapes_spec import SPLITS, TASKS, ShapesConfig, caption_for, sample_spec

# Prompts per task, GenEval-like proportions. The held-out set only has tasks whose prompt names
# the colours or the relation: a held-out object in "a photo of a circle" would test nothing.
V1_TRAIN_COUNTS = {
    "single_object": 40,
    "two_object": 60,
    "counting": 60,
    "colors": 60,
    "position": 60,
    "color_attr": 60,
}
V1_HELDOUT_COUNTS = {"colors": 20, "position": 20, "color_attr": 20}
_V1_SEED = 20240601
_DEV_SEED = 20261207
_PROMPT_DIR = "prompts"


def _build_records(counts: dict[str, int], split: str, seed: int) -> list[dict]:
    records = []
    for task, count in counts.items():
        # Seeded per (split, task) so that changing one task's count leaves the others intact.
        rng = np.random.default_rng([seed, SPLITS.index(split), TASKS.index(task)])
        cfg = ShapesConfig(task_weights={task: 1.0}, split=split)
        prefix = task if split == "train" else f"heldout_{task}"
        for k in range(count):
            spec = sample_spec(rng, cfg)
            prompt = caption_for(spec)
            records.append({"id": f"{prefix}_{k:03d}", "prompt": prompt, "task": task, "spec": spec, "split": split})
    return records


def build_prompt_set_v1() -> list[dict]:
    """The v1 prompt set, deterministically: 340 in-distribution prompts, then 60 held-out ones."""
    return _build_records(V1_TRAIN_COUNTS, "train", _V1_SEED) + _build_records(V1_HELDOUT_COUNTS, "heldout", _V1_SEED)


def build_prompt_set_dev() -> list[dict]:
    """The development set: v1's tasks and counts drawn again with another seed. Sampler defaults are
    chosen on it, so that they are not tuned to the v1 numbers the reports judge them by. The shapes
    world is small, so some prompts recur in both sets (the same caption with other objects drawn)."""
    return (_build_records(V1_TRAIN_COUNTS, "train", _DEV_SEED)
            + _build_records(V1_HELDOUT_COUNTS, "heldout", _DEV_SEED))


PROMPT_SETS = {"v1": build_prompt_set_v1, "dev": build_prompt_set_dev}
"""Every committed set and its builder (tests check the two agree)."""


def write_prompt_file(path: str | Path, records: list[dict]) -> None:
    """Write a prompt set as compact JSONL (the committed format)."""
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, separators=(",", ":")) + "\n")


def read_prompt_file(path: str | Path) -> list[dict]:
    """Read a prompt-set JSONL file."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def prompt_set_path(name: str = "v1") -> Path:
    """Path of the committed prompt set ``geneval_lite_<name>.jsonl``."""
    folder = resources.files("selfe.eval").joinpath(_PROMPT_DIR)
    path = Path(str(folder.joinpath(f"geneval_lite_{name}.jsonl")))
    if not path.is_file():
        available = sorted(p.name for p in Path(str(folder)).glob("geneval_lite_*.jsonl"))
        raise FileNotFoundError(f"no prompt set {name!r} at {path}; available: {available}")
    return path


def load_prompt_set(name: str = "v1", split: str | None = None) -> list[dict]:
    """The committed prompt set ``name``, optionally only its "train" or "heldout" records."""
    if split not in (None, "train", "heldout"):
        raise ValueError(f"split={split!r}: expected None, 'train' or 'heldout'")
    records = read_prompt_file(prompt_set_path(name))
    return [r for r in records if split is None or r["split"] == split]


if __name__ == "__main__":
    for name, build in PROMPT_SETS.items():
        target = Path(__file__).parent / _PROMPT_DIR / f"geneval_lite_{name}.jsonl"
        target.parent.mkdir(exist_ok=True)
        write_prompt_file(target, build())
        print(f"wrote {target}")
