"""The only importer of upmig._helper: typed wrappers that turn -errno into OSError
naming the call, and ptrace constants. Nothing here knows about images or records."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from upmig._helper import ffi, lib
from upmig.errors import call_failed

PAGE = os.sysconf("SC_PAGE_SIZE")
# The image's frame format (helper.h): head and tail (tag) sizes, the frame key's, types.
FRAME_HEAD, FRAME_TAIL, FRAME_KEY = lib.UP_FRAME_HEAD, lib.UP_FRAME_TAIL, lib.UP_FRAME_KEY
FRAME_RECORD, FRAME_DATA = lib.UP_FRAME_RECORD, lib.UP_FRAME_DATA
FRAME_TRAILER = lib.UP_FRAME_TRAILER

# <linux/ptrace.h> requests, named in messages: "ptrace(PTRACE_SEIZE)"
PTRACE_CONT = 7
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_DETACH = 17
PTRACE_SETOPTIONS = 0x4200
PTRACE_GETREGSET = 0x4204
PTRACE_SETREGSET = 0x4205
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_PEEKSIGINFO = 0x4209
PTRACE_GETSIGMASK = 0x420A
PTRACE_SETSIGMASK = 0x420B
PTRACE_GET_RSEQ_CONFIGURATION = 0x420F

REQUEST_NAMES = {value: name for name, value in dict(globals()).items()
                 if name.startswith("PTRACE_")}  # the requests: all there are so far

# <linux/ptrace.h> options, events and flags
PTRACE_O_TRACESYSGOOD = 0x1
PTRACE_O_TRACEFORK = 0x2
PTRACE_O_TRACECLONE = 0x8
PTRACE_O_EXITKILL = 0x100000
PTRACE_EVENT_STOP = 128
PTRACE_PEEKSIGINFO_SHARED = 1

# <elf.h> PTRACE_GETREGSET's note types
NT_X86_XSTATE = 0x202

# <linux/kcmp.h>
KCMP_FILE, KCMP_VM, KCMP_FILES = 0, 1, 2

# PAGEMAP_SCAN page categories (helper.h: linux/fs.h of 6.7+)
PAGE_IS_FILE, PAGE_IS_PRESENT = lib.UP_PAGE_IS_FILE, lib.UP_PAGE_IS_PRESENT
PAGE_IS_SWAPPED, PAGE_IS_PFNZERO = lib.UP_PAGE_IS_SWAPPED, lib.UP_PAGE_IS_PFNZERO

SIGINFO_SIZE = 128


def syscall_number(name: str) -> int | None:
    """The number of syscall name, from the SYS_* constants of <sys/syscall.h>."""
    return getattr(lib, "SYS_" + name, None)


def syscall_numbers() -> dict[str, int]:
    """Every syscall the helper's <sys/syscall.h> knows, by name."""
    return {c[4:]: getattr(lib, c) for c in dir(lib) if c.startswith("SYS_")}


def check(ret: int, call: str, pid: int | None = None) -> int:
    """A helper's return, or for a negative one (-errno) an OSError naming the call
    and the process (errors.call_failed)."""
    if ret < 0:
        raise call_failed(-ret, call, pid)
    return ret


def request_name(req: int) -> str:
    """ptrace(PTRACE_SEIZE), or ptrace(0x4299) for a request without a name here."""
    return f"ptrace({REQUEST_NAMES.get(req, hex(req))})"


def ptrace(req: int, pid: int, addr: int = 0, data: int = 0) -> int:
    out = ffi.new("uint64_t *")
    check(lib.up_ptrace(req, pid, addr, data, out), request_name(req), pid)
    return int(out[0])


def _ptrace_buffer(req: int, pid: int, addr: int, buf) -> None:
    """A ptrace request whose data is a buffer of ours."""
    check(lib.up_ptrace(req, pid, addr, int(ffi.cast("uintptr_t", buf)), ffi.NULL),
          request_name(req), pid)


def waitpid(pid: int, flags: int = 0) -> tuple[int, int]:
    status = ffi.new("int *")
    got = check(lib.up_waitpid(pid, status, flags), "waitpid", pid)
    return got, int(status[0])


REGS_SIZE = ffi.sizeof("struct user_regs_struct")


def new_regs(raw: bytes | None = None):
    """A struct user_regs_struct (fields by name: .rip, .rsp), zeroed or holding raw,
    its bytes as PTRACE_GETREGS gives them. upmig.regs.Regs is the view over it."""
    regs = ffi.new("struct user_regs_struct *")
    if raw is not None:
        if len(raw) != REGS_SIZE:
            raise ValueError(f"registers are {len(raw)} bytes, not {REGS_SIZE}")
        ffi.memmove(regs, raw, REGS_SIZE)
    return regs


