"""Inspection panels and the HTML report, on a tiny hand-built run directory."""

from __future__ import annotations

import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import browser
import cv2
import numpy as np
import pandas as pd
import pytest

from weakseg import store
from weakseg.inspect import panels as pn
from weakseg.inspect import report as rp
from weakseg.palette import class_palette

CLASSES = ["background", "cat", "dog"]
H, W = 20, 24
# image id -> (split, labelled classes)
IMAGES = {"a": ("train", [0, 1]), "b": ("train", [0, 2]), "c": ("val", [0, 1, 2])}
PALETTE = class_palette(len(CLASSES))


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def _mask(image_id: str) -> np.ndarray:
    """Ground truth: background with the image's first fg class in the left half, 2nd in the right."""
    m = np.zeros((H, W), np.uint8)
    fg = [c for c in IMAGES[image_id][1] if c]
    m[5:15, 2:10] = fg[0]
    if len(fg) > 1:
        m[5:15, 14:22] = fg[1]
    m[0, :] = 255  # a void row
    return m


def _pseudo(image_id: str) -> np.ndarray:
    """Pseudo-labels: the gt fg box, background in the top-left corner, the rest ignore."""
    labels = np.full((H, W), 255, np.uint8)
    gt = _mask(image_id)
    labels[5:15, 2:10] = gt[5:15, 2:10]
    labels[1:4, 0:4] = 0
    return labels


