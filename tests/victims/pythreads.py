"""A deterministic python3 job with threads, for output-equality tests: a long-lived
concurrent.futures pool, fresh threading.Thread workers every round feeding a
queue, and a counter under a Lock. Prints the same bytes on every run; ~3 s."""

import concurrent.futures
import hashlib
import queue
import sys
import threading

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 150


def chain(seed: int, n: int = 4000) -> str:
    d = seed.to_bytes(8, "little")
    for i in range(n):
        d = hashlib.sha256(d + i.to_bytes(4, "little")).digest()
    return d.hex()[:16]


lock = threading.Lock()
total = 0


def worker(k: int, r: int, out: queue.Queue) -> None:
    global total
    acc = 0
    for i in range(20000):
        acc = (acc * 31 + i + k * r) % 1000003
    with lock:
        total += acc
    out.put((k, acc, threading.current_thread().name))


with concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="pool") as pool:
    for r in range(ROUNDS):
        hashes = list(pool.map(chain, range(r * 8, r * 8 + 8)))
        results: queue.Queue = queue.Queue()
        ts = [threading.Thread(target=worker, args=(k, r, results), name=f"w{k}")
              for k in range(3)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        got = sorted(results.get() for _ in ts)
        print(f"round {r}: {' '.join(hashes[:3])} workers={got} total={total}")
print("done", total)
