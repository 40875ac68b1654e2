"""KnOTS (`knots_ties`, `knots_dare_ties`, `knots_linear`) and the Core Space methods `core_dare_ties` and
`core_iso_c` against dense torch references written from their authors' code.

KnOTS: gstoica27/KnOTS `task_merger.py` (SVDMerger.apply_svd and merge) and `masking_ops.py` (topk_values_mask,
resolve_sign, ties_masking, tv_masking, masked_merge), restated below on one module at a time: the reference
flattens the whole model into one vector and prunes by one global top-K, gomerge prunes per module (as PEFT's and
mergekit's TIES do), and keeps exactly int(d K) values per task where the reference keeps one more (see
test_the_literal_top_k_keeps_one_more_value). Its `masked_merge` multiplies every task by `weights[0]`, so the
parity tests use equal weights; with unequal weights gomerge applies PEFT's TIES weighting (weights after pruning,
before the sign election), checked against `peft.utils.merge_utils` on the aligned representations
(test_factor_references_with_unequal_weights).

Core Space: apanariello4/core-space-merging `task_merger.py` (get_core_matrices, `merge_method="tv"` with
`isotropize=True`, isotropize_matrix). Its bases are restricted to their nonzero singular values, as in
test_span_methods.py.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from peft.utils.merge_utils import dare_ties, magnitude_prune, ties
from peft_cases import LLAMA_ALL, AdapterSpec, assert_reloads_as, delta, file_factors, make_adapter
from test_span_methods import (
    core_matrices,
    core_space,
    core_ties_reference,
    core_tsv_reference,
    max_rel,
    nonzero_svd,
    numerical_rank,
    per_task_factors,
)

import gomerge

RTOL = 1e-5


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Three Llama adapters of ranks 4, 8 and 6 (one with rsLoRA, one on q_proj / v_proj only)."""
    root = tmp_path_factory.mktemp("knots")
    specs = [
        AdapterSpec(dict(r=4, lora_alpha=8, target_modules=LLAMA_ALL), seed=41),
        AdapterSpec(dict(r=8, lora_alpha=16, target_modules=LLAMA_ALL, use_rslora=True), seed=42),
        AdapterSpec(dict(r=6, lora_alpha=6, target_modules=["q_proj", "v_proj"]), seed=43),
    ]
    return [make_adapter("llama", s, str(root / f"a{i}")) for i, s in enumerate(specs)]


# --- KnOTS's own functions (masking_ops.py), on the stacked per-task vectors of one module -----------------------


def topk_values_mask(m: torch.Tensor, k_frac: float, literal: bool = False) -> torch.Tensor:
    """KnOTS's topk_values_mask: per row, the entries at least the (d - int(d K))-th smallest magnitude, which keeps
    int(d K) + 1 of them (literal); gomerge keeps int(d K), PEFT's count (the top `density` fraction), so the
    parity reference keeps the int(d K) largest."""
    if k_frac >= 1:
        return torch.ones_like(m, dtype=torch.bool)
    d = m.shape[1]
    if literal:
        kth = m.abs().kthvalue(d - int(d * k_frac), dim=1, keepdim=True).values
        return m.abs() >= kth
    mask = torch.zeros_like(m, dtype=torch.bool)
    return mask.scatter_(1, m.abs().topk(int(d * k_frac), dim=1).indices, True)


def resolve_sign(t: torch.Tensor) -> torch.Tensor:
    """KnOTS's resolve_sign, mode sum_of_values, zeros resolved to the majority sign."""
    sign = torch.sign(t.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())
    return sign


def ties_masking(vectors: torch.Tensor, k_frac: float) -> torch.Tensor:
    prune = topk_values_mask(vectors, k_frac)
    pruned = vectors * prune
    sign = resolve_sign(pruned)
    return torch.where(sign.unsqueeze(0) > 0, pruned > 0, pruned < 0) & prune


