"""Sources beyond local folders: Hub ids through a local huggingface_hub cache with the network off, and older
`adapter_model.bin` adapters; plus Ctrl-C inside the interpreter."""

from __future__ import annotations

import _thread
import json
import os
import shutil
import sys
import threading

import numpy as np
import pytest
from peft_cases import LLAMA_ALL, MODELS, file_factors
from test_cli import _big_adapters
from test_cli import gomerge as run_cli

import gomerge

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
from example_adapters import write_all  # noqa: E402

COMMIT = "0123456789abcdef0123456789abcdef01234567"
MAIN = "89abcdef0123456789abcdef0123456789abcdef"  # what refs/main of someone/sql points to: not COMMIT


def make_hub_cache(cache: str, repo: str, adapter_dir: str, subfolder: str | None = None, commit: str = COMMIT) -> None:
    """Lays an adapter out as huggingface_hub caches it: models--{org}--{name}/refs/main + snapshots/{commit}/...
    (refs/main points to the last commit laid out)."""
    base = os.path.join(cache, "models--" + repo.replace("/", "--"))
    snap = os.path.join(base, "snapshots", commit, subfolder or "")
    os.makedirs(snap, exist_ok=True)
    os.makedirs(os.path.join(base, "refs"), exist_ok=True)
    with open(os.path.join(base, "refs", "main"), "w") as f:
        f.write(commit)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(os.path.join(adapter_dir, name), snap)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    cache = str(tmp_path / "hub")
    dirs = write_all(str(tmp_path / "adapters"))
    make_hub_cache(cache, "someone/norobots", dirs[0])
    make_hub_cache(cache, "someone/sql", dirs[1], subfolder="lora")
    # main has moved on to another adapter: only someone/sql@COMMIT is dirs[1]
    make_hub_cache(cache, "someone/sql", dirs[0], subfolder="lora", commit=MAIN)
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", cache)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return cache, dirs


def test_hub_ids_from_the_cache_offline(offline_hub, tmp_path):
    cache, dirs = offline_hub
    hub = gomerge.add_weighted_adapter(
        ["someone/norobots", dirs[2]], [2.0, 1.0], "m", "cat", output_dir=tmp_path / "from-hub"
    )
    local = gomerge.add_weighted_adapter([dirs[0], dirs[2]], [2.0, 1.0], "m", "cat", output_dir=tmp_path / "local")
    assert hub.rank == local.rank
    a, b = file_factors(str(tmp_path / "from-hub")), file_factors(str(tmp_path / "local"))
    assert all(np.array_equal(a[k][0], b[k][0]) for k in a)
    assert "`someone/norobots`" in (tmp_path / "from-hub" / "README.md").read_text()
    # a revision and a subfolder: the result is the merge of that revision's adapter, not main's
    sub = gomerge.add_weighted_adapter(
        [f"someone/sql@{COMMIT}"], [1.0], "m", subfolder="lora", output_dir=tmp_path / "s"
    )
    want = gomerge.add_weighted_adapter([dirs[1]], [1.0], "m", output_dir=tmp_path / "s-local")
    assert (sub.modules, sub.rank) == (want.modules, want.rank) == (28, 8)  # sql: 7 projections x 4 layers
    a, b = file_factors(str(tmp_path / "s")), file_factors(str(tmp_path / "s-local"))
    assert sorted(a) == sorted(b) and len(a) == 28
    for k in a:
        assert np.array_equal(a[k][0], b[k][0]) and np.array_equal(a[k][1], b[k][1]), k


def test_hub_miss_offline_is_a_clear_error(offline_hub, tmp_path):
    with pytest.raises(OSError, match="someone/unknown.*cache does not hold it"):
        gomerge.add_weighted_adapter(
            ["someone/unknown", "someone/norobots"], [1.0, 1.0], "m", output_dir=tmp_path / "o"
        )
    assert not (tmp_path / "o").exists()


def test_hub_through_the_cli(offline_hub, tmp_path):
    cache, _ = offline_hub
    env = {"HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1"}
    r = run_cli("inspect", "someone/norobots", env=env)
    assert r.returncode == 0 and "r=8" in r.stdout, r.stderr
    r = run_cli("merge", "someone/norobots", "someone/sql", "--subfolder", "lora", "-o", str(tmp_path / "x"), env=env)
    assert r.returncode == 1 and "someone/norobots" in r.stderr  # no lora/ subfolder in that repo
    r = run_cli("merge", "someone/nothing", "-o", str(tmp_path / "x"), env=env)
    assert r.returncode == 1 and "HF_HUB_OFFLINE" in r.stderr


