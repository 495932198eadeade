"""The on-disk layout of every weakseg store. No other module knows where arrays live.

Every stage writes one Zarr (v3) group. Per-image arrays live under ``<key>/<image id>`` because
images differ in size; one chunk per array keeps a store to a few files per image.

    data.zarr          attrs: class_names, has_background, ids, splits {split: [ids]}
      images/<id>      uint8 (H, W, 3) RGB
      labels           uint8 (N, C) image-level labels, rows in attrs['ids'] order
    gt.zarr            masks/<id> uint8 (H, W), 255 = ignore   (read by evaluation only)
    superpixels.zarr   maps/<id> int32 (H, W), labels 0..n-1
    scores.zarr        cam/<id>, spcam/<id> uint8 (K, H, W): score = value / 255,
                       array attrs {'classes': [K class indices]}
    <labels>.zarr      labels/<id> uint8 (H, W), 255 = ignore  (cleaned, crf, reliable, rounds)

Group attrs always hold ``kind`` (what the store is) and ``provenance`` (stage, config section,
package version, time). A store is written under a temporary sibling name and renamed into place
only when complete, so a killed job never leaves a store that looks finished; the next writer of
that store removes the temporaries of killed writers.

One writer per run: ``results/<run>/.weakseg.lock`` names the process that writes the run (the
workflow, or a command run by hand). The processes a holder starts find its token in the
environment (``WEAKSEG_RUN_LOCK``) and write under its lock; anyone else is refused.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import glob
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import zarr

from weakseg.commands import Command, option, output
from weakseg.errors import UserError

log = logging.getLogger("weakseg")

# Keys of the per-image arrays, one per store kind. A stage store may hold several keys (scores).
IMAGES, MASKS, SUPERPIXELS, LABELS = "images", "masks", "maps", "labels"
CAM, SPCAM = "cam", "spcam"
SEG = "seg"  # segmentation-net class probabilities (round scores)
SCORE_SCALE = 255.0  # scores in [0, 1] are stored as uint8 value / 255

DATA_STORE = "data.zarr"  # the first store of every run: its folder is the run directory
RUN_LOCK = ".weakseg.lock"  # in the run directory: who writes this run
RUN_LOCK_TOKEN = "WEAKSEG_RUN_LOCK"  # environment variable: the token of the lock held by a parent process
TMP_MARK = ".tmp-"  # <final name>.tmp-<writer>: where a writer builds a store or file
# A round's labels stores, <variant>_<split>.zarr: its prediction cleaned, CRF-refined, reliable regions,
# and those checked against the first pseudo-labels (segment.annotation consensus, pruned).
ROUND_LABEL_VARIANTS = ("cleaned", "crf", "reliable", "consensus", "pruned")


class StoreError(UserError, RuntimeError):
    """A store is missing, unfinished, of the wrong kind, or lacks an image."""


class RunLockedError(StoreError):
    """Another live process writes into the run directory; the message names it."""


def provenance(stage: str, config: dict | None = None, **extra) -> dict:
    from weakseg import __version__

    return {
        "stage": stage,
        "config": config or {},
        "weakseg_version": __version__,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        **extra,
    }


@contextlib.contextmanager
def writing(
    path: str | os.PathLike, kind: str, prov: dict, attrs: dict | None = None
) -> Iterator[zarr.Group]:
    """Yield a new group at a temporary path; on success move it to ``path`` (replacing any old one).

    On any exception the temporary store is removed and ``path`` is left as it was.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_orphans(final)
    tmp = temporary_path(final)
    group = zarr.open_group(str(tmp), mode="w")
    group.attrs.update({"kind": kind, "provenance": prov, "complete": False, **(attrs or {})})
    try:
        yield group
        group.attrs["complete"] = True
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_path(tmp, final)


def replace_path(tmp: Path, final: Path) -> None:
    """Move a finished temporary folder into place, replacing ``final``; the old one is renamed
    aside first so that a crash in between never leaves neither."""
    if final.exists():
        old = temporary_path(final, "old-")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


