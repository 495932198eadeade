"""Datasets: what a data store describes (classes, splits, image labels) and how it is read.

Ingest (``weakseg.datasets.ingest``) writes ``data.zarr`` (images + image-level labels) and
``gt.zarr`` (masks, evaluation only). Training-side stages read ``DatasetInfo`` and images only.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from weakseg import store
from weakseg.labels import IGNORE  # noqa: F401  (re-exported: the datasets' masks use it)


@dataclass(frozen=True)
class DatasetInfo:
    """Class list, background convention, splits and image-level labels of an ingested dataset."""

    class_names: tuple[str, ...]
    has_background: bool
    ids: tuple[str, ...]
    splits: dict
    labels: np.ndarray  # (N, C) uint8, rows in ``ids`` order

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def fg_classes(self) -> np.ndarray:
        """Class indices a classifier predicts: all classes but the background (index 0) if any."""
        return np.arange(1 if self.has_background else 0, self.n_classes)

    def split(self, name: str) -> list[str]:
        if name not in self.splits:
            raise KeyError(f"split '{name}' not in the data store (has: {', '.join(self.splits)})")
        return list(self.splits[name])

    def image_labels(self, image_id: str) -> np.ndarray:
        """Indices of the classes present in an image (background included when the dataset has one)."""
        return np.flatnonzero(self.labels[self._row[image_id]])

    def label_vector(self, image_id: str) -> np.ndarray:
        return self.labels[self._row[image_id]]

    @cached_property
    def _row(self) -> dict:
        return {i: r for r, i in enumerate(self.ids)}

    @classmethod
    def from_store(cls, group) -> DatasetInfo:
        a = group.attrs
        return cls(
            tuple(a["class_names"]),
            bool(a["has_background"]),
            tuple(a["ids"]),
            dict(a["splits"]),
            group["labels"][...],
        )


def open_data(path: str | Path):
    """Open ``data.zarr``: returns (DatasetInfo, group) — images via ``store.get(group, IMAGES, id)``."""
    group = store.open_store(path, "data")
    return DatasetInfo.from_store(group), group


def read_image(group, image_id: str) -> np.ndarray:
    return store.get(group, store.IMAGES, image_id)
