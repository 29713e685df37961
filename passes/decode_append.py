"""HF static-cache decode step -> `torch.ops.kernopt.decode_attention_append` (one kernel instead of four).

After the attention pass, a decode step of transformers' Llama-style attention over a `StaticCache` reads

    q_embed = q * cos + rotate_half(q) * sin           # rotate_half(x) = cat((-x[..., D/2:], x[..., :D/2]), -1)
    k_embed = k * cos + rotate_half(k) * sin
    keys.index_copy_(2, cache_position, k_embed)        # StaticLayer.update; keys / values are graph inputs
    values.index_copy_(2, cache_position, v)
    out = kernopt.decode_attention(q_embed, keys, values, None, scale[, mask])

Inductor makes three kernels of the first four lines (q rotary, k rotary + cache write, v cache write: 1.26 +
1.38 + 0.99 us per layer on the H200, profiles/profile-8B-kernopt_int4.txt) before the attention kernel.
`kernopt.decode_attention_append(q, k, v, cos, sin, keys, values, cache_position, scale[, mask])` does all of it
in the attention kernel: rotary in fp32 rounded once (as Inductor rounds it), the split holding the position
writes the key and value, then attends. It mutates keys / values (Inductor calls it on the graph inputs
themselves: no copy of the cache).

Guard: one query token; q / k / v of one dtype with a power-of-two head dim >= 16; the same cos / sin on q and
k; each cache written once, by these index_copy_ calls at one position tensor, and read by nothing else between
the writes and the attention (the fused op writes at the attention's place). On by default;
KERNOPT_DECODE_APPEND=0 turns it off (llama systems kernopt_noappend / kernopt_int4_noappend). H200, llama suite
(sweeps/append, 7abfcf7, one run): 8B int4 bs1 decode step 2.84 -> 2.71 ms. `explain()` lists what it took and why
it left a step alone.
"""
from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx as fx

from kernopt import ops
from kernopt.kernels.host import env_switch
from kernopt.passes.graph import ADD, MUL, PassContext, example_value, is_call, size_hint

APPEND_ENV = "KERNOPT_DECODE_APPEND"
PASS_NAME = "decode_append"
DECODE = torch.ops.kernopt.decode_attention.default
APPEND = torch.ops.kernopt.decode_attention_append.default
NEG = (operator.neg, torch.neg, "neg")
CAT = (torch.cat, torch.concat, torch.concatenate)


def append_enabled() -> bool:
    return env_switch(APPEND_ENV, "1")


def _half_of(n: Any, x: Any, first: bool, half: int) -> bool:
    """n is x[..., :half] (first) or x[..., half:]."""
    if not (is_call(n, operator.getitem) and len(n.args) == 2 and n.args[0] is x and not n.kwargs):
        return False
    idx = n.args[1]
    if not (isinstance(idx, tuple) and len(idx) == 2 and idx[0] is Ellipsis and isinstance(idx[1], slice)):
        return False
    sl = idx[1]
    want = slice(None, half, None) if first else slice(half, None, None)
    return (sl.start, sl.stop, sl.step) == (want.start, want.stop, want.step)


