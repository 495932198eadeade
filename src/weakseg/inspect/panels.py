"""Per-image inspection panels: every stage's view of one image side by side.

A panel is a grid of titled tiles (at most ``PER_ROW`` a row) — image, ground truth, superpixel
boundaries, CAM and SP-CAM heat maps for each labelled class, cleaned / CRF / reliable pseudo-labels
and each round's stores, titled with the stage names of ``weakseg.inspect.stages`` — above a legend
of the classes shown and, when there are heat maps, a colour bar of the score scale. Label value 255 (ignore) is drawn as a grey/white diagonal
hatch so it can never be mistaken for a class colour.

Pure core: ``colorize_labels``, ``heatmap_overlay``, ``superpixel_overlay``, ``upscale``,
``render_panel`` (numpy in, uint8 RGB out). Edge: ``RunPanels`` reads a run directory's stores (any
may be missing: its column is skipped; small images are upscaled so text stays readable),
``select_ids`` picks images (ids / class / worst at a stage) and ``run_inspect`` writes
``<out_dir>/<id>.png``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import pandas as pd

from weakseg import store
from weakseg.commands import RUN_DIR, Command, option
from weakseg.datasets import IGNORE, open_data, read_image
from weakseg.errors import UserError
from weakseg.inspect import stages as st
from weakseg.palette import class_palette
from weakseg.parallel import progress

log = logging.getLogger("weakseg")

# Panel geometry in pixels. The test recomputes sizes from these.
GAP = 4  # margin around and between tiles
TITLE_HEIGHT = 16  # text strip above each tile
LEGEND_ROW_HEIGHT = 18  # one wrapped row of legend swatches
SWATCH = 12  # legend colour square
MIN_TILE_HEIGHT = 160  # small images are upscaled (integer factor, nearest) to stay readable
PER_ROW = 5  # tiles per panel row: a panel stays about as wide as it is high
COLOUR_BAR_WIDTH = 100  # the heat maps' score scale in the legend
COLOUR_BAR = "colour bar"  # legend entry colour: draw the jet scale (0 left, 1 right) instead of a swatch

PANEL_BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (0, 0, 0)
# Ignore: alternating diagonal stripes; neither colour is a class colour of the VOC palette.
HATCH_COLOURS = ((255, 255, 255), (150, 150, 150))
HATCH_PERIOD = 6  # stripe pattern repeats every 6 pixels along x + y
BOUNDARY_COLOUR = (255, 255, 0)
HEAT_ALPHA = 0.5  # weight of the jet colour map over the image

FONT = cv2.FONT_HERSHEY_SIMPLEX
FONT_SCALE = 0.4


class SelectionError(UserError, ValueError):
    """An image id, class or stage asked for does not exist; the message lists the valid choices."""


Legend = Sequence[tuple[str, tuple[int, int, int] | str | None]]  # (name, RGB), None: ignore, COLOUR_BAR


class Column(NamedTuple):
    """One tile of a panel: its title, RGB pixels and what it shows (image, labels, superpixels, heat)."""

    title: str
    tile: np.ndarray
    kind: str


# ----------------------------------------------------------------------------------------------- core
def _check_image(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 (H, W, 3) image, got {image.dtype} {image.shape}")


def hatch(shape: tuple[int, int]) -> np.ndarray:
    """The ignore pattern: (H, W, 3) uint8 diagonal stripes of the two hatch colours."""
    yy, xx = np.indices(shape)
    stripe = ((xx + yy) % HATCH_PERIOD) < HATCH_PERIOD // 2
    colours = np.asarray(HATCH_COLOURS, np.uint8)
    return colours[stripe.astype(np.intp)]


def colorize_labels(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Label map (H, W) -> RGB using ``palette`` (256, 3); IGNORE pixels get the hatch pattern."""
    if labels.ndim != 2:
        raise ValueError(f"expected a (H, W) label map, got shape {labels.shape}")
    palette = np.asarray(palette, np.uint8)
    if palette.shape != (256, 3):
        raise ValueError(f"expected a (256, 3) palette, got shape {palette.shape}")
    rgb = palette[labels.astype(np.intp)]
    ignore = labels == IGNORE
    if ignore.any():
        rgb[ignore] = hatch(labels.shape)[ignore]
    return rgb


