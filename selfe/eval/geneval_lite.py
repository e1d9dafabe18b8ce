"""GenEval-lite: exact, CPU-only scoring of shapes-world images against their prompt specs.

Detection replaces GenEval's detector + CLIP colour classifier with three exact steps:

1. Colour: each pixel is matched to the palette colour whose line from the background through that
   colour passes nearest to it, if the pixel lies at least half-way from the background to the colour
   (``alpha >= 0.5``) and within ``_MAX_COLOR_DISTANCE`` of that line. Blurred or JPEG-smeared edges
   are blends of a colour with the background, so they split at the half-way point instead of
   forming rims of some third colour; pixels far from every line are background/unknown.
2. Objects: 4-connected components of each colour, dropping specks smaller than 1.2% of the image.
3. Shape: an apex-up triangle has most of its pixels low down (negative skewness of the row
   index); a square's outer rows and columns are as long as its middle ones, a circle's are not.

Rules follow GenEval's ``evaluate_images.py``: single_object and two_object need each named shape
(any colour); counting needs exactly N of the shape; colors and color_attr need an object of each
named (colour, shape); position needs both objects and the relation between every pair of
candidates, judged by GenEval's ``relative_position``: the centre offset, shrunk on each axis by
a dead zone of 0.1 x (A's + B's box size along that axis), divided by the full offset's length,
must exceed 0.5 along the relation's axis.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from selfe.data.shapes_spec import BACKGROUND, COLORS, TASKS
from selfe.eval.prompts import read_prompt_file

_COLOR_NAMES = tuple(COLORS)
_BACKGROUND = np.array(BACKGROUND, dtype=np.float32)
_DIRECTIONS = np.array([COLORS[name] for name in _COLOR_NAMES], dtype=np.float32) - _BACKGROUND  # (K, 3)
_MIN_ALPHA = 0.5
_MAX_COLOR_DISTANCE = 48.0  # RGB units off the line; Gaussian noise of sigma 8 moves a pixel ~14
_MIN_AREA_FRACTION = 0.012  # the smallest rendered triangle covers ~5% of the image
_MAX_ASPECT = 1.6  # every shape has a square bounding box; elongated blobs are not shapes
_TRIANGLE_MAX_SKEWNESS = -0.2  # triangles measure <= -0.25 even after JPEG at 32 px, others >= -0.12
_SQUARE_MIN_EDGE_FULLNESS = 0.7  # clean: circles ~0.62, squares 1.0; JPEG at 32 px: <= 0.68, >= 0.69
_POSITION_THRESHOLD = 0.1  # GenEval's dead zone, as a fraction of the two boxes' summed size


@dataclass(frozen=True)
class DetectedObject:
    """One coloured component: ``shape`` is "unknown" when it matches no shape in the world."""

    shape: str
    color: str
    area: int
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1), pixel edges, x1/y1 exclusive

    def describe(self) -> str:
        """E.g. "red circle", as used in reasons."""
        return f"{self.color} {self.shape}"


def _classify_pixels(image: np.ndarray) -> np.ndarray:
    """(H, W) palette index per pixel, -1 for background or unknown."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"expected an (H, W, 3) uint8 RGB image, got shape {image.shape} dtype {image.dtype}; "
            "convert model outputs in [0, 1] with (x * 255).round().clip(0, 255).astype(np.uint8)"
        )
    offsets = image.reshape(-1, 3).astype(np.float32) - _BACKGROUND  # (N, 3)
    squared_lengths = (_DIRECTIONS**2).sum(axis=1)  # (K,)
    alpha = offsets @ _DIRECTIONS.T / squared_lengths  # (N, K) position along each colour's line
    line_distance2 = (offsets**2).sum(axis=1, keepdims=True) - alpha**2 * squared_lengths  # (N, K)
    line_distance2 = np.where(alpha >= _MIN_ALPHA, line_distance2, np.inf)
    nearest = line_distance2.argmin(axis=1)
    matched = line_distance2[np.arange(len(nearest)), nearest] <= _MAX_COLOR_DISTANCE**2
    return np.where(matched, nearest, -1).reshape(image.shape[:2])


def _label_components(classes: np.ndarray) -> np.ndarray:
    """4-connected components of equal class: each pixel gets its component's smallest flat index.

    Min-label propagation with pointer jumping, vectorised in numpy (scipy is not a dependency):
    compact shapes converge in under ten sweeps at any resolution. Background pixels get ``H * W``.
    """
    height, width = classes.shape
    sentinel = height * width
    valid = classes >= 0
    labels = np.where(valid, np.arange(sentinel).reshape(height, width), sentinel)
    joined_right = valid[:, :-1] & (classes[:, :-1] == classes[:, 1:])
    joined_down = valid[:-1, :] & (classes[:-1, :] == classes[1:, :])
    while True:
        new = labels.copy()
        np.minimum(new[:, :-1], np.where(joined_right, labels[:, 1:], sentinel), out=new[:, :-1])
        np.minimum(new[:, 1:], np.where(joined_right, labels[:, :-1], sentinel), out=new[:, 1:])
        np.minimum(new[:-1, :], np.where(joined_down, labels[1:, :], sentinel), out=new[:-1, :])
        np.minimum(new[1:, :], np.where(joined_down, labels[:-1, :], sentinel), out=new[1:, :])
        # A label is the index of a pixel in the same component, so following it is safe.
        new = np.append(new.ravel(), sentinel)[new]
        if np.array_equal(new, labels):
            return labels
        labels = new


