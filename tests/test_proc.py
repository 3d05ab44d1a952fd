"""Unit tests of the pure pieces: the /proc parsers (on literal /proc text), the
syscall-restart fix-up of registers, the ELF build-id reader and free_gap."""

from __future__ import annotations

import io
import os
import re
import shutil
import struct
import subprocess

import pytest

from upmig import _proc, fileid, memmap, regs
from upmig.errors import NoSuchProcess
from upmig.records import Vma

pytestmark = pytest.mark.pure


def _lines(*lines: str) -> str:
    """/proc text from its lines (kept as a tuple so trailing blanks stay visible)."""
    return "".join(line + "\n" for line in lines)


# ---- /proc/PID/maps

MAPS = _lines(
    "55e5088b1000-55e5088b3000 r--p 00000000 fe:00 260131                     /usr/bin/cat",
    "55e5088b3000-55e5088b8000 r-xp 00002000 fe:00 260131                     /usr/bin/cat",
    "55e5311ab000-55e5311cc000 rw-p 00000000 00:00 0                          [heap]",
    "7f9ba6f4d000-7f9ba7011000 rw-p 00000000 00:00 0 ",
    "7f9ba7257000-7f9ba725e000 r--s 00000000 fe:00 338846                     "
    "/usr/lib/x86_64-linux-gnu/gconv/gconv-modules.cache",
    "7f9ba7260000-7f9ba7261000 rw-s 00000000 00:01 1031                       /dev/zero (deleted)",
    "7f9ba7261000-7f9ba7265000 r--p 00000000 00:00 0                          [vvar]",
    "7f9ba7265000-7f9ba7267000 r--p 00000000 00:00 0                          [vvar_vclock]",
    "7f9ba7267000-7f9ba7269000 r-xp 00000000 00:00 0                          [vdso]",
    "7f9ba7270000-7f9ba7271000 r--p 00003000 fe:00 2148614                    "
    "/tmp/old file.bin (deleted)",
    "7f9ba7280000-7f9ba7281000 rw-p 00000000 00:00 0                          [anon:my arena]",
    "7ffd1c2f0000-7ffd1c311000 rw-p 00000000 00:00 0                          [stack]",
    "ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]",
)


def test_parse_maps_fields():
    lines = _proc.parse_maps(MAPS)
    assert len(lines) == 13
    first = lines[0]
    assert (first.start, first.end, first.perms, first.offset, first.dev, first.inode,
            first.path) == (0x55e5088b1000, 0x55e5088b3000, "r--p", 0, "fe:00", 260131,
                            "/usr/bin/cat")
    assert lines[1].offset == 0x2000 and lines[1].perms == "r-xp"
    assert lines[-1].start == 0xffffffffff600000 and lines[-1].perms == "--xp"


def test_parse_maps_paths():
    paths = [m.path for m in _proc.parse_maps(MAPS)]
    assert paths == [
        "/usr/bin/cat", "/usr/bin/cat", "[heap]",
        "",                                   # anonymous: the line ends "0 " with no path
        "/usr/lib/x86_64-linux-gnu/gconv/gconv-modules.cache",
        "/dev/zero (deleted)", "[vvar]", "[vvar_vclock]", "[vdso]",
        "/tmp/old file.bin (deleted)",        # spaces inside the path are kept
        "[anon:my arena]", "[stack]", "[vsyscall]",
    ]
    deleted = _proc.parse_maps(MAPS)[9]
    assert deleted.offset == 0x3000 and deleted.inode == 2148614


def test_parse_maps_empty():
    assert _proc.parse_maps("") == []


@pytest.mark.parametrize("odd", ["\r", "\x0b", "\x0c", "\x1e", "\u2028"])
def test_parse_maps_path_with_line_break_like_chars(odd):
    # Literal text as the kernel prints it for /tmp/we<odd>ird (only "\n" is escaped).
    text = (f"7fabc7e51000-7fabc7e52000 r--s 00000000 fe:00 2148614                    "
            f"/tmp/we{odd}ird\n"
            "7ffd1c2f0000-7ffd1c311000 rw-p 00000000 00:00 0                          [stack]\n")
    lines = _proc.parse_maps(text)
    assert [m.path for m in lines] == [f"/tmp/we{odd}ird", "[stack]"]


