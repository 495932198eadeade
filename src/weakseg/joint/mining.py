"""Pixel labels mined online from the classification branch's CAMs (pure cores, no files).

``annealed`` (Wang, Tan, Feng 2024, with ToCo's PAR): the CAMs are refined by pixel-adaptive
refinement, then split by a cosine-annealed threshold th(t): a best labelled score >= th(t) gives its
class, <= the low threshold gives background, in between the pixel is ignored. Without a background
class only the confident side exists: the best labelled class where its score >= th(t).

``rrm`` (Zhang et al., reliable region mining): the dense CRF's labels of the CAMs, kept where they
agree with the confident reading of the same CAMs, ignored elsewhere. That is a per-image numpy job
(``reliable_job``) run on a worker pool by the training loop.

Every score-to-label decision goes through ``weakseg.labels`` and the CRF / reliable-region cores of
``weakseg.pseudo``, so that the one-stage labels mean what the two-step stages' labels mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from weakseg import labels as label_rules
from weakseg.datasets import IGNORE
from weakseg.pseudo.crf import crf_labels, crf_probabilities
from weakseg.pseudo.rrm import reliable_regions

PAR_EPS = 1e-8  # keeps a neighbourhood of one colour (standard deviation 0) finite


def annealed_threshold(iteration: int, total: int, start: float, end: float) -> float:
    """th(t) = th(0) - (th(0) - th(T)) (1 - cos(t pi / T)) / 2: ``start`` at t = 0, ``end`` at t = T,
    monotone between (cosine annealing). ``iteration`` is clipped to [0, total]."""
    if total <= 0:
        raise ValueError(f"annealed threshold: total iterations must be > 0, got {total}")
    t = min(max(iteration, 0), total)
    return start - 0.5 * (start - end) * (1.0 - math.cos(t * math.pi / total))


def _offsets(dilations) -> list[tuple[int, int]]:
    """The 8 neighbours of a pixel at each dilation (ToCo's dilated 3x3 neighbourhood)."""
    return [
        (dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)
    ]


def _shifted(padded: torch.Tensor, dy: int, dx: int, pad: int, height: int, width: int) -> torch.Tensor:
    """The value at (y + dy, x + dx) for every (y, x), from a tensor padded by ``pad`` (replicated edges)."""
    return padded[..., pad + dy : pad + dy + height, pad + dx : pad + dx + width]


def par(
    image: torch.Tensor,
    maps: torch.Tensor,
    dilations=(1, 2, 4, 8),
    iterations: int = 10,
    colour_weight: float = 0.3,
    position_weight: float = 0.01,
) -> torch.Tensor:
    """Pixel-adaptive refinement (ToCo): each pixel's maps become the affinity-weighted mean of its
    dilated 8-neighbourhoods' maps, ``iterations`` times.

    image (B, 3, H, W) float, maps (B, K, H, W). The affinity of neighbour j of pixel i is a softmax
    over the neighbourhood of -(|I_i - I_j| / (colour_weight * std_i))^2 averaged over colour
    channels (std_i: the colour spread of i's neighbourhood, so the kernel adapts to local contrast),
    plus ``position_weight`` x a softmax of the spatial closeness; the sum is renormalised to 1, so a
    constant map stays constant. Maps that already follow the colour edges barely change.
    """
    if image.ndim != 4 or image.shape[1] != 3 or maps.ndim != 4 or maps.shape[-2:] != image.shape[-2:]:
        raise ValueError(
            f"par: expected image (B, 3, H, W) and maps (B, K, H, W) of the same size, "
            f"got {tuple(image.shape)} and {tuple(maps.shape)}"
        )
    offsets = _offsets(dilations)
    pad = max(dilations)
    height, width = image.shape[-2:]
    image = image.float()
    padded = F.pad(image, (pad, pad, pad, pad), mode="replicate")
    neighbours = torch.stack([_shifted(padded, dy, dx, pad, height, width) for dy, dx in offsets], dim=2)
    spread = neighbours.std(dim=2, keepdim=True)  # (B, 3, 1, H, W)
    colour = -(((neighbours - image[:, :, None]).abs() / (spread + PAR_EPS) / colour_weight) ** 2).mean(1)
    distance = torch.tensor([math.hypot(dy, dx) for dy, dx in offsets], dtype=image.dtype)
    closeness = -((distance / (distance.std() + PAR_EPS)) ** 2)
    affinity = F.softmax(colour, dim=1) + position_weight * F.softmax(closeness, dim=0)[None, :, None, None]
    affinity = affinity / (1.0 + position_weight)  # (B, N, H, W), sums to 1 over the neighbours
    refined = maps.float()
    for _ in range(iterations):
        padded_maps = F.pad(refined, (pad, pad, pad, pad), mode="replicate")
        refined = sum(
            affinity[:, n : n + 1] * _shifted(padded_maps, dy, dx, pad, height, width)
            for n, (dy, dx) in enumerate(offsets)
        )
    return refined


def annealed_labels(
    scores: np.ndarray,
    classes,
    image_labels,
    has_background: bool,
    threshold: float,
    low: float,
) -> np.ndarray:
    """uint8 (H, W) labels of one image's refined CAM scores (K, H, W) at the annealed ``threshold``:
    ``weakseg.labels.banded_labels`` with the confident side at ``threshold`` and, with an implicit
    background, the sure-background side at ``low``."""
    return label_rules.banded_labels(scores, classes, image_labels, has_background, low, threshold)


@dataclass(frozen=True)
class ReliableJob:
    """One image of a batch for the RRM worker pool: arrays at the mining resolution (picklable)."""

    image: np.ndarray  # (H, W, 3) uint8
    scores: np.ndarray  # (K, H, W) float32 CAM scores in [0, 1]
    classes: np.ndarray  # (K,) class index of each channel
    image_labels: np.ndarray  # class indices the image is labelled with
    valid: np.ndarray  # (H, W) bool: False on the padding of the training view
    background: label_rules.Background
    crf: dict  # pseudo.crf parameters (spatial ones already at the mining resolution)
    confidence: float


def reliable_job(job: ReliableJob) -> np.ndarray:
    """RRM's reliable regions of one image: the dense CRF labels of its CAM scores where they agree with
    the confident labels of those scores (``weakseg.pseudo.rrm.reliable_regions``); IGNORE
    elsewhere and on padding. Runs in a worker process (numpy and pydensecrf only)."""
    probs, prob_classes = crf_probabilities(
        job.scores, job.classes, job.image_labels, job.background.has_background, job.background.threshold
    )
    refined = crf_labels(job.image, probs, prob_classes, job.crf)
    reliable = reliable_regions(
        refined, job.scores, job.classes, job.image_labels, job.confidence, job.background
    )
    return np.where(job.valid, reliable, IGNORE).astype(np.uint8)


def crf_at_resolution(crf: dict, factor: float) -> dict:
    """pseudo.crf parameters for images scaled by ``factor``: the spatial standard deviations scale
    with the image, the colour one and the weights do not."""
    return {
        **crf,
        "gaussian_sxy": crf["gaussian_sxy"] * factor,
        "bilateral_sxy": crf["bilateral_sxy"] * factor,
    }
