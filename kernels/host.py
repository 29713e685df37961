"""Host-side integer helpers for the launchers.

`triton.cdiv` and `triton.next_power_of_2` are Triton constexpr functions: called from Python they go through
a wrapper that unwraps constexprs (~5 us a call on our CI machine, measured with the kernel launch stubbed out:
six of them were 36 of the 65 us the paged decode launcher spent in Python). Launchers run on every call of an
op that is not CUDA-graph-replayed (eager use, the paged cache's decode steps), so they use these instead.
Inside @triton.jit code use `tl.cdiv` as usual. Also the parser of kernopt's '0' / '1' environment switches.
"""
import functools
import os


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n, as triton.next_power_of_2 (which gives 0 for 0)."""
    n = int(n)
    return n if n <= 1 else 1 << (n - 1).bit_length()


def interpreting() -> bool:
    """Whether Triton kernels run under its interpreter (TRITON_INTERPRET=1, the CPU tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def env_switch(name: str, default: str) -> bool:
    """A '0' / '1' environment switch (default: its value when unset); any other value is a clear error."""
    v = os.environ.get(name, default)
    if v not in ("0", "1"):
        raise ValueError(f"{name}={v!r}; valid: '0', '1'")
    return v == "1"


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    import torch
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device) -> int:
    """The device's SM count (cached per device); 132 (H100 SXM / H200) for a non-CUDA device (CPU tests)."""
    if device.type == "cuda":
        import torch
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 132
