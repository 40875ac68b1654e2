"""The drop-in: `gomerge.peft.add_weighted_adapter(model, ...)` and `gomerge.patch_peft()` against PEFT's own
method on live PeftModels, for all eleven combination types."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraModel
from peft_cases import MODELS, PEFT_TYPES, Case, build_case, delta, logits, peft_factors, rel_diff
from svd_checks import SVD_TYPES, SVDCapture
from test_peft_parity import CASES

import gomerge
import gomerge.peft as gp

ALL_TYPES = PEFT_TYPES
FACTOR_TYPES = ("linear", "cat", "ties", "dare_ties", "dare_linear", "magnitude_prune")
DROPIN_CASES = [c for c in CASES if c.rtol == 1e-5 and len(c.adapters) > 1 and "linear" in c.types]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {c.name: build_case(c, str(root)) for c in DROPIN_CASES}


def load(case: Case, dirs: list[str]) -> PeftModel:
    model = PeftModel.from_pretrained(MODELS[case.model](0), dirs[0], adapter_name="a0")
    for i, d in enumerate(dirs[1:], start=1):
        model.load_adapter(d, adapter_name=f"a{i}")
    return model.eval()


def _kwargs(ctype: str) -> dict:
    return {} if ctype in ("svd", "linear", "cat") else {"density": 0.4}


def assert_same_merge(
    ours: PeftModel,
    theirs: PeftModel,
    case: Case,
    ctype: str,
    record=None,
    svd_inputs: dict | None = None,
    check_truncation=None,
) -> None:
    """gomerge's merged adapter equals PEFT's: the factor types' A', B' and B'A' to rtol 1e-5 (float32 summation
    order); the SVD types through svd_checks' rules on the matrix PEFT factored (`svd_inputs`, captured with
    SVDCapture), so that another CPU's LAPACK path cannot fail them where the rank's spectral gap closes."""
    f_theirs, f_ours = peft_factors(theirs), peft_factors(ours)
    assert sorted(f_theirs) == sorted(f_ours)
    if ctype in SVD_TYPES:
        assert svd_inputs is not None and check_truncation is not None, "an SVD type needs PEFT's captured inputs"
    worst = 0.0
    for mod, (a, b) in f_theirs.items():
        oa, ob = f_ours[mod]
        d_theirs = delta(a, b)
        worst = max(worst, rel_diff(delta(oa, ob), d_theirs))
        if ctype in SVD_TYPES and mod in svd_inputs:
            assert oa.shape == a.shape and ob.shape == b.shape, mod
            check_truncation(
                svd_inputs[mod], a.shape[0], delta(oa, ob), d_theirs, label=f"drop-in-{case.name}-{ctype} {mod}"
            )
            continue
        if ctype in FACTOR_TYPES:
            assert oa.shape == a.shape and ob.shape == b.shape, mod
            np.testing.assert_allclose(oa, a, rtol=1e-5, atol=1e-5 * np.abs(a).max(), err_msg=f"{mod} A: rule exact")
            np.testing.assert_allclose(ob, b, rtol=1e-5, atol=1e-5 * np.abs(b).max(), err_msg=f"{mod} B: rule exact")
        np.testing.assert_allclose(
            delta(oa, ob), d_theirs, rtol=1e-5, atol=1e-5 * np.abs(d_theirs).max(), err_msg=f"{mod}: rule exact"
        )
    if record is not None:
        record(f"drop-in {case.name}-{ctype}", worst)
    # same tensors' dtype, device and requires_grad; same config; same active adapter; same logits
    params_t = {n: p for n, p in theirs.named_parameters() if ".merged" in n}
    params_o = {n: p for n, p in ours.named_parameters() if ".merged" in n}
    assert sorted(params_t) == sorted(params_o)
    for n, p in params_t.items():
        q = params_o[n]
        assert (q.dtype, q.device, q.requires_grad, tuple(q.shape)) == (
            p.dtype,
            p.device,
            p.requires_grad,
            tuple(p.shape),
        ), n
        assert not q.requires_grad
    assert ours.peft_config["merged"].to_dict() == theirs.peft_config["merged"].to_dict()
    assert ours.active_adapters == theirs.active_adapters
    ours.set_adapter("merged")
    theirs.set_adapter("merged")
    ref = logits(theirs, case.model)
    np.testing.assert_allclose(logits(ours, case.model), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def _params():
    for c in DROPIN_CASES:
        for t in ALL_TYPES:
            yield pytest.param(c, t, id=f"{c.name}-{t}")


@pytest.mark.parametrize("case,ctype", list(_params()))
def test_dropin_matches_peft(case, ctype, adapters, record_parity, check_truncation):
    dirs = adapters[case.name]
    names = [f"a{i}" for i in range(len(dirs))]
    theirs, ours = load(case, dirs), load(case, dirs)
    torch.manual_seed(2024)  # DARE: the same torch generator state for both
    with SVDCapture() as cap:
        theirs.add_weighted_adapter(names, case.weights, "merged", combination_type=ctype, **_kwargs(ctype))
    state_theirs = torch.get_rng_state()
    torch.manual_seed(2024)
    gp.add_weighted_adapter(ours, names, case.weights, "merged", combination_type=ctype, **_kwargs(ctype))
    assert torch.equal(torch.get_rng_state(), state_theirs), "torch's generator was used differently from PEFT"
    assert_same_merge(ours, theirs, case, ctype, record_parity, cap.by_module(theirs), check_truncation)


def test_peft_quirks_are_kept(adapters):
    case = DROPIN_CASES[0]
    dirs = adapters[case.name]
    ours = load(case, dirs)
    gp.add_weighted_adapter(ours, ["a0"], [1.5], "merged", combination_type="svd")  # one adapter: linear
    theirs = load(case, dirs)
    theirs.add_weighted_adapter(["a0"], [1.5], "merged", combination_type="svd")
    assert_same_merge(ours, theirs, case, "linear")
    before = {k: a.copy() for k, (a, _) in peft_factors(ours).items()}
    gp.add_weighted_adapter(ours, ["a0", "a1"], [1.0, 1.0], "merged", combination_type="cat")  # exists: no-op
    after = peft_factors(ours)
    assert all(np.array_equal(before[k], after[k][0]) for k in before)


def test_invalid_arguments_leave_the_model_unchanged(adapters):
    case = DROPIN_CASES[0]
    model = load(case, adapters[case.name])
    n_params = len(list(model.named_parameters()))
    for kwargs, exc in [
        (dict(combination_type="ties"), ValueError),
        (dict(combination_type="dare_linear", density=1.5), ValueError),
        (dict(combination_type="ties", density=0.5, majority_sign_method="avg"), ValueError),
        (dict(combination_type="nope"), ValueError),
    ]:
        with pytest.raises(exc):
            gp.add_weighted_adapter(model, ["a0", "a1", "a2"], case.weights, "merged", **kwargs)
        assert "merged" not in model.peft_config
        assert len(list(model.named_parameters())) == n_params
    with pytest.raises(ValueError, match="2 weights for 3 adapters"):
        gp.add_weighted_adapter(model, ["a0", "a1", "a2"], [1.0, 1.0], "merged")
    with pytest.raises(ValueError, match="does not exist"):  # PEFT's own check and message
        gp.add_weighted_adapter(model, ["a0", "zz"], [1.0, 1.0], "merged")


def test_seed_selects_gomerge_generator(adapters):
    case = DROPIN_CASES[0]
    names = ["a0", "a1", "a2"]
    runs = []
    for seed in (7, 7, 8):
        model = load(case, adapters[case.name])
        gp.add_weighted_adapter(model, names, case.weights, "merged", "dare_ties", density=0.5, seed=seed)
        runs.append(peft_factors(model))
    mod = sorted(runs[0])[0]
    assert np.array_equal(runs[0][mod][0], runs[1][mod][0])
    assert not np.array_equal(runs[0][mod][0], runs[2][mod][0])


def test_patch_through_peftmodel_forwarding(adapters, monkeypatch):
    case = DROPIN_CASES[0]
    calls = []
    original_start = gomerge._native.merge_tensors_start
    monkeypatch.setattr(gomerge._native, "merge_tensors_start", lambda req: calls.append(1) or original_start(req))
    peft_method, delete = LoraModel.add_weighted_adapter, LoraModel.delete_adapter
    gomerge.patch_peft()
    try:
        assert LoraModel.add_weighted_adapter is not peft_method
        assert LoraModel.delete_adapter is delete  # other methods untouched
        ours = load(case, adapters[case.name])
        ours.add_weighted_adapter(["a0", "a1", "a2"], case.weights, "merged", combination_type="ties", density=0.3)
        assert calls == [1]
    finally:
        gomerge.unpatch_peft()
    assert LoraModel.add_weighted_adapter is peft_method
    theirs = load(case, adapters[case.name])
    theirs.add_weighted_adapter(["a0", "a1", "a2"], case.weights, "merged", combination_type="ties", density=0.3)
    assert calls == [1]
    assert_same_merge(ours, theirs, case, "ties")
    with gomerge.patch_peft():
        assert gp.is_patched()
    assert not gp.is_patched()


def test_two_threads_at_once(adapters, check_truncation):
    cases = [DROPIN_CASES[0], DROPIN_CASES[2]]
    models = {c.name: load(c, adapters[c.name]) for c in cases}
    errors = []

    def work(c):
        try:
            n = len(c.adapters)
            gp.add_weighted_adapter(
                models[c.name], [f"a{i}" for i in range(n)], c.weights, "merged", "ties_svd", density=0.5
            )
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(c,)) for c in cases for _ in range(1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for c in cases:
        theirs = load(c, adapters[c.name])
        with SVDCapture() as cap:
            theirs.add_weighted_adapter(
                [f"a{i}" for i in range(len(c.adapters))], c.weights, "merged", "ties_svd", density=0.5
            )
        assert_same_merge(models[c.name], theirs, c, "ties_svd", None, cap.by_module(theirs), check_truncation)


def test_dora_falls_back_to_peft_with_a_warning(tmp_path):
    dirs = []
    for i in range(2):
        pm = get_peft_model(
            MODELS["llama"](0), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True, init_lora_weights=False)
        )
        pm.save_pretrained(str(tmp_path / f"d{i}"))
        dirs.append(str(tmp_path / f"d{i}"))
    case = Case("dora", "llama", [], [1.0, 1.0])
    model = load(case, dirs)
    with pytest.warns(UserWarning, match="use_dora.*PEFT's own"):
        gp.add_weighted_adapter(model, ["a0", "a1"], [1.0, 1.0], "merged", combination_type="svd")
    assert "merged" in model.peft_config


@pytest.mark.parametrize(
    "dtypes,warmup",
    [
        pytest.param([torch.float32] * 6, 0, id="float32-fresh-seed"),
        pytest.param(
            [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.bfloat16, torch.float16], 5, id="mixed"
        ),
        pytest.param([torch.bfloat16] * 6, 623, id="bfloat16-at-a-twist"),
    ],
)
def test_dare_masks_drawn_by_go_are_torchs(dtypes, warmup):
    """The DARE masks that Go draws for the drop-in (`torch_masks`) are torch.bernoulli's, bit for bit, for float32,
    bfloat16 and float16 factors (each its own probability: a bf16 0.2 is not a float32 0.2), and torch's generator
    is left where torch's own draws leave it, whatever its position (right after seeding, mid-block, at a twist)."""
    density = 0.2
    shapes = [(8, 300), (700, 8), (3, 5), (4, 641), (1250, 4), (1, 1)]
    factors = [torch.empty(s, dtype=dt) for s, dt in zip(shapes, dtypes)]

    def start():
        torch.manual_seed(11)
        if warmup:
            torch.bernoulli(torch.full((warmup,), 0.5))  # warmup words drawn: the stream starts anywhere

    start()
    expected = [torch.bernoulli(torch.full_like(x, density)).to(torch.uint8).flatten() for x in factors]
    state = torch.get_rng_state()
    start()
    keep: list = []
    masks = gp._DareMasks(density, factors, keep)
    assert masks.request() is not None, "these factors are drawn in Go"
    addresses = [masks.draw(x, keep) for x in factors]
    request = dict.fromkeys(gomerge._native.request_keys()["merge_tensors"])
    request.update(combination_type="dare_ties", density=density, rank=8, modules=[], torch_masks=masks.request())
    result = gomerge._native.run_job(gomerge._native.merge_tensors_start(request), False)
    masks.done(result["torch_pos"])
    assert torch.equal(torch.get_rng_state(), state), "torch's generator is not where torch.bernoulli leaves it"
    base = masks.buffer.data_ptr()
    for x, address, want in zip(factors, addresses, expected):
        got = masks.buffer[address - base : address - base + x.numel()]
        assert torch.equal(got, want), (x.shape, x.dtype)


