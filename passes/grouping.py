"""Grouping quantized linears that read one input into one launch (q/k/v, gate/up): the graph side.

At decode each quantized linear is a short memory-bound GEMV whose launch, ramp and tail cost about as much as a
fraction of its bytes; linears that read one x can run as one launch over N1 + N2 + ... columns (vLLM's merged
QKV / gate_up layers) when their weights lie side by side in one storage (`kernopt.int4.pack_adjacent`,
`kernopt.fp8.pack_adjacent`). The int4 and fp8 passes share what is here:

- `group_shared_inputs` finds the rewritten linear nodes (one op) that share a key (their input, and whatever
  else must match), splits them into clusters one node can replace (`clusters`) and hands each to the pass;
- `replace_with_slices` puts the group node's column slices in place of the members;
- `storage_order` sorts members by where their weights lie, when Dynamo recorded the real tensors.
"""
from __future__ import annotations

import operator
from typing import Callable, Hashable, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from kernopt.passes.graph import example_value, insert_before


def real_value(n: fx.Node) -> Optional[torch.Tensor]:
    """The real tensor Dynamo recorded for a graph input (a weight or buffer), or None."""
    ga = n.meta.get("grapharg")
    try:
        v = ga.example if ga is not None else None
    except Exception:  # a dead weakref or a source without a value
        v = None
    return v if isinstance(v, torch.Tensor) else None


_SOURCE_META = ("stack_trace", "nn_module_stack", "source_fn_stack")


def copy_source_meta(dst: fx.Node, src: fx.Node) -> None:
    """Where `dst` came from in the user's code, as `src` says (explain() and error messages read it)."""
    for key in _SOURCE_META:
        if key in src.meta:
            dst.meta[key] = src.meta[key]


# Users that read a column slice like any tensor and write a fresh one: a slice feeding only these is left a
# strided view; any other user gets `.contiguous()` (a no-op at M=1, where a slice is contiguous already), so
# a later `.view()` or a kernel that assumes packed rows sees the tensor the linear used to produce.
ELEMENTWISE = {
    operator.mul, operator.add, operator.sub, operator.truediv, operator.neg,
    torch.mul, torch.add, torch.sub, torch.div, torch.neg, torch.sigmoid, torch.tanh, torch.relu,
    F.silu, F.gelu, F.relu, F.sigmoid, F.tanh, F.softplus,
    "mul", "add", "sub", "div", "neg", "__mul__", "__add__", "__sub__", "__truediv__", "__rmul__", "__radd__",
    "sigmoid", "tanh", "relu", "float", "half", "bfloat16",
}


def elementwise_user(n: fx.Node) -> bool:
    return n.op in ("call_function", "call_method") and n.target in ELEMENTWISE and not n.kwargs.get("inplace")


def clusters(members: list[fx.Node], order: dict[fx.Node, int]) -> list[list[fx.Node]]:
    """Split linear nodes of one x into groups that one node can replace: every input of the group is defined
    before every user of any member (so no member depends on another's output, and one insertion point serves
    them all). Greedy in graph order; groups of one are dropped."""
    groups: list[tuple[list[fx.Node], int, int]] = []  # (members, last input position, first user position)
    for m in sorted(members, key=order.__getitem__):
        last_in = max((order[i] for i in m.all_input_nodes), default=-1)
        first_use = min((order[u] for u in m.users), default=len(order))
        for k, (ms, li, fu) in enumerate(groups):
            if max(li, last_in) < min(fu, first_use):
                groups[k] = (ms + [m], max(li, last_in), min(fu, first_use))
                break
        else:
            groups.append(([m], last_in, first_use))
    return [ms for ms, _, _ in groups if len(ms) > 1]


# Pure ops on a graph input that a member may take as an input (a weight scale's `.float().reshape(1, -1)`): Dynamo
# records them just before the linear that uses them, after the previous linear's users, which would keep every
# member in a cluster of its own; `hoist_input_prep` moves them up to the graph inputs.
_PREP_METHODS = {"float", "to", "reshape", "view", "t", "contiguous", "half", "bfloat16", "flatten", "unsqueeze"}
_PREP_FUNCTIONS = {torch.reshape, torch.t, torch.flatten, torch.unsqueeze}


def _prep_chain(n: fx.Node, out: list[fx.Node]) -> bool:
    """Whether `n` is a graph input or pure prep ops on graph inputs only; appends the ops, producers first."""
    if n.op == "placeholder":
        return True
    pure = (n.op == "call_method" and n.target in _PREP_METHODS) or \
        (n.op == "call_function" and n.target in _PREP_FUNCTIONS)
    if not pure or not all(_prep_chain(i, out) for i in n.all_input_nodes):
        return False
    if n not in out:
        out.append(n)
    return True


def prep_value(n: fx.Node, most: int = 1 << 20) -> Optional[torch.Tensor]:
    """The real tensor a graph input, or pure prep ops on graph inputs (`_prep_chain`), give now: the ops run on
    Dynamo's recorded tensors (views stay views, so storage and offsets are what the op will see), unless an input
    holds more than `most` elements (a cast of a weight would copy it). None when unknown."""
    if n.op == "placeholder":
        return real_value(n)
    chain: list[fx.Node] = []
    if not _prep_chain(n, chain):
        return None
    vals: dict[fx.Node, torch.Tensor] = {}
    for nd in chain:
        for i in nd.all_input_nodes:
            if i not in vals:
                v = real_value(i) if i.op == "placeholder" else None
                if v is None or v.numel() > most:
                    return None
                vals[i] = v
        args = fx.node.map_arg(nd.args, vals.__getitem__)
        kwargs = fx.node.map_arg(nd.kwargs, vals.__getitem__)
        with torch.no_grad():
            vals[nd] = getattr(args[0], nd.target)(*args[1:], **kwargs) if nd.op == "call_method" \
                else nd.target(*args, **kwargs)
    return vals[n]


