"""What SEAM and the dual-branch network share with CAM/SPN: encoder stage taps, training with exact
resume after a kill, inference into the same score store; and the rows of `weakseg benchmark methods`."""

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

import weakseg.cam.train as cam_train
from weakseg import store
from weakseg.benchmark import METHOD_COLUMNS, map_quality, method_row
from weakseg.cam.infer import run_infer_cam
from weakseg.datasets import open_data
from weakseg.nets.backbones import build_encoder
from weakseg.nets.model_file import load_model_file

# ------------------------------------------------------------------ encoder stages


@pytest.mark.parametrize(
    "name, output_stride", [("efficientnet_lite0", 32), ("efficientnet_lite1", 16), ("resnet50", 32)]
)
def test_stage_ends_are_the_last_layers_at_stride_4_8_16(name, output_stride):
    encoder = build_encoder(name, pretrained=False, output_stride=output_stride).eval()
    layers = len(encoder.layers())
    with torch.no_grad():
        _, tapped = encoder.forward_features(torch.rand(1, 3, 64, 64), taps=range(layers))
    for stride, end, channels in zip((4, 8, 16), encoder.stage_ends, encoder.stage_channels):
        assert tapped[end].shape[1:] == (channels, 64 // stride, 64 // stride), (stride, end)
        nominal_next = 64 // (2 * stride)
        if stride < output_stride:  # the next layer downsamples (unless dilation replaced its stride)
            assert tapped[end + 1].shape[-1] == nominal_next, (stride, end)


def test_forward_features_applies_modules_after_layers_and_taps_before_them():
    encoder = build_encoder("efficientnet_lite0", pretrained=False).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        plain, tapped = encoder.forward_features(x, taps=(3, 5))
        torch.testing.assert_close(plain, encoder.body(x))
        zeroed, tapped_zeroed = encoder.forward_features(
            x, after={5: torch.nn.Identity(), 3: ZeroOut()}, taps=(3, 5)
        )
    torch.testing.assert_close(tapped_zeroed[3], tapped[3])  # the tap holds the output before the module
    assert not torch.allclose(tapped_zeroed[5], tapped[5])  # layers after it see the module's output


class ZeroOut(torch.nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


# ------------------------------------------------------------------ training, resume, inference


def method_config(config: dict, model: str) -> dict:
    return {
        **config,
        "cam": {
            **config["cam"],
            "model": model,
            "log_every": 1,
            "seam": {**config["cam"]["seam"], "pcm_dim": 16},
            "dual": {**config["cam"]["dual"], "dim": 16, "heads": 2, "depth": 2},
        },
    }


@pytest.mark.parametrize("model", ["seam", "dual"])
def test_training_resumes_after_a_kill_to_identical_weights(tmp_path, cam_inputs, monkeypatch, caplog, model):
    config, data, sp = cam_inputs
    config = method_config(config, model)
    reference = load_model_file(cam_train.run_train_cam(config, data, sp, tmp_path / "a"), "cam")
    assert reference["config"]["cam"]["model"] == model
    if model == "dual":  # the model file records what `auto` became on this machine
        assert reference["config"]["cam"]["dual"]["transformer"] == "hybrid"
    log_rows = pd.read_csv(tmp_path / "a" / "train_log.csv")
    assert len(log_rows) == ITERATIONS and log_rows["loss"].notna().all()
    assert {"seam": "loss_er", "dual": "loss_consistency"}[model] in log_rows.columns

    real_loss = cam_train.training_loss

    def loss_dying_after_first_checkpoint(cam_cfg):
        """The job dies in iteration CHECKPOINT_EVERY + 1, after the first checkpoint."""
        compute_loss, calls = real_loss(cam_cfg), []

        def dying(m, batch):
            calls.append(m)
            if len(calls) > CHECKPOINT_EVERY:
                raise SimulatedKill("killed")
            return compute_loss(m, batch)

        return dying

    resumed = killed_then_resumed(
        monkeypatch,
        caplog,
        cam_train,
        "training_loss",
        loss_dying_after_first_checkpoint,
        lambda out: cam_train.run_train_cam(config, data, sp, out),
        tmp_path / "b",
        "cam",
    )
    assert_same_state(resumed["model"], reference["model"])
    initial = load_model_file(
        cam_train.run_train_cam(
            {**config, "cam": {**config["cam"], "iterations": 1}}, data, sp, tmp_path / "c"
        ),
        "cam",
    )
    assert any(not torch.equal(initial["model"][k], reference["model"][k]) for k in reference["model"])


@pytest.mark.parametrize("model", ["seam", "dual"])
def test_inference_writes_the_same_score_store(tmp_path, cam_inputs, model):
    config, data, sp = cam_inputs
    config = method_config(config, model)
    config["cam"]["iterations"] = 2
    model_path = cam_train.run_train_cam(config, data, sp, tmp_path / "cam")
    info, data_group = open_data(data)
    train = info.split("train")
    n = run_infer_cam(config, data, sp, model_path, tmp_path / "scores.zarr", split="train")
    assert n == len(train)
    scores = store.open_store(tmp_path / "scores.zarr", "scores")
    sp_group = store.open_store(sp, "superpixels")
    reached_one = 0
    for image_id in train:
        cam, classes = store.get_scores(scores, store.CAM, image_id)
        spcam, sp_classes = store.get_scores(scores, store.SPCAM, image_id)
        labelled = info.fg_classes[info.label_vector(image_id)[info.fg_classes] > 0]
        assert classes.tolist() == sp_classes.tolist() == labelled.tolist()
        assert cam.shape[1:] == spcam.shape[1:] == store.get(data_group, store.IMAGES, image_id).shape[:2]
        for maps in (
            cam,
            spcam,
        ):  # per class max-normalised: peak 1 (less the epsilon), or 0 without evidence
            peaks = maps.reshape(len(classes), -1).max(1)
            assert np.all(((peaks > 0.9) & (peaks <= 1)) | (peaks == 0)), peaks
            reached_one += int((peaks > 0.99).sum())
        superpixels = store.get(sp_group, store.SUPERPIXELS, image_id)
        for k in np.unique(superpixels)[:10]:  # SP-CAM is constant inside a superpixel
            values = spcam[:, superpixels == k]
            assert np.all(values == values[:, :1])
        probs = store.get_attrs(scores, store.CAM, image_id)["label_probabilities"]
        assert len(probs) == len(classes) and all(0 <= p <= 1 for p in probs)
    assert reached_one > 0
    assert store.ids_in(scores, store.CAM) == sorted(train)  # only the split asked for


# ------------------------------------------------------------------ benchmark rows


def tidy(
    stage: str, miou: float, mean_class_acc: float, over: list[float], recall: list[float]
) -> pd.DataFrame:
    rows = [
        {"stage": stage, "split": "train", "metric": "miou", "class": "", "value": miou},
        {"stage": stage, "split": "train", "metric": "mean_class_acc", "class": "", "value": mean_class_acc},
    ]
    for name, o, r in zip("abc", over, recall):
        rows += [
            {"stage": stage, "split": "train", "metric": "over_activation", "class": name, "value": o},
            {"stage": stage, "split": "train", "metric": "class_acc", "class": name, "value": r},
        ]
    return pd.DataFrame(rows)


def test_map_quality_averages_activation_rates_over_the_classes_present():
    quality = map_quality(tidy("cam", 0.5, 0.6, [0.1, 0.3, np.nan], [0.8, 0.4, np.nan]), "cam")
    assert quality == pytest.approx(
        {"miou": 0.5, "mean_class_acc": 0.6, "over_activation": 0.2, "under_activation": 0.4}
    )  # (0.2 + 0.6) / 2; the absent class skipped


def test_method_row_has_every_column():
    timing = {
        "iterations": 10,
        "train_s": 5.0,
        "infer_ms_per_image": 20.0,
        "infer_images": 4,
        "infer_scales": "1.0",
    }
    metrics = {
        stage: tidy(stage, 0.1 * i, 0.5, [0.1, 0.2, 0.3], [0.9, 0.8, 0.7])
        for i, stage in enumerate(("cam", "spcam", "crf"), 1)
    }
    row = method_row("seam", timing, metrics)
    assert list(row) == METHOD_COLUMNS
    assert row["cam_miou"] == pytest.approx(0.1) and row["spcam_miou"] == pytest.approx(0.2)
    assert row["crf_miou"] == pytest.approx(0.3) and row["cam_under_activation"] == pytest.approx(0.2)
    assert row["method"] == "seam" and row["train_s"] == 5.0


def test_inference_refuses_weights_of_another_network_in_one_line(tmp_path, cam_inputs):
    """A model file whose weights are not those of the network its config describes (here: SEAM weights
    under a plain CAM config) is refused naming the file and the difference, not with torch's key lists."""
    from weakseg.nets.model_file import ModelFileError

    config, data, sp = cam_inputs
    seam = method_config(config, "seam")
    seam["cam"]["iterations"] = 1
    model_path = cam_train.run_train_cam(seam, data, sp, tmp_path / "cam")
    ckpt = torch.load(model_path, map_location="cpu", weights_only=True)
    ckpt["config"]["cam"]["model"] = "cam"
    torch.save(ckpt, tmp_path / "mislabelled.pt")
    with pytest.raises(ModelFileError, match="weights do not fit the 'cam'") as raised:
        run_infer_cam(config, data, sp, tmp_path / "mislabelled.pt", tmp_path / "scores.zarr")
    assert "mislabelled.pt" in str(raised.value) and "\n" not in str(raised.value)
    assert not (tmp_path / "scores.zarr").exists()
