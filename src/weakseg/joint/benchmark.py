"""``weakseg benchmark joint``: the one-stage variants on a real dataset, next to the two-step pipeline.

Each method trains the joint network on the config's data (``joint.iterations``), predicts the
train and val splits with its segmentation head and is evaluated: the train pseudo-labels (the
prediction over each image's labels, what round 0 hands on before CRF and reliable regions), and
val (the network alone, every class). The two-step row comes from a finished workflow run of the
same config (``results/<run>``): its round-1 val rows, its RRM reliable pseudo-labels, and the sum
of its job times up to round 1's val prediction (Snakemake's benchmark files). Run folders:
``<results>/<run>_joint/<variant>_it<iterations>/`` (``variant_name``); the table goes to ``joint_<run>.csv``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pandas as pd
import torch

from weakseg import store

JOINT_COLUMNS = [
    "method",
    "iterations",
    "train_s",
    "predict_ms_per_image",
    "energy_ms_per_iteration",
    "train_miou",
    "train_mean_class_acc",
    "train_labelled",
    "val_miou",
    "val_mean_class_acc",
]
# Jobs of a two-step run up to round 1's val prediction (its time budget for the comparison).
TWO_STEP_JOBS = ("train_cam", "infer_cam", "crf", "reliable", "reliability", "train_seg_round1")


def overall(tidy: pd.DataFrame, stage: str) -> dict:
    rows = tidy[(tidy["stage"] == stage) & (tidy["class"] == "")].set_index("metric")["value"].astype(float)
    return {
        "miou": rows["miou"],
        "mean_class_acc": rows["mean_class_acc"],
        "labelled": rows["labelled_fraction"],
    }


def energy_cost_ms(config: dict, n_classes: int, repeats: int = 5) -> float:
    """Milliseconds of one forward + backward of the dense energy loss on a batch of ``cam.batch_size``
    at the mean training size, at the mining resolution (what rrm adds to an iteration)."""
    from weakseg.joint.losses import dense_energy_loss

    cam, energy = config["cam"], config["joint"]["rrm"]["energy"]
    size = max(8, round(sum(cam["train_sizes"]) / len(cam["train_sizes"])) // config["joint"]["label_stride"])
    logits = torch.randn(cam["batch_size"], n_classes, size, size, requires_grad=True)
    image = torch.rand(cam["batch_size"], 3, size, size) * 255
    weight = torch.ones(cam["batch_size"], size, size)
    started = time.perf_counter()
    for _ in range(repeats):
        loss = dense_energy_loss(
            logits.softmax(1), image, weight, energy["sigma_xy"], energy["sigma_rgb"], energy["radius"]
        )
        loss.backward()
    return 1000 * (time.perf_counter() - started) / repeats


def variant_name(joint: dict) -> str:
    """The method and what the config adds to it: ``rrm+rfam`` (joint.head rrm), ``+bcd`` (its loss on)."""
    name = joint["method"]
    if joint["head"] == "rrm":
        name += "+rfam"
    if joint["method"] == "rrm" and joint["rrm"]["bcd"]["weight"] > 0:
        name += "+bcd"
    return name


def bench_joint_method(cfg: dict, shared: store.RunLayout, method: str, threads: int) -> dict:
    from weakseg.benchmark import _link_inputs
    from weakseg.datasets import open_data
    from weakseg.evaluate import run_evaluate
    from weakseg.joint.train import run_train_joint
    from weakseg.segment.predict import run_predict_store

    cfg = {**cfg, "joint": {**cfg["joint"], "enabled": True, "method": method}}
    variant = variant_name(cfg["joint"])
    layout = store.RunLayout(shared.root / f"{variant}_it{cfg['joint']['iterations']}")
    _link_inputs(shared, layout)
    shutil.rmtree(layout.round_dir(0), ignore_errors=True)  # a resumed checkpoint would shorten the timing
    started = time.perf_counter()
    model = run_train_joint(cfg, layout.data, layout.superpixels, layout.round_dir(0), threads=threads)
    train_s = time.perf_counter() - started
    info, _ = open_data(layout.data)
    train, val = cfg["dataset"]["train_split"], cfg["dataset"]["val_split"]
    rows, images, predict_s = {}, 0, 0.0
    for split, stage in ((train, "round0_cleaned"), (val, "round0")):
        started = time.perf_counter()
        scores = run_predict_store(
            cfg, layout.data, model, split, layout.round_scores(0, split), threads=threads
        )
        predict_s += time.perf_counter() - started
        images += len(info.split(split))
        tidy = run_evaluate(
            cfg,
            layout.data,
            layout.gt,
            scores,
            stage,
            split,
            layout.metrics_dir / f"{stage}_{split}.csv",
            key=store.SEG,
        )
        rows[split] = overall(tidy, stage)
    return {
        "method": variant,
        "iterations": cfg["joint"]["iterations"],
        "train_s": train_s,
        "predict_ms_per_image": 1000 * predict_s / images,
        "energy_ms_per_iteration": energy_cost_ms(cfg, info.n_classes) if method == "rrm" else float("nan"),
        "train_miou": rows[train]["miou"],
        "train_mean_class_acc": rows[train]["mean_class_acc"],
        "train_labelled": rows[train]["labelled"],
        "val_miou": rows[val]["miou"],
        "val_mean_class_acc": rows[val]["mean_class_acc"],
    }


def two_step_row(run: Path, train: str, val: str) -> dict | None:
    """The two-step pipeline's row from a finished workflow run, or None when it has not run."""
    from weakseg.benchmark import stage_times
    from weakseg.evaluate import read_tidy

    if not (run / "metrics.csv").is_file():
        return None
    tidy = read_tidy(run / "metrics.csv")
    times = stage_times(run).set_index("job")["seconds"]
    jobs = [j for j in times.index if j in TWO_STEP_JOBS or j == f"predict_seg_round1_{val}"]
    reliable, round1 = (
        overall(tidy[tidy["split"] == train], "reliable"),
        overall(tidy[tidy["split"] == val], "round1"),
    )
    return {
        "method": "two-step (round 1)",
        "iterations": float("nan"),
        "train_s": float(times[jobs].sum()),
        "predict_ms_per_image": float("nan"),
        "energy_ms_per_iteration": float("nan"),
        "train_miou": reliable["miou"],
        "train_mean_class_acc": reliable["mean_class_acc"],
        "train_labelled": reliable["labelled"],
        "val_miou": round1["miou"],
        "val_mean_class_acc": round1["mean_class_acc"],
    }


