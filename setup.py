"""Builds the Go extension during `pip install .` / `pip wheel .` (the metadata lives in pyproject.toml).

``GOMERGE_TARGET_ARCH`` (``x86_64`` / ``aarch64``) and ``GOMERGE_CC`` choose the target and cgo's C compiler (see
``bindings/build_engine.py``); a wheel built for another architecture is tagged ``linux_<arch>``, which auditwheel
then repairs to a manylinux tag (``tests/platforms/wheels.py``, ``make wheels``).
"""

import os
import sys

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "bindings"))
import build_engine  # noqa: E402

# commands that compile the extension: without Go >= 1.26 they stop here, before anything is built
BUILD_COMMANDS = {"build", "build_py", "bdist_wheel", "install", "develop", "editable_wheel", "bdist_egg"}
if BUILD_COMMANDS.intersection(sys.argv[1:]):
    build_engine.check_go()

ARCH = build_engine.target_arch()
OPTIONS = {"bdist_wheel": {"plat_name": f"linux_{ARCH}"}} if os.environ.get("GOMERGE_TARGET_ARCH") else {}


class BuildPyWithEngine(build_py):
    """Runs gopy on ./bindings and puts the extension into the package as gomerge/_engine."""

    def run(self) -> None:
        super().run()
        build_engine.build(os.path.join(self.build_lib, "gomerge", "_engine"), python=sys.executable, arch=ARCH)


class BinaryDistribution(Distribution):
    """The package holds a compiled library: wheels are platform-specific."""

    def has_ext_modules(self) -> bool:
        return True


setup(cmdclass={"build_py": BuildPyWithEngine}, distclass=BinaryDistribution, options=OPTIONS)
