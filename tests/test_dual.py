"""Dual branch: Gaussian activation modulation, the modulated CNN branch, both transformer branches, the loss."""

from __future__ import annotations

import pytest
import torch
import torchvision

import weakseg.cam.dual as dual_mod
from weakseg.cam.dual import (
    ChannelModulation,
    DualNet,
    HybridTransformer,
    SpatialModulation,
    TorchvisionViT,
    default_aux_layer,
    gaussian_gain,
    resolve_transformer,
)
from weakseg.cam.losses import consistency_loss, dual_loss, soft_margin
from weakseg.cam.models import build_classifier, max_normalise, resolve_cam_config
from weakseg.config import load
from weakseg.nets.backbones import WeightsNotFoundError, normalise

N_CLASSES = 3


def dual_config(**dual) -> dict:
    return load(
        {"cam": {"model": "dual", "pretrained": False, "dual": {"dim": 16, "heads": 2, "depth": 2, **dual}}}
    )["cam"]


def images(b: int = 2, h: int = 48, w: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ Gaussian modulation


def test_gaussian_gain_maps_the_mean_activation_to_the_maximum_gain():
    values = torch.tensor([[1.0, 5.0, 3.0, 2.0, 4.0, 9.0, -3.0]])  # mean 3: the third value
    gain = gaussian_gain(values, (1,))
    assert float(gain[0, 2]) == pytest.approx(1.0)
    assert int(gain.argmax()) == 2 and float(gain.max()) == pytest.approx(1.0)
    # symmetric about the mean, falling with the distance from it: extremes are damped the most
    assert float(gain[0, 3]) == pytest.approx(float(gain[0, 4]))
    order = torch.argsort((values - values.mean()).abs(), dim=1, stable=True)
    assert torch.all(gain[0, order[0]].diff() <= 1e-7)
    assert float(gain[0, 5]) < 0.3 and float(gain[0, 6]) < 0.3
    # invariant to the scale and offset of the activations: only their standardised values matter
    torch.testing.assert_close(gaussian_gain(values * 7 - 2, (1,)), gain)


def test_channel_modulation_damps_the_most_and_least_activated_channels():
    x = torch.ones(1, 5, 4, 4) * torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])[None, :, None, None]
    for normalise_gain in (False, True):
        module = ChannelModulation(5, normalise_gain)
        with torch.no_grad():
            module.conv.weight.copy_(torch.eye(5)[:, :, None, None])  # conv = identity on the pooled vector
            module.conv.bias.zero_()
            gain = (module(x) / x)[0, :, 0, 0]
        assert int(gain.argmax()) == 2  # channel 2 holds the mean activation
        assert float(gain[1]) == pytest.approx(float(gain[3])) and float(gain[4]) < float(gain[3])
        if normalise_gain:  # the same shape, rescaled to mean 1
            assert float(gain.mean()) == pytest.approx(1.0)
        else:
            assert float(gain[2]) == pytest.approx(1.0)


def test_spatial_modulation_lifts_the_middle_positions():
    module = SpatialModulation(normalise_gain=False)
    with torch.no_grad():
        module.conv.weight.zero_()
        module.conv.weight[0, 1, 3, 3] = 1.0  # response = the channel mean at the pixel itself
        module.conv.bias.zero_()
    x = torch.linspace(0, 1, 9).reshape(1, 1, 3, 3).repeat(1, 2, 1, 1)
    with torch.no_grad():
        gain = (module(x) / x.clamp(min=1e-9))[0, 0]
    assert float(gain[1, 1]) == pytest.approx(1.0)  # the middle value 0.5 is the mean
    assert float(gain[0, 1]) == pytest.approx(float(gain[2, 1]))  # 0.125 and 0.875: as far from it
    assert float(gain[2, 2]) < float(gain[2, 1]) < float(gain[1, 2]) < 1  # 1.0, 0.875, 0.625


# ------------------------------------------------------------------ consistency and dual loss


