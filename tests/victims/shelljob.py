"""A stand-in for an interactive shell: it leads a session of its own with a new
terminal (a pty) as its controlling terminal, and starts a job on it, which
inherits that terminal as stdin and as its controlling terminal. The job counts
into the file given, one number per line; the shell prints the job's PID.
With --own-group the shell does job control: the job leads a process group of its
own, which the shell makes the terminal's foreground; the job then writes every
line it reads from the terminal into the file, as "got LINE"."""

import fcntl
import os
import pty
import sys
import termios
import time

master, slave = pty.openpty()
shell = os.fork()
if shell == 0:
    os.setsid()
    fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
    own_group = "--own-group" in sys.argv
    job = os.fork()
    if job == 0:
        out = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(slave, 0)
        os.dup2(out, 1)
        os.closerange(3, 1024)
        if own_group:
            os.setpgid(0, 0)
            print("listening", flush=True)
            for line in sys.stdin:
                print("got", line.strip(), flush=True)
        n = 0
        while True:
            print(n, flush=True)
            n += 1
            time.sleep(0.02)
    if own_group:
        os.setpgid(job, job)
        os.tcsetpgrp(slave, job)
    print(job, flush=True)
    while True:  # keep the terminal, as a shell would; reap the job if it dies
        try:
            os.wait()
        except ChildProcessError:
            time.sleep(1)
os.waitpid(shell, 0)