def masked_merge(vectors: torch.Tensor, merge_func: str, weight: float) -> torch.Tensor:
    vectors = vectors * weight  # the reference multiplies every task by weights[0]
    if merge_func == "sum":
        return vectors.sum(0)
    counts = (vectors != 0).sum(0)
    return torch.where(counts > 0, vectors.sum(0) / counts.clamp(min=1), torch.zeros_like(vectors[0]))


def knots_align(tasks) -> tuple[torch.Tensor, torch.Tensor]:
    """SVDMerger.apply_svd on one module: the SVD of the unweighted updates s_t B_t A_t concatenated along the
    input, restricted to its nonzero singular values; the tasks' diag(S) V_t^T stacked (T x k x n)."""
    cat = torch.cat([b @ a * s for a, b, _, s in tasks], dim=1)
    u, s, vh = nonzero_svd(cat)
    n = tasks[0][0].shape[1]
    return u, torch.stack([torch.diag(s) @ vh[:, t * n : (t + 1) * n] for t in range(len(tasks))])


def knots_reference(tasks, method: str, density: float, weight: float) -> torch.Tensor:
    """SVDMerger.merge with merge_method ties (merging_type mean) or tv (merging_type sum), topK = density."""
    u, svs = knots_align(tasks)
    k, n = svs.shape[1:]
    flat = svs.reshape(len(tasks), -1).float()
    if method == "knots_ties":
        mask = ties_masking(flat, density)
        merged = masked_merge(flat * mask, "mean", weight)
    else:
        merged = masked_merge(flat * topk_values_mask(flat, density), "sum", weight)
    return u @ merged.double().reshape(k, n)


@pytest.mark.parametrize("method", ["knots_ties", "knots_linear"])
@pytest.mark.parametrize("density", [0.3, 1.0])
def test_knots_matches_the_authors_code(adapters, method, density, tmp_path, record_parity):
    w = 0.8
    out = tmp_path / method
    res = gomerge.add_weighted_adapter(adapters, [w] * 3, "m", method, density=density, output_dir=str(out))
    factors = file_factors(str(out))
    worst = 0.0
    for mod, tasks in per_task_factors(adapters, [w] * 3).items():
        want = knots_reference(tasks, method, density, w)
        a, b = factors[mod]
        assert res.module_ranks[mod] == a.shape[0] == numerical_rank(want), mod
        worst = max(worst, max_rel(delta(a, b), want.numpy()))
    record_parity(f"{method} density={density} vs KnOTS's code (per module)", worst)
    assert worst < RTOL, worst
    assert_reloads_as(str(out), {m: delta(a, b) for m, (a, b) in factors.items()})


def test_the_literal_top_k_keeps_one_more_value():
    """The one place where gomerge departs from KnOTS's code: its top-K keeps int(d K) + 1 values per task."""
    m = torch.randn(3, 1000, dtype=torch.float64)
    assert topk_values_mask(m, 0.3, literal=True).sum(1).tolist() == [301] * 3
    assert topk_values_mask(m, 0.3).sum(1).tolist() == [300] * 3


@pytest.mark.parametrize("method", ["knots_dare_ties", "core_dare_ties"])
def test_dare_variants_at_density_one_match_the_references(adapters, method, tmp_path, record_parity):
    """DARE at density 1 keeps every value (the references' dare_pruning_coeffs = 0): what is left is the sign
    election and the disjoint mean, deterministic."""
    w = 0.8
    out = tmp_path / method
    gomerge.add_weighted_adapter(adapters, [w] * 3, "m", method, density=1.0, seed=3, output_dir=str(out))
    factors = file_factors(str(out))
    worst = 0.0
    for mod, tasks in per_task_factors(adapters, [w] * 3).items():
        if method == "knots_dare_ties":
            want = knots_reference(tasks, "knots_ties", 1.0, w)
        else:
            u_b, vh_a = core_space(tasks)
            ms = [m.float() for m in core_matrices(tasks, u_b, vh_a, weighted=False)]
            merged = dare_ties(ms, torch.full((len(ms),), w), 1.0, "total").double()
            want = u_b @ merged @ vh_a
        a, b = factors[mod]
        worst = max(worst, max_rel(delta(a, b), want.numpy()))
    record_parity(f"{method} density=1 vs reference", worst)
    assert worst < RTOL, worst


