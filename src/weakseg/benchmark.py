"""Benchmarks on a real dataset (MSRC-21 by default): each prints a table and writes a CSV.

    weakseg benchmark superpixels   ingest time, then per method: ms per image, mean count,
                                    superpixel-oracle mIoU on the train split
    weakseg benchmark pipeline      runs the whole Snakemake workflow of a config; per-stage wall time
                                    (Snakemake benchmark files), quality per stage, bytes per image
    weakseg benchmark crf           CRF ms per image at 1 and 2 threads on a finished run's scores
    weakseg benchmark bytes         bytes per image of every store of a finished run
    weakseg benchmark methods       every CAM generator (cam, spn, seam, dual) trained and inferred on
                                    the same data and iteration budget: map quality, over- and
                                    under-activation, quality after the CRF, training and inference time
    weakseg benchmark speed         the fast paths of issue 18 against their reference paths, run
                                    alternately in one process on the same real images: ms per unit
                                    and the ratio (a shared machine's load hits both alike)
    weakseg benchmark reliability   a finished run's reliability curves of its first annotation by
                                    divergence, consistency and agreement with the confident labels
    weakseg benchmark joint         the one-stage variants (weakseg.joint.benchmark) next to the
                                    config's two-step run
    weakseg benchmark compare       two finished pipeline benchmarks (this config's and --against's
                                    CSVs): job seconds per stage and their ratio, quality per row
                                    and the rows that fell by more than half a point (issue 18)

Benchmarks measure; tests assert. Apart from the row summary of ``benchmark methods``
(``method_row``), nothing here is run by the test suite.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from weakseg import store, timing
from weakseg.cam import MODELS as CAM_MODELS
from weakseg.commands import THREADS, Command, option, optional
from weakseg.errors import InputError
from weakseg.superpixels import METHODS as SUPERPIXEL_METHODS

log = logging.getLogger("weakseg")


def _print_table(title: str, table: pd.DataFrame, csv_path: Path) -> None:
    store.write_table(table, csv_path)
    print(f"\n== {title} ==")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"(written to {csv_path})")


def bench_superpixels(root: str, out_dir: Path, threads: int) -> pd.DataFrame:
    from weakseg.config import validate
    from weakseg.datasets.folder import ingest
    from weakseg.evaluate import run_oracle
    from weakseg.superpixels import run_superpixels

    work = Path(tempfile.mkdtemp(prefix="weakseg-bench-"))
    cfg = validate({"dataset": {"kind": "folder", "root": root, "has_background": False}})
    started = time.perf_counter()
    summary = ingest(
        root, cfg["dataset"], work / "data.zarr", work / "gt.zarr", store.provenance("bench-ingest")
    )
    ingest_s = time.perf_counter() - started
    n = summary["images"]
    rows = [
        {
            "step": "ingest",
            "method": "",
            "images": n,
            "ms_per_image": 1000 * ingest_s / n,
            "mean_superpixels": np.nan,
            "oracle_miou_train": np.nan,
            "bytes_per_image": store.store_bytes(work / "data.zarr") / n,
        }
    ]
    for method in SUPERPIXEL_METHODS:
        cfg["superpixels"]["method"] = method
        sp_path = work / f"sp_{method}.zarr"
        started = time.perf_counter()
        run_superpixels(cfg, work / "data.zarr", sp_path, threads=threads)
        elapsed = time.perf_counter() - started
        oracle_csv = work / f"oracle_{method}.csv"
        run_oracle(work / "data.zarr", work / "gt.zarr", sp_path, cfg["dataset"]["train_split"], oracle_csv)
        oracle = pd.read_csv(oracle_csv, keep_default_na=False)
        miou = float(oracle[(oracle["metric"] == "miou") & (oracle["class"] == "")]["value"].iloc[0])
        rows.append(
            {
                "step": "superpixels",
                "method": method,
                "images": n,
                "ms_per_image": 1000 * elapsed / n,
                "mean_superpixels": _mean_superpixels(sp_path),
                "oracle_miou_train": miou,
                "bytes_per_image": store.store_bytes(sp_path) / n,
            }
        )
    table = pd.DataFrame(rows)
    _print_table(
        f"MSRC-21 ingest and superpixels ({threads} threads, n_segments {cfg['superpixels']['n_segments']})",
        table,
        out_dir / "superpixels.csv",
    )
    return table


def _mean_superpixels(sp_path: Path) -> float:
    group = store.open_store(sp_path, "superpixels")
    return float(
        np.mean(
            [
                int(store.get(group, store.SUPERPIXELS, i).max()) + 1
                for i in store.ids_in(group, store.SUPERPIXELS)
            ]
        )
    )


def bytes_per_image(run_dir: Path) -> pd.DataFrame:
    """Bytes per image of every Zarr store under a run directory."""
    rows = []
    for path in sorted(Path(run_dir).rglob("*.zarr")):
        if ".tmp-" in path.name or "shards" in path.parts:
            continue
        group = store.open_store(path)
        counts = {k: len(store.ids_in(group, k)) for k, _ in group.groups()}
        n_images = max(counts.values(), default=0)
        size = store.store_bytes(path)
        rows.append(
            {
                "store": str(path.relative_to(run_dir)),
                "kind": group.attrs.get("kind"),
                "keys": ",".join(sorted(counts)),
                "images": n_images,
                "arrays": sum(counts.values()),
                "bytes": size,
                "bytes_per_image": size / n_images if n_images else np.nan,
            }
        )
    return pd.DataFrame(rows)


def stage_times(run_dir: Path) -> pd.DataFrame:
    """Per Snakemake job: wall seconds and CPU seconds (the rule's benchmark file; on a shared machine the
    CPU seconds move less with the load), kernel seconds (the compute kernels alone, from the kernel
    line of the job's log, see ``weakseg.timing``; NaN for jobs without kernels), the ratio job / kernel
    (the overhead to remove) and which kernels they were."""
    layout = store.RunLayout(run_dir)
    rows = []
    for job, tsv in sorted(layout.found_benchmarks().items()):
        t = pd.read_csv(tsv, sep="\t")
        seconds = float(t["s"].iloc[0])
        kernels = timing.read_kernel_seconds(layout.log(job)) or {}
        kernel_s = sum(kernels.values()) if kernels else np.nan
        rows.append(
            {
                "job": job,
                "seconds": seconds,
                "cpu_s": float(t["cpu_time"].iloc[0]) if "cpu_time" in t else np.nan,
                "kernel_s": kernel_s,
                "job_per_kernel": seconds / kernel_s if kernel_s else np.nan,
                "kernels": " ".join(f"{k}={v:.1f}" for k, v in kernels.items()),
                "max_rss_mb": float(t["max_rss"].iloc[0]),
            }
        )
    return pd.DataFrame(
        rows, columns=["job", "seconds", "cpu_s", "kernel_s", "job_per_kernel", "kernels", "max_rss_mb"]
    )


def quality_table(metrics_csv: Path) -> pd.DataFrame:
    from weakseg.evaluate import read_tidy

    m = read_tidy(metrics_csv)
    m = m[m["class"] == ""].copy()
    m["value"] = m["value"].astype(float)
    wide = m.pivot_table(index=["stage", "split"], columns="metric", values="value", sort=False).reset_index()
    cols = [
        c
        for c in ("stage", "split", "miou", "mean_class_acc", "pixel_acc", "labelled_fraction", "n_images")
        if c in wide.columns
    ]
    return wide[cols]


def bench_pipeline(config_path: str, out_dir: Path, cores: int) -> None:
    from weakseg.config import load, run_dir

    cfg = load(config_path)
    snakefile = Path(__file__).resolve().parents[2] / "Snakefile"
    cmd = [
        str(Path(sys.executable).parent / "snakemake"),
        "-s",
        str(snakefile),
        "--cores",
        str(cores),
        "--configfile",
        config_path,
        "--rerun-incomplete",
    ]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    print("running:", " ".join(cmd), flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    wall = time.perf_counter() - started
    run = run_dir(cfg)
    times = stage_times(run)
    _print_table(
        f"{cfg['run']}: seconds per job (this invocation's wall time {wall:.0f} s; jobs already "
        f"done earlier keep their old timings)",
        times,
        out_dir / f"{cfg['run']}_times.csv",
    )
    print(
        f"sum of job times: {times['seconds'].sum():.0f} s (CPU {times['cpu_s'].sum():.0f} s), of which kernels "
        f"{times['kernel_s'].sum():.0f} s (kernel seconds of multi-process jobs are summed over their workers)"
    )
    _print_table(
        f"{cfg['run']}: quality per stage",
        quality_table(run / "metrics.csv"),
        out_dir / f"{cfg['run']}_quality.csv",
    )
    _print_table(f"{cfg['run']}: bytes per image", bytes_per_image(run), out_dir / f"{cfg['run']}_bytes.csv")


# A quality row "holds" when neither mIoU nor mean class accuracy fell by more than this (points).
COMPARE_TOLERANCE = 0.5


def stage_of(job: str) -> str:
    """The stage a job belongs to, whatever its round or shard: train_seg_round2 -> train_seg,
    predict_seg_round1_val-3 -> predict_seg_val; every evaluation job is one stage."""
    stage = re.sub(r"_round\d+|-\d+$", "", job)
    return "evaluate" if stage.startswith("evaluate") else stage


def compare_times(old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """Job seconds of two ``stage_times`` tables summed per stage, with new / old; the last row is the
    sum over all jobs."""
    sums = [t.groupby(t["job"].map(stage_of))["seconds"].agg(["sum", "count"]) for t in (old, new)]
    table = pd.concat(sums, axis=1, keys=["old", "new"]).fillna(0)
    table.loc["all jobs"] = table.sum()
    return pd.DataFrame(
        {
            "stage": table.index,
            "old_jobs": table[("old", "count")].astype(int).to_numpy(),
            "old_s": table[("old", "sum")].to_numpy(),
            "new_jobs": table[("new", "count")].astype(int).to_numpy(),
            "new_s": table[("new", "sum")].to_numpy(),
            "new_per_old": (table[("new", "sum")] / table[("old", "sum")].replace(0, np.nan)).to_numpy(),
        }
    )


def compare_quality(
    old: pd.DataFrame, new: pd.DataFrame, tolerance: float = COMPARE_TOLERANCE
) -> pd.DataFrame:
    """The rows (stage, split) of two ``quality_table`` tables present in both, in points, with the
    change and whether the row holds (neither mIoU nor mean class accuracy fell by more than
    ``tolerance`` points)."""
    both = old.merge(new, on=["stage", "split"], suffixes=("_old", "_new"))
    table = both[["stage", "split"]].copy()
    for metric in ("miou", "mean_class_acc"):
        table[f"{metric}_old"] = 100 * both[f"{metric}_old"]
        table[f"{metric}_new"] = 100 * both[f"{metric}_new"]
        table[f"{metric}_change"] = table[f"{metric}_new"] - table[f"{metric}_old"]
    table["holds"] = (table[["miou_change", "mean_class_acc_change"]] >= -tolerance).all(axis=1)
    return table


def bench_compare(config_path: str, out_dir: Path, against: str) -> None:
    from weakseg.config import load

    run = load(config_path)["run"]
    mine, theirs = out_dir / run, Path(against)
    tables = {}
    for side, prefix in (("new", mine), ("old", theirs)):
        for kind in ("times", "quality"):
            path = Path(f"{prefix}_{kind}.csv")
            if not path.is_file():
                raise FileNotFoundError(f"{path}: not found (written by weakseg benchmark pipeline)")
            tables[side, kind] = pd.read_csv(path)
    times = compare_times(tables["old", "times"], tables["new", "times"])
    _print_table(
        f"{run} (new) against {theirs.name} (old): job seconds per stage",
        times,
        out_dir / f"{run}_vs_{theirs.name}_times.csv",
    )
    quality = compare_quality(tables["old", "quality"], tables["new", "quality"])
    _print_table(
        f"{run} (new) against {theirs.name} (old): quality (points)",
        quality,
        out_dir / f"{run}_vs_{theirs.name}_quality.csv",
    )
    fell = quality[~quality["holds"]]
    total = times.iloc[-1]
    print(
        f"sum of job times: new / old = {total['new_s']:.0f} / {total['old_s']:.0f} s = {total['new_per_old']:.2f}; "
        f"rows more than {COMPARE_TOLERANCE} points below old: "
        + (", ".join(f"{r.stage} {r.split}" for r in fell.itertuples()) or "none")
    )


def bench_reliability(config_path: str, out_dir: Path) -> None:
    """The reliability curves of a finished run's first annotation (``segment.first_round_input``) under
    three per-annotation scores: the SPN's divergence of its shape; its consistency with the dataset's
    class prototypes (``pseudo.consistency``, seeded by the cleaned annotation; 1 - consistency ranks);
    and its agreement with the confident labels (``class_agreements`` of the CRF against the cleaned
    annotation; 1 - agreement ranks). ``pseudo.reliability_score`` picks one of the first two.

    Two curves each, against the train ground truth: ``images``, the pipeline's own curve (images by
    their least reliable annotation, cumulative mIoU over whole images: ``metrics.reliability_curve``),
    and ``annotations``, each annotation scored on its own class under a per-class selection
    (``metrics.annotation_curve``). Background is not an annotation there: it is annotated alone on
    images labelled background only, where it is right by construction.
    """
    from weakseg.config import load, run_dir
    from weakseg.datasets import open_data
    from weakseg.metrics import Confusion, annotation_curve, reliability_curve
    from weakseg.pseudo.consistency import dataset_consistency, load_feature_encoder
    from weakseg.pseudo.divergence import annotated_classes, class_agreements, class_divergences
    from weakseg.pseudo.jobs import split_ids

    cfg = load(config_path)
    layout = store.RunLayout(run_dir(cfg))
    variant = cfg["segment"]["first_round_input"]
    info, data = open_data(layout.data)
    gt = store.open_store(layout.gt, "gt")
    labels, dense, confident = (
        store.open_store(layout.pseudo(name), "labels") for name in (variant, "crf", "cleaned")
    )
    with_masks = set(store.ids_in(gt, store.MASKS))
    scores = {"divergence": [], "consistency": [], "agreement": []}  # (id, class, score), lower = better
    ids = [i for i in split_ids(cfg, info, labels, store.LABELS) if i in with_masks]
    if not ids:
        raise ValueError(f"{layout.gt}: no train image has a ground-truth mask; nothing to measure")
    content = dataset_consistency(
        info,
        data,
        load_feature_encoder(layout.cam_model, info),
        confident,
        labels,
        ids,
        lambda image_id: annotated_classes(info, image_id),
        cfg["pseudo"]["consistency_temperature"],
    )
    confusions = {}
    for image_id in ids:
        annotation = store.get(labels, store.LABELS, image_id)
        confusions[image_id] = Confusion(info.n_classes).add(store.get(gt, store.MASKS, image_id), annotation)
        scored = annotated_classes(info, image_id)
        shape = class_divergences(annotation, scored)
        agreement = class_agreements(
            store.get(dense, store.LABELS, image_id), store.get(confident, store.LABELS, image_id), scored
        )
        for c in scored:
            scores["divergence"].append((image_id, c, shape[c][2] if c in shape else np.inf))
            scores["consistency"].append((image_id, c, 1.0 - content[image_id].get(c, 0.0)))
            scores["agreement"].append((image_id, c, 1.0 - agreement.get(c, 0.0)))
    points = cfg["evaluate"]["reliability_curve_points"]
    frames = []
    for name, rows in scores.items():
        worst = pd.DataFrame(rows, columns=["id", "class", "score"]).groupby("id")["score"].max()
        images = reliability_curve([(worst[i], conf) for i, conf in confusions.items()], points)
        own = [(c, score, confusions[i]) for i, c, score in rows if not (info.has_background and c == 0)]
        annotations = annotation_curve(own, points)
        frames.append(images.assign(score=name, curve="images").drop(columns="k"))
        frames.append(annotations.assign(score=name, curve="annotations").drop(columns="annotations"))
    table = pd.concat(frames, ignore_index=True)
    table["fraction"] = (table["fraction"] * points).round().astype(int) / points  # the nominal fraction
    wide = table.pivot_table(index="fraction", columns=["score", "curve"], values="miou").reset_index()
    wide.columns = ["fraction"] + [f"{score}_{curve}" for score, curve in wide.columns[1:]]
    _print_table(
        f"{cfg['run']}: reliability curves of the {variant} annotation (train mIoU as more are kept)",
        wide,
        out_dir / f"{cfg['run']}_reliability.csv",
    )


def bench_crf(config_path: str, out_dir: Path) -> None:
    from weakseg.config import load, run_dir
    from weakseg.pseudo.crf import run_crf

    cfg = load(config_path)
    layout = store.RunLayout(run_dir(cfg))
    rows = []
    for threads in (1, 2):
        out = Path(tempfile.mkdtemp(prefix="weakseg-crf-")) / "crf.zarr"
        started = time.perf_counter()
        run_crf(
            cfg,
            layout.data,
            layout.scores,
            cfg["pseudo"]["source"],
            out,
            threads,
            model_path=layout.cam_model,
        )
        n = len(store.ids_in(store.open_store(out, "labels"), store.LABELS))
        rows.append(
            {"threads": threads, "images": n, "ms_per_image": 1000 * (time.perf_counter() - started) / n}
        )
    _print_table("dense CRF", pd.DataFrame(rows), out_dir / f"{cfg['run']}_crf.csv")


METHOD_COLUMNS = [
    "method",
    "iterations",
    "train_s",
    "infer_ms_per_image",
    "infer_images",
    "infer_scales",
    "cam_miou",
    "cam_mean_class_acc",
    "cam_over_activation",
    "cam_under_activation",
    "spcam_miou",
    "spcam_mean_class_acc",
    "spcam_over_activation",
    "spcam_under_activation",
    "crf_miou",
    "crf_mean_class_acc",
]


def map_quality(tidy: pd.DataFrame, stage: str) -> dict:
    """mIoU, mean class accuracy and the mean over classes of over-activation FP / (TP + FP) and of
    under-activation FN / (TP + FN) = 1 - recall, from the tidy rows ``evaluate`` wrote for ``stage``."""
    rows = tidy[tidy["stage"] == stage]
    overall = rows[rows["class"] == ""].set_index("metric")["value"].astype(float)
    per_class = rows[rows["class"] != ""]

    def class_mean(metric: str, transform=lambda v: v) -> float:
        values = transform(per_class.loc[per_class["metric"] == metric, "value"].astype(float))
        return float(values.mean())  # NaN (class absent) is skipped, as in evaluate's means

    return {
        "miou": float(overall["miou"]),
        "mean_class_acc": float(overall["mean_class_acc"]),
        "over_activation": class_mean("over_activation"),
        "under_activation": class_mean("class_acc", lambda recall: 1 - recall),
    }


def method_row(method: str, timing: dict, metrics: dict[str, pd.DataFrame]) -> dict:
    """One row of the methods table: ``timing`` (iterations, train_s, infer_ms_per_image,
    infer_images, infer_scales) and the tidy metrics of stages cam, spcam and crf."""
    row = {"method": method, **timing}
    for stage in ("cam", "spcam"):
        row.update({f"{stage}_{k}": v for k, v in map_quality(metrics[stage], stage).items()})
    crf = map_quality(metrics["crf"], "crf")
    row.update(crf_miou=crf["miou"], crf_mean_class_acc=crf["mean_class_acc"])
    return {c: row[c] for c in METHOD_COLUMNS}


def _prepare_inputs(cfg: dict, shared: store.RunLayout, threads: int) -> None:
    """data.zarr, gt.zarr and superpixels.zarr of the config's dataset, made once and then reused."""
    from weakseg.datasets.folder import ingest
    from weakseg.datasets.synthetic import write_folder
    from weakseg.superpixels import run_superpixels

    def finished(path, kind):
        try:
            store.open_store(path, kind)
            return True
        except store.StoreError:
            return False

    if not (finished(shared.data, "data") and finished(shared.gt, "gt")):
        root = cfg["dataset"]["root"]
        if cfg["dataset"]["kind"] == "synthetic":
            root = write_folder(
                cfg["dataset"]["synthetic"], cfg["dataset"]["has_background"], shared.synthetic
            )
        ingest(root, cfg["dataset"], shared.data, shared.gt, store.provenance("ingest", cfg["dataset"]))
    if not finished(shared.superpixels, "superpixels"):
        run_superpixels(cfg, shared.data, shared.superpixels, threads=threads)


