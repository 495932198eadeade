"""Kernel time of a job: the seconds spent in the compute kernels alone (a network forward / backward on
a ready batch, the CRF call, the superpixel call), against which ``weakseg benchmark pipeline`` sets the
job's whole wall time. The ratio job / kernel is the overhead (process start, imports, reading and
writing stores, data preparation, resizing) that a faster pipeline removes.

Stages wrap their kernel calls in ``kernel("forward")`` (any name); at the end of the job
``log_kernel_seconds()`` writes one line to the log. Rules send a job's stderr to
``logs/<job>.log``, next to Snakemake's ``benchmarks/<job>.tsv``, so the benchmark reads the kernel
seconds of a job from its log (``read_kernel_seconds``); this module owns both the line and its parser.
Worker processes (``parallel.map_images``) return their clock's increase with each result, so their
kernels count too (summed over workers: with several workers the kernel seconds may exceed the wall time).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("weakseg")
MARKER = "kernel seconds:"  # the log line: "<MARKER> {json of kind -> seconds}"
_SECONDS: dict[str, float] = {}


def _wait_for_accelerator() -> None:
    """CUDA kernels run asynchronously: without waiting for them, a block's wall time is the time it
    took to launch its work, and that work is billed to whatever waits for it next."""
    torch = sys.modules.get("torch")  # jobs without a network never import it
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@contextlib.contextmanager
def kernel(kind: str) -> Iterator[None]:
    """Add the wall time of the block to this process's kernel seconds of ``kind``."""
    _wait_for_accelerator()
    started = time.perf_counter()
    try:
        yield
    finally:
        _wait_for_accelerator()
        _SECONDS[kind] = _SECONDS.get(kind, 0.0) + time.perf_counter() - started


def snapshot() -> dict[str, float]:
    """This process's kernel seconds so far, per kind."""
    return dict(_SECONDS)


def add(seconds: dict[str, float]) -> None:
    """Count kernel seconds measured elsewhere (a worker process) in this process's clock."""
    for kind, value in seconds.items():
        _SECONDS[kind] = _SECONDS.get(kind, 0.0) + float(value)


def since(before: dict[str, float]) -> dict[str, float]:
    """The kernel seconds added after ``before`` (a ``snapshot``), per kind."""
    return {k: v - before.get(k, 0.0) for k, v in _SECONDS.items() if v != before.get(k, 0.0)}


def reset() -> None:
    _SECONDS.clear()


def log_kernel_seconds() -> dict[str, float]:
    """Log this job's kernel seconds per kind as one parseable line; returns them."""
    seconds = {k: round(v, 3) for k, v in sorted(_SECONDS.items())}
    log.info("%s %s", MARKER, json.dumps(seconds))
    return seconds


def read_kernel_seconds(log_path: str | Path) -> dict[str, float] | None:
    """The kernel seconds per kind of the last kernel line in a job's log; None when it has none."""
    path = Path(log_path)
    if not path.is_file():
        return None
    found = None
    with path.open(errors="replace") as fh:
        for line in fh:
            at = line.find(MARKER)
            if at >= 0:
                try:
                    found = {k: float(v) for k, v in json.loads(line[at + len(MARKER) :]).items()}
                except (ValueError, AttributeError):
                    continue
    return found
