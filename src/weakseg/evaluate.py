"""The evaluation edge: reads label and score stores against ground truth and writes tidy metric CSVs
(the math is ``weakseg.metrics``, the score-to-label rules ``weakseg.labels``)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from weakseg import config as config_mod
from weakseg import store
from weakseg.commands import (
    DATA,
    GT,
    SPLIT_REQUIRED,
    SUPERPIXELS,
    Command,
    option,
    optional,
    output,
    required,
)
from weakseg.datasets import IGNORE, open_data
from weakseg.inspect.stages import STAGE_HELP
from weakseg.labels import (
    argmax_scores,
    decide,
    restrict_to_labels,
    store_threshold,
)
from weakseg.metrics import (
    PER_IMAGE_COLUMNS,
    TIDY_COLUMNS,
    Confusion,
    background_sweep,
    best_threshold,
    confusion_metrics,
    reliability_curve,
    sum_confusions,
    superpixel_oracle,
    tidy_rows,
)
from weakseg.parallel import progress

log = logging.getLogger("weakseg")

CAM_KEYS = (store.CAM, store.SPCAM)  # score keys evaluated as pseudo-label sources


# ----------------------------------------------------------------------------------------------
# Edge: stores in, tidy CSVs out
# ----------------------------------------------------------------------------------------------

write_csv = store.write_table  # atomic CSV writes live with the other atomic writes


def read_tidy(path: str | os.PathLike) -> pd.DataFrame:
    """Read a tidy metrics CSV (the overall metrics' empty class stays '')."""
    df = pd.read_csv(path, dtype={"class": str})
    if list(df.columns) != TIDY_COLUMNS:
        raise ValueError(
            f"{path}: expected columns {','.join(TIDY_COLUMNS)}, found {','.join(map(str, df.columns))}"
        )
    df["class"] = df["class"].fillna("")
    return df


def _read_id_table(path: str | os.PathLike, columns: list[str]) -> pd.DataFrame:
    df = pd.read_csv(path, dtype={"id": str})
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)} (expected {', '.join(columns)})")
    return df


def _ids_with_masks(gt_group, gt_path, ids: list[str]) -> list[str]:
    """The ids that have a gt mask (ingest may have images with labels but no mask)."""
    have = set(store.ids_in(gt_group, store.MASKS))
    kept = [i for i in ids if i in have]
    if len(kept) < len(ids):
        log.warning(
            "%s: %d of %d images have no mask and are not evaluated", gt_path, len(ids) - len(kept), len(ids)
        )
    if not kept:
        raise store.StoreError(f"{gt_path}: none of the {len(ids)} requested images has a ground-truth mask")
    return kept


def image_confusions(
    gt_path,
    ids: list[str],
    n_classes: int,
    predict: Callable[[str], np.ndarray],
    source: str,
    desc: str = "evaluate",
    ignore: int = IGNORE,
) -> dict[str, Confusion]:
    """A Confusion per image of ``ids`` that has a gt mask; ``predict(id)`` gives its label map.

    ``source`` names what ``predict`` reads, for error messages.
    """
    gt_group = store.open_store(gt_path, "gt")
    result = {}
    for image_id in progress(_ids_with_masks(gt_group, gt_path, ids), desc):
        gt = store.get(gt_group, store.MASKS, image_id)
        try:
            result[image_id] = Confusion(n_classes, ignore).add(gt, predict(image_id))
        except ValueError as exc:
            raise ValueError(f"{source}: image '{image_id}': {exc}") from exc
    return result


def _store_predictor(pred_path, key: str, to_labels=None) -> Callable[[str], np.ndarray]:
    """``predict(id)`` for a labels store, or for a scores store with a ``to_labels`` rule."""
    pred_group = store.open_store(pred_path)
    kind = pred_group.attrs.get("kind")
    if kind == "labels":
        return lambda image_id: store.get(pred_group, key, image_id)
    if kind == "scores":
        if to_labels is None:
            raise ValueError(f"{pred_path}: a scores store needs a to_labels rule turning scores into labels")
        return lambda image_id: to_labels(*store.get_scores(pred_group, key, image_id), image_id)
    raise store.StoreError(f"{pred_path}: expected a 'labels' or 'scores' store, found '{kind}'")


