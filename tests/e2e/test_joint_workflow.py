"""One-stage training through the Snakemake workflow on the tiny synthetic config: the joint network
(annealed and rrm) is round 0. Its training is killed after a checkpoint and resumes; its model is
predicted, cleaned, CRF-refined, made reliable and evaluated by the rounds' own rules, and `weakseg
predict` segments images with it."""

from __future__ import annotations

import subprocess
import time

import pytest
import yaml

from e2e.test_workflow import (
    IGNORE_TIMESTAMP_WARNING,
    TINY,
    VENV_BIN,
    check_ok,
    kill_training_after_first_checkpoint,
    metric_stages,
    snakemake,
)
from weakseg.nets.model_file import load_model_file

ITERATIONS, CHECKPOINT_EVERY = 12, 3


@IGNORE_TIMESTAMP_WARNING
@pytest.mark.parametrize("method", ["annealed", "rrm"])
def test_joint_round0_trains_resumes_predicts_and_evaluates(tmp_path, method):
    config = yaml.safe_load(TINY.read_text())
    run = f"tiny_joint_{method}"
    config["run"] = run
    config["cam"].update(model="cam", checkpoint_every=CHECKPOINT_EVERY)
    config["segment"]["rounds"] = 0  # the one-stage model alone: round 0
    config["joint"] = {
        "enabled": True,
        "method": method,
        "iterations": ITERATIONS,
        "warmup": 2,
        "head_channels": 16,
    }
    configfile = tmp_path / f"{run}.yaml"
    configfile.write_text(yaml.safe_dump(config))
    started = time.perf_counter()
    killed_at = kill_training_after_first_checkpoint(
        tmp_path, configfile, run, model="round0/model.pt", command="train-joint"
    )
    assert CHECKPOINT_EVERY <= killed_at < ITERATIONS

    targets = [f"results/{run}/metrics/round0_{split}.csv" for split in ("train", "val")]
    check_ok(snakemake(tmp_path, *targets, "--rerun-incomplete", configfile=configfile))
    print(f"tiny joint {method} run: {time.perf_counter() - started:.0f} s")
    results = tmp_path / "results" / run
    log = (results / "logs" / "train_joint.log").read_text()
    assert "resumed from checkpoint" in log and f"at iteration {killed_at} of {ITERATIONS}" in log, log[
        -2000:
    ]

    model = load_model_file(results / "round0" / "model.pt", "segment")
    assert model["config"]["segment"]["model"] == "joint"
    assert model["config"]["joint"]["method"] == method
    stages = set()
    for split in ("train", "val"):
        stages |= metric_stages(results / "metrics" / f"round0_{split}.csv")
    assert {("round0", "train"), ("round0", "val")} <= stages
    # round 0's train annotation went through the rounds' stages: CRF, then reliable regions
    assert (results / "round0" / "reliable_train.zarr").is_dir()

    if method == "annealed":  # the user command takes the joint model file like any round's
        out = tmp_path / "predictions"
        done = subprocess.run(
            [
                str(VENV_BIN / "weakseg"),
                "predict",
                "--model",
                str(results / "round0" / "model.pt"),
                str(results / "synthetic" / "JPEGImages"),
                "--out",
                str(out),
            ],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert len(list(out.glob("*.png"))) == 16  # the tiny config's 12 train + 4 val images
