"""Operands and checks shared by the int4 kernel tests (test_int4_wgmma.py, test_int4_ldmma.py): random weights in
kernopt's storage, the float64 reference, a launch into a NaN-poisoned output, and the extreme-codes GPU check."""
import torch

from kernopt.kernels.int4_gemm import int4_gemm, int4_gemm_ref
from kernopt.tolerance import assert_close, mismatch, rms


def weights(N, K, g, asym, device, dtype=torch.bfloat16):
    """Random words (N-contiguous), scales and (asym) integer zero points of an [N, K] weight, groups of g."""
    qweight = torch.randint(-2**31, 2**31 - 1, (K // 8, N), dtype=torch.int32, device=device).t()
    scales = (torch.rand(K // g, N, device=device) * 0.02 + 0.005).to(dtype).t()
    zeros = torch.randint(0, 16, (K // g, N), device=device).to(dtype).t() if asym else None
    return qweight, scales, zeros


def expected(x, qweight, scales, zeros, g, bias):
    return int4_gemm_ref(x.double(), qweight, scales, zeros, g, None if bias is None else bias.double())


def run(x, qweight, scales, zeros, g, cfg, bias):
    out = torch.full((x.shape[0], qweight.shape[0]), float("nan"), dtype=x.dtype, device=x.device)
    assert int4_gemm(x, qweight, scales, zeros, g, bias=bias, config=cfg, out=out) is out
    return out


def check_extreme_codes_fractional_zeros_strided_x(cfg, asym, graph_replays, rows=16):
    """Words of distinct / extreme codes (each nibble must meet its own x), fractional zero points, |x| ~ 1e3, a
    strided x (copied by the launcher), and `rows` rows under CUDA-graph replay; N = 128, K = 512, group 128."""
    dtype, g, N, K = torch.bfloat16, 128, 128, 512
    _, s, _ = weights(N, K, g, False, "cuda", dtype)
    z = (torch.rand(N, K // g, device="cuda") * 15).to(dtype) if asym else None
    for word in (0x0F0F0F0F, -0x0F0F0F10, 0x76543210, -0x01234568):
        qw = torch.full((K // 8, N), word, dtype=torch.int32, device="cuda").t()
        x = torch.randn(4, K, dtype=dtype, device="cuda") * 1e3
        want = expected(x, qw, s, z, g, None)
        # (q - z) is rounded to bf16 once (fractional z), as the reference rounds (q - z) s: an error proportional
        # to the outputs' RMS, not to each (possibly cancelled) output: atol by the RMS (as the PAIRS test)
        problem = mismatch(run(x, qw, s, z, g, cfg, None), want, dtype, scale=2.0, magnitude=rms(want))
        assert problem is None, f"word {word:#x}: {problem}"
    qweight, scales, zeros = weights(N, K, g, asym, "cuda", dtype)
    xs = torch.randn(3, 2 * K, dtype=dtype, device="cuda")[:, ::2]
    assert_close(run(xs, qweight, scales, zeros, g, cfg, None), expected(xs, qweight, scales, zeros, g, None),
                 dtype, scale=2.0)
    x = torch.randn(rows, K, dtype=dtype, device="cuda")
    out = torch.empty(rows, N, dtype=dtype, device="cuda")
    graph_replays(lambda: int4_gemm(x, qweight, scales, zeros, g, config=cfg, out=out), x, out,
                  lambda o: assert_close(o, expected(x, qweight, scales, zeros, g, None), dtype, scale=2.0))