# ---- /proc/PID/smaps

SMAPS = _lines(
    "562512859000-56251285b000 r--p 00000000 fe:00 260386                     /usr/bin/head",
    "Size:                  8 kB",
    "KernelPageSize:        4 kB",
    "Rss:                   8 kB",
    "Shared_Clean:          0 kB",
    "THPeligible:           0",
    "VmFlags: rd mr mw me ",
    "7f9ba6f4d000-7f9ba7011000 rw-p 00000000 00:00 0 ",
    "Size:                784 kB",
    "Anonymous:             0 kB",
    "VmFlags: rd wr mr mw me ac dd ",
    "7ffd1c2f0000-7ffd1c311000 rw-p 00000000 00:00 0                          [stack]",
    "Size:                132 kB",
    "VmFlags: rd wr mr mw me gd ac ",
    "ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]",
    "Size:                  4 kB",
    "VmFlags: ex ",
)


def test_parse_smaps_vmflags():
    flags = _proc.parse_smaps_vmflags(SMAPS)
    assert flags == {
        0x562512859000: ["rd", "mr", "mw", "me"],
        0x7f9ba6f4d000: ["rd", "wr", "mr", "mw", "me", "ac", "dd"],
        0x7ffd1c2f0000: ["rd", "wr", "mr", "mw", "me", "gd", "ac"],
        0xffffffffff600000: ["ex"],
    }


def test_parse_smaps_vmflags_ignores_a_flags_line_before_any_vma():
    assert _proc.parse_smaps_vmflags("VmFlags: rd wr\n") == {}


# ---- /proc/PID/stat

def _stat_line(comm: str) -> str:
    return (f"6163 ({comm}) S 6157 6157 4875 0 -1 4194304 100 0 0 0 0 0 0 0 20 0 1 0 89677 "
            "3133440 400 18446744073709551615 94122255724544 94122255744425 140733818175296 "
            "0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0 94122255760432 94122255762048 94122751082496 "
            "140733818178272 140733818178292 140733818178292 140733818179563 0\n")


@pytest.mark.parametrize("comm", ["cat", "a) b (c", "x y", "))", "(", ") S 1 2", "a\nb", ""])
def test_parse_stat_comm_kept_whole(comm):
    st = _proc.parse_stat(_stat_line(comm))
    assert st.pid == 6163
    assert st.comm == comm
    assert st.state == "S"
    assert (st.ppid, st.pgrp, st.session, st.tty_nr, st.tpgid) == (6157, 6157, 4875, 0, -1)
    assert st.num_threads == 1 and st.start_time == 89677
    assert st.start_code == 94122255724544   # the fields capture_mm reads
    assert st.end_code == 94122255744425
    assert st.start_stack == 140733818175296
    assert st.processor == 1
    assert (st.start_data, st.end_data, st.start_brk) == \
        (94122255760432, 94122255762048, 94122751082496)
    assert (st.arg_start, st.arg_end, st.env_start, st.env_end) == \
        (140733818178272, 140733818178292, 140733818178292, 140733818179563)
    assert st.exit_code == 0


def test_parse_stat_of_a_zombie():
    line = _stat_line("gone").replace(" S ", " Z ", 1).rsplit(" ", 1)[0] + " 256\n"
    st = _proc.parse_stat(line)
    assert st.state == "Z" and st.exit_code == 256 and st.comm == "gone"


def test_stat_of_this_process():
    st = _proc.stat(os.getpid())
    assert st.pid == os.getpid() and st.ppid == os.getppid() and st.state == "R"
    assert st.pgrp == os.getpgrp() and st.session == os.getsid(0)
    main = _proc.stat(os.getpid(), os.getpid())
    assert (main.pid, main.comm) == (st.pid, st.comm)


def test_stat_of_no_process():
    with pytest.raises(NoSuchProcess):
        _proc.stat(999999)  # beyond pid_max


# ---- /proc/PID/status

STATUS = _lines(
    "Name:\tcat",
    "Umask:\t0022",
    "State:\tS (sleeping)",
    "Tgid:\t6164",
    "Pid:\t6164",
    "PPid:\t6157",
    "TracerPid:\t0",
    "Uid:\t0\t0\t0\t0",
    "Gid:\t100\t100\t100\t100",
    "Groups:\t ",
    "VmRSS:\t    1764 kB",
    "Threads:\t3",
    "SigBlk:\t0000000000010000",
    "Seccomp:\t0",
    "Cpus_allowed_list:\t0-1",
)