def _prov(stage):
    return store.provenance(stage)


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    layout = store.RunLayout(tmp_path / "run")
    ids = list(IMAGES)
    labels = np.zeros((len(ids), len(CLASSES)), np.uint8)
    for row, image_id in enumerate(ids):
        labels[row, IMAGES[image_id][1]] = 1
    splits = {
        "train": [i for i in ids if IMAGES[i][0] == "train"],
        "val": [i for i in ids if IMAGES[i][0] == "val"],
    }
    with store.writing(
        layout.data,
        "data",
        _prov("ingest"),
        {"class_names": CLASSES, "has_background": True, "ids": ids, "splits": splits},
    ) as g:
        for k, image_id in enumerate(ids):
            store.put(g, store.IMAGES, image_id, _image(k))
        g.create_array("labels", shape=labels.shape, dtype=labels.dtype)[...] = labels
    with store.writing(layout.gt, "gt", _prov("ingest")) as g:
        for image_id in ids:
            store.put(g, store.MASKS, image_id, _mask(image_id))
    with store.writing(layout.superpixels, "superpixels", _prov("superpixels")) as g:
        yy, xx = np.indices((H, W))
        for image_id in ids:
            store.put(g, store.SUPERPIXELS, image_id, ((yy // 5) * 5 + xx // 6).astype(np.int32))
    with store.writing(layout.scores, "scores", _prov("infer-cam")) as g:
        for image_id in ids:
            fg = [c for c in IMAGES[image_id][1] if c] if IMAGES[image_id][0] == "train" else [1, 2]
            maps = np.stack([(_mask(image_id) == c).astype(np.float32) for c in fg])
            store.put_scores(g, store.CAM, image_id, maps, fg)
            store.put_scores(g, store.SPCAM, image_id, maps * 0.5, fg)
    for name in ("cleaned", "crf", "reliable"):
        with store.writing(layout.pseudo(name), "labels", _prov(name)) as g:
            for image_id in splits["train"]:
                store.put(g, store.LABELS, image_id, _pseudo(image_id))
    with store.writing(layout.round_labels(1, "crf", "train"), "labels", _prov("round1")) as g:
        for image_id in splits["train"]:
            store.put(
                g,
                store.LABELS,
                image_id,
                np.where(_mask(image_id) == 255, 0, _mask(image_id)).astype(np.uint8),
            )
    with store.writing(layout.round_labels(1, "crf", "val"), "labels", _prov("round1")) as g:
        store.put(g, store.LABELS, "c", np.zeros((H, W), np.uint8))
    with store.writing(layout.round_scores(1, "val"), "scores", _prov("round1")) as g:  # not a labels store
        store.put_scores(g, "seg", "c", np.full((3, H, W), 1 / 3, np.float32), [0, 1, 2])
    rows = []
    for stage, split, miou in (("cam", "train", 0.4), ("crf", "train", 0.6), ("round1", "val", 0.5)):
        rows += [
            (stage, split, "miou", "", miou),
            (stage, split, "pixel_acc", "", miou + 0.2),
            (stage, split, "mean_class_acc", "", miou + 0.1),
            (stage, split, "labelled_fraction", "", 0.9),
        ]
        rows += [(stage, split, "iou", name, miou) for name in CLASSES]
    pd.DataFrame(rows, columns=["stage", "split", "metric", "class", "value"]).to_csv(
        layout.metrics, index=False
    )
    layout.metrics_dir.mkdir()
    pd.DataFrame({"id": ["a", "b"], "miou": [0.9, 0.3], "pixel_acc": [0.95, 0.5]}).to_csv(
        layout.metrics_dir / "crf_train_per_image.csv", index=False
    )
    pd.DataFrame(
        {"threshold": [0.1, 0.2, 0.3], "miou": [0.3, 0.5, 0.4], "mean_class_acc": [0.4, 0.6, 0.5]}
    ).to_csv(layout.metrics_dir / "cam_train_sweep.csv", index=False)
    pd.DataFrame(
        {
            "id": ["a", "b"],
            "class": [1, 2],
            "class_name": ["cat", "dog"],
            "area": [80, 80],
            "perimeter": [36, 36],
            "divergence": [0.2, 0.7],
            "consistency": [0.8, 0.3],
            "score": [0.2, 0.7],
            "rank": [1, 2],
            "selected": [1, 0],
            "image_selected": [1, 0],
            "image_score": [0.2, 0.7],
        }
    ).to_csv(layout.reliability, index=False)
    pd.DataFrame({"k": [1, 2], "fraction": [0.5, 1.0], "miou": [0.8, 0.6]}).to_csv(
        layout.root / "pseudo" / "reliability_curve.csv", index=False
    )
    pd.DataFrame(
        {"iteration": [1, 2, 3], "loss": [1.0, 0.7, 0.5], "gap": [0.5, 0.4, 0.3], "lr": [1e-3] * 3}
    ).to_csv(layout.cam_dir / "train_log.csv", index=False)
    return layout.root


def _read_png(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert bgr is not None, f"{path} is not a readable PNG"
    return bgr[..., ::-1]


# ------------------------------------------------------------------------------------------- core
def test_colorize_labels_uses_palette_and_a_hatch_no_class_shares():
    labels = np.array([[0, 1, 2], [255, 255, 255]], np.uint8)
    rgb = pn.colorize_labels(labels, PALETTE)
    for x, c in enumerate([0, 1, 2]):
        assert tuple(rgb[0, x]) == tuple(PALETTE[c])
    hatch_colours = {tuple(v) for v in rgb[1]}
    class_colours = {tuple(v) for v in PALETTE[: len(CLASSES)]}
    assert hatch_colours <= {tuple(c) for c in pn.HATCH_COLOURS}
    assert not hatch_colours & class_colours
    assert len({tuple(v) for v in pn.hatch((6, 6)).reshape(-1, 3)}) == 2  # a pattern, not a flat colour
    with pytest.raises(ValueError, match="palette"):
        pn.colorize_labels(labels, PALETTE[:10])


def test_heatmap_is_red_where_score_is_high_and_blue_where_low():
    image = np.full((4, 4, 3), 128, np.uint8)
    score = np.zeros((4, 4), np.float32)
    score[:, 2:] = 1.0
    out = pn.heatmap_overlay(image, score).astype(int)
    assert out[0, 3, 0] > out[0, 3, 2]  # high score: red dominates
    assert out[0, 0, 2] > out[0, 0, 0]  # low score: blue dominates
    with pytest.raises(ValueError, match="shape"):
        pn.heatmap_overlay(image, score[:2])


def test_superpixel_overlay_marks_only_boundaries():
    image = np.zeros((6, 8, 3), np.uint8)
    sp = np.zeros((6, 8), np.int32)
    sp[:, 4:] = 1
    out = pn.superpixel_overlay(image, sp)
    marked = (out == pn.BOUNDARY_COLOUR).all(axis=2)
    assert marked[:, 3].all() and marked[:, 4].all() and not marked[:, [0, 1, 2, 5, 6, 7]].any()
    sp[4:, :] = 2  # a horizontal edge too
    marked = (pn.superpixel_overlay(image, sp) == pn.BOUNDARY_COLOUR).all(axis=2)
    assert marked[3, 0] and marked[4, 0] and not marked[0, 0] and not marked[5, 0]


def test_render_panel_size_and_tile_positions():
    image = _image(0)
    label_tile = pn.colorize_labels(_mask("a"), PALETTE)
    legend = [("cat", tuple(int(v) for v in PALETTE[1])), ("ignore", None)]
    panel = pn.render_panel(image, [("gt", label_tile), ("copy", image)], legend, title="a")
    n_tiles = 3
    assert panel.dtype == np.uint8 and panel.shape[2] == 3
    assert panel.shape[1] == n_tiles * W + (n_tiles + 1) * pn.GAP
    legend_height = panel.shape[0] - (pn.GAP + pn.TITLE_HEIGHT + H + pn.GAP)
    n_rows, rest = divmod(legend_height - pn.GAP, pn.LEGEND_ROW_HEIGHT)
    assert n_rows >= 1 and rest == 0  # narrow panel: the two entries may wrap to two rows
    assert panel.shape[:2] == pn.panel_shape((H, W), n_tiles, n_rows)
    y, x = pn.tile_origin(1, (H, W))
    np.testing.assert_array_equal(panel[y : y + H, x : x + W], label_tile)
    y, x = pn.tile_origin(0, (H, W))
    np.testing.assert_array_equal(panel[y : y + H, x : x + W], image)
    assert pn.render_panel(image, [], ()).shape[:2] == pn.panel_shape((H, W), 1, 0)
    with pytest.raises(ValueError, match="column 'bad'"):
        pn.render_panel(image, [("bad", image[:5])])


def test_upscale_keeps_label_values_in_blocks():
    labels = np.array([[1, 2], [255, 0]], np.uint8)
    big = pn.upscale(labels, 3)
    assert big.shape == (6, 6) and (big[3:, :3] == 255).all() and (big[:3, 3:] == 2).all()
    assert pn.default_scale((20, 24)) == 8 and pn.default_scale((400, 300)) == 1


# ------------------------------------------------------------------------------------------- edge
def test_run_inspect_writes_panels_with_palette_colours(run_dir, tmp_path):
    paths = pn.run_inspect(run_dir, tmp_path / "out", ids=["a", "c"])
    assert paths == [tmp_path / "out" / "a.png", tmp_path / "out" / "c.png"]
    run = pn.RunPanels(run_dir)
    scale = pn.default_scale((H, W))
    titles = tuple(c.title for c in run.columns("a")[1])
    assert titles == (
        "ground truth",
        "superpixels (16)",
        "CAM: cat",
        "SP-CAM: cat",
        "cleaned",
        "crf",
        "reliable",
        "round1_crf",
    )
    assert [c.kind for c in run.columns("a")[1]][:3] == ["labels", "superpixels", "heat"]
    panel = _read_png(paths[0])
    # image + 8 columns in two rows of PER_ROW; the legend (background, cat, ignore, colour bar) fits one row
    assert pn.grid_shape(len(titles) + 1) == (2, pn.PER_ROW)
    assert panel.shape[:2] == pn.panel_shape((H * scale, W * scale), len(titles) + 1, 1)
    # the heat maps' colour bar: blue at its left end, red at its right end
    bar_y = panel.shape[0] - pn.GAP - pn.LEGEND_ROW_HEIGHT // 2
    row = panel[bar_y].astype(int)
    blue = [x for x in range(len(row)) if row[x, 2] > 100 and row[x, 0] < 60 and row[x, 1] < 60]
    assert blue, "no colour bar in the legend"
    end = row[blue[0] : blue[0] + pn.COLOUR_BAR_WIDTH]
    assert any(r > 100 and g < 60 and b < 60 for r, g, b in end[-10:])  # ... running to red

    def pixel(column: str, y: int, x: int) -> tuple:
        ty, tx = pn.tile_origin(titles.index(column) + 1, (H * scale, W * scale))
        return tuple(panel[ty + y * scale + scale // 2, tx + x * scale + scale // 2])

    cat, background = tuple(PALETTE[1]), tuple(PALETTE[0])
    for column in ("ground truth", "cleaned", "crf", "reliable", "round1_crf"):
        assert pixel(column, 10, 5) == cat, column
    assert pixel("cleaned", 2, 2) == background
    assert pixel("cleaned", 18, 20) in {tuple(c) for c in pn.HATCH_COLOURS}  # ignore
    val_titles = [c.title for c in run.columns("c")[1]]
    assert "CAM: dog" in val_titles and "round1_crf" in val_titles and "cleaned" not in val_titles
    c_panel = _read_png(paths[1])
    ty, tx = pn.tile_origin(val_titles.index("ground truth") + 1, (H * scale, W * scale))
    assert tuple(c_panel[ty + 10 * scale, tx + 18 * scale]) == tuple(PALETTE[2])


def test_selection_by_worst_and_class_and_clear_errors(run_dir, tmp_path):
    assert [p.stem for p in pn.run_inspect(run_dir, tmp_path / "w", worst=1, stage="crf")] == ["b"]
    assert [p.stem for p in pn.run_inspect(run_dir, tmp_path / "d", class_name="dog")] == ["b", "c"]
    # 'reliable' has no per-image CSV: computed from its store with weakseg.evaluate (labels are exact -> 1.0)
    layout = store.RunLayout(run_dir)
    run = pn.RunPanels(run_dir)
    miou = pn.stage_miou(layout, "reliable", run.info, ["a", "b", "c"])
    assert set(miou.index) == {"a", "b"} and np.allclose(miou.to_numpy(), 1.0)
    with pytest.raises(pn.SelectionError, match=r"unknown image id\(s\) zz.*e\.g\. a, b, c"):
        pn.run_inspect(run_dir, tmp_path / "x", ids=["zz"])
    with pytest.raises(pn.SelectionError, match="classes: background, cat, dog"):
        pn.run_inspect(run_dir, tmp_path / "x", class_name="horse")
    with pytest.raises(pn.SelectionError, match=r"valid stages: .*crf.*reliable") as error:
        pn.run_inspect(run_dir, tmp_path / "x", worst=2, stage="nope")
    assert "round1_crf" in str(error.value) and "scores_val" not in str(error.value)
    # round1_crf: the round's CRF labels of train images (a, b exact) and of val images (c all background)
    assert [p.stem for p in pn.run_inspect(run_dir, tmp_path / "r", worst=1, stage="round1_crf")] == ["c"]
    with pytest.raises(pn.SelectionError, match="go together"):
        pn.run_inspect(run_dir, tmp_path / "x", worst=2)


def test_missing_stores_drop_columns_without_crashing(run_dir, tmp_path):
    for path in ("pseudo", "cam", "gt.zarr", "superpixels.zarr", "round1"):
        shutil.rmtree(run_dir / path)
    (path,) = pn.run_inspect(run_dir, tmp_path / "out", ids=["a"])
    scale = pn.default_scale((H, W))
    assert _read_png(path).shape[1] == pn.panel_shape((H * scale, W * scale), 1, 0)[1]  # the image alone


MSRC = Path(__file__).resolve().parents[2] / "shared" / "data" / "msrc21"


@pytest.mark.msrc
@pytest.mark.skipif(not MSRC.is_dir(), reason=f"MSRC-21 not found at {MSRC}")
def test_panel_of_a_real_msrc_image_is_fast():
    import time

    from PIL import Image

    image_id = (MSRC / "train.txt").read_text().split()[0]
    image = cv2.imread(str(MSRC / "JPEGImages" / f"{image_id}.jpg"))[..., ::-1].copy()
    mask = np.asarray(Image.open(MSRC / "SegmentationClass" / f"{image_id}.png"))
    names = (MSRC / "classes.txt").read_text().split()
    palette = class_palette(len(names))
    yy, xx = np.indices(mask.shape)
    sp = (yy // 16) * 100 + xx // 16
    score = np.linspace(0, 1, mask.size, dtype=np.float32).reshape(mask.shape)
    start = time.perf_counter()
    columns = [
        ("ground truth", pn.colorize_labels(mask, palette)),
        ("superpixels", pn.superpixel_overlay(image, sp)),
        ("CAM", pn.heatmap_overlay(image, score)),
        ("reliable", pn.colorize_labels(mask, palette)),
    ]
    panel = pn.render_panel(image, columns, pn.legend_for([mask], names, palette), title=image_id)
    elapsed = time.perf_counter() - start
    assert panel.shape[1] == pn.panel_shape(mask.shape, 5, 0)[1]
    y, x = pn.tile_origin(4, mask.shape)
    labelled = np.argwhere(mask != 255)[0]
    assert tuple(panel[y + labelled[0], x + labelled[1]]) == tuple(palette[mask[tuple(labelled)]])
    assert elapsed < 1.0, f"panel took {elapsed:.2f} s"  # target ~0.1 s; loose for a busy machine


# ------------------------------------------------------------------------------------------ report
class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs, self.items, self.external, self.ids = [], [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img" and "src" in a:
            self.srcs.append(a["src"])
        if tag == "div" and a.get("class") == "item":
            self.items.append(a)
        if "id" in a:
            self.ids.append(a["id"])
        for key in ("src", "href"):
            if a.get(key) and not a[key].startswith("data:") and not a[key].startswith("#"):
                self.external.append(a[key])


def _decode(uri: str) -> np.ndarray:
    import base64

    data = np.frombuffer(base64.b64decode(uri.split(",", 1)[1]), np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    assert image is not None, uri[:40]
    return image[..., ::-1]


def test_report_is_one_self_contained_page(run_dir):
    out = rp.write_report(run_dir, None, gallery_images=2)
    assert out == run_dir / "report" / "index.html"
    assert sorted(p.name for p in out.parent.iterdir()) == ["index.html"]
    text = out.read_text()
    page = _Page()
    page.feed(text)
    assert not page.external  # everything inline: opens from disk and inside `snakemake --report`
    assert page.srcs and all(s.startswith("data:image/") for s in page.srcs)
    assert {
        "metrics",
        "per-class",
        "plot-stage_miou",
        "plot-threshold_sweep",
        "plot-reliability_curve",
        "plot-training",
        "gallery",
        "missing",
        "evaluation",
    } <= set(page.ids)
    # 2 of 3 images, spread over the final stage's ranking (crf on train: worst b, best a), with sort/filter data
    items = {i["data-id"]: i for i in page.items}
    assert set(items) == {"a", "b"}
    assert float(items["b"]["data-iou"]) == pytest.approx(0.3)
    assert float(items["b"]["data-reliability"]) == pytest.approx(0.7)
    assert items["b"]["data-classes"] == "background;dog" and items["b"]["data-split"] == "train"
    assert '<td class="name">round1</td>' in text and "0.6000" in text
    # the per-class table has a column per (stage, split) and a row per class
    assert re.search(r"<th>round1<br><small>val</small></th>", text)
    assert all(f'<td class="name">{name}</td>' for name in CLASSES)
    # every tile of an image at native size: the image, then label maps in palette colours
    first_tile = next(s for s in page.srcs if s.startswith("data:image/jpeg"))
    assert _decode(first_tile).shape[:2] == (H, W)
    labels = [s for s in page.srcs if s.startswith("data:image/png")]
    assert any(tuple(_decode(s)[10, 5]) == tuple(PALETTE[2]) for s in labels)  # b's dog box
    assert "heat maps: score 0" in text and 'class="colourbar"' in text
    assert "expected stage(s) not (yet) computed" in text and "<code>round1_gated</code> (val)" in text
    assert not list(run_dir.glob("report/*.tmp-*"))

    rp.write_report(run_dir, None, gallery_images=1)  # replaces the previous page
    page = _Page()
    page.feed(out.read_text())
    assert [i["data-id"] for i in page.items] == ["b"]  # the worst


def test_report_shows_run_metadata_timings_and_mask_counts(run_dir):
    from weakseg import __version__
    from weakseg.config import load, write_resolved

    layout = store.RunLayout(run_dir)
    write_resolved(load({"run": "run", "segment": {"rounds": 1, "eval_crf": False}}), layout.resolved_config)
    layout.benchmarks_dir.mkdir()
    for job, seconds in (("train_cam", 75.5), ("crf", 3.25)):
        (layout.benchmarks_dir / f"{job}.tsv").write_text(
            f"s\th:m:s\tmax_rss\tmax_vms\n{seconds}\t0:01:15\t512.5\t900\n"
        )
    text = rp.write_report(run_dir, None, gallery_images=1).read_text()
    assert f"<dd>{__version__}</dd>" in text and "report written" in text
    assert "Resolved config (config.resolved.yaml)" in text and "eval_crf: false" in text
    assert re.search(r'<td class="name">train_cam</td><td>75.5</td><td>0:01:16</td><td>512</td>', text)
    assert "<th>78.8</th>" in text  # total seconds
    assert "train 2 of 2 images, val 1 of 1 images" in text
    # with one round and no val CRF, only the val stages the fixture lacks are missing
    assert "<code>round1_crf</code> (val)" not in text and "<code>cam_gated</code> (val)" in text


def test_report_without_masks_has_pictures_and_curves_but_no_scores(run_dir):
    for path in ("gt.zarr", "metrics", "metrics.csv", "pseudo/reliability_curve.csv"):
        target = run_dir / path
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    text = rp.write_report(run_dir, None, gallery_images=3).read_text()
    page = _Page()
    page.feed(text)
    assert "No ground-truth masks" in text
    assert "metrics" not in page.ids and "per-class" not in page.ids and "plot-stage_miou" not in page.ids
    assert "plot-training" in page.ids and len(page.items) == 3
    assert all(i["data-iou"] == "" for i in page.items)


def test_images_evaluated_say_n_of_split():
    rows = [
        ("crf", "train", "n_images", "", 3.0),
        ("crf", "train", "split_images", "", 5.0),
        ("cam", "train", "n_images", "", 4.0),
        ("crf", "train", "miou", "", 0.5),
    ]
    metrics = pd.DataFrame(rows, columns=["stage", "split", "metric", "class", "value"])
    assert rp.images_evaluated(metrics) == {("crf", "train"): "3 of 5", ("cam", "train"): "4"}


def test_final_stage_is_the_last_with_per_image_scores_in_pipeline_order():
    rows = [
        (s, sp, "miou", "", 0.5)
        for s, sp in (
            ("cam", "train"),
            ("crf", "train"),
            ("round1", "train"),
            ("round1", "val"),
            ("round1_crf", "val"),
        )
    ]
    metrics = pd.DataFrame(rows, columns=["stage", "split", "metric", "class", "value"])
    per_image = [("round1_crf", "val"), ("crf", "train"), ("round1", "train"), ("round1", "val")]
    assert rp.final_stages(metrics, per_image) == {"val": "round1_crf", "train": "round1"}


def test_gallery_order_spreads_over_the_ranking_and_fills_with_unscored():
    miou = pd.Series({"p": 0.9, "q": 0.1, "r": 0.5, "s": 0.3, "t": float("nan")})
    ids = ["p", "q", "r", "s", "t", "u"]
    assert rp.gallery_order(miou, ids, 3) == ["q", "r", "p"]  # worst, middle, best
    assert rp.gallery_order(miou, ids, 6) == ["q", "s", "r", "p", "t", "u"]
    assert rp.gallery_order(None, ids, 2) == ["p", "u"]


def test_stage_table_rows_follow_metrics_order():
    rows = [
        ("spcam", "train", "miou", "", 0.5),
        ("spcam", "train", "iou", "cat", 0.1),
        ("crf", "train", "pixel_acc", "", 0.8),
        ("crf", "train", "miou", "", 0.6),
        ("round1", "val", "miou", "", 0.7),
        ("round1", "val", "n_images", "", 3),
    ]
    table = rp.stage_table(pd.DataFrame(rows, columns=["stage", "split", "metric", "class", "value"]))
    assert list(table.index) == [("spcam", "train"), ("crf", "train"), ("round1", "val")]
    assert list(table.columns) == ["miou", "pixel_acc"]
    assert table.loc[("crf", "train"), "pixel_acc"] == 0.8 and np.isnan(
        table.loc[("spcam", "train"), "pixel_acc"]
    )


def test_report_of_an_empty_run_dir(tmp_path):
    out = rp.write_report(tmp_path, tmp_path / "r" / "index.html")
    assert "No stage of this run" in out.read_text()


@pytest.mark.skipif(
    browser.CHROMIUM is None, reason="headless Chromium not installed (Debian package 'chromium')"
)
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    out = rp.write_report(run_dir, None, gallery_images=3)
    profile = tmp_path / "profile"
    dom = browser.dump_dom(out.as_uri(), profile)
    assert 'data-loaded="1"' in dom, dom[-2000:]
    assert 'data-broken="0"' in dom  # every inlined image decoded
    assert 'id="metrics"' in dom and len(re.findall(r'<div class="item"', dom)) == 3

    def gallery(fragment: str) -> list[tuple[str, bool]]:
        """(id, hidden) of the gallery items, in page order, after the page's script ran."""
        dom = browser.dump_dom(out.as_uri() + fragment, profile)
        return [
            (m.group(1), "hidden" in m.group(0))
            for m in re.finditer(
                r'<div class="item"[^>]*'
                r'data-id="([^"]+)"[^>]*>',
                dom,
            )
        ]

    assert gallery("") == [
        ("b", False),
        ("a", False),
        ("c", False),
    ]  # final-stage mIoU worst first, unscored last
    assert gallery("#sort=id|asc&class=dog") == [("a", True), ("b", False), ("c", False)]
    assert gallery("#sort=data-reliability|desc") == [("b", False), ("a", False), ("c", False)]
    assert gallery("#sort=data-iou-crf|desc") == [("a", False), ("b", False), ("c", False)]
    image = _read_png(browser.screenshot(out.as_uri(), profile, tmp_path / "shot.png"))
    assert image.shape[:2] == (900, 1200) and image.std() > 5  # something was drawn


def test_a_resolved_config_of_another_version_does_not_stop_inspection(run_dir, tmp_path, caplog):
    (run_dir / "config.resolved.yaml").write_text("cam: {workers: 2}\n")  # a key this version does not know
    with caplog.at_level("WARNING", logger="weakseg"):
        assert [p.stem for p in pn.run_inspect(run_dir, tmp_path / "out", ids=["a"])] == ["a"]
    assert "cam.workers: unknown key" in caplog.text


def test_stage_gains_say_what_each_stage_added():
    rows = [
        ("cam", "train", 0.40, 1.0),
        ("spcam", "train", 0.45, 1.0),
        ("cleaned", "train", 0.50, 0.8),
        ("crf", "train", 0.48, 1.0),
        ("reliable", "train", 0.55, 0.9),
        ("round1", "train", 0.50, 0.9),
        ("spcam_gated", "val", 0.40, 1.0),
        ("round1", "val", 0.52, 1.0),
        ("crf_selected", "train", 0.6, 1.0),
    ]
    metrics = pd.DataFrame(
        [
            {"stage": s, "split": sp, "metric": m, "class": "", "value": v}
            for s, sp, miou, lab in rows
            for m, v in (("miou", miou), ("labelled_fraction", lab))
        ]
    )
    lines = rp.stage_gains(rp.stage_table(metrics))
    assert lines[0] == "cam (train): mIoU 40.0"
    assert lines[1] == "spcam (train): mIoU 45.0, +5.0 against cam"
    assert lines[2] == "cleaned (train): mIoU 50.0 on 80% of pixels, +5.0 against spcam"
    assert lines[3] == "crf (train): mIoU 48.0, -2.0 against cleaned"
    assert "round1 (train): mIoU 50.0 on 90% of pixels, -5.0 against reliable" in lines
    assert "round1 (val): mIoU 52.0, +12.0 against spcam_gated" in lines
    assert not any(line.startswith("crf_selected") for line in lines)


def test_expected_stages_of_a_consensus_annotation(tmp_path):
    from weakseg import config as wconfig
    from weakseg.inspect.stages import expected_label_stages
    from weakseg.store import RunLayout

    cfg = wconfig.load({"segment": {"rounds": 1, "annotation": "consensus"}})
    layout = RunLayout(tmp_path)
    train = {s.name: s.path for s in expected_label_stages(layout, cfg) if s.split == "train"}
    assert train["round1"] == layout.round_labels(1, "consensus", "train")
    assert train["round1_reliable"] == layout.round_labels(1, "reliable", "train")
    assert train["round1_crf"] == layout.round_labels(1, "crf", "train")
