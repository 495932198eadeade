"""Training losses of the CAM generators, kept outside the networks so that each part is testable.

``training_loss(cam_cfg)`` gives the ``compute_loss(model, batch)`` of ``cam.model``; a batch holds
``x`` (B, 3, H, W) images in [0, 1], ``sp`` superpixel maps and ``y`` (B, C) image labels.

SEAM (Wang et al. 2020), with T the transform of the second branch (:class:`seam.ScaleFlip`), o and t
the original and the transformed image, M the max-normalised CAM restricted to the image's labels
and R the PCM-refined map (background channel first):
  ER  = mean |M(t) - T(M(o))|
  ECR = hard mean |T(R(o)) - M_bg(t)| + hard mean |R(t) - T(M_bg(o))|, M_bg: M with the background
        channel and only each pixel's top class, held fixed (the authors' code); the hard mean
        averages the largest ``ecr_hard_fraction`` of the differences (online hard example mining)
  total = (soft margin(o) + soft margin(t)) / 2 + er_weight ER + ecr_weight ECR
Dual branch (Wang, Tan, Feng 2024):
  total = soft margin(CNN) + soft margin(aux) + soft margin(ViT)
          + lambda_aux |M_cnn - M_aux|_1 + lambda_vit |M_cnn - M_vit|_1 (means over pixels and classes)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from weakseg.cam.models import max_normalise, multilabel_loss
from weakseg.cam.seam import ScaleFlip, keep_top_class, with_background


def soft_margin(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.multilabel_soft_margin_loss(logits, targets)


def labelled_maps(maps: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Max-normalised (B, C, h, w) maps with the classes an image is not labelled with set to 0."""
    return max_normalise(maps) * targets[:, :, None, None]


def equivariance_loss(cam_of_transformed: torch.Tensor, transformed_cam: torch.Tensor) -> torch.Tensor:
    """SEAM's ER: mean absolute difference between the maps of the transformed image and the
    transformed maps of the original. Zero exactly when the map commutes with the transform."""
    if cam_of_transformed.shape != transformed_cam.shape:
        raise ValueError(
            f"ER: maps of shapes {tuple(cam_of_transformed.shape)} and {tuple(transformed_cam.shape)}"
        )
    return (cam_of_transformed - transformed_cam).abs().mean()


def hard_mean(differences: torch.Tensor, fraction: float) -> torch.Tensor:
    """Per image, the mean of the largest ``fraction`` of the values; averaged over the batch."""
    flat = differences.flatten(1)
    k = max(1, int(flat.shape[1] * fraction))
    return flat.topk(k, dim=1).values.mean()


def seam_loss(
    model, batch: dict, transform: ScaleFlip, er_weight: float, ecr_weight: float, hard_fraction: float
) -> tuple[torch.Tensor, dict]:
    x, y = batch["x"], batch["y"]
    out_o, out_t = model(x), model(transform(x))
    y_bg = torch.cat([torch.ones_like(y[:, :1]), y], 1)
    cam_o, cam_t = labelled_maps(out_o["cam"], y), labelled_maps(out_t["cam"], y)
    grid = tuple(cam_t.shape[-2:])
    cam_o_t = transform.apply(cam_o, grid)  # T(M(o)) on the grid of M(t)
    er = equivariance_loss(cam_t, cam_o_t)
    refined_o_t = transform.apply(labelled_maps(out_o["refined"], y_bg), grid)
    refined_t = labelled_maps(out_t["refined"], y_bg)
    target_t = keep_top_class(with_background(cam_t.detach()))
    target_o_t = keep_top_class(with_background(cam_o_t.detach()))
    ecr = hard_mean((refined_o_t - target_t).abs(), hard_fraction) + hard_mean(
        (refined_t - target_o_t).abs(), hard_fraction
    )
    cls = (soft_margin(out_o["gap_logits"], y) + soft_margin(out_t["gap_logits"], y)) / 2
    total = cls + er_weight * er + ecr_weight * ecr
    return total, {
        "loss_cls": float(cls.detach()),
        "loss_er": float(er.detach()),
        "loss_ecr": float(ecr.detach()),
    }


def consistency_loss(
    cam: torch.Tensor,
    aux_cam: torch.Tensor,
    vit_cam: torch.Tensor,
    targets: torch.Tensor,
    lambda_aux: float,
    lambda_vit: float,
) -> torch.Tensor:
    """lambda_aux |M_cnn - M_aux|_1 + lambda_vit |M_cnn - M_vit|_1 on max-normalised maps of the
    labelled classes (means over pixels and classes); the transformer maps are resized to the CNN's grid."""
    grid = tuple(cam.shape[-2:])

    def on_grid(maps):
        return (
            maps
            if tuple(maps.shape[-2:]) == grid
            else F.interpolate(maps, size=grid, mode="bilinear", align_corners=False)
        )

    m_cnn = labelled_maps(cam, targets)
    m_aux, m_vit = labelled_maps(on_grid(aux_cam), targets), labelled_maps(on_grid(vit_cam), targets)
    return lambda_aux * (m_cnn - m_aux).abs().mean() + lambda_vit * (m_cnn - m_vit).abs().mean()


def dual_loss(model, batch: dict, lambda_aux: float, lambda_vit: float) -> tuple[torch.Tensor, dict]:
    y = batch["y"]
    out = model(batch["x"])
    parts = {
        "loss_cnn": soft_margin(out["gap_logits"], y),
        "loss_aux": soft_margin(out["aux_logits"], y),
        "loss_vit": soft_margin(out["vit_logits"], y),
        "loss_consistency": consistency_loss(
            out["cam"], out["aux_cam"], out["vit_cam"], y, lambda_aux, lambda_vit
        ),
    }
    return sum(parts.values()), {k: float(v.detach()) for k, v in parts.items()}


def training_loss(cam_cfg: dict) -> Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]]:
    """``compute_loss(model, batch) -> (loss, {name: float})`` for ``cam.model``."""
    model = cam_cfg["model"]
    if model == "seam":
        seam = cam_cfg["seam"]
        transform = ScaleFlip(seam["scale"])
        return lambda m, batch: seam_loss(
            m, batch, transform, seam["er_weight"], seam["ecr_weight"], seam["ecr_hard_fraction"]
        )
    if model == "dual":
        dual = cam_cfg["dual"]
        return lambda m, batch: dual_loss(m, batch, dual["lambda_aux"], dual["lambda_vit"])
    return lambda m, batch: multilabel_loss(
        m(batch.get("x"), batch["sp"], frozen=batch.get("frozen")), batch["y"], cam_cfg["gap_weight"]
    )
