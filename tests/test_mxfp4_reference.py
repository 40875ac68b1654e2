"""The engine's MXFP4 encoder (gomerge/quant/mxfp4.go) against torchao's ``to_mx`` (torchao.prototype.mx_formats,
the OCP MX v1.0 reference in PyTorch, its default FLOOR scale mode), bit for bit on CPU: scale bytes [E, N, K/32]
and packed nibbles [E, N, K/32, 16] (element 2i in the low nibble), the layout gpt-oss checkpoints store and
transformers' convert_moe_packed_tensors decodes. transformers' own MXFP4 quantizer calls triton_kernels'
downcast_to_mxfp, which needs a GPU and is not on PyPI under that name."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torchao.prototype.mx_formats.mx_tensor import to_mx

from gomerge import _native

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
MIDPOINTS = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]


def _reference(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torchao's blocks [..., K/32, 16] and scale bytes [..., K/32] for w [..., K] (float32)."""
    scale, data = to_mx(w.contiguous(), torch.float4_e2m1fn_x2, 32)
    lead = w.shape[:-1]
    blocks = data.view(torch.uint8).reshape(*lead, w.shape[-1] // 32, 16)
    return blocks, scale.view(torch.uint8).reshape(*lead, w.shape[-1] // 32)


def _gomerge(tmp_path, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    src, dst = os.path.join(tmp_path, "w.safetensors"), os.path.join(tmp_path, "q.safetensors")
    save_file({"w": w.contiguous()}, src)
    _native.quant_codec({"format": "mxfp4", "op": "quantize", "input": src, "output": dst})
    out = load_file(dst)
    return out["blocks"], out["scales"]


def _adversarial() -> torch.Tensor:
    """Rows of 32 values [rows, 32] that hit every branch of the rule: each E2M1 value and midpoint (both signs)
    under scales 2^-127..2^127, amax exactly at a power of two and one ulp either side, zeros and -0, blocks whose
    amax is float32-subnormal or near the smallest normal, values past 6 x scale (saturation), float32 max."""
    g = torch.Generator().manual_seed(21)
    rows = []
    grid = torch.tensor(E2M1 + MIDPOINTS + [-v for v in E2M1 + MIDPOINTS] + [6.0, -6.0, 0.0, -0.0])[:32]
    for e in [-127, -126, -125, -124, -120, -100, -60, -3, -1, 0, 1, 2, 10, 60, 100, 120, 124, 125]:
        s = 2.0**e
        rows.append(grid.double() * s)
        # amax just above / below a power of two: floor(log2(amax)) changes at exactly 2^k
        for amax in (4.0 * s, torch.nextafter(torch.tensor(4.0 * s), torch.tensor(0.0)).item(), 4.0 * s * (1 + 2**-23)):
            r = (torch.rand(32, generator=g, dtype=torch.float64) * 2 - 1) * amax
            r[int(torch.randint(0, 32, (1,), generator=g))] = amax
            rows.append(r)
        # midpoints of the scaled grid one ulp off, and midpoints scaled by the group's own scale (ties)
        mids = torch.tensor(MIDPOINTS * 4 + [6.0, 4.0, 7.0, 5.5], dtype=torch.float64) * s
        rows.append(mids)
        rows.append(torch.nextafter(mids.float(), torch.tensor(0.0)).double())
        rows.append(torch.nextafter(mids.float(), torch.tensor(float("inf"))).double())
    rows.append(torch.zeros(32, dtype=torch.float64))
    rows.append(-torch.zeros(32, dtype=torch.float64))
    sub = torch.tensor([1e-45, 1.4e-45, 3e-44, 1e-40, 5e-39, 1.17549435e-38, 2.3e-38, 1e-39] * 4, dtype=torch.float64)
    rows.append(sub)
    rows.append(-sub)
    big = torch.tensor([3.4028234e38, 1e38, 6e37, 5e37, 2.5e38, 1e30, -3e38, 2e38] * 4, dtype=torch.float64)
    rows.append(big)
    rows.append(torch.linspace(-7.5, 7.5, 32, dtype=torch.float64))  # past 6 x scale: saturates
    return torch.stack(rows).float()


@pytest.mark.parametrize(
    "name,make",
    [
        ("randn", lambda g: torch.randn(3, 8, 128, generator=g)),
        ("wide", lambda g: torch.randn(2, 16, 64, generator=g) * torch.logspace(-30, 30, 64)),
        ("bf16-values", lambda g: (torch.randn(2, 8, 96, generator=g) * 0.02).bfloat16().float()),
        ("bf16-file", lambda g: (torch.randn(4, 16, 256, generator=g) * 0.02).bfloat16()),  # a BF16 input tensor
        ("sparse", lambda g: torch.randn(2, 4, 64, generator=g) * (torch.rand(2, 4, 64, generator=g) < 0.1)),
    ],
)
def test_mxfp4_encoder_equals_torchao_on_random_inputs(tmp_path, name, make):
    w = make(torch.Generator().manual_seed(len(name)))  # fixed per case (str hashes vary between runs)
    blocks, scales = _gomerge(tmp_path, w)
    ref_blocks, ref_scales = _reference(w)
    assert torch.equal(scales, ref_scales)
    assert torch.equal(blocks, ref_blocks)


def test_mxfp4_encoder_equals_torchao_on_adversarial_inputs(tmp_path):
    w = _adversarial()
    assert torch.isfinite(w).all()
    blocks, scales = _gomerge(tmp_path, w.reshape(1, *w.shape))
    ref_blocks, ref_scales = _reference(w)
    bad_scales = (scales[0] != ref_scales).nonzero().flatten().tolist()
    bad_blocks = (blocks[0] != ref_blocks).any(-1).any(-1).nonzero().flatten().tolist()
    assert bad_scales == [] and bad_blocks == [], f"rows differing: scales {bad_scales}, blocks {bad_blocks}"


def test_mxfp4_encoder_equals_torchao_on_nan_and_inf(tmp_path):
    """A NaN anywhere in a group makes its scale byte 255 (E8M0 NaN); an infinity gives scale byte 253 and its own
    element the code of 6 (saturated), the others of the group 0; as torchao does."""
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(3))
    w[0, 5] = float("nan")
    w[1, 0] = float("inf")
    w[2, 31] = float("-inf")
    w[3, 7], w[3, 8] = float("inf"), float("nan")
    blocks, scales = _gomerge(tmp_path, w.reshape(1, 6, 32))
    ref_blocks, ref_scales = _reference(w)
    assert torch.equal(scales[0], ref_scales)
    assert torch.equal(blocks[0], ref_blocks)


def test_mxfp4_reencoding_any_blocks_is_lossless(tmp_path):
    """Blocks written by any rule (random codes, so also triton_kernels' ROUND_UP scales), decoded by transformers and
    re-encoded by gomerge, decode to the same values: the group's largest code c sets gomerge's exponent to
    floor(log2(c x 2^s)) - 2, which multiplies every code of the group by 1, 2, 4 or 8 onto the E2M1 grid."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(22)
    blocks = torch.randint(0, 256, (2, 8, 4, 16), dtype=torch.uint8, generator=g)
    blocks[0, 0, 0] = 0x11  # a group whose largest magnitude is 0.5 (x 8)
    blocks[0, 0, 1] = 0x23  # 1.5 (x 4)
    blocks[0, 0, 2] = 0x45  # 3 (x 2)
    scales = torch.randint(9, 254, (2, 8, 4), dtype=torch.uint8, generator=g)
    deq = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).transpose(1, 2).contiguous()  # [E, N, K]
    b2, s2 = _gomerge(tmp_path, deq)
    again = convert_moe_packed_tensors(b2, s2, dtype=torch.float32).transpose(1, 2)
    assert torch.equal(again, deq)
