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


@torch.library.custom_op("kernopt::decode_attention_append", mutates_args=("k_cache", "v_cache"))
def decode_attention_append(q: Tensor, k_new: Tensor, v_new: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor,
                            v_cache: Tensor, cache_position: Tensor, scale: float,
                            mask: Optional[Tensor] = None) -> Tensor:
    """HF static-cache decode step: rotary on q / k_new, k / v written at cache_position, attention (one kernel)."""
    return _run("decode_attention", "decode_attention_append", q, q, k_new, v_new, cos, sin, k_cache, v_cache,
                cache_position, sm_scale=scale, mask=mask)


@decode_attention_append.register_fake
def _(q, k_new, v_new, cos, sin, k_cache, v_cache, cache_position, scale, mask=None):
    return q.new_empty((*q.shape[:-1], v_cache.shape[-1]))


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
def int4_bucket_tag(group_size: int, symmetric: bool) -> str:
    """The int4 part of a tuned-config key: group size, and "sym" for weights without zero points (their best
    GEMV differs: int4_gemm.select_config)."""
    return f"g{group_size}" + ("sym" if symmetric else "")


# The prompt's lane: operand signatures (_int4_signature) whose int4 launch int4_gemm accepted and resolved to
# dequantize + cuBLAS -> that config, with the config_epoch it was resolved under. A call with a known signature
# skips the tuned-config lookup, the table and int4_gemm's operand checks (the same shapes, dtypes and devices
# passed them) and launches `dequant_cublas` directly. Why: the compiled prompt forward runs without CUDA graphs,
# so each int4 op's Python is on its critical path (the 1B prompt was host-bound: 12.6 ms of kernels in a 22 ms
# call, sweeps/llama_1b_5dfe048; per-layer costs in sweeps/host_overhead, benchmarks/op_host_overhead.py). Small
# M (decode) runs under CUDA graphs and keeps the full path. KERNOPT_INT4_LANE=0 turns it off (the llama suite's
# kernopt_int4_nolane system: the same-run comparison).
_DEQUANT_LANE: dict = {}
LANE_ENV = "KERNOPT_INT4_LANE"


def _int4_signature(x2: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], group_size: int,
                    bias: Optional[Tensor], out: Optional[Tensor], gated: bool) -> tuple:
    """What int4_gemm's checks and config depend on (strides aside: the launch passes them every call)."""
    return (x2.shape, x2.dtype, x2.device, qweight.shape, qweight.dtype, qweight.device, scales.shape,
            scales.device, None if zeros is None else (zeros.shape, zeros.device),
            None if bias is None else (bias.shape, bias.device),
            None if out is None else (out.shape, out.dtype, out.device), group_size, gated)


def _int4_gemm_tuned(x2: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], group_size: int,
                     bias: Optional[Tensor], out: Optional[Tensor] = None, gated: bool = False) -> Tensor:
    """The int4 kernel on x2 [M, K] with the tuned config of its (M bucket, N, K, group, dtype); `out` may be a
    preallocated (strided) [M, N] tensor, e.g. a column slice of a grouped output; gated: int4_gemm's SwiGLU
    over the product (the config is the product's)."""
    mod = kernel_module("int4_gemm")
    lane = os.environ.get(LANE_ENV) != "0"
    if lane:
        signature = _int4_signature(x2, qweight, scales, zeros, group_size, bias, out, gated)
        known = _DEQUANT_LANE.get(signature)
        if known is not None and known[0] == workload.config_epoch():
            return mod.dequant_cublas(x2, qweight, scales, zeros, group_size, bias, known[1], out, gated)
    m, n, k = x2.shape[0], scales.shape[0], x2.shape[1]
    call = lambda cfg, x2, q, s, z, b: mod.int4_gemm(x2, q, s, z, group_size, bias=b, config=cfg)  # noqa: E731
    operands = (x2, qweight, scales, zeros, bias)
    config = workload.config_for(
        "int4_gemm", workload.gemm_bucket(m, n, k, int4_bucket_tag(group_size, zeros is None), x2.dtype),
        lambda: mod.candidate_configs(m, n, k, group_size), lambda cfg: call(cfg, *operands),
        lambda: tuning_kit(call, operands,
                           lambda x2, q, s, z, b: mod.int4_gemm_ref(x2, q, s, z, group_size, bias=b)))
    result = mod.int4_gemm(x2, qweight, scales, zeros, group_size, bias=bias, config=config, out=out, gated=gated)
    # (after the launch: int4_gemm raised on operands it does not take, and an empty product launched nothing)
    if lane and m and n:
        resolved = mod.resolve_config(x2, qweight, scales, zeros, group_size, config)
        if resolved.get("impl") == "dequant_cublas":
            _DEQUANT_LANE[signature] = (workload.config_epoch(), resolved)
    return result


