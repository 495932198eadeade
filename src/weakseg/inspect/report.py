"""A static HTML report of one run: run metadata and config, metrics and per-class tables, time per
stage, plots (training curves included) and a gallery of every stage's view of chosen images.

Everything is read from the run directory (paths from ``store.RunLayout``); a missing input only
drops its table, plot or gallery, and the expected stages that are missing are listed. The page is
one self-contained HTML file — CSS, a little JS and every image inlined as data URIs — so it opens
from disk with no server, and ``snakemake --report`` carries it whole. It is rendered from the
Jinja2 templates in ``templates/`` and written atomically.

Core: ``stage_table``, ``per_class_table``, ``timing_table``, ``gallery_order`` and the ``plot_*``
functions (tables in, table or figure out). Edge: ``write_report``.
"""

from __future__ import annotations

import base64
import datetime as _dt
import logging
import math
import os
import re
import subprocess
import uuid
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from weakseg import store
from weakseg.commands import RUN_DIR, Command, option
from weakseg.inspect import panels as pn
from weakseg.parallel import progress

log = logging.getLogger("weakseg")

TABLE_METRICS = ("miou", "mean_class_acc", "pixel_acc", "labelled_fraction")
LOG_X_COLUMN = "iteration"
LOG_NOT_PLOTTED = ("iteration", "lr")  # train_log.csv columns that are not losses
JPEG_QUALITY = 90  # photo-like tiles (image, heat maps, superpixels); label maps stay lossless PNG


# ------------------------------------------------------------------------------------------ tables
def read_metrics(path: Path) -> pd.DataFrame | None:
    """metrics.csv as a tidy table (class '' for whole-split rows), or None when absent."""
    from weakseg.evaluate import read_tidy

    if not path.exists():
        return None
    table = read_tidy(path)
    table[["stage", "split"]] = table[["stage", "split"]].astype(str)
    return table


def stage_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per (stage, split), in the order stages first appear; columns ``TABLE_METRICS``."""
    whole = metrics[(metrics["class"] == "") & metrics["metric"].isin(TABLE_METRICS)]
    table = whole.pivot_table(
        index=["stage", "split"], columns="metric", values="value", aggfunc="last", sort=False
    )
    return table.reindex(columns=[m for m in TABLE_METRICS if m in table.columns])


def stage_order(metrics: pd.DataFrame | None) -> list[str]:
    return [] if metrics is None else list(dict.fromkeys(metrics["stage"]))


def images_evaluated(metrics: pd.DataFrame) -> dict[tuple[str, str], str]:
    """{(stage, split): "n of N"}: how many of the split's images had a mask and were evaluated."""
    whole = metrics[metrics["class"] == ""]
    n = whole[whole["metric"] == "n_images"].groupby(["stage", "split"], sort=False)["value"].last()
    total = whole[whole["metric"] == "split_images"].groupby(["stage", "split"], sort=False)["value"].last()
    return {
        key: f"{int(v)} of {int(total[key])}" if key in total.index else f"{int(v)}" for key, v in n.items()
    }


# What each stage is compared with, to say in one line what it added (train: the pseudo-label chain;
# val: the CAM network used as a segmenter is the baseline every round must beat).
STAGE_BASELINES = {"spcam": "cam", "cleaned": "spcam", "crf": "cleaned", "reliable": "crf"}
VAL_BASELINE = "spcam_gated"


def stage_gains(table: pd.DataFrame, train_split: str = "train") -> list[str]:
    """One line per evaluated stage: its mIoU, the labelled fraction when it leaves pixels unlabelled,
    and the change against the stage it builds on (``STAGE_BASELINES``; rounds: the annotation they
    trained on on train, the SPN as a segmenter on val)."""
    if "miou" not in table.columns:
        return []
    miou = {key: value for key, value in table["miou"].items()}
    labelled = table["labelled_fraction"].to_dict() if "labelled_fraction" in table.columns else {}
    lines = []
    for stage, split in table.index:
        if stage.endswith("_selected") or pd.isna(miou[(stage, split)]):
            continue
        base = STAGE_BASELINES.get(stage)
        if stage.startswith("round") and stage[5:].isdigit():
            r = int(stage[5:])
            base = (f"round{r - 1}" if r > 1 else "reliable") if split == train_split else VAL_BASELINE
        text = f"{stage} ({split}): mIoU {100 * miou[(stage, split)]:.1f}"
        fraction = labelled.get((stage, split))
        if fraction is not None and not pd.isna(fraction) and fraction < 0.995:
            text += f" on {100 * fraction:.0f}% of pixels"
        if base is not None and (base, split) in miou and not pd.isna(miou[(base, split)]):
            text += f", {100 * (miou[(stage, split)] - miou[(base, split)]):+.1f} against {base}"
        lines.append(text)
    return lines


