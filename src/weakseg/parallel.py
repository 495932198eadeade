"""Run a per-image function over many images on the rule's threads, with a progress bar."""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from typing import TypeVar

from tqdm import tqdm

from weakseg import timing

T = TypeVar("T")
R = TypeVar("R")
log = logging.getLogger("weakseg")


class _PlainLines:
    """A stream for tqdm that turns its carriage-return redraws into whole lines, so that a log file
    (Snakemake sends a rule's stderr to its log) gets one readable line per update."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


PLAIN_INTERVAL_S = 30.0  # at most one progress line per this many seconds in a log file


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """A progress bar on stderr; when stderr is not a terminal (a log file), plain lines instead."""
    if sys.stderr.isatty():
        return tqdm(items, desc=desc, total=total, file=sys.stderr, mininterval=2.0)
    return tqdm(
        items,
        desc=desc,
        total=total,
        file=_PlainLines(sys.stderr),
        mininterval=PLAIN_INTERVAL_S,
        ascii=True,
        ncols=100,
    )


def map_images(fn: Callable[[T], R], items: Sequence[T], threads: int, desc: str) -> Iterator[R]:
    """Yield ``fn(item)`` for every item, in order, using ``threads`` worker processes.

    ``fn`` must be a picklable top-level function. With threads <= 1 it runs in this process,
    which keeps tracebacks simple and avoids fork costs for small inputs.
    """
    if threads <= 1 or len(items) <= 1:
        yield from progress(map(fn, items), desc, total=len(items))
        return
    ctx = mp.get_context("fork")
    with ctx.Pool(processes=threads, initializer=default_sigterm) as pool:
        for result, kernel_seconds in progress(
            pool.imap(partial(_with_kernel_seconds, fn), items, chunksize=1), desc, total=len(items)
        ):
            timing.add(kernel_seconds)  # the workers' kernels count in this job's kernel time
            yield result


def default_sigterm() -> None:
    """Initializer of worker processes: SIGTERM kills them outright. A forked worker inherits the
    command's SIGTERM handler (unwind and clean up, ``weakseg.cli``); in a worker that unwinding runs
    Python's exit path, which can wait forever on a thread or lock the fork left behind, and then the
    pool's shutdown, which sends SIGTERM, never returns. Workers own no files: the parent cleans up."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _with_kernel_seconds(fn: Callable[[T], R], item: T) -> tuple[R, dict[str, float]]:
    """``fn(item)`` in a worker process, with the kernel seconds it measured."""
    before = timing.snapshot()
    result = fn(item)
    return result, timing.since(before)
