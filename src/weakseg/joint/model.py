"""The joint network: one encoder, a CAM generator's classification head and a segmentation head.

The classification side is the ``cam.model`` network itself (plain CAM or SPN, ``cam/models.py``),
whose encoder the segmentation head shares. The segmentation head is the dual-branch paper's: two
3x3 conv + BN + ReLU layers and a 1x1 conv to the dataset's classes, on the encoder's features
projected to ``joint.head_channels`` by a 1x1 conv.

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
from weakseg.segment.models import Segmenter, _conv_bn_relu

JOINT_HEADS = ("cam", "spn")  # CAM generators whose head reads the shared encoder's features directly


class JointNet(Segmenter):
    def __init__(self, cam_net: CAMNet, n_classes: int, has_background: bool, head_channels: int):
        super().__init__(cam_net.encoder, n_classes, has_background)
        self.cam_net = cam_net
        channels = cam_net.encoder.out_channels
        self.seg_head = nn.Sequential(
            # A 1x1 projection first: the paper's 3x3 conv on all encoder channels (1280 for
            # EfficientNet-Lite) costs more than the rest of a CPU iteration's trainable layers.
            _conv_bn_relu(channels, head_channels),
            _conv_bn_relu(head_channels, head_channels, 3),
            _conv_bn_relu(head_channels, head_channels, 3),
            nn.Conv2d(head_channels, n_classes, 1),
        )
        # Pixels of each class among the labels mined so far (saved with the weights, so a resumed run
        # counts the same): the class prior of the labels the segmentation head learned from.
        self.register_buffer("mined_pixels", torch.zeros(n_classes, dtype=torch.float64))

    def train_outputs(self, x01: Tensor, superpixels: Tensor | None = None) -> dict:
        """One encoder pass: ``gap_logits`` (B, n_fg), ``cam`` (B, n_fg, h, w) the classifier at every
        location, ``seg`` (B, n_classes, h, w) segmentation logits at the encoder's resolution; an SPN
        with ``superpixels`` also gives ``sp_logits`` (B, n_fg) and ``sp_map`` (B, n_fg, h', w'), the
        SP-branch scores whose superpixel means are SP-CAM."""
        feats = self.features(x01)
        out = {
            "gap_logits": self.cam_net.classifier(feats.mean((2, 3), keepdim=True)).flatten(1),
            "cam": self.cam_net.classifier(feats),
            "seg": self.seg_head(feats),
        }
        if isinstance(self.cam_net, SPN) and superpixels is not None:
            out.update(self.cam_net.sp_outputs(feats, superpixels))
            out["sp_map"] = self.cam_net._sp_scores(feats)
        return out

    def forward(self, x01: Tensor, image_labels: Tensor | None = None) -> dict:
        """Segmentation logits at the input's size and the image-level logits (``image_labels`` unused)."""
        feats = self.features(x01)
        logits = F.interpolate(
            self.seg_head(feats), size=x01.shape[-2:], mode="bilinear", align_corners=False
        )
        return {"logits": logits, "cls": self.cam_net.classifier(feats.mean((2, 3), keepdim=True)).flatten(1)}


def build_joint_network(cam_cfg: dict, n_classes: int, has_background: bool, head_channels: int) -> JointNet:
    """The joint network on the ``cam`` section's encoder and head (``cam.model`` cam or spn)."""
    if cam_cfg["model"] not in JOINT_HEADS:
        raise ConfigError(
            f"cam.model: one-stage training (joint.enabled) shares the encoder with a {' or '.join(JOINT_HEADS)} "
            f"head, got '{cam_cfg['model']}'"
        )
    n_fg = n_classes - (1 if has_background else 0)
    return JointNet(build_classifier(cam_cfg, n_fg), n_classes, has_background, head_channels)


def build_joint_segmenter(seg_config: dict, n_classes: int, has_background: bool) -> JointNet:
    """The joint network a model file's ``segment`` section describes (see ``joint_model_section``)."""
    cam_cfg = {**seg_config["cam"], "pretrained": seg_config["pretrained"], "weights": seg_config["weights"]}
    return build_joint_network(cam_cfg, n_classes, has_background, seg_config["joint"]["head_channels"])


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
