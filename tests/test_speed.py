"""The fast paths give what the reference paths give: inference stores, cached training features."""

from __future__ import annotations

import numpy as np
import torch
from test_training import CHECKPOINT_EVERY, ITERATIONS, cam_inputs  # noqa: F401

import weakseg.cam.train as cam_train
from weakseg import store
from weakseg.cam.infer import image_scores, run_infer_cam
from weakseg.cam.models import build_classifier
from weakseg.datasets import open_data, read_image
from weakseg.training import load_model_file

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
