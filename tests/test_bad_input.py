"""Bad input and faults: a corpus of damaged and unusual files run through the ``weakseg`` commands.

Every case of the corpus asserts the exit status (3 for bad input, 0 for unusual but valid files),
that the one error line names the file, and that no store, input or earlier output was changed
(and nothing was left behind: no temporaries, no lock). Further tests cover the run lock (also
through Snakemake), the sweep of temporaries of killed writers, ``predict --overlay`` and the
exit status of bugs.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from weakseg import cli, store
from weakseg import config as wconfig
from weakseg.datasets import open_data
from weakseg.datasets.folder import ingest
from weakseg.datasets.synthetic import write_folder
from weakseg.nets.model_file import save_model
from weakseg.palette import class_palette, save_palette_png
from weakseg.segment.models import build_segmenter

DATASET = {"n_train": 4, "n_val": 2, "height": 32, "width": 40, "n_classes": 3, "max_objects": 2, "seed": 5}
CLASS_NAMES = ["background", "class1", "class2", "class3"]
SEGMENT = {"pretrained": False, "infer_scales": [1.0], "infer_flip": False}
ORIENTATION = 0x0112  # EXIF tag
ODD_NAME = "my phötø 1"  # spaces and non-ASCII letters


# ------------------------------------------------------------------ the corpus: files and a fresh workspace


def rgb_image(seed: int, height: int = 24, width: int = 30) -> np.ndarray:
    """Smooth colour gradients plus noise: realistic for JPEG, and every pixel differs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack(
        [xx * 255 / max(width - 1, 1), yy * 255 / max(height - 1, 1), np.full((height, width), 128.0)], -1
    )
    return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


