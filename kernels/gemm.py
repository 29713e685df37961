"""GEMM with a fused epilogue: y = act(x @ w.T + bias), or the SwiGLU gate silu(x @ w.T) * (x @ w_up.T).

Algorithm (the Triton matmul tutorial, plus an epilogue and an optional second weight):
  - each program owns a BLOCK_M x BLOCK_N output tile; programs are numbered in GROUP_M-tall column
    groups so that neighbouring programs share x rows and w columns in L2;
  - it walks K in BLOCK_K steps, loading one x tile and one w tile (two w tiles for "swiglu", which
    share that x tile) and accumulating with tl.dot in fp32 (IEEE fp32 dot for fp32 inputs);
  - the epilogue adds the bias, applies the activation in fp32 and rounds once to x's dtype;
  - decode shapes (few rows, a long K) split K over SPLIT_K programs that write fp32 partial tiles,
    and a second small kernel sums the partials and applies the same epilogue.

Layouts: x [M, K] with any strides (a row-strided view of a wider buffer is fine); w and w_up [N, K]
(nn.Linear layout) with any strides, e.g. a transposed [K, N] buffer's .T; bias [N]; out [M, N] with
any strides. fp16, bf16 and fp32; x, w and w_up share one dtype and the output has it too.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .tile_order import tile_coords

ACTIVATIONS = ("none", "silu", "gelu", "gelu_tanh", "swiglu")
_ACT_CODE = {name: i for i, name in enumerate(ACTIVATIONS)}
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "SPLIT_K", "num_warps", "num_stages")


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _activation(g, u, ACT: tl.constexpr):
    """The epilogue on fp32 values; `u` is only read for swiglu (ACT == 4)."""
    if ACT == 1:  # silu
        g = g / (1.0 + tl.exp(-g))
    elif ACT == 2:  # gelu, erf form (F.gelu's default)
        g = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    elif ACT == 3:  # gelu, tanh form; tanh(z) = 1 - 2 / (1 + exp(2z)) saturates cleanly at +-inf
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        g = 0.5 * g * (2.0 - 2.0 / (1.0 + tl.exp(2.0 * z)))
    elif ACT == 4:  # swiglu: silu(gate) * up
        g = g / (1.0 + tl.exp(-g)) * u
    return g


@triton.jit
def _gemm_kernel(
    x_ptr, w_ptr, wu_ptr, b_ptr, y_ptr, part_ptr,
    M, N, K, K_PER_SPLIT,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_un, stride_uk, stride_ym, stride_yn,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    SWIGLU: tl.constexpr = ACT == 4
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = tile_coords(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows past M / columns past N wrap onto valid ones: loads need no M/N mask, the store masks them.
    rm = (offs_m % M).to(tl.int64)
    rn = (offs_n % N).to(tl.int64)
    k_start = pid_k * K_PER_SPLIT
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rm[:, None] * stride_xm + (k_start + offs_k)[None, :] * stride_xk
    w_ptrs = w_ptr + rn[None, :] * stride_wn + (k_start + offs_k)[:, None] * stride_wk  # [BLOCK_K, BLOCK_N]
    if SWIGLU:
        u_ptrs = wu_ptr + rn[None, :] * stride_un + (k_start + offs_k)[:, None] * stride_uk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(0, tl.cdiv(K_PER_SPLIT, BLOCK_K)):
        if EVEN_K:
            xt = tl.load(x_ptrs)
            wt = tl.load(w_ptrs)
        else:
            k_left = tl.minimum(K - k_start, K_PER_SPLIT) - kt * BLOCK_K
            xt = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            wt = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if IEEE:
            acc = tl.dot(xt, wt, acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, wt, acc)
        if SWIGLU:
            if EVEN_K:
                ut = tl.load(u_ptrs)
            else:
                ut = tl.load(u_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            if IEEE:
                acc_u = tl.dot(xt, ut, acc_u, input_precision="ieee")
            else:
                acc_u = tl.dot(xt, ut, acc_u)
            u_ptrs += BLOCK_K * stride_uk
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn).to(tl.float32)[None, :]
        out = _activation(acc, acc_u, ACT)
        y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :].to(tl.int64) * stride_yn
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        # fp32 partials, laid out [2 (gate, up), SPLIT_K, M, N] contiguous; the reduce kernel finishes.
        p_ptrs = part_ptr + (pid_k * M + offs_m[:, None]).to(tl.int64) * N + offs_n[None, :]
        tl.store(p_ptrs, acc, mask=mask)
        if SWIGLU:
            tl.store(p_ptrs + SPLIT_K * M * N, acc_u, mask=mask)


@triton.jit
def _split_k_reduce_kernel(
    part_ptr, b_ptr, y_ptr, M, N, stride_ym, stride_yn,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    m = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for s in range(SPLIT_K):
        p = part_ptr + (s * M + m).to(tl.int64) * N + offs_n
        acc += tl.load(p, mask=nmask, other=0.0)
        if ACT == 4:
            acc_u += tl.load(p + SPLIT_K * M * N, mask=nmask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)
    out = _activation(acc, acc_u, ACT)
    tl.store(y_ptr + m.to(tl.int64) * stride_ym + offs_n.to(tl.int64) * stride_yn,
             out.to(y_ptr.dtype.element_ty), mask=nmask)


# --------------------------------------------------------------------------------------------------
# Configs: the one shape -> config table of this family
# --------------------------------------------------------------------------------------------------
_SMS = 132  # H100 SXM; split-K aims to give every SM at least one program.
# Shared memory one program may take for its pipeline buffers (bytes) so that two programs fit an SM
# (228 KB per SM on Hopper, 1 KB reserved per program); decode kernels want two resident programs.
_SMEM_TWO_PER_SM = 110 * 1024


def _cfg(bm, bn, bk, warps, stages, group=8, split=1) -> dict:
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group, "SPLIT_K": split,
            "num_warps": warps, "num_stages": stages}


def _stages(bm: int, bn: int, bk: int, weights: int, elem: int, budget: int, most: int = 5) -> int:
    """Deepest pipeline within `budget` bytes: Triton keeps num_stages - 1 buffers of one x tile and
    `weights` w tiles (seen in sm_90 compiles: 16x64x128 swiglu, 5 stages = 144 KB)."""
    per_stage = (bm * bk + weights * bk * bn) * elem
    return max(2, min(most, 1 + budget // per_stage))


def _split_k(M: int, N: int, K: int, bm: int, bn: int, bk: int) -> int:
    """K splits so that the grid fills the SMs about twice (two resident programs each), while every
    split keeps >= 8 K tiles; 1 when the output tiles alone already cover the SMs."""
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    return max(1, min(16, (2 * _SMS) // tiles, K // (8 * bk)))


def select_config(M: int, N: int, K: int, activation: str = "none", dtype: torch.dtype = torch.bfloat16) -> dict:
    """The config table, by M bucket (the scenario of kernopt.workload.classify, read off the row count).

    | M (rows) | scenario                  | tile M x N x K, warps, stages (bf16/fp16)        | why                            |
    |----------|---------------------------|--------------------------------------------------|--------------------------------|
    | <= 16    | single-stream/interactive | 16 x 64 x 128, 4 warps, stages to fit 2 programs | weight-bandwidth bound (GEMV): |
    |          |                           | per SM (5 plain, 4 swiglu); split-K up to ~2     | deep pipeline, every SM busy   |
    |          |                           | programs per SM (down proj N=4096: 4 splits)     |                                |
    | 17 - 64  | interactive/server        | 64 x 64 x 128, 4 warps, 4 stages (swiglu 3)      | still bandwidth bound, wgmma   |
    | 65 - 256 | server                    | 64 x 128 x 64 (swiglu 64 x 64), 4 warps, 4 stages| balanced, 2 programs per SM    |
    | > 256    | server/offline            | 128 x 256 x 64, 8 warps, 3 stages, GROUP_M 8;    | tensor-core bound: big wgmma   |
    |          |                           | with any epilogue 128 x 128 x 64, 4 stages       | tiles, grouped order for L2    |

    swiglu keeps two accumulators and loads two weight tiles, hence its narrower N tile and shallower
    decode pipeline; at M > 256 gelu's erf on a 128 x 256 tile spills registers, so every epilogue but
    "none" takes 128 x 128 there. fp32 (IEEE FMA, no tensor cores) uses BLOCK_K 32-64 and at most 128 x 128 tiles.
    Register/shared-memory facts behind the table come from compiling each entry for sm_90 offline
    (no spills; smem <= 192 KB); the speeds are to be confirmed by examples/bench_gemm.py --tune.
    """
    swiglu = activation == "swiglu"
    nw = 2 if swiglu else 1
    if dtype == torch.float32:
        if M <= 16:
            return _cfg(16, 64, 64, 4, _stages(16, 64, 64, nw, 4, _SMEM_TWO_PER_SM), group=1,
                        split=_split_k(M, N, K, 16, 64, 64))
        if M <= 64:
            return _cfg(64, 64, 16, 4, 3)
        return _cfg(128, 64 if swiglu else 128, 32, 8, 3)
    if M <= 16:
        return _cfg(16, 64, 128, 4, _stages(16, 64, 128, nw, 2, _SMEM_TWO_PER_SM), group=1,
                    split=_split_k(M, N, K, 16, 64, 128))
    if M <= 64:
        return _cfg(64, 64, 128, 4, 3 if swiglu else 4)
    if M <= 256:
        return _cfg(64, 64 if swiglu else 128, 64, 4, 4)
    if activation == "none":
        return _cfg(128, 256, 64, 8, 3)
    # Two accumulators (swiglu), or erf/exp epilogues on a 128 x 256 tile, spill registers at 8 warps.
    return _cfg(128, 128, 64, 8, 4)


def candidate_configs(M: int, N: int, K: int, activation: str = "none") -> list[dict]:
    """A short list around the table's choice, for kernopt.workload.autotune (bf16/fp16 sizes).

    Every entry compiles for sm_90 without register spills and within the 227 KB shared-memory limit.
    """
    swiglu = activation == "swiglu"
    nw = 2 if swiglu else 1
    if M <= 16:
        two, big = _SMEM_TWO_PER_SM, 200 * 1024  # two programs per SM, or one deeper-pipelined one
        tiles = ((32, 128, two), (64, 128, two), (64, 128, big), (32, 256, two)) if swiglu else \
                ((32, 128, two), (64, 128, two), (64, 128, big), (64, 256, two), (128, 128, two))
        out = []
        for bn, bk, budget in tiles:
            for split in sorted({1, _split_k(M, N, K, 16, bn, bk)}):
                out.append(_cfg(16, bn, bk, 4, _stages(16, bn, bk, nw, 2, budget), group=1, split=split))
        return out
    if M <= 64:
        if swiglu:
            return [_cfg(64, 64, 128, 4, 3), _cfg(64, 64, 64, 4, 4), _cfg(32, 64, 128, 4, 4),
                    _cfg(64, 128, 64, 4, 3), _cfg(64, 128, 64, 4, 4)]
        out = [_cfg(64, 64, 128, 4, 4), _cfg(32, 64, 128, 4, 4), _cfg(64, 128, 64, 4, 4),
               _cfg(64, 128, 128, 4, 3), _cfg(64, 256, 64, 4, 3)]
        if activation != "none":  # erf/exp epilogues spill above 64 fp32 outputs per thread
            out = [c for c in out if c["BLOCK_M"] * c["BLOCK_N"] <= 64 * 32 * c["num_warps"]]
        return out
    if M <= 256:
        if swiglu:
            return [_cfg(64, 64, 64, 4, 4), _cfg(64, 64, 128, 4, 3), _cfg(128, 64, 64, 4, 4),
                    _cfg(128, 128, 64, 8, 3), _cfg(64, 128, 64, 4, 4)]
        out = [_cfg(64, 128, 64, 4, 4), _cfg(64, 64, 64, 4, 4), _cfg(128, 64, 64, 4, 4),
               _cfg(128, 128, 64, 8, 3), _cfg(128, 128, 64, 4, 4), _cfg(64, 256, 64, 4, 3)]
        if activation != "none":  # erf/exp epilogues spill above 64 fp32 outputs per thread
            out = [c for c in out if c["BLOCK_M"] * c["BLOCK_N"] <= 64 * 32 * c["num_warps"]]
        return out
    if swiglu:  # two accumulators: 128 x 256 (or 128 x 128 on 4 warps) spills
        return [_cfg(128, 128, 64, 8, 4), _cfg(128, 128, 64, 8, 3), _cfg(128, 64, 64, 4, 4),
                _cfg(64, 128, 64, 4, 4), _cfg(128, 128, 32, 8, 5)]
    if activation != "none":  # an erf/exp epilogue on more than 128 x 128 outputs per 8 warps spills
        return [_cfg(128, 128, 64, 8, 4), _cfg(128, 128, 64, 8, 3), _cfg(128, 64, 64, 4, 4),
                _cfg(64, 128, 64, 4, 4), _cfg(128, 128, 32, 8, 5)]
    return [_cfg(128, 256, 64, 8, 3), _cfg(128, 128, 64, 8, 4), _cfg(256, 128, 64, 8, 3),
            _cfg(128, 128, 64, 4, 4), _cfg(128, 64, 64, 4, 4), _cfg(64, 256, 64, 4, 3)]


def format_config(cfg: dict) -> str:
    """One line for explain() and benchmark rows."""
    return (f"BLOCK_M={cfg['BLOCK_M']} BLOCK_N={cfg['BLOCK_N']} BLOCK_K={cfg['BLOCK_K']} "
            f"GROUP_M={cfg.get('GROUP_M', 1)} SPLIT_K={cfg.get('SPLIT_K', 1)} "
            f"warps={cfg['num_warps']} stages={cfg['num_stages']}")


# --------------------------------------------------------------------------------------------------
# Crossover: where the Triton kernel is expected to beat cuBLAS (+ Inductor's fused epilogue)
# --------------------------------------------------------------------------------------------------
# The pass rewrites a linear (+ activation) only when prefer_triton() returns None; otherwise it keeps
# aten.mm/addmm (cuBLAS; addmm fuses the bias) and lets Inductor fuse the activation into one pointwise
# kernel. The baseline costs one extra read+write of the [M, N] output per unfused op (for swiglu:
# gate and up written, read back, product written) and one launch per op.
#
# | activation         | M range      | pick    | basis                                                      |
# |--------------------|--------------|---------|------------------------------------------------------------|
# | swiglu             | <= 16        | Triton  | measured H100: 95.4 vs 101.4 us (M=1), 95.5 vs 102.0 (M=16) at K=4096 N=14336 |
# | swiglu             | > 16         | cuBLAS  | measured H100: 157.7 vs 119.0 us (M=256), 1468 vs 1369 (M=4096) |
# | silu/gelu/gelu_tanh| <= 16        | Triton  | same kernel and epilogue cost as swiglu's, half the weights (not measured separately) |
# | silu/gelu/gelu_tanh| > 16         | cuBLAS  | as swiglu above                                            |
# | none (+bias)       | any          | cuBLAS  | measured H100: 0.24-0.92x of cuBLAS at every M for qkv/down shapes |
# | any, fp32 input    | any          | cuBLAS  | our fp32 path is IEEE (exact), cuBLAS' SGEMM is faster     |
#
# Measured with examples/bench_gemm.py on an H100 (benchmarks/results/gemm-h100.json).
_TRITON_MAX_M = {"swiglu": 16, "silu": 16, "gelu": 16, "gelu_tanh": 16}


def prefer_triton(M: int, N: int, K: int, activation: str = "none", dtype: torch.dtype = torch.bfloat16
                  ) -> Optional[str]:
    """None when the Triton kernel is expected to be faster here, else why cuBLAS (+Inductor) is kept."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(map(repr, ACTIVATIONS))}")
    if dtype == torch.float32:
        return "fp32 input: cuBLAS SGEMM is faster than the IEEE-fp32 Triton path"
    if activation == "none":
        return f"M={M} K={K} N={N} plain GEMM: nothing to fuse; cuBLAS measured faster at every M (gemm-h100.json)"
    limit = _TRITON_MAX_M[activation]
    if M > limit:
        return (f"M={M} K={K} N={N} {activation}: above M={limit} cuBLAS + Inductor's epilogue measured "
                f"faster (gemm-h100.json)")
    return None


