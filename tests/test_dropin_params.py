"""The drop-in keeps PEFT's tolerance of arguments a combination type does not read (PEFT ignores `density` with
`svd`, `svd_clamp` with `ties`...), where gomerge's own API refuses them (tests/test_errors.py)."""

from __future__ import annotations

import pytest
from svd_checks import SVDCapture
from test_peft_dropin import DROPIN_CASES, assert_same_merge, load

import gomerge.peft as gp


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from peft_cases import build_case

    return build_case(DROPIN_CASES[0], str(tmp_path_factory.mktemp("adapters")))


@pytest.mark.parametrize(
    "ctype,kwargs",
    [
        ("svd", dict(density=0.3, majority_sign_method="frequency")),
        ("ties", dict(density=0.4, svd_clamp=0.9, svd_rank=4)),
        ("cat", dict(density=0.5, svd_clamp=0.5)),
    ],
)
def test_dropin_ignores_what_peft_ignores(dirs, ctype, kwargs, check_truncation):
    case = DROPIN_CASES[0]
    names = [f"a{i}" for i in range(len(dirs))]
    theirs, ours = load(case, dirs), load(case, dirs)
    with SVDCapture() as cap:
        theirs.add_weighted_adapter(names, case.weights, "merged", combination_type=ctype, **kwargs)
    gp.add_weighted_adapter(ours, names, case.weights, "merged", combination_type=ctype, **kwargs)
    assert_same_merge(ours, theirs, case, ctype, None, cap.by_module(theirs), check_truncation)


def test_dropin_refuses_a_seed_for_a_method_without_randomness(dirs):
    model = load(DROPIN_CASES[0], dirs)
    with pytest.raises(ValueError, match='seed: combination_type "ties" does not take seed'):
        gp.add_weighted_adapter(model, ["a0", "a1"], [1.0, 1.0], "merged", "ties", density=0.5, seed=3)
    assert "merged" not in model.peft_config
