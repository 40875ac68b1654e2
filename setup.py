"""Builds the Go extension during `pip install .` / `pip wheel .` (the metadata lives in pyproject.toml)."""

import os
import sys

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "bindings"))
import build_engine  # noqa: E402


class BuildPyWithEngine(build_py):
    """Runs gopy on ./bindings and puts the extension into the package as gomerge/_engine."""

    def run(self) -> None:
        super().run()
        build_engine.build(os.path.join(self.build_lib, "gomerge", "_engine"), python=sys.executable)


class BinaryDistribution(Distribution):
    """The package holds a compiled library: wheels are platform-specific."""

    def has_ext_modules(self) -> bool:
        return True


setup(cmdclass={"build_py": BuildPyWithEngine}, distclass=BinaryDistribution)
