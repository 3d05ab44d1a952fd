"""The command line: `upmig dump | resume | inspect`. Every expected failure becomes
one stderr line `upmig: ...` and the exit status of its error class.

This module is the program, not a library: importing it makes SIGINT, SIGTERM and
SIGHUP unwind upmig cleanly, and main() returns with them blocked (a signal after
the work is done must not change its outcome). Programs use upmig's API instead."""

from __future__ import annotations

import os
import signal
import sys

from upmig.critical import STOP_SIGNALS
from upmig.errors import Interrupted

_started = False  # main() is running: a signal unwinds through its cleanup
GC_THRESHOLD = 50_000  # new objects between two collections (Python's default: 700)
RESUME_OWN = 200  # resume's own failures: 200 + their status (see own_status)


def _command_of(argv: list[str]) -> str | None:
    """The subcommand: the first word that is not an option (the global options
    take no value)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


_command = _command_of(sys.argv[1:])  # main() says for sure once it has its argv


def own_status(code: int) -> int:
    """The exit status of a failure of upmig's own. resume exits with its process's
    status, so its own failures go where processes seldom go: 200 + the status's
    last two digits (201-209, 230), clear of 0-127 and of the 128+N of a death by
    signal N (N <= 64)."""
    return RESUME_OWN + code % 100 if _command == "resume" else code


def _interrupted(signum, _frame):
    # An exception, not death: the cleanup on the way out (release the frozen
    # process, remove the partial image, kill a half-built one) must run, and
    # run once: more of these signals must not cut it short.
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    if not _started:  # still starting: nothing to undo, and no traceback
        os.write(2, b"upmig: interrupted\n")
        os._exit(own_status(Interrupted.exit_code))
    raise Interrupted(f"interrupted by signal {signum}; nothing was left behind")


# From the first moment: a ^C while Python imports the rest must not print a traceback.
for _signum in STOP_SIGNALS:
    signal.signal(_signum, _interrupted)

import argparse  # noqa: E402 - after the handlers, on purpose
import gc  # noqa: E402
import time  # noqa: E402

from upmig import __version__  # noqa: E402
from upmig.errors import UpmigError, from_oserror  # noqa: E402

EXIT_STATUSES = """exit status (resume: see below):
  0    success
  1    other failure
  2    bad command line
  3    no such process
  4    access denied
  5    the process holds state upmig cannot move
  6    the image is unreadable, truncated, corrupt, too new, or not sealed with this key
  7    rebuilding the process failed (nothing left running)
  8    this machine differs from the source (a file, the vdso)
  9    the key is missing, unreadable or open to other users
  130  interrupted by SIGINT, SIGTERM or SIGHUP: nothing was left behind (after a
       dump's commit the message says the image was written and what became of
       the process)

resume: once the process runs, its own status (128+N if killed by signal N);
before that, a failure of resume's own is 200 + the status above (201-209, 230
interrupted), clear of what processes commonly return. To be sure which it is,
use resume's --status-fd (upmig resume --help).

keys: images are sealed with a keyed hash; resume runs only images its own key
sealed. root's key is /etc/upmig/key, a user's ~/.config/upmig/key (made by the
first dump); --key-file or UPMIG_KEY_FILE name another. Share root's key between
the nodes of a cluster, as munge's is shared.
"""


RESUME_STATUSES = """exit status:
  0    --detach: the process runs
  *    otherwise, once the process runs: its own status (128+N if killed by signal N)
  201  other failure of resume's own
  202  bad command line
  204  access denied (credentials upmig resume cannot grant)
  206  the image is unreadable, truncated, corrupt, too new, or not sealed with this key
  207  rebuilding the process failed (nothing left running)
  208  this machine differs from the source (a file, the vdso, a PID taken)
  209  the key is missing, unreadable or open to other users
  230  interrupted by SIGINT, SIGTERM or SIGHUP before the process ran
A process may exit with these too: a script that must be sure passes --status-fd;
the status is resume's own unless a "running" line came first.

