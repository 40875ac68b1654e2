"""Fusing mixture-of-experts adapters (`target_parameters`) into their base, streaming and torch-free (issue 20).

The adapter names the expert parameter as the model holds it in memory (`mlp.experts.gate_up_proj` [E, 2I, H]);
transformers 5 saves Mixtral and Qwen3-MoE per expert and converts when it loads (its conversion_mapping.py), gpt-oss
in the fused layout, input dimension first. The reference is PEFT's `merge_and_unload()` followed by
`save_pretrained`: the same tensor names, float32 values within 1e-6 of the largest magnitude (a few float32
roundings of one sum `W + s B A`, summed in float64 by gomerge and in float32 by torch), and the reloaded models'
logits equal.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from moe_cases import MoeSpec, load_peft, logits, make_adapter, save_base
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import gomerge

KINDS = ["mixtral", "qwen3_moe", "gpt_oss"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-bases")
    cache: dict[str, tuple[str, list[str]]] = {}

    def get(kind: str) -> tuple[str, list[str]]:
        if kind not in cache:
            base = save_base(kind, str(root / f"{kind}-base"))
            dirs = [
                make_adapter(kind, MoeSpec(seed=s, alpha=a), str(root / f"{kind}-{s}")) for s, a in ((1, 8), (2, 4))
            ]
            cache[kind] = (base, dirs)
        return cache[kind]

    return get


def tensors(path: str) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


def peft_fused(kind: str, base: str, dirs: list[str], path: str, weights=None, method=None) -> str:
    pm = load_peft(kind, dirs)
    if len(dirs) > 1:
        from gomerge.peft import add_weighted_adapter

        add_weighted_adapter(pm, [f"a{i}" for i in range(len(dirs))], weights, "m", combination_type=method)
        pm.set_adapter("m")
    else:
        pm.set_adapter("a0")
    pm.merge_and_unload().save_pretrained(path)
    return path


def assert_same_model(ours: str, ref: str) -> tuple[float, float]:
    a, b = tensors(ours), tensors(ref)
    assert sorted(a) == sorted(b)
    worst = 0.0
    for k in b:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
        d = float((a[k].double() - b[k].double()).abs().max() / max(1.0, float(b[k].abs().max())))
        assert d <= 1e-6, (k, d)
        worst = max(worst, d)
    la = logits(AutoModelForCausalLM.from_pretrained(ours, dtype=torch.float32).eval())
    lb = logits(AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32).eval())
    np.testing.assert_allclose(la, lb, rtol=1e-5, atol=1e-5)
    return worst, float(np.abs(la - lb).max())


@pytest.mark.parametrize("kind", KINDS)
def test_fuse_matches_peft_merge_and_unload(bases, kind, tmp_path, record_parity):
    base, dirs = bases(kind)
    res = gomerge.fuse(base, [dirs[0]], output_dir=str(tmp_path / "ours"))
    assert res is not None
    ref = peft_fused(kind, base, [dirs[0]], str(tmp_path / "peft"))
    worst, dl = assert_same_model(str(tmp_path / "ours"), ref)
    record_parity(f"moe fuse {kind} tensors", worst, "fuse: largest difference from PEFT merge_and_unload")
    record_parity(f"moe fuse {kind} logits", dl, "fuse: largest difference from PEFT merge_and_unload")
    if kind != "gpt_oss":  # transformers saves the per-expert layout, which fuse kept
        assert not any("experts.gate_up_proj" in k for k in tensors(str(tmp_path / "ours")))


@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("method,kw", [("ties", {"density": 0.5}), ("svd", {"svd_rank": 8})])
def test_merge_then_fuse_matches_peft(bases, kind, method, kw, tmp_path):
    """Several adapters merged before fusing: the drop-in's live merge fused by PEFT is the reference (the live
    merge equals gomerge's from disk, test_moe.py)."""
    base, dirs = bases(kind)
    gomerge.fuse(base, dirs, [1.0, 0.6], combination_type=method, output_dir=str(tmp_path / "ours"), **kw)
    pm = load_peft(kind, dirs)
    from gomerge.peft import add_weighted_adapter

    add_weighted_adapter(pm, ["a0", "a1"], [1.0, 0.6], "m", combination_type=method, **kw)
    pm.set_adapter("m")
    pm.merge_and_unload().save_pretrained(str(tmp_path / "peft"))
    assert_same_model(str(tmp_path / "ours"), str(tmp_path / "peft"))


def test_stacked_fuse_matches_peft(bases, tmp_path):
    base, dirs = bases("qwen3_moe")
    gomerge.fuse(base, dirs, [1.0, -0.5], stack=True, output_dir=str(tmp_path / "ours"))
    ref = gomerge.fuse(base, [dirs[0]], [1.0], output_dir=str(tmp_path / "one"))
    assert ref is not None
    gomerge.fuse(str(tmp_path / "one"), [dirs[1]], [-0.5], output_dir=str(tmp_path / "two"))
    a, b = tensors(str(tmp_path / "ours")), tensors(str(tmp_path / "two"))
    for k in b:
        assert float((a[k] - b[k]).abs().max()) <= 1e-6 * max(1.0, float(b[k].abs().max())), k


