"""The engine's quantization codecs (gomerge/quant) against their references, bit for bit on CPU: bitsandbytes'
quantize_4bit / dequantize_4bit (NF4, FP4, double quant, odd sizes, quant_storage), int8_vectorwise_quant /
int8_vectorwise_dequant, torch's float8_e4m3fn casts with transformers' fine-grained FP8 rule (448 / amax per
128 x 128 block) and compressed-tensors' per-tensor / per-channel rule (amax / 448), and transformers'
convert_moe_packed_tensors for MXFP4."""

from __future__ import annotations

import json
import os

import bitsandbytes.functional as bnb_f  # noqa: E402
import pytest
import torch
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute  # noqa: E402
from safetensors.torch import load_file, save_file

from gomerge import _native

torch._dynamo.config.disable = True  # bitsandbytes' default kernels are torch.compile'd: compiling them adds minutes


def _bnb_dequantize_4bit(q: torch.Tensor, st) -> torch.Tensor:
    """bitsandbytes' pure-torch dequantize_4bit (backends/default/ops.py), in the state's dtype. Its C kernel for
    CPU (what dequantize_4bit calls here) agrees with it when a row is a whole number of blocks, and is wrong when
    blocks span rows (bitsandbytes 0.50.2 with the AVX-512 build): test_bnb4_c_kernel_agrees_on_whole_row_blocks."""
    absmax = st.absmax
    if st.nested:
        absmax = bnb_f.dequantize_blockwise(st.absmax, st.state2) + st.offset
    return _dequantize_4bit_compute(q.view(torch.uint8).reshape(-1), absmax, st.code, st.blocksize, st.shape, st.dtype)


def _codec(tmp_path, fmt: str, op: str, tensors: dict[str, torch.Tensor], **extra) -> dict[str, torch.Tensor]:
    src = os.path.join(tmp_path, f"{fmt}-{op}-in.safetensors")
    dst = os.path.join(tmp_path, f"{fmt}-{op}-out.safetensors")
    save_file({k: v.contiguous() for k, v in tensors.items()}, src)
    _native.quant_codec({"format": fmt, "op": op, "input": src, "output": dst, **extra})
    return load_file(dst)


def _state_tensors(weight: torch.Tensor, state) -> dict[str, torch.Tensor]:
    packed = state.as_dict(packed=True)
    out = {"weight": weight.view(torch.uint8) if weight.dtype != torch.uint8 else weight}
    for k, v in packed.items():
        out["quant_state" if k.startswith("quant_state.") else k] = v
    return out


CASES_4BIT = [
    # (quant_type, nested, shape, blocksize, dtype)
    ("nf4", False, (64, 96), 64, torch.bfloat16),
    ("nf4", True, (128, 96), 64, torch.bfloat16),
    ("fp4", False, (64, 96), 64, torch.float16),
    ("fp4", True, (96, 70), 64, torch.float32),
    ("nf4", False, (33, 7), 64, torch.float32),  # a short last block and an odd element count
    ("nf4", True, (300, 64), 128, torch.bfloat16),  # more than 256 blocks: two nested blocks
]


@pytest.mark.parametrize("quant_type,nested,shape,blocksize,dtype", CASES_4BIT)
def test_bnb4_dequantize_equals_bitsandbytes(tmp_path, quant_type, nested, shape, blocksize, dtype):
    torch.manual_seed(0)
    w = (torch.randn(shape) * 0.05).to(dtype)
    q, st = bnb_f.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
    ref = _bnb_dequantize_4bit(q, st).float()
    out = _codec(tmp_path, "bnb4", "dequantize", _state_tensors(q, st))["out"]
    assert out.shape == ref.shape
    assert torch.equal(out, ref), (out - ref).abs().max()


@pytest.mark.parametrize("quant_type,dtype", [("nf4", torch.bfloat16), ("fp4", torch.float32), ("nf4", torch.float16)])
def test_bnb4_c_kernel_agrees_on_whole_row_blocks(tmp_path, quant_type, dtype):
    """Where each row is a whole number of blocks (every Linear of a real model), bitsandbytes' CPU C kernel gives
    the same values as its pure-torch one, and so as the engine."""
    torch.manual_seed(10)
    w = (torch.randn(48, 128) * 0.05).to(dtype)
    q, st = bnb_f.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=True)
    out = _codec(tmp_path, "bnb4", "dequantize", _state_tensors(q, st))["out"]
    assert torch.equal(out, bnb_f.dequantize_4bit(q, st).float())


