"""dataset.class_mapping: merged, dropped and renamed classes, consistently in masks, labels and names."""

from __future__ import annotations

import numpy as np
import pytest

from weakseg import config, store
from weakseg.datasets import IGNORE, open_data
from weakseg.datasets.folder import DatasetError, ingest
from weakseg.datasets.mapping import ClassMappingError, build_mapping
from weakseg.datasets.synthetic import write_folder

NAMES = ["building", "grass", "cow", "sky", "sheep", "void_like", "car"]


def test_mapping_merges_drops_and_renames():
    mapping = build_mapping(
        NAMES,
        False,
        {"background": ["building", "grass", "sky"], "drop": ["void_like"], "rename": {"car": "vehicle"}},
    )
    assert mapping.class_names == ("background", "cow", "sheep", "vehicle") and mapping.has_background
    np.testing.assert_array_equal(mapping.lut[:7], [0, 0, 1, 0, 2, IGNORE, 3])
    assert mapping.lut[IGNORE] == IGNORE
    mask = np.array([[0, 1, 2, 3], [4, 5, 6, IGNORE]], np.uint8)
    np.testing.assert_array_equal(mapping.map_mask(mask), [[0, 0, 1, 0], [2, IGNORE, 3, IGNORE]])
    np.testing.assert_array_equal(mapping.map_labels([0, 2, 5, 6]), [0, 1, 3])
    # The labels of a mapped mask are the mapped labels of the original mask: the two paths agree.
    present = np.unique(mask[mask != IGNORE])
    mapped = mapping.map_mask(mask)
    np.testing.assert_array_equal(mapping.map_labels(present), np.unique(mapped[mapped != IGNORE]))


def test_identity_and_existing_background():
    assert build_mapping(NAMES, False, {}).is_identity
    names = ["background", "cat", "tree", "dog"]
    mapping = build_mapping(names, True, {"background": ["tree"]})
    assert mapping.class_names == ("background", "cat", "dog")
    np.testing.assert_array_equal(mapping.lut[:4], [0, 1, 0, 2])


@pytest.mark.parametrize(
    "mapping, message",
    [
        ({"background": ["lion"]}, "background: class 'lion'"),
        ({"drop": ["cow"], "background": ["cow"]}, "both merged into background and dropped"),
        ({"rename": {"cow": "sheep"}}, "two classes are named 'sheep'"),
        ({"background": NAMES[:-1], "drop": ["car"]}, "at least 2"),
    ],
)
def test_bad_mappings_name_the_key(mapping, message):
    with pytest.raises(ClassMappingError, match=message):
        build_mapping(NAMES, False, mapping)


def _stuff_folder(tmp_path):
    """The synthetic dataset without a background class: 'sky' and 'ground' stuff + objects."""
    params = config.load({})["dataset"]["synthetic"] | {"n_train": 6, "n_val": 2, "height": 40, "width": 48}
    return write_folder(params, False, tmp_path / "folder")


def test_ingest_applies_the_mapping_to_masks_labels_and_names(tmp_path):
    root = _stuff_folder(tmp_path)
    names = (root / "classes.txt").read_text().split()
    # A labels file (original names) for the same images, and one mask changed to show drop.
    ids = (root / "train.txt").read_text().split() + (root / "val.txt").read_text().split()
    from PIL import Image

    masks = {i: np.array(Image.open(root / "SegmentationClass" / f"{i}.png")) for i in ids}
    (root / "labels.csv").write_text(
        "id,labels\n"
        + "".join(f"{i},{';'.join(names[c] for c in np.unique(m[m != IGNORE]))}\n" for i, m in masks.items())
    )
    dataset = {
        "kind": "folder",
        "root": str(root),
        "has_background": False,
        "class_mapping": {
            "background": ["sky", "ground"],
            "drop": [names[2]],
            "rename": {names[3]: "renamed"},
        },
    }
    for labels_file in (None, str(root / "labels.csv")):
        cfg = config.load({"dataset": {**dataset, "labels_file": labels_file}})["dataset"]
        out = tmp_path / ("file" if labels_file else "masks")
        ingest(root, cfg, out / "data.zarr", out / "gt.zarr", store.provenance("ingest"))
        info, _ = open_data(out / "data.zarr")
        gt = store.open_store(out / "gt.zarr", "gt")
        assert info.class_names == ("background", "renamed", *names[4:]) and info.has_background
        assert list(gt.attrs["class_names"]) == list(info.class_names)
        for image_id in ids:
            original = masks[image_id]
            mask = store.get(gt, store.MASKS, image_id)
            expected = np.full_like(original, IGNORE)
            expected[(original == 0) | (original == 1)] = 0
            expected[original == 3] = 1
            for c in range(4, len(names)):
                expected[original == c] = c - 2
            np.testing.assert_array_equal(mask, expected)
            present = set(np.unique(mask[mask != IGNORE]).tolist()) | {0}
            assert set(info.image_labels(image_id).tolist()) == present, image_id


def test_ingest_reports_a_bad_mapping_as_a_dataset_error(tmp_path):
    root = _stuff_folder(tmp_path)
    cfg = config.load(
        {"dataset": {"kind": "folder", "root": str(root), "class_mapping": {"background": ["mountain"]}}}
    )["dataset"]
    with pytest.raises(DatasetError, match="dataset.class_mapping.background: class 'mountain'"):
        ingest(root, cfg, tmp_path / "d.zarr", tmp_path / "g.zarr", store.provenance("ingest"))
    assert not (tmp_path / "d.zarr").exists()
