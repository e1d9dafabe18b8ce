"""GenEval-lite: the committed prompt set, and the scorer on true, degraded and wrong images."""

from __future__ import annotations

import io
import json
from collections import Counter, deque
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selfe.data.shapes import COLORS, SHAPES, TASKS, caption_for, is_heldout, render
from selfe.eval.geneval_lite import (
    _label_components,
    detect,
    evaluate,
    format_table,
    main,
    relative_position,
    score,
    write_jsonl,
)
from selfe.eval.prompts import (
    V1_HELDOUT_COUNTS,
    V1_TRAIN_COUNTS,
    PROMPT_SETS,
    load_prompt_set,
    prompt_set_path,
    read_prompt_file,
    write_prompt_file,
)

_CONVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@lru_cache(maxsize=None)
def _records() -> tuple[dict, ...]:
    return tuple(load_prompt_set("v1"))


@lru_cache(maxsize=None)
def _ground_truth(resolution: int) -> tuple[np.ndarray, ...]:
    records = _records()
    return tuple(render(r["spec"], resolution, np.random.default_rng([resolution, i])) for i, r in enumerate(records))


def _gaussian_noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(image + rng.normal(0.0, 8.0, image.shape), 0, 255).astype(np.uint8)


def _box_blur(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    padded = np.pad(image.astype(np.float32), ((1, 1), (1, 1), (0, 0)), mode="edge")
    height, width = image.shape[:2]
    total = sum(padded[i : i + height, j : j + width] for i in range(3) for j in range(3))
    return np.round(total / 9).astype(np.uint8)


def _jpeg(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)  # PIL's default 4:2:0 chroma
    return np.asarray(Image.open(buffer).convert("RGB"))


def _mismatched(spec: dict) -> dict:
    """A spec whose image must fail ``spec``: the one thing the task checks is changed."""
    task, objects = spec["task"], [dict(o) for o in spec["objects"]]
    if task == "single_object":
        objects[0]["shape"] = SHAPES[(SHAPES.index(objects[0]["shape"]) + 1) % len(SHAPES)]
    elif task == "two_object":
        objects[1]["shape"] = objects[0]["shape"]  # the second named shape is missing
    elif task == "counting":
        count = spec["count"] + 1 if spec["count"] < 4 else 3
        return {**spec, "objects": [objects[0]] * count, "count": count}
    elif task == "colors":
        names = list(COLORS)
        objects[0]["color"] = names[(names.index(objects[0]["color"]) + 1) % len(names)]
    elif task == "color_attr":
        objects[0]["color"], objects[1]["color"] = objects[1]["color"], objects[0]["color"]
    elif task == "position":
        return {**spec, "relation": _CONVERSE[spec["relation"]]}
    return {**spec, "objects": objects}


# --- prompt set -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PROMPT_SETS))
def test_committed_prompt_set_matches_its_builder(tmp_path: Path, name: str) -> None:
    path = prompt_set_path(name)
    assert read_prompt_file(path) == PROMPT_SETS[name]()
    write_prompt_file(tmp_path / f"{name}.jsonl", PROMPT_SETS[name]())
    assert (tmp_path / f"{name}.jsonl").read_bytes() == path.read_bytes()
    assert path.stat().st_size < 100_000


def test_the_development_set_is_another_draw_of_the_same_tasks() -> None:
    dev, v1 = load_prompt_set("dev"), _records()
    assert Counter((r["task"], r["split"]) for r in dev) == Counter((r["task"], r["split"]) for r in v1)
    assert sum(a["spec"] == b["spec"] for a, b in zip(dev, v1)) < len(v1) // 10  # not the report's scenes


def test_prompt_set_contents() -> None:
    records = _records()
    assert len({r["id"] for r in records}) == len(records)
    assert Counter(r["task"] for r in records if r["split"] == "train") == V1_TRAIN_COUNTS
    assert Counter(r["task"] for r in records if r["split"] == "heldout") == V1_HELDOUT_COUNTS
    for record in records:
        assert set(record) == {"id", "prompt", "task", "spec", "split"}
        assert record["prompt"] == caption_for(record["spec"]) and record["prompt"].startswith("a photo of ")
        assert is_heldout(record["spec"]) == (record["split"] == "heldout")
    assert len(load_prompt_set(split="heldout")) == sum(V1_HELDOUT_COUNTS.values())
    assert len(load_prompt_set(split="train")) == sum(V1_TRAIN_COUNTS.values())


def test_unknown_prompt_set_is_a_clear_error() -> None:
    with pytest.raises(FileNotFoundError, match="available: \\['geneval_lite_dev.jsonl', 'geneval_lite_v1.jsonl'\\]"):
        load_prompt_set("v9")


# --- scorer on ground truth ---------------------------------------------------------------------


@pytest.mark.parametrize("resolution", [32, 64])
def test_ground_truth_scores_perfectly(resolution: int) -> None:
    results, summary = evaluate(_ground_truth(resolution), _records())
    failures = [(r["prompt"], r["reason"]) for r in results if not r["correct"]]
    assert summary["overall"] == 1.0 and summary["heldout"] == 1.0, failures[:5]
    assert set(summary["per_task"]) == set(TASKS)


@pytest.mark.parametrize(
    "resolution, degrade",
    [(32, _gaussian_noise), (32, _box_blur), (32, _jpeg), (64, _jpeg)],
    ids=["noise-32", "blur-32", "jpeg90-32", "jpeg90-64"],
)
def test_degraded_ground_truth_still_scores(
    resolution: int, degrade: Callable[[np.ndarray, np.random.Generator], np.ndarray]
) -> None:
    rng = np.random.default_rng(0)
    images = [degrade(image, rng) for image in _ground_truth(resolution)]
    _, summary = evaluate(images, _records())
    assert summary["overall"] >= 0.98, summary
    assert summary["heldout"] >= 0.98, summary
    assert min(summary["per_task"].values()) >= 0.95, summary


def test_pure_noise_scores_near_zero() -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in _records()]
    _, summary = evaluate(images, _records())
    assert summary["overall"] <= 0.2 and summary["heldout"] <= 0.2