example:
  upmig resume job.upmig
  upmig resume -d job.upmig
  upmig resume --pidns job.upmig   # its PID is taken here
  upmig resume --status-fd 3 job.upmig 3>status.jsonl
  upmig dump 4242 -o - | upmig resume -d -
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="upmig", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Move a running Linux process to another machine: dump it to an image, "
                    "resume the image elsewhere. No cooperation from the process is needed.",
        epilog=EXIT_STATUSES)
    p.add_argument("--version", action="version", version=f"upmig {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("dump", help="write a process tree's image (and kill it, by default)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Freeze PID and all its descendants with ptrace, write "
                                   "their whole state to IMAGE, then kill them (migration). "
                                   "If anything fails, they run on untouched and no image "
                                   "is left.",
                       epilog="example:\n  upmig dump 4242 -o job.upmig\n"
                              "  upmig dump 4242 -o ckpt.upmig --leave-running\n"
                              "  upmig dump 4242 -o server.upmig --tcp-established\n"
                              "  upmig dump 4242 -o - | ssh node2 upmig resume -d -\n\n"
                              "With -o - nothing can be read back: the process is killed "
                              "once the\nlast byte has gone out, and is lost if the reader "
                              "then fails. Use\n--leave-running or --leave-stopped to keep "
                              "it until the move is known to\nhave worked.")
    d.add_argument("pid", type=int, metavar="PID")
    d.add_argument("-o", "--output", required=True, metavar="IMAGE",
                   help="image file to write, or - for standard output (a pipe or socket, "
                        "say into `upmig resume -`; the result line then goes to stderr)")
    leave = d.add_mutually_exclusive_group()
    leave.add_argument("--leave-running", action="store_true",
                       help="let the process go on after the dump (a checkpoint)")
    leave.add_argument("--leave-stopped", action="store_true",
                       help="leave the process stopped (SIGSTOP) after the dump")
    d.add_argument("--ghost-limit", type=_size, metavar="SIZE",
                   help="refuse if a file deleted while open holds more than SIZE bytes "
                        "(suffixes K, M, G; default: no limit), rather than copy it all "
                        "into the image")
    d.add_argument("--tcp-established", action="store_true",
                   help="take established TCP connections along (TCP repair): the peer "
                        "sees nothing, and after resume the same connection goes on. The "
                        "resumed process must keep the same IP address.")
    d.add_argument("--shell-job", action="store_true",
                   help="the processes were started from an interactive shell, whose "
                        "session and terminal stay behind: resume re-attaches them to its "
                        "own terminal")
    d.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    _key_option(d, "the key that seals the image (made if missing)")

    r = sub.add_parser("resume", help="rebuild the process of an image and run it",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Rebuild IMAGE's process on this machine, every thread "
                                   "with its original id (refused if one is taken: programs "
                                   "keep their ids in memory). By default wait for it and "
                                   "exit with its status; its fds 0-2 that were a terminal, "
                                   "pipe or socket become upmig's own.",
                       epilog=RESUME_STATUSES)
    r.add_argument("image", metavar="IMAGE",
                   help="image file, or - to read it from standard input (read whole and "
                        "checked before anything is built)")
    r.add_argument("-d", "--detach", action="store_true",
                   help="print the PID and return at once, leaving the process running")
    r.add_argument("--json", action="store_true",
                   help="print one JSON object on stdout (after it exits, unless --detach)")
    r.add_argument("--status-fd", type=_open_fd, metavar="FD",
                   help="write one JSON line to the open fd FD once the process runs, "
                        "before waiting for it: {\"status\": \"running\", \"pid\": ...} "
                        "(what --json reports); then {\"status\": \"exited\", "
                        "\"exit_status\": N} when it has. A failure of resume's own writes "
                        "{\"status\": \"failed\", \"exit_status\": 207, \"error\": ...} "
                        "instead, and no running line: without one, the exit status is "
                        "upmig's own")
    r.add_argument("--allow-changed-files", action="store_true",
                   help="resume even if a regular file the process holds open has another "
                        "size or modification time than at the dump (say, a log others "
                        "append to): it then reads the file as it is now. A file shorter "
                        "than the process's offset in it, of another type, replaced by "
                        "another file or reached through a symlink is refused all the same")
    ids = r.add_mutually_exclusive_group()
    ids.add_argument("--pidns", action="store_const", dest="pids", const="pidns",
                     default="same",
                     help="run it in a new PID namespace, where its original PID and thread "
                          "ids are free; the namespace ends when the process does")
    ids.add_argument("--new-pids", action="store_const", dest="pids", const="new",
                     help="give it whatever ids are free (glibc's cached thread ids are "
                          "rewritten; a program that kept its PID elsewhere may misbehave)")
    _key_option(r, "the key the image must be sealed with")

    i = sub.add_parser("inspect", help="show what an image holds",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Print an image's process, threads and registers, memory "
                                   "areas with sizes, fds, signals and totals.",
                       epilog="example:\n  upmig inspect job.upmig\n"
                              "  upmig inspect --json job.upmig | jq .totals")
    i.add_argument("image", metavar="IMAGE")
    i.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    _key_option(i, "the key to check the image's seal against")
    return p


