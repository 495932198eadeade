"""The one set of rules that turns class scores into pixel labels.

Every stage that makes labels from scores — cleaning, the CRF unary, RRM reliable regions, the
evaluation of score maps, round annotations and val predictions — decides here, so that the
stages can differ only in what they feed in, never in what a score means.

Conventions:

* Scores are (K, H, W) in [0, 1] with one class index per channel (``classes``).
* Only the classes an image is labelled with compete (``restrict_to_labels``). Outside the train
  split, callers pass the classes predicted present, or all classes.
* ``IGNORE`` (255) means "no label".
* **Background.** Segmentation probabilities carry class 0 as a channel, and it competes like any
  other class. CAM / SP-CAM scores cover foreground classes only ("implicit background"): a pixel
  is background when its best labelled score is below the run's **background threshold** t. The
  threshold is calibrated once per score map kind from the training split's own score
  distribution, without pixel ground truth (``calibrate_threshold``), so that it adapts to the
  CAM method, backbone and dataset. Wherever background needs a score of its own (the CRF unary),
  it is (1 - m)^a with a = ln t / ln(1 - t), m the best labelled score: that curve crosses m
  exactly at m = t, so the CRF's unary argmax and the threshold rule make the same decision.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

IGNORE = 255  # the label value that means "no label", in every store, mask and loss


log = logging.getLogger("weakseg")

BACKGROUND = 0  # class index of the background when a dataset has one
LEVELS = 256  # scores are stored as uint8 levels (store.SCORE_SCALE); histograms use the same bins
CALIBRATION_METHODS = ("otsu", "triangle", "fixed")


@dataclass(frozen=True)
class Background:
    """A run's background decision, as one value: whether the dataset has a background class (0) and,
    for CAM scores (implicit background), the calibrated ``threshold`` and the relative ``margin`` of
    the uncertain band around it (``uncertain_band``)."""

    has_background: bool
    threshold: float | None = None
    margin: float = 0.0


# ----------------------------------------------------------------------------------------------
# Score maps and the classes that compete
# ----------------------------------------------------------------------------------------------


def check_scores(scores: np.ndarray, classes) -> tuple[np.ndarray, np.ndarray]:
    """Scores must be (K, H, W) with one class index per channel; returns (float32 scores, int64 classes)."""
    scores, classes = np.asarray(scores, np.float32), np.asarray(classes, np.int64)
    if scores.ndim != 3 or classes.shape != (scores.shape[0],):
        raise ValueError(
            f"scores: expected shape (K, H, W) with one class per channel, got scores "
            f"{scores.shape} and {classes.shape[0] if classes.ndim else 0} classes"
        )
    return scores, classes


def implicit_background(classes, has_background: bool) -> bool:
    """True when the dataset has a background class but the scores carry no channel for it (CAM and
    SP-CAM scores): background then comes from the threshold rule."""
    return bool(has_background) and BACKGROUND not in set(np.asarray(classes).tolist())


def labelled_channels(classes, image_labels) -> np.ndarray:
    """Indices into ``classes`` (the score channels) of the classes the image is labelled with."""
    return np.flatnonzero(np.isin(np.asarray(classes), np.asarray(image_labels)))


def restrict_to_labels(scores: np.ndarray, classes, image_labels) -> tuple[np.ndarray, np.ndarray]:
    """Keep only the score channels of classes among the image-level labels."""
    scores, classes = check_scores(scores, classes)
    keep = labelled_channels(classes, image_labels)
    return scores[keep], classes[keep]


def top_class(scores: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: the class of the highest score (the first channel on ties) and that score.
    With no channel at all: class IGNORE and score 0."""
    if len(classes) == 0:
        return np.full(scores.shape[1:], IGNORE, np.int64), np.zeros(scores.shape[1:], np.float32)
    best = scores.argmax(axis=0)
    return classes[best], np.take_along_axis(scores, best[None], axis=0)[0]


def argmax_scores(scores: np.ndarray, classes) -> np.ndarray:
    """Dense prediction over every channel (segmentation probabilities, background included)."""
    scores, classes = check_scores(scores, classes)
    if len(classes) == 0:
        raise ValueError("no score channels to take the argmax over")
    return top_class(scores, classes)[0].astype(np.uint8)


def threshold_background(scores: np.ndarray, classes, threshold: float) -> np.ndarray:
    """classes[argmax] where the top score >= ``threshold``, else background. No channel: all background."""
    scores, classes = check_scores(scores, classes)
    label, top = top_class(scores, classes)
    return np.where(top >= threshold, label, BACKGROUND).astype(np.uint8)


