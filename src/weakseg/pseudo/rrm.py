"""Reliable regions (RRM: Zhang et al., "Reliability Does Matter", AAAI 2020): a pixel keeps its CRF
label only where a confident reading of the raw scores agrees with it; everything else is ignored (255),
so that segmentation training sees fewer but cleaner labels.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np

from weakseg import labels as label_rules
from weakseg.commands import DATA, SCORE_KEY, SHARD, Command, option, output, required
from weakseg.datasets import IGNORE
from weakseg.pseudo.jobs import ImageJob, job_labels, job_scores, make_jobs, write_labels

log = logging.getLogger("weakseg")


def reliable_regions(
    crf_labels: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    image_labels: np.ndarray,
    confidence: float,
    background: label_rules.Background,
) -> np.ndarray:
    """uint8 (H, W): the CRF label where it equals the confident label of the scores
    (``weakseg.labels.confident_labels``), else 255."""
    confident = label_rules.confident_labels(scores, classes, image_labels, confidence, background)
    # agreement refuses CRF labels of another size than the scores. Where the scores are unsure the
    # confident label is 255, so the pixel stays 255 either way.
    return label_rules.agreement(crf_labels, confident)


def _reliable_one(job: ImageJob) -> tuple[str, np.ndarray, Counter]:
    scores, classes = job_scores(job)
    crf = job_labels(job)
    labels = reliable_regions(
        crf, scores, classes, job.image_labels, job.params["confidence"], job.background
    )
    return job.image_id, labels, Counter(pixels=labels.size, kept=int(np.count_nonzero(labels != IGNORE)))


def run_reliable(
    config: dict,
    data_path,
    scores_path,
    key: str,
    crf_path,
    out_path,
    shard: int = 0,
    n_shards: int = 1,
    confidence: float | None = None,
) -> None:
    """Keep the CRF labels (store ``crf_path``) of the train images (one shard) that agree with confident
    ``key`` scores; writes a labels store at ``out_path``. ``confidence`` overrides the config's."""
    if confidence is None:
        confidence = config["pseudo"]["reliable"]["confidence"]
    params = {"confidence": confidence}
    _, jobs = make_jobs(config, data_path, scores_path, key, params, shard, n_shards, labels_path=crf_path)
    counts = write_labels(out_path, "reliable", config, _reliable_one, jobs, key=key)
    log.info(
        "reliable: %.1f%% of pixels keep their CRF label", 100.0 * counts["kept"] / max(counts["pixels"], 1)
    )


COMMAND = Command(
    "rrm",
    "RRM reliable regions: CRF label where it agrees with a confident CAM label",
    run_reliable,
    (
        *SHARD,
        DATA,
        required("--scores", "scores_path", "scores store of the confident labels"),
        SCORE_KEY,
        required("--crf", "crf_path", "labels store of the CRF stage"),
        output("out_path", "output labels store (.zarr), 255 = not reliable"),
        option("--confidence", type=float, default=None, help="override pseudo.reliable.confidence"),
    ),
    sections=("dataset", "pseudo"),
    writes=("out_path",),
)
