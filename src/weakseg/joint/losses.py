"""The dense energy loss of RRM (after Tang et al.'s regularised losses), computed on a local window.

E = sum_i S(i) sum_{j in window(i), j != i} G(i, j) sum_{a != b} P_i(a) P_j(b),
G(i, j) = exp(-|p_i - p_j|^2 / 2 sigma_xy^2 - |I_i - I_j|^2 / 2 sigma_rgb^2).

Since sum_a P_i(a) = 1, sum_{a != b} P_i(a) P_j(b) = 1 - <P_i, P_j>: the loss is zero when similar
neighbours agree on a one-hot prediction and grows with their disagreement. It is evaluated at the
mining resolution (the image downsampled by ``joint.label_stride``) over a (2r + 1)^2 window, one
shifted copy per offset: cost O(window x pixels x classes), no dense N x N kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def window_offsets(radius: int) -> list[tuple[int, int]]:
    """Every offset of the (2r + 1)^2 window except the centre."""
    return [
        (dy, dx)
        for dy in range(-radius, radius + 1)
        for dx in range(-radius, radius + 1)
        if (dy, dx) != (0, 0)
    ]


def dense_energy_loss(
    probs: torch.Tensor,
    image: torch.Tensor,
    weight: torch.Tensor,
    sigma_xy: float,
    sigma_rgb: float,
    radius: int,
) -> torch.Tensor:
    """Mean over the batch's pixels of S(i) sum_j G(i, j) (1 - <P_i, P_j>).

    probs (B, K, H, W) class probabilities (softmax); image (B, 3, H, W) RGB in 0..255 (no gradient);
    weight (B, H, W) the soft filter S in [0, 1] (RRM: the pixels the mined labels leave out).
    ``sigma_xy`` and ``radius`` are in pixels of these maps, ``sigma_rgb`` in 0..255 units. Neighbours
    outside the image do not count.
    """
    if weight.shape != (probs.shape[0], *probs.shape[-2:]):
        raise ValueError(f"dense energy loss: weight must be (B, H, W), got {tuple(weight.shape)}")
    energy = pixel_energy(probs, image, sigma_xy, sigma_rgb, radius)
    return (weight * energy).sum() / energy.numel()


def pixel_energy(
    probs: torch.Tensor, image: torch.Tensor, sigma_xy: float, sigma_rgb: float, radius: int
) -> torch.Tensor:
    """(B, H, W): sum_j G(i, j) (1 - <P_i, P_j>) of every pixel i, before the soft filter (so that it can
    be computed while the filter, which depends on the mined labels, is still being made)."""
    if probs.ndim != 4 or image.shape != (probs.shape[0], 3, *probs.shape[-2:]):
        raise ValueError(
            f"dense energy loss: expected probs (B, K, H, W) and image (B, 3, H, W) of the same size, "
            f"got {tuple(probs.shape)} and {tuple(image.shape)}"
        )
    batch, _, height, width = probs.shape
    pad = radius
    image = image.detach().float()
    padded_probs = F.pad(probs, (pad, pad, pad, pad))
    padded_image = F.pad(image, (pad, pad, pad, pad))
    inside = F.pad(torch.ones(height, width, dtype=probs.dtype, device=probs.device), (pad,) * 4)
    total = probs.new_zeros(batch, height, width)
    for dy, dx in window_offsets(radius):
        rows, cols = slice(pad + dy, pad + dy + height), slice(pad + dx, pad + dx + width)
        colour = ((padded_image[:, :, rows, cols] - image) ** 2).sum(1)
        kernel = torch.exp(-(dy * dy + dx * dx) / (2 * sigma_xy**2) - colour / (2 * sigma_rgb**2))
        kernel = kernel * inside[rows, cols]  # a neighbour outside the image is no neighbour
        agreement = (probs * padded_probs[:, :, rows, cols]).sum(1)
        total = total + kernel * (1.0 - agreement)
    return total


def class_centre_loss(
    features: torch.Tensor, probs: torch.Tensor, margin: float, min_mass: float = 0.01
) -> torch.Tensor:
    """RRM's BCD loss, per class: each image's feature centre of class k is the mean of its
    L2-normalised features weighted by P(k); the loss is the mean squared distance of each feature to
    its classes' centres (weighted by P) plus the mean over pairs of classes present in an image of
    relu(margin - |c_a - c_b|^2). With a background class and one object that is RRM's
    foreground/background pair.

    features (B, C, h, w), probs (B, K, h, w) softmax probabilities at the same size. A class counts
    as present in an image when its probability mass is at least ``min_mass`` of the pixels. Squared
    distances of unit vectors lie in [0, 4], so ``margin`` is in those units.
    """
    if features.shape[0] != probs.shape[0] or features.shape[-2:] != probs.shape[-2:]:
        raise ValueError(
            f"centre loss: features {tuple(features.shape)} and probs {tuple(probs.shape)} must share batch and size"
        )
    f = F.normalize(features.flatten(2), dim=1)  # (B, C, N)
    p = probs.flatten(2)  # (B, K, N)
    mass = p.sum(-1)  # (B, K)
    centres = torch.einsum("bkn,bcn->bkc", p, f) / mass.clamp(min=1e-6)[..., None]
    # sum_k P_ik |f_i - c_k|^2 = 1 - 2 sum_k P_ik <f_i, c_k> + sum_k P_ik |c_k|^2 (|f_i| = 1, sum_k P_ik = 1)
    closeness = torch.einsum("bkn,bkc,bcn->bn", p, centres, f)
    spread = torch.einsum("bkn,bk->bn", p, (centres**2).sum(-1))
    compactness = (1.0 - 2.0 * closeness + spread).mean()
    present = mass >= min_mass * p.shape[-1]  # (B, K)
    pairs = present[:, :, None] & present[:, None, :]
    pairs &= ~torch.eye(p.shape[1], dtype=torch.bool, device=p.device)
    if not bool(pairs.any()):
        return compactness
    gaps = torch.cdist(centres, centres) ** 2  # (B, K, K)
    separation = F.relu(margin - gaps)[pairs].mean()
    return compactness + separation