def decide(
    scores: np.ndarray, classes, image_labels, has_background: bool, threshold: float | None
) -> np.ndarray:
    """The dense label map of ``scores`` for an image with ``image_labels``: the argmax over the labelled
    classes; with an implicit background, background where the top labelled score is below
    ``threshold``. An image none of whose labels has a channel is all background (implicit background)
    or unlabelled (``IGNORE``)."""
    scores, classes = restrict_to_labels(scores, classes, image_labels)
    if implicit_background(classes, has_background):
        if threshold is None:
            raise ValueError(
                "a background threshold is needed to label CAM scores of a dataset with background"
            )
        return threshold_background(scores, classes, threshold)
    return top_class(scores, classes)[0].astype(np.uint8)


argmax_over_labels = decide  # the rule without background, by its usual name in the literature


def predicted_labels(label_probabilities, classes, threshold: float, has_background: bool) -> np.ndarray:
    """Classes a classifier predicts present: probability >= threshold, at least its most likely class;
    background (0) always when the dataset has one."""
    probs, classes = np.asarray(label_probabilities, np.float64), np.asarray(classes, np.int64)
    keep = set(classes[probs >= threshold].tolist()) | (
        {int(classes[probs.argmax()])} if probs.size else set()
    )
    if has_background:
        keep.add(BACKGROUND)
    return np.array(sorted(keep), np.int64)


# ----------------------------------------------------------------------------------------------
# Background as a score (CRF unary) and the confident / uncertain bands
# ----------------------------------------------------------------------------------------------


def background_exponent(threshold: float) -> float:
    """a with (1 - t)^a = t: the background score (1 - m)^a equals the best class score m at m = t."""
    t = float(np.clip(threshold, 1e-3, 1 - 1e-3))
    return math.log(t) / math.log(1.0 - t)


def background_score(peak: np.ndarray, threshold: float) -> np.ndarray:
    """Background score of pixels whose best labelled class score is ``peak``: above ``peak`` exactly
    where ``peak`` < threshold."""
    return np.power(np.clip(1.0 - np.asarray(peak, np.float32), 0.0, 1.0), background_exponent(threshold))


