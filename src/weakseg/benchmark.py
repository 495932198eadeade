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
    weakseg benchmark joint         the one-stage variants (weakseg.joint.benchmark) next to the
                                    config's two-step run

Benchmarks measure; tests assert. Apart from the row summary of ``benchmark methods``
(``method_row``), nothing here is run by the test suite.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from weakseg import store
from weakseg.cam import MODELS as CAM_MODELS
from weakseg.commands import THREADS, Command, option
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
    """Wall seconds per Snakemake job from the rules' benchmark files."""
    rows = []
    for tsv in sorted((Path(run_dir) / "benchmarks").glob("*.tsv")):
        t = pd.read_csv(tsv, sep="\t")
        rows.append(
            {"job": tsv.stem, "seconds": float(t["s"].iloc[0]), "max_rss_mb": float(t["max_rss"].iloc[0])}
        )
    return pd.DataFrame(rows)


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
    print(f"sum of job times: {times['seconds'].sum():.0f} s")
    _print_table(
        f"{cfg['run']}: quality per stage",
        quality_table(run / "metrics.csv"),
        out_dir / f"{cfg['run']}_quality.csv",
    )
    _print_table(f"{cfg['run']}: bytes per image", bytes_per_image(run), out_dir / f"{cfg['run']}_bytes.csv")


def bench_crf(config_path: str, out_dir: Path) -> None:
    from weakseg.config import load, run_dir
    from weakseg.pseudo.crf import run_crf

    cfg = load(config_path)
    layout = store.RunLayout(run_dir(cfg))
    rows = []
    for threads in (1, 2):
        out = Path(tempfile.mkdtemp(prefix="weakseg-crf-")) / "crf.zarr"
        started = time.perf_counter()
        run_crf(cfg, layout.data, layout.scores, cfg["pseudo"]["source"], out, threads)
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
    run_crf(cfg, layout.data, layout.scores, cfg["pseudo"]["source"], layout.crf, threads, split=split)
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
            choices=["superpixels", "crf", "pipeline", "bytes", "methods", "joint"],
            help="what to measure (joint: the one-stage variants next to the config's two-step run)",
        ),
        option("--root", default="../shared/data/msrc21", help="dataset folder"),
        option(
            "--config",
            dest="config_path",
            default="config/msrc21.yaml",
            help="run config for the pipeline and methods benchmarks",
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
        THREADS,
    ),
)
