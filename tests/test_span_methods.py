"""The span methods (`iso_c`, `tsv`) against dense torch references written from fusion-bench 0.2.33.

The references follow `fusion_bench/method/isotropic_merging/iso_utils.py` (`iso_c`) and
`fusion_bench/method/task_singular_vector/utils/TSVM_utils.py` (`compute_and_sum_svd_mem_reduction`), read from
the wheel (`pip download --no-deps fusion-bench==0.2.33`); fusion-bench itself is not installed (its dependencies
would move the pinned torch / transformers / peft). As the spec says for adapters, they are restricted to the
nonzero singular values (numpy.linalg.matrix_rank's tolerance): fusion-bench's literal reading averages the
min(m, n) singular values, zeros included, and rebuilds the update over the whole thin basis, which for a low-rank
sum is a full-rank update in null-space directions no adapter has (test_the_literal_reading_is_full_rank).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from peft.utils.merge_utils import ties
from peft_cases import (
    LLAMA_ALL,
    AdapterSpec,
    assert_reloads_as,
    config_scaling,
    delta,
    file_factors,
    make_adapter,
)

import gomerge
from gomerge import recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL = 1e-5


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Three Llama adapters of ranks 4, 8 and 6 (one with rsLoRA, one on q_proj / v_proj only)."""
    root = tmp_path_factory.mktemp("span-mixed")
    specs = [
        AdapterSpec(dict(r=4, lora_alpha=8, target_modules=LLAMA_ALL), seed=11),
        AdapterSpec(dict(r=8, lora_alpha=16, target_modules=LLAMA_ALL, use_rslora=True), seed=12),
        AdapterSpec(dict(r=6, lora_alpha=6, target_modules=["q_proj", "v_proj"]), seed=13),
    ]
    return [make_adapter("llama", s, str(root / f"a{i}")) for i, s in enumerate(specs)]


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    """Four adapters of ranks 12, 16, 20 and 2: on k_proj / v_proj (32 x 64) the sum of ranks (50) is above
    min(m, n) = 32, and TSV-M's share min(m, n) / T = 8 is below the ranks."""
    root = tmp_path_factory.mktemp("span-large")
    specs = [
        AdapterSpec(dict(r=12, lora_alpha=12, target_modules=LLAMA_ALL), seed=21),
        AdapterSpec(dict(r=16, lora_alpha=8, target_modules=LLAMA_ALL), seed=22),
        AdapterSpec(dict(r=20, lora_alpha=40, target_modules=["k_proj", "v_proj", "down_proj"]), seed=23),
        AdapterSpec(dict(r=2, lora_alpha=4, target_modules=["v_proj", "o_proj"]), seed=24),
    ]
    return [make_adapter("llama", s, str(root / f"a{i}")) for i, s in enumerate(specs)]


def per_task(dirs: list[str], weights: list[float]) -> dict[str, list[torch.Tensor]]:
    """Per module, the weighted dense updates w_t s_t B_t A_t (float64) of the adapters that have it."""
    out: dict[str, list[torch.Tensor]] = {}
    for d, w in zip(dirs, weights):
        s = config_scaling(d)
        for mod, (a, b) in file_factors(d).items():  # delta: Conv2d factors flattened
            out.setdefault(mod, []).append(torch.from_numpy(delta(a, b)) * (w * s))
    return out


def nonzero_svd(x: torch.Tensor):
    """torch's thin SVD restricted to the singular values above numpy.linalg.matrix_rank's tolerance."""
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    q = int((s > s[0] * max(x.shape) * torch.finfo(torch.float64).eps).sum()) if s[0] > 0 else 0
    return u[:, :q], s[:q], vh[:q]


def iso_c_reference(tvs: list[torch.Tensor], scaling: float = 1.0, k: int | None = None) -> torch.Tensor:
    """fusion-bench's iso_c (sum, SVD, S -> mean(S)) in the span: the mean of the nonzero singular values; with k,
    the top k of the sum's directions."""
    u, s, vh = nonzero_svd(sum(tvs))
    k = len(s) if k is None else min(k, len(s))
    return u[:, :k] @ torch.diag(torch.full((k,), float(s.mean()), dtype=s.dtype)) @ vh[:k] * scaling