def summarise(
    stage: str, split: str, confusions: dict[str, Confusion], class_names
) -> tuple[list[dict], pd.DataFrame]:
    """Tidy rows of the total over ``confusions`` and a per-image table (PER_IMAGE_COLUMNS)."""
    names = list(class_names)
    total = sum_confusions(confusions.values(), len(names))
    overall = confusion_metrics(total)
    rows = tidy_rows(stage, split, overall, names)
    per_image = []
    for image_id, conf in confusions.items():
        s = confusion_metrics(conf)
        per_image.append(
            {
                "id": image_id,
                "miou": s["miou"],
                "pixel_acc": s["pixel_acc"],
                "labelled_fraction": s["labelled_fraction"],
            }
        )
    log.info(
        "%s %s: mIoU %.4f, pixel acc %.4f, labelled %.3f over %d images",
        stage,
        split,
        overall["miou"],
        overall["pixel_acc"],
        overall["labelled_fraction"],
        total.n_images,
    )
    return rows, pd.DataFrame(per_image, columns=PER_IMAGE_COLUMNS)


def evaluate_labels(
    gt_path,
    pred_path,
    key: str,
    stage: str,
    split: str,
    ids: list[str],
    class_names,
    ignore: int = IGNORE,
    to_labels=None,
) -> tuple[list[dict], pd.DataFrame]:
    """Evaluate the ``key`` arrays of a labels store (or of a scores store through
    ``to_labels(scores, classes, image_id)``) against gt.zarr over ``ids``.

    Returns (tidy rows, per-image DataFrame with columns id, miou, pixel_acc, labelled_fraction).
    """
    predict = _store_predictor(pred_path, key, to_labels)
    confs = image_confusions(
        gt_path, ids, len(class_names), predict, str(pred_path), f"evaluate {stage}", ignore
    )
    return summarise(stage, split, confs, class_names)


def _score_key(pred_group, pred_path, key: str | None, stage: str) -> str:
    """The score key to evaluate: ``key``; else the store's only key; else the key named like the
    stage (scores.zarr holds both 'cam' and 'spcam', evaluated as stages 'cam' and 'spcam')."""
    keys = sorted(name for name, _ in pred_group.groups())
    if key is None:
        if len(keys) == 1:
            return keys[0]
        if stage in keys:
            return stage
        raise ValueError(
            f"{pred_path}: holds score keys {keys} and none is named like stage '{stage}'; "
            "say which key to evaluate"
        )
    if key not in keys:
        raise store.StoreError(f"{pred_path}: no '{key}' scores (has: {', '.join(keys) or 'none'})")
    return key


def _selected_ids(selection_csv, ids: list[str]) -> list[str]:
    table = _read_id_table(selection_csv, ["id", "image_selected"])
    missing = sorted(set(ids) - set(table["id"]))
    if missing:
        raise ValueError(f"{selection_csv}: no row for {len(missing)} evaluated images, e.g. {missing[:3]}")
    selected = set(table.loc[table["image_selected"].astype(bool), "id"])
    return [i for i in ids if i in selected]


