"""The joint network: one encoder, a CAM generator's classification head and a segmentation head.

The classification side is the ``cam.model`` network itself (plain CAM or SPN, ``cam/models.py``),
whose encoder the segmentation head shares. The segmentation head (``joint.head``) is

* ``plain``: the dual-branch paper's: two 3x3 conv + BN + ReLU layers and a 1x1 conv to the dataset's
  classes, on the encoder's features projected to ``joint.head_channels`` by a 1x1 conv;
* ``rrm``: RRM's two sub-branches. The local one is the plain head's convolutions; the global one
  reads three levels of the encoder (the last layers at stride 8 and 16 and the output) through
  R-FAM, a feature aggregation that reweights the levels per channel from the image's pooled
  descriptor, so that the branch can lean on mid-level features where the deep ones are too
  coarse for the few reliable pixels. The classifier reads both sub-branches' features.

Every head returns its logits and the features its classifier reads (RRM's BCD loss pulls those
apart by class).

As a ``Segmenter`` (``forward(x01, image_labels)`` -> ``{"logits", "cls"}``) it is a round-0
segmentation network: prediction, the rounds' stages and ``weakseg predict`` use it like the others.
Training reads ``train_outputs`` instead, which gives the classifier's logits and maps and the
segmentation logits from one encoder pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from weakseg.cam.models import SPN, CAMNet, build_classifier
from weakseg.config import ConfigError
from weakseg.labels import LEVELS
from weakseg.segment.models import Segmenter, _conv_bn_relu

JOINT_HEADS = ("cam", "spn")  # CAM generators whose head reads the shared encoder's features directly


def _local_layers(channels: int, head_channels: int) -> list[nn.Module]:
    # A 1x1 projection first: the paper's 3x3 conv on all encoder channels (1280 for EfficientNet-Lite)
    # costs more than the rest of a CPU iteration's trainable layers.
    return [
        _conv_bn_relu(channels, head_channels),
        _conv_bn_relu(head_channels, head_channels, 3),
        _conv_bn_relu(head_channels, head_channels, 3),
    ]


class PlainHead(nn.Sequential):
    """The dual-branch paper's segmentation head (a Sequential, so that its weights keep their names)."""

    taps: tuple[int, ...] = ()

    def __init__(self, encoder, head_channels: int, n_classes: int):
        super().__init__(
            *_local_layers(encoder.out_channels, head_channels), nn.Conv2d(head_channels, n_classes, 1)
        )

    def forward(self, feats: Tensor, tapped: dict | None = None) -> tuple[Tensor, Tensor]:
        *body, classifier = self
        for layer in body:
            feats = layer(feats)
        return classifier(feats), feats


class ReweightedAggregation(nn.Module):
    """R-FAM: levels of the encoder, each projected to ``channels`` and resized to the deepest grid,
    summed with per-level, per-channel weights (a softmax over the levels) computed from the pooled
    descriptor of all levels; the image's pooled context is then added back at every location."""

    def __init__(self, level_channels: tuple[int, ...], channels: int):
        super().__init__()
        self.project = nn.ModuleList([_conv_bn_relu(c, channels) for c in level_channels])
        self.n_levels, self.channels = len(level_channels), channels
        self.reweight = nn.Sequential(
            nn.Linear(len(level_channels) * channels, channels),
            nn.ReLU(inplace=True),
            nn.Linear(channels, len(level_channels) * channels),
        )
        self.context = nn.Sequential(nn.Linear(channels, channels), nn.ReLU(inplace=True))
        self.fuse = _conv_bn_relu(channels, channels, 3)

    def level_weights(self, levels: list[Tensor]) -> Tensor:
        """(B, L, C, 1, 1) weights of the levels, summing to 1 over L."""
        pooled = torch.cat([level.mean((2, 3)) for level in levels], dim=1)
        logits = self.reweight(pooled).view(-1, self.n_levels, self.channels)
        return logits.softmax(1)[..., None, None]

    def forward(self, levels: list[Tensor]) -> Tensor:
        size = levels[-1].shape[-2:]
        projected = [
            F.interpolate(p(x), size=size, mode="bilinear", align_corners=False)
            if x.shape[-2:] != size
            else p(x)
            for p, x in zip(self.project, levels)
        ]
        fused = (self.level_weights(projected) * torch.stack(projected, dim=1)).sum(1)
        fused = fused + self.context(fused.mean((2, 3)))[..., None, None]
        return self.fuse(fused)


class RRMHead(nn.Module):
    """RRM's segmentation branch: a local sub-branch (the plain convolutions) and a global one (R-FAM
    over the encoder's stride-8, stride-16 and output features); a 1x1 classifier on both."""

    def __init__(self, encoder, head_channels: int, n_classes: int):
        super().__init__()
        if len(encoder.stage_ends) < 3:
            raise ConfigError(
                "joint.head: rrm reads the encoder's stride-8 and stride-16 layers; this backbone does not name them"
            )
        self.taps = tuple(encoder.stage_ends[1:3])
        self.local = nn.Sequential(*_local_layers(encoder.out_channels, head_channels))
        self.aggregate = ReweightedAggregation(
            (*encoder.stage_channels[1:3], encoder.out_channels), head_channels
        )
        self.classifier = nn.Conv2d(2 * head_channels, n_classes, 1)

    def forward(self, feats: Tensor, tapped: dict) -> tuple[Tensor, Tensor]:
        levels = [tapped[i] for i in self.taps] + [feats]
        features = torch.cat([self.local(feats), self.aggregate(levels)], dim=1)
        return self.classifier(features), features


