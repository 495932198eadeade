"""VOC-style dataset folders and their ingest into ``data.zarr`` (images + labels) and ``gt.zarr``.

Layout read here (PASCAL VOC 2012 and MSRC-21 as shipped in ../shared both fit):

    <root>/JPEGImages/<id>.jpg|.jpeg|.png
    <root>/SegmentationClass/<id>.png   optional; palette or single-channel index PNG, 255 = ignore
    <root>/<split>.txt  or  <root>/ImageSets/Segmentation/<split>.txt   one id per line
    <root>/classes.txt                  class names, line i = class index i
    labels file (optional)              CSV: id,labels  with class names joined by ';'

Image-level labels come from the labels file when given (real users have no masks for their
training images) and otherwise from the masks. Ingest validates everything it reads and names
the file and the expectation on any problem; the stores are written atomically.

Images are decoded strictly (``read_image_file``, also used by ``weakseg predict``): a truncated
file is an error, never an image padded with grey. EXIF orientation is applied, so an image is
stored as viewers show it; masks carry no orientation and must match the rotated image.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps

from weakseg import store
from weakseg.commands import Command, option, required
from weakseg.config import ConfigError
from weakseg.datasets import IGNORE
from weakseg.datasets.mapping import ClassMappingError, build_mapping
from weakseg.errors import UserError, first_line
from weakseg.parallel import progress

log = logging.getLogger("weakseg")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


class DatasetError(UserError, ValueError):
    """A dataset file is missing or malformed; the message names the file and the expectation."""


def read_classes(root: Path) -> list[str]:
    path = root / "classes.txt"
    if not path.is_file():
        raise DatasetError(f"{path}: missing; expected one class name per line (line i = class index i)")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(names) < 2:
        raise DatasetError(f"{path}: expected at least 2 class names, found {len(names)}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DatasetError(f"{path}: duplicate class names {dupes}")
    if len(names) > 255:
        raise DatasetError(
            f"{path}: at most 255 classes fit a uint8 label map (255 = ignore), found {len(names)}"
        )
    return names


def split_file(root: Path, split: str) -> Path:
    for path in (root / f"{split}.txt", root / "ImageSets" / "Segmentation" / f"{split}.txt"):
        if path.is_file():
            return path
    raise DatasetError(
        f"{root}: no list for split '{split}' (expected {split}.txt or ImageSets/Segmentation/{split}.txt)"
    )


def read_split(root: Path, split: str) -> list[str]:
    """The image ids of a split list, one per line; each id at most once."""
    path = split_file(root, split)
    ids = [_line_id(root, line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not ids:
        raise DatasetError(f"{path}: split '{split}' is empty; expected one image id per line")
    repeated = sorted(i for i, n in Counter(ids).items() if n > 1)
    if repeated:
        raise DatasetError(
            f"{path}: {len(repeated)} image ids are listed more than once, e.g. {_some(repeated)}; "
            "expected each id once (a repeated image would weigh double in training)"
        )
    return ids


def _line_id(root: Path, line: str) -> str:
    """The id on a split-list line: the whole line (ids may contain spaces), or its first field when
    only that names an image (lists with extra columns, like VOC's 'id flag')."""
    text = line.strip()
    first = text.split()[0]
    if first != text and not _has_image(root, text) and _has_image(root, first):
        return first
    return text


def _some(ids: list[str], k: int = 5) -> str:
    return ", ".join(repr(i) for i in ids[:k]) + (f" and {len(ids) - k} more" if len(ids) > k else "")


def _has_image(root: Path, image_id: str) -> bool:
    return any((root / "JPEGImages" / f"{image_id}{ext}").is_file() for ext in IMAGE_EXTENSIONS)


def image_path(root: Path, image_id: str) -> Path:
    for ext in IMAGE_EXTENSIONS:
        path = root / "JPEGImages" / f"{image_id}{ext}"
        if path.is_file():
            return path
    raise DatasetError(
        f"{root / 'JPEGImages' / image_id}.jpg: image file not found "
        f"(tried extensions {', '.join(IMAGE_EXTENSIONS)})"
    )


def read_image_file(path: str | os.PathLike) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file, decoded completely, as viewers show it.

    A truncated, partly decodable or unidentifiable file is a ``DatasetError`` naming it. The EXIF
    orientation is applied; grey, palette, alpha and CMYK images become RGB, and 16-bit ones are
    scaled to 8 bits.
    """
    path = Path(path)
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a library may have switched it on: we never want padded images
    try:
        with Image.open(path) as image:
            image.load()
            if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
                image = ImageOps.exif_transpose(image)
            return _rgb(image, path)
    except DatasetError:
        raise
    except Exception as exc:  # Pillow raises OSError for most damage, other types for some
        raise DatasetError(
            f"{path}: unreadable image ({_damage(path, exc)}); expected a complete JPEG, PNG or BMP image"
        ) from exc


def _damage(path: Path, exc: Exception) -> str:
    """What is wrong with an image file Pillow could not decode, in a few words."""
    if not isinstance(exc, Image.UnidentifiedImageError):
        return first_line(exc)
    with contextlib.suppress(OSError):
        head = path.read_bytes()[:8]
        if not head:
            return "empty file"
        for magic, kind in ((b"\xff\xd8", "JPEG"), (b"\x89PNG", "PNG"), (b"BM", "BMP")):
            if head.startswith(magic):
                return f"a {kind} file truncated or damaged within its header"
    return "not an image format Pillow can identify"


def _rgb(image: Image.Image, path: Path) -> np.ndarray:
    if image.mode.startswith("I;16"):  # 16-bit grey: keep the high byte, as for 16-bit colour
        grey = (np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2))
    if image.mode in ("I", "F"):
        raise DatasetError(f"{path}: {image.mode} (32-bit) pixels; expected an 8- or 16-bit image")
    return np.array(image.convert("RGB"))


def read_mask_file(path: Path, shape: tuple[int, int], n_classes: int) -> np.ndarray:
    """Class-index mask (H, W) uint8 from a palette or single-channel PNG, validated."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L", "I", "I;16"):
                raise DatasetError(
                    f"{path}: mask mode {im.mode}; expected a palette or single-channel index PNG"
                )
            mask = np.array(im)
    except (OSError, SyntaxError) as exc:
        raise DatasetError(f"{path}: unreadable mask ({first_line(exc)})") from exc
    if mask.shape != shape:
        hint = (
            "; masks are not rotated by EXIF orientation, so draw them on the image as viewers show it"
            if mask.shape == shape[::-1]
            else ""
        )
        raise DatasetError(
            f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is {shape[1]}x{shape[0]}{hint}"
        )
    bad = np.setdiff1d(np.unique(mask), np.r_[np.arange(n_classes), IGNORE])
    if bad.size:
        raise DatasetError(
            f"{path}: mask values {bad[:5].tolist()} are not class indices 0..{n_classes - 1} or 255"
        )
    return mask.astype(np.uint8)


