"""FlashAttention forward (prefill) for inference: out = softmax(q @ k^T * scale + mask) @ v.

Algorithm (FlashAttention-2): one program owns BLOCK_M query rows of one (batch, head) and keeps them
on chip; it streams K/V in BLOCK_N tiles, computing S = q @ k^T in fp32 and an online softmax (running
row max m and row sum l, with exp2 and log2(e) folded into the scale) and accumulating P @ V in fp32.
The key range is split in two loops: tiles every row of the block sees in full (no mask arithmetic at
all) and the few tiles on the causal diagonal / sequence end (masked). Tiles that no row sees are never
visited. GQA/MQA read KV head `h // (Hq // Hkv)`; K/V are never repeated.

Layouts: q [B, Hq, Sq, D], k/v [B, Hkv, Skv, D], any strides (HF hands q as a transpose of
[B, S, H, D]). mask None, bool (True = attend, SDPA semantics) or additive float, broadcastable to
[B, Hq, Sq, Skv] (read through stride-0 dims, never materialised). Causal is aligned bottom-right:
query i sees keys j <= i + Skv - Sq. Rows that see no key at all give 0. Output [B, Hq, Sq, D],
contiguous, in q's dtype. Head dims up to 256 (non-powers of two are padded to BLOCK_D and masked).
On Hopper the loads can go through TMA tensor descriptors (config "TMA": True, 4-D descriptors, so
the hardware bounds-checks each head's sequence end).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

try:  # host-side TMA descriptors (triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _attn_tile(acc, l_i, m_i, q, K, V, Mask, kv_b, kv_h, k_base, v_base, m_base,
               stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
               offs_m, offs_d, d_ok, seq_q, seq_k, causal_shift, qk_scale, lo, hi,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, TMA: tl.constexpr,
               DOT_PRECISION: tl.constexpr, WARP_SPEC: tl.constexpr):
    """Online-softmax update of (acc, l_i, m_i) over key tiles [lo, hi).

    MASKED=False: every (row, key) pair in range is visible (no bounds / causal arithmetic).
    MASKED=True: keys past seq_k and, if CAUSAL, keys right of the diagonal are dropped.
    """
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPEC):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n0
        if TMA:
            k = K.load([kv_b, kv_h, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        else:
            k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
            if MASKED:
                k = tl.load(k_ptrs, mask=(offs_n[:, None] < seq_k) & d_ok, other=0.0)
            elif EVEN_D:
                k = tl.load(k_ptrs)
            else:
                k = tl.load(k_ptrs, mask=d_ok, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if MASKED or MASK_KIND != 0:
            s = qk * qk_scale
            valid = offs_n[None, :] < seq_k
            if MASKED and CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None] + causal_shift)
            if MASK_KIND != 0:
                m_ptrs = m_base + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn
                mvals = tl.load(m_ptrs, mask=(offs_m[:, None] < seq_q) & (offs_n[None, :] < seq_k), other=0)
                if MASK_KIND == 1:
                    valid = valid & (mvals != 0)
                else:
                    add = mvals.to(tl.float32)
                    # -inf means "masked"; finite huge negatives (HF's finfo.min) stay arithmetic, clamped so
                    # that the log2(e) factor cannot overflow them into -inf.
                    valid = valid & (add != float("-inf"))
                    s = s + tl.maximum(add * 1.4426950408889634, -3.0e38)
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # a row that has seen no visible key yet keeps m = -inf; shift by 0 instead so that exp2 gives 0
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if TMA:
            v = V.load([kv_b, kv_h, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        else:
            v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
            if MASKED:
                v = tl.load(v_ptrs, mask=(offs_n[:, None] < seq_k) & d_ok, other=0.0)
            elif EVEN_D:
                v = tl.load(v_ptrs)
            else:
                v = tl.load(v_ptrs, mask=d_ok, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _flash_attention_fwd(
    Q, K, V, Mask, Out,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om,
    num_heads, group, seq_q, seq_k, head_dim, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
    WARP_SPEC: tl.constexpr,
):
    # Heaviest causal blocks (the last query rows) first, so the tail of the grid is short work.
    n_mblocks = tl.cdiv(seq_q, BLOCK_M)
    pid_m = n_mblocks - 1 - tl.program_id(0) if CAUSAL else tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    kv_h = h // group
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < head_dim

    b64 = b.to(tl.int64)
    k_base = K
    v_base = V
    if not TMA:
        k_base = K + b64 * stride_kb + kv_h.to(tl.int64) * stride_kh
        v_base = V + b64 * stride_vb + kv_h.to(tl.int64) * stride_vh
    m_base = Mask
    if MASK_KIND != 0:
        m_base = Mask + b64 * stride_mb + h.to(tl.int64) * stride_mh

    if TMA:
        q = Q.load([b, h, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
    else:
        q_ptrs = Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qm \
            + offs_d[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=(offs_m[:, None] < seq_q) & d_ok, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Keys [0, full_end) are visible to every row of this block; [full_end, end) need masks.
    causal_shift = seq_k - seq_q
    if CAUSAL:
        end = tl.minimum(start_m + BLOCK_M + causal_shift, seq_k)
        full_end = tl.minimum(start_m + causal_shift + 1, seq_k)
    else:
        end = seq_k
        full_end = seq_k
    full_end = tl.maximum(full_end, 0) // BLOCK_N * BLOCK_N

    acc, l_i, m_i = _attn_tile(acc, l_i, m_i, q, K, V, Mask, b, kv_h, k_base, v_base, m_base,
                               stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                               offs_m, offs_d, d_ok, seq_q, seq_k, causal_shift, qk_scale, 0, full_end,
                               BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, False, CAUSAL, MASK_KIND, TMA,
                               DOT_PRECISION, WARP_SPEC)
    acc, l_i, m_i = _attn_tile(acc, l_i, m_i, q, K, V, Mask, b, kv_h, k_base, v_base, m_base,
                               stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                               offs_m, offs_d, d_ok, seq_q, seq_k, causal_shift, qk_scale, full_end, end,
                               BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, True, CAUSAL, MASK_KIND, TMA,
                               DOT_PRECISION, False)

    # Rows that saw no key (l = 0) write 0, not 0/0.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = (acc / l_safe[:, None]).to(Out.dtype.element_ty)
    o_ptrs = Out + b64 * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out, mask=(offs_m[:, None] < seq_q) & d_ok)


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------
def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def select_config(head_dim: int, causal: bool, seq_q: int, seq_k: int, batch_heads: int,
                  dtype: torch.dtype = torch.bfloat16) -> dict:
    """The one shape -> config table of this family.

    Buckets: short query (decode-like, q_len <= 16, kernopt.workload's single-stream/interactive
    scenarios) gets a 16-row tile; prefill (server/offline) gets tiles by head dim and causal, as
    measured on H100 (examples/bench_attention.py prints every candidate). seq_k and batch_heads are
    part of the key so that tuned entries can specialise on them. fp32 gets small tiles (its tiles
    are twice the bytes and go through the slow IEEE dot).
    """
    block_d = _block_d(head_dim)
    if dtype == torch.float32:
        return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2, "TMA": False}
    if seq_q <= 16:
        return {"BLOCK_M": 16, "BLOCK_N": 128 if block_d <= 128 else 64, "num_warps": 4, "num_stages": 3,
                "TMA": False}
    if block_d <= 64 and not causal:
        # measured on H100 (B8 H16 S1024 D64): 128x64 / 8 warps beats 64x64 / 4 warps by ~5%
        return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3, "TMA": False}
    if block_d <= 128 and causal and seq_q >= 8192:
        # long causal prefill: 128x128 / 8 warps measured ~5% over 64x64 on H100 (B1 H32 S8192 D128)
        return {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3, "TMA": True}
    if block_d <= 128:
        # 64x64 tiles with 4 warps fit two programs per SM, which overlap one's softmax with the other's
        # MMAs; on H100 it led or tied (within the ~5% run-to-run spread) on the other D128 cases.
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "TMA": True}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2, "TMA": False}


def candidate_configs(head_dim: int, causal: bool, seq_q: int, seq_k: int, batch_heads: int,
                      dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """Configs worth timing for a prefill shape (the benchmark prints each; the best wins)."""
    base = select_config(head_dim, causal, seq_q, seq_k, batch_heads, dtype)
    cands = [base]
    if dtype != torch.float32 and _block_d(head_dim) <= 128 and seq_q > 16:
        for bm, bn, w, st in ((64, 64, 4, 3), (64, 64, 4, 2), (64, 64, 4, 4), (64, 128, 4, 2),
                              (128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 3)):
            for tma in (False, True):
                cands.append({"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st, "TMA": tma})
    seen, out = set(), []
    for c in cands:
        key = tuple(sorted(c.items()))
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def config_str(cfg: dict) -> str:
    s = f"BLOCK_M={cfg['BLOCK_M']} BLOCK_N={cfg['BLOCK_N']} warps={cfg['num_warps']} stages={cfg['num_stages']}"
    if cfg.get("TMA"):
        s += " tma"
    if cfg.get("WARP_SPEC"):
        s += " ws"
    return s


# --------------------------------------------------------------------------------------------------
# Guard, launcher, reference
# --------------------------------------------------------------------------------------------------
def _broadcast_mask(mask: Optional[torch.Tensor], shape: tuple) -> Optional[torch.Tensor]:
    if mask is None:
        return None
    return torch.broadcast_to(mask, shape)  # a view: broadcast dims get stride 0


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None) -> Optional[str]:
    """None when the kernel handles these inputs, else the reason it does not."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"needs 4-D q/k/v [B, H, S, D], got {q.dim()}-D/{k.dim()}-D/{v.dim()}-D"
    if q.dtype not in _DTYPES:
        return f"dtype {q.dtype} not supported (fp16, bf16, fp32)"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return f"mixed dtypes q={q.dtype} k={k.dtype} v={v.dtype}"
    if not (q.device == k.device == v.device):
        return "q/k/v on different devices"
    B, Hq, Sq, D = q.shape
    if tuple(k.shape) != tuple(v.shape):
        return f"k {tuple(k.shape)} and v {tuple(v.shape)} differ (v head dim must equal q/k head dim)"
    Bk, Hkv, Skv, Dk = k.shape
    if Bk != B or Dk != D:
        return f"k {tuple(k.shape)} does not match q {tuple(q.shape)} in batch / head dim"
    if Hkv == 0 or Hq % Hkv != 0:
        return f"query heads {Hq} not a multiple of kv heads {Hkv}"
    if D > MAX_HEAD_DIM or D < 1:
        return f"head dim {D} not supported (1..{MAX_HEAD_DIM})"
    if q.numel() == 0 or k.numel() == 0:
        return "empty tensor"
    if mask is not None:
        if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
            return f"mask dtype {mask.dtype} (needs bool or float)"
        if mask.device != q.device:
            return "mask on another device"
        try:
            torch.broadcast_shapes(tuple(mask.shape), (B, Hq, Sq, Skv))
        except RuntimeError:
            return f"mask {tuple(mask.shape)} not broadcastable to {(B, Hq, Sq, Skv)}"
        if mask.dim() > 4 or torch.broadcast_shapes(tuple(mask.shape), (B, Hq, Sq, Skv)) != (B, Hq, Sq, Skv):
            return f"mask {tuple(mask.shape)} broadcasts beyond {(B, Hq, Sq, Skv)}"
    return None