def _key_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--key-file", metavar="FILE", default=None,
                   help=f"{what} (default: $UPMIG_KEY_FILE, else /etc/upmig/key for root, "
                        "~/.config/upmig/key for others)")


def _open_fd(text: str) -> int:
    """An fd number upmig has open (it is not passed on to the resumed process)."""
    try:
        fd = int(text)
        os.set_inheritable(fd, False)
    except (ValueError, OSError):
        raise argparse.ArgumentTypeError(f"not an open fd: {text!r}") from None
    return fd


class _StatusFd:
    """resume's --status-fd: one JSON line per event, so that a script can tell its
    process's exit status from a failure of resume's own; a reader gone away
    changes nothing."""

    def __init__(self, fd: int):
        self.fd = fd

    def say(self, status: str, **fields) -> None:
        try:
            os.write(self.fd, (_json({"status": status, **fields}) + "\n").encode())
        except OSError:
            pass


_status: _StatusFd | None = None


def _size(text: str) -> int:
    """A byte count: 4096, 64K, 10M, 2G."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    scale = units.get(text[-1:].upper(), 1)
    digits = text[:-1] if scale > 1 else text
    if not digits.isdigit():
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (say 4096, 64K, 10M, 2G)")
    return int(digits) * scale


class _Progress:
    """A self-erasing status line on a terminal; silent otherwise."""

    def __init__(self, what: str):
        self.on = sys.stderr.isatty()
        self.what = what
        self.total = 0
        self.step = ""

    def __call__(self, step: str, nbytes: int) -> None:
        self.step = step
        if not self.on:
            return
        self.total += nbytes
        mib = f" {self.total / 2**20:.0f} MiB" if self.total else ""
        self._write(f"\r\x1b[K{self.what}: {step}{mib}")

    def done(self) -> None:
        if self.on:
            self._write("\r\x1b[K")

    def _write(self, text: str) -> None:
        try:
            sys.stderr.write(text)
            sys.stderr.flush()
        except OSError:  # a hung-up terminal must not fail a dump that succeeded
            self.on = False


def _dump(a: argparse.Namespace) -> int:
    from upmig.dumper import dump

    leave = "run" if a.leave_running else "stop" if a.leave_stopped else "kill"
    progress = _Progress(f"dumping pid {a.pid}")
    after = {"kill": "killed", "run": "left running", "stop": "left stopped"}[leave]
    try:  # until the stop signals are blocked: one may come as dump() returns
        try:
            res = dump(a.pid, a.output, leave=leave, progress=progress,
                       ghost_limit=a.ghost_limit, tcp_established=a.tcp_established,
                       shell_job=a.shell_job, key_file=a.key_file)
        finally:
            progress.done()
        _too_late_to_stop()
    except Interrupted as e:
        if progress.step == "committed":  # too late to undo: say what was done
            e.why = f"interrupted after the image {a.output} was written; process {after}"
        raise
    out = sys.stderr if a.output == "-" else sys.stdout  # stdout was the image
    if a.json:
        print(_json({**res.__dict__, "process": after}), file=out)
    else:
        tree = (f"{res.processes} processes, " if res.processes > 1 else "")
        where = "stdout" if a.output == "-" else res.image
        print(f"dumped pid {res.pid} to {where}: {res.image_bytes / 2**20:.1f} MiB "
              f"({res.data_bytes / 2**20:.1f} MiB of pages, {tree}{res.threads} thread"
              f"{'s' if res.threads > 1 else ''}, {res.vmas} vmas, {res.fds} fds), "
              f"frozen {res.frozen_seconds * 1000:.0f} ms; "
              f"{'processes' if res.processes > 1 else 'process'} {after}", file=out)
    return 0


def _resume(a: argparse.Namespace) -> int:
    from upmig.restore import resume

    # Once it is about to run, a signal to us is for it (waiting), or too late to
    # undo anything (detached).
    res = resume(a.image, pids=a.pids, notice=_notice,
                 on_ready=(lambda _pid: _too_late_to_stop()) if a.detach else _forward_signals,
                 terminal=not a.detach, key_file=a.key_file,
                 allow_changed_files=a.allow_changed_files)
    # It runs: from here on the exit status is its own, whatever becomes of ours.
    if _status:
        _status.say("running", **res.__dict__)
    if a.detach:
        print(_json(res.__dict__) if a.json else res.pid, flush=True)
        return 0
    status = _wait(res.pid)
    if res.foreground:
        _take_terminal_back()
    if res.pidns_init:  # its namespace's PID 1 follows it, unless orphans live on
        _reap_soon(res.pidns_init, 1.0)
    if _status:
        _status.say("exited", exit_status=status)
    if a.json:
        try:
            print(_json({**res.__dict__, "exit_status": status}), flush=True)
        except OSError:
            os._exit(status)  # our reader went away; the status is still the process's
    return status


def _notice(msg: str) -> None:
    try:
        print(f"upmig: {msg}", file=sys.stderr, flush=True)
    except OSError:
        pass  # only information: a stderr gone must not fail a process that runs


def _forward_signals(pid: int) -> None:
    """From now on SIGTERM and SIGHUP sent to us go to pid; terminal signals
    (SIGINT, SIGQUIT) reach it directly, so we ignore them."""
    def forward(signum, _frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, forward)
    for s in (signal.SIGINT, signal.SIGQUIT):
        signal.signal(s, signal.SIG_IGN)


def _wait(pid: int) -> int:
    """Wait for our resumed child; its exit status as a shell reports it."""
    while True:
        try:
            _, status = os.waitpid(pid, 0)
        except InterruptedError:
            continue
        if os.WIFEXITED(status):
            return os.WEXITSTATUS(status)
        if os.WIFSIGNALED(status):
            return 128 + os.WTERMSIG(status)


def _take_terminal_back() -> None:
    """The foreground group has ended (or stopped): our own group leads again."""
    old = signal.signal(signal.SIGTTOU, signal.SIG_IGN)  # we are in the background
    try:
        os.tcsetpgrp(0, os.getpgrp())
    except OSError:
        pass  # the terminal is gone
    finally:
        signal.signal(signal.SIGTTOU, old)


def _json(answer: dict) -> str:
    import json  # only --json needs it: not every start

    return json.dumps(answer)


def _reap_soon(pid: int, seconds: float) -> None:
    """Reap our child pid if it exits within seconds; else leave it running (it is
    handed to whoever reaps our orphans)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if os.waitpid(pid, os.WNOHANG)[0]:
            return
        time.sleep(0.01)


