"""The synthetic generator and the folder ingest (data.zarr + gt.zarr), including every bad-input error."""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from weakseg import config, store
from weakseg.datasets import IGNORE, DatasetInfo, open_data, read_image
from weakseg.datasets.folder import DatasetError, ingest
from weakseg.datasets.synthetic import FG_COLOURS, class_names, make_image, write_folder
from weakseg.palette import class_palette, save_palette_png


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _dataset_cfg(root: Path, **overrides) -> dict:
    """The dataset section with the schema's defaults (code never invents its own)."""
    return config.load({"dataset": {"kind": "folder", "root": str(root), **overrides}})["dataset"]


def _ingest(root: Path, out: Path, **overrides) -> dict:
    return ingest(
        root, _dataset_cfg(root, **overrides), out / "data.zarr", out / "gt.zarr", store.provenance("ingest")
    )


def _read_png_mask(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im)


# --- synthetic generator --------------------------------------------------------------------------


def test_synthetic_folder_is_deterministic_in_its_seed(tmp_path, synthetic_params):
    a = write_folder(synthetic_params, True, tmp_path / "a")
    b = write_folder(synthetic_params, True, tmp_path / "b")
    c = write_folder({**synthetic_params, "seed": synthetic_params["seed"] + 1}, True, tmp_path / "c")
    da, db, dc = _digest(a), _digest(b), _digest(c)
    n = synthetic_params["n_train"] + synthetic_params["n_val"]
    assert len([k for k in da if k.startswith("JPEGImages")]) == n
    assert da == db  # same seed: byte-identical files
    images = [k for k in da if k.startswith("JPEGImages")]
    assert all(da[k] != dc[k] for k in images)  # another seed: every image differs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # no temp folder left


def test_synthetic_folder_layout_and_splits(synthetic_folder, synthetic_params):
    names = (synthetic_folder / "classes.txt").read_text().split()
    assert names == class_names(synthetic_params["n_classes"], True)
    assert names[0] == "background" and len(names) == synthetic_params["n_classes"] + 1
    train = (synthetic_folder / "train.txt").read_text().split()
    val = (synthetic_folder / "val.txt").read_text().split()
    assert len(train) == synthetic_params["n_train"] and len(val) == synthetic_params["n_val"]
    assert not set(train) & set(val)
    image = cv2.imread(str(synthetic_folder / "JPEGImages" / f"{train[0]}.png"))
    assert image.shape == (synthetic_params["height"], synthetic_params["width"], 3)


