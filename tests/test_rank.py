"""Exact rank control: `resize`, the energy rule, `max_rank`, per-module ranks and errors, against torch and PEFT."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from peft_cases import LLAMA_ALL, AdapterSpec, assert_reloads_as, delta, dense_updates, file_factors, make_adapter

import gomerge

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two rank-8 Llama adapters on every linear module, one with rsLoRA; their spectra decay unevenly."""
    root = tmp_path_factory.mktemp("rank")
    return [
        make_adapter(
            "llama", AdapterSpec(dict(r=8, lora_alpha=16, target_modules=LLAMA_ALL), seed=11), str(root / "a")
        ),
        make_adapter(
            "llama",
            AdapterSpec(dict(r=8, lora_alpha=8, target_modules=LLAMA_ALL, use_rslora=True), seed=12),
            str(root / "b"),
        ),
    ]


def updates(dirs: list[str], weights: list[float]) -> dict[str, torch.Tensor]:
    """torch, float64: sum_i w_i s_i B_i A_i per module."""
    return dense_updates(dirs, weights)


def truncated(d: torch.Tensor, k: int) -> tuple[np.ndarray, float]:
    """torch.linalg.svd truncation of d to rank k, and its relative Frobenius error."""
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    best = u[:, :k] * s[:k] @ vh[:k]
    return best.numpy(), float(torch.linalg.norm(d - best) / torch.linalg.norm(d))


def energy_rank(d: torch.Tensor, energy: float, cap: int | None = None) -> int:
    s2 = torch.linalg.svdvals(d) ** 2
    k = int(torch.searchsorted(torch.cumsum(s2, 0) / s2.sum(), torch.tensor(energy, dtype=s2.dtype))) + 1
    return min(k, cap) if cap else k


def check_against(got_dir: str, dense: dict, ranks: dict[str, int], record, check_truncation, label: str) -> None:
    """Each module's B'A' against torch's float64 truncation of the dense update to its rank, by svd_checks' rules
    (gomerge's factors are float32: near-optimal error, and within Wedin's bound of torch's truncation)."""
    got = {k: delta(a, b) for k, (a, b) in file_factors(got_dir).items()}
    assert sorted(got) == sorted(dense)
    worst = 0.0
    for k, d in dense.items():
        w = truncated(d, ranks[k])[0]
        check_truncation(d.numpy(), ranks[k], got[k], w, label=f"{label.split(' ')[0]} {k}")
        worst = max(worst, float(np.abs(got[k] - w).max() / np.abs(w).max()))
    record(label, worst)


def test_resize_to_a_fixed_rank_is_torchs_truncated_svd(adapters, tmp_path, record_parity, check_truncation):
    out = tmp_path / "r3"
    res = gomerge.resize(adapters[1], rank=3, output_dir=str(out))
    assert res.rank == 3 and set(res.module_ranks.values()) == {3}
    dense = updates([adapters[1]], [1.0])
    label = "resize-rank3 vs torch.linalg.svd truncation"
    check_against(str(out), dense, dict.fromkeys(dense, 3), record_parity, check_truncation, label)
    for k, d in dense.items():
        assert res.module_errors[k] == pytest.approx(truncated(d, 3)[1], rel=1e-6, abs=1e-9)
    cfg = json.load(open(out / "adapter_config.json"))
    assert cfg["r"] == cfg["lora_alpha"] == 3 and not cfg["use_rslora"] and not cfg["rank_pattern"]
    assert "## Ranks" in (out / "README.md").read_text()


