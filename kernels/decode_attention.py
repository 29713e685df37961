"""Decode attention (flash-decoding): a few query tokens per sequence against a long KV cache.

What: ``out = softmax(q k^T * scale) v`` for q ``[B, Hq, Sq, D]`` with small ``Sq`` (1 for decode, up to 8 for
speculative verification; causal, aligned bottom-right: query ``i`` sees keys ``j < len - Sq + i + 1``), against
either a contiguous cache (HF static/dynamic cache layout) or a paged cache (a page pool plus a block table per
sequence, ragged lengths). GQA by index: query head ``h`` reads KV head ``h // (Hq // Hkv)``.

Algorithm (split-KV, "flash-decoding"):
1. One program per (sequence, KV head, split). It loads the ``G = Hq // Hkv`` query heads that share the KV head,
   times the ``Sq`` query tokens, as one ``[G * Sq (padded to >= 16), D]`` tile, so each K/V tile is read from
   memory once for the whole group and both products run on tensor cores (``tl.dot``).
2. The program streams its slice of the sequence in ``BLOCK_N``-token tiles with an online softmax (fp32 scores,
   scale * log2(e) folded in, exp2). Paged tiles are gathered row by row through the block table, so any page
   size works; when the page size is a multiple of ``BLOCK_N`` a tile sits inside one page and costs one table
   load. The table entries of tile i+1 are loaded during tile i, so K/V loads can be issued stages ahead.
3. When ``B * Hkv`` programs can't fill the GPU, each sequence is cut into ``SPLITS`` equal chunks (per sequence,
   so ragged batches stay balanced; the split count is a runtime argument, so growing sequences never
   recompile); every split writes its normalised partial output and log-sum-exp, and a
   second kernel merges the splits (``out = sum_s exp2(lse_s - max) o_s / sum_s exp2(lse_s - max)``).
4. ``FUSED_MERGE`` (config key; not chosen by `select_config`, swept by `candidate_configs`: on the H200 the
   sweep's best per case was within 1.5% of the two-kernel merge, decode-h200.json at bc2e425): no second kernel. Every split stores its partial as above, then bumps an int32 arrival
   counter of its (sequence, KV head) (`tl.atomic_add`, acq_rel, after a barrier so all threads' stores come
   first); the split that arrives last merges every split of its ``G * Sq`` query rows in split order
   (deterministic), writes ``out`` and re-arms the counter to 0. Why: inside a CUDA graph the merge kernel
   costs a launch gap plus a tail, a few us of a ~15 us call at B1 S8192 (the same single-pass pattern as
   kernels/int4_gemm.py's split-K). Counters: kernels/workspace.py's zeroed int32 buffer per device, shared
   by every single-pass kernel and never freed (a captured graph may point at it); every launch leaves it
   zeroed, so later calls and graph replays reuse it. Caveats (workspace.py): two launches that run
   *concurrently* on two streams would race on it; a kernel killed between its first arrival and the re-arm
   leaves counters set for later calls.
A query row that sees no key (length 0) gets zeros, never NaN.

Layouts: q/out ``[B, Hq, Sq, D]``; contiguous k/v ``[B, Hkv, S, D]`` with any strides and optional int32
``kv_lens [B]``; paged k/v pools ``[num_pages, page_size, Hkv, D]`` (a token's heads are adjacent, so appending
one token writes one contiguous ``Hkv * D`` row; within a tile each key row is ``D`` contiguous elements), int32
``block_table [B, max_pages]`` (entries past a sequence's last page are never read), int32 ``seq_lens [B]``.
Tiles and splits come from ``select_config`` (the one table), by batch, heads, the length bound and SM count.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .flash_attention import apply_mask
from .host import next_power_of_2, sm_count
from .pdl import launch_kwargs, use_pdl
from .workspace import arrival_counters as _arrival_counters

MAX_QUERY_LEN = 8  # speculative verification window; longer queries are prefill (flash_attention)
LOG2E = 1.4426950408889634
# The fused merge reads [rows, chunk, D] fp32 partial tiles of at most min(8192, 64 * BLOCK_D) elements (64
# registers a thread at 4 warps). Offline sm_90 compiles (ptxas 12.8, bf16 G4 Sq1, 64-token pages) put the fused
# kernel at D128: 106 registers (128/8/2) and 142 (64/4/3) vs 98 and 128 without it, no spills, same shared
# memory; at D64 a 8192-element tile cost 78 -> 128 registers, 4096 keep it at 80. Compile-only: no timing.
MERGE_TILE_ELEMS = 8192

# Arrival counters of the fused merge (one int32 per sequence x KV head, zero between calls): the zeroed
# buffer per device of kernels/workspace.py, shared with the other single-pass kernels (every user leaves it
# zeroed; launches on one stream run in order).


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _attend_split(
    q_ptr, k_ptr, v_ptr, lens_ptr, table_ptr, out_ptr, part_o_ptr, part_lse_ptr, cnt_ptr, mask_ptr,
    qk_scale_log2,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_tb,
    stride_mb, stride_mh, stride_mq, stride_mn,
    full_len, num_kv_heads, num_splits,
    GROUP: tl.constexpr, Q_LEN: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, HAS_LENS: tl.constexpr,
    FP32_DOT: tl.constexpr, FUSED_MERGE: tl.constexpr, MERGE_ROWS: tl.constexpr, MERGE_CHUNK: tl.constexpr,
    MASK_KIND: tl.constexpr,
    kn_ptr, vn_ptr, cos_ptr, sin_ptr, pos_ptr,
    stride_knb, stride_knh, stride_knd, stride_vnb, stride_vnh, stride_vnd, stride_cb, stride_cd, stride_sb, stride_sd,
    APPEND: tl.constexpr = False, PDL: tl.constexpr = False,
):
    if PDL:  # kernels/pdl.py: let the next PDL launch (the merge) start early, then wait for the kernel before
        gdc_launch_dependents()
        gdc_wait()
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // num_kv_heads
    h = pid_bh % num_kv_heads

    if HAS_LENS:
        seq_len = tl.load(lens_ptr + b).to(tl.int32)
    else:
        seq_len = full_len
    # Per-sequence chunks (a multiple of BLOCK_N, so tiles never straddle a split): ragged batches stay balanced.
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, seq_len)

    # Rows of the query tile: row r is query head h * GROUP + r // Q_LEN at query position r % Q_LEN.
    offs_m = tl.arange(0, BLOCK_M)
    row_head = h * GROUP + offs_m // Q_LEN
    row_pos = offs_m % Q_LEN
    row_ok = offs_m < GROUP * Q_LEN
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    # Bottom-right causal alignment: query i sees keys j < seq_len - Q_LEN + i + 1.
    row_limit = seq_len - Q_LEN + 1 + row_pos

    q_ptrs = (q_ptr + b.to(tl.int64) * stride_qb + row_head[:, None].to(tl.int64) * stride_qh
              + row_pos[:, None] * stride_qs + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if APPEND:
        # HF's rotary (x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x[D/2:], x[:D/2])) on q and the new key
        # in fp32, one rounding to the dtype (as Inductor computes it); the split holding the cache position
        # writes the key and value there, and its loop below reads them back (Q_LEN = 1, contiguous, BLOCK_D = D).
        HALF: tl.constexpr = HEAD_DIM // 2
        partner = (offs_d + HALF) % HEAD_DIM
        sign = tl.where(offs_d < HALF, -1.0, 1.0)
        cos = tl.load(cos_ptr + b.to(tl.int64) * stride_cb + offs_d * stride_cd).to(tl.float32)
        sin = tl.load(sin_ptr + b.to(tl.int64) * stride_sb + offs_d * stride_sd).to(tl.float32)
        q_pair = tl.load(q_ptrs + (partner - offs_d)[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)
        q = (q.to(tl.float32) * cos[None, :] + sign[None, :] * q_pair.to(tl.float32) * sin[None, :]).to(q.dtype)
        pos = tl.load(pos_ptr).to(tl.int32)
        if (pos >= lo) & (pos < hi):
            kn_row = kn_ptr + b.to(tl.int64) * stride_knb + h.to(tl.int64) * stride_knh
            kn = tl.load(kn_row + offs_d * stride_knd).to(tl.float32)
            kn_pair = tl.load(kn_row + partner * stride_knd).to(tl.float32)
            k_new = (kn * cos + sign * kn_pair * sin).to(k_ptr.dtype.element_ty)
            v_new = tl.load(vn_ptr + b.to(tl.int64) * stride_vnb + h.to(tl.int64) * stride_vnh + offs_d * stride_vnd)
            k_row = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh + pos.to(tl.int64) * stride_kn
            v_row = v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh + pos.to(tl.int64) * stride_vn
            tl.store(k_row + offs_d * stride_kd, k_new)
            tl.store(v_row + offs_d * stride_vd, v_new.to(v_ptr.dtype.element_ty))
            tl.debug_barrier()  # the block's writes land before any of its threads loads that row below

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    offs_n = tl.arange(0, BLOCK_N)
    if PAGED:
        k_base = k_ptr + h.to(tl.int64) * stride_kh
        v_base = v_ptr + h.to(tl.int64) * stride_vh
        table_row = table_ptr + b.to(tl.int64) * stride_tb
        # Software-pipelined block table: the page id(s) of tile i+1 are loaded during tile i, so the K/V
        # addresses of a tile depend on a loop-carried value, not on a load of the same iteration. With the
        # load in the same iteration Triton's pipeliner counts K/V as a second level of indirection and
        # gives them half the stages: one tile in flight, each behind a table round trip (3x slower than
        # the contiguous kernel at B1 S8192 on the H100, where each split streams only 4 tiles).
        if PAGE_SIZE % BLOCK_N == 0:
            # A tile lies inside one page: one table entry per tile, rows affine within the page.
            next_page = tl.load(table_row + lo // PAGE_SIZE, mask=lo < hi, other=0)
        else:
            next_page = tl.load(table_row + (lo + offs_n) // PAGE_SIZE, mask=(lo + offs_n) < hi, other=0)
    else:
        k_base = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
        v_base = v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh

    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < hi
        if PAGED:
            page = next_page.to(tl.int64)
            nxt = start + BLOCK_N
            if PAGE_SIZE % BLOCK_N == 0:
                next_page = tl.load(table_row + nxt // PAGE_SIZE, mask=nxt < hi, other=0)
                slot = (start % PAGE_SIZE) + offs_n
            else:
                next_page = tl.load(table_row + (nxt + offs_n) // PAGE_SIZE, mask=(nxt + offs_n) < hi, other=0)
                slot = cols % PAGE_SIZE  # rows past hi read page 0 under the mask below: never dereferenced
            k_rows = page * stride_kb + slot * stride_kn
            v_rows = page * stride_vb + slot * stride_vn
        else:
            k_rows = cols.to(tl.int64) * stride_kn
            v_rows = cols.to(tl.int64) * stride_vn
        if BLOCK_D == HEAD_DIM:
            kv_mask = col_ok[:, None]  # no mask along D: loads stay full-width vectors
        else:
            kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + k_rows[:, None] + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + v_rows[:, None] + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)

        if FP32_DOT:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        # scale * log2(e) applied to the fp32 scores (not to a rounded bf16 q), then exp2 throughout.
        s = s * qk_scale_log2
        visible = col_ok[None, :] & (cols[None, :] < row_limit[:, None])
        if MASK_KIND != 0:
            # The caller's mask [B, Hq, Sq, S] through its strides (0 on broadcast dims): 1 byte (bool) or one
            # float per key and row, against 2 * Hkv * D * 2 bytes of K/V per key: noise in the traffic.
            m_ptrs = (mask_ptr + b.to(tl.int64) * stride_mb + row_head[:, None].to(tl.int64) * stride_mh
                      + row_pos[:, None] * stride_mq + cols[None, :].to(tl.int64) * stride_mn)
            mvals = tl.load(m_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0)
            s, visible = apply_mask(s, visible, mvals, MASK_KIND)
        s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows that have seen no key yet keep m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if FP32_DOT:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    out_mask = row_ok[:, None] & d_ok[None, :]
    if not SPLIT:
        o_ptrs = (out_ptr + b.to(tl.int64) * stride_ob + row_head[:, None].to(tl.int64) * stride_oh
                  + row_pos[:, None] * stride_os + offs_d[None, :] * stride_od)
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # Partials [B, Hq, Q_LEN, splits, HEAD_DIM] (fp32) and lse [B, Hq, Q_LEN, splits] (log2 units).
        row_id = (b * (num_kv_heads * GROUP) + row_head).to(tl.int64) * Q_LEN + row_pos
        lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(part_lse_ptr + row_id * num_splits + split, lse, mask=row_ok)
        po_ptrs = part_o_ptr + (row_id[:, None] * num_splits + split) * HEAD_DIM + offs_d[None, :]
        tl.store(po_ptrs, o, mask=out_mask)
        if FUSED_MERGE:
            tl.debug_barrier()  # every thread's partial is written before the (release) arrival below
            arrived = tl.atomic_add(cnt_ptr + pid_bh, 1, sem="acq_rel", scope="gpu")
            if arrived == num_splits - 1:
                _merge_group(part_o_ptr, part_lse_ptr, out_ptr, b, h, num_kv_heads, num_splits,
                             stride_ob, stride_oh, stride_os, stride_od,
                             GROUP, Q_LEN, HEAD_DIM, BLOCK_D, MERGE_ROWS, MERGE_CHUNK)
                tl.atomic_xchg(cnt_ptr + pid_bh, 0)  # re-armed for the next call (or graph replay)


@triton.jit
def _merge_group(part_o_ptr, part_lse_ptr, out_ptr, b, h, num_kv_heads, num_splits,
                 stride_ob, stride_oh, stride_os, stride_od,
                 GROUP: tl.constexpr, Q_LEN: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 MERGE_ROWS: tl.constexpr, MERGE_CHUNK: tl.constexpr):
    """Fused merge: all ``GROUP * Q_LEN`` query rows of one (sequence, KV head), every split, in split order.

    Run by the split that arrives last. The splits are read ``MERGE_CHUNK`` at a time as one
    ``[MERGE_ROWS, MERGE_CHUNK, BLOCK_D]`` tile (a chunk's loads are in flight together, not one L2 round
    trip per split) and folded in with an online rescale: running max ``m`` of the lse (log2 units),
    ``num = sum_s exp2(lse_s - m) o_s``, ``den = sum_s exp2(lse_s - m)``. Same order on every call, whichever
    split is last: deterministic. Empty splits (lse = -inf) weigh 0 and are selected out (never 0 * garbage);
    a row that saw no key in any split gets 0.
    """
    offs_r = tl.arange(0, MERGE_ROWS)
    offs_c = tl.arange(0, MERGE_CHUNK)
    offs_d = tl.arange(0, BLOCK_D)
    r_ok = offs_r < GROUP * Q_LEN
    d_ok = offs_d < HEAD_DIM
    head = h * GROUP + offs_r // Q_LEN
    pos = offs_r % Q_LEN
    row_id = (b * (num_kv_heads * GROUP) + head).to(tl.int64) * Q_LEN + pos
    m = tl.full([MERGE_ROWS], float("-inf"), tl.float32)
    den = tl.zeros([MERGE_ROWS], tl.float32)
    num = tl.zeros([MERGE_ROWS, BLOCK_D], tl.float32)
    for s0 in range(0, num_splits, MERGE_CHUNK):
        sp = s0 + offs_c
        ok = r_ok[:, None] & (sp < num_splits)[None, :]
        slot = row_id[:, None] * num_splits + sp[None, :]  # [MERGE_ROWS, MERGE_CHUNK]
        # .cg: the other programs' partials are read from L2, never from a stale L1 line
        lse = tl.load(part_lse_ptr + slot, mask=ok, other=float("-inf"), cache_modifier=".cg")
        o = tl.load(part_o_ptr + slot[:, :, None] * HEAD_DIM + offs_d[None, None, :],
                    mask=ok[:, :, None] & d_ok[None, None, :], other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m, tl.max(lse, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key seen yet: every weight stays 0
        alpha = tl.exp2(m - m_safe)
        w = tl.exp2(lse - m_safe[:, None])
        num = num * alpha[:, None] + tl.sum(tl.where((w > 0.0)[:, :, None], o * w[:, :, None], 0.0), 1)
        den = den * alpha + tl.sum(w, 1)
        m = m_new
    res = num / tl.where(den > 0.0, den, 1.0)[:, None]
    o_ptrs = (out_ptr + b.to(tl.int64) * stride_ob + head[:, None].to(tl.int64) * stride_oh
              + pos[:, None] * stride_os + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, res.to(out_ptr.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :])


@triton.jit
def _merge_splits_kernel(
    part_o_ptr, part_lse_ptr, out_ptr,
    stride_ob, stride_oh, stride_os, stride_od,
    num_q_heads, num_splits,
    Q_LEN: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr = False,
):
    if PDL:  # kernels/pdl.py: the partials are the split kernel's writes
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0).to(tl.int64)  # over B * Hq * Q_LEN
    pos = row % Q_LEN
    head = (row // Q_LEN) % num_q_heads
    b = row // (Q_LEN * num_q_heads)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    d_ok = offs_d < HEAD_DIM
    lse = tl.load(part_lse_ptr + row * num_splits + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m_safe)  # 0 for empty splits
    o = tl.load(part_o_ptr + (row * num_splits + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
                mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    # Empty splits never wrote their partial output: select, don't multiply, so garbage can't leak in.
    num = tl.sum(tl.where((w > 0.0)[:, None], o * w[:, None], 0.0), 0)
    den = tl.sum(w, 0)
    res = num / tl.where(den > 0.0, den, 1.0)
    tl.store(out_ptr + b * stride_ob + head * stride_oh + pos * stride_os + offs_d * stride_od,
             res.to(out_ptr.dtype.element_ty), mask=d_ok)


# --------------------------------------------------------------------------------------------------
# Config: the one shape -> config table of this family
# --------------------------------------------------------------------------------------------------
def select_config(batch: int, kv_heads: int, q_heads: int, max_len: int, head_dim: int,
                  sm_count: int = 132, q_len: int = 1, paged: bool = False) -> dict:
    """Tiles, warps, stages and KV splits for decode attention (``paged``: the block-table kernel).

    Decode is memory-bound: the goal is every SM streaming K/V with several tiles in flight. The table, by
    regime (``programs = batch * kv_heads``, one program per sequence and KV head before splitting), from the
    H200 decode suite's config sweep (benchmarks/results/decode-h200.json, commit bc2e425, CUDA-graph
    replay, bf16 Hq32 Hkv8 D128, 64-token pages):

    regime (the middle one only for D 65-128 and G*Sq < 64)      BLOCK_N  warps  stages  splits: per SM, min tiles
    sm_count/4 <= programs < sm_count: contiguous                128      4      3       2 (rounded down), 4
                                       paged                     64       8      3       2 (rounded down), 4
        B8 S32768: paged 4.37 TB/s (the sweep's best) vs 4.02 for the default row (64/4/3, 9 splits);
        contiguous 4.40 (within 1.3% of the sweep's best)
      >= 0.7 * sm_count programs (D128, G*Sq < 64): contiguous 128   4      3       1 (no split)
      >= 0.9 * sm_count programs                  paged      64    4      4       1 (no split)
    default (D <= 64 / 65-128 / > 128)                           128/64/32 4     3 (2 for D > 128)  ~4, 4
        D65-128 with G*Sq < 64: 2 per SM (rounded down), 4 stages when > 3 * sm_count programs stay unsplit
        B1 S8192: paged 2.37 TB/s, the sweep's best (64/4/3, 32 splits); the H100's paged B1 row
        (128/8/2, ~4 splits, 1 tile, measured by do_bench before the block-table prefetch) got 1.87 here.
        B1 contiguous 2.38 (best 2.41). 2 per SM and 4 stages (sweeps/decode_table, benchmarks/decode_probe.py
        --cases, 17cf301 / 14df5ec): B1 S16384 / S32768 23.1 / 38.6 us (64 / 66 splits: ~25.4 / 43.1; SDPA 23.0 /
        37.6), B2 / B4 S8192 22.2 / 37.2 (SDPA 22.4 / 37.2), B32 S4096 one split 4.33-4.35 TB/s (3 splits:
        4.09-4.12; SDPA 4.34), B64 S4096 247.4 us (SDPA 246.9), B128 S2048 249.7 (SDPA 247.0)

    short cache (< 8 splits by the rows above where >= 8 are wanted;   max_len/8 within 32..BLOCK_N, 8 splits
      >= 256 tokens, narrow query tile: B1 S256 / S1024)

    A wide query tile (G * Sq >= 64) halves BLOCK_N: the score tile becomes the register bottleneck. Splits
    never go past 128. ``FUSED_MERGE`` (`fused`) is not picked: the sweep's best per case was within 1.5% of
    the two-kernel merge either way (B1 contiguous 2.41 fused vs 2.40; paged 2.21 vs 2.37).
    """
    group = max(1, q_heads // max(1, kv_heads))
    block_d = next_power_of_2(head_dim)
    block_m = max(16, next_power_of_2(group * q_len))
    programs = max(1, batch * kv_heads)
    warps, stages = 4, (3 if block_d <= 128 else 2)
    per_sm, min_tiles, round_up = 4, 4, True
    if block_d <= 64:
        block_n = 128
    elif block_d <= 128:
        block_n = 64
    else:
        block_n = 32
    narrow_d128 = block_d == 128 and block_m < 64  # the measured rows below (Llama-style GQA decode)
    if narrow_d128:
        # D128 narrow query tiles aim at 2 programs per SM (rounded down) in every regime: H200 A/B (sweeps/
        # decode_table, benchmarks/decode_probe.py --cases) against 4 per SM (rounded up): B1 S16384 32 splits 22.35
        # us against 64's 25.60, B1 S32768 33 splits 39.06 against 66's 43.58, B32 S4096 1 split 125.5 against 3's
        # 132.0 (contiguous; B1 S <= 8192 keeps its splits: the 4-tile floor binds first).
        per_sm, round_up = 2, False
        if (10 * programs >= (9 if paged else 7) * sm_count) and programs < sm_count:
            # Nearly one program per SM already: no split (no merge, no partials). H200 (sweeps/decode_table,
            # c8a6296; us, contiguous / paged against the 2-split rows): B12 S4096 49.4 / 58.3 against 58.0 / 57.6
            # (SDPA 50.6), B16 S4096 63.6 / 64.5 against 68.6 / 67.3 (SDPA 64.0), B16 S16384 240.1 / 244.3 against
            # 244.9 / 244.9 (SDPA 240.4). Again at b8455fc: B12 49.9 / 63.0 (SDPA 51.6), B16 64.7 / 65.9 (65.1),
            # B16 S16384 245.4 / 244.2 (245.0). Paged B12 lost there, so paged waits for 0.9 program per SM.
            per_sm = 1
            if paged:
                stages = 4
            else:
                block_n = 128
        elif sm_count <= 4 * programs < 4 * sm_count:
            if paged:
                warps = 8
            else:
                block_n = 128
    if block_m >= 64 and block_n > 32:
        block_n //= 2  # a wide query tile (G * Sq >= 64) makes the score tile the register bottleneck
    tiles = max(1, math.ceil(max_len / block_n))
    splits = 1
    if programs < per_sm * sm_count:
        want = per_sm * sm_count / programs
        want = math.ceil(want) if round_up else int(want)
        splits = max(1, min(want, tiles // min_tiles, 128))
        if _short_cache(splits, want, block_m, max_len):
            # Short caches (min_tiles leaves < 8 splits while the GPU wants more programs): 8 splits of one or two
            # tiles, tiles of max_len / 8 within 32..BLOCK_N. H200 sweep (sweeps/decode-short-h200.json, 9506a06,
            # B1 Hq32 Hkv8 D128, the int4 llama decode step's case): S256 best 32 x 8 splits, 0.206 / 0.223 TB/s
            # (paged / contiguous; 5.0 / 4.7 us) against the 1-split row's 0.185 / 0.183 (5.7 us); S1024 paged
            # 64 x 8 splits 0.571 against the 4-split row's 0.492 (contiguous best 128 x 8: 0.631 against 0.466).
            block_n = max(32, min(block_n, next_power_of_2(math.ceil(max_len / _SHORT_SPLITS))))
            splits = min(_SHORT_SPLITS, math.ceil(max_len / block_n))
    if narrow_d128 and block_n == 64 and programs > 3 * sm_count:
        # More unsplit programs than one wave of the 3-stage tile (3 per SM by shared memory): 4 stages (2 per SM)
        # stream better than a second, partial wave of 3-stage programs. H200, us (sweeps/decode_table, two runs):
        # B64 S4096 243.6 / 250.1 against 269.2 / 281.9 (paged 251.4 against 285.7), B128 S2048 252.8 against 271.1
        # (paged 253.4 against 273.5; the other run 249.6 against 252.1).
        stages = 4
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "SPLITS": splits, "num_warps": warps, "num_stages": stages}


_SHORT_SPLITS = 8


def _short_cache(splits: int, want: int, block_m: int, max_len: int) -> bool:
    """select_config's short-cache row: the tile rule leaves fewer than 8 splits where the GPU wants >= 8 programs
    per (sequence, KV head), with a narrow query tile and >= 8 tiles of 32 (shorter caches are unmeasured)."""
    return splits < _SHORT_SPLITS <= want and block_m < 64 and max_len >= 32 * _SHORT_SPLITS


def fused(config: dict) -> dict:
    """`config` with the single-pass merge (``FUSED_MERGE``); measured no faster than the merge kernel (H200),
    so never `select_config`'s pick."""
    return {**config, "FUSED_MERGE": True}


def candidate_configs(batch: int, kv_heads: int, q_heads: int, max_len: int, head_dim: int,
                      sm_count: int = 132, q_len: int = 1, paged: bool = False) -> list[dict]:
    """Configs around the table's choice, for `kernopt.workload.autotune` and the benchmark's sweep.

    Every split config comes twice: with the merge kernel and with the fused (single-pass) merge, so a sweep
    decides between them; the table's choice and its fused variant come first.
    """
    base = select_config(batch, kv_heads, q_heads, max_len, head_dim, sm_count, q_len, paged)
    out = [base]
    # Short caches (the table's short-cache row, 8 splits, or 1 split below 256 tokens) also try 1-4 splits.
    splits0 = base["SPLITS"]
    mults = (1, 2, 4, 8) if splits0 == 1 else (0.125, 0.25, 0.5, 1, 2) if splits0 <= _SHORT_SPLITS else (0.5, 1, 2)
    for block_n in (32, 64, 128):
        for stages in (2, 3, 4):
            for warps in (4, 8):
                for mult in mults:
                    splits = max(1, min(256, int(round(base["SPLITS"] * mult))))
                    if splits > 1 and ((block_n * 4 > max_len and splits0 == 1) or splits * block_n > max_len):
                        continue  # (splits of less than one tile would be empty)
                    cfg = {**base, "BLOCK_N": block_n, "num_stages": stages, "num_warps": warps, "SPLITS": splits}
                    if cfg not in out:
                        out.append(cfg)
    return [v for cfg in out for v in ((cfg, fused(cfg)) if cfg["SPLITS"] > 1 else (cfg,))]


def config_string(config: dict) -> str:
    """One line per config; split configs end in ``merge=kernel`` (second kernel) or ``merge=fused``."""
    text = (f"BLOCK_M={config['BLOCK_M']} BLOCK_N={config['BLOCK_N']} splits={config['SPLITS']} "
            f"warps={config['num_warps']} stages={config['num_stages']}")
    if int(config["SPLITS"]) > 1:
        text += " merge=fused" if config.get("FUSED_MERGE") else " merge=kernel"
        if config.get("MERGE_CHUNK"):
            text += f" merge_chunk={config['MERGE_CHUNK']}"
    return text


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------
def _check_q(q: torch.Tensor, kv_heads: int, head_dim: int, name: str) -> None:
    if q.dim() != 4:
        raise ValueError(f"{name}: q must be [B, Hq, Sq, D], got shape {tuple(q.shape)}")
    b, hq, sq, d = q.shape
    if d != head_dim:
        raise ValueError(f"{name}: q head_dim {d} != k/v head_dim {head_dim}")
    if kv_heads == 0 or hq % kv_heads:
        raise ValueError(f"{name}: q heads {hq} must be a multiple of kv heads {kv_heads}")
    if not 1 <= sq <= MAX_QUERY_LEN:
        raise ValueError(f"{name}: query length {sq} not in 1..{MAX_QUERY_LEN} (longer queries are prefill: "
                         "use flash_attention)")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{name}: dtype {q.dtype} not supported; valid: float16, bfloat16, float32")


def _check_mask(mask: Optional[torch.Tensor], shape: tuple, device: torch.device, name: str
                ) -> Optional[torch.Tensor]:
    """The mask as a [B, Hq, Sq, S] view (stride 0 on broadcast dims), or a ValueError naming what is wrong."""
    if mask is None:
        return None
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise ValueError(f"{name}: mask dtype {mask.dtype} not supported; valid: bool (True = attend) or float "
                         "(added to the scores)")
    if mask.device != device:
        raise ValueError(f"{name}: mask on {mask.device}, q on {device}")
    if mask.dim() > 4:
        raise ValueError(f"{name}: mask {tuple(mask.shape)} has more than 4 dims")
    try:
        return torch.broadcast_to(mask, shape)
    except RuntimeError:
        raise ValueError(f"{name}: mask {tuple(mask.shape)} not broadcastable to {shape}") from None


def _out(q: torch.Tensor, head_dim_v: int, out: Optional[torch.Tensor], name: str) -> torch.Tensor:
    shape = (*q.shape[:3], head_dim_v)
    if out is None:
        return torch.empty(shape, dtype=q.dtype, device=q.device)
    if tuple(out.shape) != shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"{name}: out must be {shape} {q.dtype} on {q.device}, got {tuple(out.shape)} "
                         f"{out.dtype} on {out.device}")
    return out


def _launch(q, k, v, lens, table, out, sm_scale, config, paged, page_size, full_len, kv_heads,
            k_strides, v_strides, table_stride, mask=None, append=None):
    b, hq, sq, d = q.shape
    mask_kind, mask_arg, mask_strides = 0, q, (0, 0, 0, 0)
    if mask is not None:  # already broadcast to [B, Hq, Sq, S] (a view: stride 0 on broadcast dims)
        mask_kind, mask_arg = (1, mask.view(torch.uint8)) if mask.dtype == torch.bool else (2, mask)
        mask_strides = mask.stride()
    group = hq // kv_heads
    cfg = dict(config)
    splits = int(cfg["SPLITS"])
    block_m = max(int(cfg["BLOCK_M"]), next_power_of_2(group * sq), 16)
    block_d = max(16, next_power_of_2(d))
    fused = splits > 1 and bool(cfg.get("FUSED_MERGE", False))
    if splits > 1:
        part_o = torch.empty((b, hq, sq, splits, d), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((b, hq, sq, splits), dtype=torch.float32, device=q.device)
    else:
        part_o = part_lse = out  # unused
    counters = _arrival_counters(q.device, b * kv_heads) if fused else part_lse  # unused unless fused
    # The fused merge's tile: rows = the group's query rows (not BLOCK_M's dot padding), splits MERGE_CHUNK at a
    # time; a config may set MERGE_CHUNK (a power of two), else the [rows, chunk, D] tile is the budget above.
    merge_rows = max(2, next_power_of_2(group * sq))
    tile = min(MERGE_TILE_ELEMS, 64 * block_d)
    merge_chunk = int(cfg.get("MERGE_CHUNK") or max(1, min(32, tile // (merge_rows * block_d))))
    if merge_chunk < 1 or merge_chunk & (merge_chunk - 1):
        raise ValueError(f"decode attention: MERGE_CHUNK must be a power of two >= 1, got {merge_chunk}")
    dummy = lens if lens is not None else q
    pdl = use_pdl(q)
    grid = (b * kv_heads, splits)
    _attend_split[grid](
        q, k, v, dummy, table if table is not None else dummy, out, part_o, part_lse, counters, mask_arg,
        float(sm_scale) * LOG2E,
        *q.stride(), *k_strides, *v_strides, *out.stride(), table_stride, *mask_strides,
        full_len, kv_heads, splits,
        GROUP=group, Q_LEN=sq, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=int(cfg["BLOCK_N"]), BLOCK_D=block_d,
        SPLIT=splits > 1, PAGED=paged, PAGE_SIZE=page_size, HAS_LENS=lens is not None,
        FP32_DOT=q.dtype == torch.float32, FUSED_MERGE=fused, MERGE_ROWS=merge_rows,
        MERGE_CHUNK=merge_chunk, MASK_KIND=mask_kind,
        **_append_args(q, append), APPEND=append is not None, PDL=pdl,
        num_warps=int(cfg["num_warps"]), num_stages=int(cfg["num_stages"]), **launch_kwargs(pdl),
    )
    if splits > 1 and not fused:
        _merge_splits_kernel[(b * hq * sq,)](
            part_o, part_lse, out, *out.stride(), hq, splits,
            Q_LEN=sq, HEAD_DIM=d, BLOCK_S=max(2, next_power_of_2(splits)),
            BLOCK_D=block_d, PDL=pdl, num_warps=4, **launch_kwargs(pdl),
        )
    return out


def _append_args(q: torch.Tensor, append: Optional[tuple]) -> dict:
    """_attend_split's APPEND operands: (k_new, v_new, cos, sin, position) pointers and their strides (k_new / v_new
    [B, Hkv, 1, D], cos / sin [B, D] views), or dummies."""
    names = ("stride_knb", "stride_knh", "stride_knd", "stride_vnb", "stride_vnh", "stride_vnd", "stride_cb",
             "stride_cd", "stride_sb", "stride_sd")
    if append is None:
        return {"kn_ptr": q, "vn_ptr": q, "cos_ptr": q, "sin_ptr": q, "pos_ptr": q, **dict.fromkeys(names, 0)}
    k_new, v_new, cos, sin, pos = append
    strides = (k_new.stride(0), k_new.stride(1), k_new.stride(3), v_new.stride(0), v_new.stride(1), v_new.stride(3),
               cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1))
    return {"kn_ptr": k_new, "vn_ptr": v_new, "cos_ptr": cos, "sin_ptr": sin, "pos_ptr": pos, **dict(zip(names, strides))}


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lens: Optional[torch.Tensor] = None,
                     sm_scale: Optional[float] = None, config: Optional[dict] = None,
                     out: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Decode attention on a contiguous cache: q [B, Hq, Sq<=8, D], k/v [B, Hkv, S, D] (any strides).

    kv_lens: optional int32 [B] valid lengths (None: all S keys). Causal, aligned bottom-right.
    mask: optional bool (True = attend, SDPA's meaning) or additive float mask broadcastable to [B, Hq, Sq, S]
    (HF's static-cache decode mask, [B, 1, 1, S]); it applies on top of the lengths and the causal rule
    (which is no restriction at Sq = 1). A row that sees no key gives zeros.
    """
    name = "decode_attention"
    if k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"{name}: k and v must both be [B, Hkv, S, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    bk, hkv, s, d = k.shape
    _check_q(q, hkv, d, name)
    if bk != q.shape[0]:
        raise ValueError(f"{name}: batch of q ({q.shape[0]}) and k/v ({bk}) differ")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{name}: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if kv_lens is not None:
        if kv_lens.shape != (bk,) or kv_lens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name}: kv_lens must be int32 [B={bk}], got {tuple(kv_lens.shape)} {kv_lens.dtype}")
        kv_lens = kv_lens.to(device=q.device, dtype=torch.int32).contiguous()
    mask = _check_mask(mask, (bk, q.shape[1], q.shape[2], s), q.device, name)
    out = _out(q, d, out, name)
    if sm_scale is None:
        sm_scale = d ** -0.5
    if config is None:
        config = select_config(bk, hkv, q.shape[1], s, d, sm_count(q.device), q.shape[2])
    return _launch(q, k, v, kv_lens, None, out, sm_scale, config, paged=False, page_size=1, full_len=s,
                   kv_heads=hkv, k_strides=k.stride(), v_strides=v.stride(), table_stride=0, mask=mask)


def _rope_operands(q, k_new, v_new, cos, sin, k_cache, v_cache, cache_position, name):
    """Checks of decode_attention_append's operands; cos / sin as [B, D] views (stride 0 where broadcast)."""
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"{name}: k_cache and v_cache must both be [B, Hkv, S, D], got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    b, hkv, s, d = k_cache.shape
    _check_q(q, hkv, d, name)
    if q.shape[0] != b or q.shape[2] != 1:
        raise ValueError(f"{name}: q must be [B={b}, Hq, 1, D], got {tuple(q.shape)}")
    for t, what in ((k_new, "k_new"), (v_new, "v_new")):
        if tuple(t.shape) != (b, hkv, 1, d):
            raise ValueError(f"{name}: {what} must be [B, Hkv, 1, D] = {(b, hkv, 1, d)}, got {tuple(t.shape)}")
    if len({t.dtype for t in (q, k_new, v_new, k_cache, v_cache)}) != 1:
        raise ValueError(f"{name}: q, k_new, v_new and the caches must share one dtype")
    if d % 2 or d != next_power_of_2(d) or d < 16:
        raise ValueError(f"{name}: head_dim {d} must be a power of two >= 16 (rotate_half pairs d with d + D/2)")
    if cache_position.numel() != 1 or cache_position.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: cache_position must hold one int32/int64 position (the batch's), got "
                         f"{tuple(cache_position.shape)} {cache_position.dtype}")
    rows = []
    for t, what in ((cos, "cos"), (sin, "sin")):
        try:
            rows.append(torch.broadcast_to(t, (b, 1, 1, d))[:, 0, 0, :])  # [B, D], stride 0 where broadcast
        except RuntimeError:
            raise ValueError(f"{name}: {what} must broadcast to [B, 1, 1, D] = {(b, 1, 1, d)}, got "
                             f"{tuple(t.shape)}") from None
    if any(t.device != q.device for t in (k_new, v_new, cos, sin, k_cache, v_cache, cache_position)):
        raise ValueError(f"{name}: every operand must be on {q.device}")
    return rows[0], rows[1], cache_position.reshape(1)


def decode_attention_append(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, cos: torch.Tensor,
                            sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            cache_position: torch.Tensor, sm_scale: Optional[float] = None,
                            mask: Optional[torch.Tensor] = None, config: Optional[dict] = None,
                            out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One decode step of HF's static cache in one kernel: rotary on q [B, Hq, 1, D] and the new key [B, Hkv, 1, D]
    (``x * cos + rotate_half(x) * sin``; cos / sin broadcastable to [B, 1, 1, D]), the key and ``v_new`` written
    into k_cache / v_cache [B, Hkv, S, D] at ``cache_position`` (one position for the batch, as StaticLayer.update
    writes it), then decode_attention over the caches with the optional mask. Mutates k_cache and v_cache.
    A position outside 0..S-1 writes nothing (StaticLayer's index_copy_ would raise)."""
    name = "decode_attention_append"
    cos2, sin2, pos = _rope_operands(q, k_new, v_new, cos, sin, k_cache, v_cache, cache_position, name)
    b, hkv, s, d = k_cache.shape
    mask = _check_mask(mask, (b, q.shape[1], 1, s), q.device, name)
    out = _out(q, d, out, name)
    if sm_scale is None:
        sm_scale = d ** -0.5
    if config is None:
        config = select_config(b, hkv, q.shape[1], s, d, sm_count(q.device), 1)
    return _launch(q, k_cache, v_cache, None, None, out, sm_scale, config, paged=False, page_size=1, full_len=s,
                   kv_heads=hkv, k_strides=k_cache.stride(), v_strides=v_cache.stride(), table_stride=0, mask=mask,
                   append=(k_new, v_new, cos2, sin2, pos))


def paged_decode_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                           block_table: torch.Tensor, seq_lens: torch.Tensor, sm_scale: Optional[float] = None,
                           config: Optional[dict] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Decode attention on a paged cache.

    q [B, Hq, Sq<=8, D]; k_pages/v_pages [num_pages, page_size, Hkv, D] (D may have any stride, the rest too);
    block_table int32 [B, max_pages]: page ids of each sequence in order; seq_lens int32 [B] (ragged).
    """
    name = "paged_decode_attention"
    if k_pages.dim() != 4 or v_pages.shape != k_pages.shape:
        raise ValueError(f"{name}: k_pages and v_pages must both be [num_pages, page_size, Hkv, D], got "
                         f"{tuple(k_pages.shape)} and {tuple(v_pages.shape)}")
    _, page_size, hkv, d = k_pages.shape
    _check_q(q, hkv, d, name)
    b = q.shape[0]
    if k_pages.dtype != q.dtype or v_pages.dtype != q.dtype:
        raise ValueError(f"{name}: q, k_pages, v_pages dtypes differ ({q.dtype}, {k_pages.dtype}, {v_pages.dtype})")
    if block_table.dim() != 2 or block_table.shape[0] != b or block_table.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: block_table must be int32 [B={b}, max_pages], got {tuple(block_table.shape)} "
                         f"{block_table.dtype}")
    if seq_lens.shape != (b,) or seq_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: seq_lens must be int32 [B={b}], got {tuple(seq_lens.shape)} {seq_lens.dtype}")
    if block_table.dtype != torch.int32 or block_table.stride(1) != 1:
        block_table = block_table.to(torch.int32).contiguous()
    seq_lens = seq_lens.to(torch.int32).contiguous()
    out = _out(q, d, out, name)
    if sm_scale is None:
        sm_scale = d ** -0.5
    # The block table's width bounds every length without reading seq_lens back to the host.
    max_len = block_table.shape[1] * page_size
    if config is None:
        config = select_config(b, hkv, q.shape[1], max_len, d, sm_count(q.device), q.shape[2], paged=True)
    # Kernel strides for the paged layout are (page, head, slot, dim).
    ks, vs = k_pages.stride(), v_pages.stride()
    return _launch(q, k_pages, v_pages, seq_lens, block_table, out, sm_scale, config, paged=True,
                   page_size=page_size, full_len=max_len, kv_heads=hkv,
                   k_strides=(ks[0], ks[2], ks[1], ks[3]), v_strides=(vs[0], vs[2], vs[1], vs[3]),
                   table_stride=block_table.stride(0))


# --------------------------------------------------------------------------------------------------
# References (plain torch): what eager runs, what the tests compare against
# --------------------------------------------------------------------------------------------------
def decode_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lens: Optional[torch.Tensor] = None,
                         sm_scale: Optional[float] = None, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Softmax attention, GQA by index, causal aligned bottom-right within each sequence's valid length, and
    the optional bool / additive mask (broadcast to [B, Hq, Sq, S])."""
    b, hq, sq, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = hq // hkv
    if sm_scale is None:
        sm_scale = d ** -0.5
    acc = torch.promote_types(q.dtype, torch.float32)
    lens = (torch.full((b,), s, device=q.device, dtype=torch.long) if kv_lens is None
            else kv_lens.to(device=q.device, dtype=torch.long))
    cols = torch.arange(s, device=q.device)
    rows = torch.arange(sq, device=q.device)
    limit = lens[:, None] - sq + 1 + rows[None, :]                                   # [B, Sq]
    visible = (cols[None, None, :] < limit[:, :, None]) & (cols[None, None, :] < lens[:, None, None])  # [B, Sq, S]
    key_ok = (cols[None, :] < lens[:, None])[:, None, :, None]                        # [B, 1, S, 1]
    # Keys past the valid length may hold anything (NaN included): zero them so 0 * garbage can't leak in.
    kf = torch.where(key_ok, k.to(acc), torch.zeros((), dtype=acc, device=q.device))
    vf = torch.where(key_ok, v.to(acc), torch.zeros((), dtype=acc, device=q.device))
    qf = q.to(acc).reshape(b, hkv, g * sq, d)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * sm_scale                       # [B, Hkv, G*Sq, S]
    vis = visible[:, None, None, :, :].expand(b, hkv, g, sq, s).reshape(b, hkv, g * sq, s)
    if mask is not None:
        mk = torch.broadcast_to(mask.to(q.device), (b, hq, sq, s)).reshape(b, hkv, g * sq, s)
        if mk.dtype == torch.bool:
            vis = vis & mk
        else:
            scores = scores + mk.to(acc)
            vis = vis & (mk != float("-inf"))
    scores = scores.masked_fill(~vis, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    p = torch.where(vis, p, torch.zeros((), dtype=acc, device=q.device))             # rows with no key -> 0, not NaN
    o = torch.matmul(p, vf)
    return o.reshape(b, hq, sq, v.shape[-1]).to(q.dtype)


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's ``x * cos + rotate_half(x) * sin`` in fp32, rounded once to x's dtype."""
    half = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos.float() + rotated * sin.float()).to(x.dtype)


def decode_attention_append_ref(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, cos: torch.Tensor,
                                sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                cache_position: torch.Tensor, sm_scale: Optional[float] = None,
                                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rotary on q and k_new, index_copy_ of the key and value into the caches at cache_position, attention."""
    b, _, s, d = k_cache.shape
    cos4 = cos.reshape(-1, 1, 1, d)
    sin4 = sin.reshape(-1, 1, 1, d)
    pos = cache_position.reshape(1).long()
    if 0 <= int(pos) < s:
        k_cache.index_copy_(2, pos, rope_ref(k_new, cos4, sin4))
        v_cache.index_copy_(2, pos, v_new)
    return decode_attention_ref(rope_ref(q, cos4, sin4), k_cache, v_cache, sm_scale=sm_scale, mask=mask)


def paged_decode_attention_ref(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                               block_table: torch.Tensor, seq_lens: torch.Tensor,
                               sm_scale: Optional[float] = None) -> torch.Tensor:
    """Gather each sequence's pages into a contiguous [B, Hkv, max_pages * page_size, D] cache, then attend."""
    num_pages, page_size, hkv, d = k_pages.shape
    b, max_pages = block_table.shape
    # Table entries past a sequence's last page may be anything: clamp so the gather stays in bounds.
    idx = block_table.long().clamp(0, num_pages - 1)
    k = k_pages[idx].reshape(b, max_pages * page_size, hkv, d).transpose(1, 2)
    v = v_pages[idx].reshape(b, max_pages * page_size, hkv, v_pages.shape[-1]).transpose(1, 2)
    return decode_attention_ref(q, k, v, kv_lens=seq_lens, sm_scale=sm_scale)
