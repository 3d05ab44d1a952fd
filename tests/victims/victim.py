"""Shared by the python test victims: say READY, wait for the driver's SIGTERM, and
report a failed check as the tests expect (a FAIL line, exit status 1)."""

import signal
import sys
import time


def fail(why: str) -> None:
    print(f"FAIL: {why}", flush=True)
    sys.exit(1)


def ready_then_wait() -> None:
    """Print READY, then sleep until SIGTERM (taken as a request to check and end)."""
    got: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: got.append(1))
    print("READY", flush=True)
    while not got:
        time.sleep(0.02)  # asleep in a syscall, where a process mostly is when dumped
