"""Reliability of pseudo-label annotations and the top-K selection (SPN paper, Kwak et al. 2017, §6).

The annotation of an image for class c is the set of pixels labelled c (possibly several blobs).
Its divergence = perimeter^2 / area: compact annotations score low and are trusted most; ragged or
fragmented ones, typical of wrong pseudo-labels, score high. ``pseudo.reliability_score`` says what
ranks the annotations: the divergence (the SPN's shape cue) or 1 - the consistency of the annotation
with the dataset's class prototypes (``weakseg.pseudo.consistency``, a content cue). Per class, the k
annotations of lowest score (or a fraction of them) are selected, and an image is selected when it is
selected for at least one class. An image's own score is that of its least reliable annotation.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from weakseg import store
from weakseg.commands import DATA, THREADS, Command, optional, output, required
from weakseg.datasets import IGNORE, open_data
from weakseg.errors import InputError
from weakseg.pseudo.jobs import split_ids

log = logging.getLogger("weakseg")

CSV_COLUMNS = [
    "id",
    "class",
    "class_name",
    "area",
    "perimeter",
    "divergence",
    "consistency",
    "score",
    "rank",
    "selected",
    "image_selected",
    "image_score",
]
NO_CLASS, NO_CLASS_NAME = -1, "none"  # the row of an image whose annotation labels none of its classes


def annotated_classes(info, image_id: str) -> list[int]:
    """The classes whose annotations an image contributes: its labelled foreground classes. An image
    labelled background only is annotated by its background region: whole (divergence 0, right by
    construction) unless a stage left holes of ignore in it."""
    fg_classes = set(info.fg_classes.tolist())
    fg = [c for c in info.image_labels(image_id).tolist() if c in fg_classes]
    return fg if fg or not info.has_background else [0]


def class_divergences(labels: np.ndarray, classes) -> dict[int, tuple[int, int, float]]:
    """{class: (area, perimeter, divergence)} for each class of ``classes`` present in ``labels``.

    area = pixel count; perimeter = number of 4-neighbour pixel edges between the region and the
    rest of the image; divergence = perimeter^2 / area. 255 (ignore) is never scored; callers pass
    foreground classes, and background only for images labelled background alone.

    The image border does not count as perimeter. The border is where the camera cut the scene,
    not a boundary the annotation decided, and divergence is meant to measure how ragged the
    decided boundaries are. Counting it would add the frame to every region that touches it —
    e.g. a sky band across the full width w would gain 2w + 2h of perimeter it has no control over
    — and drown the difference between a clean and a jagged horizon. Consequences, by design:
    a region filling the whole image has perimeter 0 and divergence 0, and a shape touching the
    border scores lower than the same shape inside the image. Ranking is done within a class, so
    this only favours, among annotations of one class, those whose decided boundary is short.

    In this edge metric a shape not touching the border has perimeter >= that of its bounding
    box, 2(a + b) for an a x b box, so divergence >= 4(a + b)^2 / (ab) >= 16: the minimum, 16, is
    reached by a square (side s: area s^2, perimeter 4s). A digital disc of radius r has
    perimeter ~8r and area ~pi r^2, so ~64 / pi ~ 20.4.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels: expected an (H, W) label map, got shape {labels.shape}")
    labels = labels.astype(np.int64, copy=False)
    area = np.bincount(labels.ravel(), minlength=256)
    perimeter = np.zeros(max(256, int(labels.max()) + 1), dtype=np.int64)
    # Each pair of 4-neighbours with different labels is one edge of the perimeter of both labels.
    for a, b in ((labels[:, 1:], labels[:, :-1]), (labels[1:, :], labels[:-1, :])):
        differ = a != b
        perimeter += np.bincount(a[differ], minlength=perimeter.size)
        perimeter += np.bincount(b[differ], minlength=perimeter.size)
    result = {}
    for c in sorted({int(c) for c in classes} - {IGNORE}):
        if c < area.size and area[c] > 0:
            result[c] = (int(area[c]), int(perimeter[c]), float(perimeter[c]) ** 2 / float(area[c]))
    return result


