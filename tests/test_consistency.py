"""Reliability by content: each annotation against the dataset's class prototypes."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from weakseg import config, store
from weakseg.datasets import open_data
from weakseg.labels import IGNORE
from weakseg.nets.model_file import ModelFileError, save_model
from weakseg.pseudo.consistency import annotation_consistency, load_feature_encoder
from weakseg.pseudo.divergence import CSV_COLUMNS, run_reliability
from weakseg.pseudo.prototypes import class_feature_sums

SURE = math.exp(5) / (math.exp(5) + 1)  # softmax of similarities 1 and 0 at temperature 5


def _halves() -> torch.Tensor:
    """(2, 4, 4) unit features: one-hot of the class each cell shows, object (1) left, background right."""
    shown = torch.zeros(4, 4, dtype=torch.long)
    shown[:, :2] = 1
    return torch.nn.functional.one_hot(shown, 2).permute(2, 0, 1).float()


def test_an_annotation_grown_over_the_background_scores_lower_than_the_object_it_grew_from():
    features, prototypes = _halves(), torch.eye(2)  # class c's prototype is feature direction c
    exact = np.zeros((8, 8), np.uint8)  # the image is 2x the feature grid
    exact[:, :4] = 1
    grown = np.ones((8, 8), np.uint8)  # the object's label over the whole image: compact all the same
    on_exact = annotation_consistency(features, exact, prototypes, [1, 0], [0, 1], temperature=5.0)
    on_grown = annotation_consistency(features, grown, prototypes, [1], [0, 1], temperature=5.0)
    assert on_exact[1] == pytest.approx(SURE) and on_exact[0] == pytest.approx(SURE)
    assert on_grown[1] == pytest.approx(0.5)  # half its pixels are sure background
    # A class that cannot label the image (not a competitor) gets no probability; ignore is not scored.
    assert annotation_consistency(features, grown, prototypes, [1], [0], 5.0)[1] == 0.0
    assert annotation_consistency(features, exact, prototypes, [IGNORE], [0, 1], 5.0) == {}
    with pytest.raises(ValueError, match="consistency_temperature"):
        annotation_consistency(features, exact, prototypes, [1], [0, 1], temperature=0.0)


def test_class_feature_sums_weigh_cells_by_coverage_and_ignore_adds_to_no_class():
    features = _halves()
    labels = np.full((8, 8), IGNORE, np.uint8)
    labels[:, 2:6] = 1  # covers the right half of the left half's cells and the left half of the others'
    sums = class_feature_sums(features, labels, range(3))
    # 8 cells half covered on each side: 4 units of each feature direction; classes 0 and 2 get nothing.
    np.testing.assert_allclose(sums.numpy(), [[0, 0], [4, 4], [0, 0]], atol=1e-5)


def _data_store(path, images, label_rows, class_names):
    ids = sorted(images)
    attrs = {"class_names": class_names, "has_background": True, "ids": ids, "splits": {"train": ids}}
    with store.writing(path, "data", store.provenance("test"), attrs) as data:
        array = data.create_array("labels", shape=(len(ids), len(class_names)), dtype=np.uint8)
        array[...] = np.array([label_rows[i] for i in ids], np.uint8)
        for image_id in ids:
            store.put(data, store.IMAGES, image_id, images[image_id])


def _labels_store(path, annotations):
    with store.writing(path, "labels", store.provenance("test")) as group:
        for image_id, labels in annotations.items():
            store.put(group, store.LABELS, image_id, labels)


def test_reliability_by_consistency_ranks_the_grown_annotation_last(tmp_path):
    """Four images of a red object on green grass; in one the object's label covers the grass too.
    Grass is what the other images' backgrounds look like, so that annotation ranks last, although a
    flood touching the border is the most compact shape there is (lowest divergence)."""
    from weakseg.cam.models import build_classifier

    names = ["background", "object"]
    images, annotations, rows = {}, {}, {}
    for k in range(4):
        image = np.zeros((64, 64, 3), np.uint8)
        image[..., 1] = 160  # grass
        image[16:48, 8 + 4 * k : 40 + 4 * k] = (200, 30, 30)  # the object
        labels = np.zeros((64, 64), np.uint8)
        labels[16:48, 8 + 4 * k : 40 + 4 * k] = 1
        images[f"i{k}"], rows[f"i{k}"] = image, [1, 1]
        annotations[f"i{k}"] = labels
    annotations["i3"] = np.ones((64, 64), np.uint8)  # grown over the grass
    annotations["i3"][60:, :] = 0
    _data_store(tmp_path / "data.zarr", images, rows, names)
    _labels_store(tmp_path / "labels.zarr", annotations)
    seeds = {i: np.where(a == 1, 1, 0).astype(np.uint8) for i, a in annotations.items() if i != "i3"}
    seeds["i3"] = np.full((64, 64), IGNORE, np.uint8)  # its confident labels: nothing
    _labels_store(tmp_path / "seeds.zarr", seeds)
    cfg = config.load({"pseudo": {"top_fraction": 0.5}})
    torch.manual_seed(0)
    net = build_classifier({**cfg["cam"], "pretrained": False}, 1)
    save_model(tmp_path / "cam.pt", net, cfg, names, True, "cam")

    table = run_reliability(
        cfg,
        tmp_path / "data.zarr",
        tmp_path / "labels.zarr",
        tmp_path / "reliability.csv",
        model_path=tmp_path / "cam.pt",
        seeds_path=tmp_path / "seeds.zarr",
    )
    assert list(pd.read_csv(tmp_path / "reliability.csv").columns) == CSV_COLUMNS
    objects = table[table["class"] == 1].set_index("id")
    np.testing.assert_allclose(objects["score"], 1 - objects["consistency"])
    assert objects["consistency"].between(0, 1).all()
    assert objects["score"].idxmax() == "i3" and objects["divergence"].idxmin() == "i3"
    assert objects["selected"].sum() == 2 and not objects.loc["i3", "selected"]
    assert (table.groupby("id")["score"].max() == table.groupby("id")["image_score"].first()).all()

    # A file that is no model of these classes is refused with its name.
    info, _ = open_data(tmp_path / "data.zarr")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ModelFileError, match="junk.pt"):
        load_feature_encoder(tmp_path / "junk.pt", info)