def run_evaluate(
    config,
    data_path,
    gt_path,
    pred_path,
    stage: str,
    split: str,
    out_csv,
    selection_csv=None,
    per_image_csv=None,
    key: str | None = None,
) -> pd.DataFrame:
    """Evaluate one stage output on one split and write its tidy metrics CSV.

    * labels store: its label maps as they are.
    * scores store, key 'cam' / 'spcam' (pseudo-label sources, given the image-level labels from
      data.zarr): ``weakseg.labels.decide``, i.e. the argmax over the image's labels and, with a
      background class, background by the run's calibrated threshold (row 'background_threshold').
      For transparency the ground-truth sweep over ``evaluate.background_thresholds`` goes to
      ``<out stem>_sweep.csv`` with rows 'background_threshold_swept' and 'miou_at_swept_threshold'.
    * scores store, any other key ('seg': segmentation net, all classes): plain argmax.
    ``key`` picks the score key; by default the store's only key, or the one named like ``stage``.
    With ``selection_csv`` (columns id, image_selected) rows for stage ``<stage>_selected`` cover
    the selected images only.
    Returns the tidy rows written.
    """
    cfg = config_mod.load(config)
    info, _ = open_data(data_path)
    ids = info.split(split)
    names = list(info.class_names)
    pred_group = store.open_store(pred_path)
    kind = pred_group.attrs.get("kind")
    extra_rows = []
    to_labels = None
    if kind == "labels":
        key = store.LABELS
    elif kind == "scores":
        key = _score_key(pred_group, pred_path, key, stage)
        if key not in CAM_KEYS:

            def to_labels(score_map, classes, image_id):
                return argmax_scores(score_map, classes)
        else:
            # The pipeline's own rule: the image's labels compete, background by the calibrated threshold.
            threshold = store_threshold(cfg, pred_path, key, data_path)

            def to_labels(score_map, classes, image_id):
                return decide(score_map, classes, info.image_labels(image_id), info.has_background, threshold)

            if info.has_background:
                extra_rows += _swept_rows(
                    cfg, info, gt_path, pred_group, key, ids, stage, split, out_csv, threshold
                )
    # any other kind: _store_predictor raises a clear error

    predict = _store_predictor(pred_path, key, to_labels)
    confs = image_confusions(gt_path, ids, len(names), predict, str(pred_path), f"evaluate {stage}")
    rows, per_image = summarise(stage, split, confs, names)
    # How many of the split's images had a mask (n_images says how many were evaluated).
    rows += extra_rows + [
        {"stage": stage, "split": split, "metric": "split_images", "class": "", "value": len(ids)}
    ]
    if selection_csv is not None:
        chosen = _selected_ids(selection_csv, list(confs))
        if chosen:
            rows += summarise(f"{stage}_selected", split, {i: confs[i] for i in chosen}, names)[0]
        else:
            log.warning("%s: no evaluated image is selected; no '%s_selected' rows", selection_csv, stage)
    table = pd.DataFrame(rows, columns=TIDY_COLUMNS)
    write_csv(table, out_csv)
    if per_image_csv is not None:
        write_csv(per_image, per_image_csv)
    return table


def _swept_rows(
    cfg: dict,
    info,
    gt_path,
    pred_group,
    key: str,
    ids: list[str],
    stage: str,
    split: str,
    out_csv,
    threshold: float,
) -> list[dict]:
    """The calibrated threshold, and — for transparency only, since it reads ground truth — the sweep over
    ``evaluate.background_thresholds`` (written to ``<out stem>_sweep.csv``) with its best threshold and mIoU."""
    thresholds = cfg["evaluate"]["background_thresholds"]
    if not thresholds:
        raise ValueError("evaluate.background_thresholds: empty; give at least one threshold")
    gt_group = store.open_store(gt_path, "gt")

    def items():
        for image_id in progress(_ids_with_masks(gt_group, gt_path, ids), f"sweep {key}"):
            scores, classes = store.get_scores(pred_group, key, image_id)
            scores, classes = restrict_to_labels(scores, classes, info.image_labels(image_id))
            yield scores, classes, store.get(gt_group, store.MASKS, image_id), info.n_classes

    sweep = background_sweep(items(), thresholds)
    write_csv(sweep, Path(out_csv).with_name(f"{Path(out_csv).stem}_sweep.csv"))
    best = best_threshold(sweep)
    log.info(
        "%s %s: calibrated background threshold %.3f; swept optimum (uses GT) %.3f",
        stage,
        split,
        threshold,
        best,
    )
    row = {"stage": stage, "split": split, "class": ""}
    return [
        {**row, "metric": "background_threshold", "value": threshold},
        {**row, "metric": "background_threshold_swept", "value": best},
        {
            **row,
            "metric": "miou_at_swept_threshold",
            "value": float(sweep.loc[sweep["threshold"] == best, "miou"].iloc[0]),
        },
    ]


