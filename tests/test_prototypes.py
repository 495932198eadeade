"""Per-image prototypes: the CRF unary from the image's own encoder features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from weakseg import config
from weakseg.errors import UserError
from weakseg.labels import IGNORE
from weakseg.nets.backbones import build_encoder
from weakseg.pseudo.crf import run_crf
from weakseg.pseudo.prototypes import (
    class_prototypes,
    encoder_features,
    prototype_probabilities,
    seed_labels,
)


def _two_region_features(h: int = 8, w: int = 8) -> torch.Tensor:
    """Unit features: the left half of the grid points one way, the right half another."""
    features = torch.zeros(2, h, w)
    features[0, :, : w // 2] = 1.0
    features[1, :, w // 2 :] = 1.0
    return features


def test_prototypes_extend_small_seeds_to_the_regions_that_look_alike():
    features = _two_region_features()
    seeds = np.full((32, 32), IGNORE, np.uint8)  # the image is 4x the feature grid
    seeds[4:8, 2:6] = 0  # a little background, inside the left region
    seeds[20:28, 24:28] = 5  # a little object, inside the right region
    probs = prototype_probabilities(features, seeds, np.array([0, 5]), temperature=10.0)
    assert probs.shape == (2, 32, 32) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    # Away from the boundary between the regions every pixel goes to its region's seed class, with
    # the confidence of a similarity of 1 against 0 at temperature 10.
    assert (probs[0, :, :12] > 0.99).all() and (probs[1, :, 20:] > 0.99).all()
    # A lower temperature gives the same decisions with less confidence.
    soft = prototype_probabilities(features, seeds, np.array([0, 5]), temperature=1.0)
    assert (soft.argmax(0) == probs.argmax(0)).all() and soft[0, 0, 0] < probs[0, 0, 0]


def test_prototypes_weigh_grid_cells_by_seed_coverage_and_a_class_without_seeds_gets_none():
    features = _two_region_features()
    seeds = np.full((32, 32), IGNORE, np.uint8)
    seeds[:, 14:17] = 3  # 2 seed columns in the left half's last cell column, 1 in the right half's first
    prototypes = class_prototypes(features, seeds, np.array([3, 7]))
    # Area weights 2:1 of the two feature directions, normalised; class 7 has no seed pixel.
    np.testing.assert_allclose(prototypes[0].numpy(), np.array([2.0, 1.0]) / np.sqrt(5.0), atol=1e-5)
    assert torch.count_nonzero(prototypes[1]) == 0


def test_seed_labels_give_a_class_cleaning_dropped_its_dense_pixels():
    cleaned = np.full((4, 6), IGNORE, np.uint8)
    cleaned[:, :2] = 1
    dense = np.zeros((4, 6), np.uint8)
    dense[:, :3] = 1
    dense[:, 4:] = 2  # class 2 never reached confidence: cleaning left it no pixel
    seeds = seed_labels(cleaned, dense, np.array([0, 1, 2]))
    np.testing.assert_array_equal(seeds[:, :2], 1)
    np.testing.assert_array_equal(seeds[:, 4:], 2)  # from the dense decision
    # Class 0 had no cleaned pixel either: it takes its dense pixels; class 1 keeps its cleaned seeds.
    np.testing.assert_array_equal(seeds[:, 3], 0)
    np.testing.assert_array_equal(seeds[:, 2], IGNORE)
    assert (cleaned[:, 4:] == IGNORE).all()  # the input is not modified


def test_encoder_features_are_unit_vectors_on_the_stride_8_grid():
    encoder = build_encoder("efficientnet_lite0", pretrained=False, output_stride=16).eval()
    image = np.random.default_rng(0).integers(0, 256, (50, 66, 3), dtype=np.uint8)
    features = encoder_features(encoder, image)
    channels = sum(encoder.stage_channels[1:3])
    assert features.shape == (channels, 7, 9)  # ceil(50 / 8), ceil(66 / 8)
    np.testing.assert_allclose(features.norm(dim=0).numpy(), 1.0, atol=1e-5)


def test_prototype_unary_without_a_model_is_refused_before_anything_is_written(tmp_path):
    cfg = config.load({"pseudo": {"crf": {"unary": "prototypes"}}})
    out = tmp_path / "crf.zarr"
    with pytest.raises(UserError, match=r"pseudo\.crf\.unary 'prototypes'.*--model"):
        run_crf(cfg, tmp_path / "data.zarr", tmp_path / "scores.zarr", "spcam", out, threads=1)
    assert not out.exists()
    with pytest.raises(UserError, match=r"pseudo\.crf\.unary: expected one of scores, prototypes"):
        run_crf(
            cfg, tmp_path / "data.zarr", tmp_path / "scores.zarr", "spcam", out, threads=1, unary="colour"
        )
