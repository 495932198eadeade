"""CAM / SPN: superpixel pooling, the SPN forward pass and loss, training-time resizing, inference scores."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from weakseg.cam.infer import image_scores, max_normalise
from weakseg.cam.models import (
    SPN,
    CAMNet,
    build_classifier,
    mean_per_image,
    multilabel_loss,
    superpixel_pool,
)
from weakseg.cam.train import square_resize
from weakseg.config import load
from weakseg.nets.backbones import normalise

N_CLASSES = 3


def tiny_cam_config(**overrides) -> dict:
    """A randomly initialised, narrow classifier config (defaults from the schema)."""
    return load({"cam": {"pretrained": False, "extra_channels": 8, **overrides}})["cam"]


def slow_superpixel_pool(features: torch.Tensor, superpixels: torch.Tensor):
    """Reference: per image, per superpixel id present (ascending), the mean feature."""
    rows, owners = [], []
    for b in range(features.shape[0]):
        for sp_id in sorted(set(superpixels[b].unique().tolist()) - {-1}):
            mask = superpixels[b] == sp_id
            rows.append(features[b][:, mask].mean(1))
            owners.append(b)
    return torch.stack(rows), torch.tensor(owners)


def block_superpixels(h: int, w: int, block_h: int, block_w: int) -> np.ndarray:
    """A grid of rectangular superpixels, ids row-major from 0."""
    cols = -(-w // block_w)
    return (np.arange(h)[:, None] // block_h) * cols + np.arange(w)[None, :] // block_w


# ------------------------------------------------------------------ superpixel pooling


def test_superpixel_pool_matches_slow_reference_with_different_counts_and_padding():
    gen = torch.Generator().manual_seed(0)
    b, d, h, w = 3, 5, 12, 14
    features = torch.randn(b, d, h, w, generator=gen)
    superpixels = torch.stack(
        [
            torch.randint(0, 17, (h, w), generator=gen),  # many superpixels
            torch.randint(0, 3, (h, w), generator=gen),  # few
            torch.randint(0, 6, (h, w), generator=gen),
        ]
    )
    superpixels[1, :4] = -1  # padding rows (square_resize pads with -1)
    superpixels[2, :, -5:] = -1
    pooled, image_index = superpixel_pool(features, superpixels)
    expected, expected_index = slow_superpixel_pool(features, superpixels)
    assert pooled.shape == expected.shape
    torch.testing.assert_close(pooled, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(image_index, expected_index)
    # counts differ per image: the pooling must not assume one superpixel count for the batch
    assert len(set(torch.bincount(image_index).tolist())) == 3


def test_superpixel_pool_drops_absent_superpixels():
    features = torch.arange(2 * 1 * 2 * 3, dtype=torch.float32).reshape(2, 1, 2, 3)
    superpixels = torch.tensor(
        [
            [[0, 0, 2], [5, 5, -1]],  # ids 1, 3, 4 absent at this resolution
            [[-1, 1, 1], [-1, 1, 1]],
        ]
    )
    pooled, image_index = superpixel_pool(features, superpixels)
    # image 0: id 0 -> pixels 0, 1; id 2 -> pixel 2; id 5 -> pixels 3, 4; image 1: id 1 -> pixels 7, 8, 10, 11
    assert pooled[:, 0].tolist() == [0.5, 2.0, 3.5, 9.0]
    assert image_index.tolist() == [0, 0, 0, 1]


def test_superpixel_pool_rejects_mismatched_map():
    with pytest.raises(ValueError, match="does not match"):
        superpixel_pool(torch.zeros(1, 2, 4, 4), torch.zeros(1, 4, 5, dtype=torch.long))


def test_superpixel_pool_gradcheck():
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(2, 3, 5, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    superpixels = torch.randint(0, 4, (2, 5, 6), generator=gen)
    superpixels[1, 0] = -1
    assert torch.autograd.gradcheck(lambda f: superpixel_pool(f, superpixels)[0], (features,))


def test_mean_per_image():
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0], [-2.0, 6.0], [5.0, 5.0]])
    image_index = torch.tensor([0, 0, 2, 2, 2])
    means = mean_per_image(values, image_index, 3)
    expected = torch.tensor(
        [[2.0, 3.0], [0.0, 0.0], [13 / 3, 11 / 3]]
    )  # image 1 has no rows -> zeros, not NaN
    torch.testing.assert_close(means, expected)


# ------------------------------------------------------------------ SPN / CAM models


@pytest.fixture(scope="module", params=["transposed", "bilinear"])
def spn(request) -> SPN:
    torch.manual_seed(0)
    model = build_classifier(tiny_cam_config(upsampling=request.param), N_CLASSES)
    assert isinstance(model, SPN) and model.upsampling == request.param
    return model


def two_image_batch():
    """Two 32x32 images: one with 64 superpixels (4x4 blocks), one with 4 and padding columns."""
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    many = torch.from_numpy(block_superpixels(32, 32, 4, 4))
    few = torch.from_numpy(block_superpixels(32, 32, 16, 16) % 4)
    few[:, 24:] = -1
    return x, torch.stack([many, few]).long()


def test_spn_forward_shapes_and_loss_composition(spn):
    x, sp = two_image_batch()
    spn.train()
    out = spn(x, sp)
    assert out["sp_logits"].shape == (2, N_CLASSES) and out["gap_logits"].shape == (2, N_CLASSES)
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    total, parts = multilabel_loss(out, targets, gap_weight=0.3)
    sp_loss = F.multilabel_soft_margin_loss(out["sp_logits"], targets)
    gap_loss = F.multilabel_soft_margin_loss(out["gap_logits"], targets)
    torch.testing.assert_close(total, sp_loss + 0.3 * gap_loss)
    assert parts == pytest.approx({"loss_sp": sp_loss.item(), "loss_gap": gap_loss.item()})
    # without superpixels there is no SP branch: the loss is the GAP loss alone
    gap_only, parts = multilabel_loss(spn(x), targets, gap_weight=0.3)
    assert set(parts) == {"loss_gap"} and gap_only.item() == pytest.approx(parts["loss_gap"])


def test_spn_gradients_reach_encoder_and_both_classifiers(spn):
    x, sp = two_image_batch()
    spn.train()
    spn.zero_grad(set_to_none=True)
    total, _ = multilabel_loss(spn(x, sp), torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]), 1.0)
    total.backward()
    learned_upsampling = ("extra.0.weight", "upsample.0.weight") if spn.upsampling == "transposed" else ()
    for name in (
        "encoder.body.stem.conv.weight",
        "sp_classifier.weight",
        "classifier.weight",
        *learned_upsampling,
    ):
        grad = dict(spn.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    spn.zero_grad(set_to_none=True)


def test_spn_sp_logits_are_per_image_mean_of_superpixel_scores(spn):
    """Mixed superpixel counts in one batch: each image's SP logits equal the mean over its own
    superpixels of the SP classifier applied at every fine location (the classifier is linear)."""
    x, sp = two_image_batch()
    spn.eval()  # BatchNorm with running statistics: images no longer depend on their batch mates
    with torch.no_grad():
        batch_logits = spn(x, sp)["sp_logits"]
        score_map = spn.sp_score_map(x)  # (2, C, 8, 8): 32x32 input, stride 16, x4 upsampling
        assert score_map.shape == (2, N_CLASSES, 8, 8)
        fine_sp = sp[:, ::4, ::4]  # blocks are 4x4-aligned, so nearest resizing is exact
        for b in range(2):
            per_sp = [
                score_map[b][:, fine_sp[b] == k].mean(1) for k in fine_sp[b].unique().tolist() if k >= 0
            ]
            torch.testing.assert_close(batch_logits[b], torch.stack(per_sp).mean(0), rtol=1e-4, atol=1e-5)
            single = spn(x[b : b + 1], sp[b : b + 1])["sp_logits"][0]
            torch.testing.assert_close(batch_logits[b], single, rtol=1e-4, atol=1e-5)


def test_bilinear_spn_pools_scores_exactly_as_pooling_upsampled_features():
    """The paper pools features, then classifies; pooling class scores instead is the same (all linear)."""
    torch.manual_seed(0)
    model = build_classifier(tiny_cam_config(upsampling="bilinear"), N_CLASSES).eval()
    assert not hasattr(model, "extra") and model.sp_classifier.in_features == model.encoder.out_channels
    x, sp = two_image_batch()
    with torch.no_grad():
        logits = model(x, sp)["sp_logits"]
        feats = model.encoder(normalise(x, model.encoder))
        fine = F.interpolate(feats, scale_factor=4, mode="bilinear", align_corners=False)
        fine_sp = sp[:, ::4, ::4]
        sp_feats, owner = superpixel_pool(fine, fine_sp)
        expected = model.sp_classifier(mean_per_image(sp_feats, owner, 2))
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)


def test_cam_model_has_no_sp_branch():
    torch.manual_seed(0)
    model = build_classifier(tiny_cam_config(model="cam"), N_CLASSES)
    assert type(model) is CAMNet
    x, sp = two_image_batch()
    assert set(model(x, sp)) == {"gap_logits"}


# ------------------------------------------------------------------ training-time square resize


PALETTE = np.stack(
    [(np.arange(20) * 37) % 256, (np.arange(20) * 91 + 50) % 256, (np.arange(20) * 13 + 100) % 256], 1
).astype(np.uint8)


def interior(sp: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood has one superpixel id (linear resampling is exact there)."""
    padded = np.pad(sp, 1, mode="edge")
    h, w = sp.shape
    same = np.ones_like(sp, bool)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            same &= padded[dy : dy + h, dx : dx + w] == sp
    return same