def hoist_input_prep(gm: fx.GraphModule, members: list[fx.Node]) -> None:
    """Move the members' inputs that are pure prep ops on graph inputs (`_prep_chain`) up to the graph inputs."""
    chain: list[fx.Node] = []
    for m in members:
        for i in m.all_input_nodes:
            part: list[fx.Node] = []
            if i.op != "placeholder" and _prep_chain(i, part):
                chain += [n for n in part if n not in chain]
    if not chain:
        return
    anchor = next(n for n in gm.graph.nodes if n.op != "placeholder" and n not in chain)
    for n in chain:  # producers first: each lands just before the anchor, after the ones moved before it
        anchor.prepend(n)


def group_shared_inputs(gm: fx.GraphModule, target, key_of: Callable[[fx.Node], Optional[Hashable]],
                        group: Callable[[Hashable, list[fx.Node], dict], None]) -> None:
    """Call `group(key, members, order)` for each cluster of two or more `target` nodes with one key
    (`key_of(node)`, None: not groupable), one key at a time, reading the graph afresh after each. The members'
    weight-prep inputs are hoisted first (`hoist_input_prep`)."""
    tried: set = set()
    while True:
        by_key: dict[Hashable, list[fx.Node]] = {}
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.target is target:
                key = key_of(n)
                if key is not None:
                    by_key.setdefault(key, []).append(n)
        todo = [(key, ms) for key, ms in by_key.items() if len(ms) > 1 and key not in tried]
        if not todo:
            return
        key, members = todo[0]
        tried.add(key)
        hoist_input_prep(gm, members)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        for cluster in clusters(members, order):  # disjoint; later insertions keep old nodes' relative order
            group(key, cluster, order)


def anchor_after_inputs(gm: fx.GraphModule, members: list[fx.Node], order: dict[fx.Node, int]) -> fx.Node:
    """The first non-placeholder node after every input of every member: where the group node goes."""
    last_in = max(order[i] for m in members for i in m.all_input_nodes)
    return next(n for n in gm.graph.nodes if order.get(n, -1) > last_in and n.op != "placeholder")


def replace_with_slices(gm: fx.GraphModule, anchor: fx.Node, group: fx.Node, members: list[fx.Node],
                        widths: list[int]) -> None:
    """Replace each member by its column block of `group` ([..., sum(widths)], in member order)."""
    col, slices = 0, []
    for m, n in zip(members, widths):
        ev = example_value(m)
        out = insert_before(gm, anchor, torch.narrow, (group, -1, col, n), example_value(group).narrow(-1, col, n))
        if not all(elementwise_user(u) for u in m.users):
            out = insert_before(gm, anchor, torch.Tensor.contiguous, (out,), ev)
        copy_source_meta(out, m)
        slices.append(out)
        col += n
    for m, out in zip(members, slices):  # only now: the anchor may be a member
        m.replace_all_uses_with(out)
        gm.graph.erase_node(m)


def launch_config(impl: str, adjacent: Optional[bool], pick: Callable[[], str]) -> str:
    """What explain() says a group node runs: the reference per part, per-part launches (weights known not to be
    adjacent), or one launch with the table's config for the combined width (`pick()`), checked per call when
    adjacency was not knowable at compile time."""
    if impl == "reference":
        return "plain-torch reference (per part)"
    if adjacent is False:
        return "weights not in one storage: one launch per part into one output"
    return ("one launch " if adjacent else "one launch if adjacent (checked per call) ") + pick()


def storage_order(members: list[fx.Node], required: tuple[int, ...], optional: tuple[int, ...] = (),
                  adjacent_view: Optional[Callable] = None, flat: tuple[int, ...] = ()) -> tuple[list[fx.Node],
                                                                                               Optional[bool]]:
    """Members in the order their weights (arg `required[0]`) lie in one storage, when Dynamo recorded the real
    tensors of args `required` (and of `optional` args that are not None; graph inputs or `prep_value`s of them),
    and whether each of those args is adjacent across the members now (`adjacent_view`; None: not knowable here,
    the op checks on every call). Args in `flat` are compared as the op reads them, flattened ([1, N] scales as [N])."""
    reals = []
    for m in members:
        vals = {}
        for i in required + optional:
            a = m.args[i]
            if a is None and i in optional:
                continue
            v = prep_value(a) if isinstance(a, fx.Node) else None
            if v is None:
                return members, None
            vals[i] = v.reshape(-1) if i in flat else v  # as the op reads them (e.g. [1, N] scales as [N])
        reals.append(vals)
    if len({r[required[0]].untyped_storage().data_ptr() for r in reals}) != 1:
        return members, False
    ranked = sorted(zip(members, reals), key=lambda mr: mr[1][required[0]].storage_offset())
    members, reals = [m for m, _ in ranked], [r for _, r in ranked]
    if adjacent_view is None:
        return members, None
    adjacent = all(adjacent_view([r[i] for r in reals]) is not None for i in required)
    for i in optional:
        if all(i in r for r in reals):
            adjacent = adjacent and adjacent_view([r[i] for r in reals]) is not None
        elif any(i in r for r in reals):
            adjacent = False
    return members, adjacent
