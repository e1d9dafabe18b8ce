"""Scene specs and captions for the shapes world (GenEval-lite's training and evaluation data).

A *spec* is a plain, JSON-serialisable dict that says what a scene must contain, never where:

    {"task": "position",
     "objects": [{"shape": "triangle", "color": "blue"}, {"shape": "square", "color": "green"}],
     "relation": "left of"}

``objects`` lists every object the renderer draws, each with a colour even when the task's caption
does not name one (single_object, two_object, counting): the colour is then free, and the scorer
ignores it. Counting specs also carry ``"count"`` (equal to ``len(objects)``); position specs carry
``"relation"``, read as "objects[0] <relation> objects[1]".

Held-out split: the colour x shape pairs in ``HELDOUT_COMBOS`` and the position triples in
``HELDOUT_POSITION_PAIRS`` (plus their converses, which describe the same layout) never occur in
a training spec; every held-out spec contains at least one of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

TASKS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# Mid grey sits at the centre of the RGB cube, so each colour below lies in its own direction from
# it (>= 55 degrees apart; black and white lie on the grey axis): a blurred edge, a blend of a colour
# with the background, then stays on that colour's line and is never mistaken for a third colour.
BACKGROUND: tuple[int, int, int] = (128, 128, 128)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "yellow": (230, 210, 30),
    "green": (40, 180, 40),
    "cyan": (30, 200, 210),
    "blue": (40, 60, 220),
    "purple": (170, 40, 210),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
COUNT_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}

# One held-out colour per shape, each colour used once, so every shape and colour is still seen.
HELDOUT_COMBOS: tuple[tuple[str, str], ...] = (("purple", "triangle"), ("yellow", "circle"), ("cyan", "square"))
# (shape A, relation, shape B), colours free. The converse ("circle below triangle") is held out too.
HELDOUT_POSITION_PAIRS: tuple[tuple[str, str, str], ...] = (
    ("triangle", "above", "circle"),
    ("square", "left of", "triangle"),
)

SPLITS: tuple[str, ...] = ("train", "heldout")
MIN_RESOLUTION = 32

_CONVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
_HELDOUT_TRIPLES = frozenset(
    HELDOUT_POSITION_PAIRS + tuple((b, _CONVERSE[rel], a) for a, rel, b in HELDOUT_POSITION_PAIRS)
)
# Rejection sampling keeps the split rule in one place (``is_heldout``); the rarest case, a
# held-out single object, is accepted with probability 1/8, so this bound is never reached.
_MAX_SPEC_ATTEMPTS = 10_000

_PREFIXES = ("a photo of ", "an image of ", "a picture of ", "a drawing of ", "")
_RELATION_PHRASES = {
    "left of": ("left of", "to the left of", "on the left of"),
    "right of": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}


@dataclass
class ShapesConfig:
    """What to generate. Validated on construction."""

    resolution: int = 32
    """Image side in pixels (square images); at least 32, where the smallest shape is 10 px."""
    task_weights: dict[str, float] = field(default_factory=lambda: {task: 1.0 for task in TASKS})
    """Relative frequency of each task; tasks left out get weight 0. Need not sum to 1."""
    split: str = "train"
    """"train": no held-out combination anywhere; "heldout": at least one in every scene."""
    paraphrase: bool = True
    """Vary the caption wording ("an image of ...", "to the left of"); False gives GenEval's templates."""

    def __post_init__(self) -> None:
        if self.resolution < MIN_RESOLUTION:
            raise ValueError(
                f"resolution={self.resolution} is too small: shapes are unclassifiable below {MIN_RESOLUTION}"
            )
        if self.split not in SPLITS:
            raise ValueError(f"split={self.split!r}: expected one of {SPLITS}")
        unknown = sorted(set(self.task_weights) - set(TASKS))
        if unknown:
            raise ValueError(f"task_weights has unknown tasks {unknown}; valid tasks are {TASKS}")
        weights = [self.task_weights.get(task, 0.0) for task in TASKS]
        if min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"task_weights must be >= 0 with a positive sum, got {self.task_weights}")

    def task_probabilities(self) -> np.ndarray:
        """Probability of each task in ``TASKS`` order."""
        weights = np.array([self.task_weights.get(task, 0.0) for task in TASKS], dtype=np.float64)
        return weights / weights.sum()


def _random_object(rng: np.random.Generator, shape: str | None = None) -> dict:
    colors = list(COLORS)
    return {
        "shape": shape if shape is not None else SHAPES[rng.integers(len(SHAPES))],
        "color": colors[rng.integers(len(colors))],
    }


def _two_distinct_shapes(rng: np.random.Generator) -> tuple[str, str]:
    first, second = rng.choice(len(SHAPES), size=2, replace=False)
    return SHAPES[first], SHAPES[second]