SEG_HEADS = {"plain": PlainHead, "rrm": RRMHead}  # joint.head


def build_seg_head(name: str, encoder, head_channels: int, n_classes: int) -> nn.Module:
    if name not in SEG_HEADS:
        raise ConfigError(f"joint.head: expected one of {', '.join(SEG_HEADS)}, got {name!r}")
    return SEG_HEADS[name](encoder, head_channels, n_classes)


class JointNet(Segmenter):
    def __init__(
        self, cam_net: CAMNet, n_classes: int, has_background: bool, head_channels: int, head: str = "plain"
    ):
        super().__init__(cam_net.encoder, n_classes, has_background)
        self.cam_net = cam_net
        self.seg_head = build_seg_head(head, cam_net.encoder, head_channels, n_classes)
        # Pixels of each class among the labels mined so far (saved with the weights, so a resumed run
        # counts the same): the class prior of the labels the segmentation head learned from.
        self.register_buffer("mined_pixels", torch.zeros(n_classes, dtype=torch.float64))
        # The decayed histogram of the recent batches' best CAM scores that rrm calibrates its background
        # threshold on (saved with the weights for the same reason).
        self.register_buffer("score_histogram", torch.zeros(LEVELS, dtype=torch.float64))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Model files written before the histogram existed: an empty one (it only matters in training).
        state_dict.setdefault(prefix + "score_histogram", torch.zeros(LEVELS, dtype=torch.float64))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def encode(self, x01: Tensor) -> tuple[Tensor, dict]:
        """The encoder's output and the layers the segmentation head taps."""
        taps = self.seg_head.taps
        if not taps:
            return self.features(x01), {}
        return self.encoder.forward_features(self.encoder_input(x01), taps=taps)

    def train_outputs(self, x01: Tensor, superpixels: Tensor | None = None) -> dict:
        """One encoder pass: ``gap_logits`` (B, n_fg), ``cam`` (B, n_fg, h, w) the classifier at every
        location, ``seg`` (B, n_classes, h, w) segmentation logits at the encoder's resolution and
        ``seg_features`` the features the segmentation classifier reads; an SPN with ``superpixels``
        also gives ``sp_logits`` (B, n_fg) and ``sp_map`` (B, n_fg, h', w'), the SP-branch scores whose
        superpixel means are SP-CAM."""
        feats, tapped = self.encode(x01)
        seg, seg_features = self.seg_head(feats, tapped)
        out = {
            "gap_logits": self.cam_net.classifier(feats.mean((2, 3), keepdim=True)).flatten(1),
            "cam": self.cam_net.classifier(feats),
            "seg": seg,
            "seg_features": seg_features,
        }
        if isinstance(self.cam_net, SPN) and superpixels is not None:
            out.update(self.cam_net.sp_outputs(feats, superpixels))
            out["sp_map"] = self.cam_net._sp_scores(feats)
        return out

    def forward(self, x01: Tensor, image_labels: Tensor | None = None, output_size=None) -> dict:
        """Segmentation logits at the input's size (or ``output_size``) and the image-level logits
        (``image_labels`` unused)."""
        feats, tapped = self.encode(x01)
        size = tuple(output_size or x01.shape[-2:])
        logits = F.interpolate(
            self.seg_head(feats, tapped)[0], size=size, mode="bilinear", align_corners=False
        )
        return {"logits": logits, "cls": self.cam_net.classifier(feats.mean((2, 3), keepdim=True)).flatten(1)}


def build_joint_network(
    cam_cfg: dict, n_classes: int, has_background: bool, head_channels: int, head: str = "plain"
) -> JointNet:
    """The joint network on the ``cam`` section's encoder and head (``cam.model`` cam or spn), with the
    ``head`` segmentation head (``joint.head``)."""
    if cam_cfg["model"] not in JOINT_HEADS:
        raise ConfigError(
            f"cam.model: one-stage training (joint.enabled) shares the encoder with a {' or '.join(JOINT_HEADS)} "
            f"head, got '{cam_cfg['model']}'"
        )
    n_fg = n_classes - (1 if has_background else 0)
    return JointNet(build_classifier(cam_cfg, n_fg), n_classes, has_background, head_channels, head)


def build_joint_segmenter(seg_config: dict, n_classes: int, has_background: bool) -> JointNet:
    """The joint network a model file's ``segment`` section describes (see ``joint_model_section``)."""
    cam_cfg = {**seg_config["cam"], "pretrained": seg_config["pretrained"], "weights": seg_config["weights"]}
    joint = seg_config["joint"]
    # Model files written before joint.head existed have the plain head.
    return build_joint_network(
        cam_cfg, n_classes, has_background, joint["head_channels"], joint.get("head", "plain")
    )


def joint_model_section(segment: dict, cam_cfg: dict, joint_cfg: dict) -> dict:
    """The ``segment`` section of a joint model file: the prediction keys of the run's segment section
    (scales, flip, prior adjustment), ``model: joint`` and the cam / joint sections that rebuild it."""
    from weakseg.config import model_section

    return {
        **model_section(segment),
        "model": "joint",
        "backbone": cam_cfg["backbone"],
        "pretrained": cam_cfg["pretrained"],
        "weights": cam_cfg["weights"],
        "freeze_encoder": cam_cfg["freeze_encoder"],
        "cam": cam_cfg,
        "joint": joint_cfg,
    }
