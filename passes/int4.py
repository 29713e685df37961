"""INT4 weight-only matmuls: dequant -> matmul subgraphs -> `torch.ops.kernopt.int4_linear`.

Pattern (plain torch; `kernopt.int4.Int4Linear.forward` is exactly this, and GPTQ/AWQ-style code writes
the same algebra with other idioms):

    q = (packed >> shifts) & 0xF             # unpack: int32 words or uint8 bytes, shifts/masks, any views
    w = (q - zeros) * scales                 # or scales * (q - zeros), q * s - z * s, (q - 8) * s; casts
    y = F.linear(x, w.reshape(N, K), bias)   # or x @ w.t(), or x @ w with w [K, N]

Matching is in two steps:
1. Structure: from the linear's weight, strip casts and reshapes and read the affine form
   ``(Q - Z) * S`` (any operand order, or ``Q * S - Z * S``): Q is the branch that depends on one
   integer leaf (the packed weight), Z and S do not. Only elementwise, bitwise and layout ops may occur
   between the leaves and the weight (no data-dependent ops).
2. Proof of layout: the weight subgraph is evaluated once on random packed words / scales / zeros
   and compared with kernopt's dequantization of the same tensors seen through a *view* (our
   [N, K/8] words; GPTQ's [K/8, N] words via ``.t()``; uint8 [N, K/2] low-nibble-first bytes via
   ``.view(torch.int32)``; scales/zeros as [N, G] or ``.t()`` of [G, N]). The first candidate that
   reproduces the weight is used. Every op involved is elementwise or a fixed permutation, so random
   inputs exercise every nibble position and group; verdicts are cached per subgraph signature.

Why views only: a layout that needs a repack (AWQ's [K, N/8] words packed along N in interleaved order,
bytes packed along K with N contiguous, signed nibbles) would repack on every call inside the graph.
Those are refused with a reason; load such checkpoints with ``kernopt.int4.from_awq`` / ``from_gptq``,
which convert once, at load time. Zeros computed in the graph (GPTQ unpacking ``qzeros``, ``+ 1``) stay
in the graph: they are small ([K/g, N]) and feed the kernel as its zeros tensor.
"""
from __future__ import annotations

import operator
import os
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from kernopt import ops, workload
from kernopt.int4 import grouping_enabled
from kernopt.kernels.host import env_switch
from kernopt.passes import grouping
from kernopt.passes.grouping import copy_source_meta, real_value
from kernopt.passes.graph import (SILU, PassContext, arg, describe, example_value, format_config, insert_before,
                                  is_call, leading_rows, replace, size_hint, static_int)

LINEAR = (F.linear, torch._C._nn.linear)
MATMUL = (torch.matmul, operator.matmul, torch.mm, "matmul", "mm")
MUL = (operator.mul, torch.mul, "mul", "__mul__")
SUB = (operator.sub, torch.sub, "sub", "__sub__")
CASTS = ("to", "float", "half", "bfloat16", "type")
RESHAPES = ("reshape", "view", torch.reshape, "unsqueeze", torch.unsqueeze, "squeeze", torch.squeeze, "flatten",
            torch.flatten, "contiguous")
TRANSPOSES = ("t", torch.t, "transpose", torch.transpose, "permute", torch.permute)
# Every op allowed between the leaves and the weight: elementwise, bitwise, layout, constants.
ALLOWED = {
    operator.rshift, operator.and_, operator.or_, operator.sub, operator.mul, operator.add, operator.neg,
    operator.getitem, operator.truediv,
    torch.bitwise_right_shift, torch.bitwise_and, torch.bitwise_or, torch.sub, torch.mul, torch.add,
    torch.reshape, torch.unsqueeze, torch.squeeze, torch.flatten, torch.t, torch.transpose, torch.permute,
    torch.cat, torch.stack, torch.arange, torch.tensor,
    "bitwise_right_shift", "__rshift__", "bitwise_and", "__and__", "bitwise_or", "__or__", "sub", "mul", "add",
    "__sub__", "__mul__", "__add__", "reshape", "view", "unsqueeze", "squeeze", "flatten", "expand", "permute",
    "transpose", "t", "contiguous", "to", "float", "half", "bfloat16", "type", "int",
}
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INT4_WEIGHT = torch.ops.kernopt.int4_weight.default
_VERDICTS: dict[Any, Any] = {}


def _strip(node: Any) -> Any:
    """Skip casts and reshapes: they do not change which algebra the weight is."""
    while isinstance(node, fx.Node) and (is_call(node, *CASTS) or is_call(node, *RESHAPES)):
        node = node.args[0]
    return node


def _ancestors(node: fx.Node) -> list[fx.Node]:
    seen: dict[fx.Node, None] = {}
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen[n] = None
        stack.extend(n.all_input_nodes)
    return list(seen)


def _leaves(nodes) -> list[fx.Node]:
    return [n for n in nodes if n.op in ("placeholder", "get_attr")]


def _is_int_leaf(n: fx.Node) -> bool:
    v = example_value(n)
    return v is not None and not v.is_floating_point() and v.dtype != torch.bool


