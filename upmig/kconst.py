"""Kernel constants that Python's stdlib lacks, each declared once, under the name
(leading underscores dropped) and with the value of the C header named above it
(x86-64; tests/test_kconst.py compiles a program against the headers and checks
every value). What os, mmap, fcntl, signal, socket, termios, resource and time
have is taken from them where it is used; ptrace's vocabulary is upmig._native's,
beside its wrappers. Nothing is imported here that a start does not need anyway."""

from __future__ import annotations

import signal

# Derived from the stdlib.
NSIG = signal.NSIG - 1  # signals are numbered 1 to NSIG (the kernel's _NSIG)

# <sys/ioctl.h> <linux/sockios.h>
SIOCINQ, SIOCOUTQ = 0x541B, 0x5411  # termios's FIONREAD and TIOCOUTQ, for sockets

# <fcntl.h>
AT_FDCWD = -100
F_SETOWN_EX, F_GETOWN_EX = 15, 16
F_OWNER_PGRP = 2

# <linux/fcntl.h>
O_LARGEFILE = 0o100000  # as the kernel shows it (os.O_LARGEFILE is 0 on 64-bit)

# <time.h>
CLOCK_REALTIME_ALARM, CLOCK_BOOTTIME_ALARM = 8, 9

# <linux/openat2.h>
RESOLVE_NO_SYMLINKS = 0x04  # nor magic links

# <sys/wait.h>
WALL = 0x40000000  # __WALL: children of any kind, threads too

# <linux/sched.h>
CLONE_VM, CLONE_FS, CLONE_FILES, CLONE_SIGHAND = 0x100, 0x200, 0x400, 0x800
CLONE_THREAD, CLONE_SYSVSEM = 0x10000, 0x40000
CLONE_NEWPID = 0x20000000

# <sys/mman.h>
MAP_FIXED, MAP_GROWSDOWN, MAP_FIXED_NOREPLACE = 0x10, 0x100, 0x100000
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
MADV_WIPEONFORK = 18

# <linux/prctl.h>
PR_GET_DUMPABLE, PR_SET_DUMPABLE, PR_SET_KEEPCAPS = 3, 4, 8
PR_SET_NAME = 15
PR_CAPBSET_DROP = 24
PR_SET_MM, PR_SET_MM_MAP = 35, 14
PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 36, 37
PR_SET_NO_NEW_PRIVS = 38
PR_GET_TID_ADDRESS = 40
PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE = 47, 2
PR_SET_VMA, PR_SET_VMA_ANON_NAME = 0x53564D41, 0

# <linux/capability.h>
LINUX_CAPABILITY_VERSION_3 = 0x20080522  # _LINUX_CAPABILITY_VERSION_3
CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER, CAP_FSETID = 0, 1, 2, 3, 4
CAP_SETGID, CAP_SETUID, CAP_SETPCAP, CAP_LINUX_IMMUTABLE = 6, 7, 8, 9
CAP_SYS_ADMIN, CAP_MKNOD, CAP_MAC_OVERRIDE, CAP_CHECKPOINT_RESTORE = 21, 27, 32, 40

# <linux/signal.h>
SS_ONSTACK, SS_DISABLE = 1, 2
SS_AUTODISARM = 1 << 31

# <sys/epoll.h>
EPOLL_CTL_ADD = 1

# <linux/timerfd.h>
TFD_IOC_SET_TICKS = 0x40085400  # _IOW('T', 0, u64), with CONFIG_CHECKPOINT_RESTORE

# <sys/inotify.h>
IN_MODIFY, IN_MASK_CREATE = 0x2, 0x10000000

# <sys/socket.h>
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
SO_PEEK_OFF = 42

# <netinet/tcp.h>
TCP_REPAIR, TCP_REPAIR_QUEUE, TCP_QUEUE_SEQ, TCP_REPAIR_OPTIONS = 19, 20, 21, 22
TCP_TIMESTAMP, TCP_REPAIR_WINDOW = 24, 29
TCP_RECV_QUEUE, TCP_SEND_QUEUE = 1, 2
TCP_ESTABLISHED, TCP_CLOSE, TCP_LISTEN = 1, 7, 10  # socket states (unix sockets' too)
TCPOPT_MAXSEG, TCPOPT_WINDOW, TCPOPT_SACK_PERMITTED, TCPOPT_TIMESTAMP = 2, 3, 4, 8
TCPI_OPT_TIMESTAMPS, TCPI_OPT_SACK, TCPI_OPT_WSCALE = 1, 2, 4

# <linux/netlink.h>
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3

# <linux/sock_diag.h>
SOCK_DIAG_BY_FAMILY = 20

# <linux/unix_diag.h>
UDIAG_SHOW_NAME, UDIAG_SHOW_PEER, UDIAG_SHOW_RQLEN = 0x1, 0x4, 0x10
UNIX_DIAG_NAME, UNIX_DIAG_PEER, UNIX_DIAG_RQLEN, UNIX_DIAG_SHUTDOWN = 0, 2, 4, 6

# <sys/ipc.h>
IPC_CREAT, IPC_EXCL = 0o1000, 0o2000
IPC_RMID, IPC_SET, IPC_STAT = 0, 1, 2

# <sys/sem.h>
GETPID, GETALL, SETALL = 11, 13, 17

# <sys/shm.h>
SHM_RDONLY, SHM_EXEC, SHM_REMAP, SHM_DEST = 0o10000, 0o100000, 0o40000, 0o1000
