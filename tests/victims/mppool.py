"""A multiprocessing Pool (fork start method) of three workers computing hashes in
rounds: a parent with the Pool's helper threads, workers fed through pipes, and the
Pool's locks, POSIX semaphores in /dev/shm unlinked at once and shared by all.
Deterministic output; usage: mppool.py [ROUNDS]."""
import hashlib
import multiprocessing as mp
import sys
import time


def work(n):
    h = hashlib.sha256(str(n).encode())
    for _ in range(2000):
        h = hashlib.sha256(h.digest())
    return n, h.hexdigest()[:16]


if __name__ == "__main__":
    mp.set_start_method("fork")
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    with mp.Pool(3) as pool:
        print("READY", flush=True)
        for r in range(rounds):
            got = pool.map(work, range(r * 8, r * 8 + 8))
            print(r, " ".join(h for _, h in got), flush=True)
            time.sleep(0.05)
    print("DONE", flush=True)
