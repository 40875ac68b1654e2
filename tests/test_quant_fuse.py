"""gomerge.fuse into quantized bases against the references, on CPU: pre-quantized bitsandbytes folders written by
transformers' own BitsAndBytesConfig save path, FP8 folders written with torch's float8 casts (blockwise 128 x 128
rule of transformers with smaller blocks, and compressed-tensors' per-tensor / per-channel rule), int8 folders
written with bitsandbytes' int8_vectorwise_quant.

Dequantized output: every changed tensor equals dequantize(Wq) + s B A computed in float64 and rounded once; every
untouched quantized tensor equals its dequantized value. --keep-format output: every changed tensor equals the
reference quantizer's output on that sum (rounded once to float32), every other tensor is the base's bytes, and
transformers reloads it with the logits of the same weights in a plain model."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import bitsandbytes.functional as bnb_f
import pytest
import torch
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

import gomerge

torch._dynamo.config.disable = True  # bitsandbytes' pure-torch kernels are torch.compile'd: compiling adds minutes

TARGETS = ["q_proj", "v_proj", "down_proj"]
R, ALPHA = 4, 8


def _config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )


def _input() -> torch.Tensor:
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(5))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(_input()).logits.float()


def _adapter(path: str, std: float = 0.05, seed: int = 1) -> str:
    model = get_peft_model(
        LlamaForCausalLM(_config()), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False)
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    model.save_pretrained(path)
    return path


def _delta(adapter: str) -> dict[str, torch.Tensor]:
    """s B A per base weight name, in float64."""
    t = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    out = {}
    for k, a in t.items():
        if ".lora_A." in k:
            b = t[k.replace("lora_A", "lora_B")]
            name = k.replace("base_model.model.", "").replace(".lora_A.weight", ".weight")
            out[name] = (ALPHA / R) * (b.double() @ a.double())
    return out


def _round_once(x64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x64 rounded once to dtype (nearest, ties to even): float32 first, stepped off the target's midpoints."""
    x32 = x64.float()
    if dtype == torch.float32:
        return x32
    mask, half = (0xFFFF, 0x8000) if dtype == torch.bfloat16 else (0x1FFF, 0x1000)
    bits = x32.view(torch.int32)
    tie = ((bits & mask) == half) & (x32.double() != x64)
    inf = torch.full_like(x32, float("inf"))
    step = torch.where(x64 > x32.double(), torch.nextafter(x32, inf), torch.nextafter(x32, -inf))
    return torch.where(tie, step, x32).to(dtype)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    torch.manual_seed(0)
    LlamaForCausalLM(_config()).to(torch.bfloat16).save_pretrained(root / "w16")
    q = AutoModelForCausalLM.from_pretrained(
        root / "w16",
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        ),
        device_map="cpu",
    )
    q.save_pretrained(root / "nf4")
    q = AutoModelForCausalLM.from_pretrained(
        root / "w16",
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.bfloat16
        ),
        device_map="cpu",
    )
    q.save_pretrained(root / "fp4")
    _fp8_folder(root / "w16", root / "fp8", block=32)
    _fp8_scaled_folder(root / "w16", root / "fp8t", per_channel=False)
    _fp8_scaled_folder(root / "w16", root / "fp8c", per_channel=True)
    _int8_folder(root / "w16", root / "int8")
    return {k: str(root / k) for k in ("w16", "nf4", "fp4", "fp8", "fp8t", "fp8c", "int8")} | {
        "adapter": _adapter(str(root / "adapter")),
        "root": str(root),
    }


def _plain(folders, weights: dict[str, torch.Tensor]):
    """The 16-bit model (loaded as transformers loads the fused output) holding the given weights."""
    model = AutoModelForCausalLM.from_pretrained(folders["w16"], device_map="cpu")
    model.load_state_dict(weights, strict=False)
    return model


def _linear_weights(sd: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in sd.items() if k.endswith("proj.weight") and v.ndim == 2]


