"""Benchmarks on a real dataset (MSRC-21 by default): each prints a table and writes a CSV.

    weakseg benchmark superpixels   ingest time, then per method: ms per image, mean count,
                                    superpixel-oracle mIoU on the train split
    weakseg benchmark pipeline      runs the whole Snakemake workflow of a config; per-stage wall time
                                    (Snakemake benchmark files), quality per stage, bytes per image
    weakseg benchmark crf           CRF ms per image at 1 and 2 threads on a finished run's scores
    weakseg benchmark bytes         bytes per image of every store of a finished run

Benchmarks measure; tests assert. Nothing here is run by the test suite.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from weakseg import store

log = logging.getLogger("weakseg")
SUPERPIXEL_METHODS = ("slic", "slico", "seeds", "felzenszwalb", "skimage_slic")


def _print_table(title: str, table: pd.DataFrame, csv_path: Path) -> None:
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(csv_path, index=False)
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
    summary = ingest(root, cfg["dataset"], work / "data.zarr", work / "gt.zarr", store.provenance("bench-ingest"))
    ingest_s = time.perf_counter() - started
    n = summary["images"]
    rows = [{"step": "ingest", "method": "", "images": n, "ms_per_image": 1000 * ingest_s / n,
             "mean_superpixels": np.nan, "oracle_miou_train": np.nan, "bytes_per_image": store.store_bytes(
                 work / "data.zarr") / n}]
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
        rows.append({"step": "superpixels", "method": method, "images": n, "ms_per_image": 1000 * elapsed / n,
                     "mean_superpixels": _mean_superpixels(sp_path),
                     "oracle_miou_train": miou, "bytes_per_image": store.store_bytes(sp_path) / n})
    table = pd.DataFrame(rows)
    _print_table(f"MSRC-21 ingest and superpixels ({threads} threads, n_segments "
                 f"{cfg['superpixels']['n_segments']})", table, out_dir / "superpixels.csv")
    return table


def _mean_superpixels(sp_path: Path) -> float:
    group = store.open_store(sp_path, "superpixels")
    return float(np.mean([int(store.get(group, store.SUPERPIXELS, i).max()) + 1
                          for i in store.ids_in(group, store.SUPERPIXELS)]))


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
        rows.append({"store": str(path.relative_to(run_dir)), "kind": group.attrs.get("kind"),
                     "keys": ",".join(sorted(counts)), "images": n_images, "arrays": sum(counts.values()), "bytes": size,
                     "bytes_per_image": size / n_images if n_images else np.nan})
    return pd.DataFrame(rows)


def stage_times(run_dir: Path) -> pd.DataFrame:
    """Wall seconds per Snakemake job from the rules' benchmark files."""
    rows = []
    for tsv in sorted((Path(run_dir) / "benchmarks").glob("*.tsv")):
        t = pd.read_csv(tsv, sep="\t")
        rows.append({"job": tsv.stem, "seconds": float(t["s"].iloc[0]), "max_rss_mb": float(t["max_rss"].iloc[0])})
    return pd.DataFrame(rows)


def quality_table(metrics_csv: Path) -> pd.DataFrame:
    from weakseg.evaluate import read_tidy

    m = read_tidy(metrics_csv)
    m = m[m["class"] == ""].copy()
    m["value"] = m["value"].astype(float)
    wide = m.pivot_table(index=["stage", "split"], columns="metric", values="value", sort=False).reset_index()
    cols = [c for c in ("stage", "split", "miou", "mean_class_acc", "pixel_acc", "labelled_fraction", "n_images")
            if c in wide.columns]
    return wide[cols]


def bench_pipeline(config_path: str, out_dir: Path, cores: int) -> None:
    from weakseg.config import load, run_dir

    cfg = load(config_path)
    snakefile = Path(__file__).resolve().parents[2] / "Snakefile"
    cmd = [str(Path(sys.executable).parent / "snakemake"), "-s", str(snakefile), "--cores", str(cores),
           "--configfile", config_path, "--rerun-incomplete"]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    print("running:", " ".join(cmd), flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    wall = time.perf_counter() - started
    run = run_dir(cfg)
    times = stage_times(run)
    _print_table(f"{cfg['run']}: seconds per job (this invocation's wall time {wall:.0f} s; jobs already "
                 f"done earlier keep their old timings)", times, out_dir / f"{cfg['run']}_times.csv")
    print(f"sum of job times: {times['seconds'].sum():.0f} s")
    _print_table(f"{cfg['run']}: quality per stage", quality_table(run / "metrics.csv"),
                 out_dir / f"{cfg['run']}_quality.csv")
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
        rows.append({"threads": threads, "images": n, "ms_per_image": 1000 * (time.perf_counter() - started) / n})
    _print_table("dense CRF", pd.DataFrame(rows), out_dir / f"{cfg['run']}_crf.csv")


def run_benchmark(what: str, root: str, out: str, config_path: str, threads: int) -> None:
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
        _print_table(f"{cfg['run']}: bytes per image", bytes_per_image(run_dir(cfg)), out_dir / f"{cfg['run']}_bytes.csv")
