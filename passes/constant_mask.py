"""Attention masks that are constants of the graph, folded into `kernopt.flash_attention`'s causal flag.

Why: transformers builds its causal mask in the forward (`masking_utils.sdpa_mask`), and under torch.compile it
never skips it (`_ignore_causal_mask_sdpa` returns False while tracing). A compiled HF prompt therefore hands
attention a materialised [B, 1, S, S] boolean mask, built from `arange`s:

    kv = arange(S)[None, None, None, :];  q = arange(S)[None, None, :, None]
    mask = (kv <= q).expand(B, 1, S, S)

With that mask the kernel visits every key tile and reads the mask for each score; with `causal=True` it skips the
tiles above the diagonal, masks only the diagonal ones, and may take its warp-specialised causal tile (the mask
path cannot). H200 profile of the compiled 8B prompt (b1 s2048): 300 us a layer with the mask.

What is folded: the mask argument of a `kernopt.flash_attention` call whose whole ancestry is computed from
constants (no graph input, no module attribute, only the pure ops in `_PURE`, static shapes). Its value is then
the same on every call of the compiled graph, so the pass computes it once here, on the graph's device, and reads it:

- every entry attends (bool True, or float 0)                      -> mask None (causal flag unchanged);
- exactly the kernel's bottom-right causal pattern (key j visible to query i iff j <= i + Skv - Sq), Skv >= Sq, so
  every query row keeps a key; with causal=True already, the same  -> mask None, causal True.

Float masks count only with entries exactly 0 or -inf (what the kernel's causal rule computes; a finite large
negative value is not the same on a row whose scores are themselves huge). Anything else keeps its mask, with the
reason recorded for explain(). KERNOPT_MASK_FOLD=0 turns the fold off (an A/B switch; compile time).
"""
from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx as fx

from kernopt import ops
from kernopt.kernels.host import env_switch
from kernopt.passes.graph import PassContext, erase_unused, example_value, static_int

FOLD_ENV = "KERNOPT_MASK_FOLD"
# The most elements the fold computes at compile time (a node's backing storage, or the mask it compares):
# 2^28 bool = 256 MB; a [1, 1, 16384, 16384] causal mask is 2^28.
MAX_ELEMENTS = 1 << 28

# Pure, deterministic ops a mask may be built from (function targets and tensor method names).
_PURE_FUNCTIONS = {
    torch.arange, torch.ones, torch.zeros, torch.full, torch.eye, torch.tril, torch.triu, torch.ones_like,
    torch.zeros_like, torch.full_like, torch.where, torch.le, torch.lt, torch.ge, torch.gt, torch.eq, torch.ne,
    torch.logical_and, torch.logical_or, torch.logical_not, torch.logical_xor, torch.bitwise_and, torch.bitwise_or,
    torch.bitwise_not, torch.bitwise_xor, torch.add, torch.sub, torch.mul, torch.neg, torch.minimum, torch.maximum,
    torch.unsqueeze, torch.squeeze, torch.reshape, torch.broadcast_to, torch.masked_fill, torch.transpose,
    torch.permute, torch.flatten, torch.cat, torch.stack, torch.all, torch.any,
    operator.le, operator.lt, operator.ge, operator.gt, operator.eq, operator.ne, operator.and_, operator.or_,
    operator.xor, operator.invert, operator.add, operator.sub, operator.mul, operator.neg, operator.floordiv,
    operator.mod, operator.getitem,
}
_PURE_METHODS = {
    "view", "reshape", "expand", "expand_as", "unsqueeze", "squeeze", "to", "bool", "float", "half", "bfloat16",
    "int", "long", "type", "__getitem__", "transpose", "permute", "contiguous", "clone", "flatten", "repeat",
    "masked_fill", "le", "lt", "ge", "gt", "eq", "ne", "logical_not", "logical_and", "logical_or", "logical_xor",
    "bitwise_not", "bitwise_and", "bitwise_or", "__and__", "__or__", "__xor__", "__invert__", "tril", "triu",
    "add", "sub", "mul", "neg", "where", "all", "any",
}


def fold_enabled() -> bool:
    return env_switch(FOLD_ENV, "1")


def is_flash_attention(node: Any) -> bool:
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    op = torch.ops.kernopt.flash_attention
    return node.target is op or node.target is op.default


def _backed_elements(t: torch.Tensor) -> int:
    """Elements a strided tensor spans in memory (an expand's stride-0 dims cost nothing)."""
    if t.numel() == 0:
        return 0
    return 1 + sum((_static_size(s) - 1) * abs(_static_size(st)) for s, st in zip(t.shape, t.stride()))


def _static_size(v: Any) -> int:
    s = static_int(v)
    if s is None:
        raise _NotConstant("a dynamic size")
    return s


class _NotConstant(Exception):
    pass


def _ancestry(mask: fx.Node) -> list[fx.Node]:
    """The nodes `mask` is computed from, in graph order; raise _NotConstant with the reason when one is not a
    pure op on constants."""
    seen: set[fx.Node] = set()
    stack = [mask]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            raise _NotConstant(f"depends on graph input {n.name}")
        if n.op == "get_attr":
            raise _NotConstant(f"depends on module attribute {n.target}")
        if n.op == "call_function":
            if n.target not in _PURE_FUNCTIONS:
                raise _NotConstant(f"computed with {getattr(n.target, '__name__', n.target)} ({n.name})")
        elif n.op == "call_method":
            if n.target not in _PURE_METHODS:
                raise _NotConstant(f"computed with .{n.target}() ({n.name})")
        else:
            raise _NotConstant(f"computed by a {n.op} node ({n.name})")
        v = n.meta.get("example_value", n.meta.get("val"))
        if isinstance(v, torch.Tensor):
            if _backed_elements(v) > MAX_ELEMENTS:
                raise _NotConstant(f"too large to compute at compile time ({n.name})")
        elif not isinstance(v, (int, float, bool)):
            raise _NotConstant(f"{n.name} is not a tensor or a number")
        stack.extend(n.all_input_nodes)
    order = {n: i for i, n in enumerate(mask.graph.nodes)}
    return sorted(seen, key=order.__getitem__)


