"""The command line's choice of allocator: jemalloc preloaded once, never over the user's choice."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from weakseg.allocator import KEEP_FREED_PAGES, LIBRARY, SWITCH, find_jemalloc, preload_environment

JEMALLOC = Path("/opt/lib") / LIBRARY


def test_preload_environment_adds_jemalloc_and_keeps_freed_pages():
    env = preload_environment({"PATH": "/bin", "LD_PRELOAD": "/x/libfoo.so"}, JEMALLOC)
    assert env["LD_PRELOAD"].split() == [str(JEMALLOC), "/x/libfoo.so"]
    assert env["MALLOC_CONF"] == KEEP_FREED_PAGES and env["PATH"] == "/bin"
    # a MALLOC_CONF of the user's is theirs
    assert preload_environment({"MALLOC_CONF": "narenas:1"}, JEMALLOC)["MALLOC_CONF"] == "narenas:1"


@pytest.mark.parametrize(
    "environ",
    [
        {"LD_PRELOAD": str(JEMALLOC)},  # the re-executed process: once is enough
        {"LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4"},  # another allocator the user chose
        {SWITCH: "system"},
    ],
)
def test_preload_environment_leaves_the_process_alone(environ):
    assert preload_environment(environ, JEMALLOC) is None


def test_no_jemalloc_no_change(tmp_path):
    assert find_jemalloc([tmp_path]) is None
    assert preload_environment({}, None) is None
    (tmp_path / LIBRARY).write_bytes(b"")
    assert find_jemalloc([tmp_path / "missing", tmp_path]) == tmp_path / LIBRARY


@pytest.mark.skipif(
    find_jemalloc() is None or not sys.platform.startswith("linux"), reason="no jemalloc here"
)
@pytest.mark.parametrize(("switch", "loaded"), [("", True), ("system", False)])
def test_the_process_reexecutes_itself_on_jemalloc(switch, loaded):
    code = (
        "from weakseg.allocator import reexecute_on_jemalloc; reexecute_on_jemalloc(); "
        "print('jemalloc' in open('/proc/self/maps').read())"
    )
    env = {"PATH": "/usr/bin:/bin", SWITCH: switch, **({"PYTHONPATH": p} if (p := _pythonpath()) else {})}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(loaded)


def _pythonpath() -> str:
    import weakseg

    return str(Path(weakseg.__file__).parents[1])
