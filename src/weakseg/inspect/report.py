"""A static HTML report of one run: metrics table, plots and a gallery of inspection panels.

Everything is read from the run directory (paths from ``store.RunLayout``); a missing input only
drops its table, plot or gallery. The page is self-contained — inline CSS and a few lines of inline
JS, PNGs as relative files next to it — so it opens from disk with no server or network. The report
folder is written under a temporary sibling name and renamed into place when complete.

Core: ``stage_table``, ``gallery_order`` and the ``plot_*`` functions (tables in, figure or value
out). Edge: ``write_report``.
"""
from __future__ import annotations

import html
import logging
import math
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from weakseg import store
from weakseg.inspect import panels as pn
from weakseg.parallel import progress

log = logging.getLogger("weakseg")

TABLE_METRICS = ("miou", "mean_class_acc", "pixel_acc", "labelled_fraction")
LOG_X_COLUMN = "iteration"
LOG_NOT_PLOTTED = ("iteration", "lr")  # train_log.csv columns that are not losses


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
    table = whole.pivot_table(index=["stage", "split"], columns="metric", values="value", aggfunc="last", sort=False)
    return table.reindex(columns=[m for m in TABLE_METRICS if m in table.columns])


def stage_order(metrics: pd.DataFrame | None) -> list[str]:
    return [] if metrics is None else list(dict.fromkeys(metrics["stage"]))


def last_stages(metrics: pd.DataFrame) -> list[tuple[str, str]]:
    """(stage, split) of the last stage with per-class IoU, for every split."""
    per_class = metrics[(metrics["metric"] == "iou") & (metrics["class"] != "")]
    last: dict[str, str] = {}
    for stage, split in per_class[["stage", "split"]].itertuples(index=False):
        last[split] = stage
    return [(stage, split) for split, stage in last.items()]


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
    ranked = [i for i in miou.dropna().sort_values(kind="stable").index if i in known] if miou is not None else []
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
            ax.plot(sweep["threshold"], sweep["mean_class_acc"], linestyle="--", label=f"{name} mean class acc")
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
    ax.set(xlabel="fraction of annotations kept (most reliable first; labels: k)", ylabel="mIoU",
           title="reliability curve")
    return fig


def plot_per_class_iou(metrics: pd.DataFrame):
    stages = last_stages(metrics)
    if not stages:
        return None
    per_class = metrics[(metrics["metric"] == "iou") & (metrics["class"] != "")]
    classes = list(dict.fromkeys(per_class["class"]))
    fig, ax = _figure(7.0, max(3.0, 0.22 * len(classes) * max(1, len(stages)) ** 0.5 + 1.2))
    height = 0.8 / len(stages)
    y = np.arange(len(classes))
    for i, (stage, split) in enumerate(stages):
        rows = per_class[(per_class["stage"] == stage) & (per_class["split"] == split)]
        values = rows.groupby("class", sort=False)["value"].last().reindex(classes)
        ax.barh(y + i * height, values.to_numpy(), height=height, label=f"{stage} ({split})")
    ax.set_yticks(y + height * (len(stages) - 1) / 2, classes, fontsize=7)
    ax.invert_yaxis()
    ax.set(xlabel="IoU", xlim=(0, 1), title="per-class IoU of the last stage")
    ax.legend(fontsize=8)
    return fig


def plot_training_logs(logs: dict[str, pd.DataFrame]):
    """Loss curves of every training log (CAM network, each round), one panel per log."""
    logs = {k: v for k, v in logs.items() if not v.empty}
    if not logs:
        return None
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(logs), figsize=(4.2 * len(logs), 3.4), dpi=100, squeeze=False)
    for ax, (name, table) in zip(axes[0], logs.items()):
        x = table[LOG_X_COLUMN] if LOG_X_COLUMN in table.columns else np.arange(1, len(table) + 1)
        for column in table.columns:
            if column not in LOG_NOT_PLOTTED and pd.api.types.is_numeric_dtype(table[column]):
                ax.plot(x, table[column], label=column, linewidth=1)
        ax.set(xlabel="iteration", ylabel="loss", title=f"training: {name}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------------------------- run inputs
def _read_csv(path: Path, required: Sequence[str]) -> pd.DataFrame | None:
    if not path.exists():
        return None
    table = pd.read_csv(path, dtype={"id": str} if "id" in required else None)
    missing = set(required) - set(table.columns)
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))} (expected {', '.join(required)})")
    return table