def class_agreements(dense: np.ndarray, confident: np.ndarray, classes) -> dict[int, float]:
    """{class: share of the dense annotation's pixels of the class that ``confident`` labels the same}
    for each class of ``classes`` present in ``dense``.

    ``dense`` is a complete annotation (the CRF's), ``confident`` the labels the scores are sure of
    (the cleaned annotation, ignore in the uncertain band). A low share means the dense annotation
    put the class where the scores did not: the RRM paper's reliable regions, scored per annotation.
    It catches what the shape cannot: a region grown over the background along a straight boundary is
    compact, yet mostly unsupported.
    """
    dense, confident = np.asarray(dense), np.asarray(confident)
    if dense.shape != confident.shape or dense.ndim != 2:
        raise ValueError(
            f"expected two (H, W) label maps of one shape, got {dense.shape} and {confident.shape}"
        )
    result = {}
    for c in sorted({int(c) for c in classes} - {IGNORE}):
        region = dense == c
        area = int(region.sum())
        if area:
            result[c] = float((confident[region] == c).sum()) / area
    return result


def select_top_k(table: pd.DataFrame, k: int | None, fraction: float, by: str = "divergence") -> pd.DataFrame:
    """Add ``rank`` (0 = lowest ``by`` within the class) and ``selected`` to a table with columns
    id, class and ``by`` (one row per annotation; lower is more reliable).

    Selected: rank < k, or rank < ceil(fraction * annotations of the class) when k is None. Ties in
    the score are broken by id so that the selection is reproducible. Rows of class -1 (no
    annotation) get rank -1 and are never selected; neither is an infinite score.
    """
    for column in ("id", "class", by):
        if column not in table.columns:
            raise ValueError(f"reliability table: missing column '{column}' (has {list(table.columns)})")
    if k is None and not 0 < fraction <= 1:
        raise ValueError(f"top_fraction: expected a number in (0, 1], got {fraction}")
    if k is not None and k < 1:
        raise ValueError(f"top_k: expected a positive integer or None, got {k}")
    out = table.copy()
    out["rank"] = -1
    out["selected"] = False
    scored = out.index[out["class"] >= 0]
    order = out.loc[scored].sort_values(["class", by, "id"], kind="stable")
    out.loc[order.index, "rank"] = order.groupby("class").cumcount().to_numpy()
    sizes = out.loc[scored].groupby("class")["id"].transform("size")
    quota = sizes.apply(lambda n: k if k is not None else math.ceil(fraction * n))
    out.loc[scored, "selected"] = (
        (out.loc[scored, "rank"] < quota) & np.isfinite(out.loc[scored, by])
    ).to_numpy()
    if k is not None:
        short = sorted(int(c) for c, n in out.loc[scored].groupby("class").size().items() if n < k)
        if short:
            log.info(
                "reliability: classes %s have fewer than top_k = %d annotations; all of them are kept",
                short,
                k,
            )
    out["rank"] = out["rank"].astype(np.int64)
    out["selected"] = out["selected"].astype(bool)
    return out


def reliability_table(
    annotations: dict[str, dict[int, tuple[int, int, float]]],
    class_names,
    k: int | None,
    fraction: float,
    consistency: dict[str, dict[int, float]] | None = None,
) -> pd.DataFrame:
    """The tidy per-annotation table (columns CSV_COLUMNS) from {id: class_divergences(...)}.

    With ``consistency`` ({id: {class: consistency}}) the score is 1 - consistency, else the
    divergence; the consistency column is NaN without it. An annotation without a consistency (or
    an image without annotation) scores inf and is never selected."""
    rows = []
    for image_id, per_class in annotations.items():
        if not per_class:
            rows.append((image_id, NO_CLASS, NO_CLASS_NAME, 0, 0, math.inf, math.nan))
        content = consistency.get(image_id, {}) if consistency is not None else {}
        for c, (area, perimeter, divergence) in per_class.items():
            rows.append((image_id, c, class_names[c], area, perimeter, divergence, content.get(c, math.nan)))
    table = pd.DataFrame(rows, columns=CSV_COLUMNS[:7]).astype(
        {
            "id": str,
            "class": np.int64,
            "class_name": str,
            "area": np.int64,
            "perimeter": np.int64,
            "divergence": np.float64,
            "consistency": np.float64,
        }
    )
    if consistency is None:
        table["score"] = table["divergence"]
    else:
        table["score"] = (1.0 - table["consistency"]).fillna(math.inf)
    table = select_top_k(table, k, fraction, by="score")
    by_image = table.groupby("id")
    table["image_selected"] = by_image["selected"].transform("any").astype(bool)
    table["image_score"] = by_image["score"].transform("max")
    return table[CSV_COLUMNS]


