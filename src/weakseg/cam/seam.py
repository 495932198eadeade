"""SEAM: Self-supervised Equivariant Attention Mechanism (Wang et al., CVPR 2020).

A CAM network (encoder -> 1x1 classifier, GAP logits) plus a **pixel correlation module** (PCM)
that refines its maps by a self-attention-like affinity between pixels. The affinity is the cosine
similarity of low-level features concatenated with the (downsized) image. It is applied to the
max-normalised CAM with a background channel (1 - the largest class score), where each pixel keeps
only its top class, as in the authors' code. Training is siamese: the same network sees an image and
an affinely transformed copy (:class:`ScaleFlip`); the losses (``losses.seam_loss``: equivariant
regularisation ER, equivariant cross regularisation ECR) tie the two. Inference reads the
PCM-refined maps.

Adapted to our encoders: the PCM reads the last layers at stride 8 and 16 (``Encoder.stage_ends``;
ResNet-50's layer2 and layer3, the counterparts of the ResNet-38 conv4/conv5 SEAM used) and runs on
the CAM's grid. As in SEAM, neither the low-level features nor the CAM fed to the PCM carry a
gradient: the PCM's projections learn from ECR alone.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from weakseg.cam.models import CAMNet, max_normalise
from weakseg.nets.backbones import Encoder, normalise

PCM_PROJECTIONS = (64, 128)  # channels of the stride-8 and stride-16 features after projection (as SEAM)


class ScaleFlip:
    """The affine transform of SEAM's second branch: rescale by ``scale``, then flip left-right.

    ``apply(t, size)`` resizes to an explicit size instead: a CAM of the original image must land on
    the grid of the CAM of the transformed image, whose size the encoder's rounding decides.
    """

    def __init__(self, scale: float):
        if not 0 < scale <= 1:
            raise ValueError(f"cam.seam.scale: expected a factor in (0, 1], got {scale}")
        self.scale = scale

    def size_of(self, t: torch.Tensor) -> tuple[int, int]:
        return max(8, round(t.shape[-2] * self.scale)), max(8, round(t.shape[-1] * self.scale))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.apply(images, self.size_of(images))

    @staticmethod
    def apply(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(t, size=size, mode="bilinear", align_corners=False).flip(-1)


def with_background(maps: torch.Tensor) -> torch.Tensor:
    """Prepend SEAM's background channel, 1 - the largest class score, to (B, C, h, w) maps in [0, 1]."""
    return torch.cat([1 - maps.max(1, keepdim=True).values, maps], 1)


def keep_top_class(maps: torch.Tensor) -> torch.Tensor:
    """Zero every class score (channels 1.., after the background) below its pixel's largest class score."""
    classes = maps[:, 1:]
    top = classes.max(1, keepdim=True).values
    return torch.cat([maps[:, :1], torch.where(classes < top, torch.zeros_like(classes), classes)], 1)


def pixel_affinity(embedding: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """(B, D, h, w) -> (B, N, N), N = h * w: ReLU of the cosine similarity between every pair of
    pixels, each column divided by its sum, so that column j holds the weights pixel j collects."""
    f = embedding.flatten(2)
    f = f / (f.norm(dim=1, keepdim=True) + eps)
    affinity = torch.relu(f.transpose(1, 2) @ f)
    return affinity / (affinity.sum(1, keepdim=True) + eps)


def propagate(maps: torch.Tensor, affinity: torch.Tensor) -> torch.Tensor:
    """Refine (B, K, h, w) maps by an affinity (B, N, N): pixel j becomes sum_i maps[i] affinity[i, j]."""
    b, k, h, w = maps.shape
    return (maps.flatten(2) @ affinity).reshape(b, k, h, w)


class PixelCorrelation(nn.Module):
    """PCM: projections of low-level features plus the image -> embedding -> affinity -> refined maps."""

    def __init__(self, feature_channels: tuple[int, ...], dim: int = 192):
        super().__init__()
        if len(feature_channels) != len(PCM_PROJECTIONS):
            raise ValueError(
                f"PCM: expected {len(PCM_PROJECTIONS)} feature maps, got {len(feature_channels)}"
            )
        self.projections = nn.ModuleList(
            nn.Conv2d(c, p, 1, bias=False) for c, p in zip(feature_channels, PCM_PROJECTIONS)
        )
        self.embed = nn.Conv2d(3 + sum(PCM_PROJECTIONS), dim, 1, bias=False)
        for conv in self.projections:
            nn.init.kaiming_normal_(conv.weight)
        nn.init.xavier_uniform_(self.embed.weight, gain=4)  # SEAM's init: a peaked affinity from the start

    def embedding(
        self, image: torch.Tensor, features: list[torch.Tensor], size: tuple[int, int]
    ) -> torch.Tensor:
        parts = [F.interpolate(image, size=size, mode="area")]
        parts += [
            torch.relu(project(F.interpolate(f, size=size, mode="area")))
            for project, f in zip(self.projections, features)
        ]
        return self.embed(torch.cat(parts, 1))

    def forward(self, maps: torch.Tensor, image: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        """Refine ``maps`` (B, K, h, w) with the affinity of ``image`` and ``features`` on that grid."""
        return propagate(maps, pixel_affinity(self.embedding(image, features, tuple(maps.shape[-2:]))))


def pcm_input(cam: torch.Tensor) -> torch.Tensor:
    """What the PCM refines (no gradient): max-normalised CAM, background channel, top class per pixel."""
    with torch.no_grad():
        return keep_top_class(with_background(max_normalise(cam.detach())))


class SEAMNet(CAMNet):
    """CAM network + PCM. ``forward`` gives ``gap_logits`` (B, C), ``cam`` (B, C, h, w) raw class
    scores and ``refined`` (B, 1 + C, h, w), the PCM-refined maps with the background channel first."""

    def __init__(self, encoder: Encoder, n_classes: int, pcm_dim: int = 192):
        super().__init__(encoder, n_classes)
        if len(encoder.stage_ends) < 3:
            raise ValueError("seam: this encoder does not declare its stride-8 and stride-16 layers")
        self.pcm_layers = tuple(encoder.stage_ends[1:3])
        self.pcm = PixelCorrelation(tuple(encoder.stage_channels[1:3]), pcm_dim)

    def forward(self, x01: torch.Tensor, superpixels: torch.Tensor | None = None) -> dict:
        x = normalise(x01, self.encoder)
        feats, tapped = self.encoder.forward_features(x, taps=self.pcm_layers)
        cam = self.classifier(feats)
        low_level = [tapped[i].detach() for i in self.pcm_layers]
        return {"gap_logits": cam.mean((2, 3)), "cam": cam, "refined": self.pcm(pcm_input(cam), x, low_level)}

    def cam(self, x01: torch.Tensor) -> torch.Tensor:
        """The PCM-refined class maps (B, C, h, w), what SEAM infers with."""
        return self(x01)["refined"][:, 1:]

    def sp_score_map(self, x01: torch.Tensor) -> torch.Tensor:
        return self.cam(x01)

    def inference_maps(self, x01: torch.Tensor) -> dict:
        out = self(x01)
        return {"cam": out["refined"][:, 1:], "sp": out["refined"][:, 1:], "logits": out["gap_logits"]}