@pytest.mark.parametrize("quant_type,nested,shape,blocksize,dtype", CASES_4BIT)
def test_bnb4_quantize_equals_bitsandbytes(tmp_path, quant_type, nested, shape, blocksize, dtype):
    torch.manual_seed(1)
    w = torch.randn(shape) * 0.05
    q, st = bnb_f.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
    ref = _state_tensors(q, st)
    templ = {k: ref[k] for k in ("quant_map", "quant_state", "nested_quant_map") if k in ref}
    if nested:  # torch's float32 mean (a CPU-dependent summation order) is given: the rest is compared bit for bit
        templ["offset"] = st.offset.reshape(1).float()
    out = _codec(tmp_path, "bnb4", "quantize", {"w": w, **templ})
    assert torch.equal(out["weight"], ref["weight"])
    for k in ("nested_absmax", "nested_quant_map"):
        if k in ref:
            assert torch.equal(out[k], ref[k]), k
    if not nested:
        assert torch.equal(out["absmax"], ref["absmax"])
    else:  # the codes of absmax - offset: bitsandbytes' own, bit for bit (test_bnb8_blockwise_equals_bitsandbytes)
        assert torch.equal(out["absmax"], ref["absmax"])
    assert bytes(out["quant_state"].tolist()) == bytes(ref["quant_state"].tolist())


def test_bnb4_quant_storage_bf16_reads_the_raw_bytes(tmp_path):
    torch.manual_seed(2)
    w = torch.randn(64, 64) * 0.05
    q, st = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4", quant_storage=torch.bfloat16)
    assert q.dtype == torch.bfloat16
    ref = _bnb_dequantize_4bit(q, st).float()
    out = _codec(tmp_path, "bnb4", "dequantize", _state_tensors(q, st))["out"]
    assert torch.equal(out, ref)


def _mean_tolerance(x: torch.Tensor) -> float:
    """How far torch's float32 mean of x on CPU may lie from the correctly rounded mean. torch sums float32 in float32
    (a cascade of vectorized partial sums whose order follows the CPU's vector width: AVX2, AVX-512, NEON), then
    divides by n and rounds. Whatever the order, a float32 sum of n terms is within gamma_(n-1) * sum|x| of the exact
    sum (u = 2^-24, gamma_k = k u / (1 - k u)); the division adds u |mean| and the correctly rounded mean u |mean|:
    together at most gamma_(n+1) * mean|x|."""
    n, u = x.numel(), 2.0**-24
    return (n + 1) * u / (1 - (n + 1) * u) * x.double().abs().mean().item()


@pytest.mark.parametrize("shape,scale", [((256, 256), 0.05), ((1000, 640), 1.0), ((3, 64 * 300), 1e-3)])
def test_bnb4_nested_offset_is_the_float32_mean(tmp_path, shape, scale):
    """Without the reference's offset, the engine's mean (float64 sum, one rounding) is within the float32 summation
    bound of torch's CPU-dependent float32 mean; the codes and nested absmax are bitsandbytes' quantize_blockwise of
    absmax - (the engine's offset), bit for bit."""
    torch.manual_seed(3)
    w = torch.randn(shape) * scale
    q, st = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    ref = _state_tensors(q, st)
    templ = {k: ref[k] for k in ("quant_map", "quant_state", "nested_quant_map")}
    out = _codec(tmp_path, "bnb4", "quantize", {"w": w, **templ})
    assert torch.equal(out["weight"], ref["weight"])  # the 4-bit codes do not depend on the offset
    off = json.loads(bytes(out["quant_state"].tolist()))["nested_offset"]
    _, plain = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4")  # the absmax values double quant starts from
    assert abs(off - st.offset.item()) <= _mean_tolerance(plain.absmax)
    # the engine's offset: a float64 mean (relative error at most (n+1) 2^-53) rounded once to float32
    m, n = plain.absmax.double().mean().item(), plain.absmax.numel()
    assert abs(off - m) <= (2.0**-24 + (n + 1) * 2.0**-53) * m
    codes, st2 = bnb_f.quantize_blockwise(plain.absmax - torch.tensor(off, dtype=torch.float32), blocksize=256)
    assert torch.equal(out["absmax"], codes)
    assert torch.equal(out["nested_absmax"], st2.absmax)


