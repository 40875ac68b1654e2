"""Build gomerge's Go extension with gopy and copy it into a Python package folder.

Used by the Makefile (development builds into ``python/gomerge/_engine``), by ``setup.py`` (``pip install .``, the
sdist and wheels) and so by ``tests/platforms/wheels.py`` (the manylinux wheels). Needs Go >= 1.26 with cgo and a C
compiler, the Python headers of the target interpreter and ``pybindgen`` importable by that interpreter; gopy and
goimports are built from the versions pinned in ``go.mod``.

Two environment variables (or the arguments of `build`) choose the target:

- ``GOMERGE_TARGET_ARCH``: ``x86_64`` or ``aarch64`` (default: this machine's). Another architecture than this
  machine's is cross-built: gopy runs natively (it executes what it builds), then its final
  ``go build -buildmode=c-shared`` is rerun with ``GOARCH`` set, the flags gopy used and ``GOMERGE_CC``; the file
  gets the target's suffix (``_engine.cpython-311-aarch64-linux-gnu.so``).
- ``GOMERGE_CC``: cgo's C compiler for the target (for wheels, zig with a glibc 2.17 target). When it is set the
  final link is redone too, without the build interpreter's ``-L`` / ``-rpath`` (the extension is dynamically
  linked against no libpython, so they only leak the build machine's paths into a wheel) and stripped.

Usage: ``python bindings/build_engine.py DEST_DIR``
"""

from __future__ import annotations

import glob
import os
import platform
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNTIME_FILES = ("__init__.py", "bindings.py", "go.py")
GO_MIN = (1, 26)
# target architecture (as Python and wheel tags name it) -> GOARCH
ARCHES = {"x86_64": "amd64", "aarch64": "arm64"}
INSTALL_GO = (
    "install Go >= {min} from https://go.dev/dl/ and put it on PATH, or install a prebuilt gomerge wheel "
    "(manylinux: x86_64 or aarch64 Linux, CPython 3.9-3.13), which needs no Go"
)


def _run(cmd: list[str], env: dict[str, str], check: bool = True, cwd: str = ROOT) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        if check:
            raise SystemExit(f"gomerge engine build failed: {' '.join(cmd)} exited with {proc.returncode}")
    return proc


