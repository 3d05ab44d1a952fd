"""cffi build script (out-of-line API mode): the cdef is csrc/helper.h itself, plus the
kernel vocabulary the Python side reads by name: struct user_regs_struct and the
syscall numbers, both taken from the system headers when the helper is compiled."""

import os
import re
import shlex
import subprocess
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

# cffi checks this declaration against <sys/user.h> when the module is loaded (a
# field at another offset is an error), so upmig.regs names the kernel's layout.
REGS_FIELDS = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx",
               "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base",
               "gs_base", "ds", "es", "fs", "gs")
REGS = "".join(["struct user_regs_struct {", *(f" unsigned long long {f};" for f in REGS_FIELDS),
                "};"])


def syscall_names() -> list[str]:
    """Every SYS_name <sys/syscall.h> defines, as the C compiler sees it."""
    cc = shlex.split(os.environ.get("CC", "cc"))
    out = subprocess.run([*cc, "-E", "-dM", "-include", "sys/syscall.h", "-"],
                         input="", capture_output=True, text=True, check=True).stdout
    return sorted(set(re.findall(r"^#define SYS_(\w+) ", out, re.MULTILINE)))


ffibuilder = FFI()
ffibuilder.cdef((HERE / "helper.h").read_text())
ffibuilder.cdef(REGS)
ffibuilder.cdef("\n".join(f"#define SYS_{name} ..." for name in syscall_names()))
ffibuilder.set_source(
    "upmig._helper",
    '#include <stdint.h>\n#include <stddef.h>\n#include <sys/syscall.h>\n'
    '#include <sys/user.h>\n#include "helper.h"\n',
    sources=[str(HERE / "helper.c")],
    include_dirs=[str(HERE)],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-pthread"],
    extra_link_args=["-pthread"],
    libraries=["crypto"],  # OpenSSL's AES-GCM: the image's frame tags (GMAC)
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
