"""The on-disk layout of every weakseg store. No other module knows where arrays live.

Every stage writes one Zarr (v3) group. Per-image arrays live under ``<key>/<image id>`` because
images differ in size; one chunk per array keeps a store to a few files per image.

    data.zarr          attrs: class_names, has_background, ids, splits {split: [ids]}
      images/<id>      uint8 (H, W, 3) RGB
      labels           uint8 (N, C) image-level labels, rows in attrs['ids'] order
    gt.zarr            masks/<id> uint8 (H, W), 255 = ignore   (read by evaluation only)
    superpixels.zarr   maps/<id> int32 (H, W), labels 0..n-1
    scores.zarr        cam/<id>, spcam/<id> uint8 (K, H, W): score = value / 255,
                       array attrs {'classes': [K class indices]}
    <labels>.zarr      labels/<id> uint8 (H, W), 255 = ignore  (cleaned, crf, reliable, rounds)

Group attrs always hold ``kind`` (what the store is) and ``provenance`` (stage, config section,
package version, time). A store is written under a temporary sibling name and renamed into place
only when complete, so a killed job never leaves a store that looks finished.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np
import zarr

# Keys of the per-image arrays, one per store kind. A stage store may hold several keys (scores).
IMAGES, MASKS, SUPERPIXELS, LABELS = "images", "masks", "maps", "labels"
CAM, SPCAM = "cam", "spcam"
SEG = "seg"  # segmentation-net class probabilities (round scores)
SCORE_SCALE = 255.0  # scores in [0, 1] are stored as uint8 value / 255


class StoreError(RuntimeError):
    """A store is missing, unfinished, of the wrong kind, or lacks an image."""


def provenance(stage: str, config: dict | None = None, **extra) -> dict:
    from weakseg import __version__

    return {
        "stage": stage,
        "config": config or {},
        "weakseg_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


@contextlib.contextmanager
def writing(path: str | os.PathLike, kind: str, prov: dict, attrs: dict | None = None) -> Iterator[zarr.Group]:
    """Yield a new group at a temporary path; on success move it to ``path`` (replacing any old one).

    On any exception the temporary store is removed and ``path`` is left as it was.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    group = zarr.open_group(str(tmp), mode="w")
    group.attrs.update({"kind": kind, "provenance": prov, "complete": False, **(attrs or {})})
    try:
        yield group
        group.attrs["complete"] = True
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_path(tmp, final)


def replace_path(tmp: Path, final: Path) -> None:
    """Move a finished temporary folder into place, replacing ``final``; the old one is renamed
    aside first so that a crash in between never leaves neither."""
    if final.exists():
        old = final.with_name(f"{final.name}.tmp-old-{uuid.uuid4().hex[:8]}")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


def open_store(path: str | os.PathLike, kind: str | None = None) -> zarr.Group:
    """Open a finished store read-only; a clear error if it is missing, unfinished or another kind."""
    p = Path(path)
    if not p.exists():
        raise StoreError(f"{p}: store not found (has the stage that writes it run?)")
    try:
        group = zarr.open_group(str(p), mode="r")
    except Exception as exc:  # zarr raises several types for a broken group
        raise StoreError(f"{p}: not a readable Zarr group ({exc})") from exc
    if not group.attrs.get("complete", False):
        raise StoreError(f"{p}: store is incomplete (its writer did not finish); rerun that stage")
    if kind is not None and group.attrs.get("kind") != kind:
        raise StoreError(f"{p}: expected a '{kind}' store, found '{group.attrs.get('kind')}'")
    return group


def put(group: zarr.Group, key: str, image_id: str, array: np.ndarray, attrs: dict | None = None) -> None:
    """Write one per-image array (one chunk) under ``key/image_id``."""
    array = np.ascontiguousarray(array)
    arr = group.create_array(f"{key}/{image_id}", shape=array.shape, dtype=array.dtype, chunks=array.shape,
                             overwrite=True)
    arr[...] = array
    if attrs:
        arr.attrs.update(attrs)


def get(group: zarr.Group, key: str, image_id: str) -> np.ndarray:
    try:
        return group[f"{key}/{image_id}"][...]
    except KeyError:
        raise StoreError(f"{_where(group)}: no '{key}' array for image '{image_id}'") from None


def get_attrs(group: zarr.Group, key: str, image_id: str) -> dict:
    try:
        return dict(group[f"{key}/{image_id}"].attrs)
    except KeyError:
        raise StoreError(f"{_where(group)}: no '{key}' array for image '{image_id}'") from None


def ids_in(group: zarr.Group, key: str) -> list[str]:
    if key not in group:
        return []
    return sorted(name for name, _ in group[key].arrays())


def put_scores(group: zarr.Group, key: str, image_id: str, scores: np.ndarray, classes,
               attrs: dict | None = None) -> None:
    """Store (K, H, W) scores in [0, 1] quantised to uint8, with the K class indices they cover."""
    q = np.clip(np.rint(np.asarray(scores, np.float32) * SCORE_SCALE), 0, 255).astype(np.uint8)
    put(group, key, image_id, q, {"classes": [int(c) for c in classes], **(attrs or {})})


