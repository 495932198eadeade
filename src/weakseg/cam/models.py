"""Classifiers trained on image-level labels: the CAM baseline and the Superpixel Pooling Network,
and the registry of every CAM generator (``cam.model``: cam, spn, seam, dual).

CAM (Zhou et al. 2016): encoder -> global average pooling -> linear classifier; the class
activation map is that classifier applied at every feature location.

SPN (Kwak, Hong, Han, AAAI 2017): encoder -> one extra conv -> upsampling module (transposed convs
with BN+ReLU, x2 each) -> superpixel pooling (mean feature inside each superpixel, then mean over
an image's superpixels) -> classifier; plus a GAP branch with its own classifier on the encoder
features as a regulariser. Because the classifier is linear, a superpixel's class scores equal the
classifier applied to its mean feature — which is how SP-CAM is read off at inference.

SEAM (``seam.py``) and the dual-branch network (``dual.py``) build on the same encoders. Every
model answers ``inference_maps(x01)`` with the maps inference turns into the score store (see
``CAMNet.inference_maps``); their training losses live in ``losses.py``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from weakseg.cam import MODELS
from weakseg.nets.backbones import build_encoder, freeze_encoder, normalise, trainable


def superpixel_pool(features: torch.Tensor, superpixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average features inside each superpixel of each image of a batch.

    features: (B, D, h, w); superpixels: (B, h, w) long, ids >= 0, -1 = padding (excluded).
    Images may have different numbers of superpixels; a superpixel with no pixel at this
    resolution simply does not appear. Returns (superpixel features (S, D), image index (S,)),
    S = number of superpixels present in the whole batch.
    """
    b, d, h, w = features.shape
    if superpixels.shape != (b, h, w):
        raise ValueError(f"superpixel map {tuple(superpixels.shape)} does not match features {(b, h, w)}")
    flat = features.permute(0, 2, 3, 1).reshape(-1, d)
    ids = superpixels.reshape(b, -1)
    valid = ids >= 0
    # One id space for the whole batch: image index * (max id + 1) + superpixel id.
    span = int(ids.max().clamp(min=0)) + 1
    global_ids = (torch.arange(b, device=ids.device)[:, None] * span + ids)[valid]
    present, compact = torch.unique(global_ids, return_inverse=True)
    sums = flat.new_zeros(present.numel(), d).index_add_(0, compact, flat[valid.reshape(-1)])
    counts = torch.bincount(compact, minlength=present.numel()).to(flat.dtype)
    return sums / counts[:, None], present // span


def superpixel_pool_weights(superpixels: torch.Tensor, grid: tuple[int, int], factor: int) -> torch.Tensor:
    """(B, h * w) weights on the coarse ``grid`` such that, for any maps m (B, C, h, w),
    ``einsum("bcp,bp->bc", m.flatten(2), weights)`` is each image's mean over its superpixels of the
    mean of m inside each superpixel, m upsampled bilinearly ``factor`` times first (the SP branch with
    bilinear upsampling; ``superpixels`` (B, H, W), -1 = padding, are resized to the fine grid by
    nearest neighbour as in ``SPN.forward``).

    Upsampling and pooling are linear, so their composition is one weighted sum over the coarse grid:
    the weights are the adjoint of the separable bilinear upsampling applied to the per-pixel pooling
    weights 1 / (superpixels of the image x pixels of the superpixel).
    """
    b, (h, w) = superpixels.shape[0], grid
    fine = F.interpolate(superpixels[:, None].float(), size=(h * factor, w * factor), mode="nearest")
    ids = fine[:, 0].long().reshape(b, -1)
    valid = ids >= 0
    span = int(ids.max().clamp(min=0)) + 1
    global_ids = torch.arange(b, device=ids.device)[:, None] * span + ids.clamp(min=0)
    counts = torch.bincount(global_ids[valid], minlength=b * span).reshape(b, span)
    present = (counts > 0).sum(1).clamp(min=1)
    per_pixel = 1.0 / (counts.reshape(-1)[global_ids].clamp(min=1) * present[:, None])
    per_pixel = (per_pixel * valid).reshape(b, h * factor, w * factor).float()

    def upsampling(n: int) -> torch.Tensor:  # (n, n * factor): weight of coarse row i in fine row y
        eye = torch.eye(n, device=superpixels.device)[None]
        return F.interpolate(eye, scale_factor=factor, mode="linear", align_corners=False)[0]

    return torch.einsum("iy,byx,jx->bij", upsampling(h), per_pixel, upsampling(w)).reshape(b, h * w)