def per_class_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per-class IoU: one row per class (dataset order), one column per (stage, split) in metrics order."""
    per_class = metrics[(metrics["metric"] == "iou") & (metrics["class"] != "")]
    if per_class.empty:
        return pd.DataFrame()
    table = per_class.pivot_table(
        index="class", columns=["stage", "split"], values="value", aggfunc="last", sort=False
    )
    return table.reindex(index=list(dict.fromkeys(per_class["class"])))


def timing_table(benchmarks: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per job (benchmark file name) in the order the jobs finished: seconds, max RSS (MB)."""
    rows = []
    for job, table in benchmarks.items():
        if table.empty or "s" not in table.columns:
            continue
        rss = table["max_rss"].iloc[-1] if "max_rss" in table.columns else float("nan")
        rows.append(
            {
                "job": job,
                "seconds": float(table["s"].iloc[-1]),
                "max_rss_mb": pd.to_numeric(pd.Series([rss]), errors="coerce").iloc[0],
            }
        )
    return pd.DataFrame(rows, columns=["job", "seconds", "max_rss_mb"])


def final_stages(metrics: pd.DataFrame | None, per_image: Sequence[tuple[str, str]]) -> dict[str, str]:
    """{split: the last stage, in metrics (pipeline) order, that has per-image scores on that split}."""
    order = (
        {key: i for i, key in enumerate(dict.fromkeys(zip(metrics["stage"], metrics["split"])))}
        if metrics is not None
        else {}
    )
    final: dict[str, tuple[int, str]] = {}
    for stage, split in per_image:
        rank = order.get((stage, split), -1)
        if split not in final or rank >= final[split][0]:
            final[split] = (rank, stage)
    return {split: stage for split, (_, stage) in final.items()}


def _spread(pool: list[str], n: int) -> list[str]:
    """``n`` items evenly spaced over ``pool`` (first and last included)."""
    if len(pool) <= n:
        return list(pool)
    picks = np.unique(np.round(np.linspace(0, len(pool) - 1, n)).astype(int))
    return [pool[i] for i in picks]


def gallery_order(miou: pd.Series | None, ids: Sequence[str], n: int) -> list[str]:
    """``n`` ids spread evenly over the mIoU ranking (worst, ..., best) so the gallery shows failures
    and successes; when fewer than ``n`` images have a score, the rest are spread over the others."""
    known = set(ids)
    ranked = (
        [i for i in miou.dropna().sort_values(kind="stable").index if i in known] if miou is not None else []
    )
    chosen = _spread(ranked, n)
    taken = set(chosen)
    return chosen + _spread([i for i in ids if i not in taken], n - len(chosen))


# ------------------------------------------------------------------------------------------- plots
def _figure(width: float = 7.0, height: float = 3.6):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height), dpi=100)


def plot_stage_miou(table: pd.DataFrame):
    if "miou" not in table.columns or table["miou"].isna().all():
        return None
    values = table["miou"].dropna()
    fig, ax = _figure(max(5.0, 0.6 * len(values) + 2))
    splits = list(dict.fromkeys(split for _, split in values.index))
    colours = {s: f"C{i}" for i, s in enumerate(splits)}
    x = np.arange(len(values))
    ax.bar(x, values.to_numpy(), color=[colours[split] for _, split in values.index])
    ax.set_xticks(x, [stage for stage, _ in values.index], rotation=45, ha="right")
    for xi, v in zip(x, values):
        ax.text(xi, v, f"{v:.3f}", ha="center", va="bottom", fontsize=7)
    for split, colour in colours.items():
        ax.bar([], [], color=colour, label=split)
    ax.legend(title="split", fontsize=8)
    ax.set(ylabel="mIoU", title="mIoU per stage", ylim=(0, max(1.0, values.max() * 1.1)))
    return fig


