#!/bin/sh
# make demo: a counting program is started, dumped (and killed), resumed, and seen
# to continue from where it was.
set -e
dir=$(mktemp -d)
trap 'kill $(cat "$dir/pid" 2>/dev/null) 2>/dev/null; rm -rf "$dir"' EXIT
cat > "$dir/count.py" <<'PY'
import os, time
os.closerange(3, 4096)  # fds leaked by whatever started us are not part of the demo
n = 0
while True:
    print(f"count {n}", flush=True)
    n += 1
    time.sleep(0.2)
PY
cd "$dir"
# its own session: a job left on the terminal of make would need dump --shell-job
setsid python3 count.py > out.txt 2>&1 < /dev/null &
pid=$!
sleep 1.2
echo "== started pid $pid; its output so far:"; cat out.txt
upmig dump "$pid" -o "$dir/count.upmig"
wait "$pid" 2>/dev/null || true
echo "== pid $pid is gone (killed by the dump); the image:"
upmig inspect "$dir/count.upmig" | head -4
echo "== resuming"
upmig resume --detach "$dir/count.upmig" > "$dir/pid"
sleep 1.2
kill "$(cat "$dir/pid")"
echo "== output after resume (it went on counting where it stopped):"
cat out.txt