def with_background(
    scores: np.ndarray, classes, image_labels, has_background: bool, threshold: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """The labelled channels, with a background channel prepended (class 0) when the background is
    implicit. Returns (scores (K', H, W), classes (K',)); per pixel their argmax equals ``decide``."""
    kept, kept_classes = restrict_to_labels(scores, classes, image_labels)
    kept = np.clip(kept, 0.0, 1.0)
    if implicit_background(classes, has_background):
        if threshold is None:
            raise ValueError(
                "a background threshold is needed to label CAM scores of a dataset with background"
            )
        peak = kept.max(axis=0) if len(kept_classes) else np.zeros(kept.shape[1:], np.float32)
        kept = np.concatenate([background_score(peak, threshold)[None], kept])
        kept_classes = np.concatenate([[BACKGROUND], kept_classes])
    return kept, kept_classes


def fraction_of_peak(
    scores: np.ndarray, classes, image_labels, ratio: float, has_background: bool
) -> np.ndarray:
    """SPN annotation cleaning: class k keeps the pixels whose score is >= ratio x its peak in the image
    (and > 0: a zero score is no evidence); a pixel takes the kept class of highest score. A pixel no
    class keeps is background (implicit background) or ``IGNORE``. With max-normalised maps (peak 1) and
    ratio = the background threshold this is the threshold rule of ``decide``."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"clean ratio: expected a number in [0, 1], got {ratio}")
    kept_scores, kept_classes = restrict_to_labels(scores, classes, image_labels)
    fill = BACKGROUND if implicit_background(classes, has_background) else IGNORE
    labels = np.full(kept_scores.shape[1:], fill, dtype=np.uint8)
    if len(kept_classes) == 0:
        return labels
    peaks = kept_scores.reshape(len(kept_classes), -1).max(axis=1)
    kept = (kept_scores >= ratio * peaks[:, None, None]) & (kept_scores > 0)
    best = np.where(kept, kept_scores, -1.0).argmax(axis=0)
    claimed = kept.any(axis=0)
    labels[claimed] = kept_classes[best[claimed]]
    return labels


def uncertain_band(threshold: float, margin: float) -> tuple[float, float]:
    """(low, high): with an implicit background a best score <= low is confident background and >= high
    a confident object; between them the pixel is uncertain. ``margin`` in [0, 1) widens the band
    around the threshold proportionally on each side (0: no band)."""
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin: expected a number in [0, 1), got {margin}")
    return threshold * (1.0 - margin), threshold + margin * (1.0 - threshold)


def confident_labels(
    scores: np.ndarray, classes, image_labels, confidence: float, background: Background
) -> np.ndarray:
    """uint8 (H, W): labels where the scores are confident, ``IGNORE`` elsewhere.

    Explicit channels (no background class, or segmentation probabilities): the argmax over the
    labelled classes where its score >= ``confidence``. Implicit background: outside the uncertain
    band around the background threshold (``uncertain_band``), the ``decide`` label."""
    has_background = background.has_background
    if implicit_background(classes, has_background):
        if background.threshold is None:
            raise ValueError(
                "a background threshold is needed to label CAM scores of a dataset with background"
            )
        band = uncertain_band(background.threshold, background.margin)
        return banded_labels(scores, classes, image_labels, has_background, *band)
    return banded_labels(scores, classes, image_labels, has_background, 0.0, confidence)


def comparable(first, second) -> tuple[np.ndarray, np.ndarray]:
    """The two label maps as arrays, refused unless they have one shape."""
    first, second = np.asarray(first), np.asarray(second)
    if first.shape != second.shape:
        raise ValueError(
            f"label maps of shapes {first.shape} and {second.shape} cannot be compared"
            " (were both made from the same data store?)"
        )
    return first, second


def agreement(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """uint8 (H, W): the label where two label maps give the same one, ``IGNORE`` elsewhere (and where
    both are ``IGNORE``)."""
    first, second = comparable(first, second)
    return np.where(first == second, first, IGNORE).astype(np.uint8)


def pruned(checker: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """uint8 (H, W): ``labels``, ``IGNORE`` where ``checker`` gives another label (where ``checker`` is
    ``IGNORE``, ``labels`` stand)."""
    checker, labels = comparable(checker, labels)
    contradicted = (checker != IGNORE) & (checker != labels)
    return np.where(contradicted, IGNORE, labels).astype(np.uint8)


def banded_labels(
    scores: np.ndarray, classes, image_labels, has_background: bool, low: float, high: float
) -> np.ndarray:
    """uint8 (H, W) labels of an explicit confident / uncertain split of the best labelled score m.

    Implicit background: background where m <= ``low``, the best labelled class where m >= ``high``
    (and > low), ``IGNORE`` between. Explicit channels: the best labelled class where m >= ``high``,
    ``IGNORE`` elsewhere (``low`` is unused: no score says "background")."""
    kept_scores, kept_classes = restrict_to_labels(scores, classes, image_labels)
    label, top = top_class(kept_scores, kept_classes)
    labels = np.full(kept_scores.shape[1:], IGNORE, dtype=np.uint8)
    if implicit_background(classes, has_background):
        labels[top <= low] = BACKGROUND
        confident = (top >= high) & (top > low)
        labels[confident] = label[confident]
        return labels
    confident = (top >= high) & (label != IGNORE)
    labels[confident] = label[confident]
    return labels


# ----------------------------------------------------------------------------------------------
# Calibrating the background threshold (no pixel ground truth)
# ----------------------------------------------------------------------------------------------


def top_score_histogram(
    scores: np.ndarray, classes, image_labels, mask: np.ndarray | None = None
) -> np.ndarray:
    """(LEVELS,) counts of the best labelled score of each pixel (of the pixels where ``mask`` is True,
    if given), in uint8 score levels. An image without a labelled channel adds nothing (its pixels say
    nothing about objects)."""
    kept, kept_classes = restrict_to_labels(scores, classes, image_labels)
    if len(kept_classes) == 0:
        return np.zeros(LEVELS, np.int64)
    levels = np.clip(np.rint(kept.max(axis=0) * (LEVELS - 1)), 0, LEVELS - 1).astype(np.int64)
    return np.bincount(levels[mask] if mask is not None else levels.ravel(), minlength=LEVELS)


def otsu_threshold(histogram: np.ndarray) -> float:
    """Otsu's threshold of a (LEVELS,) histogram of scores in [0, 1]: the split that maximises the
    between-class variance of "object" and "background" pixels. Returns a score in (0, 1): pixels with
    score >= it are on the object side."""
    hist = np.asarray(histogram, np.float64)
    if hist.ndim != 1 or hist.size < 2 or hist.sum() <= 0:
        raise ValueError("otsu_threshold: expected a non-empty 1-d histogram")
    p = hist / hist.sum()
    values = np.arange(hist.size) / (hist.size - 1)
    w0 = np.cumsum(p)[:-1]  # weight of levels 0..k (background side of a split after level k)
    mu0_sum = np.cumsum(p * values)[:-1]
    mu_total = float((p * values).sum())
    w1 = 1.0 - w0
    valid = (w0 > 0) & (w1 > 0)
    between = np.zeros_like(w0)
    between[valid] = (mu_total * w0[valid] - mu0_sum[valid]) ** 2 / (w0[valid] * w1[valid])
    if not valid.any():  # a single occupied level: no split exists
        return float(np.clip(values[int(np.argmax(hist))], 1.0 / (hist.size - 1), 1.0))
    # Splits after level k (object side from level k + 1). Empty levels between two modes tie: take the
    # middle of the tied run, so that the threshold does not hug either mode.
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    return float((values[best[0] + 1] + values[best[-1] + 1]) / 2)


def triangle_threshold(histogram: np.ndarray) -> float:
    """Zack's triangle threshold of a (LEVELS,) histogram: the level farthest below the line from the
    histogram's peak to its far (high-score) end. Suited to a dominant low-score mode (background) with
    a long tail of object scores, where Otsu's two-class split can land inside the dominant mode."""
    hist = np.asarray(histogram, np.float64)
    if hist.ndim != 1 or hist.size < 2 or hist.sum() <= 0:
        raise ValueError("triangle_threshold: expected a non-empty 1-d histogram")
    values = np.arange(hist.size) / (hist.size - 1)
    peak = int(np.argmax(hist))
    last = int(np.flatnonzero(hist)[-1])
    if last <= peak + 1:
        return float(values[min(peak + 1, hist.size - 1)])
    levels = np.arange(peak, last + 1)
    # Distance (up to a constant factor) of each histogram point below the peak-to-end line.
    line = hist[peak] + (hist[last] - hist[peak]) * (levels - peak) / (last - peak)
    k = levels[int(np.argmax(line - hist[levels]))]
    return float(values[min(k + 1, hist.size - 1)])


def calibrate_threshold(histogram: np.ndarray, method: str, fixed: float) -> float:
    """The background threshold of a run from the histogram of its training pixels' best labelled
    scores: ``otsu`` or ``triangle`` (data-driven), or ``fixed`` (the configured constant)."""
    if method == "fixed":
        return float(fixed)
    if method == "otsu":
        return otsu_threshold(histogram)
    if method == "triangle":
        return triangle_threshold(histogram)
    raise ValueError(
        f"pseudo.background.method: expected one of {', '.join(CALIBRATION_METHODS)}, got {method!r}"
    )


def running_threshold(histogram: np.ndarray, method: str, fixed: float) -> float:
    """``calibrate_threshold`` of a histogram that may still be empty (one-stage training calibrates on
    its recent batches): the fixed threshold until some labelled pixel has been counted."""
    if np.asarray(histogram).sum() <= 0:
        return float(fixed)
    return calibrate_threshold(histogram, method, fixed)


# ----------------------------------------------------------------------------------------------
# Edge: the calibrated threshold of a scores store
# ----------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _store_histogram(scores_path: str, key: str, data_path: str, split: str) -> tuple[np.ndarray, int]:
    from weakseg import store
    from weakseg.datasets import open_data

    info, _ = open_data(data_path)
    group = store.open_store(scores_path, "scores")
    present = set(store.ids_in(group, key))
    total, n = np.zeros(LEVELS, np.int64), 0
    for image_id in info.split(split):
        if image_id in present:
            scores, classes = store.get_scores(group, key, image_id)
            total += top_score_histogram(scores, classes, info.image_labels(image_id))
            n += 1
    return total, n


def store_threshold(config: dict, scores_path, key: str, data_path) -> float | None:
    """The background threshold for the ``key`` scores of a scores store, calibrated on the training
    split by ``pseudo.background``; None when the dataset has no background class."""
    from weakseg.datasets import open_data

    info, _ = open_data(data_path)
    if not info.has_background:
        return None
    rule = config["pseudo"]["background"]
    if rule["method"] == "fixed":
        return float(rule["threshold"])
    split = config["dataset"]["train_split"]
    histogram, n = _store_histogram(str(scores_path), key, str(data_path), split)
    if histogram.sum() == 0:
        log.warning(
            "%s: no '%s' scores of labelled %s images to calibrate the background on; using the fixed "
            "pseudo.background.threshold %.2f",
            scores_path,
            key,
            split,
            rule["threshold"],
        )
        return float(rule["threshold"])
    threshold = calibrate_threshold(histogram, rule["method"], rule["threshold"])
    log.info(
        "background threshold of %s '%s': %.3f (%s over %d %s images)",
        scores_path,
        key,
        threshold,
        rule["method"],
        n,
        split,
    )
    return threshold
