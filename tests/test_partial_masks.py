"""Masks for some images only: the workflow plans evaluation for the splits that have masks, evaluation
covers the masked images and says how many of the split's images those are."""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

from weakseg import cli, config, store
from weakseg.datasets import open_data


def _labels_csv(folder) -> str:
    names = (folder / "classes.txt").read_text().split()
    rows = ["id,labels"]
    for mask in sorted((folder / "SegmentationClass").glob("*.png")):
        present = np.unique(np.asarray(Image.open(mask)))
        rows.append(mask.stem + "," + ";".join(names[c] for c in present if 0 < c < len(names)))
    path = folder / "labels.csv"
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def test_partly_masked_split_is_evaluated_on_its_masked_images(synthetic_folder, tmp_path):
    labels_file = _labels_csv(synthetic_folder)
    train = (synthetic_folder / "train.txt").read_text().split()
    val = (synthetic_folder / "val.txt").read_text().split()
    kept = train[:2]
    for image_id in train[2:] + val:  # masks for two training images only
        (synthetic_folder / "SegmentationClass" / f"{image_id}.png").unlink()
    cfg = config.load(
        {"dataset": {"kind": "folder", "root": str(synthetic_folder), "labels_file": labels_file}}
    )
    assert config.evaluation_splits(cfg) == ["train"]  # val has no mask: no val evaluation in the workflow

    data, gt = tmp_path / "data.zarr", tmp_path / "gt.zarr"
    spec = config.load({"dataset": cfg["dataset"]})
    assert (
        cli.main(["ingest", "--config", str(_write(tmp_path, spec)), "--data", str(data), "--gt", str(gt)])
        == 0
    )
    info, _ = open_data(data)
    gt_group = store.open_store(gt, "gt")
    assert store.ids_in(gt_group, store.MASKS) == sorted(kept)
    # A labels store that is exactly the ground truth where there is one (all background elsewhere).
    labels = tmp_path / "labels.zarr"
    with store.writing(labels, "labels", store.provenance("test")) as group:
        for image_id in train:
            mask = store.get(gt_group, store.MASKS, image_id) if image_id in kept else None
            shape = store.get(open_data(data)[1], store.IMAGES, image_id).shape[:2]
            store.put(group, store.LABELS, image_id, mask if mask is not None else np.zeros(shape, np.uint8))
    out = tmp_path / "m.csv"
    assert (
        cli.main(
            [
                "evaluate",
                "--config",
                "{}",
                "--data",
                str(data),
                "--gt",
                str(gt),
                "--pred",
                str(labels),
                "--stage",
                "crf",
                "--split",
                "train",
                "--out",
                str(out),
                "--per-image",
                str(tmp_path / "p.csv"),
            ]
        )
        == 0
    )
    rows = pd.read_csv(out, dtype={"class": str}).fillna({"class": ""})
    whole = rows[rows["class"] == ""].set_index("metric")["value"]
    assert whole["n_images"] == len(kept) and whole["split_images"] == len(train)
    assert whole["miou"] == 1.0  # only the masked images count: the labels equal their masks
    assert sorted(pd.read_csv(tmp_path / "p.csv", dtype={"id": str})["id"]) == sorted(kept)


def _write(tmp_path, cfg):
    import yaml

    path = tmp_path / "ingest.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
