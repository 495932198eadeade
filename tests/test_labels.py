"""The score -> label rules (weakseg.labels): argmax over labels, the calibrated background rule, bands."""

from __future__ import annotations

import numpy as np
import pytest

from weakseg import labels as lr
from weakseg.datasets import IGNORE as IGN


def test_threshold_background_is_inclusive_and_keeps_channel_classes():
    scores = np.array(
        [
            [[0.05, 0.15, 0.30, 0.10]],  # class 3
            [[0.00, 0.10, 0.20, 0.60]],
        ],
        np.float32,
    )  # class 1
    classes = np.array([3, 1])
    np.testing.assert_array_equal(lr.threshold_background(scores, classes, 0.2), [[0, 0, 3, 1]])
    np.testing.assert_array_equal(lr.threshold_background(scores, classes, 0.15), [[0, 3, 3, 1]])


def test_background_only_image_is_all_background():
    empty = np.zeros((0, 2, 2), np.float32)
    np.testing.assert_array_equal(lr.threshold_background(empty, np.zeros(0, int), 0.3), np.zeros((2, 2)))
    # An image labelled background only (empty foreground label set) under every rule.
    scores = np.full((2, 2, 2), 0.9, np.float32)
    assert (lr.decide(scores, [1, 2], [0], True, 0.3) == 0).all()
    assert (lr.confident_labels(scores, [1, 2], [0], 0.3, lr.Background(True, 0.3, 0.5)) == 0).all()
    probs, classes = lr.with_background(scores, [1, 2], [0], True, 0.3)
    assert classes.tolist() == [0] and (probs == 1).all()


def test_argmax_over_labels_uses_only_the_image_labels():
    scores = np.array([[[0.2, 0.9]], [[0.9, 0.1]], [[0.5, 0.3]]], np.float32)  # classes 0, 1, 2
    classes = np.array([0, 1, 2])
    np.testing.assert_array_equal(lr.argmax_scores(scores, classes), [[1, 0]])
    np.testing.assert_array_equal(lr.argmax_over_labels(scores, classes, [0, 2], False, None), [[2, 0]])
    np.testing.assert_array_equal(lr.argmax_over_labels(scores, classes, [5], False, None), [[IGN, IGN]])
    # Segmentation probabilities: background (0) is a channel and competes, no threshold involved.
    np.testing.assert_array_equal(lr.decide(scores, classes, [0, 2], True, None), [[2, 0]])
    with pytest.raises(ValueError, match="class"):
        lr.argmax_scores(scores, np.array([0, 1]))
    with pytest.raises(ValueError, match="threshold"):
        lr.decide(scores[1:], [1, 2], [0, 1], True, None)


@pytest.mark.parametrize("threshold", [0.1, 0.3, 0.5, 0.8, 0.95])
def test_background_score_crosses_the_best_class_score_at_the_threshold(threshold):
    peak = np.linspace(0, 1, 1001, dtype=np.float32)
    background = lr.background_score(peak, threshold)
    assert np.all(np.diff(background) <= 0)
    assert lr.background_score(np.float32(threshold), threshold) == pytest.approx(threshold, rel=1e-4)
    below, above = peak < threshold - 1e-3, peak > threshold + 1e-3
    assert (background[below] > peak[below]).all() and (background[above] < peak[above]).all()


def test_crf_channels_and_the_dense_rule_make_the_same_decision():
    rng = np.random.default_rng(0)
    scores = rng.uniform(0, 1, (3, 20, 30)).astype(np.float32)
    classes, image_labels = np.array([2, 5, 7]), np.array([0, 2, 7])
    for threshold in (0.2, 0.5, 0.85):
        channels, channel_classes = lr.with_background(scores, classes, image_labels, True, threshold)
        assert channel_classes.tolist() == [0, 2, 7]
        np.testing.assert_array_equal(
            channel_classes[channels.argmax(0)], lr.decide(scores, classes, image_labels, True, threshold)
        )


def _two_region_maps(background_level, object_level, rng, n_images=12):
    """Score maps of images with one object on background; the scores of each region are drawn from
    the given (low, high) ranges. Returns [(scores, classes, labels, gt)]."""
    items = []
    for _ in range(n_images):
        gt = np.zeros((24, 32), np.uint8)
        top, left = rng.integers(0, 12), rng.integers(0, 16)
        gt[top : top + 10, left : left + 14] = 3
        scores = np.where(
            gt == 3, rng.uniform(*object_level, gt.shape), rng.uniform(*background_level, gt.shape)
        )
        items.append((scores[None].astype(np.float32), np.array([3]), np.array([0, 3]), gt))
    return items