@pytest.mark.parametrize("size", [50, 64, 96])
@pytest.mark.parametrize("seed", [0, 1])
def test_square_resize_superpixels_follow_the_image(size, seed):
    h, w = 48, 80
    superpixels = block_superpixels(h, w, 12, 16).astype(np.int32)  # 20 superpixels, id -> PALETTE[id]
    image = PALETTE[superpixels]
    pad_colour = image.reshape(-1, 3).mean(0).astype(np.uint8)
    for flip in (False, True):
        out_image, out_sp = square_resize(image, superpixels, size, flip, np.random.default_rng(seed))
        assert out_image.shape == (size, size, 3) and out_sp.shape == (size, size)
        assert set(np.unique(out_sp)) == set(range(20)) | {-1}
        inside = interior(out_sp)
        assert inside.mean() > 0.3
        is_sp = inside & (out_sp >= 0)
        assert np.array_equal(out_image[is_sp], PALETTE[out_sp[is_sp]])
        is_pad = inside & (out_sp < 0)
        assert np.all(out_image[is_pad] == pad_colour)
        # a wide image is padded above/below: padding fills whole rows, about (w - h) / w of them
        pad_rows = (out_sp < 0).all(1)
        assert np.array_equal(pad_rows, (out_sp < 0).any(1))
        assert abs(pad_rows.mean() - (w - h) / w) <= 2 / size
    # same random offsets: the flipped result is the mirror image of the unflipped one
    plain = square_resize(image, superpixels, size, False, np.random.default_rng(seed))
    flipped = square_resize(image, superpixels, size, True, np.random.default_rng(seed))
    assert np.array_equal(flipped[0], plain[0][:, ::-1]) and np.array_equal(flipped[1], plain[1][:, ::-1])


