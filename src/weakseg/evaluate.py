"""All metric math: confusion matrices, IoU / accuracy / over-activation, background sweeps,
the superpixel oracle and the reliability curve; plus the edge that evaluates stores into tidy CSVs.

Conventions used by every number this module reports:

* Ground-truth pixels equal to ``ignore`` (255) are not evaluated at all.
* A prediction of ``ignore`` (255) means "no label" (pseudo-labels leave uncertain pixels
  unlabelled). Such pixels are NOT counted as any class and not as errors: IoU, accuracies and
  over-activation measure the precision of the labels that were given, over labelled pixels only.
  How much was labelled is reported separately as ``labelled_fraction`` (labelled pixels /
  gt-valid pixels). Both views are needed to compare sparse and dense label maps.
* A class absent from both the ground truth and the prediction (over labelled pixels) has an
  undefined IoU (NaN) and is left out of mIoU, so mIoU of an image or subset is the mean over the
  classes that occur in it. Mean class accuracy averages recall over the classes present in gt.
* Nothing depends on whether the dataset has a background class; with one it is class 0.

Tidy output rows have columns stage, split, metric, class, value (class '' for overall metrics).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from weakseg import config as config_mod
from weakseg import store
from weakseg.datasets import IGNORE, open_data
from weakseg.labels import (
    BACKGROUND,
    argmax_scores,
    check_scores,
    decide,
    restrict_to_labels,
    store_threshold,
    top_class,
)
from weakseg.parallel import progress

log = logging.getLogger("weakseg")

TIDY_COLUMNS = ["stage", "split", "metric", "class", "value"]
SWEEP_COLUMNS = ["threshold", "miou", "mean_class_acc"]
CURVE_COLUMNS = ["k", "fraction", "miou"]
PER_IMAGE_COLUMNS = ["id", "miou", "pixel_acc", "labelled_fraction"]
CAM_KEYS = (store.CAM, store.SPCAM)  # score keys evaluated as pseudo-label sources


# ----------------------------------------------------------------------------------------------
# Pure core: confusion counting
# ----------------------------------------------------------------------------------------------


def _counts(gt: np.ndarray, pred: np.ndarray, n_classes: int, ignore: int) -> np.ndarray:
    """(C, C + 1) int64 counts: rows gt class, columns predicted class, last column pred == ignore.

    One bincount over the combined index gt * (C + 1) + pred, with ignore predictions mapped to
    column C, counts both the confusion matrix and the unlabelled pixels in a single pass.
    """
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"prediction shape {pred.shape} does not match ground truth shape {gt.shape}")
    for name, a in (("ground truth", gt), ("prediction", pred)):
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{name} must be an integer label map, got dtype {a.dtype}")
    valid = gt != ignore
    g = gt[valid].astype(np.int64)
    p = pred[valid].astype(np.int64)
    p[p == ignore] = n_classes
    bad_gt, bad_pred = g[(g < 0) | (g >= n_classes)], p[(p < 0) | (p > n_classes)]
    if bad_gt.size:
        raise ValueError(
            f"ground truth holds values {np.unique(bad_gt)[:5].tolist()}, "
            f"expected 0..{n_classes - 1} or {ignore} (ignore)"
        )
    if bad_pred.size:
        raise ValueError(
            f"prediction holds values {np.unique(bad_pred)[:5].tolist()}, "
            f"expected 0..{n_classes - 1} or {ignore} (unlabelled)"
        )
    flat = np.bincount(g * (n_classes + 1) + p, minlength=n_classes * (n_classes + 1))
    return flat.reshape(n_classes, n_classes + 1)


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, n_classes: int, ignore: int = IGNORE) -> np.ndarray:
    """(C, C) int64 confusion matrix, rows = ground truth, columns = prediction.

    Pixels with gt == ignore are skipped; pixels with pred == ignore (unlabelled) are not counted
    here (see ``Confusion.unlabelled``).
    """
    return _counts(gt, pred, n_classes, ignore)[:, :n_classes].copy()


class Confusion:
    """Running confusion counts over images.

    ``matrix`` (C, C): labelled pixels, rows gt, columns prediction. ``unlabelled`` (C,): gt-valid
    pixels whose prediction is ``ignore``, per gt class. ``n_images``: images added.
    """

    def __init__(self, n_classes: int, ignore: int = IGNORE):
        if n_classes < 1:
            raise ValueError(f"n_classes must be at least 1, got {n_classes}")
        self.n_classes = int(n_classes)
        self.ignore = ignore
        self.matrix = np.zeros((n_classes, n_classes), np.int64)
        self.unlabelled = np.zeros(n_classes, np.int64)
        self.n_images = 0

    def add(self, gt: np.ndarray, pred: np.ndarray) -> Confusion:
        counts = _counts(gt, pred, self.n_classes, self.ignore)
        self.matrix += counts[:, : self.n_classes]
        self.unlabelled += counts[:, self.n_classes]
        self.n_images += 1
        return self

    def merge(self, other: Confusion) -> Confusion:
        """Add another Confusion's counts (e.g. per-image confusions into a total)."""
        if other.n_classes != self.n_classes:
            raise ValueError(f"cannot merge confusions of {other.n_classes} and {self.n_classes} classes")
        self.matrix += other.matrix
        self.unlabelled += other.unlabelled
        self.n_images += other.n_images
        return self

    @property
    def total_valid(self) -> int:
        """Pixels with a valid ground truth, labelled or not."""
        return int(self.matrix.sum() + self.unlabelled.sum())


