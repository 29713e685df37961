"""RMSNorm fused with per-token e4m3 quantization: the input of a Llama block's fp8 projections in one pass.

``rmsnorm_quant_fp8(x, weight, eps)`` computes Hugging Face's LlamaRMSNorm

    h = x.float();  h = h * rsqrt(mean(h^2, -1) + eps);  y = weight * h.to(x.dtype)

and quantizes y per row exactly as ``fp8_gemm.quantize_rows_fp8`` does (scale = max(amax(|y|), 1e-12) *
fp32(1/448), q = e4m3(clamp(y / scale, +-448)), round to nearest even), returning ``(y_fp8 [M, K] e4m3,
y_scale [M, 1] fp32)``; y itself is never written. The norm's output feeds only fp8 GEMMs in a Llama block
(q/k/v, gate/up), so one kernel replaces the norm, its bf16 round trip and one quantization per projection.

Algorithm: one program per row. If the row fits one block (K <= 16384) it is loaded once: sum of squares,
rsqrt, the weight multiply rounded to y's dtype, row amax, scale, quantize, all from registers. Longer rows
take three sweeps (sum of squares; y and amax; quantize).

Numerics, so that the fused op equals "norm, then quantize" bit for bit wherever the norm agrees: y is
rounded to ``promote(weight.dtype, x.dtype)`` before the amax, as eager torch does; the mean is sum / K on
CPU (torch's CPU mean) and sum * fp32(1/K) on CUDA (torch's CUDA mean); rsqrt is ``tl.rsqrt`` (the
hardware approximation on CUDA, as torch's CUDA rsqrt). Two things can move y by an ulp against eager
torch on random data: the summation order of mean(h^2), and rsqrt where torch's differs (on CPU torch uses
MKL's, not 1 / sqrt). Then a code can land one e4m3 step away, the same spread that separates the unfused
eager and Inductor paths; the quantization itself is the GEMM's, bit for bit. The reference
``rmsnorm_quant_fp8_ref`` runs the very ops of the unfused graph, so on the reference path fused == unfused.

Layouts: x [M, K] with any row stride and unit or any column stride, bf16/fp16/fp32; weight [K] of a float dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .host import next_power_of_2

# one rounding, one scale rule: the fused quantization is the GEMM's own (kernels may import their siblings)
from .fp8_gemm import AMAX_FLOOR, FP8_DTYPE, INV_FP8_MAX, _round_to_e4m3, quantize_rows_fp8_ref

_FLOATS = (torch.bfloat16, torch.float16, torch.float32)
_Y_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@triton.jit
def _round_to(v, Y_CODE: tl.constexpr):
    """fp32 v rounded to y's dtype (0 fp32, 1 fp16, 2 bf16), kept in fp32."""
    if Y_CODE == 1:
        v = v.to(tl.float16).to(tl.float32)
    elif Y_CODE == 2:
        v = v.to(tl.bfloat16).to(tl.float32)
    return v


@triton.jit
def _norm(x, w, rstd, X_CODE: tl.constexpr, Y_CODE: tl.constexpr):
    """y = weight * (x * rstd).to(x.dtype), rounded to y's dtype, in fp32."""
    h = _round_to(x * rstd, X_CODE)
    return _round_to(w * h, Y_CODE)


@triton.jit
def _quant(y, scale):
    # clamp before the cast: rounding can push |y / scale| a hair past 448, and e4m3fn has no inf
    return _round_to_e4m3(tl.minimum(tl.maximum(tl.div_rn(y, scale), -448.0), 448.0))