# ------------------------------------------------------------------ inference scores


@pytest.fixture(scope="module")
def signed_spn() -> SPN:
    """Classes 0 and 1 with positive evidence everywhere (features are post-ReLU, weights >= 0);
    class 2 negative everywhere, so ReLU must zero it."""
    torch.manual_seed(3)
    model = build_classifier(tiny_cam_config(), N_CLASSES)
    # A random init keeps BatchNorm running variance 1 while its activations are far smaller, so in
    # eval mode the features vanish (~1e-9). Calibrate the statistics on a few random images first.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average of the batches seen
    with torch.no_grad():
        model.train()(torch.rand(4, 3, 40, 56, generator=torch.Generator().manual_seed(5)))
        for weight in (model.classifier.weight, model.sp_classifier.weight):
            weight.abs_().mul_(100)  # logits well above max_normalise's epsilon
            weight[2].neg_()
    return model.eval()


def scene(h: int = 40, w: int = 56):
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    image[10:30, 8:30] = (220, 40, 40)
    superpixels = block_superpixels(h, w, 8, 7).astype(np.int32)
    superpixels[superpixels % 5 == 3] = 3  # some superpixels are not connected
    _, superpixels = np.unique(superpixels, return_inverse=True)
    return image, superpixels.reshape(h, w).astype(np.int32)


def test_max_normalise():
    maps = torch.tensor([[[-1.0, 2.0], [4.0, 1.0]], [[-3.0, -1.0], [-2.0, -5.0]]])
    out = max_normalise(maps)
    torch.testing.assert_close(out[0], torch.tensor([[0.0, 0.5], [1.0, 0.25]]), atol=1e-5, rtol=0)
    assert torch.equal(out[1], torch.zeros(2, 2))


