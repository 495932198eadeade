"""Superpixels: complete consecutive int32 maps near the requested count, the oracle, threads and shards."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from weakseg import config, store
from weakseg.datasets import IGNORE, open_data
from weakseg.datasets.folder import ingest
from weakseg.datasets.synthetic import make_image
from weakseg.metrics import Confusion, confusion_metrics, superpixel_oracle
from weakseg.superpixels import METHODS, compute_superpixels, run_superpixels

N_CLASSES = 7  # background or sky/ground + 5 fg classes of the images below


def _synthetic(index: int, has_background: bool = True):
    """A 96x128 synthetic image (the default synthetic size) and its mask."""
    return make_image(index, 7, 96, 128, 5, 3, has_background)


def _check_map(labels: np.ndarray, shape) -> int:
    """Every pixel labelled, labels exactly 0..n-1, int32. Returns n."""
    assert labels.dtype == np.int32
    assert labels.shape == shape
    n = int(labels.max()) + 1
    assert labels.min() == 0
    np.testing.assert_array_equal(np.unique(labels), np.arange(n))  # consecutive: no gaps
    return n


def _oracle_miou(superpixels: np.ndarray, mask: np.ndarray, n_classes: int) -> float:
    return confusion_metrics(Confusion(n_classes).add(mask, superpixel_oracle(superpixels, mask)))["miou"]


@pytest.mark.parametrize("method", METHODS)
def test_maps_are_complete_consecutive_int32(method):
    image, _ = _synthetic(0)
    for n_segments in (60, 200):  # the tiny config's and the default request
        n = _check_map(compute_superpixels(image, method, n_segments), image.shape[:2])
        assert n_segments / 2 <= n <= 2 * n_segments, (method, n_segments, n)


@pytest.mark.parametrize("method", METHODS)
def test_count_stays_within_a_factor_of_two_of_the_request(method):
    """Also on the MSRC-style images (fine checked/striped ground) and for requests between the
    grid sizes of SEEDS, where a method can lose most of its superpixels."""
    seen = {}
    for has_background in (True, False):
        for index in range(3):
            image, _ = _synthetic(index, has_background)
            for n_segments in (60, 150, 200):
                n = int(compute_superpixels(image, method, n_segments).max()) + 1
                seen[(has_background, index, n_segments)] = n
    bad = {k: n for k, n in seen.items() if not k[2] / 2 <= n <= 2 * k[2]}
    assert not bad, f"{method}: (has_background, image, requested) -> count outside x0.5..x2: {bad}"


@pytest.mark.parametrize("method", METHODS)
def test_superpixels_follow_object_boundaries(method):
    """The oracle on real superpixels is high: they rarely straddle two classes."""
    mious = []
    for index in range(3):
        image, mask = _synthetic(index)
        mious.append(_oracle_miou(compute_superpixels(image, method, 200), mask, N_CLASSES))
    assert np.mean(mious) >= 0.8, (method, np.round(mious, 3))


def test_oracle_is_perfect_when_the_mask_is_the_superpixel_map():
    _, mask = _synthetic(1, has_background=False)
    with_ignore = mask.copy()
    with_ignore[:, :10] = IGNORE  # ignore pixels form their own "superpixel" and stay ignored
    for gt in (mask, with_ignore):
        result = confusion_metrics(Confusion(N_CLASSES).add(gt, superpixel_oracle(gt.astype(np.int32), gt)))
        assert result["miou"] == 1.0 and result["pixel_acc"] == 1.0 and result["labelled_fraction"] == 1.0
    # A single superpixel over the whole image is not perfect: the check above is not vacuous.
    assert _oracle_miou(np.zeros(mask.shape, np.int32), mask, N_CLASSES) < 0.5


def test_bad_method_and_bad_image_are_refused():
    image, _ = _synthetic(0)
    with pytest.raises(ValueError, match=r"superpixels.method: unknown method 'watershed'"):
        compute_superpixels(image, "watershed", 50)
    with pytest.raises(ValueError, match=r"expected an RGB uint8 \(H, W, 3\) image, got float32"):
        compute_superpixels(image.astype(np.float32), "slic", 50)
    with pytest.raises(ValueError, match="RGB uint8"):
        compute_superpixels(image[..., 0], "slic", 50)


@pytest.mark.parametrize("method", ["slic", "slico", "seeds"])
def test_an_opencv_without_contrib_is_named_in_one_line(method, monkeypatch):
    """A plain opencv-python beside the contrib wheel shadows ximgproc: say so, not AttributeError."""
    image, _ = _synthetic(0)
    monkeypatch.delattr(cv2, "ximgproc")
    with pytest.raises(
        config.ConfigError, match="superpixels.method: .*opencv-contrib-python-headless"
    ) as err:
        compute_superpixels(image, method, 50)
    assert "\n" not in str(err.value)
    _check_map(compute_superpixels(image, "felzenszwalb", 50), image.shape[:2])  # needs no contrib


@pytest.mark.msrc
@pytest.mark.parametrize("method", METHODS)
def test_real_msrc_image(method, msrc_root):
    image_id = (msrc_root / "train.txt").read_text().split()[0]
    image = cv2.imread(str(msrc_root / "JPEGImages" / f"{image_id}.jpg"))[..., ::-1].copy()
    with Image.open(msrc_root / "SegmentationClass" / f"{image_id}.png") as im:
        mask = np.array(im)
    for n_segments in (200, 1000):
        labels = compute_superpixels(image, method, n_segments)
        n = _check_map(labels, image.shape[:2])
        assert n_segments / 2 <= n <= 2 * n_segments, (method, n_segments, n)
        assert _oracle_miou(labels, mask, 21) >= 0.85
    assert _oracle_miou(mask.astype(np.int32), mask, 21) == 1.0


# --- the I/O edge -------------------------------------------------------------------------------------


@pytest.fixture
def data_path(synthetic_folder, tmp_path):
    cfg = config.load({"dataset": {"kind": "folder", "root": str(synthetic_folder)}})["dataset"]
    ingest(synthetic_folder, cfg, tmp_path / "data.zarr", tmp_path / "gt.zarr", store.provenance("ingest"))
    return tmp_path / "data.zarr"


def _maps(path) -> dict[str, np.ndarray]:
    group = store.open_store(path, "superpixels")
    return {i: store.get(group, store.SUPERPIXELS, i) for i in store.ids_in(group, store.SUPERPIXELS)}


def _assert_same_maps(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for image_id in a:
        np.testing.assert_array_equal(a[image_id], b[image_id])


def test_run_superpixels_threads_and_shards_give_the_same_store(data_path, tmp_path):
    cfg = config.load({"superpixels": {"method": "slic", "n_segments": 30}})
    info, _ = open_data(data_path)
    assert run_superpixels(cfg, data_path, tmp_path / "one.zarr", threads=1) == len(info.ids)
    one = _maps(tmp_path / "one.zarr")
    assert sorted(one) == sorted(info.ids)  # every split's images
    for labels in one.values():
        _check_map(labels, (48, 64))
    group = store.open_store(tmp_path / "one.zarr", "superpixels")
    assert group.attrs["provenance"]["config"] == cfg["superpixels"]

    run_superpixels(cfg, data_path, tmp_path / "two_threads.zarr", threads=2)
    _assert_same_maps(_maps(tmp_path / "two_threads.zarr"), one)

    shards = [tmp_path / f"shard{s}.zarr" for s in range(2)]
    counts = [run_superpixels(cfg, data_path, path, shard=s, n_shards=2) for s, path in enumerate(shards)]
    assert sum(counts) == len(info.ids) and min(counts) >= 1
    assert not set(_maps(shards[0])) & set(_maps(shards[1]))
    store.gather(
        shards,
        tmp_path / "gathered.zarr",
        "superpixels",
        store.provenance("gather"),
        expected_ids=list(info.ids),
        key=store.SUPERPIXELS,
    )
    _assert_same_maps(_maps(tmp_path / "gathered.zarr"), one)


def test_gathered_store_attrs_describe_all_its_images(data_path, tmp_path):
    """Summary attrs written by one shard must not claim to describe the gathered store."""
    cfg = config.load({"superpixels": {"method": "slic", "n_segments": 30}})
    info, _ = open_data(data_path)
    run_superpixels(cfg, data_path, tmp_path / "one.zarr")
    shards = [tmp_path / f"shard{s}.zarr" for s in range(2)]
    for s, path in enumerate(shards):
        run_superpixels(cfg, data_path, path, shard=s, n_shards=2)
    store.gather(shards, tmp_path / "gathered.zarr", "superpixels", store.provenance("gather"))

    def summary(path):
        attrs = dict(store.open_store(path, "superpixels").attrs)
        return {k: v for k, v in attrs.items() if k != "provenance"}

    assert summary(tmp_path / "gathered.zarr") == summary(tmp_path / "one.zarr")