def accumulate(
    pairs: Iterable[tuple[np.ndarray, np.ndarray]], n_classes: int, ignore: int = IGNORE
) -> Confusion:
    """A Confusion over (gt, pred) label-map pairs."""
    conf = Confusion(n_classes, ignore)
    for gt, pred in pairs:
        conf.add(gt, pred)
    return conf


def sum_confusions(confusions: Iterable[Confusion], n_classes: int) -> Confusion:
    total = Confusion(n_classes)
    for conf in confusions:
        total.merge(conf)
    return total


# ----------------------------------------------------------------------------------------------
# Pure core: metrics
# ----------------------------------------------------------------------------------------------


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, NaN where den == 0."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _nanmean(values: np.ndarray) -> float:
    """Mean of the defined values; NaN (without numpy's warning) when there are none."""
    values = np.asarray(values, np.float64)
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else float("nan")


def scores(conf: Confusion) -> dict:
    """Metrics of a Confusion. Per-class arrays have length C; undefined values are NaN.

    Over labelled pixels only (pred == ignore is neither a class nor an error):
      iou[c]             TP / (TP + FP + FN); NaN when c is absent from both gt and prediction.
      miou               mean of the defined iou values.
      pixel_acc          correct / labelled pixels.
      class_acc[c]       recall TP / (TP + FN); NaN when c has no labelled gt pixel.
      mean_class_acc     mean of the defined class_acc values (classes present in gt).
      over_activation[c] FP / (TP + FP): share of the pixels labelled c that are not c;
                         NaN when nothing is labelled c.
    And the coverage view:
      labelled_fraction  labelled pixels / gt-valid pixels (1.0 for dense predictions).
      n_images           images counted.
    """
    m = conf.matrix.astype(np.float64)
    tp = np.diag(m)
    gt_total = m.sum(axis=1)  # TP + FN
    pred_total = m.sum(axis=0)  # TP + FP
    labelled = m.sum()
    iou = _ratio(tp, gt_total + pred_total - tp)
    class_acc = _ratio(tp, gt_total)
    return {
        "iou": iou,
        "miou": _nanmean(iou),
        "pixel_acc": float(_ratio(tp.sum(), labelled)),
        "class_acc": class_acc,
        "mean_class_acc": _nanmean(class_acc),
        "over_activation": _ratio(pred_total - tp, pred_total),
        "labelled_fraction": float(_ratio(labelled, conf.total_valid)),
        "n_images": conf.n_images,
    }


def tidy_rows(stage: str, split: str, result: dict, class_names) -> list[dict]:
    """Long-format rows (columns TIDY_COLUMNS) of a ``scores`` result: overall metrics with class
    '' and per-class iou, class_acc and over_activation."""
    names = list(class_names)
    if len(names) != len(result["iou"]):
        raise ValueError(f"{len(names)} class names for {len(result['iou'])} classes of stage '{stage}'")
    rows = [
        {"stage": stage, "split": split, "metric": metric, "class": "", "value": float(result[metric])}
        for metric in ("miou", "pixel_acc", "mean_class_acc", "labelled_fraction", "n_images")
    ]
    for metric in ("iou", "class_acc", "over_activation"):
        rows += [
            {"stage": stage, "split": split, "metric": metric, "class": name, "value": float(v)}
            for name, v in zip(names, result[metric])
        ]
    return rows


# ----------------------------------------------------------------------------------------------
# Pure core: background sweep (transparency only: it reads ground truth)
# ----------------------------------------------------------------------------------------------


