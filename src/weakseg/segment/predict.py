"""Predict per-pixel class probabilities with a trained segmentation network.

Core: ``predict_probabilities`` (one image in, averaged multi-scale / flip softmax out).
Edges: ``run_predict_store`` (a split of a data store -> scores store, key 'seg') and
``predict_files`` (image files / folders -> palette PNGs, the user command). ``predict_files`` never
writes into a folder of its inputs, replaces existing outputs only when asked, and skips images it
cannot read (one line each) so that one damaged file does not stop the others.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from weakseg import store, timing
from weakseg.datasets import open_data, read_image
from weakseg.datasets.folder import DatasetError, read_image_file
from weakseg.errors import InputError, UserError
from weakseg.nets.backbones import fold_batchnorm
from weakseg.nets.device import autocast, select_device
from weakseg.nets.model_file import ModelFileError, load_model_file, load_weights
from weakseg.palette import class_palette, save_palette_png
from weakseg.parallel import progress
from weakseg.segment.models import Segmenter, build_segmenter

log = logging.getLogger("weakseg")

SEG = store.SEG
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
OVERLAY_ALPHA = 0.5  # weight of the label colours over the image in <id>_overlay.png
LEGEND_FILE = "legend.png"
LEGEND_ROW = 20  # legend.png: one row per class, a swatch and the class name
LEGEND_SWATCH = 14
LEGEND_MARGIN = 4


class SkippedImagesError(UserError):
    """Some input images could not be read; the others were segmented (``written``)."""

    def __init__(self, message: str, written: list[Path]):
        super().__init__(message)
        self.written = written


def load_segmenter(
    model_path: str | os.PathLike, device: torch.device | str, class_names: Sequence[str] | None = None
) -> tuple[Segmenter, dict]:
    """Rebuild a segmentation network from a training checkpoint; returns (model in eval mode, checkpoint).

    With ``class_names``, a checkpoint trained on another class set is refused.
    """
    path = Path(model_path)
    ckpt = load_model_file(path, "segment")
    if class_names is not None and list(class_names) != list(ckpt["class_names"]):
        raise ModelFileError(
            f"{path}: checkpoint was trained on classes {list(ckpt['class_names'])}, "
            f"but the data has {list(class_names)}"
        )
    # The state dict replaces every weight, so never fetch ImageNet weights here.
    seg_config = {**ckpt["config"]["segment"], "pretrained": False, "weights": None}
    try:
        model = build_segmenter(seg_config, len(ckpt["class_names"]), bool(ckpt["has_background"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(
            f"{path}: its segment config does not describe a network weakseg can build "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    # Models saved before the class prior was recorded: keep the uniform prior (no adjustment).
    state = {"label_prior": model.label_prior, **ckpt["model"]}
    load_weights(model, state, path, f"'{seg_config.get('model')}' / '{seg_config.get('backbone')}'")
    return model.to(device).eval(), ckpt


def predict_probabilities(
    model: Segmenter,
    image_uint8: np.ndarray,
    scales: Sequence[float],
    flip: bool,
    device: torch.device | str,
    classes: Sequence[int] | None = None,
    prior_adjustment: float = 0.0,
    precision: str = "float32",
) -> np.ndarray:
    """(n_classes, H, W) float32 softmax probabilities of one (H, W, 3) uint8 RGB image, averaged over
    ``scales`` and (with ``flip``) horizontal flips, at image resolution.

    With ``classes`` the distribution is over those classes only (image-label cleaning) and the result
    is (len(classes), H, W) in that order. ``prior_adjustment`` tau divides the class prior of the
    training labels out of the softmax, p(c|x) / prior(c)^tau (logit adjustment, Menon et al., ICLR
    2021): tau = 1 is the Bayes decision for mean class accuracy, 0 leaves the network's distribution.
    ``precision``: the network's forward pass (segment.infer_precision); the softmax and averaging
    are float32.
    """
    if image_uint8.ndim != 3 or image_uint8.shape[2] != 3 or image_uint8.dtype != np.uint8:
        raise ValueError(
            f"predict: expected an (H, W, 3) uint8 RGB image, got {image_uint8.dtype} {image_uint8.shape}"
        )
    if not len(scales):
        raise ValueError("predict: no inference scales given")
    height, width = image_uint8.shape[:2]
    image = torch.from_numpy(np.ascontiguousarray(image_uint8)).to(device)
    image = image.permute(2, 0, 1)[None].float() / 255.0
    allowed = torch.ones(model.n_classes, dtype=torch.bool, device=image.device)
    if classes is not None:
        classes = torch.as_tensor(np.asarray(classes, dtype=np.int64), device=image.device)
        if classes.numel() == 0 or int(classes.min()) < 0 or int(classes.max()) >= model.n_classes:
            raise ValueError(
                f"predict: classes must be a non-empty subset of 0..{model.n_classes - 1}, "
                f"got {classes.tolist()}"
            )
        allowed = torch.zeros_like(allowed).index_fill(0, classes, True)
    log_prior = model.label_prior.to(image.device).log()[None, :, None, None] * float(prior_adjustment)
    if classes is not None:  # only these are resized and normalised: the others' probability is 0
        log_prior = log_prior[:, classes]
    batch = 2 if flip else 1
    # Only the allowed classes need decoding (DecoupledNet); DeepLab ignores this.
    image_labels = allowed.float()[None].expand(batch, -1)
    was_training = model.training
    model.eval()
    total = torch.zeros(len(log_prior[0]), height, width, device=image.device)
    try:
        with torch.inference_mode():
            for scale in scales:
                size = (max(1, round(height * scale)), max(1, round(width * scale)))
                x = (
                    image
                    if size == (height, width)
                    else F.interpolate(image, size=size, mode="bilinear", align_corners=False)
                )
                if flip:
                    x = torch.cat([x, x.flip(-1)])
                with timing.kernel("forward"), autocast(image.device, precision):
                    logits = model(x, image_labels)["logits"].float()
                if classes is not None:
                    logits = logits.index_select(1, classes)
                if tuple(logits.shape[-2:]) != (height, width):
                    logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
                if flip:
                    logits[1] = logits[1].flip(-1)
                total += (logits - log_prior).softmax(dim=1).sum(dim=0)
    finally:
        model.train(was_training)
    probs = total / (batch * len(scales))
    return probs.cpu().numpy().astype(np.float32)


def run_predict_store(
    config: dict,
    data_path: str | os.PathLike,
    model_path: str | os.PathLike,
    split: str,
    out_path: str | os.PathLike,
    shard: int = 0,
    n_shards: int = 1,
    threads: int = 1,
) -> Path:
    """Write segmentation probabilities of one shard of ``split`` to a scores store (key 'seg').

    Train-split images keep only their labelled classes (background included when the dataset has one),
    renormalised over those classes: the image labels clean the prediction and the store stays small.
    Other splits keep every class.
    """
    torch.set_num_threads(max(1, threads))
    info, data = open_data(data_path)
    ids = store.shard_ids(info.split(split), shard, n_shards)
    device = select_device(config["device"])
    model, _ = load_segmenter(model_path, device, info.class_names)
    # channels-last: the layout CPU convolution kernels run faster at inference; BatchNorm folded into the
    # convolutions saves a pass over every feature map
    fold_batchnorm(model.to(memory_format=torch.channels_last))
    if model.has_background != info.has_background:
        raise ModelFileError(
            f"{model_path}: checkpoint has_background={model.has_background}, "
            f"but {data_path} has has_background={info.has_background}"
        )
    seg = config["segment"]
    clean_with_labels = split == config["dataset"]["train_split"]
    all_classes = np.arange(info.n_classes)
    prov = store.provenance(
        "segment_predict", seg, model=str(model_path), split=split, shard=shard, n_shards=n_shards
    )
    attrs = {"class_names": list(info.class_names), "has_background": info.has_background, "split": split}
    log.info("predicting %d %s images (shard %d/%d) on %s", len(ids), split, shard, n_shards, device)
    with store.writing(out_path, "scores", prov, attrs) as out:
        for image_id in progress(ids, desc=f"predict {split}", total=len(ids)):
            classes = info.image_labels(image_id) if clean_with_labels else all_classes
            if not len(classes):
                log.warning(
                    "%s: image '%s' has no image-level labels; keeping all classes", data_path, image_id
                )
                classes = all_classes
            probs = predict_probabilities(
                model,
                read_image(data, image_id),
                seg["infer_scales"],
                seg["infer_flip"],
                device,
                classes=classes,
                prior_adjustment=seg["prior_adjustment"],
                precision=seg["infer_precision"],
            )
            store.put_scores(out, SEG, image_id, probs, classes)
    timing.log_kernel_seconds()
    return Path(out_path)


def list_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files named directly, plus the image files (by suffix, sorted) directly inside named folders."""
    paths: list[Path] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(
                    f"{item}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder"
                )
            paths += found
        elif item.is_file():
            paths.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such image file or folder")
    stems: dict[str, Path] = {}
    for p in paths:
        if p.stem in stems and stems[p.stem] != p:
            raise InputError(f"{p} and {stems[p.stem]} would both be written as {p.stem}.png; rename one")
        stems[p.stem] = p
    return list(stems.values())


