"""The training loop shared by CAM/SPN and segmentation training: checkpoints and exact resume.

A job killed half-way (node failure, Slurm time limit) and rerun continues from its latest
checkpoint — weights, optimiser, scheduler, the batch-sampling RNG and torch's RNG included — so
it ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import pickle
import random
import re
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from weakseg import store, timing
from weakseg.errors import UserError, first_line
from weakseg.parallel import progress

log = logging.getLogger("weakseg")
CHECKPOINT = "checkpoints/last.pt"


def select_device(preference: str = "auto") -> torch.device:
    """The torch device of config key ``device`` (auto: CUDA when usable, else the CPU); logs the choice."""
    from weakseg.config import ConfigError

    cuda = torch.cuda.is_available()
    if preference == "cuda" and not cuda:
        raise ConfigError(
            "device: 'cuda' requested but torch finds no usable CUDA device (use 'auto' or 'cpu')"
        )
    device = torch.device("cuda" if preference != "cpu" and cuda else "cpu")
    if device.type == "cuda":
        log.info("device: %s (%s) -> %s", preference, "CUDA available", torch.cuda.get_device_name(device))
    else:
        log.info("device: %s -> cpu%s", preference, "" if preference == "cpu" else " (no usable CUDA device)")
    return device


def check_gpu_request(preference: str, gpus: int) -> None:
    """A job that asked for GPUs (resources.gpu > 0) must not crawl on the CPU unnoticed: stop at once when
    torch sees no CUDA device, unless the config chose the CPU (``device: cpu``)."""
    from weakseg.config import ConfigError

    if gpus > 0 and preference != "cpu" and not torch.cuda.is_available():
        raise ConfigError(
            f"resources.gpu: this job asked for {gpus} GPU(s) but torch finds no usable CUDA device "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}); check the node's "
            "driver, or set device: cpu to run on the CPU"
        )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(name: str, groups: list[dict], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay)


def poly_schedule(optimizer: torch.optim.Optimizer, iterations: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Polynomial decay (power 0.9), the DeepLab/IRN schedule."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: (1 - min(it, iterations - 1) / iterations) ** 0.9
    )


def atomic_torch_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    store.sweep_orphans(path)
    tmp = store.temporary_path(path)
    torch.save(obj, tmp)
    os.replace(tmp, path)


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
) -> list[dict]:
    """Run ``iterations`` optimisation steps, resuming from ``out_dir/checkpoints/last.pt`` if present.

    ``next_batch(rng)`` draws a batch with the loop's numpy Generator (whose state is checkpointed);
    ``compute_loss(model, batch)`` returns the loss and a dict of floats for the log. Every
    ``log_every`` iterations (and at the last) one log row — the mean loss and parts over those
    iterations, and the learning rate — goes to the progress bar and to ``out_dir/train_log.csv``.
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


def config_fingerprint(*sections: dict) -> str:
    """A short digest of the config sections that determine a training run."""
    return hashlib.sha256(json.dumps(sections, sort_keys=True).encode()).hexdigest()[:16]


def save_model(
    path: Path, model: torch.nn.Module, config: dict, class_names, has_background: bool, stage: str
) -> None:
    """The final model file: weights plus what is needed to rebuild and use it (config, classes)."""
    atomic_torch_save(
        {
            "model": model.state_dict(),
            "config": config,
            "class_names": list(class_names),
            "has_background": bool(has_background),
            "stage": stage,
        },
        Path(path),
    )


class ModelFileError(UserError, ValueError):
    """A model file is unreadable, not a weakseg model of the expected kind, or does not fit its network."""


MODEL_FILE_KEYS = ("model", "config", "class_names", "has_background", "stage")


def load_model_file(path, stage: str, map_location="cpu") -> dict:
    """The checkpoint dict of a weakseg model file of ``stage`` ('cam' or 'segment').

    Only tensors and plain containers are unpickled (``weights_only``): a file holding other
    Python objects is refused without running them. Every problem is a ``ModelFileError`` naming
    the file and what was expected.
    """
    path = Path(path)
    expected = f"expected a weakseg {stage} model file (model.pt)"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found")
    if path.stat().st_size == 0:
        raise ModelFileError(f"{path}: empty file; {expected}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols of foreign files
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, KeyError, UnpicklingError, ...
        raise ModelFileError(f"{path}: {_unloadable(path, exc)}; {expected}") from exc
    if not isinstance(ckpt, dict):
        raise ModelFileError(f"{path}: holds a {type(ckpt).__name__}, not a checkpoint dict; {expected}")
    if ckpt.get("stage") != stage:
        raise ModelFileError(f"{path}: not a weakseg {stage} model (stage {ckpt.get('stage')!r}); {expected}")
    missing = [k for k in MODEL_FILE_KEYS if k not in ckpt]
    if missing:
        raise ModelFileError(f"{path}: incomplete {stage} model file: lacks {', '.join(missing)}")
    if not isinstance(ckpt["model"], dict) or not all(
        isinstance(v, torch.Tensor) for v in ckpt["model"].values()
    ):
        raise ModelFileError(f"{path}: its 'model' entry is not a dict of tensors")
    if not isinstance(ckpt["config"], dict) or not isinstance(ckpt["config"].get(stage), dict):
        raise ModelFileError(f"{path}: its config lacks the '{stage}' section that describes the network")
    return ckpt


def _unloadable(path: Path, exc: Exception) -> str:
    """Why torch could not load a model file, in a few words (torch's own message gives advice that
    does not apply: never load a model file with weights_only=False)."""
    refused = re.search(r"GLOBAL\s+([\w.]+)", str(exc))
    if refused:
        return f"holds pickled Python objects ({refused.group(1)}), refused without running them"
    try:
        head = path.read_bytes()[:8]
    except OSError:
        head = b""
    if isinstance(exc, EOFError) or head.startswith(b"PK"):  # torch files are zip archives
        return f"truncated or damaged model file ({first_line(exc).split('. ')[0]})"
    if isinstance(exc, pickle.UnpicklingError) and head.startswith(b"\x80"):
        return "holds a pickle of more than tensors, refused without running it"
    return f"not a PyTorch model file (it begins with {head!r})"


def load_weights(model: torch.nn.Module, state: dict, path, network: str) -> None:
    """``model.load_state_dict(state)``, refusing weights of another architecture with a one-line
    summary of the difference (counts and a few key names) instead of the full key lists."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = [
        f"{len(keys)} {what} such as {', '.join(keys[:3])}"
        for keys, what in (
            (missing, "missing keys"),
            (unexpected, "unexpected keys"),
            (reshaped, "keys of another shape"),
        )
        if keys
    ]
    if problems:
        raise ModelFileError(
            f"{path}: weights do not fit the {network} network of its config: {'; '.join(problems)}"
        )
    model.load_state_dict(state)