def read_sweeps(layout: store.RunLayout) -> dict[str, pd.DataFrame]:
    if not layout.metrics_dir.is_dir():
        return {}
    return {p.name[: -len("_sweep.csv")]: _read_csv(p, ("threshold", "miou"))
            for p in sorted(layout.metrics_dir.glob("*_sweep.csv"))}


def read_training_logs(layout: store.RunLayout) -> dict[str, pd.DataFrame]:
    paths = {"CAM": layout.cam_dir / "train_log.csv"}
    paths.update({f"round {r}": layout.round_dir(r) / "train_log.csv" for r in pn.round_numbers(layout)})
    return {name: pd.read_csv(p) for name, p in paths.items() if p.exists()}


def image_divergence(layout: store.RunLayout) -> pd.Series | None:
    table = _read_csv(layout.reliability, ("id", "image_divergence"))
    return None if table is None else table.groupby("id", sort=False)["image_divergence"].first()


# -------------------------------------------------------------------------------------------- html
CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;font-size:0.9em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#eee}td.name{text-align:left}
figure{display:inline-block;margin:0.5em}figure img{max-width:100%}
#gallery figure{display:block;border-top:1px solid #ddd;padding-top:0.4em}
#gallery figcaption{font-size:0.85em;margin-bottom:0.3em}
.controls{margin:0.5em 0}#broken{color:#b00}
"""

# Sorting and filtering of gallery items by their data-* attributes (also from the URL fragment),
# and a count of images that failed to load (body data-broken; shown when > 0).
SCRIPT = """
const gallery = document.getElementById('gallery');
function num(el, key){const v = parseFloat(el.getAttribute(key)); return isNaN(v) ? null : v;}
function update(){
  if(!gallery) return;
  const [key, dir] = document.getElementById('sort').value.split('|');
  const cls = document.getElementById('filter').value;
  const items = Array.from(gallery.children);
  items.sort((a, b) => {
    if(key === 'id') return a.dataset.id.localeCompare(b.dataset.id);
    const x = num(a, key), y = num(b, key);
    if(x === null || y === null) return (x === null) - (y === null);
    return dir === 'desc' ? y - x : x - y;});
  for(const it of items){
    it.hidden = cls !== '' && !it.dataset.classes.split(';').includes(cls);
    gallery.appendChild(it);}
}
window.addEventListener('load', () => {
  const broken = Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).length;
  document.body.dataset.broken = String(broken);
  if(broken) document.getElementById('broken').textContent = broken + ' image(s) failed to load';
  document.body.dataset.loaded = '1';
});
// The URL fragment (#sort=KEY|asc&class=NAME) picks the sorting and filter, so a view can be linked.
const params = new URLSearchParams(location.hash.slice(1));
for(const [id, key] of [['sort', 'sort'], ['filter', 'class']]){
  const el = document.getElementById(id);
  if(!el) continue;
  if(params.has(key) && Array.from(el.options).some(o => o.value === params.get(key))) el.value = params.get(key);
  el.addEventListener('change', () => {
    update();
    const s = document.getElementById('sort').value, c = document.getElementById('filter').value;
    history.replaceState(null, '', '#' + new URLSearchParams(c ? {sort: s, class: c} : {sort: s}));});
}
update();
"""


def _fmt(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _iou_attr(stage: str) -> str:
    """The data-* attribute holding a stage's per-image mIoU (HTML attribute names are lower case)."""
    return "data-iou-" + re.sub(r"[^a-z0-9_-]", "_", stage.lower())