def run_oracle(data_path, gt_path, superpixels_path, split: str, out_csv) -> pd.DataFrame:
    """Tidy metrics (stage 'superpixel_oracle') of labelling every superpixel with its majority gt
    class: the ceiling that superpixel-level labelling can reach."""
    info, _ = open_data(data_path)
    sp_group = store.open_store(superpixels_path, "superpixels")
    gt_group = store.open_store(gt_path, "gt")

    def predict(image_id):
        return superpixel_oracle(
            store.get(sp_group, store.SUPERPIXELS, image_id), store.get(gt_group, store.MASKS, image_id)
        )

    confs = image_confusions(
        gt_path, info.split(split), info.n_classes, predict, str(superpixels_path), "superpixel oracle"
    )
    rows, _ = summarise("superpixel_oracle", split, confs, info.class_names)
    table = pd.DataFrame(rows, columns=TIDY_COLUMNS)
    write_csv(table, out_csv)
    return table


def run_reliability_curve(gt_path, labels_path, reliability_csv, out_csv, points: int) -> pd.DataFrame:
    """mIoU of the most reliable annotations of a labels store as more are kept (columns k,
    fraction, miou), ranking images by the ``image_score`` column of ``reliability_csv``."""
    table = _read_id_table(reliability_csv, ["id", "image_score"]).drop_duplicates("id")
    gt_group = store.open_store(gt_path, "gt")
    if "class_names" not in gt_group.attrs:
        raise store.StoreError(f"{gt_path}: attribute 'class_names' missing (re-run ingest)")
    n_classes = len(gt_group.attrs["class_names"])
    store.open_store(labels_path, "labels")  # a clear error if it is some other kind of store
    predict = _store_predictor(labels_path, store.LABELS)
    confs = image_confusions(
        gt_path, list(table["id"]), n_classes, predict, str(labels_path), "reliability curve"
    )
    score = dict(zip(table["id"], table["image_score"].astype(float)))
    curve = reliability_curve([(score[i], conf) for i, conf in confs.items()], points)
    write_csv(curve, out_csv)
    return curve


def combine_metrics(csv_paths, out_csv) -> pd.DataFrame:
    """Concatenate tidy metric CSVs into one (written atomically)."""
    frames = [read_tidy(p) for p in csv_paths]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=TIDY_COLUMNS)
    write_csv(table, out_csv)
    return table


COMMANDS = (
    Command(
        "evaluate",
        "metrics of a labels or scores store against ground truth",
        run_evaluate,
        (
            DATA,
            GT,
            required("--pred", "pred_path", "labels store or scores store"),
            option("--stage", required=True, help="stage name written in the rows: " + STAGE_HELP),
            SPLIT_REQUIRED,
            output("out_csv", "output tidy metrics CSV"),
            optional(
                "--selection",
                "selection_csv",
                "reliability CSV: also rows <stage>_selected for the selected images",
            ),
            optional("--per-image", "per_image_csv", "CSV of per-image mIoU"),
            option(
                "--key",
                help="score key of a scores store (default: the only key, or the one named like --stage)",
            ),
        ),
        sections=("dataset", "evaluate"),
        writes=("out_csv", "per_image_csv"),
    ),
    Command(
        "oracle",
        "superpixel oracle: mIoU when each superpixel takes its majority GT class",
        run_oracle,
        (
            DATA,
            GT,
            SUPERPIXELS,
            SPLIT_REQUIRED,
            output("out_csv", "output tidy metrics CSV"),
        ),
        writes=("out_csv",),
    ),
    Command(
        "reliability-curve",
        "mIoU of the top-k most reliable annotations vs k",
        run_reliability_curve,
        (
            GT,
            required("--labels", "labels_path", "labels store of the ranked annotations"),
            required("--reliability", "reliability_csv", "reliability CSV (image_score ranks the images)"),
            option(
                "--points",
                type=int,
                required=True,
                help="points on the curve (evaluate.reliability_curve_points)",
            ),
            output("out_csv", "output CSV (k, fraction, miou)"),
        ),
        writes=("out_csv",),
    ),
    Command(
        "metrics",
        "combine per-stage metric CSVs into metrics.csv",
        combine_metrics,
        (
            output("out_csv", "output metrics.csv"),
            option("csv_paths", nargs="+", metavar="csvs", help="tidy metric CSVs, in pipeline order"),
        ),
        writes=("out_csv",),
    ),
)