class _Affine:
    """w = (q - zero) * scale, with the nodes for q (depends on the packed leaf), zero and scale."""

    def __init__(self, q: fx.Node, zero: Any, scale: fx.Node, form: str):
        self.q, self.zero, self.scale, self.form = q, zero, scale, form


def _depends(node: Any, leaf: fx.Node) -> bool:
    return isinstance(node, fx.Node) and leaf in _ancestors(node)


def _read_affine(w: fx.Node, packed: fx.Node) -> tuple[Optional[_Affine], Optional[str]]:
    top = _strip(w)
    if is_call(top, *MUL) and len(top.args) == 2:
        a, b = top.args
        if _depends(a, packed) == _depends(b, packed):
            return None, "scale multiply: expected exactly one operand to depend on the packed weight"
        d, s = (a, b) if _depends(a, packed) else (b, a)
        inner = _strip(d)
        if is_call(inner, *SUB) and len(inner.args) == 2 and _depends(inner.args[0], packed) \
                and not _depends(inner.args[1], packed):
            return _Affine(inner.args[0], inner.args[1], s, "(q - z) * s"), None
        return None, "no zero point subtracted before the scale multiply (zero 0 / signed codes: not our format)"
    if is_call(top, *SUB) and len(top.args) == 2:
        a, b = top.args
        if not _depends(a, packed) or _depends(b, packed):
            return None, "q * s - z * s: the packed weight must be on the left only"
        qs, zs = _strip(a), _strip(b)
        if not (is_call(qs, *MUL) and is_call(zs, *MUL) and len(qs.args) == 2 and len(zs.args) == 2):
            return None, "q * s - zs with a precomputed zs: zeros = zs / s is not exact"
        qa, qb = qs.args
        q, s = (qa, qb) if _depends(qa, packed) else (qb, qa)
        for z, s2 in (zs.args, zs.args[::-1]):
            if _strip(s2) is _strip(s) and isinstance(s, fx.Node):
                return _Affine(q, z, s, "q * s - z * s"), None
        return None, "q * s - z * s with two different scale tensors"
    return None, f"weight is {describe(top) if isinstance(top, fx.Node) else top!r}, not (q - zero) * scale"


# ------------------------------------------------------------------------------------------------
# Probing: evaluate the weight subgraph on random leaves and compare with a candidate layout.
# ------------------------------------------------------------------------------------------------
def _probe_leaf(n: fx.Node, gen: torch.Generator) -> torch.Tensor:
    v = example_value(n)
    real = real_value(n)
    if real is not None and real.numel() <= 64:  # shift tables and other small constants: keep their values
        return real.detach().clone()
    shape, dev = tuple(size_hint(s) for s in v.shape), v.device
    if v.is_floating_point():
        return (torch.rand(shape, generator=gen) * 0.5 + 0.01).to(v.dtype).to(dev)
    info = torch.iinfo(v.dtype)
    return torch.randint(info.min, info.max, shape, generator=gen, dtype=torch.int64).to(v.dtype).to(dev)


def _evaluate(nodes: list[fx.Node], env: dict[fx.Node, Any]) -> None:
    for n in nodes:  # in graph order
        if n in env:
            continue
        args = fx.node.map_arg(n.args, env.__getitem__)
        kwargs = fx.node.map_arg(n.kwargs, env.__getitem__)
        if n.op == "call_function":
            env[n] = n.target(*args, **kwargs)
        elif n.op == "call_method":
            env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
        else:
            raise ValueError(f"cannot evaluate {n.op} {n.target}")


def _ng_layouts(shape, N: int, G: int) -> list[tuple[str, tuple[int, int]]]:
    """How a per-group tensor of `shape` reads as [N, G]: ("", (N, G)) as stored, (".t()", (G, N)) transposed."""
    dims = [s for s in shape if s != 1]
    numel = 1
    for s in shape:
        numel *= s
    if numel != N * G:
        return []
    out = []
    if dims == [d for d in (N, G) if d != 1]:
        out.append(("", (N, G)))
    if dims == [d for d in (G, N) if d != 1] and (G != 1 and N != 1):
        out.append((".t()", (G, N)))
    return out


def _as_ng(t: torch.Tensor, N: int, G: int) -> list[tuple[str, torch.Tensor]]:
    return [(how, t.reshape(shape).t() if how else t.reshape(shape)) for how, shape in _ng_layouts(t.shape, N, G)]