def test_parse_status():
    st = _proc.parse_status(STATUS)
    assert st["Name"] == "cat"
    assert st["State"] == "S (sleeping)"
    assert st["PPid"] == "6157"
    assert st["TracerPid"] == "0"
    assert st["Uid"].split() == ["0", "0", "0", "0"]
    assert st["Gid"].split() == ["100"] * 4
    assert st["Groups"] == ""
    assert st["VmRSS"] == "1764 kB"
    assert st["Threads"] == "3"
    assert st["SigBlk"] == "0000000000010000"
    assert st["Cpus_allowed_list"] == "0-1"   # a value with no colon inside is whole


def test_parse_status_name_with_colon():
    assert _proc.parse_status("Name:\ta:b\n")["Name"] == "a:b"


# ---- /proc/PID/limits

LIMITS = _lines(
    "Limit                     Soft Limit           Hard Limit           Units     ",
    "Max cpu time              unlimited            unlimited            seconds   ",
    "Max file size             unlimited            unlimited            bytes     ",
    "Max data size             unlimited            unlimited            bytes     ",
    "Max stack size            8388608              unlimited            bytes     ",
    "Max core file size        0                    unlimited            bytes     ",
    "Max resident set          unlimited            unlimited            bytes     ",
    "Max processes             96365                96365                processes ",
    "Max open files            1024                 524288               files     ",
    "Max locked memory         8388608              8388608              bytes     ",
    "Max address space         unlimited            unlimited            bytes     ",
    "Max file locks            unlimited            unlimited            locks     ",
    "Max pending signals       96365                96365                signals   ",
    "Max msgqueue size         819200               819200               bytes     ",
    "Max nice priority         0                    0                    ",
    "Max realtime priority     0                    0                    ",
    "Max realtime timeout      unlimited            unlimited            us        ",
)


def test_parse_limits():
    lim = _proc.parse_limits(LIMITS)
    assert set(lim) == set(_proc.LIMIT_NAMES)
    assert lim["Max cpu time"] == [-1, -1]
    assert lim["Max stack size"] == [8388608, -1]
    assert lim["Max core file size"] == [0, -1]
    assert lim["Max open files"] == [1024, 524288]
    assert lim["Max nice priority"] == [0, 0]          # no units column
    assert lim["Max realtime timeout"] == [-1, -1]
    assert all(isinstance(v, int) for pair in lim.values() for v in pair)


def test_limit_names_are_the_rlimit_numbers():
    assert sorted(_proc.LIMIT_NAMES.values()) == list(range(16))
    assert _proc.LIMIT_NAMES["Max open files"] == 7       # RLIMIT_NOFILE
    assert _proc.LIMIT_NAMES["Max stack size"] == 3       # RLIMIT_STACK


def test_parse_limits_skips_unknown_rows():
    text = LIMITS.splitlines()[0] + "\nMax future thing          5                    6\n"
    assert _proc.parse_limits(text) == {}


# ---- /proc/PID/fdinfo/N

def test_parse_fdinfo_regular_file():
    info = _proc.parse_fdinfo("pos:\t113\nflags:\t02100001\nmnt_id:\t25\nino:\t2148614\n")
    assert info == {"pos": "113", "flags": "02100001", "mnt_id": "25", "ino": "2148614"}
    assert int(info["flags"], 8) & 0o2000000        # O_CLOEXEC, as files.capture reads it


def test_parse_fdinfo_first_value_wins_and_odd_lines():
    text = ("pos:\t0\nflags:\t02004002\nmnt_id:\t16\nino:\t1057\n"
            "tfd:        5 events:       19 data:                5  pos:0 ino:41d sdev:f\n"
            "tfd:        6 events:       19 data:                6  pos:0 ino:41e sdev:f\n"
            "no colon here\n")
    info = _proc.parse_fdinfo(text)
    assert info["pos"] == "0"
    assert info["flags"] == "02004002"
    assert info["tfd"].startswith("5 events:")
    assert "no colon here" not in info


# ---- /proc/PID/auxv

