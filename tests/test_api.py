"""The Python API around the merge: result object, dtypes, warnings, inspect, file format."""

from __future__ import annotations

import json
import os
import struct
import sys
import warnings

import pytest
import torch
from peft_cases import LLAMA_ALL, AdapterSpec, make_adapter
from safetensors import safe_open

import gomerge

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
from example_adapters import write_all  # noqa: E402


@pytest.fixture(scope="module")
def bf16_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    return [
        make_adapter(
            "llama",
            AdapterSpec(dict(r=4, lora_alpha=8, target_modules=LLAMA_ALL), s, torch.bfloat16),
            str(root / f"a{s}"),
        )
        for s in (1, 2)
    ]


def _header(path: str) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def test_result_and_file_format(tmp_path):
    dirs = write_all(str(tmp_path / "in"))
    res = gomerge.add_weighted_adapter(dirs, [2.0, 1.0, 1.0], "merge", "cat", output_dir=tmp_path / "out")
    assert isinstance(res, gomerge.MergeResult)
    assert (res.rank, res.modules, res.combination_type, res.dtype) == (24, 28, "cat", "float32")
    assert res.seconds > 0 and res.adapter_name == "merge"
    assert "<table>" in res._repr_html_()
    header = _header(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert header["__metadata__"] == {"format": "pt"}
    assert len([k for k in header if k != "__metadata__"]) == 2 * 28


def test_output_dir_defaults_to_adapter_name(tmp_path, monkeypatch):
    dirs = write_all(str(tmp_path / "in"))
    monkeypatch.chdir(tmp_path)
    res = gomerge.add_weighted_adapter(dirs, [1.0, 1.0, 1.0], "my-merge")
    assert res.output_dir == "my-merge" and (tmp_path / "my-merge" / "adapter_config.json").exists()


@pytest.mark.parametrize(
    "dtype,expected",
    [(None, torch.bfloat16), ("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16)],
)
def test_output_dtype(bf16_dirs, tmp_path, dtype, expected):
    out = tmp_path / "out"
    res = gomerge.add_weighted_adapter(bf16_dirs, [1.0, 1.0], "m", "svd", dtype=dtype, output_dir=out)
    assert res.dtype == str(expected).removeprefix("torch.")
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {expected}


def test_single_adapter_forces_linear_with_warning(tmp_path):
    dirs = write_all(str(tmp_path / "in"))
    with pytest.warns(UserWarning, match='replaced by "linear"'):
        res = gomerge.add_weighted_adapter(dirs[:1], [1.0], "m", "svd", output_dir=tmp_path / "out")
    assert res.combination_type == "linear"


def test_inspect_adapter(tmp_path):
    dirs = write_all(str(tmp_path / "in"))
    info = gomerge.inspect_adapter(dirs[1])
    assert info["r"] == 8 and info["lora_alpha"] == 8 and info["modules"] == 28
    assert info["ranks"] == {"8": 28}
    assert info["dtype"] == "float32" and info["base_model"] == "example/tiny-llama-256"
    with pytest.raises(FileNotFoundError):
        gomerge.inspect_adapter(tmp_path / "missing")


def test_progress_bar_can_be_forced_and_disabled(tmp_path, capsys):
    dirs = write_all(str(tmp_path / "in"))
    gomerge.add_weighted_adapter(dirs, [1.0, 1.0, 1.0], "m", "cat", output_dir=tmp_path / "a", progress=True)
    assert "module" in capsys.readouterr().err
    gomerge.add_weighted_adapter(dirs, [1.0, 1.0, 1.0], "m", "cat", output_dir=tmp_path / "b", progress=False)
    assert capsys.readouterr().err == ""


def test_forked_child_is_refused_not_hung(tmp_path):
    dirs = write_all(str(tmp_path / "in"))
    pid = os.fork()
    if pid == 0:  # child: must get a clear error, never reach the Go runtime
        try:
            gomerge.add_weighted_adapter(dirs, [1.0, 1.0, 1.0], "m", output_dir=str(tmp_path / "child"))
        except RuntimeError as e:
            os._exit(0 if "spawn" in str(e) else 2)
        except BaseException:
            os._exit(3)
        os._exit(4)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert not (tmp_path / "child").exists()


def test_results_print_as_a_short_summary(tmp_path):
    dirs = write_all(str(tmp_path / "adapters"))
    res = gomerge.add_weighted_adapter(dirs, [1.0, 1.0, 1.0], "m", "svd", output_dir=tmp_path / "out")
    text = str(res)
    assert text == repr(res) and "\n" not in text and len(text) < 300, text
    assert "rank=8" in text and "modules=28" in text and "module_ranks=<28 items>" in text
    assert len(res.module_ranks) == len(res.module_errors) == 28  # the details stay in the attributes
    many = {f"model.layers.{i}.mlp.down_proj": 4 for i in range(500)}
    extract = gomerge.ExtractResult("o", 4, 500, "float32", 1.0, 0, module_ranks=many, unchanged=list(many))
    assert "module_ranks=<500 items>" in repr(extract) and "unchanged=<500 items>" in repr(extract)
    assert len(repr(extract)) < 300 and extract.module_ranks is many
    changed = [{"tensor": name, "ops": ["lora"]} for name in many]
    fuse = gomerge.FuseResult(
        "o", "base", ["a", "b"], "cat", False, 500, changed, ["model.safetensors"], 1, False, False, 1.0
    )
    assert "adapters=['a', 'b']" in repr(fuse) and "changed=<500 items>" in repr(fuse) and len(repr(fuse)) < 400


def test_without_tqdm_a_long_job_hints_once(tmp_path, monkeypatch):
    from gomerge import _native

    dirs = write_all(str(tmp_path / "adapters"))
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    monkeypatch.setattr(_native, "_hinted", False)
    _native._tqdm.cache_clear()
    try:
        with pytest.warns(UserWarning, match=r"no progress bar: tqdm is not installed \(pip install tqdm"):
            gomerge.add_weighted_adapter(dirs, [1.0, 1.0, 1.0], "m", "cat", output_dir=tmp_path / "a", progress=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per process
            gomerge.add_weighted_adapter(dirs, [1.0, 1.0, 1.0], "m", "cat", output_dir=tmp_path / "b", progress=True)
    finally:
        _native._tqdm.cache_clear()


def test_tqdm_auto_only_with_ipywidgets(monkeypatch):
    """tqdm.auto in Jupyter without ipywidgets warns a TqdmWarning: plain tqdm is used then."""
    import tqdm  # installed with transformers (tests/requirements.txt)

    from gomerge import _native

    monkeypatch.setitem(sys.modules, "ipywidgets", None)
    _native._tqdm.cache_clear()
    try:
        assert _native._tqdm() is tqdm.tqdm
    finally:
        _native._tqdm.cache_clear()