def max_normalise(maps: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """ReLU, then divide each map (the last two dimensions) by its maximum -> [0, 1]."""
    maps = maps.clamp(min=0)
    return maps / (maps.flatten(-2).max(-1).values[..., None, None] + eps)


def mean_per_image(values: torch.Tensor, image_index: torch.Tensor, n_images: int) -> torch.Tensor:
    """Mean of rows of ``values`` (S, D) grouped by image -> (B, D)."""
    sums = values.new_zeros(n_images, values.shape[1]).index_add_(0, image_index, values)
    counts = torch.bincount(image_index, minlength=n_images).clamp(min=1).to(values.dtype)
    return sums / counts[:, None]


class CAMNet(nn.Module):
    """Encoder -> GAP -> linear classifier (no bias, so CAMs are exact class evidence)."""

    def __init__(self, encoder: nn.Module, n_classes: int):
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Conv2d(encoder.out_channels, n_classes, 1, bias=False)

    def forward(
        self,
        x01: torch.Tensor | None,
        superpixels: torch.Tensor | None = None,
        frozen: torch.Tensor | None = None,
    ) -> dict:
        """``gap_logits`` (B, C); with ``superpixels``, the SP branch's ``sp_logits`` where the model has one."""
        feats = self.encode(x01, frozen)
        out = {"gap_logits": self.classifier(feats.mean((2, 3), keepdim=True)).flatten(1)}
        return out if superpixels is None else {**out, **self.sp_outputs(feats, superpixels)}

    def sp_outputs(self, feats: torch.Tensor, superpixels: torch.Tensor) -> dict:
        """The superpixel branch's outputs from the encoder features (plain CAM has none)."""
        return {}

    def frozen_features(self, x01: torch.Tensor) -> torch.Tensor:
        """The output of the encoder's frozen layers (``freeze_encoder`` N), without autograd: what a
        feature cache keeps; ``forward(None, ..., frozen=...)`` continues from it."""
        x = normalise(x01, self.encoder)
        with torch.no_grad():
            for layer in self.encoder.layers()[: self.encoder.frozen_layers]:
                x = layer(x)
        return x

    def encode(self, x01: torch.Tensor | None, frozen: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder features of images in [0, 1], or of the frozen layers' output ``frozen``."""
        if frozen is None:
            return self.encoder(normalise(x01, self.encoder))
        for layer in self.encoder.layers()[self.encoder.frozen_layers :]:
            frozen = layer(frozen)
        return frozen

    def cam(self, x01: torch.Tensor) -> torch.Tensor:
        """Class activation maps (B, C, h, w) at the encoder's resolution (before ReLU)."""
        return self.classifier(self.encoder(normalise(x01, self.encoder)))

    def sp_score_map(self, x01: torch.Tensor) -> torch.Tensor:
        """Per-location class scores whose superpixel means are SP-CAM scores (CAMNet: the CAM;
        SPN: its SP-branch classifier at every location of the fine grid)."""
        return self._sp_scores(self.encoder(normalise(x01, self.encoder)))

    def _sp_scores(self, feats: torch.Tensor) -> torch.Tensor:
        return self.classifier(feats)

    def inference_maps(self, x01: torch.Tensor) -> dict:
        """What inference reads, from one encoder pass: ``cam`` (B, C, h, w), whose ReLU is the CAM;
        ``sp`` (B, C, h', w'), the scores averaged inside each superpixel for SP-CAM; optionally
        ``logits`` (B, C), the image-level classifier output (without it, inference takes the mean
        superpixel score, as the SP branch is trained)."""
        feats = self.encoder(normalise(x01, self.encoder))
        return {"cam": self.classifier(feats), "sp": self._sp_scores(feats)}

    def param_groups(self, lr: float, encoder_lr_mult: float) -> list[dict]:
        """The pretrained encoder at ``lr * encoder_lr_mult``, every head (all other parameters) at ``lr``."""
        head = [p for n, p in self.named_parameters() if not n.startswith("encoder.")]
        return [{"params": trainable(self.encoder), "lr": lr * encoder_lr_mult}, {"params": head, "lr": lr}]


class SPN(CAMNet):
    """Superpixel Pooling Network; the inherited GAP branch is the regulariser (and gives the CAM).

    ``upsampling``: ``"transposed"`` is the paper's module (extra 3x3 conv, then transposed convs
    with BN+ReLU, each x2). ``"bilinear"`` replaces the learned module by fixed bilinear x2 steps
    on the encoder features: nothing randomly initialised sits between the pretrained encoder and
    the SP classifier, so it trains in the few hundred iterations a CPU affords (on MSRC-21 the
    learned module still lagged the GAP branch after 300 iterations: SP-CAM 50.0 vs 61.7 mIoU).
    Since the classifier, interpolation and pooling are all linear, the SP branch pools class
    *scores* (C channels) rather than features (D channels): the same logits, far cheaper. With
    bilinear upsampling, training goes one step further (``weighted_pooling``): the whole branch is
    one weighted pooling of the coarse features (``superpixel_pool_weights``).
    """

    # False: upsample the score map and pool it inside every superpixel, the reference path that the
    # weighted pooling equals (kept for the tests and `weakseg benchmark speed`).
    weighted_pooling = True

    def __init__(
        self,
        encoder: nn.Module,
        n_classes: int,
        channels: int = 256,
        upsample_layers: int = 2,
        upsampling: str = "transposed",
    ):
        super().__init__(encoder, n_classes)
        if upsampling not in ("transposed", "bilinear"):
            raise ValueError(f"cam.upsampling: expected 'transposed' or 'bilinear', got {upsampling!r}")
        self.upsampling = upsampling
        self.upsample_factor = 2**upsample_layers
        if upsampling == "bilinear":
            channels = encoder.out_channels
        else:
            self.extra = nn.Sequential(
                nn.Conv2d(encoder.out_channels, channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
            )
            ups = []
            for _ in range(upsample_layers):
                ups += [
                    nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1, bias=False),
                    nn.BatchNorm2d(channels),
                    nn.ReLU(inplace=True),
                ]
            self.upsample = nn.Sequential(*ups)
        self.sp_classifier = nn.Linear(channels, n_classes, bias=False)

    def _sp_scores(self, feats: torch.Tensor) -> torch.Tensor:
        """SP-branch class scores at every location of the fine grid (B, C, h * f, w * f)."""
        if self.upsampling == "bilinear":
            scores = torch.einsum("bdhw,cd->bchw", feats, self.sp_classifier.weight)
            if self.upsample_factor == 1:
                return scores
            return F.interpolate(
                scores, scale_factor=self.upsample_factor, mode="bilinear", align_corners=False
            )
        return torch.einsum("bdhw,cd->bchw", self.upsample(self.extra(feats)), self.sp_classifier.weight)

    def sp_outputs(self, feats: torch.Tensor, superpixels: torch.Tensor) -> dict:
        """``sp_logits`` (B, C): per image, the mean over its superpixels of the SP classifier's scores."""
        if self.upsampling == "bilinear" and self.weighted_pooling:
            # classifier, upsampling and pooling are linear: one weighted pooling of the coarse features
            weights = superpixel_pool_weights(superpixels, tuple(feats.shape[-2:]), self.upsample_factor)
            return {"sp_logits": self.sp_classifier(torch.einsum("bdp,bp->bd", feats.flatten(2), weights))}
        fine = self._sp_scores(feats)
        # Superpixel maps follow the image: nearest-neighbour resize to the fine grid.
        sp = F.interpolate(superpixels[:, None].float(), size=fine.shape[2:], mode="nearest")[:, 0].long()
        sp_scores, image_index = superpixel_pool(fine, sp)
        return {"sp_logits": mean_per_image(sp_scores, image_index, feats.shape[0])}


def resolve_cam_config(cam_cfg: dict) -> dict:
    """``cam_cfg`` with choices that depend on this machine made explicit (the dual network's
    transformer: torchvision ViT weights found or not), so that a saved model records what it is."""
    if cam_cfg["model"] == "dual":
        from weakseg.cam.dual import resolve_transformer

        return {**cam_cfg, "dual": {**cam_cfg["dual"], "transformer": resolve_transformer(cam_cfg)}}
    return cam_cfg


def build_classifier(cam_cfg: dict, n_classes: int) -> nn.Module:
    """The ``cam.model`` network on the ``cam.backbone`` encoder (frozen as ``cam.freeze_encoder`` says)."""
    if cam_cfg["model"] not in MODELS:
        raise ValueError(f"cam.model: expected one of {', '.join(MODELS)}, got {cam_cfg['model']!r}")
    encoder = build_encoder(
        cam_cfg["backbone"],
        pretrained=cam_cfg["pretrained"],
        weights=cam_cfg["weights"],
        output_stride=cam_cfg["output_stride"],
    )
    freeze_encoder(encoder, cam_cfg["freeze_encoder"], cam_cfg["pretrained"])
    if cam_cfg["model"] == "cam":
        return CAMNet(encoder, n_classes)
    if cam_cfg["model"] == "spn":
        return SPN(
            encoder, n_classes, cam_cfg["extra_channels"], cam_cfg["upsample_layers"], cam_cfg["upsampling"]
        )
    if cam_cfg["model"] == "seam":  # imported here: seam.py and dual.py build on this module
        from weakseg.cam.seam import SEAMNet

        return SEAMNet(encoder, n_classes, cam_cfg["seam"]["pcm_dim"])
    from weakseg.cam.dual import build_dual

    return build_dual(encoder, n_classes, resolve_cam_config(cam_cfg))


def multilabel_loss(out: dict, targets: torch.Tensor, gap_weight: float) -> tuple[torch.Tensor, dict]:
    """Multi-label soft-margin loss of the SP branch plus ``gap_weight`` x that of the GAP branch."""
    parts = {"loss_gap": F.multilabel_soft_margin_loss(out["gap_logits"], targets)}
    if "sp_logits" in out:
        parts["loss_sp"] = F.multilabel_soft_margin_loss(out["sp_logits"], targets)
        total = parts["loss_sp"] + gap_weight * parts["loss_gap"]
    else:
        total = parts["loss_gap"]
    return total, {k: float(v.detach()) for k, v in parts.items()}
