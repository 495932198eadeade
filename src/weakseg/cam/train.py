"""Train a CAM generator (``cam.model``: CAM, SPN, SEAM, dual branch) on image-level labels with
multi-scale training (SPN paper §5); each model's loss comes from ``losses.training_loss``.

Each batch: one size drawn from ``cam.train_sizes``; every image is padded to a square (padding
is excluded from superpixel pooling), resized to that size, flipped at random. Superpixel maps
follow the image through pad/resize/flip with nearest-neighbour sampling.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import torch

from weakseg import store, timing
from weakseg.cam.losses import training_loss
from weakseg.cam.models import build_classifier, resolve_cam_config
from weakseg.datasets import open_data, read_image
from weakseg.nets.device import select_device
from weakseg.nets.model_file import config_fingerprint, save_model
from weakseg.training import optimizer_and_schedule, seed_everything, train_loop

log = logging.getLogger("weakseg")


def square_resize(
    image: np.ndarray,
    superpixels: np.ndarray,
    size: int,
    flip: bool,
    rng: np.random.Generator | None,
    offset: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pad image (edge-mean colour) and superpixels (-1) to a square at a random offset (``offset`` in
    [0, 1]: at that fraction of the free space instead), resize, flip."""
    h, w = image.shape[:2]
    side = max(h, w)
    if offset is None:
        oy, ox = int(rng.integers(0, side - h + 1)), int(rng.integers(0, side - w + 1))
    else:
        oy, ox = round(offset * (side - h)), round(offset * (side - w))
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[:] = image.reshape(-1, 3).mean(0).astype(np.uint8)
    canvas[oy : oy + h, ox : ox + w] = image
    sp = np.full((side, side), -1, np.int32)
    sp[oy : oy + h, ox : ox + w] = superpixels
    canvas = cv2.resize(canvas, (size, size), interpolation=cv2.INTER_LINEAR)
    sp = cv2.resize(sp, (size, size), interpolation=cv2.INTER_NEAREST)
    if flip:
        canvas, sp = canvas[:, ::-1], sp[:, ::-1]
    return canvas, sp


def to_tensor01(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0)


class FrozenFeatureCache:
    """The frozen encoder layers' output and the resized superpixel map of each image variant (id, size,
    flip, padding position), up to ``max_bytes``; a variant drawn again skips the frozen layers.

    Each variant is computed alone (a batch of one), so its features do not depend on which other
    variants were missing at the same time: a resumed run, whose cache starts empty, computes the same.
    """

    def __init__(self, model, max_bytes: int):
        self.model, self.max_bytes, self.bytes = model, max_bytes, 0
        self.entries: dict[tuple, tuple[torch.Tensor, np.ndarray]] = {}
        self.hits = self.misses = 0

    def get(self, key: tuple, make) -> tuple[torch.Tensor, np.ndarray]:
        """(features (D, h, w), superpixels (size, size)) of ``key``; ``make(*key)`` gives (image,
        superpixels) resized for it when it is not cached."""
        if key in self.entries:
            self.hits += 1
            return self.entries[key]
        self.misses += 1
        image, sp = make(*key)
        with timing.kernel("frozen_layers"):
            x = to_tensor01([image]).to(next(self.model.parameters()).device)
            feats = self.model.frozen_features(x)[0]
        entry = (feats, sp)
        size = feats.numel() * feats.element_size() + sp.nbytes
        if self.bytes + size <= self.max_bytes:
            self.entries[key], self.bytes = entry, self.bytes + size
        return entry


def draw_resized_batch(rng: np.random.Generator, ids, data, sp_store, cam_cfg: dict):
    """One multi-scale training batch of a classifier: a size from ``cam.train_sizes``, ``cam.batch_size``
    distinct images, each resized square (random flip and position) with its superpixel map.
    Returns (size, the images' ids, images, superpixel maps)."""
    size = int(rng.choice(cam_cfg["train_sizes"]))
    chosen = rng.choice(len(ids), size=min(cam_cfg["batch_size"], len(ids)), replace=False)
    picked, images, sps = [], [], []
    for k in chosen:
        image, sp = square_resize(
            read_image(data, ids[k]),
            store.get(sp_store, store.SUPERPIXELS, ids[k]),
            size,
            bool(rng.integers(2)),
            rng,
        )
        picked.append(ids[k]), images.append(image), sps.append(sp)
    return size, picked, images, sps


