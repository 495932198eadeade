"""Kernel seconds: the clock, its log line, worker processes, the benchmark's per-job table and its
comparison of two runs."""

from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd
import pytest

from weakseg import timing
from weakseg.benchmark import compare_quality, compare_times, stage_of, stage_times
from weakseg.parallel import map_images


@pytest.fixture(autouse=True)
def _fresh_clock():
    timing.reset()
    yield
    timing.reset()


def _sleepy_kernel(seconds: float) -> float:
    with timing.kernel("nap"):
        time.sleep(seconds)
    return seconds * 2


def test_kernel_blocks_accumulate_per_kind_and_exclude_time_outside():
    started = time.perf_counter()
    with timing.kernel("a"):
        time.sleep(0.02)
    outside = time.perf_counter()
    time.sleep(0.05)  # not a kernel
    outside = time.perf_counter() - outside
    with timing.kernel("a"):
        time.sleep(0.02)
    with timing.kernel("b"):
        pass
    total = time.perf_counter() - started
    seconds = timing.snapshot()
    assert set(seconds) == {"a", "b"}
    assert seconds["a"] >= 0.04  # both blocks
    assert seconds["a"] + seconds["b"] <= total - outside  # never the time between them


def test_kernel_time_counts_a_block_that_raises():
    with pytest.raises(RuntimeError), timing.kernel("broken"):
        time.sleep(0.01)
        raise RuntimeError("boom")
    assert timing.snapshot()["broken"] >= 0.01


def test_kernel_time_waits_for_queued_cuda_work(monkeypatch):
    """On CUDA a block returns once its kernels are queued; the clock must wait for them to finish,
    or the benchmark bills the work to whatever synchronises next. Here the queued work runs inside
    synchronize()."""
    import torch

    queued: list[float] = []

    def synchronize():
        while queued:
            time.sleep(queued.pop())

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    with timing.kernel("forward"):
        queued.append(0.05)
    assert timing.snapshot()["forward"] >= 0.05


def test_log_line_round_trips_through_a_log_file(tmp_path, caplog):
    timing.add({"forward": 1.25, "crf": 0.5})
    log_file = tmp_path / "job.log"
    handler = logging.FileHandler(log_file)
    logging.getLogger("weakseg").addHandler(handler)
    try:
        with caplog.at_level(logging.INFO, logger="weakseg"):
            timing.log_kernel_seconds()
    finally:
        logging.getLogger("weakseg").removeHandler(handler)
        handler.close()
    # Progress-bar lines and other log lines around it do not confuse the parser; the last line wins.
    text = "predict: 100%|####| 3/3\n" + log_file.read_text() + "other line\n"
    log_file.write_text(text)
    assert timing.read_kernel_seconds(log_file) == {"crf": 0.5, "forward": 1.25}
    assert timing.read_kernel_seconds(tmp_path / "missing.log") is None


def test_worker_processes_kernel_seconds_count_in_the_parent():
    started = time.perf_counter()
    results = list(map_images(_sleepy_kernel, [0.05, 0.06, 0.07, 0.08], threads=2, desc="test"))
    wall = time.perf_counter() - started
    assert results == [0.1, 0.12, 0.14, 0.16]  # results unchanged, in order
    # every worker's naps, summed over the two workers: at least their length, at most 2 x the wall time
    assert 0.26 <= timing.snapshot()["nap"] <= 2 * wall


def test_stage_times_sets_job_seconds_against_kernel_seconds(tmp_path):
    run = tmp_path / "run"
    (run / "benchmarks").mkdir(parents=True)
    (run / "logs").mkdir()
    for job, seconds in (("infer_cam", 30.0), ("metrics", 4.0)):
        (run / "benchmarks" / f"{job}.tsv").write_text(
            f"s\th:m:s\tmax_rss\tcpu_time\n{seconds}\t0:00:30\t512.0\t{seconds / 2}\n"
        )
    (run / "logs" / "infer_cam.log").write_text(f'12:00:00 INFO {timing.MARKER} {{"forward": 20.0}}\n')
    (run / "logs" / "metrics.log").write_text("12:00:00 INFO wrote metrics.csv\n")
    table = stage_times(run).set_index("job")
    assert table.loc["infer_cam", "kernel_s"] == 20.0
    assert table.loc["infer_cam", "job_per_kernel"] == pytest.approx(1.5)
    assert table.loc["infer_cam", "kernels"] == "forward=20.0"
    assert np.isnan(table.loc["metrics", "kernel_s"]) and np.isnan(table.loc["metrics", "job_per_kernel"])
    assert table.loc["metrics", "seconds"] == 4.0 and table.loc["metrics", "cpu_s"] == 2.0


def test_compare_sums_job_seconds_per_stage_across_rounds():
    old = pd.DataFrame(
        {
            "job": ["train_seg_round1", "train_seg_round2", "evaluate_cam_train", "infer_cam"],
            "seconds": [100.0, 100.0, 2.0, 50.0],
        }
    )
    new = pd.DataFrame(
        {
            "job": ["train_seg_round1", "train_seg_round2", "evaluate_round1_val", "pruned_round1"],
            "seconds": [40.0, 20.0, 1.0, 3.0],
        }
    )
    table = compare_times(old, new).set_index("stage")
    assert table.loc["train_seg", "old_s"] == 200.0 and table.loc["train_seg", "new_s"] == 60.0
    assert table.loc["train_seg", "new_per_old"] == pytest.approx(0.3)
    assert table.loc["evaluate", "new_jobs"] == 1
    assert stage_of("predict_seg_round2_val-3") == "predict_seg_val"  # shards of a round: one stage
    # a stage one side lacks counts as 0 s there; a stage new to the new side has no ratio
    assert table.loc["infer_cam", "new_s"] == 0.0 and np.isnan(table.loc["pruned", "new_per_old"])
    assert table.loc["all jobs", "old_s"] == 252.0 and table.loc["all jobs", "new_s"] == 64.0
    assert table.loc["all jobs", "new_per_old"] == pytest.approx(64 / 252)


def test_compare_flags_rows_that_fell_by_more_than_the_tolerance():
    old = pd.DataFrame(
        {
            "stage": ["cam", "round1", "round2"],
            "split": ["train", "val", "val"],
            "miou": [0.60, 0.60, 0.55],
            "mean_class_acc": [0.80, 0.83, 0.83],
        }
    )
    new = pd.DataFrame(
        {
            "stage": ["cam", "round1", "joint"],
            "split": ["train", "val", "val"],
            "miou": [0.596, 0.70, 0.5],
            "mean_class_acc": [0.81, 0.82, 0.8],
        }
    )
    table = compare_quality(old, new).set_index("stage")
    assert list(table.index) == ["cam", "round1"]  # rows in both only
    assert table.loc["cam", "miou_change"] == pytest.approx(-0.4)
    assert bool(table.loc["cam", "holds"])  # -0.4 points is within 0.5
    assert not bool(table.loc["round1", "holds"])  # mIoU +10 does not excuse mean class accuracy -1
