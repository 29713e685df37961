"""kernopt: a torch.compile backend that swaps the subgraphs deciding inference cost for fused Triton kernels.

    torch.compile(model, backend="kernopt", options={"scenario": "auto", "inner": "inductor"})
    kernopt.explain(model, *inputs)          # what was rewritten, with which config, and what was not (why)
    kernopt.optimize(hf_model, quantize=None | "int4" | "fp8")
"""
from kernopt import ops  # noqa: F401  (registers torch.ops.kernopt.*)
from kernopt.backend import kernopt_backend
from kernopt.explain import explain

__all__ = ["explain", "kernopt_backend", "optimize"]


def __getattr__(name):
    if name == "optimize":  # transformers is imported only when the HF entry point is used
        from kernopt.hf import optimize

        return optimize
    raise AttributeError(name)
