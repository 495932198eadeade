"""Run the ``weakseg`` process on jemalloc when the machine has it.

On the CPU, PyTorch allocates every large activation and gradient afresh at each step, and glibc's
malloc returns such blocks to the kernel as soon as they are freed: every step then pays page faults
on hundreds of megabytes, which costs more than the arithmetic in the high-resolution layers.
jemalloc, told to keep freed pages (``MALLOC_CONF`` decay -1), hands them back out instead. The
arithmetic is unchanged: training gives bit-identical weights. docs/results.md has what it saves.

The allocator must be chosen before the process starts, so the command line re-executes itself once
with jemalloc in ``LD_PRELOAD``. ``WEAKSEG_ALLOCATOR=system`` keeps the system allocator.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

SWITCH = "WEAKSEG_ALLOCATOR"  # "system": never preload jemalloc
LIBRARY = "libjemalloc.so.2"
# Where Debian/Ubuntu (libjemalloc2), Fedora/RHEL (jemalloc) and conda-forge (jemalloc) install it.
SYSTEM_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib")
# Keep freed pages for reuse rather than returning them to the kernel (the process's peak memory
# stays mapped until it exits, as one training or inference job needs it anyway).
KEEP_FREED_PAGES = "dirty_decay_ms:-1,muzzy_decay_ms:-1"


def find_jemalloc(dirs=None) -> Path | None:
    """The jemalloc shared library of the running environment (``sys.prefix/lib``, for conda) or the
    system, or None."""
    for folder in dirs if dirs is not None else (Path(sys.prefix) / "lib", *SYSTEM_DIRS):
        path = Path(folder) / LIBRARY
        if path.is_file():
            return path
    return None


def preload_environment(environ: Mapping[str, str], library: Path | None) -> dict[str, str] | None:
    """The environment to re-execute with so that ``library`` (jemalloc) is preloaded, or None when
    there is nothing to do: no library, ``WEAKSEG_ALLOCATOR=system``, or an allocator already
    preloaded (jemalloc, which also ends the re-execution after one round even if the loader could
    not preload it, or another one the user chose, such as tcmalloc)."""
    if library is None or environ.get(SWITCH, "") == "system":
        return None
    preloaded = environ.get("LD_PRELOAD", "").replace(":", " ").split()
    if any("malloc" in Path(p).name for p in preloaded):
        return None
    env = dict(environ)
    env["LD_PRELOAD"] = " ".join([str(library), *preloaded])
    env.setdefault("MALLOC_CONF", KEEP_FREED_PAGES)
    return env


def reexecute_on_jemalloc() -> None:
    """Replace this process by the same command line with jemalloc preloaded, when the machine has it
    (Linux only). Call it first thing in the process's entry point: nothing done before it survives."""
    if not sys.platform.startswith("linux"):
        return
    env = preload_environment(os.environ, find_jemalloc())
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