def plot_sweeps(sweeps: dict[str, pd.DataFrame]):
    """Background-threshold sweeps: mIoU against the threshold, one line per swept stage."""
    if not sweeps:
        return None
    fig, ax = _figure()
    for name, sweep in sweeps.items():
        ax.plot(sweep["threshold"], sweep["miou"], marker="o", label=f"{name} mIoU")
        if "mean_class_acc" in sweep.columns:
            ax.plot(
                sweep["threshold"], sweep["mean_class_acc"], linestyle="--", label=f"{name} mean class acc"
            )
    ax.set(xlabel="background threshold", ylabel="score", title="background-threshold sweep")
    ax.legend(fontsize=8)
    return fig


def plot_reliability_curve(curve: pd.DataFrame | None):
    if curve is None or curve.empty:
        return None
    fig, ax = _figure()
    ax.plot(curve["fraction"], curve["miou"], marker="o")
    for k, f, m in curve[["k", "fraction", "miou"]].itertuples(index=False):
        ax.annotate(str(int(k)), (f, m), textcoords="offset points", xytext=(0, 5), fontsize=7, ha="center")
    ax.set(
        xlabel="fraction of annotations kept (most reliable first; labels: k)",
        ylabel="mIoU",
        title="reliability curve",
    )
    return fig


def plot_training_logs(logs: dict[str, pd.DataFrame]):
    """Loss curves of every training log (CAM network, each round), one panel per log; the learning
    rate on a second axis."""
    logs = {k: v for k, v in logs.items() if not v.empty}
    if not logs:
        return None
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(logs), figsize=(4.6 * len(logs), 3.4), dpi=100, squeeze=False)
    for ax, (name, table) in zip(axes[0], logs.items()):
        x = table[LOG_X_COLUMN] if LOG_X_COLUMN in table.columns else np.arange(1, len(table) + 1)
        for column in table.columns:
            if column not in LOG_NOT_PLOTTED and pd.api.types.is_numeric_dtype(table[column]):
                ax.plot(x, table[column], label=column, linewidth=1, marker="." if len(table) < 30 else None)
        ax.set(xlabel="iteration", ylabel="loss (mean over the logged iterations)", title=f"training: {name}")
        if "lr" in table.columns:
            lr_ax = ax.twinx()
            lr_ax.plot(x, table["lr"], color="grey", linestyle=":", linewidth=1, label="learning rate")
            lr_ax.set_ylabel("learning rate", color="grey")
            lr_ax.tick_params(axis="y", labelcolor="grey", labelsize=7)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def figure_uri(fig) -> str:
    """A matplotlib figure as a PNG data URI (the figure is closed)."""
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def image_uri(rgb: np.ndarray, lossless: bool) -> str:
    """An RGB uint8 image as a PNG (lossless) or JPEG data URI."""
    ext, params, mime = (
        (".png", [], "image/png")
        if lossless
        else (".jpg", [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY], "image/jpeg")
    )
    ok, encoded = cv2.imencode(ext, np.ascontiguousarray(rgb[..., ::-1]), params)
    if not ok:
        raise ValueError(f"could not encode a {rgb.shape} image as {ext}")
    return f"data:{mime};base64," + base64.b64encode(encoded.tobytes()).decode("ascii")


# ------------------------------------------------------------------------------------- run inputs
def _read_csv(path: Path, required: Sequence[str]) -> pd.DataFrame | None:
    if not path.exists():
        return None
    table = pd.read_csv(path, dtype={"id": str} if "id" in required else None)
    missing = set(required) - set(table.columns)
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {', '.join(sorted(missing))} (expected {', '.join(required)})"
        )
    return table