def _attr_value(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else repr(float(value))


def table_html(table: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ("stage", *table.columns, "split"))
    rows = []
    for (stage, split), values in table.iterrows():
        cells = "".join(f"<td>{_fmt(v)}</td>" for v in values)
        rows.append(f'<tr><td class="name">{html.escape(stage)}</td>{cells}'
                    f'<td class="name">{html.escape(split)}</td></tr>')
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def gallery_html(items: list[dict], iou_stages: list[str], classes: list[str]) -> str:
    """Gallery markup; each item dict has id, src, classes, iou {stage: value}, divergence."""
    sort_options = [("id|asc", "image id")]
    for stage in iou_stages:
        sort_options += [(f"{_iou_attr(stage)}|asc", f"mIoU {stage}, worst first"),
                         (f"{_iou_attr(stage)}|desc", f"mIoU {stage}, best first")]
    sort_options += [("data-divergence|desc", "divergence, highest first"),
                     ("data-divergence|asc", "divergence, lowest first")]
    if iou_stages:  # default: the gallery stage (data-iou), worst first
        sort_options.insert(0, ("data-iou|asc", f"mIoU {iou_stages[-1]} (gallery stage), worst first"))
    options = "".join(f'<option value="{html.escape(v)}">{html.escape(t)}</option>' for v, t in sort_options)
    filters = '<option value="">all classes</option>' + "".join(
        f'<option value="{html.escape(c)}">{html.escape(c)}</option>' for c in classes)
    figures = []
    for item in items:
        iou_attrs = "".join(f' {_iou_attr(s)}="{_attr_value(item["iou"].get(s))}"' for s in iou_stages)
        default_iou = item["iou"].get(iou_stages[-1]) if iou_stages else None
        caption = "; ".join([html.escape(item["id"]), "classes: " + html.escape(", ".join(item["classes"]))]
                            + [f"mIoU {html.escape(s)} {_fmt(item['iou'].get(s))}" for s in iou_stages
                               if item["iou"].get(s) is not None]
                            + ([f"divergence {_fmt(item['divergence'])}"] if item["divergence"] is not None else []))
        figures.append(
            f'<figure class="item" data-id="{html.escape(item["id"])}" data-iou="{_attr_value(default_iou)}"'
            f' data-divergence="{_attr_value(item["divergence"])}"{iou_attrs}'
            f' data-classes="{html.escape(";".join(item["classes"]))}">'
            f'<figcaption>{caption}</figcaption><a href="{html.escape(item["src"])}" title="full size">'
            f'<img src="{html.escape(item["src"])}" alt="panel of {html.escape(item["id"])}"></a></figure>')
    return (f'<div class="controls">sort: <select id="sort">{options}</select> '
            f'class: <select id="filter">{filters}</select></div>'
            f'<div id="gallery">{"".join(figures)}</div>')


def page_html(title: str, sections: list[tuple[str, str]]) -> str:
    body = "".join(f"<h2>{html.escape(h)}</h2>\n{content}\n" for h, content in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="generator" content="weakseg report"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head>\n<body><h1>{html.escape(title)}</h1><p id=\"broken\"></p>\n{body}"
            f"<script>{SCRIPT}</script></body></html>\n")


# -------------------------------------------------------------------------------------------- edge
def _safe_name(image_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", image_id)


def _check_replaceable(folder: Path, page_name: str) -> None:
    """Refuse to replace a folder that holds anything but a previous report (it would be deleted)."""
    if folder.exists():
        foreign = [p.name for p in folder.iterdir()
                   if not (p.is_file() and (p.name == page_name or p.suffix == ".png"))]
        if foreign:
            raise FileExistsError(f"{folder}: holds files that are not part of a report ({', '.join(foreign[:5])}); "
                                  f"choose another --out folder")


def _gallery(layout: store.RunLayout, metrics: pd.DataFrame | None, folder: Path, n_images: int) -> str | None:
    if not layout.data.exists():
        return None
    run = pn.RunPanels(layout.root)
    info = run.info
    # Per-image mIoU of every stage with a per-image CSV, in pipeline (metrics.csv) order.
    order = {s: i for i, s in enumerate(stage_order(metrics))}
    stages = sorted(pn.per_image_stages(layout), key=lambda s: (order.get(s, len(order)), s))
    mious = {s: pn.read_per_image(layout, s) for s in stages}
    divergence = image_divergence(layout)
    chosen = gallery_order(mious[stages[-1]] if stages else None, list(info.ids), n_images)
    items = []
    for k, image_id in enumerate(progress(chosen, "report panels")):
        src = f"panel_{k:03d}_{_safe_name(image_id)}.png"  # the index keeps names unique
        pn.save_png(folder / src, run.panel(image_id))
        div = divergence.get(image_id) if divergence is not None else None
        items.append({"id": image_id, "src": src,
                      "classes": [info.class_names[c] for c in info.image_labels(image_id)],
                      "iou": {s: float(m[image_id]) for s, m in mious.items() if image_id in m.index},
                      "divergence": None if div is None or pd.isna(div) else float(div)})
    return gallery_html(items, stages, list(info.class_names))


def write_report(run_dir: str | os.PathLike, out_html: str | os.PathLike | None = None,
                 gallery_images: int | None = None) -> Path:
    """Write the report page ``out_html`` (default ``<run>/report/index.html``) and its PNGs into the
    page's folder, which is replaced as a whole. ``gallery_images`` defaults to the config schema's
    ``inspect.gallery_images``. Returns the page path."""
    layout = store.RunLayout(run_dir)
    if not layout.root.is_dir():
        raise FileNotFoundError(f"{layout.root}: run directory not found")
    if gallery_images is None:
        from weakseg.config import schema

        gallery_images = schema()["properties"]["inspect"]["properties"]["gallery_images"]["default"]
    if gallery_images < 1:
        raise ValueError(f"gallery_images must be at least 1, got {gallery_images}")
    out_html = Path(out_html) if out_html is not None else layout.report_dir / "index.html"
    folder = out_html.parent
    _check_replaceable(folder, out_html.name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f"{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        sections = _sections(layout, tmp, gallery_images)
        (tmp / out_html.name).write_text(page_html(f"weakseg report: {layout.root.name}", sections),
                                         encoding="utf-8")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    store.replace_path(tmp, folder)
    log.info("report: wrote %s", out_html)
    return out_html


def _sections(layout: store.RunLayout, folder: Path, gallery_images: int) -> list[tuple[str, str]]:
    metrics = read_metrics(layout.metrics)
    sections: list[tuple[str, str]] = []
    table = stage_table(metrics) if metrics is not None else None
    if table is not None and not table.empty:
        sections.append(("Metrics per stage", table_html(table)))
    curve = _read_csv(layout / "pseudo" / "reliability_curve.csv", ("k", "fraction", "miou"))
    figures = [
        ("mIoU per stage", "stage_miou.png", plot_stage_miou(table) if table is not None and not table.empty else None),
        ("Background-threshold sweep", "threshold_sweep.png", plot_sweeps(read_sweeps(layout))),
        ("Reliability curve", "reliability_curve.png", plot_reliability_curve(curve)),
        ("Per-class IoU", "per_class_iou.png", plot_per_class_iou(metrics) if metrics is not None else None),
        ("Training loss", "training_loss.png", plot_training_logs(read_training_logs(layout))),
    ]
    plots = []
    for title, name, fig in figures:
        if fig is not None:
            save_figure(fig, folder / name)
            plots.append(f'<figure><img src="{name}" alt="{html.escape(title)}">'
                         f"<figcaption>{html.escape(title)}</figcaption></figure>")
    if plots:
        sections.append(("Plots", "\n".join(plots)))
    gallery = _gallery(layout, metrics, folder, gallery_images)
    if gallery is not None:
        sections.append(("Gallery", gallery))
    if not sections:
        sections.append(("Nothing yet", "<p>No stage of this run has produced output yet.</p>"))
    return sections