@pytest.mark.parametrize("shape", [(16, 40), (7, 129)])
def test_int8_equals_bitsandbytes(tmp_path, shape):
    torch.manual_seed(4)
    w = torch.randn(shape)
    cb, scb, _ = bnb_f.int8_vectorwise_quant(w.clone())
    out = _codec(tmp_path, "int8", "quantize", {"w": w})
    assert torch.equal(out["weight"], cb)
    assert torch.equal(out["SCB"], scb)
    ref = bnb_f.int8_vectorwise_dequant(cb, scb)
    deq = _codec(tmp_path, "int8", "dequantize", {"weight": cb, "SCB": scb})["out"]
    assert torch.equal(deq, ref)


def _fp8_block_reference(w: torch.Tensor, bm: int = 128, bn: int = 128):
    """transformers' Fp8Quantize rule, with ragged edge blocks zero-padded to the block size (DeepSeek's rule)."""
    rows, cols = w.shape
    pr, pc = -rows % bm, -cols % bn
    wp = torch.nn.functional.pad(w.float(), (0, pc, 0, pr))
    t = wp.reshape(wp.shape[0] // bm, bm, wp.shape[1] // bn, bn)
    amax = t.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, 448.0 / torch.where(amax > 0, amax, torch.ones_like(amax)), torch.ones_like(amax))
    inv = (1.0 / scale).float()
    q = torch.clamp(t * scale[:, None, :, None], -448, 448).to(torch.float8_e4m3fn)
    q = q.reshape(wp.shape)[:rows, :cols]
    return q, inv


@pytest.mark.parametrize("shape", [(256, 384), (200, 130), (5, 7)])
def test_fp8_block_equals_torch_casts(tmp_path, shape):
    torch.manual_seed(5)
    w = torch.randn(shape) * 0.02
    w[0, 0] = 0.5  # one block with a larger amax
    q, inv = _fp8_block_reference(w)
    out = _codec(tmp_path, "fp8_block", "quantize", {"w": w})
    assert torch.equal(out["weight"].view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(out["weight_scale_inv"], inv)
    full = inv.repeat_interleave(128, 0)[: shape[0]].repeat_interleave(128, 1)[:, : shape[1]]
    ref = q.float().reshape(shape) * full
    deq = _codec(tmp_path, "fp8_block", "dequantize", {"weight": q, "weight_scale_inv": inv})["out"]
    assert torch.equal(deq, ref)


def test_fp8_e4m3_every_byte_decodes_as_torch(tmp_path):
    q = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).reshape(1, 256)
    deq = _codec(tmp_path, "fp8_scaled", "dequantize", {"weight": q, "weight_scale": torch.ones(1)})["out"]
    ref = q.float()
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(deq), nan)
    assert torch.equal(deq[~nan], ref[~nan])


