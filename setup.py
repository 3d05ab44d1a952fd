"""upmig: move a running Linux process to another machine, no cooperation needed."""

import subprocess
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildWithStub(build_py):
    """Build the static stub loader and the PID-namespace init (their flags live in the
    Makefile) into the package."""

    def run(self):
        super().run()
        pkg = Path(self.build_lib) / "upmig"
        pkg.mkdir(parents=True, exist_ok=True)
        subprocess.check_call(["make", "-s", "-C", str(ROOT), "stub", "init",
                               f"STUB={(pkg / 'upmig-stub').resolve()}",
                               f"INIT={(pkg / 'upmig-init').resolve()}"])


setup(
    name="upmig",
    version="0.1.0",
    description="ptrace-based user-level process migrator for Linux",
    license="GPL-2.0-or-later",
    python_requires=">=3.11",
    packages=find_packages(include=["upmig", "upmig.*"]),
    install_requires=["python-ptrace>=0.9.8", "cffi>=1.15", "msgpack>=1.0", "blake3>=1.0"],
    setup_requires=["cffi>=1.15"],
    cffi_modules=["csrc/build_helper.py:ffibuilder"],
    package_data={"upmig": ["upmig-stub", "upmig-init"]},
    entry_points={"console_scripts": ["upmig=upmig.cli:run"]},
    cmdclass={"build_py": BuildWithStub},
    zip_safe=False,
)