@triton.jit
def _rmsnorm_quant_kernel(x_ptr, w_ptr, q_ptr, s_ptr, K, eps, k_f, inv_k, stride_xm, stride_xk, stride_qm,
                          BLOCK_K: tl.constexpr, ONE_BLOCK: tl.constexpr, MEAN_BY_MUL: tl.constexpr,
                          X_CODE: tl.constexpr, Y_CODE: tl.constexpr, INV_FP8_MAX: tl.constexpr,
                          AMAX_FLOOR: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    offs = tl.arange(0, BLOCK_K)
    if ONE_BLOCK:
        mask = offs < K
        x = tl.load(x_row + offs * stride_xk, mask=mask, other=0.0).to(tl.float32)
        ss = tl.sum(x * x, axis=0)
    else:
        acc = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            xk = tl.load(x_row + (k + offs) * stride_xk, mask=k + offs < K, other=0.0).to(tl.float32)
            acc += xk * xk
        ss = tl.sum(acc, axis=0)
    if MEAN_BY_MUL:
        var = ss * inv_k
    else:
        var = tl.div_rn(ss, k_f)
    rstd = tl.rsqrt(var + eps)
    if ONE_BLOCK:
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = _norm(x, w, rstd, X_CODE, Y_CODE)
        amax = tl.max(tl.abs(y), axis=0)
        scale = tl.maximum(amax, AMAX_FLOOR) * INV_FP8_MAX
        tl.store(q_row + offs, _quant(y, scale).to(q_ptr.dtype.element_ty), mask=mask)
    else:
        m = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            mk = k + offs < K
            xk = tl.load(x_row + (k + offs) * stride_xk, mask=mk, other=0.0).to(tl.float32)
            wk = tl.load(w_ptr + k + offs, mask=mk, other=0.0).to(tl.float32)
            m = tl.maximum(m, tl.abs(_norm(xk, wk, rstd, X_CODE, Y_CODE)))
        amax = tl.max(m, axis=0)
        scale = tl.maximum(amax, AMAX_FLOOR) * INV_FP8_MAX
        for k in range(0, K, BLOCK_K):
            mk = k + offs < K
            xk = tl.load(x_row + (k + offs) * stride_xk, mask=mk, other=0.0).to(tl.float32)
            wk = tl.load(w_ptr + k + offs, mask=mk, other=0.0).to(tl.float32)
            y = _norm(xk, wk, rstd, X_CODE, Y_CODE)
            tl.store(q_row + k + offs, _quant(y, scale).to(q_ptr.dtype.element_ty), mask=mk)
    tl.store(s_ptr + row, scale)


def select_config(M: int, K: int) -> dict:
    """One row per program; the block covers the whole row up to 16384 (Llama hidden sizes 2048-8192 load
    once), with enough warps that each thread holds <= 16-32 values (no spills at K = 8192)."""
    block = min(next_power_of_2(max(K, 16)), 16384)
    warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
    return {"BLOCK_K": block, "num_warps": warps}


def norm_dtype(x_dtype: torch.dtype, w_dtype: torch.dtype) -> torch.dtype:
    """The dtype of `weight * h.to(x.dtype)` in eager torch."""
    return torch.promote_types(w_dtype, x_dtype)


def rmsnorm_quant_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float, config: Optional[dict] = None,
                      out: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [M, K] e4m3, scale [M, 1] fp32) = per-row e4m3 quantization of RMSNorm(x) * weight (see module doc).

    `out`, when given, is a (q, scale) pair to write into."""
    who = "rmsnorm_quant_fp8"
    if x.dim() != 2:
        raise ValueError(f"{who}: x must be 2-D [M, K], got shape {tuple(x.shape)}")
    M, K = x.shape
    if x.dtype not in _FLOATS or weight.dtype not in _FLOATS:
        raise ValueError(f"{who}: x and weight must be bf16/fp16/fp32, got {x.dtype} and {weight.dtype}")
    if weight.shape != (K,):
        raise ValueError(f"{who}: weight must be [{K}], got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"{who}: x on {x.device} but weight on {weight.device}")
    if out is None:
        q = torch.empty((M, K), device=x.device, dtype=FP8_DTYPE)
        s = torch.empty((M, 1), device=x.device, dtype=torch.float32)
    else:
        q, s = out
        if q.shape != (M, K) or q.dtype != FP8_DTYPE or s.shape != (M, 1) or s.dtype != torch.float32 or \
                q.device != x.device or s.device != x.device or q.stride(1) != 1 or not s.is_contiguous():
            raise ValueError(f"{who}: out must be (e4m3 [{M}, {K}] with unit column stride, contiguous fp32 "
                             f"[{M}, 1]) on {x.device}")
    if M == 0:
        return q, s
    if K == 0:  # an empty row has amax 0: the floor scale, nothing to quantize
        s.fill_(AMAX_FLOOR * INV_FP8_MAX)
        return q, s
    cfg = dict(config) if config is not None else select_config(M, K)
    block = cfg["BLOCK_K"]
    weight = weight.contiguous()
    _rmsnorm_quant_kernel[(M,)](
        x, weight, q, s, K, float(eps), float(K), float(torch.tensor(1.0 / K, dtype=torch.float32)),
        x.stride(0), x.stride(1), q.stride(0),
        BLOCK_K=block, ONE_BLOCK=block >= K, MEAN_BY_MUL=x.is_cuda,
        X_CODE=_Y_CODE[x.dtype], Y_CODE=_Y_CODE[norm_dtype(x.dtype, weight.dtype)],
        INV_FP8_MAX=INV_FP8_MAX, AMAX_FLOOR=AMAX_FLOOR, num_warps=cfg["num_warps"])
    return q, s


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's LlamaRMSNorm.forward, op for op (the pattern the fp8 pass recognises)."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype)


def rmsnorm_quant_fp8_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm then per-row quantization in plain torch, the very ops of the unfused graph (so bit-identical
    to it on the same device). x may have leading dims; q keeps x's shape, the scale is [M, 1]."""
    q, s = quantize_rows_fp8_ref(rmsnorm_ref(x, weight, eps))
    return q, s.reshape(-1, 1)
