"""The custom-op seam: every kernel reaches an FX graph only as a `torch.ops.kernopt.*` op.

Each op has a fake (meta) implementation, so Dynamo, Inductor and CUDA graphs treat it as an opaque,
correctly-shaped call. Its real implementation picks one of three ways to run, per call:

- ``triton``: the Triton kernel on a CUDA tensor;
- ``interpreter``: the same Triton kernel under Triton's interpreter on a CPU tensor (tests set
  ``TRITON_INTERPRET=1``; bf16 is excluded there because the interpreter computes it wrongly);
- ``reference``: the plain-PyTorch reference, which is also the pattern the passes recognise.

`implementation(t)` says which one a tensor gets; explain() prints it.
"""
from __future__ import annotations

import functools
import importlib
import os
from typing import Optional

import torch
from torch import Tensor

from kernopt import workload

_KERNEL_PACKAGE = "kernopt.kernels"


@functools.lru_cache(maxsize=None)
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # triton is Linux-only; a broken install is as good as none
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("KERNOPT_CPU", "") != "reference"


def implementation(t: Tensor) -> str:
    """How an op on tensors like ``t`` runs here: "triton", "interpreter" or "reference"."""
    if not _triton_available():
        return "reference"
    if t.is_cuda:
        return "triton"
    if t.device.type == "cpu" and _interpreting() and t.dtype != torch.bfloat16:
        return "interpreter"
    return "reference"


def kernel_module(name: str):
    return importlib.import_module(f"{_KERNEL_PACKAGE}.{name}")


def _run(module: str, launcher: str, like: Tensor, *args, **kwargs):
    mod = kernel_module(module)
    if implementation(like) == "reference":
        return getattr(mod, launcher + "_ref")(*args, **kwargs)
    return getattr(mod, launcher)(*args, **kwargs)


# --------------------------------------------------------------------------------------------------
# GEMM with fused epilogues: y = act(x @ w.T + bias), or silu(x @ w.T) * (x @ w_up.T) for "swiglu".
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("kernopt::linear", mutates_args=())
def linear(x: Tensor, w: Tensor, bias: Optional[Tensor], w_up: Optional[Tensor], activation: str) -> Tensor:
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    gemm = kernel_module("gemm")
    impl = implementation(x)
    # A graph compiled for a dynamic M decides per call: where the shape table says cuBLAS wins, use it.
    if impl == "reference" or (impl == "triton" and gemm.prefer_triton(x2.shape[0], w.shape[0], x2.shape[1],
                                                                       activation, x.dtype)):
        out = gemm.gemm_ref(x2, w, bias=bias, w_up=w_up, activation=activation)
    else:
        m, n, k = x2.shape[0], w.shape[0], x2.shape[1]
        run = lambda cfg: gemm.gemm(x2, w, bias=bias, w_up=w_up, activation=activation, config=cfg)  # noqa: E731
        config = workload.config_for("gemm", workload.gemm_bucket(m, n, k, activation, x.dtype),
                                     lambda: gemm.candidate_configs(m, n, k, activation), run)
        out = run(config)
    return out.reshape(*lead, w.shape[0])


@linear.register_fake
def _(x, w, bias, w_up, activation):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


# --------------------------------------------------------------------------------------------------
# Attention. q [B, Hq, Sq, D], k/v [B, Hkv, Skv, D]; Hq % Hkv == 0 (GQA by index, never by repeat).
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("kernopt::flash_attention", mutates_args=())
def flash_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], causal: bool, scale: float) -> Tensor:
    return _run("flash_attention", "flash_attention", q, q, k, v, mask=mask, causal=causal, sm_scale=scale)


@flash_attention.register_fake
def _(q, k, v, mask, causal, scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@torch.library.custom_op("kernopt::decode_attention", mutates_args=())
def decode_attention(q: Tensor, k: Tensor, v: Tensor, kv_lens: Optional[Tensor], scale: float,
                     mask: Optional[Tensor] = None) -> Tensor:
    return _run("decode_attention", "decode_attention", q, q, k, v, kv_lens=kv_lens, sm_scale=scale, mask=mask)


@decode_attention.register_fake
def _(q, k, v, kv_lens, scale, mask=None):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@torch.library.custom_op("kernopt::paged_decode_attention", mutates_args=())
def paged_decode_attention(
    q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor, seq_lens: Tensor, scale: float
) -> Tensor:
    return _run("decode_attention", "paged_decode_attention", q, q, k_pages, v_pages, block_table, seq_lens,
                sm_scale=scale)


@paged_decode_attention.register_fake
def _(q, k_pages, v_pages, block_table, seq_lens, scale):
    return q.new_empty((*q.shape[:-1], v_pages.shape[-1]))


# --------------------------------------------------------------------------------------------------
# Quantized-weight matmuls.
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("kernopt::int4_linear", mutates_args=())
def int4_linear(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], group_size: int,
                bias: Optional[Tensor]) -> Tensor:
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    mod = kernel_module("int4_gemm")
    if implementation(x) == "reference":
        out = mod.int4_gemm_ref(x2, qweight, scales, zeros, group_size, bias=bias)
    else:
        m, n, k = x2.shape[0], scales.shape[0], x2.shape[1]
        run = lambda cfg: mod.int4_gemm(x2, qweight, scales, zeros, group_size, bias=bias, config=cfg)  # noqa: E731
        config = workload.config_for("int4_gemm", workload.gemm_bucket(m, n, k, f"g{group_size}", x.dtype),
                                     lambda: mod.candidate_configs(m, n, k, group_size), run)
        out = run(config)
    return out.reshape(*lead, out.shape[-1])


