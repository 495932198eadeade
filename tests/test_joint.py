"""One-stage training (weakseg.joint): the dense energy loss, the annealed threshold, PAR, the mined
labels, and the joint network's training (exact resume after a kill) and model file (a segmenter)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from test_training import (  # noqa: F401
    CHECKPOINT_EVERY,
    ITERATIONS,
    SimulatedKill,
    assert_same_state,
    cam_inputs,
    killed_then_resumed,
)

import weakseg.joint.train as joint_train
from weakseg.config import load
from weakseg.datasets import IGNORE
from weakseg.joint.losses import class_centre_loss, dense_energy_loss
from weakseg.joint.mining import ReliableJob, annealed_labels, annealed_threshold, par, reliable_job
from weakseg.joint.model import ReweightedAggregation
from weakseg.labels import BACKGROUND, Background
from weakseg.nets.model_file import load_model_file
from weakseg.segment.predict import load_segmenter, predict_probabilities

# ------------------------------------------------------------------ dense energy loss


def two_region_image(height=12, width=16, split=8) -> torch.Tensor:
    """(1, 3, H, W) RGB 0..255: red left of column ``split``, blue from it on."""
    image = torch.zeros(1, 3, height, width)
    image[:, 0, :, :split] = 200.0
    image[:, 2, :, split:] = 200.0
    return image


def one_hot(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, n_classes).permute(0, 3, 1, 2).float()


def energy(probs, image, weight=None):
    weight = torch.ones(probs.shape[0], *probs.shape[-2:]) if weight is None else weight
    return float(dense_energy_loss(probs, image, weight, sigma_xy=2.0, sigma_rgb=10.0, radius=2))


def test_energy_is_zero_for_a_one_hot_prediction_constant_inside_each_colour_region():
    image = two_region_image()
    constant = torch.zeros(1, 12, 16, dtype=torch.long)
    assert energy(one_hot(constant, 3), image) == 0.0
    # A label per colour region: pairs across the edge differ by 200 in colour, so G is ~0 there.
    regions = constant.clone()
    regions[:, :, 8:] = 2
    assert energy(one_hot(regions, 3), image) < 1e-12


def test_energy_grows_with_label_disagreement_between_similar_neighbours():
    image = two_region_image()
    labels = torch.zeros(1, 12, 16, dtype=torch.long)
    labels[:, :, 8:] = 1
    values = []
    for flipped_rows in (0, 2, 4, 6):  # ever more of the red region labelled like the blue one, in stripes
        noisy = labels.clone()
        noisy[:, 0 : 2 * flipped_rows : 2, :8] = 1
        values.append(energy(one_hot(noisy, 2), image))
    assert values[0] < 1e-12
    assert all(a < b for a, b in zip(values, values[1:])), values
    # Soft disagreement counts too: a 50/50 pixel among confident neighbours costs energy.
    soft = one_hot(labels, 2)
    soft[:, :, 5, 3] = 0.5
    assert energy(soft, image) > 0.0


def test_energy_counts_only_the_pixels_of_the_soft_filter_and_has_a_gradient():
    image = two_region_image()
    logits = torch.randn(1, 3, 12, 16, requires_grad=True)
    weight = torch.zeros(1, 12, 16)
    assert float(dense_energy_loss(logits.softmax(1), image, weight, 2.0, 10.0, 2).detach()) == 0.0
    weight[:, :6] = 1.0
    loss = dense_energy_loss(logits.softmax(1), image, weight, 2.0, 10.0, 2)
    loss.backward()
    assert float(loss.detach()) > 0.0 and float(logits.grad.abs().sum()) > 0.0


def test_centre_loss_is_zero_for_separated_class_clusters_and_penalises_mixed_ones():
    """Features that are one direction per class, with the probabilities of those classes: every
    feature sits on its centre and the centres are sqrt(2) apart (beyond margin 1): no loss. The same
    probabilities over features that ignore the classes cost both compactness and separation."""
    labels = torch.zeros(1, 6, 8, dtype=torch.long)
    labels[:, :, 4:] = 1
    probs = one_hot(labels, 2)
    clustered = one_hot(labels, 2).repeat(1, 2, 1, 1)  # 4 channels, 2 per class
    assert float(class_centre_loss(clustered, probs, margin=1.0)) == pytest.approx(0.0, abs=1e-6)
    mixed = torch.randn(1, 4, 6, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    loss = class_centre_loss(mixed, probs, margin=1.0)
    assert float(loss.detach()) > 0.1
    loss.backward()
    assert mixed.grad.abs().sum() > 0
    # Two classes with the same features: their centres coincide, which costs the whole margin.
    same = torch.ones(1, 4, 6, 8)
    assert float(class_centre_loss(same, probs, margin=1.0)) == pytest.approx(1.0, abs=1e-5)
    # A class with (almost) no probability mass is not present and is not pushed away from the others.
    absent = one_hot(torch.zeros(1, 6, 8, dtype=torch.long), 2)
    assert float(class_centre_loss(same, absent, margin=1.0)) == pytest.approx(0.0, abs=1e-5)


def test_rfam_reweights_its_levels_per_channel():
    """R-FAM's level weights are a softmax over the levels; when they favour one level, the others do
    not reach the output."""
    torch.manual_seed(0)
    aggregate = ReweightedAggregation((3, 5, 7), channels=4).eval()
    levels = [torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4, 4), torch.randn(2, 7, 4, 4)]
    weights = aggregate.level_weights([p(x) for p, x in zip(aggregate.project, levels)])
    assert weights.shape == (2, 3, 4, 1, 1)
    torch.testing.assert_close(weights.sum(1), torch.ones(2, 4, 1, 1))
    assert aggregate(levels).shape == (2, 4, 4, 4)
    with torch.no_grad():  # all weight on the middle level (stride 16)
        aggregate.reweight[-1].weight.zero_()
        aggregate.reweight[-1].bias.copy_(torch.tensor([-50.0] * 4 + [50.0] * 4 + [-50.0] * 4))
    before = aggregate(levels)
    changed = [levels[0] * 3 + 1, levels[1], levels[2] - 2]
    # The pooled context sees only the reweighted sum, so changing the ignored levels changes nothing.
    torch.testing.assert_close(aggregate(changed), before, atol=1e-5, rtol=0)
    assert not torch.allclose(aggregate([levels[0], levels[1] * 2, levels[2]]), before)


def test_joint_network_with_the_rrm_head_gives_logits_and_features_of_both_sub_branches():
    from weakseg.joint.model import build_joint_network

    cam_cfg = {**load({})["cam"], "model": "cam", "pretrained": False}
    model = build_joint_network(cam_cfg, n_classes=4, has_background=True, head_channels=8, head="rrm").eval()
    out = model.train_outputs(torch.rand(2, 3, 64, 48))
    assert out["seg"].shape == (2, 4, 4, 3) and out["seg_features"].shape == (2, 16, 4, 3)
    assert out["cam"].shape == (2, 3, 4, 3)
    assert model(torch.rand(1, 3, 64, 48))["logits"].shape == (1, 4, 64, 48)
    with pytest.raises(ValueError, match="expected input"):
        model.train_outputs(torch.rand(2, 1, 64, 48))


def test_the_miner_calibrates_background_on_recent_batches():
    """The rrm miner's threshold comes from the decayed histogram of the batches' own CAM scores: after
    the CAMs change from sharp to over-activating, the threshold moves with them."""
    from weakseg.joint.train import LabelMiner

    config = load({})
    histogram = torch.zeros(256, dtype=torch.float64)
    miner = LabelMiner(config, np.array([1, 2]), True, None, histogram)
    assert miner.background_threshold() == config["pseudo"]["background"]["threshold"]
    rng = np.random.default_rng(0)

    def batch_of(background, objects):
        scores = np.zeros((4, 2, 16, 16), np.float32)
        scores[:, 0] = rng.uniform(*background, (4, 16, 16))
        scores[:, 0, 4:12, 4:12] = rng.uniform(*objects, (4, 8, 8))
        valid = np.ones((4, 16, 16), bool)
        valid[:, :, 14:] = False
        return scores, valid, {"image_labels": [np.array([0, 1])] * 4}

    for _ in range(30):
        miner.count_scores(*batch_of((0.0, 0.2), (0.45, 1.0)))
    assert 0.2 < miner.background_threshold() < 0.45
    for _ in range(60):
        miner.count_scores(*batch_of((0.35, 0.6), (0.75, 1.0)))
    assert 0.6 < miner.background_threshold() < 0.75
    # The miner writes into the tensor it was given: the model's buffer, saved with the checkpoints.
    assert histogram.sum() > 0


# ------------------------------------------------------------------ annealed threshold


@pytest.mark.parametrize("start, end", [(0.7, 0.55), (0.65, 0.55), (0.3, 0.6)])
def test_annealed_threshold_runs_from_start_to_end_monotonically(start, end):
    total = 50
    values = [annealed_threshold(t, total, start, end) for t in range(total + 1)]
    assert values[0] == pytest.approx(start) and values[-1] == pytest.approx(end)
    steps = np.diff(values)
    assert np.all(steps * np.sign(end - start) >= 0), "not monotone"
    assert values[total // 2] == pytest.approx((start + end) / 2)  # cosine: half-way at t = T / 2
    assert annealed_threshold(total + 10, total, start, end) == pytest.approx(end)  # clipped


# ------------------------------------------------------------------ PAR


def test_par_keeps_a_map_that_follows_the_image_edges_and_moves_one_that_does_not():
    image = two_region_image(16, 24, 12) / 255.0
    following = torch.zeros(1, 1, 16, 24)
    following[..., :12] = 1.0  # the red region
    refined = par(image, following, dilations=(1, 2, 4), iterations=10)
    assert float((refined - following).abs().max()) < 0.02

    crossing = torch.zeros(1, 1, 16, 24)
    crossing[..., :8] = 1.0  # stops 4 columns short of the colour edge
    moved = par(image, crossing, dilations=(1, 2, 4), iterations=10)
    assert float((moved - crossing).abs().max()) > 0.3
    # The map spreads inside its colour region, towards the edge, and hardly across it.
    assert float(moved[..., 8:12].mean()) > 0.3
    assert float(moved[..., 12:].max()) < 0.05


def test_par_keeps_a_constant_map_constant():
    image = torch.rand(2, 3, 10, 10)
    maps = torch.full((2, 2, 10, 10), 0.4)
    torch.testing.assert_close(par(image, maps), maps)


# ------------------------------------------------------------------ mined labels


def test_annealed_labels_split_confident_uncertain_and_sure_background():
    scores = np.array([[[0.9, 0.6, 0.3, 0.1]], [[0.2, 0.1, 0.2, 0.05]]], np.float32)  # (K=2, 1, 4)
    classes = np.array([1, 2])
    with_bg = annealed_labels(scores, classes, [0, 1, 2], True, threshold=0.55, low=0.25)
    assert with_bg.tolist() == [[1, 1, IGNORE, BACKGROUND]]
    # A lower (later) threshold labels more foreground.
    assert annealed_labels(scores, classes, [0, 1, 2], True, 0.25, 0.2).tolist() == [[1, 1, 1, BACKGROUND]]
    # Without a background class only the confident side exists; unlabelled classes never compete.
    no_bg = annealed_labels(scores, classes, [2], False, threshold=0.15, low=0.1)
    assert no_bg.tolist() == [[2, IGNORE, 2, IGNORE]]


def test_reliable_job_keeps_crf_labels_that_agree_with_confident_scores_and_ignores_padding():
    height, width = 8, 12
    image = np.zeros((height, width, 3), np.uint8)
    image[:, :6] = (200, 0, 0)
    image[:, 6:] = (0, 0, 200)
    scores = np.zeros((2, height, width), np.float32)
    scores[0, :, :6], scores[1, :, 6:] = 0.9, 0.9
    scores[0, :, 4:6] = 0.2  # weak but right: the CRF keeps class 0 on the red side, confidence does not
    valid = np.ones((height, width), bool)
    valid[:, -1] = False
    crf = {
        "iterations": 5,
        "gaussian_sxy": 1,
        "gaussian_compat": 3,
        "bilateral_sxy": 5,
        "bilateral_srgb": 10,
        "bilateral_compat": 5,
        "unary_floor": 1e-5,
    }
    job = ReliableJob(image, scores, np.array([0, 1]), np.array([0, 1]), valid, Background(False), crf, 0.5)
    labels = reliable_job(job)
    assert (labels[:, :4] == 0).all() and (labels[:, 6:-1] == 1).all()
    assert (labels[:, 4:6] == IGNORE).all()  # CRF label 0, but the score is not confident
    assert (labels[:, -1] == IGNORE).all()  # padding of the training view


# ------------------------------------------------------------------ training, resume, model file


def joint_config(config: dict, method: str, head: str = "plain", bcd_weight: float = 0.0) -> dict:
    return {
        **config,
        "cam": {**config["cam"], "model": "cam", "log_every": 1},
        "joint": {
            **config["joint"],
            "enabled": True,
            "method": method,
            "iterations": ITERATIONS,
            "warmup": 1,
            "head_channels": 8,
            "head": head,
            "label_stride": 2,
            "rrm": {**config["joint"]["rrm"], "bcd": {"weight": bcd_weight, "margin": 1.0}},
        },
    }


@pytest.mark.parametrize(
    "method, head, bcd_weight", [("annealed", "plain", 0.0), ("rrm", "plain", 0.0), ("rrm", "rrm", 0.1)]
)
def test_joint_training_resumes_after_a_kill_to_identical_weights(
    tmp_path, cam_inputs, monkeypatch, caplog, method, head, bcd_weight
):
    config, data, sp = cam_inputs
    config = joint_config(config, method, head, bcd_weight)
    reference_path = joint_train.run_train_joint(config, data, sp, tmp_path / "a")
    reference = load_model_file(reference_path, "segment")
    assert reference["config"]["segment"]["model"] == "joint"
    log_rows = pd.read_csv(tmp_path / "a" / "train_log.csv")
    assert len(log_rows) == ITERATIONS
    assert log_rows["loss_seg"].iloc[0] == 0.0 and (log_rows["loss_seg"].iloc[1:] > 0).all()  # warm-up
    assert (log_rows["labelled"].iloc[1:] > 0).all()
    if method == "rrm":
        assert (log_rows["loss_energy"].iloc[1:] > 0).all()
        # The synthetic dataset has a background class: the threshold is calibrated on the batches' CAMs
        # (Otsu by default), so it leaves the fixed fallback once labels are mined.
        assert log_rows["bg_threshold"].iloc[0] == config["pseudo"]["background"]["threshold"]
        assert log_rows["bg_threshold"].iloc[1:].between(0, 1).all()
        assert (log_rows["bg_threshold"].iloc[1:] != config["pseudo"]["background"]["threshold"]).any()
        assert ("loss_bcd" in log_rows) == (bcd_weight > 0)
        if bcd_weight > 0:
            assert (log_rows["loss_bcd"].iloc[1:] > 0).all()
    else:
        assert log_rows["threshold"].is_monotonic_decreasing

    real_loss, calls = joint_train.multilabel_loss, []

    def dying(*args):
        calls.append(1)
        if len(calls) > CHECKPOINT_EVERY:
            raise SimulatedKill("killed")
        return real_loss(*args)

    resumed = killed_then_resumed(
        monkeypatch,
        caplog,
        joint_train,
        "multilabel_loss",
        dying,
        lambda out: joint_train.run_train_joint(config, data, sp, out),
        tmp_path / "b",
        "segment",
    )
    assert_same_state(resumed["model"], reference["model"])

    # The model file is a segmenter: prediction rebuilds it from the file alone, with the mined prior.
    model, _ = load_segmenter(reference_path, "cpu", reference["class_names"])
    prior = model.label_prior.numpy()
    assert prior.sum() == pytest.approx(1.0) and not np.allclose(prior, prior[0])
    image = (np.random.default_rng(0).random((40, 52, 3)) * 255).astype(np.uint8)
    probs = predict_probabilities(model, image, [1.0], True, "cpu")
    assert probs.shape == (len(reference["class_names"]), 40, 52)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)


def test_joint_training_refuses_a_head_that_does_not_share_the_encoder(tmp_path, cam_inputs):
    from weakseg.config import ConfigError

    config, data, sp = cam_inputs
    config = joint_config(config, "annealed")
    config["cam"]["model"] = "seam"
    with pytest.raises(ConfigError, match="cam.model"):
        joint_train.run_train_joint(config, data, sp, tmp_path / "a")


# ------------------------------------------------------------------ benchmark rows


def test_two_step_row_sums_the_jobs_up_to_round_1_and_reads_its_rows(tmp_path):
    from weakseg.joint.benchmark import JOINT_COLUMNS, two_step_row

    assert two_step_row(tmp_path, "train", "val") is None  # no finished run
    rows = [
        ("reliable", "train", 0.6, 0.7, 0.8),
        ("round1", "val", 0.5, 0.75, 1.0),
        ("round2", "val", 0.1, 0.1, 1.0),
    ]
    tidy = [
        {"stage": s, "split": sp, "metric": m, "class": "", "value": v}
        for s, sp, miou, mca, lab in rows
        for m, v in (("miou", miou), ("mean_class_acc", mca), ("labelled_fraction", lab))
    ]
    pd.DataFrame(tidy).to_csv(tmp_path / "metrics.csv", index=False)
    (tmp_path / "benchmarks").mkdir()
    seconds = {
        "train_cam": 10,
        "infer_cam": 20,
        "crf": 3,
        "reliable": 1,
        "reliability": 1,
        "train_seg_round1": 30,
    }
    seconds.update({"predict_seg_round1_val": 5, "train_seg_round2": 1000, "predict_seg_round1_train": 1000})
    for job, s in seconds.items():
        (tmp_path / "benchmarks" / f"{job}.tsv").write_text(f"s\tmax_rss\n{s}\t100\n")
    row = two_step_row(tmp_path, "train", "val")
    assert list(row) == JOINT_COLUMNS
    assert row["train_s"] == 70  # round 2 and round 1's train prediction are not on round 1's val path
    assert (row["train_miou"], row["train_labelled"], row["val_miou"], row["val_mean_class_acc"]) == (
        0.6,
        0.8,
        0.5,
        0.75,
    )