def background_sweep(
    items: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray, int]], thresholds
) -> pd.DataFrame:
    """mIoU and mean class accuracy of ``threshold_background`` at each threshold, in one pass.

    Each item is (scores (K, H, W) in [0, 1], classes (K,), gt mask (H, W), n_classes); class 0
    is the background. Returns a DataFrame with columns threshold, miou, mean_class_acc.
    """
    thresholds = [float(t) for t in thresholds]
    if not thresholds:
        raise ValueError("background_sweep needs at least one threshold")
    confs = None
    for score_map, classes, gt, n_classes in items:
        if confs is None:
            confs = [Confusion(n_classes) for _ in thresholds]
        score_map, classes = check_scores(score_map, classes)
        label, top = top_class(score_map, classes)  # computed once, thresholded many times
        for t, conf in zip(thresholds, confs):
            conf.add(gt, np.where(top >= t, label, BACKGROUND).astype(np.uint8))
    if confs is None:
        raise ValueError("background_sweep got no images")
    results = [scores(conf) for conf in confs]
    return pd.DataFrame(
        {
            "threshold": thresholds,
            "miou": [r["miou"] for r in results],
            "mean_class_acc": [r["mean_class_acc"] for r in results],
        },
        columns=SWEEP_COLUMNS,
    )


def best_threshold(sweep: pd.DataFrame) -> float:
    """The threshold of highest mIoU (the lowest such threshold on ties)."""
    return float(sweep.loc[sweep["miou"].fillna(-1.0).idxmax(), "threshold"])


# ----------------------------------------------------------------------------------------------
# Pure core: superpixel oracle and reliability curve
# ----------------------------------------------------------------------------------------------

_MAX_DIRECT_SUPERPIXELS = 8192  # ids 0..8191 index the (n, 256) vote table directly (<= 16 MB)


def superpixel_oracle(superpixels: np.ndarray, gt: np.ndarray, ignore: int = IGNORE) -> np.ndarray:
    """Every superpixel takes its majority ground-truth class (ignore pixels not voting; the lowest
    class wins ties); a superpixel with only ignore pixels becomes ``ignore``. The best label map
    any method that labels whole superpixels could reach.
    """
    superpixels, gt = np.asarray(superpixels), np.asarray(gt)
    if superpixels.shape != gt.shape:
        raise ValueError(
            f"superpixel map shape {superpixels.shape} does not match ground truth shape {gt.shape}"
        )
    if gt.dtype != np.uint8:
        raise ValueError(f"ground truth must be a uint8 label map, got {gt.dtype}")
    if not np.issubdtype(superpixels.dtype, np.integer):
        raise ValueError(f"superpixel map must hold integer ids, got {superpixels.dtype}")
    sp = superpixels.astype(np.int64)
    if sp.size and (sp.min() < 0 or sp.max() >= _MAX_DIRECT_SUPERPIXELS):
        # Unusual ids: compact them (np.unique sorts, ~20x slower than the vote itself).
        sp = np.unique(sp, return_inverse=True)[1].reshape(gt.shape)
    n_sp = int(sp.max()) + 1 if sp.size else 0
    votes = np.bincount(sp.ravel() * 256 + gt.ravel(), minlength=n_sp * 256).reshape(n_sp, 256)
    votes[:, ignore] = 0
    majority = votes.argmax(axis=1).astype(np.uint8)
    majority[votes.sum(axis=1) == 0] = ignore
    return majority[sp]


def reliability_curve(rows: Iterable[tuple[float, Confusion]], points: int) -> pd.DataFrame:
    """mIoU of the k most reliable annotations (lowest divergence first) for k at ``points``
    evenly spaced fractions 1/points .. 1 of all annotations (SPN paper, Fig. 3a).

    NaN divergences sort last (least reliable). Returns columns k, fraction (= k / n), miou.
    """
    rows = list(rows)
    if not rows:
        raise ValueError("reliability_curve got no annotations")
    if points < 1:
        raise ValueError(f"points must be at least 1, got {points}")
    divergence = np.array([d for d, _ in rows], np.float64)
    order = np.argsort(np.where(np.isnan(divergence), np.inf, divergence), kind="stable")
    n = len(rows)
    ks = sorted({max(1, int(np.ceil(f * n - 1e-9))) for f in np.arange(1, points + 1) / points})
    total = Confusion(rows[0][1].n_classes)
    records, done = [], 0
    for k in ks:
        for i in order[done:k]:
            total.merge(rows[i][1])
        done = k
        records.append({"k": k, "fraction": k / n, "miou": scores(total)["miou"]})
    return pd.DataFrame(records, columns=CURVE_COLUMNS)


