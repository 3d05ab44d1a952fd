"""Socket pairs between a parent and its child, with data queued both ways when it
moves. The stream pair's both ends stay in the parent too (as nginx's master keeps
its workers' channels); the datagram and seqpacket pairs are split, one end in
each process. The parent keeps WINDOW requests ahead of the child, which answers
slowly; the report is deterministic. Usage: pairtree.py [ROUNDS]"""

import hashlib
import os
import socket
import sys
import time

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 300
WINDOW = 5
stream_a, stream_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
dgram_a, dgram_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
seq_a, seq_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

child = os.fork()
if child == 0:
    stream_a.close()
    dgram_a.close()
    seq_a.close()
    lines = stream_b.makefile("rb")
    while True:
        line = lines.readline()
        extra = dgram_b.recv(100)
        if line == b"END\n":
            os._exit(0)
        time.sleep(0.005)
        seq_b.send(hashlib.sha256(line + extra).hexdigest().encode())

dgram_b.close()
seq_b.close()  # stream_b stays open here too
print("READY", flush=True)
sent = 0
for r in range(ROUNDS):
    while sent < min(r + WINDOW, ROUNDS):
        stream_a.sendall(f"{sent}\n".encode())
        dgram_a.send(b"x" * (sent % 50))
        sent += 1
    answer = seq_a.recv(100).decode()
    if r % 20 == 0:
        print(r, answer, flush=True)
stream_a.sendall(b"END\n")
dgram_a.send(b"")
_, status = os.waitpid(child, 0)
print("DONE", status, flush=True)
