"""Tolerances for the SVD family (`svd`, `*_svd`, rank control, resize) that follow from the mathematics.

A truncated SVD computed in float32 is the exact truncation of a nearby matrix: LAPACK's SVD is backward stable,
so the computed factors are those of M + E with ||E|| <= p(m, n) u ||M|| (LAPACK Users' Guide, section 4.9;
p(m, n) = max(m, n) here, which also covers the float32 sums that form M, and u = 2^-24). Two correct float32
SVDs of the same M (two CPUs' LAPACK code paths, or gomerge and PEFT) can therefore differ by far more than u
where two singular values nearly meet. What is well defined, and checked here:

- rule "eckart-young": the error ||M - D||_F of each rank-r result D is at most (1 + kappa) times the optimal
  error sqrt(sum_{i>r} s_i^2) of a float64 SVD of M, plus 2 eps (eps = p u ||M||_F: E's effect on the optimal
  error by Mirsky's theorem, plus E itself). kappa is 0 for exact SVDs (LAPACK's, gomerge's thin and factored
  ones) and 0.01 for gomerge's randomized range finder (its accuracy contract, gomerge/rsvd.go).
- rule "wedin": where the SVD is exact, the computed D = [M + E]_r, and
  ||[M + E]_r - [M]_r||_2 <= ||(P' - P) M|| + ||E|| <= eps (1 + s_1 / (gap - eps)), gap = s_r - s_{r+1}
  (Wedin's sin-theta theorem for the left singular subspaces P, P'), and also <= 2 (s_{r+1} + eps) (D is within
  s_{r+1}(M + E) of M + E). So ||D_ours - D_peft||_2 is at most the sum of the two sides' bounds: where the gap
  is wide this is a tight elementwise check (max |entry| <= spectral norm); where it closes, the bound widens as
  the mathematics says it must.
- rule "excess": for a result that is not an exact truncation (the randomized SVD), the measured excess error
  bounds its distance to [M]_r: with P the projector onto D's columns, ||D - P M||_F^2 = err^2 - ||(I - P) M||_F^2
  and ||sin theta||_F^2 <= (err^2 - opt^2) / (s_r^2 - s_{r+1}^2), so
  ||D - [M]_r||_F <= sqrt(err^2 - opt^2) (1 + sqrt(2) s_1 / sqrt(s_r^2 - s_{r+1}^2)).

Every check returns its figures (gap, error ratios, distance and bound), which the parity summary prints; a failure
names the rule and the figures, so that a regression can be told from a conditioning effect.

The reference SVD can be computed through a second, numerically different path, as another CPU's LAPACK would:
with GOMERGE_TEST_REFERENCE_SVD=transpose, every torch.linalg.svd call in the test run (PEFT's included) factors
M^T and transposes the result back (conftest.py installs it).
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

U32 = 2.0**-24
# gomerge's randomized SVD (gomerge/rsvd.go): its reconstruction error is within 1% of the optimal rank-k error
RSVD_KAPPA = 0.01
REFERENCE_SVD_ENV = "GOMERGE_TEST_REFERENCE_SVD"


def reference_svd_path() -> str:
    """The path the reference SVD takes in this run: "direct" or "transpose" (GOMERGE_TEST_REFERENCE_SVD)."""
    path = os.environ.get(REFERENCE_SVD_ENV, "direct")
    if path not in ("direct", "transpose"):
        raise ValueError(f"{REFERENCE_SVD_ENV}={path!r}: choose direct or transpose")
    return path


def transposed_svd(original):
    """torch.linalg.svd computed as the SVD of the transpose: M^T = U2 S Vh2, so M = Vh2^T S U2^T."""

    def svd(a, *args, **kwargs):
        u2, s, vh2 = original(a.mT, *args, **kwargs)
        return vh2.mT, s, u2.mT

    svd.__wrapped__ = original
    return svd


def install_reference_svd() -> None:
    """Routes torch.linalg.svd through the path GOMERGE_TEST_REFERENCE_SVD names (once per process)."""
    if reference_svd_path() == "transpose" and not hasattr(torch.linalg.svd, "__wrapped__"):
        torch.linalg.svd = transposed_svd(torch.linalg.svd)


def numerics_fingerprint() -> str:
    """A short hash of a fixed float32 SVD and product: two runs with the same fingerprint took the same
    arithmetic path in torch's LAPACK and BLAS."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(112, 64, generator=g) @ torch.randn(64, 64, generator=g)
    u, s, vh = torch.linalg.svd(a)
    h = hashlib.sha256()
    for t in (u, s, vh, a @ a.T):
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def numerics_description() -> str:
    """Which arithmetic the reference ran on: torch's BLAS/LAPACK, the MKL variables, the reference SVD path."""
    mkl = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MKL_") and k != "MKL_VERBOSE")
    blas = "mkl" if torch.backends.mkl.is_available() else "openblas/other"
    return (
        f"torch {torch.__version__} ({blas}, ATen {torch.backends.cpu.get_cpu_capability()}), "
        f"{mkl or 'MKL defaults'}, reference SVD {reference_svd_path()}, fingerprint {numerics_fingerprint()}"
    )


