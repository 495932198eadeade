"""Reliable regions (RRM: Zhang et al., "Reliability Does Matter", AAAI 2020): a pixel keeps its CRF
label only where a confident reading of the raw scores agrees with it; everything else is ignored (255),
so that segmentation training sees fewer but cleaner labels.
"""
from __future__ import annotations

import logging
from collections import Counter

import numpy as np

from weakseg.datasets import IGNORE
from weakseg.pseudo import (ImageJob, check_scores, implicit_background, job_labels, job_scores, labelled_channels,
                            make_jobs, write_labels)

log = logging.getLogger("weakseg")


def confident_labels(scores: np.ndarray, classes: np.ndarray, image_labels: np.ndarray, has_background: bool,
                     confidence: float, background_confidence: float) -> np.ndarray:
    """uint8 (H, W): the argmax over the labelled classes where that max score >= ``confidence``;
    when the scores carry no background channel of a background dataset, a pixel whose max labelled
    score is <= ``background_confidence`` is confident background (0); everything else 255.
    When 0 is a channel (segmentation probabilities) background competes in the argmax instead."""
    scores = np.asarray(scores, dtype=np.float32)
    classes = np.asarray(classes)
    check_scores(scores, classes)
    if background_confidence >= confidence:
        raise ValueError(f"pseudo.reliable: background_confidence ({background_confidence}) must be below "
                         f"confidence ({confidence}), otherwise a pixel could be confidently both")
    labels = np.full(scores.shape[1:], IGNORE, dtype=np.uint8)
    channels = labelled_channels(classes, image_labels)
    peak = scores[channels].max(axis=0) if channels.size else np.zeros(scores.shape[1:], np.float32)
    if channels.size:
        best = classes[channels][scores[channels].argmax(axis=0)]
        confident = peak >= confidence
        labels[confident] = best[confident]
    if implicit_background(classes, has_background):
        labels[peak <= background_confidence] = 0
    return labels


def reliable_regions(crf_labels: np.ndarray, scores: np.ndarray, classes: np.ndarray, image_labels: np.ndarray,
                     has_background: bool, confidence: float, background_confidence: float) -> np.ndarray:
    """uint8 (H, W): the CRF label where it equals the confident score label, else 255."""
    confident = confident_labels(scores, classes, image_labels, has_background, confidence, background_confidence)
    crf_labels = np.asarray(crf_labels)
    if crf_labels.shape != confident.shape:
        raise ValueError(f"reliable regions: CRF labels of shape {crf_labels.shape} do not match scores of "
                         f"size {confident.shape}")
    # Where the scores are unsure the confident label is 255, so the pixel stays 255 either way.
    return np.where(crf_labels == confident, crf_labels, IGNORE).astype(np.uint8)


def _reliable_one(job: ImageJob) -> tuple[str, np.ndarray, Counter]:
    scores, classes = job_scores(job)
    crf = job_labels(job)
    labels = reliable_regions(crf, scores, classes, job.image_labels, job.has_background,
                              job.params["confidence"], job.params["background_confidence"])
    return job.image_id, labels, Counter(pixels=labels.size, kept=int(np.count_nonzero(labels != IGNORE)))


def run_reliable(config: dict, data_path, scores_path, key: str, crf_path, out_path, shard: int = 0,
                 n_shards: int = 1, confidence: float | None = None) -> None:
    """Keep the CRF labels (store ``crf_path``) of the train images (one shard) that agree with confident
    ``key`` scores; writes a labels store at ``out_path``. ``confidence`` overrides the config's."""
    params = dict(config["pseudo"]["reliable"])
    if confidence is not None:
        params["confidence"] = confidence
    _, jobs = make_jobs(config, data_path, scores_path, key, params, shard, n_shards, labels_path=crf_path)
    counts = write_labels(out_path, "reliable", config, _reliable_one, jobs, key=key)
    log.info("reliable: %.1f%% of pixels keep their CRF label", 100.0 * counts["kept"] / max(counts["pixels"], 1))
