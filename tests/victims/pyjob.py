"""A deterministic python3 job for output-equality tests: hashing, big integers,
dicts and lists, with block-buffered output (so unflushed lines live in memory
when it is dumped). Prints the same bytes on every run; takes ~3 s."""

import hashlib
import sys

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 250

table: dict[str, int] = {}
digest = b"upmig"
fib_a, fib_b = 0, 1
for r in range(ROUNDS):
    for i in range(3000):
        digest = hashlib.sha256(digest + i.to_bytes(4, "little")).digest()
        table[digest[:6].hex()] = i
    for _ in range(500):
        fib_a, fib_b = fib_b, fib_a + fib_b
    primes = [n for n in range(2, 6000) if all(n % p for p in range(2, int(n**0.5) + 1))]
    print(f"round {r}: {digest.hex()[:24]} keys={len(table)} fib%97={fib_b % 97} "
          f"primes={len(primes)} sum={sum(primes) + r}")
print("done", len(table), hashlib.sha256(str(sorted(table.items())[:1000]).encode()).hexdigest())