def jet(score: np.ndarray) -> np.ndarray:
    """RGB jet colours of scores in [0, 1] (any shape): blue (0) .. red (1)."""
    levels = np.clip(np.rint(np.asarray(score, np.float32) * 255), 0, 255).astype(np.uint8)
    flat = cv2.applyColorMap(levels.reshape(-1, 1), cv2.COLORMAP_JET)[:, 0, ::-1]  # OpenCV gives BGR
    return flat.reshape(levels.shape + (3,))


def heatmap_overlay(image: np.ndarray, score: np.ndarray, alpha: float = HEAT_ALPHA) -> np.ndarray:
    """Blend a jet colour map of ``score`` (H, W) in [0, 1] over the image."""
    _check_image(image)
    if score.shape != image.shape[:2]:
        raise ValueError(f"score map shape {score.shape} differs from image shape {image.shape[:2]}")
    return cv2.addWeighted(np.ascontiguousarray(jet(score)), alpha, image, 1.0 - alpha, 0.0)


def superpixel_boundaries(superpixels: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels with a 4-neighbour in another superpixel (both sides of every edge).

    Plain numpy rather than skimage's find_boundaries, whose import alone takes seconds."""
    edge = np.zeros(superpixels.shape, bool)
    across = superpixels[:, 1:] != superpixels[:, :-1]
    edge[:, 1:] |= across
    edge[:, :-1] |= across
    down = superpixels[1:] != superpixels[:-1]
    edge[1:] |= down
    edge[:-1] |= down
    return edge


def superpixel_overlay(image: np.ndarray, superpixels: np.ndarray) -> np.ndarray:
    """The image with superpixel boundaries drawn in ``BOUNDARY_COLOUR``."""
    _check_image(image)
    if superpixels.shape != image.shape[:2]:
        raise ValueError(
            f"superpixel map shape {superpixels.shape} differs from image shape {image.shape[:2]}"
        )
    out = image.copy()
    out[superpixel_boundaries(superpixels)] = BOUNDARY_COLOUR
    return out


def _fit_text(text: str, width: int) -> str:
    """Shorten ``text`` with '..' until it fits ``width`` pixels."""
    if cv2.getTextSize(text, FONT, FONT_SCALE, 1)[0][0] <= width:
        return text
    while len(text) > 1 and cv2.getTextSize(text + "..", FONT, FONT_SCALE, 1)[0][0] > width:
        text = text[:-1]
    return text + ".."


def _put_text(canvas: np.ndarray, text: str, x: int, y_top: int, height: int) -> None:
    (_, th), _ = cv2.getTextSize(text, FONT, FONT_SCALE, 1)
    baseline_y = y_top + (height + th) // 2
    cv2.putText(canvas, text, (x, baseline_y), FONT, FONT_SCALE, TEXT_COLOUR, 1, cv2.LINE_AA)


def _entry_width(name: str, colour) -> int:
    mark = COLOUR_BAR_WIDTH if colour == COLOUR_BAR else SWATCH
    return mark + 3 + cv2.getTextSize(name, FONT, FONT_SCALE, 1)[0][0] + 2 * GAP


def _legend_layout(legend: Legend, width: int) -> list[list[tuple[int, str, tuple | str | None]]]:
    """Wrap legend entries into rows that fit ``width``; each entry is (x, name, colour)."""
    rows: list[list] = [[]]
    x = GAP
    for name, colour in legend:
        entry_w = _entry_width(name, colour)
        if rows[-1] and x + entry_w > width - GAP:
            rows.append([])
            x = GAP
        rows[-1].append((x, name, colour))
        x += entry_w
    return rows if rows[0] else []


def grid_shape(n_tiles: int, per_row: int = PER_ROW) -> tuple[int, int]:
    """(rows, columns) of the tile grid."""
    cols = max(1, min(n_tiles, per_row))
    return -(-n_tiles // cols), cols


def panel_shape(
    image_hw: tuple[int, int], n_tiles: int, n_legend_rows: int, per_row: int = PER_ROW
) -> tuple[int, int]:
    """(height, width) of a panel of ``n_tiles`` tiles of a (H, W) image."""
    h, w = image_hw
    rows, cols = grid_shape(n_tiles, per_row)
    height = (
        GAP
        + rows * (TITLE_HEIGHT + h + GAP)
        + (n_legend_rows * LEGEND_ROW_HEIGHT + GAP if n_legend_rows else 0)
    )
    return height, cols * w + (cols + 1) * GAP


def tile_origin(index: int, image_hw: tuple[int, int], per_row: int = PER_ROW) -> tuple[int, int]:
    """(y, x) of the top-left pixel of tile ``index`` (0 = the image itself) in a panel."""
    row, col = divmod(index, per_row)
    return GAP + row * (TITLE_HEIGHT + image_hw[0] + GAP) + TITLE_HEIGHT, GAP + col * (image_hw[1] + GAP)


def render_panel(
    image: np.ndarray,
    columns: Sequence[tuple[str, np.ndarray]],
    legend: Legend = (),
    title: str = "image",
    per_row: int = PER_ROW,
) -> np.ndarray:
    """A grid of titled tiles, ``per_row`` a row — ``image`` first, then each (title, RGB (H, W, 3))
    column — above a legend of (name, RGB, None for the ignore hatch, or COLOUR_BAR) entries, wrapped
    to the panel width. Returns uint8 RGB of shape ``panel_shape(...) + (3,)``."""
    _check_image(image)
    tiles = [(title, image), *[(c[0], c[1]) for c in columns]]
    for name, tile in tiles[1:]:
        if tile.shape != image.shape or tile.dtype != np.uint8:
            raise ValueError(f"column '{name}': expected uint8 {image.shape}, got {tile.dtype} {tile.shape}")
    hw = image.shape[:2]
    _, width = panel_shape(hw, len(tiles), 0, per_row)
    legend_rows = _legend_layout(legend, width)
    height, width = panel_shape(hw, len(tiles), len(legend_rows), per_row)
    canvas = np.empty((height, width, 3), np.uint8)
    canvas[:] = PANEL_BACKGROUND
    for index, (name, tile) in enumerate(tiles):
        y, x = tile_origin(index, hw, per_row)
        canvas[y : y + hw[0], x : x + hw[1]] = tile
        _put_text(canvas, _fit_text(name, hw[1]), x, y - TITLE_HEIGHT, TITLE_HEIGHT)
    y = height - (len(legend_rows) * LEGEND_ROW_HEIGHT + GAP if legend_rows else 0)
    for row in legend_rows:
        sy = y + (LEGEND_ROW_HEIGHT - SWATCH) // 2
        for x, name, colour in row:
            mark = COLOUR_BAR_WIDTH if colour == COLOUR_BAR else SWATCH
            if colour == COLOUR_BAR:
                canvas[sy : sy + SWATCH, x : x + mark] = jet(np.linspace(0, 1, mark))[None]
            else:
                canvas[sy : sy + SWATCH, x : x + SWATCH] = (
                    hatch((SWATCH, SWATCH)) if colour is None else colour
                )
            cv2.rectangle(canvas, (x, sy), (x + mark - 1, sy + SWATCH - 1), TEXT_COLOUR, 1)
            _put_text(canvas, name, x + mark + 3, y, LEGEND_ROW_HEIGHT)
        y += LEGEND_ROW_HEIGHT
    return canvas


def legend_for(label_maps: Sequence[np.ndarray], class_names: Sequence[str], palette: np.ndarray) -> list:
    """Legend entries for the classes (and ignore) that occur in any of the label maps."""
    present: set[int] = set()
    for labels in label_maps:
        present.update(int(v) for v in np.unique(labels))
    entries = [
        (class_names[c], tuple(int(v) for v in palette[c])) for c in sorted(present) if c < len(class_names)
    ]
    unknown = sorted(c for c in present if len(class_names) <= c != IGNORE)
    if unknown:
        raise ValueError(f"label values {unknown} are not classes (dataset has {len(class_names)} classes)")
    if IGNORE in present:
        entries.append(("ignore", None))
    return entries


def default_scale(image_hw: tuple[int, int]) -> int:
    """Integer upscaling that makes small images at least ``MIN_TILE_HEIGHT`` pixels high."""
    return max(1, math.ceil(MIN_TILE_HEIGHT / image_hw[0]))


def upscale(array: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour integer upscaling of the first two axes: pixel (y, x) becomes a scale x scale
    block, so label values (and hence colours) stay exact and hatches stay fine."""
    if scale == 1:
        return array
    return np.repeat(np.repeat(array, scale, axis=0), scale, axis=1)


# ----------------------------------------------------------------------------------------------- edge
def _open_optional(path: Path, kind: str):
    """Open a finished store, or None (logged) when the stage has not produced it."""
    try:
        return store.open_store(path, kind)
    except store.StoreError as exc:
        log.debug("inspect: skipping %s", exc)
        return None


def found_stages(layout: store.RunLayout, config: dict) -> list[st.Stage]:
    """The labels stores in a run folder, named by the stage scheme."""
    return st.found_label_stages(layout, config["dataset"]["train_split"], config["segment"]["annotation"])


def missing_stages(layout: store.RunLayout, config: dict) -> list[st.Stage]:
    """Labels stores a finished run of ``config`` has that the run folder lacks or has unfinished."""
    return [s for s in st.expected_label_stages(layout, config) if _open_optional(s.path, "labels") is None]


def run_config(layout: store.RunLayout) -> dict | None:
    """The run's resolved config (config.resolved.yaml), or None for a run folder without one."""
    import yaml

    from weakseg.config import ConfigError, validate

    if not layout.resolved_config.is_file():
        return None
    try:
        return validate(yaml.safe_load(layout.resolved_config.read_text()), str(layout.resolved_config))
    except (ConfigError, yaml.YAMLError) as exc:  # written by another weakseg version: look without it
        log.warning("%s; stage names and expected stages follow the defaults", exc)
        return None


class RunPanels:
    """The stores of one run directory, opened once, and the panel of any of its images."""

    def __init__(self, run_dir: str | os.PathLike):
        from weakseg.config import validate

        self.layout = store.RunLayout(run_dir)
        self.info, self.data = open_data(self.layout.data)
        self.config = run_config(self.layout) or validate(
            {"dataset": {"train_split": next(iter(self.info.splits))}}
        )
        self.palette = np.asarray(class_palette(self.info.n_classes), np.uint8)
        self.gt = _open_optional(self.layout.gt, "gt")
        self.superpixels = _open_optional(self.layout.superpixels, "superpixels")
        self.scores = _open_optional(self.layout.scores, "scores")
        # (stage name, store) of every finished labels store, in pipeline order.
        self.label_stores: list[tuple[str, object]] = []
        for stage in found_stages(self.layout, self.config):
            group = _open_optional(stage.path, "labels")
            if group is not None:
                self.label_stores.append((stage.name, group))

    def missing_stages(self) -> list[st.Stage]:
        """Labels stores a finished run of this config has and this run folder lacks (or has unfinished)."""
        return missing_stages(self.layout, self.config)

    def check_id(self, image_id: str) -> None:
        if image_id not in self.info.ids:
            raise SelectionError(
                f"image id '{image_id}' is not in {self.layout.data} "
                f"({len(self.info.ids)} ids, e.g. {', '.join(self.info.ids[:5])})"
            )

    def _has(self, group, key: str, image_id: str) -> bool:
        return group is not None and f"{key}/{image_id}" in group

    def labelled_fg(self, image_id: str) -> list[int]:
        fg = set(int(c) for c in self.info.fg_classes)
        return [int(c) for c in self.info.image_labels(image_id) if int(c) in fg]

    def columns(self, image_id: str, scale: int | None = None):
        """Everything shown for one image: (image, [Column(title, RGB tile, kind)], label maps).

        Image and tiles are upscaled by ``scale`` (default ``default_scale``) before drawing, so
        boundaries and hatches are fine lines; the label maps (for the legend) stay at native size.
        """
        self.check_id(image_id)
        image = read_image(self.data, image_id)
        hw = image.shape[:2]
        scale = default_scale(hw) if scale is None else int(scale)
        if scale < 1:
            raise ValueError(f"scale must be a positive integer, got {scale}")
        big = upscale(image, scale)
        names = self.info.class_names
        columns: list[Column] = []
        label_maps: list[np.ndarray] = []

        def read(group, key: str, title: str) -> np.ndarray:
            array = store.get(group, key, image_id)
            if array.shape[-2:] != hw:
                raise ValueError(
                    f"{title} of image '{image_id}': shape {array.shape} does not match the image's {hw}"
                )
            return array

        def add_labels(title: str, labels: np.ndarray) -> None:
            columns.append(Column(title, colorize_labels(upscale(labels, scale), self.palette), "labels"))
            label_maps.append(labels)

        if self._has(self.gt, store.MASKS, image_id):
            add_labels("ground truth", read(self.gt, store.MASKS, "ground truth"))
        if self._has(self.superpixels, store.SUPERPIXELS, image_id):
            sp = read(self.superpixels, store.SUPERPIXELS, "superpixels")
            columns.append(
                Column(
                    f"superpixels ({len(np.unique(sp))})",
                    superpixel_overlay(big, upscale(sp, scale)),
                    "superpixels",
                )
            )
        heat: dict[str, tuple[np.ndarray, list[int]]] = {}
        for key, label in ((store.CAM, "CAM"), (store.SPCAM, "SP-CAM")):
            if self._has(self.scores, key, image_id):
                read(self.scores, key, label)  # shape check
                maps, classes = store.get_scores(self.scores, key, image_id)
                heat[label] = (maps, [int(c) for c in classes])
        for c in self.labelled_fg(image_id):  # CAM and SP-CAM of a class side by side
            for label, (maps, classes) in heat.items():
                if c in classes:
                    score = upscale(maps[classes.index(c)], scale)
                    columns.append(Column(f"{label}: {names[c]}", heatmap_overlay(big, score), "heat"))
        for title, group in self.label_stores:
            if self._has(group, store.LABELS, image_id):
                add_labels(title, read(group, store.LABELS, title))
        return big, columns, label_maps

    def panel(self, image_id: str, scale: int | None = None) -> np.ndarray:
        image, columns, label_maps = self.columns(image_id, scale)
        labelled = np.asarray(self.info.image_labels(image_id), np.uint8)  # labelled classes join the legend
        legend = legend_for([*label_maps, labelled], self.info.class_names, self.palette)
        if any(c.kind == "heat" for c in columns):
            legend.append(("score 0-1", COLOUR_BAR))
        return render_panel(image, columns, legend, title=image_id)


def save_png(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1])):
        raise OSError(f"{path}: could not write PNG")


# --------------------------------------------------------------------------- which images to show
def per_image_files(layout: store.RunLayout, splits) -> dict[tuple[str, str], Path]:
    """{(stage, split): metrics/<stage>_<split>_per_image.csv} for every per-image CSV of the run."""
    found = {}
    for name, path in layout.found_metric_files("_per_image.csv"):
        key = st.split_stage(name, splits)
        if key is not None:
            found[key] = path
    return found


def per_image_stages(layout: store.RunLayout, splits) -> list[str]:
    """Stage names with per-image scores on any split, in name order."""
    return sorted({stage for stage, _ in per_image_files(layout, splits)})


def read_per_image(path: Path) -> pd.Series:
    """Per-image mIoU (index: image id) from a metrics/<stage>_<split>_per_image.csv."""
    table = pd.read_csv(path, dtype={"id": str})
    missing = {"id", "miou"} - set(table.columns)
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {', '.join(sorted(missing))} (expected id, miou, pixel_acc)"
        )
    return table.set_index("id")["miou"].astype(float)


