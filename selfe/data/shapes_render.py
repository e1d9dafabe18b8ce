"""Rasterise a shapes-world spec: flat colours, no anti-aliasing, random non-overlapping layout.

Every length is a fraction of the resolution, so a scene at 64 or 128 px is the 32 px scene scaled.
Shapes fill a ``size`` x ``size`` box: a disc, a full square, or an apex-up isosceles triangle
(base = height = size). Layouts keep a gap between boxes so that blur or JPEG cannot merge two
same-coloured objects, and a position layout clears GenEval's dead zone with room to spare.
"""

from __future__ import annotations

import numpy as np

from selfe.data.shapes_spec import BACKGROUND, COLORS, MIN_RESOLUTION

# Object side as a fraction of the resolution, by number of objects: smaller when crowded, never
# below 0.31 (10 px at 32): smaller circles and squares differ by too few corner pixels to be told
# apart once JPEG has smeared their edges.
_SIZE_FRACTIONS = {1: (0.34, 0.44), 2: (0.31, 0.38), 3: (0.31, 0.34), 4: (0.31, 0.34)}
_GAP_FRACTION = 0.10  # empty pixels between two boxes
_BORDER_FRACTION = 0.04  # empty pixels between a box and the image edge
# Position layouts: A's centre is at least this far (fraction of resolution) from B's along the
# relation's axis, with the cross-axis offset at most _MAX_CROSS_RATIO of it. Scored by GenEval's
# rule, the normalised offset is then >= 0.69 along the axis, against its 0.5 threshold.
_MIN_AXIS_OFFSET = 0.30
_MAX_CROSS_RATIO = 0.40
_MAX_LAYOUT_ATTEMPTS = 1_000
_PLACEMENT_TRIES = 20  # candidate boxes per object in one layout attempt

Box = tuple[int, int, int]  # (left x, top y, size)


def _size_range(num_objects: int, resolution: int) -> tuple[int, int]:
    if num_objects not in _SIZE_FRACTIONS:
        raise ValueError(f"cannot lay out {num_objects} objects; supported counts are {sorted(_SIZE_FRACTIONS)}")
    low, high = _SIZE_FRACTIONS[num_objects]
    return round(low * resolution), round(high * resolution)


def _separated(box_a: Box, box_b: Box, gap: int) -> bool:
    (xa, ya, sa), (xb, yb, sb) = box_a, box_b
    return xa + sa + gap <= xb or xb + sb + gap <= xa or ya + sa + gap <= yb or yb + sb + gap <= ya


def _relation_clear(box_a: Box, box_b: Box, relation: str, resolution: int) -> bool:
    """Whether A <relation> B holds by a wide margin (centres compared, y grows downwards)."""
    (xa, ya, sa), (xb, yb, sb) = box_a, box_b
    dx = (xa + sa / 2) - (xb + sb / 2)
    dy = (ya + sa / 2) - (yb + sb / 2)
    along, across = {"left of": (-dx, dy), "right of": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[relation]
    return along >= _MIN_AXIS_OFFSET * resolution and abs(across) <= _MAX_CROSS_RATIO * along


def _layout(num_objects: int, resolution: int, relation: str | None, rng: np.random.Generator) -> list[Box]:
    """Random boxes, pairwise separated; with ``relation``, box 0 <relation> box 1 clearly holds."""
    low, high = _size_range(num_objects, resolution)
    gap = max(2, round(_GAP_FRACTION * resolution))
    border = max(1, round(_BORDER_FRACTION * resolution))
    num_candidates = _PLACEMENT_TRIES * num_objects
    for _ in range(_MAX_LAYOUT_ATTEMPTS):
        # Place objects one at a time from a batch of candidate boxes (drawn at once: numpy calls
        # dominate the cost), starting over only when the batch runs out.
        sizes = rng.integers(low, high + 1, size=num_candidates)
        free_span = resolution - 2 * border - sizes + 1  # positions where the box fits
        corners = border + (rng.random((num_candidates, 2)) * free_span[:, None]).astype(int)
        boxes: list[Box] = []
        for size, (x, y) in zip(sizes.tolist(), corners.tolist()):
            box = (x, y, size)
            if not all(_separated(box, other, gap) for other in boxes):
                continue
            if relation is not None and len(boxes) == 1 and not _relation_clear(boxes[0], box, relation, resolution):
                continue
            boxes.append(box)
            if len(boxes) == num_objects:
                return boxes
    raise RuntimeError(f"no layout for {num_objects} objects at {resolution} px after {_MAX_LAYOUT_ATTEMPTS} tries")


def _shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean ``size`` x ``size`` mask, sampled at pixel centres."""
    centres = np.arange(size) + 0.5
    ys, xs = np.meshgrid(centres, centres, indexing="ij")
    half = size / 2
    if shape == "circle":
        return (xs - half) ** 2 + (ys - half) ** 2 <= half**2
    if shape == "square":
        return np.ones((size, size), dtype=bool)
    if shape == "triangle":
        # Apex at the top centre; the half-width grows linearly to size / 2 at the bottom edge.
        # Measured at each row's lower edge so that the apex row is never empty.
        return np.abs(xs - half) <= (ys + 0.5) / 2
    raise ValueError(f"unknown shape {shape!r}")


def render(spec: dict, resolution: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``spec`` at ``resolution`` x ``resolution``; returns an (H, W, 3) uint8 image.

    Placement and sizes are drawn from ``rng``; the spec (shapes, colours, count, relation) is obeyed.
    """
    if resolution < MIN_RESOLUTION:
        raise ValueError(f"resolution={resolution} is too small: shapes are unclassifiable below {MIN_RESOLUTION}")
    objects = spec["objects"]
    boxes = _layout(len(objects), resolution, spec.get("relation"), rng)
    image = np.empty((resolution, resolution, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for obj, (x, y, size) in zip(objects, boxes):
        if obj["color"] not in COLORS:
            raise ValueError(f"unknown colour {obj['color']!r}; the palette is {list(COLORS)}")
        window = image[y : y + size, x : x + size]
        window[_shape_mask(obj["shape"], size)] = COLORS[obj["color"]]
    return image
