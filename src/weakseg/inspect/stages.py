"""One naming scheme for the stages of a run, shared by metrics rows, ``inspect``, the report and CLI help.

A stage is named as its metrics row: (stage, split). Labels stores map to names like this:

    pseudo/cleaned.zarr, crf.zarr, reliable.zarr        cleaned, crf, reliable            (train)
    cam/<key>_gated_<val>.zarr                          cam_gated, spcam_gated            (val)
    round<r>/<segment.annotation>_<train>.zarr          round<r>: the round's annotation  (train)
    round<r>/cleaned_<train>.zarr, crf_, reliable_,     round<r>_cleaned, _crf, _reliable,
    consensus_, pruned_                                 _consensus, _pruned (train; the one
                                                        that is the annotation is round<r>)
    round<r>/cleaned_<val>.zarr, crf_<val>.zarr         round<r>_gated, round<r>_crf      (val)

Metrics add rows without a labels store: superpixel_oracle, cam and spcam (scores, train), round<r> on
val (the network's argmax), and <stage>_selected (the images the reliability selection keeps).
This module is light (no numpy, no stores) so that ``--help`` can quote it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

STAGE_HELP = (
    "superpixel_oracle, cam, spcam, cleaned, crf, reliable, round<r> (train); cam_gated, spcam_gated, "
    "round<r>, round<r>_gated, round<r>_crf (val); round<r>_cleaned, round<r>_crf, round<r>_reliable, round<r>_consensus, round<r>_pruned "
    "(train, a round's steps before its annotation)"
)
PSEUDO_VARIANTS = ("cleaned", "crf", "reliable")
# The labels stores the workflow makes for a round's train annotation (segment.annotation), in order.
ANNOTATION_STEPS = {
    "cleaned": ("cleaned",),
    "crf": ("crf",),
    "reliable": ("crf", "reliable"),
    "consensus": ("crf", "reliable", "consensus"),
    "pruned": ("crf", "reliable", "pruned"),
}
CAM_KEYS = ("cam", "spcam")


@dataclass(frozen=True)
class Stage:
    """A stage's labels store: its name, the split whose images it holds, and where it lives."""

    name: str
    split: str
    path: Path


def round_stage_name(r: int, variant: str, split: str, train_split: str, annotation: str) -> str:
    """The name of the labels store ``round<r>/<variant>_<split>.zarr``."""
    if split == train_split:
        return f"round{r}" if variant == annotation else f"round{r}_{variant}"
    return f"round{r}_gated" if variant == "cleaned" else f"round{r}_{variant}"


def run_rounds(config: dict) -> list[int]:
    """The rounds a run of ``config`` makes: 1..segment.rounds, and round 0 (the one-stage network)
    when joint.enabled."""
    first = 0 if config.get("joint", {}).get("enabled") else 1
    return list(range(first, config["segment"]["rounds"] + 1))


def expected_label_stages(layout, config: dict) -> list[Stage]:
    """Every labels store a finished run of ``config`` has, in pipeline order."""
    train, val = config["dataset"]["train_split"], config["dataset"]["val_split"]
    seg = config["segment"]
    stages = [Stage(v, train, layout.pseudo(v)) for v in PSEUDO_VARIANTS]
    if val:
        stages += [Stage(f"{key}_gated", val, layout.gated(key, val)) for key in CAM_KEYS]
    # The workflow makes a round's train annotation and what it needs (reliable regions need the CRF),
    # and on val the gated prediction and, with segment.eval_crf, its CRF.
    made = {train: ANNOTATION_STEPS[seg["annotation"]]}
    if val:
        made[val] = ("cleaned", "crf") if seg["eval_crf"] else ("cleaned",)
    for r in run_rounds(config):
        for split, variants in made.items():
            stages += [
                Stage(
                    round_stage_name(r, v, split, train, seg["annotation"]),
                    split,
                    layout.round_labels(r, v, split),
                )
                for v in variants
            ]
    return stages


def found_label_stages(layout, train_split: str, annotation: str) -> list[Stage]:
    """The labels stores present in a run folder (finished or not), named by the scheme above."""
    stages = [Stage(v, train_split, layout.pseudo(v)) for v in PSEUDO_VARIANTS if layout.pseudo(v).exists()]
    stages += [Stage(f"{key}_gated", split, path) for key, split, path in layout.found_gated()]
    for r in layout.round_numbers():
        stages += [
            Stage(round_stage_name(r, variant, split, train_split, annotation), split, path)
            for variant, split, path in layout.found_round_labels(r)
        ]
    return stages


def split_stage(file_stem: str, splits) -> tuple[str, str] | None:
    """(stage, split) of a metrics file stem ``<stage>_<split>``, for one of the dataset's ``splits``."""
    for split in sorted(splits, key=len, reverse=True):
        if file_stem.endswith(f"_{split}") and len(file_stem) > len(split) + 1:
            return file_stem[: -len(split) - 1], split
    return None