def open_store(path: str | os.PathLike, kind: str | None = None) -> zarr.Group:
    """Open a finished store read-only; a clear error if it is missing, unfinished or another kind."""
    p = Path(path)
    if not p.exists():
        raise StoreError(f"{p}: store not found (has the stage that writes it run?)")
    try:
        group = zarr.open_group(str(p), mode="r")
    except Exception as exc:  # zarr raises several types for a broken group
        raise StoreError(f"{p}: not a readable Zarr group ({exc})") from exc
    if not group.attrs.get("complete", False):
        raise StoreError(f"{p}: store is incomplete (its writer did not finish); rerun that stage")
    if kind is not None and group.attrs.get("kind") != kind:
        raise StoreError(f"{p}: expected a '{kind}' store, found '{group.attrs.get('kind')}'")
    return group


def put(group: zarr.Group, key: str, image_id: str, array: np.ndarray, attrs: dict | None = None) -> None:
    """Write one per-image array (one chunk) under ``key/image_id``."""
    array = np.ascontiguousarray(array)
    # attributes go in with the array's metadata: setting them afterwards rewrites that file
    arr = group.create_array(
        f"{key}/{image_id}",
        shape=array.shape,
        dtype=array.dtype,
        chunks=array.shape,
        overwrite=True,
        attributes=attrs or {},
    )
    arr[...] = array


def _array(group: zarr.Group, key: str, image_id: str) -> zarr.Array:
    try:
        return group[f"{key}/{image_id}"]
    except KeyError:
        raise StoreError(f"{_where(group)}: no '{key}' array for image '{image_id}'") from None


def get(group: zarr.Group, key: str, image_id: str) -> np.ndarray:
    return _array(group, key, image_id)[...]


def get_attrs(group: zarr.Group, key: str, image_id: str) -> dict:
    return dict(_array(group, key, image_id).attrs)


def ids_in(group: zarr.Group, key: str) -> list[str]:
    if key not in group:
        return []
    return sorted(name for name, _ in group[key].arrays())


def put_scores(
    group: zarr.Group, key: str, image_id: str, scores: np.ndarray, classes, attrs: dict | None = None
) -> None:
    """Store (K, H, W) scores in [0, 1] quantised to uint8, with the K class indices they cover."""
    q = np.clip(np.rint(np.asarray(scores, np.float32) * SCORE_SCALE), 0, 255).astype(np.uint8)
    put(group, key, image_id, q, {"classes": [int(c) for c in classes], **(attrs or {})})