def test_mismatched_images_all_fail() -> None:
    records = _records()
    images = [render(_mismatched(r["spec"]), 32, np.random.default_rng(i)) for i, r in enumerate(records)]
    results, summary = evaluate(images, records)
    assert summary["overall"] == 0.0 and summary["heldout"] == 0.0
    assert all(r["reason"] for r in results)


# --- reasons, on hand-picked wrong images -------------------------------------------------------


def _objects(*pairs: str) -> list[dict]:
    return [{"color": pair.split()[0], "shape": pair.split()[1]} for pair in pairs]


@pytest.mark.parametrize(
    "prompt_spec, image_spec, reason",
    [
        (
            {"task": "counting", "objects": _objects("red circle", "red circle", "red circle"), "count": 3},
            {"task": "counting", "objects": _objects("red circle", "blue circle"), "count": 2},
            "expected 3 circle, found 2; found ",
        ),
        (
            {"task": "position", "objects": _objects("blue triangle", "green square"), "relation": "left of"},
            {"task": "position", "objects": _objects("blue triangle", "green square"), "relation": "right of"},
            "blue triangle not left of green square (found right of)",
        ),
        (
            {"task": "colors", "objects": _objects("red circle")},
            {"task": "colors", "objects": _objects("blue circle")},
            "no red circle; found blue circle",
        ),
        (
            {"task": "color_attr", "objects": _objects("red circle", "blue square")},
            {"task": "color_attr", "objects": _objects("blue circle", "red square")},
            "no red circle and no blue square; found ",
        ),
        (
            {"task": "two_object", "objects": _objects("red circle", "red square")},
            {"task": "colors", "objects": _objects("white triangle")},
            "no circle and no square; found white triangle",
        ),
    ],
)
def test_wrong_images_fail_with_informative_reason(prompt_spec: dict, image_spec: dict, reason: str) -> None:
    for seed in range(5):
        correct, got = score(render(image_spec, 32, np.random.default_rng(seed)), prompt_spec)
        assert not correct and got.startswith(reason), got
        assert score(render(prompt_spec, 32, np.random.default_rng(seed)), prompt_spec) == (True, "")


def test_score_rejects_float_images() -> None:
    spec = {"task": "colors", "objects": _objects("red circle")}
    with pytest.raises(ValueError, match="uint8"):
        score(np.zeros((32, 32, 3), dtype=np.float32), spec)


# --- building blocks ----------------------------------------------------------------------------


def _bfs_component_count(classes: np.ndarray) -> int:
    seen = np.zeros(classes.shape, dtype=bool)
    height, width = classes.shape
    count = 0
    for start in zip(*np.nonzero(classes >= 0)):
        if seen[start]:
            continue
        count += 1
        seen[start] = True
        queue = deque([start])
        while queue:
            y, x = queue.popleft()
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < height and 0 <= nx < width and not seen[ny, nx] and classes[ny, nx] == classes[y, x]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
    return count


