"""What an image holds, as a dict (for --json) and as readable text."""

from __future__ import annotations

import errno
import time

from upmig import fileid, image, keys, regs, signals, syscalls
from upmig.errors import KeyProblem
from upmig.fds import registry
from upmig.fds.base import ById
from upmig.kconst import SHM_DEST, SS_DISABLE
from upmig.records import (
    MM,
    Fd,
    FileIdentity,
    Ghost,
    Header,
    MappedFile,
    Process,
    Signals,
    SysvSem,
    SysvShm,
    Task,
    Thread,
    Vma,
)

SHOWN_REGS = ("rip", "rsp", "rbp", "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10",
              "r11", "r12", "r13", "r14", "r15", "orig_rax", "eflags", "fs_base", "gs_base")


def summary(path: str, key_file: str | None = None) -> dict:
    img = image.load(path)
    try:
        return {**_summary(img), "seal": _seal(img, key_file)}
    finally:
        img.close()


def _seal(img: image.Image, key_file: str | None) -> dict:
    """Whether this user's key sealed the image (any image can be inspected)."""
    key_id = image.HEADER.unpack_from(img.data, 0)[3].hex()
    try:
        key = keys.load(key_file)
    except KeyProblem as e:
        return {"key_id": key_id, "sealed_by_my_key": None, "why": str(e)}
    return {"key_id": key_id, "key": key.path, "sealed_by_my_key": image.sealed_by(img, key)}


def _summary(img: image.Image) -> dict:
    head: Header = img.one(Header)
    procs = [_process(sec) for sec in img.processes() if not sec.process.zombie]
    return {
        "image": img.path,
        "image_bytes": img.size,
        "created": head.created,
        "source": {"host": head.hostname, "kernel": head.kernel, "arch": head.arch,
                   "upmig": head.upmig_version},
        "tree": [{"pid": p.pid, "ppid": p.ppid, "pgid": p.pgid, "sid": p.sid, "comm": p.comm,
                  **({"zombie": True, "exit_status": p.exit_status} if p.zombie else {})}
                 for p in img.of(Process)],
        **procs[0],           # the root's, at the top for a single process
        "processes": procs,   # every live process's, root first
        "ghosts": _ghosts(img),
        "sysv": {"shm": [{"id": g.id, "key": g.key, "size": g.size, "mode": f"{g.mode:o}",
                          "removed": bool(g.mode & SHM_DEST)} for g in img.of(SysvShm)],
                 "sem": [{"id": m.id, "key": m.key, "mode": f"{m.mode:o}", "values": m.values}
                         for m in img.of(SysvSem)]},
        "records": len(img.records),
    }


def _ghosts(img: image.Image) -> list[dict]:
    """Every file whose bytes travel in the image, once, with who holds it."""
    stored: dict[str, int] = {}
    for pd in img.pages:
        if pd.target:
            stored[pd.target] = stored.get(pd.target, 0) + sum(n for _, n in pd.chunks)
    out: dict[int, dict] = {}
    for sec in img.processes():
        for g in sec.of(Ghost):
            entry = out.setdefault(g.id, {
                "type": g.type, "path": g.path or "(shared anonymous memory)", "size": g.size,
                "stored": stored.get(f"ghost:{g.id}", 0), "held_by": []})
            entry["held_by"].append(sec.process.pid)
    return list(out.values())


def _process(img: image.Records) -> dict:
    tsk: Task = img.one(Task)
    mm: MM = img.one(MM)
    vmas: list[Vma] = img.of(Vma)
    ids = {i.fd: _identity(i) for i in img.of(FileIdentity)}
    return {
        "process": {"pid": tsk.pid, "comm": tsk.comm, "cmdline": tsk.cmdline, "exe": tsk.exe,
                    "cwd": tsk.cwd, **({"cwd_identity": ids[-1]} if -1 in ids else {}),
                    "uid": tsk.uids[0], "gid": tsk.gids[0],
                    "umask": f"{tsk.umask:04o}", "session_leader": tsk.session_leader,
                    "brk": mm.brk},
        "privileges": _privileges(tsk),
        "threads": [_thread(th) for th in img.of(Thread)],
        "vmas": [{"start": v.start, "end": v.end, "perms": v.perms, "size": v.end - v.start,
                  "stored": v.data_bytes, "what": v.path or _unnamed(v)} for v in vmas],
        "mapped_files": [{"path": f.path, "size": f.size,
                          "build_id": f.build_id or None} for f in img.of(MappedFile)],
        "fds": _fds(img, ids),
        "signals": signals.describe(img.one(Signals)),
        "totals": {"vmas": len(vmas), "mapped_bytes": sum(v.end - v.start for v in vmas),
                   "stored_bytes": sum(v.data_bytes for v in vmas),
                   "same_as_parent_bytes": sum(v.cow_bytes for v in vmas),
                   "records": len(img.records)},
    }