def test_dare_masks_of_float64_factors_stay_with_torch():
    """float64 probabilities make torch.bernoulli draw 53-bit words: those masks are drawn by torch itself."""
    factors = [torch.empty(4, 5, dtype=torch.float64), torch.empty(5, 4)]
    torch.manual_seed(3)
    expected = [torch.bernoulli(torch.full_like(x, 0.3)).to(torch.uint8) for x in factors]
    torch.manual_seed(3)
    keep: list = []
    masks = gp._DareMasks(0.3, factors, keep)
    assert masks.request() is None
    got = [masks.draw(x, keep) for x in factors]
    base = masks.buffer.data_ptr()
    for x, address, want in zip(factors, got, expected):
        assert torch.equal(masks.buffer[address - base : address - base + x.numel()].view(x.shape), want)


def test_dare_in_two_threads_takes_turns(adapters):
    """Two DARE drop-in calls at once draw from torch's generator in turn, as two PEFT calls one after the other:
    each gets the masks of one of PEFT's two calls, and the generator ends where PEFT's second call leaves it."""
    case = DROPIN_CASES[0]
    names = [f"a{i}" for i in range(len(case.adapters))]
    theirs = [load(case, adapters[case.name]) for _ in range(2)]
    ours = [load(case, adapters[case.name]) for _ in range(2)]  # (building a model seeds torch's generator)
    torch.manual_seed(99)
    for model in theirs:
        model.add_weighted_adapter(names, case.weights, "merged", combination_type="dare_ties", density=0.4)
    peft_calls = [peft_factors(m) for m in theirs]
    state = torch.get_rng_state()
    torch.manual_seed(99)
    errors = []

    def work(model):
        try:
            gp.add_weighted_adapter(model, names, case.weights, "merged", combination_type="dare_ties", density=0.4)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(m,)) for m in ours]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert torch.equal(torch.get_rng_state(), state), "the generator is not where PEFT's two calls leave it"

    def same(f, g):  # the drop-in's rule: PEFT's factors to float32 rounding (test_dropin_matches_peft)
        return f.keys() == g.keys() and all(
            np.allclose(x, y, rtol=1e-5, atol=1e-5 * np.abs(y).max()) for k in f for x, y in zip(f[k], g[k])
        )

    got = [peft_factors(m) for m in ours]
    assert (same(got[0], peft_calls[0]) and same(got[1], peft_calls[1])) or (
        same(got[0], peft_calls[1]) and same(got[1], peft_calls[0])
    ), "each call must get the masks of one of PEFT's calls"
