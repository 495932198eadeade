"""Worker processes of the per-image stages (weakseg.parallel)."""

from __future__ import annotations

import signal

from weakseg.cli import _exit_on_sigterm
from weakseg.parallel import map_images


def _sigterm_handler_is_default(_item) -> bool:
    return signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_workers_die_on_sigterm_instead_of_unwinding_like_the_command():
    # The command unwinds on SIGTERM (cleanup); its forked workers must not inherit that, or the pool's
    # shutdown (which sends them SIGTERM) can wait forever on a worker stuck in Python's exit path.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        assert (
            list(map_images(_sigterm_handler_is_default, [0, 1, 2, 3], threads=2, desc="test")) == [True] * 4
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
