"""A deterministic synthetic multi-label dataset: textured objects on cluttered, textured backgrounds.

It is the embedded default that runs on a fresh machine in minutes, and it is built so that every
stage of the pipeline has something to do:

* Each foreground class has its own **appearance statistics**: a saturated base colour (jittered per
  object), a texture family with a class-specific period and orientation, and a shape family with a
  class-specific size and aspect range. A classifier must use colour and texture together.
* The background (class 0 with ``has_background``) is **cluttered**: low-frequency colour noise in
  muted tones with desaturated clutter shapes of the same shape families as the objects, so shape
  alone never tells an object, and a CAM spills onto clutter that the CRF's colour kernel can undo.
* Several objects per image, drawn in random order, so later objects **occlude** earlier ones; an
  object that ends up (almost) hidden is taken out of the mask, so image labels stay exact.
* Without a background class the scene is split by a wavy horizon into two "stuff" classes, sky and
  ground (MSRC style), so every pixel has a real class.

The output is a VOC-style folder that the ordinary folder ingest reads; labels come from its masks.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import cv2
import numpy as np

from weakseg.commands import Command, required

FG_NAMES = ("apple", "brick", "cloth", "disc", "eel", "fern", "grid", "honey", "ice", "jade", "kelp", "lime")
# Saturated RGB base colours, one per class; the background never uses saturated colours.
FG_COLOURS = tuple(
    tuple(bytes.fromhex(rgb))
    for rgb in "d72323 2846d7 e6c81e 23aa3c c828c8 1ebec8 f07814 7828c8 8cdc28 146e82 c81e6e 6e4614".split()
)
SHAPES = ("ellipse", "rectangle", "triangle", "star", "cross")
MIN_VISIBLE = 0.35  # an object keeping less than this fraction of its pixels after occlusion is removed


def class_names(n_fg: int, has_background: bool) -> list[str]:
    stuff = ["background"] if has_background else ["sky", "ground"]
    return stuff + list(FG_NAMES[:n_fg])


def _texture(kind: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A [0, 1] pattern: the class fixes the family, period and orientation; the phase and a little
    of the orientation vary per object."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period = 5.0 + 1.5 * (kind % 3)
    angle = np.deg2rad(37.0 * kind + rng.normal(0, 6))
    u = xx * np.cos(angle) + yy * np.sin(angle) + rng.uniform(0, period)
    v = -xx * np.sin(angle) + yy * np.cos(angle) + rng.uniform(0, period)
    family = kind % 4
    if family == 0:  # stripes
        t = 0.5 + 0.5 * np.sin(2 * np.pi * u / period)
    elif family == 1:  # checks
        t = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    elif family == 2:  # dots
        t = ((np.sin(2 * np.pi * u / period) * np.sin(2 * np.pi * v / period)) > 0.25).astype(np.float32)
    else:  # rings around a random centre
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        t = 0.5 + 0.5 * np.sin(np.hypot(xx - cx, yy - cy) * 2 * np.pi / period)
    return np.clip(t + rng.normal(0, 0.08, (h, w)).astype(np.float32), 0, 1)


def _shape_mask(
    h: int, w: int, shape: str, scale: float, aspect: float, rng: np.random.Generator
) -> np.ndarray:
    """A filled shape at a random place; ``scale`` is its radius as a fraction of the smaller side."""
    mask = np.zeros((h, w), np.uint8)
    r = scale * min(h, w)
    ry, rx = r * np.sqrt(aspect), r / np.sqrt(aspect)
    cy, cx = rng.uniform(ry * 0.6, h - ry * 0.6), rng.uniform(rx * 0.6, w - rx * 0.6)
    angle = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])

    def polygon(points):
        pts = (np.asarray(points) * [rx, ry]) @ rot.T + [cx, cy]
        cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)

    if shape == "ellipse":
        cv2.ellipse(
            mask,
            (int(cx), int(cy)),
            (max(1, int(rx)), max(1, int(ry))),
            float(np.rad2deg(angle)),
            0,
            360,
            1,
            -1,
        )
    elif shape == "rectangle":
        polygon([[-1, -1], [1, -1], [1, 1], [-1, 1]])
    elif shape == "triangle":
        polygon([[0, -1.2], [1.1, 0.8], [-1.1, 0.8]])
    elif shape == "star":
        t = np.arange(10) * np.pi / 5
        radius = np.where(np.arange(10) % 2 == 0, 1.2, 0.5)
        polygon(np.stack([radius * np.sin(t), -radius * np.cos(t)], axis=1))
    else:  # cross
        polygon([[-1, -0.35], [1, -0.35], [1, 0.35], [-1, 0.35]])
        polygon([[-0.35, -1], [0.35, -1], [0.35, 1], [-0.35, 1]])
    return mask.astype(bool)


def _class_shape(cls: int, rng: np.random.Generator) -> tuple[str, float, float]:
    """The class's shape family, and a size and aspect drawn from its class-specific ranges."""
    shape = SHAPES[cls % len(SHAPES)]
    scale = rng.uniform(0.16, 0.28) * (1.0 + 0.15 * ((cls // len(SHAPES)) % 2))
    aspect = rng.uniform(0.7, 1.4) * (1.5 if cls % 3 == 1 else 1.0)
    return shape, scale, aspect


def _smooth_noise(h: int, w: int, cells: int, rng: np.random.Generator) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid resized smoothly."""
    grid = rng.uniform(0, 1, (cells, max(2, round(cells * w / h)))).astype(np.float32)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC).clip(0, 1)


def _cluttered_background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Muted, textured background with desaturated clutter shapes (RGB float32)."""
    tones = np.array([[120, 115, 105], [95, 100, 95], [140, 130, 115], [105, 100, 110]], np.float32)
    a, b = tones[rng.choice(len(tones), 2, replace=False)]
    mix = _smooth_noise(h, w, 4, rng)[..., None]
    image = a * (1 - mix) + b * mix
    image *= (0.85 + 0.3 * _smooth_noise(h, w, 12, rng))[..., None]
    for _ in range(int(rng.integers(2, 6))):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        clutter = _shape_mask(h, w, shape, rng.uniform(0.06, 0.16), rng.uniform(0.6, 1.6), rng)
        grey = rng.uniform(60, 170)
        tint = grey + rng.normal(0, 8, 3)
        image[clutter] = (tint * (0.8 + 0.3 * _texture(int(rng.integers(12)), h, w, rng))[..., None])[clutter]
    return image


def _stuff_background(h: int, w: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Sky above a wavy horizon, ground below (RGB float32, mask 0 = sky, 1 = ground)."""
    horizon = rng.uniform(-0.2, 1.0) * h + 6 * np.sin(np.arange(w) / rng.uniform(8, 20))
    ground = np.arange(h)[:, None] > horizon[None, :]
    sky = np.array([120, 170, 230], np.float32) * (0.85 + 0.15 * _smooth_noise(h, w, 5, rng))[..., None]
    soil = np.array([110, 90, 60], np.float32) * (0.6 + 0.4 * _texture(5, h, w, rng))[..., None]
    return np.where(ground[..., None], soil, sky), ground.astype(np.uint8)


def make_image(
    index: int, seed: int, height: int, width: int, n_fg: int, max_objects: int, has_background: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Return (RGB uint8 image, uint8 class mask) for one image; deterministic in (seed, index)."""
    rng = np.random.default_rng([seed, index])
    n_stuff = 1 if has_background else 2
    if has_background:
        image, mask = _cluttered_background(height, width, rng), np.zeros((height, width), np.uint8)
    else:
        image, mask = _stuff_background(height, width, rng)
    base_image, base_mask = image.copy(), mask.copy()
    n_objects = int(rng.integers(1, max_objects + 1))
    drawn: list[tuple[int, np.ndarray]] = []
    for cls in rng.choice(n_fg, size=n_objects, replace=n_objects > n_fg):
        cls = int(cls)
        obj = _shape_mask(height, width, *_class_shape(cls, rng), rng)
        colour = np.array(FG_COLOURS[cls], np.float32) * rng.uniform(0.8, 1.1)
        tex = _texture(cls + 1, height, width, rng)[..., None]
        image[obj] = (colour * (0.5 + 0.5 * tex))[obj]
        mask[obj] = n_stuff + cls
        drawn.append((n_stuff + cls, obj))
    # Occlusion: an object mostly hidden by later ones is removed, sliver included, so that no image
    # label rests on a few stray pixels.
    for value, obj in drawn:
        visible = obj & (mask == value)
        if visible.any() and visible.sum() < MIN_VISIBLE * obj.sum():
            image[visible], mask[visible] = base_image[visible], base_mask[visible]
    image = cv2.GaussianBlur(image, (3, 3), 0.7) + rng.normal(0, 4, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8), mask


def write_folder(params: dict, has_background: bool, out_dir: str | os.PathLike) -> Path:
    """Write the synthetic dataset as a VOC-style folder (PNG images and index masks)."""
    from weakseg.palette import class_palette, save_palette_png
    from weakseg.store import replace_path

    final = Path(out_dir)
    out = final.with_name(final.name + ".tmp-synth")  # written aside, moved into place when complete
    shutil.rmtree(out, ignore_errors=True)
    (out / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (out / "SegmentationClass").mkdir(parents=True, exist_ok=True)
    names = class_names(params["n_classes"], has_background)
    splits = {"train": params["n_train"], "val": params["n_val"]}
    index = 0
    for split, count in splits.items():
        ids = []
        for _ in range(count):
            image_id = f"syn_{index:05d}"
            image, mask = make_image(
                index,
                params["seed"],
                params["height"],
                params["width"],
                params["n_classes"],
                params["max_objects"],
                has_background,
            )
            cv2.imwrite(str(out / "JPEGImages" / f"{image_id}.png"), image[..., ::-1])
            save_palette_png(out / "SegmentationClass" / f"{image_id}.png", mask, class_palette(len(names)))
            ids.append(image_id)
            index += 1
        (out / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (out / "classes.txt").write_text("\n".join(names) + "\n")
    (out / "README.md").write_text(
        "Synthetic weakseg dataset, generated by `weakseg synth`; see weakseg.datasets.synthetic.\n"
    )
    replace_path(out, final)
    return final


def run_synth(config: dict, out_dir) -> Path:
    return write_folder(config["dataset"]["synthetic"], config["dataset"]["has_background"], out_dir)


COMMAND = Command(
    "synth",
    "write the deterministic synthetic dataset as a VOC-style folder",
    run_synth,
    (required("--out", "out_dir", "output folder"),),
    sections=("dataset",),
    writes=("out_dir",),
)
