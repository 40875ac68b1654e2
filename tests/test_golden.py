"""The golden corpus (tests/golden/): every output of the engine on fixed inputs and seeds, hashed, must match
the committed `tests/golden/corpus.json` byte for byte, under every kernel set this CPU runs.

The engine reads GOMERGE_KERNELS at import, so each kernel set runs `tests/golden/make_corpus.py` in its own
Python; the inputs are built once (by the first) and shared. One test per case and kernel set.
"""

from __future__ import annotations

import pytest
from golden import make_corpus

from gomerge import _native

KERNELS = list(_native.kernel_info()["runnable"])
CORPUS = make_corpus.load_corpus()
CASES = sorted({k.split("@")[0] for k in CORPUS})

HOW = (
    "The golden corpus guards the byte-identity of the engine's outputs across the redesign: regenerate it "
    "(`.venv/bin/python tests/golden/make_corpus.py --write`) only when a change is meant to alter the numbers, "
    "and say why in the commit."
)


@pytest.fixture(scope="session")
def computed(tmp_path_factory):
    """kernel set -> {case id: sha256}, computed on first use (one subprocess per kernel set)."""
    root = str(tmp_path_factory.mktemp("golden"))
    cache: dict[str, dict[str, str]] = {}

    def get(kernels: str) -> dict[str, str]:
        if kernels not in cache:
            cache[kernels] = make_corpus.in_subprocess(kernels, root)
        return cache[kernels]

    return get


@pytest.mark.parametrize("kernels", KERNELS)
def test_the_corpus_has_every_case(kernels, computed):
    got = computed(kernels)
    missing, extra = sorted(set(CASES) - set(got)), sorted(set(got) - set(CASES))
    assert not missing and not extra, (
        f"GOMERGE_KERNELS={kernels}: cases in the corpus but no longer computed: {missing}; "
        f"computed cases missing from the corpus: {extra}. {HOW}"
    )


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kernels", KERNELS)
def test_golden(kernels, case, computed):
    want = make_corpus.expected(CORPUS, case, kernels)
    got = computed(kernels).get(case)
    if case.startswith("input/"):
        what = (
            "an input of the corpus changed (built by torch, PEFT and transformers from seeds): a new version of "
            "one of them, or a change of the generator; the engine is not at fault."
        )
    else:
        what = "the engine's output changed."
    assert got == want, (
        f"golden case {case!r} under GOMERGE_KERNELS={kernels}: {what} sha256 now {got}, in the corpus {want}. {HOW}"
    )
