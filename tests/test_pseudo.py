"""Pseudo-labels: cleaning, divergence / top-k reliability, dense CRF, reliable regions, store edges."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from weakseg import config, store
from weakseg.datasets import IGNORE
from weakseg.labels import Background, confident_labels, fraction_of_peak, store_threshold
from weakseg.pseudo.clean import clean_annotation, run_clean
from weakseg.pseudo.crf import crf_labels, crf_probabilities, dense_crf, run_crf
from weakseg.pseudo.divergence import (
    CSV_COLUMNS,
    class_agreements,
    class_divergences,
    run_reliability,
    select_top_k,
    selected_ids,
)
from weakseg.pseudo.rrm import reliable_regions, run_reliable

CFG = config.load({})


# ---------------------------------------------------------------- cleaning


def test_fraction_of_peak_thresholds_relative_to_each_class_peak_with_background():
    # Class 2 (peak 0.8, threshold 0.4) and class 4 (peak 0.2, threshold 0.1); class 5 is not an
    # image label and must vanish although it has the highest scores everywhere.
    s2 = [0.8, 0.5, 0.4, 0.39, 0.1, 0.0]
    s4 = [0.0, 0.2, 0.0, 0.0, 0.15, 0.05]
    s5 = [1.0] * 6
    scores = np.array([[s2], [s4], [s5]], np.float32)  # (3, 1, 6)
    labels = fraction_of_peak(scores, np.array([2, 4, 5]), np.array([0, 2, 4]), 0.5, has_background=True)
    # px1: both kept, 0.5 > 0.2 -> 2; px2: exactly at threshold -> kept; px3: just below -> background;
    # px4: class 2 below its threshold, class 4 above its own (though lower in value) -> 4; px5: none.
    assert labels.dtype == np.uint8 and labels.shape == (1, 6)
    assert labels[0].tolist() == [2, 2, 2, 0, 4, 0]


def test_fraction_of_peak_without_background_unclaimed_is_ignore():
    scores = np.array([[[0.9, 0.2, 0.0]], [[0.1, 0.3, 0.0]]], np.float32)
    labels = fraction_of_peak(scores, np.array([0, 7]), np.array([0, 7]), 0.5, has_background=False)
    # Class 0 is a real class here (MSRC): px1 class 0 0.2 < 0.45, class 7 0.3 >= 0.15 -> 7; px2: nothing.
    assert labels[0].tolist() == [0, 7, IGNORE]


def test_fraction_of_peak_ratio_zero_is_argmax_over_labelled_classes():
    rng = np.random.default_rng(1)
    scores = rng.uniform(0.01, 1.0, size=(4, 9, 11)).astype(np.float32)
    classes = np.array([1, 3, 6, 8])
    image_labels = np.array([0, 3, 8])  # 1 and 6 have scores but are not in the image
    labels = fraction_of_peak(scores, classes, image_labels, 0.0, has_background=True)
    expected = np.array([3, 8])[scores[[1, 3]].argmax(axis=0)]
    np.testing.assert_array_equal(labels, expected)
    # With a higher ratio some pixels must fall back to background, never to an unlabelled class.
    strict = fraction_of_peak(scores, classes, image_labels, 0.9, has_background=True)
    assert 0 < np.count_nonzero(strict == 0) < strict.size
    assert set(np.unique(strict)) <= {0, 3, 8}


def test_fraction_of_peak_all_zero_maps_do_not_crash():
    zeros = np.zeros((2, 5, 4), np.float32)
    for ratio in (0.0, 0.5):
        assert (fraction_of_peak(zeros, np.array([1, 2]), np.array([0, 1, 2]), ratio, True) == 0).all()
        assert (fraction_of_peak(zeros, np.array([1, 2]), np.array([1, 2]), ratio, False) == IGNORE).all()
    # A class whose map is all zero claims nothing, even at ratio 0; the other class is unaffected.
    scores = zeros.copy()
    scores[1, :2] = 0.6
    labels = fraction_of_peak(scores, np.array([1, 2]), np.array([0, 1, 2]), 0.0, True)
    assert (labels[:2] == 2).all() and (labels[2:] == 0).all()


def test_clean_segmentation_probabilities_background_competes():
    # Class 0 is a channel: it is a candidate like any class; pixels nobody keeps become 255, not 0.
    scores = np.array([[[0.7, 0.1, 0.05]], [[0.2, 0.9, 0.05]], [[0.1, 0.0, 0.9]]], np.float32)
    labels = clean_annotation(scores, np.array([0, 1, 2]), np.array([0, 1]), 0.5, Background(True))
    assert labels[0].tolist() == [0, 1, IGNORE]


def test_clean_rejects_bad_shapes_and_ratio():
    with pytest.raises(ValueError, match="shape"):
        clean_annotation(np.zeros((2, 3, 3)), np.array([1]), np.array([1]), 0.5, Background(False))
    with pytest.raises(ValueError, match="ratio"):
        clean_annotation(np.zeros((1, 3, 3)), np.array([1]), np.array([1]), 1.5, Background(False))


def test_clean_with_implicit_background_ignores_the_uncertain_band():
    # Background threshold 0.4, margin 0.5: <= 0.2 confident background, >= 0.7 confident object.
    s3 = [0.95, 0.75, 0.7, 0.5, 0.39, 0.2, 0.1]
    s5 = [0.1, 0.8, 0.0, 0.0, 0.0, 0.0, 0.9]  # px1: 5 beats 3; px6: 5 is labelled too
    scores = np.array([[s3], [s5]], np.float32)
    labels = clean_annotation(
        scores, np.array([3, 5]), np.array([0, 3, 5]), 0.9, Background(True, threshold=0.4, margin=0.5)
    )
    assert labels[0].tolist() == [3, 5, 3, IGNORE, IGNORE, 0, 5]
    # margin 0: every pixel is decided, exactly as the dense rule does at that threshold.
    dense = clean_annotation(
        scores, np.array([3, 5]), np.array([0, 3, 5]), 0.9, Background(True, threshold=0.4, margin=0.0)
    )
    assert dense[0].tolist() == [3, 5, 3, 3, 0, 0, 5]


# ---------------------------------------------------------------- divergence and top-k


def test_divergence_of_a_square_is_16():
    for side in (1, 3, 6):
        labels = np.zeros((12, 12), np.uint8)
        labels[2 : 2 + side, 3 : 3 + side] = 4
        assert class_divergences(labels, [4]) == {4: (side * side, 4 * side, 16.0)}


def test_divergence_two_squares_l_shape_and_border():
    labels = np.full((12, 14), 0, np.uint8)
    labels[1:3, 1:3] = 1  # 2x2: area 4, perimeter 8
    labels[6:9, 8:11] = 1  # 3x3: area 9, perimeter 12
    # L-shape: a column of three with two more cells to the right of its bottom:
    # 5 cells, 4 internal adjacencies -> perimeter 4*5 - 2*4 = 12.
    labels[5, 2] = labels[6, 2] = labels[7, 2] = labels[7, 3] = labels[7, 4] = 2
    # A 2x3 block in the bottom-right corner: only its 2 + 3 inner edges count, not the border.
    labels[10:12, 11:14] = 3
    labels[0, 13] = IGNORE
    result = class_divergences(labels, [1, 2, 3, 5, IGNORE])
    assert result[1] == (13, 20, 400 / 13)
    assert result[2] == (5, 12, 144 / 5)
    assert result[3] == (6, 5, 25 / 6)
    assert set(result) == {1, 2, 3}  # 5 is absent, 255 is never scored


def test_divergence_shared_edge_counts_for_both_classes_and_full_image_is_zero():
    labels = np.zeros((4, 6), np.uint8)
    labels[:, 3:] = 9
    assert class_divergences(labels, [0, 9]) == {0: (12, 4, 16 / 12), 9: (12, 4, 16 / 12)}
    assert class_divergences(np.full((5, 5), 2, np.uint8), [2]) == {2: (25, 0, 0.0)}


def _annotations():
    return pd.DataFrame(
        {
            "id": ["a", "b", "c", "d", "e", "f", "g"],
            "class": [1, 1, 1, 1, 2, 1, -1],
            "divergence": [30.0, 16.0, 50.0, 20.0, 40.0, 20.0, math.inf],
        }
    )


def test_select_top_k_ranks_per_class_and_keeps_small_classes():
    out = select_top_k(_annotations(), k=2, fraction=0.5).set_index("id")
    # Class 1 ascending: b 16, d 20, f 20 (tie broken by id), a 30, c 50.
    assert out.loc[["b", "d", "f", "a", "c"], "rank"].tolist() == [0, 1, 2, 3, 4]
    assert out.loc[["b", "d", "f", "a", "c"], "selected"].tolist() == [True, True, False, False, False]
    assert out.loc["e", "rank"] == 0 and out.loc["e", "selected"]  # class 2 has 1 < k annotations: kept
    assert out.loc["g", "rank"] == -1 and not out.loc["g", "selected"]
    assert out["selected"].dtype == bool


def test_select_top_k_fraction_rounds_up_per_class():
    out = select_top_k(_annotations(), k=None, fraction=0.5).set_index("id")
    # Class 1: ceil(0.5 * 5) = 3 kept; class 2: ceil(0.5 * 1) = 1 kept.
    assert sorted(out.index[out["selected"]]) == ["b", "d", "e", "f"]
    out = select_top_k(_annotations(), k=None, fraction=0.2).set_index("id")
    assert sorted(out.index[out["selected"]]) == ["b", "e"]
    with pytest.raises(ValueError, match="divergence"):
        select_top_k(pd.DataFrame({"id": ["a"], "class": [1]}), 1, 0.5)


# ---------------------------------------------------------------- dense CRF


def _two_colour_halves(height=40, width=60, edge=30):
    rng = np.random.default_rng(0)
    image = np.zeros((height, width, 3), np.float32)
    image[:, :edge] = (200, 60, 60)
    image[:, edge:] = (60, 60, 200)
    image = np.clip(image + rng.normal(0, 5, image.shape), 0, 255).astype(np.uint8)
    truth = np.zeros((height, width), np.uint8)
    truth[:, edge:] = 1
    # A blurry score map whose 0.5 crossing is 7 px right of the colour edge.
    x = np.arange(width)[None, :].repeat(height, 0)
    right = 1.0 / (1.0 + np.exp(-(x - edge - 7) / 4.0))
    return image, truth, right.astype(np.float32)


def test_crf_follows_colour_edge_better_than_score_argmax():
    image, truth, right = _two_colour_halves()
    crf_params = CFG["pseudo"]["crf"]
    # No background class: two real classes 0 and 1.
    probs, classes = crf_probabilities(
        np.stack([1 - right, right]), np.array([0, 1]), np.array([0, 1]), False, None
    )
    argmax_acc = (classes[probs.argmax(0)] == truth).mean()
    crf_acc = (crf_labels(image, probs, classes, crf_params) == truth).mean()
    assert argmax_acc < 0.9 and crf_acc > 0.98, (argmax_acc, crf_acc)
    # Background dataset, CAM scores for foreground class 3 only: background is derived.
    probs, classes = crf_probabilities(right[None], np.array([3]), np.array([0, 3]), True, 0.5)
    assert classes.tolist() == [0, 3]
    target = np.where(truth == 1, 3, 0)
    argmax_acc = (classes[probs.argmax(0)] == target).mean()
    crf_acc = (crf_labels(image, probs, classes, crf_params) == target).mean()
    assert crf_acc > 0.98 and crf_acc > argmax_acc + 0.03, (argmax_acc, crf_acc)


def test_crf_probabilities_background_restriction_and_normalisation():
    scores = np.array([[[0.8, 0.0]], [[0.4, 0.0]], [[0.9, 0.9]]], np.float32)
    probs, classes = crf_probabilities(scores, np.array([1, 2, 5]), np.array([0, 1, 2]), True, 0.5)
    assert classes.tolist() == [0, 1, 2]  # class 5 is not labelled
    raw = np.array([[0.2, 1.0], [0.8, 0.0], [0.4, 0.0]])  # bg = (1 - max)^a, a = 1 at threshold 0.5
    np.testing.assert_allclose(probs[:, 0], raw / raw.sum(0), rtol=1e-5)
    # No background class: normalised over labelled classes, uniform where all are zero.
    probs, classes = crf_probabilities(scores, np.array([1, 2, 5]), np.array([1, 2]), False, None)
    assert classes.tolist() == [1, 2]
    np.testing.assert_allclose(probs[:, 0, 0], [2 / 3, 1 / 3], rtol=1e-5)
    np.testing.assert_allclose(probs[:, 0, 1], [0.5, 0.5])
    # Segmentation probabilities with a background channel are kept as they are (renormalised).
    probs, classes = crf_probabilities(scores, np.array([0, 1, 2]), np.array([0, 1, 2]), True, None)
    assert classes.tolist() == [0, 1, 2]
    np.testing.assert_allclose(probs.sum(0), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probs[:, 0, 1], [0, 0, 1], atol=1e-6)


def test_dense_crf_checks_inputs():
    image, _, right = _two_colour_halves()
    probs = np.stack([1 - right, right])
    with pytest.raises(ValueError, match="does not match"):
        dense_crf(image[:, :-1], probs, CFG["pseudo"]["crf"])
    with pytest.raises(KeyError, match="pseudo.crf"):
        dense_crf(image, probs, {"iterations": 3})
    marginals = dense_crf(image, probs, CFG["pseudo"]["crf"])
    np.testing.assert_allclose(marginals.sum(0), 1.0, rtol=1e-4)


# ---------------------------------------------------------------- reliable regions


def test_reliable_regions_hand_made():
    # One row, one labelled fg class 4 (class 6 is not labelled), background dataset; background
    # threshold 0.2 with margin 0.5: <= 0.1 confident background, >= 0.6 confident object.
    s4 = [0.9, 0.9, 0.5, 0.2, 0.04, 0.04, 0.3]
    s6 = [0.1, 0.95, 0.0, 0.0, 0.0, 0.0, 0.0]
    scores = np.array([[s4], [s6]], np.float32)
    confident = confident_labels(scores, np.array([4, 6]), np.array([0, 4]), 0.3, Background(True, 0.2, 0.5))
    assert confident[0].tolist() == [4, 4, IGNORE, IGNORE, 0, 0, IGNORE]
    crf = np.array([[4, 4, 0, 4, 0, 4, 4]], np.uint8)
    reliable = reliable_regions(
        crf, scores, np.array([4, 6]), np.array([0, 4]), 0.3, Background(True, 0.2, 0.5)
    )
    assert reliable[0].tolist() == [4, 4, IGNORE, IGNORE, 0, IGNORE, IGNORE]
    # Without a background class the confidence decides (>= 0.3, inclusive) and nothing is background.
    no_bg = reliable_regions(crf, scores, np.array([4, 6]), np.array([4]), 0.3, Background(False))
    assert no_bg[0].tolist() == [4, 4, IGNORE, IGNORE, IGNORE, IGNORE, 4]
    with pytest.raises(ValueError, match="margin"):
        confident_labels(scores, np.array([4, 6]), np.array([0, 4]), 0.3, Background(True, 0.2, 1.0))


# ---------------------------------------------------------------- store round trip

CLASS_NAMES = ["background", "red", "green", "blue"]
COLOURS = {1: (220, 40, 40), 2: (40, 220, 40), 3: (40, 40, 220)}
H, W = 24, 32


def _scene(image_id: str, objects: list[tuple[int, slice, slice]]):
    """Image with flat coloured boxes on grey, and blurred box scores of the image's classes."""
    rng = np.random.default_rng(int.from_bytes(image_id.encode(), "little"))
    image = np.full((H, W, 3), 120, np.float32)
    classes = sorted({c for c, _, _ in objects})
    scores = np.zeros((len(classes), H, W), np.float32)
    for c, rows, cols in objects:
        image[rows, cols] = COLOURS[c]
        box = np.zeros((H, W), np.float32)
        box[rows, cols] = 1.0
        # Cheap blur: average of shifted copies, so scores bleed past the true edge.
        blurred = sum(np.roll(np.roll(box, dy, 0), dx, 1) for dy in (-2, 0, 2) for dx in (-2, 0, 2)) / 9
        scores[classes.index(c)] = np.maximum(scores[classes.index(c)], 0.9 * blurred)
    image = np.clip(image + rng.normal(0, 3, image.shape), 0, 255).astype(np.uint8)
    return image, scores, classes


