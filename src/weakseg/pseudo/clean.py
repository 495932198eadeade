"""Annotation cleaning (SPN paper, Kwak et al. 2017, §5.2): per labelled class keep only the pixels
whose score is a sizeable fraction of that class's peak in the image, then let the kept classes compete.
"""
from __future__ import annotations

import logging
from collections import Counter

import numpy as np

from weakseg.datasets import IGNORE
from weakseg.pseudo import (ImageJob, check_scores, implicit_background, job_scores, labelled_channels, make_jobs,
                            write_labels)

log = logging.getLogger("weakseg")


def clean_annotation(scores: np.ndarray, classes: np.ndarray, image_labels: np.ndarray, ratio: float,
                     has_background: bool) -> np.ndarray:
    """Pixel labels (uint8 (H, W)) from (K, H, W) scores of ``classes``.

    Only channels of classes in ``image_labels`` take part. Class k keeps the pixels with score
    >= ratio * (its maximum over the image) and > 0 — a zero score is no evidence, and without that
    rule ratio 0 would let a class with an all-zero map claim every pixel. A pixel takes the kept
    class with the highest score (ties: the first channel). A pixel no class keeps becomes 0
    (background) when the dataset has a background class that the scores do not carry, else 255.
    When 0 is a channel (segmentation probabilities) it competes like any other class.
    ratio = 0 is therefore the argmax over the labelled classes.
    """
    scores = np.asarray(scores, dtype=np.float32)
    classes = np.asarray(classes)
    check_scores(scores, classes)
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"clean ratio: expected a number in [0, 1], got {ratio}")
    fill = 0 if implicit_background(classes, has_background) else IGNORE
    labels = np.full(scores.shape[1:], fill, dtype=np.uint8)
    channels = labelled_channels(classes, image_labels)
    if channels.size == 0:
        return labels
    kept_scores = scores[channels]
    peaks = kept_scores.reshape(len(channels), -1).max(axis=1)
    kept = (kept_scores >= ratio * peaks[:, None, None]) & (kept_scores > 0)
    best = np.where(kept, kept_scores, -1.0).argmax(axis=0)
    claimed = kept.any(axis=0)
    labels[claimed] = classes[channels][best[claimed]]
    return labels


def empty_labelled_maps(scores: np.ndarray, classes: np.ndarray, image_labels: np.ndarray) -> int:
    """How many labelled classes have an all-zero score map (they can claim no pixel)."""
    channels = labelled_channels(classes, image_labels)
    return int(sum(not np.any(scores[c] > 0) for c in channels))


def _clean_one(job: ImageJob) -> tuple[str, np.ndarray, Counter]:
    scores, classes = job_scores(job)
    labels = clean_annotation(scores, classes, job.image_labels, job.params["ratio"], job.has_background)
    # Pixels no class kept: the fill value tells whether they became background or ignore.
    unclaimed = "to_background" if implicit_background(classes, job.has_background) else "to_ignore"
    fill = 0 if unclaimed == "to_background" else IGNORE
    counts = Counter(pixels=labels.size, **{unclaimed: int(np.count_nonzero(labels == fill))},
                     empty_maps=empty_labelled_maps(scores, classes, job.image_labels),
                     labelled_maps=int(labelled_channels(classes, job.image_labels).size))
    return job.image_id, labels, counts


def run_clean(config: dict, data_path, scores_path, key: str, out_path, ratio: float | None = None,
              shard: int = 0, n_shards: int = 1, split: str | None = None, labels_from=None) -> None:
    """Clean the ``key`` scores of the images of ``split`` (default train; one shard) into a labels
    store at ``out_path``. Outside the train split the labels are unknown: all classes, or those
    predicted by the classifier of the CAM scores store ``labels_from`` (see ``known_labels``)."""
    ratio = config["pseudo"]["clean_ratio"] if ratio is None else ratio
    _, jobs = make_jobs(config, data_path, scores_path, key, {"ratio": ratio}, shard, n_shards, split=split,
                        labels_from=labels_from)
    counts = write_labels(out_path, "clean", config, _clean_one, jobs, key=key, ratio=ratio)
    if counts["empty_maps"]:
        log.warning("clean: %d of %d labelled class score maps are all zero; those classes label no pixel",
                    counts["empty_maps"], counts["labelled_maps"])
    pixels = max(counts["pixels"], 1)
    log.info("clean (ratio %.2f): pixels kept by no labelled class: %.1f%% -> background, %.1f%% -> ignore",
             ratio, 100.0 * counts["to_background"] / pixels, 100.0 * counts["to_ignore"] / pixels)
