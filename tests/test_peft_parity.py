"""gomerge's `add_weighted_adapter` against PEFT's, on real adapters made by PEFT.

For every case and combination type: PEFT merges the adapters inside a PeftModel, gomerge merges the directories;
every module's B'A' must agree, gomerge's output must load with `PeftModel.from_pretrained`, and its logits must
match those of PEFT's merged adapter.

Tolerances: the factor types (`linear`, `cat`, and `svd` of one adapter, which PEFT turns into `linear`) are
exact but for float32 summation order: rtol 1e-5 of the largest entry for float32 adapters, the case's rtol
(a few ulps of the output dtype) for half-precision ones. For the SVD types, the matrix PEFT factors is captured
and both results are held to svd_checks.py's rules (near-optimal error; distance within Wedin's bound at the
rank's spectral gap), which hold on every CPU's LAPACK path.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from peft import PeftModel
from peft_cases import (
    LLAMA_ALL,
    MODELS,
    AdapterSpec,
    Case,
    build_case,
    delta,
    file_factors,
    logits,
    peft_factors,
    peft_merge,
    rel_diff,
)
from svd_checks import SVD_TYPES, SVDCapture

import gomerge

CASES = [
    Case(
        "llama-3",
        "llama",
        [
            AdapterSpec(dict(r=8, lora_alpha=16, target_modules=LLAMA_ALL), 1),
            AdapterSpec(dict(r=8, lora_alpha=8, target_modules=LLAMA_ALL), 2),
            AdapterSpec(dict(r=8, lora_alpha=32, target_modules=LLAMA_ALL), 3),
        ],
        [2.0, 1.0, 1.0],
    ),
    Case(
        "llama-mixed-targets-negative",
        "llama",
        [
            AdapterSpec(dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), 4),
            AdapterSpec(dict(r=8, lora_alpha=12, target_modules=["k_proj", "v_proj", "o_proj"]), 5),
            AdapterSpec(dict(r=8, lora_alpha=8, target_modules=["q_proj", "up_proj"]), 6),
        ],
        [1.0, -0.5, 0.7],
    ),
    Case(
        "llama-embedding",
        "llama",
        [
            AdapterSpec(dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj", "v_proj"]), 7),
            AdapterSpec(dict(r=4, lora_alpha=4, target_modules=["embed_tokens", "v_proj"]), 8),
        ],
        [1.0, 0.5],
    ),
    Case(
        "conv2d",
        "conv",
        [
            AdapterSpec(dict(r=4, lora_alpha=8, target_modules=["conv1", "conv2", "head"]), 9),
            AdapterSpec(dict(r=4, lora_alpha=2, target_modules=["conv1", "conv2", "head"]), 10),
        ],
        [0.7, 1.3],
    ),
    Case(
        "gpt2-fan-in-fan-out",
        "gpt2",
        [
            AdapterSpec(dict(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True), 11),
            AdapterSpec(dict(r=8, lora_alpha=16, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True), 12),
        ],
        [1.0, 1.0],
    ),
    Case(
        "llama-rank-alpha-pattern",
        "llama",
        [
            AdapterSpec(
                dict(
                    r=8,
                    lora_alpha=16,
                    target_modules=LLAMA_ALL,
                    rank_pattern={"q_proj": 4, "layers.1.mlp.down_proj": 12},
                    alpha_pattern={"v_proj": 32},
                ),
                13,
            ),
            AdapterSpec(
                dict(
                    r=8,
                    lora_alpha=8,
                    target_modules=LLAMA_ALL,
                    rank_pattern={"q_proj": 4, "layers.1.mlp.down_proj": 12},
                    alpha_pattern={"o_proj": 4},
                ),
                14,
            ),
        ],
        [1.0, 0.8],
    ),
    Case(
        "llama-rslora",
        "llama",
        [
            AdapterSpec(
                dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]), 15
            ),
            AdapterSpec(
                dict(r=8, lora_alpha=24, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]), 16
            ),
        ],
        [1.0, 1.0],
    ),
    Case(
        "llama-regex-targets",
        "llama",
        [
            AdapterSpec(dict(r=4, lora_alpha=8, target_modules=r".*\.(q_proj|v_proj)"), 17),
            AdapterSpec(dict(r=4, lora_alpha=8, target_modules=r".*layers\.1\..*(k_proj|up_proj)"), 18),
        ],
        [1.0, 1.0],
    ),
    Case(
        "llama-different-ranks",
        "llama",
        [
            AdapterSpec(dict(r=4, lora_alpha=8, target_modules=LLAMA_ALL), 19),
            AdapterSpec(dict(r=8, lora_alpha=8, target_modules=LLAMA_ALL), 20),
            AdapterSpec(dict(r=16, lora_alpha=8, target_modules=LLAMA_ALL), 21),
        ],
        [1.0, 1.0, 1.0],
        types=("cat", "svd"),
    ),
    Case(
        "llama-single",
        "llama",
        [
            AdapterSpec(dict(r=8, lora_alpha=16, target_modules=LLAMA_ALL), 22),
        ],
        [1.5],
        types=("linear", "svd", "cat"),
    ),
    Case(
        "gram-route",
        "gram",
        [
            AdapterSpec(dict(r=8, lora_alpha=16, target_modules=["up", "down"]), 28),
            AdapterSpec(dict(r=8, lora_alpha=8, target_modules=["up", "down"]), 29),
            AdapterSpec(dict(r=8, lora_alpha=16, target_modules=["up", "down"]), 30),
        ],
        [2.0, 1.0, 1.0],
        types=("svd",),
    ),
    Case(
        "llama-bf16",
        "llama",
        [
            AdapterSpec(dict(r=8, lora_alpha=16, target_modules=LLAMA_ALL), 23, torch.bfloat16),
            AdapterSpec(dict(r=8, lora_alpha=8, target_modules=LLAMA_ALL), 24, torch.bfloat16),
            AdapterSpec(dict(r=8, lora_alpha=16, target_modules=LLAMA_ALL), 25, torch.bfloat16),
        ],
        [2.0, 1.0, 1.0],
        rtol=1e-2,
    ),
    Case(
        "llama-f16",
        "llama",
        [
            AdapterSpec(dict(r=8, lora_alpha=16, target_modules=LLAMA_ALL), 26, torch.float16),
            AdapterSpec(dict(r=8, lora_alpha=8, target_modules=LLAMA_ALL), 27, torch.float16),
        ],
        [1.0, 1.0],
        rtol=2e-3,
    ),
]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {c.name: build_case(c, str(root)) for c in CASES}


def _params():
    for c in CASES:
        for t in c.types:
            yield pytest.param(c, t, id=f"{c.name}-{t}")


def compare(
    case: Case,
    theirs: dict,
    ours: dict,
    rtol: float,
    label: str,
    record,
    svd_inputs: dict | None = None,
    check_truncation=None,
) -> None:
    """Every module's B'A' against PEFT's: through svd_checks' rules where PEFT ran an SVD on it (float32 cases;
    `svd_inputs` holds the captured matrices), else elementwise to `rtol` of the largest entry."""
    assert sorted(ours) == sorted(theirs), "gomerge and PEFT merged different modules"
    worst = 0.0
    for mod, (a, b) in theirs.items():
        d_theirs, d_ours = delta(a, b), delta(*ours[mod])
        worst = max(worst, rel_diff(d_ours, d_theirs))
        if svd_inputs is not None and mod in svd_inputs and case.rtol == 1e-5:
            check_truncation(svd_inputs[mod], a.shape[0], d_ours, d_theirs, label=f"{label} {mod}")
            continue
        np.testing.assert_allclose(
            d_ours,
            d_theirs,
            rtol=rtol,
            atol=rtol * np.abs(d_theirs).max(),
            err_msg=f"{mod}: rule exact (factor types: rtol {rtol} of the largest entry)",
        )
    record(label, worst)


@pytest.mark.parametrize("case,combination_type", list(_params()))
def test_parity_with_peft(case, combination_type, adapters, tmp_path, record_parity, check_truncation):
    dirs = adapters[case.name]
    with SVDCapture() as cap:
        model = peft_merge(case, dirs, combination_type)
    out = tmp_path / "merged"
    with pytest.warns(UserWarning) if len(dirs) == 1 and combination_type != "linear" else _nullcontext():
        res = gomerge.add_weighted_adapter(dirs, case.weights, "merged", combination_type, output_dir=out)
    assert res.output_dir == str(out)
    ours = file_factors(str(out))
    label = f"{case.name}-{combination_type}"
    svd_inputs = cap.by_module(model) if combination_type in SVD_TYPES else None
    compare(case, peft_factors(model), ours, case.rtol, label, record_parity, svd_inputs, check_truncation)

    # the written config is PEFT's merged config, with use_rslora false
    cfg = json.load(open(out / "adapter_config.json"))
    peft_cfg = model.peft_config["merged"]
    assert cfg["r"] == peft_cfg.r == res.rank and cfg["lora_alpha"] == peft_cfg.lora_alpha
    if isinstance(peft_cfg.target_modules, str):
        assert cfg["target_modules"] == peft_cfg.target_modules
    else:
        assert set(cfg["target_modules"]) == set(peft_cfg.target_modules)
    assert cfg["use_rslora"] is False
    src_cfg = json.load(open(os.path.join(dirs[0], "adapter_config.json")))
    for k, v in src_cfg.items():
        if k not in ("r", "lora_alpha", "target_modules", "use_rslora", "rank_pattern", "alpha_pattern"):
            assert cfg[k] == v, k

    # gomerge's output loads in PEFT and gives the logits of PEFT's merged adapter
    if peft_cfg.use_rslora:
        # PEFT 0.21.2 keeps use_rslora from adapter 0, so its merged adapter is sqrt(r) times too strong (the
        # factors already carry every source's scaling). Undo that known defect before comparing logits.
        for m in model.modules():
            if isinstance(getattr(m, "scaling", None), dict) and "merged" in m.scaling:
                m.scaling["merged"] = 1.0
    loaded = PeftModel.from_pretrained(MODELS[case.model](0), str(out)).eval()
    np.testing.assert_allclose(
        logits(loaded, case.model),
        logits(model, case.model),
        rtol=max(case.rtol, 1e-4),
        atol=max(case.rtol, 1e-4) * np.abs(logits(model, case.model)).max(),
    )


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize(
    "case_name,svd_rank",
    [(c, r) for c in ("llama-3", "llama-embedding", "gpt2-fan-in-fan-out") for r in (4, 8, 32)] + [("conv2d", 4)],
)
def test_svd_rank_parity(case_name, svd_rank, adapters, tmp_path, record_parity, check_truncation):
    case = next(c for c in CASES if c.name == case_name)
    dirs = adapters[case.name]
    with SVDCapture() as cap:
        model = peft_merge(case, dirs, "svd", svd_rank=svd_rank)
    out = tmp_path / "merged"
    res = gomerge.add_weighted_adapter(dirs, case.weights, "merged", "svd", svd_rank=svd_rank, output_dir=out)
    assert res.rank == svd_rank
    ours = file_factors(str(out))
    for a, b in ours.values():
        assert a.shape[0] == b.shape[1] == svd_rank
    label = f"{case.name}-svd-rank{svd_rank}"
    compare(case, peft_factors(model), ours, 1e-5, label, record_parity, cap.by_module(model), check_truncation)


@pytest.mark.parametrize("clamp", [0.0, 0.5, 0.9, 0.99, 1.0])
def test_svd_clamp_follows_peft_rule(clamp, adapters, tmp_path):
    """svd_clamp: hi = torch.quantile(cat(B'.flat, A'.flat), clamp); both factors clamped to [-hi, hi].

    PEFT's factors carry LAPACK's arbitrary singular-vector signs, so the rule is checked on gomerge's own unclamped
    factors, with PEFT's code (torch.quantile + clamp) applied to them.
    """
    dirs = adapters["llama-3"]
    plain, clamped = tmp_path / "plain", tmp_path / "clamped"
    gomerge.add_weighted_adapter(dirs, [2.0, 1.0, 1.0], "m", "svd", output_dir=plain)
    gomerge.add_weighted_adapter(dirs, [2.0, 1.0, 1.0], "m", "svd", svd_clamp=clamp, output_dir=clamped)
    p, c = file_factors(str(plain)), file_factors(str(clamped))
    for mod, (a, b) in p.items():
        ta, tb = torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)
        hi = torch.quantile(torch.cat([tb.flatten(), ta.flatten()]), clamp)
        np.testing.assert_allclose(c[mod][0], ta.clamp(-hi, hi).numpy(), rtol=1e-6, atol=1e-7, err_msg=mod)
        np.testing.assert_allclose(c[mod][1], tb.clamp(-hi, hi).numpy(), rtol=1e-6, atol=1e-7, err_msg=mod)


def test_svd_rank_above_module_size(adapters, tmp_path):
    """conv2 is a 1x1 Conv2d with 8 inputs and 6 outputs: PEFT fails on svd_rank=8 (its SVD has only 6
    components); gomerge pads the factors with zeros, so B'A' is still the exact weighted sum (= the cat merge)."""
    case = next(c for c in CASES if c.name == "conv2d")
    dirs = adapters[case.name]
    with pytest.raises(RuntimeError, match="invalid for input"):
        peft_merge(case, dirs, "svd", svd_rank=8)
    gomerge.add_weighted_adapter(dirs, case.weights, "m", "svd", svd_rank=8, output_dir=tmp_path / "svd")
    gomerge.add_weighted_adapter(dirs, case.weights, "m", "cat", output_dir=tmp_path / "cat")
    svd, cat = file_factors(str(tmp_path / "svd")), file_factors(str(tmp_path / "cat"))
    a, b = svd["conv2"]
    assert a.shape == (8, 8, 1, 1) and b.shape == (6, 8, 1, 1)
    assert rel_diff(delta(a, b), delta(*cat["conv2"])) < 1e-5