# ----------------------------------------------------------------------------------------------
# Edge: stores in, tidy CSVs out
# ----------------------------------------------------------------------------------------------

write_csv = store.write_table  # atomic CSV writes live with the other atomic writes


def read_tidy(path: str | os.PathLike) -> pd.DataFrame:
    """Read a tidy metrics CSV (the overall metrics' empty class stays '')."""
    df = pd.read_csv(path, dtype={"class": str})
    if list(df.columns) != TIDY_COLUMNS:
        raise ValueError(
            f"{path}: expected columns {','.join(TIDY_COLUMNS)}, found {','.join(map(str, df.columns))}"
        )
    df["class"] = df["class"].fillna("")
    return df


def _read_id_table(path: str | os.PathLike, columns: list[str]) -> pd.DataFrame:
    df = pd.read_csv(path, dtype={"id": str})
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)} (expected {', '.join(columns)})")
    return df


def _ids_with_masks(gt_group, gt_path, ids: list[str]) -> list[str]:
    """The ids that have a gt mask (ingest may have images with labels but no mask)."""
    have = set(store.ids_in(gt_group, store.MASKS))
    kept = [i for i in ids if i in have]
    if len(kept) < len(ids):
        log.warning(
            "%s: %d of %d images have no mask and are not evaluated", gt_path, len(ids) - len(kept), len(ids)
        )
    if not kept:
        raise store.StoreError(f"{gt_path}: none of the {len(ids)} requested images has a ground-truth mask")
    return kept


def image_confusions(
    gt_path,
    ids: list[str],
    n_classes: int,
    predict: Callable[[str], np.ndarray],
    source: str,
    desc: str = "evaluate",
    ignore: int = IGNORE,
) -> dict[str, Confusion]:
    """A Confusion per image of ``ids`` that has a gt mask; ``predict(id)`` gives its label map.

    ``source`` names what ``predict`` reads, for error messages.
    """
    gt_group = store.open_store(gt_path, "gt")
    result = {}
    for image_id in progress(_ids_with_masks(gt_group, gt_path, ids), desc):
        gt = store.get(gt_group, store.MASKS, image_id)
        try:
            result[image_id] = Confusion(n_classes, ignore).add(gt, predict(image_id))
        except ValueError as exc:
            raise ValueError(f"{source}: image '{image_id}': {exc}") from exc
    return result


def _store_predictor(pred_path, key: str, to_labels=None) -> Callable[[str], np.ndarray]:
    """``predict(id)`` for a labels store, or for a scores store with a ``to_labels`` rule."""
    pred_group = store.open_store(pred_path)
    kind = pred_group.attrs.get("kind")
    if kind == "labels":
        return lambda image_id: store.get(pred_group, key, image_id)
    if kind == "scores":
        if to_labels is None:
            raise ValueError(f"{pred_path}: a scores store needs a to_labels rule turning scores into labels")
        return lambda image_id: to_labels(*store.get_scores(pred_group, key, image_id), image_id)
    raise store.StoreError(f"{pred_path}: expected a 'labels' or 'scores' store, found '{kind}'")


def summarise(
    stage: str, split: str, confusions: dict[str, Confusion], class_names
) -> tuple[list[dict], pd.DataFrame]:
    """Tidy rows of the total over ``confusions`` and a per-image table (PER_IMAGE_COLUMNS)."""
    names = list(class_names)
    total = sum_confusions(confusions.values(), len(names))
    overall = scores(total)
    rows = tidy_rows(stage, split, overall, names)
    per_image = []
    for image_id, conf in confusions.items():
        s = scores(conf)
        per_image.append(
            {
                "id": image_id,
                "miou": s["miou"],
                "pixel_acc": s["pixel_acc"],
                "labelled_fraction": s["labelled_fraction"],
            }
        )
    log.info(
        "%s %s: mIoU %.4f, pixel acc %.4f, labelled %.3f over %d images",
        stage,
        split,
        overall["miou"],
        overall["pixel_acc"],
        overall["labelled_fraction"],
        total.n_images,
    )
    return rows, pd.DataFrame(per_image, columns=PER_IMAGE_COLUMNS)


