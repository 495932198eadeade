"""The project's Snakemake profiles, and real runs through a single-node Slurm cluster.

The profile tests run everywhere (dry runs). The ``slurm`` tests start munged/slurmctld/slurmd as root
(tests/slurm_cluster.py) and are skipped where that is impossible. The test profile is the project's
``slurm/config.yaml`` with only what a cluster without an accounting database needs changed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
import zarr
from slurm_cluster import SlurmCluster, slurm_cluster  # noqa: F401  (slurm_cluster is a fixture)

from weakseg.store import LABELS, get, ids_in, open_store

REPO = Path(__file__).resolve().parents[1]
SLURM_PROFILE = REPO / "slurm" / "config.yaml"
LOCAL_PROFILE = REPO / "profiles" / "local" / "config.yaml"
TINY_CONFIG = REPO / "tests" / "configs" / "tiny.yaml"
SNAKEMAKE = [sys.executable, "-m", "snakemake"]

# What the test profile changes, and why: no accounting database, so job states come from squeue
# (the test cluster's MinJobAge keeps finished jobs listed); quick first status check; keep the
# per-job logs to check them.
TEST_PROFILE_OVERRIDES = {
    "slurm-status-command": "squeue",
    "slurm-init-seconds-before-status-checks": 2,
    "slurm-keep-successful-logs": True,
}
# Hard limits so a hung status loop fails the test instead of blocking CI (snakemake ignores SIGTERM
# while waiting on a status command, hence the -k SIGKILL).
SELF_TEST_TIMEOUT_S = 240
FULL_RUN_TIMEOUT_S = 1800


def read_profile(path: Path) -> dict:
    profile = yaml.safe_load(path.read_text())
    assert isinstance(profile, dict), f"{path}: expected a YAML mapping of snakemake options"
    return profile


def resource_settings(profile: dict) -> dict[str, str]:
    """default-resources as {name: raw value}; accepts the list form (name=value) and the mapping form."""
    entries = profile.get("default-resources") or []
    if isinstance(entries, dict):
        return {str(k): str(v) for k, v in entries.items()}
    return dict(str(entry).split("=", 1) for entry in entries)


def write_test_profile(cluster: SlurmCluster, directory: Path) -> Path:
    """The project's Slurm profile pointed at the test cluster: its partition, no account, squeue status."""
    profile = read_profile(SLURM_PROFILE)
    resources = resource_settings(profile)
    resources["slurm_partition"] = cluster.partition
    # No accounting database, so no accounts; the plugin submits without -A.
    resources.pop("slurm_account", None)
    profile["default-resources"] = [f"{name}={value}" for name, value in resources.items()]
    profile.update(TEST_PROFILE_OVERRIDES)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return directory


def run_snakemake(args: list[str], cwd: Path, env: dict | None, timeout_s: int) -> str:
    """Run snakemake under `timeout -k`, return its combined output; fail with the output's tail."""
    cmd = ["timeout", "-k", "10", str(timeout_s), *SNAKEMAKE, *args]
    env = dict(os.environ if env is None else env)
    # Rules call the `weakseg` command: find it next to this interpreter even without an activated venv.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    result = subprocess.run(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output = result.stdout
    if result.returncode != 0:
        what = "timed out" if result.returncode in (124, 137) else f"exited with {result.returncode}"
        pytest.fail(f"snakemake {' '.join(args)} {what} in {cwd}:\n{output[-6000:]}")
    return output


def slurm_run_id(output: str) -> str:
    match = re.search(r"SLURM run ID: (\S+)", output)
    assert match, f"no 'SLURM run ID' in the snakemake output; was the slurm executor used?\n{output[-3000:]}"
    return match.group(1)


