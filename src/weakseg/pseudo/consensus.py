"""Consensus annotation of a round (segment.annotation: consensus): the round's reliable regions, kept
where the pseudo-labels of the first round (the CAM evidence) give the same label.

A round's own annotation repeats the errors of the network that made it, and the next round learns
them again. The CAM-derived pseudo-labels err elsewhere, so the pixels on which both agree are the
more often right ones; the rest are ignored.
"""

from __future__ import annotations

import logging

import numpy as np

from weakseg import labels as label_rules
from weakseg import store
from weakseg.commands import DATA, Command, output, required
from weakseg.datasets import IGNORE, open_data
from weakseg.parallel import progress
from weakseg.pseudo.jobs import split_ids

log = logging.getLogger("weakseg")


def run_consensus(config: dict, data_path, labels_path, reference_path, out_path) -> None:
    """Write, for every train image of the labels store ``labels_path``, its labels where the labels
    store ``reference_path`` agrees (``weakseg.labels.agreement``); a labels store at ``out_path``."""
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
    prov = store.provenance("consensus", labels=str(labels_path), reference=str(reference_path))
    with store.writing(out_path, "labels", prov) as out:
        for image_id in progress(ids, desc="consensus", total=len(ids)):
            agreed = label_rules.agreement(
                store.get(labels, store.LABELS, image_id), store.get(reference, store.LABELS, image_id)
            )
            store.put(out, store.LABELS, image_id, agreed)
            kept += int(np.count_nonzero(agreed != IGNORE))
            total += agreed.size
    log.info("consensus: %.1f%% of pixels keep a label -> %s", 100.0 * kept / max(total, 1), out_path)


COMMAND = Command(
    "consensus",
    "a round's annotation where the first round's pseudo-labels agree (segment.annotation: consensus)",
    run_consensus,
    (
        DATA,
        output("out_path", "output labels store (.zarr), 255 where the two disagree"),
        required("--labels", "labels_path", "labels store of the round (its reliable regions)"),
        required("--reference", "reference_path", "labels store of the first round's pseudo-labels"),
    ),
    sections=("dataset",),
    writes=("out_path",),
)