def regs_bytes(regs) -> bytes:
    return bytes(ffi.buffer(regs))


def regs_fields() -> list[str]:
    """The names of struct user_regs_struct's fields, in the kernel's order."""
    fields = ffi.typeof("struct user_regs_struct").fields
    return [name for name, f in sorted(fields, key=lambda nf: nf[1].offset)]


def get_regs(pid: int) -> bytes:
    regs = new_regs()
    _ptrace_buffer(PTRACE_GETREGS, pid, 0, regs)
    return regs_bytes(regs)


def set_regs(pid: int, raw: bytes) -> None:
    regs = new_regs(raw)
    _ptrace_buffer(PTRACE_SETREGS, pid, 0, regs)


def get_regset(pid: int, note: int, maxlen: int = 1 << 16) -> bytes:
    buf = ffi.new("char[]", maxlen)
    n = check(lib.up_getregset(pid, note, buf, maxlen), _regset_call(PTRACE_GETREGSET, note),
              pid)
    return bytes(ffi.buffer(buf, n))


def set_regset(pid: int, note: int, data: bytes) -> None:
    check(lib.up_setregset(pid, note, data, len(data)), _regset_call(PTRACE_SETREGSET, note),
          pid)


def _regset_call(req: int, note: int) -> str:
    note_name = "NT_X86_XSTATE" if note == NT_X86_XSTATE else hex(note)
    return f"ptrace({REQUEST_NAMES[req]}, {note_name})"


def get_sigmask(pid: int) -> int:
    buf = ffi.new("uint64_t *")
    _ptrace_buffer(PTRACE_GETSIGMASK, pid, 8, buf)
    return int(buf[0])


def set_sigmask(pid: int, mask: int) -> None:
    buf = ffi.new("uint64_t *", mask)
    _ptrace_buffer(PTRACE_SETSIGMASK, pid, 8, buf)


def get_rseq(tid: int) -> list[int] | None:
    """[area, size, signature] of the thread's rseq registration, or None."""
    buf = ffi.new("uint64_t[3]")
    _ptrace_buffer(PTRACE_GET_RSEQ_CONFIGURATION, tid, 24, buf)
    area, size, sig = int(buf[0]), int(buf[1]) & 0xFFFFFFFF, int(buf[1]) >> 32
    return [area, size, sig] if area else None


def peek_siginfo(pid: int, shared: bool) -> list[bytes]:
    """Every queued siginfo of the private (or shared) queue, without dequeuing."""
    out: list[bytes] = []
    batch = 32
    buf = ffi.new("char[]", SIGINFO_SIZE * batch)
    args = ffi.new("uint64_t[2]")
    while True:
        # struct ptrace_peeksiginfo_args { u64 off; u32 flags; s32 nr; }
        args[0] = len(out)
        args[1] = (PTRACE_PEEKSIGINFO_SHARED if shared else 0) | (batch << 32)
        n = check(lib.up_ptrace(PTRACE_PEEKSIGINFO, pid, int(ffi.cast("uintptr_t", args)),
                                int(ffi.cast("uintptr_t", buf)), ffi.NULL),
                  request_name(PTRACE_PEEKSIGINFO), pid)
        raw = bytes(ffi.buffer(buf, n * SIGINFO_SIZE))
        out += [raw[i * SIGINFO_SIZE:(i + 1) * SIGINFO_SIZE] for i in range(n)]
        if n < batch:
            return out


class Injector:
    """Runs syscalls inside a stopped tracee from a syscall instruction at `gadget`.

    Starts from `base_regs` (rsp and segments kept); the caller restores the real
    registers afterwards."""

    def __init__(self, pid: int, base_regs: bytes, gadget: int):
        self.pid = pid
        self.gadget = gadget
        self.regs = new_regs(base_regs)  # the helper's scratch copy
        self.args = ffi.new("uint64_t[6]")
        self.ret = ffi.new("int64_t *")
        self.held = ffi.new("int *")
        self.held_signals: set[int] = set()  # to send again once the target is put back
        self.clone_msg = ffi.new("uint64_t *")

    def move_to(self, gadget: int) -> None:
        self.gadget = gadget

    def set_stack(self, rsp: int) -> None:
        self.regs.rsp = rsp

    def raw(self, nr: int, *args: int) -> int:
        """The syscall's return value, -errno included; raises only if injection failed."""
        for i in range(6):
            self.args[i] = (args[i] if i < len(args) else 0) & 0xFFFFFFFFFFFFFFFF
        # Every call starts at the gadget: the registers the last one left behind
        # point past it, and an exception may have come between two calls.
        self.regs.rip = self.gadget
        self.held[0] = 0
        self.clone_msg[0] = 0
        rc = lib.up_inject(self.pid, self.regs, nr, self.args, self.ret, self.held,
                           self.clone_msg)
        if self.held[0]:
            self.held_signals.add(int(self.held[0]))
        check(rc, _injected(nr), self.pid)
        return int(self.ret[0])

    def cloned(self) -> int:
        """The id, as upmig sees it, of the thread or process the last injected clone
        made."""
        return int(self.clone_msg[0])

    def call(self, nr: int, *args: int, what: str = "") -> int:
        """Like raw() but a -errno result raises OSError naming the syscall."""
        r = self.raw(nr, *args)
        if -4096 < r < 0:
            raise call_failed(-r, _injected(nr, what), self.pid)
        return r


