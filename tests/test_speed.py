"""The fast paths give what the reference paths give: inference stores, cached training features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_training import CHECKPOINT_EVERY, ITERATIONS, cam_inputs  # noqa: F401

import weakseg.cam.train as cam_train
from weakseg import store
from weakseg.cam.infer import image_scores, run_infer_cam
from weakseg.cam.models import build_classifier
from weakseg.datasets import open_data, read_image
from weakseg.nets.model_file import load_model_file

QUANTUM = 1 / 255  # score stores hold uint8


def test_infer_cam_store_equals_the_reference_path(tmp_path, cam_inputs):
    """run_infer_cam (channels-last network, only the kept classes upsampled and pooled) writes the
    store the reference path gives: every class computed on the plain network, then the kept ones."""
    config, data, sp = cam_inputs
    config = {**config, "cam": {**config["cam"], "infer_scales": [1.0, 0.75], "spcam_merge": "mean"}}
    model_path = cam_train.run_train_cam(config, data, sp, tmp_path / "cam")
    run_infer_cam(config, data, sp, model_path, tmp_path / "scores.zarr")
    ckpt = load_model_file(model_path, "cam")
    info, data_group = open_data(data)
    reference = build_classifier({**ckpt["config"]["cam"], "pretrained": False}, len(info.fg_classes))
    reference.load_state_dict(ckpt["model"])
    reference.eval()
    scores = store.open_store(tmp_path / "scores.zarr", "scores")
    sp_group = store.open_store(sp, "superpixels")
    train, fg = set(info.split("train")), info.fg_classes
    peaks, kept_fewer = 0, 0
    for image_id in info.ids:
        cam, spcam, probs = image_scores(
            reference,
            read_image(data_group, image_id),
            store.get(sp_group, store.SUPERPIXELS, image_id),
            [1.0, 0.75],
            True,
            torch.device("cpu"),
            "mean",
        )
        keep = np.flatnonzero(info.label_vector(image_id)[fg]) if image_id in train else np.arange(len(fg))
        kept_fewer += len(keep) < len(fg)
        for key, maps in ((store.CAM, cam), (store.SPCAM, spcam)):
            stored, classes = store.get_scores(scores, key, image_id)
            assert classes.tolist() == fg[keep].tolist()
            np.testing.assert_allclose(stored, maps[keep].numpy(), atol=QUANTUM + 1e-4, rtol=0)
            peaks += int((stored.reshape(len(keep), -1).max(1) > 0.99).sum())
        stored_probs = store.get_attrs(scores, store.CAM, image_id)["label_probabilities"]
        np.testing.assert_allclose(stored_probs, probs[keep].numpy(), atol=1e-4, rtol=0)
    assert peaks > 0 and kept_fewer > 0  # real maps, and images whose classes were left out


def test_predict_store_equals_the_reference_path(tmp_path):
    """run_predict_store (channels-last network) writes what predict_probabilities gives on the plain network."""
    from test_segment_models import N_CLASSES, save_checkpoint

    from weakseg import config as wconfig
    from weakseg.datasets.folder import ingest
    from weakseg.datasets.synthetic import class_names, write_folder
    from weakseg.segment.predict import predict_probabilities, run_predict_store

    config = wconfig.load(
        {
            "device": "cpu",
            "dataset": {
                "synthetic": {"n_train": 3, "n_val": 2, "height": 32, "width": 40, "n_classes": N_CLASSES - 1}
            },
            "segment": {"pretrained": False, "infer_scales": [1.0, 0.75], "infer_flip": True},
        }
    )
    root = write_folder(config["dataset"]["synthetic"], True, tmp_path / "synthetic")
    ingest(root, config["dataset"], tmp_path / "data.zarr", tmp_path / "gt.zarr", store.provenance("test"))
    info, data_group = open_data(tmp_path / "data.zarr")
    net, _ = save_checkpoint(tmp_path / "model.pt", class_names=class_names(N_CLASSES - 1, True))
    net.eval()
    for split in ("train", "val"):
        run_predict_store(
            config, tmp_path / "data.zarr", tmp_path / "model.pt", split, tmp_path / f"{split}.zarr"
        )
        scores = store.open_store(tmp_path / f"{split}.zarr", "scores")
        for image_id in info.split(split):
            stored, classes = store.get_scores(scores, store.SEG, image_id)
            expected = predict_probabilities(
                net, read_image(data_group, image_id), [1.0, 0.75], True, "cpu", classes=classes
            )
            np.testing.assert_allclose(stored, expected, atol=QUANTUM + 1e-4, rtol=0)
            assert float(stored.max()) > 0.3  # not a comparison of empty maps


@pytest.mark.parametrize("factor_layers", [0, 2])
def test_weighted_pooling_gives_the_reference_sp_logits_and_gradients(factor_layers):
    """The bilinear SP branch as one weighted pooling of coarse features: the same logits and the same
    gradients as upsampling the score map and pooling it inside every superpixel, on superpixels that
    are irregular, differ in number between images and include padding (-1)."""
    from weakseg.cam.models import SPN
    from weakseg.nets.backbones import build_encoder

    torch.manual_seed(0)
    model = SPN(
        build_encoder("efficientnet_lite0", pretrained=False),
        5,
        upsample_layers=factor_layers,
        upsampling="bilinear",
    )
    model.train()
    x = torch.rand(3, 3, 48, 80)
    rng = np.random.default_rng(1)
    sp = torch.from_numpy(rng.integers(0, 40, (3, 48, 80)) // np.array([1, 3, 7])[:, None, None]).long()
    sp[1, :, 60:] = -1  # square padding
    sp[2] = 5  # one superpixel
    torch.manual_seed(1)
    fast = model(x, sp)["sp_logits"]
    params = [model.sp_classifier.weight, next(model.encoder.layers()[-1].parameters())]
    fast_grads = torch.autograd.grad(fast.square().sum(), params)

    def reference_logits():
        torch.manual_seed(1)  # the same stochastic depth draws
        model.weighted_pooling = False
        try:
            return model(x, sp)["sp_logits"]
        finally:
            del model.weighted_pooling

    reference = reference_logits()
    reference_grads = torch.autograd.grad(reference.square().sum(), params)
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-5)
    for fast_grad, reference_grad in zip(fast_grads, reference_grads):
        torch.testing.assert_close(fast_grad, reference_grad, rtol=1e-4, atol=1e-6)
        assert float(fast_grad.abs().sum()) > 0


def test_prefetched_batches_are_the_seeded_sequence_and_drawn_during_the_step_before(tmp_path):
    """train_loop draws batch k + 1 while step k computes, in order, from the seeded generator: the
    batches are those of drawing one after the other."""
    import threading

    from test_training import draw_batch, tiny_model

    from weakseg.training import make_optimizer, poly_schedule, train_loop

    drawn, events = [], []
    step_running = threading.Event()

    def next_batch(rng):
        events.append(("draw", len(drawn), step_running.is_set(), threading.current_thread().name))
        batch = draw_batch(rng)
        drawn.append(batch["x"])
        return batch

    def loss(model, batch):
        step_running.set()
        events.append(("step", None, None, None))
        # give the prefetch thread time to draw the next batch while this step "computes"
        deadline = len(events) + 1
        for _ in range(200):
            if len(events) > deadline or len(drawn) == 5:
                break
            threading.Event().wait(0.005)
        out = torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])
        step_running.clear()
        return out, {}

    model = tiny_model()
    optimizer = make_optimizer("adam", [{"params": model.parameters()}], 0.01, 0.0)
    train_loop(
        model=model,
        optimizer=optimizer,
        scheduler=poly_schedule(optimizer, 5),
        next_batch=next_batch,
        compute_loss=loss,
        iterations=5,
        checkpoint_every=5,
        out_dir=tmp_path,
        seed=7,
        desc="prefetch",
    )
    rng = np.random.default_rng(7)
    for batch in drawn:
        torch.testing.assert_close(batch, draw_batch(rng)["x"], rtol=0, atol=0)
    assert len(drawn) == 5  # no batch beyond the last iteration
    draws = [e for e in events if e[0] == "draw"]
    assert all(name.startswith("prefetch") for *_, name in draws)
    assert sum(during for _, _, during, _ in draws[1:]) >= 3  # batches 2..5 mostly drawn during a step


def test_folded_batchnorm_gives_the_same_outputs_without_batchnorm_layers():
    from weakseg.config import load
    from weakseg.nets.backbones import fold_batchnorm
    from weakseg.segment.models import build_segmenter

    torch.manual_seed(0)
    net = build_segmenter(load({"segment": {"pretrained": False}})["segment"], 4, True)
    for module in net.modules():  # running statistics far from the identity, as after training
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
    net.eval()
    x = torch.rand(2, 3, 40, 56)
    with torch.no_grad():
        expected = net(x)["logits"]
        folded = fold_batchnorm(net)
        got = folded(x)["logits"]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.encoder.modules())
    assert float(expected.std()) > 1e-3  # outputs that depend on the input, not a constant
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_name", ["spn", "cam"])
def test_cached_frozen_features_give_the_same_loss_and_gradients(model_name):
    """The training step from the frozen layers' output equals the step on the images for the same
    batch: loss and every trainable parameter's gradient."""
    from weakseg.cam.losses import training_loss
    from weakseg.config import load

    cam_cfg = load(
        {"cam": {"model": model_name, "pretrained": False, "freeze_encoder": 9, "upsampling": "bilinear"}}
    )["cam"]
    torch.manual_seed(0)
    model = build_classifier(cam_cfg, 4)
    # Calibrate every BatchNorm on random images first: at random init the eval-mode frozen layers make
    # vanishing features, which the trainable layers' batch statistics would blow up with float noise.
    batchnorms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for module in batchnorms:
        module.momentum = None
        module.train()
    with torch.no_grad():
        model.encoder.body(torch.rand(6, 3, 64, 64))
    model.train()
    assert model.encoder.frozen_layers == 9
    x = torch.rand(3, 3, 64, 64)
    sp = torch.from_numpy(np.random.default_rng(0).integers(0, 12, (3, 64, 64))).long()
    sp[0, :, 50:] = -1
    y = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 0], [1, 1, 1, 1]])
    compute_loss = training_loss(cam_cfg)
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(batch):
        torch.manual_seed(1)  # the same stochastic depth draws in the trainable blocks
        loss, _ = compute_loss(model, batch)
        return loss, torch.autograd.grad(loss, params)

    loss, grads = loss_and_grads({"x": x, "sp": sp, "y": y})
    frozen = model.frozen_features(x)  # the cache computes each image alone; the same numbers up to rounding
    assert not frozen.requires_grad and frozen.shape[1] != 3  # features, not images
    cached_loss, cached_grads = loss_and_grads({"frozen": frozen, "sp": sp, "y": y})
    torch.testing.assert_close(cached_loss, loss, rtol=1e-6, atol=1e-7)
    assert len(grads) > 4 and all(float(g.abs().sum()) > 0 for g in grads[-2:])
    for cached, reference in zip(cached_grads, grads):
        torch.testing.assert_close(cached, reference, rtol=1e-5, atol=1e-8)