def classifier_training_ids(info, split: str, data_path) -> list[str]:
    """The images of ``split`` a classifier learns from. With a background class an image without
    foreground labels is a negative for every class; without one it carries no label to learn from."""
    fg = info.fg_classes
    ids = [i for i in info.split(split) if info.has_background or info.label_vector(i)[fg].any()]
    if not any(info.label_vector(i)[fg].any() for i in ids):
        raise ValueError(f"{data_path}: no training image has a foreground label")
    return ids


def run_train_cam(config: dict, data_path, superpixels_path, out_dir, threads: int = 1) -> Path:
    """Train the classifier of ``config['cam']``; writes ``out_dir/model.pt`` (resumes if killed)."""
    torch.set_num_threads(max(1, threads))
    cam_cfg = resolve_cam_config(config["cam"])
    config = {**config, "cam": cam_cfg}  # the model file records the resolved choices
    info, data = open_data(data_path)
    sp_store = store.open_store(superpixels_path, "superpixels")
    fg = info.fg_classes
    ids = classifier_training_ids(info, config["dataset"]["train_split"], data_path)
    targets = {i: torch.from_numpy(info.label_vector(i)[fg].astype(np.float32)) for i in ids}
    device = select_device(config["device"])
    seed_everything(cam_cfg["seed"])  # random init of the heads (and of a non-pretrained encoder)
    model = build_classifier(cam_cfg, len(fg)).to(device)
    optimizer, scheduler = optimizer_and_schedule(model, cam_cfg)
    log.info(
        "train-cam: %s/%s on %d images, %d classes, %d iterations, device %s",
        cam_cfg["model"],
        cam_cfg["backbone"],
        len(ids),
        len(fg),
        cam_cfg["iterations"],
        device,
    )

    cache = None
    if cam_cfg["feature_cache_mb"] > 0 and cam_cfg["model"] in ("cam", "spn") and model.encoder.frozen_layers:
        cache = FrozenFeatureCache(model, cam_cfg["feature_cache_mb"] << 20)
        offsets = np.linspace(0.0, 1.0, cam_cfg["train_offsets"]) if cam_cfg["train_offsets"] > 1 else [0.5]

    def variant(image_id: str, size: int, flip: bool, offset: float) -> tuple[np.ndarray, np.ndarray]:
        image, sp = read_image(data, image_id), store.get(sp_store, store.SUPERPIXELS, image_id)
        return square_resize(image, sp, size, flip, None, offset)

    def next_cached_batch(rng: np.random.Generator) -> dict:
        """Discrete augmentation (size, flip, padding position), frozen layers from the cache."""
        size = int(rng.choice(cam_cfg["train_sizes"]))
        chosen = rng.choice(len(ids), size=min(cam_cfg["batch_size"], len(ids)), replace=False)
        feats, sps, ys = [], [], []
        for k in chosen:
            image_id, flip, offset = ids[k], bool(rng.integers(2)), float(offsets[rng.integers(len(offsets))])
            f, sp = cache.get((image_id, size, flip, offset), variant)
            feats.append(f), sps.append(sp), ys.append(targets[image_id])
        return {
            "frozen": torch.stack(feats).to(device),
            "sp": torch.from_numpy(np.stack(sps)).long().to(device),
            "y": torch.stack(ys).to(device),
        }

    def next_batch(rng: np.random.Generator) -> dict:
        _, picked, images, sps = draw_resized_batch(rng, ids, data, sp_store, cam_cfg)
        ys = [targets[image_id] for image_id in picked]
        return {
            "x": to_tensor01(images).to(device),
            "sp": torch.from_numpy(np.stack(sps)).long().to(device),
            "y": torch.stack(ys).to(device),
        }

    train_loop(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        next_batch=next_batch if cache is None else next_cached_batch,
        compute_loss=training_loss(cam_cfg),
        iterations=cam_cfg["iterations"],
        checkpoint_every=cam_cfg["checkpoint_every"],
        out_dir=Path(out_dir),
        seed=cam_cfg["seed"],
        desc="train-cam",
        fingerprint=config_fingerprint(cam_cfg, config["dataset"], config["superpixels"]),
        log_every=cam_cfg["log_every"],
        precision=cam_cfg["train_precision"],
    )
    if cache is not None:
        log.info(
            "train-cam: frozen-feature cache: %d hits, %d misses, %d variants kept in %.0f MB",
            cache.hits,
            cache.misses,
            len(cache.entries),
            cache.bytes / 2**20,
        )
    model_path = Path(out_dir) / "model.pt"
    save_model(model_path, model.cpu(), config, info.class_names, info.has_background, "cam")
    return model_path