def _edge_fullness(chords: np.ndarray) -> float:
    """Mean chord in the outer quarter on each side, relative to a full chord (second longest)."""
    outer = max(1, round(0.25 * len(chords)))
    return float(np.concatenate([chords[:outer], chords[-outer:]]).mean() / np.sort(chords)[-2])


def _classify_shape(mask: np.ndarray) -> str:
    """Shape of a component from its bounding-box crop (a boolean mask).

    Both features integrate over many pixels, so a ragged JPEG edge or a rounded corner moves
    them little: an apex-up triangle has most of its pixels low down (skewness of the row index
    about -0.56, against 0 for the symmetric shapes), and a square's outer rows and columns are as
    long as its middle ones (edge fullness ~1.0, against ~0.62 for a circle).
    """
    height, width = mask.shape
    if max(height, width) > _MAX_ASPECT * min(height, width) or min(height, width) < 3:
        return "unknown"
    rows = np.nonzero(mask)[0].astype(np.float64)
    centred = rows - rows.mean()
    skewness = (centred**3).mean() / max((centred**2).mean(), 1e-9) ** 1.5
    if skewness < _TRIANGLE_MAX_SKEWNESS:
        return "triangle"
    row_chords, column_chords = mask.sum(axis=1), mask.sum(axis=0)
    fullness = (_edge_fullness(row_chords[row_chords > 0]) + _edge_fullness(column_chords[column_chords > 0])) / 2
    return "square" if fullness >= _SQUARE_MIN_EDGE_FULLNESS else "circle"


def detect(image: np.ndarray) -> list[DetectedObject]:
    """All objects in an (H, W, 3) uint8 image, in raster order of their first pixel."""
    classes = _classify_pixels(image)
    labels = _label_components(classes)
    roots, counts = np.unique(labels, return_counts=True)
    min_area = _MIN_AREA_FRACTION * classes.size
    objects = []
    for root, count in zip(roots, counts):
        if root == classes.size or count < min_area:
            continue
        ys, xs = np.nonzero(labels == root)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        shape = _classify_shape(labels[y0:y1, x0:x1] == root)
        color = _COLOR_NAMES[classes.flat[root]]
        objects.append(DetectedObject(shape, color, int(count), (int(x0), int(y0), int(x1), int(y1))))
    return objects


