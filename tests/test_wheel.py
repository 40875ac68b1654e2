"""`pip wheel .` builds a wheel that installs and runs in a fresh virtualenv without Go on PATH."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_installs_and_merges_without_go(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), ROOT], check=True)
    wheels = glob.glob(str(dist / "gomerge-*.whl"))
    assert len(wheels) == 1
    assert "linux" in os.path.basename(wheels[0]), "the wheel must be platform-specific"

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", wheels[0]], check=True)

    # PATH without Go, run from a folder outside the source tree
    go = shutil.which("go")
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if not go or os.path.dirname(go) != p)
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.join(ROOT, "examples")!r})
        import gomerge
        assert "site-packages" in gomerge.__file__, gomerge.__file__
        from example_adapters import write_all
        dirs = write_all("adapters")
        res = gomerge.add_weighted_adapter(dirs, [2.0, 1.0, 1.0], "merged", "svd")
        print(res.rank, res.modules)
    """)
    env = {"PATH": path, "HOME": str(tmp_path)}
    proc = subprocess.run([py, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["8", "28"]
    assert (tmp_path / "merged" / "adapter_model.safetensors").exists()
    # the console script is installed and runs
    cli = subprocess.run(
        [str(venv / "bin" / "gomerge"), "inspect", str(tmp_path / "merged")], env=env, capture_output=True, text=True
    )
    assert cli.returncode == 0 and "r=8" in cli.stdout, cli.stderr