@pytest.mark.parametrize("has_background", [True, False])
def test_synthetic_masks_match_the_class_colours_of_the_image(has_background):
    n_fg, n_stuff = 6, 1 if has_background else 2
    fg_colours = np.array(FG_COLOURS[:n_fg], np.float64)
    fg_dirs = fg_colours / np.linalg.norm(fg_colours, axis=1, keepdims=True)
    checked = 0
    for index in range(6):
        image, mask = make_image(index, 5, 80, 96, n_fg, 3, has_background)
        assert image.dtype == np.uint8 and image.shape == (80, 96, 3)
        assert mask.dtype == np.uint8 and mask.shape == (80, 96)
        assert mask.max() < n_stuff + n_fg
        for cls in np.unique(mask):
            # Interior pixels only: the blur mixes colours at the edges.
            inside = cv2.erode((mask == cls).astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
            if inside.sum() < 20:
                continue
            mean = image[inside].astype(np.float64).mean(axis=0)
            if cls >= n_stuff:  # a textured object: its colour's direction is the class's base colour
                nearest = int(np.argmax(fg_dirs @ (mean / np.linalg.norm(mean))))
                assert nearest == cls - n_stuff, (index, cls, mean)
            elif has_background:  # muted background: far less saturated than any object
                assert mean.max() - mean.min() < 30, mean
                hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
                assert np.percentile(hsv[..., 1][mask == cls], 95) < np.percentile(
                    hsv[..., 1][mask >= n_stuff], 5
                )
            elif cls == 0:  # sky is blue
                assert mean[2] > mean[0] + 40, mean
            else:  # ground is brown
                assert mean[0] > mean[2] + 20, mean
            checked += 1
    assert checked >= 12


# --- ingest of a good folder --------------------------------------------------------------------------


def test_ingest_reads_images_masks_labels_and_splits(synthetic_folder, synthetic_params, tmp_path):
    summary = _ingest(synthetic_folder, tmp_path / "out")
    info, data = open_data(tmp_path / "out" / "data.zarr")
    gt = store.open_store(tmp_path / "out" / "gt.zarr", "gt")
    train = (synthetic_folder / "train.txt").read_text().split()
    val = (synthetic_folder / "val.txt").read_text().split()

    assert isinstance(info, DatasetInfo)
    assert info.class_names == tuple((synthetic_folder / "classes.txt").read_text().split())
    assert info.has_background and list(info.fg_classes) == list(range(1, info.n_classes))
    assert info.split("train") == train and info.split("val") == val
    assert list(info.ids) == train + val
    assert summary == {
        "images": len(train) + len(val),
        "masks": len(train) + len(val),
        "classes": info.n_classes,
        "split_train": len(train),
        "split_val": len(val),
    }
    assert info.labels.shape == (len(info.ids), info.n_classes) and info.labels.dtype == np.uint8
    with pytest.raises(KeyError, match="split 'test' not in the data store"):
        info.split("test")

    for image_id in info.ids:
        expected_image = cv2.imread(str(synthetic_folder / "JPEGImages" / f"{image_id}.png"))[..., ::-1]
        np.testing.assert_array_equal(read_image(data, image_id), expected_image)  # RGB, not BGR
        mask = _read_png_mask(synthetic_folder / "SegmentationClass" / f"{image_id}.png")
        np.testing.assert_array_equal(store.get(gt, store.MASKS, image_id), mask)
        present = set(np.unique(mask).tolist()) - {IGNORE}
        assert set(info.image_labels(image_id).tolist()) == present | {0}  # bg column is always 1
        assert info.label_vector(image_id)[0] == 1
    assert len({tuple(r) for r in info.labels}) > 1  # labels really differ between images


def test_ingest_max_images_and_no_val_split(synthetic_folder, tmp_path):
    _ingest(synthetic_folder, tmp_path / "a", max_images=2)
    info, data = open_data(tmp_path / "a" / "data.zarr")
    assert [len(info.split(s)) for s in ("train", "val")] == [2, 2]
    assert store.ids_in(data, store.IMAGES) == sorted(info.ids)

    _ingest(synthetic_folder, tmp_path / "b", val_split=None)
    info, _ = open_data(tmp_path / "b" / "data.zarr")
    assert list(info.splits) == ["train"]


def test_ignore_pixels_in_a_mask_are_kept_and_are_not_a_label(synthetic_folder, tmp_path):
    image_id = (synthetic_folder / "train.txt").read_text().split()[0]
    mask_path = synthetic_folder / "SegmentationClass" / f"{image_id}.png"
    mask = _read_png_mask(mask_path)
    mask[:] = 0
    mask[:5] = IGNORE
    mask[10:20, 10:20] = 3
    save_palette_png(mask_path, mask, class_palette(5))
    _ingest(synthetic_folder, tmp_path / "out")
    info, _ = open_data(tmp_path / "out" / "data.zarr")
    assert info.image_labels(image_id).tolist() == [0, 3]
    gt = store.open_store(tmp_path / "out" / "gt.zarr", "gt")
    assert (store.get(gt, store.MASKS, image_id)[:5] == IGNORE).all()


def test_labels_file_gives_the_labels_and_masks_are_not_needed(synthetic_folder, tmp_path):
    names = (synthetic_folder / "classes.txt").read_text().split()
    train = (synthetic_folder / "train.txt").read_text().split()
    val = (synthetic_folder / "val.txt").read_text().split()
    for image_id in train:  # real users have no masks for their training images
        (synthetic_folder / "SegmentationClass" / f"{image_id}.png").unlink()
    # Labels chosen to disagree with the masks, so that their source is visible.
    chosen = {i: [names[1 + (k % 4)], names[1 + ((k + 2) % 4)]] for k, i in enumerate(train + val)}
    chosen[train[0]] = []  # an image with no foreground label is allowed (with a warning)
    csv = tmp_path / "labels.csv"
    csv.write_text("id,labels\n" + "".join(f"{i},{';'.join(v)}\n" for i, v in chosen.items()))

    summary = _ingest(synthetic_folder, tmp_path / "out", labels_file=str(csv))
    info, _ = open_data(tmp_path / "out" / "data.zarr")
    for image_id, label_names in chosen.items():
        expected = {0} | {names.index(n) for n in label_names}
        assert set(info.image_labels(image_id).tolist()) == expected
    gt = store.open_store(tmp_path / "out" / "gt.zarr", "gt")
    assert store.ids_in(gt, store.MASKS) == sorted(val) and summary["masks"] == len(val)


# --- ingest of bad folders: one clear DatasetError, no store left ---------------------------------


def _first(folder: Path, split: str = "train", k: int = 0) -> str:
    return (folder / f"{split}.txt").read_text().split()[k]


def _missing_image(folder):
    image_id = _first(folder, "val")
    (folder / "JPEGImages" / f"{image_id}.png").unlink()
    return {}, [f"JPEGImages/{image_id}.jpg", "image file not found"]


def _mask_of_other_size(folder):
    image_id = _first(folder, k=2)
    save_palette_png(
        folder / "SegmentationClass" / f"{image_id}.png", np.zeros((10, 12), np.uint8), class_palette(5)
    )
    return {}, [f"SegmentationClass/{image_id}.png", "mask is 12x10 but its image is 64x48"]


def _unknown_class_in_labels_file(folder):
    csv = folder / "labels.csv"
    csv.write_text(f"id,labels\n{_first(folder)},apple\n{_first(folder, k=1)},apple;unicorn\n")
    return {"labels_file": str(csv)}, ["labels.csv:3", "'unicorn'", "not in classes.txt"]


def _empty_split(folder):
    (folder / "val.txt").write_text("\n  \n")
    return {}, ["val.txt", "split 'val' is empty", "one image id per line"]


def _garbage_jpeg(folder):
    image_id = _first(folder, k=1)
    (folder / "JPEGImages" / f"{image_id}.png").unlink()
    (folder / "JPEGImages" / f"{image_id}.jpg").write_bytes(b"\xff\xd8 this is not a JPEG" * 20)
    return {}, [f"JPEGImages/{image_id}.jpg", "unreadable image"]


def _mask_value_out_of_range(folder):
    image_id = _first(folder, "val", 1)
    path = folder / "SegmentationClass" / f"{image_id}.png"
    mask = _read_png_mask(path)
    mask[:4, :4] = 7  # 5 classes: valid values are 0..4 and 255
    save_palette_png(path, mask, class_palette(5))
    return {}, [f"SegmentationClass/{image_id}.png", "mask values [7]", "0..4 or 255"]


def _rgb_mask(folder):
    image_id = _first(folder)
    Image.new("RGB", (64, 48)).save(folder / "SegmentationClass" / f"{image_id}.png")
    return {}, [f"SegmentationClass/{image_id}.png", "mode RGB", "palette or single-channel"]


def _image_missing_from_labels_file(folder):
    csv = folder / "labels.csv"
    csv.write_text(f"id,labels\n{_first(folder)},apple\n")
    return {"labels_file": str(csv)}, ["labels.csv", f"no labels for image '{_first(folder, k=1)}'"]


def _no_mask_and_no_labels_file(folder):
    image_id = _first(folder, "val")
    (folder / "SegmentationClass" / f"{image_id}.png").unlink()
    return {}, [f"SegmentationClass/{image_id}.png", "missing", "dataset.labels_file"]


def _missing_classes(folder):
    (folder / "classes.txt").unlink()
    return {}, ["classes.txt", "missing", "one class name per line"]


BAD_CASES = [
    _missing_image,
    _mask_of_other_size,
    _unknown_class_in_labels_file,
    _empty_split,
    _garbage_jpeg,
    _mask_value_out_of_range,
    _rgb_mask,
    _image_missing_from_labels_file,
    _no_mask_and_no_labels_file,
    _missing_classes,
]


@pytest.mark.parametrize("break_folder", BAD_CASES, ids=[f.__name__.strip("_") for f in BAD_CASES])
def test_bad_input_gives_one_dataset_error_and_no_store(break_folder, synthetic_folder, tmp_path):
    overrides, expected_parts = break_folder(synthetic_folder)
    out = tmp_path / "out"
    with pytest.raises(DatasetError) as err:
        _ingest(synthetic_folder, out, **overrides)
    message = str(err.value)
    assert "\n" not in message  # one line
    for part in expected_parts:
        assert part in message, f"{part!r} not in {message!r}"
    leftovers = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert leftovers == []  # neither data.zarr/gt.zarr nor their temp dirs


def test_missing_dataset_folder_names_the_config_key(tmp_path):
    with pytest.raises(DatasetError, match=r"nowhere: dataset folder not found \(config key dataset.root\)"):
        _ingest(tmp_path / "nowhere", tmp_path / "out")


# --- the real MSRC-21 data (skipped when absent) ------------------------------------------------------


@pytest.mark.msrc
def test_ingest_of_msrc21_reads_real_images_and_labels_without_background(msrc_root, tmp_path):
    _ingest(msrc_root, tmp_path, has_background=False, max_images=5)
    info, data = open_data(tmp_path / "data.zarr")
    gt = store.open_store(tmp_path / "gt.zarr", "gt")
    names = (msrc_root / "classes.txt").read_text().split()
    assert info.class_names == tuple(names) and info.n_classes == 21
    assert not info.has_background and list(info.fg_classes) == list(range(21))
    assert len(info.split("train")) == len(info.split("val")) == 5 and len(info.ids) == 10
    assert info.split("train") == (msrc_root / "train.txt").read_text().split()[:5]
    for image_id in info.ids:
        image = read_image(data, image_id)
        mask = store.get(gt, store.MASKS, image_id)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[:2] == mask.shape
        assert min(image.shape[:2]) >= 100 and image.std() > 10  # a real photograph
        expected = cv2.imread(str(msrc_root / "JPEGImages" / f"{image_id}.jpg"))[..., ::-1]
        np.testing.assert_array_equal(image, expected)
        labels = info.image_labels(image_id)
        assert labels.size >= 1
        assert set(labels.tolist()) == set(np.unique(mask).tolist()) - {IGNORE}  # no forced background