def backward_error(shape: tuple[int, ...], norm_f: float, u: float = U32) -> float:
    """eps = p(m, n) u ||M||_F with p = max(m, n): a float32 SVD's (and M's formation's) backward error."""
    return max(shape) * u * norm_f


@dataclass
class Truncation:
    """The figures of one rank-r comparison: M's spectrum at r, each side's error and their distance."""

    label: str
    rank: int
    s1: float
    gap: float  # s_r - s_{r+1}, relative to s_1 when printed
    optimal: float
    eps: float
    ratio_ours: float
    ratio_theirs: float | None
    distance: float | None  # ||D_ours - D_theirs||_2
    bound: float | None
    rule: str

    @property
    def closeness(self) -> float:
        """How near the comparison came to failing: distance / bound, or gomerge's error ratio where there is no
        reference."""
        return self.distance / self.bound if self.distance is not None and self.bound else self.ratio_ours

    def summary(self) -> str:
        rel = self.gap / self.s1 if self.s1 else 0.0
        out = f"s1 {self.s1:.3g}, gap/s1 {rel:.2e}, err/opt ours {self.ratio_ours:.6f}"
        if self.ratio_theirs is not None:
            out += f" ref {self.ratio_theirs:.6f}"
        if self.distance is not None:
            out += f", |D-D_ref|_2 {self.distance:.2e} <= {self.bound:.2e} ({self.rule})"
        return out


def _ratio(err: float, optimal: float, eps: float) -> float:
    """err / optimal; where the optimal error is below 10 eps (M of rank <= r but for rounding), 1 + the excess in
    units of eps, which is what rule eckart-young bounds (by 2) there."""
    return err / optimal if optimal > 10 * eps else 1.0 + (err - optimal) / max(eps, 1e-300)


def _wedin(eps: float, s1: float, gap: float, tail: float) -> float:
    tail_bound = 2.0 * (tail + eps)
    return min(eps * (1.0 + s1 / (gap - eps)), tail_bound) if gap > eps else tail_bound


def _excess(err: float, optimal: float, eps: float, s1: float, sr: float, sr1: float) -> float:
    """The "excess" rule's bound on ||D - [M]_r||; unbounded (inf) where s_r = s_{r+1}, when only eckart-young
    applies."""
    excess = math.sqrt(max(err * err - optimal * optimal, 0.0) + eps * eps)
    spread = math.sqrt(max(sr * sr - sr1 * sr1, 0.0))
    return excess * (1.0 + math.sqrt(2.0) * s1 / spread) if spread > 0 else math.inf


