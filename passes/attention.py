"""Attention -> `torch.ops.kernopt.flash_attention` (prefill) or `torch.ops.kernopt.decode_attention` (decode).

Patterns (plain torch; the first is what the op's reference computes):

    F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                   enable_gqa=False)               # positional or keyword, any subset

    # hand-written (HF eager_attention_forward), GQA by repeat_kv folded into the kernel:
    k = repeat_kv(k, n)       # k[:, :, None].expand(B, Hkv, n, S, D).reshape(B, Hkv*n, S, D),
                              # or k.repeat_interleave(n, dim=1)
    w = q @ k.transpose(-2, -1) * scale            # or / sqrt(d), or no scale; k.mT, k.permute(0, 1, 3, 2);
                                                   # or q pre-scaled: (q * scale) @ k.transpose(-2, -1)
    w = w + mask                                   # optional additive float mask, or a bool mask filled:
    w = w.masked_fill(~keep, float("-inf"))        # keep = True where attending (-> the kernel's bool mask)
    w = w.masked_fill(drop, float("-inf"))         # drop = True where masked (-> logical_not(drop))
    w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)   # dtype and cast optional
    w = F.dropout(w, p=0.0, training=...)          # optional; p=0 or training=False
    out = w @ v

Replacement: `kernopt.flash_attention(q, k, v, mask, causal, scale)` on the un-repeated K/V. A query of at
most 4 tokens with no mask (SDPA `is_causal` only where it means the same as bottom-right causal), or of one
token with a mask (HF's static-cache decode), goes to `kernopt.decode_attention(q, k, v, None, scale[, mask])`
instead, when k/v are contiguous. Unless KERNOPT_DECODE_APPEND=0, passes/decode_append.py then folds a static-cache
step's rotary and k / v cache writes into it (`kernopt.decode_attention_append`).

Guard (`_guard`, a reason string to refuse): 4-D fp16/bf16/fp32 q/k/v the kernel supports
(`kernopt.kernels.flash_attention.supports`: head dim, GQA ratio, mask dtype/broadcast), a Triton kernel
to run here (not the plain reference: CPU without the interpreter, bf16 on CPU), no dropout, SDPA's
`is_causal` only with Sq == Skv (SDPA aligns it top-left, the kernel bottom-right), intermediate results
(the attention weights) used only by the pattern, and the pattern's output dtype equal to q's.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from kernopt import ops, workload
from kernopt.passes.constant_mask import fold_constant_masks
from kernopt.passes.decode_append import append_enabled, fuse_decode_append
from kernopt.passes.graph import (ADD, MUL, PassContext, arg, example_value, insert_before, is_call, replace,
                                  size_hint, static_int)

SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
MATMUL = (torch.matmul, operator.matmul, "matmul")
SOFTMAX = (F.softmax, torch.softmax, torch.Tensor.softmax, "softmax")
DROPOUT = (F.dropout, torch.dropout, torch.nn.functional.dropout, "dropout")
DIV = (operator.truediv, torch.div, torch.true_divide, "div", "truediv")
TRANSPOSE = ("transpose", torch.transpose)
PERMUTE = ("permute", torch.permute)
MASKED_FILL = ("masked_fill", "masked_fill_", torch.masked_fill)
INVERT = (operator.invert, torch.logical_not, torch.bitwise_not, "logical_not", "bitwise_not", "__invert__")
CAST = ("to", "type")
RESHAPE = ("reshape", "view", torch.reshape)
EXPAND = ("expand",)
UNSQUEEZE = ("unsqueeze", torch.unsqueeze)
REPEAT_INTERLEAVE = ("repeat_interleave", torch.repeat_interleave)
DECODE_MAX_Q = 4


def _number(v: Any) -> Optional[float]:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    return None


def _same_size(a: Any, b: Any) -> bool:
    """True only when two sizes are provably equal (equal ints, or the same symbolic expression)."""
    sa, sb = static_int(a), static_int(b)
    if sa is not None and sb is not None:
        return sa == sb
    if isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt):
        return a.node.expr == b.node.expr
    return False


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def unrepeat_kv(node: Any) -> tuple[Any, int]:
    """(K/V before a repeat_kv-style head expansion, repeat count); (node, 1) when there is none."""
    nv = example_value(node)
    if nv is None or nv.dim() != 4:
        return node, 1
    base, n = None, None
    if is_call(node, *REPEAT_INTERLEAVE):
        reps, dim = arg(node, 1, "repeats"), arg(node, 2, "dim")
        if isinstance(reps, int) and dim in (1, -3):
            base, n = node.args[0], reps
    elif is_call(node, *RESHAPE) and isinstance(node.args[0], fx.Node) and is_call(node.args[0], *EXPAND):
        src = node.args[0].args[0]
        # k[:, :, None] or k.unsqueeze(2): a new axis right after the head axis
        if is_call(src, operator.getitem) and isinstance(src.args[1], tuple) and len(src.args[1]) >= 3 \
                and src.args[1][2] is None and all(s == slice(None) for s in src.args[1][:2]) \
                and all(s == slice(None) for s in src.args[1][3:]):
            base = src.args[0]
        elif is_call(src, *UNSQUEEZE) and arg(src, 1, "dim") in (2, -3):
            base = src.args[0]
        ev = example_value(node.args[0])
        if base is not None and ev is not None and ev.dim() == 5:
            n = static_int(ev.shape[2])
    bv = example_value(base) if base is not None else None
    if bv is None or n is None or bv.dim() != 4:
        return node, 1
    hb, hn = static_int(bv.shape[1]), static_int(nv.shape[1])
    if hb is None or hn is None or hb * n != hn:
        return node, 1
    if not all(_same_size(bv.shape[i], nv.shape[i]) for i in (0, 2, 3)):
        return node, 1
    return base, n


def _repeat_chain(node: Any) -> list:
    """The nodes of a repeat_kv expansion that `unrepeat_kv` saw through (erased once they have no users)."""
    out = [node]
    if is_call(node, *RESHAPE) and isinstance(node.args[0], fx.Node):
        out.append(node.args[0])
        if isinstance(node.args[0].args[0], fx.Node):
            out.append(node.args[0].args[0])
    return out


def _meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty([size_hint(s) for s in t.shape], dtype=t.dtype, device="meta")


class _Attn:
    def __init__(self, node, q, k, v, mask, causal, scale, matched, dead, sdpa_causal=False, negate_mask=False):
        self.node, self.q, self.k, self.v, self.mask = node, q, k, v, mask
        self.causal, self.scale, self.matched, self.dead = causal, scale, matched, dead
        self.sdpa_causal = sdpa_causal
        self.negate_mask = negate_mask  # a bool mask that is True where masked: the kernel wants True = attend


def _guard(m: _Attn) -> Optional[str]:
    qv, kv, vv, outv = example_value(m.q), example_value(m.k), example_value(m.v), example_value(m.node)
    mv = example_value(m.mask) if m.mask is not None else None
    if qv is None or kv is None or vv is None or outv is None or (m.mask is not None and mv is None):
        return "operands have no recorded shapes"
    if qv.dim() != 4 or kv.dim() != 4 or vv.dim() != 4:
        return f"needs 4-D q/k/v [B, H, S, D], got {qv.dim()}-D/{kv.dim()}-D/{vv.dim()}-D"
    fa = ops.kernel_module("flash_attention")
    reason = fa.supports(_meta(qv), _meta(kv), _meta(vv), None if mv is None else _meta(mv))
    if reason:
        return reason
    if not (qv.device == kv.device == vv.device) or (mv is not None and mv.device != qv.device):
        return "operands on different devices"
    impl = ops.implementation(qv)
    if impl == "reference":
        return (f"no Triton kernel for {_dt(qv.dtype)} on {qv.device.type} here (the op would run its plain-torch "
                "reference): left to PyTorch")
    if outv.dtype != qv.dtype:
        return f"pattern output is {_dt(outv.dtype)}, q is {_dt(qv.dtype)}"
    if m.sdpa_causal and not _same_size(qv.shape[2], kv.shape[2]):
        return ("is_causal with q_len != kv_len (or not provably equal): SDPA aligns the causal mask top-left, "
                "the kernel bottom-right")
    return None


class AttentionPass:
    name = "attention"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        for node in list(gm.graph.nodes):
            if node.graph is not gm.graph or node.op not in ("call_function", "call_method"):
                continue
            if is_call(node, *SDPA):
                m, reason = self._match_sdpa(node)
            elif is_call(node, *MATMUL) and len(node.args) == 2:
                m, reason = self._match_manual(node)
            else:
                continue
            if m is None:
                if reason:
                    ctx.refused(self.name, node, reason[0], reason[1])
                continue
            reason = _guard(m)
            if reason is None:
                self._rewrite(gm, ctx, m)
            else:
                ctx.refused(self.name, node, m.matched, reason)
        # HF's compiled prompt materialises its causal mask from aranges: fold such constants into causal=True
        fold_constant_masks(gm, ctx, self.name)
        if append_enabled():  # HF static-cache decode: rotary + cache write into the decode kernel
            fuse_decode_append(gm, ctx)

    # F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa=...)
    def _match_sdpa(self, node: fx.Node):
        q, k, v = arg(node, 0, "query"), arg(node, 1, "key"), arg(node, 2, "value")
        mask = arg(node, 3, "attn_mask")
        dropout_p = arg(node, 4, "dropout_p", 0.0)
        is_causal = arg(node, 5, "is_causal", False)
        scale = arg(node, 6, "scale")
        gqa = node.kwargs.get("enable_gqa", False)
        matched = "scaled_dot_product_attention"
        if _number(dropout_p) is None or _number(dropout_p) != 0.0:
            return None, (matched, f"dropout_p={dropout_p} (dropout is not part of the inference kernel)")
        if not isinstance(is_causal, bool) or not isinstance(gqa, bool):
            return None, (matched, "is_causal / enable_gqa not constant")
        if scale is not None and _number(scale) is None:
            return None, (matched, "scale is not a constant number")
        if mask is not None and is_causal:
            return None, (matched, "attn_mask together with is_causal (SDPA rejects it)")
        if mask is not None and not isinstance(mask, fx.Node):
            return None, (matched, "attn_mask is not a tensor")
        # HF's sdpa path repeats K/V itself (repeat_kv) whenever it passes a mask: fold the copy into the kernel,
        # which reads KV head h // G for query head h.
        k0, nk = unrepeat_kv(k)
        v0, nv = unrepeat_kv(v)
        dead = []
        if nk > 1 and nk == nv:
            dead = [n_ for t in (k, v) for n_ in _repeat_chain(t)]
            k, v = k0, v0
            matched += f" (repeat_kv x{nk} folded)"
        qv, kv = example_value(q), example_value(k)
        if qv is not None and kv is not None and qv.dim() == 4 and kv.dim() == 4 and not gqa and nk == 1:
            hq, hkv = static_int(qv.shape[1]), static_int(kv.shape[1])
            if hq != hkv and hkv != 1:
                return None, (matched, f"q heads {qv.shape[1]} != kv heads {kv.shape[1]} without enable_gqa")
        d = size_hint(qv.shape[-1]) if qv is not None else 1
        scale = _number(scale) if scale is not None else 1.0 / math.sqrt(d)
        parts = [matched]
        if is_causal:
            parts.append("causal")
        if mask is not None:
            mv = example_value(mask)
            parts.append(f"mask={'bool' if mv is not None and mv.dtype == torch.bool else 'additive'}")
        if gqa:
            parts.append("gqa")
        return _Attn(node, q, k, v, mask, is_causal, scale, " ".join(parts), dead=dead, sdpa_causal=is_causal), None

    # softmax(q @ k.transpose(-2, -1) * scale + mask) @ v, see the module docstring
    def _match_manual(self, node: fx.Node):
        p, v = node.args
        chain, matched = [], "softmax(q @ k.T"
        if not isinstance(p, fx.Node):
            return None, None
        if is_call(p, *DROPOUT):
            prob, training = arg(p, 1, "p", 0.5), arg(p, 2, "training", True)
            if is_call(p, torch.dropout):
                prob, training = arg(p, 1, "p"), arg(p, 2, "train")
            src = p.args[0] if p.args else p.kwargs.get("input")
            if not _is_softmax_chain(src):
                return None, None
            if not (_number(prob) == 0.0 or training is False):
                return None, ("softmax(q @ k.T) @ v", f"dropout p={prob} in training mode")
            chain.append(p)
            p = src
        cast = None
        if is_call(p, *CAST) and isinstance(p.args[0], fx.Node) and is_call(p.args[0], *SOFTMAX):
            cast, p = p, p.args[0]
            chain.append(cast)
        if not is_call(p, *SOFTMAX):
            return None, None
        sm = p
        chain.append(sm)
        s = arg(sm, 0, "input")
        dim = arg(sm, 1, "dim")
        sv = example_value(s)
        if sv is None or dim not in (-1, sv.dim() - 1):
            return None, ("softmax(...) @ v", f"softmax over dim {dim}, not the key axis")
        sm_dtype = sm.kwargs.get("dtype", sm.args[3] if is_call(sm, F.softmax) and len(sm.args) > 3 else None)
        if sm_dtype not in (None, torch.float32):
            return None, ("softmax(...) @ v", f"softmax in {sm_dtype}")
        mask, fill, negate, extra_dead = None, None, False, []
        scores = _scores(s)
        if scores is None and is_call(s, *ADD) and len(s.args) == 2 and not s.kwargs:
            for a, b in ((s.args[0], s.args[1]), (s.args[1], s.args[0])):
                sc = _scores(a)
                if sc is not None and isinstance(b, fx.Node):
                    scores, mask = sc, b
                    chain.append(s)
                    break
        elif scores is None and is_call(s, *MASKED_FILL):
            scores = _scores(arg(s, 0, "input"))
            fill, value = arg(s, 1, "mask"), arg(s, 2, "value")
            if scores is not None and isinstance(fill, fx.Node):
                chain.append(s)
                fv = example_value(fill)
                if _number(value) != float("-inf"):
                    return None, ("softmax(q @ k.T.masked_fill(mask, value)) @ v",
                                  f"masked_fill value {value} (only -inf is a mask; a finite fill changes fully "
                                  "masked rows)")
                if fv is None or fv.dtype != torch.bool:
                    return None, ("softmax(q @ k.T.masked_fill(mask, -inf)) @ v",
                                  f"masked_fill mask is {'unknown' if fv is None else _dt(fv.dtype)}, not bool")
                if is_call(fill, *INVERT) and isinstance(fill.args[0], fx.Node):
                    mask = fill.args[0]  # masked_fill(~keep, -inf): keep is the kernel's mask as it is
                    extra_dead.append(fill)
                else:
                    mask, negate = fill, True
        if scores is None:
            return None, None
        q, kt, scale, score_nodes = scores
        chain.extend(score_nodes)
        k0, nk = unrepeat_kv(kt.args[0])
        v0, nv = unrepeat_kv(v)
        if scale != 1.0:
            matched += " * scale"
        if fill is not None:
            matched += f".masked_fill({'mask' if negate else '~mask'}, -inf)"
        elif mask is not None:
            matched += " + mask"
        matched += ")" + (".to(dtype)" if cast is not None else "") + " @ v"
        if nk > 1 or nv > 1:
            matched += f" (repeat_kv x{max(nk, nv)} folded)"
        if nk != nv:
            return None, (matched, f"k and v repeated differently ({nk} vs {nv})")
        # every intermediate (scores, weights) feeds only the next step: else the weights are needed elsewhere
        for n_ in chain:
            if len(n_.users) != 1:
                return None, (matched, f"intermediate {n_.name} is used outside the pattern (attention weights "
                                       "returned?)")
        if mask is not None and fill is None:
            mv = example_value(mask)
            if mv is not None and mv.dtype == torch.bool:
                return None, (matched, "bool mask added to the scores (adds 0/1; not a mask)")
        dead = [*chain, kt, *extra_dead]
        return _Attn(node, q, k0, v0, mask, False, scale, matched, dead, negate_mask=negate), None

    def _rewrite(self, gm: fx.GraphModule, ctx: PassContext, m: _Attn) -> None:
        qv, kv = example_value(m.q), example_value(m.k)
        b, hq, sq, d = (size_hint(s) for s in qv.shape)
        hkv, skv = size_hint(kv.shape[1]), size_hint(kv.shape[2])
        impl = ops.implementation(qv)
        scenario = workload.resolve_scenario(ctx.scenario, tokens=b * sq, q_len=sq, batch=b)
        shape = f"[B={b} Hq={hq} Hkv={hkv} Sq={sq} Skv={skv} D={d} {_dt(qv.dtype)}]"
        decode = self._decode_ok(m, qv, kv)
        mask = m.mask
        if m.negate_mask:  # masked_fill(drop, -inf): the kernel attends where logical_not(drop)
            mask = insert_before(gm, m.node, torch.logical_not, (m.mask,), example=example_value(m.mask))
        if decode:
            dec = ops.kernel_module("decode_attention")
            config = dec.config_string(dec.select_config(b, hkv, hq, skv, d, 132, sq)) \
                if hasattr(dec, "config_string") else ""
            args = (m.q, m.k, m.v, None, float(m.scale)) + ((mask,) if mask is not None else ())
            replace(gm, m.node, torch.ops.kernopt.decode_attention.default, args, dead=m.dead)
            ctx.rewrote(self.name, m.node, f"{m.matched} {shape} (decode)", "kernopt.decode_attention", config,
                        scenario, impl)
            return
        fa = ops.kernel_module("flash_attention")
        config = fa.config_str(fa.select_config(d, m.causal, sq, skv, b * hq, qv.dtype, warp_spec=mask is None))
        if static_int(qv.shape[2]) is None or static_int(kv.shape[2]) is None:
            config = f"dynamic lengths (per-call choice; now: {config})"
        replace(gm, m.node, torch.ops.kernopt.flash_attention.default,
                (m.q, m.k, m.v, mask, bool(m.causal), float(m.scale)), dead=m.dead)
        ctx.rewrote(self.name, m.node, f"{m.matched} {shape}", "kernopt.flash_attention", config, scenario, impl)

    @staticmethod
    def _decode_ok(m: _Attn, qv: torch.Tensor, kv: torch.Tensor) -> bool:
        """A few query tokens and the same meaning as decode_attention's bottom-right causal: no mask, or one
        query token with a mask (HF's static-cache decode step: a [B, 1, 1, S] mask hides the unfilled slots;
        the kernel reads it beside K/V; at Sq = 1 its causal rule restricts nothing)."""
        sq = static_int(qv.shape[2])
        if sq is None or sq > DECODE_MAX_Q or (m.mask is not None and (sq != 1 or m.causal)):
            return False
        if not ((not m.causal and sq == 1) or (m.causal and _same_size(qv.shape[2], kv.shape[2]))):
            return False
        try:
            dec = ops.kernel_module("decode_attention")
        except ImportError:
            return False
        if not hasattr(dec, "decode_attention"):
            return False
        for t in (kv, example_value(m.v)):  # "contiguous cache": [B, Hkv, S, D] row-major
            shape = [size_hint(s) for s in t.shape]
            want = [shape[1] * shape[2] * shape[3], shape[2] * shape[3], shape[3], 1]
            if [size_hint(s) for s in t.stride()] != want:
                return False
        return True


def _is_softmax_chain(n: Any) -> bool:
    if is_call(n, *CAST) and isinstance(n.args[0], fx.Node):
        n = n.args[0]
    return is_call(n, *SOFTMAX)


def _scaled(n: Any) -> tuple[Any, float, list]:
    """(x, c, [node]) for x * c, c * x or x / c with a constant c; (n, 1.0, []) otherwise."""
    if is_call(n, *MUL) and len(n.args) == 2 and not n.kwargs:
        a, b = n.args
        if _number(b) is not None and isinstance(a, fx.Node):
            return a, _number(b), [n]
        if _number(a) is not None and isinstance(b, fx.Node):
            return b, _number(a), [n]
    elif is_call(n, *DIV) and len(n.args) == 2 and not n.kwargs:
        c = _number(n.args[1])
        if c is not None and c != 0 and isinstance(n.args[0], fx.Node):
            return n.args[0], 1.0 / c, [n]
    return n, 1.0, []


def _is_key_transpose(kt: Any) -> bool:
    """k.transpose(-2, -1) (either order, any sign), k.mT, or k.permute(0, 1, 3, 2) of a 4-D k."""
    if not isinstance(kt, fx.Node) or not kt.args or example_value(kt.args[0]) is None \
            or example_value(kt.args[0]).dim() != 4:
        return False
    if is_call(kt, *TRANSPOSE):
        dims = kt.args[1:3]
        return len(dims) == 2 and all(isinstance(d, int) for d in dims) and {d % 4 for d in dims} == {2, 3}
    if is_call(kt, getattr):
        return len(kt.args) == 2 and kt.args[1] == "mT"
    if is_call(kt, *PERMUTE):
        dims = kt.args[1] if len(kt.args) == 2 and isinstance(kt.args[1], (tuple, list)) else kt.args[1:]
        return all(isinstance(d, int) for d in dims) and [d % 4 for d in dims] == [0, 1, 3, 2]
    return False


def _scores(n: Any):
    """(q, k_transposed_node, scale, nodes) for [q | q * c] @ k.transpose(-2, -1) [* c | / c]; None otherwise."""
    if not isinstance(n, fx.Node):
        return None
    n, scale, nodes = _scaled(n)
    if not (is_call(n, *MATMUL) and len(n.args) == 2):
        return None
    q, kt = n.args
    if not _is_key_transpose(kt):
        return None
    # q pre-scaled: fold the constant when the product feeds only this matmul (else q * c stays as it is)
    if isinstance(q, fx.Node) and len(q.users) == 1:
        q0, c, qnodes = _scaled(q)
        if qnodes and example_value(q0) is not None and example_value(q0).dim() == 4:
            q, scale, nodes = q0, scale * c, nodes + qnodes
    return q, kt, scale, nodes + [n]