def bench_joint(
    config_path: str, out_dir: Path, threads: int, methods, iterations: int | None = None
) -> pd.DataFrame:
    from weakseg.benchmark import _prepare_inputs, _print_table, with_earlier_rows
    from weakseg.config import load, run_dir

    cfg = load(config_path)
    if iterations is not None:
        cfg["joint"]["iterations"] = iterations
    shared = store.RunLayout(run_dir(cfg).with_name(f"{cfg['run']}_joint"))
    _prepare_inputs(cfg, shared, threads)
    rows = []
    for method in methods:
        print(f"== joint {method}: {cfg['joint']['iterations']} iterations", flush=True)
        rows.append(bench_joint_method(cfg, shared, method, threads))
    two_step = two_step_row(run_dir(cfg), cfg["dataset"]["train_split"], cfg["dataset"]["val_split"])
    if two_step is None:
        print(f"(no finished two-step run at {run_dir(cfg)}: run the workflow of {config_path} for that row)")
    table = pd.DataFrame(rows + ([two_step] if two_step else []), columns=JOINT_COLUMNS)
    csv_path = Path(out_dir) / f"joint_{cfg['run']}.csv"
    table = with_earlier_rows(table, csv_path, ["method", "iterations"])
    _print_table(
        f"{cfg['run']}: one-stage training (train: prediction over the image labels; val: the network alone)",
        table,
        csv_path,
    )
    return table
