"""The dual-branch network with activation modulation (Wang, Tan, Feng 2024).

- **CNN branch**: our encoder, with an activation modulation module after each of the stages named
  in ``cam.dual.modulation_stages`` (1-3: the last layers at stride 4, 8 and 16, ``Encoder.stage_ends``;
  ResNet-50's layer1-3, EfficientNet-Lite's last blocks of 24, 40 and 112 (Lite0) channels), then
  a 1x1 classifier with global average pooling, as CAMNet.
- **Activation modulation**: channel, then spatial (serial). Channel: global average pool, 1x1
  conv, Gaussian gain g, multiplied onto the features. Spatial: channel-wise max and mean,
  concatenated, 7x7 conv, g, multiplied on. g(v) = exp(-(v - mu)^2 / (2 sigma^2)) with mu, sigma the
  mean and standard deviation of v: the middle activations keep their value, the most and least
  activated ones are damped, so the classifier must use more of the object.
- **Transformer branch**: torchvision's ViT-B/16 when its ImageNet weights are in
  ``$TORCH_HOME/hub/checkpoints``; otherwise (the adaptation for machines without them) a small
  transformer over the CNN's stride-16 tokens (stage 3, before its modulation): a hybrid ViT. An
  auxiliary classifier reads an intermediate layer (ToCo: layer 10 of 12), the final classifier the
  last; both score every patch token and take the global max.
The losses (``losses.dual_loss``): the three multi-label soft-margin losses, plus the L1 consistency
lambda_aux |M_cnn - M_aux| + lambda_vit |M_cnn - M_vit| of the max-normalised maps.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from weakseg.cam.models import CAMNet, max_normalise
from weakseg.nets.backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Encoder,
    WeightsNotFoundError,
    normalise,
    trainable,
)

log = logging.getLogger("weakseg")

TRANSFORMERS = ("auto", "hybrid", "vit_b_16")
# torchvision ViT: weight file in torch.hub.get_dir()/checkpoints and the builder of its architecture.
VIT_FILES = {"vit_b_16": ("vit_b_16-c867db91.pth", torchvision.models.vit_b_16)}
POSITION_GRID = 16  # the hybrid's learned position embedding, resized to each token grid


def gaussian_gain(values: torch.Tensor, dims: tuple[int, ...], eps: float = 1e-6) -> torch.Tensor:
    """g(v) = exp(-(v - mu)^2 / (2 sigma^2)), mu and sigma over ``dims``: 1 at the mean, falling to
    0 for the most and the least activated values."""
    mu = values.mean(dims, keepdim=True)
    sigma = values.std(dims, keepdim=True, correction=0)
    return torch.exp(-0.5 * ((values - mu) / (sigma + eps)) ** 2)


def _gain(values: torch.Tensor, dims: tuple[int, ...], normalise_gain: bool) -> torch.Tensor:
    gain = gaussian_gain(values, dims)
    # Mean gain 1: the redistribution is the paper's, but pretrained (possibly frozen) layers after
    # the module keep receiving features of the overall scale they were trained on.
    return gain / gain.mean(dims, keepdim=True) if normalise_gain else gain


class ChannelModulation(nn.Module):
    def __init__(self, channels: int, normalise_gain: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)
        self.normalise_gain = normalise_gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * _gain(self.conv(x.mean((2, 3), keepdim=True)), (1,), self.normalise_gain)


class SpatialModulation(nn.Module):
    def __init__(self, normalise_gain: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 7, padding=3)
        self.normalise_gain = normalise_gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], 1)
        return x * _gain(self.conv(pooled), (2, 3), self.normalise_gain)


class ActivationModulation(nn.Sequential):
    """Channel modulation, then spatial modulation (the paper's serial order)."""

    def __init__(self, channels: int, normalise_gain: bool = True):
        super().__init__(ChannelModulation(channels, normalise_gain), SpatialModulation(normalise_gain))


class TokenClassifiers(nn.Module):
    """The auxiliary and the final classifier of a transformer branch: class scores of every patch
    token (as maps), image logits by global max pooling."""

    def __init__(self, dim: int, n_classes: int):
        super().__init__()
        self.aux_norm = nn.LayerNorm(dim)
        self.aux = nn.Linear(dim, n_classes, bias=False)
        self.final = nn.Linear(dim, n_classes, bias=False)

    def forward(self, aux_tokens: torch.Tensor, final_tokens: torch.Tensor, grid: tuple[int, int]) -> dict:
        def maps(tokens, classifier):
            return classifier(tokens).transpose(1, 2).reshape(tokens.shape[0], -1, *grid)

        aux_cam, vit_cam = maps(self.aux_norm(aux_tokens), self.aux), maps(final_tokens, self.final)
        return {
            "aux_cam": aux_cam,
            "aux_logits": aux_cam.amax((2, 3)),
            "vit_cam": vit_cam,
            "vit_logits": vit_cam.amax((2, 3)),
        }


def default_aux_layer(depth: int) -> int:
    """ToCo's auxiliary layer, 10 of 12, at the same relative depth."""
    return max(1, min(depth - 1, round(depth * 10 / 12)))


class HybridTransformer(nn.Module):
    """Pre-norm transformer layers over CNN feature tokens (1x1 projection + learned positions)."""

    def __init__(self, in_channels: int, n_classes: int, dim: int, depth: int, heads: int, aux_layer: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"cam.dual: dim {dim} is not a multiple of heads {heads}")
        if not 1 <= aux_layer <= depth:
            raise ValueError(f"cam.dual.aux_layer: expected 1..{depth} (the depth), got {aux_layer}")
        self.embed = nn.Conv2d(in_channels, dim, 1)
        self.position = nn.Parameter(torch.zeros(1, dim, POSITION_GRID, POSITION_GRID))
        nn.init.trunc_normal_(self.position, std=0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.aux_layer = aux_layer
        self.heads = TokenClassifiers(dim, n_classes)

    def forward(self, features: torch.Tensor) -> dict:
        grid = tuple(features.shape[-2:])
        x = self.embed(features) + F.interpolate(
            self.position, size=grid, mode="bilinear", align_corners=False
        )
        x = x.flatten(2).transpose(1, 2)
        aux = None
        for i, layer in enumerate(self.layers, 1):
            x = layer(x)
            if i == self.aux_layer:
                aux = x
        return self.heads(aux, self.norm(x), grid)


def vit_weights_path(name: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / VIT_FILES[name][0]


class TorchvisionViT(nn.Module):
    """A torchvision VisionTransformer's patch embedding and layers (ImageNet weights when pretrained),
    position embeddings resized to each image's patch grid, with our token classifiers."""

    def __init__(self, name: str, n_classes: int, aux_layer: int | None, pretrained: bool):
        super().__init__()
        file, builder = VIT_FILES[name]
        net = builder(weights=None)
        if pretrained:
            path = vit_weights_path(name)
            if not path.is_file():
                raise WeightsNotFoundError(
                    f"ImageNet weights for {name} not found at {path}: put the file there "
                    f"(no download is attempted) or set cam.dual.transformer: hybrid"
                )
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
            log.info("loaded %s ImageNet weights from %s", name, path)
        self.patch_size = net.patch_size
        self.conv_proj, self.class_token = net.conv_proj, net.class_token
        self.pos_embedding, self.layers, self.norm = (
            net.encoder.pos_embedding,
            net.encoder.layers,
            net.encoder.ln,
        )
        depth = len(self.layers)
        self.aux_layer = aux_layer or default_aux_layer(depth)
        if not 1 <= self.aux_layer <= depth:
            raise ValueError(f"cam.dual.aux_layer: expected 1..{depth} for {name}, got {self.aux_layer}")
        self.heads = TokenClassifiers(net.hidden_dim, n_classes)

    def pretrained_parameters(self) -> list[nn.Parameter]:
        """Everything but the token classifiers: what the ImageNet weights initialise."""
        return [p for n, p in self.named_parameters() if not n.startswith("heads.")]

    def forward(self, x01: torch.Tensor) -> dict:
        mean = x01.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = x01.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
        patches = self.conv_proj((x01 - mean) / std)
        grid = tuple(patches.shape[-2:])
        side = math.isqrt(self.pos_embedding.shape[1] - 1)
        position = self.pos_embedding[:, 1:].transpose(1, 2).reshape(1, -1, side, side)
        position = (
            F.interpolate(position, size=grid, mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
        )
        tokens = patches.flatten(2).transpose(1, 2) + position
        cls = self.class_token.expand(len(x01), -1, -1) + self.pos_embedding[:, :1]
        x, aux = torch.cat([cls, tokens], 1), None
        for i, layer in enumerate(self.layers, 1):
            x = layer(x)
            if i == self.aux_layer:
                aux = x
        return self.heads(aux[:, 1:], self.norm(x)[:, 1:], grid)


class DualNet(CAMNet):
    """CNN branch with activation modulation + transformer branch.

    ``forward`` gives ``gap_logits`` and ``cam`` (the CNN branch, as CAMNet) and ``aux_cam``,
    ``aux_logits``, ``vit_cam``, ``vit_logits`` (the transformer's two classifiers). ``token_layer``:
    the encoder layer whose output a hybrid transformer reads; None for a transformer of the image.
    ``infer_maps``: ``cnn`` infers with the CNN branch's CAM; ``mean`` averages it with the
    transformer's final map (each max-normalised).
    """

    def __init__(
        self,
        encoder: Encoder,
        n_classes: int,
        transformer: nn.Module,
        token_layer: int | None,
        modulation_stages=(1, 2, 3),
        normalise_gain: bool = True,
        infer_maps: str = "cnn",
    ):
        super().__init__(encoder, n_classes)
        if len(encoder.stage_ends) < 3:
            raise ValueError("dual: this encoder does not declare its stride-4, 8 and 16 layers")
        if infer_maps not in ("cnn", "mean"):
            raise ValueError(f"cam.dual.infer_maps: expected 'cnn' or 'mean', got {infer_maps!r}")
        self.modulation = nn.ModuleDict(
            {
                str(encoder.stage_ends[s - 1]): ActivationModulation(
                    encoder.stage_channels[s - 1], normalise_gain
                )
                for s in sorted(set(modulation_stages))
            }
        )
        self.transformer, self.token_layer, self.infer_maps = transformer, token_layer, infer_maps

    def _cnn(self, x01: torch.Tensor) -> tuple[torch.Tensor, dict]:
        after = {int(k): m for k, m in self.modulation.items()}
        taps = () if self.token_layer is None else (self.token_layer,)
        feats, tapped = self.encoder.forward_features(normalise(x01, self.encoder), after=after, taps=taps)
        return self.classifier(feats), tapped

    def _transformer(self, x01: torch.Tensor, tapped: dict) -> dict:
        return self.transformer(x01 if self.token_layer is None else tapped[self.token_layer])

    def forward(self, x01: torch.Tensor, superpixels: torch.Tensor | None = None) -> dict:
        cam, tapped = self._cnn(x01)
        return {"gap_logits": cam.mean((2, 3)), "cam": cam, **self._transformer(x01, tapped)}

    def param_groups(self, lr: float, encoder_lr_mult: float) -> list[dict]:
        """Pretrained weights (encoder, and a torchvision ViT's layers) at ``lr * encoder_lr_mult``; the rest at ``lr``."""
        pretrained = trainable(self.encoder)
        if isinstance(self.transformer, TorchvisionViT):
            pretrained += self.transformer.pretrained_parameters()
        chosen = {id(p) for p in pretrained}
        head = [p for n, p in self.named_parameters() if not n.startswith("encoder.") and id(p) not in chosen]
        return [{"params": pretrained, "lr": lr * encoder_lr_mult}, {"params": head, "lr": lr}]

    def cam(self, x01: torch.Tensor) -> torch.Tensor:
        return self.inference_maps(x01)["cam"]

    def sp_score_map(self, x01: torch.Tensor) -> torch.Tensor:
        return self.cam(x01)

    def inference_maps(self, x01: torch.Tensor) -> dict:
        cam, tapped = self._cnn(x01)
        logits = cam.mean((2, 3))
        if self.infer_maps == "mean":
            vit = F.interpolate(
                self._transformer(x01, tapped)["vit_cam"],
                size=cam.shape[-2:],
                mode="bilinear",
                align_corners=False,
            )
            cam = (max_normalise(cam) + max_normalise(vit)) / 2
        return {"cam": cam, "sp": cam, "logits": logits}


def resolve_transformer(cam_cfg: dict) -> str:
    """``cam.dual.transformer`` made explicit: ``auto`` is ViT-B/16 when pretrained weights are
    wanted and its file is present, else the hybrid transformer."""
    choice = cam_cfg["dual"]["transformer"]
    if choice not in TRANSFORMERS:
        raise ValueError(f"cam.dual.transformer: expected one of {', '.join(TRANSFORMERS)}, got {choice!r}")
    if choice != "auto":
        return choice
    found = cam_cfg["pretrained"] and vit_weights_path("vit_b_16").is_file()
    log.info(
        "cam.dual.transformer auto: %s",
        "vit_b_16 (weights found)" if found else f"hybrid ({vit_weights_path('vit_b_16')} not found)",
    )
    return "vit_b_16" if found else "hybrid"


def build_dual(encoder: Encoder, n_classes: int, cam_cfg: dict) -> DualNet:
    """The dual-branch network of a resolved ``cam`` config section (see ``resolve_transformer``)."""
    dual = cam_cfg["dual"]
    if dual["transformer"] == "hybrid":
        token_layer = encoder.stage_ends[2]
        transformer = HybridTransformer(
            encoder.stage_channels[2],
            n_classes,
            dual["dim"],
            dual["depth"],
            dual["heads"],
            dual["aux_layer"] or default_aux_layer(dual["depth"]),
        )
    else:
        token_layer = None
        transformer = TorchvisionViT(dual["transformer"], n_classes, dual["aux_layer"], cam_cfg["pretrained"])
    return DualNet(
        encoder,
        n_classes,
        transformer,
        token_layer,
        dual["modulation_stages"],
        dual["normalise_gain"],
        dual["infer_maps"],
    )
