"""Metric math against hand-computed numbers, and the store -> CSV edge on tiny stores."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from weakseg import evaluate as ev
from weakseg import metrics, store

IGN = 255


# ---------------------------------------------------------------- confusion counting


def test_confusion_matrix_hand_case_with_ignore_and_unlabelled():
    gt = np.array([[0, 0, 1], [1, 2, IGN]], np.uint8)
    pred = np.array([[0, 1, 1], [IGN, 2, 0]], np.uint8)  # gt-ignore pixel predicted 0: not counted
    expected = np.zeros((4, 4), np.int64)
    expected[0, 0] = expected[0, 1] = expected[1, 1] = expected[2, 2] = 1
    np.testing.assert_array_equal(metrics.confusion_matrix(gt, pred, 4), expected)

    conf = metrics.Confusion(4).add(gt, pred)
    np.testing.assert_array_equal(conf.matrix, expected)
    np.testing.assert_array_equal(conf.unlabelled, [0, 1, 0, 0])  # the gt-1 pixel predicted 255
    assert conf.total_valid == 5 and conf.n_images == 1


def test_confusion_accumulates_and_merges():
    a = (np.array([0, 1], np.uint8), np.array([0, 0], np.uint8))
    b = (np.array([1, 1], np.uint8), np.array([1, IGN], np.uint8))
    total = metrics.accumulate([a, b], 2)
    np.testing.assert_array_equal(total.matrix, [[1, 0], [1, 1]])
    np.testing.assert_array_equal(total.unlabelled, [0, 1])
    merged = metrics.sum_confusions([metrics.Confusion(2).add(*a), metrics.Confusion(2).add(*b)], 2)
    np.testing.assert_array_equal(merged.matrix, total.matrix)
    assert merged.n_images == total.n_images == 2


def test_confusion_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        metrics.confusion_matrix(np.zeros((2, 2), np.uint8), np.zeros((2, 3), np.uint8), 2)
    with pytest.raises(ValueError, match="prediction holds values \\[5\\]"):
        metrics.confusion_matrix(np.zeros(3, np.uint8), np.array([0, 5, IGN], np.uint8), 3)
    with pytest.raises(ValueError, match="ground truth holds values \\[7\\]"):
        metrics.confusion_matrix(np.array([7, 0], np.uint8), np.zeros(2, np.uint8), 3)
    with pytest.raises(ValueError, match="integer"):
        metrics.confusion_matrix(np.zeros(2, np.uint8), np.zeros(2, np.float32), 3)
    with pytest.raises(ValueError, match="3 and 2 classes"):
        metrics.Confusion(2).merge(metrics.Confusion(3))


# ---------------------------------------------------------------- metrics


def _three_class_example(n_classes=3):
    gt = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2], np.uint8)
    pred = np.array([0, 0, 0, 0, 1, 0, 0, 1, 1, 1, 2, IGN], np.uint8)
    return metrics.Confusion(n_classes).add(gt, pred)


def test_scores_by_hand_on_three_classes():
    # matrix rows gt: [4 1 0] [2 3 0] [0 0 1], one unlabelled gt-2 pixel.
    s = metrics.confusion_metrics(_three_class_example())
    np.testing.assert_allclose(s["iou"], [4 / 7, 3 / 6, 1.0])
    assert s["miou"] == pytest.approx((4 / 7 + 0.5 + 1.0) / 3)
    # The unlabelled pixel is not an error: labelled pixels only (11), correct 8.
    assert s["pixel_acc"] == pytest.approx(8 / 11)
    np.testing.assert_allclose(s["class_acc"], [4 / 5, 3 / 5, 1.0])
    assert s["mean_class_acc"] == pytest.approx(0.8)
    np.testing.assert_allclose(s["over_activation"], [2 / 6, 1 / 4, 0.0])
    assert s["labelled_fraction"] == pytest.approx(11 / 12)
    assert s["n_images"] == 1


def test_class_absent_from_both_is_nan_and_excluded():
    with_absent = metrics.confusion_metrics(_three_class_example(n_classes=5))
    plain = metrics.confusion_metrics(_three_class_example())
    assert np.isnan(with_absent["iou"][3:]).all()
    assert np.isnan(with_absent["class_acc"][3:]).all() and np.isnan(with_absent["over_activation"][3:]).all()
    assert with_absent["miou"] == pytest.approx(plain["miou"])
    assert with_absent["mean_class_acc"] == pytest.approx(plain["mean_class_acc"])


def test_class_only_predicted_counts_as_zero_iou():
    s = metrics.confusion_metrics(
        metrics.Confusion(3).add(np.zeros(4, np.uint8), np.array([0, 0, 0, 2], np.uint8))
    )
    np.testing.assert_allclose(s["iou"], [0.75, np.nan, 0.0])
    assert s["miou"] == pytest.approx(0.375)
    assert s["mean_class_acc"] == pytest.approx(0.75)  # recall over gt classes only
    assert s["over_activation"][2] == 1.0


def test_nothing_labelled_gives_nan_not_warnings():
    with np.errstate(all="raise"):
        s = metrics.confusion_metrics(
            metrics.Confusion(2).add(np.zeros(3, np.uint8), np.full(3, IGN, np.uint8))
        )
    assert math.isnan(s["miou"]) and math.isnan(s["pixel_acc"]) and s["labelled_fraction"] == 0.0


def test_tidy_rows():
    rows = metrics.tidy_rows(
        "crf", "train", metrics.confusion_metrics(_three_class_example()), ["a", "b", "c"]
    )
    df = pd.DataFrame(rows)
    assert list(df.columns) == metrics.TIDY_COLUMNS
    overall = df[df["class"] == ""].set_index("metric")["value"]
    assert set(overall.index) == {"miou", "pixel_acc", "mean_class_acc", "labelled_fraction", "n_images"}
    assert overall["labelled_fraction"] == pytest.approx(11 / 12)
    per_class = df[df["class"] != ""].pivot(index="class", columns="metric", values="value")
    assert per_class.loc["a", "iou"] == pytest.approx(4 / 7)
    assert per_class.loc["b", "over_activation"] == pytest.approx(0.25)
    assert per_class.loc["c", "class_acc"] == pytest.approx(1.0)
    assert (df["stage"] == "crf").all() and (df["split"] == "train").all()
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        metrics.tidy_rows("crf", "train", metrics.confusion_metrics(_three_class_example()), ["a", "b"])


# ---------------------------------------------------------------- background sweep (uses GT)


def test_background_sweep_picks_the_right_threshold():
    # One image, classes 3 and 1 (channel order != class order); background where scores are low.
    gt = np.array([[0, 0, 3, 1]], np.uint8)
    scores = np.array(
        [
            [[0.05, 0.15, 0.30, 0.10]],  # class 3
            [[0.00, 0.10, 0.20, 0.60]],
        ],
        np.float32,
    )  # class 1
    classes = np.array([3, 1])
    sweep = metrics.background_sweep([(scores, classes, gt, 4)], [0.1, 0.3, 0.4])  # 0.3: a score, inclusive
    assert list(sweep.columns) == metrics.SWEEP_COLUMNS
    np.testing.assert_allclose(sweep["threshold"], [0.1, 0.3, 0.4])
    # t=0.1 -> [0 3 3 1]: iou bg 1/2, class 3 1/2, class 1 1.
    # t=0.4 -> [0 0 0 1]: iou bg 2/3, class 3 0, class 1 1.
    np.testing.assert_allclose(sweep["miou"], [(0.5 + 0.5 + 1) / 3, 1.0, (2 / 3 + 0 + 1) / 3])
    np.testing.assert_allclose(sweep["mean_class_acc"], [(0.5 + 1 + 1) / 3, 1.0, (1 + 0 + 1) / 3])
    assert metrics.best_threshold(sweep) == 0.3


def test_background_sweep_of_a_background_only_image():
    empty = np.zeros((0, 2, 2), np.float32)
    sweep = metrics.background_sweep([(empty, np.zeros(0, int), np.zeros((2, 2), np.uint8), 2)], [0.3])
    assert sweep["miou"].iloc[0] == 1.0


# ---------------------------------------------------------------- superpixel oracle


def test_superpixel_oracle_is_perfect_on_the_mask_itself():
    from skimage.measure import label as connected

    rng = np.random.default_rng(0)
    gt = np.repeat(np.repeat(rng.integers(0, 4, (8, 10)), 6, 0), 5, 1).astype(np.uint8)
    gt[:5, :7] = IGN
    for sp in (gt.astype(np.int32), connected(gt, background=-1, connectivity=1)):
        pred = metrics.superpixel_oracle(sp, gt)
        np.testing.assert_array_equal(pred, gt)  # ignore region is a superpixel of 255 only -> 255
        assert metrics.confusion_metrics(metrics.Confusion(4).add(gt, pred))["miou"] == 1.0


def test_superpixel_oracle_hand_case_majority_ties_and_all_ignore():
    sp = np.array([[0, 0, 0, 7, 9, 9], [0, 7, 7, 7, 10**6, 10**6]])  # ids need not be consecutive
    gt = np.array([[2, 2, 1, IGN, 2, 1], [IGN, IGN, IGN, 0, IGN, IGN]], np.uint8)
    expected = np.array(
        [
            [2, 2, 2, 0, 1, 1],  # sp 7: one 0 outvotes three ignores; sp 9 ties -> lowest
            [2, 0, 0, 0, IGN, IGN],
        ],
        np.uint8,
    )
    np.testing.assert_array_equal(metrics.superpixel_oracle(sp, gt), expected)


def test_superpixel_oracle_matches_a_per_superpixel_loop():
    rng = np.random.default_rng(1)
    h, w = 213, 320
    sp = (np.arange(h)[:, None] // 10 * 40 + np.arange(w)[None] // 8).astype(np.int32)  # ~ 880 blocks
    gt = rng.choice(np.array([0, 1, 2, 3, IGN], np.uint8), size=(h, w), p=[0.4, 0.3, 0.1, 0.1, 0.1])
    pred = metrics.superpixel_oracle(sp, gt)
    for s in np.unique(sp)[:60]:
        votes = np.bincount(gt[sp == s][gt[sp == s] != IGN], minlength=4)
        assert (pred[sp == s] == (votes.argmax() if votes.sum() else IGN)).all()


# ---------------------------------------------------------------- reliability curve


def test_reliability_curve_ranks_by_divergence():
    rng = np.random.default_rng(2)
    gt = np.repeat(np.arange(3, dtype=np.uint8), 40)
    rows = []
    for quality in range(10):  # image q has ~q/10 of its pixels wrong and divergence q
        pred = gt.copy()
        wrong = rng.permutation(gt.size)[: quality * gt.size // 10]
        pred[wrong] = (pred[wrong] + 1) % 3
        rows.append((float(quality), metrics.Confusion(3).add(gt, pred)))
    shuffled = [rows[i] for i in rng.permutation(10)]
    curve = metrics.reliability_curve(shuffled, 5)
    assert list(curve.columns) == metrics.CURVE_COLUMNS
    assert curve["k"].tolist() == [2, 4, 6, 8, 10]
    np.testing.assert_allclose(curve["fraction"], [0.2, 0.4, 0.6, 0.8, 1.0])
    assert (np.diff(curve["miou"]) < 0).all()  # adding less reliable images lowers mIoU
    assert curve["miou"].iloc[0] == pytest.approx(
        metrics.confusion_metrics(metrics.sum_confusions([rows[0][1], rows[1][1]], 3))["miou"]
    )
    assert curve["miou"].iloc[-1] == pytest.approx(
        metrics.confusion_metrics(metrics.sum_confusions([c for _, c in rows], 3))["miou"]
    )


def test_reliability_curve_small_sets_and_nan_divergence():
    good = metrics.Confusion(2).add(np.array([0, 1], np.uint8), np.array([0, 1], np.uint8))
    bad = metrics.Confusion(2).add(np.array([0, 1], np.uint8), np.array([1, 0], np.uint8))
    curve = metrics.reliability_curve([(float("nan"), bad), (0.7, good)], 4)  # NaN ranks last
    assert curve["k"].tolist() == [1, 2]
    assert curve["miou"].tolist()[0] == 1.0 and curve["miou"].tolist()[1] < 1.0


def test_annotation_curve_scores_each_annotation_on_its_own_class_per_class_selection():
    # Image "a": class 1 right, class 2 all wrong. Image "b": class 1 half wrong, class 2 right.
    gt_a = np.array([1, 1, 2, 2], np.uint8)
    gt_b = np.array([1, 1, 2, 2], np.uint8)
    conf_a = metrics.Confusion(3).add(gt_a, np.array([1, 1, 0, 0], np.uint8))
    conf_b = metrics.Confusion(3).add(gt_b, np.array([1, 0, 2, 2], np.uint8))
    rows = [(1, 0.1, conf_a), (2, 0.9, conf_a), (1, 0.5, conf_b), (2, 0.2, conf_b)]
    curve = metrics.annotation_curve(rows, 2)
    assert list(curve.columns) == metrics.ANNOTATION_CURVE_COLUMNS
    assert curve["annotations"].tolist() == [2, 4]
    # Half: class 1 keeps image a (IoU 1), class 2 keeps image b (IoU 1): image a's wrong class 2 does
    # not count against its class 1 annotation.
    assert curve["miou"].iloc[0] == pytest.approx(1.0)
    # All: class 1 pools TP 3, FN 1 (IoU 3/4); class 2 pools TP 2, FN 2 (IoU 2/4).
    assert curve["miou"].iloc[1] == pytest.approx((3 / 4 + 2 / 4) / 2)
    # The reverse ranking keeps the two worse annotations first.
    reverse = metrics.annotation_curve([(c, -score, conf) for c, score, conf in rows], 2)
    assert reverse["miou"].iloc[0] == pytest.approx((1 / 2 + 0.0) / 2)
    with pytest.raises(ValueError, match="no annotations"):
        metrics.annotation_curve([], 2)


# ---------------------------------------------------------------- store edge

CLASSES = ["background", "cat", "dog"]


def _write_dataset(tmp_path: Path, has_background: bool):
    """data.zarr + gt.zarr with 3 train images (4x4) and their gt masks."""
    rng = np.random.default_rng(3)
    ids = ["a", "b", "c"]
    masks = {}
    for i in ids:
        m = np.zeros((4, 4), np.uint8)
        m[:2, :2] = 1
        m[2:, 2:] = 2 if i != "c" else 1
        m[0, 3] = IGN
        masks[i] = m
    labels = np.zeros((len(ids), 3), np.uint8)
    for r, i in enumerate(ids):
        labels[r, np.unique(masks[i][masks[i] != IGN])] = 1
    attrs = {"class_names": CLASSES, "has_background": has_background, "ids": ids, "splits": {"train": ids}}
    with store.writing(tmp_path / "data.zarr", "data", store.provenance("test"), attrs) as g:
        for i in ids:
            store.put(g, store.IMAGES, i, rng.integers(0, 255, (4, 4, 3), dtype=np.uint8))
        g.create_array("labels", shape=labels.shape, dtype=np.uint8)[...] = labels
    with store.writing(
        tmp_path / "gt.zarr",
        "gt",
        store.provenance("test"),
        {"class_names": CLASSES, "has_background": has_background},
    ) as g:
        for i in ids:
            store.put(g, store.MASKS, i, masks[i])
    return ids, masks


def test_run_evaluate_labels_store_round_trip(tmp_path):
    ids, masks = _write_dataset(tmp_path, has_background=True)
    preds = {i: m.copy() for i, m in masks.items()}
    preds["b"][2:, 2:] = 1  # 4 dog pixels called cat
    preds["c"][:2, :2] = IGN  # 4 unlabelled cat pixels
    with store.writing(tmp_path / "crf.zarr", "labels", store.provenance("test")) as g:
        for i in ids:
            store.put(g, store.LABELS, i, preds[i])
    pd.DataFrame({"id": ids, "image_selected": [True, False, True]}).to_csv(tmp_path / "rel.csv", index=False)

    table = ev.run_evaluate(
        {},
        tmp_path / "data.zarr",
        tmp_path / "gt.zarr",
        tmp_path / "crf.zarr",
        "crf",
        "train",
        tmp_path / "m" / "crf.csv",
        selection_csv=tmp_path / "rel.csv",
        per_image_csv=tmp_path / "m" / "crf_images.csv",
    )
    written = ev.read_tidy(tmp_path / "m" / "crf.csv")
    pd.testing.assert_frame_equal(written, table.astype(written.dtypes.to_dict()))
    expected = metrics.confusion_metrics(metrics.accumulate([(masks[i], preds[i]) for i in ids], 3))
    overall = written[(written["stage"] == "crf") & (written["class"] == "")].set_index("metric")["value"]
    assert overall["miou"] == pytest.approx(expected["miou"]) and expected["miou"] < 1
    assert overall["labelled_fraction"] == pytest.approx(41 / 45)  # 15 valid pixels x 3, 4 unlabelled
    assert overall["n_images"] == 3
    selected = written[(written["stage"] == "crf_selected") & (written["class"] == "")].set_index("metric")[
        "value"
    ]
    assert selected["n_images"] == 2 and selected["pixel_acc"] == 1.0  # image b (the errors) not selected
    per_image = pd.read_csv(tmp_path / "m" / "crf_images.csv", dtype={"id": str}).set_index("id")
    assert per_image.loc["a", "miou"] == 1.0 and per_image.loc["b", "miou"] < 1.0
    assert not any(p.name.count(".tmp-") for p in (tmp_path / "m").iterdir())

    ev.run_oracle(
        tmp_path / "data.zarr",
        tmp_path / "gt.zarr",
        _superpixels(tmp_path, ids),
        "train",
        tmp_path / "m" / "oracle.csv",
    )
    pd.DataFrame({"id": ids, "image_score": [0.1, 0.9, 0.2]}).to_csv(tmp_path / "div.csv", index=False)
    curve = ev.run_reliability_curve(
        tmp_path / "gt.zarr", tmp_path / "crf.zarr", tmp_path / "div.csv", tmp_path / "m" / "curve.csv", 3
    )
    assert curve["k"].tolist() == [1, 2, 3] and curve["miou"].iloc[1] == 1.0 and curve["miou"].iloc[2] < 1.0

    combined = ev.combine_metrics(
        [tmp_path / "m" / "crf.csv", tmp_path / "m" / "oracle.csv"], tmp_path / "metrics.csv"
    )
    assert set(combined["stage"]) == {"crf", "crf_selected", "superpixel_oracle"}
    oracle = combined[(combined["stage"] == "superpixel_oracle") & (combined["metric"] == "miou")]
    assert 0 < oracle["value"].iloc[0] < 1.0  # see _superpixels: two cat pixels become background
    assert ev.read_tidy(tmp_path / "metrics.csv").shape == combined.shape


def _superpixels(tmp_path, ids):
    """Superpixels = the four 2x2 quadrants, except the right half of the top-left quadrant is
    merged with the top-right one, so the oracle must mislabel two cat pixels as background."""
    sp = np.array([[0, 1, 1, 1], [0, 1, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]], np.int32)
    with store.writing(tmp_path / "sp.zarr", "superpixels", store.provenance("test")) as g:
        for i in ids:
            store.put(g, store.SUPERPIXELS, i, sp)
    return tmp_path / "sp.zarr"


def _write_scores(tmp_path, ids, masks, fg_only: bool):
    """A scores store with keys cam and spcam: the gt class scores 0.6, other labelled classes 0.1."""
    with store.writing(tmp_path / "scores.zarr", "scores", store.provenance("test")) as g:
        for i in ids:
            present = [c for c in np.unique(masks[i]) if c != IGN and (c > 0 or not fg_only)]
            scores = np.stack([np.where(masks[i] == c, 0.6, 0.1) for c in present]).astype(np.float32)
            for key in (store.CAM, store.SPCAM):
                store.put_scores(g, key, i, scores, present)
    return tmp_path / "scores.zarr"


def test_run_evaluate_cam_scores_with_background_sweeps(tmp_path):
    ids, masks = _write_dataset(tmp_path, has_background=True)
    scores = _write_scores(tmp_path, ids, masks, fg_only=True)
    cfg = {"evaluate": {"background_thresholds": [0.05, 0.3, 0.7]}}
    table = ev.run_evaluate(
        cfg, tmp_path / "data.zarr", tmp_path / "gt.zarr", scores, "spcam", "train", tmp_path / "spcam.csv"
    )
    sweep = pd.read_csv(tmp_path / "spcam_sweep.csv")
    # 0.05: everything foreground; 0.3: exactly the gt; 0.7: everything background.
    np.testing.assert_allclose(sweep["threshold"], [0.05, 0.3, 0.7])
    assert sweep["miou"].iloc[1] == 1.0 and sweep["miou"].iloc[0] < 1 and sweep["miou"].iloc[2] < 1
    overall = table[table["class"] == ""].set_index("metric")["value"]
    # The row's labels use the threshold calibrated without GT (Otsu between the 0.1 and 0.6 modes);
    # the swept optimum is reported beside it.
    assert 0.1 < overall["background_threshold"] < 0.6 and overall["miou"] == 1.0
    assert overall["background_threshold_swept"] == pytest.approx(0.3)
    assert overall["miou_at_swept_threshold"] == 1.0


def test_run_evaluate_cam_scores_without_background_uses_image_labels(tmp_path):
    ids, masks = _write_dataset(tmp_path, has_background=False)
    scores = _write_scores(tmp_path, ids, masks, fg_only=False)
    table = ev.run_evaluate(
        {}, tmp_path / "data.zarr", tmp_path / "gt.zarr", scores, "cam", "train", tmp_path / "cam.csv"
    )
    overall = table[table["class"] == ""].set_index("metric")["value"]
    assert overall["miou"] == 1.0 and overall["labelled_fraction"] == 1.0
    assert not (tmp_path / "cam_sweep.csv").exists()
    with pytest.raises(ValueError, match="none is named like stage 'other'"):
        ev.run_evaluate(
            {}, tmp_path / "data.zarr", tmp_path / "gt.zarr", scores, "other", "train", tmp_path / "x.csv"
        )


def test_run_evaluate_errors_name_the_file(tmp_path):
    ids, masks = _write_dataset(tmp_path, has_background=True)
    with store.writing(tmp_path / "bad.zarr", "labels", store.provenance("test")) as g:
        for i in ids:
            store.put(g, store.LABELS, i, np.full((4, 4), 9, np.uint8))
    with pytest.raises(ValueError, match=r"bad\.zarr: image 'a': prediction holds values \[9\]"):
        ev.run_evaluate(
            {},
            tmp_path / "data.zarr",
            tmp_path / "gt.zarr",
            tmp_path / "bad.zarr",
            "x",
            "train",
            tmp_path / "x.csv",
        )
    pd.DataFrame({"id": ["a"], "image_selected": [True]}).to_csv(tmp_path / "rel.csv", index=False)
    with store.writing(tmp_path / "ok.zarr", "labels", store.provenance("test")) as g:
        for i in ids:
            store.put(g, store.LABELS, i, masks[i])
    with pytest.raises(ValueError, match=r"rel\.csv: no row for 2 evaluated images"):
        ev.run_evaluate(
            {},
            tmp_path / "data.zarr",
            tmp_path / "gt.zarr",
            tmp_path / "ok.zarr",
            "x",
            "train",
            tmp_path / "x.csv",
            selection_csv=tmp_path / "rel.csv",
        )
    with pytest.raises(store.StoreError, match="expected a 'labels' or 'scores' store, found 'gt'"):
        ev.run_evaluate(
            {},
            tmp_path / "data.zarr",
            tmp_path / "gt.zarr",
            tmp_path / "gt.zarr",
            "x",
            "train",
            tmp_path / "x.csv",
        )
    assert not (tmp_path / "x.csv").exists()
