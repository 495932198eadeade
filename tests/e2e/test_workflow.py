"""The Snakemake workflow end to end on tests/configs/tiny.yaml: every stage runs, every rule logs,
a rerun has nothing to do; sharded runs equal one-shard runs; a killed CAM training job resumes."""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "configs" / "tiny.yaml"
VENV_BIN = Path(sys.executable).parent
SNAKEMAKE = VENV_BIN / "snakemake"
TIMEOUT_S = 600

pytestmark = pytest.mark.skipif(
    not SNAKEMAKE.exists(), reason=f"snakemake not installed next to {sys.executable}"
)


# Snakemake's marker inside directory outputs, which zarr warns about when it opens such a store.
IGNORE_TIMESTAMP_WARNING = pytest.mark.filterwarnings("ignore:Object at .snakemake_timestamp")


def snakemake_command(workdir: Path, *args: str, configfile: Path = TINY) -> list[str]:
    """Run the repository's Snakefile with ``workdir`` as working directory (results/ goes there)."""
    return [
        str(SNAKEMAKE),
        "-s",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(configfile),
        "--cores",
        "2",
        *args,
    ]


def snakemake_env() -> dict:
    """Rules call the ``weakseg`` command: it must be the one of this virtual environment."""
    return {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def snakemake(workdir: Path, *args: str, configfile: Path = TINY) -> subprocess.CompletedProcess:
    return subprocess.run(
        snakemake_command(workdir, *args, configfile=configfile),
        env=snakemake_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


def check_ok(result: subprocess.CompletedProcess) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"snakemake failed ({result.returncode}):\n{output[-6000:]}"
    return output


def metric_stages(metrics_csv: Path) -> set[tuple[str, str]]:
    with metrics_csv.open() as fh:
        return {(row["stage"], row["split"]) for row in csv.DictReader(fh)}


def job_blocks(output: str) -> dict[str, list[str]]:
    """Rule name -> the ``log:`` entries of each of its jobs, from Snakemake's job announcements."""
    jobs: dict[str, list[str]] = {}
    for rule, body in re.findall(r"^(?:local)?rule (\w+):\n((?:    .*\n?)*)", output, flags=re.M):
        found = re.search(r"^    log: (.+)$", body, flags=re.M)
        jobs.setdefault(rule, []).append(found.group(1).strip() if found else "")
    return jobs


def store_arrays(path: Path) -> dict[str, tuple[np.ndarray, dict]]:
    """Every array of a Zarr store (recursively) with its attributes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Snakemake's .snakemake_timestamp inside directory outputs
        group = zarr.open_group(str(path), mode="r")
        return {
            name: (node[...], dict(node.attrs))
            for name, node in group.members(max_depth=None)
            if isinstance(node, zarr.Array)
        }


def model_weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"{what}: {len(differing)} tensors differ, e.g. {differing[:3]}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("workflow")


@pytest.fixture(scope="module")
def tiny_run(workdir):
    """The one-shard tiny run (results/tiny), shared by the tests of this module."""
    started = time.perf_counter()
    result = snakemake(workdir)
    print(f"tiny run: {time.perf_counter() - started:.0f} s")
    return workdir / "results" / "tiny", result


def test_tiny_workflow_runs_every_stage(tiny_run, workdir):
    run, result = tiny_run
    output = check_ok(result)

    stages = metric_stages(run / "metrics.csv")
    expected = {
        ("superpixel_oracle", "train"),
        ("cam", "train"),
        ("spcam", "train"),
        ("cleaned", "train"),
        ("crf", "train"),
        ("reliable", "train"),
        ("round1", "train"),
        ("round1", "val"),
        ("round1_crf", "val"),
        ("cam_gated", "val"),
        ("spcam_gated", "val"),
    }
    assert expected <= stages, f"missing metrics rows: {sorted(expected - stages)}"
    report = run / "report" / "index.html"
    assert report.is_file() and report.stat().st_size > 0

    jobs = job_blocks(output)
    total = int(re.search(r"^total\s+(\d+)$", output, flags=re.M).group(1))
    assert sum(len(v) for v in jobs.values()) == total  # every job announcement was parsed
    assert {"train_cam", "infer_cam", "crf", "reliable", "train_seg", "report"} <= set(jobs)
    logs_dir = run / "logs"
    for rule, logs in jobs.items():
        if rule == "all":
            continue
        for log in logs:
            assert log, f"a {rule} job declares no log file"
            assert (workdir / log).is_file(), f"{rule}: log {log} not written"
            assert (workdir / log).parent == logs_dir
    assert "train-cam" in (logs_dir / "train_cam.log").read_text()

    dry = check_ok(snakemake(workdir, "-n"))
    assert "Nothing to be done" in dry, dry[-3000:]

    # A stage store deleted (as a killed --forcerun leaves it) is made again by a plain run.
    moved = run / "pseudo" / "crf.zarr.moved-by-test"
    (run / "pseudo" / "crf.zarr").rename(moved)
    try:
        dry = check_ok(snakemake(workdir, "-n"))
        assert "Nothing to be done" not in dry and re.search(r"^(?:local)?rule crf:", dry, flags=re.M), dry[
            -3000:
        ]
    finally:
        moved.rename(run / "pseudo" / "crf.zarr")


@pytest.mark.slow
def test_two_shards_give_the_same_stores(tiny_run, workdir):
    run, result = tiny_run
    check_ok(result)
    started = time.perf_counter()
    check_ok(snakemake(workdir, "--config", "shards=2", "run=tiny2"))
    print(f"2-shard run: {time.perf_counter() - started:.0f} s")
    sharded = workdir / "results" / "tiny2"
    # the per-image stages really ran as shards
    for shard_store in ("shards/superpixels-1.zarr", "cam/shards/scores-1.zarr", "pseudo/shards/crf-1.zarr"):
        assert (sharded / shard_store).is_dir(), shard_store

    # Training is seeded and single-threaded on CPU: both runs train the same networks.
    assert_same_weights(
        model_weights(run / "cam" / "model.pt"), model_weights(sharded / "cam" / "model.pt"), "CAM"
    )
    assert_same_weights(
        model_weights(run / "round1" / "model.pt"), model_weights(sharded / "round1" / "model.pt"), "round 1"
    )

    stores = sorted(
        p.relative_to(run) for p in run.rglob("*.zarr") if "shards" not in p.parts and ".tmp-" not in p.name
    )
    for must in (
        "superpixels.zarr",
        "cam/scores.zarr",
        "pseudo/cleaned.zarr",
        "pseudo/crf.zarr",
        "pseudo/reliable.zarr",
        "round1/scores_val.zarr",
        "round1/crf_val.zarr",
    ):
        assert Path(must) in stores, must
    for rel in stores:
        one, two = store_arrays(run / rel), store_arrays(sharded / rel)
        assert one.keys() == two.keys(), f"{rel}: different arrays"
        for name, (array, attrs) in one.items():
            assert np.array_equal(array, two[name][0]) and attrs == two[name][1], f"{rel}/{name} differs"
    assert (run / "metrics.csv").read_text() == (sharded / "metrics.csv").read_text()


def kill_config(workdir: Path) -> Path:
    """tiny.yaml with a CAM training long enough to be killed after its first checkpoint."""
    config = yaml.safe_load(TINY.read_text())
    config["cam"].update(iterations=40, checkpoint_every=5)
    path = workdir / "kill.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def kill_training_after_first_checkpoint(
    workdir: Path, configfile: Path, run: str, model: str = "cam/model.pt", command: str = "train-cam"
) -> int:
    """Start snakemake for the CAM model (or another ``model`` of the run, trained by ``weakseg
    <command>``), SIGKILL the training command once a checkpoint exists.

    Returns the checkpoint's iteration at the time of the kill."""
    import psutil

    target = f"results/{run}/{model}"
    checkpoint = workdir / target.rsplit("/", 1)[0] / "checkpoints" / "last.pt"
    with (workdir / f"{run}-killed.out").open("w") as out:
        proc = subprocess.Popen(
            snakemake_command(workdir, target, "--config", f"run={run}", configfile=configfile),
            env=snakemake_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + TIMEOUT_S
            while not checkpoint.exists():
                assert proc.poll() is None, (
                    f"snakemake ended before a checkpoint: {(workdir / f'{run}-killed.out').read_text()[-3000:]}"
                )
                assert time.monotonic() < deadline, "no checkpoint within the time limit"
                time.sleep(0.05)
            trainers = [
                p
                for p in psutil.Process(proc.pid).children(recursive=True)
                if command in " ".join(p.cmdline())
            ]
            assert trainers, f"no weakseg {command} process found"
            for p in trainers:
                os.kill(p.pid, signal.SIGKILL)
            assert not (workdir / target).exists(), "training finished before it could be killed"
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode != 0, "snakemake did not notice the killed job"
    return int(torch.load(checkpoint, map_location="cpu", weights_only=True)["iteration"])


@pytest.mark.slow
def test_killed_cam_training_resumes_to_the_uninterrupted_model(workdir):
    configfile = kill_config(workdir)
    killed_at = kill_training_after_first_checkpoint(workdir, configfile, "tiny3")
    assert 5 <= killed_at < 40

    check_ok(
        snakemake(
            workdir,
            "results/tiny3/cam/model.pt",
            "--rerun-incomplete",
            "--config",
            "run=tiny3",
            configfile=configfile,
        )
    )
    log = (workdir / "results" / "tiny3" / "logs" / "train_cam.log").read_text()
    assert "resumed from checkpoint" in log and f"at iteration {killed_at} of 40" in log, log[-2000:]

    check_ok(snakemake(workdir, "results/tiny4/cam/model.pt", "--config", "run=tiny4", configfile=configfile))
    assert "resumed" not in (workdir / "results" / "tiny4" / "logs" / "train_cam.log").read_text()
    assert_same_weights(
        model_weights(workdir / "results" / "tiny3" / "cam" / "model.pt"),
        model_weights(workdir / "results" / "tiny4" / "cam" / "model.pt"),
        "resumed vs uninterrupted",
    )


# ------------------------------------------------------------------------------------- the user's path
def labels_only_folder(root: Path) -> Path:
    """A VOC-style folder with images, split lists, classes.txt and labels.csv, and no masks."""
    import shutil

    from PIL import Image

    from weakseg.datasets.synthetic import write_folder

    tiny = yaml.safe_load(TINY.read_text())["dataset"]
    folder = write_folder(tiny["synthetic"], True, root)
    names = (folder / "classes.txt").read_text().split()
    rows = ["id,labels"]
    for mask in sorted((folder / "SegmentationClass").glob("*.png")):
        present = np.unique(np.asarray(Image.open(mask)))
        rows.append(mask.stem + "," + ";".join(names[c] for c in present if 0 < c < len(names)))
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    shutil.rmtree(folder / "SegmentationClass")
    return folder


@pytest.fixture(scope="module")
def labels_only_run(workdir):
    """tiny.yaml's sizes on a labels-only folder, as a user's `field.yaml` (no run:, no results:)."""
    folder = labels_only_folder(workdir / "photos")
    user = {
        k: v for k, v in yaml.safe_load(TINY.read_text()).items() if k not in ("run", "results", "dataset")
    }
    user["dataset"] = {
        "kind": "folder",
        "root": "photos",
        "labels_file": "photos/labels.csv",
        "has_background": True,
    }
    configfile = workdir / "field.yaml"
    configfile.write_text(yaml.safe_dump(user))
    assert not (folder / "SegmentationClass").exists()
    return workdir / "results" / "field", snakemake(workdir, configfile=configfile), user


def test_labels_only_dataset_runs_to_the_end_without_evaluation(labels_only_run, workdir):
    run, result, user = labels_only_run
    output = check_ok(result)
    jobs = job_blocks(output)
    evaluation = {
        r
        for r in jobs
        if r.startswith("evaluate") or r in ("superpixel_oracle", "reliability_curve", "metrics")
    }
    assert not evaluation, f"evaluation jobs without masks: {sorted(evaluation)}"
    assert {"train_cam", "crf", "reliable", "train_seg", "predict_seg", "reliable_round", "report"} <= set(
        jobs
    )
    assert not (run / "metrics.csv").exists() and not (run / "gt.zarr" / "masks").exists()
    for store_path in ("pseudo/reliable.zarr", "round1/reliable_train.zarr", "round1/crf_val.zarr"):
        assert (run / store_path).is_dir(), store_path
    # the run is named after the config file; config.yaml (the demo) was not merged under it
    resolved = yaml.safe_load((run / "config.resolved.yaml").read_text())
    assert resolved["run"] == "field" and resolved["dataset"]["root"] == "photos"
    assert resolved["cam"]["iterations"] == user["cam"]["iterations"]
    assert resolved["segment"]["rounds"] == user["segment"]["rounds"]
    assert not (workdir / "results" / "demo").exists()
    report = (run / "report" / "index.html").read_text()
    assert (
        "No ground-truth masks" in report and 'id="metrics"' not in report and 'id="plot-training"' in report
    )
    assert 'class="item"' in report
    assert f"weakseg: the report of run 'field' is {Path('results/field/report/index.html')}" in output
    # training logged loss and learning rate; the log file has plain lines, no carriage-return redraws
    with (run / "cam" / "train_log.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert rows and {"iteration", "loss", "lr"} <= set(rows[0])
    log = (run / "logs" / "train_cam.log").read_text()
    assert "\r" not in log and "device: auto -> cpu" in log and "loss=" in log


def test_warm_start_and_consensus_annotation_wire_the_rounds(tiny_run, workdir, tmp_path):
    check_ok(tiny_run[1])
    config = yaml.safe_load(TINY.read_text())
    config["segment"].update(rounds=2, warm_start=True, annotation="consensus")
    configfile = tmp_path / "tiny_warm.yaml"
    configfile.write_text(yaml.safe_dump(config))
    dry = check_ok(snakemake(workdir, "-n", "-p", configfile=configfile))
    commands = [line for line in dry.splitlines() if "weakseg train-seg" in line]
    assert len(commands) == 1, dry[-3000:]  # round 1 is done and unchanged; round 2 is new
    assert (
        "--init results/tiny/round1/model.pt" in commands[0]
        and "--out-dir results/tiny/round2" in commands[0]
        and "--init-encoder" not in commands[0]
    )
    # Round 2 trains on round 1's reliable regions where the first pseudo-labels agree.
    assert "--labels results/tiny/round1/consensus_train.zarr" in commands[0]
    # segment.init: cam retrains round 1 from the CAM network's encoder; round 2 still warm-starts.
    config["segment"]["init"] = "cam"
    configfile.write_text(yaml.safe_dump(config))
    dry_cam = check_ok(snakemake(workdir, "-n", "-p", configfile=configfile))
    train = sorted(line for line in dry_cam.splitlines() if "weakseg train-seg" in line)
    assert len(train) == 2, dry_cam[-3000:]
    round1 = next(c for c in train if "--out-dir results/tiny/round1" in c)
    round2 = next(c for c in train if "--out-dir results/tiny/round2" in c)
    assert "--init-encoder results/tiny/cam/model.pt" in round1 and "--init " not in round1
    assert "--init results/tiny/round1/model.pt" in round2 and "--init-encoder" not in round2
    # segment.annotation: pruned -> round 2 trains on the first labels that round 1 does not contradict.
    config["segment"]["annotation"] = "pruned"
    configfile.write_text(yaml.safe_dump(config))
    dry_pruned = check_ok(snakemake(workdir, "-n", "-p", configfile=configfile))
    checking = [line for line in dry_pruned.splitlines() if "weakseg consensus" in line]
    assert checking and all("--rule pruned" in c and "pruned_train.zarr" in c for c in checking)
    assert "--labels results/tiny/round1/pruned_train.zarr" in dry_pruned
    consensus = [line for line in dry.splitlines() if "weakseg consensus" in line]
    assert len(consensus) == 2 and all(
        "--reference results/tiny/pseudo/reliable.zarr" in c for c in consensus
    )
    assert any("--labels results/tiny/round1/reliable_train.zarr" in c for c in consensus)


def test_snakemake_report_carries_every_image(tiny_run, workdir, tmp_path):
    import base64
    import html

    import browser

    run, result = tiny_run
    check_ok(result)
    report = workdir / "r.html"
    check_ok(snakemake(workdir, "--report", str(report)))
    text = report.read_text()
    # Snakemake embeds each result as a data URI: our report page must be one, with its images inside it.
    pages = [
        base64.b64decode(m.group(1)).decode()
        for m in re.finditer(r"data:text/html;(?:[a-z]+=[^;,]*;)*base64,([A-Za-z0-9+/=]+)", text)
    ]
    ours = [p for p in pages if 'name="generator" content="weakseg report"' in p]
    assert ours, "the weakseg report page is not in the Snakemake report"
    page = ours[0]
    sources = re.findall(r'<img src="([^"]*)"', page)
    assert sources and all(html.unescape(s).startswith("data:image/") for s in sources)
    assert 'id="metrics"' in page
    if browser.CHROMIUM is None:
        pytest.skip("headless Chromium not installed (Debian package 'chromium')")
    extracted = tmp_path / "embedded.html"
    extracted.write_text(page)
    dom = browser.dump_dom(extracted.as_uri(), tmp_path / "profile")
    assert 'data-loaded="1"' in dom and 'data-broken="0"' in dom and 'id="metrics"' in dom
    dom = browser.dump_dom(report.as_uri(), tmp_path / "profile")
    assert "metrics.csv" in dom or "index.html" in dom, dom[
        -2000:
    ]  # Snakemake's own page rendered its results
    own = browser.dump_dom((run / "report" / "index.html").as_uri(), tmp_path / "profile")
    assert 'data-loaded="1"' in own and 'data-broken="0"' in own and 'id="metrics"' in own


def readme_commands() -> list[str]:
    """Every `weakseg ...` line of the README's bash blocks, comments stripped."""
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    return [
        line.split("  #")[0].strip()
        for block in blocks
        for line in block.splitlines()
        if line.startswith("weakseg ")
    ]


def test_readme_examples_run_on_a_run(tiny_run, workdir):
    """Each README example, on the tiny run (results/demo -> results/tiny; it has one round)."""
    run, result = tiny_run
    check_ok(result)
    readme = (REPO / "README.md").read_text()
    my_yaml = re.search(r"a minimal `my.yaml` is\n\n```yaml\n(.*?)```", readme, flags=re.S).group(1)
    (workdir / "my.yaml").write_text(my_yaml)
    commands = readme_commands()
    assert any(c.startswith("weakseg inspect") for c in commands) and any("predict" in c for c in commands)
    for command in commands:
        if command.startswith("weakseg benchmark"):
            continue  # needs the real MSRC-21 photos (docs/results.md); benchmark tests cover it
        line = command.replace("results/demo", "results/tiny").replace("round2", "round1")
        done = subprocess.run(
            line,
            shell=True,
            cwd=workdir,
            env=snakemake_env(),
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
        assert done.returncode == 0, f"README example failed: {command}\n{done.stderr[-3000:]}"
    assert len(list((workdir / "predictions").glob("*.png"))) == len(
        list((run / "synthetic" / "JPEGImages").iterdir())
    )
