"""The job engine of the pseudo-label stages (cleaning, dense CRF, reliable regions, reliability).

Their edges share what is here: which images a stage covers, the per-image job
they hand to worker processes, reading one image's scores with the checks every stage needs, and
writing a labels store while logging throughput.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from weakseg import labels as label_rules
from weakseg import store
from weakseg.datasets import DatasetInfo, open_data
from weakseg.parallel import map_images

log = logging.getLogger("weakseg")


@dataclass(frozen=True)
class ImageJob:
    """Everything a worker process needs to label one image; paths, not arrays, so jobs pickle cheaply."""

    image_id: str
    image_labels: np.ndarray  # class indices, background included when the dataset has one
    background: label_rules.Background  # the run's background decision (threshold: implicit only)
    scores_path: str
    key: str
    params: dict = field(default_factory=dict)  # the stage's parameters from config['pseudo']
    data_path: str | None = None  # only stages that need the RGB image
    labels_path: str | None = None  # only stages that filter an existing labels store


@lru_cache(maxsize=16)
def opened(path: str, kind: str):
    """Open a finished store once per process (fork workers inherit or reopen it)."""
    return store.open_store(path, kind)


def job_scores(job: ImageJob) -> tuple[np.ndarray, np.ndarray]:
    """Read one image's scores; refuse a store that lacks a class the image is labelled with,
    since every stage would then silently mislabel that object."""
    scores, classes = store.get_scores(opened(job.scores_path, "scores"), job.key, job.image_id)
    fg_labels = [int(c) for c in job.image_labels if not (job.background.has_background and c == 0)]
    missing = sorted(set(fg_labels) - set(classes.tolist()))
    if missing:
        raise store.StoreError(
            f"{job.scores_path}: '{job.key}/{job.image_id}' has scores for classes {classes.tolist()} but the "
            f"image is labelled with {missing} too (was this scores store made from another data store?)"
        )
    return scores, classes


def job_image(job: ImageJob) -> np.ndarray:
    return store.get(opened(job.data_path, "data"), store.IMAGES, job.image_id)


def job_labels(job: ImageJob) -> np.ndarray:
    return store.get(opened(job.labels_path, "labels"), store.LABELS, job.image_id)


def split_ids(config: dict, info: DatasetInfo, group, key: str, split: str | None = None) -> list[str]:
    """Sorted ids of ``split`` (default: the train split) that have a ``key`` array in ``group``."""
    present = set(store.ids_in(group, key))
    return sorted(i for i in info.split(split or config["dataset"]["train_split"]) if i in present)


def known_labels(
    config: dict, info: DatasetInfo, image_id: str, split: str | None, labels_from=None
) -> np.ndarray:
    """Image labels a stage may use. On the train split: the real ones. On any other split (val, test)
    labels are unknown at test time: every class, or — with segment.val_labels 'predicted' and a CAM
    scores store ``labels_from`` — the classes its classifier predicts present."""
    if split is None or split == config["dataset"]["train_split"]:
        return info.image_labels(image_id)
    if labels_from is None or config["segment"]["val_labels"] == "all":
        return np.arange(info.n_classes)
    attrs = store.get_attrs(labels_from, store.CAM, image_id)
    return label_rules.predicted_labels(
        attrs["label_probabilities"],
        attrs["classes"],
        config["segment"]["label_threshold"],
        info.has_background,
    )


def make_jobs(
    config: dict,
    data_path,
    scores_path,
    key: str,
    params: dict,
    shard: int,
    n_shards: int,
    with_image: bool = False,
    labels_path=None,
    split: str | None = None,
    labels_from=None,
) -> tuple[DatasetInfo, list[ImageJob]]:
    """One job per image of ``split`` (default train) present in the scores store (one shard of them).
    ``labels_from``: a CAM scores store whose classifier predictions stand in for unknown image labels."""
    info, _ = open_data(data_path)
    scores_group = store.open_store(scores_path, "scores")
    ids = store.shard_ids(split_ids(config, info, scores_group, key, split), shard, n_shards)
    if not ids:
        log.warning(
            "%s: no train image has a '%s' array (shard %d/%d); writing an empty store",
            scores_path,
            key,
            shard,
            n_shards,
        )
    predicted = store.open_store(labels_from, "scores") if labels_from is not None else None
    threshold = None
    if ids and label_rules.implicit_background(
        store.get_attrs(scores_group, key, ids[0])["classes"], info.has_background
    ):
        threshold = label_rules.store_threshold(config, scores_path, key, data_path)
    background = label_rules.Background(
        info.has_background, threshold, config["pseudo"]["background"]["margin"]
    )
    jobs = [
        ImageJob(
            i,
            known_labels(config, info, i, split, predicted),
            background,
            os.fspath(scores_path),
            key,
            params,
            os.fspath(data_path) if with_image else None,
            os.fspath(labels_path) if labels_path is not None else None,
        )
        for i in ids
    ]
    return info, jobs


def write_labels(
    out_path,
    stage: str,
    config: dict,
    worker: Callable[[ImageJob], tuple[str, np.ndarray, Counter]],
    jobs: Sequence[ImageJob],
    threads: int = 1,
    **prov_extra,
) -> Counter:
    """Run ``worker`` over the jobs and write each returned label map into a new labels store.

    Workers return (image id, labels, counters); the counters are summed so that a stage can log
    how often an edge case (empty score maps, images without labels) happened. ``prov_extra``
    (source key, effective parameters) goes into the store's provenance next to config['pseudo'].
    """
    opened.cache_clear()  # a store rewritten since the last stage must not be read through a stale handle
    totals: Counter = Counter()
    start = time.perf_counter()
    with store.writing(out_path, "labels", store.provenance(stage, config["pseudo"], **prov_extra)) as out:
        for image_id, labels, counts in map_images(worker, jobs, threads, desc=stage):
            store.put(out, store.LABELS, image_id, labels)
            totals.update(counts)
    elapsed = time.perf_counter() - start
    log.info(
        "%s: %d images in %.1f s (%.2f images/s, %d threads) -> %s",
        stage,
        len(jobs),
        elapsed,
        len(jobs) / elapsed if elapsed > 0 else float("inf"),
        max(threads, 1),
        out_path,
    )
    return totals