def check_output_folder(out_dir: Path, inputs: Sequence[str | os.PathLike]) -> None:
    """Refuse an output folder that is an input folder or lies inside one, or that holds input files:
    label maps must never replace the images they come from."""
    out = out_dir.resolve()
    for item in map(Path, inputs):
        folder = item.resolve() if item.is_dir() else item.resolve().parent
        if out == folder or (item.is_dir() and folder in out.parents):
            raise InputError(
                f"{out_dir}: output folder is {'inside ' if out != folder else ''}the folder of the "
                f"input {item}; expected an --out outside the input folders"
            )


def planned_outputs(
    paths: Sequence[Path], out_dir: Path, probabilities: bool, overlay: bool
) -> dict[Path, Path]:
    """Every file ``predict_files`` will write -> the input it comes from; two inputs that would
    write the same file are refused."""
    planned: dict[Path, Path] = {}
    suffixes = [".png"] + [".npy"] * probabilities + ["_overlay.png"] * overlay
    for path in paths:
        for suffix in suffixes:
            target = out_dir / f"{path.stem}{suffix}"
            if target in planned:
                raise InputError(f"{path} and {planned[target]} would both write {target}; rename one")
            planned[target] = path
    if overlay:
        legend = out_dir / LEGEND_FILE
        if legend in planned:
            raise InputError(f"{planned[legend]} would write {legend}, the legend of --overlay; rename it")
        planned[legend] = out_dir
    return planned


