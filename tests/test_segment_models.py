"""Segmentation networks (DeepLab, DecoupledNet) and prediction: shapes, losses, probabilities, outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from weakseg import config as wconfig
from weakseg import store
from weakseg.datasets import IGNORE, open_data
from weakseg.nets.device import select_device
from weakseg.nets.model_file import save_model
from weakseg.palette import class_palette
from weakseg.segment.models import DecoupledNet, DeepLab, build_segmenter
from weakseg.segment.predict import (
    SEG,
    list_images,
    load_segmenter,
    predict_files,
    predict_probabilities,
    run_predict_store,
)

N_CLASSES = 4
MODELS = ["deeplab", "decoupled"]
CLASS_NAMES = ["background", "a", "b", "c"]


def make_config(model: str = "deeplab", **segment) -> dict:
    return wconfig.load({"device": "cpu", "segment": {"model": model, "pretrained": False, **segment}})


def make_model(model: str, has_background: bool = True, seed: int = 0, n_classes: int = N_CLASSES):
    torch.manual_seed(seed)
    return build_segmenter(make_config(model)["segment"], n_classes, has_background)


def calibrated(net, size: int = 64):
    """Set every BatchNorm's running statistics from one batch. A randomly initialised encoder in eval
    mode (identity BatchNorm) lets activations vanish, and a near-constant network would pass the
    prediction tests trivially."""
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one batch gives its own statistics
    net.train()
    with torch.no_grad():
        net(make_batch(size)[0])
    return net.eval()


def make_batch(size: int = 64, seed: int = 0, has_background: bool = True):
    """Two images whose 16x16 blocks are coloured by class, so that labels are learnable from colour."""
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, N_CLASSES, (2, size // 16, size // 16), generator=gen)
    labels = blocks.repeat_interleave(16, 1).repeat_interleave(16, 2)
    colours = torch.rand(N_CLASSES, 3, generator=gen)
    x = (colours[labels].permute(0, 3, 1, 2) + 0.05 * torch.rand(2, 3, size, size, generator=gen)).clamp(0, 1)
    image_labels = F.one_hot(labels.flatten(1), N_CLASSES).amax(1).float()
    if has_background:
        image_labels[:, 0] = 1.0
    return x, labels, image_labels


# ------------------------------------------------------------------ models


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("has_background", [True, False])
def test_forward_shapes(model, has_background):
    net = make_model(model, has_background).eval()
    n_fg = N_CLASSES - 1 if has_background else N_CLASSES
    with torch.no_grad():
        for height, width in [(64, 64), (45, 61)]:  # odd sizes: outputs still at input resolution
            out = net(torch.rand(2, 3, height, width))
            assert out["logits"].shape == (2, N_CLASSES, height, width)
            assert torch.isfinite(out["logits"]).all()
            if model == "deeplab":
                assert out["cls"] is None
            else:
                assert out["cls"].shape == (2, n_fg)
    assert isinstance(net, DeepLab if model == "deeplab" else DecoupledNet)
    assert net.encoder.stride == 16


def test_output_stride_8_doubles_the_feature_map_and_the_atrous_rates():
    def built(stride):
        seg = wconfig.load({"segment": {"output_stride": stride, "pretrained": False}})["segment"]
        return build_segmenter(seg, N_CLASSES, True).eval()

    x = torch.rand(1, 3, 64, 96)
    coarse, fine = built(16), built(8)
    assert coarse.features(x).shape[-2:] == (4, 6) and fine.features(x).shape[-2:] == (8, 12)
    rates = [[b[0].dilation[0] for b in m.head[0].branches[1:]] for m in (coarse, fine)]
    assert rates == [[6, 12, 18], [12, 24, 36]]
    assert fine(x)["logits"].shape == (1, N_CLASSES, 64, 96)
    # A model file saved before the key existed rebuilds at stride 16.
    legacy = {k: v for k, v in wconfig.load({"segment": {"pretrained": False}})["segment"].items()}
    del legacy["output_stride"]
    assert build_segmenter(legacy, N_CLASSES, True).encoder.stride == 16


def test_decoupled_decodes_labelled_classes_and_background_is_not_any_fg():
    net = calibrated(make_model("decoupled"))
    x, _, image_labels = make_batch()
    image_labels = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 1]], dtype=torch.float32)
    with torch.no_grad():
        out = net(x, image_labels)
    assert out["decoded"].tolist() == [[True, False, False], [False, True, True]]
    scores = out["logits"].exp()
    # an undecoded class scores (almost) nothing, so softmax(logits) gives it no mass
    assert scores[0, 2:].max() < 1e-5 and scores[1, 1].max() < 1e-5
    # background = 1 - max fg score, fg score = sigmoid(mask) * sigmoid(cls)
    fg = torch.sigmoid(out["mask_logits"]) * torch.sigmoid(out["cls"])[:, :, None, None]
    assert torch.allclose(scores[:, 1:], fg.clamp_min(1e-6), atol=1e-6)
    assert torch.allclose(scores[:, 0], (1 - fg.amax(1)).clamp_min(1e-6), atol=1e-6)
    with torch.no_grad():
        full = net(x)
    assert full["decoded"].all()
    assert torch.allclose(full["mask_logits"][0, 0], out["mask_logits"][0, 0], atol=1e-5)


@pytest.mark.parametrize("model", MODELS)
def test_loss_decreases_on_a_fixed_batch(model):
    net = make_model(model).train()
    x, labels, image_labels = make_batch()
    optimizer = torch.optim.Adam(net.param_groups(1e-3, 1.0))
    losses = []
    for _ in range(10):
        loss, parts = net.loss(net(x, image_labels), labels, image_labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        assert parts["loss"] == pytest.approx(loss.item())
    assert losses[-1] < 0.75 * losses[0], losses


@pytest.mark.parametrize(
    "model,has_background", [("deeplab", True), ("decoupled", True), ("decoupled", False)]
)
def test_loss_ignores_255_pixels(model, has_background):
    net = make_model(model, has_background).eval()
    x, labels, image_labels = make_batch(has_background=has_background)
    ignored = torch.zeros_like(labels, dtype=torch.bool)
    ignored[:, :20, :] = True
    labels = labels.masked_fill(ignored, IGNORE)
    with torch.no_grad():
        out = net(x, image_labels)
    # outputs as leaves: the gradient shows which pixels the loss reads
    leaves = {
        k: (v.clone().requires_grad_() if k in ("logits", "mask_logits") else v) for k, v in out.items()
    }
    loss, parts = net.loss(leaves, labels, image_labels)
    loss.backward()
    read = leaves["logits" if model == "deeplab" else "mask_logits"]
    assert read.grad[ignored[:, None].expand_as(read)].abs().max() == 0
    assert read.grad[~ignored[:, None].expand_as(read)].abs().max() > 0
    # changing the network output only at ignored pixels leaves the loss unchanged
    perturbed = dict(out)
    for k in ("logits", "mask_logits"):
        if k in out:
            perturbed[k] = out[k] + 5.0 * ignored[:, None].float()
    assert net.loss(perturbed, labels, image_labels)[0].item() == pytest.approx(loss.item(), abs=1e-6)
    # and equals the loss written out over the labelled pixels
    if model == "deeplab":
        valid = ~ignored
        expected = F.cross_entropy(out["logits"].permute(0, 2, 3, 1)[valid], labels[valid])
        assert parts["ce"] == pytest.approx(expected.item(), rel=1e-5)
    else:
        terms = []
        for b in range(2):
            for k, c in enumerate(range(1 if has_background else 0, N_CLASSES)):
                if image_labels[b, c] > 0:
                    valid = ~ignored[b]
                    target = (labels[b][valid] == c).float()
                    terms.append(
                        F.binary_cross_entropy_with_logits(
                            out["mask_logits"][b, k][valid], target, reduction="none"
                        )
                    )
        assert parts["seg_bce"] == pytest.approx(torch.cat(terms).mean().item(), rel=1e-5)


@pytest.mark.parametrize("model", MODELS)
def test_loss_with_every_pixel_ignored_is_finite_and_backpropagates(model):
    net = make_model(model).train()
    x, labels, image_labels = make_batch()
    loss, _ = net.loss(net(x, image_labels), torch.full_like(labels, IGNORE), image_labels)
    loss.backward()
    assert torch.isfinite(loss)


def test_loss_rejects_out_of_range_pixel_labels():
    net = make_model("deeplab").eval()
    x, labels, image_labels = make_batch()
    labels[0, 0, 0] = N_CLASSES
    with torch.no_grad(), pytest.raises(ValueError, match="pixel labels must be 0..3 or 255"):
        net.loss(net(x), labels, image_labels)


def test_param_groups_split_encoder_and_head():
    net = make_model("decoupled")
    groups = net.param_groups(0.01, 0.1)
    assert [g["lr"] for g in groups] == pytest.approx([0.001, 0.01])
    encoder_ids = {id(p) for p in net.encoder.parameters()}
    assert {id(p) for p in groups[0]["params"]} == encoder_ids
    assert not encoder_ids & {id(p) for p in groups[1]["params"]}
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))


# ------------------------------------------------------------------ prediction


@pytest.mark.parametrize("model", MODELS)
def test_predict_probabilities_are_distributions_and_flip_equivariant(model):
    net = calibrated(make_model(model)).train()
    image = np.random.default_rng(0).integers(0, 256, (45, 61, 3), dtype=np.uint8)
    probs = predict_probabilities(net, image, [0.75, 1.0], True, "cpu")
    assert net.training  # the caller's mode is restored
    assert probs.shape == (N_CLASSES, 45, 61) and probs.dtype == np.float32
    assert probs.min() >= 0 and np.allclose(probs.sum(0), 1.0, atol=1e-5)
    flipped = predict_probabilities(net, np.ascontiguousarray(image[:, ::-1]), [0.75, 1.0], True, "cpu")
    np.testing.assert_allclose(flipped, probs[:, :, ::-1], atol=1e-4)  # float rounding only


@pytest.mark.parametrize("model", MODELS)
def test_flip_averaging_is_what_makes_predictions_equivariant(model):
    net = calibrated(make_model(model))
    image = np.random.default_rng(1).integers(0, 256, (45, 61, 3), dtype=np.uint8)
    plain = predict_probabilities(net, image, [1.0], False, "cpu")
    plain_flipped = predict_probabilities(net, np.ascontiguousarray(image[:, ::-1]), [1.0], False, "cpu")
    assert np.abs(plain_flipped - plain[:, :, ::-1]).max() > 1e-2


def test_predict_probabilities_restricted_to_classes():
    net = calibrated(make_model("deeplab"))
    image = np.random.default_rng(2).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    full = predict_probabilities(net, image, [1.0], False, "cpu")
    part = predict_probabilities(net, image, [1.0], False, "cpu", classes=[0, 2])
    expected = full[[0, 2]] / full[[0, 2]].sum(0, keepdims=True)
    np.testing.assert_allclose(part, expected, atol=1e-5)
    decoupled = predict_probabilities(
        calibrated(make_model("decoupled")), image, [1.0], True, "cpu", classes=[0, 3]
    )
    assert decoupled.shape == (2, 40, 48) and np.allclose(decoupled.sum(0), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="non-empty subset"):
        predict_probabilities(net, image, [1.0], False, "cpu", classes=[])


def save_checkpoint(path, model_name="deeplab", class_names=CLASS_NAMES, has_background=True, **segment):
    config = make_config(model_name, **segment)
    net = calibrated(make_model(model_name, has_background, n_classes=len(class_names)))
    save_model(path, net, config, class_names, has_background, "segment")
    return net, config


def test_predict_files_writes_class_index_pngs(tmp_path):
    import cv2

    net, config = save_checkpoint(tmp_path / "model.pt", "decoupled", infer_scales=[1.0], infer_flip=True)
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    images = {
        "one": rng.integers(0, 256, (40, 52, 3), dtype=np.uint8),
        "two": rng.integers(0, 256, (33, 30, 3), dtype=np.uint8),
    }
    cv2.imwrite(str(folder / "one.png"), images["one"][..., ::-1])
    cv2.imwrite(str(folder / "two.png"), images["two"][..., ::-1])
    (folder / "notes.txt").write_text("not an image, and skipped by its suffix")
    # On the CPU, like the expectation below: this checks the file round trip, not the device.
    written = predict_files(
        tmp_path / "model.pt", [str(folder)], tmp_path / "out", probabilities=True, device="cpu"
    )
    assert [p.name for p in written] == ["one.png", "two.png"]
    for path in written:
        png = Image.open(path)
        assert png.mode == "P"
        np.testing.assert_array_equal(
            np.array(png.getpalette()).reshape(-1, 3)[:N_CLASSES], class_palette(N_CLASSES)[:N_CLASSES]
        )
        labels = np.array(png)
        probs = np.load(path.with_suffix(".npy"))
        expected = predict_probabilities(net, images[path.stem], [1.0], True, "cpu")
        assert labels.shape == images[path.stem].shape[:2] and labels.max() < N_CLASSES
        np.testing.assert_allclose(probs, expected, atol=1e-5)  # the checkpoint round-trips the weights
        np.testing.assert_array_equal(labels, expected.argmax(0))


def test_predict_files_clear_errors(tmp_path):
    save_checkpoint(tmp_path / "model.pt")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not a JPEG")
    with pytest.raises(ValueError, match="broken.jpg: unreadable image"):
        predict_files(tmp_path / "model.pt", [bad], tmp_path / "out", probabilities=False, strict=True)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        predict_files(
            tmp_path / "model.pt", [tmp_path / "missing.png"], tmp_path / "out", probabilities=False
        )
    with pytest.raises(ValueError, match="trained on classes"):
        predict_files(
            tmp_path / "model.pt",
            [bad],
            tmp_path / "out",
            probabilities=False,
            class_names=["background", "x", "y", "z"],
        )
    torch.save({"model": {}, "stage": "cam"}, tmp_path / "cam.pt")
    with pytest.raises(ValueError, match="not a weakseg segment model"):
        load_segmenter(tmp_path / "cam.pt", "cpu")


def test_list_images_refuses_two_inputs_with_one_output_name(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match="both be written as x.png"):
        list_images([tmp_path / "a", tmp_path / "b"])


def test_run_predict_store_keeps_labelled_classes_on_train(tmp_path):
    from weakseg.datasets.folder import ingest
    from weakseg.datasets.synthetic import class_names, write_folder

    config = wconfig.load(
        {
            "device": "cpu",
            "dataset": {
                "synthetic": {"n_train": 3, "n_val": 2, "height": 32, "width": 40, "n_classes": N_CLASSES - 1}
            },
            "segment": {"pretrained": False, "infer_scales": [1.0], "infer_flip": False},
        }
    )
    root = write_folder(config["dataset"]["synthetic"], True, tmp_path / "synthetic")
    ingest(root, config["dataset"], tmp_path / "data.zarr", tmp_path / "gt.zarr", store.provenance("test"))
    info, _ = open_data(tmp_path / "data.zarr")
    save_checkpoint(tmp_path / "model.pt", class_names=class_names(N_CLASSES - 1, True))

    run_predict_store(config, tmp_path / "data.zarr", tmp_path / "model.pt", "train", tmp_path / "train.zarr")
    train = store.open_store(tmp_path / "train.zarr", "scores")
    assert store.ids_in(train, SEG) == sorted(info.split("train"))
    for image_id in info.split("train"):
        scores, classes = store.get_scores(train, SEG, image_id)
        assert classes.tolist() == info.image_labels(image_id).tolist() and classes[0] == 0
        assert np.abs(scores.sum(0) - 1).max() <= len(classes) / 255  # a distribution up to quantisation

    run_predict_store(
        config,
        tmp_path / "data.zarr",
        tmp_path / "model.pt",
        "val",
        tmp_path / "val.zarr",
        shard=1,
        n_shards=2,
    )
    val = store.open_store(tmp_path / "val.zarr", "scores")
    assert store.ids_in(val, SEG) == store.shard_ids(info.split("val"), 1, 2)
    scores, classes = store.get_scores(val, SEG, store.ids_in(val, SEG)[0])
    assert classes.tolist() == list(range(N_CLASSES)) and scores.shape[1:] == (32, 40)

    save_checkpoint(tmp_path / "other.pt", class_names=["background", "p", "q", "r"])
    with pytest.raises(ValueError, match="trained on classes"):
        run_predict_store(config, tmp_path / "data.zarr", tmp_path / "other.pt", "val", tmp_path / "x.zarr")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_predict_on_cuda_matches_cpu():
    net = calibrated(make_model("decoupled"))
    image = np.random.default_rng(3).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    on_cpu = predict_probabilities(net, image, [0.75, 1.0], True, "cpu", classes=[0, 1])
    cuda = select_device("cuda")  # as every stage gets its device: float32 stays IEEE float32 there
    on_cuda = predict_probabilities(net.to(cuda), image, [0.75, 1.0], True, cuda, classes=[0, 1])
    np.testing.assert_allclose(on_cuda, on_cpu, atol=1e-4)  # summation order differs, not precision


@pytest.mark.msrc
def test_predict_files_on_an_msrc_photo(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "msrc21"
    if not (root / "classes.txt").is_file():
        pytest.skip(f"MSRC-21 not found at {root}")
    class_names = (root / "classes.txt").read_text().split()
    image_id = (root / "val.txt").read_text().split()[0]
    save_checkpoint(tmp_path / "model.pt", class_names=class_names, has_background=False, infer_scales=[1.0])
    (png,) = predict_files(
        tmp_path / "model.pt",
        [root / "JPEGImages" / f"{image_id}.jpg"],
        tmp_path / "out",
        probabilities=False,
        class_names=class_names,
    )
    truth = np.array(Image.open(root / "SegmentationClass" / f"{image_id}.png"))
    labels = np.array(Image.open(png))
    assert labels.shape == truth.shape  # photos of 213 x 320: not a multiple of the stride
    assert labels.max() < len(class_names)


# ------------------------------------------------------------------ class prior and its adjustment


def test_label_prior_counts_labelled_pixels_only():
    from weakseg.segment.train import PRIOR_FLOOR, label_prior

    maps = [np.array([[0, 0, 1], [IGNORE, IGNORE, 1]], np.uint8), np.array([[0, 0], [0, 1]], np.uint8)]
    prior = label_prior(maps, 3)  # 5 x class 0, 3 x class 1, none of class 2 (floored), 255 ignored
    assert prior[2] == pytest.approx((PRIOR_FLOOR / 3) / (1 + PRIOR_FLOOR / 3))
    np.testing.assert_allclose(prior[:2] / prior[:2].sum(), [5 / 8, 3 / 8])
    assert prior.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(label_prior([np.full((2, 2), IGNORE, np.uint8)], 4), 0.25)
    with pytest.raises(ValueError, match="pixel label 7"):
        label_prior([np.array([[7]], np.uint8)], 3)


@pytest.mark.parametrize("model", MODELS)
def test_prior_adjustment_divides_the_prior_out_of_the_softmax(model):
    net = calibrated(make_model(model))
    image = np.random.default_rng(4).integers(0, 256, (36, 44, 3), dtype=np.uint8)
    plain = predict_probabilities(net, image, [1.0], False, "cpu")
    # With the uniform prior of an untrained model, adjustment changes nothing.
    np.testing.assert_allclose(
        predict_probabilities(net, image, [1.0], False, "cpu", prior_adjustment=1.0), plain, atol=1e-6
    )
    prior = torch.tensor([0.7, 0.2, 0.08, 0.02])
    net.label_prior.copy_(prior)
    for tau in (0.5, 1.0):
        adjusted = predict_probabilities(net, image, [1.0], False, "cpu", prior_adjustment=tau)
        expected = plain / prior.numpy()[:, None, None] ** tau
        np.testing.assert_allclose(adjusted, expected / expected.sum(0, keepdims=True), atol=1e-5)
    # The rare class wins more pixels, the frequent one fewer.
    adjusted = predict_probabilities(net, image, [1.0], False, "cpu", prior_adjustment=1.0)
    assert (adjusted.argmax(0) == 3).sum() > (plain.argmax(0) == 3).sum()
    assert (adjusted.argmax(0) == 0).sum() < (plain.argmax(0) == 0).sum()
    # Within the image's labels (train cleaning) too: over classes {0, 3} only.
    part = predict_probabilities(net, image, [1.0], False, "cpu", classes=[0, 3], prior_adjustment=1.0)
    expected = (
        predict_probabilities(net, image, [1.0], False, "cpu", classes=[0, 3])
        / prior.numpy()[[0, 3], None, None]
    )
    np.testing.assert_allclose(part, expected / expected.sum(0, keepdims=True), atol=1e-5)


def test_model_file_keeps_the_prior_and_predict_files_applies_it(tmp_path):
    import cv2

    net, _ = save_checkpoint(tmp_path / "old.pt", infer_scales=[1.0], infer_flip=False)
    # A model file written before the prior was recorded still loads, with the uniform prior.
    ckpt = torch.load(tmp_path / "old.pt", weights_only=True)
    del ckpt["model"]["label_prior"]
    torch.save(ckpt, tmp_path / "old.pt")
    loaded, _ = load_segmenter(tmp_path / "old.pt", "cpu")
    np.testing.assert_allclose(loaded.label_prior.numpy(), 1 / N_CLASSES)

    net.label_prior.copy_(torch.tensor([0.85, 0.1, 0.04, 0.01]))
    config = make_config(infer_scales=[1.0], infer_flip=False, prior_adjustment=1.0)
    save_model(tmp_path / "model.pt", net, config, CLASS_NAMES, True, "segment")
    loaded, _ = load_segmenter(tmp_path / "model.pt", "cpu")
    np.testing.assert_allclose(loaded.label_prior.numpy(), [0.85, 0.1, 0.04, 0.01])
    image = np.random.default_rng(5).integers(0, 256, (30, 34, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "x.png"), image[..., ::-1])
    predict_files(
        tmp_path / "model.pt", [tmp_path / "x.png"], tmp_path / "out", probabilities=True, device="cpu"
    )
    expected = predict_probabilities(net, image, [1.0], False, "cpu", prior_adjustment=1.0)
    np.testing.assert_allclose(np.load(tmp_path / "out" / "x.npy"), expected, atol=1e-5)
    plain = predict_probabilities(net, image, [1.0], False, "cpu")
    assert not np.allclose(expected, plain, atol=1e-3)
    predict_files(
        tmp_path / "model.pt",
        [tmp_path / "x.png"],
        tmp_path / "plain",
        probabilities=True,
        device="cpu",
        prior_adjustment=0.0,
    )  # the override of `weakseg predict --prior-adjustment`
    np.testing.assert_allclose(np.load(tmp_path / "plain" / "x.npy"), plain, atol=1e-5)


# ------------------------------------------------------------------ run_train_seg


@pytest.fixture
def seg_inputs(tmp_path):
    """A small synthetic data store, its GT masks (partly set to 255) as annotations, and a selection."""
    from weakseg.datasets.folder import ingest
    from weakseg.datasets.synthetic import write_folder

    config = wconfig.load(
        {
            "device": "cpu",
            "dataset": {
                "synthetic": {"n_train": 4, "n_val": 1, "height": 32, "width": 40, "n_classes": N_CLASSES - 1}
            },
            "segment": {
                "pretrained": False,
                "iterations": 2,
                "checkpoint_every": 1,
                "batch_size": 2,
                "crop_size": 32,
                "infer_scales": [1.0],
                "prior_adjustment": 0.5,
            },
        }
    )
    root = write_folder(config["dataset"]["synthetic"], True, tmp_path / "synthetic")
    data, gt = tmp_path / "data.zarr", tmp_path / "gt.zarr"
    ingest(root, config["dataset"], data, gt, store.provenance("test"))
    info, _ = open_data(data)
    masks = store.open_store(gt)
    annotations = {i: store.get(masks, store.MASKS, i).copy() for i in info.split("train")}
    for labels in annotations.values():
        labels[:, :8] = IGNORE
    selected = sorted(annotations)[:3]
    (tmp_path / "selection.csv").write_text(
        "id,image_selected\n" + "".join(f"{i},{i in selected}\n" for i in sorted(annotations))
    )
    return config, data, annotations, selected, tmp_path


def write_annotations(path, annotations):
    with store.writing(path, "labels", store.provenance("test")) as group:
        for image_id, labels in annotations.items():
            store.put(group, store.LABELS, image_id, labels)


def test_run_train_seg_records_the_prior_and_never_resumes_on_other_annotations(seg_inputs, caplog):
    import logging

    from weakseg.segment.train import label_prior, run_train_seg

    config, data, annotations, selected, tmp_path = seg_inputs
    write_annotations(tmp_path / "labels.zarr", annotations)
    model_path = run_train_seg(
        config, data, tmp_path / "labels.zarr", tmp_path / "selection.csv", tmp_path / "run"
    )
    ckpt = torch.load(model_path, weights_only=True)
    np.testing.assert_allclose(
        ckpt["model"]["label_prior"].numpy(),
        label_prior([annotations[i] for i in selected], N_CLASSES),
        rtol=1e-6,
    )
    assert ckpt["config"]["segment"]["prior_adjustment"] == 0.5  # prediction settings travel with the model

    # Same annotations: the finished checkpoint is resumed (no training). Other annotations (e.g. a new
    # round's) with the same ids and config: trained afresh, never the stale network.
    caplog.set_level(logging.INFO, logger="weakseg")
    run_train_seg(config, data, tmp_path / "labels.zarr", tmp_path / "selection.csv", tmp_path / "run")
    assert "resumed from checkpoint" in caplog.text and "starting afresh" not in caplog.text
    caplog.clear()
    annotations[selected[0]][:, 8:12] = IGNORE
    write_annotations(tmp_path / "labels.zarr", annotations)
    run_train_seg(config, data, tmp_path / "labels.zarr", tmp_path / "selection.csv", tmp_path / "run")
    assert "starting afresh" in caplog.text


def _cam_model_file(config, path, backbone="efficientnet_lite0"):
    from weakseg.cam.models import build_classifier

    cam_config = {**config["cam"], "backbone": backbone, "pretrained": False}
    torch.manual_seed(3)  # a draw of its own: equal weights below can only come from this file
    net = build_classifier(cam_config, N_CLASSES - 1)
    save_model(path, net, {**config, "cam": cam_config}, [str(c) for c in range(N_CLASSES)], True, "cam")
    return net


def test_run_train_seg_init_cam_begins_at_the_cam_encoder(seg_inputs):
    from weakseg.segment.train import run_train_seg

    config, data, annotations, _, tmp_path = seg_inputs
    write_annotations(tmp_path / "labels.zarr", annotations)
    args = (data, tmp_path / "labels.zarr", tmp_path / "selection.csv")
    cam = _cam_model_file(config, tmp_path / "cam.pt").state_dict()
    still = {**config, "segment": {**config["segment"], "lr": 0.0}}
    seg = torch.load(
        run_train_seg(still, *args, tmp_path / "seg", init_encoder=tmp_path / "cam.pt"), weights_only=True
    )["model"]
    # (weights, not BatchNorm running statistics: those move in training mode even at a zero rate)
    encoder = [k for k in seg if k.startswith("encoder.") and k.endswith("weight")]
    assert encoder and all(torch.equal(seg[k], cam[k]) for k in encoder)
    cold = torch.load(run_train_seg(still, *args, tmp_path / "cold"), weights_only=True)["model"]
    assert not all(torch.equal(cold[k], cam[k]) for k in encoder)
    # A CAM network on another backbone cannot lend its encoder: refused before training, naming the keys.
    _cam_model_file(config, tmp_path / "lite1.pt", backbone="efficientnet_lite1")
    with pytest.raises(ValueError, match="segment.init: cam needs segment.backbone = cam.backbone"):
        run_train_seg(config, *args, tmp_path / "bad", init_encoder=tmp_path / "lite1.pt")
    assert not (tmp_path / "bad" / "model.pt").exists()


def test_run_train_seg_warm_start_begins_at_the_given_weights(seg_inputs):
    from weakseg.segment.train import run_train_seg

    config, data, annotations, _, tmp_path = seg_inputs
    write_annotations(tmp_path / "labels.zarr", annotations)
    args = (data, tmp_path / "labels.zarr", tmp_path / "selection.csv")
    first = torch.load(run_train_seg(config, *args, tmp_path / "round1"), weights_only=True)["model"]
    # With a zero learning rate the weights stay where training began: the init model's, not a new draw.
    still = {**config, "segment": {**config["segment"], "lr": 0.0, "seed": 7}}
    warm = torch.load(
        run_train_seg(still, *args, tmp_path / "warm", init_model=tmp_path / "round1" / "model.pt"),
        weights_only=True,
    )["model"]
    cold = torch.load(run_train_seg(still, *args, tmp_path / "cold"), weights_only=True)["model"]
    weights = [k for k, v in first.items() if v.dtype.is_floating_point and k.endswith("weight")]
    assert weights and all(torch.equal(warm[k], first[k]) for k in weights)
    assert not all(torch.equal(cold[k], first[k]) for k in weights)


def test_run_train_seg_warm_start_lr_mult_scales_only_a_warm_started_round(seg_inputs):
    from weakseg.segment.train import run_train_seg

    config, data, annotations, _, tmp_path = seg_inputs
    write_annotations(tmp_path / "labels.zarr", annotations)
    args = (data, tmp_path / "labels.zarr", tmp_path / "selection.csv")
    first = torch.load(run_train_seg(config, *args, tmp_path / "round1"), weights_only=True)["model"]
    weights = [k for k, v in first.items() if v.dtype.is_floating_point and k.endswith("weight")]

    def trained(name, mult, init):
        seg = {**config["segment"], "lr": 0.01, "seed": 7}
        model = run_train_seg(
            {**config, "segment": seg}, *args, tmp_path / name, init_model=init, init_lr_mult=mult
        )
        return torch.load(model, weights_only=True)["model"]

    init = tmp_path / "round1" / "model.pt"
    # Adam moves each weight by about the rate per step: at a vanishing rate the warm start stays put,
    # at the full rate it moves.
    still, moved = trained("fine", 1e-9, init), trained("full", 1.0, init)
    for k in weights:
        torch.testing.assert_close(still[k], first[k], rtol=0, atol=1e-7)
    assert max(float((moved[k] - first[k]).abs().max()) for k in weights) > 1e-4
    # A round that does not warm-start trains at segment.lr whatever the multiplier.
    cold_fine, cold_full = trained("cold_fine", 1e-9, None), trained("cold_full", 1.0, None)
    assert all(torch.equal(cold_fine[k], cold_full[k]) for k in weights)


@pytest.mark.parametrize(("size", "dilation"), [((16, 16), 18), ((16, 40), 18), ((5, 3), 4), ((20, 20), 6)])
def test_atrous_conv_skipping_padding_taps_keeps_output_and_gradients(size, dilation):
    """Taps that can only read padding are skipped (dimension <= dilation); nothing else changes."""
    from weakseg.segment.models import AtrousConv2d

    torch.manual_seed(0)
    conv = AtrousConv2d(6, 4, 3, padding=dilation, dilation=dilation, bias=True)
    x = torch.randn(2, 6, *size, requires_grad=True)
    grad_out = torch.randn(2, 4, *size)
    (conv(x) * grad_out).sum().backward()
    fast = conv(x).detach(), x.grad.clone(), conv.weight.grad.clone(), conv.bias.grad.clone()
    x.grad = conv.weight.grad = conv.bias.grad = None
    plain = F.conv2d(x, conv.weight, conv.bias, 1, dilation, dilation)
    (plain * grad_out).sum().backward()
    for got, want in zip(fast, (plain.detach(), x.grad, conv.weight.grad, conv.bias.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    off_centre = torch.ones(3, 3, dtype=torch.bool)
    off_centre[1, 1] = False
    if all(s <= dilation for s in size):  # only the centre tap can have a gradient
        assert not conv.weight.grad[:, :, off_centre].any()


@pytest.mark.parametrize("model", MODELS)
def test_label_stride_resizes_the_logits_to_the_subsampled_labels(model):
    from weakseg.segment.train import subsample_labels

    x, labels, image_labels = make_batch(64)
    coarse = torch.from_numpy(np.stack([subsample_labels(lab.numpy(), 4) for lab in labels]))
    # 16-pixel class blocks keep their classes as 4-label blocks: each label is read inside its cell
    assert torch.equal(coarse, labels[:, ::16, ::16].repeat_interleave(4, 1).repeat_interleave(4, 2))
    net = make_model(model).train()
    out = net(x, image_labels, output_size=coarse.shape[-2:])
    assert out["logits"].shape == (2, N_CLASSES, 16, 16)
    loss, _ = net.loss(out, coarse, image_labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert net(x, image_labels)["logits"].shape[-2:] == x.shape[-2:]  # no output_size: the input's size


@pytest.mark.parametrize("model", MODELS)
def test_bfloat16_prediction_is_close_to_float32_but_not_equal(model):
    net = calibrated(make_model(model))
    image = (make_batch(64)[0][0].permute(1, 2, 0) * 255).round().byte().numpy()
    exact = predict_probabilities(net, image, [1.0], True, "cpu")
    fast = predict_probabilities(net, image, [1.0], True, "cpu", precision="bfloat16")
    assert fast.dtype == np.float32 and np.allclose(fast.sum(0), 1.0, atol=1e-4)
    assert not np.array_equal(fast, exact)  # the network did run in bfloat16
    # A random deep encoder amplifies rounding more than a trained one, and its near-uniform
    # probabilities make the argmax fragile: a bound on the mean difference.
    assert float(np.abs(fast - exact).mean()) < 0.03


def test_autocast_refuses_an_unknown_precision():
    from weakseg.nets.device import autocast

    with pytest.raises(ValueError, match="precision"):
        autocast("cpu", "float16")


def test_run_train_seg_at_a_label_stride_and_in_bfloat16(seg_inputs):
    from weakseg.segment.train import run_train_seg

    config, data, annotations, _, tmp_path = seg_inputs
    write_annotations(tmp_path / "labels.zarr", annotations)
    args = (data, tmp_path / "labels.zarr", tmp_path / "selection.csv")

    def trained(name, **segment):
        model = run_train_seg({**config, "segment": {**config["segment"], **segment}}, *args, tmp_path / name)
        return torch.load(model, weights_only=True)["model"]

    exact, strided, bf16 = (
        trained("exact"),
        trained("strided", label_stride=4),
        trained("bf16", train_precision="bfloat16"),
    )
    weights = [k for k, v in exact.items() if v.dtype.is_floating_point and k.endswith("weight")]
    for other in (strided, bf16):
        assert all(other[k].dtype == torch.float32 and torch.isfinite(other[k]).all() for k in weights)
        assert not all(torch.equal(other[k], exact[k]) for k in weights)  # each setting changed training
