"""gomerge.fuse into an MXFP4 gpt-oss base (experts stored as `<param>_blocks` / `<param>_scales`, issue 21).

The tiny MXFP4 folder is written by gomerge's own MXFP4 encoder through the QuantCodec binding (transformers'
quantize path needs triton kernels, which do not run here); the encoder is checked against the OCP MX rule and
transformers' `convert_moe_packed_tensors` in tests/test_quant_codecs.py. The oracles: transformers'
`convert_moe_packed_tensors` for deq(W), PEFT's per-expert `get_delta_weight` in float64 for the update, and
transformers' dequantizing MXFP4 loader (Mxfp4Config(dequantize=True), on CPU) for the reloaded logits.

Dequantized output (`dtype`): each expert parameter, under its in-memory name (`mlp.experts.gate_up_proj`
[E, in, out], the layout convert_moe_packed_tensors returns), equals deq(W) + s B A computed in float64 and rounded
once; quantization_config is dropped. `keep_format`: the changed blocks and scales equal the encoder's output on that
sum (rounded once to float32), every other tensor is the base's bytes, quantization_config is kept."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import numpy as np
import pytest
import torch
from moe_cases import EXPERT_PARAMS, gpt_oss_config, logits, param_wrappers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Mxfp4Config
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

import gomerge
from gomerge import _native

QCONFIG = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
}
G0 = "model.layers.0.mlp.experts.gate_up_proj"


def _config():
    cfg = gpt_oss_config()
    cfg.intermediate_size = 64  # MXFP4 groups 32 inputs: gate_up_proj [E, 32, 128], down_proj [E, 64, 32]
    return cfg


def _model(sd=None) -> torch.nn.Module:
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(_config(), dtype=torch.float32)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "experts" in n or "router" in n:
                p.normal_(0, 0.2)
    if sd is not None:
        m.load_state_dict(sd, strict=True)
    return m.eval()


def _encode(w: torch.Tensor, tmp: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A parameter [E, in, out] as MXFP4 blocks and scales (stored order [E, out, in]), by gomerge's encoder."""
    src, dst = os.path.join(tmp, "enc-in.safetensors"), os.path.join(tmp, "enc-out.safetensors")
    save_file({"w": w.float().transpose(1, 2).contiguous()}, src)
    _native.quant_codec({"format": "mxfp4", "op": "quantize", "input": src, "output": dst})
    out = load_file(dst)
    return out["blocks"].clone(), out["scales"].clone()  # not views of a file the next call rewrites


