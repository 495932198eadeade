"""Train the joint network (``joint.method``: annealed or rrm); writes a round-0 segmentation model.

Each iteration: a batch as in CAM training (``cam.train_sizes``, square pad + resize + flip), one
encoder pass, the classification loss of the ``cam.model`` head, then labels mined from the batch's
own CAMs (detached) at 1 / ``joint.label_stride`` of the input size, which supervise the
segmentation head by cross-entropy (255 ignored). ``rrm`` adds the dense energy loss on the pixels
the labels leave out, and optionally the BCD class-centre loss; with a background class its
threshold is calibrated (``pseudo.background.method``) on the recent batches' own CAMs, since they
change as the network trains. The first ``joint.warmup`` iterations train the classifier alone: the CAMs of
a freshly initialised head would only teach noise.

The CRF of ``rrm`` runs on a pool of ``threads`` worker processes, one job per image of the batch.
The jobs are submitted as soon as the CAMs exist; meanwhile the main process computes the
segmentation probabilities and the per-pixel energy (the expensive part of the energy loss), and
only then waits for the labels. The labels supervise the same iteration's images (no stale labels),
so the only stall is CRF time beyond that overlap; the log reports both per iteration.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from weakseg import labels as label_rules
from weakseg import store
from weakseg.cam.losses import labelled_maps
from weakseg.cam.models import multilabel_loss
from weakseg.cam.train import classifier_training_ids, draw_resized_batch, to_tensor01
from weakseg.datasets import IGNORE, open_data
from weakseg.joint.losses import class_centre_loss, pixel_energy
from weakseg.joint.mining import (
    ReliableJob,
    annealed_labels,
    annealed_threshold,
    crf_at_resolution,
    par,
    reliable_job,
)
from weakseg.joint.model import build_joint_network, joint_model_section
from weakseg.nets.device import select_device
from weakseg.nets.model_file import config_fingerprint, save_model
from weakseg.parallel import default_sigterm
from weakseg.segment.train import prior_from_counts
from weakseg.training import optimizer_and_schedule, seed_everything, train_loop

log = logging.getLogger("weakseg")
PSEUDO_KEYS = ("source", "background", "crf", "reliable")  # the pseudo.* keys the mining reads
# Each earlier batch's counts in the background calibration fade by this per batch: the CAMs change as
# the network trains, so the threshold follows the recent ones (about the last ten batches).
SCORE_HISTORY_DECAY = 0.9


def superpixel_means(maps: torch.Tensor, superpixels: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) maps averaged inside each superpixel of ``superpixels`` (B, H, W); padding (-1) is 0."""
    out = torch.zeros_like(maps)
    channels = maps.shape[1]
    for b in range(maps.shape[0]):
        ids = superpixels[b].reshape(-1)
        valid = ids >= 0
        if not bool(valid.any()):
            continue
        ids = ids[valid]
        n = int(ids.max()) + 1
        flat = maps[b].reshape(channels, -1)[:, valid]
        sums = flat.new_zeros(channels, n).index_add_(1, ids, flat)
        counts = torch.bincount(ids, minlength=n).clamp(min=1).to(flat.dtype)
        out[b].reshape(channels, -1)[:, valid] = (sums / counts)[:, ids]
    return out