def _injected(nr: int, what: str = "") -> str:
    """How a syscall injected into a process is named: "injected mmap(scratch)"."""
    from upmig import syscalls  # its table is needed only for a message

    return f"injected {what or syscalls.name(nr)}"


@dataclass
class CopyStats:
    """What a page copy moved: payload bytes and the frames they went out in."""

    bytes: int
    frames: int


def new_ranges(ranges: list[tuple[int, int]]):
    arr = ffi.new("struct up_range[]", max(1, len(ranges)))
    for i, (s, e) in enumerate(ranges):
        arr[i].start = s
        arr[i].end = e
    return arr


def pagemap_scan(fd: int, start: int, end: int, required: int, inverted: int, anyof: int
                 ) -> list[tuple[int, int]]:
    """The ranges of [start, end) whose pages match the PAGEMAP_SCAN categories."""
    out: list[tuple[int, int]] = []
    cap = 4096
    vec = ffi.new("struct up_range[]", cap)
    walk_end = ffi.new("uint64_t *")
    while start < end:
        n = lib.up_pagemap_scan(fd, start, end, required, inverted, anyof, 0, vec, cap, walk_end)
        if n == -errno.ENOTTY:
            raise call_failed(errno.ENOTTY, "ioctl(PAGEMAP_SCAN)",
                              strerror="this kernel lacks it (Linux 6.7+ needed)")
        check(n, "ioctl(PAGEMAP_SCAN)")
        for i in range(n):
            s, e = int(vec[i].start), int(vec[i].end)
            if out and s < out[-1][1]:  # reported again (see below)
                s = out[-1][1]
                if s >= e:
                    continue
            if out and out[-1][1] == s:
                out[-1] = (out[-1][0], e)
            else:
                out.append((s, e))
        # Linux 6.18 can set walk_end a huge page short of what it walked and reported
        # (a sparse 16 MiB area: runs to its end, walk_end 2 MiB before): go on from
        # whichever is further, or those pages come twice.
        start = max(int(walk_end[0]), out[-1][1] if out else start)
    return out


def same_pages(pagemap_a: int, pagemap_b: int, runs: list[tuple[int, int]]
               ) -> list[tuple[int, int]]:
    """The parts of runs that two processes hold as one physical page."""
    pages = sum(e - s for s, e in runs) // PAGE
    cap = pages // 2 + len(runs) + 1  # ranges cannot outnumber this
    out = ffi.new("struct up_range[]", cap)
    n = check(lib.up_same_pages(pagemap_a, pagemap_b, new_ranges(runs), len(runs), out, cap),
              "comparing two processes' pagemaps")
    return [(int(out[i].start), int(out[i].end)) for i in range(n)]


def copy_same_addresses(src: int, src_mem_fd: int, dst: int, dst_mem_fd: int,
                        runs: list[tuple[int, int]]) -> int:
    """Copy runs from one process to another, at the same addresses (mem_fds: their
    /proc/PID/mem, for pages a protection hides)."""
    return check(lib.up_copy_same_addresses(src, src_mem_fd, dst, dst_mem_fd,
                                            new_ranges(runs), len(runs)),
                 "copying pages from the parent process", dst)


def syscall(nr: int, *args: int | bytearray, what: str) -> int:
    """A syscall made by upmig itself (SysV IPC, which Python lacks), of up to four
    arguments; a bytearray is passed as its address (the call may fill it). Raises
    OSError naming what."""
    held = [ffi.from_buffer(a) if isinstance(a, bytearray) else a for a in args]
    words = [a if isinstance(a, int) else int(ffi.cast("uintptr_t", a)) for a in held]
    return check(lib.up_syscall4(nr, *words, *[0] * (4 - len(words))), what)


