"""Compile kernopt's Triton kernels for the H100/H200 (sm_90a) on a machine without a GPU.

Why: the CPU test suite runs the kernels in Triton's interpreter, which never sees the GPU-only code paths
(bf16, TMA tensor descriptors, fp8 wgmma, masks at real sizes, the single-pass split kernels) and never
compiles anything. A kernel that does not compile for sm_90, spills registers or outgrows shared memory was
so far found only on the GPU machine, whose time is scarce. Triton's wheel ships ptxas, so the whole
compilation (TTIR -> TTGIR -> LLVM -> PTX -> cubin) runs offline.

How:
1. Each case calls a public launcher of kernels/*.py with CPU tensors of a real model shape (``torch.empty``,
   never touched) and the config a GPU run uses (the family's ``select_config`` unless the case names a
   candidate). ``JITFunction.run`` is replaced by a recorder for the call, so nothing runs and every launch
   (kernel, arguments, grid) is captured.
2. Each launch is specialised exactly as triton 3.6's ``JITFunction.run`` does on a device: the binder of
   ``create_function_from_signature`` built for the sm_90 backend (``make_backend(GPUTarget("cuda", 90, 32))``)
   gives the signature (pointer dtypes, ``tensordesc<...>`` for host TensorDescriptors, integers equal to 1
   as constexprs) and the 16-byte divisibility attributes of pointers and integers; ``_pack_args`` turns them
   into ``ASTSource`` and the options; ``triton.compile`` builds the cubin. torch.empty's 64-byte aligned CPU
   buffers specialise like CUDA allocations. Where a launcher takes a different value on CPU than on a CUDA
   device the case overrides that constexpr with the CUDA value (fp8 TMA's NUM_SMS, rmsnorm's MEAN_BY_MUL).
3. Per kernel it reports shared memory (``metadata.shared``), registers and stack bytes (the bundled
   ``cuobjdump --dump-resource-usage`` on the cubin), spill stores/loads (the ptxas ``-v`` log), whether the
   PTX uses wgmma (and e4m3 operands) and TMA, and whether the kernel got warp-specialised ("ws": TTGIR
   ``ttg.warp_specialize`` partitions and PTX ``setmaxnreg``; such a kernel launches more warps than its
   num_warps, "4(12)" in the table) and, for such kernels, whether each consumer partition's row indices are its
   own ("ws_rows", see ``ws_row_facts``). Identical specialisations compile once.

Usage (the interpreter must be off; the script removes TRITON_INTERPRET and KERNOPT_CPU itself):
    python tests/kernels/sm90_offline.py [--json out.json] [--only REGEX] [--jobs N] [--cache-dir DIR] [--list]
                                         [--candidates]
Exit status 1 when a kernel fails to compile or a check fails (see ``problems``); the table goes to stdout.
``--candidates`` adds every candidate_configs entry at the main shapes (what a GPU --tune sweep times; ~400
distinct kernels, minutes): candidates may spill (reported, not a failure), but must compile and fit.
tests/kernels/test_sm90_compile.py runs this in a subprocess and asserts on the JSON.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

ARCH = 90               # sm_90a: H100 and H200 (GPUTarget's capability)
SMS = 132               # H100 SXM / H200 SMs (what a CUDA launch of the fp8 persistent kernel uses)
SMEM_LIMIT = 227 * 1024  # the largest dynamic shared memory one block may opt into on sm_90
REGISTERS = 65536       # per SM; a block of num_warps * 32 threads must fit

# Llama-3 8B shapes: hidden 4096, MLP 14336, 32 query heads, 8 KV heads, head dim 128.
HIDDEN, MLP, HQ, HKV, HEAD_DIM = 4096, 14336, 32, 8, 128


# --------------------------------------------------------------------------------------------------
# Capture: launches recorded instead of run
# --------------------------------------------------------------------------------------------------
@dataclass
class Launch:
    fn: object       # the JITFunction
    args: tuple
    kwargs: dict
    grid: object


class Recorder:
    """Within ``with Recorder() as rec``, ``kernel[grid](...)`` records the launch and returns None."""

    def __init__(self):
        self.launches: list[Launch] = []
        self._overrides: dict = {}
        self._used: set = set()

    def override(self, **constexprs) -> None:
        """Constexpr values a CUDA launch passes where the launcher passes another on CPU tensors."""
        self._overrides.update(constexprs)

    def __enter__(self):
        from triton.runtime.jit import JITFunction

        self._cls, self._orig = JITFunction, JITFunction.run
        rec = self

        def record(fn, *args, grid, warmup, **kwargs):
            for name, value in rec._overrides.items():
                if name in kwargs:
                    kwargs[name] = value
                    rec._used.add(name)
            rec.launches.append(Launch(fn, args, kwargs, grid))
            return None

        JITFunction.run = record
        return self

    def __exit__(self, exc_type, *exc):
        self._cls.run = self._orig
        unused = set(self._overrides) - self._used
        if exc_type is None and unused:  # a renamed constexpr must not leave the CPU value in place silently
            raise KeyError(f"overrides {sorted(unused)}: no launch passed them as keywords")
        return False


def _target():
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", ARCH, 32)


def specialize(launch: Launch, backend):
    """(ASTSource, options, key) for a launch: JITFunction.run's binder and _pack_args, sm_90 backend."""
    from triton import knobs
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction, compute_cache_key, create_function_from_signature

    fn = launch.fn
    if not isinstance(fn, JITFunction):
        raise TypeError(f"{fn!r} is not a JITFunction (TRITON_INTERPRET was set when triton was imported)")
    kwargs = dict(launch.kwargs)
    # as JITFunction.run adds them before binding
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    key = f"{fn.module}.{fn.__name__}:" + compute_cache_key({}, specialization, options)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    if fn.is_gluon():  # kernels/int4_wgmma.py
        from triton.experimental.gluon._runtime import GluonASTSource
        return GluonASTSource(fn, signature, constexprs, attrs), options, key
    return ASTSource(fn, signature, constexprs, attrs), options, key


# --------------------------------------------------------------------------------------------------
# Cases: a launcher call at a real shape with the config a GPU run uses
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    name: str
    build: Callable          # build(rec) -> the config dict it launched with
    selected: bool = True    # the family's table (select_config) picks this config: it must not spill
    expect: dict = field(default_factory=dict)  # kernel name -> checks: "wgmma", "wgmma_e4m3", "tma", "ws"
    canary: bool = False     # a config known to spill: proves the spill detection sees spills
    no_spill: bool = False   # not the table's pick, but a candidate whose point is to fit: must not spill either


def _empty(*shape, dtype=None):
    import torch

    return torch.empty(shape, dtype=dtype or torch.bfloat16)


