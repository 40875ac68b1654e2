"""Extraction from mixture-of-experts fine-tunes (issue 20): a changed expert tensor is extracted per expert into a
`target_parameters` adapter that PEFT loads, whatever the layout on disk (Mixtral and Qwen3-MoE per expert, gpt-oss
fused and input dimension first).

The fine-tunes add to each expert a known update of rank 3 (one expert left unchanged), so that a rank-3 extraction
is exact up to float32 rounding: PEFT's get_delta_weight per expert (float64) equals the update within 1e-5 of its
largest entry, and the adapter's logits equal the fine-tune's.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from moe_cases import load_peft, logits, model, param_wrappers, save_base
from transformers import AutoModelForCausalLM

import gomerge

KINDS = ["mixtral", "qwen3_moe", "gpt_oss"]


def finetune(kind: str, path: str) -> dict[str, np.ndarray]:
    """The base plus a rank-3 update on every expert but the last, and one on q_proj; returns the updates in each
    parameter's layout."""
    m = model(kind)
    g = torch.Generator().manual_seed(7)
    updates = {}
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
                e, d1, d2 = p.shape
                u = torch.randn(e, d1, 3, generator=g) @ torch.randn(e, 3, d2, generator=g) * 0.05
                u[-1] = 0
                p += u
                updates[name] = u.double().numpy()
            elif name.endswith("layers.0.self_attn.q_proj.weight"):
                u = torch.randn(p.shape[0], 3, generator=g) @ torch.randn(3, p.shape[1], generator=g) * 0.05
                p += u
                updates[name.removesuffix(".weight")] = u.double().numpy()
    m.save_pretrained(path)
    return updates


@pytest.mark.parametrize("kind", KINDS)
def test_extracts_experts_into_a_target_parameters_adapter(kind, tmp_path, record_parity):
    base = save_base(kind, str(tmp_path / "base"))
    updates = finetune(kind, str(tmp_path / "ft"))
    res = gomerge.extract(base, str(tmp_path / "ft"), str(tmp_path / "lora"), rank=3)
    cfg = json.load(open(tmp_path / "lora" / "adapter_config.json"))
    assert sorted(cfg["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert res.rank == 3
    pm = load_peft(kind, [str(tmp_path / "lora")], ["default"]).double()
    got = {k: w.get_delta_weight("default").detach().numpy() for k, w in param_wrappers(pm).items()}
    worst = 0.0
    for k, u in updates.items():
        if "experts" not in k:
            continue
        d = float(np.abs(got[k] - u).max() / np.abs(u).max())
        assert d < 1e-5, (k, d)
        worst = max(worst, d)
    record_parity(f"moe extract {kind}", worst, "extract: largest relative difference of the experts' updates")
    ft = logits(AutoModelForCausalLM.from_pretrained(str(tmp_path / "ft"), dtype=torch.float32).eval())
    ours = logits(load_peft(kind, [str(tmp_path / "lora")]).eval())
    np.testing.assert_allclose(ours, ft, rtol=1e-4, atol=1e-5)


def test_energy_rule_pads_unchanged_experts(tmp_path):
    base = save_base("mixtral", str(tmp_path / "base"))
    finetune("mixtral", str(tmp_path / "ft"))
    res = gomerge.extract(base, str(tmp_path / "ft"), str(tmp_path / "lora"), energy=0.999)
    assert res.module_ranks["model.layers.0.mlp.experts.gate_up_proj"] == 3  # the last expert (rank 0) is padded
    sd = __import__("safetensors.torch", fromlist=["load_file"]).load_file(
        os.path.join(tmp_path / "lora", "adapter_model.safetensors")
    )
    b = sd["base_model.model.model.layers.0.mlp.experts.base_layer.lora_B.weight"]
    assert b.shape == (96, 12) and torch.all(b[:, 3::4] == 0)
