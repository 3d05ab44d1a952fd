"""What every run of upmig pays before it does anything: the modules it imports. A
tiny process's dump or resume is mostly that (README, Benchmarks: fixed cost), so
what is known to be costly and not needed stays out of the hot path."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

UPMIG = Path(__file__).resolve().parent.parent / "upmig"

# Each cost a few ms or more at every start; none is needed to dump or resume:
# python-ptrace (its import runs ldconfig too), ctypes, logging, subprocess, json (only
# --json), pathlib and what it brings (urllib.parse, fnmatch), hmac and hashlib (only
# a streamed image's frames are compared with hmac.compare_digest).
KEPT_OUT = ("ptrace", "ctypes", "logging", "subprocess", "json", "pathlib", "urllib",
            "fnmatch", "hmac", "hashlib")


def test_the_commands_import_nothing_kept_out():
    code = ("import sys\nimport upmig.cli, upmig.dumper, upmig.restore\n"
            "print(' '.join(sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd="/").stdout.split()
    assert "upmig.dumper" in loaded and "upmig.restore" in loaded
    assert sorted(m for m in loaded if m.split(".")[0] in KEPT_OUT) == []


def test_every_dataclass_has_a_docstring():
    """Without one, @dataclass makes one from inspect.signature() of the class, at
    every import: ~0.4 ms a class on the project's machine."""
    missing = []
    for path in sorted(UPMIG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.ClassDef) and ast.get_docstring(node) is None
                    and any(_is_dataclass(d) for d in node.decorator_list)):
                missing.append(f"{path.relative_to(UPMIG.parent)}: {node.name}")
    assert missing == []


def _is_dataclass(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return isinstance(target, ast.Name) and target.id == "dataclass"