# --------------------------------------------------------------------------------------------------
# Launcher and reference
# --------------------------------------------------------------------------------------------------
def _check_config(config: dict) -> dict:
    missing = [k for k in CONFIG_KEYS if k not in config and k not in ("GROUP_M", "SPLIT_K")]
    unknown = [k for k in config if k not in CONFIG_KEYS]
    if missing or unknown:
        raise ValueError(f"gemm config {config}: missing {missing}, unknown {unknown}; keys are {CONFIG_KEYS}")
    cfg = {"GROUP_M": 1, "SPLIT_K": 1, **config}
    for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        v = cfg[k]
        if v < 16 or v & (v - 1):
            raise ValueError(f"gemm config {k}={v}: must be a power of two >= 16 (tl.dot's minimum)")
    if cfg["GROUP_M"] < 1 or cfg["SPLIT_K"] < 1:
        raise ValueError(f"gemm config: GROUP_M and SPLIT_K must be >= 1, got {cfg}")
    return cfg


def _check_inputs(x, w, bias, w_up, activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(map(repr, ACTIVATIONS))}")
    if x.dim() != 2 or w.dim() != 2:
        raise ValueError(f"gemm expects x [M, K] and w [N, K]; got x {tuple(x.shape)}, w {tuple(w.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"gemm: x dtype {x.dtype} not supported; valid: {', '.join(map(str, DTYPES))}")
    if w.dtype != x.dtype:
        raise ValueError(f"gemm: w dtype {w.dtype} differs from x dtype {x.dtype}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"gemm: K mismatch, x {tuple(x.shape)} vs w {tuple(w.shape)} (w is [N, K])")
    if w.device != x.device:
        raise ValueError(f"gemm: x on {x.device}, w on {w.device}")
    N = w.shape[0]
    if activation == "swiglu":
        if w_up is None:
            raise ValueError("gemm: activation='swiglu' needs w_up [N, K] (silu(x @ w.T) * (x @ w_up.T))")
        if w_up.shape != w.shape or w_up.dtype != w.dtype or w_up.device != w.device:
            raise ValueError(f"gemm: w_up {tuple(w_up.shape)} {w_up.dtype} {w_up.device} must match "
                             f"w {tuple(w.shape)} {w.dtype} {w.device}")
        if bias is not None:
            raise ValueError("gemm: bias with activation='swiglu' is ambiguous (gate or up?); not supported")
    elif w_up is not None:
        raise ValueError(f"gemm: w_up is only used with activation='swiglu', got activation={activation!r}")
    if bias is not None:
        if bias.shape != (N,) or bias.device != x.device or not bias.dtype.is_floating_point:
            raise ValueError(f"gemm: bias must be a float [N]={N} tensor on {x.device}, got "
                             f"{tuple(bias.shape)} {bias.dtype} {bias.device}")


def gemm(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None, w_up: Optional[torch.Tensor] = None,
         activation: str = "none", config: Optional[dict] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = act(x @ w.T + bias) (or silu(x @ w.T) * (x @ w_up.T) for "swiglu") in one kernel, fp32 accumulation."""
    _check_inputs(x, w, bias, w_up, activation)
    M, K = x.shape
    N = w.shape[0]
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    elif out.shape != (M, N) or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"gemm: out must be [{M}, {N}] {x.dtype} on {x.device}, got "
                         f"{tuple(out.shape)} {out.dtype} {out.device}")
    if M == 0 or N == 0:
        return out
    cfg = _check_config(config if config is not None else select_config(M, N, K, activation, x.dtype))
    bm, bn, bk, split = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["SPLIT_K"]
    # Each split covers a whole number of K tiles; trailing splits may be empty (they write zeros).
    k_per_split = triton.cdiv(triton.cdiv(max(K, 1), split), bk) * bk if split > 1 else K
    even_k = K % bk == 0 and (split == 1 or k_per_split * split == K)
    act = _ACT_CODE[activation]
    swiglu = activation == "swiglu"
    wu = w_up if swiglu else w
    part = (torch.empty((2 if swiglu else 1, split, M, N), dtype=torch.float32, device=x.device)
            if split > 1 else out)
    b = bias if bias is not None else out  # never read when HAS_BIAS is False
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn), split)
    _gemm_kernel[grid](
        x, w, wu, b, out, part, M, N, K, k_per_split,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), wu.stride(0), wu.stride(1),
        out.stride(0), out.stride(1),
        ACT=act, HAS_BIAS=bias is not None, EVEN_K=even_k, IEEE=x.dtype == torch.float32,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"], SPLIT_K=split,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if split > 1:
        rbn = min(1024, triton.next_power_of_2(N))
        _split_k_reduce_kernel[(M, triton.cdiv(N, rbn))](
            part, b, out, M, N, out.stride(0), out.stride(1),
            ACT=act, HAS_BIAS=bias is not None, SPLIT_K=split, BLOCK_N=rbn, num_warps=4,
        )
    return out


def gemm_ref(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None,
             w_up: Optional[torch.Tensor] = None, activation: str = "none") -> torch.Tensor:
    """Plain torch, in the input dtype: what eager runs and the pattern the pass recognises."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(map(repr, ACTIVATIONS))}")
    y = F.linear(x, w, bias)
    if activation == "none":
        return y
    if activation == "silu":
        return F.silu(y)
    if activation == "gelu":
        return F.gelu(y)
    if activation == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if w_up is None:
        raise ValueError("gemm_ref: activation='swiglu' needs w_up [N, K]")
    return F.silu(y) * F.linear(x, w_up)
