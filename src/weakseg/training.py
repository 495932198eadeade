"""The training loop shared by CAM/SPN and segmentation training: checkpoints and exact resume.

A job killed half-way (node failure, Slurm time limit) and rerun continues from its latest
checkpoint — weights, optimiser, scheduler, the batch-sampling RNG and torch's RNG included — so
it ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import csv
import logging
import os
import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from weakseg import timing
from weakseg.nets.device import autocast
from weakseg.nets.model_file import atomic_torch_save
from weakseg.parallel import progress

log = logging.getLogger("weakseg")
CHECKPOINT = "checkpoints/last.pt"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(name: str, groups: list[dict], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay)


def optimizer_and_schedule(model: torch.nn.Module, net: dict):
    """The optimiser and polynomial schedule of a network section (cam, segment): its ``optimizer``,
    ``lr`` (heads), ``encoder_lr_mult``, ``weight_decay`` and ``iterations``."""
    optimizer = make_optimizer(
        net["optimizer"],
        model.param_groups(net["lr"], net["encoder_lr_mult"]),
        net["lr"],
        net["weight_decay"],
    )
    return optimizer, poly_schedule(optimizer, net["iterations"])


def poly_schedule(optimizer: torch.optim.Optimizer, iterations: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Polynomial decay (power 0.9), the DeepLab/IRN schedule."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: (1 - min(it, iterations - 1) / iterations) ** 0.9
    )


def _write_log(rows: list[dict], path: Path) -> None:
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def train_loop(
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    next_batch: Callable[[np.random.Generator], dict],
    compute_loss: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]],
    iterations: int,
    checkpoint_every: int,
    out_dir: Path,
    seed: int,
    desc: str,
    fingerprint: str = "",
    log_every: int = 25,
    precision: str = "float32",
) -> list[dict]:
    """Run ``iterations`` optimisation steps, resuming from ``out_dir/checkpoints/last.pt`` if present.

    ``next_batch(rng)`` draws a batch with the loop's numpy Generator (whose state is checkpointed);
    ``compute_loss(model, batch)`` returns the loss and a dict of floats for the log. Every
    ``log_every`` iterations (and at the last) one log row — the mean loss and parts over those
    iterations, and the learning rate — goes to the progress bar and to ``out_dir/train_log.csv``.
    ``precision`` (a section's ``train_precision``) bfloat16 runs ``compute_loss`` under bfloat16
    autocast (``nets.device.autocast``).
    Returns the log rows. A checkpoint whose ``fingerprint`` (a digest of the training config)
    differs from this run's is ignored: a changed config starts training afresh.
    """
    out_dir = Path(out_dir)
    ckpt_path = out_dir / CHECKPOINT
    log_path = out_dir / "train_log.csv"
    seed_everything(seed)
    rng = np.random.default_rng(seed)
    start, rows, window = 0, [], {}
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True) if ckpt_path.exists() else None
    if state is not None and state.get("fingerprint") != fingerprint:
        log.info("%s: ignoring checkpoint %s made with another config; starting afresh", desc, ckpt_path)
        state = None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        start, rows = int(state["iteration"]), list(state["log"])
        window = dict(state.get("log_window", {}))
        log.info("%s: resumed from checkpoint %s at iteration %d of %d", desc, ckpt_path, start, iterations)

    def save(iteration: int, rng_state: dict) -> None:
        atomic_torch_save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "numpy_rng": rng_state,
                "torch_rng": torch.get_rng_state(),
                "iteration": iteration,
                "log": rows,
                "log_window": window,
                "fingerprint": fingerprint,
            },
            ckpt_path,
        )

    model.train()
    bar = progress(range(start, iterations), desc, total=iterations - start)
    # A prefetch thread draws the next batch (reading, resizing) while this one computes. Only that
    # thread uses ``rng``; a checkpoint keeps its state from before the draw of the batch after it, so
    # a resumed run draws the same batches.
    prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{desc}-prefetch")
    pending = prefetch.submit(next_batch, rng) if start < iterations else None
    try:
        for it in bar:
            batch = pending.result()
            rng_state = rng.bit_generator.state
            pending = prefetch.submit(next_batch, rng) if it + 1 < iterations else None
            with timing.kernel("train_step"):  # forward, backward and update on a ready batch
                with autocast(next(model.parameters()).device, precision):
                    loss, parts = compute_loss(model, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            scheduler.step()
            # Sums over the iterations since the last log row (kept in the checkpoint: a resumed run logs the same).
            for key, value in {"loss": float(loss.detach()), **parts}.items():
                window[key] = window.get(key, 0.0) + float(value)
            window["n"] = window.get("n", 0) + 1
            done = it + 1
            if done % log_every == 0 or done == iterations:
                n = window.pop("n")
                row = {
                    "iteration": done,
                    **{k: v / n for k, v in window.items()},
                    "lr": optimizer.param_groups[-1]["lr"],
                }
                rows.append(row)
                window = {}
                set_postfix = getattr(bar, "set_postfix", None)
                if set_postfix is not None:
                    set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", refresh=False)
                _write_log(rows, log_path)
            if done % checkpoint_every == 0 or done == iterations:
                save(done, rng_state)
    finally:
        prefetch.shutdown(wait=True, cancel_futures=True)
    model.eval()
    _write_log(rows, log_path)
    timing.log_kernel_seconds()
    return rows
