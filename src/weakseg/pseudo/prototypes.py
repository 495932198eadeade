"""Per-image class prototypes: a CRF unary from the image's own encoder features.

The cleaned annotation (``weakseg.pseudo.clean``) labels the pixels whose scores are confident; the
CAM's weakest part is the band between them, where an object's extent and the background are decided.
Within one image an object's pixels look alike to a mid-level encoder: each labelled class (and the
background) gets a prototype, the mean feature over its cleaned pixels in this image, and every pixel
the class probabilities of a softmax over its cosine similarity to the prototypes. The idea is SIPE's
image-specific prototypes (Chen et al., CVPR 2022); here the seeds are the cleaning stage's labels and
the features those of the CAM network's encoder at strides 8 and 16, with nothing trained.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from weakseg import labels as label_rules
from weakseg.nets.backbones import Encoder, normalise
from weakseg.pseudo.clean import clean_annotation

# Encoder.stage_ends indices of the layers whose outputs are the features: the last at stride 8 and 16.
FEATURE_STAGES = (1, 2)


@torch.inference_mode()
def encoder_features(encoder: Encoder, image: np.ndarray) -> torch.Tensor:
    """(D, h, w) float32 features of an (H, W, 3) uint8 image on the stride-8 grid: the outputs of the
    ``FEATURE_STAGES`` layers, the coarser resized bilinearly to the finer grid, each unit-normalised per
    location, concatenated and scaled so that every location's vector has norm 1."""
    if len(encoder.stage_ends) < max(FEATURE_STAGES) + 1:
        raise ValueError(
            f"prototypes: the encoder declares stage ends {encoder.stage_ends}, not strides 8 and 16"
        )
    taps = [encoder.stage_ends[i] for i in FEATURE_STAGES]
    x = normalise(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None], encoder)
    _, tapped = encoder.forward_features(x, taps=taps, stop_after=max(taps))
    grid = tapped[taps[0]].shape[-2:]
    parts = [
        F.normalize(F.interpolate(tapped[t].float(), size=grid, mode="bilinear", align_corners=False), dim=1)
        for t in taps
    ]
    return (torch.cat(parts, dim=1) / len(parts) ** 0.5)[0]


def cell_weights(labels: np.ndarray, classes, grid) -> torch.Tensor:
    """(K, h*w): the fraction of each cell of an (h, w) feature grid that each class of ``classes``
    covers in the (H, W) ``labels``; 255 (ignore) covers no class."""
    masks = torch.from_numpy(np.stack([np.asarray(labels) == c for c in classes]).astype(np.float32))
    return F.interpolate(masks[None], size=tuple(grid), mode="area")[0].reshape(len(classes), -1)


def class_feature_sums(features: torch.Tensor, labels: np.ndarray, classes) -> torch.Tensor:
    """(K, D): per class of ``classes``, the sum of the (D, h, w) ``features`` weighted by
    ``cell_weights``. Normalised, one image's sums are its prototypes; summed over images first, the
    dataset's (``weakseg.pseudo.consistency``)."""
    weights = cell_weights(labels, classes, features.shape[-2:])
    return weights @ features.reshape(features.shape[0], -1).T


def class_prototypes(features: torch.Tensor, seeds: np.ndarray, classes: np.ndarray) -> torch.Tensor:
    """(K, D) unit prototypes of ``classes`` from (D, h, w) features and (H, W) seed labels: per class,
    the mean feature weighted by the fraction of each grid cell its seed pixels cover. A class with no
    seed pixel gets a zero prototype (similarity 0 everywhere)."""
    return F.normalize(class_feature_sums(features, seeds, classes), dim=1)  # a zero row stays zero


def prototype_probabilities(
    features: torch.Tensor, seeds: np.ndarray, classes: np.ndarray, temperature: float
) -> np.ndarray:
    """(K, H, W) float32 class probabilities, H x W the seeds' size: at every location a softmax over
    ``temperature`` x the cosine similarity (clipped at 0) of its feature to each class's prototype
    (``class_prototypes``), computed on the feature grid and resized bilinearly to the image."""
    if temperature <= 0:
        raise ValueError(f"pseudo.crf.prototype_temperature: expected a positive number, got {temperature}")
    prototypes = class_prototypes(features, seeds, classes)
    grid = features.shape[-2:]
    similarity = (prototypes @ features.reshape(features.shape[0], -1)).clamp(min=0)
    similarity = F.interpolate(
        similarity.reshape(1, len(classes), *grid), size=np.shape(seeds), mode="bilinear", align_corners=False
    )[0]
    return torch.softmax(temperature * similarity, dim=0).numpy().astype(np.float32)


def seed_labels(cleaned: np.ndarray, dense: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """The cleaned labels, where a class of ``classes`` that cleaning left without a pixel takes its
    pixels of the dense decision instead: an object whose scores never reached confidence still gets a
    prototype of its own rather than losing all its pixels to the others."""
    seeds = np.array(cleaned, copy=True)
    for c in classes:
        if not np.any(seeds == c):
            seeds[np.asarray(dense) == c] = c
    return seeds


def image_prototype_probabilities(
    encoder: Encoder,
    image: np.ndarray,
    scores: np.ndarray,
    classes,
    image_labels,
    background: label_rules.Background,
    clean_ratio: float,
    temperature: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (K', H, W) and their classes (K',) for one image, the channels of
    ``weakseg.labels.with_background``, from the prototypes of its cleaned annotation."""
    _, kept_classes = label_rules.with_background(
        scores, classes, image_labels, background.has_background, background.threshold
    )
    cleaned = clean_annotation(scores, classes, image_labels, clean_ratio, background)
    dense = label_rules.decide(scores, classes, image_labels, background.has_background, background.threshold)
    seeds = seed_labels(cleaned, dense, kept_classes)
    probs = prototype_probabilities(encoder_features(encoder, image), seeds, kept_classes, temperature)
    return probs, kept_classes.astype(np.int64)