def _packed_views(p: torch.Tensor, N: int, K: int) -> list[tuple[str, Any]]:
    out = []
    if p.dtype == torch.int32 and tuple(p.shape) == (N, K // 8):
        out.append(("", lambda t: t))
    if p.dtype == torch.int32 and tuple(p.shape) == (K // 8, N):
        out.append((".t()", lambda t: t.t()))
    if p.dtype in (torch.uint8, torch.int8) and tuple(p.shape) == (N, K // 2) and K % 8 == 0:
        out.append((".view(int32)", lambda t: t.contiguous().view(torch.int32)))
    return out


def _layout_refusal(p: torch.Tensor, N: int, K: int) -> str:
    shape = tuple(p.shape)
    if p.dtype == torch.int32 and shape == (K, N // 8):
        return "int32 words packed along N (AWQ-style): needs a repack; load with kernopt.int4.from_awq"
    if p.dtype in (torch.uint8, torch.int8) and shape == (K // 2, N):
        return "bytes packed along K with N contiguous: not viewable as int32 words; needs a repack"
    return f"packed weight {str(p.dtype).replace('torch.', '')} {list(shape)} is not an int4 layout of [N={N}, K={K}]"


_CAST_TO = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16}
_KERNEL_READS = (torch.float16, torch.bfloat16, torch.float32, torch.int8, torch.uint8, torch.int16, torch.int32)


def _cast_target(n: fx.Node) -> Optional[torch.dtype]:
    if is_call(n, *_CAST_TO):
        return _CAST_TO[n.target]
    if is_call(n, "to", "type"):
        dtypes = [a for a in (*n.args[1:], n.kwargs.get("dtype")) if isinstance(a, torch.dtype)]
        return dtypes[0] if len(dtypes) == 1 else None
    return None


def _kernel_operand(node: fx.Node, N: int, G: int, how: str) -> fx.Node:
    """The deepest node below a scales / zeros node that gives the kernel the same values: reshapes (row-major
    order is kept, so the same [N, G] reading `how` applies) and casts to fp32 are skipped, since the kernel and
    the reference convert scales and zeros to fp32 themselves with the same rounding. So kernopt's own
    `scales.float().unsqueeze(-1)` feeds the module's scales buffer itself: no cast per call, and buffers that
    `kernopt.int4.pack_adjacent` laid out side by side stay side by side (one launch for the group)."""
    best, cur = node, node
    while isinstance(cur, fx.Node) and cur.op in ("call_function", "call_method") and cur.args \
            and isinstance(cur.args[0], fx.Node):
        src = example_value(cur.args[0])
        if src is None or src.dtype not in _KERNEL_READS:
            break
        if is_call(cur, *RESHAPES):
            if any(isinstance(a, torch.dtype) for a in cur.args[1:]):
                break  # .view(dtype) reinterprets bits
        elif _cast_target(cur) not in (torch.float32, src.dtype):
            break  # a narrowing cast rounds: keep it
        cur = cur.args[0]
        if how in dict(_ng_layouts(src.shape, N, G)):
            best = cur
    return best


class _Plan:
    def __init__(self, q_view: str, s_view: str, z_view: Optional[str], group: int):
        self.q_view, self.s_view, self.z_view, self.group = q_view, s_view, z_view, group


def _prove(w: fx.Node, aff: _Affine, packed: fx.Node, transposed: bool, N: int, K: int,
           nodes: list[fx.Node]) -> tuple[Optional[_Plan], Optional[str]]:
    from kernopt.kernels.int4_gemm import dequantize_int4
    from kernopt.tolerance import mismatch

    wv = example_value(w)
    zero_const = None
    if not isinstance(aff.zero, fx.Node):
        if aff.zero != 8:
            return None, f"constant zero point {aff.zero!r}: kernopt's symmetric format uses 8"
        zero_const = 8
    gen = torch.Generator().manual_seed(0)
    env = {leaf: _probe_leaf(leaf, gen) for leaf in _leaves(nodes)}
    try:
        with torch.no_grad():
            _evaluate(nodes, env)
    except Exception as e:  # the graph's own ops failed on the probe: be safe and refuse
        return None, f"could not evaluate the dequant subgraph ({type(e).__name__}: {e})"
    weight = env[w].t() if transposed else env[w]
    scale = env[aff.scale]
    zero = env[aff.zero] if zero_const is None else None
    if not isinstance(scale, torch.Tensor) or scale.numel() == 0 or K % max(1, scale.numel() // N):
        return None, "scales are not one per (output, group)"
    G = scale.numel() // N
    g = K // G if G else 0
    if g not in (32, 64, 128) and not (g >= 16 and g & (g - 1) == 0):
        return None, f"group size {g} (K={K}, {G} groups): the kernel takes powers of two >= 16"
    p = env[packed]
    views = _packed_views(p, N, K)
    if not views:
        return None, _layout_refusal(p, N, K)
    s_views = _as_ng(scale, N, G)
    z_views = [(None, None)] if zero is None else _as_ng(zero, N, G)
    if not s_views or not z_views:
        return None, "scales/zeros are not [N, G] or [G, N] per-group tensors"
    for qname, qfn in views:
        for sname, s in s_views:
            for zname, z in z_views:
                try:
                    mine = dequantize_int4(qfn(p), s, z, g, torch.float32)
                except Exception:
                    continue
                if mismatch(mine.to(wv.dtype).float(), weight.float(), wv.dtype) is None:
                    return _Plan(qname, sname, zname, g), None
    return None, ("evaluated on random packed words, the weight is not (nibble - zero) * scale in any layout "
                  "kernopt reads through a view (nibble order, signedness or packing differ)")


def _signature(nodes: list[fx.Node]) -> Any:
    sig = []
    for n in nodes:
        v = example_value(n)
        real = real_value(n) if n.op == "placeholder" else None
        consts = tuple(repr(a) for a in fx.node.map_arg((n.args, n.kwargs), lambda x: None)) if n.op != "placeholder" else ()
        small = tuple(real.flatten().tolist()) if real is not None and real.numel() <= 64 else None
        sig.append((n.op, str(n.target) if n.op != "placeholder" else "", consts,
                    (tuple(v.shape), v.dtype, tuple(v.stride())) if v is not None else None, small))
    return tuple(sig)


def _int4_linears(gm: fx.GraphModule):
    """(node, x, w, bias, transposed, w's ancestors, integer leaves) for each linear / matmul of `gm` whose weight
    depends on an integer tensor: the candidates the pass tries."""
    for node in list(gm.graph.nodes):
        if node.graph is not gm.graph or node.op not in ("call_function", "call_method"):
            continue
        if is_call(node, *LINEAR):
            x, w, bias, transposed = arg(node, 0, "input"), arg(node, 1, "weight"), arg(node, 2, "bias"), False
        elif is_call(node, *MATMUL) and len(node.args) == 2:
            x, w, bias = node.args[0], node.args[1], None
            transposed = True
            if is_call(w, "t", torch.t) or (is_call(w, "transpose", torch.transpose)
                                            and set(w.args[1:3]) in ({0, 1}, {-1, -2})):
                w, transposed = w.args[0], False
        else:
            continue
        if not isinstance(w, fx.Node):
            continue
        nodes = _ancestors(w)
        if any(n.target is INT4_WEIGHT for n in nodes):
            continue  # a weight this pass already gave to kernopt.int4_weight (used by an earlier linear too)
        packed = [leaf for leaf in _leaves(nodes) if _is_int_leaf(leaf)
                  and (example_value(leaf).numel() >= 64 or real_value(leaf) is None)]
        if packed:  # else a float weight: not ours (the matmul pass takes it)
            yield node, x, w, bias, transposed, nodes, packed


def _operands(gm: fx.GraphModule, anchor: fx.Node, packed: fx.Node, aff: _Affine, plan: _Plan, N: int,
              K: int) -> tuple:
    """The kernel's (qweight [N, K / 8], scales [N, G], zeros [N, G] or None) as views of the graph's own tensors
    (plan: the layout _prove found), inserted before `anchor`."""
    G = K // plan.group

    def view_ng(src: fx.Node, how: str) -> fx.Node:
        v = example_value(src)
        shape = dict(_ng_layouts(v.shape, N, G))[how]
        out = src
        if tuple(v.shape) != shape:
            out = insert_before(gm, anchor, torch.reshape, (out, shape), v.reshape(shape))
        if how == ".t()":
            out = insert_before(gm, anchor, torch.t, (out,), example_value(out).t())
        return out

    qv = example_value(packed)
    if plan.q_view == ".t()":
        qw = insert_before(gm, anchor, torch.t, (packed,), qv.t())
    elif plan.q_view == ".view(int32)":
        c = insert_before(gm, anchor, torch.Tensor.contiguous, (packed,), qv.contiguous())
        with gm.graph.inserting_before(anchor):
            qw = gm.graph.call_method("view", (c, torch.int32))
        qw.meta["example_value"] = qv.contiguous().view(torch.int32)
    else:
        qw = packed
    scales = view_ng(_kernel_operand(aff.scale, N, G, plan.s_view), plan.s_view)
    zeros = view_ng(_kernel_operand(aff.zero, N, G, plan.z_view), plan.z_view) if plan.z_view is not None else None
    return qw, scales, zeros


def _layout(plan: _Plan) -> str:
    return f"qweight{plan.q_view or ''} scales{plan.s_view or ''}" + \
        (f" zeros{plan.z_view or ''}" if plan.z_view is not None else " symmetric")


# ------------------------------------------------------------------------------------------------
# The pass
# ------------------------------------------------------------------------------------------------
class Int4Pass:
    name = "int4"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        for node, x, w, bias, transposed, nodes, packed in _int4_linears(gm):  # lazily: rewrites change the graph
            matched = "dequant(int4) -> " + ("linear" if is_call(node, *LINEAR) else "matmul")
            reason = self._try(gm, ctx, node, x, w, bias, transposed, nodes, packed, matched)
            if reason:
                ctx.refused(self.name, node, matched, reason)
        if grouping_enabled():
            group_shared_inputs(gm, ctx)
            if swiglu_enabled():
                fuse_swiglu(gm, ctx)
        if float_inputs_enabled():
            float_gemv_inputs(gm, ctx)

    def _try(self, gm, ctx, node, x, w, bias, transposed, nodes, packed, matched) -> Optional[str]:
        xv, wv = example_value(x), example_value(w)
        if xv is None or wv is None or wv.dim() != 2:
            return "operands have no recorded 2-D weight shape"
        if xv.dtype not in DTYPES or wv.dtype != xv.dtype:
            return f"dtypes x={xv.dtype} w={wv.dtype}: the kernel takes one of fp16/bf16/fp32 for both"
        if bias is not None and (example_value(bias) is None or example_value(bias).dtype != xv.dtype):
            return "bias dtype differs from x"
        if any(not isinstance(s, int) for s in wv.shape):
            return "dynamic weight shape"
        rows = leading_rows(xv)
        prompt = None if ctx.cuda_graphs else prompt_path(rows)
        if prompt == "inductor":
            return (f"{size_hint(rows)} rows in a graph without CUDA graphs ({PROMPT_ENV}=inductor): left to Inductor "
                    "(its own dequantize + matmul)")
        N, K = (wv.shape[1], wv.shape[0]) if transposed else (wv.shape[0], wv.shape[1])
        bad = [n for n in nodes if n.op in ("call_function", "call_method") and n.target not in ALLOWED]
        if bad:
            return f"dequant subgraph has ops outside elementwise/bitwise/layout: {describe(bad[0])}"
        # the packed weight: the integer leaf that the weight's q-branch depends on
        aff, reason = None, "no (q - zero) * scale form"
        for leaf in packed:
            aff, reason = _read_affine(w, leaf)
            if aff is not None:
                break
        if aff is None:
            return reason
        if isinstance(aff.scale, fx.Node) and _depends(aff.scale, leaf) or _depends(aff.zero, leaf):
            return "scales or zeros depend on the packed weight"
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        nodes = sorted(nodes, key=order.__getitem__)
        key = (_signature(nodes), transposed, nodes.index(leaf), nodes.index(aff.scale),
               nodes.index(aff.zero) if isinstance(aff.zero, fx.Node) else aff.zero)
        if key not in _VERDICTS:
            _VERDICTS[key] = _prove(w, aff, leaf, transposed, N, K, nodes)
        plan, reason = _VERDICTS[key]
        if plan is None:
            return reason
        if prompt == "weight":
            return self._rewrite_weight(gm, ctx, node, x, w, transposed, leaf, aff, plan, N, K, nodes, matched)
        return self._rewrite(gm, ctx, node, x, bias, leaf, aff, plan, N, K, nodes, matched)

    def _rewrite_weight(self, gm, ctx, node, x, w, transposed, packed, aff: _Affine, plan: _Plan, N, K, nodes,
                        matched):
        """Prompt rows outside CUDA graphs (PROMPT_ENV "auto"): only the dequantization becomes kernopt's, as
        `kernopt.int4_weight` (a triton_op: Inductor launches its kernel from generated code), and the linear stays
        a plain one on that weight, for the matmul pass or Inductor's matmul."""
        qw, scales, zeros = _operands(gm, w, packed, aff, plan, N, K)
        wv, xv = example_value(w), example_value(x)
        args = (qw, scales, zeros, plan.group, wv.dtype)
        dead = [n for n in reversed(nodes) if n.op in ("call_function", "call_method")]
        if transposed:  # w is [K, N]
            deq = insert_before(gm, w, INT4_WEIGHT, args, wv.new_empty((N, K)))
            replace(gm, w, torch.t, (deq,), dead=dead)
        else:
            replace(gm, w, INT4_WEIGHT, args, dead=dead)
        m_hint = size_hint(leading_rows(xv))
        impl = "triton" if ops.implementation(xv) == "triton" else "reference"  # (int4_weight: no interpreter)
        ctx.rewrote(self.name, node, f"{matched} {aff.form} M={m_hint} N={N} K={K} g{plan.group} [{_layout(plan)}]",
                    "kernopt.int4_weight", f"{m_hint} rows in a graph without CUDA graphs ({PROMPT_ENV}=auto): the "
                    "weight by int4_dequantize, the matmul a plain one",
                    workload.scenario_for_activation(ctx.scenario, [size_hint(d) for d in xv.shape]), impl)
        return None

    def _rewrite(self, gm, ctx, node, x, bias, packed, aff: _Affine, plan: _Plan, N, K, nodes, matched):
        qw, scales, zeros = _operands(gm, node, packed, aff, plan, N, K)
        xv = example_value(x)
        m_hint = size_hint(leading_rows(xv))
        impl = ops.implementation(xv)
        kmod = ops.kernel_module("int4_gemm")
        config = kmod.select_config(m_hint, N, K, plan.group, symmetric=zeros is None,
                                    x_dtype=xv.dtype) if impl != "reference" \
            else "plain-torch reference"
        replace(gm, node, torch.ops.kernopt.int4_linear.default, (x, qw, scales, zeros, plan.group, bias),
                dead=[n for n in reversed(nodes) if n.op in ("call_function", "call_method")])
        ctx.rewrote(self.name, node, f"{matched} {aff.form} M={m_hint} N={N} K={K} g{plan.group} [{_layout(plan)}]",
                    "kernopt.int4_linear", config,
                    workload.scenario_for_activation(ctx.scenario, [size_hint(d) for d in xv.shape]), impl)
        return None


# ------------------------------------------------------------------------------------------------
# Grouping: int4 linears that read one x -> one kernopt.int4_linear_group launch + column slices
# ------------------------------------------------------------------------------------------------
INT4_LINEAR = torch.ops.kernopt.int4_linear.default
INT4_GROUP = torch.ops.kernopt.int4_linear_group.default
GROUP_PASS_NAME = "int4_group"  # its own name in reports: the int4 rewrites stay one per linear
def group_shared_inputs(gm: fx.GraphModule, ctx: PassContext) -> None:
    """Replace int4_linear nodes that take the same x node (same group size, all symmetric or all with zeros)
    by one `kernopt.int4_linear_group` node and a column slice per linear. ``KERNOPT_INT4_GROUP=0`` skips it."""

    def key_of(n: fx.Node):
        if len(n.args) != 6 or n.kwargs:
            return None
        x, _, scales, zeros, group_size, _ = n.args
        sv = example_value(scales)
        if example_value(n) is None or sv is None or static_int(sv.shape[0]) is None:
            return None  # a column offset must be a constant
        return x, group_size, zeros is None

    grouping.group_shared_inputs(gm, INT4_LINEAR, key_of, lambda key, members, order: _group(gm, ctx, members, order))


def _group(gm: fx.GraphModule, ctx: PassContext, members: list[fx.Node], order: dict[fx.Node, int]) -> None:
    # pack_adjacent lays q, k, v out in call order, so the storage order is normally graph order
    members, adjacent = grouping.storage_order(members, (1, 2), (3,), ops.adjacent_view)
    x, group_size = members[0].args[0], members[0].args[4]
    anchor = grouping.anchor_after_inputs(gm, members, order)
    cols = [static_int(example_value(m.args[2]).shape[0]) for m in members]
    evs = [example_value(m) for m in members]
    args = (x, [m.args[1] for m in members], [m.args[2] for m in members], [m.args[3] for m in members],
            group_size, [m.args[5] for m in members])
    group = insert_before(gm, anchor, INT4_GROUP, args, torch.cat(evs, dim=-1))
    grouping.replace_with_slices(gm, anchor, group, members, cols)
    xv = example_value(x)
    m_hint, K = size_hint(leading_rows(xv)), size_hint(xv.shape[-1])
    impl = ops.implementation(xv)
    config = grouping.launch_config(impl, adjacent, lambda: format_config(ops.kernel_module("int4_gemm").select_config(
        m_hint, sum(cols), K, group_size, symmetric=members[0].args[3] is None, x_dtype=xv.dtype)))
    ctx.rewrote(GROUP_PASS_NAME, group,
                f"{len(members)} int4_linear of one x -> one launch M={m_hint} N={'+'.join(map(str, cols))} "
                f"K={K} g{group_size}", "kernopt.int4_linear_group", config,
                workload.scenario_for_activation(ctx.scenario, [size_hint(d) for d in xv.shape]), impl)


# ------------------------------------------------------------------------------------------------
# GEMV launches read x in float32
# ------------------------------------------------------------------------------------------------
FLOAT_X_ENV = "KERNOPT_INT4_FLOAT_X"
FLOAT_X_PASS_NAME = "int4_float_x"
# Who runs the int4 linears of a graph that runs without CUDA graphs (kernopt.optimize's compiled prompt forward
# outside a static cache, a plain torch.compile(model, backend="kernopt") of a prompt): such a graph pays every
# op's host time, and a kernopt custom op's Python (dispatch, config, Triton launch: ~100-190 us a call on the H200
# host, benchmarks/op_host_overhead.py) costs several times Inductor's generated launches.
# - "auto" (default): for linears of a static PROMPT_AUTO_MIN_ROWS rows or more (where kernopt's own table picks
#   dequantize + cuBLAS: int4_gemm DEQUANT_CUBLAS_MIN_M), the weight comes from `kernopt.int4_weight`, a triton_op whose
#   dequantize kernel Inductor launches from its generated code, and the linear stays a plain one (the matmul pass's, or
#   Inductor's cuBLAS call): the kernel path's GPU work at generated-code host cost. The kernel below that row count and
#   for symbolic rows (a dynamic graph may meet one row, where dequantizing the whole weight per call loses). H200,
#   da8ef30 (sweeps/llama_1b_weightop, llama_8b_weightop): 1B prefill 13.00 ms against 21.91 on the kernel (bf16 kernopt
#   12.17), 8B 62.36 against 61.95. Before it, on the H200 (llama suite, prefill b1 s2048, the compiled forward;
#   same-run pairs: the host's speed moved 10-50 % between machines): the 1B prompt is host-bound on the kernel path
#   (11.25 ms of kernels in a call that returns after 19-29 ms,
#   profiles/profile-1B-kernopt_int4-forward-host-7da6db2.txt), where Inductor's own dequantize + matmul took 13.03 ms
#   against 22.16 (sweeps/llama_1b_auto, aeeb0c6; bf16 kernopt 11.94); the 8B prompt is GPU-bound, where Inductor's
#   dequantize kernels cost 3.5x int4_dequantize's GPU time (~16 against 4.5 ms a call,
#   profiles/profile-8B-*-forward-229e8ec.txt) and took 69.92 ms against the kernel's 62.02 (sweeps/llama_8b_auto2).
# - "inductor": Inductor's own dequantize + matmul for every linear of PROMPT_INDUCTOR_MIN_ROWS rows or more (the
#   row count's hint when symbolic). The llama suite's kernopt_int4_prompt_inductor system sets it.
# - "kernel": kernopt's op for every row count (kernopt_int4_prompt_kernel).
# kernopt.optimize's prompt forward against a static cache runs under CUDA graphs (kernopt/hf.py, 747aee5): none
# of this applies there.
PROMPT_ENV = "KERNOPT_INT4_PROMPT"
PROMPT_MODES = ("auto", "inductor", "kernel")
PROMPT_INDUCTOR_MIN_ROWS = 17  # above the speculative-verification rows that tiled2 serves
PROMPT_AUTO_MIN_ROWS = 192  # = kernels/int4_gemm.py DEQUANT_CUBLAS_MIN_M (a test keeps them equal)


def prompt_mode() -> str:
    v = os.environ.get(PROMPT_ENV, "auto")
    if v not in PROMPT_MODES:
        raise ValueError(f"{PROMPT_ENV}={v!r}; valid: {', '.join(map(repr, PROMPT_MODES))}")
    return v


def prompt_path(rows) -> Optional[str]:
    """What an int4 linear of `rows` rows (an int or a SymInt) in a graph without CUDA graphs becomes (PROMPT_ENV):
    "weight" (kernopt.int4_weight under a plain linear), "inductor" (left to Inductor whole) or None (the kernel)."""
    mode = prompt_mode()
    if mode == "inductor":
        return "inductor" if size_hint(rows) >= PROMPT_INDUCTOR_MIN_ROWS else None
    if mode == "auto" and not isinstance(rows, torch.SymInt) and int(rows) >= PROMPT_AUTO_MIN_ROWS:
        return "weight"
    return None


# ------------------------------------------------------------------------------------------------
# SwiGLU: silu(gate) * up over a grouped gate/up launch -> one kernopt.int4_swiglu (the GEMV's epilogue at decode)
# ------------------------------------------------------------------------------------------------
INT4_SWIGLU = torch.ops.kernopt.int4_swiglu.default
SWIGLU_ENV = "KERNOPT_INT4_SWIGLU"
SWIGLU_PASS_NAME = "int4_swiglu"


def swiglu_enabled() -> bool:
    """silu(gate) * up fused into the grouped gate/up launch (fuse_swiglu), unless ``KERNOPT_INT4_SWIGLU=0``. On by
    default since the H200 A/B (sweeps/int4_ab/llama-h200.json, 3ceaa16, one run): 8B int4 decode step 2.90 ms
    against 2.91 unfused (llama system kernopt_int4_unfused), one kernel less per layer."""
    return env_switch(SWIGLU_ENV, "1")


def _only_user(n: fx.Node) -> Optional[fx.Node]:
    return next(iter(n.users)) if len(n.users) == 1 else None


def _narrow_of(n: fx.Node, group: fx.Node) -> Optional[tuple[int, int]]:
    """(start, length) when `n` is torch.narrow(group, -1, start, length) (what _group inserts), else None."""
    if not (n.op == "call_function" and n.target is torch.narrow and len(n.args) == 4 and n.args[0] is group
            and not n.kwargs):
        return None
    dim, start, length = n.args[1:]
    return (start, length) if dim == -1 and isinstance(start, int) and isinstance(length, int) else None


def fuse_swiglu(gm: fx.GraphModule, ctx: PassContext) -> None:
    """Replace ``silu(narrow(g, 0, n)) * narrow(g, n, n)`` over a two-part int4_linear_group g (gate, up of equal
    widths: Llama's MLP after grouping) by one ``kernopt.int4_swiglu`` node with g's arguments. Any other use of
    the group, its slices or the silu leaves the graph as it is (reported)."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not INT4_GROUP or len(node.args[1]) != 2:
            continue
        matched = "silu(int4 gate) * int4 up (grouped)"
        slices = {_narrow_of(u, node): u for u in node.users}
        widths = [static_int(example_value(s).shape[0]) for s in node.args[2]]
        n = widths[0]
        gate, up = slices.get((0, n)), slices.get((n, n))
        if len(node.users) != 2 or widths[1] != n or gate is None or up is None:
            continue  # not a gate/up pair (q/k/v, or slices used otherwise): nothing to say
        act = _only_user(gate)
        mul = _only_user(act) if act is not None and is_call(act, *SILU) and not act.kwargs else None
        if mul is None or not is_call(mul, *MUL) or mul.kwargs or set(mul.args) != {act, up} or len(mul.args) != 2 \
                or _only_user(up) is not mul or act.args[0] is not gate:
            if act is not None and is_call(act, *SILU):
                ctx.refused(SWIGLU_PASS_NAME, node, matched, "the gate's silu or the up slice has other uses")
            continue
        x, group_size = node.args[0], node.args[4]
        new = insert_before(gm, mul, INT4_SWIGLU, node.args, example_value(mul))
        mul.replace_all_uses_with(new)
        for dead in (mul, act, up, gate, node):
            gm.graph.erase_node(dead)
        xv = example_value(x)
        m_hint, K = size_hint(leading_rows(xv)), size_hint(xv.shape[-1])
        impl = ops.implementation(xv)
        config = "plain-torch reference"
        if impl != "reference":
            kmod = ops.kernel_module("int4_gemm")
            cfg = kmod.select_config(m_hint, 2 * n, K, group_size, symmetric=node.args[3][0] is None, x_dtype=xv.dtype)
            config = ("in the GEMV's epilogue if adjacent (checked per call) " if kmod.gated_epilogue(cfg, m_hint) else
                      "grouped product, then silu * mul in torch ") + format_config(cfg)
        ctx.rewrote(SWIGLU_PASS_NAME, new, f"{matched} M={m_hint} N={n} K={K} g{group_size}", "kernopt.int4_swiglu",
                    config, workload.scenario_for_activation(ctx.scenario, [size_hint(d) for d in xv.shape]), impl)


def float_inputs_enabled() -> bool:
    """``KERNOPT_INT4_FLOAT_X=0`` leaves the GEMV launches' x in bf16/fp16 (float_gemv_inputs)."""
    return os.environ.get(FLOAT_X_ENV, "1") != "0"


def gemv_takes_float_x(rows: int, n: int, k: int, group_size: int, dtype: torch.dtype,
                       symmetric: bool = False) -> bool:
    """Whether an int4 launch of `rows` x [n, k] rows with x in `dtype` gets x.float() (float_gemv_inputs): a
    bf16/fp16 x, the switch on, rows <= int4_gemm.GEMV_MAX_M and the table's impl one of int4_gemm.FLOAT_X_IMPLS
    (not PLANES / PAIRS). `kernopt tune` asks the same question, to time the dtype the compiled launch will see."""
    kmod = ops.kernel_module("int4_gemm")
    if dtype not in (torch.bfloat16, torch.float16) or not float_inputs_enabled() or rows > kmod.GEMV_MAX_M:
        return False
    cfg = kmod.select_config(rows, n, k, group_size, symmetric=symmetric, x_dtype=dtype)
    return cfg["impl"] in kmod.FLOAT_X_IMPLS and not cfg.get("PLANES") and not cfg.get("PAIRS")


def float_gemv_inputs(gm: fx.GraphModule, ctx: PassContext) -> None:
    """int4 ops whose launch is the GEMV (rows <= int4_gemm.GEMV_MAX_M, a Triton implementation, the table's
    impl one of int4_gemm.FLOAT_X_IMPLS) and whose x is bf16/fp16 become ``op(x.float()).to(x.dtype)``.

    Why: at decode the int4 GEMV is issue-bound (ncu on the H200: benchmarks/results/profiles), and every
    thread converts each x element it multiplies from bf16 to fp32: 697 SASS instructions per 128 nibbles of
    its K loop with bf16 x, 520 with fp32 x (`benchmarks/sass_loop.py`, gemv2 128 x 4 warps). Inductor fuses
    the cast into x's producer (the RMSNorm, silu * up) and the cast back into the consumers.
    Exact: bf16/fp16 -> fp32 is exact, the kernel accumulates in fp32 either way, and its fp32 output rounded
    to x's dtype is what it stores itself otherwise (round to nearest even)."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (INT4_LINEAR, INT4_GROUP):
            continue
        x = node.args[0]
        xv, ov = example_value(x), example_value(node)
        if xv is None or ov is None or ops.implementation(xv) not in ("triton", "interpreter"):
            continue
        rows = static_int(leading_rows(xv))
        # per-part operands: lists for the grouped op, one tensor for int4_linear
        scales, zeros = (node.args[i] if node.target is INT4_GROUP else [node.args[i]] for i in (2, 3))
        n_total = sum(size_hint(example_value(s).shape[0]) for s in scales)
        if rows is None or not gemv_takes_float_x(rows, n_total, size_hint(xv.shape[-1]), node.args[4], xv.dtype,
                                                  symmetric=all(z is None for z in zeros)):
            continue
        x32 = insert_before(gm, node, torch.Tensor.float, (x,), xv.float())
        node.update_arg(0, x32)
        node.meta["example_value"] = ov.float()
        with gm.graph.inserting_after(node):
            back = gm.graph.call_function(torch.Tensor.to, (node, xv.dtype))
        back.meta["example_value"] = ov
        copy_source_meta(back, node)
        node.replace_all_uses_with(back, delete_user_cb=lambda u: u is not back)
        dt = str(xv.dtype).replace("torch.", "")
        op = "kernopt.int4_linear_group" if node.target is INT4_GROUP else "kernopt.int4_linear"
        ctx.rewrote(FLOAT_X_PASS_NAME, node, f"{op} GEMV M={rows} with x {dt}", op,
                    f"x.float() in, output .to({dt})",
                    workload.scenario_for_activation(ctx.scenario, [size_hint(d) for d in xv.shape]),
                    ops.implementation(xv))
