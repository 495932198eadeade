"""All metric math: confusion matrices, IoU / accuracy / over-activation, background sweeps, the
superpixel oracle and the reliability curve. Arrays in, numbers and tables out; ``weakseg.evaluate``
is the edge that reads the stores.

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

from collections.abc import Iterable

import numpy as np
import pandas as pd

from weakseg.datasets import IGNORE
from weakseg.labels import BACKGROUND, check_scores, top_class

TIDY_COLUMNS = ["stage", "split", "metric", "class", "value"]
SWEEP_COLUMNS = ["threshold", "miou", "mean_class_acc"]
CURVE_COLUMNS = ["k", "fraction", "miou"]
ANNOTATION_CURVE_COLUMNS = ["fraction", "annotations", "miou"]
PER_IMAGE_COLUMNS = ["id", "miou", "pixel_acc", "labelled_fraction"]


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


def confusion_metrics(conf: Confusion) -> dict:
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
    results = [confusion_metrics(conf) for conf in confs]
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


def _kept(fraction: float, n: int) -> int:
    """How many of n ranked items a fraction keeps: ceil(fraction * n), at least 1 (the epsilon keeps
    e.g. 0.3 * 10 from rounding up to 4)."""
    return max(1, int(np.ceil(fraction * n - 1e-9)))


def reliability_curve(rows: Iterable[tuple[float, Confusion]], points: int) -> pd.DataFrame:
    """mIoU of the k most reliable annotations (lowest reliability score first) for k at ``points``
    evenly spaced fractions 1/points .. 1 of all annotations (SPN paper, Fig. 3a).

    NaN scores sort last (least reliable). Returns columns k, fraction (= k / n), miou.
    """
    rows = list(rows)
    if not rows:
        raise ValueError("reliability_curve got no annotations")
    if points < 1:
        raise ValueError(f"points must be at least 1, got {points}")
    score = np.array([d for d, _ in rows], np.float64)
    order = np.argsort(np.where(np.isnan(score), np.inf, score), kind="stable")
    n = len(rows)
    ks = sorted({_kept(f, n) for f in np.arange(1, points + 1) / points})
    total = Confusion(rows[0][1].n_classes)
    records, done = [], 0
    for k in ks:
        for i in order[done:k]:
            total.merge(rows[i][1])
        done = k
        records.append({"k": k, "fraction": k / n, "miou": confusion_metrics(total)["miou"]})
    return pd.DataFrame(records, columns=CURVE_COLUMNS)


def annotation_curve(rows: Iterable[tuple[int, float, Confusion]], points: int) -> pd.DataFrame:
    """mIoU of the annotations that a per-class selection keeps, for fractions 1/points .. 1.

    ``rows``: one (class, score, confusion of the annotation's image) per annotation; lower scores
    are more reliable (NaN last). At fraction f each class keeps its ceil(f * n_c) lowest-scored
    annotations, as ``pseudo.top_fraction`` does (SPN paper, Fig. 3a: top-K per class). The IoU of
    class c pools, over its kept annotations only, the pixels labelled c or of ground truth c in those
    images; the curve is the mean over classes. Unlike ``reliability_curve`` it scores each
    annotation on its own class, so another class of the same image neither helps nor hurts it.
    Returns columns fraction, annotations (kept), miou.
    """
    rows = list(rows)
    if not rows:
        raise ValueError("annotation_curve got no annotations")
    if points < 1:
        raise ValueError(f"points must be at least 1, got {points}")
    by_class: dict[int, list[tuple[float, int, tuple[int, int, int]]]] = {}
    for position, (c, score, conf) in enumerate(rows):
        m = conf.matrix
        tp = int(m[c, c])
        counts = (tp, int(m[:, c].sum()) - tp, int(m[c, :].sum()) - tp)  # TP, FP, FN of class c
        key = np.inf if np.isnan(score) else float(score)
        by_class.setdefault(int(c), []).append((key, position, counts))
    ranked = {c: np.array([counts for _, _, counts in sorted(v)], np.int64) for c, v in by_class.items()}
    records = []
    for f in np.arange(1, points + 1) / points:
        ious, kept = [], 0
        for counts in ranked.values():
            k = _kept(f, len(counts))
            tp, fp, fn = counts[:k].sum(axis=0)
            kept += k
            if tp + fp + fn:
                ious.append(tp / (tp + fp + fn))
        records.append({"fraction": f, "annotations": kept, "miou": float(np.mean(ious)) if ious else np.nan})
    return pd.DataFrame(records, columns=ANNOTATION_CURVE_COLUMNS)
