"""Build gomerge's Go extension with gopy and copy it into a Python package folder.

Used by the Makefile (development builds into ``python/gomerge/_engine``) and by ``setup.py`` (``pip install .``
and wheels). Needs Go (with cgo and gcc), the Python headers of the target interpreter and ``pybindgen`` importable
by that interpreter; gopy and goimports are built from the versions pinned in ``go.mod``.

Usage: ``python bindings/build_engine.py DEST_DIR``
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNTIME_FILES = ("__init__.py", "bindings.py", "go.py")


def _run(cmd: list[str], env: dict[str, str], check: bool = True) -> bool:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        if check:
            raise SystemExit(f"gomerge engine build failed: {' '.join(cmd)} exited with {proc.returncode}")
    return proc.returncode == 0


def build(dest: str, python: str = sys.executable) -> list[str]:
    """Builds the extension for ``python`` and copies its runtime files into ``dest``.

    Args:
        dest (`str`): folder that becomes the ``gomerge._engine`` package.
        python (`str`): interpreter the extension is built for (gopy's ``-vm``).

    Returns:
        `list[str]`: the files written into ``dest``.
    """
    go = shutil.which("go")
    if go is None:
        raise SystemExit(
            "gomerge: building from source needs the Go toolchain (>= 1.26) on PATH; "
            "install it from https://go.dev/dl/ or install a prebuilt wheel"
        )
    env = dict(os.environ)
    tool_bin = os.path.join(ROOT, ".build", "bin")
    out = os.path.join(ROOT, ".build", "gopy")
    env["PATH"] = tool_bin + os.pathsep + env.get("PATH", "")
    env["CGO_ENABLED"] = "1"
    env["CGO_LDFLAGS_ALLOW"] = ".*"
    # the vector kernels (gomerge/kernels_simd.go) need Go's SIMD experiment; without it the portable ones are built
    experiments = [e for e in env.get("GOEXPERIMENT", "").split(",") if e]
    env["GOEXPERIMENT"] = ",".join(experiments + ([] if "simd" in experiments else ["simd"]))
    env["GOFLAGS"] = (env.get("GOFLAGS", "") + " -buildvcs=false").strip()
    os.makedirs(tool_bin, exist_ok=True)
    _run([go, "build", "-o", os.path.join(tool_bin, "goimports"), "golang.org/x/tools/cmd/goimports"], env)
    gopy = [go, "tool", "gopy", "build", f"-vm={python}", "-name=engine", f"-output={out}", "-rename=true",
            "-dynamic-link=true", "-no-make=true", "./bindings"]
    shutil.rmtree(out, ignore_errors=True)
    if not _run(gopy, env, check=False):
        # Go's SIMD package is an experiment and may change in a later Go: build the portable kernels then
        # (same results, slower); the Go tests of `make test`, run with the experiment, still report the breakage.
        sys.stderr.write("gomerge: the vector kernels did not build with this Go; building the portable ones\n")
        env["GOEXPERIMENT"] = ",".join(experiments)
        shutil.rmtree(out, ignore_errors=True)
        _run(gopy, env)
    libs = glob.glob(os.path.join(out, "_engine*.so"))
    if len(libs) != 1:
        raise SystemExit(f"gomerge engine build: expected one _engine*.so in {out}, found {libs}")
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    written = []
    for name in RUNTIME_FILES + (os.path.basename(libs[0]),):
        shutil.copy2(os.path.join(out, name), os.path.join(dest, name))
        written.append(os.path.join(dest, name))
    return written


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    for path in build(sys.argv[1]):
        print(path)