def _fp8_reference(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' Fp8Quantize rule (448 / amax per block, stored inverse), edge blocks zero-padded."""
    rows, cols = w.shape
    wp = torch.nn.functional.pad(w.float(), (0, -cols % block, 0, -rows % block))
    t = wp.reshape(wp.shape[0] // block, block, wp.shape[1] // block, block)
    amax = t.abs().amax(dim=(1, 3))
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    scale = torch.where(amax > 0, 448.0 / safe, torch.ones_like(amax))
    q = torch.clamp(t * scale[:, None, :, None], -448, 448).to(torch.float8_e4m3fn).reshape(wp.shape)
    return q[:rows, :cols].contiguous(), (1.0 / scale).float()


def _fp8_block_deq(q: torch.Tensor, inv: torch.Tensor, block: int) -> torch.Tensor:
    full = inv.repeat_interleave(block, 0)[: q.shape[0]].repeat_interleave(block, 1)[:, : q.shape[1]]
    return q.float() * full


def _fp8_folder(src, dst, block: int) -> None:
    os.makedirs(dst)
    sd = load_file(os.path.join(src, "model.safetensors"))
    for k in _linear_weights(sd):
        sd[k], sd[k + "_scale_inv"] = _fp8_reference(sd[k], block)
        sd[k.replace(".weight", ".weight_scale_inv")] = sd.pop(k + "_scale_inv")
    save_file(sd, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [block, block],
    }
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))


def _fp8_scaled_folder(src, dst, per_channel: bool) -> None:
    os.makedirs(dst)
    sd = load_file(os.path.join(src, "model.safetensors"))
    for k in _linear_weights(sd):
        w = sd[k].float()
        amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax().reshape(1)
        scale = amax / 448.0
        sd[k] = torch.clamp(w / scale, -448, 448).to(torch.float8_e4m3fn)
        sd[k.replace(".weight", ".weight_scale")] = scale
    save_file(sd, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "float-quantized"}
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))


def _int8_folder(src, dst) -> None:
    os.makedirs(dst)
    sd = load_file(os.path.join(src, "model.safetensors"))
    for k in _linear_weights(sd):
        cb, scb, _ = bnb_f.int8_vectorwise_quant(sd[k].float())
        sd[k] = cb
        sd[k.replace(".weight", ".SCB")] = scb
        sd[k.replace(".weight", ".weight_format")] = torch.tensor(0, dtype=torch.uint8)
    save_file(sd, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False}
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))


def _bnb4_state(sd: dict[str, torch.Tensor], w: str):
    """The QuantState of 4-bit weight w from a state dict (bitsandbytes' own from_dict)."""
    qs = {k[len(w) + 1 :]: v for k, v in sd.items() if k.startswith(w + ".")}
    return bnb_f.QuantState.from_dict(qs, device=torch.device("cpu"))


def _bnb4_deq(sd: dict[str, torch.Tensor], w: str) -> torch.Tensor:
    st = _bnb4_state(sd, w)
    absmax = st.absmax
    if st.nested:
        absmax = bnb_f.dequantize_blockwise(st.absmax, st.state2) + st.offset
    return _dequantize_4bit_compute(
        sd[w].view(torch.uint8).reshape(-1), absmax, st.code, st.blocksize, st.shape, st.dtype
    )


def _dequantized_base(kind: str, folders) -> dict[str, torch.Tensor]:
    """Every quantized weight of a base folder dequantized by the reference, in the model's dtype."""
    sd = load_file(os.path.join(folders[kind], "model.safetensors"))
    out = {}
    for k in _linear_weights(load_file(os.path.join(folders["w16"], "model.safetensors"))):
        if kind in ("nf4", "fp4"):
            out[k] = _bnb4_deq(sd, k)
        elif kind == "fp8":
            out[k] = _fp8_block_deq(sd[k], sd[k.replace(".weight", ".weight_scale_inv")], 32).bfloat16()
        elif kind in ("fp8t", "fp8c"):
            out[k] = (sd[k].float() * sd[k.replace(".weight", ".weight_scale")]).bfloat16()
        elif kind == "int8":
            out[k] = bnb_f.int8_vectorwise_dequant(sd[k], sd[k.replace(".weight", ".SCB")]).bfloat16()
    return out