@pytest.mark.parametrize("energy,cap", [(0.8, None), (0.95, 13)])
def test_energy_rule_gives_each_module_its_smallest_rank_and_peft_reloads_it(
    adapters, tmp_path, energy, cap, record_parity, check_truncation
):
    weights = [1.0, -0.6]
    out = tmp_path / f"e{energy}"
    res = gomerge.add_weighted_adapter(
        adapters, weights, "e", "svd", svd_rank=f"energy:{energy}", max_rank=cap, output_dir=str(out)
    )
    dense = updates(adapters, weights)
    want_ranks = {k: energy_rank(d, energy, cap) for k, d in dense.items()}
    assert res.module_ranks == want_ranks
    assert len(set(want_ranks.values())) > 1, "the case must give mixed ranks"
    assert res.rank == max(want_ranks.values())
    label = f"svd-energy:{energy}-max_rank={cap} vs torch truncation"
    check_against(str(out), dense, want_ranks, record_parity, check_truncation, label)
    for k, d in dense.items():
        assert res.module_errors[k] == pytest.approx(truncated(d, want_ranks[k])[1], rel=1e-6, abs=1e-9)
        if cap is None:
            assert res.module_errors[k] ** 2 <= 1 - energy + 1e-9
    cfg = json.load(open(out / "adapter_config.json"))
    assert cfg["r"] == res.rank and cfg["rank_pattern"] == cfg["alpha_pattern"]
    assert len(cfg["rank_pattern"]) == sum(r != res.rank for r in want_ranks.values())
    want = {k: truncated(d, want_ranks[k])[0] for k, d in dense.items()}
    assert_reloads_as(str(out), want)  # PEFT reloads the mixed ranks


def test_max_rank_caps_a_fixed_rank(adapters, tmp_path):
    res = gomerge.add_weighted_adapter(
        adapters, [1, 1], "m", "task_arithmetic", svd_rank=12, max_rank=6, output_dir=str(tmp_path / "m")
    )
    assert res.rank == 6 and set(res.module_ranks.values()) == {6}


def test_rank_errors(adapters, tmp_path):
    with pytest.raises(ValueError, match="randomized SVD"):
        gomerge.add_weighted_adapter(
            adapters, [1, 1], "m", "ties_svd", density=0.5, svd_rank="energy:0.9", output_dir=str(tmp_path / "x")
        )
    with pytest.raises(ValueError, match='svd_rank: combination_type "ties" does not take svd_rank'):
        gomerge.add_weighted_adapter(adapters, [1, 1], "m", "ties", density=0.5, svd_rank="energy:0.9", output_dir="x")
    with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
        gomerge.resize(adapters[0], energy=1.5, output_dir=str(tmp_path / "x"))
    with pytest.raises(ValueError, match="exactly one of rank= and energy="):
        gomerge.resize(adapters[0], rank=2, energy=0.5, output_dir=str(tmp_path / "x"))
    with pytest.raises(ValueError, match="does not take max_rank"):
        gomerge.add_weighted_adapter(adapters, [1, 1], "m", "cat", max_rank=2, output_dir=str(tmp_path / "x"))
    with pytest.raises(TypeError, match="svd_rank"):
        gomerge.add_weighted_adapter(adapters, [1, 1], "m", "svd", svd_rank=2.5, output_dir=str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"))
    return subprocess.run([sys.executable, "-m", "gomerge", *args], capture_output=True, text=True, env=env)


def test_resize_and_energy_from_the_cli_and_a_recipe(adapters, tmp_path):
    r = _cli("resize", adapters[0], "--energy", "0.9", "--max-rank", "6", "-o", str(tmp_path / "cli"), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    api = gomerge.resize(adapters[0], energy=0.9, max_rank=6, output_dir=str(tmp_path / "api"))
    assert res["module_ranks"] == api.module_ranks and max(api.module_ranks.values()) <= 6
    assert (tmp_path / "cli" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "api" / "adapter_model.safetensors"
    ).read_bytes()
    r = _cli("resize", adapters[0], "-o", str(tmp_path / "none"))
    assert r.returncode == 2 and "--rank" in r.stderr
    r = _cli("merge", *adapters, "--method", "svd", "--svd-rank", "energy:0.9", "-o", str(tmp_path / "m1"), "--json")
    assert r.returncode == 0, r.stderr
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"adapters:\n  - source: {adapters[0]}\n  - source: {adapters[1]}\n"
        f"method: svd\nsvd_rank: 'energy:0.9'\noutput_dir: {tmp_path / 'm2'}\n"
    )
    r2 = _cli("merge", "--recipe", str(recipe), "--json")
    assert r2.returncode == 0, r2.stderr
    assert json.loads(r.stdout)["module_ranks"] == json.loads(r2.stdout)["module_ranks"]