SCENES = {
    "t0": [(1, slice(4, 14), slice(4, 14))],
    "t1": [(2, slice(10, 20), slice(14, 28)), (3, slice(2, 8), slice(2, 10))],
    "t2": [(1, slice(6, 18), slice(18, 30))],
    "t3": [(3, slice(0, 0), slice(0, 0))],  # labelled blue, but the scores are all zero
    "v0": [(1, slice(4, 12), slice(4, 12)), (2, slice(12, 20), slice(12, 20))],
}


@pytest.fixture()
def stores(tmp_path):
    ids = sorted(SCENES)
    labels = np.zeros((len(ids), len(CLASS_NAMES)), np.uint8)
    labels[:, 0] = 1
    for row, image_id in enumerate(ids):
        for c, _, _ in SCENES[image_id]:
            labels[row, c] = 1
    splits = {"train": [i for i in ids if i.startswith("t")], "val": ["v0"]}
    data_path, scores_path = tmp_path / "data.zarr", tmp_path / "scores.zarr"
    attrs = {"class_names": CLASS_NAMES, "has_background": True, "ids": ids, "splits": splits}
    with (
        store.writing(data_path, "data", store.provenance("test"), attrs) as data,
        store.writing(scores_path, "scores", store.provenance("test")) as scores,
    ):
        array = data.create_array("labels", shape=labels.shape, dtype=labels.dtype)
        array[...] = labels
        for image_id in ids:
            image, image_scores, classes = _scene(image_id, SCENES[image_id])
            store.put(data, store.IMAGES, image_id, image)
            if image_id.startswith("v"):  # val images get scores for all foreground classes
                full = np.zeros((3, H, W), np.float32)
                full[[c - 1 for c in classes]] = image_scores
                image_scores, classes = full, [1, 2, 3]
            store.put_scores(scores, store.SPCAM, image_id, image_scores, classes)
    return tmp_path, data_path, scores_path