def read_sweeps(layout: store.RunLayout) -> dict[str, pd.DataFrame]:
    return {name: _read_csv(p, ("threshold", "miou")) for name, p in layout.found_metric_files("_sweep.csv")}


def read_training_logs(layout: store.RunLayout) -> dict[str, pd.DataFrame]:
    paths = {"CAM": layout.train_log()}
    paths.update({f"round {r}": layout.train_log(r) for r in layout.round_numbers()})
    return {name: pd.read_csv(p) for name, p in paths.items() if p.exists()}


def image_reliability(layout: store.RunLayout) -> pd.Series | None:
    """Each train image's reliability score (its least reliable annotation's; lower is more reliable)."""
    table = _read_csv(layout.reliability, ("id", "image_score"))
    return None if table is None else table.groupby("id", sort=False)["image_score"].first()


def read_benchmarks(layout: store.RunLayout) -> dict[str, pd.DataFrame]:
    """Snakemake's per-job benchmark TSVs, {job: table}, in the order the jobs finished."""
    return {job: pd.read_csv(path, sep="\t") for job, path in layout.found_benchmarks().items()}


def git_commit(path: Path) -> str | None:
    """The git commit (and '+changes' when the work tree differs) of the checkout holding ``path``."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return commit.stdout.strip() + (" +changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def mask_counts(layout: store.RunLayout, info) -> dict[str, tuple[int, int]]:
    """{split: (images with a ground-truth mask, images)}."""
    gt = pn._open_optional(layout.gt, "gt")
    masked = set(store.ids_in(gt, store.MASKS)) if gt is not None else set()
    return {split: (sum(i in masked for i in ids), len(ids)) for split, ids in info.splits.items()}


# -------------------------------------------------------------------------------------------- html
def _fmt(value, digits: int = 4) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _attr_value(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else repr(float(value))


def _iou_attr(stage: str) -> str:
    """The data-* attribute holding a stage's per-image mIoU (HTML attribute names are lower case)."""
    return "data-iou-" + re.sub(r"[^a-z0-9_-]", "_", stage.lower())


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def render_page(context: dict) -> str:
    """The report page from the templates in weakseg/inspect/templates (Jinja2, autoescaped)."""
    import jinja2

    folder = resources.files("weakseg.inspect").joinpath("templates")
    env = jinja2.Environment(
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
        loader=jinja2.FunctionLoader(lambda name: folder.joinpath(name).read_text()),
    )
    return env.get_template("report.html.j2").render(
        css=folder.joinpath("report.css").read_text(),
        script=folder.joinpath("report.js").read_text(),
        **context,
    )