def test_calibrated_threshold_adapts_to_two_score_distributions():
    """A sharp CAM (background near 0) and an over-activating one (background up to 0.6) need different
    thresholds; the calibrated rule finds each from the scores alone, a constant cannot serve both."""
    rng = np.random.default_rng(1)
    sharp = _two_region_maps((0.0, 0.2), (0.45, 1.0), rng)
    blurry = _two_region_maps((0.35, 0.6), (0.75, 1.0), rng)
    for items, (low, high) in ((sharp, (0.2, 0.45)), (blurry, (0.6, 0.75))):
        histogram = sum(lr.top_score_histogram(s, c, lab) for s, c, lab, _ in items)
        threshold = lr.calibrate_threshold(histogram, "otsu", 0.5)
        assert low < threshold < high, threshold
        for scores, classes, image_labels, gt in items:
            np.testing.assert_array_equal(lr.decide(scores, classes, image_labels, True, threshold), gt)
    # One constant for both: right for one distribution, wrong for the other.
    for constant in (0.3, 0.5, 0.7):
        errors = [
            sum(int((lr.decide(s, c, lab, True, constant) != gt).sum()) for s, c, lab, gt in items)
            for items in (sharp, blurry)
        ]
        assert max(errors) > 0
    assert lr.calibrate_threshold(np.ones(lr.LEVELS), "fixed", 0.42) == 0.42
    with pytest.raises(ValueError, match="pseudo.background.method"):
        lr.calibrate_threshold(np.ones(lr.LEVELS), "guess", 0.5)


def test_running_threshold_is_the_fixed_one_until_scores_are_counted_and_masks_leave_out_padding():
    assert lr.running_threshold(np.zeros(lr.LEVELS), "otsu", 0.42) == 0.42
    hist = np.zeros(lr.LEVELS)
    hist[25], hist[200] = 100, 50
    assert lr.running_threshold(hist, "otsu", 0.42) == lr.otsu_threshold(hist)
    scores = np.full((1, 2, 3), 0.5, np.float32)
    mask = np.array([[True, False, False], [False, False, False]])
    counted = lr.top_score_histogram(scores, [3], [3], mask)
    assert counted.sum() == 1 and counted[round(0.5 * (lr.LEVELS - 1))] == 1


def test_otsu_threshold_edge_cases():
    # Two single levels: the threshold lies midway between them, not against either.
    hist = np.zeros(lr.LEVELS)
    hist[25], hist[200] = 100, 50
    assert lr.otsu_threshold(hist) == pytest.approx((26 + 200) / 2 / 255)
    one = np.zeros(lr.LEVELS)
    one[128] = 7
    assert 0 < lr.otsu_threshold(one) <= 1
    with pytest.raises(ValueError):
        lr.otsu_threshold(np.zeros(lr.LEVELS))
    # Images without a labelled channel add nothing to the histogram.
    assert lr.top_score_histogram(np.zeros((0, 4, 4)), np.zeros(0, int), [0]).sum() == 0


def test_uncertain_band_around_the_threshold():
    assert lr.uncertain_band(0.4, 0.0) == (0.4, 0.4)
    low, high = lr.uncertain_band(0.4, 0.5)
    assert low == pytest.approx(0.2) and high == pytest.approx(0.7)
    scores = np.array([[[0.1, 0.2, 0.3, 0.69, 0.7, 0.9]]], np.float32)
    labels = lr.confident_labels(
        scores, [4], [0, 4], 0.99, lr.Background(True, 0.4, 0.5)
    )  # confidence unused here
    assert labels[0].tolist() == [0, 0, IGN, IGN, 4, 4]


def test_predicted_labels_threshold_and_background():
    np.testing.assert_array_equal(lr.predicted_labels([0.2, 0.7, 0.4], [1, 2, 3], 0.5, True), [0, 2])
    np.testing.assert_array_equal(
        lr.predicted_labels([0.2, 0.3], [1, 2], 0.5, False), [2]
    )  # at least the best


def test_triangle_threshold_sits_past_a_dominant_low_mode():
    # A large background mode at 0.1 decaying to 0.3, a small flat object tail 0.3..1.
    hist = np.zeros(lr.LEVELS)
    levels = np.arange(lr.LEVELS) / (lr.LEVELS - 1)
    hist += 1000 * np.exp(-(((levels - 0.1) / 0.05) ** 2))
    hist[levels > 0.3] += 5
    t = lr.triangle_threshold(hist)
    assert 0.15 < t < 0.35, t
    assert lr.calibrate_threshold(hist, "triangle", 0.5) == t


def test_agreement_keeps_equal_labels_only():
    first = np.array([[0, 1, 2, IGN]], np.uint8)
    second = np.array([[0, 2, 2, IGN]], np.uint8)
    assert lr.agreement(first, second).tolist() == [[0, IGN, 2, IGN]]
    with pytest.raises(ValueError, match="shapes"):
        lr.agreement(first, second[:, :3])