def _fuse(folders, kind: str, name: str, **kw):
    out = os.path.join(folders["root"], name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = gomerge.fuse(folders[kind], [folders["adapter"]], output_dir=out, overwrite=True, progress=False, **kw)
    return out, res


@pytest.mark.parametrize("kind", ["nf4", "fp4", "fp8", "fp8t", "fp8c", "int8"])
def test_dequantized_fuse_equals_reference(folders, kind):
    out, res = _fuse(folders, kind, f"{kind}-bf16", dtype="bfloat16")
    deq = _dequantized_base(kind, folders)
    delta = _delta(folders["adapter"])
    got = load_file(os.path.join(out, "model.safetensors"))
    for k, w in deq.items():
        want = _round_once(w.double() + delta[k], torch.bfloat16) if k in delta else w.bfloat16()
        assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], want), k
    assert not any(k.endswith(("absmax", "quant_map", "SCB", "scale_inv", "weight_scale")) for k in got)
    assert "quant_state" not in "".join(got)
    assert "quantization_config" not in json.load(open(os.path.join(out, "config.json")))
    assert {t["tensor"] for t in res.quantized["tensors"]} == set(delta)
    assert all(abs(t["survival"] - 1) < 0.01 for t in res.quantized["tensors"])  # bf16: the update survives
    if kind == "nf4":  # transformers reloads it as a plain bf16 model with the expected logits
        plain = _plain(folders, {k: got[k] for k in deq})
        reloaded = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
        assert torch.equal(_logits(reloaded), _logits(plain))


def _reference_requant(kind: str, x: torch.Tensor, base_sd: dict[str, torch.Tensor], k: str):
    if kind in ("nf4", "fp4"):
        st = _bnb4_state(base_sd, k)
        q, ref = bnb_f.quantize_4bit(x, blocksize=st.blocksize, quant_type=st.quant_type, compress_statistics=st.nested)
        return {k: q}, ref
    if kind == "fp8":
        q, inv = _fp8_reference(x, 32)
        return {k: q, k.replace(".weight", ".weight_scale_inv"): inv}, None
    if kind in ("fp8t", "fp8c"):
        amax = x.abs().amax(dim=1, keepdim=True) if kind == "fp8c" else x.abs().amax().reshape(1)
        scale = amax / 448.0
        return {
            k: torch.clamp(x / scale, -448, 448).to(torch.float8_e4m3fn),
            k.replace(".weight", ".weight_scale"): scale,
        }, None
    cb, scb, _ = bnb_f.int8_vectorwise_quant(x.clone())
    return {k: cb, k.replace(".weight", ".SCB"): scb}, None


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


@pytest.mark.parametrize("kind", ["nf4", "fp4", "fp8", "fp8t", "fp8c", "int8"])
def test_keep_format_equals_reference_quantizer(folders, kind):
    out, res = _fuse(folders, kind, f"{kind}-keep", keep_format=True)
    base_sd = load_file(os.path.join(folders[kind], "model.safetensors"))
    got = load_file(os.path.join(out, "model.safetensors"))
    deq = _dequantized_base(kind, folders)
    delta = _delta(folders["adapter"])
    owned = set()
    for k in delta:
        x = (deq[k].double() + delta[k]).float()  # the float64 sum, rounded once to float32: the quantizer's input
        want, state = _reference_requant(kind, x, base_sd, k)
        for name, t in want.items():
            owned.add(name)
            assert _bytes(got[name]) == _bytes(t), name
        if state is not None:  # quant_map and nested_quant_map stay the base's bytes
            owned.update(k + s for s in (".absmax", ".nested_absmax", ".quant_state.bitsandbytes__" + state.quant_type))
            if not state.nested:
                assert torch.equal(got[k + ".absmax"], state.absmax)
            else:  # offset: the correctly rounded mean, within the float32 summation bound of torch's CPU-dependent
                # mean (test_quant_codecs._mean_tolerance); codes: bitsandbytes' of absmax - that offset, bit for bit
                js = json.loads(bytes(got[k + ".quant_state.bitsandbytes__" + state.quant_type].tolist()))
                _, plain = bnb_f.quantize_4bit(x, blocksize=state.blocksize, quant_type=state.quant_type)
                n, u = plain.absmax.numel(), 2.0**-24
                tol = (n + 1) * u / (1 - (n + 1) * u) * plain.absmax.double().mean().item()
                assert abs(js["nested_offset"] - state.offset.item()) <= tol
                off = torch.tensor(js["nested_offset"], dtype=torch.float32)
                codes, st2 = bnb_f.quantize_blockwise(plain.absmax - off, blocksize=state.state2.blocksize)
                assert torch.equal(got[k + ".absmax"], codes), k
                assert torch.equal(got[k + ".nested_absmax"], st2.absmax), k
    for name, t in base_sd.items():  # everything else: the base's bytes
        if name not in owned:
            assert _bytes(got[name]) == _bytes(t), name
    assert set(got) == set(base_sd)
    base_cfg = json.load(open(os.path.join(folders[kind], "config.json")))
    assert json.load(open(os.path.join(out, "config.json")))["quantization_config"] == base_cfg["quantization_config"]
    assert {t["tensor"] for t in res.quantized["tensors"]} == set(delta)
    for t in res.quantized["tensors"]:  # survival: from the written (dequantized) tensors, computed here again
        assert 0 < t["survival"] <= 1.5 and t["residual"] >= 0