def evaluate_labels(
    gt_path,
    pred_path,
    key: str,
    stage: str,
    split: str,
    ids: list[str],
    class_names,
    ignore: int = IGNORE,
    to_labels=None,
) -> tuple[list[dict], pd.DataFrame]:
    """Evaluate the ``key`` arrays of a labels store (or of a scores store through
    ``to_labels(scores, classes, image_id)``) against gt.zarr over ``ids``.

    Returns (tidy rows, per-image DataFrame with columns id, miou, pixel_acc, labelled_fraction).
    """
    predict = _store_predictor(pred_path, key, to_labels)
    confs = image_confusions(
        gt_path, ids, len(class_names), predict, str(pred_path), f"evaluate {stage}", ignore
    )
    return summarise(stage, split, confs, class_names)


def _score_key(pred_group, pred_path, key: str | None, stage: str) -> str:
    """The score key to evaluate: ``key``; else the store's only key; else the key named like the
    stage (scores.zarr holds both 'cam' and 'spcam', evaluated as stages 'cam' and 'spcam')."""
    keys = sorted(name for name, _ in pred_group.groups())
    if key is None:
        if len(keys) == 1:
            return keys[0]
        if stage in keys:
            return stage
        raise ValueError(
            f"{pred_path}: holds score keys {keys} and none is named like stage '{stage}'; "
            "say which key to evaluate"
        )
    if key not in keys:
        raise store.StoreError(f"{pred_path}: no '{key}' scores (has: {', '.join(keys) or 'none'})")
    return key


def _selected_ids(selection_csv, ids: list[str]) -> list[str]:
    table = _read_id_table(selection_csv, ["id", "image_selected"])
    missing = sorted(set(ids) - set(table["id"]))
    if missing:
        raise ValueError(f"{selection_csv}: no row for {len(missing)} evaluated images, e.g. {missing[:3]}")
    selected = set(table.loc[table["image_selected"].astype(bool), "id"])
    return [i for i in ids if i in selected]


def run_evaluate(
    config,
    data_path,
    gt_path,
    pred_path,
    stage: str,
    split: str,
    out_csv,
    selection_csv=None,
    per_image_csv=None,
    key: str | None = None,
) -> pd.DataFrame:
    """Evaluate one stage output on one split and write its tidy metrics CSV.

    * labels store: its label maps as they are.
    * scores store, key 'cam' / 'spcam' (pseudo-label sources, given the image-level labels from
      data.zarr): ``weakseg.labels.decide``, i.e. the argmax over the image's labels and, with a
      background class, background by the run's calibrated threshold (row 'background_threshold').
      For transparency the ground-truth sweep over ``evaluate.background_thresholds`` goes to
      ``<out stem>_sweep.csv`` with rows 'background_threshold_swept' and 'miou_at_swept_threshold'.
    * scores store, any other key ('seg': segmentation net, all classes): plain argmax.
    ``key`` picks the score key; by default the store's only key, or the one named like ``stage``.
    With ``selection_csv`` (columns id, image_selected) rows for stage ``<stage>_selected`` cover
    the selected images only.
    Returns the tidy rows written.
    """
    cfg = config_mod.load(config)
    info, _ = open_data(data_path)
    ids = info.split(split)
    names = list(info.class_names)
    pred_group = store.open_store(pred_path)
    kind = pred_group.attrs.get("kind")
    extra_rows = []
    to_labels = None
    if kind == "labels":
        key = store.LABELS
    elif kind == "scores":
        key = _score_key(pred_group, pred_path, key, stage)
        if key not in CAM_KEYS:

            def to_labels(score_map, classes, image_id):
                return argmax_scores(score_map, classes)
        else:
            # The pipeline's own rule: the image's labels compete, background by the calibrated threshold.
            threshold = store_threshold(cfg, pred_path, key, data_path)

            def to_labels(score_map, classes, image_id):
                return decide(score_map, classes, info.image_labels(image_id), info.has_background, threshold)

            if info.has_background:
                extra_rows += _swept_rows(
                    cfg, info, gt_path, pred_group, key, ids, stage, split, out_csv, threshold
                )
    # any other kind: _store_predictor raises a clear error

    predict = _store_predictor(pred_path, key, to_labels)
    confs = image_confusions(gt_path, ids, len(names), predict, str(pred_path), f"evaluate {stage}")
    rows, per_image = summarise(stage, split, confs, names)
    # How many of the split's images had a mask (n_images says how many were evaluated).
    rows += extra_rows + [
        {"stage": stage, "split": split, "metric": "split_images", "class": "", "value": len(ids)}
    ]
    if selection_csv is not None:
        chosen = _selected_ids(selection_csv, list(confs))
        if chosen:
            rows += summarise(f"{stage}_selected", split, {i: confs[i] for i in chosen}, names)[0]
        else:
            log.warning("%s: no evaluated image is selected; no '%s_selected' rows", selection_csv, stage)
    table = pd.DataFrame(rows, columns=TIDY_COLUMNS)
    write_csv(table, out_csv)
    if per_image_csv is not None:
        write_csv(per_image, per_image_csv)
    return table


