"""End to end on a tiny *mapped* folder dataset: the synthetic stuff dataset (sky, ground, objects; no
background class) with its stuff classes merged into background by dataset.class_mapping. Every stage
must run on the mapped classes, and images left with no object are valid background-only images."""

from __future__ import annotations

import csv

import numpy as np
import yaml

from weakseg import store
from weakseg.datasets import open_data
from weakseg.datasets.synthetic import write_folder

from .test_workflow import TINY, check_ok, snakemake


def test_tiny_mapped_folder_dataset_runs_through_every_stage(tmp_path):
    tiny = yaml.safe_load(TINY.read_text())
    params = {**tiny["dataset"]["synthetic"], "n_train": 10, "n_val": 4}
    root = write_folder(params, False, tmp_path / "stuff_folder")
    config = {
        **tiny,
        "run": "mapped",
        "dataset": {
            "kind": "folder",
            "root": str(root),
            "has_background": False,
            "class_mapping": {"background": ["sky", "ground"]},
        },
    }
    configfile = tmp_path / "mapped.yaml"
    configfile.write_text(yaml.safe_dump(config))
    check_ok(snakemake(tmp_path, configfile=configfile))

    run = tmp_path / "results" / "mapped"
    info, _ = open_data(run / "data.zarr")
    assert info.class_names[0] == "background" and info.has_background
    assert "sky" not in info.class_names and "ground" not in info.class_names
    gt = store.open_store(run / "gt.zarr", "gt")
    for image_id in info.split("train"):
        mask = store.get(gt, store.MASKS, image_id)
        assert mask.max() < info.n_classes or mask.max() == 255
    with (run / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    names = {r["class"] for r in rows if r["class"]}
    assert names == set(info.class_names)
    calibrated = [float(r["value"]) for r in rows if r["metric"] == "background_threshold"]
    assert calibrated and all(0 < t < 1 for t in calibrated)
    crf = store.open_store(run / "pseudo" / "crf.zarr", "labels")
    for image_id in info.split("train"):
        labels = store.get(crf, store.LABELS, image_id)
        assert set(np.unique(labels).tolist()) <= set(info.image_labels(image_id).tolist())