def get_scores(group: zarr.Group, key: str, image_id: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (scores float32 (K, H, W) in [0, 1], class indices (K,))."""
    q = get(group, key, image_id)
    classes = np.asarray(get_attrs(group, key, image_id)["classes"], dtype=np.int64)
    return q.astype(np.float32) / SCORE_SCALE, classes


def copy_arrays(src: zarr.Group, dst: zarr.Group) -> int:
    """Copy every per-image array of ``src`` into ``dst`` (used to gather shards). Returns count."""
    n = 0
    for key, sub in src.groups():
        for image_id, arr in sub.arrays():
            put(dst, key, image_id, arr[...], dict(arr.attrs))
            n += 1
    return n


def gather(shard_paths, final_path, kind: str, prov: dict, expected_ids: list[str] | None = None,
           key: str | None = None) -> None:
    """Merge shard stores (disjoint image sets) into one finished store at ``final_path``."""
    shards = [open_store(p, kind) for p in shard_paths]
    attrs = {k: v for k, v in shards[0].attrs.items() if k not in ("kind", "provenance", "complete")}
    with writing(final_path, kind, prov, attrs) as out:
        for shard in shards:
            copy_arrays(shard, out)
        if expected_ids is not None and key is not None:
            missing = sorted(set(expected_ids) - set(ids_in(out, key)))
            if missing:
                raise StoreError(f"{final_path}: shards lack {len(missing)} images, e.g. {missing[:3]}")


def shard_ids(ids: list[str], shard: int, n_shards: int) -> list[str]:
    """The images of one shard: a fixed, disjoint, round-robin split of the sorted id list."""
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} is outside 0..{n_shards - 1}")
    return sorted(ids)[shard::n_shards]


def write_table(table, path: str | os.PathLike) -> Path:
    """Write a pandas table as CSV atomically (temporary sibling, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        table.to_csv(tmp, index=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def store_bytes(path: str | os.PathLike) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _where(group: zarr.Group) -> str:
    return str(getattr(group.store, "root", group.store))


class RunLayout:
    """Where each stage's output lives inside ``<results>/<run>/``. Snakemake rules, inspection
    and the report all take their paths from here."""

    def __init__(self, run_dir: str | os.PathLike):
        self.root = Path(run_dir)

    def __truediv__(self, rel: str) -> Path:
        return self.root / rel

    # foundation
    synthetic = property(lambda self: self.root / "synthetic")  # generated dataset folder
    data = property(lambda self: self.root / "data.zarr")
    gt = property(lambda self: self.root / "gt.zarr")
    superpixels = property(lambda self: self.root / "superpixels.zarr")
    metrics_dir = property(lambda self: self.root / "metrics")
    metrics = property(lambda self: self.root / "metrics.csv")
    # CAM / SPN
    cam_dir = property(lambda self: self.root / "cam")
    cam_model = property(lambda self: self.root / "cam" / "model.pt")
    scores = property(lambda self: self.root / "cam" / "scores.zarr")  # keys cam, spcam
    # pseudo-labels
    cleaned = property(lambda self: self.root / "pseudo" / "cleaned.zarr")
    crf = property(lambda self: self.root / "pseudo" / "crf.zarr")
    reliable = property(lambda self: self.root / "pseudo" / "reliable.zarr")
    reliability = property(lambda self: self.root / "pseudo" / "reliability.csv")
    # report and run records
    report_dir = property(lambda self: self.root / "report")
    report_page = property(lambda self: self.root / "report" / "index.html")
    resolved_config = property(lambda self: self.root / "config.resolved.yaml")  # the run's full config
    logs_dir = property(lambda self: self.root / "logs")
    benchmarks_dir = property(lambda self: self.root / "benchmarks")  # Snakemake's per-job timings (TSV)
    reliability_curve = property(lambda self: self.root / "pseudo" / "reliability_curve.csv")

    def pseudo(self, name: str) -> Path:
        """The labels store of a pseudo-label variant: cleaned, crf or reliable."""
        return {"cleaned": self.cleaned, "crf": self.crf, "reliable": self.reliable}[name]

    def round_dir(self, r: int) -> Path:
        return self.root / f"round{r}"

    def round_model(self, r: int) -> Path:
        return self.round_dir(r) / "model.pt"

    def round_scores(self, r: int, split: str) -> Path:
        """Segmentation-net class probabilities (key 'seg'): train images or val images."""
        return self.round_dir(r) / f"scores_{split}.zarr"

    def round_labels(self, r: int, name: str) -> Path:
        """Labels stores of a round: cleaned (train), crf (train), val, val_crf."""
        return self.round_dir(r) / f"{name}.zarr"

    def round_reliability(self, r: int) -> Path:
        return self.round_dir(r) / "reliability.csv"
