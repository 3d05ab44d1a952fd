"""Signal state: dispositions, blocked mask, pending queues, alternate stack, itimers.

Dispositions, the altstack and itimers are only visible from inside, so dump reads
them by injected syscalls; restore sets them the same way."""

from __future__ import annotations

import struct

from upmig import _native as nat
from upmig.inject import Session
from upmig.records import Signals
from upmig.syscalls import nr

SIGKILL, SIGSTOP, NSIG = 9, 19, 64
KSIGACTION = struct.Struct("<QQQQ")   # handler, flags, restorer, mask
STACK_T = struct.Struct("<QiiQ")      # ss_sp, ss_flags, pad, ss_size
ITIMERVAL = struct.Struct("<qqqq")    # interval {sec, usec}, value {sec, usec}
ITIMERS = (0, 1, 2)                   # ITIMER_REAL, ITIMER_VIRTUAL, ITIMER_PROF
SS_DISABLE, SS_ONSTACK = 2, 1


def capture(s: Session, tid: int, blocked: int) -> Signals:
    """blocked: the thread's mask as it was before injection blocked everything."""
    buf = s.scratch
    for sig in range(1, NSIG + 1):
        s.call(nr.rt_sigaction, sig, 0, buf + (sig - 1) * KSIGACTION.size, 8,
               what=f"rt_sigaction({sig})")
    raw = s.read(buf, NSIG * KSIGACTION.size)
    actions = [[sig, *KSIGACTION.unpack_from(raw, (sig - 1) * KSIGACTION.size)]
               for sig in range(1, NSIG + 1)]
    s.call(nr.sigaltstack, 0, buf, what="sigaltstack")
    sp, flags, _, size = STACK_T.unpack(s.read(buf, STACK_T.size))
    itimers = []
    for which in ITIMERS:
        s.call(nr.getitimer, which, buf, what="getitimer")
        itimers.append([which, *ITIMERVAL.unpack(s.read(buf, ITIMERVAL.size))])
    # Pending signals last: an itimer that fires meanwhile is then seen as pending.
    return Signals(actions=actions, blocked=blocked,
                   pending_private=nat.peek_siginfo(tid, shared=False),
                   pending_shared=nat.peek_siginfo(tid, shared=True),
                   altstack=[sp, flags & ~SS_ONSTACK, size], itimers=itimers)


def restore(s: Session, pid: int, rec: Signals) -> None:
    """Everything but the blocked mask, which the caller sets last (via ptrace)."""
    buf = s.scratch
    for sig, handler, flags, restorer, mask in rec.actions:
        if sig in (SIGKILL, SIGSTOP):
            continue
        s.write(buf, KSIGACTION.pack(handler, flags, restorer, mask))
        s.call(nr.rt_sigaction, sig, buf, 0, 8, what=f"rt_sigaction({sig})")
    sp, flags, size = rec.altstack
    if not flags & SS_DISABLE:
        s.write(buf, STACK_T.pack(sp, flags, 0, size))
        s.call(nr.sigaltstack, buf, 0, what="sigaltstack")
    for which, *val in rec.itimers:
        if any(val):
            s.write(buf, ITIMERVAL.pack(*val))
            s.call(nr.setitimer, which, buf, 0, what="setitimer")
    # Re-queue pending signals as the process sending to itself, which may use any
    # si_code; all signals are blocked during injection, so none is delivered yet.
    for info in rec.pending_shared:
        s.write(buf, info)
        s.call(nr.rt_sigqueueinfo, pid, _signo(info), buf, what="rt_sigqueueinfo")
    for info in rec.pending_private:
        s.write(buf, info)
        s.call(nr.rt_tgsigqueueinfo, pid, pid, _signo(info), buf, what="rt_tgsigqueueinfo")


def _signo(info: bytes) -> int:
    return struct.unpack_from("<i", info, 0)[0]


def describe(rec: Signals) -> dict:
    """For inspect: the non-default dispositions, masks and pending signals by number."""
    handled = {sig: ("ignore" if h == 1 else f"handler {h:#x}")
               for sig, h, *_ in rec.actions if h != 0}
    return {
        "handled": handled,
        "blocked": [s for s in range(1, NSIG + 1) if rec.blocked >> (s - 1) & 1],
        "pending": sorted(_signo(i) for i in rec.pending_private + rec.pending_shared),
        "altstack": None if rec.altstack[1] & SS_DISABLE else rec.altstack,
        "itimers": [t for t in rec.itimers if any(t[1:])],
    }
