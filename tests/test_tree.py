"""Process trees: parents and children, groups and sessions, zombies, and what the
processes share (open files, pipes), moved together as one image."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import (
    build_victim,
    descendants,
    migrate_at_random,
    run_upmig,
    straight_run,
    wait_for,
)


def _relations(pid: int) -> list[tuple[int, int, int, int, str]]:
    """(pid, ppid, pgid, sid, state) of pid and every process below it."""
    out = []
    for p in [pid, *descendants(pid)]:
        st = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        out.append((p, int(st[1]), int(st[2]), int(st[3]), st[0]))
    return sorted(out)


@pytest.mark.parametrize("seed", [1, 2])
def test_a_tree_moves_and_ends_as_a_straight_run(run_victim, tmp_path, seed):
    """Workers in their own group and session, a grandchild, a zombie, pipes with
    bytes in them: the report equals that of a run that was never moved."""
    victim = str(build_victim("tree"))
    expected = straight_run([victim], tmp_path)
    assert expected.endswith(b"DONE\n")
    r = run_victim("tree")
    r.wait_output("READY\n")
    migrate_at_random(r, hops=2, seed=seed, spread=1.0)
    assert r.hops >= 1
    r.ends_as(expected)


def _normal(rows, root: int) -> list[tuple]:
    """Relations with the root's parent, and the group and session it had from
    outside the tree, left out: those are upmig resume's after a move."""
    r = next(x for x in rows if x[0] == root)
    outside = {r[2], r[3]} - {root}
    return [(p, None if p == root else pp, "out" if g in outside else g,
             "out" if s in outside else s, st == "Z") for p, pp, g, s, st in rows]


def test_relations_are_rebuilt_exactly(run_victim):
    r = run_victim("tree", "5000")
    r.wait_output("READY\n")
    wait_for(lambda: sum(st == "Z" for *_, st in _relations(r.pid)) == 2, 5, "two zombies")
    before = _relations(r.pid)
    assert len(before) == 6
    img = r.dump()
    info = json.loads(run_upmig("inspect", "--json", str(img)).stdout)
    assert sorted(t["pid"] for t in info["tree"]) == [p for p, *_ in before]
    zombies = sorted(t["exit_status"] for t in info["tree"] if t.get("zombie"))
    assert zombies == [3 << 8, 7 << 8]
    r.resume(img)
    assert _normal(_relations(r.pid), r.pid) == _normal(before, r.pid)
    r.kill()
