"""Self-checking victim: one established TCP connection with data in both queues.

It accepts one client, then (without reading) sends it 4 MiB the client does not
read yet, so most of it waits in this side's send queue; the client's request
waits unread in this side's receive queue. Prints "READY <port>", then "SENT".
On SIGUSR1 it reads the request and answers "got <request>"."""

import signal
import socket
import sys
import time

BLOB = bytes((i * 31 + 7) & 0xFF for i in range(4 << 20))
HOST = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1"
srv = socket.create_server((HOST, 0), family=socket.AF_INET6 if ":" in HOST else
                           socket.AF_INET)
print("READY", srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
conn.sendall(BLOB[:1 << 16])
conn.setblocking(False)
sent = 1 << 16
while sent < len(BLOB):  # as much as the kernel takes: the client is not reading
    try:
        sent += conn.send(BLOB[sent:])
    except BlockingIOError:
        break
conn.setblocking(True)
print("SENT", sent, flush=True)
serve = False


def on_usr1(*_):
    global serve
    serve = True


signal.signal(signal.SIGUSR1, on_usr1)
while not serve:
    time.sleep(0.02)
request = conn.recv(100)
conn.sendall(b"got " + request)
print("ANSWERED", flush=True)
time.sleep(60)