def _link_inputs(shared: store.RunLayout, layout: store.RunLayout) -> None:
    """Give a method's run folder the shared input stores, so it is a complete run (weakseg inspect)."""
    layout.root.mkdir(parents=True, exist_ok=True)
    for name in ("data", "gt", "superpixels"):
        link = getattr(layout, name)
        if not link.exists():
            link.symlink_to(getattr(shared, name).resolve(), target_is_directory=True)


def bench_method(cfg: dict, shared: store.RunLayout, method: str, split: str, threads: int) -> dict:
    """Train and infer one CAM generator, CRF its pseudo-labels, evaluate all three; returns its row.

    A method whose model and scores exist with a timing of the same training config is not rerun.
    """
    from weakseg.cam.infer import run_infer_cam
    from weakseg.cam.models import resolve_cam_config
    from weakseg.cam.train import run_train_cam
    from weakseg.evaluate import run_evaluate
    from weakseg.nets.model_file import config_fingerprint
    from weakseg.pseudo.crf import run_crf

    cfg = {**cfg, "cam": resolve_cam_config({**cfg["cam"], "model": method})}
    layout = store.RunLayout(shared.root / f"{method}_it{cfg['cam']['iterations']}")
    _link_inputs(shared, layout)
    fingerprint = config_fingerprint(cfg["cam"], cfg["dataset"], cfg["superpixels"], split)
    timing_csv = layout.cam_dir / "benchmark_timing.csv"
    timing = (
        pd.read_csv(timing_csv, dtype={"infer_scales": str}).iloc[0].to_dict() if timing_csv.is_file() else {}
    )
    if (
        timing.get("fingerprint") != fingerprint
        or not set(METHOD_COLUMNS[1:6]) <= set(timing)
        or not layout.scores.exists()
    ):
        shutil.rmtree(layout.cam_dir, ignore_errors=True)  # a resumed checkpoint would shorten the timing
        started = time.perf_counter()
        run_train_cam(cfg, layout.data, layout.superpixels, layout.cam_dir, threads=threads)
        train_s = time.perf_counter() - started
        started = time.perf_counter()
        n_images = run_infer_cam(
            cfg,
            layout.data,
            layout.superpixels,
            layout.cam_model,
            layout.scores,
            threads=threads,
            split=split,
        )
        infer_s = time.perf_counter() - started
        timing = {
            "fingerprint": fingerprint,
            "iterations": cfg["cam"]["iterations"],
            "train_s": train_s,
            "infer_ms_per_image": 1000 * infer_s / n_images,
            "infer_images": n_images,
            "infer_scales": " ".join(str(v) for v in cfg["cam"]["infer_scales"]),
        }
        store.write_table(pd.DataFrame([timing]), timing_csv)
    metrics = {}
    for key in (store.CAM, store.SPCAM):
        metrics[key] = run_evaluate(
            cfg,
            layout.data,
            layout.gt,
            layout.scores,
            key,
            split,
            layout.metrics_csv(key, split),
            per_image_csv=layout.per_image_csv(key, split),
            key=key,
        )
    run_crf(
        cfg,
        layout.data,
        layout.scores,
        cfg["pseudo"]["source"],
        layout.crf,
        threads,
        split=split,
        model_path=layout.cam_model,
    )
    metrics["crf"] = run_evaluate(
        cfg,
        layout.data,
        layout.gt,
        layout.crf,
        "crf",
        split,
        layout.metrics_csv("crf", split),
        per_image_csv=layout.per_image_csv("crf", split),
    )
    return method_row(method, {k: timing[k] for k in METHOD_COLUMNS[1:6]}, metrics)