def test_bin_adapters_are_read_through_torch(tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    def save(path, safe):
        torch.manual_seed(3)
        pm = get_peft_model(MODELS["llama"](0), LoraConfig(r=4, target_modules=LLAMA_ALL, init_lora_weights=False))
        pm.save_pretrained(path, safe_serialization=safe)

    save(str(tmp_path / "bin"), False)
    save(str(tmp_path / "st"), True)
    assert os.path.exists(tmp_path / "bin" / "adapter_model.bin")
    assert not os.path.exists(tmp_path / "bin" / "adapter_model.safetensors")
    r1 = gomerge.add_weighted_adapter([str(tmp_path / "bin")], [1.0], "m", "linear", output_dir=tmp_path / "o1")
    r2 = gomerge.add_weighted_adapter([str(tmp_path / "st")], [1.0], "m", "linear", output_dir=tmp_path / "o2")
    a, b = file_factors(str(tmp_path / "o1")), file_factors(str(tmp_path / "o2"))
    assert r1.modules == r2.modules and all(np.array_equal(a[k][1], b[k][1]) for k in a)
    assert not os.path.exists(tmp_path / "bin" / "adapter_model.safetensors")  # the source is left as it was


def test_keyboard_interrupt_in_process_leaves_nothing_and_interpreter_works(tmp_path):
    dirs = _big_adapters(tmp_path)
    out = tmp_path / "merged"
    timer = threading.Timer(1.0, _thread.interrupt_main)  # what Ctrl-C / a notebook's interrupt button does
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        gomerge.add_weighted_adapter(dirs, [1.0, 1.0, 1.0], "m", "ties_svd", density=0.2, output_dir=out)
    timer.cancel()
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".gomerge-tmp")]
    res = gomerge.add_weighted_adapter(
        write_all(str(tmp_path / "small")), [1.0, 1.0, 1.0], "m", "cat", output_dir=tmp_path / "after"
    )
    assert res.rank == 24


def test_missing_optional_libraries_are_clear_errors(tmp_path, monkeypatch):
    """Without huggingface_hub a Hub id is a missing directory that says what to do; without torch an
    adapter_model.bin is an ImportError saying what to do."""
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(FileNotFoundError, match="someone/repo: no such directory; .*pip install huggingface_hub"):
        gomerge.add_weighted_adapter(["someone/repo"], [1.0], "m", output_dir=tmp_path / "o")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (bin_dir / "adapter_model.bin").write_bytes(b"not used")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match="safe_serialization=True"):
        gomerge.add_weighted_adapter([str(bin_dir)], [1.0], "m", output_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_a_mistyped_path_is_a_missing_directory_first(tmp_path, monkeypatch):
    """A path with a slash reads as a Hub id too: when the Hub cannot give it, adapters, base and fine-tuned models
    alike (one resolver) are FileNotFoundErrors that say "no such directory", then why the Hub id did not resolve."""
    import huggingface_hub

    def unreachable(*args, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    dirs = write_all(str(tmp_path / "adapters"))
    monkeypatch.chdir(tmp_path)
    typo = "adapters/norobot"  # relative, with a slash: the shape of a Hub id
    with pytest.raises(FileNotFoundError, match="adapter adapters/norobot: no such directory; read as the Hub id"):
        gomerge.add_weighted_adapter([typo, dirs[1]], [1.0, 1.0], "m", output_dir="o")
    with pytest.raises(FileNotFoundError, match="base model models/llama: no such directory; .*could not be reached"):
        gomerge.fuse("models/llama", [dirs[0]], output_dir="f")
    with pytest.raises(FileNotFoundError, match="finetuned model models/ft: no such directory"):
        gomerge.extract(dirs[0], "models/ft", "e", rank=2)
    assert sorted(os.listdir(tmp_path)) == ["adapters"]


def test_a_mistyped_path_from_the_cli(tmp_path):
    cache = tmp_path / "empty-cache"
    cache.mkdir()
    r = run_cli(
        "merge", "adapters/norobot", "-o", "o", cwd=tmp_path, env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    )
    assert r.returncode == 1 and r.stderr.startswith("gomerge: error: adapter adapters/norobot: no such directory")
