"""Class mapping of a folder dataset: merge classes into a background class 0, drop or rename classes.

A mapping turns the class list of ``classes.txt`` into the class list the run uses, and gives a
lookup table (original index -> new index, 255 = ignore) that masks and image labels both go through,
so that they can never disagree. Evaluation then scores the mapped classes.

``dataset.class_mapping`` (all keys optional):

    background: [building, grass, ...]   classes merged into the background class 0
    background_name: background          the name of that class
    drop: [void_like, ...]                classes whose pixels become ignore (255) and leave the labels
    rename: {old: new}                    new names for kept classes

With a non-empty ``background`` the run has a background class whatever ``dataset.has_background``
says; if ``classes.txt`` already starts with a background class (``has_background: true``), the merged
classes join it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from weakseg.datasets import IGNORE


class ClassMappingError(ValueError):
    """A class mapping names an unknown class or maps one class twice."""


@dataclass(frozen=True)
class ClassMapping:
    """The mapped class list and the lookup table from original class indices to mapped ones."""

    source_names: tuple[str, ...]
    class_names: tuple[str, ...]
    has_background: bool
    lut: np.ndarray  # (256,) uint8: original index -> mapped index; 255 stays 255 (ignore)

    @property
    def is_identity(self) -> bool:
        return self.class_names == self.source_names and bool(
            np.array_equal(self.lut[: len(self.source_names)], np.arange(len(self.source_names)))
        )

    def map_mask(self, mask: np.ndarray) -> np.ndarray:
        """A mask of original class indices (255 = ignore) -> mapped indices."""
        return self.lut[np.asarray(mask, np.uint8)]

    def map_labels(self, indices) -> np.ndarray:
        """Original image-level class indices -> sorted unique mapped indices (dropped classes vanish)."""
        mapped = self.lut[np.asarray(indices, np.int64)]
        return np.unique(mapped[mapped != IGNORE]).astype(np.int64)


def build_mapping(source_names, has_background: bool, mapping: dict | None) -> ClassMapping:
    """The ``ClassMapping`` of ``dataset.class_mapping`` (None or {} = identity) over ``source_names``."""
    names = list(source_names)
    mapping = mapping or {}
    background = list(mapping.get("background") or [])
    drop = list(mapping.get("drop") or [])
    rename = dict(mapping.get("rename") or {})
    background_name = mapping.get("background_name") or "background"
    for key, listed in (("background", background), ("drop", drop), ("rename", list(rename))):
        unknown = [n for n in listed if n not in names]
        if unknown:
            raise ClassMappingError(
                f"dataset.class_mapping.{key}: class {unknown[0]!r} is not in classes.txt "
                f"({', '.join(names)})"
            )
    twice = sorted(set(background) & set(drop))
    if twice:
        raise ClassMappingError(
            f"dataset.class_mapping: {twice[0]!r} is both merged into background and dropped"
        )

    lut = np.full(256, IGNORE, np.uint8)
    new_names: list[str] = []
    with_background = has_background or bool(background)
    if with_background:
        new_names.append(rename.get(names[0], names[0]) if has_background else background_name)
        if has_background:
            lut[0] = 0
    for index, name in enumerate(names):
        if has_background and index == 0:
            continue
        if name in background:
            lut[index] = 0
        elif name not in drop:
            lut[index] = len(new_names)
            new_names.append(rename.get(name, name))
    dupes = sorted({n for n in new_names if new_names.count(n) > 1})
    if dupes:
        raise ClassMappingError(f"dataset.class_mapping.rename: two classes are named {dupes[0]!r}")
    if len(new_names) < 2:
        raise ClassMappingError(
            f"dataset.class_mapping: leaves {len(new_names)} class(es); at least 2 are needed"
        )
    return ClassMapping(tuple(names), tuple(new_names), with_background, lut)