def read_labels_file(path: Path, class_names: list[str]) -> dict[str, np.ndarray]:
    """CSV id,labels (names joined by ';') -> {id: class index array}."""
    if not path.is_file():
        raise DatasetError(f"{path}: labels file not found")
    index = {n: i for i, n in enumerate(class_names)}
    out = {}
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"id", "labels"} <= set(reader.fieldnames):
            raise DatasetError(f"{path}: expected a CSV header with columns id,labels")
        for line, row in enumerate(reader, start=2):
            names = [n.strip() for n in (row["labels"] or "").split(";") if n.strip()]
            unknown = [n for n in names if n not in index]
            if unknown:
                raise DatasetError(
                    f"{path}:{line}: class {unknown[0]!r} is not in classes.txt ({', '.join(class_names)})"
                )
            out[row["id"]] = np.array([index[n] for n in names], np.int64)
    return out


def check_disjoint_splits(root: Path, splits: list[tuple[str, list[str]]]) -> None:
    """The train and val lists must not share an image (validation on training images)."""
    if len(splits) < 2:
        return
    (train, train_ids), (val, val_ids) = splits
    shared = sorted(set(train_ids) & set(val_ids))
    if shared:
        raise DatasetError(
            f"{split_file(root, train)} and {split_file(root, val)}: {len(shared)} image ids are in "
            f"both the '{train}' and '{val}' splits, e.g. {_some(shared)}; expected disjoint splits"
        )


def labels_from_mask(mask: np.ndarray, n_classes: int) -> np.ndarray:
    present = np.unique(mask)
    return present[present < n_classes].astype(np.int64)