def test_parse_auxv():
    pairs = [(33, 0x7ffd1c3f5000), (16, 0x178bfbff), (6, 4096), (3, 0x55e5088b1040),
             (9, 0x55e5088b3a60), (0, 0)]
    raw = b"".join(struct.pack("<QQ", a, b) for a, b in pairs)
    assert _proc.parse_auxv(raw) == pairs


def test_parse_auxv_empty():
    assert _proc.parse_auxv(b"") == []


def test_parse_auxv_of_a_live_process():
    with open("/proc/self/auxv", "rb") as f:
        pairs = _proc.parse_auxv(f.read())
    assert pairs[-1] == (0, 0)
    assert dict(pairs)[6] == 4096          # AT_PAGESZ


# ---- registers: the syscall-restart fix-up

ALL_ONES = 0xFFFFFFFFFFFFFFFF
RIP = 0x7FD5818A9503


def _regs(rax: int, orig_rax: int) -> bytes:
    r = regs.Regs()
    for i, name in enumerate(("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9",
                              "r8", "rcx", "rdx", "rsi", "rdi", "rsp", "fs_base", "gs_base")):
        setattr(r, name, 0x1000 + i)
    r.rax = rax
    r.orig_rax = orig_rax
    r.rip = RIP
    r.eflags = 0x202
    r.cs, r.ss = 0x33, 0x2B
    return bytes(r)


def _fields(raw: bytes) -> dict[str, int]:
    r = regs.Regs(raw)
    return {name: getattr(r, name) for name in r.fields()}


def _check_restore(rax: int, orig: int, want_rax: int, want_rip: int) -> None:
    before = _regs(rax, orig)
    after = regs.for_restore(before)
    assert len(after) == len(before)
    a, b = _fields(after), _fields(before)
    assert a["rax"] == want_rax & ALL_ONES
    assert a["rip"] == want_rip
    assert a["orig_rax"] == ALL_ONES
    changed = {k for k in a if a[k] != b[k]} - {"rax", "rip", "orig_rax"}
    assert not changed, f"for_restore changed {changed}"


@pytest.mark.parametrize("code", [-512, -513, -514])
def test_for_restore_restarts_read(code):
    # read(2) (nr 0) interrupted with -ERESTARTSYS/-ERESTARTNOINTR/-ERESTARTNOHAND:
    # re-executed from scratch: rax = 0 (its number), rip back over `syscall`.
    _check_restore(code, 0, want_rax=0, want_rip=RIP - 2)


def test_for_restore_restartblock_reissues_the_original_call():
    # nanosleep (35) with -ERESTART_RESTARTBLOCK: the original call again, not
    # restart_syscall (its restart block lived in the old kernel).
    _check_restore(-516, 35, want_rax=35, want_rip=RIP - 2)


def test_for_restore_in_restart_syscall_gets_eintr():
    _check_restore(-516, 219, want_rax=-4, want_rip=RIP)
    assert regs.Regs(regs.for_restore(_regs(-516, 219))).rax == 0xFFFFFFFFFFFFFFFC


def test_for_restore_completed_syscall_untouched():
    _check_restore(5, 0, want_rax=5, want_rip=RIP)


def test_for_restore_not_in_a_syscall():
    # orig_rax = -1: not a syscall stop, so an rax that happens to equal -512 is data.
    _check_restore(-512, -1, want_rax=-512, want_rip=RIP)
    _check_restore(0x1234, -1, want_rax=0x1234, want_rip=RIP)


def test_for_restore_other_errors_are_results():
    # -EINTR, -EAGAIN: the syscall finished with an error; nothing to restart.
    _check_restore(-4, 0, want_rax=-4, want_rip=RIP)
    _check_restore(-11, 0, want_rax=-11, want_rip=RIP)


def test_regs_round_trip():
    raw = _regs(-516, 35)
    assert bytes(regs.Regs(raw)) == raw
    assert len(raw) == 27 * 8


# ---- ELF build-ids

def _readelf_build_id(path: str) -> str | None:
    if shutil.which("readelf"):
        out = subprocess.run(["readelf", "-n", path], capture_output=True, text=True).stdout
        m = re.search(r"Build ID:\s*([0-9a-f]+)", out)
        if m:
            return m.group(1)
    if shutil.which("file"):
        out = subprocess.run(["file", "-L", path], capture_output=True, text=True).stdout
        m = re.search(r"BuildID\[\w+\]=([0-9a-f]+)", out)
        if m:
            return m.group(1)
    return None


