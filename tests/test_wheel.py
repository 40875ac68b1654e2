"""The wheels and the sdist of `make wheels` install and run the way users install them.

- Each x86_64 wheel installs into a fresh venv of its CPython (3.9-3.13) with Go off PATH (PyYAML comes from the
  package index) and merges there, through the API and the `gomerge` command, from a folder outside the source tree.
- The cp311 aarch64 wheel runs a merge under qemu-aarch64 with Debian's arm64 CPython 3.11, and its outputs are
  byte-identical to those of the cp311 x86_64 wheel on this machine (with its vector kernels where the CPU has them).
- The sdist installs where Go >= 1.26 is on PATH and stops at once, saying why, where it is not.

`make test-wheels` builds the wheels and fetches the emulator first; anything missing fails these tests.
"""

from __future__ import annotations

import filecmp
import glob
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
sys.path.insert(0, os.path.join(ROOT, "tests", "platforms"))
import wheels  # noqa: E402

BUILD_FIRST = "run `make test-wheels` (or `make wheels`), which builds it first"


def _wheel(version: str, arch: str) -> str:
    found = glob.glob(os.path.join(wheels.DIST, wheels.wheel_name(version, arch)))
    assert len(found) == 1, f"expected one {wheels.wheel_name(version, arch)} in {wheels.DIST}, found {found}; " + (
        BUILD_FIRST
    )
    return found[0]


def _sdist() -> str:
    found = glob.glob(os.path.join(wheels.DIST, "gomerge-*.tar.gz"))
    assert len(found) == 1, f"expected one sdist in {wheels.DIST}, found {found}; {BUILD_FIRST}"
    return found[0]


def _env_without_go(home: str) -> dict[str, str]:
    """PATH without any folder holding a `go` command; HOME in the test's folder."""
    path = [p for p in os.environ["PATH"].split(os.pathsep) if p and not os.path.exists(os.path.join(p, "go"))]
    env = {"PATH": os.pathsep.join(path), "HOME": home, "LANG": "C.UTF-8"}
    for keep in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "PIP_CERT", "SSL_CERT_FILE"):
        if keep in os.environ:
            env[keep] = os.environ[keep]
    return env


def _venv(base: str, path: str) -> str:
    subprocess.run([base, "-m", "venv", path], check=True)
    return os.path.join(path, "bin", "python")


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


# Run by every interpreter below: merges the example adapters with the installed (or unpacked) gomerge.
MERGE_SCRIPT = textwrap.dedent("""
    import json, os, platform, sys
    import gomerge
    from example_adapters import write_all

    expect = sys.argv[1]
    assert os.path.realpath(gomerge.__file__).startswith(os.path.realpath(expect)), (gomerge.__file__, expect)
    dirs = write_all("adapters")
    runs = {
        "ties": dict(combination_type="ties", density=0.3),
        "svd": dict(combination_type="svd"),
        "dare_ties": dict(combination_type="dare_ties", density=0.5, seed=1234),
    }
    out = {"machine": platform.machine(), "kernels": gomerge.engine_kernels(), "python": platform.python_version()}
    for name, kw in runs.items():
        res = gomerge.add_weighted_adapter(dirs, [2.0, 1.0, 1.0], "merged", output_dir=os.path.join("out", name), **kw)
        out[name] = [res.rank, res.modules]
    print(json.dumps(out))
""")


@pytest.mark.parametrize("version", wheels.PYTHONS)
def test_x86_64_wheel_installs_and_runs_without_go(version, tmp_path):
    wheel = _wheel(version, "x86_64")
    py = _venv(wheels.find_python(version), str(tmp_path / "venv"))
    env = _env_without_go(str(tmp_path))
    # the wheel from dist/, its dependency (PyYAML) from the package index, as `pip install gomerge` would
    _run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", wheel], env=env, cwd=tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    site = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], env=env).stdout.strip()
    (work / "merge_check.py").write_text(MERGE_SCRIPT)
    proc = _run([py, "merge_check.py", site], cwd=work, env=dict(env, PYTHONPATH=EXAMPLES))
    out = json.loads(proc.stdout)
    assert out["python"].startswith(version + ".") and out["machine"] == "x86_64"
    assert out["ties"] == [8, 28] and out["svd"] == [8, 28] and out["dare_ties"] == [8, 28], out
    assert (work / "out" / "svd" / "adapter_model.safetensors").exists()

    gomerge = str(tmp_path / "venv" / "bin" / "gomerge")
    version_out = _run([gomerge, "--version"], cwd=work, env=env).stdout
    assert version_out.startswith("gomerge 0.1.0 (kernels: "), version_out
    assert f"kernels: {out['kernels']};" in version_out, version_out
    merged = _run(
        [gomerge, "merge", *[f"adapters/{n}" for n in ("norobots", "sql", "adcopy")], "--weights", "2", "1", "1"]
        + ["--method", "ties", "--density", "0.2", "-o", "cli-merged"],
        cwd=work,
        env=env,
    ).stdout
    assert merged.startswith("merged 3 adapters (ties) into cli-merged: rank 8, 28 modules"), merged
    inspect = _run([gomerge, "inspect", "cli-merged"], cwd=work, env=env).stdout
    assert "r=8" in inspect, inspect
    # a recipe needs PyYAML: the declared dependency was installed with the wheel
    (work / "merge.yaml").write_text(
        "adapters:\n  - source: adapters/norobots\n    weight: 2.0\n  - source: adapters/sql\n"
        "method: linear\noutput_dir: recipe-merged\n"
    )
    recipe = _run([gomerge, "merge", "--recipe", "merge.yaml"], cwd=work, env=env).stdout
    assert "into" in recipe and (work / "recipe-merged" / "adapter_config.json").exists(), recipe


