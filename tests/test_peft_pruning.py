"""TIES, DARE and magnitude pruning against PEFT.

- Family 1 (`ties`, `magnitude_prune`, on the factors): every module's A', B' and B'A' equal PEFT's (rtol 1e-5).
- Family 2 (`ties_svd`, `magnitude_prune_svd`, `dare_*_svd`): the matrix PEFT hands to `torch.linalg.svd` is
  captured; gomerge's B'A' must reconstruct it within 1% of the optimal rank-k error (a full SVD here), and where
  the spectrum has a clear gap at k (s_k > 1.5 s_k+1), B'A' must match PEFT's to 1% of its largest entry.
- DARE: masks are random, so gomerge's masks (recovered from one-hot merges with the same seed) are fed to PEFT's
  own code through `torch.bernoulli`; PEFT then computes exactly what gomerge computed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft.tuners.lora import LoraLayer
from peft_cases import AdapterSpec, Case, build_case, delta, file_factors, peft_factors, peft_merge, rel_diff
from test_peft_parity import CASES

import gomerge

F32_CASES = [c for c in CASES if c.rtol == 1e-5 and len(c.adapters) > 1 and "linear" in c.types]
# Modules of 384 x 640: gomerge's randomized SVD (the test models' smaller modules get an exact SVD).
WIDE = Case(
    "wide-randomized-svd",
    "wide",
    [
        AdapterSpec(dict(r=8, lora_alpha=16, target_modules=["up", "down"]), 31),
        AdapterSpec(dict(r=8, lora_alpha=8, target_modules=["up", "down"]), 32),
        AdapterSpec(dict(r=8, lora_alpha=16, target_modules=["up", "down"]), 33),
    ],
    [2.0, 1.0, 1.0],
)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {c.name: build_case(c, str(root)) for c in F32_CASES + [WIDE]}


def _family1_params():
    for c in F32_CASES:
        for density in (0.2, 0.5, 1.0):
            yield pytest.param(c, "ties", density, "total", id=f"{c.name}-ties-{density}-total")
            yield pytest.param(c, "magnitude_prune", density, "total", id=f"{c.name}-magnitude_prune-{density}")
        yield pytest.param(c, "ties", 0.3, "frequency", id=f"{c.name}-ties-0.3-frequency")


@pytest.mark.parametrize("case,combination_type,density,method", list(_family1_params()))
def test_family1_parity(case, combination_type, density, method, adapters, tmp_path, record_parity):
    dirs = adapters[case.name]
    model = peft_merge(case, dirs, combination_type, density=density, majority_sign_method=method)
    out = tmp_path / "merged"
    res = gomerge.add_weighted_adapter(
        dirs, case.weights, "m", combination_type, density=density, majority_sign_method=method, output_dir=out
    )
    assert res.seed is None
    theirs, ours = peft_factors(model), file_factors(str(out))
    assert sorted(theirs) == sorted(ours)
    worst = 0.0
    for mod, (a, b) in theirs.items():
        oa, ob = ours[mod]
        np.testing.assert_allclose(oa, a, rtol=1e-5, atol=1e-5 * np.abs(a).max(), err_msg=f"{mod} lora_A")
        np.testing.assert_allclose(ob, b, rtol=1e-5, atol=1e-5 * np.abs(b).max(), err_msg=f"{mod} lora_B")
        worst = max(worst, rel_diff(delta(oa, ob), delta(a, b)))
    record_parity(f"{case.name}-{combination_type}-{density}-{method}", worst)


class SVDCapture:
    """Wraps torch.linalg.svd to record the matrices PEFT factorises, in module order."""

    def __init__(self, monkeypatch):
        self.inputs: list[np.ndarray] = []
        original = torch.linalg.svd

        def svd(a, *args, **kwargs):
            self.inputs.append(a.detach().double().numpy().copy())
            return original(a, *args, **kwargs)

        monkeypatch.setattr(torch.linalg, "svd", svd)


def merged_module_order(model) -> list[str]:
    return [
        n.removeprefix("base_model.model.")
        for n, m in model.named_modules()
        if isinstance(m, LoraLayer) and ("merged" in m.lora_A or "merged" in m.lora_embedding_A)
    ]


def check_reconstruction(d_list, order, ours, theirs, k, label, record):
    """gomerge's B'A' reconstructs each captured D within 1% of the optimal rank-k error."""
    # one captured SVD per merged module: an empty or short capture would make the zip below check nothing
    assert order, "PEFT merged no modules"
    assert len(d_list) == len(order), f"captured {len(d_list)} SVD inputs for {len(order)} merged modules"
    assert sorted(order) == sorted(ours), "gomerge and PEFT merged different modules"
    worst_ratio, gap_diff = 0.0, 0.0
    for d, mod in zip(d_list, order):
        s = np.linalg.svd(d, compute_uv=False)
        optimal = float(np.sqrt(np.sum(s[k:] ** 2)))
        err = float(np.linalg.norm(d - delta(*ours[mod])))
        floor = 1e-5 * float(np.linalg.norm(d))
        assert err <= 1.01 * optimal + floor, f"{mod}: error {err:.4g} vs optimal {optimal:.4g}"
        if optimal > floor:
            worst_ratio = max(worst_ratio, err / optimal)
        if len(s) > k and s[k - 1] > 1.5 * s[k]:  # a clear gap: the rank-k approximation is well defined
            diff = rel_diff(delta(*ours[mod]), delta(*theirs[mod]))
            # the randomized SVD's subspace converges like (s_k+1 / s_k)^(2q+1); 1% of the largest entry at 1.5
            assert diff < 1e-2, f"{mod}: B'A' differs from PEFT's by {diff:.3g} despite a spectral gap"
            gap_diff = max(gap_diff, diff)
    record(label, worst_ratio - 1.0, "family 2: reconstruction error / optimal rank-k error - 1")


def _family2_params():
    for c in F32_CASES:
        for t in ("ties_svd", "magnitude_prune_svd"):
            for density in (0.2, 0.7):
                yield pytest.param(c, t, density, id=f"{c.name}-{t}-{density}")
    c = F32_CASES[0]
    yield pytest.param(c, "ties_svd", 1.0, id=f"{c.name}-ties_svd-1.0")
    for t in ("ties_svd", "magnitude_prune_svd"):
        for density in (0.1, 0.2, 0.5, 0.9):
            yield pytest.param(WIDE, t, density, id=f"{WIDE.name}-{t}-{density}")


@pytest.mark.parametrize("case,combination_type,density", list(_family2_params()))
def test_family2_reconstruction(case, combination_type, density, adapters, tmp_path, monkeypatch, record_parity):
    dirs = adapters[case.name]
    cap = SVDCapture(monkeypatch)
    model = peft_merge(case, dirs, combination_type, density=density)
    monkeypatch.undo()
    out = tmp_path / "merged"
    res = gomerge.add_weighted_adapter(dirs, case.weights, "m", combination_type, density=density, output_dir=out)
    check_reconstruction(
        cap.inputs,
        merged_module_order(model),
        file_factors(str(out)),
        peft_factors(model),
        res.rank,
        f"{case.name}-{combination_type}-{density}",
        record_parity,
    )