def get_scores(group: zarr.Group, key: str, image_id: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (scores float32 (K, H, W) in [0, 1], class indices (K,))."""
    arr = _array(group, key, image_id)  # opened once: values and attributes share its metadata
    q = arr[...]
    classes = np.asarray(arr.attrs["classes"], dtype=np.int64)
    return q.astype(np.float32) / SCORE_SCALE, classes


def copy_arrays(src: zarr.Group, dst: zarr.Group) -> int:
    """Copy every per-image array of ``src`` into ``dst`` (used to gather shards). Returns count."""
    n = 0
    for key, sub in src.groups():
        for image_id, arr in sub.arrays():
            put(dst, key, image_id, arr[...], dict(arr.attrs))
            n += 1
    return n


def gather(
    shard_paths,
    final_path,
    kind: str,
    prov: dict,
    expected_ids: list[str] | None = None,
    key: str | None = None,
) -> None:
    """Merge shard stores (disjoint image sets) into one finished store at ``final_path``."""
    shards = [open_store(p, kind) for p in shard_paths]
    attrs = {k: v for k, v in shards[0].attrs.items() if k not in ("kind", "provenance", "complete")}
    with writing(final_path, kind, prov, attrs) as out:
        for shard in shards:
            copy_arrays(shard, out)
        if expected_ids is not None and key is not None:
            missing = sorted(set(expected_ids) - set(ids_in(out, key)))
            if missing:
                raise StoreError(f"{final_path}: shards lack {len(missing)} images, e.g. {missing[:3]}")


def shard_ids(ids: list[str], shard: int, n_shards: int) -> list[str]:
    """The images of one shard: a fixed, disjoint, round-robin split of the sorted id list."""
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} is outside 0..{n_shards - 1}")
    return sorted(ids)[shard::n_shards]


def write_table(table, path: str | os.PathLike) -> Path:
    """Write a pandas table as CSV atomically (temporary sibling, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_orphans(path)
    tmp = temporary_path(path)
    try:
        table.to_csv(tmp, index=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ------------------------------------------------------------------ temporaries of killed writers

_WRITER_TAG = re.compile(r"^(?:old-)?[0-9a-f]{8}-(\d+)-(.+)$")  # the part after TMP_MARK


def temporary_path(final: str | os.PathLike, role: str = "") -> Path:
    """A sibling of ``final`` to build it in, named after its writer (pid, host) so that the
    temporaries of killed writers can be told from those of live ones."""
    final = Path(final)
    return final.with_name(
        f"{final.name}{TMP_MARK}{role}{uuid.uuid4().hex[:8]}-{os.getpid()}-{socket.gethostname()}"
    )


def sweep_orphans(final: str | os.PathLike) -> list[Path]:
    """Remove the ``<final>.tmp-*`` siblings of killed writers; returns what was removed.

    A temporary is orphaned when its writer, on this host, is gone, or when it is older than the
    lock of the run being written (an earlier run's). The run lock makes this safe: nobody else
    writes the same store meanwhile (shards write stores of their own names).
    """
    final = Path(final)
    if not final.parent.is_dir():
        return []
    run_dir = run_dir_of(final)
    lock = _read_lock(run_dir / RUN_LOCK) if run_dir is not None else None
    run_started = lock.get("started_unix") if isinstance(lock, dict) else None
    removed = []
    for sibling in final.parent.glob(glob.escape(final.name) + TMP_MARK + "*"):
        if _orphaned(sibling, sibling.name[len(final.name) + len(TMP_MARK) :], run_started):
            if sibling.is_dir() and not sibling.is_symlink():
                shutil.rmtree(sibling, ignore_errors=True)
            else:
                sibling.unlink(missing_ok=True)
            removed.append(sibling)
    if removed:
        log.info(
            "%s: removed %d temporaries of killed writers (%s)",
            final,
            len(removed),
            ", ".join(p.name for p in removed[:3]),
        )
    return removed


def _orphaned(sibling: Path, tag: str, run_started: float | None) -> bool:
    writer = _WRITER_TAG.match(tag)
    if writer and writer.group(2) == socket.gethostname() and int(writer.group(1)) != os.getpid():
        if not _process_exists(int(writer.group(1))):
            return True
    if run_started is None:
        return False
    try:
        return sibling.lstat().st_mtime < run_started
    except FileNotFoundError:
        return False


# ------------------------------------------------------------------ one writer per run


def run_dir_of(path: str | os.PathLike) -> Path | None:
    """The run directory an output path lies in: the nearest folder above it that holds a run lock
    or a data store (or will: ``path`` is that data store). None outside any run."""
    path = Path(path).absolute()
    for folder in path.parents:
        if (folder / RUN_LOCK).exists() or (folder / DATA_STORE).exists() or path == folder / DATA_STORE:
            return folder
    return None


def _process_exists(pid: int) -> bool:
    """Whether a process runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    stat = _proc_stat(pid)
    return stat is None or stat[0] != "Z"


def _process_start(pid: int) -> str | None:
    """The start time of a process (clock ticks after boot; tells a live holder from a reused
    pid), or None where /proc does not say."""
    stat = _proc_stat(pid)
    return stat[19] if stat else None  # field 22


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (state, ppid, ...), or None where there is no /proc."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _holder_alive(record: dict) -> bool:
    """Whether the process that holds a lock still runs; a holder on another host counts as alive
    (this host cannot see its processes)."""
    if record.get("host") != socket.gethostname():
        return True
    pid = int(record.get("pid", -1))
    if pid <= 0 or not _process_exists(pid):
        return False
    started = record.get("process_start")
    return started is None or _process_start(pid) in (None, started)


def _read_lock(path: Path) -> dict | None:
    """The lock record at ``path``; None if there is none, {} if it is unreadable."""
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def describe_holder(record: dict) -> str:
    return (
        f"pid {record.get('pid', '?')} on {record.get('host', '?')} since {record.get('started', '?')} "
        f"({record.get('command', '?')})"
    )


_FORCING_FLAGS = ("--forcerun", "-R", "--forceall", "-F", "--force", "-f")


def _forced_rerun_hint(command: str) -> str:
    """What a killed forced Snakemake run leaves: the old outputs of the jobs it was rerunning are
    gone (Snakemake deletes them before a job starts), and a plain run may not notice."""
    words = command.split()
    flags = [
        " ".join(
            [
                word,
                *(
                    words[i + 1 : i + 2]
                    if "=" not in word and i + 1 < len(words) and not words[i + 1].startswith("-")
                    else []
                ),
            ]
        )
        for i, word in enumerate(words)
        if word.split("=")[0] in _FORCING_FLAGS
    ]
    if "snakemake" not in command or not flags:
        return ""
    return (
        f". It was forcing reruns ({', '.join(flags)}); Snakemake deletes a job's outputs before rerunning it, "
        "and a plain run may then say 'Nothing to be done': repeat that command to recreate them"
    )


@contextlib.contextmanager
def _lock_mutex(run_dir: Path) -> Iterator[None]:
    """Serialise changes of a run's lock file between processes: flock on the run folder (a no-op
    on file systems without flock; the lock file itself is then the only guard)."""
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def acquire_run_lock(run_dir: str | os.PathLike, command: str | None = None) -> dict:
    """Make this process the one writer of ``run_dir``; returns the lock record. Pass its
    ``token`` in ``RUN_LOCK_TOKEN`` to the processes that write for this one.

    A lock held by a live process raises ``RunLockedError`` naming it (pid, host, start time,
    command). A lock whose process is gone (on this host) is taken over with a warning.
    """
    run_dir = Path(run_dir).absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / RUN_LOCK
    now = time.time()
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": _dt.datetime.fromtimestamp(now).astimezone().isoformat(timespec="seconds"),
        "started_unix": now,
        "process_start": _process_start(os.getpid()),
        "token": uuid.uuid4().hex,
        "command": command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    with _lock_mutex(run_dir):
        held = _read_lock(path)
        if held == {}:
            raise RunLockedError(
                f"{path}: unreadable run lock; if no process writes {run_dir}, delete this file"
            )
        if held is not None:
            if _holder_alive(held):
                raise RunLockedError(
                    f"{run_dir}: this run is being written by {describe_holder(held)}; wait for it "
                    f"or stop it (if that process is gone, delete {path})"
                )
            log.warning(
                "%s: taking over the run lock of %s, which is gone (killed?)%s",
                run_dir,
                describe_holder(held),
                _forced_rerun_hint(str(held.get("command", ""))),
            )
        tmp = temporary_path(path)
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)
    return record


def release_run_lock(run_dir: str | os.PathLike, token: str) -> None:
    """Remove the run's lock if it is the one with ``token`` (never another writer's)."""
    run_dir = Path(run_dir).absolute()
    if not run_dir.is_dir():
        return
    with _lock_mutex(run_dir):
        held = _read_lock(run_dir / RUN_LOCK)
        if held and held.get("token") == token:
            (run_dir / RUN_LOCK).unlink(missing_ok=True)


@contextlib.contextmanager
def run_writer(outputs: Iterable[str | os.PathLike], command: str | None = None) -> Iterator[None]:
    """Hold the lock of every run directory that ``outputs`` lie in while the block runs.

    A process started by the lock's holder (its token in ``RUN_LOCK_TOKEN``: a workflow's jobs)
    writes under that lock and takes none itself.
    """
    token = os.environ.get(RUN_LOCK_TOKEN)
    taken = []
    try:
        for run_dir in sorted({d for d in map(run_dir_of, outputs) if d is not None}):
            held = _read_lock(run_dir / RUN_LOCK)
            if token and (held is None or held.get("token") == token):
                continue  # a job of the holder (whose lock may have been deleted): never lock out its siblings
            taken.append((run_dir, acquire_run_lock(run_dir, command)["token"]))
        yield
    finally:
        for run_dir, own in taken:
            release_run_lock(run_dir, own)


def store_bytes(path: str | os.PathLike) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _where(group: zarr.Group) -> str:
    return str(getattr(group.store, "root", group.store))


class RunLayout:
    """Where each stage's output lives inside ``<results>/<run>/``: the only place that makes a file
    name of a run. Snakemake rules (with wildcards such as ``round_model("{r}")``), inspection, the
    report and the benchmarks all take their paths, and find what exists, through it."""

    def __init__(self, run_dir: str | os.PathLike):
        self.root = Path(run_dir)

    # foundation
    synthetic = property(lambda self: self.root / "synthetic")  # generated dataset folder
    data = property(lambda self: self.root / DATA_STORE)
    gt = property(lambda self: self.root / "gt.zarr")
    superpixels = property(lambda self: self.root / "superpixels.zarr")
    metrics_dir = property(lambda self: self.root / "metrics")
    metrics = property(lambda self: self.root / "metrics.csv")
    # CAM / SPN
    cam_dir = property(lambda self: self.root / "cam")
    cam_model = property(lambda self: self.root / "cam" / "model.pt")
    scores = property(lambda self: self.root / "cam" / "scores.zarr")  # keys cam, spcam
    # pseudo-labels
    cleaned = property(lambda self: self.root / "pseudo" / "cleaned.zarr")
    crf = property(lambda self: self.root / "pseudo" / "crf.zarr")
    reliable = property(lambda self: self.root / "pseudo" / "reliable.zarr")
    reliability = property(lambda self: self.root / "pseudo" / "reliability.csv")
    reliability_curve = property(lambda self: self.root / "pseudo" / "reliability_curve.csv")
    # report and run records
    report_dir = property(lambda self: self.root / "report")
    report_page = property(lambda self: self.root / "report" / "index.html")
    resolved_config = property(lambda self: self.root / "config.resolved.yaml")  # the run's full config
    logs_dir = property(lambda self: self.root / "logs")
    benchmarks_dir = property(lambda self: self.root / "benchmarks")  # Snakemake's per-job timings (TSV)
    inspect_dir = property(lambda self: self.root / "inspect")

    def pseudo(self, name: str) -> Path:
        """The labels store of a pseudo-label variant: cleaned, crf or reliable."""
        return {"cleaned": self.cleaned, "crf": self.crf, "reliable": self.reliable}[name]

    def gated(self, key: str, split: str) -> Path:
        """Labels of the CAM network used as a segmenter (score key cam or spcam) on ``split``."""
        return self.cam_dir / f"{key}_gated_{split}.zarr"

    def found_gated(self) -> list[tuple[str, str, Path]]:
        """(key, split, path) of the gated stores present."""
        if not self.cam_dir.is_dir():
            return []
        found = (p.stem.partition("_gated_") for p in sorted(self.cam_dir.glob("*_gated_*.zarr")))
        return [(key, split, self.gated(key, split)) for key, _, split in found]

    def train_log(self, r: int | str | None = None) -> Path:
        """The training log of the CAM network (``r`` None) or of round ``r``."""
        return (self.cam_dir if r is None else self.round_dir(r)) / "train_log.csv"

    # segmentation rounds; ``r`` and ``split`` may be Snakemake wildcards ("{r}", "{split}")
    def round_dir(self, r: int | str) -> Path:
        return self.root / f"round{r}"

    def round_model(self, r: int | str) -> Path:
        return self.round_dir(r) / "model.pt"

    def round_scores(self, r: int | str, split: str) -> Path:
        """Segmentation-net class probabilities (key 'seg'): train images or val images."""
        return self.round_dir(r) / f"scores_{split}.zarr"

    def round_labels(self, r: int | str, variant: str, split: str) -> Path:
        """A round's labels store: ``variant`` (one of ``ROUND_LABEL_VARIANTS``) of ``split``'s images."""
        return self.round_dir(r) / f"{variant}_{split}.zarr"

    def round_reliability(self, r: int | str) -> Path:
        return self.round_dir(r) / "reliability.csv"

    def round_numbers(self) -> list[int]:
        """The rounds that have a folder, in order."""
        if not self.root.is_dir():
            return []
        found = (re.fullmatch(r"round(\d+)", p.name) for p in self.root.iterdir() if p.is_dir())
        return sorted(int(m.group(1)) for m in found if m)

    def found_round_labels(self, r: int) -> list[tuple[str, str, Path]]:
        """(variant, split, path) of round ``r``'s labels stores present."""
        if not self.round_dir(r).is_dir():
            return []
        found = (
            re.fullmatch(rf"({'|'.join(ROUND_LABEL_VARIANTS)})_(.+)", p.stem)
            for p in sorted(self.round_dir(r).glob("*.zarr"))
        )
        return [(m.group(1), m.group(2), self.round_labels(r, m.group(1), m.group(2))) for m in found if m]

    # metrics, logs and timings of the rules
    def metrics_csv(self, stage: str, split: str) -> Path:
        """Tidy metric rows of a stage on a split."""
        return self.metrics_dir / f"{stage}_{split}.csv"

    def per_image_csv(self, stage: str, split: str) -> Path:
        return self.metrics_dir / f"{stage}_{split}_per_image.csv"

    def sweep_csv(self, stage: str, split: str) -> Path:
        """mIoU against the background threshold (score-map stages with a background class)."""
        return self.metrics_dir / f"{stage}_{split}_sweep.csv"

    def found_metric_files(self, suffix: str) -> list[tuple[str, Path]]:
        """(``<stage>_<split>``, path) of the metrics files ending in ``suffix`` (``_per_image.csv``, ...)."""
        if not self.metrics_dir.is_dir():
            return []
        return [(p.name[: -len(suffix)], p) for p in sorted(self.metrics_dir.glob(f"*{suffix}"))]

    def log(self, job: str) -> Path:
        return self.logs_dir / f"{job}.log"

    def benchmark(self, job: str) -> Path:
        """Snakemake's timing of a job (seconds, max RSS)."""
        return self.benchmarks_dir / f"{job}.tsv"

    def found_benchmarks(self) -> dict[str, Path]:
        """{job: its timing file}, in the order the jobs finished."""
        if not self.benchmarks_dir.is_dir():
            return {}
        paths = sorted(self.benchmarks_dir.glob("*.tsv"), key=lambda p: p.stat().st_mtime)
        return {p.stem: p for p in paths}

    def shard_store(self, final: str | os.PathLike, shard: int | str, n_shards: int) -> Path:
        """Where one shard of a per-image stage writes; with one shard, the stage store itself."""
        final = Path(final)
        if n_shards == 1:
            return final
        return final.parent / "shards" / f"{final.stem}-{shard}.zarr"


def run_gather(kind: str, out_path, shard_stores) -> None:
    gather(shard_stores, out_path, kind, provenance(f"gather:{kind}"))


COMMAND = Command(
    "gather",
    "merge shard stores (disjoint images) into one finished store",
    run_gather,
    (
        option("--kind", required=True, help="store kind: superpixels, scores or labels"),
        output("out_path", "output store (.zarr)"),
        option("shard_stores", nargs="+", help="the shard stores to merge"),
    ),
    writes=("out_path",),
)