def _rotate_half_of(n: Any) -> Optional[fx.Node]:
    """x for n = cat((-x[..., D/2:], x[..., :D/2]), dim=-1), else None."""
    if not is_call(n, *CAT) or not n.args:
        return None
    parts = n.args[0]
    dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0)
    if not isinstance(parts, (list, tuple)) or len(parts) != 2 or not is_call(parts[0], *NEG):
        return None
    hi = parts[0].args[0]
    x = hi.args[0] if isinstance(hi, fx.Node) and hi.args else None
    xv = example_value(x) if isinstance(x, fx.Node) else None
    if xv is None or dim not in (-1, xv.dim() - 1):
        return None
    d = size_hint(xv.shape[-1])
    if d % 2 or not (_half_of(hi, x, False, d // 2) and _half_of(parts[1], x, True, d // 2)):
        return None
    return x


def _mul_args(n: Any) -> Optional[tuple]:
    return tuple(n.args) if is_call(n, *MUL) and len(n.args) == 2 and not n.kwargs else None


def rope_of(n: Any) -> Optional[tuple[fx.Node, fx.Node, fx.Node, list]]:
    """(x, cos, sin, nodes) for n = x * cos + rotate_half(x) * sin (any operand order), else None."""
    if not (is_call(n, *ADD) and len(n.args) == 2 and not n.kwargs):
        return None
    for t1, t2 in (n.args, n.args[::-1]):
        m1, m2 = _mul_args(t1), _mul_args(t2)
        if m1 is None or m2 is None:
            continue
        for rot, sin in (m2, m2[::-1]):
            x = _rotate_half_of(rot)
            if x is None or x not in m1:
                continue
            cos = m1[1] if m1[0] is x else m1[0]
            if not isinstance(cos, fx.Node) or not isinstance(sin, fx.Node):
                continue
            neg = rot.args[0][0]
            return x, cos, sin, [n, t1, t2, rot, neg, neg.args[0], rot.args[0][1]]
    return None


def _index_copies(cache: fx.Node) -> list[fx.Node]:
    return [u for u in cache.users if u.op == "call_method" and u.target == "index_copy_"]


def _erase_if_dead(gm: fx.GraphModule, nodes: list) -> None:
    for n in nodes:  # outermost first: each becomes dead once the one using it is gone
        if isinstance(n, fx.Node) and n.graph is gm.graph and not n.users:
            gm.graph.erase_node(n)


def fuse_decode_append(gm: fx.GraphModule, ctx: PassContext) -> None:
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not DECODE:
            continue
        matched = "rotary + static-cache index_copy_ + decode attention"
        q_emb, keys, values, lens = node.args[:4]
        reason = None
        writes = {c: _index_copies(c) for c in (keys, values)}
        if lens is not None or keys.op != "placeholder" or values.op != "placeholder" or keys is values:
            continue  # not a static-cache step: nothing to say
        if any(len(w) != 1 for w in writes.values()):
            continue
        ik, iv = writes[keys][0], writes[values][0]
        qr, kr = rope_of(q_emb), None
        if len(ik.args) == 4 and len(iv.args) == 4:
            kr = rope_of(ik.args[3])
        qv = example_value(q_emb)
        if qr is None or kr is None:
            reason = "q or the written key is not x * cos + rotate_half(x) * sin"
        elif ik.args[1] != 2 or iv.args[1] != 2 or ik.args[2] is not iv.args[2] or ik.kwargs or iv.kwargs:
            reason = "the key and value are not written along dim 2 at one position tensor"
        elif (qr[1], qr[2]) != (kr[1], kr[2]):
            reason = "q and k rotate with different cos / sin"
        elif ik.users or iv.users or len(q_emb.users) != 1 or len(ik.args[3].users) != 1:
            reason = "an intermediate (the rotated q / k, an index_copy_ result) is used elsewhere"
        elif qv is None or qv.shape[2] != 1:
            reason = "more than one query token"
        elif not (order[ik] < order[node] and order[iv] < order[node]):
            reason = "the cache writes come after the attention"
        else:
            first = min(order[ik], order[iv])
            between = [u for c in (keys, values) for u in c.users
                       if u not in (ik, iv, node) and first < order.get(u, -1) < order[node]]
            kv, vv = example_value(qr[0]), example_value(iv.args[3])
            pos = example_value(ik.args[2])
            d = size_hint(qv.shape[-1])
            if between:
                reason = f"the cache is read between its writes and the attention ({between[0].name})"
            elif kv is None or vv is None or pos is None or pos.numel() != 1 or \
                    len({qv.dtype, example_value(kr[0]).dtype, vv.dtype, example_value(keys).dtype}) != 1:
                reason = "operand shapes / dtypes the fused op does not take (one position, one dtype)"
            elif d < 16 or d & (d - 1):
                reason = f"head_dim {d} (the fused op takes powers of two >= 16)"
        if reason is not None:
            ctx.refused(PASS_NAME, node, matched, reason)
            continue
        mask = node.args[5] if len(node.args) > 5 else None
        args = (qr[0], kr[0], iv.args[3], qr[1], qr[2], keys, values, ik.args[2], node.args[4], mask)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(APPEND, args)
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        gm.graph.erase_node(ik)
        gm.graph.erase_node(iv)
        _erase_if_dead(gm, qr[3] + kr[3])
        shape = f"[B={size_hint(qv.shape[0])} Hq={size_hint(qv.shape[1])} Hkv={size_hint(kv.shape[1])} " \
                f"S={size_hint(example_value(keys).shape[2])} D={d}]"
        ctx.rewrote(PASS_NAME, new, f"{matched} {shape}", "kernopt.decode_attention_append",
                    "decode_attention's table", "", ops.implementation(qv))