def compute_per_image(path: Path, gt_path: Path, stage: str, info, ids: Sequence[str]) -> pd.Series:
    """Per-image mIoU of a labels store against gt.zarr (weakseg.evaluate's metric), over the ids it
    holds that have a mask."""
    from weakseg.evaluate import evaluate_labels

    in_store = set(store.ids_in(store.open_store(path, "labels"), store.LABELS))
    gt_group = _open_optional(gt_path, "gt")
    masked = set(store.ids_in(gt_group, store.MASKS)) if gt_group is not None else set()
    ids = [i for i in ids if i in in_store and i in masked]
    if not ids:
        return pd.Series(dtype=float)
    _, per_image = evaluate_labels(gt_path, path, store.LABELS, stage, "inspect", ids, info.class_names)
    return per_image.set_index("id")["miou"].astype(float)


def stage_miou(
    layout: store.RunLayout, stage: str, info, ids: Sequence[str], config: dict | None = None
) -> pd.Series:
    """Per-image mIoU of ``stage`` (on every split that has it): from its per-image CSVs, else computed
    from its labels stores."""
    config = (
        config
        or run_config(layout)
        or {"dataset": {"train_split": next(iter(info.splits))}, "segment": {"annotation": "reliable"}}
    )
    files = {key: p for key, p in per_image_files(layout, info.splits).items() if key[0] == stage}
    if files:
        return pd.concat([read_per_image(p) for p in files.values()])
    stores = [s for s in found_stages(layout, config) if s.name == stage and _open_optional(s.path, "labels")]
    if stores and layout.gt.exists():
        return pd.concat([compute_per_image(s.path, layout.gt, stage, info, ids) for s in stores])
    computable = {s.name for s in found_stages(layout, config)} if layout.gt.exists() else set()
    valid = sorted(set(per_image_stages(layout, info.splits)) | computable)
    raise SelectionError(
        f"stage '{stage}' has no per-image scores in {layout.root} "
        f"(valid stages: {', '.join(valid) or 'none — the run has no ground-truth masks'})"
    )


