"""Annotation cleaning (SPN paper, Kwak et al. 2017, §5.2) and the dense decision of score maps.

Cleaning keeps only what the scores say with confidence. Without an implicit background (no
background class, or segmentation probabilities) each labelled class keeps the pixels whose score is
a sizeable fraction of its peak in the image (``pseudo.clean_ratio``), and the kept classes compete;
other pixels are ignored. With an implicit background (CAM scores of a background dataset) the
calibrated background rule decides, and the pixels in its uncertain band are ignored.

``decide`` (the command ``weakseg decide``) is the dense counterpart: every pixel gets the label
of the one rule in ``weakseg.labels`` — used for round annotations and for val predictions, where
the competing classes are the image's labels or those the CAM classifier predicts present.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np

from weakseg import labels as label_rules
from weakseg.commands import DATA, LABELS_FROM, SCORE_KEY, SHARD, SPLIT, Command, option, output, required
from weakseg.datasets import IGNORE
from weakseg.pseudo.jobs import ImageJob, job_scores, make_jobs, write_labels

log = logging.getLogger("weakseg")


def clean_annotation(
    scores: np.ndarray,
    classes: np.ndarray,
    image_labels: np.ndarray,
    ratio: float,
    background: label_rules.Background,
) -> np.ndarray:
    """Pixel labels (uint8 (H, W), 255 = ignore) from (K, H, W) scores of ``classes``: the SPN
    fraction-of-peak rule, or, with an implicit background, the confident labels of the calibrated
    background rule."""
    if label_rules.implicit_background(classes, background.has_background):
        return label_rules.confident_labels(scores, classes, image_labels, 1.0, background)
    return label_rules.fraction_of_peak(scores, classes, image_labels, ratio, background.has_background)


def empty_labelled_maps(scores: np.ndarray, classes: np.ndarray, image_labels: np.ndarray) -> int:
    """How many labelled classes have an all-zero score map (they can claim no pixel)."""
    channels = label_rules.labelled_channels(classes, image_labels)
    return int(sum(not np.any(scores[c] > 0) for c in channels))


def _clean_one(job: ImageJob) -> tuple[str, np.ndarray, Counter]:
    scores, classes = job_scores(job)
    labels = clean_annotation(scores, classes, job.image_labels, job.params["ratio"], job.background)
    counts = Counter(
        pixels=labels.size,
        ignored=int(np.count_nonzero(labels == IGNORE)),
        background=int(np.count_nonzero(labels == label_rules.BACKGROUND))
        if job.background.has_background
        else 0,
        empty_maps=empty_labelled_maps(scores, classes, job.image_labels),
        labelled_maps=int(label_rules.labelled_channels(classes, job.image_labels).size),
    )
    return job.image_id, labels, counts


def _decide_one(job: ImageJob) -> tuple[str, np.ndarray, Counter]:
    scores, classes = job_scores(job)
    background = job.background
    labels = label_rules.decide(
        scores, classes, job.image_labels, background.has_background, background.threshold
    )
    return job.image_id, labels, Counter(pixels=labels.size, ignored=int(np.count_nonzero(labels == IGNORE)))


def run_clean(
    config: dict,
    data_path,
    scores_path,
    key: str,
    out_path,
    ratio: float | None = None,
    shard: int = 0,
    n_shards: int = 1,
    split: str | None = None,
    labels_from=None,
) -> None:
    """Clean the ``key`` scores of the images of ``split`` (default train; one shard) into a labels
    store at ``out_path``. Outside the train split the labels are unknown: all classes, or those
    predicted by the classifier of the CAM scores store ``labels_from`` (see ``known_labels``)."""
    ratio = config["pseudo"]["clean_ratio"] if ratio is None else ratio
    _, jobs = make_jobs(
        config,
        data_path,
        scores_path,
        key,
        {"ratio": ratio},
        shard,
        n_shards,
        split=split,
        labels_from=labels_from,
    )
    threshold = jobs[0].background.threshold if jobs else None
    counts = write_labels(
        out_path, "clean", config, _clean_one, jobs, key=key, ratio=ratio, background_threshold=threshold
    )
    if counts["empty_maps"]:
        log.warning(
            "clean: %d of %d labelled class score maps are all zero; those classes label no pixel",
            counts["empty_maps"],
            counts["labelled_maps"],
        )
    pixels = max(counts["pixels"], 1)
    log.info(
        "clean: %.1f%% of pixels background, %.1f%% ignored",
        100.0 * counts["background"] / pixels,
        100.0 * counts["ignored"] / pixels,
    )


def run_decide(
    config: dict,
    data_path,
    scores_path,
    key: str,
    out_path,
    shard: int = 0,
    n_shards: int = 1,
    split: str | None = None,
    labels_from=None,
) -> None:
    """Dense labels (``weakseg.labels.decide``) of the ``key`` scores of the images of ``split`` (default
    train): the argmax over the image's labels (train) or the classes the CAM classifier of
    ``labels_from`` predicts present (``segment.val_labels``), background by the calibrated threshold."""
    _, jobs = make_jobs(
        config, data_path, scores_path, key, {}, shard, n_shards, split=split, labels_from=labels_from
    )
    threshold = jobs[0].background.threshold if jobs else None
    counts = write_labels(
        out_path, "decide", config, _decide_one, jobs, key=key, background_threshold=threshold
    )
    log.info("decide: %.1f%% of pixels unlabelled", 100.0 * counts["ignored"] / max(counts["pixels"], 1))


# Options of the commands that turn one scores store into one labels store.
SCORES_TO_LABELS = (
    *SHARD,
    SPLIT,
    LABELS_FROM,
    DATA,
    required("--scores", "scores_path", "scores store to turn into labels"),
    SCORE_KEY,
    output("out_path", "output labels store (.zarr)"),
)
# The label rules read pseudo.* and, outside the train split, how val images get their classes.
LABEL_RULE_SECTIONS = ("dataset", "pseudo", "segment.val_labels", "segment.label_threshold")

COMMANDS = (
    Command(
        "clean",
        "annotation cleaning: keep what the scores say with confidence",
        run_clean,
        (*SCORES_TO_LABELS, option("--ratio", type=float, default=None, help="override pseudo.clean_ratio")),
        sections=LABEL_RULE_SECTIONS,
        writes=("out_path",),
    ),
    Command(
        "decide",
        "dense labels: argmax over the image's (or predicted) classes, background by the calibrated threshold",
        run_decide,
        SCORES_TO_LABELS,
        sections=LABEL_RULE_SECTIONS,
        writes=("out_path",),
    ),
)