def _labels(path):
    group = store.open_store(path, "labels")
    return {i: store.get(group, store.LABELS, i) for i in store.ids_in(group, store.LABELS)}, group


def test_store_round_trip(stores):
    tmp, data_path, scores_path = stores
    train = ["t0", "t1", "t2", "t3"]
    scores_group = store.open_store(scores_path, "scores")

    run_clean(CFG, data_path, scores_path, "spcam", tmp / "cleaned.zarr")
    cleaned, group = _labels(tmp / "cleaned.zarr")
    assert sorted(cleaned) == train  # the val image is not labelled
    assert group.attrs["provenance"]["stage"] == "clean"
    # The background threshold is calibrated on the train scores, and recorded with the store.
    threshold = store_threshold(CFG, scores_path, "spcam", data_path)
    assert 0.05 < threshold < 0.9 and group.attrs["provenance"]["background_threshold"] == threshold
    for image_id in train:
        scores, classes = store.get_scores(scores_group, "spcam", image_id)
        expected = clean_annotation(
            scores,
            classes,
            np.array([0, *classes]),
            CFG["pseudo"]["clean_ratio"],
            Background(True, threshold, CFG["pseudo"]["background"]["margin"]),
        )
        np.testing.assert_array_equal(cleaned[image_id], expected)
    assert (cleaned["t3"] == 0).all() and (cleaned["t0"][6:12, 6:12] == 1).all()

    # Shards are disjoint and together cover every train image.
    for shard in (0, 1):
        run_clean(
            CFG,
            data_path,
            scores_path,
            "spcam",
            tmp / f"cleaned-{shard}.zarr",
            ratio=0.2,
            shard=shard,
            n_shards=2,
        )
    parts = [set(_labels(tmp / f"cleaned-{s}.zarr")[0]) for s in (0, 1)]
    assert parts[0].isdisjoint(parts[1]) and parts[0] | parts[1] == set(train)

    by_shape = {**CFG, "pseudo": {**CFG["pseudo"], "reliability_score": "divergence"}}
    table = run_reliability(by_shape, data_path, tmp / "cleaned.zarr", tmp / "pseudo" / "reliability.csv")
    csv = pd.read_csv(tmp / "pseudo" / "reliability.csv", dtype={"id": str})
    assert list(csv.columns) == CSV_COLUMNS and len(csv) == len(table)
    assert (csv["score"] == csv["divergence"]).all() and csv["consistency"].isna().all()
    # The content score needs the model whose encoder gives the features: refused without it.
    with pytest.raises(ValueError, match="needs --model"):
        run_reliability(CFG, data_path, tmp / "cleaned.zarr", tmp / "pseudo" / "other.csv")
    assert not (tmp / "pseudo" / "other.csv").exists()
    empty = csv[csv["id"] == "t3"].iloc[0]
    assert empty["class"] == -1 and math.isinf(empty["divergence"]) and not empty["selected"]
    assert set(csv.loc[csv["id"] == "t1", "class"]) == {2, 3}
    red = csv[csv["class"] == 1].sort_values("rank")
    assert red["divergence"].is_monotonic_increasing and red["selected"].tolist() == [
        True,
        False,
    ]  # ceil(0.5*2)
    assert selected_ids(tmp / "pseudo" / "reliability.csv") == sorted(csv.loc[csv["selected"], "id"].unique())
    assert "t3" not in selected_ids(tmp / "pseudo" / "reliability.csv")

    run_crf(CFG, data_path, scores_path, "spcam", tmp / "crf.zarr", threads=2, unary="scores")
    crf, group = _labels(tmp / "crf.zarr")
    assert sorted(crf) == train and group.attrs["provenance"]["stage"] == "crf"
    for image_id, objects in SCENES.items():
        if image_id in crf:
            assert set(np.unique(crf[image_id])) <= {0} | {c for c, _, _ in objects}
    # The CRF snaps the blurred red box back onto the coloured box.
    truth = np.zeros((H, W), np.uint8)
    truth[4:14, 4:14] = 1
    assert (crf["t0"] == truth).mean() > 0.97

    run_reliable(CFG, data_path, scores_path, "spcam", tmp / "crf.zarr", tmp / "reliable.zarr")
    reliable, _ = _labels(tmp / "reliable.zarr")
    assert sorted(reliable) == train
    for image_id in train:
        kept = reliable[image_id] != IGNORE
        np.testing.assert_array_equal(reliable[image_id][kept], crf[image_id][kept])
        if image_id != "t3":  # near the blurred box edges scores are unsure: dropped
            assert 0.3 < kept.mean() < 1.0, (image_id, kept.mean())
    assert (reliable["t3"] == 0).all()  # all-zero scores: confidently background everywhere