ID_NAMES = ("real", "effective", "saved", "fs")
CAP_NAMES = {"CapInh": "inheritable", "CapPrm": "permitted", "CapEff": "effective",
             "CapBnd": "bounding", "CapAmb": "ambient"}
SECCOMP_MODES = {0: "off", 1: "strict", 2: "filter"}


def _privileges(tsk: Task) -> dict:
    """Everything resume will grant the process: an admin must see it all."""
    return {"uids": dict(zip(ID_NAMES, tsk.uids, strict=False)),
            "gids": dict(zip(ID_NAMES, tsk.gids, strict=False)),
            "groups": tsk.groups,
            "capabilities": {CAP_NAMES[k]: f"{v:016x}" for k, v in (tsk.caps or {}).items()
                             if k in CAP_NAMES},
            "no_new_privs": bool(tsk.no_new_privs),
            "seccomp": SECCOMP_MODES.get(tsk.seccomp, str(tsk.seccomp))}


def _identity(i: FileIdentity) -> dict:
    """What a file held by path was at dump, as resume checks it (fileid.Held)."""
    return {"type": fileid.kind(i.mode), "mode": f"{i.mode & 0o7777:04o}", "size": i.size,
            "mtime_ns": i.mtime_ns, "dev": i.dev, "ino": i.ino, "boot": i.boot}


def _unnamed(v: Vma) -> str:
    return "[shared anonymous]" if v.role == "ghost" else f"[{v.role}]"


def _thread(th: Thread) -> dict:
    r = regs.Regs(th.regs)
    sp, flags, size = th.altstack
    return {"tid": th.tid, "comm": th.comm,
            "state": _state(th),
            "blocked": signals.mask_list(th.blocked),
            "pending": sorted(signals.signo(i) for i in th.pending),
            "altstack": None if flags & SS_DISABLE else [sp, size],
            "rseq": th.rseq is not None, "robust_list": th.robust_list is not None,
            "cpus": th.cpus,
            "registers": {n: getattr(r, n) for n in SHOWN_REGS},
            "xsave_bytes": len(th.xsave)}


def _fds(img: image.Records, ids: dict[int, dict]) -> list[dict]:
    """Each fd: its number, what its kind says it is (its handler's describe: "type",
    "path", then what it holds), its flags and offset."""
    others = ById(img)
    out = []
    for f in img.of(Fd):
        said = registry.handler(f).describe(f, others)
        out.append({"fd": f.fd, "type": said.pop("type"), "path": said.pop("path"),
                    "flags": f"{f.flags:o}", "pos": f.pos, "cloexec": f.cloexec,
                    **({"shares": f.shared_with} if f.shared_with >= 0 else {}),
                    **({"identity": ids[f.fd]} if f.fd in ids else {}), **said})
    return out


FD_COMMON = {"fd", "type", "path", "flags", "pos", "cloexec", "shares", "identity"}


def _state(th: Thread) -> str:
    if th.syscall < 0:
        return "running"
    name = f"{syscalls.name(th.syscall)}()"
    if regs.in_syscall(th):
        return f"in {name}"
    res = th.syscall_result
    shown = f"-{errno.errorcode.get(-res, -res)}" if -4096 < res < 0 else str(res)
    return f"returning {shown} from {name}"


