"""The `gomerge` command line, through subprocesses: merge, recipes, inspect, exit codes, errors, Ctrl-C."""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
from example_adapters import write_all  # noqa: E402


def gomerge(*args: str, cwd=None, env=None, **kw) -> subprocess.CompletedProcess:
    e = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"))
    e.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "gomerge", *args], capture_output=True, text=True, cwd=cwd, env=e, **kw
    )


@pytest.fixture
def dirs(tmp_path):
    return write_all(str(tmp_path / "adapters"))


def test_merge_and_inspect(dirs, tmp_path):
    out = tmp_path / "merged"
    r = gomerge("merge", *dirs, "--weights", "2", "1", "1", "--method", "ties", "--density", "0.2", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "merged 3 adapters (ties)" in r.stdout and "rank 8" in r.stdout
    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "example/tiny-llama-256" and meta["library_name"] == "peft"
    assert "ties" in meta["tags"] and "density: 0.2" in card and "PeftModel.from_pretrained" in card
    r = gomerge("inspect", str(out))
    assert r.returncode == 0 and "r=8" in r.stdout and "modules        28" in r.stdout
    info = json.loads(gomerge("inspect", str(out), "--json").stdout)
    assert info["r"] == 8 and info["scaling"] == 1.0 and info["size_bytes"] > 0


def test_merge_json_and_options(dirs, tmp_path):
    r = gomerge(
        "merge",
        *dirs,
        "-m",
        "dare_ties",
        "--density",
        "0.5",
        "--seed",
        "11",
        "--dtype",
        "bfloat16",
        "-o",
        str(tmp_path / "o"),
        "--json",
        "--no-model-card",
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert (res["seed"], res["dtype"], res["combination_type"]) == (11, "bfloat16", "dare_ties")
    assert not (tmp_path / "o" / "README.md").exists()


@pytest.mark.parametrize(
    "args,code,text",
    [
        (["merge"], 2, "name at least one ADAPTER"),
        (["merge", "a", "b", "--weights", "1"], 2, "got 1 weights for 2 adapters"),
        (["merge", "a", "--method", "avg"], 2, "invalid choice"),
        (["merge", "missing/dir/x", "-o", "o"], 1, "missing/dir/x"),
        (["inspect", "nowhere"], 1, "nowhere"),
        (["frobnicate"], 2, "invalid choice"),
    ],
)
def test_errors_are_one_line_with_exit_codes(args, code, text, tmp_path):
    r = gomerge(*args, cwd=tmp_path)
    assert r.returncode == code, (r.stdout, r.stderr)
    assert text in r.stderr
    assert r.stderr.count("\n") == 1, r.stderr  # one clear line
    assert r.stderr.startswith("gomerge: error: ")


@pytest.mark.parametrize(
    "args",
    [
        ["merge", "a", "b"],
        ["resize", "a", "--rank", "4"],
        ["extract", "base", "finetuned", "--rank", "4"],
        ["fuse", "base", "a"],
    ],
)
def test_every_writing_command_requires_an_output_dir(args, tmp_path):
    r = gomerge(*args, cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.startswith("gomerge: error: give -o/--output-dir") and f"gomerge {args[0]} --help" in r.stderr
    assert r.stderr.count("\n") == 1 and os.listdir(tmp_path) == []  # nothing written, no ./merged


def test_existing_output_fails_cleanly(dirs, tmp_path):
    (tmp_path / "o").mkdir()
    r = gomerge("merge", *dirs, "-o", str(tmp_path / "o"))
    assert r.returncode == 1 and "--overwrite" not in r.stdout and "already exists" in r.stderr
    assert gomerge("merge", *dirs, "-o", str(tmp_path / "o"), "--overwrite").returncode == 0


def test_errors_and_warnings_speak_in_flags(dirs, tmp_path):
    (tmp_path / "o").mkdir()
    r = gomerge("merge", *dirs, "-o", str(tmp_path / "o"))
    assert "pass --overwrite to replace it" in r.stderr and "overwrite=True" not in r.stderr
    r = gomerge("merge", *dirs, "--method", "svd", "--svd-rank", "0", "-o", str(tmp_path / "x"))
    assert r.stderr.startswith("gomerge: error: --svd-rank: must be a positive integer"), r.stderr
    assert "svd_rank" not in r.stderr and "None" not in r.stderr
    r = gomerge("resize", dirs[0], "--rank", "0", "-o", str(tmp_path / "x"))
    assert r.returncode == 1 and r.stderr.startswith("gomerge: error: --rank: must be a positive integer"), r.stderr
    r = gomerge("resize", dirs[0], "--energy", "1.5", "-o", str(tmp_path / "x"))
    assert r.stderr.startswith("gomerge: error: --energy: 1.5: "), r.stderr
    r = gomerge("merge", *dirs, "--method", "ties", "--lambda", "2", "--density", "0.5", "-o", str(tmp_path / "x"))
    assert '--lambda: --method "ties" does not take --lambda (it takes: --density, --majority-sign-method' in r.stderr
    r = gomerge("merge", dirs[0], "--method", "ties", "--density", "0.5", "-o", str(tmp_path / "one"))
    assert r.returncode == 0, r.stderr
    assert r.stderr == 'gomerge: warning: one adapter only: --method "ties" is replaced by "linear", as PEFT does\n'
    # with a recipe, the messages keep the recipe's key names
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"adapters:\n  - source: {dirs[0]}\n  - source: {dirs[1]}\nsvd_rank: 0\noutput_dir: y\n")
    assert "svd_rank: must be a positive integer" in gomerge("merge", "--recipe", str(recipe)).stderr


def test_help_reads_like_a_manual():
    top = gomerge("--help").stdout
    assert "exit status" in top and "gomerge merge" in top and "gomerge inspect" in top
    sub = gomerge("merge", "--help").stdout
    for option in (
        "--density",
        "--svd-rank",
        "--svd-clamp",
        "--majority-sign-method",
        "--seed",
        "--dtype",
        "--overwrite",
        "--json",
        "--recipe",
        "recipe file (YAML)",
    ):
        assert option in sub


def test_every_subcommand_documents_its_arguments_and_shows_examples():
    from gomerge.cli import build_parser

    parser = build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(subcommands) == {"merge", "resize", "extract", "fuse", "export", "inspect"}
    for name, sub in subcommands.items():
        for action in sub._actions:
            assert action.help, f"gomerge {name}: {action.option_strings or action.dest} has no help"
        text = gomerge(name, "--help").stdout
        assert "examples:\n  gomerge " + name in text, text


def test_summaries_count_in_words(dirs, tmp_path):
    one = gomerge("merge", dirs[0], "-o", str(tmp_path / "one"))
    assert one.stdout.startswith("merged 1 adapter (linear) into "), one.stdout
    three = gomerge("merge", *dirs, "--method", "cat", "-o", str(tmp_path / "three"))
    assert three.stdout.startswith("merged 3 adapters (cat) into ") and "28 modules" in three.stdout


def test_resize_above_the_adapters_rank_keeps_its_rank(dirs, tmp_path):
    r = gomerge("resize", dirs[1], "--rank", "16", "-o", str(tmp_path / "r16"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["rank"] == 8  # not a zero-padded rank 16
    assert r.stderr.startswith("gomerge: warning: resize: rank 16 is above the largest rank of "), r.stderr
    assert json.loads((tmp_path / "r16" / "adapter_config.json").read_text())["r"] == 8


def test_adapters_of_different_base_models_warn(dirs, tmp_path):
    config = os.path.join(dirs[2], "adapter_config.json")
    cfg = json.load(open(config))
    cfg["base_model_name_or_path"] = "someone/other-base"
    json.dump(cfg, open(config, "w"))
    r = gomerge("merge", *dirs, "--method", "cat", "-o", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    assert "gomerge: warning: adapters " in r.stderr
    assert "different base models (example/tiny-llama-256 and someone/other-base" in r.stderr


def expected_kernels() -> str:
    """The kernel set the engine must choose here: GOMERGE_EXPECT_KERNELS (set by `make test-cpus` for each emulated
    CPU level) or the fastest one that /proc/cpuinfo's flags allow."""
    if os.environ.get("GOMERGE_EXPECT_KERNELS"):
        return os.environ["GOMERGE_EXPECT_KERNELS"]
    flags: set[str] = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    if platform.machine() != "x86_64":
        return "go"
    if {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        return "avx512"
    return "avx2" if {"avx", "avx2"} <= flags else "go"


def test_version_names_the_kernels():
    out = gomerge("--version").stdout.strip()
    version, kernels = out.removeprefix("gomerge ").split(" (kernels: ")
    import gomerge as package

    assert version == package.__version__ == package.engine_version()
    in_use, runnable = kernels.rstrip(")").split("; this CPU runs: ")
    assert in_use == expected_kernels() == package.engine_kernels()
    assert runnable.split(", ")[-1] == in_use and runnable.split(", ")[0] == "go"


def test_forced_kernels_give_identical_merges(dirs, tmp_path):
    import gomerge as package

    runnable = package._native.kernel_info()["runnable"]
    assert runnable[0] == "go" and expected_kernels() in runnable
    if len(runnable) == 1:
        pytest.skip("this CPU runs only the portable kernels: no other set to compare them with")
    outputs = {}
    for name in runnable:
        env = dict(os.environ, GOMERGE_KERNELS=name)
        assert gomerge("--version", env=env).stdout.split("(kernels: ")[1].startswith(name + ";")
        out = tmp_path / name
        merged = gomerge(
            "merge", *dirs, "--weights", "2", "1", "1", "--method", "ties", "--density", "0.3", "-o", str(out), env=env
        )
        assert merged.returncode == 0, merged.stderr
        outputs[name] = (out / "adapter_model.safetensors").read_bytes()
    assert sorted(outputs) == sorted(runnable) and len(outputs) >= 2
    for name, data in outputs.items():
        assert data == outputs["go"], f"{name} kernels give another result than the portable ones"


def test_unknown_or_unavailable_kernels_are_clear_errors(dirs, tmp_path):
    env = dict(os.environ, GOMERGE_KERNELS="neon")
    version = gomerge("--version", env=env)
    assert version.returncode == 2
    assert 'GOMERGE_KERNELS="neon" is not a kernel set' in version.stderr
    merged = gomerge("merge", *dirs, "--method", "linear", "-o", str(tmp_path / "out"), env=env)
    assert merged.returncode == 2 and "GOMERGE_KERNELS" in merged.stderr  # an environment error, as for --version
    assert not (tmp_path / "out").exists()
    script = (
        "import gomerge\ntry:\n    gomerge.engine_kernels()\nexcept ValueError as e:\n    print('ValueError:', e)\n"
    )
    for name in ("avx2", "avx512"):
        import gomerge as package

        if name in package._native.kernel_info()["runnable"]:
            continue
        proc = subprocess.run(
            [sys.executable, "-c", script], env=dict(os.environ, GOMERGE_KERNELS=name), capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("ValueError: GOMERGE_KERNELS=" + name), proc.stdout


def test_recipe(dirs, tmp_path):
    recipe = tmp_path / "merge.yaml"
    recipe.write_text(f"""\
adapters:
  - source: {dirs[0]}
    weight: 2.0
  - source: {dirs[1]}
  - {dirs[2]}
method: ties
density: 0.3
output_dir: out
""")
    r = gomerge("merge", "--recipe", str(recipe), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["output_dir"] == str(tmp_path / "out") and res["combination_type"] == "ties"
    assert "| 2 |" in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.parametrize(
    "body,line,text",
    [
        ("adapters:\n  - source: a\nmethd: ties\n", 3, "unknown key 'methd'"),
        ("adapters:\n  - source: a\n    wieght: 2\n", 3, "unknown key 'wieght'"),
        ("adapters:\n  - source: a\n    weight: heavy\n", 3, "weights[0]: 'heavy' is not a number"),
        ("adapters: []\n", 1, "non-empty list"),
        ("method: ties\n", 1, "'adapters' is missing"),
        ("adapters:\n  - source: a\nmethod: average\n", 3, "unknown method 'average'"),
        ("adapters:\n  - source: a\ndensity: [1]\n", 3, "must be a number"),
        ("adapters:\n  - weight: 1\n", 2, "'source'"),
        ("adapters:\n  - source: a\n  bad indent: [\n", 3, "not valid YAML"),
    ],
)
def test_bad_recipes_name_line_and_key(body, line, text, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(body)
    r = gomerge("merge", "--recipe", str(recipe))
    assert r.returncode == 2, r.stderr
    assert f"recipe.yaml:{line}" in r.stderr and text in r.stderr, r.stderr


def _big_adapters(root, n_modules=120, size=2048, rank=16):
    """Three adapters whose ties_svd merge takes seconds (by default 120 modules of 2048 x 2048, ~8 s here)."""
    rng = np.random.default_rng(0)
    dirs = []
    for i in range(3):
        d = root / f"big{i}"
        d.mkdir(parents=True)
        t = {}
        for m in range(n_modules):
            key = f"base_model.model.layers.{m}.proj"
            t[key + ".lora_A.weight"] = rng.standard_normal((rank, size), dtype=np.float32)
            t[key + ".lora_B.weight"] = rng.standard_normal((size, rank), dtype=np.float32)
        save_file(t, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
        (d / "adapter_config.json").write_text(
            json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": ["proj"]})
        )
        dirs.append(str(d))
    return dirs


def test_ctrl_c_stops_the_merge_and_leaves_nothing(tmp_path):
    dirs = _big_adapters(tmp_path)
    out = tmp_path / "merged"
    e = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "gomerge", "merge", *dirs, "-m", "ties_svd", "--density", "0.2", "-o", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=e,
    )
    time.sleep(2.0)  # well into the merge
    assert proc.poll() is None, "the merge finished before it could be interrupted"
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    stopped = time.monotonic() - t0
    print(f"stopped {stopped:.2f} s after SIGINT")  # well under a second here; not asserted (noisy machines)
    assert stopped < 5.0, "the merge ran on after SIGINT"  # the whole merge takes about 8 s
    assert proc.returncode == 130 and "interrupted" in err
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".gomerge-tmp")]