def test_consistency_loss_is_zero_for_equal_maps_and_positive_otherwise():
    maps = torch.rand(2, N_CLASSES, 4, 5, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    assert float(consistency_loss(maps, maps, maps, y, 0.1, 0.1)) == 0.0
    # the maps are compared after max normalisation: a rescaled map is the same map
    assert float(consistency_loss(maps, 3 * maps, maps / 2, y, 0.1, 0.1)) == pytest.approx(0.0, abs=1e-6)
    other = torch.rand(2, N_CLASSES, 4, 5, generator=torch.Generator().manual_seed(2))
    aux_only = float(consistency_loss(maps, other, maps, y, 0.1, 0.0))
    vit_only = float(consistency_loss(maps, maps, other, y, 0.0, 0.1))
    assert aux_only > 0 and aux_only == pytest.approx(vit_only)
    assert float(consistency_loss(maps, other, other, y, 0.1, 0.3)) == pytest.approx(4 * aux_only)
    # a transformer map on another grid is resized to the CNN's grid
    coarse = torch.rand(2, N_CLASSES, 2, 3)
    assert consistency_loss(maps, coarse, coarse, y, 0.1, 0.1).shape == ()
    # differences in classes the image is not labelled with do not count
    unlabelled = maps.clone()
    unlabelled[0, 1] = torch.rand(4, 5)
    assert float(consistency_loss(maps, unlabelled, unlabelled, y, 0.1, 0.1)) == 0.0


def calibrated(model: torch.nn.Module) -> torch.nn.Module:
    """A random init keeps BatchNorm running variance 1 while its activations are far smaller, so in
    eval mode the features vanish; estimate the statistics on a few random images first."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average of the batches seen
    with torch.no_grad():
        model.train()(images(4, seed=9))
    return model.eval()


@pytest.fixture(scope="module")
def dual() -> DualNet:
    torch.manual_seed(0)
    model = calibrated(build_classifier(dual_config(), N_CLASSES))
    assert isinstance(model, DualNet) and isinstance(model.transformer, HybridTransformer)
    return model


def test_dual_loss_is_three_soft_margins_plus_consistency(dual):
    dual.eval()
    batch = {"x": images(), "y": torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])}
    total, parts = dual_loss(dual, batch, 0.1, 0.2)
    with torch.no_grad():
        out = dual(batch["x"])
    expected = {
        "loss_cnn": soft_margin(out["gap_logits"], batch["y"]),
        "loss_aux": soft_margin(out["aux_logits"], batch["y"]),
        "loss_vit": soft_margin(out["vit_logits"], batch["y"]),
        "loss_consistency": consistency_loss(
            out["cam"], out["aux_cam"], out["vit_cam"], batch["y"], 0.1, 0.2
        ),
    }
    assert parts == pytest.approx({k: v.item() for k, v in expected.items()}, rel=1e-5)
    assert total.item() == pytest.approx(sum(parts.values()), rel=1e-5)


# ------------------------------------------------------------------ the network


def test_dual_forward_shapes_and_global_max_pooling(dual):
    dual.eval()
    with torch.no_grad():
        out = dual(images())
        maps = dual.inference_maps(images())
    assert out["cam"].shape == (2, N_CLASSES, 3, 4)
    assert out["aux_cam"].shape == out["vit_cam"].shape == (2, N_CLASSES, 3, 4)  # stride-16 tokens
    torch.testing.assert_close(out["gap_logits"], out["cam"].mean((2, 3)))
    torch.testing.assert_close(out["aux_logits"], out["aux_cam"].amax((2, 3)))
    torch.testing.assert_close(out["vit_logits"], out["vit_cam"].amax((2, 3)))
    torch.testing.assert_close(maps["cam"], out["cam"])
    torch.testing.assert_close(maps["logits"], out["gap_logits"])


def test_modulation_sits_after_stages_1_to_3_and_changes_the_cnn_features(dual):
    encoder = dual.encoder
    assert sorted(int(k) for k in dual.modulation) == list(encoder.stage_ends) == [3, 5, 11]  # Lite0
    dual.eval()
    x = normalise(images(), encoder)
    with torch.no_grad():
        plain = dual.classifier(encoder(x))
        modulated = dual.classifier(
            encoder.forward_features(x, after={int(k): m for k, m in dual.modulation.items()})[0]
        )
        torch.testing.assert_close(dual(images())["cam"], modulated)
        assert (plain - modulated).abs().max() > 0.1 * plain.abs().max()
    torch.manual_seed(0)
    none = calibrated(build_classifier(dual_config(modulation_stages=[]), N_CLASSES))
    assert len(none.modulation) == 0
    with torch.no_grad():
        torch.testing.assert_close(none(images())["cam"], none.classifier(none.encoder(x)))


def test_mean_inference_maps_average_the_branches():
    torch.manual_seed(0)
    model = calibrated(build_classifier(dual_config(infer_maps="mean"), N_CLASSES))
    with torch.no_grad():
        out, maps = model(images()), model.inference_maps(images())
    torch.testing.assert_close(maps["cam"], (max_normalise(out["cam"]) + max_normalise(out["vit_cam"])) / 2)


def test_modulation_inside_frozen_layers_still_learns():
    """freeze_encoder 12 freezes stem and blocks 0-10, where all three modulations sit: the frozen
    layers after a modulation must run with autograd, and their weights still get no gradient."""
    cfg = {**dual_config(), "freeze_encoder": 12}
    torch.manual_seed(0)
    model = build_classifier(cfg, N_CLASSES).train()
    model(images())["cam"].sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for name in (
        "modulation.3.0.conv.weight",
        "modulation.5.1.conv.weight",
        "modulation.11.0.conv.weight",
        "encoder.body.blocks.12.project.conv.weight",
    ):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    assert grads["encoder.body.blocks.5.project.conv.weight"] is None  # frozen
    assert not model.encoder.body.blocks[5].project.conv.weight.requires_grad


def test_hybrid_transformer_aux_layer():
    assert default_aux_layer(12) == 10 and default_aux_layer(4) == 3 and default_aux_layer(2) == 1
    with pytest.raises(ValueError, match="aux_layer"):
        HybridTransformer(8, N_CLASSES, 16, 2, 2, 3)
    with pytest.raises(ValueError, match="multiple of heads"):
        HybridTransformer(8, N_CLASSES, 15, 2, 2, 1)
    torch.manual_seed(0)
    block = HybridTransformer(8, N_CLASSES, 16, 3, 2, 1).eval()
    tokens = torch.rand(2, 8, 5, 6)
    with torch.no_grad():
        out = block(tokens)
        # the auxiliary classifier reads layer 1: changing later layers leaves it alone
        block.layers[2].linear2.weight.add_(torch.randn_like(block.layers[2].linear2.weight))
        again = block(tokens)
    torch.testing.assert_close(again["aux_cam"], out["aux_cam"])
    assert not torch.allclose(again["vit_cam"], out["vit_cam"])


# ------------------------------------------------------------------ torchvision ViT branch


def tiny_vit(weights=None):
    """torchvision's VisionTransformer at a testable size (ViT-B/16's code path, 2 layers)."""
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32
    )


@pytest.fixture
def vit_home(tmp_path, monkeypatch):
    """A $TORCH_HOME whose checkpoints/ may hold the (tiny stand-in for the) ViT-B/16 weight file."""
    monkeypatch.setattr(dual_mod, "VIT_FILES", {"vit_b_16": ("vit_b_16-test.pth", tiny_vit)})
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    return tmp_path / "checkpoints" / "vit_b_16-test.pth"


def test_auto_transformer_uses_vit_weights_when_present_else_hybrid(vit_home):
    pretrained_cfg = {**dual_config(), "pretrained": True}
    assert resolve_transformer(pretrained_cfg) == "hybrid"  # no file yet
    with pytest.raises(WeightsNotFoundError, match="vit_b_16-test.pth"):
        TorchvisionViT("vit_b_16", N_CLASSES, None, pretrained=True)
    torch.manual_seed(5)
    reference = tiny_vit()
    torch.save(reference.state_dict(), vit_home)
    assert resolve_transformer(pretrained_cfg) == "vit_b_16"
    assert resolve_transformer({**pretrained_cfg, "pretrained": False}) == "hybrid"  # no weights wanted
    assert (
        resolve_transformer({**pretrained_cfg, "dual": {**pretrained_cfg["dual"], "transformer": "hybrid"}})
        == "hybrid"
    )
    # a saved model records the resolved choice, so inference rebuilds the same network
    assert resolve_cam_config(pretrained_cfg)["dual"]["transformer"] == "vit_b_16"

    vit = TorchvisionViT("vit_b_16", N_CLASSES, None, pretrained=True).eval()
    assert torch.equal(vit.layers[0].mlp[0].weight, reference.encoder.layers[0].mlp[0].weight)
    assert torch.equal(vit.pos_embedding, reference.encoder.pos_embedding)
    assert vit.aux_layer == 1  # 10/12 of 2 layers, below the last
    with torch.no_grad():
        out = vit(images(h=48, w=64))  # not the 32x32 the position embedding was made for
    assert out["vit_cam"].shape == (2, N_CLASSES, 3, 4) and out["aux_logits"].shape == (2, N_CLASSES)


def test_dual_network_with_vit_branch_and_its_param_groups(vit_home):
    torch.save(tiny_vit().state_dict(), vit_home)
    cfg = resolve_cam_config(
        {**dual_config(), "pretrained": True, "weights": None, "backbone": "efficientnet_lite0"}
    )
    cfg = {
        **cfg,
        "pretrained": False,
    }  # the CNN's weights do not matter here; the ViT is built from cfg below
    model = build_classifier({**cfg, "dual": {**cfg["dual"], "transformer": "vit_b_16"}}, N_CLASSES).eval()
    assert model.token_layer is None and isinstance(model.transformer, TorchvisionViT)
    with torch.no_grad():
        out = model(images())
    assert out["vit_cam"].shape == (2, N_CLASSES, 3, 4)
    groups = model.param_groups(1e-3, 0.1)
    slow = {id(p) for p in groups[0]["params"]}
    assert groups[0]["lr"] == pytest.approx(1e-4) and groups[1]["lr"] == pytest.approx(1e-3)
    assert id(model.transformer.layers[0].mlp[0].weight) in slow  # pretrained ViT layers: encoder rate
    assert id(model.transformer.heads.final.weight) not in slow
    assert id(model.modulation["3"][0].conv.weight) not in slow
    n_params = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == n_params
