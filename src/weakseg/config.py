"""Load and validate a run configuration against the JSON schema, filling in its defaults.

The schema (``schemas/config.schema.yaml``) is the single home of parameter defaults. A config
error names the offending key path and what was expected.
"""

from __future__ import annotations

import copy
import json
import os
import re
from importlib import resources
from pathlib import Path

import jsonschema
import yaml

from weakseg.commands import Command, option
from weakseg.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration key has a wrong value; the message names the key."""


def schema() -> dict:
    text = resources.files("weakseg").joinpath("schemas/config.schema.yaml").read_text()
    return yaml.safe_load(text)


def _fill_defaults(node: dict, value: dict) -> dict:
    """Recursively add schema defaults for missing keys (objects default to {} then get filled)."""
    for key, sub in node.get("properties", {}).items():
        if key not in value and "default" in sub:
            value[key] = copy.deepcopy(sub["default"])
        if sub.get("type") == "object" and isinstance(value.get(key), dict):
            _fill_defaults(sub, value[key])
    return value


def _key_path(error: jsonschema.ValidationError) -> str:
    path = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        allowed = ", ".join(sorted(error.schema.get("properties", {})))
        prefix = f"{path}." if path else ""
        return f"{prefix}{extra[0] if extra else '?'}: unknown key (allowed here: {allowed})"
    return f"{path or '<top level>'}: {error.message}"


def validate(config: dict | None, source: str = "config") -> dict:
    """Return a validated copy of ``config`` with all defaults filled in."""
    value = copy.deepcopy(config or {})
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: expected a mapping of keys, got {type(value).__name__}")
    sch = schema()
    errors = sorted(
        jsonschema.Draft202012Validator(sch).iter_errors(value), key=lambda e: list(e.absolute_path)
    )
    if errors:
        raise ConfigError(f"{source}: " + "; ".join(_key_path(e) for e in errors[:5]))
    _fill_defaults(sch, value)
    return value


def load(spec: str | Path | dict | None, run_from_file: bool = False) -> dict:
    """Load a config from a YAML file, an inline JSON object string, or a dict; validate it.
    ``run_from_file``: a YAML file without ``run`` names the run after the file (see ``resolve``)."""
    if spec is None or isinstance(spec, dict):
        return validate(spec)
    text = str(spec)
    if text.lstrip().startswith("{"):
        try:
            return validate(json.loads(text), "inline config")
        except json.JSONDecodeError as exc:
            raise ConfigError(f"inline config: not valid JSON ({exc})") from exc
    path = Path(text)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    return resolve(data, [path] if run_from_file else [], str(path))


# segment.* keys that do not change what a round's network learns: raising `rounds` or changing
# evaluation must neither retrain finished rounds nor invalidate a training checkpoint.
SEGMENT_PREDICTION = ("infer_scales", "infer_flip", "infer_precision", "prior_adjustment")
SEGMENT_NOT_TRAINING = (
    "rounds",
    "warm_start",  # what it changes reaches training as the --init model file
    "warm_start_lr_mult",  # and this as its --init-lr-mult
    "annotation",
    "reliable_confidence",
    "eval_crf",
    "val_labels",
    "label_threshold",
    *SEGMENT_PREDICTION,
)


def training_section(segment: dict) -> dict:
    return {k: v for k, v in segment.items() if k not in SEGMENT_NOT_TRAINING}


def model_section(segment: dict) -> dict:
    """What a saved segmentation model records: its training keys plus how to predict with it, so that
    `weakseg predict` needs no config. A change of the prediction keys only rewrites the model file
    (training resumes from its final checkpoint), and invalidates the predictions made with it."""
    return {**training_section(segment), **{k: segment[k] for k in SEGMENT_PREDICTION}}


def prediction_section(segment: dict) -> dict:
    return {k: segment[k] for k in SEGMENT_PREDICTION}


# Named views of a section that commands may declare instead of the whole section (weakseg.commands).
SECTION_VIEWS = {
    "segment[model]": ("segment", model_section),
    "segment[prediction]": ("segment", prediction_section),
}


def sections_for(config: dict, sections) -> dict:
    """The part of a resolved config that a command declares it reads: whole sections ("pseudo"),
    single keys ("segment.val_labels") or named views ("segment[model]")."""
    chosen: dict = {}
    for entry in sections:
        if entry in SECTION_VIEWS:
            name, view = SECTION_VIEWS[entry]
            chosen.setdefault(name, {}).update(view(config[name]))
        elif "." in entry:
            name, key = entry.split(".", 1)
            chosen.setdefault(name, {})[key] = config[name][key]
        else:
            chosen[entry] = copy.deepcopy(config[entry])  # a whole section (or a plain key such as device)
    return chosen


def run_dir(config: dict) -> Path:
    return Path(config["results"]) / config["run"]


def run_name_from(config_file: str | Path) -> str:
    """The run name a config file gives when it sets no ``run``: its stem, with characters the
    ``run`` pattern does not allow replaced by '_' (``my trial.yaml`` -> ``my_trial``)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", Path(config_file).stem) or "run"