def test_transformers_reloads_keep_format_4bit(folders, tmp_path):
    """bitsandbytes on CPU reloads the --keep-format output: FP4 (no double quant, whose requantization is bit for bit
    the reference's) with the logits of the folder holding bitsandbytes' own requantized tensors; NF4 with double
    quant with its quant_state (the padded JSON) read as written."""
    out, _ = _fuse(folders, "fp4", "fp4-keep-reload", keep_format=True)
    base_sd = load_file(os.path.join(folders["fp4"], "model.safetensors"))
    deq, delta = _dequantized_base("fp4", folders), _delta(folders["adapter"])
    expected = dict(base_sd)
    for k in delta:
        q, st = bnb_f.quantize_4bit((deq[k].double() + delta[k]).float(), blocksize=64, quant_type="fp4")
        expected[k] = q
        expected.update({k + "." + n: v for n, v in st.as_dict(packed=True).items()})
    ref = tmp_path / "ref"
    shutil.copytree(folders["fp4"], ref)
    save_file(expected, str(ref / "model.safetensors"), metadata={"format": "pt"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
        theirs = AutoModelForCausalLM.from_pretrained(str(ref), device_map="cpu")
        base = AutoModelForCausalLM.from_pretrained(folders["fp4"], device_map="cpu")
    assert torch.equal(_logits(ours), _logits(theirs))
    assert not torch.equal(_logits(ours), _logits(base))
    out, _ = _fuse(folders, "nf4", "nf4-keep-reload", keep_format=True)
    got = load_file(os.path.join(out, "model.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nf4 = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    for k in delta:  # bitsandbytes' own from_dict reads the padded quant_state
        st = _bnb4_state(got, k)
        assert st.nested and tuple(st.shape) == tuple(deq[k].shape) and st.dtype == torch.bfloat16
    assert torch.isfinite(_logits(nf4)).all()


@pytest.mark.parametrize("kind", ["fp8"])
def test_transformers_reloads_keep_format(folders, kind):
    """transformers' dequantizing FP8 loader reloads the --keep-format output; its logits are those of a plain bf16
    model holding the written weights dequantized by the reference."""
    out, _ = _fuse(folders, kind, f"{kind}-keep-reload", keep_format=True)
    got = load_file(os.path.join(out, "model.safetensors"))
    plain_sd = load_file(os.path.join(folders["w16"], "model.safetensors"))
    for k in _linear_weights(plain_sd):
        plain_sd[k] = _fp8_block_deq(got[k], got[k.replace(".weight", ".weight_scale_inv")], 32).bfloat16()
    plain = _plain(folders, plain_sd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    for k in _linear_weights(plain_sd):  # the dequantizing loader: plain bf16 Linear layers
        assert torch.equal(reloaded.get_submodule(k[: -len(".weight")]).weight.data, plain_sd[k]), k
    base = AutoModelForCausalLM.from_pretrained(folders[kind], device_map="cpu")
    assert not torch.equal(_logits(reloaded), _logits(base))  # the update is there
    assert torch.equal(_logits(reloaded), _logits(plain))


def test_survival_warning_below_the_quantization_step(folders, tmp_path):
    """An update far below the NF4 step vanishes on requantization: the report says so and the warning names each
    tensor; a dry run reports the same figures and writes nothing."""
    tiny = _adapter(str(tmp_path / "tiny"), std=1e-4)
    with pytest.warns(UserWarning, match=r"model\.layers\.0\.self_attn\.q_proj\.weight: only"):
        res = gomerge.fuse(folders["nf4"], [tiny], output_dir=str(tmp_path / "out"), keep_format=True, progress=False)
    # double quant's new offset moves every block's scale: noise far larger than the update, along it or not
    assert all(t["residual"] > 1 for t in res.quantized["tensors"])
    assert sum("survives" in w for w in res.warnings) == len(res.quantized["tensors"])
    fp4 = gomerge.fuse(folders["fp4"], [tiny], keep_format=True, dry_run=True, progress=False)
    assert all(t["survival"] == 0 and t["residual"] == pytest.approx(1) for t in fp4.quantized["tensors"])
    readme = open(tmp_path / "out" / "README.md").read()
    assert "Survival" in readme and "model.layers.0.self_attn.q_proj.weight" in readme
    with pytest.warns(UserWarning, match="only"):
        dry = gomerge.fuse(folders["nf4"], [tiny], keep_format=True, dry_run=True, progress=False)
    assert dry.quantized["tensors"] == res.quantized["tensors"]
    quiet = gomerge.fuse(folders["nf4"], [tiny], keep_format=True, dry_run=True, survival_threshold=0.0, progress=False)
    assert not any("survives" in w for w in quiet.warnings)


def test_reference_base_and_merge_base_w16(folders):
    out, res = _fuse(folders, "nf4", "nf4-w16", dtype="bfloat16", reference_base=folders["w16"], merge_base="w16")
    w16 = load_file(os.path.join(folders["w16"], "model.safetensors"))
    deq = _dequantized_base("nf4", folders)
    delta = _delta(folders["adapter"])
    got = load_file(os.path.join(out, "model.safetensors"))
    for k in delta:
        assert torch.equal(got[k], _round_once(w16[k].double() + delta[k], torch.bfloat16)), k
    for t in res.quantized["tensors"]:
        k = t["tensor"]
        gap = (deq[k].double() - w16[k].double()).norm() / delta[k].norm()
        assert t["reference_gap"] == pytest.approx(gap.item(), rel=1e-6)
    assert res.quantized["merge_base"] == "w16"


def _hostile(folders, tmp_path, change) -> str:
    dst = tmp_path / "base"
    shutil.copytree(folders["nf4"], dst)
    sd = load_file(str(dst / "model.safetensors"))
    cfg = json.load(open(dst / "config.json"))
    change(sd, cfg)
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    json.dump(cfg, open(dst / "config.json", "w"))
    return str(dst)


Q = "model.layers.0.self_attn.q_proj.weight"


def _set_state(sd, key, **changes):
    k = Q + ".quant_state.bitsandbytes__nf4"
    js = json.loads(bytes(sd[k].tolist()))
    js.update(changes)
    sd[k] = torch.tensor(list(json.dumps(js).encode()), dtype=torch.uint8)


HOSTILE = {
    "state-size": (lambda sd, cfg: _set_state(sd, Q, shape=[64, 65]), [Q, "model.safetensors", "needs"]),
    "missing-absmax": (lambda sd, cfg: sd.pop(Q + ".absmax"), [Q, "absmax"]),
    "short-absmax": (lambda sd, cfg: sd.update({Q + ".absmax": sd[Q + ".absmax"][:3]}), [Q, "absmax has 3 codes"]),
    "nan-scale": (
        lambda sd, cfg: sd.update({Q + ".nested_absmax": torch.full_like(sd[Q + ".nested_absmax"], float("nan"))}),
        [Q, "nested_absmax", "nan"],
    ),
    "gptq": (
        lambda sd, cfg: cfg["quantization_config"].update(quant_method="gptq"),
        ["gptq", "not supported yet", "next"],
    ),
    "awq": (
        lambda sd, cfg: cfg["quantization_config"].update(quant_method="awq"),
        ["awq", "not supported yet", "next"],
    ),
    "bad-state-json": (
        lambda sd, cfg: sd.update(
            {Q + ".quant_state.bitsandbytes__nf4": torch.tensor(list(b"{nope"), dtype=torch.uint8)}
        ),
        [Q + ".quant_state", "JSON"],
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_quantized_bases(folders, tmp_path, case):
    change, words = HOSTILE[case]
    base = _hostile(folders, tmp_path, change)
    out = tmp_path / "out"
    for kw in ({"dtype": "bfloat16"}, {"keep_format": True}):
        with pytest.raises(ValueError) as e:
            gomerge.fuse(base, [folders["adapter"]], output_dir=str(out), progress=False, **kw)
        for w in words:
            assert w.lower() in str(e.value).lower(), (w, str(e.value))
        assert not out.exists()
        assert [p for p in os.listdir(tmp_path) if p.startswith(".gomerge")] == []


def test_fp8_scale_shape_without_padding_rule(folders, tmp_path):
    """A weight_scale_inv whose shape does not cover the weight in whole (ragged) blocks is refused, naming it."""
    dst = tmp_path / "fp8"
    shutil.copytree(folders["fp8"], dst)
    cfg = json.load(open(dst / "config.json"))
    cfg["quantization_config"]["weight_block_size"] = [48, 48]  # 64 / 48 and 128 / 48: ragged, scales are 2x2 not 2x2?
    json.dump(cfg, open(dst / "config.json", "w"))
    with pytest.raises(ValueError, match=r"weight_scale_inv has shape \[2 2\].*needs \[3 2\]|needs"):
        gomerge.fuse(str(dst), [folders["adapter"]], output_dir=str(tmp_path / "o"), dtype="bfloat16", progress=False)
    assert not (tmp_path / "o").exists()


def test_quantized_base_needs_a_choice(folders, tmp_path):
    with pytest.raises(ValueError, match="dtype .* or keep_format"):
        gomerge.fuse(folders["nf4"], [folders["adapter"]], output_dir=str(tmp_path / "o"), progress=False)
    with pytest.raises(ValueError, match="keep_format: the base model .* is not quantized"):
        gomerge.fuse(folders["w16"], [folders["adapter"]], output_dir=str(tmp_path / "o"), keep_format=True)
    with pytest.raises(ValueError, match="merge_base"):
        gomerge.fuse(
            folders["nf4"], [folders["adapter"]], output_dir=str(tmp_path / "o"), dtype="bf16", merge_base="w16"
        )
    assert not (tmp_path / "o").exists()


def test_ragged_fp8_blocks_fuse_both_ways(folders, tmp_path):
    """Block 48 on 64- and 128-wide weights: ragged edge blocks, zero-padded by the reference before their amax."""
    dst = tmp_path / "fp8r"
    _fp8_folder(folders["w16"], dst, block=48)
    delta = _delta(folders["adapter"])
    base_sd = load_file(str(dst / "model.safetensors"))
    res = gomerge.fuse(str(dst), [folders["adapter"]], output_dir=str(tmp_path / "k"), keep_format=True, progress=False)
    got = load_file(str(tmp_path / "k" / "model.safetensors"))
    for k in delta:
        w = _fp8_block_deq(base_sd[k], base_sd[k.replace(".weight", ".weight_scale_inv")], 48).bfloat16()
        q, inv = _fp8_reference((w.double() + delta[k]).float(), 48)
        assert _bytes(got[k]) == _bytes(q) and torch.equal(got[k.replace(".weight", ".weight_scale_inv")], inv), k
    assert len(res.quantized["tensors"]) == len(delta)


def test_fuse_request_and_result_keys_match_the_engine(folders, monkeypatch):
    from gomerge import _native

    seen = {}
    real = _native.fuse_start

    def spy(request):
        seen["request"] = request
        return real(request)

    monkeypatch.setattr(_native, "fuse_start", spy)
    res = gomerge.fuse(folders["nf4"], [folders["adapter"]], keep_format=True, dry_run=True, progress=False)
    keys = _native.request_keys()
    assert set(seen["request"]) <= set(keys["fuse"])  # the merge parameters are sent when given
    quant_keys = {"keep_format", "survival_threshold", "reference_base", "merge_base"}
    assert quant_keys <= set(seen["request"])
    assert sorted(res.__dict__) == sorted(keys["fuse_result"])


def test_cli_keep_format_and_dry_run_report(folders, tmp_path, capsys):
    from gomerge.cli import main

    rc = main(["fuse", folders["nf4"], folders["adapter"], "--keep-format", "--dry-run", "--survival-threshold", "0.2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj.weight: survival" in out
    rc = main(["fuse", folders["fp8"], folders["adapter"], "--dtype", "bfloat16", "-o", str(tmp_path / "o"), "--quiet"])
    assert rc == 0 and os.path.exists(tmp_path / "o" / "model.safetensors")


def test_llm_int8_skip_modules_stay_16bit(folders, tmp_path):
    """Layers left 16-bit by llm_int8_skip_modules (unsloth's dynamic quants) are fused as ordinary tensors, next to
    requantized 4-bit ones."""
    base = tmp_path / "skip"
    q = AutoModelForCausalLM.from_pretrained(
        folders["w16"],
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=["v_proj", "lm_head"]
        ),
        device_map="cpu",
    )
    q.save_pretrained(base)
    sd = load_file(str(base / "model.safetensors"))
    v = "model.layers.0.self_attn.v_proj.weight"
    assert sd[v].dtype == torch.bfloat16
    delta = _delta(folders["adapter"])
    res = gomerge.fuse(
        str(base), [folders["adapter"]], output_dir=str(tmp_path / "o"), keep_format=True, progress=False
    )
    got = load_file(str(tmp_path / "o" / "model.safetensors"))
    assert torch.equal(got[v], _round_once(sd[v].double() + delta[v], torch.bfloat16))
    assert v not in {t["tensor"] for t in res.quantized["tensors"]}
    qk = "model.layers.0.self_attn.q_proj.weight"
    assert qk in {t["tensor"] for t in res.quantized["tensors"]} and got[qk].dtype == torch.uint8


def test_int8_from_transformers_save_path_reloads(folders, tmp_path):
    """An int8 folder written by transformers' BitsAndBytesConfig(load_in_8bit=True) save path: --keep-format writes
    bitsandbytes' int8_vectorwise_quant of each sum, and transformers reloads it with the logits of the folder holding
    bitsandbytes' own requantized tensors."""
    base = tmp_path / "int8"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = AutoModelForCausalLM.from_pretrained(
            folders["w16"], quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu"
        )
        q.save_pretrained(base)
    sd = load_file(str(base / "model.safetensors"))
    delta = _delta(folders["adapter"])
    gomerge.fuse(str(base), [folders["adapter"]], output_dir=str(tmp_path / "o"), keep_format=True, progress=False)
    got = load_file(str(tmp_path / "o" / "model.safetensors"))
    expected = dict(sd)
    dt = torch.float32 if json.load(open(base / "config.json")).get("dtype") == "float32" else torch.bfloat16
    for k in delta:
        scb = k.replace(".weight", ".SCB")
        w = bnb_f.int8_vectorwise_dequant(sd[k], sd[scb]).to(dt)
        expected[k], expected[scb], _ = bnb_f.int8_vectorwise_quant((w.double() + delta[k]).float())
        assert torch.equal(got[k], expected[k]) and torch.equal(got[scb], expected[scb]), k
    ref = tmp_path / "ref"
    shutil.copytree(base, ref)
    save_file(expected, str(ref / "model.safetensors"), metadata={"format": "pt"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = AutoModelForCausalLM.from_pretrained(str(tmp_path / "o"), device_map="cpu")
        theirs = AutoModelForCausalLM.from_pretrained(str(ref), device_map="cpu")
    assert torch.equal(_logits(ours), _logits(theirs))
    assert not torch.equal(_logits(ours), _logits(AutoModelForCausalLM.from_pretrained(str(base), device_map="cpu")))
