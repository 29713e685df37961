"""Programmatic dependent launch (PDL) for the decode path's kernels: ``KERNOPT_PDL=1`` (off by default: untimed).

A decode step is a chain of short, memory-bound kernels (per layer: the QKV GEMV, decode attention and its merge,
o-proj, gate/up, down, and Inductor's norms between them), and each kernel boundary costs the next kernel's launch
and ramp while the previous one drains (H200 profile of the int4 step, profiles/profile-8B-kernopt_int4.txt: ~200
kernels of 2-25 us). With PDL (sm_90+) a kernel launched with ``launch_pdl=True`` may start once every program of
the kernel before it has run ``griddepcontrol.launch_dependents`` (or exited), and its ``griddepcontrol.wait``
then blocks until that kernel has completed and its writes are visible. kernopt's decode kernels, with PDL on:
- signal ``launch_dependents`` as they start, so the next PDL-launched kernel is scheduled during their last wave;
- wait before they read anything an earlier kernel may have written, or write anything: the int4 GEMV issues its
  first K block of (constant) weights, scales and zeros before its wait, so those loads overlap the previous
  kernel's tail; the bf16 GEMV and decode attention wait at their start (the launch itself overlaps).
Kernels launched without the attribute (Inductor's) keep full stream order, so a PDL kernel never overlaps a
kernel that does not wait. Both instructions are no-ops when the launch has no programmatic dependency. CUDA graphs
capture PDL launches as programmatic edges (CUDA 12.3+). The interpreter never sees them (the PDL constexpr is
False off the GPU).
"""
from __future__ import annotations

import functools

import torch

from .host import env_switch

PDL_ENV = "KERNOPT_PDL"


def pdl_enabled() -> bool:
    return env_switch(PDL_ENV, "0")


@functools.lru_cache(maxsize=None)
def _sm90(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def use_pdl(t: torch.Tensor) -> bool:
    """Whether a launch on t's device uses PDL: KERNOPT_PDL=1 and a CUDA device of compute capability 9.0 or above."""
    if not (t.is_cuda and pdl_enabled()):
        return False
    return _sm90(t.device.index if t.device.index is not None else torch.cuda.current_device())


def launch_kwargs(pdl: bool) -> dict:
    """The launch's PDL attribute (only when on: the interpreter's launcher takes no such option)."""
    return {"launch_pdl": True} if pdl else {}
