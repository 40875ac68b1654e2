"""Mixture-of-experts adapters (issue 20): LoRA on expert parameters through PEFT's `target_parameters`
(lora.ParamWrapper), read, merged, written, as PEFT defines them.

The oracle of an adapter is PEFT's own `get_delta_weight` per expert in float64 (moe_cases.merged_deltas). The oracle
of a merge is PEFT's `add_weighted_adapter` applied per expert: every expert becomes an nn.Linear of its own
(moe_cases.unrolled_merge), which is what gomerge's per-expert merge means. Tolerances: the factor types and the SVD
types at a rank that truncates nothing are exact up to float32 rounding of sums of a few products of O(1) factors:
rtol 1e-5 of the largest entry.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from moe_cases import (
    EXPERT_PARAMS,
    MoeSpec,
    logits,
    load_peft,
    make_adapter,
    merged_deltas,
    reference_logits,
    unrolled_merge,
)

import gomerge

VARIANTS = {
    "plain": [MoeSpec(seed=1), MoeSpec(seed=2, alpha=4.0)],
    "rslora-patterns": [
        MoeSpec(seed=3, use_rslora=True, rank_pattern={"gate_up_proj": 2}, alpha_pattern={"down_proj": 3.0}),
        MoeSpec(seed=4, use_rslora=True, rank_pattern={"gate_up_proj": 2}, alpha=5.0),
    ],
    "params-only": [MoeSpec(seed=5, target_modules=[]), MoeSpec(seed=6, target_modules=[])],
}
KINDS = ["mixtral", "qwen3_moe"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    cache: dict[tuple[str, str], list[str]] = {}

    def get(kind: str, variant: str) -> list[str]:
        if (kind, variant) not in cache:
            cache[kind, variant] = [make_adapter(kind, s, str(root / f"{kind}-{variant}-{i}"))
                                    for i, s in enumerate(VARIANTS[variant])]
        return cache[kind, variant]

    return get


def rel(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))


def assert_updates(out: str, ref: dict[str, np.ndarray], kind: str, rtol: float = 1e-5) -> None:
    got = merged_deltas(kind, out)
    assert sorted(got) == sorted(ref)
    for key, d in ref.items():
        assert got[key].shape == d.shape, key
        assert rel(got[key], d) < rtol, (key, rel(got[key], d))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cat_reads_and_writes_per_expert_factors_as_peft(built, kind, variant, tmp_path, record_parity):
    """cat is exact: the merged adapter's per-expert updates, as PEFT's get_delta_weight computes them, are the
    weighted sums of the sources' (each PEFT's get_delta_weight in float64): layout, order, nesting through
    base_layer, rsLoRA, rank_pattern and alpha_pattern are all read as PEFT reads them, and written so."""
    dirs = built(kind, variant)
    weights = [0.7, -1.3]
    out = str(tmp_path / "cat")
    gomerge.add_weighted_adapter(dirs, weights, "cat", combination_type="cat", output_dir=out)
    srcs = [merged_deltas(kind, d) for d in dirs]
    ref = {k: sum(w * s[k] for w, s in zip(weights, srcs)) for k in srcs[0]}
    assert_updates(out, ref, kind)
    record_parity(f"moe {kind} {variant} cat", max(rel(merged_deltas(kind, out)[k], ref[k]) for k in ref))
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert sorted(cfg["target_parameters"]) == sorted(EXPERT_PARAMS)


def test_error_message_gives_the_rank_per_expert(built, tmp_path):
    """The config's r is the rank per expert; a stack whose rows are not a multiple of it is refused by name."""
    import shutil

    src = built("mixtral", "params-only")[0]
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    cfg = json.load(open(bad / "adapter_config.json"))
    cfg["r"] = 3
    json.dump(cfg, open(bad / "adapter_config.json", "w"))
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.experts\.lora_A\.weight \(parameter model\.layers\.0\.mlp\.experts\.down_proj\) has 16 rows, which is not a multiple of r=3"):
        gomerge.add_weighted_adapter([str(bad)], [1.0], "x", combination_type="cat", output_dir=str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()
    info = gomerge.inspect_adapter(src)
    assert info["r"] == 4


METHODS = [
    ("linear", {}),
    ("cat", {}),
    ("ties", {"density": 0.5}),
    ("magnitude_prune", {"density": 0.6}),
    ("svd", {"svd_rank": 8}),  # the rank of the sum per expert: nothing truncated
    ("ties_svd", {"density": 0.5, "svd_rank": 32}),  # the full size of every update: nothing truncated
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method,kw", METHODS, ids=[m for m, _ in METHODS])
def test_every_method_merges_each_expert_as_peft_merges_a_module(built, kind, method, kw, tmp_path, record_parity):
    """Each expert's update is a low-rank matrix of its own: gomerge's merge equals PEFT's add_weighted_adapter on a
    model with one nn.Linear per expert (TIES and magnitude pruning elect and prune per expert). The output reloads
    in PEFT with the same target_parameters, and its logits equal the base model's with the merged updates added."""
    dirs = built(kind, "plain")
    weights = [1.0, 0.6]
    out = str(tmp_path / method)
    gomerge.add_weighted_adapter(dirs, weights, "m", combination_type=method, output_dir=out, **kw)
    ref = unrolled_merge(kind, dirs, weights, method, **kw)
    assert_updates(out, ref, kind)
    record_parity(f"moe {kind} {method}", max(rel(merged_deltas(kind, out)[k], ref[k]) for k in ref))
    merged = load_peft(kind, [out]).eval()
    np.testing.assert_allclose(logits(merged), reference_logits(kind, ref), rtol=1e-4, atol=1e-5)