def _descriptor_ok(t: torch.Tensor) -> bool:
    es = t.element_size()
    return (TensorDescriptor is not None and t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all((s * es) % 16 == 0 for s in t.stride()[:-1]))


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
                    causal: bool = False, sm_scale: Optional[float] = None, config: Optional[dict] = None,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(q @ k^T * sm_scale + mask) @ v with bottom-right causal masking; see the module docstring."""
    problem = supports(q, k, v, mask)
    if problem is not None:
        raise ValueError(f"flash_attention: {problem}")
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(D)
    if out is None:
        out = torch.empty((B, Hq, Sq, D), device=q.device, dtype=q.dtype)
    elif tuple(out.shape) != (B, Hq, Sq, D) or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"flash_attention: out must be {(B, Hq, Sq, D)} {q.dtype} with unit last stride")
    cfg = dict(config) if config is not None else select_config(D, causal, Sq, Skv, B * Hq, q.dtype)
    BM, BN = cfg["BLOCK_M"], cfg["BLOCK_N"]
    BD = _block_d(D)

    mask_kind = 0
    m = _broadcast_mask(mask, (B, Hq, Sq, Skv))
    if m is None:
        m_arg, m_strides = q, (0, 0, 0, 0)  # never read: MASK_KIND=0
    else:
        if m.dtype == torch.bool:
            mask_kind, m_arg = 1, m.view(torch.uint8)
        else:
            mask_kind, m_arg = 2, m
        m_strides = m_arg.stride()

    tma = bool(cfg.get("TMA")) and all(_descriptor_ok(t) for t in (q, k, v))
    if tma:
        q_arg = TensorDescriptor(q, list(q.shape), list(q.stride()), [1, 1, BM, BD])
        k_arg = TensorDescriptor(k, list(k.shape), list(k.stride()), [1, 1, BN, BD])
        v_arg = TensorDescriptor(v, list(v.shape), list(v.stride()), [1, 1, BN, BD])
    else:
        q_arg, k_arg, v_arg = q, k, v

    grid = (triton.cdiv(Sq, BM), B * Hq)
    _flash_attention_fwd[grid](
        q_arg, k_arg, v_arg, m_arg, out,
        *q.stride(), *k.stride(), *v.stride(), *m_strides,
        out.stride(0), out.stride(1), out.stride(2),
        Hq, Hq // Hkv, Sq, Skv, D, float(sm_scale) * LOG2E,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, EVEN_D=(BD == D),
        CAUSAL=bool(causal), MASK_KIND=mask_kind, TMA=tma,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        WARP_SPEC=bool(cfg.get("WARP_SPEC", False)) and tma,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


def flash_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
                        causal: bool = False, sm_scale: Optional[float] = None) -> torch.Tensor:
    """Plain-torch reference: fp32 math (fp64 for fp64 inputs), fully masked rows give 0."""
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(D)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    kk = k.to(cdt).repeat_interleave(Hq // Hkv, dim=1)
    vv = v.to(cdt).repeat_interleave(Hq // Hkv, dim=1)
    s = (q.to(cdt) @ kk.transpose(-2, -1)) * sm_scale
    visible = torch.ones((Sq, Skv), dtype=torch.bool, device=q.device)
    if causal:
        visible = torch.ones((Sq, Skv), dtype=torch.bool, device=q.device).tril(Skv - Sq)
    visible = visible.expand(B, Hq, Sq, Skv)
    if mask is not None:
        if mask.dtype == torch.bool:
            visible = visible & mask
        else:
            s = s + mask.to(cdt)
            visible = visible & (mask != float("-inf"))
    s = s.masked_fill(~visible, float("-inf"))
    row_max = s.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max) & (row_max < 0), torch.zeros_like(row_max), row_max)
    p = torch.exp(s - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    out = (p @ vv) / torch.where(denom == 0, torch.ones_like(denom), denom)
    return out.to(q.dtype)
