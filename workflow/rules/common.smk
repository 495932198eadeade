# Shared helpers: the validated config, output paths (all from weakseg.store.RunLayout), per-rule
# config JSON (declared by each command), resources, shard paths and the input functions of the rules.
import json
from pathlib import Path

from snakemake.exceptions import WorkflowError

from weakseg.cli import find_command
from weakseg.config import ConfigError, evaluation_splits, resolve, sections_for
from weakseg.inspect.stages import expected_label_stages, run_rounds
from weakseg.pseudo.consensus import RULES as CHECKING_RULES
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
ROUNDS = run_rounds(config)
HAS_VAL = config["dataset"]["val_split"] is not None
TRAIN, VAL = config["dataset"]["train_split"], config["dataset"]["val_split"]
# Evaluation rules join the DAG only for splits with ground-truth masks (evaluate.enabled).
EVAL_SPLITS = evaluation_splits(config)
# The annotations that check a round's reliable regions against the first pseudo-labels (rule
# consensus_round), as a wildcard pattern.
CHECKED_ANNOTATIONS = "|".join(CHECKING_RULES)
EVAL_TRAIN = TRAIN in EVAL_SPLITS
EVAL_VAL = HAS_VAL and VAL in EVAL_SPLITS
RES = config["resources"]
# The software of every rule (used with --software-deployment-method conda).
CONDA_ENV = "../../envs/weakseg.yaml"


def P(path):
    """Snakemake wants strings."""
    return str(path)


def cfg_for(command):
    """The config sections ``weakseg <command>`` declares it reads, as JSON: a rule reruns when, and
    only when, those change."""
    return json.dumps(
        sections_for(config, find_command(command).sections), sort_keys=True
    )


def log_for(job):
    return P(RUN.log(job))


def bench_for(job):
    """Snakemake's per-job timing (s, max RSS) used by `weakseg benchmark`."""
    return P(RUN.benchmark(job))


def sharded(job):
    """The job name of one shard of a per-image stage (the name itself with one shard)."""
    return job if N_SHARDS == 1 else f"{job}-{{shard}}"


def shard_path(final, shard="{shard}"):
    """Where one shard of a per-image stage writes; with one shard, the stage store itself."""
    return P(RUN.shard_store(final, shard, N_SHARDS))


def all_shards(final):
    return [shard_path(final, s) for s in SHARDS]


def metrics_csv(stage, split):
    return P(RUN.metrics_csv(stage, split))


def per_image_csv(stage, split):
    return P(RUN.per_image_csv(stage, split))


# --- inputs of the rounds and the report ---

# Val rows: round<r> = argmax over all classes of the network's probabilities; _gated = restricted
# to the classes the CAM classifier predicts (segment.val_labels); _crf = gated + dense CRF.


def val_prediction(r, post):
    if post == "":
        return P(RUN.round_scores(r, VAL))
    return P(RUN.round_labels(r, {"_gated": "cleaned", "_crf": "crf"}[post], VAL))


def round_inputs(w):
    r = int(w.r)
    if (
        r == 1 and not JOINT
    ):  # with one-stage training round 1 trains on round 0's annotation
        return with_cam_encoder(
            {
                "labels": P(RUN.pseudo(config["segment"]["first_round_input"])),
                "selection": P(RUN.reliability),
            }
        )
    inputs = {
        "labels": annotation_of(r - 1),
        "selection": P(RUN.round_reliability(r - 1)),
    }
    if (
        config["segment"]["warm_start"] and r >= 2
    ):  # round 1's predecessor is no train-seg network
        inputs["init"] = P(RUN.round_model(r - 1))
    return with_cam_encoder(inputs)


def reliability_inputs(model, seeds):
    """What the reliability rules read besides the annotation: with pseudo.reliability_score
    consistency, the model file whose encoder gives the features and the labels of the prototypes.
    """
    if config["pseudo"]["reliability_score"] != "consistency":
        return {}
    return {"model": model, "seeds": seeds}


def consistency_options(wildcards, input):
    """weakseg reliability's --model / --seeds (see reliability_inputs)."""
    return " ".join(
        f"--{k} {input[k]}" for k in ("model", "seeds") if k in input.keys()
    )


def init_options(wildcards, input):
    """train-seg's options naming the weights a round starts from (see round_inputs), and the learning
    rate of a warm start."""
    flags = {"init": "--init", "init_encoder": "--init-encoder"}
    options = [
        part
        for key, flag in flags.items()
        if hasattr(input, key)
        for part in (flag, getattr(input, key))
    ]
    if hasattr(input, "init"):
        options += ["--init-lr-mult", str(config["segment"]["warm_start_lr_mult"])]
    return options


def with_cam_encoder(inputs):
    """segment.init: cam -> a round that does not warm-start begins with the CAM network's encoder."""
    if config["segment"]["init"] == "cam" and "init" not in inputs:
        inputs["init_encoder"] = P(RUN.cam_model)
    return inputs


def annotation_of(r):
    """A round's train annotation (segment.annotation): cleaned, CRF-refined or RRM reliable regions."""
    return P(RUN.round_labels(r, config["segment"]["annotation"], TRAIN))


def metric_files():
    """The metric CSVs of every stage on every split that has ground-truth masks (EVAL_SPLITS)."""
    files = []
    if EVAL_TRAIN:
        files += [
            metrics_csv(s, TRAIN)
            for s in ("superpixel_oracle", "cam", "spcam", "cleaned", "crf", "reliable")
        ]
    if EVAL_VAL:
        files += [metrics_csv("cam_gated", VAL), metrics_csv("spcam_gated", VAL)]
    for r in ROUNDS:
        if EVAL_TRAIN:
            files.append(metrics_csv(f"round{r}", TRAIN))
        if EVAL_VAL:
            files.append(metrics_csv(f"round{r}", VAL))
            files.append(metrics_csv(f"round{r}_gated", VAL))
            if config["segment"]["eval_crf"]:
                files.append(metrics_csv(f"round{r}_crf", VAL))
    return files


def stage_outputs():
    """The last products of every stage (pseudo-labels, each round's annotation and val predictions):
    the report waits for them whether or not anything is evaluated."""
    files = [P(RUN.pseudo(v)) for v in ("cleaned", "crf", "reliable")]
    files.append(P(RUN.reliability))
    if HAS_VAL:
        files += [P(RUN.gated(key, VAL)) for key in ("cam", "spcam")]
    for r in ROUNDS:
        files += [annotation_of(r), P(RUN.round_reliability(r))]
        if HAS_VAL:
            files.append(P(RUN.round_labels(r, "cleaned", VAL)))
            if config["segment"]["eval_crf"]:
                files.append(P(RUN.round_labels(r, "crf", VAL)))
    return files


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
