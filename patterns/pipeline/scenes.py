"""Digit scenes: parcel-label-like pictures composed from scikit-learn's bundled digits.

Each scene is a 96x96 RGB canvas with a noisy colour gradient and 0-4 handwritten digits
(sklearn's 8x8 ``load_digits``, upscaled to 20-36 px) at random positions, not overlapping,
in an ink colour that contrasts with the background. The ground truth is the tight box of
each digit's ink and its label.

The 1,797 source digits are split once, by a fixed permutation, into 80% for training and
20% held out: held-out scenes are built only from digit images the models never saw, so the
quality figures measure reading new handwriting, not remembering it.

Everything is deterministic: a scene is a pure function of (split, index), seeded through
hashlib (never ``hash()``, which is salted per process).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

import numpy as np

Split = Literal["train", "heldout"]
CANVAS = 96  # pixels; the model input size too
MAX_DIGITS = 4  # digits per scene; the scene classifier counts 0..MAX_DIGITS
MIN_DIGIT_PX, MAX_DIGIT_PX = 20, 36
HELDOUT_FRACTION = 0.2


def seed_for(*parts: object) -> int:
    """A stable 64-bit seed from any labels (same in every process and on every machine)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)  # (1797, 8, 8) ink in [0, 1]
    labels = data.target.astype(np.int64)
    order = np.random.default_rng(seed_for("pipeline", "digit-split")).permutation(len(labels))
    n_held = round(len(labels) * HELDOUT_FRACTION)
    index = {"heldout": np.sort(order[:n_held]), "train": np.sort(order[n_held:])}
    return images, labels, index


def source_indices(split: Split) -> np.ndarray:
    """Indices into ``load_digits()`` that scenes of ``split`` may use (disjoint splits)."""
    return _digits()[2][split]


@dataclass
class Scene:
    image: np.ndarray  # (CANVAS, CANVAS, 3) uint8
    boxes: np.ndarray  # (n, 4) float32 x1, y1, x2, y2 in pixels, tight around the ink
    labels: np.ndarray  # (n,) int64 digit values
    source_ids: list[int] = field(default_factory=list)  # which load_digits images were used

    @property
    def code(self) -> str:
        """The digits read left to right: what a perfect reader answers."""
        order = np.argsort(self.boxes[:, 0]) if len(self.boxes) else []
        return "".join(str(int(self.labels[i])) for i in order)


def _upscale(glyph: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    img = Image.fromarray((glyph * 255).astype(np.uint8))
    return np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0


def _background(rng: np.random.Generator) -> np.ndarray:
    c0, c1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:CANVAS, 0:CANVAS] / (CANVAS - 1)
    t = np.clip(0.5 + (xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle), 0, 1)[..., None]
    bg = c0 * (1 - t) + c1 * t
    return bg + rng.normal(0, rng.uniform(0.01, 0.08), bg.shape)


def make_scene(split: Split, index: int, n_digits: int | None = None) -> Scene:
    """Scene number ``index`` of ``split``; the same arguments give the same pixels."""
    images, labels, _ = _digits()
    pool = source_indices(split)
    rng = np.random.default_rng(seed_for("pipeline", "scene", split, index))
    if n_digits is None:
        # Mostly 1-4 digits; a few empty labels so "nothing to read" is learned too.
        n_digits = int(rng.choice(MAX_DIGITS + 1, p=[0.08, 0.23, 0.23, 0.23, 0.23]))
    canvas = _background(rng)
    mean_bg = canvas.mean(axis=(0, 1))
    boxes: list[list[float]] = []
    found: list[int] = []
    ids: list[int] = []
    for _ in range(n_digits):
        for _attempt in range(30):  # rejection sampling: digits must not overlap
            size = int(rng.integers(MIN_DIGIT_PX, MAX_DIGIT_PX + 1))
            x0 = int(rng.integers(0, CANVAS - size + 1))
            y0 = int(rng.integers(0, CANVAS - size + 1))
            if all(
                x0 + size <= b[0] - 1 or x0 >= b[2] + 1 or y0 + size <= b[1] - 1 or y0 >= b[3] + 1
                for b in boxes
            ):
                break
        else:
            continue  # no room left on this canvas
        src = int(rng.choice(pool))
        alpha = _upscale(images[src], size)
        ys, xs = np.nonzero(alpha > 0.25)
        if len(xs) == 0:
            continue
        # Ink: dark on light backgrounds, light on dark ones, with some colour.
        ink = np.where(mean_bg > 0.5, rng.uniform(0, 0.25, 3), rng.uniform(0.75, 1, 3))
        region = canvas[y0 : y0 + size, x0 : x0 + size]
        a = alpha[..., None] * rng.uniform(0.8, 1.0)
        canvas[y0 : y0 + size, x0 : x0 + size] = region * (1 - a) + ink * a
        boxes.append([x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1.0, y0 + ys.max() + 1.0])
        found.append(int(labels[src]))
        ids.append(src)
    image = (np.clip(canvas, 0, 1) * 255).round().astype(np.uint8)
    return Scene(
        image=image,
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        labels=np.asarray(found, dtype=np.int64),
        source_ids=ids,
    )


def scene_png(split: Split, index: int) -> bytes:
    """A scene encoded as PNG bytes: what a client uploads."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(make_scene(split, index).image).save(buf, format="PNG")
    return buf.getvalue()
