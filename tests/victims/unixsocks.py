"""Self-checking victim: unix sockets inside the process, with data queued in them.

- a stream socketpair with 6000 bytes queued one way and 4 the other, one end
  non-blocking;
- a datagram pair with three datagrams queued, a seqpacket pair with two and its
  sending end shut down;
- a listening socket on a path (backlog 7, dup'ed) and one in the abstract namespace.
Prints READY; on SIGTERM reads every queue, connects to both listeners, and prints
PASS (or FAIL: why)."""
import os
import socket

from victim import fail, ready_then_wait

a, b = socket.socketpair()
a.sendall(b"hello " * 1000)
b.sendall(b"back")
d1, d2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
d1.send(b"one")
d1.send(b"two!")
d1.send(b"3")
q1, q2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
q2.send(b"pkt-a")
q2.send(b"pkt-bb")
q2.shutdown(socket.SHUT_WR)  # q1 reads both packets, then end of file
path = os.path.abspath("srv.sock")
if os.path.exists(path):
    os.unlink(path)
srv = socket.socket(socket.AF_UNIX)
srv.bind(path)
srv.listen(7)
name = b"\0upmig-test-%d" % os.getpid()
abstract = socket.socket(socket.AF_UNIX)
abstract.bind(name)
abstract.listen(3)
srv_dup = os.dup(srv.fileno())  # the listener twice: one socket
b.setblocking(False)
ready_then_wait()

got = b""
while len(got) < 6000:
    got += b.recv(65536)
if got != b"hello " * 1000:
    fail("stream a->b")
if a.recv(100) != b"back":
    fail("stream b->a")
if [d2.recv(100) for _ in range(3)] != [b"one", b"two!", b"3"]:
    fail("dgram")
if [q1.recv(100), q1.recv(100), q1.recv(100)] != [b"pkt-a", b"pkt-bb", b""]:
    fail("seqpacket (with its peer shut down for writing)")
if os.fstat(srv_dup).st_ino != os.fstat(srv.fileno()).st_ino:
    fail("the dup'ed listener came back as a socket of its own")
if b.getblocking():
    fail("b lost O_NONBLOCK")
c = socket.socket(socket.AF_UNIX)
c.connect(path)
conn, _ = srv.accept()
c.sendall(b"ping")
if conn.recv(10) != b"ping":
    fail("the listener on a path")
c2 = socket.socket(socket.AF_UNIX)
c2.connect(name)
abstract.accept()
a.sendall(b"more")
b.setblocking(True)
if b.recv(10) != b"more":
    fail("the pair after resume")
print("PASS", flush=True)