def copy_threads(nbytes: int) -> int:
    """Threads for a bulk copy: one per CPU we may use (fresh pages fault in per CPU,
    so two CPUs fill memory about twice as fast), but one for small copies."""
    if nbytes < (16 << 20):
        return 1
    return max(1, min(len(os.sched_getaffinity(0)), 4))


class PageWriter:
    """Streams target memory into an image file as data frames tagged with the
    image's frame key."""

    CHUNK = 1 << 20  # fits in L2 with room: read, tag, write while it is hot
    FAILED = {1: "reading target memory", 2: "writing image", 3: "sealing image"}

    def __init__(self, frame_key: bytes):
        self.stats = ffi.new("struct up_copy_stats *")
        self.key = frame_key

    def dump(self, pid: int, mem_fd: int, runs: list[tuple[int, int]], out_fd: int,
             off: int, stream: bool) -> CopyStats:
        """The frames for runs, sealed for image offset off on: written at off of a
        file, or in order to a stream (pipe, socket)."""
        arr = new_ranges(runs)
        nbytes = sum(e - s for s, e in runs)
        self.stats.bytes = 0
        self.stats.frames = 0
        rc = lib.up_dump_pages(pid, mem_fd, arr, len(runs), out_fd, off, int(stream),
                               self.CHUNK, copy_threads(nbytes), self.key, self.stats)
        if rc < 0:
            failed = self.stats.failed_op
            check(rc, self.FAILED.get(failed, "writing image"), pid if failed == 1 else None)
        return CopyStats(int(self.stats.bytes), int(self.stats.frames))


class StreamedImage:
    """An image read from a stream into memory of our own (up_read_stream): a
    buffer like a mapped file's, unmapped by close()."""

    def __init__(self, fd: int, prefix: bytes, max_payload: int, cap: int,
                 head_in_prefix: bool = False):
        base, size, got = ffi.new("void **"), ffi.new("uint64_t *"), ffi.new("uint64_t *")
        rc = lib.up_read_stream(fd, prefix, len(prefix), int(head_in_prefix), max_payload, cap,
                                base, size, got)
        if base[0] == ffi.NULL:  # nothing was mapped
            check(rc, "reading the image stream")
        self._base, self._size = base[0], int(size[0])
        self.buf = ffi.buffer(ffi.cast("char *", self._base), int(got[0]))
        self.error = -rc  # 0, ENODATA (ended early), EINVAL (bad frame head), EFBIG...
        if rc < 0 and rc not in (-errno.ENODATA, -errno.EINVAL, -errno.EFBIG):
            self.close()
            check(rc, "reading the image stream")

    def close(self) -> None:
        if self._base is not None:
            self.buf = None
            lib.up_unmap(self._base, self._size)
            self._base = None


def fill_from_stream(in_fd: int, pid: int, out_fd: int, runs: list[tuple[int, int]],
                     frame_key: bytes, max_payload: int, first_head: bytes | None,
                     off: int) -> tuple[int, int]:
    """(bytes or -errno, offset reached): the data frames owed to runs read from the
    stream in_fd, each checked, into pid's memory (out_fd -1) or the file out_fd."""
    at = ffi.new("uint64_t *", off)
    rc = lib.up_fill_from_stream(in_fd, pid, out_fd, new_ranges(runs), len(runs), frame_key,
                                 max_payload, first_head if first_head else ffi.NULL, at)
    return int(rc), int(at[0])


def fill_pages(pid: int, mem_fd: int, src: list[tuple[int, int]], dst: list[tuple[int, int]]
               ) -> int:
    """Write local ranges (concatenated) into the target's ranges dst."""
    nbytes = sum(e - s for s, e in dst)
    return check(lib.up_fill_pages(pid, mem_fd, new_ranges(src), len(src), new_ranges(dst),
                                   len(dst), copy_threads(nbytes)), "writing target memory", pid)


def frame_tag(frame_key: bytes, off: int, head: bytes, payload) -> bytes:
    """The tag of the frame at offset off of an image (see upmig.image)."""
    tag = ffi.new("uint8_t[]", FRAME_TAIL)
    check(lib.up_frame_tag(frame_key, off, head, ffi.from_buffer(payload), len(payload), tag),
          "sealing image")
    return bytes(ffi.buffer(tag))


def xxh64(data, seed: int = 0) -> int:
    return int(lib.up_xxh64(ffi.from_buffer(data), len(data), seed))


def buffer_address(buf) -> int:
    """The address of a Python buffer (mmap, bytearray) in this process."""
    return int(ffi.cast("uintptr_t", ffi.from_buffer(buf)))