def check_truncation(
    m: np.ndarray,
    rank: int,
    ours: np.ndarray,
    theirs: np.ndarray | None = None,
    *,
    label: str,
    randomized: bool = False,
    u: float = U32,
) -> Truncation:
    """Checks gomerge's rank-`rank` result `ours` (and the reference's `theirs`, when given) for the matrix `m`
    that was truncated, with the rules of this module; raises AssertionError naming the rule and its figures.

    Args:
        m: the matrix the SVD was applied to (PEFT's, captured), any dtype; computed with in float64.
        rank: the truncation rank r.
        ours: gomerge's B'A' (rank <= r), in m's orientation.
        theirs: the reference's B'A', or None to check gomerge against the optimum only.
        label: the case and module, for messages.
        randomized: whether gomerge took its randomized SVD (kappa = RSVD_KAPPA and the "excess" rule).
        u: the unit roundoff of the arithmetic (float32's by default).
    """
    m = np.asarray(m, dtype=np.float64)
    m2 = m.reshape(m.shape[0], -1)
    s = np.linalg.svd(m2, compute_uv=False)
    s1 = float(s[0]) if s.size else 0.0
    sr = float(s[rank - 1]) if rank - 1 < s.size else 0.0
    sr1 = float(s[rank]) if rank < s.size else 0.0
    optimal = float(np.sqrt(np.sum(s[rank:] ** 2)))
    eps = backward_error(m2.shape, float(np.linalg.norm(m2)), u)
    gap = sr - sr1
    figures = f"rank {rank}, s_1 {s1:.4g}, s_r {sr:.4g}, s_r+1 {sr1:.4g}, gap/s_1 {gap / s1 if s1 else 0:.3g}"

    def near_optimal(who: str, d: np.ndarray, kappa: float) -> tuple[float, float]:
        assert d.shape == m2.shape, f"{label}: {who}'s B'A' has shape {d.shape}, the SVD's input {m2.shape}"
        err = float(np.linalg.norm(m2 - d))
        limit = (1.0 + kappa) * optimal + 2.0 * eps
        assert err <= limit, (
            f"{label}: rule eckart-young failed for {who}: ||M - D||_F = {err:.6g} > (1 + {kappa}) * optimal "
            f"{optimal:.6g} + 2 eps ({eps:.3g}); error ratio {err / optimal if optimal else math.inf:.6f}; {figures}"
        )
        return err, _ratio(err, optimal, eps)

    ours = np.asarray(ours, dtype=np.float64).reshape(m2.shape[0], -1)
    err_o, ratio_o = near_optimal("gomerge", ours, RSVD_KAPPA if randomized else 0.0)
    if theirs is None:
        return Truncation(label, rank, s1, gap, optimal, eps, ratio_o, None, None, None, "eckart-young")
    theirs = np.asarray(theirs, dtype=np.float64).reshape(m2.shape[0], -1)
    _, ratio_t = near_optimal("the reference", theirs, 0.0)
    bound_t = _wedin(eps, s1, gap, sr1)
    if randomized:
        bound_o, rule = _excess(err_o, optimal, eps, s1, sr, sr1), "excess + wedin"
    else:
        bound_o, rule = bound_t, "wedin"
    bound = bound_o + bound_t
    distance = float(np.linalg.norm(ours - theirs, 2))
    assert distance <= bound, (
        f"{label}: rule {rule} failed: ||D_gomerge - D_reference||_2 = {distance:.4g} > {bound:.4g} "
        f"(max entry difference {np.abs(ours - theirs).max():.4g}); eps {eps:.3g}, {figures}; "
        f"error ratios gomerge {ratio_o:.6f}, reference {ratio_t:.6f}"
    )
    return Truncation(label, rank, s1, gap, optimal, eps, ratio_o, ratio_t, distance, bound, rule)


# gomerge's randomized SVD (gomerge/rsvd.go): a matrix whose short side exceeds (2 q + 2)(k + oversampling) is
# sketched; shorter ones get an exact SVD.
RSVD_POWER_ITERS, RSVD_OVERSAMPLE = 2, 10


def gomerge_randomized(shape: tuple[int, ...], rank: int) -> bool:
    """Whether gomerge factors a dense m x n update at this rank with its randomized SVD (else exactly)."""
    m, n = shape[0], int(np.prod(shape[1:]))
    return min(m, n) > (2 * RSVD_POWER_ITERS + 2) * min(rank + RSVD_OVERSAMPLE, m, n)


SVD_TYPES = ("svd", "ties_svd", "dare_ties_svd", "dare_linear_svd", "magnitude_prune_svd")


class SVDCapture:
    """Records, per LoRA module, the matrix that PEFT's SVD-based merge hands to torch.linalg.svd (in the
    orientation of B @ A); use as a context manager around PEFT's add_weighted_adapter."""

    def __init__(self) -> None:
        self.inputs: dict[int, np.ndarray] = {}
        self._target = None

    def __enter__(self) -> SVDCapture:
        from peft.tuners.lora import LoraModel

        self._method = LoraModel._svd_generalized_task_arithmetic_weighted_adapter
        self._svd = torch.linalg.svd
        method, svd = self._method, self._svd

        def merge(model, combination_type, adapters, weights, new_rank, target, *args, **kwargs):
            self._target = target
            try:
                return method(model, combination_type, adapters, weights, new_rank, target, *args, **kwargs)
            finally:
                self._target = None

        def recording_svd(a, *args, **kwargs):
            if self._target is not None:
                self.inputs[id(self._target)] = a.detach().double().numpy().copy()
            return svd(a, *args, **kwargs)

        LoraModel._svd_generalized_task_arithmetic_weighted_adapter = merge
        torch.linalg.svd = recording_svd
        return self

    def __exit__(self, *exc) -> None:
        from peft.tuners.lora import LoraModel

        LoraModel._svd_generalized_task_arithmetic_weighted_adapter = self._method
        torch.linalg.svd = self._svd

    def by_module(self, model) -> dict[str, np.ndarray]:
        """The captured matrices by module path (without `base_model.model.`)."""
        return {
            name.removeprefix("base_model.model."): self.inputs[id(mod)]
            for name, mod in model.named_modules()
            if id(mod) in self.inputs
        }