def select_ids(
    layout: store.RunLayout,
    info,
    ids: Sequence[str] | None = None,
    worst: int | None = None,
    stage: str | None = None,
    class_name: str | None = None,
) -> list[str]:
    """The images to inspect: ``ids`` (default all), narrowed to those labelled ``class_name``, then
    the ``worst`` N by per-image mIoU at ``stage`` (images without a score at that stage are dropped)."""
    if ids:
        unknown = [i for i in ids if i not in info.ids]
        if unknown:
            raise SelectionError(
                f"unknown image id(s) {', '.join(unknown)} — not in {layout.data} "
                f"({len(info.ids)} ids, e.g. {', '.join(info.ids[:5])})"
            )
        chosen = list(dict.fromkeys(ids))
    else:
        chosen = list(info.ids)
    if class_name is not None:
        if class_name not in info.class_names:
            raise SelectionError(f"unknown class '{class_name}' (classes: {', '.join(info.class_names)})")
        c = info.class_names.index(class_name)
        chosen = [i for i in chosen if info.label_vector(i)[c]]
    if (worst is None) != (stage is None):
        raise SelectionError("--worst N and --stage S go together")
    if worst is not None:
        if worst < 1:
            raise SelectionError(f"--worst must be at least 1, got {worst}")
        miou = stage_miou(layout, stage, info, chosen)
        miou = miou[~miou.index.duplicated()].reindex(chosen).dropna()
        chosen = list(miou.sort_values(kind="stable").index[:worst])
    return chosen


