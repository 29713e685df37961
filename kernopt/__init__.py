"""kernopt: a torch.compile backend that swaps the subgraphs deciding inference cost for fused Triton kernels.

    torch.compile(model, backend="kernopt", options={"scenario": "auto", "inner": "inductor"})
    kernopt.explain(model, *inputs)          # what was rewritten, with which config, and what was not (why)
    kernopt.optimize(hf_model, quantize=None | "int4" | "fp8")
"""
from kernopt import ops  # noqa: F401  (registers torch.ops.kernopt.*)
from kernopt.backend import kernopt_backend
from kernopt.explain import explain


def _register_backend() -> None:
    # The torch_dynamo_backends entry point registers "kernopt" for a fresh process; this covers a
    # package used without its installed metadata (e.g. from a source tree on PYTHONPATH).
    from torch._dynamo.backends.registry import _BACKENDS, _COMPILER_FNS, register_backend

    if "kernopt" not in _COMPILER_FNS and "kernopt" not in _BACKENDS:
        register_backend(kernopt_backend, name="kernopt")


_register_backend()

__all__ = ["explain", "kernopt_backend", "optimize"]


def __getattr__(name):
    if name == "optimize":  # transformers is imported only when the HF entry point is used
        from kernopt.hf import optimize

        return optimize
    raise AttributeError(name)