def _swept_rows(
    cfg: dict,
    info,
    gt_path,
    pred_group,
    key: str,
    ids: list[str],
    stage: str,
    split: str,
    out_csv,
    threshold: float,
) -> list[dict]:
    """The calibrated threshold, and — for transparency only, since it reads ground truth — the sweep over
    ``evaluate.background_thresholds`` (written to ``<out stem>_sweep.csv``) with its best threshold and mIoU."""
    thresholds = cfg["evaluate"]["background_thresholds"]
    if not thresholds:
        raise ValueError("evaluate.background_thresholds: empty; give at least one threshold")
    gt_group = store.open_store(gt_path, "gt")

    def items():
        for image_id in progress(_ids_with_masks(gt_group, gt_path, ids), f"sweep {key}"):
            scores, classes = store.get_scores(pred_group, key, image_id)
            scores, classes = restrict_to_labels(scores, classes, info.image_labels(image_id))
            yield scores, classes, store.get(gt_group, store.MASKS, image_id), info.n_classes

    sweep = background_sweep(items(), thresholds)
    write_csv(sweep, Path(out_csv).with_name(f"{Path(out_csv).stem}_sweep.csv"))
    best = best_threshold(sweep)
    log.info(
        "%s %s: calibrated background threshold %.3f; swept optimum (uses GT) %.3f",
        stage,
        split,
        threshold,
        best,
    )
    row = {"stage": stage, "split": split, "class": ""}
    return [
        {**row, "metric": "background_threshold", "value": threshold},
        {**row, "metric": "background_threshold_swept", "value": best},
        {
            **row,
            "metric": "miou_at_swept_threshold",
            "value": float(sweep.loc[sweep["threshold"] == best, "miou"].iloc[0]),
        },
    ]


def run_oracle(data_path, gt_path, superpixels_path, split: str, out_csv) -> pd.DataFrame:
    """Tidy metrics (stage 'superpixel_oracle') of labelling every superpixel with its majority gt
    class: the ceiling that superpixel-level labelling can reach."""
    info, _ = open_data(data_path)
    sp_group = store.open_store(superpixels_path, "superpixels")
    gt_group = store.open_store(gt_path, "gt")

    def predict(image_id):
        return superpixel_oracle(
            store.get(sp_group, store.SUPERPIXELS, image_id), store.get(gt_group, store.MASKS, image_id)
        )

    confs = image_confusions(
        gt_path, info.split(split), info.n_classes, predict, str(superpixels_path), "superpixel oracle"
    )
    rows, _ = summarise("superpixel_oracle", split, confs, info.class_names)
    table = pd.DataFrame(rows, columns=TIDY_COLUMNS)
    write_csv(table, out_csv)
    return table


def run_reliability_curve(gt_path, labels_path, reliability_csv, out_csv, points: int) -> pd.DataFrame:
    """mIoU of the most reliable annotations of a labels store as more are kept (columns k,
    fraction, miou), ranking images by the ``image_divergence`` column of ``reliability_csv``."""
    table = _read_id_table(reliability_csv, ["id", "image_divergence"]).drop_duplicates("id")
    gt_group = store.open_store(gt_path, "gt")
    if "class_names" not in gt_group.attrs:
        raise store.StoreError(f"{gt_path}: attribute 'class_names' missing (re-run ingest)")
    n_classes = len(gt_group.attrs["class_names"])
    store.open_store(labels_path, "labels")  # a clear error if it is some other kind of store
    predict = _store_predictor(labels_path, store.LABELS)
    confs = image_confusions(
        gt_path, list(table["id"]), n_classes, predict, str(labels_path), "reliability curve"
    )
    divergence = dict(zip(table["id"], table["image_divergence"].astype(float)))
    curve = reliability_curve([(divergence[i], conf) for i, conf in confs.items()], points)
    write_csv(curve, out_csv)
    return curve


def combine_metrics(csv_paths, out_csv) -> pd.DataFrame:
    """Concatenate tidy metric CSVs into one (written atomically)."""
    frames = [read_tidy(p) for p in csv_paths]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=TIDY_COLUMNS)
    write_csv(table, out_csv)
    return table
