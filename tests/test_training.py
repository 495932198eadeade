"""The shared training loop: checkpoints, exact resume after a kill, fingerprinted checkpoints, model files."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from weakseg import store
from weakseg.config import load
from weakseg.nets.model_file import load_model_file, save_model
from weakseg.training import CHECKPOINT, make_optimizer, poly_schedule, train_loop

ITERATIONS, CHECKPOINT_EVERY = 6, 3
LOG_EVERY = 2  # not a divisor of CHECKPOINT_EVERY: a log window spans a checkpoint
LOGGED = [2, 4, 6]


class SimulatedKill(Exception):
    """Raised from inside training, standing in for SIGKILL / a Slurm time limit."""


def tiny_model() -> nn.Module:
    """Conv + BatchNorm (running stats must be checkpointed) + Dropout (torch RNG must be too)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(4, 2),
    )


def draw_batch(rng: np.random.Generator) -> dict:
    return {
        "x": torch.from_numpy(rng.standard_normal((4, 3, 6, 6)).astype(np.float32)),
        "y": torch.from_numpy(rng.standard_normal((4, 2)).astype(np.float32)),
    }


def killed_at(call: int):
    """A next_batch that dies when asked for batch number ``call`` (1-based)."""
    calls = 0

    def next_batch(rng):
        nonlocal calls
        calls += 1
        if calls == call:
            raise SimulatedKill(f"killed before iteration {call}")
        return draw_batch(rng)

    return next_batch


def mse_loss(model, batch):
    loss = nn.functional.mse_loss(model(batch["x"]), batch["y"])
    return loss, {"mse": loss.item()}


def train(
    out_dir: Path,
    model: nn.Module | None = None,
    next_batch=draw_batch,
    fingerprint: str = "cfg-a",
    log_every: int = LOG_EVERY,
):
    """One call of train_loop with fresh optimiser and scheduler, as a restarted job would make them."""
    model = model if model is not None else tiny_model()
    optimizer = make_optimizer("adam", [{"params": model.parameters()}], 0.01, 1e-4)
    rows = train_loop(
        model=model,
        optimizer=optimizer,
        scheduler=poly_schedule(optimizer, ITERATIONS),
        next_batch=next_batch,
        compute_loss=mse_loss,
        iterations=ITERATIONS,
        checkpoint_every=CHECKPOINT_EVERY,
        out_dir=out_dir,
        seed=7,
        desc="test-train",
        fingerprint=fingerprint,
        log_every=log_every,
    )
    return model, rows


def killed_then_resumed(monkeypatch, caplog, module, name: str, dying, run, out_dir, stage: str) -> dict:
    """Run ``run(out_dir)`` with ``module.name`` replaced by ``dying`` (which raises SimulatedKill after
    the first checkpoint), check the kill left a checkpoint and no model, rerun with the real one and
    return the resumed model file, after checking it resumed."""
    real = getattr(module, name)
    monkeypatch.setattr(module, name, dying)
    with pytest.raises(SimulatedKill):
        run(out_dir)
    assert (out_dir / CHECKPOINT).exists() and not (out_dir / "model.pt").exists()
    monkeypatch.setattr(module, name, real)
    torch.manual_seed(12)  # another torch RNG state than the killed run's: resume must restore it
    with caplog.at_level(logging.INFO, logger="weakseg"):
        resumed = load_model_file(run(out_dir), stage)
    assert "resumed from checkpoint" in caplog.text
    return resumed


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    model, rows = train(tmp_path_factory.mktemp("uninterrupted"))
    return model.state_dict(), rows


@pytest.mark.parametrize("kill_at", [4, 6])  # right after a checkpoint; two iterations past it
def test_resume_after_kill_gives_identical_weights(tmp_path, uninterrupted, kill_at, caplog):
    reference_state, reference_rows = uninterrupted
    with pytest.raises(SimulatedKill):
        train(tmp_path, next_batch=killed_at(kill_at))
    checkpoint = torch.load(tmp_path / CHECKPOINT, map_location="cpu", weights_only=True)
    assert checkpoint["iteration"] == CHECKPOINT_EVERY

    restarted = tiny_model()
    with torch.no_grad():
        for p in restarted.parameters():
            p.add_(1.0)  # a restarted job's fresh init must be overwritten by the checkpoint
    with caplog.at_level(logging.INFO, logger="weakseg"):
        model, rows = train(tmp_path, model=restarted)
    assert (
        "resumed from checkpoint" in caplog.text
        and f"iteration {CHECKPOINT_EVERY} of {ITERATIONS}" in caplog.text
    )
    assert_same_state(model.state_dict(), reference_state)
    assert rows == reference_rows  # same mean losses and learning rates, one row every LOG_EVERY iterations
    assert [r["iteration"] for r in rows] == LOGGED
    with (tmp_path / "train_log.csv").open() as fh:
        assert [int(r["iteration"]) for r in csv.DictReader(fh)] == LOGGED