def _evaluate(nodes: list[fx.Node]) -> Any:
    env: dict[fx.Node, Any] = {}

    def load(a):
        return fx.node.map_arg(a, lambda n: env[n])

    for n in nodes:
        args, kwargs = load(n.args), load(n.kwargs)
        if n.op == "call_function":
            env[n] = n.target(*args, **kwargs)
        else:
            env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
    return env[nodes[-1]]


def _attends(value: Any) -> torch.Tensor:
    """The mask as bool, True where a key is attended (raise _NotConstant for a form the fold does not read)."""
    if not isinstance(value, torch.Tensor):
        raise _NotConstant("not a tensor")
    if value.dtype == torch.bool:
        return value
    if value.is_floating_point():
        zero, neg_inf = value == 0, value == float("-inf")
        if not bool((zero | neg_inf).all()):
            raise _NotConstant("a float mask with entries other than 0 and -inf")
        return zero
    raise _NotConstant(f"a {value.dtype} mask")


def _distinct(t: torch.Tensor) -> torch.Tensor:
    """t with every stride-0 (broadcast) leading dim narrowed to one entry: the same entries, fewer copies."""
    for d in range(t.dim() - 2):
        if t.shape[d] > 1 and t.stride(d) == 0:
            t = t.narrow(d, 0, 1)
    return t


def classify(keep: torch.Tensor, sq: int, skv: int) -> Optional[str]:
    """"full" (every query attends every key), "causal" (exactly bottom-right causal, Skv >= Sq) or None."""
    keep = _distinct(keep)
    if keep.dim() < 2 or keep.shape[-1] not in (1, skv) or keep.shape[-2] not in (1, sq):
        return None
    if keep.numel() > MAX_ELEMENTS:
        return None
    if bool(keep.all()):
        return "full"
    if skv < sq or keep.shape[-1] != skv or keep.shape[-2] != sq:
        return None
    rows = torch.arange(sq, device=keep.device)[:, None]
    cols = torch.arange(skv, device=keep.device)[None, :]
    causal = cols <= rows + (skv - sq)
    return "causal" if bool((keep == causal).all()) else None


def _lengths(node: fx.Node) -> Optional[tuple[int, int]]:
    qv, kv = example_value(node.args[0]), example_value(node.args[1])
    if qv is None or kv is None or qv.dim() != 4 or kv.dim() != 4:
        return None
    sq, skv = static_int(qv.shape[2]), static_int(kv.shape[2])
    return None if sq is None or skv is None else (sq, skv)


def fold_constant_masks(gm: fx.GraphModule, ctx: PassContext, pass_name: str = "attention") -> None:
    """Fold each constant mask of the graph's flash_attention calls (module docstring); record what was done."""
    if not fold_enabled():
        return
    verdicts: dict[fx.Node, tuple[Optional[torch.Tensor], Optional[list[fx.Node]], str]] = {}
    kinds: dict[tuple, Optional[str]] = {}  # (mask, Sq, Skv) -> classify's answer: one check for all the layers
    reported: set[fx.Node] = set()
    for node in list(gm.graph.nodes):
        if not is_flash_attention(node) or len(node.args) < 6 or node.kwargs:
            continue
        mask, causal = node.args[3], node.args[4]
        if not isinstance(mask, fx.Node) or not isinstance(causal, bool):
            continue
        if mask not in verdicts:
            try:
                nodes = _ancestry(mask)
                with torch.no_grad():
                    keep = _attends(_evaluate(nodes))
                verdicts[mask] = (keep, nodes, "")
            except _NotConstant as e:
                verdicts[mask] = (None, None, str(e))
            except Exception as e:  # a failure to compute keeps the mask: never a wrong answer
                verdicts[mask] = (None, None, f"computing it raised {type(e).__name__}: {e}")
        keep, nodes, reason = verdicts[mask]
        lengths = _lengths(node)
        kind = None
        if keep is not None and lengths is None:
            reason = "dynamic query / key lengths"
        elif keep is not None:
            if (mask, *lengths) not in kinds:
                kinds[(mask, *lengths)] = classify(keep, *lengths)
            kind = kinds[(mask, *lengths)]
            if kind is None:
                reason = "neither all-attend nor exactly bottom-right causal"
        if kind is None:
            if mask not in reported:  # once per mask: every layer of a model reads the same one
                reported.add(mask)
                users = sum(1 for u in mask.users if is_flash_attention(u))
                ctx.refused(pass_name, node, f"constant mask fold ({mask.name}, {users} attention call(s))",
                            f"mask kept: {reason}")
            continue
        new_causal = causal or kind == "causal"
        node.update_arg(3, None)
        node.update_arg(4, new_causal)
        ctx.rewrote(pass_name, node, f"constant mask {mask.name} ({kind}) folded", "kernopt.flash_attention",
                    f"mask=None causal={new_causal}", implementation=ops.implementation(example_value(node.args[0])))
    for mask, (_, nodes, _) in verdicts.items():
        if nodes is not None and not mask.users:
            erase_unused(gm, nodes)