def test_training_with_the_cache_equals_training_that_recomputes_every_variant(
    tmp_path, cam_inputs, caplog, monkeypatch
):
    """A cache large enough for every variant and one that keeps nothing give the same model: cached
    features are exactly what recomputing gives (so a resumed run, whose cache starts empty, matches)."""
    import logging

    from test_training import assert_same_state

    config, data, sp = cam_inputs
    cam = {
        **config["cam"],
        "freeze_encoder": 9,
        "upsampling": "bilinear",
        "iterations": 8,
        "train_offsets": 2,
    }
    config = {**config, "cam": {**cam, "feature_cache_mb": 64}}
    with caplog.at_level(logging.INFO, logger="weakseg"):
        kept = load_model_file(cam_train.run_train_cam(config, data, sp, tmp_path / "kept"), "cam")
    hits = int(caplog.text.split("frozen-feature cache: ")[1].split(" hits")[0])
    assert hits > 0  # 8 batches of 2 over few variants: some are drawn again

    class KeepsNothing(cam_train.FrozenFeatureCache):
        def __init__(self, model, max_bytes):
            super().__init__(model, 0)

    monkeypatch.setattr(cam_train, "FrozenFeatureCache", KeepsNothing)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="weakseg"):
        recomputed = load_model_file(
            cam_train.run_train_cam(config, data, sp, tmp_path / "recomputed"), "cam"
        )
    assert "frozen-feature cache: 0 hits" in caplog.text  # every variant recomputed
    assert "0 variants kept" in caplog.text
    assert_same_state(kept["model"], recomputed["model"])


