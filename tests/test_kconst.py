"""The kernel constants upmig declares (upmig.kconst, and ptrace's in upmig._native)
have the values of the C headers named above them: a program compiled against
those headers prints each, one translation unit per header (some headers clash)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from upmig import _native, kconst

C_NAMES = {"WALL": "__WALL", "LINUX_CAPABILITY_VERSION_3": "_LINUX_CAPABILITY_VERSION_3"}
HEADER = re.compile(r"^# (<[\w/]+\.h>(?: <[\w/]+\.h>)*)")
NAMES = re.compile(r"^([A-Z_][A-Z0-9_]*(?:, [A-Z_][A-Z0-9_]*)*) = ")


def declared(module) -> dict[str, list[str]]:
    """headers -> the names declared under them: from a line `# <header> ...` to the
    next blank line."""
    out: dict[str, list[str]] = {}
    header = None
    for line in Path(module.__file__).read_text().splitlines():
        if not line.strip():
            header = None
        elif m := HEADER.match(line):
            header = m.group(1)
            out.setdefault(header, [])
        elif header and (m := NAMES.match(line)):
            out[header] += m.group(1).split(", ")
    return out


def _program(groups: dict[str, list[str]], where: Path) -> list[Path]:
    sources = []
    for i, (header, names) in enumerate(groups.items()):
        prints = "".join(f'    printf("{n} %lld\\n", (long long)({C_NAMES.get(n, n)}));\n'
                         for n in names)
        src = where / f"h{i}.c"
        includes = "".join(f"#include {h}\n" for h in header.split())
        src.write_text(f"#define _GNU_SOURCE\n#include <stdio.h>\n{includes}"
                       f"void show{i}(void)\n{{\n{prints}}}\n")
        sources.append(src)
    calls = "".join(f"    show{i}();\n" for i in range(len(sources)))
    decls = "".join(f"void show{i}(void);\n" for i in range(len(sources)))
    main = where / "main.c"
    main.write_text(f"{decls}int main(void)\n{{\n{calls}    return 0;\n}}\n")
    return [main, *sources]


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc) to read the headers")
@pytest.mark.parametrize("module", [kconst, _native], ids=["kconst", "_native"])
def test_constants_have_their_headers_values(module, tmp_path):
    groups = declared(module)
    assert sum(map(len, groups.values())) > 10, groups  # the groups were found
    exe = tmp_path / "show"
    cc = subprocess.run(["cc", "-o", str(exe), *map(str, _program(groups, tmp_path))],
                        capture_output=True, text=True)
    assert cc.returncode == 0, cc.stderr
    printed = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    headers = {name: int(value) for name, value in (line.split() for line in printed.splitlines())}
    ours = {name: getattr(module, name) for names in groups.values() for name in names}
    assert ours == headers


def test_every_kernel_constant_is_under_a_header():
    """A constant added to kconst without its header would go unchecked."""
    grouped = {name for names in declared(kconst).values() for name in names}
    public = {name for name in vars(kconst) if name.isupper()}
    assert public - grouped == {"NSIG"}  # derived from the stdlib