def _when(identity: dict) -> str:
    ns = identity["mtime_ns"]
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns // 10**9)) + \
        f".{ns % 10**9:09d}"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render(s: dict) -> str:
    src = s["source"]
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["created"]))
    out = [f"image     {s['image']} ({_size(s['image_bytes'])}, made {created} on {src['host']}, "
           f"kernel {src['kernel']}, upmig {src['upmig']})", _render_seal(s["seal"])]
    if len(s["tree"]) > 1:
        out.append(f"tree      {len(s['tree'])} processes")
        depth = {}
        for t in s["tree"]:
            depth[t["pid"]] = depth.get(t["ppid"], -1) + 1
            dead = f"  zombie, exit status {t['exit_status']:#x}" if t.get("zombie") else ""
            out.append(f"          {'  ' * depth[t['pid']]}pid {t['pid']} {t['comm']!r}  "
                       f"pgid {t['pgid']} sid {t['sid']}{dead}")
    for g in s["ghosts"]:
        out.append(f"shared    {g['type']} {g['path']}: {_size(g['size'])} ({_size(g['stored'])} "
                   f"stored), held by {', '.join(map(str, g['held_by']))}")
    for g in s["sysv"]["shm"]:
        out.append(f"sysv shm  id {g['id']} key {g['key']:#x} mode {g['mode']} "
                   f"{_size(g['size'])}{'  removed' if g['removed'] else ''}")
    for m in s["sysv"]["sem"]:
        out.append(f"sysv sem  id {m['id']} key {m['key']:#x} mode {m['mode']} "
                   f"values {m['values']}")
    for p in s["processes"]:
        out += _render_process(p)
    return "\n".join(out)


def _render_privileges(pv: dict) -> list[str]:
    ids = "  ".join(f"{what} " + "/".join(str(pv[what].get(n, "?")) for n in ID_NAMES)
                    for what in ("uids", "gids"))
    caps = "  ".join(f"{name} {v}" for name, v in pv["capabilities"].items())
    return [f"privs     {ids} (real/effective/saved/fs)  groups "
            f"{','.join(map(str, pv['groups'])) or '-'}",
            f"          caps {caps or '(not recorded)'}",
            f"          no_new_privs {int(pv['no_new_privs'])}  seccomp {pv['seccomp']}"]


def _render_seal(seal: dict) -> str:
    if seal["sealed_by_my_key"] is None:
        return f"seal      key id {seal['key_id']}; not checked ({seal['why']})"
    verdict = "sealed with" if seal["sealed_by_my_key"] else "NOT sealed with"
    return f"seal      key id {seal['key_id']}: {verdict} this user's key {seal['key']}"


def _render_process(s: dict) -> list[str]:
    p = s["process"]
    out = [f"process   pid {p['pid']} {p['comm']!r}: {' '.join(p['cmdline'])}",
           f"          exe {p['exe']}  cwd {p['cwd']}  uid {p['uid']} gid {p['gid']}  "
           f"umask {p['umask']}"]
    out += _render_privileges(s["privileges"])
    out.append(f"threads   {len(s['threads'])}")
    for i, t in enumerate(s["threads"]):
        r = t["registers"]
        extra = "".join(f"  {k} {t[k]}" for k in ("blocked", "pending") if t[k])
        out.append(f"thread    tid {t['tid']} {t['comm']!r} {t['state']}  rip {r['rip']:#x} "
                   f"rsp {r['rsp']:#x}{extra}")
        if i == 0:  # the leader's registers in full; --json has every thread's
            names = [n for n in SHOWN_REGS if n not in ("rip", "rsp")]
            for j in range(0, len(names), 5):
                out.append("          " + "  ".join(f"{n} {r[n]:#x}" for n in names[j:j + 5]))
            out.append(f"          xsave {t['xsave_bytes']} bytes")
    out.append(f"memory    {s['totals']['vmas']} vmas, {_size(s['totals']['mapped_bytes'])} "
               f"mapped, {_size(s['totals']['stored_bytes'])} stored")
    for v in s["vmas"]:
        out.append(f"          {v['start']:012x}-{v['end']:012x} {v['perms']} "
                   f"{_size(v['size']):>10} {_size(v['stored']) if v['stored'] else '':>10}  "
                   f"{v['what']}")
    out.append(f"fds       {len(s['fds'])}")
    for f in s["fds"]:
        extra = f" (shares fd {f['shares']})" if "shares" in f else ""
        for key, value in f.items():  # what its kind describes it as holding
            if key not in FD_COMMON:
                extra += f"  {key} {value}"
        if f.get("identity", {}).get("type") == "regular file":
            extra += f"  size {f['identity']['size']}  modified {_when(f['identity'])}"
        out.append(f"          {f['fd']:>4} {f['type']:<8} {f['path']}  flags {f['flags']} "
                   f"pos {f['pos']}{' cloexec' if f['cloexec'] else ''}{extra}")
    sig = s["signals"]
    out.append(f"signals   handled {sorted(sig['handled'])}  pending (shared) {sig['pending']}")
    if sig["itimers"]:
        out.append(f"          itimers {sig['itimers']}")
    return out
