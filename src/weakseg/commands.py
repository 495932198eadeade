"""How a stage declares its command, once, next to its ``run_*`` function.

A :class:`Command` names the command, its options (with help), the stage function it calls and the
config sections that function reads. ``weakseg.cli`` turns the declarations into the ``weakseg``
parser; the workflow's rules pass each command exactly the sections it declares
(``cfg_for("clean")`` in ``workflow/rules/common.smk``), so that a rule reruns when, and only when,
what its command reads changes.

The stage function is called with keyword arguments taken from the parsed options by name: an option's
``dest`` is the name of the parameter it fills. A parameter named ``config`` receives the loaded run
config. A command may instead give ``call(args)`` when it needs more than that (printing a summary).

This module imports nothing heavy: declaring a command must not load torch.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Option:
    """One ``argparse`` argument: its flags (or positional name) and ``add_argument`` keywords."""

    flags: tuple[str, ...]
    options: dict = field(default_factory=dict)

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        options = dict(self.options)
        positional = not self.flags[0].startswith("-")
        if not positional and "dest" in options and "metavar" not in options and _takes_value(options):
            options["metavar"] = self.flags[-1].lstrip("-").upper().replace("-", "_")
        parser.add_argument(*self.flags, **options)

    @property
    def dest(self) -> str:
        if "dest" in self.options:
            return self.options["dest"]
        return self.flags[-1].lstrip("-").replace("-", "_")


def _takes_value(options: dict) -> bool:
    return options.get("action") not in ("store_true", "store_false", "count", "version")


def option(*flags: str, **options) -> Option:
    return Option(tuple(flags), options)


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    # The stage function, or "module:function" when importing it is heavy (torch): resolved at run time.
    run: Callable[..., Any] | str
    options: tuple[Option, ...]
    # Config sections the stage reads: "dataset" (the whole section), "segment.val_labels" (one key),
    # or a named view such as "segment[model]" (see weakseg.config.SECTION_VIEWS).
    sections: tuple[str, ...] = ()
    # What the command writes, held under the run's lock while it runs: the names of the parameters
    # holding the paths, or functions of the parsed arguments giving a path.
    writes: tuple[str | Callable[[argparse.Namespace], Any], ...] = ()
    # Runs a network: --gpus says how many GPUs its job asked for, checked before anything starts.
    network: bool = False
    # Replaces the keyword call when the command needs more (e.g. printing what it wrote).
    call: Callable[[argparse.Namespace], Any] | str | None = None

    def add_to(self, sub, formatter_class) -> argparse.ArgumentParser:
        parser = sub.add_parser(
            self.name, help=self.help, description=self.help, formatter_class=formatter_class
        )
        for opt in self.all_options():
            opt.add_to(parser)
        parser.set_defaults(command_spec=self)
        return parser

    def all_options(self) -> tuple[Option, ...]:
        extra = (CONFIG,) if self.sections and not any(o.dest == "config" for o in self.options) else ()
        return extra + self.options + ((GPUS,) if self.network else ())

    def invoke(self, args: argparse.Namespace):
        if self.call is not None:
            return resolve(self.call)(args)
        run = resolve(self.run)
        values = vars(args)
        kwargs = {}
        for name in inspect.signature(run).parameters:
            if name == "config":
                kwargs[name] = run_config(args, self.network)
            elif name in values:
                kwargs[name] = values[name]
        return run(**kwargs)

    def written_paths(self, args: argparse.Namespace) -> list:
        paths = (entry(args) if callable(entry) else getattr(args, entry, None) for entry in self.writes)
        return [path for path in paths if path]


def resolve(target: Callable | str) -> Callable:
    """A function, given as itself or as ``"module:function"``."""
    if callable(target):
        return target
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def run_config(args: argparse.Namespace, network: bool = False) -> dict:
    """The run config given by --config; for a network command, first the check that the GPUs its
    job asked for exist."""
    from weakseg.config import load

    config = load(args.config)
    if network:
        from weakseg.nets.device import check_gpu_request

        check_gpu_request(config["device"], args.gpus)
    return config


# --- options shared by many commands --------------------------------------------------------------

CONFIG = option(
    "--config",
    default="config.yaml",
    help="run config: a YAML file or an inline JSON object (default: config.yaml)",
)
GPUS = option(
    "--gpus",
    type=int,
    default=0,
    help="GPUs this job asked for (resources.gpu); with N > 0 and no usable CUDA device the "
    "command stops at once, unless the config says device: cpu",
)
THREADS = option("--threads", type=int, default=1, help="worker processes/threads")
SHARD = (
    option("--shard", type=int, default=0, help="which shard of the images to process (0-based)"),
    option(
        "--shards", dest="n_shards", type=int, default=1, help="number of shards the images are split into"
    ),
)
DATA = option("--data", dest="data_path", required=True, help="data.zarr of the run")
GT = option(
    "--gt", dest="gt_path", required=True, help="gt.zarr of the run (images without a mask are skipped)"
)
SUPERPIXELS = option(
    "--superpixels", dest="superpixels_path", required=True, help="superpixels store of the run"
)
SPLIT = option("--split", help="which split's images (default: the train split)")
SPLIT_REQUIRED = option("--split", required=True, help="which split's images")
RUN_DIR = option("run_dir", help="the run's folder, e.g. results/demo")
SCORE_KEY = option("--key", default="spcam", help="score maps to use: spcam, cam or seg")
LABELS_FROM = option(
    "--labels-from",
    help="CAM scores store whose classifier predicts the labels of images outside the train split "
    "(segment.val_labels: predicted); else all classes compete",
)
OUT_DIR = option(
    "--out-dir", required=True, help="writes model.pt, train_log.csv, checkpoints/ (resumes from them)"
)


def required(flag: str, dest: str, help: str) -> Option:
    """A required option (a path, mostly) that fills parameter ``dest``."""
    return option(flag, dest=dest, required=True, help=help)


def optional(flag: str, dest: str, help: str, **options) -> Option:
    """An optional option (a path, mostly) that fills parameter ``dest``."""
    return option(flag, dest=dest, help=help, **options)


def output(dest: str, help: str) -> Option:
    """The required ``--out`` of a command, filling parameter ``dest``."""
    return required("--out", dest, help)


def non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value
