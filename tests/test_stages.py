"""The ordering rules of the dump and resume pipelines, as data: each rule is a pair
of stages that must run in this order, and why. A reordering that breaks one fails
here, before it can fail on some process in the field."""

from __future__ import annotations

import pytest

from upmig import dumper, restore

RESUME_RULES = [
    ("check_files", "spawn_stub", "every refusal comes before any process exists"),
    ("check_machine", "spawn_stub", "every refusal comes before any process exists"),
    ("check_rights", "spawn_stub", "every refusal comes before any process exists"),
    ("reserve_ids", "spawn_stub", "the stub takes the root's original PID"),
    ("make_sysv", "rebuild_processes", "processes attach the tree's SysV segments"),
    ("make_tree", "rebuild_processes", "a process is rebuilt in the stub forked for it"),
    ("rebuild_processes", "close_parked", "every process takes what it shares first"),
    ("rebuild_processes", "check_whole", "a streamed image's pages are read while rebuilding"),
    ("check_whole", "let_go", "an image cut short is refused before anything runs"),
    ("close_parked", "let_go", "no process runs holding fds parked for others"),
    ("finish_sysv", "let_go", "SysV ids are settled before anyone can use them"),
    ("give_terminal", "let_go", "the foreground is handed over before the group runs"),
]

PROCESS_RULES = [
    ("take_stub", "clear_stub", "the stub is held (signals blocked) before it is emptied"),
    ("clear_stub", "map_scratch", "the scratch area goes where the image has nothing"),
    ("attach_sysv", "map_memory", "SysV attachments are part of the address space"),
    ("act_as_process", "make_ghosts", "files are made with the process's own rights"),
    ("make_ghosts", "map_memory", "ghost files are mapped"),
    ("map_memory", "fill_memory", "pages are written into mapped memory"),
    ("fill_memory", "finish_memory", "protections are set once the pages are in"),
    ("act_as_process", "restore_process", "fds are opened with the process's rights"),
    ("finish_memory", "give_back_rights", "the executable is opened as the process"),
    ("restore_process", "give_back_rights", "fds are opened with the process's rights"),
    ("give_back_rights", "clone_threads", "threads are cloned with upmig's rights"),
    ("clone_threads", "restore_creds", "credentials may drop our rights over every thread"),
    ("restore_creds", "unmap_scratch", "credentials are set by injected syscalls"),
    ("unmap_scratch", "set_registers", "registers last: no injection after them"),
]

DUMP_RULES = [
    ("load_key", "freeze_tree", "a key problem never stops the process"),
    ("check_before_freezing", "freeze_tree", "cheap refusals never stop the process"),
    ("identify_mapped", "freeze_tree", "hashing files is slow: not while frozen"),
    ("open_output", "freeze_tree", "an unwritable image never stops the process"),
    ("freeze_tree", "capture_tree", "state is read from a frozen tree"),
    ("capture_tree", "capture_processes", "the header and SysV objects come first"),
    ("capture_processes", "write_image", "one writer writes what the captures found"),
    ("write_image", "verify", "what is read back has been written"),
    ("verify", "commit", "only a verified image is committed"),
]


def _names(stages) -> list[str]:
    return [getattr(s, "run", s).__name__ for s in stages]


@pytest.mark.parametrize("stages,rules", [
    (restore.STAGES, RESUME_RULES),
    (restore.PROCESS_STAGES, PROCESS_RULES),
    (dumper.STAGES, DUMP_RULES),
], ids=["resume", "process", "dump"])
def test_stages_keep_their_ordering_rules(stages, rules):
    names = _names(stages)
    assert len(set(names)) == len(names), f"a stage runs twice: {names}"
    for first, then, why in rules:
        assert first in names and then in names, f"no stage {first} or {then}"
        assert names.index(first) < names.index(then), f"{first} must precede {then}: {why}"


def test_the_rules_can_fail():
    swapped = list(restore.PROCESS_STAGES)
    i, j = _names(swapped).index("unmap_scratch"), _names(swapped).index("set_registers")
    swapped[i], swapped[j] = swapped[j], swapped[i]
    with pytest.raises(AssertionError, match="registers last"):
        test_stages_keep_their_ordering_rules(swapped, PROCESS_RULES)


def test_bulk_copies_run_unpinned_and_injection_pinned():
    """The page fill uses every CPU; bursts of injected syscalls share the stub's."""
    pinned = {s.run.__name__: s.pinned for s in restore.PROCESS_STAGES}
    assert not pinned["fill_memory"] and not pinned["copy_cow"]
    for name in ("clear_stub", "map_scratch", "make_ghosts", "map_memory", "restore_process",
                 "clone_threads", "set_registers"):
        assert pinned[name], name