# -------------------------------------------------------------------------------------------- edge
def write_report(
    run_dir: str | os.PathLike, out_html: str | os.PathLike | None = None, gallery_images: int | None = None
) -> Path:
    """Write the self-contained report page ``out_html`` (default ``<run>/report/index.html``)
    atomically. ``gallery_images`` defaults to the run's ``inspect.gallery_images``. Returns the path."""
    layout = store.RunLayout(run_dir)
    if not layout.root.is_dir():
        raise FileNotFoundError(f"{layout.root}: run directory not found")
    config = pn.run_config(layout)
    if gallery_images is None:
        from weakseg.config import validate

        gallery_images = (config or validate({}))["inspect"]["gallery_images"]
    if gallery_images < 1:
        raise ValueError(f"gallery_images must be at least 1, got {gallery_images}")
    out_html = Path(out_html) if out_html is not None else layout.report_page
    page = render_page(report_context(layout, config, gallery_images))
    out_html.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_html.with_name(f"{out_html.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, out_html)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("report: wrote %s (%.1f MB)", out_html, out_html.stat().st_size / 1e6)
    return out_html


def report_context(layout: store.RunLayout, config: dict | None, gallery_images: int) -> dict:
    """Everything the template shows, read from the run folder."""
    from weakseg import __version__

    metrics = read_metrics(layout.metrics)
    meta = [
        ("run", layout.root.name),
        ("run folder", str(layout.root.resolve())),
        ("weakseg version", __version__),
        ("report written", _dt.datetime.now().astimezone().isoformat(timespec="seconds")),
    ]
    commit = git_commit(Path(__file__).parent)
    if commit:
        meta.append(("git commit", commit))
    context = {
        "title": f"weakseg report: {layout.root.name}",
        "meta": meta,
        "missing": [],
        "metrics": None,
        "gains": [],
        "per_class": None,
        "timings": None,
        "plots": [],
        "gallery": None,
        "evaluation": "No data store yet: the run has not ingested its dataset.",
        "config_text": layout.resolved_config.read_text() if layout.resolved_config.is_file() else None,
    }
    if config is not None:
        dataset = config["dataset"]
        meta.append(("dataset", dataset["kind"] + (f" {dataset['root']}" if dataset["root"] else "")))
    run = pn.RunPanels(layout.root) if layout.data.exists() else None
    if run is not None:
        context["missing"] = run.missing_stages()
        counts = mask_counts(layout, run.info)
        meta.append(("images", ", ".join(f"{split} {n}" for split, (_, n) in counts.items())))
        if not any(m for m, _ in counts.values()):
            context["evaluation"] = (
                "No ground-truth masks: nothing is evaluated. The report shows every stage's "
                "pictures and the training curves, without scores."
            )
        else:
            context["evaluation"] = (
                "Ground-truth masks (evaluation only): "
                + ", ".join(f"{split} {m} of {n} images" for split, (m, n) in counts.items())
                + ". Scores cover those images."
            )
    if metrics is not None:
        table = stage_table(metrics)
        evaluated = images_evaluated(metrics)
        context["metrics"] = {
            "columns": list(table.columns),
            "rows": [
                {
                    "stage": stage,
                    "split": split,
                    "values": [_fmt(v) for v in values],
                    "images": evaluated.get((stage, split), ""),
                }
                for (stage, split), values in table.iterrows()
            ],
        }
        context["gains"] = stage_gains(table, config["dataset"]["train_split"] if config else "train")
        per_class = per_class_table(metrics)
        if not per_class.empty:
            context["per_class"] = {
                "columns": list(per_class.columns),
                "rows": [(name, [_fmt(v, 3) for v in values]) for name, values in per_class.iterrows()],
            }
    timings = timing_table(read_benchmarks(layout))
    if not timings.empty:
        context["timings"] = {
            "rows": [
                {
                    "job": r.job,
                    "seconds": f"{r.seconds:.1f}",
                    "hms": _hms(r.seconds),
                    "rss": _fmt(r.max_rss_mb, 0),
                }
                for r in timings.itertuples()
            ],
            "total": f"{timings['seconds'].sum():.1f}",
            "total_hms": _hms(timings["seconds"].sum()),
        }
    table = stage_table(metrics) if metrics is not None else None
    curve = _read_csv(layout.reliability_curve, ("k", "fraction", "miou"))
    figures = [
        (
            "stage_miou",
            "mIoU per stage",
            plot_stage_miou(table) if table is not None and not table.empty else None,
        ),
        ("threshold_sweep", "Background-threshold sweep", plot_sweeps(read_sweeps(layout))),
        ("reliability_curve", "Reliability curve", plot_reliability_curve(curve)),
        ("training", "Training loss and learning rate", plot_training_logs(read_training_logs(layout))),
    ]
    context["plots"] = [
        {"name": name, "title": title, "src": figure_uri(fig)}
        for name, title, fig in figures
        if fig is not None
    ]
    if run is not None:
        context["gallery"] = gallery_context(run, metrics, gallery_images)
    return context


def gallery_context(run: pn.RunPanels, metrics: pd.DataFrame | None, n_images: int) -> dict:
    """The gallery: ``n_images`` images spread over the final stage's per-image ranking, each with every
    stage's tile (native resolution, enlarged in the browser), its legend and sort attributes."""
    info = run.info
    files = pn.per_image_files(run.layout, info.splits)
    final = final_stages(metrics, list(files))
    # Per-image mIoU of every (stage, split); an image belongs to one split, so a stage name keys its score.
    order = {s: i for i, s in enumerate(stage_order(metrics))}
    stages = sorted({stage for stage, _ in files}, key=lambda s: (order.get(s, len(order)), s))
    miou: dict[str, pd.Series] = {}
    for (stage, _), path in files.items():
        miou[stage] = (
            pd.concat([miou[stage], pn.read_per_image(path)]) if stage in miou else pn.read_per_image(path)
        )
    final_miou = (
        pd.concat([pn.read_per_image(files[(stage, split)]) for split, stage in final.items()])
        if final
        else None
    )
    reliability = image_reliability(run.layout)
    chosen = gallery_order(final_miou, list(info.ids), n_images)
    split_of = {i: split for split, ids in info.splits.items() for i in ids}
    items, tile_width = [], 160
    for image_id in progress(chosen, "report gallery"):
        image, columns, label_maps = run.columns(image_id, scale=1)
        tile_width = max(tile_width, min(320, 2 * image.shape[1]))
        labelled = np.asarray(info.image_labels(image_id), np.uint8)
        legend = pn.legend_for([*label_maps, labelled], info.class_names, run.palette)
        score = reliability.get(image_id) if reliability is not None else None
        score = None if score is None or pd.isna(score) else float(score)
        scores = {
            s: float(m[image_id]) for s, m in miou.items() if image_id in m.index and not pd.isna(m[image_id])
        }
        final_stage = final.get(split_of.get(image_id, ""))
        items.append(
            {
                "id": image_id,
                "split": split_of.get(image_id, ""),
                "classes": [info.class_names[c] for c in info.image_labels(image_id)],
                "final_iou": _attr_value(scores.get(final_stage)),
                "reliability_attr": _attr_value(score),
                "iou_attrs": [(_iou_attr(s), _attr_value(scores.get(s))) for s in stages],
                "scores": [f"mIoU {s} {_fmt(v)}" for s, v in scores.items()]
                + ([f"reliability score {_fmt(score)}"] if score is not None else []),
                "tiles": [{"title": image_id, "kind": "image", "src": image_uri(image, lossless=False)}]
                + [
                    {"title": c.title, "kind": c.kind, "src": image_uri(c.tile, lossless=c.kind == "labels")}
                    for c in columns
                ],
                "legend": [
                    (name, None if colour is None else "rgb({},{},{})".format(*colour))
                    for name, colour in legend
                ],
                "has_heat": any(c.kind == "heat" for c in columns),
            }
        )
    sort_options = []
    if final:
        names = ", ".join(f"{stage} ({split})" for split, stage in final.items())
        sort_options.append(("data-iou|asc", f"mIoU at the final stage ({names}), worst first"))
        sort_options.append(("data-iou|desc", "mIoU at the final stage, best first"))
    sort_options.append(("id|asc", "image id"))
    for stage in stages:
        sort_options += [
            (f"{_iou_attr(stage)}|asc", f"mIoU {stage}, worst first"),
            (f"{_iou_attr(stage)}|desc", f"mIoU {stage}, best first"),
        ]
    sort_options += [
        ("data-reliability|desc", "reliability score, least reliable first"),
        ("data-reliability|asc", "reliability score, most reliable first"),
    ]
    note = (
        f"{len(items)} of {len(info.ids)} images, spread from worst to best at the final stage."
        if final
        else f"{len(items)} of {len(info.ids)} images."
    )
    return {
        "items": items,
        "sort_options": sort_options,
        "classes": list(info.class_names),
        "note": note,
        "tile_width": tile_width,
    }


def report_path(args) -> Path:
    return Path(args.out or store.RunLayout(args.run_dir).report_page)


def _report_and_say(args) -> None:
    out = report_path(args)
    write_report(args.run_dir, out, gallery_images=args.gallery)
    print(f"report: {out}")


COMMAND = Command(
    "report",
    "write the static HTML report of a run (one self-contained page)",
    write_report,
    (
        RUN_DIR,
        option("--out", help="default <run dir>/report/index.html"),
        option(
            "--gallery",
            type=int,
            default=None,
            help="images in the gallery (default: the run's inspect.gallery_images)",
        ),
    ),
    writes=(report_path,),
    call=_report_and_say,
)
