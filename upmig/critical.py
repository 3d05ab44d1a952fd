"""Critical sections against signals to upmig itself.

SIGTERM, SIGHUP and SIGINT make upmig unwind through its cleanup (see cli.py).
Some steps must not be cut in half — putting a frozen process's registers back,
committing an image — so inside `deferred()` those signals wait, and act (or,
with drain=True, are dropped as too late) when the block is done."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

STOP_SIGNALS = {signal.SIGTERM, signal.SIGHUP, signal.SIGINT}


@contextmanager
def deferred(drain: bool = False) -> Iterator[None]:
    old = signal.pthread_sigmask(signal.SIG_BLOCK, [])  # read first: blocking may raise
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        if drain:
            while signal.sigtimedwait(STOP_SIGNALS, 0) is not None:
                pass
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
