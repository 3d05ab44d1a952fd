"""Self-checking victim: IPv4 and IPv6 sockets without connections.

- a TCP listener on 127.0.0.1 (port chosen by the kernel) with SO_REUSEADDR,
  TCP_NODELAY and backlog 5, and one on [::1] with IPV6_V6ONLY;
- a UDP socket bound to 127.0.0.1, and one connected to it;
- a TCP socket neither bound nor connected;
- dups of the TCP listener and of the bound UDP socket.
Prints "READY <tcp port> <tcp6 port> <udp port>". On SIGUSR1 it serves: accepts
one connection on each listener and answers "pong <n>", and reads one datagram.
On SIGTERM it checks the options and prints PASS (or FAIL: why)."""

import os
import signal
import socket
import time

from victim import fail

tcp = socket.socket()
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
tcp.bind(("127.0.0.1", 0))
tcp.listen(5)
tcp6 = socket.socket(socket.AF_INET6)
tcp6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
tcp6.bind(("::1", 0))
tcp6.listen(3)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("127.0.0.1", 0))
sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sender.connect(udp.getsockname())
loose = socket.socket()
tcp_dup, udp_dup = os.dup(tcp.fileno()), os.dup(udp.fileno())  # one socket each, twice
served = 0
stop = False


def serve(*_):
    global served
    for lst in (tcp, tcp6):
        conn, _ = lst.accept()
        if conn.recv(10) != b"ping":
            fail("a client did not say ping")
        served += 1
        conn.sendall(b"pong %d" % served)
        conn.close()
    data, _ = udp.recvfrom(100)
    print("UDP", data.decode(), flush=True)


def on_term(*_):
    global stop
    stop = True


signal.signal(signal.SIGUSR1, serve)
signal.signal(signal.SIGTERM, on_term)
print("READY", tcp.getsockname()[1], tcp6.getsockname()[1], udp.getsockname()[1], flush=True)
while not stop:
    time.sleep(0.02)
if not tcp.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY):
    fail("TCP_NODELAY was lost")
if not tcp.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR):
    fail("SO_REUSEADDR was lost")
if not tcp6.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY):
    fail("IPV6_V6ONLY was lost")
sender.send(b"self")
if udp.recv(10) != b"self":
    fail("the connected UDP socket no longer reaches the bound one")
if served != 2:
    fail(f"served {served} clients")
for fd, sock in ((tcp_dup, tcp), (udp_dup, udp)):
    if os.fstat(fd).st_ino != os.fstat(sock.fileno()).st_ino:
        fail("a dup'ed socket came back as a socket of its own")
print("PASS", flush=True)
