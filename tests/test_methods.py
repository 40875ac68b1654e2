"""The engine's method table and strict request schema, and `task_arithmetic` against torch and PEFT."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from peft import PeftModel
from peft_cases import (
    LLAMA_ALL,
    PEFT_TYPES,
    AdapterSpec,
    assert_reloads_as,
    delta,
    dense_updates,
    file_factors,
    llama,
    make_adapter,
)

import gomerge
from gomerge import _native, recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Three Llama adapters of ranks 4, 8 and 6 (alpha 8, 16, 6; one with rsLoRA) on every linear module."""
    root = tmp_path_factory.mktemp("mixed")
    specs = [
        AdapterSpec(dict(r=4, lora_alpha=8, target_modules=LLAMA_ALL), seed=1),
        AdapterSpec(dict(r=8, lora_alpha=16, target_modules=LLAMA_ALL, use_rslora=True), seed=2),
        AdapterSpec(dict(r=6, lora_alpha=6, target_modules=["q_proj", "v_proj"]), seed=3),
    ]
    return [make_adapter("llama", s, str(root / f"a{i}")) for i, s in enumerate(specs)]


def dense_sum(dirs: list[str], weights: list[float], lam: float) -> dict[str, np.ndarray]:
    """torch, in float64: lambda * sum_i w_i s_i B_i A_i per module."""
    return {k: v.numpy() for k, v in dense_updates(dirs, weights, lam).items()}