class LabelMiner:
    """Turns a batch's detached CAMs into label maps (B, L, L) uint8 by ``joint.method``."""

    def __init__(
        self,
        config: dict,
        fg: np.ndarray,
        has_background: bool,
        pool: ProcessPoolExecutor | None,
        score_histogram: torch.Tensor,
    ):
        self.joint, self.pseudo = config["joint"], config["pseudo"]
        self.fg, self.has_background, self.pool = fg, has_background, pool
        self.crf_wait_s = 0.0
        self.score_histogram = score_histogram

    def background_threshold(self) -> float | None:
        """The calibrated threshold of the recent batches' CAMs (None without a background class)."""
        if not self.has_background:
            return None
        rule = self.pseudo["background"]
        return label_rules.running_threshold(
            self.score_histogram.cpu().numpy(), rule["method"], rule["threshold"]
        )

    def count_scores(self, scores: np.ndarray, valid: np.ndarray, batch: dict) -> None:
        """Add a batch's best labelled scores to the decayed histogram the threshold is calibrated on."""
        histogram = sum(
            label_rules.top_score_histogram(scores[b], self.fg, batch["image_labels"][b], valid[b])
            for b in range(len(scores))
        )
        self.score_histogram.mul_(SCORE_HISTORY_DECAY).add_(
            torch.from_numpy(histogram).to(self.score_histogram)
        )

    def threshold(self, iteration: int) -> float:
        """The annealed confident threshold th(t), t counted from the end of the warm-up."""
        annealed, warmup = self.joint["annealed"], self.joint["warmup"]
        return annealed_threshold(
            iteration - warmup, max(1, self.joint["iterations"] - warmup), annealed["start"], annealed["end"]
        )

    def annealed(self, image01: torch.Tensor, maps: torch.Tensor, batch: dict, iteration: int) -> np.ndarray:
        p = self.joint["annealed"]["par"]
        # PAR only on each image's labelled channels (the others are 0 and stay 0): a few instead of all.
        channels = [np.flatnonzero(row) for row in batch["y"].cpu().numpy() > 0.5]
        packed = maps.new_zeros(maps.shape[0], max(1, max(map(len, channels))), *maps.shape[-2:])
        for b, kept in enumerate(channels):
            packed[b, : len(kept)] = maps[b, kept]
        packed = par(
            image01, packed, p["dilations"], p["iterations"], p["colour_weight"], p["position_weight"]
        )
        refined = torch.zeros_like(maps)
        for b, kept in enumerate(channels):
            refined[b, kept] = packed[b, : len(kept)]
        refined = refined.cpu().numpy()
        th, low = self.threshold(iteration), self.joint["annealed"]["low"]
        return np.stack(
            [
                annealed_labels(refined[b], self.fg, batch["image_labels"][b], self.has_background, th, low)
                for b in range(refined.shape[0])
            ]
        )

    def submit_rrm(self, image01: torch.Tensor, maps: torch.Tensor, valid: np.ndarray, batch: dict):
        """Start the batch's CRF jobs on the pool; returns their futures."""
        size = image01.shape[-1]
        crf = crf_at_resolution(self.pseudo["crf"], size / batch["size"])
        images = (image01 * 255).round().clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()
        scores = maps.cpu().numpy().astype(np.float32)
        if self.has_background:
            self.count_scores(scores, valid, batch)
        background = label_rules.Background(
            self.has_background, self.background_threshold(), self.pseudo["background"]["margin"]
        )
        jobs = [
            ReliableJob(
                images[b],
                scores[b],
                self.fg,
                batch["image_labels"][b],
                valid[b],
                background,
                crf,
                self.pseudo["reliable"]["confidence"],
            )
            for b in range(len(images))
        ]
        return [self.pool.submit(reliable_job, job) for job in jobs]

    def collect(self, futures) -> np.ndarray:
        started = time.perf_counter()
        labels = np.stack([f.result() for f in futures])
        self.crf_wait_s += time.perf_counter() - started
        return labels


def mining_maps(model, out: dict, batch: dict, size: int, source: str) -> torch.Tensor:
    """(B, n_fg, L, L) max-normalised CAM (or SP-CAM) scores of the labelled classes, detached."""
    with torch.no_grad():
        if source == "spcam" and "sp_map" in out:
            dense = F.interpolate(out["sp_map"], size=(size, size), mode="bilinear", align_corners=False)
            sp = F.interpolate(batch["sp"][:, None].float(), size=(size, size), mode="nearest")[:, 0].long()
            dense = superpixel_means(dense, sp)
        else:
            dense = F.interpolate(out["cam"], size=(size, size), mode="bilinear", align_corners=False)
        return labelled_maps(dense, batch["y"])


