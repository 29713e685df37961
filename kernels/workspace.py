"""Arrival counters for the single-pass split kernels (int4 GEMV/tiled split-K, bf16 GEMV split-K, decode
attention's fused split merge).

Such a kernel stores its partial, bumps an int32 counter of its output tile (`tl.atomic_add`, acq_rel) and the
program that arrives last reduces and re-arms the counter to 0. The counters therefore stay zero between calls
and one zeroed buffer per device serves every call and every kernel family: calls on a stream run in order,
and a CUDA graph replays its calls in order.

Where the buffer comes from matters under CUDA graphs:
- It is allocated outside any capture, once per device (`reserve`, which the kernopt backend calls when it
  compiles a graph with CUDA inputs, before torch.compile's CUDA-graph trees warm up or record anything), and
  is never freed: graphs bake its address in.
- A capture never allocates it: a capture that finds no buffer (or one too small) gets per-call zeros from the
  capture's own pool instead (one memset node in the graph; correct, slightly slower).
- Allocating lazily inside CUDA-graph trees' warm-up would put it in the trees' private pool, whose state the
  trees checkpoint and restore: `reserve` before that is what keeps it out.

Not supported: two streams running single-pass kernels of the same device at the same time (they would share
counters). kernopt launches on the current stream; the default configs of every family are the two-kernel
ones unless a measurement selected a single-pass config.
"""
from __future__ import annotations

import threading

import torch
import triton
import triton.language as tl

RESERVE = 1 << 16  # counters (256 KB): more output tiles / (sequence, KV head) pairs than any one launch uses
_BUFFERS: dict[str, torch.Tensor] = {}
_OUTGROWN: list[torch.Tensor] = []  # replaced buffers stay alive: captured graphs hold their addresses
_LOCK = threading.Lock()


def _key(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def reserve(device, n: int = RESERVE) -> torch.Tensor:
    """The device's zeroed counter buffer, allocated now (outside any capture) with at least `n` entries."""
    key = _key(device)
    with _LOCK:
        buf = _BUFFERS.get(key)
        if buf is None or buf.numel() < n:
            if buf is not None:
                _OUTGROWN.append(buf)
            buf = _BUFFERS[key] = torch.zeros(max(n, RESERVE), dtype=torch.int32, device=key)
        return buf


def arrival_counters(device, n: int) -> torch.Tensor:
    """At least `n` zeroed int32 counters for one launch (see the module docstring)."""
    buf = _BUFFERS.get(_key(device))
    if buf is not None and buf.numel() >= n:
        return buf
    if torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.zeros(n, dtype=torch.int32, device=device)  # the capture's pool; a memset node per replay
    return reserve(device, n)


@triton.jit
def split_k_gather(part, part2, part_ptr, part2_ptr, cnt_ptr, tile, pid_k, offs, mask, stride_ps,
                   SPLIT_K: tl.constexpr, TWO: tl.constexpr):
    """The device half of single-pass split-K, for one output tile and K slice.

    Stores this slice's fp32 partial at ``part_ptr + offs + pid_k * stride_ps`` (with TWO, a second product
    sharing the tile's counter at part2_ptr: SwiGLU's up projection), then bumps the tile's arrival counter
    (acq_rel, after a barrier so every thread's partial precedes it). Returns (last, total, total2): `last` is
    true in the one slice that arrived last, whose totals are the partials summed in slice order (deterministic,
    whichever slice it is); that slice also re-arms the counter to 0. The caller writes the output when `last`.
    """
    tl.store(part_ptr + offs + pid_k.to(tl.int64) * stride_ps, part, mask=mask)
    if TWO:
        tl.store(part2_ptr + offs + pid_k.to(tl.int64) * stride_ps, part2, mask=mask)
    tl.debug_barrier()  # every thread's partial is written before the (release) arrival below
    arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
    last = arrived == SPLIT_K - 1
    total = tl.zeros_like(part)
    total2 = tl.zeros_like(part2)
    if last:
        p_ptrs = part_ptr + offs
        p2_ptrs = part2_ptr + offs
        for _ in range(SPLIT_K):
            # .cg: read the other SMs' partials from L2, never from a stale L1 line
            total += tl.load(p_ptrs, mask=mask, other=0.0, cache_modifier=".cg")
            p_ptrs += stride_ps
            if TWO:
                total2 += tl.load(p2_ptrs, mask=mask, other=0.0, cache_modifier=".cg")
                p2_ptrs += stride_ps
        tl.atomic_xchg(cnt_ptr + tile, 0)
    return last, total, total2
