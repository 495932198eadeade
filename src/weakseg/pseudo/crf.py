"""Dense CRF refinement (Krähenbühl & Koltun 2011, via pydensecrf) of class score maps into labels.

The unary is -log of per-pixel class probabilities over the image's labelled classes (plus a
background channel derived from low scores when the scores carry none), and a Gaussian (smoothness)
plus a bilateral (colour) kernel pull labels onto image edges. The probabilities (``pseudo.crf.unary``)
are the normalised scores themselves, or, for CAM scores, the similarity of each pixel's encoder
features to per-image class prototypes built from the cleaned annotation (``weakseg.pseudo.prototypes``).
"""

from __future__ import annotations

import logging
from collections import Counter
from functools import lru_cache

import numpy as np
import pydensecrf.densecrf as dcrf

from weakseg import labels as label_rules
from weakseg import timing
from weakseg.commands import THREADS, Command, option, optional
from weakseg.errors import UserError
from weakseg.pseudo.clean import LABEL_RULE_SECTIONS, SCORES_TO_LABELS
from weakseg.pseudo.jobs import ImageJob, job_image, job_scores, make_jobs, write_labels

log = logging.getLogger("weakseg")

CRF_KEYS = (
    "iterations",
    "gaussian_sxy",
    "gaussian_compat",
    "bilateral_sxy",
    "bilateral_srgb",
    "bilateral_compat",
    "unary_floor",
)
UNARIES = ("scores", "prototypes")


