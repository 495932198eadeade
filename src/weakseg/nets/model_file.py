"""Model files: how a trained network is saved (weights plus what rebuilds and uses it) and loaded
safely (tensors only, ``weights_only=True``), with one-line errors naming the file."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import warnings
from pathlib import Path

import torch

from weakseg import store
from weakseg.errors import UserError, first_line


def atomic_torch_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    store.sweep_orphans(path)
    tmp = store.temporary_path(path)
    torch.save(obj, tmp)
    os.replace(tmp, path)


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
