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


# Where a quantized module's eager forward may call its kernopt op (eager_kernel): on a GPU. Tests add
# "interpreter" to exercise the switch on CPU.
EAGER_KERNEL_IMPLS = ("triton",)


def eager_kernel(module: torch.nn.Module, x: Tensor) -> bool:
    """Whether a quantized linear's forward runs its kernopt op instead of its plain-torch reference.

    Only when `optimize()` switched the module on (``module.kernel_in_eager``), the call is eager, not traced
    by torch.compile, and the op runs a Triton kernel for x here. Traced calls keep the reference, which the
    passes rewrite and explain() reports. The eager calls that matter are transformers' uncompiled prefill
    under ``cache="static"``: `generate` compiles only the decode step. The H200 profile of
    kernopt_int4 8B (benchmarks/results/profiles) shows that prefill, run on the plain-torch dequantize
    reference, costing ~4 decode steps' worth of shifts, masks and copies in every generate call."""
    return (bool(getattr(module, "kernel_in_eager", False)) and not torch.compiler.is_compiling()
            and implementation(x) in EAGER_KERNEL_IMPLS)


def tuning_kit(call, operands: tuple, reference):
    """(check, timer) for `workload.autotune` on one op call (`workload.config_for` builds it on first use only).

    ``call(config, *operands)`` runs the kernel with a config. The check compares an output with
    ``reference(*operands)`` (computed once) at the output dtype's tolerance, with atol scaled to the
    reference's RMS: candidates sum K-long products in other orders. The timer replays one CUDA graph of
    many calls over copies of the operands that together overflow the L2, as the benchmark suites time
    (kernopt.benchmark.time_graph_ms). That is how a decode step's kernels run; an eager launch would time
    Python at decode sizes."""
    from kernopt import tolerance

    state: dict = {}

    def check(out):
        if "ref" not in state:
            ref = reference(*operands)
            state["ref"], state["rms"] = ref, tolerance.rms(ref)
        return tolerance.mismatch(out, state["ref"], out.dtype, scale=2.0, magnitude=state["rms"])

    def timer(config) -> float:
        from kernopt.benchmark import rotation, time_graph_ms

        if "sets" not in state:
            nbytes = sum(t.numel() * t.element_size() for t in operands if isinstance(t, Tensor))
            copies, state["calls"] = rotation(nbytes)
            state["sets"] = [operands] + [tuple(t.clone(memory_format=torch.preserve_format)
                                                if isinstance(t, Tensor) else t for t in operands)
                                          for _ in range(copies - 1)]
        sets = state["sets"]
        return time_graph_ms(lambda i: (lambda: call(config, *sets[i])), len(sets), state["calls"], rep=20)

    return check, timer


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
        call = lambda cfg, x2, w, bias, w_up: gemm.gemm(x2, w, bias=bias, w_up=w_up,  # noqa: E731
                                                        activation=activation, config=cfg)
        operands = (x2, w, bias, w_up)
        config = workload.config_for(
            "gemm", workload.gemm_bucket(m, n, k, activation, x.dtype),
            lambda: gemm.candidate_configs(m, n, k, activation), lambda cfg: call(cfg, *operands),
            lambda: tuning_kit(call, operands, lambda x2, w, bias, w_up: gemm.gemm_ref(
                x2, w, bias=bias, w_up=w_up, activation=activation)))
        out = call(config, *operands)
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
        call = lambda cfg, x2, q, s, z, b: mod.int4_gemm(x2, q, s, z, group_size, bias=b, config=cfg)  # noqa: E731
        operands = (x2, qweight, scales, zeros, bias)
        config = workload.config_for(
            "int4_gemm", workload.gemm_bucket(m, n, k, f"g{group_size}", x.dtype),
            lambda: mod.candidate_configs(m, n, k, group_size), lambda cfg: call(cfg, *operands),
            lambda: tuning_kit(call, operands,
                               lambda x2, q, s, z, b: mod.int4_gemm_ref(x2, q, s, z, group_size, bias=b)))
        out = call(config, *operands)
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
        call = lambda cfg, x2, w, s, b: mod.fp8_linear(x2, w, s, bias=b, config=cfg)  # noqa: E731
        operands = (x2, w_fp8, w_scale, bias)
        config = workload.config_for(
            "fp8_gemm", workload.gemm_bucket(m, n, k, x.dtype), lambda: mod.candidate_configs(m, n, k),
            lambda cfg: call(cfg, *operands),
            lambda: tuning_kit(call, operands, lambda x2, w, s, b: mod.fp8_linear_ref(x2, w, s, bias=b)))
        out = call(config, *operands)
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
