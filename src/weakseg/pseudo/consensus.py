"""A round's annotation that checks it against the first round's pseudo-labels (the CAM evidence):

- consensus (segment.annotation: consensus): the round's reliable regions where the first pseudo-labels
  give the same label;
- pruned (segment.annotation: pruned): the first pseudo-labels, minus the pixels where the round's
  reliable regions give another label.

A round's own annotation repeats the errors of the network that made it, and the next round learns
them again. The CAM-derived pseudo-labels err elsewhere. The consensus keeps the pixels on which both
agree, the more often right ones; pruning keeps the first labels, hard pixels included, and drops only
those the round confidently contradicts.
"""

from __future__ import annotations

import logging

import numpy as np

from weakseg import labels as label_rules
from weakseg import store
from weakseg.commands import DATA, Command, option, output, required
from weakseg.datasets import IGNORE, open_data
from weakseg.parallel import progress
from weakseg.pseudo.jobs import split_ids

log = logging.getLogger("weakseg")


# How a round's reliable regions (first argument) and the first pseudo-labels (second) combine.
RULES = {
    "consensus": label_rules.agreement,
    "pruned": label_rules.pruned,
}


def run_consensus(
    config: dict, data_path, labels_path, reference_path, out_path, rule: str = "consensus"
) -> None:
    """Write, for every train image of the labels store ``labels_path`` (a round's reliable regions),
    its combination with the labels store ``reference_path`` (the first pseudo-labels) by ``RULES[rule]``;
    a labels store at ``out_path``."""
    combine = RULES[rule]
    info, _ = open_data(data_path)
    labels = store.open_store(labels_path, "labels")
    reference = store.open_store(reference_path, "labels")
    ids = split_ids(config, info, labels, store.LABELS)
    missing = sorted(set(ids) - set(store.ids_in(reference, store.LABELS)))
    if missing:
        raise store.StoreError(
            f"{reference_path}: no labels for {len(missing)} images of {labels_path}, such as "
            f"{', '.join(missing[:3])} (were the two stores made from the same data store?)"
        )
    kept = total = 0
    prov = store.provenance(rule, labels=str(labels_path), reference=str(reference_path))
    with store.writing(out_path, "labels", prov) as out:
        for image_id in progress(ids, desc=rule, total=len(ids)):
            combined = combine(
                store.get(labels, store.LABELS, image_id), store.get(reference, store.LABELS, image_id)
            )
            store.put(out, store.LABELS, image_id, combined)
            kept += int(np.count_nonzero(combined != IGNORE))
            total += combined.size
    log.info("%s: %.1f%% of pixels keep a label -> %s", rule, 100.0 * kept / max(total, 1), out_path)


COMMAND = Command(
    "consensus",
    "a round's annotation checked against the first pseudo-labels (segment.annotation: consensus, pruned)",
    run_consensus,
    (
        DATA,
        output("out_path", "output labels store (.zarr), 255 where the rule drops a pixel"),
        required("--labels", "labels_path", "labels store of the round (its reliable regions)"),
        required("--reference", "reference_path", "labels store of the first round's pseudo-labels"),
        option(
            "--rule",
            choices=list(RULES),
            default="consensus",
            help="consensus: the round's labels where the first agree; pruned: the first labels except where "
            "the round gives another label",
        ),
    ),
    sections=("dataset",),
    writes=("out_path",),
)
