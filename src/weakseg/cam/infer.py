"""Multi-scale inference of CAM and SP-CAM score maps (SPN paper §5.1; IRN/SEAM CAM practice).

SP-CAM: at each scale (and its flip) the SP-branch classifier is applied at every location of the
upsampled features; that class-score map is resized bilinearly to image resolution and averaged
inside every full-resolution superpixel. Because the classifier is linear, this equals classifying
each superpixel's mean (interpolated) feature, as in training, while never losing a superpixel to
a coarse grid. Scores are aggregated by **max** over scales, then ReLU and per-class max
normalisation.
CAM: the GAP-branch classifier on the encoder features, ReLU, resized, **summed** over scales and
flips, per-class max-normalised.
Every ``cam.model`` gives its maps through ``inference_maps`` (one network pass per scale): SEAM
its PCM-refined maps, the dual-branch network its CNN-branch CAM (see ``cam.dual.infer_maps``);
their SP-CAM is the superpixel pooling of those maps, so later stages see the same score store.
"""

from __future__ import annotations

import logging
import time

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from weakseg import store, timing
from weakseg.cam.models import build_classifier, max_normalise
from weakseg.datasets import DatasetInfo, open_data, read_image
from weakseg.nets.backbones import fold_batchnorm
from weakseg.nets.device import autocast, select_device
from weakseg.nets.model_file import ModelFileError, load_model_file, load_weights
from weakseg.parallel import progress

log = logging.getLogger("weakseg")


def _flip_batch(x: torch.Tensor, flip: bool) -> torch.Tensor:
    return torch.cat([x, x.flip(-1)]) if flip else x


def _unflip_mean(maps: torch.Tensor, flip: bool) -> torch.Tensor:
    return (maps[0] + maps[1].flip(-1)) / 2 if flip else maps[0]