def _inspect(a: argparse.Namespace) -> int:
    from upmig.summary import render, summary

    s = summary(a.image, a.key_file)
    print(_json(s) if a.json else render(s))
    return 0


def _too_late_to_stop() -> None:
    """The work is done (an image committed, a process running): a stop signal
    from now on changes nothing, so it must not turn success into failure or, once
    Python restores the default handlers at exit, into death by that signal."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def main(argv: list[str] | None = None) -> int:
    global _started, _command, _status
    argv = sys.argv[1:] if argv is None else argv
    _command = _command_of(argv)
    try:
        a = _parser().parse_args(argv)
    except SystemExit as e:
        if e.code == 2:  # a bad command line, said on stderr
            raise SystemExit(own_status(2)) from None
        raise
    _status = _StatusFd(a.status_fd) if getattr(a, "status_fd", None) is not None else None
    for signum in STOP_SIGNALS:
        signal.signal(signum, _interrupted)
    run = {"dump": _dump, "resume": _resume, "inspect": _inspect}[a.command]
    _started = True
    try:
        try:
            return run(a)
        finally:  # before any message: a signal now must not cut it short
            _too_late_to_stop()
    except BrokenPipeError:
        os._exit(own_status(1))  # our reader went away: nothing left to say to it
    except (UpmigError, OSError) as e:
        err = e if isinstance(e, UpmigError) else from_oserror(e)
        if _status:
            _status.say("failed", exit_status=own_status(err.exit_code), error=str(err))
        print(f"upmig: {err}", file=sys.stderr)
        return own_status(err.exit_code)


def run() -> None:
    """The program (console script and `python -m upmig`): main(), then exit at once.
    Python's own teardown, which frees every module and object, costs ~17 ms here and
    has nothing left to do: main() has closed, removed and released all it used."""
    # Rarer collections: while the command's ~40 modules load, a collection every 700
    # new objects finds nothing to free (a few ms of each start).
    gc.set_threshold(GC_THRESHOLD)
    status = main()
    if sys.getprofile() or sys.gettrace():  # a profiler or coverage tool saves at exit
        sys.exit(status)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        status = 120  # what Python's own exit says when it cannot flush
    os._exit(status)
