"""Tolerances from the arithmetic, for comparisons that must hold on any CPU.

Two computations of one quantity that differ only in rounding (another kernel, another
summation order: torch blocks a sum differently under AVX-512, AVX2 and its scalar
``ATEN_CPU_CAPABILITY=default`` kernels) differ by a few units of the dtype's ``eps`` times
the magnitude of what was summed, not of the result. So a tolerance here is

    SAFETY * eps(dtype) * (growth with the size n of the sum) * (magnitude of the terms),

and a vector (a gradient) is compared against its largest element (or the scale of the
terms that cancelled into it), never element by element near zero, where an element that
happens to be 1e-13 has no relative precision at all.

``pytest.approx`` / ``np.allclose`` defaults (relative 1e-6 / 1e-5) are kept, without a helper,
only for float64 arithmetic of a handful of terms on exact or literal inputs (means and
standard deviations of a few numbers in the analysis tests, ratios of exact counts): 1e-6 is
~4e9 float64 eps there. Float32 values, sums over many terms and softmaxes use the helpers here.
"""

from __future__ import annotations

import math

import torch

# Headroom over the typical rounding error (sqrt(n) eps): the worst case of a sum of n terms
# is n eps, and the measured errors of the tests sit 10-1000x under these bounds on AVX-512,
# AVX2 and the scalar kernels alike (issue 28).
SAFETY = 16.0


def eps(dtype: torch.dtype) -> float:
    """The dtype's machine epsilon: 1.19e-7 for float32, 2.22e-16 for float64."""
    return torch.finfo(dtype).eps


def sum_tol(dtype: torch.dtype, n: int, scale: float = 1.0) -> float:
    """Absolute difference allowed between two orders of one sum of n terms of magnitude up to
    ``scale`` relative to the result (1 when the terms are of the result's size):
    SAFETY * eps * sqrt(n) * scale."""
    return SAFETY * eps(dtype) * math.sqrt(max(n, 1)) * scale


def softmax_tol(dtype: torch.dtype, max_logit: float, num_codes: int) -> float:
    """Relative error of entropies (and their gradients) of a softmax over ``num_codes`` codes
    from logits of magnitude up to ``max_logit``: each logit (and so each log-probability) is
    rounded to eps * |logit| absolute, i.e. each probability to that relative, and the
    normaliser sums num_codes terms: SAFETY * eps * (1 + max_logit + sqrt(num_codes))."""
    return SAFETY * eps(dtype) * (1.0 + abs(max_logit) + math.sqrt(num_codes))


def assert_close_rel_max(actual: torch.Tensor, expected: torch.Tensor, rel: float, *,
                         floor: float = 0.0, what: str = "") -> None:
    """max |actual - expected| <= rel * max(max |expected|, floor).

    ``floor`` is the magnitude of the terms that cancelled into ``expected`` where that can be
    much larger than the result (a gradient near a maximum of the entropy is ~0 while its
    terms are not), so rounding of those terms does not read as a relative error of 1."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double(), expected.detach().double()
    assert bool(torch.isfinite(a).all() and torch.isfinite(e).all()), f"{what}: non-finite values"
    err = (a - e).abs().max().item() if a.numel() else 0.0
    largest = e.abs().max().item() if e.numel() else 0.0
    bound = rel * max(largest, floor)
    assert err <= bound, (f"{what}: max |difference| {err:.3e} > {bound:.3e} = {rel:.2e} x "
                          f"max(largest |expected| {largest:.3e}, floor {floor:.3e})")
