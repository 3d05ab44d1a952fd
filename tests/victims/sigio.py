"""Self-checking victim: signal-driven I/O. The read end of a pipe to itself has
O_ASYNC, this process as its owner and SIGUSR2 (F_SETSIG) as its signal. Prints
READY; on SIGTERM writes into the pipe and must get SIGUSR2 for it; prints PASS."""

import fcntl
import os
import signal
import sys
import time

F_SETSIG, F_GETSIG = 10, 11
r, w = os.pipe()
fcntl.fcntl(r, fcntl.F_SETOWN, os.getpid())
fcntl.fcntl(r, F_SETSIG, signal.SIGUSR2)
fcntl.fcntl(r, fcntl.F_SETFL, fcntl.fcntl(r, fcntl.F_GETFL) | os.O_ASYNC | os.O_NONBLOCK)
got = []
stop = False
signal.signal(signal.SIGUSR2, lambda *_: got.append("SIGUSR2"))
signal.signal(signal.SIGIO, lambda *_: got.append("SIGIO"))


def on_term(*_):
    global stop
    stop = True


signal.signal(signal.SIGTERM, on_term)
print("READY", flush=True)
while not stop:
    time.sleep(0.02)
if not fcntl.fcntl(r, fcntl.F_GETFL) & os.O_ASYNC:
    print("FAIL: O_ASYNC is off", flush=True)
    sys.exit(1)
if fcntl.fcntl(r, fcntl.F_GETOWN) != os.getpid() or fcntl.fcntl(r, F_GETSIG) != signal.SIGUSR2:
    print("FAIL: owner or signal changed", flush=True)
    sys.exit(1)
os.write(w, b"x")  # the signal is sent in this call; its Python handler runs soon after
end = time.monotonic() + 10
while not got and time.monotonic() < end:
    time.sleep(0.01)  # a poll, with a deadline: any signal interrupts it
if got != ["SIGUSR2"]:
    print(f"FAIL: signals {got}", flush=True)
    sys.exit(1)
print("PASS", flush=True)