def run_reliability(
    config: dict, data_path, labels_path, out_csv, model_path=None, seeds_path=None, threads: int = 1
) -> pd.DataFrame:
    """Score every train annotation of a labels store and write the table to ``out_csv`` (atomically).
    ``pseudo.reliability_score: consistency`` needs ``model_path`` (the model file whose encoder gives
    the features) and ``seeds_path`` (the labels store whose pixels make the class prototypes)."""
    info, data = open_data(data_path)
    group = store.open_store(labels_path, "labels")
    ids = split_ids(config, info, group, store.LABELS)
    pseudo = config["pseudo"]
    annotations, missing_classes = {}, 0
    for image_id in ids:
        scored = annotated_classes(info, image_id)
        annotations[image_id] = class_divergences(store.get(group, store.LABELS, image_id), scored)
        missing_classes += len(scored) - len(annotations[image_id])
    consistency = None
    if pseudo["reliability_score"] == "consistency":
        if model_path is None or seeds_path is None:
            raise InputError(
                "pseudo.reliability_score 'consistency' needs --model (a CAM or segmentation model file) "
                "and --seeds (the labels store of the class prototypes)"
            )
        import torch

        from weakseg.pseudo.consistency import dataset_consistency, load_feature_encoder

        torch.set_num_threads(max(1, threads))
        seeds = store.open_store(seeds_path, "labels")
        absent = sorted(set(ids) - set(store.ids_in(seeds, store.LABELS)))
        if absent:
            raise InputError(f"{seeds_path}: no seed labels for {len(absent)} images, e.g. {absent[0]}")
        consistency = dataset_consistency(
            info,
            data,
            load_feature_encoder(model_path, info),
            seeds,
            group,
            ids,
            lambda image_id: list(annotations[image_id]),
            pseudo["consistency_temperature"],
        )
    table = reliability_table(
        annotations, info.class_names, pseudo["top_k"], pseudo["top_fraction"], consistency
    )
    store.write_table(table, out_csv)

    empty = int((table["class"] == NO_CLASS).sum())
    if empty:
        log.warning(
            "reliability: %d of %d images label none of their classes (score inf, never selected)",
            empty,
            len(ids),
        )
    if missing_classes:
        log.info(
            "reliability: %d labelled (image, class) pairs have no pixel in %s", missing_classes, labels_path
        )
    n_selected = table.loc[table["image_selected"], "id"].nunique()
    log.info(
        "reliability: %d annotations of %d images ranked by %s; %d images selected -> %s",
        int((table["class"] >= 0).sum()),
        len(ids),
        pseudo["reliability_score"],
        n_selected,
        out_csv,
    )
    return table


def selected_ids(csv_path) -> list[str]:
    """Sorted ids of the images selected for at least one class in a reliability CSV."""
    path = Path(csv_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: reliability table not found (has the reliability stage run?)")
    table = pd.read_csv(path, dtype={"id": str})
    for column in ("id", "image_selected"):
        if column not in table.columns:
            raise ValueError(f"{path}: not a reliability table, column '{column}' missing")
    return sorted(table.loc[table["image_selected"].astype(bool), "id"].unique().tolist())


COMMAND = Command(
    "reliability",
    "reliability of each annotation (pseudo.reliability_score) and the top-K selection",
    run_reliability,
    (
        THREADS,
        DATA,
        required("--labels", "labels_path", "labels store whose annotations are scored"),
        optional(
            "--model",
            "model_path",
            "consistency: the CAM or segmentation model file whose encoder gives the features",
        ),
        optional("--seeds", "seeds_path", "consistency: the labels store whose pixels make the prototypes"),
        output("out_csv", "CSV of scores and selection"),
    ),
    sections=("dataset", "pseudo"),
    writes=("out_csv",),
)