def submitted_slurm_jobs(output: str) -> dict[str, str]:
    """snakemake job id -> Slurm job id, from the plugin's submission messages."""
    return dict(re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", output))


def executed_rules(output: str) -> tuple[Counter, Counter]:
    """(jobs per rule sent to the executor, jobs per rule snakemake ran itself), from the job headers."""
    remote, local = Counter(), Counter()
    for is_local, rule in re.findall(r"^(local)?rule (\w+):$", output, flags=re.MULTILINE):
        (local if is_local else remote)[rule] += 1
    return remote, local


def assert_all_jobs_ran_in_slurm(cluster: SlurmCluster, output: str, workdir: Path) -> dict[str, str]:
    """Every job snakemake sent out was a Slurm job of this run that COMPLETED; returns snakemake->Slurm ids."""
    run_id = slurm_run_id(output)
    submitted = submitted_slurm_jobs(output)
    remote, _ = executed_rules(output)
    assert submitted, "no job was submitted to Slurm"
    assert len(submitted) == sum(remote.values()), (remote, submitted)
    jobs = {job.job_id: job for job in cluster.jobs() if job.name == run_id}
    assert set(jobs) == set(submitted.values()), (
        f"Slurm knows {sorted(jobs)}, snakemake submitted {submitted}"
    )
    assert {job.state for job in jobs.values()} == {"COMPLETED"}, jobs
    # The plugin tags each job with its rule: the per-rule counts must match snakemake's.
    per_rule = Counter(
        re.match(r"rule_(.+?)(?:_wildcards_.*)?$", job.comment).group(1) for job in jobs.values()
    )
    assert per_rule == remote, (per_rule, remote)
    # slurmd wrote each job's output to the plugin's log file named by the Slurm job id (kept by the
    # test profile).
    logs = {path.stem for path in (workdir / ".snakemake" / "slurm_logs").rglob("*.log")}
    assert set(submitted.values()) <= logs, sorted(set(submitted.values()) - logs)
    return submitted


# ---------------------------------------------------------------- profiles (no cluster needed)


def test_slurm_profile_has_the_required_settings():
    profile = read_profile(SLURM_PROFILE)
    assert profile["executor"] == "slurm"
    assert profile["rerun-incomplete"] is True
    assert isinstance(profile["latency-wait"], int) and profile["latency-wait"] >= 10
    assert isinstance(profile["jobs"], int) and profile["jobs"] >= 1
    resources = resource_settings(profile)
    assert {"slurm_partition", "slurm_account", "mem_mb", "runtime"} <= set(resources)
    assert int(resources["mem_mb"]) > 0 and int(resources["runtime"]) > 0
    # A real cluster keeps the plugin's status command (sacct); only the test profile uses squeue.
    assert not any(key.startswith("slurm-status") for key in profile)


def _copy_workflow_for_dry_run(tmp_path: Path) -> None:
    (tmp_path / "Snakefile").write_text(
        'rule all:\n    input: "out.txt"\n\n'
        'rule make:\n    output: "out.txt"\n    threads: 2\n'
        '    resources: mem_mb=100, runtime=5, cpus_per_task=2\n    shell: "touch {output}"\n'
    )


def test_bare_profile_name_resolves_to_the_repository_profile(tmp_path):
    """`snakemake --cores 8 --profile slurm` in the repository root picks up ./slurm/config.yaml."""
    _copy_workflow_for_dry_run(tmp_path)
    shutil.copytree(REPO / "slurm", tmp_path / "slurm")
    output = run_snakemake(["--cores", "8", "--profile", "slurm", "--dry-run"], tmp_path, None, 120)
    assert "Using profile slurm" in output
    # The placeholders from default-resources reach the job, so the profile was really applied.
    assert "slurm_partition=EDIT_ME_PARTITION" in output
    assert "runtime=5" in output  # a rule's own resources override the profile's defaults


def test_local_profile_dry_run(tmp_path):
    _copy_workflow_for_dry_run(tmp_path)
    output = run_snakemake(["--profile", str(LOCAL_PROFILE.parent), "--dry-run"], tmp_path, None, 120)
    assert "Using profile" in output and "make" in output
    assert read_profile(LOCAL_PROFILE)["rerun-incomplete"] is True


# ---------------------------------------------------------------- single-node Slurm cluster

SELF_TEST_SNAKEFILE = """
SAMPLES = ["a", "b"]

# One CPU each, so both fit the 2-CPU test node at once.
rule make:
    output: "made/{sample}.txt"
    threads: 1
    resources: mem_mb=200, runtime=5
    shell: "echo {wildcards.sample} $SLURM_JOB_ID $SLURM_CPUS_PER_TASK > {output}"

rule combine:
    input: expand("made/{sample}.txt", sample=SAMPLES)
    output: "combined.txt"
    threads: 2
    resources: mem_mb=100, runtime=3, cpus_per_task=2
    shell: "cat {input} > {output} && echo combine $SLURM_JOB_ID $SLURM_CPUS_PER_TASK >> {output}"

"""


@pytest.mark.slurm
def test_two_rule_workflow_runs_every_job_through_slurm(slurm_cluster, tmp_path):
    cluster = slurm_cluster
    work = tmp_path / "work"
    work.mkdir()
    (work / "Snakefile").write_text(SELF_TEST_SNAKEFILE)
    profile = write_test_profile(cluster, tmp_path / "profile")
    assert set(read_profile(profile / "config.yaml")) == set(read_profile(SLURM_PROFILE)) | set(
        TEST_PROFILE_OVERRIDES
    )

    output = run_snakemake(
        ["--cores", "2", "--profile", str(profile), "combined.txt"], work, cluster.env, SELF_TEST_TIMEOUT_S
    )

    submitted = assert_all_jobs_ran_in_slurm(cluster, output, work)
    assert len(submitted) == 3
    # Each job wrote the Slurm job id and CPU count it ran with: the ids are exactly the submitted
    # ones, and threads / cpus_per_task reached sbatch.
    lines = [line.split() for line in (work / "combined.txt").read_text().splitlines()]
    written = {fields[0]: (fields[1], fields[2]) for fields in lines}
    assert set(written) == {"a", "b", "combine"}
    assert {job_id for job_id, _ in written.values()} == set(submitted.values())
    assert written["a"][1] == written["b"][1] == "1" and written["combine"][1] == "2"
    # runtime and mem_mb from the rule became the job's time limit and memory request.
    details = cluster.run("scontrol", "show", "job", written["a"][0]).stdout
    assert "TimeLimit=00:05:00" in details and re.search(r"MinMemoryNode=200M\b", details), details
    assert f"Partition={cluster.partition}" in details


# ---------------------------------------------------------------- the real workflow


def _copy_project_workflow(destination: Path) -> None:
    """The workflow files a run reads (Snakefile, rules, default config) plus the tiny config."""
    destination.mkdir(parents=True)
    for name in ("Snakefile", "config.yaml"):
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, destination / name)
    for folder in ("workflow", "config"):
        if (REPO / folder).is_dir():
            shutil.copytree(REPO / folder, destination / folder)
    shutil.copy2(TINY_CONFIG, destination / "tiny.yaml")