def run_train_joint(config: dict, data_path, superpixels_path, out_dir, threads: int = 1) -> Path:
    """Train the joint network of ``config['joint']`` on ``config['cam']``'s encoder and head; writes
    ``out_dir/model.pt``, a segmentation model file (stage 'segment', model 'joint'). Resumes if killed."""
    torch.set_num_threads(max(1, threads))
    cam_cfg, joint = config["cam"], config["joint"]
    info, data = open_data(data_path)
    sp_store = store.open_store(superpixels_path, "superpixels")
    fg = info.fg_classes
    ids = classifier_training_ids(info, config["dataset"]["train_split"], data_path)
    device = select_device(config["device"])
    seed_everything(cam_cfg["seed"])
    model = build_joint_network(
        cam_cfg, info.n_classes, info.has_background, joint["head_channels"], joint["head"]
    ).to(device)
    iterations = joint["iterations"]
    optimizer, scheduler = optimizer_and_schedule(model, {**cam_cfg, "iterations": iterations})
    source = "spcam" if cam_cfg["model"] == "spn" and config["pseudo"]["source"] == "spcam" else "cam"
    log.info(
        "train-joint: %s, %s head and %s segmentation head on %s, labels from %s, %d images, %d iterations "
        "(%d warm-up), device %s",
        joint["method"],
        cam_cfg["model"],
        joint["head"],
        cam_cfg["backbone"],
        source,
        len(ids),
        iterations,
        joint["warmup"],
        device,
    )

    def next_batch(rng: np.random.Generator) -> dict:
        size, picked, images, sps = draw_resized_batch(rng, ids, data, sp_store, cam_cfg)
        labels = [info.label_vector(image_id) for image_id in picked]
        return {
            "x": to_tensor01(images).to(device),
            "sp": torch.from_numpy(np.stack(sps)).long().to(device),
            "y": torch.from_numpy(np.stack([v[fg] for v in labels]).astype(np.float32)).to(device),
            "image_labels": [info.image_labels(image_id) for image_id in picked],
            "size": size,
        }

    energy, bcd = joint["rrm"]["energy"], joint["rrm"]["bcd"]
    timing = {"energy_s": 0.0, "iterations": 0}

    def mining_state(miner: LabelMiner, iteration: int) -> dict:
        """The mining rule's thresholds at this iteration, for the log (the same keys in every row)."""
        if joint["method"] == "annealed":
            return {"threshold": miner.threshold(iteration)}
        return {"bg_threshold": miner.background_threshold()} if info.has_background else {}

    def compute_loss(m, batch: dict, miner: LabelMiner) -> tuple[torch.Tensor, dict]:
        iteration = scheduler.last_epoch  # steps taken so far: restored with the scheduler on resume
        out = m.train_outputs(batch["x"], batch["sp"])
        cls_loss, parts = multilabel_loss(out, batch["y"], cam_cfg["gap_weight"])
        if iteration < joint["warmup"]:
            parts.update(loss_seg=0.0, loss_energy=0.0, labelled=0.0)
            if joint["method"] == "rrm" and bcd["weight"] > 0:  # every row of the log averages the same keys
                parts["loss_bcd"] = 0.0
            return cls_loss, {**parts, **mining_state(miner, iteration)}
        size = max(8, batch["size"] // joint["label_stride"])
        image01 = F.interpolate(batch["x"], size=(size, size), mode="area")
        valid = F.interpolate(batch["sp"][:, None].float(), size=(size, size), mode="nearest")[:, 0] >= 0
        maps = mining_maps(m, out, batch, size, source)
        seg = F.interpolate(out["seg"], size=(size, size), mode="bilinear", align_corners=False)
        if joint["method"] == "rrm":
            futures = miner.submit_rrm(image01, maps, valid.cpu().numpy(), batch)
            started = time.perf_counter()
            per_pixel = pixel_energy(
                seg.softmax(1), image01 * 255, energy["sigma_xy"], energy["sigma_rgb"], energy["radius"]
            )
            timing["energy_s"] += time.perf_counter() - started
            labels = miner.collect(futures)
        else:
            labels = miner.annealed(image01, maps, batch, iteration)
            labels[~valid.cpu().numpy()] = IGNORE
        target = torch.from_numpy(labels).long().to(seg.device)
        labelled = target != IGNORE
        seg_loss = (
            F.cross_entropy(seg, target, ignore_index=IGNORE) if bool(labelled.any()) else seg.sum() * 0.0
        )
        total = cls_loss + joint["seg_weight"] * seg_loss
        parts.update(loss_seg=float(seg_loss.detach()), labelled=float(labelled.float().mean()))
        if joint["method"] == "rrm":
            started = time.perf_counter()
            weight = (~labelled & valid).to(per_pixel.dtype)  # S: the pixels the reliable regions leave out
            energy_loss = (weight * per_pixel).sum() / per_pixel.numel()
            timing["energy_s"] += time.perf_counter() - started
            total = total + energy["weight"] * energy_loss
            parts["loss_energy"] = float(energy_loss.detach())
            if bcd["weight"] > 0:
                bcd_loss = class_centre_loss(out["seg_features"], out["seg"].softmax(1), bcd["margin"])
                total = total + bcd["weight"] * bcd_loss
                parts["loss_bcd"] = float(bcd_loss.detach())
        else:
            parts["loss_energy"] = 0.0
        parts.update(mining_state(miner, iteration))
        timing["iterations"] += 1
        with torch.no_grad():
            m.mined_pixels += torch.bincount(target[labelled], minlength=m.n_classes).to(m.mined_pixels)
        return total, parts

    fingerprint = config_fingerprint(
        cam_cfg,
        joint,
        config["dataset"],
        config["superpixels"],
        {k: config["pseudo"][k] for k in PSEUDO_KEYS},
    )
    pool = None
    if joint["method"] == "rrm":
        pool = ProcessPoolExecutor(
            max_workers=max(1, threads), mp_context=mp.get_context("fork"), initializer=default_sigterm
        )
    miner = LabelMiner(config, fg, info.has_background, pool, model.score_histogram)
    try:
        train_loop(
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            next_batch=next_batch,
            compute_loss=lambda m, batch: compute_loss(m, batch, miner),
            iterations=iterations,
            checkpoint_every=cam_cfg["checkpoint_every"],
            out_dir=Path(out_dir),
            seed=cam_cfg["seed"],
            desc=f"train-joint ({joint['method']})",
            fingerprint=fingerprint,
            log_every=cam_cfg["log_every"],
            precision=cam_cfg["train_precision"],
        )
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    if timing["iterations"] and joint["method"] == "rrm":
        log.info(
            "train-joint: dense energy loss %.1f ms per iteration (forward); waiting for the CRF pool "
            "%.1f ms per iteration",
            1000 * timing["energy_s"] / timing["iterations"],
            1000 * miner.crf_wait_s / timing["iterations"],
        )
    prior = prior_from_counts(model.mined_pixels.cpu().numpy())
    model.label_prior.copy_(torch.from_numpy(prior))
    log.info(
        "train-joint: class prior of the mined labels: %s",
        ", ".join(f"{name} {p:.3f}" for name, p in zip(info.class_names, prior)),
    )
    model_path = Path(out_dir) / "model.pt"
    saved = {**config, "segment": joint_model_section(config["segment"], cam_cfg, joint)}
    save_model(model_path, model.cpu(), saved, info.class_names, info.has_background, "segment")
    return model_path
