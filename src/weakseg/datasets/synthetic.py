"""A deterministic synthetic multi-label dataset: textured objects on textured backgrounds.

It is the embedded default that runs on a fresh machine in minutes. Each foreground class has its
own colour and texture (stripes of an orientation, checks, dots, ...) and appears as blobs,
rectangles or triangles; several classes share an image. With ``has_background`` class 0 is a
noisy grey background (VOC style); without it the background is split by a wavy horizon into two
"stuff" classes, sky and ground (MSRC style), so every pixel has a real class.

The output is a VOC-style folder that the ordinary folder ingest reads.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import cv2
import numpy as np

FG_NAMES = ("apple", "brick", "cloth", "disc", "eel", "fern", "grid", "honey", "ice", "jade", "kelp", "lime")
# RGB base colours; textures (below) keep classes apart even where colours are close.
FG_COLOURS = ((200, 40, 40), (170, 90, 50), (60, 60, 200), (230, 200, 40), (40, 160, 160), (40, 150, 40),
              (200, 200, 200), (220, 140, 20), (150, 210, 240), (20, 110, 70), (90, 60, 110), (160, 220, 60))


def class_names(n_fg: int, has_background: bool) -> list[str]:
    stuff = ["background"] if has_background else ["sky", "ground"]
    return stuff + list(FG_NAMES[:n_fg])


def _texture(kind: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A [0, 1] pattern; the kind fixes the pattern family and orientation of a class."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period = 6.0 + (kind % 3) * 2
    family = kind % 4
    if family == 0:  # stripes at a class-specific angle
        angle = np.deg2rad(30 * kind)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
    elif family == 1:  # checks
        t = ((xx // (period / 2) + yy // (period / 2)) % 2).astype(np.float32)
    elif family == 2:  # dots
        t = ((np.sin(2 * np.pi * xx / period) * np.sin(2 * np.pi * yy / period)) > 0.3).astype(np.float32)
    else:  # rings
        t = 0.5 + 0.5 * np.sin(np.hypot(xx - w / 2, yy - h / 2) * 2 * np.pi / period)
    return np.clip(t + rng.normal(0, 0.08, (h, w)).astype(np.float32), 0, 1)


def _shape_mask(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
    ry, rx = rng.uniform(0.12, 0.3) * h, rng.uniform(0.12, 0.3) * w
    shape = rng.integers(3)
    if shape == 0:
        cv2.ellipse(mask, (int(cx), int(cy)), (int(rx), int(ry)), float(rng.uniform(0, 180)), 0, 360, 1, -1)
    elif shape == 1:
        cv2.rectangle(mask, (int(cx - rx), int(cy - ry)), (int(cx + rx), int(cy + ry)), 1, -1)
    else:
        pts = np.array([[cx, cy - ry], [cx - rx, cy + ry], [cx + rx, cy + ry]], np.int32)
        cv2.fillPoly(mask, [pts], 1)
    return mask.astype(bool)


def make_image(index: int, seed: int, height: int, width: int, n_fg: int, max_objects: int,
               has_background: bool) -> tuple[np.ndarray, np.ndarray]:
    """Return (RGB uint8 image, uint8 class mask) for one image; deterministic in (seed, index)."""
    rng = np.random.default_rng([seed, index])
    n_stuff = 1 if has_background else 2
    image = np.zeros((height, width, 3), np.float32)
    mask = np.zeros((height, width), np.uint8)
    if has_background:
        grey = rng.uniform(90, 140)
        image[:] = grey + rng.normal(0, 18, (height, width, 1))
    else:
        horizon = rng.uniform(-0.2, 1.0) * height + 6 * np.sin(np.arange(width) / rng.uniform(8, 20))
        ground = np.arange(height)[:, None] > horizon[None, :]
        mask[ground] = 1
        sky = np.array([120, 170, 230], np.float32) * (0.85 + 0.15 * _texture(3, height, width, rng))[..., None]
        soil = np.array([110, 90, 60], np.float32) * (0.6 + 0.4 * _texture(5, height, width, rng))[..., None]
        image[:] = np.where(ground[..., None], soil, sky)
    n_objects = int(rng.integers(1, max_objects + 1))
    for cls in rng.choice(n_fg, size=min(n_objects, n_fg), replace=False):
        obj = _shape_mask(height, width, rng)
        colour = np.array(FG_COLOURS[cls], np.float32)
        tex = _texture(int(cls) + 1, height, width, rng)[..., None]
        image[obj] = (colour * (0.45 + 0.55 * tex))[obj]
        mask[obj] = n_stuff + cls
    image = cv2.GaussianBlur(image, (3, 3), 0.7)
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
            image, mask = make_image(index, params["seed"], params["height"], params["width"], params["n_classes"],
                                     params["max_objects"], has_background)
            cv2.imwrite(str(out / "JPEGImages" / f"{image_id}.png"), image[..., ::-1])
            save_palette_png(out / "SegmentationClass" / f"{image_id}.png", mask, class_palette(len(names)))
            ids.append(image_id)
            index += 1
        (out / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (out / "classes.txt").write_text("\n".join(names) + "\n")
    (out / "README.md").write_text("Synthetic weakseg dataset, generated by `weakseg synth`; see "
                                   "weakseg.datasets.synthetic.\n")
    replace_path(out, final)
    return final
