"""The shapes world: determinism, resolutions, task mix, held-out split, captions."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from selfe.data.shapes import (
    BACKGROUND,
    COLORS,
    HELDOUT_COMBOS,
    HELDOUT_POSITION_PAIRS,
    SHAPES,
    TASKS,
    ShapesConfig,
    caption_for,
    generate,
    generate_one,
    is_heldout,
    render,
    sample_spec,
    spec_from_json,
    spec_to_json,
)

_CONVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
_HELDOUT_TRIPLES = set(HELDOUT_POSITION_PAIRS) | {(b, _CONVERSE[r], a) for a, r, b in HELDOUT_POSITION_PAIRS}


def _specs(n: int, cfg: ShapesConfig, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [sample_spec(rng, cfg) for _ in range(n)]


def _contains_heldout(spec: dict) -> bool:
    """Independent of ``is_heldout``: spelled out from the module constants."""
    objects = spec["objects"]
    if any((o["color"], o["shape"]) in set(HELDOUT_COMBOS) for o in objects):
        return True
    if spec["task"] != "position":
        return False
    return (objects[0]["shape"], spec["relation"], objects[1]["shape"]) in _HELDOUT_TRIPLES


def test_generate_is_deterministic_by_seed() -> None:
    cfg = ShapesConfig()
    first, again, other = (list(generate(8, seed, cfg)) for seed in (3, 3, 4))
    for (im_a, cap_a, spec_a), (im_b, cap_b, spec_b) in zip(first, again):
        assert np.array_equal(im_a, im_b) and cap_a == cap_b and spec_a == spec_b
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(first, other))


def test_generate_one_matches_stream() -> None:
    cfg = ShapesConfig(resolution=64)
    stream = list(generate(12, 7, cfg))
    for index in (0, 5, 11):
        image, caption, spec = generate_one(index, 7, cfg)
        assert np.array_equal(image, stream[index][0])
        assert (caption, spec) == stream[index][1:]


def test_paraphrase_changes_only_the_caption() -> None:
    plain, varied = ShapesConfig(paraphrase=False), ShapesConfig(paraphrase=True)
    for index in range(20):
        image_p, caption_p, spec_p = generate_one(index, 1, plain)
        image_v, _, spec_v = generate_one(index, 1, varied)
        assert spec_p == spec_v and np.array_equal(image_p, image_v)
        assert caption_p == caption_for(spec_p)


@pytest.mark.parametrize("resolution", [32, 64, 128])
def test_render_obeys_spec_at_each_resolution(resolution: int) -> None:
    def packed(rgb: tuple[int, int, int]) -> int:
        return (rgb[0] << 16) | (rgb[1] << 8) | rgb[2]

    palette = {packed(c) for c in COLORS.values()} | {packed(BACKGROUND)}
    for index, (image, _, spec) in enumerate(generate(40, 11, ShapesConfig(resolution=resolution))):
        assert image.shape == (resolution, resolution, 3) and image.dtype == np.uint8
        pixels = image.reshape(-1, 3).astype(np.int64)
        present = set(np.unique((pixels[:, 0] << 16) | (pixels[:, 1] << 8) | pixels[:, 2]).tolist())
        assert present <= palette, f"sample {index}: colours outside the palette"
        assert {packed(COLORS[o["color"]]) for o in spec["objects"]} <= present
        # Flat colours, no overlap: each object's colour covers at least the smallest shape's area.
        for color, n in Counter(o["color"] for o in spec["objects"]).items():
            area = np.all(image == COLORS[color], axis=-1).sum()
            assert area >= n * 0.03 * resolution**2, f"sample {index}: {color} covers only {area} px"
        # The border margin stays clear.
        assert np.all(image[0] == BACKGROUND) and np.all(image[:, -1] == BACKGROUND)


def test_render_rejects_tiny_resolution() -> None:
    spec = {"task": "colors", "objects": [{"shape": "circle", "color": "red"}]}
    with pytest.raises(ValueError, match="too small"):
        render(spec, 16, np.random.default_rng(0))


@pytest.mark.parametrize("task", TASKS)
def test_task_weights_select_a_single_task(task: str) -> None:
    specs = _specs(200, ShapesConfig(task_weights={task: 1.0}))
    assert {s["task"] for s in specs} == {task}


def test_task_weights_set_the_mix() -> None:
    specs = _specs(4000, ShapesConfig(task_weights={"colors": 3.0, "position": 1.0}))
    share = Counter(s["task"] for s in specs)["colors"] / len(specs)
    assert abs(share - 0.75) < 0.03


def test_default_mix_covers_every_task_and_count() -> None:
    specs = _specs(3000, ShapesConfig())
    tasks = Counter(s["task"] for s in specs)
    assert set(tasks) == set(TASKS) and min(tasks.values()) > 350
    counts = {s["count"] for s in specs if s["task"] == "counting"}
    assert counts == {1, 2, 3, 4}


def test_train_never_contains_heldout_combinations() -> None:
    specs = _specs(6000, ShapesConfig(split="train"))
    assert not any(_contains_heldout(s) for s in specs)
    assert not any(is_heldout(s) for s in specs)
    captions = [caption_for(s, np.random.default_rng(i)) for i, s in enumerate(specs)]
    for color, shape in HELDOUT_COMBOS:
        assert not any(f"{color} {shape}" in c for c in captions)
    # Only the held-out pairs are missing: every other colour x shape pair occurs in training.
    seen = Counter((o["color"], o["shape"]) for s in specs for o in s["objects"])
    assert len(seen) == len(COLORS) * len(SHAPES) - len(HELDOUT_COMBOS)


def test_heldout_always_contains_a_heldout_combination() -> None:
    specs = _specs(1500, ShapesConfig(split="heldout"))
    assert all(_contains_heldout(s) for s in specs)
    assert {s["task"] for s in specs} == set(TASKS)
    positions = [s for s in specs if s["task"] == "position"]
    triples = {(s["objects"][0]["shape"], s["relation"], s["objects"][1]["shape"]) for s in positions}
    assert triples & _HELDOUT_TRIPLES == _HELDOUT_TRIPLES  # every held-out relation and its converse


@pytest.mark.parametrize(
    "spec, caption",
    [
        ({"task": "single_object", "objects": [{"shape": "circle", "color": "red"}]}, "a photo of a circle"),
        (
            {
                "task": "two_object",
                "objects": [{"shape": "circle", "color": "red"}, {"shape": "square", "color": "blue"}],
            },
            "a photo of a circle and a square",
        ),
        (
            {"task": "counting", "objects": [{"shape": "triangle", "color": "red"}] * 3, "count": 3},
            "a photo of three triangles",
        ),
        ({"task": "counting", "objects": [{"shape": "square", "color": "red"}], "count": 1}, "a photo of one square"),
        ({"task": "colors", "objects": [{"shape": "circle", "color": "red"}]}, "a photo of a red circle"),
        (
            {
                "task": "position",
                "objects": [{"shape": "triangle", "color": "blue"}, {"shape": "square", "color": "green"}],
                "relation": "left of",
            },
            "a photo of a blue triangle left of a green square",
        ),
        (
            {
                "task": "color_attr",
                "objects": [{"shape": "circle", "color": "red"}, {"shape": "square", "color": "blue"}],
            },
            "a photo of a red circle and a blue square",
        ),
    ],
)
def test_caption_templates_follow_geneval(spec: dict, caption: str) -> None:
    assert caption_for(spec) == caption


def test_paraphrases_vary_but_keep_the_content() -> None:
    spec = {
        "task": "position",
        "objects": [{"shape": "triangle", "color": "blue"}, {"shape": "square", "color": "green"}],
        "relation": "left of",
    }
    rng = np.random.default_rng(0)
    captions = {caption_for(spec, rng) for _ in range(60)}
    assert len(captions) >= 6
    assert all("blue triangle" in c and "green square" in c and "left of" in c for c in captions)


def test_spec_json_round_trip() -> None:
    for _, _, spec in generate(20, 5, ShapesConfig()):
        text = spec_to_json(spec)
        assert json.loads(text) == spec and spec_from_json(text) == spec


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"resolution": 16}, "too small"),
        ({"split": "test"}, "split"),
        ({"task_weights": {"counting": 1.0, "colour": 1.0}}, "unknown tasks"),
        ({"task_weights": {"counting": 0.0}}, "positive sum"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ShapesConfig(**kwargs)