@pytest.mark.parametrize("method", ["knots_dare_ties", "core_dare_ties"])
def test_dare_variants_masks(adapters, method, tmp_path):
    """With one adapter the sign election and the disjoint mean keep what DARE kept: the merged representation
    (KnOTS's diag(S) V^T, or the core matrix) is the task's, masked with about `density` of it kept and each kept
    value divided by density. The same seed gives the same bytes on 1 and 2 workers; another seed other masks."""
    density = 0.3
    outs = {}
    for key, seed, workers in (("a", 5, 1), ("b", 5, 2), ("c", 6, 2)):
        outs[key] = tmp_path / key
        gomerge.add_weighted_adapter(
            adapters[:1], [1.0], "m", method, density=density, seed=seed, workers=workers, output_dir=str(outs[key])
        )
    assert (outs["a"] / "adapter_model.safetensors").read_bytes() == (
        outs["b"] / "adapter_model.safetensors"
    ).read_bytes()
    assert (outs["a"] / "adapter_model.safetensors").read_bytes() != (
        outs["c"] / "adapter_model.safetensors"
    ).read_bytes()
    factors = file_factors(str(outs["a"]))
    kept = total = 0
    for mod, tasks in per_task_factors(adapters[:1], [1.0]).items():
        a, b = (torch.from_numpy(x).double() for x in factors[mod])
        if method == "knots_dare_ties":
            u, svs = knots_align(tasks)
            x, got = svs[0], u.T @ (b @ a)
        else:
            u_b, vh_a = core_space(tasks)
            (a0, b0, _, s0) = tasks[0]
            x, got = u_b.T @ (b0 @ a0 * s0) @ vh_a.T, u_b.T @ (b @ a) @ vh_a.T
        on = got.abs() > 1e-6 * x.abs().max()
        np.testing.assert_allclose(got[on].numpy(), (x[on] / density).numpy(), rtol=1e-4)
        kept, total = kept + int(on.sum()), total + on.numel()
    assert abs(kept / total - density) < 0.03, kept / total


def core_iso_c_reference(tasks, scaling: float) -> torch.Tensor:
    """core-space-merging with merge_method tv and isotropize: M = sum_t M_t of w_t s_t B_t A_t, the singular
    values of M replaced by their mean (over all of them, zeros included), U_B M_iso Vh_A. Restricted to M's
    nonzero directions: on its null space the reference's U V^T is any rotation (not defined)."""
    u_b, vh_a = core_space(tasks)
    m = sum(core_matrices(tasks, u_b, vh_a, weighted=True))
    mean = torch.linalg.svdvals(m).mean()
    u, s, vh = nonzero_svd(m)
    return scaling * mean * (u_b @ (u @ vh) @ vh_a)


