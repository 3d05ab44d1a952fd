"""upmig: move a running Linux process to another machine, without its cooperation."""

from upmig.errors import (
    AccessDenied,
    CantMigrate,
    Corrupt,
    ImageError,
    Mismatch,
    NoSuchProcess,
    RestoreError,
    Truncated,
    UpmigError,
    VersionTooNew,
)

__version__ = "0.1.0"


def dump(pid, image_path, **kwargs):
    """Freeze pid, write its image to image_path; see upmig.dumper.dump. (No module may
    be named like these functions: importing it would replace the function.)"""
    from upmig.dumper import dump as _dump

    return _dump(pid, image_path, **kwargs)


def resume(image_path, **kwargs):
    """Rebuild the process of an image; see upmig.restore.resume."""
    from upmig.restore import resume as _resume

    return _resume(image_path, **kwargs)


def inspect(image_path):
    """A dict describing what an image holds; see upmig.summary.summary."""
    from upmig.summary import summary

    return summary(image_path)


__all__ = ["dump", "resume", "inspect", "__version__", "UpmigError", "NoSuchProcess",
           "AccessDenied", "CantMigrate", "ImageError", "Truncated", "Corrupt",
           "VersionTooNew", "RestoreError", "Mismatch"]