@torch.inference_mode()
def image_scores(
    model,
    image: np.ndarray,
    superpixels: np.ndarray,
    scales,
    flip: bool,
    device: torch.device,
    spcam_merge: str = "max",
    keep=None,
    precision: str = "float32",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (CAM, SP-CAM, label probabilities) for one image: maps (K, H, W) in [0, 1] and (K,) of
    the classes ``keep`` (indices of the model's classes, in that order; default all C).

    ``spcam_merge``: SP-CAM scores of the scales combine by ``max`` (paper) or ``mean``.
    The label probabilities are the classifier's image-level output (the model's ``logits``, else
    the mean superpixel score as the SP branch is trained), through a sigmoid, averaged over scales
    (and flips): what the model believes the image contains.
    Every class is normalised on its own, so only the kept classes are upsampled and pooled: the
    result equals computing all classes and selecting ``keep`` afterwards. ``precision``: the
    network's forward pass (``cam.infer_precision``); what follows it is float32.
    """
    h, w = image.shape[:2]
    sp = torch.from_numpy(superpixels.astype(np.int64)).to(device).reshape(-1)
    n_sp = int(sp.max()) + 1
    sp_counts = torch.bincount(sp, minlength=n_sp).clamp(min=1).float()
    keep = None if keep is None else torch.as_tensor(np.asarray(keep, dtype=np.int64), device=device)
    if keep is not None and keep.numel() == 0:  # e.g. a background-only training image: nothing to compute
        empty = torch.zeros(0, h, w, device=device)
        return empty, empty.clone(), torch.zeros(0, device=device)
    cam_total, sp_best, prob_sum = None, None, 0.0
    for s in scales:
        size = (max(8, round(w * s)), max(8, round(h * s)))
        x = torch.from_numpy(cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)).permute(2, 0, 1)
        x = _flip_batch(x[None].float().div(255).to(device), flip)
        with timing.kernel("forward"), autocast(device, precision):
            maps = model.inference_maps(x)
        maps = {k: v.float() for k, v in maps.items()}
        if keep is not None:
            maps = {k: v.index_select(1, keep) for k, v in maps.items()}
        cam = F.interpolate(maps["cam"].clamp(min=0), size=(h, w), mode="bilinear", align_corners=False)
        cam = _unflip_mean(cam, flip)
        cam_total = cam if cam_total is None else cam_total + cam
        dense = F.interpolate(maps["sp"], size=(h, w), mode="bilinear", align_corners=False)
        dense = _unflip_mean(dense, flip).reshape(dense.shape[1], -1)  # (C, H*W)
        per_sp = torch.zeros(dense.shape[0], n_sp, device=device).index_add_(1, sp, dense) / sp_counts
        if sp_best is None:
            sp_best = per_sp
        else:
            # a sum, not a mean: the same map after the per-class max normalisation below
            sp_best = torch.maximum(sp_best, per_sp) if spcam_merge == "max" else sp_best + per_sp
        logits = maps["logits"].mean(0) if "logits" in maps else per_sp.mean(1)
        prob_sum = prob_sum + torch.sigmoid(logits)
    spcam = max_normalise(sp_best[:, None, :])[:, 0, :]  # normalise per class over superpixels
    return max_normalise(cam_total), spcam[:, sp].reshape(-1, h, w), prob_sum / len(scales)


def load_cam_model(model_path, info: DatasetInfo) -> torch.nn.Module:
    """The CAM network of a ``weakseg train-cam`` model file, in eval mode, refused unless it was
    trained on the classes of ``info`` (the data store it will be applied to)."""
    ckpt = load_model_file(model_path, "cam")
    if list(ckpt["class_names"]) != list(info.class_names):
        raise ModelFileError(
            f"{model_path}: model classes {ckpt['class_names']} differ from the data store's"
        )
    cam = ckpt["config"]["cam"]
    model = build_classifier({**cam, "pretrained": False}, len(info.fg_classes))
    load_weights(model, ckpt["model"], model_path, f"'{cam.get('model')}' / '{cam.get('backbone')}'")
    return model.eval()


def run_infer_cam(
    config: dict,
    data_path,
    superpixels_path,
    model_path,
    out_path,
    threads: int = 1,
    shard: int = 0,
    n_shards: int = 1,
    split: str | None = None,
) -> int:
    """CAM and SP-CAM for every image of the data store (or of ``split`` only) into a scores store
    (keys cam, spcam).

    Training images keep only their labelled foreground classes (the only ones cleaning uses);
    other images keep all foreground classes.
    """
    torch.set_num_threads(max(1, threads))
    device = select_device(config["device"])
    info, data = open_data(data_path)
    model = load_cam_model(model_path, info)
    # channels-last weights make the convolutions run in that layout, which CPU kernels run faster at
    # inference; BatchNorm folded into the convolutions saves a pass over every feature map
    fold_batchnorm(model.to(device, memory_format=torch.channels_last))
    cam_cfg = config["cam"]
    sp_store = store.open_store(superpixels_path, "superpixels")
    train_ids = set(info.split(config["dataset"]["train_split"]))
    ids = store.shard_ids(list(info.ids) if split is None else info.split(split), shard, n_shards)
    fg = info.fg_classes
    started = time.perf_counter()
    with store.writing(out_path, "scores", store.provenance("infer_cam", cam_cfg)) as out:
        for image_id in progress(ids, "infer-cam"):
            keep = np.arange(len(fg))
            if image_id in train_ids:
                keep = np.flatnonzero(info.label_vector(image_id)[fg])
            cam, spcam, probs = image_scores(
                model,
                read_image(data, image_id),
                store.get(sp_store, store.SUPERPIXELS, image_id),
                cam_cfg["infer_scales"],
                cam_cfg["infer_flip"],
                device,
                cam_cfg["spcam_merge"],
                keep=keep,
                precision=cam_cfg["infer_precision"],
            )
            store.put_scores(
                out,
                store.CAM,
                image_id,
                cam.cpu().numpy(),
                fg[keep],
                {"label_probabilities": [round(float(v), 4) for v in probs]},
            )
            store.put_scores(out, store.SPCAM, image_id, spcam.cpu().numpy(), fg[keep])
    elapsed = time.perf_counter() - started
    log.info(
        "infer-cam: %d images in %.1f s (%.1f ms per image per scale)",
        len(ids),
        elapsed,
        1000 * elapsed / max(1, len(ids)) / len(cam_cfg["infer_scales"]),
    )
    timing.log_kernel_seconds()
    return len(ids)