def resolve(config: dict | None, config_files=(), source: str = "config") -> dict:
    """The validated, default-filled config of a workflow run. Without a ``run`` key the run is named
    after the last of ``config_files`` (so ``--configfile my.yaml`` writes to ``results/my``)."""
    value = copy.deepcopy(config or {})
    if isinstance(value, dict) and "run" not in value and config_files:
        value["run"] = run_name_from(list(config_files)[-1])
    return validate(value, source)


def evaluation_splits(config: dict) -> list[str]:
    """The splits evaluated against ground-truth masks, decided before the workflow runs.

    ``evaluate.enabled``: false -> none; true -> every split (a split without masks then fails in
    evaluation); auto -> the synthetic dataset's splits (always masked), or the folder dataset's splits
    with at least one ``SegmentationClass/<id>.png`` among their (first ``max_images``) ids. Evaluation
    covers the images that have a mask and reports how many of the split's images those are.
    """
    dataset, enabled = config["dataset"], config["evaluate"]["enabled"]
    splits = [dataset["train_split"]] + ([dataset["val_split"]] if dataset["val_split"] else [])
    if enabled is False:
        return []
    if enabled is True or dataset["kind"] == "synthetic":
        return splits
    return [s for s in splits if count_masks(dataset, s) > 0]


def count_masks(dataset: dict, split: str) -> int:
    """How many images of a folder dataset's split have a mask file (0 when the folder or its split
    list is missing: ingest reports that)."""
    from weakseg.datasets.folder import DatasetError, read_split

    root = Path(dataset["root"] or "")
    masks = root / "SegmentationClass"
    if not dataset["root"] or not masks.is_dir():
        return 0
    try:
        ids = read_split(root, split)
    except DatasetError:
        return 0
    if dataset["max_images"]:
        ids = ids[: dataset["max_images"]]
    return sum((masks / f"{image_id}.png").is_file() for image_id in ids)


def write_resolved(config: dict, path: str | Path) -> Path:
    """Write a resolved config as YAML, atomically (temporary sibling, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(
            "# The resolved configuration of this run: every key, defaults filled in.\n"
            + yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=100)
        )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _print_or_write_resolved(args) -> None:
    config = load(args.config, run_from_file=True)
    if args.out:
        write_resolved(config, args.out)
        print(f"wrote {args.out}")
    else:
        print(yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=100), end="")


COMMAND = Command(
    "resolve-config",
    "print or write a run's resolved config: every key, schema defaults filled in",
    write_resolved,
    (
        option(
            "--config",
            default="config.yaml",
            help="run config: a YAML file (without 'run:' the run is named after the file) or an inline "
            "JSON object",
        ),
        option("--out", help="write this YAML file (atomically) instead of printing"),
    ),
    writes=("out",),
    call=_print_or_write_resolved,
)
