"""mergekit's breadcrumbs, breadcrumbs_ties, della and della_linear on adapters, against mergekit 0.1.5 itself.

Each adapter's task vector for a module is its dense update dW_t = s_t B_t A_t, with the user weight w_t as
mergekit's weight; gomerge factorises the merged dense update to svd_rank, exactly when svd_rank >= min(out, in).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import mergekit.sparsify as mks  # a test dependency (tests/requirements.txt): missing is a failure, not a skip
import numpy as np
import pytest
import torch
from mergekit.merge_methods.api import merge_tensors
from mergekit.merge_methods.generalized_task_arithmetic import get_mask
from peft_cases import LLAMA_ALL, AdapterSpec, config_scaling, delta, file_factors, make_adapter

import gomerge
from gomerge import recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VS_MERGEKIT = "largest relative difference of B'A' from mergekit 0.1.5 (max |ours - mergekit| / max |mergekit|)"
FULL = 64  # >= min(out, in) of every module of the small Llama: the factorisation is exact
# mergekit's registry (merge_methods/registry.py): sparsification, consensus, normalize, rescale
REGISTRY = {
    "breadcrumbs": ("magnitude_outliers", None, False, False),
    "breadcrumbs_ties": ("magnitude_outliers", "sum", False, False),
    "della": ("della_magprune", "sum", True, True),
    "della_linear": ("della_magprune", None, False, True),
}


def _adapters(root, kind: str, specs: list[AdapterSpec]) -> list[str]:
    return [make_adapter(kind, s, str(root / f"a{i}")) for i, s in enumerate(specs)]


@pytest.fixture(scope="module")
def rank1(tmp_path_factory):
    """Three rank-1 Llama adapters on every linear module: dW = s b a^T is one float32 product per element in torch
    and in gomerge alike, so both sort the same magnitudes (breadcrumbs' cut-offs are exact)."""
    root = tmp_path_factory.mktemp("rank1")
    return _adapters(
        root,
        "llama",
        [
            AdapterSpec(dict(r=1, lora_alpha=2, target_modules=LLAMA_ALL), seed=11),
            AdapterSpec(dict(r=1, lora_alpha=4, target_modules=LLAMA_ALL, use_rslora=True), seed=12),
            AdapterSpec(dict(r=1, lora_alpha=1, target_modules=LLAMA_ALL), seed=13),
        ],
    )


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Three Llama adapters of ranks 4, 8 and 6 (one with rsLoRA) on every linear module."""
    root = tmp_path_factory.mktemp("mk-mixed")
    return _adapters(
        root,
        "llama",
        [
            AdapterSpec(dict(r=4, lora_alpha=8, target_modules=LLAMA_ALL), seed=1),
            AdapterSpec(dict(r=8, lora_alpha=16, target_modules=LLAMA_ALL, use_rslora=True), seed=2),
            AdapterSpec(dict(r=6, lora_alpha=6, target_modules=LLAMA_ALL), seed=3),
        ],
    )


def task_vectors(dirs: list[str]) -> dict[str, list[torch.Tensor]]:
    """Per module, each adapter's dense update s_t B_t A_t in float32 torch."""
    out: dict[str, list[torch.Tensor]] = {}
    for d in dirs:
        s = config_scaling(d)
        for mod, (a, b) in file_factors(d).items():
            dw = torch.from_numpy(b.astype(np.float32)) @ torch.from_numpy(a.astype(np.float32)) * s
            out.setdefault(mod, []).append(dw)
    return out


def mergekit_group(
    method: str, dws: list[torch.Tensor], weights: list[float], lam: float = 1.0, **params
) -> torch.Tensor:
    """mergekit's GeneralizedTaskArithmeticMerge.merge_group with a zero base, composed from mergekit's own
    sparsify and get_mask exactly as merge_group composes them."""
    sparsification, consensus, normalize, rescale = REGISTRY[method]
    deltas = torch.stack(
        [
            mks.sparsify(
                dw,
                density=params["density"],
                method=mks.SparsificationMethod(sparsification),
                rescale_norm=mks.RescaleNorm.l1 if rescale else None,
                **{k: params[k] for k in ("gamma", "epsilon") if k in params},
            )
            for dw in dws
        ]
    )
    w = torch.tensor(weights, dtype=deltas.dtype)
    while deltas.dim() > w.dim():
        w.unsqueeze_(-1)
    deltas.mul_(w)
    if consensus:
        mask = get_mask(deltas, method=consensus, mask_dtype=deltas.dtype)
        mixed = (deltas * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return mixed


def merged_updates(out: str) -> dict[str, np.ndarray]:
    return {k: delta(a, b) for k, (a, b) in file_factors(out).items()}


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize(("density", "gamma", "lam"), [(0.3, 0.05, 1.0), (0.6, None, 0.7), (0.9, 0.2, 1.0)])
def test_breadcrumbs_is_mergekits(rank1, tmp_path, method, density, gamma, lam, record_parity):
    weights = [1.0, 0.6, -0.8]
    out = str(tmp_path / "out")
    kw = {k: v for k, v in (("gamma", gamma), ("lambda_", None if lam == 1 else lam)) if v is not None}
    res = gomerge.add_weighted_adapter(
        rank1, weights, "m", method, density=density, svd_rank=FULL, output_dir=out, **kw
    )
    assert res.seed is None and res.rank == FULL
    got = merged_updates(out)
    params = {"density": density, "gamma": 0.01 if gamma is None else gamma}  # mergekit's default gamma
    worst = 0.0
    for mod, dws in task_vectors(rank1).items():
        want = mergekit_group(method, dws, weights, lam, **params)
        # our composition is mergekit's merge_group itself (a zero base: the deltas are the task vectors)
        ref = merge_tensors(
            [torch.zeros_like(dws[0]), *dws],
            method,
            parameters={"weight": weights, "lambda": lam, **params},
            base_index=0,
        )
        torch.testing.assert_close(want, ref, rtol=0, atol=0)
        want = want.double().numpy()
        np.testing.assert_allclose(got[mod], want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=mod)
        worst = max(worst, float(np.abs(got[mod] - want).max() / np.abs(want).max()))
    record_parity(f"{method} density={density} gamma={gamma} lambda={lam}", worst, VS_MERGEKIT)


def _kept(pruned: np.ndarray, dw: np.ndarray) -> np.ndarray:
    """The mask behind a pruned, l1-rescaled update: kept entries are dw times a factor >= 1, dropped ones 0."""
    return np.abs(pruned) > 0.5 * np.abs(dw)


@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize(("density", "epsilon", "lam"), [(0.4, None, 1.0), (0.3, 0.25, 0.8)])
def test_della_is_mergekits_with_gomerges_masks(mixed, tmp_path, method, density, epsilon, lam, record_parity):
    """gomerge's masks are read back from merges with one non-zero weight (the masks depend only on the seed, the
    module and the adapter's position, and the other tasks then contribute nothing), handed to mergekit's
    della_magprune in place of torch.bernoulli, and mergekit's result compared with gomerge's merge."""
    weights, seed = [1.0, 0.5, -0.7], 1234
    kw = {k: v for k, v in (("epsilon", epsilon), ("lambda_", None if lam == 1 else lam)) if v is not None}
    common = dict(density=density, svd_rank=FULL, seed=seed)
    out = str(tmp_path / "all")
    gomerge.add_weighted_adapter(mixed, weights, "m", method, output_dir=out, **common, **kw)
    got = merged_updates(out)
    tvs = task_vectors(mixed)
    masks: dict[str, list[np.ndarray]] = {mod: [] for mod in tvs}
    for t in range(len(mixed)):
        one = [1.0 if i == t else 0.0 for i in range(len(mixed))]
        o = str(tmp_path / f"only{t}")
        gomerge.add_weighted_adapter(mixed, one, "m", method, output_dir=o, **common, **kw)
        for mod, pruned in merged_updates(o).items():
            masks[mod].append(_kept(pruned, tvs[mod][t].double().numpy()))
    eps = 0.15 if epsilon is None else epsilon  # mergekit's default epsilon
    real_bernoulli = torch.bernoulli
    worst = 0.0
    for mod, dws in tvs.items():
        queue = [torch.from_numpy(m.astype(np.float32)) for m in masks[mod]]

        def given_mask(probs, *args, queue=queue, **kwargs):
            mask = queue.pop(0)
            assert mask.shape == probs.shape
            return mask

        torch.bernoulli = given_mask
        try:
            want = mergekit_group(method, dws, weights, lam, density=density, epsilon=eps).double().numpy()
        finally:
            torch.bernoulli = real_bernoulli
        assert not queue
        np.testing.assert_allclose(got[mod], want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=mod)
        worst = max(worst, float(np.abs(got[mod] - want).max() / np.abs(want).max()))
    record_parity(f"{method} density={density} epsilon={epsilon} lambda={lam}, gomerge's masks", worst, VS_MERGEKIT)


def test_della_masks_statistics(mixed, tmp_path):
    """One adapter merged alone is its pruned update: the kept fraction of every row is density within a few
    standard errors, larger magnitudes are kept more often, the l1 norm of the tensor is preserved and kept entries
    share one rescale factor."""
    density, epsilon = 0.4, 0.3
    out = str(tmp_path / "one")
    gomerge.add_weighted_adapter(
        [mixed[0]], [1.0], "m", "della", density=density, epsilon=epsilon, svd_rank=FULL, output_dir=out, seed=5
    )
    got = merged_updates(out)
    tv = task_vectors([mixed[0]])
    rows = fracs = 0
    for mod, pruned in got.items():
        dw = tv[mod][0].double().numpy()
        kept = _kept(pruned, dw)
        cols = dw.shape[1]
        se = np.sqrt(density * (1 - density) / cols)  # the Bernoulli bound (the spread of probabilities lowers it)
        frac = kept.mean(axis=1)
        assert np.all(np.abs(frac - density) < 5 * se), (mod, frac.min(), frac.max())
        rows += dw.shape[0]
        fracs += frac.sum()
        np.testing.assert_allclose(np.abs(pruned).sum(), np.abs(dw).sum(), rtol=1e-4)
        factor = pruned[kept] / dw[kept]
        np.testing.assert_allclose(factor, np.abs(dw).sum() / np.abs(dw[kept]).sum(), rtol=1e-3)
        order = np.argsort(np.abs(dw), axis=1)
        top, bottom = (
            np.take_along_axis(kept, order[:, -cols // 10 :], 1),
            np.take_along_axis(kept, order[:, : cols // 10], 1),
        )
        assert top.mean() > bottom.mean() + epsilon  # about density + 0.9 eps against density - 0.9 eps
    assert abs(fracs / rows - density) < 0.01


def test_della_seed_determinism(mixed, tmp_path):
    def run(name, seed, workers):
        out = tmp_path / name
        res = gomerge.add_weighted_adapter(
            mixed, [1.0, 0.5, 0.5], "m", "della_linear", density=0.5, seed=seed, output_dir=str(out), workers=workers
        )
        assert res.seed == seed
        return (out / "adapter_model.safetensors").read_bytes()

    one, two = run("w1", 7, 1), run("w2", 7, 2)
    assert one == two
    assert run("other", 8, 2) != one
    res = gomerge.add_weighted_adapter(
        mixed, [1.0, 0.5, 0.5], "m", "della", density=0.5, output_dir=str(tmp_path / "fresh")
    )
    assert isinstance(res.seed, int)  # a fresh seed, reported
    res = gomerge.add_weighted_adapter(
        mixed, [1.0, 0.5, 0.5], "m", "breadcrumbs", density=0.5, output_dir=str(tmp_path / "bc")
    )
    assert res.seed is None  # not random
    with pytest.raises(ValueError, match='seed: combination_type "breadcrumbs" does not take seed'):
        gomerge.add_weighted_adapter(mixed, [1, 1, 1], "m", "breadcrumbs", density=0.5, seed=3, output_dir="bc2")


@pytest.mark.parametrize("method", ["breadcrumbs_ties", "della"])
def test_truncated_rank_is_near_optimal(tmp_path, method):
    """On layers wide enough for the randomized SVD, svd_rank < full rank: the reconstruction error is within 1% of
    the optimal rank-k error of the dense merged update (numpy's SVD), and module_errors reports it."""
    dirs = _adapters(
        tmp_path,
        "wide",
        [AdapterSpec(dict(r=r, lora_alpha=2 * r, target_modules=["up", "down"]), seed=20 + r) for r in (4, 8, 6)],
    )
    kw = dict(density=0.4, seed=9) if method == "della" else dict(density=0.4)
    full, low = str(tmp_path / "full"), str(tmp_path / "low")
    gomerge.add_weighted_adapter(dirs, [1.0, 0.7, 0.5], "m", method, svd_rank=384, output_dir=full, **kw)
    k = 8
    res = gomerge.add_weighted_adapter(dirs, [1.0, 0.7, 0.5], "m", method, svd_rank=k, output_dir=low, **kw)
    dense, approx = merged_updates(full), merged_updates(low)
    for mod, d in dense.items():
        s = np.linalg.svd(d, compute_uv=False)
        optimal = np.sqrt((s[k:] ** 2).sum())
        err = np.linalg.norm(d - approx[mod])
        assert err <= 1.01 * optimal, (mod, err / optimal)
        assert res.module_errors[mod] == pytest.approx(err / np.linalg.norm(d), rel=1e-3)


@pytest.mark.parametrize(
    ("method", "kw", "match"),
    [
        ("breadcrumbs", dict(gamma=-0.1), "gamma: "),
        ("breadcrumbs_ties", dict(gamma=1.5), "gamma: "),
        ("breadcrumbs", dict(epsilon=0.1), 'epsilon: combination_type "breadcrumbs" does not take epsilon'),
        ("della", dict(gamma=0.1), 'gamma: combination_type "della" does not take gamma'),
        ("ties_svd", dict(gamma=0.1), "gamma: "),
        ("task_arithmetic", dict(epsilon=0.1), "epsilon: "),
        ("della", dict(epsilon=0.5), r"epsilon: must be chosen such that density \+/- epsilon is in \(0, 1\)"),
        ("della_linear", dict(epsilon=-0.1), "epsilon: "),
        ("della", dict(density=0.1), "epsilon: "),  # the default epsilon 0.15 is wider than density
        ("della", dict(majority_sign_method="frequency"), "majority_sign_method"),
    ],
)
def test_parameter_errors(mixed, tmp_path, method, kw, match):
    if method != "task_arithmetic":  # it takes no density (and would refuse one first)
        kw = {"density": 0.5, **kw}
    with pytest.raises(ValueError, match=match):
        gomerge.add_weighted_adapter(mixed, [1, 1, 1], "m", method, output_dir=str(tmp_path / "o"), **kw)
    assert not (tmp_path / "o").exists()


def test_type_errors(mixed):
    for name in ("gamma", "epsilon"):
        with pytest.raises(TypeError, match=name):
            gomerge.add_weighted_adapter(mixed, [1, 1, 1], "m", "della", density=0.5, output_dir="o", **{name: "x"})


def test_cli_and_recipe_take_gamma_and_epsilon(mixed, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"))
    base = [sys.executable, "-m", "gomerge", "merge", *mixed, "--density", "0.5", "--svd-rank", "64", "--json"]
    api = str(tmp_path / "api")
    gomerge.add_weighted_adapter(
        mixed, [1, 1, 1], "m", "breadcrumbs_ties", density=0.5, gamma=0.1, lambda_=0.5, svd_rank=64, output_dir=api
    )
    cli = subprocess.run(
        [*base, "--method", "breadcrumbs_ties", "--gamma", "0.1", "--lambda", "0.5", "-o", str(tmp_path / "cli")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert cli.returncode == 0, cli.stderr
    api_bytes = open(os.path.join(api, "adapter_model.safetensors"), "rb").read()
    assert open(tmp_path / "cli" / "adapter_model.safetensors", "rb").read() == api_bytes
    card = open(tmp_path / "cli" / "README.md").read()
    assert "- gamma: 0.1" in card and "- lambda: 0.5" in card
    bad = subprocess.run(
        [*base, "--method", "della", "--gamma", "0.1", "-o", str(tmp_path / "bad")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert bad.returncode != 0 and "gamma" in bad.stderr
    path = tmp_path / "della.yaml"
    srcs = "".join(f"  - source: {d}\n" for d in mixed)
    path.write_text(
        f"adapters:\n{srcs}method: della\ndensity: 0.5\nepsilon: 0.2\nseed: 4\nsvd_rank: 64\n"
        f"output_dir: {tmp_path / 'recipe'}\n"
    )
    opts = recipe.load_recipe(str(path)).options
    assert opts["epsilon"] == 0.2
    rec = subprocess.run(
        [sys.executable, "-m", "gomerge", "merge", "--recipe", str(path), "--json"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert rec.returncode == 0, rec.stderr
    api2 = str(tmp_path / "api2")
    gomerge.add_weighted_adapter(
        mixed, [1, 1, 1], "m", "della", density=0.5, epsilon=0.2, seed=4, svd_rank=64, output_dir=api2
    )
    assert (tmp_path / "recipe" / "adapter_model.safetensors").read_bytes() == open(
        os.path.join(api2, "adapter_model.safetensors"), "rb"
    ).read()
    shutil.rmtree(api2)
