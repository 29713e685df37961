"""Grouped launch order for tiled GEMMs, shared by the GEMM kernels (bf16, int4, fp8).

Program ids are mapped so that GROUP_M row-tiles sweep the column tiles together: while they do, each
weight (B) tile they share is read from L2 instead of HBM (the ordering of Triton's matmul tutorial).
"""
import triton
import triton.language as tl


@triton.jit
def tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    group_size = GROUP_M * num_pid_n
    first_m = (tile_id // group_size) * GROUP_M
    rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile_id % group_size) % rows
    pid_n = (tile_id % group_size) // rows
    return pid_m, pid_n
