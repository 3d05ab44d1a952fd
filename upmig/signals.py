"""Signal state the threads share: dispositions, the shared pending queue, itimers.
(Each thread's mask, private queue and altstack are in upmig.threads.)

Dispositions and itimers are only visible from inside, so dump reads them by
injected syscalls; restore sets them the same way."""

from __future__ import annotations

import signal
import struct

from upmig import _native as nat
from upmig import _proc
from upmig.inject import Session
from upmig.kconst import NSIG
from upmig.records import Signals
from upmig.syscalls import nr

KSIGACTION = struct.Struct("<QQQQ")   # handler, flags, restorer, mask
STACK_T = struct.Struct("<QiiQ")      # ss_sp, ss_flags, pad, ss_size
ITIMERVAL = struct.Struct("<qqqq")    # interval {sec, usec}, value {sec, usec}
ITIMERS = (signal.ITIMER_REAL, signal.ITIMER_VIRTUAL, signal.ITIMER_PROF)


def capture(s: Session, pid: int) -> Signals:
    """Only the signals /proc says are caught or ignored are asked for (and SIGCHLD,
    whose SA_NOCLDSTOP counts even at SIG_DFL): a default disposition's flags and
    mask do nothing, and every query is a round trip into the process."""
    buf = s.scratch
    status = _proc.parse_status(_proc.read_text(pid, "status"))
    chosen = int(status["SigCgt"], 16) | int(status["SigIgn"], 16) | 1 << (signal.SIGCHLD - 1)
    sigs = [sig for sig in range(1, NSIG + 1) if chosen >> (sig - 1) & 1]
    for sig in sigs:
        s.call(nr.rt_sigaction, sig, 0, buf + (sig - 1) * KSIGACTION.size, 8,
               what=f"rt_sigaction({sig})")
    raw = s.read(buf, NSIG * KSIGACTION.size)
    actions = [[sig, *KSIGACTION.unpack_from(raw, (sig - 1) * KSIGACTION.size)]
               for sig in sigs]
    itimers = []
    for which in ITIMERS:
        s.call(nr.getitimer, which, buf, what="getitimer")
        itimers.append([which, *ITIMERVAL.unpack(s.read(buf, ITIMERVAL.size))])
    # Pending signals last: an itimer that fires meanwhile is then seen as pending.
    return Signals(actions=actions, pending_shared=nat.peek_siginfo(pid, shared=True),
                   itimers=itimers)


def restore(s: Session, tgid: int, rec: Signals) -> None:
    """From inside the leader; tgid is the process's id as it sees itself. A signal
    not in the record keeps the new process's default."""
    buf = s.scratch
    for sig, handler, flags, restorer, mask in rec.actions:
        if sig in (signal.SIGKILL, signal.SIGSTOP) or not (handler or flags or mask):
            continue
        s.write(buf, KSIGACTION.pack(handler, flags, restorer, mask))
        s.call(nr.rt_sigaction, sig, buf, 0, 8, what=f"rt_sigaction({sig})")
    for which, *val in rec.itimers:
        if any(val):
            s.write(buf, ITIMERVAL.pack(*val))
            s.call(nr.setitimer, which, buf, 0, what="setitimer")
    # Re-queued by the leader, as the process sending to itself: only so may a siginfo
    # claim any sender (si_code). Every signal is blocked while we work.
    for info in rec.pending_shared:
        s.write(buf, info)
        s.call(nr.rt_sigqueueinfo, tgid, signo(info), buf, what="rt_sigqueueinfo")


def signo(info: bytes) -> int:
    return struct.unpack_from("<i", info, 0)[0]


def describe(rec: Signals) -> dict:
    """For inspect: the non-default dispositions, shared pending signals and itimers."""
    handled = {sig: ("ignore" if h == 1 else f"handler {h:#x}")
               for sig, h, *_ in rec.actions if h != 0}
    return {
        "handled": handled,
        "pending": sorted(signo(i) for i in rec.pending_shared),
        "itimers": [t for t in rec.itimers if any(t[1:])],
    }


def mask_list(mask: int) -> list[int]:
    return [s for s in range(1, NSIG + 1) if mask >> (s - 1) & 1]