def check_go() -> str:
    """Returns the path of the ``go`` command, or stops with a message when Go is missing or older than 1.26."""
    need = ".".join(map(str, GO_MIN))
    go = shutil.which("go")
    if go is None:
        raise SystemExit(f"gomerge: building from source needs the Go toolchain on PATH; {INSTALL_GO.format(min=need)}")
    try:
        version = subprocess.run([go, "env", "GOVERSION"], capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        version = ""
    m = re.match(r"go(\d+)\.(\d+)", version)
    if not m or (int(m.group(1)), int(m.group(2))) < GO_MIN:
        raise SystemExit(
            f"gomerge: building from source needs Go >= {need}, but {go} is {version or 'not a working Go'}; "
            + INSTALL_GO.format(min=need)
        )
    return go


def host_arch() -> str:
    """This machine's architecture as wheel tags name it (``x86_64``, ``aarch64``)."""
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def target_arch(arch: str | None = None) -> str:
    """The architecture to build for: ``arch``, else ``GOMERGE_TARGET_ARCH``, else this machine's."""
    arch = arch or os.environ.get("GOMERGE_TARGET_ARCH") or host_arch()
    if arch not in ARCHES and arch != host_arch():
        raise SystemExit(f"gomerge: GOMERGE_TARGET_ARCH={arch!r} is not one of {', '.join(ARCHES)}")
    return arch


def _flag(output: str, name: str) -> str:
    """The value of ``NAME=...`` that gopy prints before its final build (the flags it gives cgo)."""
    values = [line[len(name) + 1 :] for line in output.splitlines() if line.startswith(name + "=")]
    if len(values) != 1:
        raise SystemExit(f"gomerge engine build: gopy's output names {name} {len(values)} times, expected once")
    return values[0]


def _portable_ldflags(flags: str) -> str:
    """Link flags without the build interpreter's library folders (``-L...``, ``-Wl,-rpath,...``)."""
    return " ".join(f for f in flags.split() if not f.startswith(("-L", "-Wl,-rpath", "-Wl,--rpath")))


def _relink(out: str, gopy_output: str, python: str, arch: str, cc: str | None, env: dict[str, str]) -> None:
    """Reruns gopy's final ``go build -buildmode=c-shared`` in ``out`` for ``arch`` with ``cc``."""
    suffix = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    native = f"{host_arch()}-linux-gnu"
    if arch != host_arch():
        if native not in suffix:
            raise SystemExit(f"gomerge engine build: cannot derive the {arch} suffix from {python}'s {suffix!r}")
        suffix = suffix.replace(native, f"{arch}-linux-gnu")
    engine_go = os.path.join(out, "engine.go")
    with open(engine_go, encoding="utf-8") as f:
        source = f.read()
    source = re.sub(
        r"^#cgo LDFLAGS:(.*)$", lambda m: "#cgo LDFLAGS: " + _portable_ldflags(m.group(1)), source, flags=re.M
    )
    with open(engine_go, "w", encoding="utf-8") as f:
        f.write(source)
    for old in glob.glob(os.path.join(out, "_engine*")):
        os.remove(old)
    env = dict(env)
    env.update(
        GOARCH=ARCHES[arch],
        CGO_ENABLED="1",
        CGO_CFLAGS=_flag(gopy_output, "CGO_CFLAGS"),
        CGO_LDFLAGS=_portable_ldflags(_flag(gopy_output, "CGO_LDFLAGS")),
    )
    if cc:
        env["CC"] = cc
    cmd = ["go", "build", "-mod=mod", "-buildmode=c-shared", "-ldflags=-s -w", "-o", f"_engine{suffix}", "."]
    _run(cmd, env, cwd=out)


def build(dest: str, python: str = sys.executable, arch: str | None = None, cc: str | None = None) -> list[str]:
    """Builds the extension for ``python`` and copies its runtime files into ``dest``.

    Args:
        dest (`str`): folder that becomes the ``gomerge._engine`` package.
        python (`str`): interpreter the extension is built for (gopy's ``-vm``).
        arch (`str`, *optional*): target architecture, ``x86_64`` or ``aarch64``; default ``GOMERGE_TARGET_ARCH``,
            else this machine's.
        cc (`str`, *optional*): cgo's C compiler for the target; default ``GOMERGE_CC``, else Go's default.

    Returns:
        `list[str]`: the files written into ``dest``.
    """
    go = check_go()
    arch = target_arch(arch)
    cc = cc or os.environ.get("GOMERGE_CC") or None
    cross = arch != host_arch()
    if cross and not cc:
        raise SystemExit(f"gomerge: cross-building for {arch} needs a C compiler for it in GOMERGE_CC")
    env = dict(os.environ)
    tool_bin = os.path.join(ROOT, ".build", "bin")
    out = os.path.join(ROOT, ".build", "gopy")
    env["PATH"] = tool_bin + os.pathsep + env.get("PATH", "")
    env["CGO_ENABLED"] = "1"
    env["CGO_LDFLAGS_ALLOW"] = ".*"
    env.pop("GOARCH", None)  # gopy and goimports run here
    if cross:
        env.pop("CC", None)  # gopy builds (and loads) a native library first
    elif cc:
        env["CC"] = cc
    # the vector kernels (gomerge/kernels/) need Go's SIMD experiment; without it the portable ones are built
    experiments = [e for e in env.get("GOEXPERIMENT", "").split(",") if e]
    env["GOEXPERIMENT"] = ",".join(experiments + ([] if "simd" in experiments else ["simd"]))
    env["GOFLAGS"] = (env.get("GOFLAGS", "") + " -buildvcs=false").strip()
    os.makedirs(tool_bin, exist_ok=True)
    _run([go, "build", "-o", os.path.join(tool_bin, "goimports"), "golang.org/x/tools/cmd/goimports"], env)
    gopy = [
        go,
        "tool",
        "gopy",
        "build",
        f"-vm={python}",
        "-name=engine",
        f"-output={out}",
        "-rename=true",
        "-dynamic-link=true",
        "-no-make=true",
        "./bindings",
    ]
    shutil.rmtree(out, ignore_errors=True)
    proc = _run(gopy, env, check=False)
    if proc.returncode != 0:
        # Go's SIMD package is an experiment and may change in a later Go: build the portable kernels then
        # (same results, slower); the Go tests of `make test`, run with the experiment, still report the breakage.
        sys.stderr.write("gomerge: the vector kernels did not build with this Go; building the portable ones\n")
        env["GOEXPERIMENT"] = ",".join(e for e in experiments if e != "simd")  # also when the caller asked for it
        shutil.rmtree(out, ignore_errors=True)
        proc = _run(gopy, env)
    if cross or cc:
        _relink(out, proc.stdout, python, arch, cc, env)
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