def encoded(image: np.ndarray | Image.Image, format: str = "JPEG", **options) -> bytes:
    """The bytes of an image file (JPEG at quality 100 unless told otherwise)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if format == "JPEG":
        options.setdefault("quality", 100)
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def png16(values: np.ndarray) -> bytes:
    """A 16-bit PNG (colour or grey) of uint16 values."""
    assert values.dtype == np.uint16
    ok, data = cv2.imencode(".png", values[..., ::-1] if values.ndim == 3 else values)
    assert ok
    return data.tobytes()


def exif_rotated_jpeg(displayed: np.ndarray) -> bytes:
    """A JPEG whose stored pixels are ``displayed`` turned a quarter counter-clockwise, with EXIF
    orientation 6 (turn a quarter clockwise to display)."""
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    return encoded(np.ascontiguousarray(np.rot90(displayed, 1)), exif=exif.tobytes())


def tree_digest(path: Path) -> dict[str, str]:
    """Content digest of a file, or of every file under a folder, by relative path."""
    if path.is_file():
        return {"": hashlib.sha1(path.read_bytes()).hexdigest()}
    return {
        str(p.relative_to(path)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@dataclass
class Case:
    argv: list[str]
    code: int
    names: list[str] = field(default_factory=list)  # in the error line (the file, the cause), any case
    protected: list[Path] = field(default_factory=list)  # unchanged afterwards
    check: Callable[[str], None] | None = None  # after a successful run, with its stderr + log
    after: Callable[[], None] | None = None  # further assertions on what was written
    cleanup: Callable[[], None] | None = None  # before the check that nothing was left behind


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A dataset folder with an earlier ingest (run/data.zarr, run/gt.zarr), segmentation model files
    (good and damaged) and a folder of photos to predict on; each case works on a copy."""
    root = tmp_path_factory.mktemp("corpus")
    folder = write_folder(DATASET, True, root / "dataset")
    config = wconfig.load({"dataset": {"synthetic": DATASET}})
    ingest(
        folder,
        config["dataset"],
        root / "run" / "data.zarr",
        root / "run" / "gt.zarr",
        store.provenance("test"),
    )

    models = root / "models"
    models.mkdir()
    torch.manual_seed(0)
    seg_config = wconfig.load({"device": "cpu", "segment": {**SEGMENT, "model": "deeplab"}})
    net = build_segmenter(seg_config["segment"], len(CLASS_NAMES), True)
    save_model(models / "model.pt", net, seg_config, CLASS_NAMES, True, "segment")
    good = (models / "model.pt").read_bytes()
    (models / "empty.pt").write_bytes(b"")
    (models / "truncated.pt").write_bytes(good[: len(good) // 2])
    (models / "text.pt").write_text("model: deeplab\nweights: somewhere else\n")
    ckpt = torch.load(models / "model.pt", weights_only=True)
    torch.save({k: v for k, v in ckpt.items() if k != "config"}, models / "configless.pt")
    torch.save({**ckpt, "config": {"device": "cpu"}}, models / "no-segment-section.pt")
    torch.save({**ckpt, "stage": "cam"}, models / "cam.pt")
    other = build_segmenter(
        wconfig.load({"segment": {**SEGMENT, "model": "decoupled"}})["segment"], len(CLASS_NAMES), True
    )
    torch.save(
        {**ckpt, "model": other.state_dict()}, models / "foreign.pt"
    )  # deeplab config, decoupled weights

    photos = root / "photos"
    photos.mkdir()
    for k, name in enumerate("abcdefghij"):  # ten readable photos
        Image.fromarray(rgb_image(k)).save(photos / f"{name}.png")
    return root


class Workspace:
    """A fresh copy of the corpus in ``tmp_path`` for one case."""

    def __init__(self, corpus: Path, tmp_path: Path):
        self.tmp = tmp_path
        self.folder = tmp_path / "dataset"
        self.run = tmp_path / "run"
        self.photos = tmp_path / "photos"
        for name in ("dataset", "run", "photos"):
            shutil.copytree(corpus / name, tmp_path / name)
        self.models = corpus / "models"  # read-only use
        self.train = (self.folder / "train.txt").read_text().split()
        self.val = (self.folder / "val.txt").read_text().split()

    def ingest(self, config: dict | None = None) -> list[str]:
        return [
            "ingest",
            "--config",
            json.dumps({"dataset": {"synthetic": DATASET, **(config or {})}}),
            "--root",
            str(self.folder),
            "--data",
            str(self.run / "data.zarr"),
            "--gt",
            str(self.run / "gt.zarr"),
        ]

    def predict(self, *inputs, model: str = "model.pt", out: Path | None = None, extra=()) -> list[str]:
        return [
            "predict",
            "--model",
            str(self.models / model),
            *map(str, inputs),
            "--out",
            str(out or self.tmp / "out"),
            "--device",
            "cpu",
            *extra,
        ]

    def replace_image(self, image_id: str, data: bytes, suffix: str = ".jpg") -> Path:
        (self.folder / "JPEGImages" / f"{image_id}.png").unlink()
        path = self.folder / "JPEGImages" / f"{image_id}{suffix}"
        path.write_bytes(data)
        return path

    def add_train_image(
        self,
        image_id: str,
        rgb: np.ndarray,
        mask: np.ndarray,
        image_file: bytes | None = None,
        suffix: str = ".png",
    ) -> Path:
        path = self.folder / "JPEGImages" / f"{image_id}{suffix}"
        if image_file is None:
            Image.fromarray(rgb).save(path)
        else:
            path.write_bytes(image_file)
        save_palette_png(self.folder / "SegmentationClass" / f"{image_id}.png", mask, class_palette(4))
        self.train.append(image_id)
        (self.folder / "train.txt").write_text("\n".join(self.train) + "\n")
        return path

    def stored_image(self, image_id: str) -> np.ndarray:
        return store.get(store.open_store(self.run / "data.zarr", "data"), store.IMAGES, image_id)

    @property
    def stores(self) -> list[Path]:
        return [self.run / "data.zarr", self.run / "gt.zarr"]


def _truncated_jpeg(fraction: float):
    def case(ws: Workspace) -> Case:
        image_id = ws.train[1]
        whole = encoded(rgb_image(1, 32, 40))
        ws.replace_image(image_id, whole[: int(len(whole) * fraction)])
        return Case(
            ws.ingest(), 3, [f"JPEGImages/{image_id}.jpg", "unreadable image", "truncated"], ws.stores
        )

    case.__name__ = f"ingest_jpeg_truncated_to_{round(fraction * 100)}_percent"
    return case


def ingest_truncated_png(ws):
    image_id = ws.val[0]
    path = ws.folder / "JPEGImages" / f"{image_id}.png"
    path.write_bytes(path.read_bytes()[:-40])
    return Case(ws.ingest(), 3, [f"JPEGImages/{image_id}.png", "unreadable image"], ws.stores)


def ingest_empty_image_file(ws):
    image_id = ws.train[0]
    ws.replace_image(image_id, b"")
    return Case(ws.ingest(), 3, [f"JPEGImages/{image_id}.jpg", "empty file"], ws.stores)


def ingest_text_named_jpg(ws):
    image_id = ws.train[2]
    ws.replace_image(image_id, b"<html>not found</html>\n")
    return Case(ws.ingest(), 3, [f"JPEGImages/{image_id}.jpg", "unreadable image"], ws.stores)


def ingest_duplicate_id_in_train(ws):
    (ws.folder / "train.txt").write_text("\n".join(ws.train + [ws.train[1]]) + "\n")
    return Case(ws.ingest(), 3, ["train.txt", f"'{ws.train[1]}'", "more than once"], ws.stores)


def ingest_id_in_train_and_val(ws):
    (ws.folder / "val.txt").write_text("\n".join(ws.val + [ws.train[0]]) + "\n")
    return Case(ws.ingest(), 3, ["train.txt", "val.txt", f"'{ws.train[0]}'", "both"], ws.stores)


def ingest_empty_label_set_without_background(ws):
    labels = ws.tmp / "labels.csv"
    rows = (
        [f"{i},apple" for i in ws.train[:2]]
        + [f"{ws.train[2]},"]
        + [f"{i},brick" for i in ws.train[3:] + ws.val]
    )
    labels.write_text("id,labels\n" + "\n".join(rows) + "\n")
    return Case(
        ws.ingest({"has_background": False, "labels_file": str(labels)}),
        3,
        ["labels.csv", f"'{ws.train[2]}'", "no labels"],
        ws.stores,
    )


def ingest_mask_of_only_ignore_without_background(ws):
    image_id = ws.val[1]
    save_palette_png(
        ws.folder / "SegmentationClass" / f"{image_id}.png",
        np.full((32, 40), 255, np.uint8),
        class_palette(4),
    )
    return Case(
        ws.ingest({"has_background": False}),
        3,
        [f"SegmentationClass/{image_id}.png", f"'{image_id}'", "no labels"],
        ws.stores,
    )


def ingest_all_background_image_with_background(ws):
    image_id = ws.train[3]
    save_palette_png(
        ws.folder / "SegmentationClass" / f"{image_id}.png", np.zeros((32, 40), np.uint8), class_palette(4)
    )

    def check(output):
        info, _ = open_data(ws.run / "data.zarr")
        assert info.image_labels(image_id).tolist() == [0]
        assert "1 images have no foreground label (all background)" in output

    return Case(ws.ingest(), 0, check=check)


def ingest_unusual_but_valid_images(ws):
    """1x1, grey, 16-bit colour and grey PNG, CMYK and EXIF-rotated JPEG, a name with spaces and
    unicode, a mask with a palette of other colours."""
    one = np.array([[[200, 30, 90]]], np.uint8)
    grey, deep, cmyk, displayed = rgb_image(2)[..., 0], rgb_image(3), rgb_image(4), rgb_image(5)
    ws.add_train_image("tiny 1x1", one, np.ones((1, 1), np.uint8))
    ws.add_train_image("grey", None, np.ones(grey.shape, np.uint8), image_file=encoded(grey, "PNG"))
    ws.add_train_image(
        "deep16", None, np.ones(grey.shape, np.uint8), image_file=png16(deep.astype(np.uint16) * 257)
    )
    ws.add_train_image(
        "grey16", None, np.ones(grey.shape, np.uint8), image_file=png16(grey.astype(np.uint16) * 257)
    )
    ws.add_train_image(
        "cmyk",
        None,
        np.ones(grey.shape, np.uint8),
        image_file=encoded(Image.fromarray(cmyk).convert("CMYK")),
        suffix=".jpg",
    )
    ws.add_train_image(
        "exif", None, np.ones(grey.shape, np.uint8), image_file=exif_rotated_jpeg(displayed), suffix=".jpg"
    )
    ws.add_train_image(ODD_NAME, rgb_image(6), np.full(grey.shape, 2, np.uint8))
    mask_path = ws.folder / "SegmentationClass" / f"{ws.val[0]}.png"
    with Image.open(mask_path) as im:
        indices = np.array(im)
    recoloured = Image.fromarray(indices, mode="P")
    recoloured.putpalette([(37 * i + 11) % 256 for i in range(768)])
    recoloured.save(mask_path)

    def check(output):
        info, _ = open_data(ws.run / "data.zarr")
        grey_rgb = np.repeat(grey[..., None], 3, 2)
        np.testing.assert_array_equal(ws.stored_image("tiny 1x1"), one)
        np.testing.assert_array_equal(ws.stored_image("grey"), grey_rgb)
        np.testing.assert_array_equal(ws.stored_image("deep16"), deep)  # 16 bits -> their high byte
        np.testing.assert_array_equal(ws.stored_image("grey16"), grey_rgb)
        assert np.abs(ws.stored_image("cmyk").astype(int) - cmyk).mean() < 12  # its colours, not inverted
        rotated = ws.stored_image("exif")
        assert rotated.shape == displayed.shape  # 24x30 as displayed, not the stored 30x24
        assert np.abs(rotated.astype(int) - displayed).mean() < 12  # turned the right way
        assert info.image_labels(ODD_NAME).tolist() == [0, 2]
        gt = store.open_store(ws.run / "gt.zarr", "gt")
        np.testing.assert_array_equal(store.get(gt, store.MASKS, ws.val[0]), indices)  # indices, not colours

    return Case(ws.ingest(), 0, check=check)


# --- predict ---------------------------------------------------------------------------------------


def _with_truncated_photo(ws: Workspace) -> Path:
    bad = ws.photos / "b2.jpg"  # sorts third of eleven
    whole = encoded(rgb_image(11))
    bad.write_bytes(whole[: len(whole) // 2])
    return bad


def _written(ws: Workspace) -> list[str]:
    return sorted(p.name for p in (ws.tmp / "out").iterdir())


def predict_one_unreadable_among_eleven(ws):
    _with_truncated_photo(ws)

    def after():
        assert _written(ws) == [f"{n}.png" for n in "abcdefghij"]  # the ten others, also those after it

    return Case(
        ws.predict(ws.photos),
        3,
        ["skipped 1 of 11 images", "photos/b2.jpg", "wrote 10 label maps"],
        [ws.photos],
        after=after,
    )


def predict_strict_stops_at_the_unreadable_image(ws):
    _with_truncated_photo(ws)

    def after():
        assert _written(ws) == ["a.png", "b.png"]

    return Case(
        ws.predict(ws.photos, extra=["--strict"]),
        3,
        ["photos/b2.jpg", "unreadable image", "truncated"],
        [ws.photos],
        after=after,
    )


def predict_out_is_the_input_folder(ws):
    return Case(
        ws.predict(ws.photos, out=ws.photos),
        3,
        [str(ws.photos), "output folder is the folder of"],
        [ws.photos],
    )


def predict_out_inside_the_input_folder(ws):
    return Case(
        ws.predict(ws.photos, out=ws.photos / "labels"),
        3,
        ["photos/labels", "inside the folder"],
        [ws.photos],
    )


def predict_out_is_the_folder_of_an_input_file(ws):
    return Case(
        ws.predict(ws.photos / "a.png", out=ws.photos), 3, [str(ws.photos), "output folder"], [ws.photos]
    )


def predict_existing_output_without_overwrite(ws):
    out = ws.tmp / "out"
    out.mkdir()
    (out / "b.png").write_bytes(b"an earlier result")
    return Case(ws.predict(ws.photos, out=out), 3, ["out/b.png", "exists", "--overwrite"], [ws.photos, out])


def predict_existing_output_with_overwrite(ws):
    out = ws.tmp / "out"
    out.mkdir()
    (out / "b.png").write_bytes(b"an earlier result")

    def check(output):
        with Image.open(out / "b.png") as im:
            assert im.mode == "P" and im.size == (30, 24)

    return Case(ws.predict(ws.photos, out=out, extra=["--overwrite"]), 0, protected=[ws.photos], check=check)


def _model_case(model: str, *names: str):
    def case(ws: Workspace) -> Case:
        return Case(
            ws.predict(ws.photos / "a.png", model=model),
            3,
            [f"models/{model}", *names],
            [ws.photos, ws.models],
        )

    case.__name__ = f"predict_model_{model.replace('.pt', '').replace('-', '_')}"
    return case


class RunsACommand:
    """Unpickled without ``weights_only``, creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def _pickle_case(name: str, save: Callable[[Path, object], None], *names: str):
    def case(ws: Workspace) -> Case:
        marker, evil = ws.tmp / "PWNED", ws.tmp / "evil.pt"
        save(evil, {"model": RunsACommand(marker), "stage": "segment"})

        def after():
            assert not marker.exists()

        return Case(
            ws.predict(ws.photos / "a.png", model=str(evil)), 3, ["evil.pt", *names], [ws.photos], after=after
        )

    case.__name__ = name
    return case


def _raw_pickle(path: Path, obj) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=5))


def predict_unusual_but_valid_images(ws):
    folder = ws.tmp / "odd"
    folder.mkdir()
    (folder / "one.png").write_bytes(encoded(np.array([[[200, 30, 90]]], np.uint8), "PNG"))
    (folder / "grey.png").write_bytes(encoded(rgb_image(2)[..., 0], "PNG"))
    (folder / "deep16.png").write_bytes(png16(rgb_image(3).astype(np.uint16) * 257))
    (folder / "cmyk.jpg").write_bytes(encoded(Image.fromarray(rgb_image(4)).convert("CMYK")))
    (folder / "exif.jpg").write_bytes(exif_rotated_jpeg(rgb_image(5)))
    (folder / f"{ODD_NAME}.png").write_bytes(encoded(rgb_image(6), "PNG"))
    out = ws.tmp / "out"

    def check(output):
        sizes = {}
        for png in out.iterdir():
            with Image.open(png) as im:
                sizes[png.stem] = im.size
        assert sizes == {
            "one": (1, 1),
            "grey": (30, 24),
            "deep16": (30, 24),
            "cmyk": (30, 24),
            "exif": (30, 24),
            ODD_NAME: (30, 24),
        }  # the EXIF image as displayed

    return Case(ws.predict(folder, out=out), 0, protected=[folder], check=check)


# --- the run lock, temporaries of killed writers --------------------------------------------------------


def _superpixels(ws: Workspace) -> list[str]:
    return [
        "superpixels",
        "--config",
        json.dumps({"superpixels": {"n_segments": 20}}),
        "--data",
        str(ws.run / "data.zarr"),
        "--out",
        str(ws.run / "superpixels.zarr"),
    ]


def hand_command_into_a_locked_run(ws):
    """A command run by hand while another live process (here: this one, with a token the command
    does not have) writes the run."""
    held = store.acquire_run_lock(ws.run, command="snakemake --cores 2")

    def after():
        assert not (ws.run / "superpixels.zarr").exists()

    return Case(
        _superpixels(ws),
        3,
        [str(ws.run), f"pid {os.getpid()}", socket.gethostname(), held["started"], "snakemake --cores 2"],
        [*ws.stores, ws.run / store.RUN_LOCK],
        after=after,
        cleanup=lambda: store.release_run_lock(ws.run, held["token"]),
    )


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def stale_lock_of_a_killed_forcerun(ws):
    """The lock of a `snakemake --forcerun crf` that was killed: taken over, with what to do."""
    (ws.run / store.RUN_LOCK).write_text(
        json.dumps(
            {
                "pid": dead_pid(),
                "host": socket.gethostname(),
                "started": "2020-01-01T00:00:00+00:00",
                "started_unix": time.time() - 60,
                "token": "old",
                "command": "snakemake --cores 2 --forcerun crf",
            }
        )
    )

    def check(output):
        assert "taking over the run lock of pid" in output and "which is gone" in output
        assert "--forcerun" in output and "repeat that command" in output
        assert store.open_store(ws.run / "superpixels.zarr", "superpixels")

    return Case(_superpixels(ws), 0, protected=ws.stores, check=check)


def temporaries_of_killed_writers(ws):
    """A killed superpixels job left its temporary store; an older version's name had no writer."""
    killed = ws.run / f"superpixels.zarr.tmp-0badf00d-{dead_pid()}-{socket.gethostname()}"
    (killed / "maps").mkdir(parents=True)
    (killed / "maps" / "chunk").write_bytes(b"x" * 1000)
    unnamed = ws.run / "superpixels.zarr.tmp-1a2b3c4d"
    unnamed.mkdir()
    os.utime(unnamed, (time.time() - 3600, time.time() - 3600))
    torch_tmp = ws.run / "cam" / "checkpoints" / f"last.pt.tmp-12345678-{dead_pid()}-{socket.gethostname()}"
    torch_tmp.parent.mkdir(parents=True)
    torch_tmp.write_bytes(b"half a checkpoint")

    def check(output):
        assert not killed.exists() and not unnamed.exists()
        assert torch_tmp.exists()  # a sibling of another file: swept when that file is written
        torch_tmp.unlink()

    return Case(_superpixels(ws), 0, protected=ws.stores, check=check)


CASES = [
    _truncated_jpeg(0.5),
    _truncated_jpeg(0.02),
    ingest_truncated_png,
    ingest_empty_image_file,
    ingest_text_named_jpg,
    ingest_duplicate_id_in_train,
    ingest_id_in_train_and_val,
    ingest_empty_label_set_without_background,
    ingest_mask_of_only_ignore_without_background,
    ingest_all_background_image_with_background,
    ingest_unusual_but_valid_images,
    predict_one_unreadable_among_eleven,
    predict_strict_stops_at_the_unreadable_image,
    predict_out_is_the_input_folder,
    predict_out_inside_the_input_folder,
    predict_out_is_the_folder_of_an_input_file,
    predict_existing_output_without_overwrite,
    predict_existing_output_with_overwrite,
    _model_case("empty.pt", "empty file"),
    _model_case("truncated.pt", "truncated"),
    _model_case("text.pt", "not a PyTorch model file", "b'model: d'"),
    _model_case("configless.pt", "lacks config"),
    _model_case("no-segment-section.pt", "lacks the 'segment' section"),
    _model_case("cam.pt", "not a weakseg segment model"),
    _model_case("foreign.pt", "weights do not fit", "missing keys such as", "unexpected keys such as"),
    _pickle_case(
        "predict_model_pickled_object",
        lambda path, obj: torch.save(obj, path),
        "pickled Python objects (posix.system)",
        "refused without running them",
    ),
    _pickle_case("predict_model_raw_pickle", _raw_pickle, "pickle of more than tensors", "refused"),
    predict_unusual_but_valid_images,
    hand_command_into_a_locked_run,
    stale_lock_of_a_killed_forcerun,
    temporaries_of_killed_writers,
]


@pytest.mark.parametrize("make_case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_corpus(make_case, corpus, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="weakseg")
    ws = Workspace(corpus, tmp_path)
    case = make_case(ws)
    before = {path: tree_digest(path) for path in case.protected}
    code = cli.main(case.argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    if case.code:
        assert code == case.code and len(errors) == 1, err
        line = errors[0]
        assert line.startswith(f"weakseg {case.argv[0]}: error: ") and len(line) < 700, line
        for part in case.names:
            assert part.lower() in line.lower(), f"{part!r} not in {line!r}"
    else:
        assert code == 0 and not errors, err
        case.check(err + caplog.text)
    for path, digest in before.items():
        assert tree_digest(path) == digest, f"{path} was changed"
    if case.after:
        case.after()
    if case.cleanup:
        case.cleanup()
    litter = [p for p in tmp_path.rglob("*") if store.TMP_MARK in p.name or p.name == store.RUN_LOCK]
    assert not litter, f"left behind: {litter}"


# ------------------------------------------------------------------ predict --overlay


def test_legend_has_a_row_per_class_with_its_colour_and_name():
    from weakseg.segment.predict import LEGEND_MARGIN, LEGEND_ROW, LEGEND_SWATCH, render_legend

    entries = [("background", (0, 0, 0)), ("aeroplane", (128, 0, 0)), ("cow", (64, 128, 0))]
    legend = render_legend(entries)
    assert legend.shape[0] == 3 * LEGEND_ROW and legend.dtype == np.uint8
    text_x = LEGEND_MARGIN + LEGEND_SWATCH + 2
    rows = [legend[r * LEGEND_ROW : (r + 1) * LEGEND_ROW] for r in range(3)]
    for row, (_, colour) in zip(rows, entries):
        centre = row[LEGEND_ROW // 2, LEGEND_MARGIN + LEGEND_SWATCH // 2]
        assert tuple(centre) == colour
        assert (row[:, text_x:] < 128).any()  # the name is drawn
    assert not np.array_equal(rows[1][:, text_x:], rows[2][:, text_x:])  # different names
    assert legend.shape[1] > text_x + 40  # wide enough for the longest name


def test_predict_overlay_blends_label_colours_over_the_image(corpus, tmp_path):
    from weakseg.segment.predict import LEGEND_FILE, LEGEND_ROW, OVERLAY_ALPHA

    out = tmp_path / "out"
    photos = [corpus / "photos" / f"{name}.png" for name in "abc"]
    assert (
        cli.main(
            [
                "predict",
                "--model",
                str(corpus / "models" / "model.pt"),
                *map(str, photos),
                "--out",
                str(out),
                "--overlay",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    palette = class_palette(len(CLASS_NAMES))
    present = set()
    for photo in photos:
        image = np.array(Image.open(photo).convert("RGB"), np.float64)
        labels = np.array(Image.open(out / f"{photo.stem}.png"))
        overlay = np.array(Image.open(out / f"{photo.stem}_overlay.png").convert("RGB"), np.float64)
        expected = OVERLAY_ALPHA * palette[labels] + (1 - OVERLAY_ALPHA) * image
        assert overlay.shape == image.shape and np.abs(overlay - expected).max() <= 1
        present.update(np.unique(labels).tolist())
    legend = np.array(Image.open(out / LEGEND_FILE).convert("RGB"))
    assert legend.shape[0] == len(present) * LEGEND_ROW  # the classes found, not all classes
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [LEGEND_FILE] + [f"{p.stem}{s}" for p in photos for s in (".png", "_overlay.png")]
    )


# ------------------------------------------------------------------ the run lock and temporaries


def test_run_lock_refuses_others_lets_the_holders_jobs_write_and_is_released_by_its_holder_only(
    tmp_path, monkeypatch
):
    run = tmp_path / "results" / "demo"
    held = store.acquire_run_lock(run, command="snakemake --cores 2")
    lock = json.loads((run / store.RUN_LOCK).read_text())
    assert (
        lock["pid"] == os.getpid() and lock["host"] == socket.gethostname() and lock["token"] == held["token"]
    )
    with pytest.raises(store.RunLockedError, match=f"pid {os.getpid()} on {socket.gethostname()} since"):
        store.acquire_run_lock(run)
    out = run / "pseudo" / "crf.zarr"
    assert store.run_dir_of(out) == run.absolute()
    with pytest.raises(store.RunLockedError):  # a command run by hand
        with store.run_writer([out]):
            pass
    monkeypatch.setenv(store.RUN_LOCK_TOKEN, held["token"])  # a job the holder started
    with store.run_writer([out]):
        assert json.loads((run / store.RUN_LOCK).read_text())["token"] == held["token"]
    assert (run / store.RUN_LOCK).exists()  # the job did not release its holder's lock
    store.release_run_lock(run, "another token")
    assert (run / store.RUN_LOCK).exists()
    store.release_run_lock(run, held["token"])
    assert not (run / store.RUN_LOCK).exists()
    monkeypatch.delenv(store.RUN_LOCK_TOKEN)
    (run / store.DATA_STORE).mkdir()  # a run folder, known by its data store once the lock is gone
    with store.run_writer([out]):  # by hand, unlocked: holds the lock while it writes
        assert json.loads((run / store.RUN_LOCK).read_text())["pid"] == os.getpid()
    assert not (run / store.RUN_LOCK).exists()
    assert store.run_dir_of(tmp_path / "elsewhere" / "x.zarr") is None  # not in a run: no lock


def test_lock_of_a_reused_pid_or_a_zombie_is_stale(tmp_path):
    """A lock whose pid now belongs to another process (it started later), or to a process that
    has ended but is not yet reaped, is taken over."""
    run = tmp_path / "run"
    run.mkdir()
    (run / store.RUN_LOCK).write_text(
        json.dumps(
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "process_start": "1",
                "token": "t",
                "started": "long ago",
            }
        )
    )
    assert store.acquire_run_lock(run)["pid"] == os.getpid()
    zombie = subprocess.Popen(["true"])
    deadline = time.monotonic() + 30
    while Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    (run / store.RUN_LOCK).write_text(
        json.dumps({"pid": zombie.pid, "host": socket.gethostname(), "token": "z"})
    )
    assert store.acquire_run_lock(run)["pid"] == os.getpid()
    zombie.wait()
    (run / store.RUN_LOCK).write_text(json.dumps({"pid": dead_pid(), "host": "another-host", "token": "t"}))
    with pytest.raises(store.RunLockedError, match="on another-host"):  # cannot see that host's processes
        store.acquire_run_lock(run)


def test_sweep_removes_temporaries_of_killed_writers_only(tmp_path):
    run = tmp_path / "run"
    (run / "pseudo" / "shards").mkdir(parents=True)
    final = run / "pseudo" / "shards" / "crf-0.zarr"
    host = socket.gethostname()
    killed = final.with_name(f"crf-0.zarr.tmp-00000001-{dead_pid()}-{host}")
    live = final.with_name(f"crf-0.zarr.tmp-00000002-1-{host}")  # pid 1 runs
    other_host = final.with_name(f"crf-0.zarr.tmp-00000003-{dead_pid()}-another-host")
    other_shard = final.with_name(f"crf-1.zarr.tmp-00000004-{dead_pid()}-{host}")
    for path in (killed, live, other_host, other_shard):
        path.mkdir()
    assert store.sweep_orphans(final) == [killed]  # no run lock: only what is surely dead
    held = store.acquire_run_lock(run)
    newer = final.with_name(f"crf-0.zarr.tmp-00000005-1-{host}")
    newer.mkdir()
    os.utime(newer, (held["started_unix"] + 5, held["started_unix"] + 5))
    for path in (live, other_host):  # older than the run that holds the lock: an earlier run's
        os.utime(path, (held["started_unix"] - 5, held["started_unix"] - 5))
    assert sorted(store.sweep_orphans(final)) == sorted([live, other_host])
    assert newer.exists() and other_shard.exists()  # a writer of this run; another store's
    store.release_run_lock(run, held["token"])


def test_writing_a_store_sweeps_and_a_failed_writer_leaves_nothing(tmp_path):
    final = tmp_path / "labels.zarr"
    orphan = tmp_path / f"labels.zarr.tmp-0000000a-{dead_pid()}-{socket.gethostname()}"
    orphan.mkdir()
    with pytest.raises(RuntimeError):
        with store.writing(final, "labels", store.provenance("test")):
            raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    with store.writing(final, "labels", store.provenance("test")) as group:
        store.put(group, store.LABELS, "x", np.zeros((2, 2), np.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.zarr"]


# ------------------------------------------------------------------ exit status and -v


def test_verbose_shows_the_traceback_of_a_data_error_and_bugs_keep_theirs(tmp_path, capsys, monkeypatch):
    argv = [
        "superpixels",
        "--config",
        "{}",
        "--data",
        str(tmp_path / "missing.zarr"),
        "--out",
        str(tmp_path / "s.zarr"),
    ]
    assert cli.main(argv) == 3
    assert "Traceback" not in capsys.readouterr().err
    assert cli.main(["-v", *argv]) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and "StoreError" in err and "weakseg superpixels: error: " in err

    def bug(config):
        raise ZeroDivisionError("a bug")

    import dataclasses

    from weakseg import superpixels

    monkeypatch.setattr(superpixels, "COMMAND", dataclasses.replace(superpixels.COMMAND, run=bug))
    with pytest.raises(ZeroDivisionError):  # uncaught: Python prints the traceback and exits with 1
        cli.main(argv)


# ------------------------------------------------------------------ the lock through Snakemake


@pytest.mark.filterwarnings("ignore:Object at .snakemake_timestamp")
def test_workflow_refuses_a_run_held_from_elsewhere_and_takes_over_a_stale_lock(tmp_path):
    """Two workflows on one results/<run> from different working directories: the second is refused
    naming the first; once the first is gone (killed), its lock is taken over, the jobs write under the
    workflow's lock and the lock is gone when the workflow ends."""
    from e2e.test_workflow import SNAKEMAKE, TINY, check_ok, snakemake

    if not SNAKEMAKE.exists():
        pytest.skip(f"snakemake not installed next to {sys.executable}")
    import yaml

    results = tmp_path / "results"  # absolute, so both working directories write the same run
    config = {**yaml.safe_load(TINY.read_text()), "results": str(results)}
    configfile = tmp_path / "tiny.yaml"
    configfile.write_text(yaml.safe_dump(config))
    run = results / "tiny"
    first = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from weakseg import store; "
            "store.acquire_run_lock(sys.argv[1], command='snakemake --cores 2 (the first workflow)'); "
            "print('held', flush=True); time.sleep(600)",
            str(run),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert first.stdout.readline().strip() == "held"
        (tmp_path / "a").mkdir()
        refused = snakemake(tmp_path / "a", str(run / "data.zarr"), configfile=configfile)
        output = refused.stdout + refused.stderr
        assert refused.returncode != 0
        assert f"being written by pid {first.pid} on {socket.gethostname()}" in output, output[-3000:]
        assert not (run / "data.zarr").exists()
    finally:
        first.kill()
        first.wait()
    (tmp_path / "b").mkdir()
    output = check_ok(snakemake(tmp_path / "b", str(run / "data.zarr"), configfile=configfile))
    assert f"taking over the run lock of pid {first.pid}" in output
    assert store.open_store(run / "data.zarr", "data")  # ingest wrote into the locked run: it had the token
    assert not (run / store.RUN_LOCK).exists()
    assert not [p for p in run.rglob("*") if store.TMP_MARK in p.name]
