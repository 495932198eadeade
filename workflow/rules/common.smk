# Shared helpers: the validated config, output paths (from weakseg.store.RunLayout), per-rule
# config JSON, resources and shard paths. No pipeline logic lives here.
import json
from pathlib import Path

from snakemake.exceptions import WorkflowError

from weakseg.config import (
    SEGMENT_PREDICTION,
    ConfigError,
    evaluation_splits,
    model_section,
    resolve,
)
from weakseg.inspect.stages import expected_label_stages
from weakseg.store import RunLayout

_CONFIG_FILES = [str(p) for p in workflow.overwrite_configfiles] or ["config.yaml"]
try:
    # Without a `run` key the run is named after the (last) config file: --configfile my.yaml -> results/my.
    config = resolve(config, workflow.overwrite_configfiles, ", ".join(_CONFIG_FILES))
except ConfigError as exc:
    raise WorkflowError(str(exc))

RUN = RunLayout(Path(config["results"]) / config["run"])
N_SHARDS = config["shards"]
SHARDS = list(range(N_SHARDS))
# With one-stage training (joint.enabled) the joint network is round 0.
JOINT = config["joint"]["enabled"]
ROUNDS = list(range(0 if JOINT else 1, config["segment"]["rounds"] + 1))
HAS_VAL = config["dataset"]["val_split"] is not None
TRAIN, VAL = config["dataset"]["train_split"], config["dataset"]["val_split"]
# Evaluation rules join the DAG only for splits with ground-truth masks (evaluate.enabled).
EVAL_SPLITS = evaluation_splits(config)
EVAL_TRAIN = TRAIN in EVAL_SPLITS
EVAL_VAL = HAS_VAL and VAL in EVAL_SPLITS
RES = config["resources"]


def P(path):
    """Snakemake wants strings."""
    return str(path)


def cfg(*sections, segment=None):
    """The config sections a command uses, as JSON: rules rerun only when those sections change.
    ``segment``: the segment keys to pass ('model' = those a saved model records: training + prediction).
    """
    chosen = {s: config[s] for s in sections}
    if segment == "model":
        chosen["segment"] = model_section(config["segment"])
    elif segment is not None:
        chosen["segment"] = {k: config["segment"][k] for k in segment}
    return json.dumps(chosen, sort_keys=True)


def log_for(name):
    return P(RUN / "logs" / f"{name}.log")


def bench_for(name):
    """Snakemake's per-job timing (s, max RSS) used by `weakseg benchmark`."""
    return P(RUN / "benchmarks" / f"{name}.tsv")


def shard_path(final, shard="{shard}"):
    """Where one shard of a per-image stage writes; with one shard, the stage store itself."""
    final = Path(final)
    if N_SHARDS == 1:
        return P(final)
    return P(final.parent / "shards" / f"{final.stem}-{shard}.zarr")


def all_shards(final):
    return [shard_path(final, s) for s in SHARDS]


def metrics_csv(stage, split):
    return P(RUN.metrics_dir / f"{stage}_{split}.csv")


# Resources: network rules may ask for a GPU (gpu 0 asks for none); CPU-only stages never do. Their
# commands get --gpus {resources.gpu}: a job that asked for a GPU and finds none fails at once.
def gpu_resources():
    return dict(
        mem_mb=RES["train_mem_mb"],
        runtime=RES["train_runtime_min"],
        cpus_per_task=RES["cpu_threads"],
        gpu=RES["gpu"],
    )


CPU_RESOURCES = dict(
    mem_mb=RES["cpu_mem_mb"],
    runtime=RES["cpu_runtime_min"],
    cpus_per_task=RES["cpu_threads"],
)
THREADS = RES["cpu_threads"]


wildcard_constraints:
    r=r"\d+",
    shard=r"\d+",
    split=r"[A-Za-z0-9-]+",