def overlay_labels(
    image: np.ndarray, labels: np.ndarray, palette: np.ndarray, alpha: float = OVERLAY_ALPHA
) -> np.ndarray:
    """The image under its label map's class colours: (H, W, 3) uint8 RGB."""
    from weakseg.inspect.panels import colorize_labels

    return cv2.addWeighted(colorize_labels(labels, palette), alpha, image, 1.0 - alpha, 0.0)


def render_legend(entries: Sequence[tuple[str, tuple[int, int, int]]]) -> np.ndarray:
    """(H, W, 3) uint8 RGB: one row per (class name, colour), a swatch at
    (LEGEND_MARGIN, row * LEGEND_ROW + (LEGEND_ROW - LEGEND_SWATCH) // 2) then the name."""
    font = ImageFont.load_default()
    text_x = 2 * LEGEND_MARGIN + LEGEND_SWATCH
    width = text_x + max((int(font.getlength(name)) for name, _ in entries), default=0) + LEGEND_MARGIN
    canvas = Image.new("RGB", (width, max(1, len(entries)) * LEGEND_ROW), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for row, (name, colour) in enumerate(entries):
        top = row * LEGEND_ROW + (LEGEND_ROW - LEGEND_SWATCH) // 2
        draw.rectangle(
            [LEGEND_MARGIN, top, LEGEND_MARGIN + LEGEND_SWATCH - 1, top + LEGEND_SWATCH - 1],
            fill=tuple(colour),
            outline=(0, 0, 0),
        )
        draw.text((text_x, row * LEGEND_ROW + LEGEND_ROW // 2), name, fill=(0, 0, 0), font=font, anchor="lm")
    return np.asarray(canvas)


def _write_atomically(path: Path, write) -> Path:
    """``write(temporary path)``, then move it to ``path``: a killed run leaves no half-written file."""
    tmp = store.temporary_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _save_rgb_png(rgb: np.ndarray):
    return lambda tmp: Image.fromarray(rgb).save(tmp, format="PNG")


def _save_npy(array: np.ndarray):
    def write(tmp: Path) -> None:
        with tmp.open("wb") as fh:
            np.save(fh, array)

    return write


def predict_files(
    model_path: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    probabilities: bool = False,
    class_names: Sequence[str] | None = None,
    device: str = "auto",
    prior_adjustment: float | None = None,
    overwrite: bool = False,
    strict: bool = False,
    overlay: bool = False,
) -> list[Path]:
    """Segment image files: writes ``<out_dir>/<stem>.png`` (palette PNG, pixel value = class index) per
    image and, with ``probabilities``, ``<stem>.npy`` ((n_classes, H, W) float32); with ``overlay``,
    ``<stem>_overlay.png`` (the image under its label colours) and ``legend.png`` (colours and names of
    the classes found). Inference scales, flip, precision and prior adjustment come from the config
    saved with the model (``prior_adjustment`` overrides the latter); ``device`` is auto, cpu or cuda.

    ``out_dir`` may not be (or lie inside) an input folder, and existing output files are replaced
    only with ``overwrite``. An unreadable image is logged and skipped; at the end a
    ``SkippedImagesError`` lists them (with ``strict``, the first one stops the run).
    Returns the PNG paths in input order.
    """
    paths = list_images(inputs)
    out_dir = Path(out_dir)
    check_output_folder(out_dir, inputs)
    planned = planned_outputs(paths, out_dir, probabilities, overlay)
    existing = [p for p in planned if p.exists()]
    if existing and not overwrite:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise InputError(
            f"{existing[0]}: output file exists{more}; give --overwrite to replace, or another --out"
        )
    torch_device = select_device(device)
    model, ckpt = load_segmenter(model_path, torch_device, class_names)
    seg = ckpt["config"]["segment"]
    tau = seg.get("prior_adjustment", 0.0) if prior_adjustment is None else prior_adjustment
    palette = class_palette(model.n_classes)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, skipped, present = [], [], set()
    for path in progress(paths, desc="predict files", total=len(paths)):
        try:
            image = read_image_file(path)
        except DatasetError as exc:
            if strict:
                raise
            log.warning("skipped %s", exc)
            skipped.append(path)
            continue
        probs = predict_probabilities(
            model,
            image,
            seg["infer_scales"],
            seg["infer_flip"],
            torch_device,
            prior_adjustment=tau,
            precision=seg.get("infer_precision", "float32"),
        )
        labels = probs.argmax(axis=0).astype(np.uint8)
        png = out_dir / f"{path.stem}.png"
        written.append(
            _write_atomically(png, lambda tmp, labels=labels: save_palette_png(tmp, labels, palette))
        )
        if probabilities:
            _write_atomically(out_dir / f"{path.stem}.npy", _save_npy(probs))
        if overlay:
            _write_atomically(
                out_dir / f"{path.stem}_overlay.png", _save_rgb_png(overlay_labels(image, labels, palette))
            )
            present.update(np.unique(labels).tolist())
    if overlay and written:
        from weakseg.inspect.panels import legend_for

        entries = legend_for([np.asarray(sorted(present), np.uint8)], ckpt["class_names"], palette)
        _write_atomically(out_dir / LEGEND_FILE, _save_rgb_png(render_legend(entries)))
    if skipped:
        names = ", ".join(str(p) for p in skipped[:3]) + (
            f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        )
        raise SkippedImagesError(
            f"skipped {len(skipped)} of {len(paths)} images that could not be read ({names}); "
            f"wrote {len(written)} label maps to {out_dir}",
            written,
        )
    return written


def predict_and_say(args) -> None:
    """``weakseg predict``: segment the files, then say how many label maps were written where."""
    written = predict_files(
        args.model_path,
        args.inputs,
        args.out_dir,
        args.probabilities,
        device=args.device,
        prior_adjustment=args.prior_adjustment,
        overwrite=args.overwrite,
        strict=args.strict,
        overlay=args.overlay,
    )
    print(f"wrote {len(written)} label maps to {args.out_dir}")