def test_elf_build_id_of_bin_true():
    with open("/bin/true", "rb") as f:
        got = fileid.elf_build_id(f)
    want = _readelf_build_id("/bin/true")
    if want is not None:
        assert got == want
    else:
        assert re.fullmatch(r"[0-9a-f]{40}", got)


def test_elf_build_id_of_non_elf(tmp_path):
    p = tmp_path / "script.sh"
    p.write_bytes(b"#!/bin/sh\necho hello\n" + b"x" * 200)
    with open(p, "rb") as f:
        assert fileid.elf_build_id(f) == ""
    assert fileid.elf_build_id(io.BytesIO(b"")) == ""
    assert fileid.elf_build_id(io.BytesIO(b"\x7fELF")) == ""


def test_elf_build_id_of_elf32_is_empty():
    head = bytearray(open("/bin/true", "rb").read(64))
    head[4] = 1  # ELFCLASS32
    assert fileid.elf_build_id(io.BytesIO(bytes(head) + b"\0" * 4096)) == ""


def test_elf_build_id_none_without_note(tmp_path):
    data = bytearray(open("/bin/true", "rb").read())
    phoff, = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    for i in range(phnum):  # turn every PT_NOTE into PT_NULL
        at = phoff + i * phentsize
        if struct.unpack_from("<I", data, at)[0] == fileid.PT_NOTE:
            struct.pack_into("<I", data, at, 0)
    assert fileid.elf_build_id(io.BytesIO(bytes(data))) == ""


@pytest.mark.parametrize("cut", [64, 100, 400])
def test_elf_build_id_of_truncated_elf(cut):
    data = open("/bin/true", "rb").read()[:cut]
    assert fileid.elf_build_id(io.BytesIO(data)) == ""


# ---- free_gap

def _vma(start: int, end: int) -> Vma:
    return Vma(start=start, end=end, perms="rw-p", offset=0, path="", role="anon",
               vmflags=["rd", "wr"])


G = 1 << 33
P = 0x1000


def _overlaps(at: int, size: int, vmas: list[Vma]) -> bool:
    return any(v.start < at + size and at < v.end for v in vmas)


@pytest.mark.parametrize("vmas,size,want", [
    ([], P, G),                                                  # nothing mapped
    ([_vma(0x400000, 0x500000)], P, G),                          # all below start
    ([_vma(G - P, G)], P, G),                                    # ends right at start
    ([_vma(G + P, G + 2 * P)], P, G),                            # room just before it
    ([_vma(G + P, G + 2 * P)], 2 * P, G + 2 * P),                # no room before it
    ([_vma(G - P, G + P)], P, G + P),                            # covers start
    ([_vma(G, G + P), _vma(G + P, G + 3 * P)], P, G + 3 * P),    # adjacent run
    ([_vma(G, G + P), _vma(G + 2 * P, G + 3 * P)], P, G + P),    # a one-page hole fits
    ([_vma(G, G + P), _vma(G + 2 * P, G + 3 * P)], 2 * P, G + 3 * P),  # too small a hole
    ([_vma(G + 2 * P, G + 3 * P), _vma(G, G + P)], P, G + P),    # unsorted input
    ([_vma(G + 4 * P, G + 5 * P), _vma(G, G + P), _vma(G + P, G + 2 * P)], 2 * P,
     G + 2 * P),                                                 # hole of exactly size
])
def test_free_gap(vmas, size, want):
    got = memmap.free_gap(vmas, size)
    assert got == want
    assert got >= G and not _overlaps(got, size, vmas)


def test_free_gap_custom_start():
    vmas = [_vma(0x10000, 0x20000), _vma(0x30000, 0x40000)]
    assert memmap.free_gap(vmas, 0x1000, start=0x10000) == 0x20000
    assert memmap.free_gap(vmas, 0x10000, start=0x10000) == 0x20000
    assert memmap.free_gap(vmas, 0x10001, start=0x10000) == 0x40000
    assert memmap.free_gap(vmas, 0x1000, start=0x0) == 0x0