def verify_frames(buf, start: int, frame_key: bytes | None, max_payload: int,
                  threads: int = 0) -> tuple[int, int]:
    """(frames or -errno, offset reached or of the bad frame): the structure, and with
    a frame key every frame's tag, by threads threads (0: one per CPU we may use)."""
    bad = ffi.new("uint64_t *")
    key = ffi.NULL if frame_key is None else frame_key
    threads = threads or max(1, min(len(os.sched_getaffinity(0)), 4))
    rc = lib.up_verify_frames(ffi.from_buffer(buf), len(buf), start, key, max_payload, threads,
                              bad)
    return int(rc), int(bad[0])


def spawn(path: str, set_tid: int, traceme: bool, flags: int = 0, pass_fd: int = -1) -> int:
    """Start `path` as a child (with PID set_tid if > 0), optionally traced from exec;
    pass_fd becomes its fd 3."""
    path_c = ffi.new("char[]", os.fsencode(path))
    return check(lib.up_spawn(set_tid, path_c, 1 if traceme else 0, flags, pass_fd), "clone3")


def get_robust_list(tid: int) -> list[int] | None:
    """[head, len] of the thread's robust futex list, or None if it has none."""
    head, size = ffi.new("uint64_t *"), ffi.new("uint64_t *")
    check(lib.up_get_robust_list(tid, head, size), "get_robust_list", tid)
    return [int(head[0]), int(size[0])] if head[0] else None


def pidfd_getfd(pidfd: int, fd: int, pid: int) -> int:
    """A copy in upmig of fd of the process behind pidfd (close-on-exec)."""
    return check(lib.up_pidfd_getfd(pidfd, fd), f"pidfd_getfd(fd {fd})", pid)


def copy_fd(pid: int, fd: int) -> int:
    """fd of process pid, copied into upmig (close-on-exec): the same open file
    description, so what is done through the copy is done to the process's own.
    The caller closes it."""
    pidfd = os.pidfd_open(pid)
    try:
        return pidfd_getfd(pidfd, fd, pid)
    finally:
        os.close(pidfd)


@contextmanager
def borrowed_fd(pid: int, fd: int) -> Iterator[int]:
    """copy_fd for the length of a with block."""
    mine = copy_fd(pid, fd)
    try:
        yield mine
    finally:
        os.close(mine)


def pipe_peek(fd: int, cap: int) -> bytes:
    """What is buffered in the pipe whose read end is fd (ours), left in place."""
    buf = ffi.new("char[]", max(cap, 1))
    n = check(lib.up_pipe_peek(fd, buf, cap), "reading a pipe's buffer (tee)")
    return bytes(ffi.buffer(buf, n))


def open_by_handle(mount_fd: int, handle_type: int, handle: bytes, flags: int) -> int:
    return check(lib.up_open_by_handle(mount_fd, handle_type, handle, len(handle), flags),
                 "open_by_handle_at")


def setns(fd: int, nstype: int) -> None:
    check(lib.up_setns(fd, nstype), "setns")


def link_fd(fd: int, path: str) -> None:
    """Name a file opened with O_TMPFILE: it appears at path (which must not exist)."""
    err = lib.up_link_fd(fd, os.fsencode(path))
    if err < 0:
        raise OSError(-err, os.strerror(-err), path)


_KCMP_NAMES = {KCMP_FILE: "KCMP_FILE", KCMP_VM: "KCMP_VM", KCMP_FILES: "KCMP_FILES"}


def kcmp(pid1: int, pid2: int, kind: int, idx1: int = 0, idx2: int = 0) -> int:
    """0 if the kind of object (KCMP_*) of pid1 and of pid2 is one and the same; else
    1 or 2 as the first sorts before or after the second, in an order the kernel
    keeps stable, or 3 if it gives none. Raises OSError (EPERM: one of them may not
    be looked at)."""
    return check(lib.up_kcmp(pid1, pid2, kind, idx1, idx2),
                 f"kcmp({_KCMP_NAMES.get(kind, kind)})", pid1)


def kcmp_file(pid: int, fd1: int, fd2: int) -> bool:
    """True if fd1 and fd2 of pid are the same open file description."""
    return kcmp_file_order(pid, fd1, fd2) == 0


def kcmp_file_order(pid: int, fd1: int, fd2: int, pid2: int = 0) -> int:
    """0 if fd1 of pid and fd2 of pid2 (default: pid) are one open file description;
    else 1 or 2 as the first sorts before or after the second, in an order the kernel
    keeps stable."""
    order = kcmp(pid, pid2 or pid, KCMP_FILE, fd1, fd2)
    if order == 3:
        raise OSError(0, "kcmp gives no order here")
    return order
