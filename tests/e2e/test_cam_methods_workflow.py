"""SEAM and the dual-branch network through the whole Snakemake workflow on the tiny synthetic
config: their score stores feed every later stage unchanged."""

from __future__ import annotations

import time

import pytest
import torch
import yaml

from e2e.test_workflow import IGNORE_TIMESTAMP_WARNING, TINY, check_ok, metric_stages, snakemake
from weakseg import store


@IGNORE_TIMESTAMP_WARNING
@pytest.mark.parametrize("model", ["seam", "dual"])
def test_tiny_workflow_with_cam_model(tmp_path, model):
    config = yaml.safe_load(TINY.read_text())
    config["run"] = f"tiny_{model}"
    config["cam"].update(model=model, seam={"pcm_dim": 16}, dual={"dim": 32, "heads": 2, "depth": 2})
    configfile = tmp_path / f"{model}.yaml"
    configfile.write_text(yaml.safe_dump(config))
    started = time.perf_counter()
    check_ok(snakemake(tmp_path, configfile=configfile))
    print(f"tiny {model} run: {time.perf_counter() - started:.0f} s")

    run = tmp_path / "results" / f"tiny_{model}"
    saved = torch.load(run / "cam" / "model.pt", map_location="cpu", weights_only=True)
    assert saved["config"]["cam"]["model"] == model
    scores = store.open_store(run / "cam" / "scores.zarr", "scores")
    assert sorted(name for name, _ in scores.groups()) == [store.CAM, store.SPCAM]
    expected = {
        ("cam", "train"),
        ("spcam", "train"),
        ("crf", "train"),
        ("reliable", "train"),
        ("round1", "val"),
        ("cam_gated", "val"),
        ("spcam_gated", "val"),
    }
    stages = metric_stages(run / "metrics.csv")
    assert expected <= stages, f"missing metrics rows: {sorted(expected - stages)}"
    assert (run / "report" / "index.html").is_file()