def test_scores_missing_a_labelled_class_is_a_clear_error(stores):
    tmp, data_path, _ = stores
    bad = tmp / "bad_scores.zarr"
    with store.writing(bad, "scores", store.provenance("test")) as scores:
        store.put_scores(scores, store.SPCAM, "t1", np.zeros((1, H, W)), [2])  # t1 is labelled 2 and 3
    with pytest.raises(store.StoreError, match=r"t1.*\[3\]"):
        run_clean(CFG, data_path, bad, "spcam", tmp / "out.zarr")
    assert not (tmp / "out.zarr").exists()


def test_consensus_keeps_the_round_labels_where_the_first_pseudo_labels_agree(stores):
    from weakseg.pseudo.consensus import run_consensus

    tmp, data_path, _ = stores
    rng = np.random.default_rng(0)
    train, maps = ["t0", "t1", "t2", "t3"], {}
    for name in ("round", "first"):
        maps[name] = {i: rng.choice(np.array([0, 1, 2, IGNORE], np.uint8), size=(H, W)) for i in train}
        with store.writing(tmp / f"{name}.zarr", "labels", store.provenance("test")) as group:
            for image_id, labels in maps[name].items():
                store.put(group, store.LABELS, image_id, labels)
    run_consensus(CFG, data_path, tmp / "round.zarr", tmp / "first.zarr", tmp / "consensus.zarr")
    agreed, _ = _labels(tmp / "consensus.zarr")
    assert sorted(agreed) == train
    for image_id in train:
        a, b, out = maps["round"][image_id], maps["first"][image_id], agreed[image_id]
        np.testing.assert_array_equal(out[a == b], a[a == b])
        assert (out[a != b] == IGNORE).all() and (out != IGNORE).any()
    # A reference without one of the images is refused, naming the store, and writes nothing.
    with store.writing(tmp / "partial.zarr", "labels", store.provenance("test")) as group:
        store.put(group, store.LABELS, "t0", maps["first"]["t0"])
    with pytest.raises(store.StoreError, match="partial.zarr: no labels for 3 images"):
        run_consensus(CFG, data_path, tmp / "round.zarr", tmp / "partial.zarr", tmp / "bad.zarr")
    assert not (tmp / "bad.zarr").exists()
    # Pruned: the first labels stand except where the round gives another label.
    run_consensus(CFG, data_path, tmp / "round.zarr", tmp / "first.zarr", tmp / "pruned.zarr", "pruned")
    kept, _ = _labels(tmp / "pruned.zarr")
    for image_id in train:
        a, b, out = maps["round"][image_id], maps["first"][image_id], kept[image_id]
        contradicted = (a != IGNORE) & (a != b)
        np.testing.assert_array_equal(out[~contradicted], b[~contradicted])
        assert (out[contradicted] == IGNORE).all() and contradicted.any()
        assert ((out != IGNORE) & (b != a)).any()  # where the round is silent the first labels stay


def test_class_agreements_share_of_the_dense_region_the_confident_labels_confirm():
    dense = np.zeros((4, 6), np.uint8)
    dense[:, 2:] = 3  # class 3 grown over 16 pixels
    confident = np.full((4, 6), IGNORE, np.uint8)
    confident[:, :2] = 0
    confident[1:3, 4:6] = 3  # confirms 4 of class 3's 16 pixels
    confident[0, 2] = 0  # and disputes one
    result = class_agreements(dense, confident, [0, 3, 5, IGNORE])
    assert result == {0: 1.0, 3: pytest.approx(4 / 16)}  # 5 is absent from the dense annotation
    with pytest.raises(ValueError, match="one shape"):
        class_agreements(dense, confident[:, :4], [3])
