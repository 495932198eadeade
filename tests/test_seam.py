"""SEAM: the transform, equivariant regularisation, pixel correlation module, network and loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from weakseg.cam.losses import equivariance_loss, hard_mean, labelled_maps, seam_loss, soft_margin
from weakseg.cam.models import build_classifier, max_normalise
from weakseg.cam.seam import (
    PixelCorrelation,
    ScaleFlip,
    SEAMNet,
    keep_top_class,
    pixel_affinity,
    propagate,
    with_background,
)
from weakseg.config import load

N_CLASSES = 3


def images(b: int = 2, h: int = 48, w: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ transform and ER


def test_scale_flip_rescales_then_mirrors():
    x = images()
    t = ScaleFlip(0.5)
    out = t(x)
    assert out.shape == (2, 3, 24, 32)
    expected = F.interpolate(x, size=(24, 32), mode="bilinear", align_corners=False).flip(-1)
    assert torch.equal(out, expected)
    assert torch.equal(ScaleFlip.apply(x, (48, 64)), x.flip(-1))  # at the same size: a pure flip
    with pytest.raises(ValueError, match="cam.seam.scale"):
        ScaleFlip(1.5)


def test_equivariance_loss_is_zero_for_an_equivariant_map_and_positive_otherwise():
    x = images()
    transform = ScaleFlip(0.5)
    pointwise = torch.nn.Conv2d(3, N_CLASSES, 1)  # per-pixel and linear: commutes with resizing and flipping

    def equivariant(images):
        return pointwise(images)

    def position_dependent(images):  # a left-to-right ramp does not survive the flip
        return pointwise(images) + torch.linspace(0, 1, images.shape[-1])

    with torch.no_grad():
        for f, zero in ((equivariant, True), (position_dependent, False)):
            of_transformed = f(transform(x))
            transformed = transform.apply(f(x), tuple(of_transformed.shape[-2:]))
            er = float(equivariance_loss(of_transformed, transformed))
            assert er < 1e-6 if zero else er > 0.1, (f.__name__, er)
    with pytest.raises(ValueError, match="ER"):
        equivariance_loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 5))


# ------------------------------------------------------------------ PCM


def test_propagate_with_identity_affinity_returns_its_input():
    maps = torch.rand(2, 4, 5, 6, generator=torch.Generator().manual_seed(1))
    identity = torch.eye(30).expand(2, 30, 30)
    assert torch.equal(propagate(maps, identity), maps)


def test_orthogonal_pixel_embeddings_give_the_identity_affinity():
    """Pixels that share nothing attend only to themselves, so the PCM leaves the maps as they are."""
    h, w = 3, 4
    embedding = torch.eye(h * w).reshape(1, h * w, h, w) * 5.0  # pixel k: the k-th unit vector (scaled)
    affinity = pixel_affinity(embedding)
    torch.testing.assert_close(affinity, torch.eye(h * w)[None], atol=1e-4, rtol=0)
    maps = torch.rand(1, 2, h, w)
    torch.testing.assert_close(propagate(maps, affinity), maps, atol=1e-4, rtol=0)


def test_pixel_affinity_columns_sum_to_one_so_constant_maps_stay_constant():
    embedding = torch.randn(2, 8, 5, 7, generator=torch.Generator().manual_seed(2))
    affinity = pixel_affinity(embedding)
    assert float(affinity.min()) >= 0  # ReLU of the cosine similarity
    torch.testing.assert_close(affinity.sum(1), torch.ones(2, 35), atol=1e-4, rtol=0)
    constant = torch.full((2, 3, 5, 7), 0.4)
    torch.testing.assert_close(propagate(constant, affinity), constant, atol=1e-4, rtol=0)
    # similar pixels share: two pixels with the same embedding collect the same refined value
    embedding[:, :, 0, 0] = embedding[:, :, 4, 6]
    refined = propagate(torch.rand(2, 3, 5, 7), pixel_affinity(embedding))
    torch.testing.assert_close(refined[..., 0, 0], refined[..., 4, 6])


def test_pixel_correlation_refines_on_the_grid_of_its_maps():
    pcm = PixelCorrelation((6, 10), dim=16)
    maps = torch.rand(2, 4, 3, 4)
    with torch.no_grad():
        refined = pcm(maps, images(), [torch.rand(2, 6, 6, 8), torch.rand(2, 10, 3, 4)])
    assert refined.shape == maps.shape and float(refined.min()) >= 0
    with pytest.raises(ValueError, match="feature maps"):
        PixelCorrelation((6,))


def test_background_channel_and_top_class():
    maps = torch.tensor([[[[0.2, 0.9]], [[0.5, 0.1]]]])  # (1, 2 classes, 1, 2 pixels)
    with_bg = with_background(maps)
    torch.testing.assert_close(with_bg[0, :, 0], torch.tensor([[0.5, 0.1], [0.2, 0.9], [0.5, 0.1]]))
    top = keep_top_class(with_bg)
    torch.testing.assert_close(top[0, :, 0], torch.tensor([[0.5, 0.1], [0.0, 0.9], [0.5, 0.0]]))


# ------------------------------------------------------------------ network and loss


@pytest.fixture(scope="module")
def seam() -> SEAMNet:
    torch.manual_seed(0)
    model = build_classifier(
        load({"cam": {"model": "seam", "pretrained": False, "seam": {"pcm_dim": 16}}})["cam"], N_CLASSES
    )
    assert isinstance(model, SEAMNet)
    return model


def test_seam_forward_shapes_and_inference_maps(seam):
    seam.eval()
    x = images()
    with torch.no_grad():
        out = seam(x)
        maps = seam.inference_maps(x)
    assert out["cam"].shape == (2, N_CLASSES, 3, 4)  # stride 16
    assert out["refined"].shape == (2, 1 + N_CLASSES, 3, 4)
    torch.testing.assert_close(out["gap_logits"], out["cam"].mean((2, 3)))
    assert torch.equal(maps["cam"], out["refined"][:, 1:]) and torch.equal(maps["sp"], maps["cam"])
    assert torch.equal(maps["logits"], out["gap_logits"])
    assert float(out["refined"].min()) >= 0


def test_pcm_learns_only_through_its_projections(seam):
    """As in SEAM, neither the CAM nor the low-level features fed to the PCM carry a gradient."""
    seam.train()
    seam.zero_grad(set_to_none=True)
    seam(images())["refined"].sum().backward()
    grads = {n: p.grad for n, p in seam.named_parameters()}
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in grads if n.startswith("pcm."))
    assert all(grads[n] is None for n in grads if not n.startswith("pcm."))
    seam.zero_grad(set_to_none=True)


def test_hard_mean():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 8.0, 0.0]])
    assert float(hard_mean(values, 1.0)) == pytest.approx(values.mean().item())
    assert float(hard_mean(values, 0.5)) == pytest.approx((3.5 + 4.0) / 2)  # top 2 of each image


def test_seam_loss_composition(seam):
    seam.eval()  # no stochastic depth: the reference forward passes below see the same network
    batch = {"x": images(), "y": torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])}
    transform = ScaleFlip(0.5)
    total, parts = seam_loss(seam, batch, transform, 0.7, 0.3, 0.2)
    assert set(parts) == {"loss_cls", "loss_er", "loss_ecr"}
    assert total.item() == pytest.approx(
        parts["loss_cls"] + 0.7 * parts["loss_er"] + 0.3 * parts["loss_ecr"], rel=1e-5
    )
    assert parts["loss_er"] > 0 and parts["loss_ecr"] > 0
    with torch.no_grad():  # the parts are what they claim to be
        out_o, out_t = seam(batch["x"]), seam(transform(batch["x"]))
        cam_t = labelled_maps(out_t["cam"], batch["y"])
        er = equivariance_loss(
            cam_t, transform.apply(labelled_maps(out_o["cam"], batch["y"]), tuple(cam_t.shape[-2:]))
        )
        cls = (
            soft_margin(out_o["gap_logits"], batch["y"]) + soft_margin(out_t["gap_logits"], batch["y"])
        ) / 2
    assert parts["loss_er"] == pytest.approx(er.item(), rel=1e-5)
    assert parts["loss_cls"] == pytest.approx(cls.item(), rel=1e-5)


def test_labelled_maps_zero_unlabelled_classes_and_reach_one():
    cam = torch.randn(2, N_CLASSES, 4, 5, generator=torch.Generator().manual_seed(3)).abs() + 0.1
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    maps = labelled_maps(cam, y)
    assert torch.equal(maps[0, 1], torch.zeros(4, 5)) and torch.equal(maps[1, 0], torch.zeros(4, 5))
    torch.testing.assert_close(maps.flatten(2).amax(-1), y, atol=1e-4, rtol=0)
    torch.testing.assert_close(maps, max_normalise(cam) * y[:, :, None, None])
