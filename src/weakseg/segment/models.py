"""Segmentation networks trained on pseudo-labels: DeepLab (ASPP) and DecoupledNet.

Both share one interface so that training and prediction never branch on the model kind:

* ``forward(x01, image_labels=None, output_size=None)`` takes RGB in [0, 1] and returns ``{"logits":
  (B, n_classes, H, W), "cls": (B, n_fg) or None}``; ``softmax(logits)`` is the model's class
  distribution per pixel. ``output_size`` (h, w) resizes the logits to it instead of the input's size
  (training at ``segment.label_stride``).
* ``loss(out, pixel_labels, image_labels)`` -> (scalar loss, {name: float}) with 255 = ignore.
* ``param_groups(lr, encoder_lr_mult)`` -> optimizer groups (pretrained encoder at a smaller rate).
* buffer ``label_prior`` (n_classes,): class frequencies of the training pixel labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from weakseg.labels import IGNORE
from weakseg.nets.backbones import build_encoder, freeze_encoder, normalise, trainable

# Encoder stride for dense prediction (dilated last stages, as in DeepLabv3) of model files saved before
# segment.output_stride existed.
OUTPUT_STRIDE = 16
ASPP_CHANNELS = 128  # DeepLabv3 uses 256; 128 keeps the head cheap enough for CPU training
ASPP_RATES = (6, 12, 18)  # DeepLabv3's atrous rates at output stride 16
BRIDGE_CHANNELS = 128  # DecoupledNet: channels of the shared bridge / decoder input
DECODER_CHANNELS = (64, 32)  # DecoupledNet: channels after each x2 transposed-conv stage
SCORE_FLOOR = 1e-6  # DecoupledNet scores are turned into logits as log(max(score, floor))


class Segmenter(nn.Module):
    """Encoder + head. Subclasses implement ``forward`` and ``loss``."""

    def __init__(self, encoder: nn.Module, n_classes: int, has_background: bool):
        super().__init__()
        if n_classes < (2 if has_background else 1):
            raise ValueError(f"segment: need at least {2 if has_background else 1} classes, got {n_classes}")
        self.encoder = encoder
        self.n_classes = n_classes
        self.has_background = has_background
        # Classes a classifier predicts: all but background (class 0) when there is one.
        self.register_buffer(
            "fg_classes", torch.arange(1 if has_background else 0, n_classes), persistent=False
        )
        # Class frequencies of the pixel labels the net was trained on (set by training, saved with the
        # weights): prediction can divide them out (segment.prior_adjustment). Uniform = no adjustment.
        self.register_buffer("label_prior", torch.full((n_classes,), 1.0 / n_classes))

    @property
    def n_fg(self) -> int:
        return int(self.fg_classes.numel())

    def encoder_input(self, x01: Tensor) -> Tensor:
        """The encoder's normalised input of a (B, 3, H, W) RGB batch in [0, 1]."""
        if x01.ndim != 4 or x01.shape[1] != 3:
            raise ValueError(f"segment: expected input (B, 3, H, W) RGB in [0, 1], got {tuple(x01.shape)}")
        return normalise(x01, self.encoder)

    def features(self, x01: Tensor) -> Tensor:
        return self.encoder(self.encoder_input(x01))

    def param_groups(self, lr: float, encoder_lr_mult: float) -> list[dict]:
        """The encoder's parameters at ``lr * encoder_lr_mult``, every other parameter at ``lr``."""
        encoder_ids = {id(p) for p in self.encoder.parameters()}
        encoder = trainable(self.encoder)
        head = [p for p in self.parameters() if p.requires_grad and id(p) not in encoder_ids]
        return [
            {"params": encoder, "lr": lr * encoder_lr_mult, "name": "encoder"},
            {"params": head, "lr": lr, "name": "head"},
        ]

    def _check_labels(self, out: dict, pixel_labels: Tensor, image_labels: Tensor) -> None:
        batch, _, height, width = out["logits"].shape
        if pixel_labels.shape != (batch, height, width):
            raise ValueError(
                f"segment loss: pixel_labels must be (B, H, W) = {(batch, height, width)}, "
                f"got {tuple(pixel_labels.shape)}"
            )
        if image_labels.shape != (batch, self.n_classes):
            raise ValueError(
                f"segment loss: image_labels must be (B, n_classes) = {(batch, self.n_classes)}, "
                f"got {tuple(image_labels.shape)}"
            )
        labelled = pixel_labels[pixel_labels != IGNORE]
        if labelled.numel() and (int(labelled.min()) < 0 or int(labelled.max()) >= self.n_classes):
            raise ValueError(
                f"segment loss: pixel labels must be 0..{self.n_classes - 1} or {IGNORE}, "
                f"found {int(labelled.min())}..{int(labelled.max())}"
            )


