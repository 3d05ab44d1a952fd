// A deterministic node job for output-equality tests: a computation cut into
// setImmediate steps, so the event loop (epoll, eventfds, pipes) and the V8 and
// libuv threads are all live when it is dumped. ~2 s.
let s = 0, i = 0;
function step() {
  for (let k = 0; k < 2e6; k++, i++) s = (s * 31 + i) % 1000003;
  if (i % 2e7 == 0) console.log(i, s);
  if (i < 4e8) setImmediate(step); else console.log('done', s);
}
step();