def tsv_reference(tvs: list[torch.Tensor], scaling: float = 1.0) -> torch.Tensor:
    """fusion-bench's compute_and_sum_svd_mem_reduction: each task's top int(min(m, n) / T) triplets, stacked,
    U and V orthogonalised by u_u @ vh_u, multi_dot(U_perp, diag(S), V_perp); on adapters a task keeps at most
    its nonzero triplets."""
    per = int(min(tvs[0].shape) * (1 / len(tvs)))
    us, ss, vhs = [], [], []
    for tv in tvs:
        u, s, vh = nonzero_svd(tv)
        us.append(u[:, :per])
        ss.append(s[:per])
        vhs.append(vh[:per])
    sum_u, sum_s, sum_vh = torch.cat(us, 1), torch.cat(ss), torch.cat(vhs, 0)
    u_u, _, vh_u = torch.linalg.svd(sum_u, full_matrices=False)
    u_vh, _, vh_vh = torch.linalg.svd(sum_vh, full_matrices=False)
    return torch.linalg.multi_dot((u_u, vh_u, torch.diag(sum_s), u_vh, vh_vh)) * scaling


def iso_cts_reference(tvs: list[torch.Tensor], scaling: float = 1.0, common_fraction: float = 0.8) -> torch.Tensor:
    """fusion-bench's iso_cts with q, the rank of the sum, in place of min(shape_): the common space's size made
    so that the task-specific space divides by T (Python's round), the tasks' directions from their updates with
    the common space projected out (at most their nonzero ones, against the task update's own tolerance), the
    stacked U and V orthogonalised, and every direction at the mean kept singular value."""
    u, s, vh = nonzero_svd(sum(tvs))
    q, t = s.numel(), len(tvs)
    common = int(q * common_fraction)
    common = max(0, q - round((q - common) / t) * t)
    per = int((q - common) / t)
    cu, cs, cv = u[:, :common], s[:common], vh[:common]
    us, ss, vhs = [cu], [cs], [cv]
    for w in tvs:
        w_ts = w - cu @ cu.T @ w
        u_ts, s_ts, v_ts = torch.linalg.svd(w_ts, full_matrices=False)
        tol = torch.linalg.svdvals(w)[0] * max(w.shape) * torch.finfo(torch.float64).eps
        k = int((s_ts[:per] > tol).sum())
        us.append(u_ts[:, :k])
        ss.append(s_ts[:k])
        vhs.append(v_ts[:k])
    cu, cs, cv = torch.cat(us, 1), torch.cat(ss), torch.cat(vhs, 0)
    u_u, _, v_u = torch.linalg.svd(cu, full_matrices=False)
    u_v, _, v_v = torch.linalg.svd(cv, full_matrices=False)
    cs = torch.ones_like(cs) * cs.mean()
    return torch.linalg.multi_dot((u_u @ v_u, torch.diag(cs), u_v @ v_v)) * scaling


REFERENCES = {"iso_c": iso_c_reference, "tsv": tsv_reference, "iso_cts": iso_cts_reference}


def numerical_rank(x: torch.Tensor) -> int:
    return nonzero_svd(x)[1].numel()


def max_rel(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-30))


@pytest.mark.parametrize("method", ["iso_c", "tsv", "iso_cts"])
@pytest.mark.parametrize("case", ["mixed", "large"])
@pytest.mark.parametrize("scaling", [None, 0.6])
def test_span_methods_match_their_dense_references(method, case, scaling, request, tmp_path, record_parity):
    dirs = request.getfixturevalue(case)
    weights = [1.0, 0.7, 1.3, 0.9][: len(dirs)]
    out = tmp_path / method
    res = gomerge.add_weighted_adapter(dirs, weights, "m", method, output_dir=str(out), scaling=scaling)
    tasks = per_task(dirs, weights)
    factors = file_factors(str(out))
    assert set(factors) == set(tasks) and res.modules == len(tasks)
    worst = 0.0
    for mod, tvs in tasks.items():
        want = REFERENCES[method](tvs, 1.0 if scaling is None else scaling)
        a, b = factors[mod]
        assert res.module_ranks[mod] == a.shape[0] == numerical_rank(want), mod
        assert res.module_errors[mod] == 0.0
        worst = max(worst, max_rel(delta(a, b), want.numpy()))
    record_parity(f"{method} {case} scaling={scaling} vs dense torch reference", worst)
    assert worst < RTOL, worst
    assert res.rank == max(res.module_ranks.values())
    cfg = json.load(open(out / "adapter_config.json"))
    assert cfg["r"] == res.rank
    assert f"- scaling: {1.0 if scaling is None else scaling:g}" in (out / "README.md").read_text()


