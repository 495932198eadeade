"""Shared fixtures: single-threaded torch, the real MSRC-21 folder (or a skip), a tiny synthetic VOC folder."""

from __future__ import annotations

from pathlib import Path

import pytest

# ../shared/data/msrc21 next to the repository; never copied into it.
MSRC_ROOT = Path(__file__).resolve().parents[1].parent / "shared/data/msrc21"

# Small enough that writing the folder takes well under a second; several classes so that
# labels differ between images.
SMALL_SYNTHETIC = {
    "n_train": 6,
    "n_val": 3,
    "height": 48,
    "width": 64,
    "n_classes": 4,
    "max_objects": 3,
    "seed": 3,
}


@pytest.fixture(autouse=True, scope="session")
def _single_torch_thread():
    """Torch intra-op threads fight the other processes on a shared CPU (20-50x slower); use one."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def msrc_root() -> Path:
    """The real MSRC-21 folder, or a skip when this machine does not have it."""
    if not (MSRC_ROOT / "classes.txt").is_file():
        pytest.skip(f"MSRC-21 not found at {MSRC_ROOT}")
    return MSRC_ROOT


@pytest.fixture
def synthetic_params() -> dict:
    return dict(SMALL_SYNTHETIC)


@pytest.fixture
def synthetic_folder(tmp_path: Path, synthetic_params: dict) -> Path:
    """A small synthetic VOC-style folder (with a background class) in tmp_path, free to modify."""
    from weakseg.datasets.synthetic import write_folder

    return write_folder(synthetic_params, True, tmp_path / "synthetic")