def _edit_base(src: str, dst: str, edit) -> str:
    shutil.copytree(src, dst)
    path = os.path.join(dst, "model.safetensors")
    sd = load_file(path)
    edit(sd)
    save_file(sd, path, metadata={"format": "pt"})
    return dst


def test_mxfp4_experts_are_refused_naming_the_format(bases, tmp_path):
    base, dirs = bases("gpt_oss")

    def to_blocks(sd):  # the released checkpoints' names: <param>_blocks and <param>_scales (uint8)
        for k in [k for k in sd if k.endswith("experts.gate_up_proj") or k.endswith("experts.down_proj")]:
            t = sd.pop(k)
            sd[k + "_blocks"] = torch.zeros((t.shape[0], t.shape[1], 2, 16), dtype=torch.uint8)
            sd[k + "_scales"] = torch.zeros((t.shape[0], t.shape[1], 2), dtype=torch.uint8)

    mx = _edit_base(base, str(tmp_path / "mx"), to_blocks)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts\.down_proj_blocks, MXFP4"):
        gomerge.fuse(mx, [dirs[0]], output_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_hostile_bases_are_refused_naming_the_tensor(bases, tmp_path):
    """An expert count that disagrees with the base, and a parameter the base lacks: a ValueError naming the
    tensor, and nothing written."""
    base, dirs = bases("mixtral")

    def drop_expert(sd):
        for k in [k for k in sd if ".experts.3." in k]:
            del sd[k]

    three = _edit_base(base, str(tmp_path / "three"), drop_expert)
    with pytest.raises(ValueError, match=r"no tensor model\.layers\.0\.block_sparse_moe\.experts\.3\.w2\.weight"):
        gomerge.fuse(three, [dirs[0]], output_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()

    def rename(sd):
        for k in [k for k in sd if ".block_sparse_moe.experts." in k]:
            sd[k.replace(".block_sparse_moe.experts.", ".moe.ffn.")] = sd.pop(k)

    odd = _edit_base(base, str(tmp_path / "odd"), rename)
    with pytest.raises(
        ValueError,
        match=r"parameter model\.layers\.0\.mlp\.experts\.down_proj.*looked for "
        r"model\.layers\.0\.mlp\.experts\.down_proj as it is in memory",
    ):
        gomerge.fuse(odd, [dirs[0]], output_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()

    five = str(tmp_path / "five")  # the adapter's expert count disagrees with the base's (5 experts)
    cfg = json.load(open(os.path.join(dirs[0], "adapter_config.json")))
    os.makedirs(five)
    json.dump(cfg, open(os.path.join(five, "adapter_config.json"), "w"))
    sd = load_file(os.path.join(dirs[0], "adapter_model.safetensors"))
    for k in list(sd):
        if "experts" in k and "lora_A" in k:
            sd[k] = torch.cat([sd[k], sd[k][:4]])
        elif "experts" in k:
            b = sd[k].reshape(sd[k].shape[0], 4, 4)
            sd[k] = torch.cat([b, b[:, :, :1]], dim=2).reshape(sd[k].shape[0], 20)
    save_file(sd, os.path.join(five, "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=r"base has more than 4 experts|no tensor model\.layers\.0\.block_sparse_moe\.experts\.4"
    ):
        gomerge.fuse(base, [five], output_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_two_dimensional_parameter_targets_merge_and_fuse_as_peft(bases, tmp_path):
    """target_parameters on a 2-D parameter (a Linear's weight: one expert, PEFT's Linear delta): merged from disk as
    PEFT's get_delta_weight says, and fused as PEFT's merge_and_unload."""
    from moe_cases import merged_deltas

    base, _ = bases("qwen3_moe")
    spec = MoeSpec(seed=11, target_modules=[], target_parameters=["self_attn.o_proj.weight"])
    src = make_adapter("qwen3_moe", spec, str(tmp_path / "a"))
    gomerge.add_weighted_adapter([src], [0.5], "m", combination_type="cat", output_dir=str(tmp_path / "m"))
    ref = {k: 0.5 * v for k, v in merged_deltas("qwen3_moe", src).items()}
    got = merged_deltas("qwen3_moe", str(tmp_path / "m"))
    assert (
        sorted(got)
        == sorted(ref)
        == ["model.layers.0.self_attn.o_proj.weight", "model.layers.1.self_attn.o_proj.weight"]
    )
    for k in ref:
        assert float(np.abs(got[k] - ref[k]).max() / np.abs(ref[k]).max()) < 1e-5, k
    gomerge.fuse(base, [src], output_dir=str(tmp_path / "ours"))
    assert_same_model(str(tmp_path / "ours"), peft_fused("qwen3_moe", base, [src], str(tmp_path / "peft")))