def crf_probabilities(
    scores: np.ndarray,
    classes: np.ndarray,
    image_labels: np.ndarray,
    has_background: bool,
    background_threshold: float | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (K', H, W) float32 summing to 1 per pixel, and their class indices (K',).

    The channels are those of ``weakseg.labels.with_background``: the image's labelled classes (for
    images without known labels pass all classes), with the calibrated background score prepended as
    class 0 when the scores carry no background channel, so that the unary's argmax is the threshold
    rule's label. Each pixel is then normalised over the channels; a pixel where all are 0 gets a
    uniform distribution.
    """
    kept, kept_classes = label_rules.with_background(
        scores, classes, image_labels, has_background, background_threshold
    )
    if len(kept_classes) == 0:
        raise ValueError(
            f"crf: none of the score classes {np.asarray(classes).tolist()} is among the image labels "
            f"{np.asarray(image_labels).tolist()}, and there is no background to fall back on"
        )
    total = kept.sum(axis=0, keepdims=True)
    probs = np.where(total > 0, kept / np.maximum(total, np.finfo(np.float32).tiny), 1.0 / len(kept))
    return probs.astype(np.float32), kept_classes.astype(np.int64)


def dense_crf(image: np.ndarray, probs: np.ndarray, crf_params: dict) -> np.ndarray:
    """Mean-field inference of a fully connected CRF; returns the (K, H, W) marginals.

    Unary = -log(max(p, unary_floor)): the floor keeps a zero probability from becoming an
    infinite energy that no amount of colour evidence could overturn.
    """
    missing = [k for k in CRF_KEYS if k not in crf_params]
    if missing:
        raise KeyError(f"pseudo.crf: missing parameters {missing} (load the config with weakseg.config.load)")
    probs = np.asarray(probs, dtype=np.float32)
    n_classes, height, width = probs.shape
    if image.shape != (height, width, 3):
        raise ValueError(f"crf: image of shape {image.shape} does not match scores of size {height}x{width}")
    if n_classes == 1:
        return np.ones_like(probs)  # nothing to decide
    # pydensecrf reads raw buffers: it needs C-contiguous uint8 RGB and float32 (K, H*W) energies.
    image = np.ascontiguousarray(image, dtype=np.uint8)
    unary = np.ascontiguousarray(
        -np.log(np.clip(probs, crf_params["unary_floor"], 1.0)).reshape(n_classes, -1)
    )
    crf = dcrf.DenseCRF2D(width, height, n_classes)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=crf_params["gaussian_sxy"], compat=crf_params["gaussian_compat"])
    crf.addPairwiseBilateral(
        sxy=crf_params["bilateral_sxy"],
        srgb=crf_params["bilateral_srgb"],
        rgbim=image,
        compat=crf_params["bilateral_compat"],
    )
    marginals = crf.inference(int(crf_params["iterations"]))
    return np.asarray(marginals, dtype=np.float32).reshape(n_classes, height, width)


def crf_labels(
    image: np.ndarray, probs: np.ndarray, prob_classes: np.ndarray, crf_params: dict
) -> np.ndarray:
    """uint8 (H, W) labels: at each pixel the class (from ``prob_classes``) of the highest CRF marginal,
    for probabilities made by ``crf_probabilities``."""
    with timing.kernel("crf"):
        marginals = dense_crf(image, probs, crf_params)
    return np.asarray(prob_classes)[marginals.argmax(axis=0)].astype(np.uint8)


@lru_cache(maxsize=2)
def _feature_encoder(model_path: str, data_path: str):
    """The encoder of a CAM model file, loaded once per worker process. One torch thread: the stage
    runs one worker process per core."""
    import torch

    from weakseg.cam.infer import load_cam_model
    from weakseg.datasets import open_data

    torch.set_num_threads(1)
    return load_cam_model(model_path, open_data(data_path)[0]).encoder


def _unary_probabilities(job: ImageJob, scores, classes, image) -> tuple[np.ndarray, np.ndarray]:
    if job.params["unary"] == "scores":
        return crf_probabilities(
            scores, classes, job.image_labels, job.background.has_background, job.background.threshold
        )
    from weakseg.pseudo.prototypes import image_prototype_probabilities

    encoder = _feature_encoder(job.params["model_path"], job.data_path)
    with timing.kernel("prototypes"):
        return image_prototype_probabilities(
            encoder,
            image,
            scores,
            classes,
            job.image_labels,
            job.background,
            job.params["clean_ratio"],
            job.params["temperature"],
        )


def _crf_one(job: ImageJob) -> tuple[str, np.ndarray, Counter]:
    scores, classes = job_scores(job)
    image = job_image(job)
    if image.shape[:2] != scores.shape[1:]:
        raise ValueError(
            f"{job.scores_path}: '{job.key}/{job.image_id}' scores are {scores.shape[1:]} but the "
            f"image is {image.shape[:2]}"
        )
    probs, prob_classes = _unary_probabilities(job, scores, classes, image)
    labels = crf_labels(image, probs, prob_classes, job.params["crf"])
    # How far the CRF moved labels from the argmax of its own input, for the log.
    changed = int(np.count_nonzero(labels != prob_classes[probs.argmax(axis=0)]))
    return job.image_id, labels, Counter(pixels=labels.size, changed=changed)


def run_crf(
    config: dict,
    data_path,
    scores_path,
    key: str,
    out_path,
    threads: int,
    shard: int = 0,
    n_shards: int = 1,
    split: str | None = None,
    labels_from=None,
    model_path=None,
    unary: str | None = None,
) -> None:
    """CRF-refine the ``key`` scores of the images of ``split`` (default train; one shard) into a labels
    store at ``out_path``, on ``threads`` worker processes; logs images/s. Outside the train split
    image labels are unknown: every class in the scores competes, or those the classifier of the CAM
    scores store ``labels_from`` predicts present (see ``known_labels``).

    ``unary`` (default ``pseudo.crf.unary``): ``scores``, or ``prototypes``, which needs the CAM model
    file ``model_path`` whose encoder gives the features."""
    crf_cfg = config["pseudo"]["crf"]
    unary = unary or crf_cfg["unary"]
    if unary not in UNARIES:
        raise UserError(f"pseudo.crf.unary: expected one of {', '.join(UNARIES)}, got {unary!r}")
    if unary == "prototypes" and model_path is None:
        raise UserError(
            "pseudo.crf.unary 'prototypes' needs the CAM model file whose encoder gives the features "
            "(weakseg crf --model cam/model.pt), or --unary scores"
        )
    params = {
        "crf": {k: v for k, v in crf_cfg.items() if k in CRF_KEYS},
        "unary": unary,
        "model_path": None if model_path is None else str(model_path),
        "clean_ratio": config["pseudo"]["clean_ratio"],
        "temperature": crf_cfg["prototype_temperature"],
    }
    _, jobs = make_jobs(
        config,
        data_path,
        scores_path,
        key,
        params,
        shard,
        n_shards,
        with_image=True,
        split=split,
        labels_from=labels_from,
    )
    counts = write_labels(
        out_path,
        "crf",
        config,
        _crf_one,
        jobs,
        threads,
        key=key,
        unary=unary,
        background_threshold=jobs[0].background.threshold if jobs else None,
    )
    log.info(
        "crf: %s unary; %.1f%% of pixels changed from the argmax of the scores",
        unary,
        100.0 * counts["changed"] / max(counts["pixels"], 1),
    )
    timing.log_kernel_seconds()


COMMAND = Command(
    "crf",
    "dense CRF refinement of score maps",
    run_crf,
    (
        THREADS,
        *SCORES_TO_LABELS,
        optional(
            "--model",
            "model_path",
            "cam/model.pt written by train-cam: its encoder's features make the 'prototypes' unary",
        ),
        option("--unary", choices=UNARIES, default=None, help="override pseudo.crf.unary"),
    ),
    sections=LABEL_RULE_SECTIONS,
    writes=("out_path",),
)
