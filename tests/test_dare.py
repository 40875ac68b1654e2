"""DARE (`dare_linear`, `dare_ties` and their `_svd` forms): statistics of the masks, exact rescaling, PEFT's own
code fed with gomerge's masks, and determinism of the seed across runs and core counts."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from peft.tuners.lora import LoraLayer
from peft_cases import build_case, delta, file_factors, peft_factors, peft_merge
from svd_checks import SVDCapture
from test_peft_parity import CASES
from test_peft_pruning import check_family2

import gomerge

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
from example_adapters import ADAPTERS, write_all  # noqa: E402

LLAMA3 = next(c for c in CASES if c.name == "llama-3")


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    return write_all(str(tmp_path_factory.mktemp("example")))


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    return build_case(LLAMA3, str(tmp_path_factory.mktemp("llama3")))


def _merge(dirs, weights, ctype, out, **kw):
    return gomerge.add_weighted_adapter(dirs, weights, "m", ctype, output_dir=out, **kw)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_kept_fraction_and_exact_rescale(example, tmp_path, density):
    """With weights [1, 0, 0] the merged A is sign-sqrt(w s) * mask * A / density: per tensor, the kept fraction
    is within 5 binomial standard deviations of density, and kept values are exactly (A / density) * weight in
    float32."""
    res = _merge(example, [1.0, 0.0, 0.0], "dare_linear", tmp_path / "o", density=density, seed=7)
    assert res.seed == 7
    src, out = file_factors(example[0]), file_factors(str(tmp_path / "o"))
    r, alpha = ADAPTERS["norobots"][:2]
    w = np.float32(np.sqrt(1.0 * alpha / r))
    d = np.float32(density)
    for mod, (a, _) in src.items():
        a32 = a.astype(np.float32)
        merged = out[mod][0].astype(np.float32)
        kept = merged != 0
        n = kept.size
        assert abs(kept.sum() - density * n) <= 5 * np.sqrt(n * density * (1 - density)), mod
        np.testing.assert_array_equal(merged[kept], (a32[kept] / d) * w)


def test_expectation_approaches_unpruned_merge(example, tmp_path):
    """Averaged over many seeds, dare_linear (rescaled by 1/density) approaches the unpruned linear merge."""
    _merge(example, [2.0, 1.0, 1.0], "linear", tmp_path / "lin")
    ref = file_factors(str(tmp_path / "lin"))
    mod = "model.layers.0.self_attn.q_proj"
    draws = []
    for seed in range(150):
        _merge(example, [2.0, 1.0, 1.0], "dare_linear", tmp_path / "d", density=0.5, seed=seed, overwrite=True)
        draws.append(file_factors(str(tmp_path / "d"))[mod][0])
    target = ref[mod][0]
    one = np.linalg.norm(draws[0] - target) / np.linalg.norm(target)
    mean = np.linalg.norm(np.mean(draws, axis=0) - target) / np.linalg.norm(target)
    assert mean < 0.15 and mean < one / 5, (one, mean)


def _recover_masks_family1(dirs, weights, tmp_path, seed, density):
    """gomerge's mask of every factor, from one-hot dare_linear merges with the same seed: {module: {(factor, i)}}."""
    masks: dict[str, dict[tuple[str, int], np.ndarray]] = {}
    for i in range(len(dirs)):
        onehot = [1.0 if j == i else 0.0 for j in range(len(dirs))]
        out = tmp_path / f"onehot{i}"
        _merge(dirs, onehot, "dare_linear", out, density=density, seed=seed)
        for mod, (a, b) in file_factors(str(out)).items():
            masks.setdefault(mod, {})[("A", i)] = a != 0
            masks[mod][("B", i)] = b != 0
    return masks


class FeedMasks:
    """Replaces torch.bernoulli so that PEFT's random_pruning draws the given masks, in order."""

    def __init__(self, monkeypatch, masks: list[np.ndarray]):
        self.masks = list(masks)

        def bernoulli(input, *args, **kwargs):
            m = self.masks.pop(0)
            assert tuple(m.shape) == tuple(input.shape), "mask order differs from PEFT's"
            return torch.tensor(m, dtype=input.dtype)

        monkeypatch.setattr(torch, "bernoulli", bernoulli)


def merged_module_order(model) -> list[str]:
    """The modules that carry the merged adapter, in PEFT's merge order (the order it draws DARE's masks in)."""
    return [
        n.removeprefix("base_model.model.")
        for n, m in model.named_modules()
        if isinstance(m, LoraLayer) and ("merged" in m.lora_A or "merged" in m.lora_embedding_A)
    ]