def _dtype(name=None):
    """Cases name dtypes ("bf16" by default, "fp16") so that this module imports without torch."""
    import torch

    return {None: torch.bfloat16, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


# ---- kernels/gemm.py
def _gemm(M, N, K, activation="none", bias=False, dtype=None, config=None, need_split=False):
    def build(rec):
        from kernopt.kernels import gemm as g

        dt = _dtype(dtype)
        cfg = config(M, N, K, activation, dt) if callable(config) else \
            (config or g.select_config(M, N, K, activation, dt))
        if need_split and cfg["SPLIT_K"] < 2:
            raise AssertionError(f"case wants split-K > 1, the table gives {cfg}")
        g.gemm(_empty(M, K, dtype=dt), _empty(N, K, dtype=dt), bias=_empty(N, dtype=dt) if bias else None,
               w_up=_empty(N, K, dtype=dt) if activation == "swiglu" else None, activation=activation, config=cfg)
        return cfg
    return build


def _gemv_table(M, N, K, activation, dtype):
    """The gemv row select_config picks once GEMV_MAX_M covers M (kernels/gemm.py's _GEMV_TILE)."""
    from kernopt.kernels import gemm as g

    return g._gemv_config(M, N, K, activation, dtype)


def _gemv_split(M, N, K, activation, dtype):
    """The gemv row with 4 K slices: the single-pass split-K path (the table no longer splits the Llama
    shapes, whose 16-row tiles already give every SM a program)."""
    return {**_gemv_table(M, N, K, activation, dtype), "SPLIT_K": 4}


def _gemv_staged(M, N, K, activation, dtype):
    """The gemv row through the 3-stage loop (LOAD_STAGES; the table's pick for one weight, a candidate for SwiGLU)."""
    return {**_gemv_table(M, N, K, activation, dtype), "num_stages": 3}


def _swapab_table(M, N, K, activation, dtype):
    """The swap-AB row select_config picks once SWAPAB_MAX_M covers M (kernels/gemm.py's _SWAPAB_TILES)."""
    from kernopt.kernels import gemm as g

    return g._swapab_config(M, N, K, activation, dtype)


# ---- kernels/flash_attention.py
def _flash(B, Hq, Hkv, S, D, causal, mask=None, dtype=None, config=None, ws_probe=False):
    """ws_probe: with the launcher's WS_CAUSAL / WS_STAGES widened as benchmarks/attention_ws_probe.py does."""
    def build(rec):
        import torch
        from kernopt.kernels import flash_attention as fa

        if ws_probe:
            with _ws_probe_flags(fa):
                return _flash(B, Hq, Hkv, S, D, causal, mask, dtype, config)(rec)

        dt = _dtype(dtype)
        # the launcher's pick; a case's own config overrides the unspecialised pick (no WS / MIN_MASK / PERSISTENT
        # keys leaking in from the table's warp-specialised tile)
        cfg = dict(fa.select_config(D, causal, S, S, B * Hq, dt, warp_spec=mask is None and config is None))
        cfg.update(config or {})
        m = None
        if mask == "bool":
            m = torch.empty((B, 1, S, S), dtype=torch.bool)
        elif mask == "additive":
            m = _empty(B, 1, S, S, dtype=dt)
        fa.flash_attention(_empty(B, Hq, S, D, dtype=dt), _empty(B, Hkv, S, D, dtype=dt),
                           _empty(B, Hkv, S, D, dtype=dt), mask=m, causal=causal, config=cfg)
        return cfg
    return build


@contextlib.contextmanager
def _ws_probe_flags(fa):
    saved = fa.WS_CAUSAL, fa.WS_STAGES
    fa.WS_CAUSAL, fa.WS_STAGES = True, (2, 3, 4)
    try:
        yield
    finally:
        fa.WS_CAUSAL, fa.WS_STAGES = saved


# ---- kernels/decode_attention.py
def _decode(B, S, paged=False, mask=None, fused=False, page=64, D=HEAD_DIM, Hq=HQ, Hkv=HKV, q_len=1, config=None,
            append=False):
    def build(rec):
        import torch
        from kernopt.kernels import decode_attention as da

        cfg = config or da.select_config(B, Hkv, Hq, S, D, SMS, q_len, paged=paged)
        if fused:
            if cfg["SPLITS"] < 2:
                raise AssertionError(f"FUSED_MERGE needs splits > 1, the table gives {cfg}")
            cfg = da.fused(cfg)
        q = _empty(B, Hq, q_len, D)
        if paged:
            pages = B * (S // page)
            table = torch.arange(pages, dtype=torch.int32).reshape(B, S // page)
            lens = torch.full((B,), S, dtype=torch.int32)
            da.paged_decode_attention(q, _empty(pages, page, Hkv, D), _empty(pages, page, Hkv, D), table, lens,
                                      config=cfg)
        else:
            m = None  # HF's static-cache decode mask: [B, 1, q_len, S]
            if mask == "bool":
                m = torch.empty((B, 1, q_len, S), dtype=torch.bool)
            elif mask == "additive":
                m = _empty(B, 1, q_len, S)
            if append:  # HF's static-cache step: rotary + the k / v write inside the kernel
                da.decode_attention_append(q, _empty(B, Hkv, 1, D), _empty(B, Hkv, 1, D), _empty(1, 1, 1, D),
                                           _empty(1, 1, 1, D), _empty(B, Hkv, S, D), _empty(B, Hkv, S, D),
                                           torch.zeros(1, dtype=torch.long), mask=m, config=cfg)
            else:
                da.decode_attention(q, _empty(B, Hkv, S, D), _empty(B, Hkv, S, D), mask=m, config=cfg)
        return cfg
    return build


# ---- kernels/int4_gemm.py (N-contiguous storage, as kernopt/int4.py writes it)
def _pdl(build):
    """The same launches as a GPU makes them with KERNOPT_PDL=1 (kernels/pdl.py): PDL=True in every kernel."""
    def wrapped(rec):
        rec.override(PDL=True)
        return build(rec)
    return wrapped


_LDMMA_RING = {"impl": "ldmma", "BLOCK_M": 8, "BLOCK_N": 32, "BLOCK_K": 128, "STAGES": 4, "num_warps": 4}


def _int4(M, N=MLP, K=HIDDEN, group=128, zeros=False, bias=False, pick=None, config=None, gated=False, ldmma=True):
    def build(rec):
        import torch
        from kernopt.kernels import int4_gemm as q4

        cfg = config or q4.select_config(M, N, K, group, symmetric=not zeros, x_dtype=_dtype(), ldmma=ldmma)
        if pick is not None:
            cands = [c for c in q4.candidate_configs(M, N, K, group) if all(c.get(k) == v for k, v in pick.items())]
            if not cands:
                raise AssertionError(f"no candidate_configs({M}, {N}, {K}, {group}) entry matches {pick}")
            cfg = cands[0]
        if cfg["impl"] == "tcasm" or cfg.get("PAIRS"):
            rec.override(ASM=True)  # the launcher passes x.is_cuda: the inline-PTX unpack
        qweight = torch.empty((K // 8, N), dtype=torch.int32).t()
        scales = _empty(K // group, N).t()
        z = _empty(K // group, N).t() if zeros else None
        if cfg["impl"] == "dequant_cublas":  # the Triton half; the cuBLAS half is F.linear
            q4.int4_dequantize(qweight, scales, z, group, _dtype(), cfg)
        else:
            q4.int4_gemm(_empty(M, K), qweight, scales, z, group, bias=_empty(N) if bias else None, config=cfg,
                         gated=gated)
        return cfg
    return build


# ---- kernels/fp8_gemm.py and kernels/rmsnorm_quant.py
def _fp8(M, N=MLP, K=HIDDEN, bias=False, prequant=False, config=None):
    def build(rec):
        import torch
        import triton
        from kernopt.kernels import fp8_gemm as f8

        cfg = config or f8.select_config(M, N, K)
        if cfg.get("TMA"):  # a CUDA launch runs min(SM count, tiles) persistent programs (4 on CPU)
            rec.override(NUM_SMS=min(SMS, triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])))
        w = torch.empty((N, K), dtype=f8.FP8_DTYPE)
        w_scale = torch.empty((N,), dtype=torch.float32)
        b = _empty(N) if bias else None
        if prequant:
            f8.fp8_linear_prequant(torch.empty((M, K), dtype=f8.FP8_DTYPE), torch.empty((M, 1), dtype=torch.float32),
                                   w, w_scale, b, out_dtype=_dtype(), config=cfg)
        else:
            f8.fp8_linear(_empty(M, K), w, w_scale, b, config=cfg)
        return cfg
    return build


def _rmsnorm_quant(M, K=HIDDEN):
    def build(rec):
        from kernopt.kernels import rmsnorm_quant as rq

        rec.override(MEAN_BY_MUL=True)  # the launcher passes x.is_cuda
        cfg = rq.select_config(M, K)
        rq.rmsnorm_quant_fp8(_empty(M, K), _empty(K), 1e-5, config=cfg)
        return cfg
    return build


W, E4, TMA = ("wgmma",), ("wgmma_e4m3",), ("wgmma_e4m3", "tma")
# flash attention's warp-specialised candidates (kernels/flash_attention.py, "WARP_SPEC" with "DEVICE_TMA")
WS_FLASH = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "TMA": True, "DEVICE_TMA": True, "WARP_SPEC": True}

CASES = [
    # gemm: the table at decode (SwiGLU, split-K + reduce kernel) and prefill, and the gemv rows
    Case("gemm M16 swiglu K4096 N14336", _gemm(16, MLP, HIDDEN, "swiglu")),
    Case("gemm M4096 none K4096 N14336", _gemm(4096, MLP, HIDDEN), expect={"_gemm_kernel": W}),
    Case("gemm M4096 none K4096 N14336 fp16", _gemm(4096, MLP, HIDDEN, dtype="fp16"), expect={"_gemm_kernel": W}),
    Case("gemm M256 gelu K4096 N14336", _gemm(256, MLP, HIDDEN, "gelu"), expect={"_gemm_kernel": W}),
    # gelu on a 128 x 256 tile at 8 warps spills (why select_config gives epilogues 128 x 128): the canary
    Case("gemm M4096 gelu 128x256 w8 (spills: canary)", _gemm(4096, MLP, HIDDEN, "gelu", config={
        "BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}),
        selected=False, canary=True),
    Case("gemm gemv M1 swiglu K4096 N14336", _gemm(1, MLP, HIDDEN, "swiglu", config=_gemv_table)),
    Case("gemm gemv M1 K14336 N4096 (table: 3 stages)", _gemm(1, HIDDEN, MLP, config=_gemv_table),
         expect={"_gemv_kernel": ("cp_async",)}),
    Case("gemm gemv M1 swiglu K4096 N14336 3 stages", _gemm(1, MLP, HIDDEN, "swiglu", config=_gemv_staged),
         selected=False, no_spill=True, expect={"_gemv_kernel": ("cp_async",)}),
    Case("gemm gemv M4 bias K14336 N4096 split", _gemm(4, HIDDEN, MLP, bias=True, config=_gemv_split,
                                                       need_split=True)),
    # the swap-AB decode kernel's table rows (weight rows on wgmma's 64-row side, x rows as n16)
    Case("gemm swapab M1 swiglu K4096 N14336", _gemm(1, MLP, HIDDEN, "swiglu", config=_swapab_table),
         expect={"_gemm_swapab_kernel": ("wgmma", "cp_async")}),
    Case("gemm swapab M4 bias K4096 N6144", _gemm(4, 6144, HIDDEN, bias=True, config=_swapab_table),
         expect={"_gemm_swapab_kernel": ("wgmma", "cp_async")}),
    Case("gemm swapab M16 none K4096 N6144", _gemm(16, 6144, HIDDEN, config=_swapab_table),
         expect={"_gemm_swapab_kernel": ("wgmma", "cp_async")}),
    Case("gemm swapab M1 none K14336 N4096 split", _gemm(1, HIDDEN, MLP, config=_swapab_table, need_split=True),
         expect={"_gemm_swapab_kernel": ("wgmma", "cp_async")}),
    Case("gemm swapab M16 gelu_tanh K4096 N14336 split", _gemm(16, MLP, HIDDEN, "gelu_tanh", config=_swapab_table,
                                                               need_split=True),
         expect={"_gemm_swapab_kernel": ("wgmma", "cp_async")}),
    # flash attention (prefill): B4 H32 S2048 unless named
    Case("flash D128 causal=0 tma", _flash(4, HQ, HQ, 2048, 128, False), expect={"_flash_attention_fwd": ("wgmma", "tma")}),
    Case("flash D128 causal=0 ptr", _flash(4, HQ, HQ, 2048, 128, False, config={"TMA": False}), selected=False,
         expect={"_flash_attention_fwd": W}),
    Case("flash D128 causal=1 tma", _flash(4, HQ, HQ, 2048, 128, True), expect={"_flash_attention_fwd": ("wgmma", "tma")}),
    Case("flash D128 causal=1 S8192 B1 tma", _flash(1, HQ, HQ, 8192, 128, True),
         expect={"_flash_attention_fwd": ("wgmma", "tma")}),
    Case("flash D128 causal=1 S512 B1 ptr", _flash(1, HQ, HQ, 512, 128, True), expect={"_flash_attention_fwd": W}),
    Case("flash D64 causal=0 B8 H16 S1024", _flash(8, 16, 16, 1024, 64, False), expect={"_flash_attention_fwd": W}),
    Case("flash D64 causal=1 B8 H16 S1024", _flash(8, 16, 16, 1024, 64, True), expect={"_flash_attention_fwd": W}),
    Case("flash D128 bool mask", _flash(4, HQ, HQ, 2048, 128, False, mask="bool"),
         expect={"_flash_attention_fwd": ("wgmma", "tma")}),
    Case("flash D128 causal=1 additive mask", _flash(4, HQ, HQ, 2048, 128, True, mask="additive"),
         expect={"_flash_attention_fwd": ("wgmma", "tma")}),
    Case("flash D128 SPLIT 128x64 w8 tma", _flash(4, HQ, HQ, 2048, 128, False, config={
        "BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3, "TMA": True, "SPLIT": True}),
        selected=False, expect={"_flash_attention_fwd": ("wgmma", "tma")}),
    Case("flash D128 causal=1 SPLIT 128x128 w8 tma", _flash(4, HQ, HQ, 2048, 128, True, config={
        "BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3, "TMA": True, "SPLIT": True}),
        selected=False, expect={"_flash_attention_fwd": ("wgmma", "tma")}),
    Case("flash D128 SPLIT 128x64 w8 ptr", _flash(4, HQ, HQ, 2048, 128, False, config={
        "BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3, "TMA": False, "SPLIT": True}),
        selected=False, expect={"_flash_attention_fwd": W}),
    # Hopper warp specialisation (non-causal, 2 stages: where the H200 got right answers): a TMA producer and
    # two wgmma consumer warp groups, one of each loop form (whole tiles unmasked; a partial last tile, masked
    # in every tile)
    Case("flash D128 WS 128x128 s2 dtma", _flash(4, HQ, HQ, 2048, 128, False,
                                                config=dict(WS_FLASH, BLOCK_N=128, num_stages=2)),
         selected=False, no_spill=True, expect={"_flash_attention_fwd": ("wgmma", "tma", "ws")}),
    Case("flash D128 S2000 WS 128x64 s2 dtma", _flash(4, HQ, HQ, 2000, 128, False,
                                                     config=dict(WS_FLASH, num_stages=2)),
         selected=False, no_spill=True, expect={"_flash_attention_fwd": ("wgmma", "tma", "ws")}),
    # causal warp specialisation (launcher flag WS_CAUSAL, what the GPU probe enables): "ws_rows" = each consumer
    # builds its causal mask from its own 64 rows (kernels/flash_attention.py's docstring: the pass used to
    # offset start_m twice in the second consumer)
    Case("flash D128 causal=1 WS 128x64 s2 dtma (probe flag)", _flash(4, HQ, HQ, 2048, 128, True, ws_probe=True,
                                                                     config=dict(WS_FLASH, num_stages=2)),
         selected=False, no_spill=True, expect={"_flash_attention_fwd": ("wgmma", "tma", "ws", "ws_rows")}),
    Case("flash D128 causal=1 S2000 WS 128x128 s2 dtma (probe flag)",
         _flash(4, HQ, HQ, 2000, 128, True, ws_probe=True, config=dict(WS_FLASH, BLOCK_N=128, num_stages=2)),
         selected=False, no_spill=True, expect={"_flash_attention_fwd": ("wgmma", "tma", "ws", "ws_rows")}),
    Case("flash D128 causal=1 WS 128x64 s3 dtma (probe flag)", _flash(4, HQ, HQ, 2048, 128, True, ws_probe=True,
                                                                     config=dict(WS_FLASH, num_stages=3)),
         selected=False, no_spill=True, expect={"_flash_attention_fwd": ("wgmma", "tma", "ws", "ws_rows")}),
    # MIN_MASK: the specialised loop's masks as one NaN-propagating min per score (a candidate, untimed)
    Case("flash D128 causal=1 WS 128x128 s2 dtma minmask", _flash(4, HQ, HQ, 2048, 128, True, ws_probe=True,
         config=dict(WS_FLASH, BLOCK_N=128, num_stages=2, MIN_MASK=True)), selected=False, no_spill=True,
         expect={"_flash_attention_fwd": ("wgmma", "tma", "ws", "ws_rows", "min_nan")}),
    # PERSISTENT: one program per SM over the tiles (a candidate)
    Case("flash D128 WS 128x128 s2 dtma persistent", _flash(4, HQ, HQ, 2048, 128, False,
         config=dict(WS_FLASH, BLOCK_N=128, num_stages=2, PERSISTENT=1)), selected=False, no_spill=True,
         expect={"_flash_attention_fwd": ("wgmma", "tma", "ws")}),
    Case("flash D128 causal=1 WS 128x128 s2 dtma minmask persistent", _flash(4, HQ, HQ, 2048, 128, True,
         ws_probe=True, config=dict(WS_FLASH, BLOCK_N=128, num_stages=2, MIN_MASK=True, PERSISTENT=1)),
         selected=False, no_spill=True, expect={"_flash_attention_fwd": ("wgmma", "tma", "ws", "ws_rows", "min_nan")}),
    Case("flash D128 causal=1 WS 128x128 s2 dtma minmask persistent desc4", _flash(4, HQ, HKV, 4096, 128, True,
         ws_probe=True, config=dict(WS_FLASH, BLOCK_N=128, num_stages=2, MIN_MASK=True, PERSISTENT=1, DESC4=True)),
         selected=False, no_spill=True, expect={"_flash_attention_fwd": ("wgmma", "tma", "ws", "ws_rows", "min_nan")}),
    Case("flash D128 WS 128x128 s2 dtma persistent desc4", _flash(4, HQ, HQ, 2048, 128, False,
         config=dict(WS_FLASH, BLOCK_N=128, num_stages=2, PERSISTENT=1, DESC4=True)), selected=False, no_spill=True,
         expect={"_flash_attention_fwd": ("wgmma", "tma", "ws")}),
    # PTR_STORE: the output through pointers (the second consumer's rows: start_m + [64, 128), TTGIR by hand)
    Case("flash D128 causal=1 WS 128x128 s2 dtma minmask persistent ptrstore",
         _flash(4, HQ, HKV, 4096, 128, True,
                config=dict(WS_FLASH, BLOCK_N=128, num_stages=2, MIN_MASK=True, PERSISTENT=1, PTR_STORE=True)),
         selected=False, no_spill=True, expect={"_flash_attention_fwd": ("wgmma", "tma", "ws", "ws_rows", "min_nan")}),
    # ACC_MASK: the causal mask as the diagonal tile's initial QK^T accumulator (keys diagonal first)
    Case("flash D128 causal=1 WS 128x128 s2 dtma persistent ptrstore accmask",
         _flash(4, HQ, HKV, 4096, 128, True, config=dict(WS_FLASH, BLOCK_N=128, num_stages=2, MIN_MASK=True,
                                                         PERSISTENT=1, PTR_STORE=True, ACC_MASK=True)),
         selected=False, no_spill=True, expect={"_flash_attention_fwd": ("wgmma", "tma", "ws", "ws_rows")}),
    Case("flash D128 causal=1 64x64 tma persistent", _flash(4, HQ, HQ, 2048, 128, True, config=dict(PERSISTENT=2)),
         selected=False, no_spill=True, expect={"_flash_attention_fwd": ("wgmma", "tma")}),
    Case("flash D128 causal=1 S2048 WS 128x128 s2 dtma (probe flag)", _flash(4, HQ, HQ, 2048, 128, True,
         ws_probe=True, config=dict(WS_FLASH, BLOCK_N=128, num_stages=2)), selected=False, no_spill=True,
         expect={"_flash_attention_fwd": ("wgmma", "tma", "ws", "ws_rows")}),
    Case("flash D128 S2000 WS 128x64 s2 dtma minmask", _flash(4, HQ, HQ, 2000, 128, False,
         config=dict(WS_FLASH, num_stages=2, MIN_MASK=True)), selected=False, no_spill=True,
         expect={"_flash_attention_fwd": ("wgmma", "tma", "ws", "min_nan")}),
    Case("flash D80 (padded) causal=1", _flash(4, HQ, HQ, 2048, 80, True), expect={"_flash_attention_fwd": ("wgmma", "tma")}),
    Case("flash GQA 32/8 D128 S4096", _flash(4, HQ, HKV, 4096, 128, False), expect={"_flash_attention_fwd": ("wgmma", "tma")}),
    Case("flash D128 causal=1 fp16", _flash(4, HQ, HQ, 2048, 128, True, dtype="fp16"),
         expect={"_flash_attention_fwd": ("wgmma", "tma")}),
    # decode attention: Hq32 Hkv8 D128 bf16, 64-token pages
    Case("decode contiguous B1 S8192", _decode(1, 8192)),
    Case("decode contiguous B8 S32768", _decode(8, 32768)),
    Case("decode contiguous B32 S4096", _decode(32, 4096)),
    Case("decode paged B1 S8192", _decode(1, 8192, paged=True)),
    Case("decode paged B32 S4096", _decode(32, 4096, paged=True)),
    Case("decode contiguous B64 S4096 (4 stages)", _decode(64, 4096)),
    Case("decode paged B64 S4096 (4 stages)", _decode(64, 4096, paged=True)),
    Case("decode contiguous B1 S8192 FUSED_MERGE", _decode(1, 8192, fused=True), selected=False),
    Case("decode paged B1 S8192 FUSED_MERGE", _decode(1, 8192, paged=True, fused=True), selected=False),
    Case("decode contiguous B1 S8192 bool mask", _decode(1, 8192, mask="bool")),
    Case("decode contiguous B4 S4096 additive mask", _decode(4, 4096, mask="additive")),
    Case("decode append B1 S256 bool mask", _decode(1, 256, mask="bool", append=True)),
    Case("decode append B1 S4096 bool mask", _decode(1, 4096, mask="bool", append=True)),
    # KERNOPT_PDL=1: griddepcontrol in the decode path's kernels, nothing else changed (so no new spills)
    Case("decode append B1 S256 bool mask PDL", _pdl(_decode(1, 256, mask="bool", append=True)), selected=False,
         no_spill=True, expect={"_attend_split": ("pdl",), "_merge_splits_kernel": ("pdl",)}),
    Case("int4 M1 (gemv2 PAIRS) PDL", _pdl(_int4(1, ldmma=False)), selected=False, no_spill=True,
         expect={"_int4_gemv2_kernel": ("pdl",)}),
    Case("gemm gemv M1 swiglu K4096 N14336 PDL", _pdl(_gemm(1, MLP, HIDDEN, "swiglu", config=_gemv_table)),
         selected=False, no_spill=True, expect={"_gemv_kernel": ("pdl",)}),
    # int4 weight-only GEMM, K4096 N14336 g128
    Case("int4 M1 (table: ldmma)", _int4(1), no_spill=True, expect={"_int4_ldmma_kernel": ("mma_sync",)}),
    Case("int4 M8 4096^2 zeros+bias (table: ldmma)", _int4(8, N=HIDDEN, zeros=True, bias=True), no_spill=True,
         expect={"_int4_ldmma_kernel": ("mma_sync",)}),
    Case("int4 M1 zeros (ldmma TMA ring, 4 stages)", _int4(1, zeros=True, config=_LDMMA_RING), selected=False,
         no_spill=True, expect={"_int4_ldmma_ring_kernel": ("mma_sync", "tma")}),
    Case("int4 M1 zeros (ldmma TMA ring, conflict-free rows)", _int4(1, zeros=True, config={**_LDMMA_RING, "ROWS": 1}),
         selected=False, no_spill=True, expect={"_int4_ldmma_ring_kernel": ("mma_sync", "tma")}),
    Case("int4 M1 zeros (ldmma TMA ring, two steps a slot)",
         _int4(1, zeros=True, config={**_LDMMA_RING, "ROWS": 1, "SPS": 2, "STAGES": 3}), selected=False, no_spill=True,
         expect={"_int4_ldmma_ring_kernel": ("mma_sync", "tma")}),
    Case("int4 M4 K14336 N4096 zeros+bias (table: ldmma split-K 4)", _int4(4, N=HIDDEN, K=MLP, zeros=True, bias=True),
         no_spill=True, expect={"_int4_ldmma_kernel": ("mma_sync",)}),
    Case("int4 M16 K14336 N4096 zeros+bias (ldmma TMA ring, 16 warps)",
         _int4(16, N=HIDDEN, K=MLP, zeros=True, bias=True, config={**_LDMMA_RING, "BLOCK_M": 16, "num_warps": 16}),
         selected=False, expect={"_int4_ldmma_ring_kernel": ("mma_sync", "tma")}),
    Case("int4 M1 (gemv2 PAIRS)", _int4(1, ldmma=False)),
    Case("int4 M1 zeros+bias (gemv2 PAIRS)", _int4(1, zeros=True, bias=True, ldmma=False)),
    Case("int4 M1 K14336 N4096 (table: ldmma split-K 4)", _int4(1, N=HIDDEN, K=MLP),
         no_spill=True, expect={"_int4_ldmma_kernel": ("mma_sync",)}),
    Case("int4 M1 K14336 N4096 (gemv2 PAIRS, the table without ldmma)", _int4(1, N=HIDDEN, K=MLP, ldmma=False),
         expect={"_int4_gemv2_kernel": ()}),
    Case("int4 M1 swiglu (gemv2 PAIRS, gated epilogue)", _int4(1, N=2 * MLP, gated=True)),
    Case("int4 M1 swiglu zeros+bias (gemv2 PAIRS, gated epilogue)", _int4(1, N=2 * MLP, zeros=True, bias=True,
                                                                          gated=True)),
    Case("int4 M16 (table: wgr stream-K)", _int4(16), expect={"_int4_wgr_sk_kernel": ("wgmma", "tma")}),
    Case("int4 M16 zeros+bias (table: wgr stream-K)", _int4(16, zeros=True, bias=True),
         expect={"_int4_wgr_sk_kernel": ("wgmma", "tma")}),
    Case("int4 M4 (wgr stream-K, 8 rows)", _int4(4, ldmma=False), expect={"_int4_wgr_sk_kernel": ("wgmma", "tma")}),
    Case("int4 M16 4096^2 (table: wgr split-K)", _int4(16, N=HIDDEN), expect={"_int4_wgr_kernel": ("wgmma", "tma")}),
    Case("int4 M64 (table: wgr stream-K, 64 rows)", _int4(64, zeros=True, bias=True),
         expect={"_int4_wgr_sk_kernel": ("wgmma", "tma")}),
    Case("int4 M32 (table: wgr stream-K, 32 rows)", _int4(32), expect={"_int4_wgr_sk_kernel": ("wgmma", "tma")}),
    Case("int4 M16 (tiled2, the table without wgr)", _int4(16, config={
        "impl": "tiled2", "BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "SPLIT_K": 4, "num_warps": 4,
        "num_stages": 3})),
    Case("int4 M256 (dequant kernel)", _int4(256)),
    Case("int4 M1 gemv2 256x16 w8", _int4(1, pick={"impl": "gemv2", "BLOCK_N": 256, "SPLIT_K": 16, "num_warps": 8}),
         selected=False),
    Case("int4 M1 gemv2 256x16 w4 no prefetch", _int4(1, pick={"impl": "gemv2", "BLOCK_N": 256, "SPLIT_K": 16,
                                                               "num_warps": 4, "PREFETCH": 0}), selected=False),
    Case("int4 M4 gemv2 64x8 w4", _int4(4, config={"impl": "gemv2", "BLOCK_M": 4, "BLOCK_N": 64, "BLOCK_K": 128,
                                                   "SPLIT_K": 8, "PREFETCH": 1, "num_warps": 4, "num_stages": 1}),
         selected=False),
    # multi-row PAIRS (the word unpacked once, then per row), with zero points and bias: the candidates' point is
    # to keep the one-row loop's registers-only data flow, so they must not spill
    Case("int4 M4 gemv2 PAIRS 4 rows zeros+bias", _int4(4, zeros=True, bias=True, pick={
        "impl": "gemv2", "PAIRS": 1, "BLOCK_M": 4, "BLOCK_N": 32, "SPLIT_K": 16, "num_warps": 2}), selected=False,
        no_spill=True),
    Case("int4 M2 gemv2 PAIRS 2 rows symmetric", _int4(2, pick={
        "impl": "gemv2", "PAIRS": 1, "BLOCK_M": 2, "BLOCK_N": 64, "SPLIT_K": 8, "num_warps": 2}), selected=False,
        no_spill=True),
    # the table's M=2 pick for bf16 x (two-row PAIRS, 32 columns x 2 warps), symmetric and with zero points + bias
    Case("int4 M2 selected symmetric", _int4(2), no_spill=True),
    Case("int4 M2 selected zeros+bias", _int4(2, zeros=True, bias=True), no_spill=True),
    Case("int4 M16 tiled2 128x64 split4", _int4(16, pick={"impl": "tiled2", "BLOCK_N": 128, "SPLIT_K": 4}),
         selected=False),
    # tiled3: swap-AB, the weight planes as wgmma's register operand (no shared-memory store of weights)
    Case("int4 M1 tiled3 128 split4", _int4(1, pick={"impl": "tiled3", "BLOCK_N": 128, "SPLIT_K": 4,
                                                     "num_stages": 3}),
         selected=False, expect={"_int4_tiled3_kernel": ("wgmma", "cp_async")}),
    Case("int4 M16 tiled3 128 split4", _int4(16, pick={"impl": "tiled3", "BLOCK_N": 128, "SPLIT_K": 4,
                                                       "num_stages": 3}),
         selected=False, expect={"_int4_tiled3_kernel": ("wgmma", "cp_async")}),
    # tcasm: swap-AB wgmma, two nibbles per inline-PTX LOP3 straight into the register operand (candidate only)
    Case("int4 M1 tcasm 128 split8", _int4(1, pick={"impl": "tcasm", "BLOCK_N": 128, "BLOCK_K": 128, "SPLIT_K": 8}),
         selected=False, no_spill=True, expect={"_int4_tcasm_kernel": ("wgmma", "cp_async")}),
    Case("int4 M16 tcasm 256x256 w8 split8", _int4(16, pick={"impl": "tcasm", "BLOCK_N": 256, "BLOCK_K": 256,
                                                             "SPLIT_K": 8}),
         selected=False, no_spill=True, expect={"_int4_tcasm_kernel": ("wgmma", "cp_async")}),
    # wgr (kernels/int4_wgmma.py, Gluon): swap-AB wgmma, words by TMA into a ring, unpacked into the A fragment
    Case("int4 M16 wgr 64 split2", _int4(16, config={"impl": "wgr", "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128,
                                                     "SPLIT_K": 2, "num_warps": 4, "num_stages": 4}),
         selected=False, no_spill=True, expect={"_int4_wgr_kernel": ("wgmma", "tma")}),
    Case("int4 M1 wgr 64 split2 zeros+bias", _int4(1, zeros=True, bias=True, config={
        "impl": "wgr", "BLOCK_M": 8, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 2, "num_warps": 4, "num_stages": 4}),
         selected=False, no_spill=True, expect={"_int4_wgr_kernel": ("wgmma", "tma")}),
    Case("int4 M16 wgr g32 128x8w split4", _int4(16, group=32, config={
        "impl": "wgr", "BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 32, "SPLIT_K": 4, "num_warps": 8, "num_stages": 8}),
         selected=False, no_spill=True, expect={"_int4_wgr_kernel": ("wgmma", "tma")}),
    Case("int4 M16 wgr stream-K 128 zeros+bias", _int4(16, zeros=True, bias=True, config={
        "impl": "wgr", "STREAM": 1, "PARAM_TMA": 1, "BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "SPLIT_K": 1,
        "CTAS_PER_SM": 3,
        "num_warps": 4, "num_stages": 4}), selected=False, no_spill=True, expect={"_int4_wgr_sk_kernel": ("wgmma", "tma")}),
    Case("int4 M1 wgr stream-K 64 g64", _int4(1, group=64, config={
        "impl": "wgr", "STREAM": 1, "BLOCK_M": 8, "BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 1, "CTAS_PER_SM": 5,
        "num_warps": 4, "num_stages": 6}), selected=False, no_spill=True, expect={"_int4_wgr_sk_kernel": ("wgmma", "tma")}),
    Case("int4 M16 wgr stream-K WS zeros+bias", _int4(16, zeros=True, bias=True, config={
        "impl": "wgr", "STREAM": 1, "WS": 1, "BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "SPLIT_K": 1,
        "CTAS_PER_SM": 3, "num_warps": 4, "num_stages": 4}), selected=False, no_spill=True,
         expect={"_int4_wgr_ws_kernel": ("wgmma", "tma", "ws")}),
    # tgemv (kernels/int4_tgemv.py, Gluon): one row, whole-K column strips fed by a TMA ring
    Case("int4 M1 tgemv 32x64 w8 zeros+bias", _int4(1, zeros=True, bias=True, config={
        "impl": "tgemv", "BLOCK_N": 32, "ROWS": 64, "num_warps": 8, "num_stages": 4}),
         selected=False, no_spill=True, expect={"_int4_tgemv_kernel": ("tma",)}),
    Case("int4 M1 tgemv K14336 N4096 g32", _int4(1, N=HIDDEN, K=MLP, group=32, config={
        "impl": "tgemv", "BLOCK_N": 32, "ROWS": 64, "num_warps": 8, "num_stages": 6}),
         selected=False, no_spill=True, expect={"_int4_tgemv_kernel": ("tma",)}),
    Case("int4 M1 tgemv 64x128 w8 g256", _int4(1, group=256, config={
        "impl": "tgemv", "BLOCK_N": 64, "ROWS": 128, "num_warps": 8, "num_stages": 3}),
         selected=False, no_spill=True, expect={"_int4_tgemv_kernel": ("tma",)}),
    # fp8: activation quantization + swap-AB pointer kernel (decode), persistent TMA kernel (prefill)
    Case("fp8 M16 swap-AB", _fp8(16), expect={"_fp8_gemm_kernel": E4}),
    # the one-row gemv (kernels/gemm.py's, SCALED) at the 8B layer's shapes, and a split-K one
    Case("fp8 M1 gemv K4096 N14336", _fp8(1), expect={"_gemv_kernel": ()}),
    Case("fp8 M1 gemv bias prequant K14336 N4096", _fp8(1, N=HIDDEN, K=MLP, bias=True, prequant=True),
         expect={"_gemv_kernel": ()}),
    Case("fp8 M1 gemv K4096 N1024 split 4", _fp8(1, N=1024, config={
        "impl": "gemv", "BLOCK_M": 1, "BLOCK_N": 16, "BLOCK_K": 512, "SPLIT_K": 4, "num_warps": 4, "num_stages": 1}),
        selected=False, no_spill=True, expect={"_gemv_kernel": ()}),
    # the whole-K 8 x 4096 tile (q / o, and the grouped q/k/v at N = 6144), and a split-K swap-AB candidate (the
    # swapab kernel on e4m3 codes, kernels/fp8_gemm.py SPLIT_SWAPAB_CANDIDATES)
    Case("fp8 M1 gemv K4096 N6144 (grouped q/k/v)", _fp8(1, N=6144, prequant=True), expect={"_gemv_kernel": ()}),
    Case("fp8 M1 swapab split 8 K4096 N4096", _fp8(1, N=HIDDEN, config={
        "impl": "swapab", "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256, "SPLIT_K": 8, "num_warps": 4, "num_stages": 4}),
        selected=False, expect={"_gemm_swapab_kernel": E4}),
    # pipelined gemv candidates (LOAD_STAGES: tl.range cp.async stages) at multi-block tiles: 32 x 512 (K4096 N14336's
    # table tile, unstaged there) and 16 x 2048 (K14336's before its 3-stage 16 x 1024 pick, kernels/fp8_gemm.py)
    Case("fp8 M1 gemv 3 stages K4096 N14336", _fp8(1, config={
        "impl": "gemv", "BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 512, "SPLIT_K": 1, "num_warps": 4, "num_stages": 3}),
        selected=False, no_spill=True, expect={"_gemv_kernel": ()}),
    Case("fp8 M1 gemv 3 stages K14336 N4096", _fp8(1, N=HIDDEN, K=MLP, prequant=True, config={
        "impl": "gemv", "BLOCK_M": 1, "BLOCK_N": 16, "BLOCK_K": 2048, "SPLIT_K": 1, "num_warps": 4, "num_stages": 3}),
        selected=False, no_spill=True, expect={"_gemv_kernel": ()}),
    Case("fp8 M16 swap-AB bias prequant", _fp8(16, bias=True, prequant=True), expect={"_fp8_gemm_kernel": E4}),
    Case("fp8 M128 tma", _fp8(128), expect={"_fp8_gemm_tma_kernel": TMA}),
    Case("fp8 M4096 tma flatten", _fp8(4096), expect={"_fp8_gemm_tma_kernel": TMA}),
    Case("rmsnorm_quant M16 K4096", _rmsnorm_quant(16)),
]


@functools.lru_cache(maxsize=None)
def candidate_cases() -> tuple[Case, ...]:
    """Every candidate_configs entry (what a GPU --tune sweep times) at the main shapes: ``--candidates``.

    Not part of the CI test (a few hundred kernels); run it before a GPU sweep to see which candidates spill
    or do not compile. Names carry the index in the family's list, so worker processes rebuild the same cases.
    """
    from kernopt.kernels import decode_attention as da, flash_attention as fa, fp8_gemm as f8, gemm as g
    from kernopt.kernels import int4_gemm as q4

    out = []

    def add(label, configs, make):
        for i, cfg in enumerate(configs):
            out.append(Case(f"cand {label} #{i}", make(dict(cfg)), selected=False))

    for M, act, N, K in ((1, "none", HIDDEN, HIDDEN), (4, "none", HIDDEN, MLP), (16, "swiglu", MLP, HIDDEN),
                         (64, "swiglu", MLP, HIDDEN), (256, "none", MLP, HIDDEN), (4096, "none", MLP, HIDDEN),
                         (4096, "swiglu", MLP, HIDDEN)):
        add(f"gemm M{M} {act} K{K} N{N}", g.candidate_configs(M, N, K, act),
            lambda cfg, M=M, N=N, K=K, act=act: _gemm(M, N, K, act, config=cfg))
    for D, causal, S, B in ((128, False, 2048, 4), (128, True, 2048, 4), (64, True, 1024, 8)):
        add(f"flash D{D} causal={int(causal)} S{S}", fa.candidate_configs(D, causal, S, S, B * HQ),
            lambda cfg, D=D, causal=causal, S=S, B=B: _flash(B, HQ, HQ, S, D, causal, config=cfg))
    for B, S, paged in ((1, 8192, False), (1, 8192, True), (32, 4096, True)):
        add(f"decode {'paged' if paged else 'contiguous'} B{B} S{S}",
            da.candidate_configs(B, HKV, HQ, S, HEAD_DIM, SMS, 1, paged=paged),
            lambda cfg, B=B, S=S, paged=paged: _decode(B, S, paged=paged, config=cfg))
    for M in (1, 4, 16, 64):
        add(f"int4 M{M}", q4.candidate_configs(M, MLP, HIDDEN, 128), lambda cfg, M=M: _int4(M, config=cfg))
    for M in (16, 4096):
        add(f"fp8 M{M}", f8.candidate_configs(M, MLP, HIDDEN), lambda cfg, M=M: _fp8(M, config=cfg))
    return tuple(out)


def find_case(name: str) -> Case:
    for case in CASES + (list(candidate_cases()) if name.startswith("cand ") else []):
        if case.name == name:
            return case
    raise KeyError(name)


def capture(case: Case) -> tuple[dict, list[Launch]]:
    """Run the case's launcher under a Recorder: (config, launches)."""
    with Recorder() as rec:
        cfg = case.build(rec)
    return cfg, rec.launches


# --------------------------------------------------------------------------------------------------
# Compile and inspect
# --------------------------------------------------------------------------------------------------
def _resource_usage(cubin: bytes) -> dict:
    """REG / STACK / SHARED / LOCAL of the cubin's kernel from the bundled cuobjdump ({} if unavailable)."""
    from triton import knobs

    try:
        tool = knobs.nvidia.cuobjdump.path
    except Exception:  # noqa: BLE001  (a wheel without the tool)
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    return {k: int(v) for k, v in zip(("regs", "stack", "static_shared", "local"), m.groups())} if m else {}


def _ptx_facts(ptx: str) -> dict:
    mma = [line for line in ptx.splitlines() if "wgmma.mma_async" in line]
    return {
        "wgmma": bool(mma),
        "wgmma_e4m3": bool(mma) and all(".e4m3.e4m3" in line for line in mma),
        "mma_sync": "mma.sync" in ptx,
        "tma": "cp.async.bulk.tensor" in ptx,
        "cp_async": "cp.async.cg" in ptx or "cp.async.ca" in ptx,  # loads pipelined by num_stages (not TMA)
        "pdl": "griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx,  # kernels/pdl.py
        "min_nan": "min.NaN.f32" in ptx,  # NaN-propagating min (flash attention's MIN_MASK)
        "wgmma_shapes": sorted({m.group(0) for line in mma for m in [re.search(r"m64n\d+k\d+\S*?(?=\s)", line)]
                                if m}),
    }


_ROW_I32 = r"tensor<\d+xi32, #ttg\.slice<\{dim = 1,"  # a row-index vector (slice along the column axis)


def ws_row_facts(ttgir: str) -> dict:
    """How each warp-specialised partition builds its row indices (kernels/flash_attention.py's docstring).

    Triton 3.6's data partitioning slices tl.arange(0, 128) into make_range [64 k, 64 k + 64) for consumer k and
    maps the tile's descriptor row coordinate c to c + 64 k for every op it slices, so a row vector built as
    splat(c) + arange gets the offset twice. Signature of that: in a partition whose row make_range starts
    above 0, a row-vector splat of a value that partition defines as `arith.addi x, %c<N>_i32` (the added
    constant). "ws_rows": some partition's rows start above 0 (rows were split: the check is not vacuous) and
    no partition has the signature.
    """
    lines = ttgir.splitlines()
    starts = [i for i, line in enumerate(lines) if re.match(r"\s*partition\d+\(", line)]
    parts = []
    for n, i in enumerate(starts):
        end = next((j for j in range(i + 1, len(lines)) if "ttg.warp_return" in lines[j]), len(lines))
        body = lines[i:end + 1]
        ranges = [(int(m.group(2)), int(m.group(1))) for line in body if "tt.make_range" in line
                  and re.search(_ROW_I32, line)
                  for m in [re.search(r"end = (\d+) : i32, start = (\d+) : i32", line)] if m]
        plus_const = {m.group(1) for line in body
                      for m in [re.match(r"\s*(%\w+) = arith\.addi %\w+, %c\d+_i32(?:_\d+)?\b", line)] if m}
        splats = {m.group(1) for line in body if re.search(_ROW_I32, line)
                  for m in [re.search(r"tt\.splat (%\w+)", line)] if m}
        twice = any(start > 0 for start, _ in ranges) and bool(splats & plus_const)
        parts.append({"row_ranges": sorted(set(ranges)), "row_offset_twice": twice})
    split = any(start > 0 for p in parts for start, _ in p["row_ranges"])
    return {"ws_partitions": parts, "ws_rows": bool(parts) and split and not any(p["row_offset_twice"] for p in parts)}


def compile_launch(case: Case, index: int) -> dict:
    """Capture `case` again and compile its `index`-th launch for sm_90: one record (error included)."""
    from triton import knobs
    from triton.compiler import compile as triton_compile, make_backend

    rec = {"case": case.name, "index": index, "selected": case.selected, "canary": case.canary,
           "no_spill": case.no_spill}
    try:
        cfg, launches = capture(case)
        launch = launches[index]
        rec["kernel"] = launch.fn.__name__
        rec["config"] = cfg
        backend = make_backend(_target())
        src, options, rec["key"] = specialize(launch, backend)
        rec.update(num_warps=options.num_warps, num_stages=options.num_stages,
                   signature={k: str(v) for k, v in src.signature.items() if v != "constexpr"})
        knobs.nvidia.dump_ptxas_log = True
        log = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(log):
            compiled = triton_compile(src, target=_target(), options=options.__dict__)
        rec["compile_s"] = round(time.perf_counter() - t0, 2)
    except Exception as e:  # noqa: BLE001  (reported, with the compiler's message)
        rec["error"] = f"{type(e).__name__}: {e}"[-6000:]
        rec["traceback"] = traceback.format_exc()[-4000:]
        return rec
    text = log.getvalue()
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    regs = re.search(r"Used (\d+) registers", text)
    rec.update(ptxas_log=bool(regs), spill_stores=int(spill.group(1)) if spill else None,
               spill_loads=int(spill.group(2)) if spill else None, ptxas_regs=int(regs.group(1)) if regs else None)
    rec["shared"] = compiled.metadata.shared
    rec.update(regs=rec["ptxas_regs"], stack=None)  # cuobjdump's, below, when the wheel has it
    rec.update(_resource_usage(compiled.asm["cubin"]))
    rec.update(_ptx_facts(compiled.asm["ptx"]))
    # warp-specialised: TTGIR partitions (ttg.warp_specialize) and the PTX's register hand-over between them
    rec["ws"] = "ttg.warp_specialize" in compiled.asm["ttgir"] and "setmaxnreg" in compiled.asm["ptx"]
    rec.update(ws_row_facts(compiled.asm["ttgir"]))  # "ws_rows": each consumer's row indices are its own
    rec["warps_launched"] = compiled.metadata.num_warps  # 12 for the specialised kernel with num_warps 4
    rec["checks"] = list(case.expect.get(rec["kernel"], ()))
    return rec


def problems(rec: dict) -> list[str]:
    """What is wrong with a compiled kernel (the test asserts the same things)."""
    if rec.get("error"):
        lines = [line for line in rec["error"].splitlines() if line.strip()]
        return [f"does not compile: {lines[0][:200]} ... {lines[-1][:300]}" if len(lines) > 1 else
                f"does not compile: {lines[0][:300]}"]
    out = []
    if rec["shared"] > SMEM_LIMIT:
        out.append(f"shared memory {rec['shared']} B > {SMEM_LIMIT} B")
    regs = rec.get("regs")
    warps = rec.get("warps_launched") or rec["num_warps"]
    if regs is not None and regs * 32 * warps > REGISTERS:
        out.append(f"{regs} registers x {32 * warps} threads > {REGISTERS}")
    spills = bool(rec.get("stack") or rec.get("spill_stores") or rec.get("spill_loads"))
    if (rec["selected"] or rec.get("no_spill")) and spills:
        out.append(f"spills: {rec.get('spill_stores')} B stored, stack {rec.get('stack')} B")
    if rec.get("canary") and not spills:
        out.append("the canary config no longer spills: the spill check is unproven (pick another canary)")
    for check in rec.get("checks", ()):
        if not rec.get(check):
            out.append(f"PTX lacks {check}")
    return out


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------
def _without_interpreter() -> None:
    """Before triton is imported: real JITFunctions, and kernopt's launchers rather than its references."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.pop("KERNOPT_CPU", None)


def _worker_init() -> None:
    _without_interpreter()


def _compile_job(job: tuple[str, int]) -> dict:
    return compile_launch(find_case(job[0]), job[1])


def skip_reason() -> Optional[str]:
    """Why this machine cannot compile for sm_90 offline (None when it can)."""
    try:
        from triton import knobs
        from triton.backends import backends
    except Exception as e:  # noqa: BLE001
        return f"triton not importable: {e}"
    if "nvidia" not in backends:
        return "triton has no CUDA (nvidia) backend"
    try:
        ptxas = knobs.nvidia.ptxas.path
    except Exception as e:  # noqa: BLE001
        return f"no ptxas: {e}"
    if not ptxas or not os.path.exists(ptxas):
        return f"no ptxas at {ptxas!r}"
    return None


def _fmt_spills(rec: dict) -> str:
    if rec.get("spill_stores") is not None:
        return f"{rec['spill_stores']}/{rec['spill_loads']}"
    return f"stack {rec['stack']}" if rec.get("stack") is not None else "?"


def table(records: list[dict]) -> str:
    head = ("case", "kernel", "w/s", "regs", "spill st/ld", "smem KB", "mma", "tma", "s", "status")
    rows = []
    for r in records:
        if r.get("error"):
            rows.append((r["case"], r.get("kernel", "?"), "", "", "", "", "", "", "", "COMPILE ERROR"))
            continue
        mma = "wgmma" + ("-e4m3" if r["wgmma_e4m3"] else "") if r["wgmma"] else ("mma" if r["mma_sync"] else "-")
        spills = bool(r.get("stack") or r.get("spill_stores") or r.get("spill_loads"))
        status = "; ".join(problems(r)) or ("ok" if r["selected"] else "spills, as expected" if r["canary"] else
                                            "candidate: SPILLS" if spills else "ok (candidate)")
        warps = f"{r['num_warps']}" + (f"({r['warps_launched']})" if r.get("warps_launched", r["num_warps"])
                                      != r["num_warps"] else "")
        rows.append((r["case"], r["kernel"], f"{warps}/{r['num_stages']}", str(r.get("regs", "?")),
                     _fmt_spills(r), f"{r['shared'] / 1024:.1f}", mma, "yes" if r["tma"] else "-",
                     "cached" if r.get("same_as") else str(r.get("compile_s", "")), status))
    widths = [max(len(str(x[i])) for x in rows + [head]) for i in range(len(head))]
    line = lambda row: "  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(tuple("-" * w for w in widths))] + [line(r) for r in rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the records here")
    ap.add_argument("--only", help="regex: cases whose name matches")
    ap.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                    help="compile processes (default: the cores, at most 8)")
    ap.add_argument("--cache-dir", help="Triton cache to reuse (default: a fresh temporary one, so every kernel "
                                        "is compiled and ptxas reports its spills)")
    ap.add_argument("--candidates", action="store_true",
                    help="also every candidate_configs entry at the main shapes (a few hundred kernels)")
    ap.add_argument("--list", action="store_true", help="print the case names and exit")
    args = ap.parse_args(argv)
    if args.candidates:
        _without_interpreter()
    pool = CASES + (list(candidate_cases()) if args.candidates else [])
    cases = [c for c in pool if not args.only or re.search(args.only, c.name)]
    if args.list:
        print("\n".join(c.name for c in cases))
        return 0
    _without_interpreter()
    result = {"arch": f"sm_{ARCH}a", "smem_limit": SMEM_LIMIT, "records": [], "capture_errors": {}}
    reason = skip_reason()
    if reason:
        result["skip"] = reason
        print(f"skipped: {reason}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        return 0
    import triton

    result["triton"] = triton.__version__
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        cache = args.cache_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="sm90-triton-cache-"))
        os.environ["TRITON_CACHE_DIR"] = cache  # the workers inherit it

        # Capture every case here (cheap: nothing runs), then compile each distinct specialisation once.
        from triton.compiler import make_backend

        backend = make_backend(_target())
        jobs, first_of, plan = [], {}, []  # plan: (case, launch index, key, config)
        for case in cases:
            try:
                cfg, launches = capture(case)
                if not launches:
                    raise RuntimeError("the launcher launched no kernel")
                keys = [specialize(launch, backend)[2] for launch in launches]
            except Exception as e:  # noqa: BLE001
                result["capture_errors"][case.name] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"
                continue
            for i, key in enumerate(keys):
                if key not in first_of:
                    first_of[key] = (case.name, i)
                    jobs.append((case.name, i))
                plan.append((case, i, key, cfg))
        done: dict[tuple[str, int], dict] = {}
        if args.jobs > 1 and len(jobs) > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch/OpenMP state
            with ProcessPoolExecutor(max_workers=min(args.jobs, len(jobs)), mp_context=ctx,
                                     initializer=_worker_init) as pool:
                for job, rec in zip(jobs, pool.map(_compile_job, jobs)):
                    done[job] = rec
        else:
            for job in jobs:
                done[job] = _compile_job(job)
        for case, i, key, cfg in plan:
            first = first_of[key]
            rec = dict(done[first])
            if first != (case.name, i):  # the same specialisation as an earlier case's kernel
                rec.update(case=case.name, index=i, selected=case.selected, canary=case.canary, config=cfg,
                           no_spill=case.no_spill,
                           same_as=f"{first[0]} #{first[1]}", checks=list(case.expect.get(rec.get("kernel"), ())))
            result["records"].append(rec)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    records = result["records"]
    print(table(records))
    bad = {f"{r['case']} / {r.get('kernel', '?')}": p for r in records if (p := problems(r))}
    for name, err in result["capture_errors"].items():
        bad[name] = [f"launcher failed: {err.splitlines()[0]}"]
    for case in cases:  # a case whose expected kernel never launched
        launched = {r.get("kernel") for r in records if r["case"] == case.name}
        for kernel in case.expect:
            if case.name not in result["capture_errors"] and kernel not in launched:
                bad[case.name] = bad.get(case.name, []) + [f"{kernel} was not launched"]
    print(f"\n{len(records)} kernels ({len(jobs)} distinct) from {len(cases)} cases in {result['wall_s']} s, "
          f"{args.jobs} jobs; {len(bad)} with problems")
    for name, msgs in bad.items():
        print(f"  {name}: {'; '.join(msgs)}")
    for r in records:
        if r.get("error") and not r.get("same_as"):
            print(f"\n--- {r['case']} / {r.get('kernel', '?')}\n{r['error']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