def test_peft_reloads_a_span_merge(mixed, tmp_path):
    weights = [1.0, 0.5, 2.0]
    for method in ("iso_c", "tsv", "iso_cts"):
        out = tmp_path / method
        gomerge.add_weighted_adapter(mixed, weights, "m", method, output_dir=str(out))
        want = {m: REFERENCES[method](tvs).numpy() for m, tvs in per_task(mixed, weights).items()}
        assert_reloads_as(str(out), want)


def test_iso_c_rank_rules(mixed, tmp_path):
    weights = [1.0, 1.0, 1.0]
    tasks = per_task(mixed, weights)
    res = gomerge.add_weighted_adapter(mixed, weights, "m", "iso_c", output_dir=str(tmp_path / "k"), svd_rank=5)
    factors = file_factors(str(tmp_path / "k"))
    for mod, tvs in tasks.items():
        q = numerical_rank(sum(tvs))
        a, b = factors[mod]
        assert a.shape[0] == 5 and res.module_ranks[mod] == 5
        assert max_rel(delta(a, b), iso_c_reference(tvs, k=5).numpy()) < RTOL
        assert res.module_errors[mod] == pytest.approx(np.sqrt((q - 5) / q), rel=1e-9)
    res = gomerge.add_weighted_adapter(
        mixed, weights, "m", "iso_c", output_dir=str(tmp_path / "e"), svd_rank="energy:0.5", max_rank=6
    )
    for mod, tvs in tasks.items():
        q = numerical_rank(sum(tvs))  # an isotropic spectrum: half the energy is half the directions
        assert res.module_ranks[mod] == min(int(np.ceil(0.5 * q - 1e-9)), 6), mod
    res = gomerge.add_weighted_adapter(mixed, weights, "m", "tsv", output_dir=str(tmp_path / "c"), max_rank=7)
    assert set(res.module_ranks.values()) == {7}


def test_the_literal_reading_is_full_rank(mixed):
    """fusion-bench's iso_c read literally on adapters: S.mean() over min(m, n) values, zeros included, and
    U diag(mean) V over the whole thin basis: a full-rank update, not the span's."""
    tvs = per_task(mixed, [1.0, 1.0, 1.0])["model.layers.0.self_attn.q_proj"]
    u, s, vh = torch.linalg.svd(sum(tvs), full_matrices=False)
    literal = u @ torch.diag(torch.ones_like(s) * s.mean()) @ vh
    assert numerical_rank(literal) == min(literal.shape) > numerical_rank(sum(tvs)) == 18


def test_scaling_is_validated_and_refused_by_other_methods(mixed, tmp_path):
    with pytest.raises(ValueError, match='scaling: combination_type "svd" does not take scaling'):
        gomerge.add_weighted_adapter(mixed, [1, 1, 1], "m", "svd", output_dir=str(tmp_path / "o"), scaling=2.0)
    with pytest.raises(TypeError, match="scaling"):
        gomerge.add_weighted_adapter(mixed, [1, 1, 1], "m", "iso_c", output_dir=str(tmp_path / "o"), scaling="2")
    with pytest.raises(ValueError, match='lambda: combination_type "iso_c" does not take lambda'):
        gomerge.add_weighted_adapter(mixed, [1, 1, 1], "m", "iso_c", output_dir=str(tmp_path / "o"), lambda_=2.0)
    assert not (tmp_path / "o").exists()


