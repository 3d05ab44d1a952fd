"""x86-64 syscall numbers by name, `nr.mmap`, and names by number, `name(9)`.

Both come from <sys/syscall.h> as the C helper was compiled against it (its SYS_*
constants), so that no table is written out here and nothing is imported that the
numbers do not need (python-ptrace's table costs ~30 ms of every start)."""

from __future__ import annotations

from upmig import _native as nat


class _Numbers:
    """Each number is looked up in the helper once, on first use."""

    def __getattr__(self, name: str) -> int:
        num = nat.syscall_number(name)
        if num is None:
            raise AttributeError(f"no x86-64 syscall named {name}")
        setattr(self, name, num)
        return num


nr = _Numbers()

_names: dict[int, str] = {}


def name(num: int) -> str:
    """The syscall's name, for messages; its number as text if it has none."""
    if not _names:
        _names.update((n, s) for s, n in nat.syscall_numbers().items())
    return _names.get(num, str(num))
