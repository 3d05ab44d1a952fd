"""x86-64 syscall numbers by name, from python-ptrace's table: `nr.mmap`."""

from ptrace.syscall.linux.x86_64 import SYSCALL_NAMES

# The table also lists the x32 ABI's entries (512 and up) under the same names.
_BY_NAME = {name: num for num, name in sorted(SYSCALL_NAMES.items()) if num < 512}
_BY_NAME["timerfd_create"] = 283  # python-ptrace lists it under its old name, "timerfd"


class _Numbers:
    def __getattr__(self, name: str) -> int:
        try:
            return _BY_NAME[name]
        except KeyError:
            raise AttributeError(f"no x86-64 syscall named {name}") from None


nr = _Numbers()


def name_of(num: int) -> str:
    return SYSCALL_NAMES.get(num, str(num)) if 0 <= num < 512 else str(num)
