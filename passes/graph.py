"""What every pass shares: reading Dynamo's torch-level FX graph, and recording what a pass did.

Passes run on the graph Dynamo hands the backend, before AOT autograd: nodes are `torch.*`,
`torch.nn.functional.*`, `operator.*` calls and tensor methods, each with a fake tensor in
``node.meta["example_value"]``. At that level a pattern reads like the plain torch code users write
(`F.linear`, `F.scaled_dot_product_attention`, `softmax(q @ k.transpose(-2, -1))`), the graph is small,
and the rewritten graph can still go to either inner compiler (Inductor or eager). See README
("Which graph the passes see").

A pass is a class with a `name` and `__call__(gm, ctx)`. It finds its pattern, asks its guard (which
returns a reason string to refuse), and either rewrites the match to a `torch.ops.kernopt.*` call
(`ctx.rewrote`) or leaves it alone (`ctx.refused`). explain() prints both lists.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
import torch.fx as fx


@dataclass
class Rewrite:
    graph: int
    pass_name: str
    node: str
    matched: str  # the pattern, e.g. "linear+silu*linear (swiglu)"
    kernel: str  # e.g. "kernopt.linear"
    config: str
    scenario: str
    implementation: str  # "triton", "interpreter" or "reference" (see kernopt.ops.implementation)


@dataclass
class Fallback:
    graph: int
    pass_name: str
    node: str
    matched: str
    reason: str


@dataclass
class PassContext:
    """Per-graph state a pass reads (options) and writes (what it did)."""

    graph_id: int = 0
    scenario: str = "auto"
    cuda_graphs: bool = False  # the graph runs under CUDA graphs (mode="reduce-overhead"): launches cost no host time
    rewrites: list[Rewrite] = field(default_factory=list)
    fallbacks: list[Fallback] = field(default_factory=list)

    def rewrote(self, pass_name: str, node: fx.Node, matched: str, kernel: str, config: Any = "",
                scenario: str = "", implementation: str = "") -> None:
        self.rewrites.append(Rewrite(self.graph_id, pass_name, node.name, matched, kernel,
                                     format_config(config), scenario, implementation))

    def refused(self, pass_name: str, node: fx.Node | str, matched: str, reason: str) -> None:
        self.fallbacks.append(Fallback(self.graph_id, pass_name, getattr(node, "name", str(node)), matched, reason))


def format_config(config: Any) -> str:
    if isinstance(config, dict):
        return " ".join(f"{k}={v}" for k, v in config.items())
    return str(config or "")


# ------------------------------------------------------------------------------------------------
# Reading nodes
# ------------------------------------------------------------------------------------------------
def example_value(node: Any) -> Optional[torch.Tensor]:
    """The fake tensor Dynamo recorded for a node (None for non-tensors and constants)."""
    if not isinstance(node, fx.Node):
        return None
    v = node.meta.get("example_value", node.meta.get("val"))
    return v if isinstance(v, torch.Tensor) else None


def is_call(node: Any, *targets: Callable | str) -> bool:
    """True when `node` calls one of `targets`: functions (call_function) or method names (call_method)."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in targets
    if node.op == "call_method":
        return node.target in targets
    return False


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """An argument given positionally or by keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def single_user(node: fx.Node) -> Optional[fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def leading_rows(v: torch.Tensor):
    """The rows a launch on v sees: the product of its leading dimensions (symbolic if they are)."""
    rows = 1
    for d in v.shape[:-1]:
        rows = rows * d
    return rows


def static_int(v: Any) -> Optional[int]:
    """An int when a size is static; None when it is symbolic (dynamic shapes)."""
    if isinstance(v, int):
        return v
    if isinstance(v, torch.SymInt):
        expr = v.node.expr
        return int(expr) if getattr(expr, "is_number", False) else None
    return None


def size_hint(v: Any) -> int:
    """A concrete value for a size, symbolic or not (the example's value for a dynamic one)."""
    if isinstance(v, torch.SymInt):
        return int(v.node.hint) if v.node.hint is not None else 0
    return int(v)


def replace(gm: fx.GraphModule, old: fx.Node, target: Callable, args: tuple, dead: Iterable[fx.Node] = ()) -> fx.Node:
    """Put `target(*args)` in place of `old`, then erase `old` and the nodes in `dead` left without users."""
    with gm.graph.inserting_before(old):
        new = gm.graph.call_function(target, args)
    new.meta.update({k: v for k, v in old.meta.items() if k in ("example_value", "val", "stack_trace",
                                                                "nn_module_stack", "source_fn_stack")})
    old.replace_all_uses_with(new)
    erase_unused(gm, [old, *dead])
    return new


def erase_unused(gm: fx.GraphModule, nodes: Iterable[Any]) -> None:
    """Erase the call nodes among `nodes` (still in gm's graph) that are left without users, users first."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    doomed = {n for n in nodes if isinstance(n, fx.Node) and n in order}
    for n in sorted(doomed, key=order.__getitem__, reverse=True):  # users before what they use
        if n.op in ("call_function", "call_method") and not n.users:
            gm.graph.erase_node(n)


def insert_before(gm: fx.GraphModule, anchor: fx.Node, target: Callable, args: tuple,
                  example: Optional[torch.Tensor] = None) -> fx.Node:
    with gm.graph.inserting_before(anchor):
        new = gm.graph.call_function(target, args)
    if example is not None:
        new.meta["example_value"] = example
    return new


def describe(node: fx.Node) -> str:
    t = node.target
    name = getattr(t, "__name__", None) or str(t)
    v = example_value(node)
    if v is None:
        return name
    shape = "x".join(str(s) for s in v.shape)
    return f"{name} [{shape}] {str(v.dtype).replace('torch.', '')}"


MUL = (operator.mul, torch.mul, "mul")
ADD = (operator.add, torch.add, "add")
SILU = (torch.nn.functional.silu, "silu")
