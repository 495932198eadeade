"""Train a segmentation network on the selected pseudo-labels of the previous round.

Every round starts from ImageNet weights (never from the previous round's network: the SPN paper
retrains from scratch so a round does not inherit the previous round's bias), unless segment.init: cam
starts its encoder from the CAM network's or segment.warm_start from the previous round's weights.
Batches are random scale + crop + flip of the selected images; label pixels 255 (unreliable / padding)
are ignored.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import cv2
import numpy as np
import torch

from weakseg import store
from weakseg.config import training_section
from weakseg.datasets import IGNORE, open_data, read_image
from weakseg.errors import InputError
from weakseg.nets.device import select_device
from weakseg.nets.model_file import config_fingerprint, load_model_file, load_weights, save_model
from weakseg.pseudo.divergence import selected_ids
from weakseg.segment.models import build_segmenter
from weakseg.training import optimizer_and_schedule, seed_everything, train_loop

log = logging.getLogger("weakseg")
PRIOR_FLOOR = 0.01  # smallest prior, as a fraction of the uniform 1 / n_classes


def random_crop(
    image: np.ndarray, labels: np.ndarray, crop: int, scale: float, flip: bool, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Rescale image (bilinear) and labels (nearest), pad to the crop (labels 255), crop at random, flip."""
    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    labels = cv2.resize(labels, size, interpolation=cv2.INTER_NEAREST)
    ph, pw = max(crop - image.shape[0], 0), max(crop - image.shape[1], 0)
    if ph or pw:
        mean = image.reshape(-1, 3).mean(0)
        image = cv2.copyMakeBorder(image, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=mean.tolist())
        labels = cv2.copyMakeBorder(labels, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=IGNORE)
    y = int(rng.integers(0, image.shape[0] - crop + 1))
    x = int(rng.integers(0, image.shape[1] - crop + 1))
    image, labels = image[y : y + crop, x : x + crop], labels[y : y + crop, x : x + crop]
    if flip:
        image, labels = image[:, ::-1], labels[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(labels)


def subsample_labels(labels: np.ndarray, stride: int) -> np.ndarray:
    """Every ``stride``-th pixel label of an (H, W) map, from the centre of each stride x stride cell:
    the labels the loss sees at ``segment.label_stride`` (size ceil((H - stride // 2) / stride))."""
    return labels[stride // 2 :: stride, stride // 2 :: stride] if stride > 1 else labels


def label_prior(label_maps, n_classes: int) -> np.ndarray:
    """(n_classes,) frequency of each class among the labelled pixels of ``label_maps`` (255 = ignored).

    Floored at ``PRIOR_FLOOR / n_classes`` and renormalised, so that a class with no labelled pixel keeps
    a finite log prior; all-ignore maps give the uniform prior.
    """
    counts = np.zeros(n_classes, dtype=np.float64)
    for labels in label_maps:
        labelled = labels[labels != IGNORE]
        if labelled.size and int(labelled.max()) >= n_classes:
            raise ValueError(
                f"label_prior: pixel label {int(labelled.max())} is not a class 0..{n_classes - 1} "
                f"or {IGNORE}"
            )
        counts += np.bincount(labelled, minlength=n_classes)
    return prior_from_counts(counts)


def prior_from_counts(counts) -> np.ndarray:
    """The floored, renormalised class frequencies of ``label_prior`` from per-class pixel counts."""
    counts = np.asarray(counts, dtype=np.float64)
    n_classes = len(counts)
    if counts.sum() == 0:
        return np.full(n_classes, 1.0 / n_classes)
    prior = np.maximum(counts / counts.sum(), PRIOR_FLOOR / n_classes)
    return prior / prior.sum()


def load_cam_encoder(model, cam_model, seg: dict) -> None:
    """Replace ``model.encoder``'s weights with the encoder of the CAM model file ``cam_model``
    (segment.init: cam). Its backbone must be the segmenter's."""
    cam = load_model_file(cam_model, "cam")
    cam_backbone = cam["config"]["cam"]["backbone"]
    if cam_backbone != seg["backbone"]:
        raise InputError(
            f"segment.init: cam needs segment.backbone = cam.backbone, but {cam_model} has a "
            f"{cam_backbone} encoder and segment.backbone is {seg['backbone']}"
        )
    prefix = "encoder."
    encoder = {k[len(prefix) :]: v for k, v in cam["model"].items() if k.startswith(prefix)}
    load_weights(model.encoder, encoder, cam_model, "segmentation encoder")


def run_train_seg(
    config: dict,
    data_path,
    labels_path,
    selection_csv,
    out_dir,
    threads: int = 1,
    init_model=None,
    init_encoder=None,
    init_lr_mult: float = 1.0,
) -> Path:
    """Train ``config['segment']['model']`` on the selected annotations; writes ``out_dir/model.pt``.
    ``init_model``: a segmentation model file whose weights replace the ImageNet initialisation
    (segment.warm_start: the previous round's). ``init_encoder``: a CAM model file whose encoder
    replaces ImageNet's (segment.init: cam). ``init_lr_mult`` scales the learning rate of a run that
    starts from ``init_model`` (segment.warm_start_lr_mult)."""
    if init_lr_mult <= 0:
        raise InputError(f"--init-lr-mult: expected a positive number, got {init_lr_mult}")
    torch.set_num_threads(max(1, threads))
    seg = config["segment"]
    info, data = open_data(data_path)
    labels_store = store.open_store(labels_path, "labels")
    available = set(store.ids_in(labels_store, store.LABELS))
    ids = [i for i in selected_ids(selection_csv) if i in available]
    if not ids:
        raise ValueError(f"{selection_csv}: no selected image has an annotation in {labels_path}")
    device = select_device(config["device"])
    seed_everything(seg["seed"])  # random init of the heads (and of a non-pretrained encoder)
    model = build_segmenter(seg, info.n_classes, info.has_background)
    init_digest = []  # only weights other than ImageNet's add to the fingerprint
    if init_encoder:
        load_cam_encoder(model, init_encoder, seg)
        init_digest.append(hashlib.sha256(Path(init_encoder).read_bytes()).hexdigest())
        log.info("train-seg: the encoder starts from the CAM network's, %s", init_encoder)
    if init_model:
        load_weights(model, load_model_file(init_model, "segment")["model"], init_model, "segmentation")
        init_digest.append(hashlib.sha256(Path(init_model).read_bytes()).hexdigest())
        # A warm start continues a trained network: segment.warm_start_lr_mult scales every rate.
        seg = {**seg, "lr": seg["lr"] * init_lr_mult}
        log.info("train-seg: starting from the weights of %s, lr %.2e", init_model, seg["lr"])
    model = model.to(device)
    # One pass over the annotations: their class prior, and a digest so that a checkpoint trained on other
    # annotations (an earlier round's, or before a pseudo-label change) is never resumed.
    labels_digest = hashlib.sha256()

    def read_annotations():
        for image_id in ids:
            labels = store.get(labels_store, store.LABELS, image_id)
            labels_digest.update(image_id.encode() + labels.tobytes())
            yield labels

    prior = label_prior(read_annotations(), info.n_classes)
    model.label_prior.copy_(torch.from_numpy(prior))
    log.info(
        "train-seg: class prior of the labelled pixels: %s",
        ", ".join(f"{name} {p:.3f}" for name, p in zip(info.class_names, prior)),
    )
    optimizer, scheduler = optimizer_and_schedule(model, seg)
    log.info(
        "train-seg: %s/%s on %d selected images (of %d annotated), %d iterations, device %s",
        seg["model"],
        seg["backbone"],
        len(ids),
        len(available),
        seg["iterations"],
        device,
    )
    lo, hi = seg["scale_range"]

    def next_batch(rng: np.random.Generator) -> dict:
        chosen = rng.choice(len(ids), size=min(seg["batch_size"], len(ids)), replace=False)
        images, targets, image_labels = [], [], []
        for k in chosen:
            image_id = ids[k]
            img, lab = random_crop(
                read_image(data, image_id),
                store.get(labels_store, store.LABELS, image_id),
                seg["crop_size"],
                float(rng.uniform(lo, hi)),
                bool(rng.integers(2)),
                rng,
            )
            images.append(img), targets.append(subsample_labels(lab, seg["label_stride"]))
            image_labels.append(info.label_vector(image_id).astype(np.float32))
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0)
        return {
            "x": x.to(device),
            "y": torch.from_numpy(np.stack(targets)).long().to(device),
            "labels": torch.from_numpy(np.stack(image_labels)).to(device),
        }

    def compute_loss(m, batch):
        # Image labels let the decoupled net decode only the labelled classes (DeepLab ignores them).
        # At a label_stride the logits are resized to the subsampled labels' size, not the crop's.
        out = m(batch["x"], batch["labels"], output_size=batch["y"].shape[-2:])
        return m.loss(out, batch["y"], batch["labels"])

    train_loop(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        next_batch=next_batch,
        compute_loss=compute_loss,
        iterations=seg["iterations"],
        checkpoint_every=seg["checkpoint_every"],
        out_dir=Path(out_dir),
        seed=seg["seed"],
        desc="train-seg",
        fingerprint=config_fingerprint(
            training_section(seg), config["dataset"], ids, labels_digest.hexdigest(), *init_digest
        ),
        log_every=seg["log_every"],
        precision=seg["train_precision"],
    )
    model_path = Path(out_dir) / "model.pt"
    save_model(model_path, model.cpu(), config, info.class_names, info.has_background, "segment")
    return model_path