def run_inspect(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    ids: Sequence[str] | None = None,
    worst: int | None = None,
    stage: str | None = None,
    class_name: str | None = None,
) -> list[Path]:
    """Write ``<out_dir>/<id>.png`` panels for the selected images (see ``select_ids``); return the paths."""
    panels = RunPanels(run_dir)
    missing = panels.missing_stages()
    if missing:
        log.warning(
            "inspect: %d expected stage(s) not (yet) computed in %s: %s",
            len(missing),
            panels.layout.root,
            ", ".join(f"{s.name} ({s.split})" for s in missing),
        )
    chosen = select_ids(panels.layout, panels.info, ids, worst, stage, class_name)
    if not chosen:
        log.warning("inspect: no image matches the selection")
    out = Path(out_dir)
    paths = []
    for image_id in progress(chosen, "inspect panels"):
        path = out / f"{image_id}.png"
        save_png(path, panels.panel(image_id))
        paths.append(path)
    log.info("inspect: wrote %d panels to %s", len(paths), out)
    return paths


def _inspect_and_say(args) -> None:
    out = args.out or store.RunLayout(args.run_dir).inspect_dir
    written = run_inspect(
        args.run_dir, out, ids=args.ids, worst=args.worst, stage=args.stage, class_name=args.class_name
    )
    print(f"wrote {len(written)} panels to {out}")


# Writes its own viewer folder, not a pipeline output: no run lock.
COMMAND = Command(
    "inspect",
    "render per-image panels of every intermediate of a run",
    run_inspect,
    (
        RUN_DIR,
        option("--ids", nargs="+", help="image ids"),
        option("--worst", type=int, help="the N images with the lowest per-image mIoU at --stage"),
        option("--stage", help="stage for --worst: " + st.STAGE_HELP),
        option("--class", dest="class_name", help="images labelled with this class"),
        option("--out", help="output folder (default <run dir>/inspect)"),
    ),
    call=_inspect_and_say,
)