def bench_methods(
    config_path: str,
    out_dir: Path,
    threads: int,
    methods,
    split: str | None = None,
    iterations: int | None = None,
    infer_scales=None,
) -> pd.DataFrame:
    """Every CAM generator of ``methods`` on the config's data with the same budget, in run folders
    ``<results>/<run>_methods/<method>_it<iterations>/``; the table goes to ``methods_<run>.csv``."""
    from weakseg.config import load, run_dir

    cfg = load(config_path)
    if iterations is not None:
        cfg["cam"]["iterations"] = iterations
    if infer_scales:
        cfg["cam"]["infer_scales"] = list(infer_scales)
    split = split or cfg["dataset"]["train_split"]
    shared = store.RunLayout(run_dir(cfg).with_name(f"{cfg['run']}_methods"))
    _prepare_inputs(cfg, shared, threads)
    rows = []
    for method in methods:
        print(f"== {method}: {cfg['cam']['iterations']} iterations, inference on {split}", flush=True)
        rows.append(bench_method(cfg, shared, method, split, threads))
    table = pd.DataFrame(rows, columns=METHOD_COLUMNS)
    csv_path = out_dir / f"methods_{cfg['run']}.csv"
    table = with_earlier_rows(
        table, csv_path, ["method", "iterations", "infer_scales"], {"infer_scales": str}
    )
    _print_table(
        f"{cfg['run']}: CAM generators, batch {cfg['cam']['batch_size']}, maps on the {split} split",
        table,
        csv_path,
    )
    return table


