"""Graph rewrites, one file per pattern family; installed as `kernopt.passes`.

`PASSES` is the pipeline, in order. Attention runs first (its q @ k.T and p @ v matmuls must not be taken
one by one), the quantized-weight passes before the plain matmul pass (their dequant -> linear subgraphs
end in a linear the matmul pass would otherwise take), and matmul last.
"""
from __future__ import annotations

import importlib

# (name, module, class): imported lazily, so one broken or missing pass never takes the backend down.
PIPELINE = [
    ("attention", "attention", "AttentionPass"),
    ("int4", "int4", "Int4Pass"),
    ("fp8", "fp8", "Fp8Pass"),
    ("matmul", "matmul", "MatmulPass"),
]
PASS_NAMES = tuple(name for name, _, _ in PIPELINE)


def load(name: str):
    """The pass object for `name`, or raise ImportError/AttributeError with the cause."""
    for pname, module, cls in PIPELINE:
        if pname == name:
            return getattr(importlib.import_module(f"{__name__}.{module}"), cls)()
    raise KeyError(name)
