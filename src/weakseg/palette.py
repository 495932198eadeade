"""Colour palettes for label maps and writing palette PNGs (pixel value = class index)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from weakseg.labels import IGNORE


def class_palette(n_classes: int) -> np.ndarray:
    """The (256, 3) uint8 PASCAL VOC colour map: colour i interleaves the bits of i over R, G, B.

    Entries 0..n_classes-1 get their VOC colour, unused entries are black, and 255 (ignore) is white so
    that unlabelled pixels stand out. Using the VOC map keeps our PNGs identical in look to VOC-style
    ground truth (MSRC-21 ships with the same map).
    """
    if not 1 <= n_classes <= IGNORE:
        raise ValueError(f"class_palette: n_classes must be in 1..{IGNORE}, got {n_classes}")
    index = np.arange(256)
    colours = np.zeros((256, 3), dtype=np.int64)
    for bit in range(8):  # bit 3*b+k of the index becomes bit 7-b of channel k
        for channel in range(3):
            colours[:, channel] |= ((index >> (3 * bit + channel)) & 1) << (7 - bit)
    colours[n_classes:] = 0
    colours[IGNORE] = 255
    return colours.astype(np.uint8)


def save_palette_png(path: str | os.PathLike, labels: np.ndarray, palette: np.ndarray) -> Path:
    """Write a (H, W) uint8 label map as a palette ('P' mode) PNG whose pixel values are the labels."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.dtype != np.uint8:
        raise ValueError(f"{path}: expected a (H, W) uint8 label map, got {labels.dtype} {labels.shape}")
    palette = np.asarray(palette)
    if palette.shape != (256, 3) or palette.dtype != np.uint8:
        raise ValueError(f"{path}: expected a (256, 3) uint8 palette, got {palette.dtype} {palette.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = labels.shape
    image = Image.frombytes("P", (width, height), np.ascontiguousarray(labels).tobytes())
    image.putpalette(palette.reshape(-1).tolist())
    image.save(path, format="PNG")
    return path
