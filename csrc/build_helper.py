"""cffi build script (out-of-line API mode): the cdef is csrc/helper.h itself, plus the
syscall numbers by name (SYS_*), taken from the system headers when the helper is
compiled."""

import os
import re
import shlex
import subprocess
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent


def syscall_names() -> list[str]:
    """Every SYS_name <sys/syscall.h> defines, as the C compiler sees it."""
    cc = shlex.split(os.environ.get("CC", "cc"))
    out = subprocess.run([*cc, "-E", "-dM", "-include", "sys/syscall.h", "-"],
                         input="", capture_output=True, text=True, check=True).stdout
    return sorted(set(re.findall(r"^#define SYS_(\w+) ", out, re.MULTILINE)))


ffibuilder = FFI()
ffibuilder.cdef((HERE / "helper.h").read_text())
ffibuilder.cdef("\n".join(f"#define SYS_{name} ..." for name in syscall_names()))
ffibuilder.set_source(
    "upmig._helper",
    '#include <stdint.h>\n#include <stddef.h>\n#include <sys/syscall.h>\n#include "helper.h"\n',
    sources=[str(HERE / "helper.c")],
    include_dirs=[str(HERE)],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-pthread"],
    extra_link_args=["-pthread"],
    libraries=["crypto"],  # OpenSSL's AES-GCM: the image's frame tags (GMAC)
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