def _sample_task_spec(task: str, rng: np.random.Generator) -> dict:
    """A spec for ``task`` drawn from all combinations, held-out ones included."""
    if task in ("single_object", "colors"):
        return {"task": task, "objects": [_random_object(rng)]}
    if task == "two_object":
        shape_a, shape_b = _two_distinct_shapes(rng)
        return {"task": task, "objects": [_random_object(rng, shape_a), _random_object(rng, shape_b)]}
    if task == "counting":
        count = int(rng.integers(1, len(COUNT_WORDS) + 1))
        shape = SHAPES[rng.integers(len(SHAPES))]
        return {"task": task, "objects": [_random_object(rng, shape) for _ in range(count)], "count": count}
    if task == "position":
        object_a = _random_object(rng)
        object_b = _random_object(rng)
        while object_b == object_a:  # two identical objects would make the relation unscoreable
            object_b = _random_object(rng)
        relation = RELATIONS[rng.integers(len(RELATIONS))]
        return {"task": task, "objects": [object_a, object_b], "relation": relation}
    if task == "color_attr":
        # As in GenEval: two different classes in two different colours.
        shape_a, shape_b = _two_distinct_shapes(rng)
        color_a, color_b = rng.choice(list(COLORS), size=2, replace=False)
        objects = [{"shape": shape_a, "color": str(color_a)}, {"shape": shape_b, "color": str(color_b)}]
        return {"task": task, "objects": objects}
    raise ValueError(f"unknown task {task!r}; valid tasks are {TASKS}")


def is_heldout(spec: dict) -> bool:
    """Whether ``spec`` contains a held-out colour x shape pair or a held-out position triple."""
    if any((obj["color"], obj["shape"]) in HELDOUT_COMBOS for obj in spec["objects"]):
        return True
    if spec["task"] == "position":
        object_a, object_b = spec["objects"]
        return (object_a["shape"], spec["relation"], object_b["shape"]) in _HELDOUT_TRIPLES
    return False


def sample_spec(rng: np.random.Generator, cfg: ShapesConfig) -> dict:
    """A random scene spec for ``cfg.split``, its task drawn from ``cfg.task_weights``."""
    task = TASKS[rng.choice(len(TASKS), p=cfg.task_probabilities())]
    want_heldout = cfg.split == "heldout"
    for _ in range(_MAX_SPEC_ATTEMPTS):
        spec = _sample_task_spec(task, rng)
        if is_heldout(spec) == want_heldout:
            return spec
    raise RuntimeError(
        f"no {cfg.split} spec for task {task!r} after {_MAX_SPEC_ATTEMPTS} draws; check the held-out constants"
    )


def _with_article(noun_phrase: str) -> str:
    return ("an " if noun_phrase[0] in "aeiou" else "a ") + noun_phrase


def _plural(shape: str) -> str:
    return shape + "s"  # true for every shape in SHAPES


def caption_for(spec: dict, rng: np.random.Generator | None = None) -> str:
    """GenEval's template caption for ``spec``; with ``rng``, a randomly paraphrased variant.

    Templates: "a photo of a circle", "a photo of a circle and a square", "a photo of three
    triangles", "a photo of a red circle", "a photo of a blue triangle left of a green square",
    "a photo of a red circle and a blue square".
    """
    task, objects = spec["task"], spec["objects"]
    relation = spec.get("relation")
    if rng is not None:
        prefix = _PREFIXES[rng.integers(len(_PREFIXES))]
        if relation is not None:
            phrases = _RELATION_PHRASES[relation]
            relation = phrases[rng.integers(len(phrases))]
    else:
        prefix = _PREFIXES[0]

    def colored(obj: dict) -> str:
        return _with_article(f"{obj['color']} {obj['shape']}")

    if task == "single_object":
        body = _with_article(objects[0]["shape"])
    elif task == "two_object":
        body = f"{_with_article(objects[0]['shape'])} and {_with_article(objects[1]['shape'])}"
    elif task == "counting":
        count, shape = spec["count"], objects[0]["shape"]
        body = f"{COUNT_WORDS[count]} {shape if count == 1 else _plural(shape)}"
    elif task == "colors":
        body = colored(objects[0])
    elif task == "position":
        body = f"{colored(objects[0])} {relation} {colored(objects[1])}"
    elif task == "color_attr":
        body = f"{colored(objects[0])} and {colored(objects[1])}"
    else:
        raise ValueError(f"unknown task {task!r} in spec; valid tasks are {TASKS}")
    return prefix + body


def spec_to_json(spec: dict) -> str:
    """Canonical JSON text of a spec (sorted keys), e.g. for a Parquet string column."""
    return json.dumps(spec, sort_keys=True, separators=(",", ":"))


def spec_from_json(text: str) -> dict:
    """Inverse of ``spec_to_json``."""
    return json.loads(text)
