"""The kinds of fd a process can hold, one module each.

    base.py      what every kind shares: the handler (Kind), the fd as /proc shows it
                 (Seen), dump's view of the fd table (Scan), resume's (Rebuild), phases
    registry.py  the kinds, in the order they are asked whether an fd is theirs
    path.py      regular files, directories, plain devices: reopened by path
    ghost.py     deleted files, memfds, /dev/shm objects: reopened on the recreated file
    pipe.py      pipes inside the tree, and the bytes in them (FIFOs' too)
    fifo.py      FIFOs by path
    unix.py      unix sockets: pairs (with their queues), listeners, unconnected ones
    inet.py      IPv4/IPv6: UDP, TCP listeners, established connections (TCP repair)
    eventfd.py, epoll.py, timerfd.py, signalfd.py, inotify.py   event descriptors
    inherit.py   fds 0-2 leading outside, re-attached to the resumer's own
    locks.py     file locks, owner.py O_ASYNC owners: what an fd of any kind may have

upmig.files drives them: classification through the registry, the fds sharing
one open file description, and every fd at its number on resume."""