def test_every_method_is_reachable_from_the_api_the_cli_and_recipes(mixed, tmp_path):
    table = gomerge.methods()
    names = [m["name"] for m in table]
    assert len(set(names)) == len(names), "a method is listed twice"
    # the methods marked as PEFT's are exactly the types PEFT's own signature names (its Literal annotation)
    assert len(PEFT_TYPES) == 11
    assert sorted(m["name"] for m in table if m["peft"]) == sorted(PEFT_TYPES)
    assert "task_arithmetic" in names
    doc = open(os.path.join(ROOT, "docs", "choosing-a-method.md")).read()
    assert [n for n in names if f"`{n}`" not in doc] == [], "methods missing from docs/choosing-a-method.md"
    equal = [mixed[0], mixed[0] + "-copy"]
    import shutil

    shutil.copytree(mixed[0], equal[1])
    help_text = subprocess.run(
        [sys.executable, "-m", "gomerge", "merge", "--help"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python")),
    ).stdout
    for m in table:
        kw = {"density": 0.5} if m["pruning"] else {}
        if m["random"]:
            kw["seed"] = 1  # the other methods refuse a seed
        dirs = equal if m["family"] == "factors" else mixed  # the factor-wise methods need equal ranks
        res = gomerge.add_weighted_adapter(
            dirs, [1.0] * len(dirs), "m", m["name"], output_dir=str(tmp_path / m["name"]), **kw
        )
        assert res.combination_type == m["name"] and res.modules > 0
        assert m["name"] in help_text
        path = tmp_path / f"{m['name']}.yaml"
        path.write_text(f"adapters:\n  - source: {dirs[0]}\n  - source: {dirs[1]}\nmethod: {m['name']}\n")
        assert recipe.load_recipe(str(path)).options["combination_type"] == m["name"]
        assert m["doc"] and isinstance(m["params"], list)
    # unknown names: refused by all three, with the list of methods
    with pytest.raises(ValueError, match="combination_type: invalid value 'avg'|invalid value \"avg\""):
        gomerge.add_weighted_adapter(mixed, [1, 1, 1], "m", "avg", output_dir=str(tmp_path / "avg"))
    cli = subprocess.run(
        [sys.executable, "-m", "gomerge", "merge", *mixed, "--method", "avg", "-o", str(tmp_path / "avg")],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python")),
    )
    assert cli.returncode == 2 and "avg" in cli.stderr
    bad = tmp_path / "avg.yaml"
    bad.write_text(f"adapters:\n  - source: {mixed[0]}\nmethod: avg\n")
    with pytest.raises(recipe.RecipeError, match="unknown method 'avg'"):
        recipe.load_recipe(str(bad))
    assert not (tmp_path / "avg").exists()


def _captured_requests(monkeypatch) -> dict[str, dict]:
    seen: dict[str, dict] = {}
    real_merge, real_tensors = _native.merge_start, _native.merge_tensors_start

    def merge_start(request):
        seen["merge"] = request
        return real_merge(request)

    def merge_tensors_start(request):
        seen["merge_tensors"] = request
        return real_tensors(request)

    monkeypatch.setattr(_native, "merge_start", merge_start)
    monkeypatch.setattr(_native, "merge_tensors_start", merge_tensors_start)
    return seen


def test_keys_python_sends_and_reads_equal_the_engines(mixed, tmp_path, monkeypatch):
    keys = _native.request_keys()
    seen = _captured_requests(monkeypatch)
    gomerge.add_weighted_adapter(mixed, [1, 1, 1], "m", "cat", output_dir=str(tmp_path / "cat"))
    assert sorted(seen["merge"]) == sorted(keys["merge"])
    assert sorted(f.name for f in dataclasses.fields(gomerge.MergeResult)) == sorted(keys["result"])

    import gomerge.peft as gp

    model = PeftModel.from_pretrained(llama(0), mixed[0], adapter_name="a0")
    model.load_adapter(mixed[1], adapter_name="a1")
    gp.add_weighted_adapter(model, ["a0", "a1"], [1.0, 1.0], "g", "svd")
    sent = seen["merge_tensors"]
    assert sorted(sent) == sorted(keys["merge_tensors"])
    assert sorted(sent["modules"][0]) == sorted(keys["tensor_module"])
    source_keys = set(keys["tensor_source"]) - {"mask_a", "mask_b", "mask_dw"}  # masks: only for DARE from torch
    assert source_keys <= set(sent["modules"][0]["sources"][0]) <= set(keys["tensor_source"])


def test_unknown_request_keys_are_value_errors_naming_them(mixed, tmp_path):
    request = {"adapters": mixed, "weights": [1, 1, 1], "output_dir": str(tmp_path / "o"), "densty": 0.2}
    with pytest.raises(ValueError, match='unknown key "densty"'):
        _native.run_job(_native.merge_start(request), False)
    with pytest.raises(ValueError, match='unknown key "output_dir"'):
        _native.run_job(_native.merge_tensors_start({"combination_type": "svd", "rank": 4, "output_dir": "x"}), False)
    with pytest.raises(ValueError, match="combination_type"):
        _native.validate_combination({"combination_type": "nope"})
    assert not (tmp_path / "o").exists()


def test_lambda_belongs_to_task_arithmetic(mixed, tmp_path):
    with pytest.raises(ValueError, match='lambda: combination_type "cat" does not take lambda'):
        gomerge.add_weighted_adapter(mixed, [1, 1, 1], "m", "cat", output_dir=str(tmp_path / "o"), lambda_=0.5)
    with pytest.raises(TypeError, match="^lambda: expected a number"):
        gomerge.add_weighted_adapter(mixed, [1, 1, 1], "m", "task_arithmetic", output_dir="o", lambda_="big")


@pytest.mark.parametrize("lam", [1.0, 0.7])
def test_task_arithmetic_is_the_exact_weighted_sum(mixed, tmp_path, lam, record_parity):
    weights = [1.5, -0.5, 0.8]
    out = tmp_path / "ta"
    kw = {} if lam == 1.0 else {"lambda_": lam}
    res = gomerge.add_weighted_adapter(mixed, weights, "ta", "task_arithmetic", output_dir=str(out), **kw)
    assert res.rank == 4 + 8 + 6
    want = dense_sum(mixed, weights, lam)
    got = {k: delta(a, b) for k, (a, b) in file_factors(str(out)).items()}
    assert sorted(got) == sorted(want)
    worst = 0.0
    for k, w in want.items():
        np.testing.assert_allclose(got[k], w, rtol=1e-5, atol=1e-6 * np.abs(w).max())
        worst = max(worst, float(np.abs(got[k] - w).max() / np.abs(w).max()))
    record_parity(f"task_arithmetic lambda={lam} vs torch dense sum", worst)
    assert_reloads_as(str(out), want)  # PEFT reloads it: the base model's logits with the dense sum added


def test_task_arithmetic_truncated_by_svd_rank_is_torchs_truncated_svd(mixed, tmp_path, record_parity):
    weights = [1.0, 1.0, 1.0]
    out = tmp_path / "ta5"
    res = gomerge.add_weighted_adapter(mixed, weights, "ta", "task_arithmetic", svd_rank=5, output_dir=str(out))
    assert res.rank == 5
    got = {k: delta(a, b) for k, (a, b) in file_factors(str(out)).items()}
    worst = 0.0
    for k, w in dense_sum(mixed, weights, 1.0).items():
        u, s, vh = torch.linalg.svd(torch.from_numpy(w), full_matrices=False)
        best = (u[:, :5] * s[:5] @ vh[:5]).numpy()
        np.testing.assert_allclose(got[k], best, rtol=1e-5, atol=1e-5 * np.abs(best).max())
        worst = max(worst, float(np.abs(got[k] - best).max() / np.abs(best).max()))
    record_parity("task_arithmetic svd_rank=5 vs torch.linalg.svd truncation", worst)