@pytest.mark.parametrize("per_channel", [False, True])
def test_fp8_scaled_equals_torch_casts(tmp_path, per_channel):
    torch.manual_seed(6)
    w = torch.randn(48, 80) * 0.03
    amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax().reshape(1)
    scale = amax / 448.0
    q = torch.clamp(w / scale, -448, 448).to(torch.float8_e4m3fn)
    out = _codec(tmp_path, "fp8_scaled", "quantize", {"w": w}, per_channel=per_channel)
    assert torch.equal(out["weight"].view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(out["weight_scale"], scale)
    deq = _codec(tmp_path, "fp8_scaled", "dequantize", {"weight": q, "weight_scale": scale})["out"]
    assert torch.equal(deq, q.float() * scale)


def test_mxfp4_dequantize_equals_convert_moe_packed_tensors(tmp_path):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(7)
    e, n, groups = 2, 6, 3  # [E, N, K/32, 16] blocks, [E, N, K/32] scales
    blocks = torch.randint(0, 256, (e, n, groups, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(110, 140, (e, n, groups), dtype=torch.uint8, generator=g)
    ref = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, K, N]
    out = _codec(tmp_path, "mxfp4", "dequantize", {"blocks": blocks, "scales": scales})["out"]  # [E, N, K]
    assert torch.equal(out.transpose(1, 2), ref)


def test_mxfp4_quantize_round_trips_and_encodes_the_ocp_rule(tmp_path):
    """The encoder's output decodes (by transformers) to values within half an FP4 step of the input; the shared
    exponent is floor(log2(amax)) - 2 (OCP MX v1.0) and requantizing the decoded values gives the same bytes."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    torch.manual_seed(8)
    w = torch.randn(2, 4, 64)  # [E, N, K]
    out = _codec(tmp_path, "mxfp4", "quantize", {"w": w})
    blocks, scales = out["blocks"], out["scales"]
    assert blocks.shape == (2, 4, 2, 16) and scales.shape == (2, 4, 2)
    amax = w.reshape(2, 4, 2, 32).abs().amax(-1)
    assert torch.equal(scales.int() - 127, torch.floor(torch.log2(amax)).int() - 2)
    deq = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).transpose(1, 2)
    step = torch.ldexp(torch.ones_like(amax), scales.int() - 127).repeat_interleave(32, -1).reshape(w.shape)
    assert ((deq - w).abs() <= 2 * step).all()  # values above 6 steps saturate: at most 2 steps off
    again = _codec(tmp_path, "mxfp4", "quantize", {"w": deq})
    assert torch.equal(again["blocks"], blocks) and torch.equal(again["scales"], scales)


def test_codec_errors_name_the_tensor(tmp_path):
    torch.manual_seed(9)
    q, st = bnb_f.quantize_4bit(torch.randn(64, 64), blocksize=64, quant_type="nf4")
    t = _state_tensors(q, st)
    t["absmax"] = t["absmax"][:10]
    with pytest.raises(ValueError, match="absmax has 10 values"):
        _codec(tmp_path, "bnb4", "dequantize", t)
    with pytest.raises(ValueError, match="weight_scale_inv has 1 values"):
        q8 = torch.zeros(200, 200).to(torch.float8_e4m3fn)
        _codec(tmp_path, "fp8_block", "dequantize", {"weight": q8, "weight_scale_inv": torch.ones(1, 1)})


def _nearest_codes(x: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    """The nearest value of the code to x / absmax (float32 division), ties to the lower: what bitsandbytes'
    lookup table approximates."""
    normed = x / absmax.repeat_interleave(blocksize)[: x.numel()]
    return (normed[:, None] - code[None, :]).abs().argmin(1).to(torch.uint8)  # argmin: the first (lower) of a tie


def _adversarial_blockwise(code: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Blocks of values on and one float32 step either side of every midpoint of the code and every value of the code,
    and on the kernel's lookup-table bin edges (-1 + (2i + 1) / 65535 and their neighbours), each block scaled by
    its own absmax (led by +-absmax, so that x * (1 / absmax) rounds as in the kernel)."""
    inf = torch.tensor(float("inf"))
    mid = (code[1:] + code[:-1]) * 0.5
    edges = -1 + (2 * torch.arange(65535, dtype=torch.float64) + 1) / 65535
    base = torch.cat([mid, code, edges.float()])
    vals = torch.cat([base, torch.nextafter(base, inf), torch.nextafter(base, -inf)]).clamp(-1, 1)
    per = blocksize - 1
    vals = torch.cat([vals, torch.zeros(-vals.numel() % per)]).reshape(-1, per)
    g = torch.Generator().manual_seed(12)
    scale = torch.exp(torch.randn(vals.shape[0], 1, generator=g) * 3)
    lead = torch.where(torch.rand(vals.shape[0], 1, generator=g) < 0.5, -scale, scale)
    return torch.cat([lead, vals * scale], 1).reshape(-1)


@pytest.mark.parametrize("n,blocksize", [(256 * 400, 256), (1000, 256), (4096, 64), (77, 256), ("adversarial", 256)])
def test_bnb8_blockwise_equals_bitsandbytes(tmp_path, n, blocksize):
    """Double quant's absmax codes and block absmax equal bitsandbytes 0.50.2's CPU quantize_blockwise bit for bit:
    its lookup table of 65536 bins over [-1, 1] (csrc/cpu_ops.cpp), on random values and on values at the code's
    midpoints and the table's bin edges, where the table's code is not the nearest value."""
    torch.manual_seed(11)
    code = bnb_f.create_dynamic_map().float()
    x = _adversarial_blockwise(code, blocksize) if n == "adversarial" else torch.randn(n)
    q, st = bnb_f.quantize_blockwise(x, code=code, blocksize=blocksize)
    out = _codec(tmp_path, "bnb8", "quantize", {"w": x, "code": st.code}, block=[blocksize])
    assert torch.equal(out["absmax"], st.absmax)
    assert torch.equal(out["codes"], q)
    if n == "adversarial":  # the inputs reach the table's departures from the nearest value
        assert (q != _nearest_codes(x, st.absmax, code, blocksize)).sum() > 100


def test_bnb8_zero_block_gives_code_zero(tmp_path):
    x = torch.cat([torch.zeros(64), torch.randn(64)])
    q, st = bnb_f.quantize_blockwise(x, blocksize=64)
    out = _codec(tmp_path, "bnb8", "quantize", {"w": x, "code": st.code}, block=[64])
    assert torch.equal(out["codes"], q) and not q[:64].any()
    assert torch.equal(out["absmax"], st.absmax)