@pytest.mark.parametrize("seed", range(4))
def test_component_labels_match_breadth_first_search(seed: int) -> None:
    classes = np.random.default_rng(seed).integers(-1, 3, size=(24, 30))
    labels = _label_components(classes)
    foreground = classes >= 0
    assert np.all(labels[~foreground] == classes.size)
    # Neighbours of one class share a label, and there are exactly as many labels as components.
    same_right = foreground[:, :-1] & (classes[:, :-1] == classes[:, 1:])
    same_down = foreground[:-1] & (classes[:-1] == classes[1:])
    assert np.all(labels[:, :-1][same_right] == labels[:, 1:][same_right])
    assert np.all(labels[:-1][same_down] == labels[1:][same_down])
    assert len(np.unique(labels[foreground])) == _bfs_component_count(classes)


@pytest.mark.parametrize(
    "box_a, box_b, expected",
    [
        ((0, 10, 10, 20), (20, 10, 30, 20), {"left of"}),
        ((20, 10, 30, 20), (0, 10, 10, 20), {"right of"}),
        ((10, 0, 20, 10), (10, 20, 20, 30), {"above"}),
        ((0, 0, 10, 10), (1, 1, 11, 11), set()),  # offset 1 px < dead zone 0.1 x (10 + 10) = 2 px
        ((0, 0, 10, 10), (20, 20, 30, 30), {"left of", "above"}),  # diagonal: GenEval names both
        ((0, 0, 10, 10), (20, 3, 30, 13), {"left of"}),  # cross offset inside its dead zone
    ],
)
def test_relative_position_follows_geneval(box_a: tuple, box_b: tuple, expected: set[str]) -> None:
    assert relative_position(box_a, box_b) == expected


def test_detect_finds_each_rendered_object() -> None:
    objects = _objects("red triangle", "blue triangle", "white triangle", "black triangle")
    spec = {"task": "counting", "objects": objects, "count": 4}
    for resolution in (32, 64, 128):
        found = detect(render(spec, resolution, np.random.default_rng(resolution)))
        assert sorted(o.describe() for o in found) == sorted(f"{o['color']} {o['shape']}" for o in spec["objects"])


# --- aggregation and CLI ------------------------------------------------------------------------


def test_summary_table_and_jsonl(tmp_path: Path) -> None:
    red_circle = {"task": "colors", "objects": _objects("red circle")}
    records = [
        {"id": "a", "prompt": "a photo of a red circle", "task": "colors", "spec": red_circle, "split": "train"},
        {"id": "b", "prompt": "a photo of a red circle", "task": "colors", "spec": red_circle, "split": "train"},
        {"id": "c", "prompt": "a photo of a red circle", "task": "colors", "spec": red_circle, "split": "heldout"},
    ]
    right = render(red_circle, 32, np.random.default_rng(0))
    wrong = render({"task": "colors", "objects": _objects("red square")}, 32, np.random.default_rng(0))
    results, summary = evaluate([right, wrong, right], records)
    assert [r["correct"] for r in results] == [True, False, True]
    assert summary["per_task"] == {"colors": 0.5} and summary["overall"] == 0.5
    assert summary["heldout"] == 1.0 and summary["num_images"] == 2 and summary["num_heldout_images"] == 1
    table = format_table(summary)
    assert "| colors | 0.500 |" in table and "| counting | n/a |" in table and "| heldout | 1.000 |" in table
    write_jsonl(tmp_path / "out.jsonl", results)
    assert [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()] == results
    with pytest.raises(ValueError, match="one image per record"):
        evaluate([right], records)


def test_cli_scores_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    records = [r for r in _records() if r["id"].endswith("_000")]
    write_prompt_file(tmp_path / "prompts.jsonl", records)
    images = tmp_path / "images"
    images.mkdir()
    for i, record in enumerate(records):
        for k in range(2):  # two samples per prompt
            image = render(record["spec"], 32, np.random.default_rng([i, k]))
            Image.fromarray(image).save(images / f"{record['id']}_{k}.png")
    args = ["--images", str(images), "--prompts", str(tmp_path / "prompts.jsonl"), "--out", str(tmp_path / "r.jsonl")]
    main(args)
    lines = (tmp_path / "r.jsonl").read_text().splitlines()
    assert len(lines) == 2 * len(records) and all(json.loads(line)["correct"] for line in lines)
    assert "| **overall** | **1.000** |" in capsys.readouterr().out
    (images / f"{records[0]['id']}_0.png").unlink()
    (images / f"{records[0]['id']}_1.png").unlink()
    with pytest.raises(FileNotFoundError, match="1 prompts have no image"):
        main(args)
