"""The Zarr store layer: atomic writing, per-image arrays, quantised scores, errors, shards and gather."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from weakseg import store

SIZES = {"a": (7, 11), "b": (20, 5), "c": (1, 33)}  # images differ in size: one array per image


def _images() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {i: rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for i, (h, w) in SIZES.items()}


def _leftovers(folder: Path) -> list[str]:
    """Temporary siblings that writing() must never leave behind."""
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def _write_images(path: Path, images: dict[str, np.ndarray], marker: str = "x") -> None:
    with store.writing(path, "data", store.provenance("test", {"marker": marker}), {"marker": marker}) as g:
        for image_id, image in images.items():
            store.put(g, store.IMAGES, image_id, image, {"h": image.shape[0]})


def test_writing_round_trips_images_of_different_sizes_and_attrs(tmp_path):
    images = _images()
    path = tmp_path / "sub" / "data.zarr"  # parent folders are created
    _write_images(path, images, marker="v1")

    group = store.open_store(path, "data")
    assert group.attrs["kind"] == "data"
    assert group.attrs["complete"] is True
    assert group.attrs["marker"] == "v1"
    assert group.attrs["provenance"]["stage"] == "test"
    assert group.attrs["provenance"]["config"] == {"marker": "v1"}
    assert store.ids_in(group, store.IMAGES) == sorted(images)
    assert store.ids_in(group, store.MASKS) == []  # absent key: no ids, no error
    for image_id, image in images.items():
        got = store.get(group, store.IMAGES, image_id)
        assert got.dtype == np.uint8 and got.shape == image.shape
        np.testing.assert_array_equal(got, image)
        assert store.get_attrs(group, store.IMAGES, image_id) == {"h": image.shape[0]}
    assert _leftovers(path.parent) == []


def test_get_of_a_missing_image_names_key_and_image(tmp_path):
    _write_images(tmp_path / "d.zarr", _images())
    group = store.open_store(tmp_path / "d.zarr")
    with pytest.raises(store.StoreError, match=r"no 'images' array for image 'zz'"):
        store.get(group, store.IMAGES, "zz")
    with pytest.raises(store.StoreError, match=r"no 'maps' array for image 'a'"):
        store.get_attrs(group, store.SUPERPIXELS, "a")


def test_scores_quantisation_error_is_at_most_half_a_step(tmp_path):
    rng = np.random.default_rng(1)
    scores = rng.random((3, 17, 23), dtype=np.float32)
    scores[0, 0, :3] = [0.0, 1.0, 0.5]  # the ends of the range are exact
    outside = np.array([[[-0.3, 1.7]]], np.float32)  # out of range is clipped, not wrapped round
    with store.writing(tmp_path / "s.zarr", "scores", store.provenance("test")) as g:
        store.put_scores(g, store.CAM, "img", scores, np.array([4, 0, 9]))
        store.put_scores(g, store.SPCAM, "img", outside, [2])
    group = store.open_store(tmp_path / "s.zarr", "scores")
    assert group[f"{store.CAM}/img"].dtype == np.uint8  # stored 4x smaller than float32
    got, classes = store.get_scores(group, store.CAM, "img")
    assert got.dtype == np.float32 and got.shape == scores.shape
    assert np.abs(got - scores).max() <= 1 / 510 + 1e-7
    assert got[0, 0, 0] == 0.0 and got[0, 0, 1] == 1.0
    np.testing.assert_array_equal(classes, [4, 0, 9])  # order kept: row k is class classes[k]
    assert classes.dtype == np.int64
    clipped, _ = store.get_scores(group, store.SPCAM, "img")
    np.testing.assert_array_equal(clipped, [[[0.0, 1.0]]])


def test_exception_inside_writing_leaves_no_store_and_no_temp_dir(tmp_path):
    path = tmp_path / "data.zarr"
    with pytest.raises(RuntimeError, match="boom"):
        with store.writing(path, "data", store.provenance("test")) as g:
            store.put(g, store.IMAGES, "a", np.zeros((2, 2, 3), np.uint8))
            raise RuntimeError("boom")
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_rewrite_keeps_the_older_store_intact(tmp_path):
    path = tmp_path / "data.zarr"
    old = _images()
    _write_images(path, old, marker="old")
    with pytest.raises(KeyboardInterrupt):  # also a kill-like BaseException
        with store.writing(path, "data", store.provenance("test"), {"marker": "new"}) as g:
            store.put(g, store.IMAGES, "a", np.zeros((2, 2, 3), np.uint8))
            raise KeyboardInterrupt
    group = store.open_store(path, "data")
    assert group.attrs["marker"] == "old"
    np.testing.assert_array_equal(store.get(group, store.IMAGES, "a"), old["a"])
    assert _leftovers(tmp_path) == []


def test_successful_rewrite_replaces_the_store_completely(tmp_path):
    path = tmp_path / "data.zarr"
    _write_images(path, _images(), marker="old")
    _write_images(path, {"only": np.ones((3, 4, 3), np.uint8)}, marker="new")
    group = store.open_store(path, "data")
    assert group.attrs["marker"] == "new"
    assert store.ids_in(group, store.IMAGES) == ["only"]  # nothing of the old store survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.zarr"]


def test_open_store_errors_missing_incomplete_wrong_kind(tmp_path):
    with pytest.raises(store.StoreError, match=r"nope\.zarr: store not found"):
        store.open_store(tmp_path / "nope.zarr")

    # What a killed writer leaves if its temp store were renamed by hand: complete = False.
    unfinished = zarr.open_group(str(tmp_path / "unfinished.zarr"), mode="w")
    unfinished.attrs.update({"kind": "data", "complete": False})
    with pytest.raises(store.StoreError, match=r"unfinished\.zarr: store is incomplete"):
        store.open_store(tmp_path / "unfinished.zarr", "data")
    zarr.open_group(str(tmp_path / "no_flag.zarr"), mode="w").attrs["kind"] = "data"
    with pytest.raises(store.StoreError, match="incomplete"):
        store.open_store(tmp_path / "no_flag.zarr")

    _write_images(tmp_path / "d.zarr", _images())
    with pytest.raises(store.StoreError, match=r"d\.zarr: expected a 'labels' store, found 'data'"):
        store.open_store(tmp_path / "d.zarr", "labels")
    assert store.open_store(tmp_path / "d.zarr") is not None  # no kind asked: any finished store

    (tmp_path / "plain_folder").mkdir()
    with pytest.raises(store.StoreError, match="plain_folder"):
        store.open_store(tmp_path / "plain_folder")


@pytest.mark.parametrize("n_shards", [1, 2, 3, 5])
def test_shard_ids_are_disjoint_and_cover_all_ids(n_shards):
    ids = [f"im{i:03d}" for i in (7, 3, 11, 0, 5, 9, 1)]  # unsorted input
    shards = [store.shard_ids(ids, s, n_shards) for s in range(n_shards)]
    flat = [i for shard in shards for i in shard]
    assert sorted(flat) == sorted(ids) and len(flat) == len(set(flat))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1  # balanced
    assert store.shard_ids(list(reversed(ids)), 0, n_shards) == shards[0]  # independent of input order


def test_shard_ids_rejects_a_shard_outside_the_range():
    with pytest.raises(ValueError, match=r"shard 2 is outside 0\.\.1"):
        store.shard_ids(["a"], 2, 2)


def _write_shard(path: Path, ids, scores: dict) -> None:
    with store.writing(path, "scores", store.provenance("test"), {"note": "same in every shard"}) as g:
        for image_id in ids:
            store.put_scores(g, store.CAM, image_id, scores[image_id], [1, 2])
            store.put_scores(g, store.SPCAM, image_id, scores[image_id][::-1], [2, 1])


def test_gather_of_two_shards_equals_one_store_with_everything(tmp_path):
    rng = np.random.default_rng(2)
    ids = ["p", "q", "r", "s", "t"]
    scores = {i: rng.random((2, 4 + k, 6), dtype=np.float32) for k, i in enumerate(ids)}
    _write_shard(tmp_path / "whole.zarr", ids, scores)
    shard_paths = [tmp_path / f"shard{s}.zarr" for s in range(2)]
    for s, path in enumerate(shard_paths):
        _write_shard(path, store.shard_ids(ids, s, 2), scores)

    store.gather(
        shard_paths,
        tmp_path / "gathered.zarr",
        "scores",
        store.provenance("gather"),
        expected_ids=ids,
        key=store.CAM,
    )
    whole = store.open_store(tmp_path / "whole.zarr", "scores")
    gathered = store.open_store(tmp_path / "gathered.zarr", "scores")
    assert gathered.attrs["note"] == "same in every shard"
    for key in (store.CAM, store.SPCAM):
        assert store.ids_in(gathered, key) == store.ids_in(whole, key) == ids
        for image_id in ids:
            np.testing.assert_array_equal(store.get(gathered, key, image_id), store.get(whole, key, image_id))
            assert store.get_attrs(gathered, key, image_id) == store.get_attrs(whole, key, image_id)
    assert _leftovers(tmp_path) == []


def test_gather_with_a_missing_shard_image_fails_and_writes_nothing(tmp_path):
    rng = np.random.default_rng(3)
    scores = {i: rng.random((2, 3, 3), dtype=np.float32) for i in "abc"}
    _write_shard(tmp_path / "shard0.zarr", ["a", "b"], scores)
    with pytest.raises(store.StoreError, match=r"lack 1 images, e\.g\. \['c'\]"):
        store.gather(
            [tmp_path / "shard0.zarr"],
            tmp_path / "out.zarr",
            "scores",
            store.provenance("gather"),
            expected_ids=["a", "b", "c"],
            key=store.CAM,
        )
    assert not (tmp_path / "out.zarr").exists() and _leftovers(tmp_path) == []
    with pytest.raises(store.StoreError, match="expected a 'labels' store"):
        store.gather([tmp_path / "shard0.zarr"], tmp_path / "out.zarr", "labels", store.provenance("gather"))


def test_run_layout_paths_are_distinct_and_under_the_run_dir(tmp_path):
    layout = store.RunLayout(tmp_path / "run")
    paths = [
        layout.data,
        layout.gt,
        layout.superpixels,
        layout.scores,
        layout.cam_model,
        layout.cleaned,
        layout.crf,
        layout.reliable,
        layout.round_model(1),
        layout.round_scores(1, "val"),
        layout.round_labels(1, "crf", "train"),
        layout.round_labels(2, "crf", "train"),
        layout.round_labels(1, "crf", "val"),
        layout.gated("cam", "val"),
        layout.metrics_csv("cam", "train"),
        layout.per_image_csv("cam", "train"),
        layout.sweep_csv("cam", "train"),
        layout.log("train_cam"),
        layout.benchmark("train_cam"),
        layout.train_log(),
        layout.train_log(1),
    ]
    assert len(set(paths)) == len(paths)
    assert all(p.is_relative_to(tmp_path / "run") for p in paths)
    assert layout.pseudo("crf") == layout.crf


def test_run_layout_finds_what_it_names(tmp_path):
    """What inspect and the report list is found through the same names the rules write."""
    layout = store.RunLayout(tmp_path / "run")
    made = [
        layout.round_labels(1, "crf", "train"),
        layout.round_labels(1, "cleaned", "val"),
        layout.round_scores(1, "val"),  # a scores store: not a labels store
        layout.round_labels(3, "reliable", "train"),
        layout.gated("spcam", "val"),
        layout.per_image_csv("crf", "train"),
    ]
    for path in made:
        path.mkdir(parents=True)
    assert layout.round_numbers() == [1, 3]
    assert layout.found_round_labels(1) == [
        ("cleaned", "val", layout.round_labels(1, "cleaned", "val")),
        ("crf", "train", layout.round_labels(1, "crf", "train")),
    ]
    assert layout.found_gated() == [("spcam", "val", layout.gated("spcam", "val"))]
    assert layout.found_metric_files("_per_image.csv") == [
        ("crf_train", layout.per_image_csv("crf", "train"))
    ]
    # Wildcards pass through, for the rules.
    assert str(layout.round_model("{r}")).endswith("round{r}/model.pt")
    assert layout.shard_store(layout.crf, "{shard}", 1) == layout.crf
    assert layout.shard_store(layout.crf, 2, 4).name == "crf-2.zarr"