@int4_linear.register_fake
def _(x, qweight, scales, zeros, group_size, bias):
    # scales are [N, K // group_size]: the output width is their first dimension.
    return x.new_empty((*x.shape[:-1], scales.shape[0]))


@torch.library.custom_op("kernopt::fp8_linear", mutates_args=())
def fp8_linear(x: Tensor, w_fp8: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    """y = (quant_rows(x) @ w_fp8.T) * x_scale * w_scale (+ bias), in x's dtype; x quantized per token."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    mod = kernel_module("fp8_gemm")
    if implementation(x) == "reference":
        out = mod.fp8_linear_ref(x2, w_fp8, w_scale, bias=bias)
    else:
        m, n, k = x2.shape[0], w_fp8.shape[0], x2.shape[1]
        run = lambda cfg: mod.fp8_linear(x2, w_fp8, w_scale, bias=bias, config=cfg)  # noqa: E731
        config = workload.config_for("fp8_gemm", workload.gemm_bucket(m, n, k, x.dtype),
                                     lambda: mod.candidate_configs(m, n, k), run)
        out = run(config)
    return out.reshape(*lead, w_fp8.shape[0])


@fp8_linear.register_fake
def _(x, w_fp8, w_scale, bias):
    return x.new_empty((*x.shape[:-1], w_fp8.shape[0]))


@torch.library.custom_op("kernopt::fp8_scaled_mm", mutates_args=())
def fp8_scaled_mm(a: Tensor, b: Tensor, scale_a: Tensor, scale_b: Tensor, bias: Optional[Tensor],
                  out_dtype: torch.dtype) -> Tensor:
    """(a @ b) * scale_a * scale_b (+ bias): a [M, K] e4m3, b [K, N] e4m3, scale_a [M, 1] or scalar,
    scale_b [1, N] or scalar, both fp32; the `torch._scaled_mm` contract."""
    return _run("fp8_gemm", "fp8_scaled_mm", a, a, b, scale_a, scale_b, bias=bias, out_dtype=out_dtype)


@fp8_scaled_mm.register_fake
def _(a, b, scale_a, scale_b, bias, out_dtype):
    return a.new_empty((a.shape[0], b.shape[1]), dtype=out_dtype)


# --------------------------------------------------------------------------------------------------
# RMSNorm fused with per-token fp8 quantization, and the fp8 linear that takes its output (passes/fp8.py).
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("kernopt::rmsnorm_quant_fp8", mutates_args=())
def rmsnorm_quant_fp8(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(e4m3 [.., K], fp32 [M, 1]): per-row quantization of LlamaRMSNorm(x) * weight, M = x.numel() // K."""
    mod = kernel_module("rmsnorm_quant")
    if implementation(x) == "reference" or implementation(weight) == "reference":
        q, s = mod.rmsnorm_quant_fp8_ref(x, weight, eps)  # on x as it is: the unfused graph's very ops
    else:
        q, s = mod.rmsnorm_quant_fp8(x.reshape(-1, x.shape[-1]), weight, eps)
    return q.reshape(x.shape), s.reshape(-1, 1)


@rmsnorm_quant_fp8.register_fake
def _(x, weight, eps):
    rows = x.numel() // x.shape[-1] if x.shape[-1] != 0 else 0
    return x.new_empty(x.shape, dtype=torch.float8_e4m3fn), x.new_empty((rows, 1), dtype=torch.float32)


@torch.library.custom_op("kernopt::fp8_linear_prequant", mutates_args=())
def fp8_linear_prequant(x_fp8: Tensor, x_scale: Tensor, w_fp8: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                        out_dtype: torch.dtype) -> Tensor:
    """fp8_linear on x quantized already: x_fp8 [.., K] e4m3, x_scale [M, 1] fp32 -> [.., N] out_dtype."""
    lead = x_fp8.shape[:-1]
    gemm = kernel_module("fp8_gemm")
    impl = implementation(x_fp8)
    if impl == "reference" or (impl == "interpreter" and torch.bfloat16 in (out_dtype, getattr(bias, "dtype", None))):
        run = gemm.fp8_linear_prequant_ref  # the interpreter computes bf16 wrongly
    else:
        run = gemm.fp8_linear_prequant
    out = run(x_fp8.reshape(-1, x_fp8.shape[-1]), x_scale, w_fp8, w_scale, bias=bias, out_dtype=out_dtype)
    return out.reshape(*lead, w_fp8.shape[0])


@fp8_linear_prequant.register_fake
def _(x_fp8, x_scale, w_fp8, w_scale, bias, out_dtype):
    return x_fp8.new_empty((*x_fp8.shape[:-1], w_fp8.shape[0]), dtype=out_dtype)
