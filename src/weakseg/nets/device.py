"""Which torch device a network runs on, and the check that a job got the GPUs it asked for."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("weakseg")


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
        # The precision keys' float32 means IEEE float32 here too. cuDNN's default TF32 convolutions keep
        # 10 mantissa bits, so a GPU run would drift from a CPU run well past float tolerance;
        # bfloat16 is the explicit fast choice.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
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


def autocast(device: torch.device | str, precision: str = "float32"):
    """The autocast context of a network section's ``precision``: bfloat16 runs convolutions and
    matrix products in bfloat16 (the op list of torch.autocast; losses and reductions stay float32),
    float32 changes nothing."""
    if precision not in ("float32", "bfloat16"):
        raise ValueError(f"precision: expected float32 or bfloat16, got '{precision}'")
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bfloat16")
