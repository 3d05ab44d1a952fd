"""The image fuzz (tests/imagefuzz.py), a fixed seeded share of it: every mutant of
a real image ends in a clean refusal or a correct resume.

Clean: a documented exit status (inspect 0 or 6; resume 0, 206, 207 or 208), one `upmig:`
line on stderr, no traceback; correct: the resumed victim passes its own check;
always: no hang over 10 s, nothing left behind (processes, /dev/shm objects, SysV
objects, files). Most mutants run in this process through upmig.cli.main, every
25th through a real `upmig` (`make fuzz` runs more, with other seeds)."""

from __future__ import annotations

import signal

import imagefuzz
import pytest

from upmig import keys

WELL_FORMED, RAW, SEED = 520, 80, 20261204  # at least 500 well-formed ones run


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> imagefuzz.Harness:
    return imagefuzz.Harness(tmp_path_factory.mktemp("fuzz"), keys.load(), subprocess_every=25)


def test_every_mutant_is_refused_cleanly_or_resumes_correctly(harness):
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    figs = harness.fuzz(WELL_FORMED, RAW, SEED)
    # upmig.cli.main ran here hundreds of times: it must leave this process as it was
    # (a SIGTERM left blocked is inherited by every victim started afterwards).
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask
    print(figs.summary())
    bad = [f"{o.failure}: {o.mutant}: {o.detail}" for o in figs.failures()]
    assert not bad, f"{len(bad)} of {len(figs.outcomes)} mutants:\n" + "\n".join(bad[:10])
    assert figs.count("unencodable") < 20  # (an int past 64 bits: no image can hold it)
    # Both ends are reached: refusals, and mutants that still resume and pass.
    assert figs.count("resumed", raw=False) >= 10, figs.summary()
    assert figs.count("refused", raw=False) >= 400, figs.summary()
    assert figs.count("refused", raw=True) == RAW, figs.summary()


def test_the_harness_sees_a_failure(harness, monkeypatch):
    """The harness can fail: a mutant that resumes into a victim failing its check is
    reported (here the victim's pipe loses its bytes: a change no validation can see)."""
    monkeypatch.setattr(harness, "subprocess_every", 0)
    items = [imagefuzz.Item(it.rec, it.data) for it in harness.items]
    for i, it in enumerate(items):
        if it.rec.kind == "pipe" and it.rec.data:
            items[i] = imagefuzz.Item(type(it.rec)(**{**vars(it.rec), "data": b""}))
    path = str(harness.work / "broken.upmig")
    imagefuzz.encode(items, path, harness.key)
    o = harness.one(path, "the pipe's bytes lost")
    assert (o.result, o.failure) == ("resumed", "victim failed"), o


def test_the_harness_sees_a_traceback(harness, monkeypatch):
    """And a crash inside upmig is reported as one, not taken for a refusal."""
    from upmig import summary

    def crash(img):
        raise KeyError("watches")

    monkeypatch.setattr(harness, "subprocess_every", 0)  # in this process, where it is patched
    monkeypatch.setattr(summary, "_summary", crash)
    path = str(harness.work / "fine.upmig")
    imagefuzz.encode(harness.items, path, harness.key)
    o = harness.one(path, "inspect made to crash")
    assert o.failure == "traceback" and "KeyError: 'watches'" in o.detail, o