@pytest.mark.parametrize("duplicate", [False, True])
def test_core_iso_c_matches_the_reference(adapters, duplicate, tmp_path, record_parity):
    """On generic adapters the summed core has full rank and core_iso_c is iso_c; with an adapter given twice (and
    cancelling itself) the sum is rank deficient and the mean counts its zeros: iso_c scaled by q / min(qB, qA)."""
    dirs = list(adapters)
    if duplicate:  # the first adapter again, cancelling itself: the summed core loses its rank
        shutil.copytree(adapters[0], tmp_path / "again")
        dirs.append(str(tmp_path / "again"))
    weights = [1.0, 0.7, 1.3, -1.0][: len(dirs)]
    out = tmp_path / "core_iso_c"
    res = gomerge.add_weighted_adapter(dirs, weights, "m", "core_iso_c", scaling=1.5, output_dir=str(out))
    factors = file_factors(str(out))
    iso = tmp_path / "iso_c"
    gomerge.add_weighted_adapter(dirs, weights, "m", "iso_c", scaling=1.5, output_dir=str(iso))
    iso_factors = file_factors(str(iso))
    worst = 0.0
    for mod, tasks in per_task_factors(dirs, weights).items():
        want = core_iso_c_reference(tasks, 1.5)
        a, b = factors[mod]
        assert res.module_ranks[mod] == a.shape[0] == numerical_rank(want), mod
        worst = max(worst, max_rel(delta(a, b), want.numpy()))
        same = max_rel(delta(a, b), delta(*iso_factors[mod])) < RTOL
        assert same != duplicate, mod
    record_parity(f"core_iso_c {'duplicate adapter' if duplicate else 'generic'} vs core-space-merging", worst)
    assert worst < RTOL, worst


def knots_weighted_reference(tasks, method: str, density: float) -> torch.Tensor:
    """KnOTS's alignment, then PEFT's ties / dare_ties / magnitude_prune of the aligned tasks with the weights w_t
    (gomerge's definition for unequal weights; make bench's M1 peer)."""
    u, svs = knots_align(tasks)
    wt = torch.tensor([w for _, _, w, _ in tasks], dtype=torch.float32)
    xs = list(svs.float())
    if method == "knots_ties":
        merged = ties(xs, wt, density, "total")
    elif method == "knots_dare_ties":
        merged = dare_ties(xs, wt, density, "total")
    else:
        merged = magnitude_prune(xs, wt, density)
    return u @ merged.double()


def core_dare_ties_reference(tasks, density: float) -> torch.Tensor:
    """PEFT's dare_ties on the core matrices M_t = U_B^T s_t B_t A_t Vh_A^T (torch's masks), back as U_B M Vh_A."""
    u_b, vh_a = core_space(tasks)
    ms = [m.float() for m in core_matrices(tasks, u_b, vh_a, weighted=False)]
    weights = torch.tensor([w for _, _, w, _ in tasks], dtype=torch.float32)
    return u_b @ dare_ties(ms, weights, density, "total").double() @ vh_a


# the references of the methods computed from the factors, by name: tasks (A_t, B_t, w_t, s_t) -> dense update
FACTOR_REFERENCES = {
    "knots_ties": lambda tasks, density: knots_weighted_reference(tasks, "knots_ties", density),
    "knots_dare_ties": lambda tasks, density: knots_weighted_reference(tasks, "knots_dare_ties", density),
    "knots_linear": lambda tasks, density: knots_weighted_reference(tasks, "knots_linear", density),
    "core_ties": lambda tasks, density: core_ties_reference(tasks, density),
    "core_dare_ties": core_dare_ties_reference,
    "core_tsv": lambda tasks: core_tsv_reference(tasks),
    "core_iso_c": lambda tasks: core_iso_c_reference(tasks, 1.0),
}


@pytest.mark.parametrize("method", ["knots_ties", "knots_linear", "core_ties", "core_tsv", "core_iso_c"])
def test_factor_references_with_unequal_weights(adapters, method, tmp_path, record_parity):
    """The references make bench's M1 times, on unequal weights: gomerge gives their numbers."""
    weights = [2.0, 1.0, 1.0]
    kw = {"density": 0.3} if method in ("knots_ties", "knots_linear", "core_ties") else {}
    out = tmp_path / method
    gomerge.add_weighted_adapter(adapters, weights, "m", method, output_dir=str(out), **kw)
    factors = file_factors(str(out))
    worst = 0.0
    for mod, tasks in per_task_factors(adapters, weights).items():
        worst = max(worst, max_rel(delta(*factors[mod]), FACTOR_REFERENCES[method](tasks, **kw).numpy()))
    record_parity(f"{method} weights 2, 1, 1 vs its M1 reference", worst)
    assert worst < RTOL, worst
