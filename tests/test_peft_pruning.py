"""TIES, DARE and magnitude pruning against PEFT.

- Family 1 (`ties`, `magnitude_prune`, on the factors): every module's A', B' and B'A' equal PEFT's (rtol 1e-5).
- Family 2 (`ties_svd`, `magnitude_prune_svd`, `dare_*_svd`): the matrix PEFT hands to `torch.linalg.svd` is
  captured, and both results are held to svd_checks.py's rules: each within its factor of the optimal rank-k error
  (1 for exact SVDs, 1.01 for gomerge's randomized one), and gomerge's B'A' within the perturbation bound of
  PEFT's that the spectral gap at k gives (Wedin's, or the randomized result's from its excess error).
- DARE: masks are random, so gomerge's masks (recovered from one-hot merges with the same seed) are fed to PEFT's
  own code through `torch.bernoulli`; PEFT then computes exactly what gomerge computed.
"""

from __future__ import annotations

import numpy as np
import pytest
from peft_cases import AdapterSpec, Case, build_case, delta, file_factors, peft_factors, peft_merge, rel_diff
from svd_checks import SVDCapture, gomerge_randomized
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


def check_family2(svd_inputs, ours, theirs, label, record, check_truncation):
    """Per module: svd_checks' rules on the matrix PEFT factored (gomerge's randomized SVD, on the wide modules,
    within 1% of the optimal error and the "excess" bound; its exact SVD, on the small ones, within Wedin's)."""
    assert svd_inputs, "PEFT merged no modules through an SVD"
    assert sorted(svd_inputs) == sorted(theirs) == sorted(ours), "gomerge and PEFT merged different modules"
    worst_ratio = 0.0
    for mod, d in sorted(svd_inputs.items()):
        k = theirs[mod][0].shape[0]
        t = check_truncation(
            d,
            k,
            delta(*ours[mod]),
            delta(*theirs[mod]),
            label=f"{label} {mod}",
            randomized=gomerge_randomized(d.shape, k),
        )
        worst_ratio = max(worst_ratio, t.ratio_ours)
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
def test_family2_reconstruction(case, combination_type, density, adapters, tmp_path, record_parity, check_truncation):
    dirs = adapters[case.name]
    with SVDCapture() as cap:
        model = peft_merge(case, dirs, combination_type, density=density)
    out = tmp_path / "merged"
    gomerge.add_weighted_adapter(dirs, case.weights, "m", combination_type, density=density, output_dir=out)
    label = f"{case.name}-{combination_type}-{density}"
    check_family2(
        cap.by_module(model), file_factors(str(out)), peft_factors(model), label, record_parity, check_truncation
    )