def test_uninterrupted_run_changes_weights_and_decays_lr(uninterrupted):
    state, rows = uninterrupted
    assert not torch.equal(state["6.weight"], tiny_model().state_dict()["6.weight"])
    lrs = [r["lr"] for r in rows]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < lrs[0]


def test_checkpoint_of_another_config_is_ignored(tmp_path, uninterrupted, caplog):
    reference_state, reference_rows = uninterrupted
    with pytest.raises(SimulatedKill):
        train(tmp_path, next_batch=killed_at(4), fingerprint="another-config")
    assert (tmp_path / CHECKPOINT).exists()
    with caplog.at_level(logging.INFO, logger="weakseg"):
        model, rows = train(tmp_path, fingerprint="cfg-a")
    assert "ignoring checkpoint" in caplog.text and "resumed" not in caplog.text
    assert_same_state(model.state_dict(), reference_state)  # trained from scratch, all 6 iterations
    assert rows == reference_rows
    # the checkpoint now carries this config's fingerprint
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["fingerprint"] == "cfg-a"


def test_finished_run_resumes_at_the_end_without_training(tmp_path, uninterrupted, caplog):
    reference_state, _ = uninterrupted
    train(tmp_path)
    with caplog.at_level(logging.INFO, logger="weakseg"):
        model, rows = train(tmp_path, next_batch=killed_at(1))  # would die if it drew any batch
    assert f"iteration {ITERATIONS} of {ITERATIONS}" in caplog.text
    assert_same_state(model.state_dict(), reference_state)
    assert len(rows) == len(LOGGED)


def test_log_rows_are_means_over_log_every_iterations(tmp_path, uninterrupted):
    _, rows = uninterrupted
    _, every = train(tmp_path, log_every=1)
    assert [r["iteration"] for r in every] == list(range(1, ITERATIONS + 1))
    for row in rows:
        window = every[row["iteration"] - LOG_EVERY : row["iteration"]]
        assert row["loss"] == pytest.approx(np.mean([r["loss"] for r in window]))
        assert row["mse"] == pytest.approx(np.mean([r["mse"] for r in window]))
        assert row["lr"] == every[row["iteration"] - 1]["lr"]  # the rate at the logged iteration