SPEED_COLUMNS = ["path", "unit", "units", "reference_ms", "fast_ms", "fast_over_reference"]


def interleaved(units, reference, fast) -> tuple[float, float]:
    """Mean seconds per unit of ``reference(unit)`` and ``fast(unit)``, run alternately on every unit
    (which runs first swaps from unit to unit), so that load changes hit both alike."""
    seconds = [0.0, 0.0]
    for k, unit in enumerate(units):
        order = ((0, reference), (1, fast)) if k % 2 == 0 else ((1, fast), (0, reference))
        for which, fn in order:
            started = time.perf_counter()
            fn(unit)
            seconds[which] += time.perf_counter() - started
    return seconds[0] / len(units), seconds[1] / len(units)


def cache_hits(n_images: int, cam_cfg: dict, iterations: int) -> dict:
    """Draws and cache hits of the frozen-feature cache over ``iterations`` batches, from the same random
    draws as ``cam.train``'s cached batches (size, images, flip, padding position), without computing."""
    rng = np.random.default_rng(cam_cfg["seed"])
    seen, draws, hits = set(), 0, 0
    for _ in range(iterations):
        size = int(rng.choice(cam_cfg["train_sizes"]))
        for k in rng.choice(n_images, size=min(cam_cfg["batch_size"], n_images), replace=False):
            key = (int(k), size, int(rng.integers(2)), int(rng.integers(cam_cfg["train_offsets"])))
            draws, hits = draws + 1, hits + (key in seen)
            seen.add(key)
    return {"draws": draws, "hits": hits, "hit_rate": hits / max(draws, 1), "variants_cached": len(seen)}