@torch.library.custom_op("kernopt::int4_linear", mutates_args=())
def int4_linear(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], group_size: int,
                bias: Optional[Tensor]) -> Tensor:
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if implementation(x) == "reference":
        out = kernel_module("int4_gemm").int4_gemm_ref(x2, qweight, scales, zeros, group_size, bias=bias)
    else:
        out = _int4_gemm_tuned(x2, qweight, scales, zeros, group_size, bias)
    return out.reshape(*lead, out.shape[-1])


@int4_linear.register_fake
def _(x, qweight, scales, zeros, group_size, bias):
    # scales are [N, K // group_size]: the output width is their first dimension.
    return x.new_empty((*x.shape[:-1], scales.shape[0]))


@torch.library.triton_op("kernopt::int4_weight", mutates_args=())
def int4_weight(qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], group_size: int,
                dtype: torch.dtype) -> Tensor:
    """The [N, K] weight of int4 words qweight [N, K / 8] in `dtype`: kernels/int4_gemm.py's dequantize kernel on
    CUDA, the plain-torch reference elsewhere (the CPU interpreter included: Inductor's CPU code cannot launch a
    Triton kernel).

    A triton_op, not a custom op: Inductor traces into it and launches the kernel from its generated code, so a
    call costs none of a custom op's dispatch and Python launcher (passes/int4.py's prompt rows: the weight for
    Inductor's own matmul in graphs without CUDA graphs, where every op's host time is on the critical path)."""
    mod = kernel_module("int4_gemm")
    if implementation(qweight) != "triton":
        return mod.dequantize_int4(qweight, scales, zeros, group_size, dtype)
    return mod.int4_dequantize(qweight, scales, zeros, group_size, dtype, wrap=torch.library.wrap_triton)


def adjacent_view(parts: list) -> Optional[Tensor]:
    """One view over tensors that are consecutive blocks of rows of one storage, or None.

    `parts` are 2-D [N_i, X] (or 1-D [N_i]) tensors with the same dtype, device, trailing shape and strides,
    in one storage, where part i + 1 starts N_i rows (N_i * stride(0) elements) after part i: e.g. the column
    slices of one N-contiguous [K/8, N1 + N2 + ...] buffer that `kernopt.int4.pack_adjacent` lays out (each
    a [N_i, K/8] view with strides (1, Ntot)), or row-contiguous [N_i, K/8] tensors stored back to back.
    The result is `parts[0]` extended over all rows: [N1 + N2 + ..., X] with the same strides, the very
    memory the parts hold. Checked on every call (storage and offsets): anything else is None."""
    first = parts[0]
    if any(p is None for p in parts) or first.dim() not in (1, 2):
        return None
    # (lean on purpose: the prompt's uncaptured forward runs this per grouped launch, on the host)
    dtype, device, tail, stride = first.dtype, first.device, first.shape[1:], first.stride()
    storage = first.untyped_storage().data_ptr()
    offset = first.storage_offset()
    rows = prev_rows = first.shape[0]
    expected = offset + rows * stride[0]
    for p in parts[1:]:
        if (prev_rows == 0 or p.storage_offset() != expected or p.stride() != stride or p.shape[1:] != tail
                or p.dtype != dtype or p.device != device or p.untyped_storage().data_ptr() != storage):
            return None
        prev_rows = p.shape[0]
        rows += prev_rows
        expected += prev_rows * stride[0]
    return torch.as_strided(first, (rows, *tail), stride, offset)


def _grouped_bias(biases: list, widths: list[int]) -> Optional[Tensor]:
    """One [N1 + N2 + ...] bias for a fused launch: the parts' own memory when adjacent, else concatenated
    (missing ones as zeros: adding 0 leaves those outputs as they were); None when no part has a bias."""
    if all(b is None for b in biases):
        return None
    view = adjacent_view(biases)
    if view is not None:
        return view
    ref = next(b for b in biases if b is not None)
    return torch.cat([b if b is not None else ref.new_zeros(n) for b, n in zip(biases, widths)])


def _adjacent_int4(qweights: list, scales: list, zeros: list) -> Optional[tuple]:
    """(qweight, scales, zeros) views over the parts when each list is the row blocks of one storage (zeros None
    for symmetric parts), else None."""
    q_all, s_all = adjacent_view(qweights), adjacent_view(scales)
    symmetric = all(z is None for z in zeros)
    z_all = None if symmetric else adjacent_view(zeros)
    if q_all is None or s_all is None or not (symmetric or z_all is not None):
        return None
    return q_all, s_all, z_all