def test_scaling_on_the_command_line_and_in_recipes(mixed, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"))
    cli = subprocess.run(
        [sys.executable, "-m", "gomerge", "merge", *mixed, "--method", "tsv", "--scaling", "0.5", "--json"]
        + ["-o", str(tmp_path / "cli")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert cli.returncode == 0, cli.stderr
    path = tmp_path / "r.yaml"
    path.write_text(
        "".join(f"  - source: {d}\n" for d in mixed).join(["adapters:\n", "method: tsv\nscaling: 0.5\n"])
        + f"output_dir: {tmp_path / 'recipe'}\n"
    )
    assert recipe.load_recipe(str(path)).options["scaling"] == 0.5
    rec = subprocess.run(
        [sys.executable, "-m", "gomerge", "merge", "--recipe", str(path), "--json"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert rec.returncode == 0, rec.stderr
    api = gomerge.add_weighted_adapter(mixed, [1, 1, 1], "m", "tsv", output_dir=str(tmp_path / "api"), scaling=0.5)
    a, b, c = (file_factors(str(tmp_path / d)) for d in ("cli", "recipe", "api"))
    for mod in c:
        np.testing.assert_array_equal(a[mod][0], c[mod][0])
        np.testing.assert_array_equal(b[mod][1], c[mod][1])
    assert json.loads(cli.stdout)["module_ranks"] == api.module_ranks


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_iso_cts_common_fraction(mixed, tmp_path, fraction, record_parity):
    weights = [1.0, 0.8, 1.2]
    out = tmp_path / "o"
    res = gomerge.add_weighted_adapter(mixed, weights, "m", "iso_cts", output_dir=str(out), common_fraction=fraction)
    factors = file_factors(str(out))
    worst = 0.0
    for mod, tvs in per_task(mixed, weights).items():
        want = iso_cts_reference(tvs, common_fraction=fraction)
        a, b = factors[mod]
        assert res.module_ranks[mod] == a.shape[0] == numerical_rank(want), mod
        worst = max(worst, max_rel(delta(a, b), want.numpy()))
    record_parity(f"iso_cts common_fraction={fraction} vs dense torch reference", worst)
    assert worst < RTOL, worst
    assert f"- common_fraction: {fraction:g}" in (out / "README.md").read_text()
    with pytest.raises(ValueError, match="common_fraction: the share of the common subspace must be in"):
        gomerge.add_weighted_adapter(mixed, weights, "m", "iso_cts", output_dir=str(tmp_path / "x"), common_fraction=2)
    with pytest.raises(ValueError, match='common_fraction: combination_type "iso_c" does not take common_fraction'):
        gomerge.add_weighted_adapter(mixed, weights, "m", "iso_c", output_dir=str(tmp_path / "x"), common_fraction=0.5)
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"))
    cli = subprocess.run(
        [sys.executable, "-m", "gomerge", "merge", *mixed, "--weights", "1", "0.8", "1.2", "--method", "iso_cts"]
        + ["--common-fraction", str(fraction), "-q", "-o", str(tmp_path / "cli")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert cli.returncode == 0, cli.stderr
    theirs = file_factors(str(tmp_path / "cli"))
    for mod, (a, b) in factors.items():
        np.testing.assert_array_equal(theirs[mod][0], a)
        np.testing.assert_array_equal(theirs[mod][1], b)


def per_task_factors(dirs: list[str], weights: list[float]) -> dict[str, list[tuple]]:
    """Per module, (A_t, B_t, w_t, s_t) of the adapters that have it (float64 factors)."""
    out: dict[str, list[tuple]] = {}
    for d, w in zip(dirs, weights):
        for mod, (a, b) in file_factors(d).items():
            out.setdefault(mod, []).append((torch.from_numpy(a), torch.from_numpy(b), w, config_scaling(d)))
    return out


def core_space(tasks):
    """apanariello4/core-space-merging's get_core_matrices: U_B_ref from the SVD of the stacked B's, Vh_A_ref from
    the stacked A's (restricted to their nonzero singular values)."""
    u_b = nonzero_svd(torch.cat([b for _, b, _, _ in tasks], 1))[0]
    vh_a = nonzero_svd(torch.cat([a for a, _, _, _ in tasks], 0))[2]
    return u_b, vh_a


def core_matrices(tasks, u_b: torch.Tensor, vh_a: torch.Tensor, weighted: bool) -> list[torch.Tensor]:
    """get_core_matrices's M_t = R_B diag(S_B) Vh_B U_A diag(S_A) Q_A, from each task's own SVDs of B_t and A_t
    (R_B = U_B_ref^T U_B, Q_A = Vh_A Vh_A_ref^T): U_B^T c_t B_t A_t Vh_A^T without forming B_t A_t; c_t = w_t s_t
    when weighted, else s_t."""
    out = []
    for a, b, w, s in tasks:
        u_a, s_a, v_a = torch.linalg.svd(a, full_matrices=False)
        u_bt, s_bt, v_bt = torch.linalg.svd(b, full_matrices=False)
        m = torch.diag(s_bt) @ (v_bt @ u_a) @ torch.diag(s_a)
        out.append((u_b.T @ u_bt) @ m @ (v_a @ vh_a.T) * (w * s if weighted else s))
    return out


def core_ties_reference(tasks, density: float, majority_sign_method: str = "total") -> torch.Tensor:
    """PEFT's ties (peft.utils.merge_utils.ties, as ties_svd uses it: weights w_t, tensors s_t B_t A_t) on the
    core matrices M_t = U_B^T s_t B_t A_t Vh_A^T (float32, as gomerge combines them), back as U_B M Vh_A."""
    u_b, vh_a = core_space(tasks)
    ms = [m.float() for m in core_matrices(tasks, u_b, vh_a, weighted=False)]
    weights = torch.tensor([w for _, _, w, _ in tasks], dtype=torch.float32)
    merged = ties(ms, weights, density, majority_sign_method).double()
    return u_b @ merged @ vh_a


def core_tsv_reference(tasks) -> torch.Tensor:
    """core-space-merging's get_tsv_delta_w on the core matrices of w_t s_t B_t A_t: each task keeps
    int(min(qB, qA) / T) triplets (at most its nonzero ones)."""
    u_b, vh_a = core_space(tasks)
    return u_b @ tsv_reference(core_matrices(tasks, u_b, vh_a, weighted=True)) @ vh_a


@pytest.mark.parametrize("case", ["mixed", "large"])
@pytest.mark.parametrize("method", ["core_ties", "core_tsv"])
def test_core_space_methods_match_their_dense_references(case, method, request, tmp_path, record_parity):
    dirs = request.getfixturevalue(case)
    weights = [1.0, 0.7, 1.3, 0.9][: len(dirs)]
    out = tmp_path / method
    kw = {"density": 0.4} if method == "core_ties" else {}
    res = gomerge.add_weighted_adapter(dirs, weights, "m", method, output_dir=str(out), **kw)
    factors = file_factors(str(out))
    worst = 0.0
    for mod, tasks in per_task_factors(dirs, weights).items():
        want = core_ties_reference(tasks, 0.4) if method == "core_ties" else core_tsv_reference(tasks)
        a, b = factors[mod]
        assert res.module_ranks[mod] == a.shape[0] == numerical_rank(want), mod
        worst = max(worst, max_rel(delta(a, b), want.numpy()))
    record_parity(f"{method} {case} vs dense torch reference", worst)
    assert worst < RTOL, worst
    if method == "core_ties":
        assert_reloads_as(str(out), {m: delta(a, b) for m, (a, b) in factors.items()})
        with pytest.raises(ValueError, match="density"):
            gomerge.add_weighted_adapter(dirs, weights, "m", method, output_dir=str(tmp_path / "x"))


def test_span_methods_on_conv2d_modules(tmp_path):
    """Conv2d adapters (A: r x in x kh x kw, B: out x r x 1 x 1): the updates are merged flattened and written back
    in PEFT's shapes; PEFT reloads them."""
    dirs = [
        make_adapter("conv", AdapterSpec(dict(r=r, lora_alpha=2 * r, target_modules=["conv1", "conv2"]), seed=s), p)
        for r, s, p in ((2, 31, str(tmp_path / "c0")), (3, 32, str(tmp_path / "c1")))
    ]
    for method in ("iso_c", "tsv", "iso_cts", "core_tsv"):
        out = tmp_path / method
        gomerge.add_weighted_adapter(dirs, [1.0, 0.5], "m", method, output_dir=str(out))
        tasks = per_task(dirs, [1.0, 0.5])
        want = {mod: (REFERENCES[method](tvs) if method in REFERENCES else None) for mod, tvs in tasks.items()}
        factors = file_factors(str(out))
        for mod, (a, b) in factors.items():
            if want[mod] is not None:
                assert max_rel(delta(a, b), want[mod].numpy()) < RTOL, (method, mod)
        updates = {m: delta(a, b).reshape(b.shape[0], *a.shape[1:]) for m, (a, b) in factors.items()}
        assert_reloads_as(str(out), updates, kind="conv")