def _deq(blocks: torch.Tensor, scales: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return convert_moe_packed_tensors(blocks, scales, dtype=dtype)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("mxfp4")
    dense = str(root / "dense")
    _model().save_pretrained(dense)
    base = str(root / "base")
    shutil.copytree(dense, base)
    sd = {k: v.clone() for k, v in load_file(os.path.join(dense, "model.safetensors")).items()}
    for k in [k for k in sd if k.endswith(tuple(EXPERT_PARAMS))]:
        sd[k + "_blocks"], sd[k + "_scales"] = _encode(sd.pop(k), str(root))
    save_file(sd, os.path.join(base, "model.safetensors"), metadata={"format": "pt"})
    cfg = json.load(open(os.path.join(base, "config.json")))
    cfg["quantization_config"] = QCONFIG
    json.dump(cfg, open(os.path.join(base, "config.json"), "w"))
    adapter = str(root / "adapter")
    pm = get_peft_model(_model(), LoraConfig(r=4, lora_alpha=8, target_parameters=list(EXPERT_PARAMS)))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(adapter)
    return {"root": str(root), "base": base, "adapter": adapter, "sd": sd}


def _deltas(adapter: str) -> dict[str, torch.Tensor]:
    """PEFT's per-expert get_delta_weight in float64, in the parameter's layout [E, in, out]."""
    pm = PeftModel.from_pretrained(_model(), adapter).double()
    return {k: w.get_delta_weight("default").detach() for k, w in param_wrappers(pm).items()}


def _round_once(x64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x64 rounded once to dtype (nearest, ties to even): float32 first, stepped off bfloat16's midpoints."""
    x32 = x64.float()
    if dtype == torch.float32:
        return x32
    bits = x32.view(torch.int32)
    tie = ((bits & 0xFFFF) == 0x8000) & (x32.double() != x64)
    inf = torch.full_like(x32, float("inf"))
    step = torch.where(x64 > x32.double(), torch.nextafter(x32, inf), torch.nextafter(x32, -inf))
    return torch.where(tie, step, x32).to(dtype)


def _fuse(folders, name: str, base: str | None = None, **kw):
    out = os.path.join(folders["root"], name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = gomerge.fuse(
            base or folders["base"], [folders["adapter"]], output_dir=out, overwrite=True, progress=False, **kw
        )
    return out, res


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequantized_fuse_equals_reference(folders, dtype):
    name = str(dtype).removeprefix("torch.")
    out, res = _fuse(folders, f"deq-{name}", dtype=name)
    sd, delta = folders["sd"], _deltas(folders["adapter"])
    got = load_file(os.path.join(out, "model.safetensors"))
    assert set(delta) == {f"model.layers.{i}.{p}" for i in range(2) for p in EXPERT_PARAMS}
    for k, d in delta.items():
        w = _deq(sd[k + "_blocks"], sd[k + "_scales"])  # [E, in, out], as transformers' dequantizing loader
        assert got[k].dtype == dtype and got[k].shape == w.shape == d.shape, k
        assert torch.equal(got[k], _round_once(w.double() + d, dtype)), k
    assert not any(k.endswith(("_blocks", "_scales")) for k in got)
    for k, v in sd.items():
        if not k.endswith(("_blocks", "_scales")):
            assert torch.equal(got[k], v.to(dtype)), k
    assert "quantization_config" not in json.load(open(os.path.join(out, "config.json")))
    assert {t["tensor"] for t in res.quantized["tensors"]} == {k + "_blocks" for k in delta}
    assert res.quantized["method"] == "mxfp4"
    if dtype == torch.float32:  # transformers reloads it as a plain gpt-oss with the logits of those weights
        assert all(t["survival"] == pytest.approx(1, abs=1e-6) for t in res.quantized["tensors"])
        reloaded = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
        assert np.array_equal(logits(reloaded), logits(_model(got)))


def test_keep_format_equals_the_encoder_on_the_sum(folders):
    out, res = _fuse(folders, "keep", keep_format=True)
    sd, delta = folders["sd"], _deltas(folders["adapter"])
    got = load_file(os.path.join(out, "model.safetensors"))
    assert set(got) == set(sd)
    report = {t["tensor"]: t for t in res.quantized["tensors"]}
    for k, d in delta.items():
        w = _deq(sd[k + "_blocks"], sd[k + "_scales"]).double()
        total = _round_once(w + d, torch.float32)
        blocks, scales = _encode(total, folders["root"])
        assert torch.equal(got[k + "_blocks"], blocks) and torch.equal(got[k + "_scales"], scales), k
        # the survival report, computed here again from the written tensors (dW: the float32 sum less W)
        q, dw = _deq(blocks, scales).double(), total.double() - w
        rep = report[k + "_blocks"]
        assert rep["survival"] == pytest.approx(float(((q - w) * dw).sum() / (dw * dw).sum()), rel=1e-9)
        assert rep["residual"] == pytest.approx(float((q - total.double()).norm() / dw.norm()), rel=1e-9)
        assert 0 < rep["survival"] < 2
    with safe_open(os.path.join(folders["base"], "model.safetensors"), "pt") as b:
        for k in sd:
            if not k.endswith(("_blocks", "_scales")):
                assert torch.equal(got[k].view(torch.uint8), b.get_tensor(k).view(torch.uint8)), k
    assert json.load(open(os.path.join(out, "config.json")))["quantization_config"] == QCONFIG
    # transformers' dequantizing MXFP4 loader reads it on CPU: the logits of a plain model with those weights
    reloaded = AutoModelForCausalLM.from_pretrained(
        out, quantization_config=Mxfp4Config(dequantize=True), dtype=torch.float32, device_map="cpu"
    )
    dense = {k: v for k, v in got.items() if not k.endswith(("_blocks", "_scales"))}
    for k in delta:
        dense[k] = _deq(got[k + "_blocks"], got[k + "_scales"])
    assert np.array_equal(logits(reloaded), logits(_model(dense)))


def test_dry_run_reports_survival(folders):
    _, res = _fuse(folders, "dry", keep_format=True, dry_run=True)
    assert {t["tensor"] for t in res.quantized["tensors"]} == {
        f"model.layers.{i}.{p}_blocks" for i in range(2) for p in EXPERT_PARAMS
    }
    assert all(np.isfinite(t["survival"]) and t["residual"] >= 0 for t in res.quantized["tensors"])
    assert not os.path.exists(os.path.join(folders["root"], "dry"))


def _short_scales(sd):
    sd[G0 + "_scales"] = sd[G0 + "_scales"][:, :-1].contiguous()


def _nan_scale(sd):
    s = sd[G0 + "_scales"].clone()
    s[1, 2, 0] = 0xFF  # E8M0's NaN
    sd[G0 + "_scales"] = s


HOSTILE = {
    "scales-shape": (_short_scales, [G0 + "_scales", "model.safetensors", "shape"]),
    "nan-scale": (_nan_scale, [G0 + "_scales", "model.safetensors", "nan"]),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_mxfp4_bases(folders, tmp_path, case):
    change, words = HOSTILE[case]
    base = str(tmp_path / "base")
    shutil.copytree(folders["base"], base)
    sd = load_file(os.path.join(base, "model.safetensors"))
    change(sd)
    save_file(sd, os.path.join(base, "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    for kw in ({"dtype": "bfloat16"}, {"keep_format": True}):
        with pytest.raises(ValueError) as e:
            gomerge.fuse(base, [folders["adapter"]], output_dir=str(out), progress=False, **kw)
        for w in words:
            assert w.lower() in str(e.value).lower(), (w, str(e.value))
        assert not out.exists()
        assert [p for p in os.listdir(tmp_path) if p.startswith(".gomerge")] == []
