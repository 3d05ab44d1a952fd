"""cffi build script (out-of-line API mode): the cdef is csrc/helper.h itself."""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

ffibuilder = FFI()
ffibuilder.cdef((HERE / "helper.h").read_text())
ffibuilder.set_source(
    "upmig._helper",
    '#include <stdint.h>\n#include <stddef.h>\n#include "helper.h"\n',
    sources=[str(HERE / "helper.c")],
    include_dirs=[str(HERE)],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-pthread"],
    extra_link_args=["-pthread"],
    libraries=["crypto"],  # OpenSSL's AES-GCM: the image's frame tags (GMAC)
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