def test_image_scores_range_normalisation_and_superpixel_constancy(signed_spn):
    image, superpixels = scene()
    cam, spcam, probs = image_scores(signed_spn, image, superpixels, [1.0, 0.75], True, torch.device("cpu"))
    assert probs.shape == (N_CLASSES,)
    assert float(probs[0]) > 0.5 and float(probs[1]) > 0.5 and float(probs[2]) < 0.5  # sign of the evidence
    for scores in (cam, spcam):
        assert scores.shape == (N_CLASSES, *image.shape[:2])
        assert float(scores.min()) >= 0 and float(scores.max()) <= 1
        maxima = scores.flatten(1).max(1).values
        torch.testing.assert_close(maxima[:2], torch.ones(2), atol=1e-3, rtol=0)  # activated classes reach 1
        assert float(maxima[2]) == 0  # negative evidence everywhere -> zero, not rescaled
        assert float(scores[:2].flatten(1).min(1).values.max()) < 1  # not trivially constant
    for sp_id in np.unique(superpixels):
        values = spcam[:, torch.from_numpy(superpixels == sp_id)]
        assert torch.equal(values, values[:, :1].expand_as(values)), (
            f"SP-CAM varies inside superpixel {sp_id}"
        )
    assert len(torch.unique(spcam[0])) > 5  # but differs between superpixels


def test_spcam_and_label_probabilities_come_from_superpixel_means_of_sp_scores(signed_spn):
    image, superpixels = scene()
    h, w = superpixels.shape
    _, spcam, probs = image_scores(signed_spn, image, superpixels, [1.0], False, torch.device("cpu"))
    with torch.no_grad():
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
        dense = F.interpolate(signed_spn.sp_score_map(x), size=(h, w), mode="bilinear", align_corners=False)[
            0
        ]
    expected, per_superpixel = torch.zeros(N_CLASSES, h, w), []
    for sp_id in np.unique(superpixels):
        mask = torch.from_numpy(superpixels == sp_id)
        per_superpixel.append(dense[:, mask].mean(1))
        expected[:, mask] = per_superpixel[-1][:, None]
    # the image-level output as in training: sigmoid of the mean superpixel score
    torch.testing.assert_close(probs, torch.sigmoid(torch.stack(per_superpixel).mean(0)), atol=1e-5, rtol=0)
    expected = expected.clamp(min=0)
    expected /= expected.flatten(1).max(1).values.clamp(min=1e-12)[:, None, None]
    torch.testing.assert_close(spcam, expected, atol=1e-3, rtol=0)


def test_image_scores_flip_consistency(signed_spn):
    image, superpixels = scene()
    flipped_image, flipped_sp = image[:, ::-1].copy(), superpixels[:, ::-1].copy()
    device = torch.device("cpu")
    cam, spcam, probs = image_scores(signed_spn, image, superpixels, [1.0, 0.75], True, device)
    cam_f, spcam_f, probs_f = image_scores(signed_spn, flipped_image, flipped_sp, [1.0, 0.75], True, device)
    torch.testing.assert_close(cam_f, cam.flip(-1), atol=1e-4, rtol=0)
    torch.testing.assert_close(spcam_f, spcam.flip(-1), atol=1e-4, rtol=0)
    torch.testing.assert_close(probs_f, probs, atol=1e-5, rtol=0)
    # the network itself is not flip-equivariant, so without flip averaging the check above would fail
    cam_nf = image_scores(signed_spn, image, superpixels, [1.0], False, device)[0]
    cam_nf_f = image_scores(signed_spn, flipped_image, flipped_sp, [1.0], False, device)[0]
    assert float((cam_nf_f - cam_nf.flip(-1)).abs().max()) > 1e-2


def test_spcam_merge_mean_sums_scales_and_max_takes_the_largest(signed_spn):
    image, superpixels = scene()
    device = torch.device("cpu")
    h, w = superpixels.shape
    sp = torch.from_numpy(superpixels.astype(np.int64)).reshape(-1)
    per_scale = []
    for s in (1.0, 0.5):
        x = torch.from_numpy(cv2.resize(image, (round(w * s), round(h * s)), interpolation=cv2.INTER_LINEAR))
        with torch.no_grad():
            dense = F.interpolate(
                signed_spn.sp_score_map(x.permute(2, 0, 1)[None].float() / 255),
                size=(h, w),
                mode="bilinear",
                align_corners=False,
            )[0].reshape(N_CLASSES, -1)
        per_scale.append(torch.stack([dense[:, sp == k].mean(1) for k in range(int(sp.max()) + 1)], 1))
    for merge, combined in (("max", torch.maximum(*per_scale)), ("mean", per_scale[0] + per_scale[1])):
        spcam = image_scores(signed_spn, image, superpixels, [1.0, 0.5], False, device, spcam_merge=merge)[1]
        expected = max_normalise(combined[:, None, :])[:, 0, :][:, sp].reshape(N_CLASSES, h, w)
        torch.testing.assert_close(spcam, expected, atol=1e-3, rtol=0)
    assert not torch.allclose(
        image_scores(signed_spn, image, superpixels, [1.0, 0.5], False, device, "max")[1],
        image_scores(signed_spn, image, superpixels, [1.0, 0.5], False, device, "mean")[1],
        atol=1e-3,
    )