def bench_speed(
    config_path: str, out_dir: Path, threads: int, n_images: int = 40, steps: int = 8
) -> pd.DataFrame:
    """Reference against fast path, alternately on the same units, with the config's networks (ImageNet
    encoder, untrained heads: the times do not depend on the head weights): CAM inference per image
    (every class upsampled on a plain network, against the kept classes on a channels-last one with
    BatchNorm folded), segmentation prediction per image (every class resized on a plain network,
    against the image's classes on a channels-last one with BatchNorm folded), the CAM training step per
    batch (superpixel pooling of the upsampled scores against the weighted pooling) and the segmentation
    training step (dense ASPP convolutions against skipping the taps that read only padding); plus the batch
    preparation a training step waits for without the prefetch thread. Images: every k-th of the
    data store, so train and val mix as in the run."""
    import copy

    import torch
    import torch.nn.functional as F

    from weakseg.cam.infer import image_scores
    from weakseg.cam.losses import training_loss
    from weakseg.cam.models import build_classifier
    from weakseg.cam.train import draw_resized_batch, to_tensor01
    from weakseg.config import load, run_dir
    from weakseg.datasets import open_data, read_image
    from weakseg.nets.backbones import fold_batchnorm
    from weakseg.segment.models import AtrousConv2d, build_segmenter
    from weakseg.segment.predict import predict_probabilities

    torch.set_num_threads(max(1, threads))
    cfg = load(config_path)
    shared = store.RunLayout(run_dir(cfg).with_name(f"{cfg['run']}_speed"))
    _prepare_inputs(cfg, shared, threads)
    info, data = open_data(shared.data)
    sp_store = store.open_store(shared.superpixels, "superpixels")
    cam_cfg, seg = cfg["cam"], cfg["segment"]
    fg, train = info.fg_classes, set(info.split(cfg["dataset"]["train_split"]))
    step = max(1, len(info.ids) // n_images)
    units = []
    for image_id in list(info.ids)[::step][:n_images]:
        labelled = image_id in train
        units.append(
            {
                "image": read_image(data, image_id),
                "sp": store.get(sp_store, store.SUPERPIXELS, image_id),
                "keep": np.flatnonzero(info.label_vector(image_id)[fg]) if labelled else np.arange(len(fg)),
                "classes": info.image_labels(image_id) if labelled else None,
            }
        )
    cpu, rows = torch.device("cpu"), []

    def row(path: str, unit: str, n: int, reference_s: float, fast_s: float) -> None:
        rows.append(
            {
                "path": path,
                "unit": unit,
                "units": n,
                "reference_ms": 1000 * reference_s,
                "fast_ms": 1000 * fast_s,
                "fast_over_reference": fast_s / reference_s if reference_s else np.nan,
            }
        )
        print(f"{path}: {1000 * reference_s:.1f} -> {1000 * fast_s:.1f} ms per {unit}", flush=True)

    cam_net = build_classifier(cam_cfg, len(fg)).eval()
    cam_fast = fold_batchnorm(copy.deepcopy(cam_net).to(memory_format=torch.channels_last))
    scales, flip, merge = cam_cfg["infer_scales"], cam_cfg["infer_flip"], cam_cfg["spcam_merge"]

    def cam_reference(u):
        cam, spcam, probs = image_scores(cam_net, u["image"], u["sp"], scales, flip, cpu, merge)
        return cam[u["keep"]], spcam[u["keep"]], probs[u["keep"]]

    def cam_fast_path(u):
        return image_scores(cam_fast, u["image"], u["sp"], scales, flip, cpu, merge, keep=u["keep"])

    row("infer-cam", "image", len(units), *interleaved(units, cam_reference, cam_fast_path))

    seg_net = build_segmenter(seg, info.n_classes, info.has_background).eval()
    seg_fast = fold_batchnorm(copy.deepcopy(seg_net).to(memory_format=torch.channels_last))

    def predict(model, classes: bool):
        # the reference resizes and normalises every class, then keeps the image's (as before issue 18)
        def run(u):
            probs = predict_probabilities(
                model,
                u["image"],
                seg["infer_scales"],
                seg["infer_flip"],
                cpu,
                u["classes"] if classes else None,
                seg["prior_adjustment"],
            )
            return probs if classes or u["classes"] is None else probs[u["classes"]]

        return run

    row(
        "predict-seg",
        "image",
        len(units),
        *interleaved(units, predict(seg_net, classes=False), predict(seg_fast, classes=True)),
    )

    rng = np.random.default_rng(0)
    ids = sorted(train)

    def draw_batch(_=None):
        _, picked, images, sps = draw_resized_batch(rng, ids, data, sp_store, cam_cfg)
        ys = [info.label_vector(image_id)[fg].astype(np.float32) for image_id in picked]
        return {
            "x": to_tensor01(images),
            "sp": torch.from_numpy(np.stack(sps)).long(),
            "y": torch.from_numpy(np.stack(ys)),
        }

    started = time.perf_counter()
    batches = [draw_batch() for _ in range(steps)]
    prep_s = (time.perf_counter() - started) / steps
    compute_loss = training_loss(cam_cfg)
    nets = []
    for weighted in (False, True):
        net = build_classifier(cam_cfg, len(fg)).train()
        net.weighted_pooling = weighted  # only the SPN with bilinear upsampling has another path
        nets.append((net, torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-4)))

    def train_step(net_and_optimizer):
        net, optimizer = net_and_optimizer

        def run(batch):
            loss, _ = compute_loss(net, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return run

    row("train-cam step", "batch", steps, *interleaved(batches, train_step(nets[0]), train_step(nets[1])))
    if nets[1][0].encoder.frozen_layers:
        cached = [{**b, "x": None, "frozen": nets[1][0].frozen_features(b["x"])} for b in batches]
        row(
            "train-cam step from cached frozen features (a cache hit)",
            "batch",
            steps,
            *interleaved(
                range(steps),
                lambda k: train_step(nets[1])(batches[k]),
                lambda k: train_step(nets[1])(cached[k]),
            ),
        )
    row("train-cam batch preparation (overlapped by the prefetch thread)", "batch", steps, prep_s, 0.0)

    # The segmentation step on crops of the same batches (random pixel labels: the time does not depend
    # on them), every ASPP convolution dense against the one that skips the taps reading only padding.
    crop = seg["crop_size"]
    seg_batches = [
        {
            "x": F.interpolate(b["x"], size=(crop, crop), mode="bilinear", align_corners=False),
            "labels": torch.from_numpy(rng.integers(0, info.n_classes, (len(b["x"]), crop, crop))),
            "image_labels": torch.ones(len(b["x"]), info.n_classes),
        }
        for b in batches
    ]
    seg_nets = []
    for skip in (False, True):
        net = build_segmenter(seg, info.n_classes, info.has_background).train()
        for module in net.modules():
            if isinstance(module, AtrousConv2d):
                module.skip_padding_taps = skip
        seg_nets.append((net, torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-4)))

    def seg_step(net_and_optimizer):
        net, optimizer = net_and_optimizer

        def run(batch):
            loss, _ = net.loss(net(batch["x"]), batch["labels"], batch["image_labels"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return run

    for net_and_optimizer in seg_nets:  # first steps set up kernels and optimizer state: not timed
        seg_step(net_and_optimizer)(seg_batches[0])
    row(
        f"train-seg step ({crop} px crops)",
        "batch",
        steps,
        *interleaved(seg_batches, seg_step(seg_nets[0]), seg_step(seg_nets[1])),
    )
    table = pd.DataFrame(rows, columns=SPEED_COLUMNS)
    hits = pd.DataFrame(
        [
            {"iterations": n, **cache_hits(len(ids), cam_cfg, n)}
            for n in (cam_cfg["iterations"], 3 * cam_cfg["iterations"], 10 * cam_cfg["iterations"])
        ]
    )
    _print_table(
        f"frozen-feature cache: variants drawn again (train_offsets {cam_cfg['train_offsets']})",
        hits,
        out_dir / f"cache_hits_{cfg['run']}.csv",
    )
    _print_table(
        f"{cfg['run']}: fast against reference paths ({threads} threads)",
        table,
        out_dir / f"speed_{cfg['run']}.csv",
    )
    return table


def with_earlier_rows(table: pd.DataFrame, csv_path: Path, key: list[str], dtype=None) -> pd.DataFrame:
    """``table`` after the rows of an earlier invocation's CSV (other methods or budgets) that it does
    not replace (same ``key``); a CSV of other columns is ignored."""
    if not csv_path.is_file():
        return table
    earlier = pd.read_csv(csv_path, dtype=dtype)
    if list(earlier.columns) != list(table.columns):
        return table
    replaced = earlier.set_index(key).index.isin(table.set_index(key).index)
    return pd.concat([earlier[~replaced], table], ignore_index=True)


def run_benchmark(
    what: str,
    root: str,
    out: str,
    config_path: str,
    threads: int,
    methods=("cam", "spn", "seam", "dual"),
    split: str | None = None,
    iterations: int | None = None,
    infer_scales=None,
    joint_methods=("annealed", "rrm"),
    against: str | None = None,
) -> None:
    out_dir = Path(out)
    if what == "superpixels":
        if not Path(root).is_dir():
            raise FileNotFoundError(f"{root}: dataset folder not found (give --root)")
        bench_superpixels(root, out_dir, max(threads, 2))
    elif what == "pipeline":
        bench_pipeline(config_path, out_dir, max(threads, 2))
    elif what == "crf":
        bench_crf(config_path, out_dir)
    elif what == "reliability":
        bench_reliability(config_path, out_dir)
    elif what == "bytes":
        from weakseg.config import load, run_dir

        cfg = load(config_path)
        _print_table(
            f"{cfg['run']}: bytes per image",
            bytes_per_image(run_dir(cfg)),
            out_dir / f"{cfg['run']}_bytes.csv",
        )
    elif what == "methods":
        bench_methods(config_path, out_dir, threads, methods, split, iterations, infer_scales)
    elif what == "speed":
        bench_speed(config_path, out_dir, threads)
    elif what == "compare":
        if not against:
            raise InputError("benchmark compare needs --against PREFIX (the other run's <out>/<run>)")
        bench_compare(config_path, out_dir, against)
    elif what == "joint":  # one-stage training (issue 17)
        from weakseg.joint.benchmark import bench_joint

        bench_joint(config_path, out_dir, threads, joint_methods, iterations)


COMMAND = Command(
    "benchmark",
    "benchmarks on a real dataset (MSRC-21): prints a table, writes CSV",
    run_benchmark,
    (
        option(
            "what",
            choices=[
                "superpixels",
                "crf",
                "pipeline",
                "bytes",
                "methods",
                "speed",
                "joint",
                "reliability",
                "compare",
            ],
            help="what to measure (joint: the one-stage variants next to the config's two-step run; "
            "reliability: a finished run's reliability curves under two annotation scores; compare: this "
            "config's pipeline benchmark against --against's)",
        ),
        option("--root", default="../shared/data/msrc21", help="dataset folder"),
        optional(
            "--config",
            "config_path",
            "run config of the pipeline and methods benchmarks",
            default="config/msrc21.yaml",
        ),
        option("--out", default="bench", help="folder for CSV output"),
        option(
            "--methods",
            nargs="+",
            choices=CAM_MODELS,
            default=list(CAM_MODELS),
            help="methods: the CAM generators to compare",
        ),
        option(
            "--joint-methods",
            nargs="+",
            choices=["annealed", "rrm"],
            default=["annealed", "rrm"],
            help="joint: the one-stage methods to compare",
        ),
        option(
            "--split", help="methods: the split inferred and evaluated (default: the config's train split)"
        ),
        option(
            "--iterations",
            type=int,
            help="methods, joint: training iterations of every method (default: cam.iterations, "
            "joint.iterations)",
        ),
        option(
            "--infer-scales",
            type=float,
            nargs="+",
            help="methods: inference scales of every method (default: cam.infer_scales)",
        ),
        option(
            "--against",
            help="compare: the other pipeline benchmark's CSV prefix, <out>/<run> (its <run>_times.csv "
            "and <run>_quality.csv); this config's are read from --out",
        ),
        THREADS,
    ),
)