def _label_stores(root: Path) -> dict[str, zarr.Group]:
    """Every finished labels store under ``root``, by path relative to it."""
    stores = {}
    for path in sorted(root.rglob("*.zarr")):
        if ".tmp-" in path.name:
            continue
        group = open_store(path)
        if group.attrs.get("kind") == "labels":
            stores[str(path.relative_to(root))] = group
    return stores


def assert_same_metrics(local_csv: Path, slurm_csv: Path) -> None:
    local, slurm = pd.read_csv(local_csv), pd.read_csv(slurm_csv)
    assert list(local.columns) == list(slurm.columns) and local.shape == slurm.shape
    numeric = local.select_dtypes("number").columns
    text = [c for c in local.columns if c not in numeric]
    pd.testing.assert_frame_equal(local[text], slurm[text])
    # Same code and seeds; only float summation order may differ between processes.
    np.testing.assert_allclose(
        local[numeric].to_numpy(float), slurm[numeric].to_numpy(float), rtol=1e-4, atol=1e-4
    )


@pytest.mark.slurm
@pytest.mark.slow
def test_tiny_workflow_on_slurm_matches_a_local_run(slurm_cluster, tmp_path):
    if not (REPO / "Snakefile").exists() or not TINY_CONFIG.exists():
        pytest.skip("needs the project's Snakefile and tests/configs/tiny.yaml")
    cluster = slurm_cluster
    local_dir, slurm_dir = tmp_path / "local", tmp_path / "slurm"
    _copy_project_workflow(local_dir)
    _copy_project_workflow(slurm_dir)
    profile = write_test_profile(cluster, tmp_path / "profile")

    run_snakemake(["--cores", "2", "--configfile", "tiny.yaml"], local_dir, None, FULL_RUN_TIMEOUT_S)
    output = run_snakemake(
        ["--cores", "2", "--profile", str(profile), "--configfile", "tiny.yaml"],
        slurm_dir,
        cluster.env,
        FULL_RUN_TIMEOUT_S,
    )

    assert_all_jobs_ran_in_slurm(cluster, output, slurm_dir)
    _, local_rules = executed_rules(output)
    # Only target rules without a command may run outside Slurm.
    assert set(local_rules) <= {"all"}, local_rules

    local_metrics = sorted(p.relative_to(local_dir) for p in local_dir.rglob("metrics.csv"))
    assert local_metrics, "the local run wrote no metrics.csv"
    assert sorted(p.relative_to(slurm_dir) for p in slurm_dir.rglob("metrics.csv")) == local_metrics
    for rel in local_metrics:
        assert_same_metrics(local_dir / rel, slurm_dir / rel)

    local_stores, slurm_stores = _label_stores(local_dir), _label_stores(slurm_dir)
    assert local_stores and set(local_stores) == set(slurm_stores)
    for rel, local_group in local_stores.items():
        slurm_group = slurm_stores[rel]
        ids = ids_in(local_group, LABELS)
        assert ids and ids == ids_in(slurm_group, LABELS), rel
        for image_id in ids:
            np.testing.assert_array_equal(
                get(local_group, LABELS, image_id),
                get(slurm_group, LABELS, image_id),
                err_msg=f"{rel}: labels of {image_id} differ between the local and the Slurm run",
            )
