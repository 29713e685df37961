"""Numerical tolerances by dtype, in one place: tests, `verify=True` and benchmarks all read them.

A kernel output in dtype `d` is compared to a float64 reference (computed from the same inputs) with
``|actual - expected| <= atol + rtol * |expected|``. The numbers are about one to two units of the
output dtype's rounding, widened for fp32 accumulation-order differences in long reductions.
"""
from __future__ import annotations

import torch

TOLERANCES: dict[torch.dtype, tuple[float, float]] = {  # dtype -> (rtol, atol)
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    try:
        return TOLERANCES[dtype]
    except KeyError:
        raise ValueError(f"no tolerance for {dtype}; known: {sorted(map(str, TOLERANCES))}") from None


def mismatch(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
             scale: float = 1.0, magnitude: float = 1.0) -> str | None:
    """None when `actual` matches `expected` within dtype tolerance (times `scale`), else a description.

    `magnitude` scales atol to the outputs' size (when above 1): for long reductions, pass the
    reference's RMS (`rms`). An element whose value is near zero, produced by cancellation in a K-long sum, carries
    the rounding of its terms, about ``2^-9 * sqrt(K) * |x| |w|`` in bf16. That is a fixed fraction of the
    RMS of the outputs, not of the element itself. Whether a kernel rounds each weight to bf16 (tensor
    cores) or keeps it in fp32 (FMA kernels) moves such elements by several absolute ulps at K = 14336.
    NaN in `actual` where `expected` is finite is always a mismatch.
    """
    rtol, atol = tolerance(dtype or actual.dtype)
    rtol, atol = rtol * scale, atol * scale * max(1.0, float(magnitude))
    if actual.shape != expected.shape:
        return f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    # Compared where the tensors live (a GPU benchmark's outputs are large), in float64.
    a, e = actual.detach().double(), expected.detach().to(actual.device).double()
    bad_nan = torch.isnan(a) & ~torch.isnan(e)
    if bad_nan.any():
        return f"{int(bad_nan.sum())} NaN values where the reference is finite"
    err = (a - e).abs()
    limit = atol + rtol * e.abs()
    over = (err > limit) & torch.isfinite(e)
    if over.any():
        idx = int(torch.argmax((err - limit).masked_fill(~over, float("-inf"))))
        return (f"{int(over.sum())}/{err.numel()} elements beyond rtol={rtol:g} atol={atol:g}; "
                f"worst at flat index {idx}: got {a.flatten()[idx].item():.6g}, "
                f"expected {e.flatten()[idx].item():.6g}; max abs err {err.max().item():.3g}")
    return None


def rms(t: torch.Tensor) -> float:
    """Root mean square of `t` (in float64): the outputs' magnitude for `mismatch(..., magnitude=)`."""
    return float(t.detach().double().pow(2).mean().sqrt())


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 scale: float = 1.0) -> None:
    problem = mismatch(actual, expected, dtype, scale)
    assert problem is None, problem