def _unpack(wheel: str, dest: str) -> str:
    with zipfile.ZipFile(wheel) as z:
        z.extractall(dest)
    for so in glob.glob(os.path.join(dest, "gomerge", "_engine", "*.so")):
        os.chmod(so, 0o755)
    return dest


def test_aarch64_wheel_merges_under_qemu_like_x86_64(tmp_path):
    arm_wheel, x86_wheel = _wheel("3.11", "aarch64"), _wheel("3.11", "x86_64")
    assert os.access(wheels.QEMU, os.X_OK), f"{wheels.QEMU} is missing; {BUILD_FIRST}"
    assert os.path.exists(wheels.SYSROOT_PYTHON), f"{wheels.SYSROOT_PYTHON} is missing; {BUILD_FIRST}"
    results = {}
    for arch, wheel in (("aarch64", arm_wheel), ("x86_64", x86_wheel)):
        pkg = _unpack(wheel, str(tmp_path / f"pkg-{arch}"))
        work = tmp_path / f"work-{arch}"
        work.mkdir()
        (work / "merge_check.py").write_text(MERGE_SCRIPT)
        if arch == "aarch64":
            cmd = [wheels.QEMU, "-L", wheels.SYSROOT, wheels.SYSROOT_PYTHON]
        else:
            cmd = [wheels.find_python("3.11")]
        env = dict(_env_without_go(str(tmp_path)), PYTHONPATH=os.pathsep.join([pkg, EXAMPLES]), PYTHONNOUSERSITE="1")
        proc = _run([*cmd, "-s", "merge_check.py", pkg], cwd=work, env=env, timeout=600)
        results[arch] = json.loads(proc.stdout)
    arm, x86 = results["aarch64"], results["x86_64"]
    assert arm["machine"] == "aarch64" and arm["python"].startswith("3.11."), arm
    assert arm["kernels"] == "go", arm  # the vector kernels are amd64-only
    assert x86["machine"] == "x86_64", x86
    # the same inputs, and byte-identical outputs for every method
    for name in ("norobots", "sql", "adcopy"):
        same = filecmp.cmpfiles(
            tmp_path / "work-aarch64" / "adapters" / name,
            tmp_path / "work-x86_64" / "adapters" / name,
            ["adapter_model.safetensors", "adapter_config.json"],
            shallow=False,
        )
        assert not same[1] and not same[2], f"example adapter {name} differs: {same}"
    for method in ("ties", "svd", "dare_ties"):
        assert arm[method] == x86[method] == [8, 28], (method, arm, x86)
        a, b = tmp_path / "work-aarch64" / "out" / method, tmp_path / "work-x86_64" / "out" / method
        files = sorted(os.listdir(a))
        assert files == sorted(os.listdir(b)) and "adapter_model.safetensors" in files, (files, os.listdir(b))
        for f in files:
            assert (a / f).read_bytes() == (b / f).read_bytes(), (
                f"{method}: {f} differs between aarch64 (kernels go) and x86_64 (kernels {x86['kernels']})"
            )


def test_sdist_builds_with_go_and_stops_at_once_without(tmp_path):
    sdist = _sdist()
    go = shutil.which("go")
    assert go, "Go must be on PATH for this test"
    py = _venv(wheels.find_python("3.11"), str(tmp_path / "venv"))
    pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-cache-dir", sdist]
    # without Go: pip stops before building, with the reason and what to do instead
    no_go = subprocess.run(pip, capture_output=True, text=True, cwd=tmp_path, env=_env_without_go(str(tmp_path)))
    assert no_go.returncode != 0
    message = no_go.stdout + no_go.stderr
    assert "needs the Go toolchain on PATH" in message and "prebuilt gomerge wheel" in message, message
    assert "gopy" not in message, message  # it stopped before running gopy
    # with an old Go (a stand-in answering `go env GOVERSION`): the version is checked too
    old = tmp_path / "oldgo"
    old.mkdir()
    (old / "go").write_text("#!/bin/sh\necho go1.22.5\n")
    (old / "go").chmod(0o755)
    env = _env_without_go(str(tmp_path))
    env["PATH"] = f"{old}{os.pathsep}{env['PATH']}"
    old_go = subprocess.run(pip, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert old_go.returncode != 0
    assert "needs Go >= 1.26" in old_go.stdout + old_go.stderr and "go1.22.5" in old_go.stdout + old_go.stderr
    # with Go (and this machine's Go caches): a source build that runs
    env = dict(os.environ)
    env.pop("GOMERGE_TARGET_ARCH", None)
    env.pop("GOMERGE_CC", None)
    subprocess.run(pip, check=True, cwd=tmp_path, env=env, capture_output=True)
    version = _run([str(tmp_path / "venv" / "bin" / "gomerge"), "--version"], cwd=tmp_path, env=env).stdout
    assert version.startswith("gomerge 0.1.0 (kernels: "), version