def ingest(root: str | os.PathLike, dataset_cfg: dict, data_path, gt_path, prov: dict) -> dict:
    """Read a folder dataset and write ``data.zarr`` and ``gt.zarr``. Returns a summary dict."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found (config key dataset.root)")
    source_names = read_classes(root)
    try:
        mapping = build_mapping(source_names, dataset_cfg["has_background"], dataset_cfg["class_mapping"])
    except ClassMappingError as exc:
        raise DatasetError(str(exc)) from exc
    names = list(mapping.class_names)
    n_classes = len(names)
    split_names = [dataset_cfg["train_split"]] + (
        [dataset_cfg["val_split"]] if dataset_cfg["val_split"] else []
    )
    full_splits = [(split, read_split(root, split)) for split in split_names]
    check_disjoint_splits(root, full_splits)
    limit = dataset_cfg["max_images"]
    splits = {split: ids[:limit] if limit else ids for split, ids in full_splits}
    all_ids = list(dict.fromkeys(i for ids in splits.values() for i in ids))
    # The labels file names the classes of classes.txt; they go through the same mapping as the masks.
    file_labels = (
        read_labels_file(Path(dataset_cfg["labels_file"]), source_names)
        if dataset_cfg["labels_file"]
        else None
    )
    has_bg = mapping.has_background
    labels = np.zeros((len(all_ids), n_classes), np.uint8)
    n_masks = 0
    attrs = {
        "class_names": names,
        "has_background": has_bg,
        "ids": all_ids,
        "splits": splits,
        "source": str(root),
        "source_class_names": list(source_names),
    }
    with (
        store.writing(data_path, "data", prov, attrs) as data,
        store.writing(gt_path, "gt", prov, {"class_names": names, "has_background": has_bg}) as gt,
    ):
        for row, image_id in enumerate(progress(all_ids, "ingest")):
            image = read_image_file(image_path(root, image_id))
            store.put(data, store.IMAGES, image_id, image)
            mask_file = root / "SegmentationClass" / f"{image_id}.png"
            mask = (
                read_mask_file(mask_file, image.shape[:2], len(source_names)) if mask_file.is_file() else None
            )
            if mask is not None:
                mask = mapping.map_mask(mask)
            if mask is not None:
                store.put(gt, store.MASKS, image_id, mask)
                n_masks += 1
            if file_labels is not None:
                if image_id not in file_labels:
                    raise DatasetError(f"{dataset_cfg['labels_file']}: no labels for image '{image_id}'")
                present = mapping.map_labels(file_labels[image_id])
            elif mask is not None:
                present = labels_from_mask(mask, n_classes)
            else:
                raise DatasetError(
                    f"{mask_file}: missing, and no labels file is configured "
                    "(dataset.labels_file) to give this image's labels"
                )
            if not len(present) and not has_bg:
                source = dataset_cfg["labels_file"] if file_labels is not None else mask_file
                raise DatasetError(
                    f"{source}: image '{image_id}' has no labels; without a background class "
                    "(dataset.has_background: false) every image needs at least one class"
                )
            labels[row, present] = 1
            if has_bg:
                labels[row, 0] = 1  # every image has background in the VOC convention
        empty = [i for i, r in zip(all_ids, labels) if not r[1 if has_bg else 0 :].any()]
        if empty:
            log.info("%d images have no foreground label (all background), e.g. %s", len(empty), empty[:3])
        data.create_array("labels", shape=labels.shape, dtype=np.uint8, chunks=labels.shape)[...] = labels
    summary = {
        "images": len(all_ids),
        "masks": n_masks,
        "classes": n_classes,
        **{f"split_{k}": len(v) for k, v in splits.items()},
    }
    log.info("ingested %s", summary)
    return summary


def run_ingest(config: dict, data_path, gt_path, root=None) -> dict:
    from weakseg.store import provenance

    root = root or config["dataset"]["root"]
    if root is None:
        raise ConfigError("dataset.root: not set; give --root or set it in the config")
    return ingest(root, config["dataset"], data_path, gt_path, provenance("ingest", config["dataset"]))


COMMAND = Command(
    "ingest",
    "read a VOC-style dataset folder into data.zarr (images, labels) and gt.zarr",
    run_ingest,
    (
        option("--root", help="dataset folder (overrides dataset.root)"),
        required("--data", "data_path", "output data.zarr"),
        required("--gt", "gt_path", "output gt.zarr (masks; read by evaluation only)"),
    ),
    sections=("dataset",),
    writes=("data_path", "gt_path"),
)