def relative_position(box_a: Sequence[float], box_b: Sequence[float]) -> set[str]:
    """Relations of box A to box B by GenEval's rule (y grows downwards); empty inside the dead zone."""
    a, b = np.asarray(box_a, dtype=np.float64), np.asarray(box_b, dtype=np.float64)
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
    dead_zone = _POSITION_THRESHOLD * ((a[2:] - a[:2]) + (b[2:] - b[:2]))
    revised = np.maximum(np.abs(offset) - dead_zone, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    named = {"left of": dx < -0.5, "right of": dx > 0.5, "above": dy < -0.5, "below": dy > 0.5}
    return {relation for relation, holds in named.items() if holds}


def _inventory(objects: list[DetectedObject]) -> str:
    return "found " + (", ".join(obj.describe() for obj in objects) if objects else "nothing")


def _with_shape(objects: list[DetectedObject], shape: str) -> list[DetectedObject]:
    return [obj for obj in objects if obj.shape == shape]


def _matching(objects: list[DetectedObject], target: dict) -> list[DetectedObject]:
    return [obj for obj in objects if obj.shape == target["shape"] and obj.color == target["color"]]


def _describe(target: dict) -> str:
    return f"{target['color']} {target['shape']}"


def score(image: np.ndarray, spec: dict) -> tuple[bool, str]:
    """(correct, reason) for one image against a spec; the reason is "" when correct."""
    task, targets = spec["task"], spec["objects"]
    objects = detect(image)
    if task in ("single_object", "two_object"):
        missing = [t["shape"] for t in targets if not _with_shape(objects, t["shape"])]
        if missing:
            return False, f"no {' and no '.join(missing)}; {_inventory(objects)}"
        return True, ""
    if task == "counting":
        shape, count = targets[0]["shape"], spec["count"]
        found = len(_with_shape(objects, shape))
        if found != count:
            return False, f"expected {count} {shape}, found {found}; {_inventory(objects)}"
        return True, ""
    if task in ("colors", "color_attr", "position"):
        missing = [_describe(t) for t in targets if not _matching(objects, t)]
        if missing:
            return False, f"no {' and no '.join(missing)}; {_inventory(objects)}"
        if task != "position":
            return True, ""
        relation = spec["relation"]
        for obj_a in _matching(objects, targets[0]):
            for obj_b in _matching(objects, targets[1]):
                actual = relative_position(obj_a.box, obj_b.box)
                if relation not in actual:
                    found = " and ".join(sorted(actual)) or "no relation, inside the dead zone"
                    return False, f"{_describe(targets[0])} not {relation} {_describe(targets[1])} (found {found})"
        return True, ""
    raise ValueError(f"unknown task {task!r} in spec; valid tasks are {TASKS}")


def _by_task(results: list[dict]) -> dict[str, list[bool]]:
    by_task: dict[str, list[bool]] = {}
    for result in results:
        by_task.setdefault(result["task"], []).append(result["correct"])
    return {task: by_task[task] for task in TASKS if task in by_task}


def _accuracy_by_task(results: list[dict]) -> dict[str, float]:
    return {task: float(np.mean(hits)) for task, hits in _by_task(results).items()}


def overall_se(results: list[dict]) -> float | None:
    """Binomial standard error of ``overall`` (the mean of T task accuracies p_t over n_t prompts):
    sqrt(sum_t p_t (1 - p_t) / n_t) / T. None without results."""
    by_task = _by_task(results)
    if not by_task:
        return None
    var = sum(float(np.mean(h)) * (1 - float(np.mean(h))) / len(h) for h in by_task.values())
    return var ** 0.5 / len(by_task)


def evaluate(images: Sequence[np.ndarray], records: Sequence[dict]) -> tuple[list[dict], dict]:
    """Score ``images[i]`` against prompt-set record ``records[i]``.

    Returns per-image results (the record's fields plus ``correct`` and ``reason``) and a summary:
    ``per_task`` accuracy and ``overall`` (mean of the task accuracies, as GenEval; ``overall_se`` its
    binomial standard error) over records
    whose split is not "heldout", and ``heldout`` / ``heldout_per_task`` over the held-out ones
    (None / {} when there are none). ``overall`` averages only the tasks present.
    """
    if len(images) != len(records):
        raise ValueError(f"got {len(images)} images for {len(records)} prompt records; pass one image per record")
    results = []
    for image, record in zip(images, records):
        correct, reason = score(np.asarray(image), record["spec"])
        results.append({**record, "correct": correct, "reason": reason})
    in_distribution = [r for r in results if r.get("split") != "heldout"]
    heldout = [r for r in results if r.get("split") == "heldout"]
    per_task = _accuracy_by_task(in_distribution)
    summary = {
        "overall": float(np.mean(list(per_task.values()))) if per_task else None,
        "overall_se": overall_se(in_distribution),
        "per_task": per_task,
        "heldout": float(np.mean([r["correct"] for r in heldout])) if heldout else None,
        "heldout_per_task": _accuracy_by_task(heldout),
        "num_images": len(in_distribution),
        "num_heldout_images": len(heldout),
    }
    return results, summary


def write_jsonl(path: str | Path, records: Sequence[dict]) -> None:
    """One JSON object per line."""
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


def format_table(summary: dict) -> str:
    """The summary as a markdown table: one row per task, then overall and held-out."""

    def cell(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    rows = ["| task | accuracy |", "|---|---|"]
    rows += [f"| {task} | {cell(summary['per_task'].get(task))} |" for task in TASKS]
    rows.append(f"| **overall** | **{cell(summary['overall'])}** |")
    rows.append(f"| heldout | {cell(summary['heldout'])} |")
    return "\n".join(rows)


def _load_images(image_dir: Path, records: list[dict]) -> tuple[list[np.ndarray], list[dict]]:
    """Images named ``<id>.png`` or ``<id>_<k>.png`` (several samples per prompt) in ``image_dir``."""
    images, matched_records, missing = [], [], []
    for record in records:
        paths = sorted(image_dir.glob(f"{record['id']}.png")) + sorted(image_dir.glob(f"{record['id']}_*.png"))
        if not paths:
            missing.append(record["id"])
        for path in paths:
            images.append(np.asarray(Image.open(path).convert("RGB")))
            matched_records.append(record)
    if missing:
        raise FileNotFoundError(f"{len(missing)} prompts have no image in {image_dir} (e.g. {missing[0]}.png)")
    return images, matched_records


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: score a folder of generated images, write per-image JSONL, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True, help="folder of <id>.png or <id>_<k>.png")
    parser.add_argument("--prompts", type=Path, required=True, help="prompt-set JSONL")
    parser.add_argument("--out", type=Path, required=True, help="per-image results JSONL")
    args = parser.parse_args(argv)
    images, records = _load_images(args.images, read_prompt_file(args.prompts))
    results, summary = evaluate(images, records)
    write_jsonl(args.out, results)
    print(format_table(summary))


if __name__ == "__main__":
    main()