def test_progress_in_a_log_file_is_plain_lines_with_loss_and_lr(tmp_path):
    import subprocess
    import sys

    code = (
        "import logging, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import test_training as t\n"
        "from pathlib import Path\n"
        f"t.train(Path({str(tmp_path / 'run')!r}), log_every=3)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "\r" not in result.stderr  # stderr is a pipe, not a terminal: no carriage-return redraws
    lines = [line for line in result.stderr.splitlines() if line.startswith("test-train:")]
    assert lines and lines[-1].startswith("test-train: 100%") and "loss=" in lines[-1] and "lr=" in lines[-1]


def test_a_job_that_asked_for_a_gpu_and_has_none_stops_at_once(monkeypatch, caplog):
    from weakseg.config import ConfigError
    from weakseg.nets.device import check_gpu_request, select_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(
        ConfigError,
        match=r"resources\.gpu: this job asked for 1 GPU\(s\) but torch finds no usable "
        r"CUDA device .*set device: cpu",
    ):
        check_gpu_request("auto", 1)
    with pytest.raises(ConfigError, match="resources.gpu"):
        check_gpu_request("cuda", 2)
    check_gpu_request("cpu", 1)  # the config chose the CPU
    check_gpu_request("auto", 0)  # no GPU asked for
    with caplog.at_level(logging.INFO, logger="weakseg"):
        assert select_device("auto").type == "cpu"
    assert "device: auto -> cpu (no usable CUDA device)" in caplog.text
    with pytest.raises(ConfigError, match="device: 'cuda' requested"):
        select_device("cuda")


def test_model_file_round_trip_and_stage_check(tmp_path):
    model = tiny_model()
    path = tmp_path / "model.pt"
    save_model(path, model, {"cam": {"model": "spn"}}, ["background", "a"], True, "cam")
    loaded = load_model_file(path, "cam")
    assert_same_state(loaded["model"], model.state_dict())
    assert loaded["class_names"] == ["background", "a"] and loaded["has_background"] is True
    with pytest.raises(ValueError, match="not a weakseg segment model"):
        load_model_file(path, "segment")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_model_file(tmp_path / "missing.pt", "cam")


# ------------------------------------------------------------------ run_train_cam end to end


@pytest.fixture
def cam_inputs(tmp_path, synthetic_folder, synthetic_params):
    """data.zarr and superpixels.zarr of the small synthetic folder, and a fast CAM config."""
    from weakseg.datasets.folder import ingest
    from weakseg.superpixels import run_superpixels

    config = load(
        {
            "device": "cpu",
            "dataset": {"kind": "folder", "root": str(synthetic_folder), "synthetic": synthetic_params},
            "superpixels": {"n_segments": 30},
            "cam": {
                "pretrained": False,
                "extra_channels": 8,
                "train_sizes": [32, 48],
                "batch_size": 2,
                "iterations": ITERATIONS,
                "checkpoint_every": CHECKPOINT_EVERY,
            },
        }
    )
    data, gt, sp = tmp_path / "data.zarr", tmp_path / "gt.zarr", tmp_path / "superpixels.zarr"
    ingest(synthetic_folder, config["dataset"], data, gt, store.provenance("ingest"))
    run_superpixels(config, data, sp)
    return config, data, sp


def test_run_train_cam_is_deterministic(tmp_path, cam_inputs):
    """Same config, same process: the same model. The heads (and a non-pretrained encoder) are
    randomly initialised, so the seed must be set before the model is built, not only in train_loop."""
    from weakseg.cam.train import run_train_cam

    config, data, sp = cam_inputs
    first = load_model_file(run_train_cam(config, data, sp, tmp_path / "a"), "cam")
    torch.rand(10)  # whatever ran before must not matter
    second = load_model_file(run_train_cam(config, data, sp, tmp_path / "b"), "cam")
    assert_same_state(first["model"], second["model"])


def test_run_train_cam_resumes_to_identical_model(tmp_path, cam_inputs, monkeypatch, caplog):
    import weakseg.cam.train as cam_train

    config, data, sp = cam_inputs
    torch.manual_seed(11)  # same initial weights in both runs even if run_train_cam did not seed them
    reference = cam_train.run_train_cam(config, data, sp, tmp_path / "a")
    ckpt = load_model_file(reference, "cam")
    assert ckpt["config"]["cam"]["iterations"] == ITERATIONS and ckpt["has_background"] is True

    real_loop = cam_train.train_loop

    def loop_killed_at_iteration_4(**kwargs):
        draw, calls = kwargs["next_batch"], []

        def next_batch(rng):
            calls.append(1)
            if len(calls) == CHECKPOINT_EVERY + 1:
                raise SimulatedKill("killed")
            return draw(rng)

        return real_loop(**{**kwargs, "next_batch": next_batch})

    monkeypatch.setattr(cam_train, "train_loop", loop_killed_at_iteration_4)
    torch.manual_seed(11)
    with pytest.raises(SimulatedKill):
        cam_train.run_train_cam(config, data, sp, tmp_path / "b")
    assert (tmp_path / "b" / CHECKPOINT).exists() and not (tmp_path / "b" / "model.pt").exists()
    monkeypatch.setattr(cam_train, "train_loop", real_loop)
    torch.manual_seed(12)  # the restarted job's fresh init is replaced by the checkpoint
    with caplog.at_level(logging.INFO, logger="weakseg"):
        resumed = cam_train.run_train_cam(config, data, sp, tmp_path / "b")
    assert "resumed from checkpoint" in caplog.text
    assert_same_state(load_model_file(resumed, "cam")["model"], ckpt["model"])