class AtrousConv2d(nn.Conv2d):
    """A stride-1 'same' convolution that skips the taps which can only read padding.

    Along a dimension no longer than the dilation, every off-centre tap of every output position falls
    outside the map (DeepLab's rate 18 on a 16 x 16 feature map, for one): the convolution there is
    the centre row or column of the kernel without padding. Same output and gradients (the skipped
    taps' gradient is zero either way), at a fraction of the cost.
    """

    skip_padding_taps = True  # False: the plain convolution (the reference path of `benchmark speed`)

    def forward(self, x: Tensor) -> Tensor:
        weight, padding = self.weight, list(self.padding)
        for axis, (size, kernel, dilation) in enumerate(zip(x.shape[-2:], self.kernel_size, self.dilation)):
            if self.skip_padding_taps and kernel > 1 and size <= dilation:
                weight = weight.narrow(2 + axis, kernel // 2, 1)
                padding[axis] = 0
        if weight is self.weight:
            return super().forward(x)
        return F.conv2d(x, weight, self.bias, 1, tuple(padding), self.dilation, self.groups)


def _conv_bn_relu(cin: int, cout: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        AtrousConv2d(cin, cout, kernel, padding=dilation * (kernel // 2), dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLabv3): 1x1, three atrous 3x3 and an image-pooling branch.

    Unlike torchvision's ASPP the image-pooling branch has no BatchNorm, which cannot normalise a
    1x1 map of a batch of one image in training mode.
    """

    def __init__(self, in_channels: int, channels: int, rates=ASPP_RATES):
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv_bn_relu(in_channels, channels)]
            + [_conv_bn_relu(in_channels, channels, 3, r) for r in rates]
        )
        self.pooling = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, channels, 1), nn.ReLU(inplace=True)
        )
        self.project = nn.Sequential(_conv_bn_relu((len(rates) + 2) * channels, channels), nn.Dropout(0.1))

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.pooling(x).expand(-1, -1, *x.shape[-2:])
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


class DeepLab(Segmenter):
    """DeepLabv3: stride-16 (or 8) encoder, ASPP head, bilinear upsampling; pixel-wise cross-entropy."""

    def __init__(self, encoder: nn.Module, n_classes: int, has_background: bool):
        super().__init__(encoder, n_classes, has_background)
        # The atrous rates double at output stride 8 (DeepLabv3), so that they span the same image extent.
        rates = tuple(r * OUTPUT_STRIDE // encoder.stride for r in ASPP_RATES)
        self.head = nn.Sequential(
            ASPP(encoder.out_channels, ASPP_CHANNELS, rates),
            _conv_bn_relu(ASPP_CHANNELS, ASPP_CHANNELS, 3),
            nn.Conv2d(ASPP_CHANNELS, n_classes, 1),
        )

    def forward(self, x01: Tensor, image_labels: Tensor | None = None, output_size=None) -> dict:
        """``image_labels`` is accepted for interface parity with DecoupledNet and not used."""
        logits = self.head(self.features(x01))
        size = tuple(output_size or x01.shape[-2:])
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return {"logits": logits, "cls": None}

    def loss(self, out: dict, pixel_labels: Tensor, image_labels: Tensor) -> tuple[Tensor, dict]:
        self._check_labels(out, pixel_labels, image_labels)
        logits = out["logits"]
        if not (pixel_labels != IGNORE).any():  # cross_entropy's mean over no pixels would be NaN
            loss = logits.sum() * 0.0
        else:
            loss = F.cross_entropy(logits, pixel_labels.long(), ignore_index=IGNORE)
        return loss, {"loss": float(loss.detach()), "ce": float(loss.detach())}


class DecoupledNet(Segmenter):
    """DecoupledNet (Hong, Noh & Han, NIPS 2015): a multi-label classifier and one class-agnostic binary
    segmentation decoder shared by all classes, bridged by class-specific attention.

    Class-specific input: the encoder features (after a shared 1x1 bridge conv) are multiplied by the
    class's CAM attention ``a_c = relu(w_c . f) / max relu(w_c . f)``, where ``w_c`` is the classifier
    weight of class c. DecoupledNet derives this input from the gradient of the class score (saliency);
    for our GAP + linear classifier that gradient is ``w_c / (h w)`` at every location, so
    gradient-times-activation *is* the CAM — we get the paper's class saliency in closed form, without a
    backward pass, for all classes at once. The attention is detached, so, as in the paper, only the
    classification loss shapes the classifier and the decoder learns to segment whatever it highlights.

    Decoder: bridge (1x1 conv, applied once per image: a 1x1 conv commutes with the per-pixel attention
    scalar) -> BN/ReLU -> two x2 transposed convs -> 1x1 conv to one mask logit -> bilinear to input size.
    All (image, class) pairs are decoded in one batch.

    Scores: ``p_c = sigmoid(mask_c) * sigmoid(cls_c)`` per fg class; with a background class
    ``p_bg = 1 - max_c p_c`` (the decoder's background is "not any fg"). ``logits = log(p)`` so that
    ``softmax(logits) = p / sum(p)``, a distribution like DeepLab's.
    """

    NOT_DECODED = -1e4  # mask logit of a pair that was not decoded: sigmoid -> 0

    def __init__(self, encoder: nn.Module, n_classes: int, has_background: bool):
        super().__init__(encoder, n_classes, has_background)
        channels = encoder.out_channels
        self.classifier = nn.Linear(channels, self.n_fg)
        self.bridge = nn.Conv2d(channels, BRIDGE_CHANNELS, 1, bias=False)
        layers, cin = [nn.BatchNorm2d(BRIDGE_CHANNELS), nn.ReLU(inplace=True)], BRIDGE_CHANNELS
        for cout in DECODER_CHANNELS:
            layers += [
                nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]
            cin = cout
        layers.append(nn.Conv2d(cin, 1, 1))
        self.decoder = nn.Sequential(*layers)

    def attention(self, features: Tensor) -> Tensor:
        """(B, n_fg, h, w) CAM attention in [0, 1] of every fg class (detached)."""
        with torch.no_grad():
            cam = F.relu(torch.einsum("kc,bchw->bkhw", self.classifier.weight, features))
            # Scale-free normalisation (a floor only against 0 / 0): the attention's shape, not the
            # feature magnitude, should decide what the shared decoder sees.
            return cam / cam.amax(dim=(2, 3), keepdim=True).clamp_min(torch.finfo(cam.dtype).tiny)

    def forward(self, x01: Tensor, image_labels: Tensor | None = None, output_size=None) -> dict:
        """With ``image_labels`` (B, n_classes) only the labelled fg classes are decoded (training, and
        prediction restricted to an image's classes); otherwise every fg class is decoded.

        Extra outputs: ``mask_logits`` (B, n_fg, H, W) binary decoder logits and ``decoded`` (B, n_fg) bool.
        """
        features = self.features(x01)
        batch, (height, width) = features.shape[0], tuple(output_size or x01.shape[-2:])
        cls = self.classifier(features.mean(dim=(2, 3)))
        if image_labels is None:
            decoded = torch.ones(batch, self.n_fg, dtype=torch.bool, device=x01.device)
        else:
            if image_labels.shape != (batch, self.n_classes):
                raise ValueError(
                    f"decoupled: image_labels must be (B, n_classes) = {(batch, self.n_classes)}, "
                    f"got {tuple(image_labels.shape)}"
                )
            decoded = image_labels[:, self.fg_classes] > 0.5
        rows, cols = decoded.nonzero(as_tuple=True)
        mask_logits = torch.full(
            (batch, self.n_fg, height, width), self.NOT_DECODED, dtype=features.dtype, device=features.device
        )
        if rows.numel():
            attended = self.bridge(features)[rows] * self.attention(features)[rows, cols].unsqueeze(1)
            masks = F.interpolate(
                self.decoder(attended), size=(height, width), mode="bilinear", align_corners=False
            )
            mask_logits = mask_logits.index_put((rows, cols), masks[:, 0].to(mask_logits.dtype))
        scores = torch.sigmoid(mask_logits) * torch.sigmoid(cls)[:, :, None, None]
        if self.has_background:
            scores = torch.cat([1.0 - scores.amax(dim=1, keepdim=True), scores], dim=1)
        logits = torch.log(scores.clamp_min(SCORE_FLOOR))
        return {"logits": logits, "cls": cls, "mask_logits": mask_logits, "decoded": decoded}

    def loss(self, out: dict, pixel_labels: Tensor, image_labels: Tensor) -> tuple[Tensor, dict]:
        """BCE of each labelled fg class's mask (pixel == c vs != c, 255 ignored) + multi-label soft margin."""
        self._check_labels(out, pixel_labels, image_labels)
        fg_labels = image_labels[:, self.fg_classes].float()
        cls_loss = F.multilabel_soft_margin_loss(out["cls"], fg_labels)
        rows, cols = (fg_labels > 0.5).nonzero(as_tuple=True)
        if not bool(out["decoded"][rows, cols].all()):
            raise ValueError(
                "decoupled loss: forward did not decode every labelled class; "
                "call forward(x01, image_labels) with the same image_labels (or without any)"
            )
        targets = pixel_labels[rows]
        valid = targets != IGNORE
        if valid.any():
            class_of_pair = self.fg_classes[cols][:, None, None]
            seg_loss = F.binary_cross_entropy_with_logits(
                out["mask_logits"][rows, cols][valid], (targets == class_of_pair)[valid].float()
            )
        else:  # no labelled class or no labelled pixel: keep the graph, contribute nothing
            seg_loss = out["mask_logits"].sum() * 0.0
        loss = seg_loss + cls_loss
        return loss, {
            "loss": float(loss.detach()),
            "seg_bce": float(seg_loss.detach()),
            "cls": float(cls_loss.detach()),
        }


MODELS = {"deeplab": DeepLab, "decoupled": DecoupledNet}


def build_segmenter(seg_config: dict, n_classes: int, has_background: bool) -> Segmenter:
    """Build the network described by config['segment'] (model, backbone, pretrained, weights, freeze_encoder)."""
    name = seg_config["model"]
    if name == "joint":  # a one-stage model file (weakseg.joint): its own sections rebuild it
        from weakseg.joint.model import build_joint_segmenter

        return build_joint_segmenter(seg_config, n_classes, has_background)
    if name not in MODELS:
        raise ValueError(f"segment.model: expected one of {', '.join(MODELS)}, got '{name}'")
    encoder = build_encoder(
        seg_config["backbone"],
        pretrained=seg_config["pretrained"],
        weights=seg_config["weights"],
        output_stride=seg_config.get("output_stride", OUTPUT_STRIDE),
    )
    freeze_encoder(encoder, seg_config["freeze_encoder"], seg_config["pretrained"])
    return MODELS[name](encoder, n_classes, has_background)