@pytest.mark.parametrize("ctype,method", [("dare_linear", "total"), ("dare_ties", "total"), ("dare_ties", "frequency")])
def test_family1_matches_peft_fed_with_gomerge_masks(llama3, tmp_path, monkeypatch, ctype, method):
    seed, density = 1234, 0.4
    masks = _recover_masks_family1(llama3, LLAMA3.weights, tmp_path, seed, density)
    out = tmp_path / "ours"
    _merge(llama3, LLAMA3.weights, ctype, out, density=density, seed=seed, majority_sign_method=method)
    probe = peft_merge(LLAMA3, llama3, "linear")
    order = merged_module_order(probe)
    queue = []
    for mod in order:  # PEFT draws all A masks in adapter order, then all B masks, module by module
        queue += [masks[mod][("A", i)] for i in range(3)] + [masks[mod][("B", i)] for i in range(3)]
    feed = FeedMasks(monkeypatch, queue)
    model = peft_merge(LLAMA3, llama3, ctype, density=density, majority_sign_method=method)
    assert not feed.masks
    theirs, ours = peft_factors(model), file_factors(str(out))
    for mod, (a, b) in theirs.items():
        np.testing.assert_allclose(ours[mod][0], a, rtol=1e-5, atol=1e-5 * np.abs(a).max(), err_msg=mod)
        np.testing.assert_allclose(ours[mod][1], b, rtol=1e-5, atol=1e-5 * np.abs(b).max(), err_msg=mod)


@pytest.mark.parametrize("ctype", ["dare_linear_svd", "dare_ties_svd"])
def test_family2_matches_peft_fed_with_gomerge_masks(
    llama3, tmp_path, monkeypatch, ctype, record_parity, check_truncation
):
    """Masks of the dense updates are recovered from one-hot merges at full rank (where the SVD is exact)."""
    seed, density = 99, 0.5
    src = [file_factors(d) for d in llama3]
    cfgs = [json.load(open(os.path.join(d, "adapter_config.json"))) for d in llama3]
    masks: dict[str, list[np.ndarray]] = {}
    for i in range(3):
        onehot = [1.0 if j == i else 0.0 for j in range(3)]
        out = tmp_path / f"onehot{i}"
        _merge(llama3, onehot, "dare_linear_svd", out, density=density, seed=seed, svd_rank=128)
        for mod, (a, b) in file_factors(str(out)).items():
            kept_value = cfgs[i]["lora_alpha"] / cfgs[i]["r"] * delta(*src[i][mod]) / density
            ours = delta(a, b)
            masks.setdefault(mod, []).append(np.abs(ours - kept_value) < np.abs(ours))
    out = tmp_path / "ours"
    _merge(llama3, LLAMA3.weights, ctype, out, density=density, seed=seed)
    order = merged_module_order(peft_merge(LLAMA3, llama3, "linear"))
    feed = FeedMasks(monkeypatch, [m for mod in order for m in masks[mod]])
    with SVDCapture() as cap:
        model = peft_merge(LLAMA3, llama3, ctype, density=density)
    assert not feed.masks
    assert sorted(cap.by_module(model)) == sorted(order), "PEFT factored other modules than it merged"
    label = f"dare-masks-llama-3-{ctype}-0.5"
    check_family2(
        cap.by_module(model), file_factors(str(out)), peft_factors(model), label, record_parity, check_truncation
    )


@pytest.mark.parametrize("ctype", ["dare_ties", "dare_linear_svd", "ties_svd"])
def test_same_seed_same_bytes_any_core_count(example, tmp_path, ctype):
    kw = dict(density=0.3, seed=2024) if ctype != "ties_svd" else dict(density=0.3)  # ties_svd takes no seed
    _merge(example, [2.0, 1.0, 1.0], ctype, tmp_path / "a", **kw)
    _merge(example, [2.0, 1.0, 1.0], ctype, tmp_path / "b", workers=1, **kw)
    script = (
        f"import sys; sys.path.insert(0, {os.path.join(ROOT, 'python')!r}); import gomerge; "
        f"gomerge.add_weighted_adapter({example!r}, [2.0, 1.0, 1.0], 'm', {ctype!r}, "
        f"**{kw!r}, output_dir={str(tmp_path / 'c')!r})"
    )
    env = dict(os.environ, GOMAXPROCS="1")
    subprocess.run([sys.executable, "-c", script], check=True, env=env)
    for other in ("b", "c"):
        for f in ("adapter_model.safetensors", "adapter_config.json"):
            assert filecmp.cmp(tmp_path / "a" / f, tmp_path / other / f, shallow=False), (other, f)


def test_fresh_seed_is_reported_and_reproduces(example, tmp_path):
    r1 = _merge(example, [1.0, 1.0, 1.0], "dare_ties", tmp_path / "a", density=0.5)
    r2 = _merge(example, [1.0, 1.0, 1.0], "dare_ties", tmp_path / "b", density=0.5)
    assert r1.seed is not None and r2.seed is not None and r1.seed != r2.seed
    _merge(example, [1.0, 1.0, 1.0], "dare_ties", tmp_path / "c", density=0.5, seed=r1.seed)
    assert filecmp.cmp(
        tmp_path / "a" / "adapter_model.safetensors", tmp_path / "c" / "adapter_model.safetensors", shallow=False
    )
    assert not filecmp.cmp(
        tmp_path / "a" / "adapter_model.safetensors", tmp_path / "b" / "adapter_model.safetensors", shallow=False
    )


def test_density_one_warns_and_prunes_nothing(example, tmp_path):
    _merge(example, [2.0, 1.0, 1.0], "linear", tmp_path / "lin")
    with pytest.warns(UserWarning, match="no pruning will be performed"):
        _merge(example, [2.0, 1.0, 1.0], "dare_linear", tmp_path / "d", density=1.0)
    assert filecmp.cmp(
        tmp_path / "lin" / "adapter_model.safetensors", tmp_path / "d" / "adapter_model.safetensors", shallow=False
    )