@torch.library.custom_op("kernopt::int4_linear_group", mutates_args=())
def int4_linear_group(x: Tensor, qweights: list[Tensor], scales: list[Tensor], zeros: list[Optional[Tensor]],
                      group_size: int, biases: list[Optional[Tensor]]) -> Tensor:
    """Several int4 linears of one input x, as [..., N1 + N2 + ...]: column block i is
    ``int4_linear(x, qweights[i], scales[i], zeros[i], group_size, biases[i])``.

    Why: at decode each int4 linear is a short memory-bound GEMV whose launch, ramp and tail cost about as much
    as a fraction of its bytes; q/k/v (and gate/up) read one x, so one launch over N1 + N2 + ... columns does
    the same work with one ramp and one tail (vLLM's merged QKV / gate_up layers). The int4 pass emits this
    op for int4 linears that share x (passes/int4.py); `kernopt.int4.pack_adjacent` stores their weights as
    adjacent column blocks of shared buffers.

    Checked per call: when every qweight, scales (and zeros) list is the row blocks of one storage
    (`adjacent_view`), the kernel runs once on the combined views (biases: their combined view or a small
    concatenation); otherwise each part runs its own launch into its slice of the one output (still exact).
    The reference implementation runs each part's reference and concatenates (the very values the separate
    int4_linear calls give)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    widths = [s.shape[0] for s in scales]
    if implementation(x) == "reference":
        ref = kernel_module("int4_gemm").int4_gemm_ref
        out = torch.cat([ref(x2, q, s, z, group_size, bias=b) for q, s, z, b in zip(qweights, scales, zeros, biases)],
                        dim=-1)
        return out.reshape(*lead, out.shape[-1])
    combined = _adjacent_int4(qweights, scales, zeros)
    if combined is not None:
        out = _int4_gemm_tuned(x2, *combined, group_size, _grouped_bias(biases, widths))
    else:
        out = x2.new_empty((x2.shape[0], sum(widths)))
        col = 0
        for q, s, z, b, n in zip(qweights, scales, zeros, biases, widths):
            _int4_gemm_tuned(x2, q, s, z, group_size, b, out=out[:, col:col + n])
            col += n
    return out.reshape(*lead, out.shape[-1])


@int4_linear_group.register_fake
def _(x, qweights, scales, zeros, group_size, biases):
    return x.new_empty((*x.shape[:-1], sum(s.shape[0] for s in scales)))


@torch.library.custom_op("kernopt::int4_swiglu", mutates_args=())
def int4_swiglu(x: Tensor, qweights: list[Tensor], scales: list[Tensor], zeros: list[Optional[Tensor]],
                group_size: int, biases: list[Optional[Tensor]]) -> Tensor:
    """Llama's MLP up half on int4 weights: ``silu(gate(x)) * up(x)``, gate and up the two parts of an
    `int4_linear_group` (equal widths) -> [..., N].

    Why: at decode the silu * mul between the grouped gate/up GEMV and the down GEMV is a kernel of its own (about
    1.2 us per layer on the H200, plus a kernel boundary); when the parts are adjacent (one storage) and the launch
    is the one-row GEMV, the GEMV's last split-K slice applies it in its epilogue (int4_gemm ``gated``) and
    writes [1, N] instead of [1, 2N]; adjacent parts with any other launch: the product, then int4_gemm's one
    silu_mul kernel; parts that are not adjacent: the grouped product, then the two ops in torch. The values are
    the unfused ops' (each rounded to x's dtype in turn). The int4 pass emits this op (``KERNOPT_INT4_SWIGLU=1``)."""
    if len(qweights) != 2 or scales[0].shape[0] != scales[1].shape[0]:
        raise ValueError("kernopt.int4_swiglu takes two parts (gate, up) of equal width")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    n = scales[0].shape[0]
    combined = _adjacent_int4(qweights, scales, zeros) if implementation(x) != "reference" else None
    if combined is not None:
        out = _int4_gemm_tuned(x2, *combined, group_size, _grouped_bias(biases, [n, n]), gated=True)
    else:
        y = int4_linear_group(x2, qweights, scales, zeros, group_size, biases)
        out = torch.nn.functional.silu(y[:, :n]) * y[:, n:]
    return out.reshape(*lead, n)


@int4_swiglu.register_fake
def _(x, qweights, scales, zeros, group_size, biases):
    return x.new_empty((*x.shape[:-1], scales[0].shape[0]))


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


def _fp8_on_reference(impl: str, out_dtype: torch.dtype, biases: list) -> bool:
    """Whether the prequant fp8 ops run their plain-torch reference: on the reference path, and in the interpreter
    with bf16 anywhere (the interpreter computes bf16 wrongly)."""
    return impl == "reference" or (impl == "interpreter" and torch.bfloat16 in (out_dtype, *(getattr(b, "dtype", None)
                                                                                           for b in biases)))


@torch.library.custom_op("kernopt::fp8_linear_prequant", mutates_args=())
def fp8_linear_prequant(x_fp8: Tensor, x_scale: Tensor, w_fp8: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                        out_dtype: torch.dtype) -> Tensor:
    """fp8_linear on x quantized already: x_fp8 [.., K] e4m3, x_scale [M, 1] fp32 -> [.., N] out_dtype."""
    lead = x_fp8.shape[:-1]
    gemm = kernel_module("fp8_gemm")
    impl = implementation(x_fp8)
    if _fp8_on_reference(impl, out_dtype, [bias]):
        run = gemm.fp8_linear_prequant_ref
    else:
        run = gemm.fp8_linear_prequant
    out = run(x_fp8.reshape(-1, x_fp8.shape[-1]), x_scale, w_fp8, w_scale, bias=bias, out_dtype=out_dtype)
    return out.reshape(*lead, w_fp8.shape[0])


@fp8_linear_prequant.register_fake
def _(x_fp8, x_scale, w_fp8, w_scale, bias, out_dtype):
    return x_fp8.new_empty((*x_fp8.shape[:-1], w_fp8.shape[0]), dtype=out_dtype)


@torch.library.custom_op("kernopt::fp8_linear_prequant_group", mutates_args=())
def fp8_linear_prequant_group(x_fp8: Tensor, x_scale: Tensor, w_fp8s: list[Tensor], w_scales: list[Tensor],
                              biases: list[Optional[Tensor]], out_dtype: torch.dtype) -> Tensor:
    """Several fp8 linears of one quantized input, as [..., N1 + N2 + ...]: column block i is
    ``fp8_linear_prequant(x_fp8, x_scale, w_fp8s[i], w_scales[i], biases[i], out_dtype)``.

    Why: as int4_linear_group (the fp8 pass emits this op for q/k/v and gate/up, which read one
    rmsnorm_quant_fp8): at decode the k and v GEMVs of an 8B layer (N = 1024, 4 MB each) cost ~5 us apiece, most of
    it launch, ramp and tail. `kernopt.fp8.pack_adjacent` stores the weights and scales as consecutive row blocks
    of shared buffers; checked per call: when both lists are adjacent (`adjacent_view`) the kernel runs once on
    the combined views (biases: their combined view or a small concatenation); otherwise each part runs its own
    launch into its slice of the one output. Each output column is the same sum either way (a GEMM's column does
    not depend on the other columns, nor on the tile's width: the table's tile for the combined width may differ,
    so the values agree to fp32 summation order). The reference runs each part's reference and concatenates."""
    lead = x_fp8.shape[:-1]
    x2 = x_fp8.reshape(-1, x_fp8.shape[-1])
    widths = [w.shape[0] for w in w_fp8s]
    impl = implementation(x_fp8)
    gemm = kernel_module("fp8_gemm")
    if _fp8_on_reference(impl, out_dtype, biases):
        out = torch.cat([gemm.fp8_linear_prequant_ref(x2, x_scale, w, s, bias=b, out_dtype=out_dtype)
                         for w, s, b in zip(w_fp8s, w_scales, biases)], dim=-1)
        return out.reshape(*lead, out.shape[-1])
    w_all, s_all = adjacent_view(w_fp8s), adjacent_view([s.reshape(-1) for s in w_scales])
    if w_all is not None and s_all is not None:
        out = gemm.fp8_linear_prequant(x2, x_scale, w_all, s_all, bias=_grouped_bias(biases, widths),
                                       out_dtype=out_dtype)
    else:
        out = x2.new_empty((x2.shape[0], sum(widths)), dtype=out_dtype)
        col = 0
        for w, sc, b, n in zip(w_fp8s, w_scales, biases, widths):
            gemm.fp8_linear_prequant(x2, x_scale, w, sc, bias=b, out_dtype=out_dtype, out=out[:, col:col + n])
            col += n
    return out.reshape(*lead, out.shape[-1])


@fp8_linear_prequant_group.register_fake
def _(x_fp8, x_scale, w_fp8s, w_scales, biases, out_dtype):
    return x_fp8.new_empty((*x_fp8.shape[:-1], sum(w.shape[0] for w in w_fp8s)), dtype=out_dtype)