def test_infer_cam_in_bfloat16_stays_close_to_float32(tmp_path, cam_inputs):
    """cam.infer_precision: bfloat16 changes the scores store by rounding only: same classes, maps that
    differ a little on average, and the same image-level label probabilities to two decimals."""
    config, data, sp = cam_inputs
    model_path = cam_train.run_train_cam(config, data, sp, tmp_path / "cam")
    run_infer_cam(config, data, sp, model_path, tmp_path / "exact.zarr")
    fast_config = {**config, "cam": {**config["cam"], "infer_precision": "bfloat16"}}
    run_infer_cam(fast_config, data, sp, model_path, tmp_path / "fast.zarr")
    exact, fast = (store.open_store(tmp_path / name, "scores") for name in ("exact.zarr", "fast.zarr"))
    info, _ = open_data(data)
    differences = []
    for image_id in info.ids:
        for key in (store.CAM, store.SPCAM):
            (a, classes_a), (b, classes_b) = (
                store.get_scores(exact, key, image_id),
                store.get_scores(fast, key, image_id),
            )
            assert classes_a.tolist() == classes_b.tolist()
            differences.append(np.abs(a - b))
        np.testing.assert_allclose(
            store.get_attrs(fast, store.CAM, image_id)["label_probabilities"],
            store.get_attrs(exact, store.CAM, image_id)["label_probabilities"],
            atol=0.02,
        )
    difference = np.concatenate([d.ravel() for d in differences])
    assert 0 < difference.mean() < 0.02  # bfloat16 did run, and moved the maps by rounding only
