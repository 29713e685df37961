"""Stage-by-stage GPU check of the wgr int4 kernel (kernels/int4_wgmma.py): which stage of its data path is wrong.

Each probe is a small Gluon kernel that runs one stage with the kernel's own layouts and helpers, and compares with
plain torch:
  words   TMA tile -> shared memory -> ``.permute((1, 0)).load(word layout)``: each lane's words (vs the tile)
  unpack  words loaded in the word layout -> _unpack_operand: the operand in the dot's K order (vs _emulate_operand)
  dot     an operand loaded in wgmma's register layout, x through _x_dot_order into shared memory, the wgmma
  kernel  the whole launcher on structured inputs (nibbles = k mod 16 or row index; x one-hot)

    python benchmarks/wgr_probe.py [--out DIR]   (GPU; writes wgr_probe.json)
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from kernopt.kernels import int4_wgmma as wg
from kernopt.kernels.int4_gemm import int4_gemm, int4_gemm_ref

gluon, gl = wg.gluon, wg.gl


@gluon.jit
def _probe_words(w_desc, out_ptr, plain_ptr, BLOCK_N: gl.constexpr, KS: gl.constexpr, VARIANT: gl.constexpr):
    WL: gl.constexpr = wg._word_layout(BLOCK_N, KS, gl.num_warps())
    smem = gl.allocate_shared_memory(gl.int32, [KS // 8, BLOCK_N], w_desc.layout)
    bar = gl.allocate_shared_memory(gl.int64, [1], wg.mbarrier.MBarrierLayout())
    wg.mbarrier.init(bar, count=1)
    wg.fence_async_shared()
    wg.mbarrier.expect(bar, w_desc.block_type.nbytes)
    wg.tma.async_copy_global_to_shared(w_desc, [0, 0], bar, smem)
    wg.mbarrier.wait(bar, 0)
    n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, WL))
    j = gl.arange(0, KS // 8, layout=gl.SliceLayout(0, WL))
    if VARIANT == 0:  # a load through the permuted view (the first version)
        words = smem.permute((1, 0)).load(WL)
    else:  # the kernel's: the tile's own orientation, permuted in registers
        WLT: gl.constexpr = wg._word_layout_t(BLOCK_N, KS, gl.num_warps())
        words = gl.convert_layout(gl.permute(smem.load(WLT), (1, 0)), WL, assert_trivial=True)
    gl.store(out_ptr + n[:, None] * (KS // 8) + j[None, :], words)
    BL: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [gl.num_warps(), 1], [1, 0])
    rj = gl.arange(0, KS // 8, layout=gl.SliceLayout(1, BL))
    rn = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, BL))
    gl.store(plain_ptr + rj[:, None] * BLOCK_N + rn[None, :], smem.load(BL))  # the tile as stored, plain layout


@gluon.jit
def _probe_unpack(w_ptr, out_ptr, BLOCK_N: gl.constexpr, KS: gl.constexpr, BLOCK_M: gl.constexpr):
    NW: gl.constexpr = gl.num_warps()
    WL: gl.constexpr = wg._word_layout(BLOCK_N, KS, NW)
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1], instr_shape=[16, BLOCK_M, 16])
    OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, WL))
    j = gl.arange(0, KS // 8, layout=gl.SliceLayout(0, WL))
    words = gl.load(w_ptr + n[:, None] * (KS // 8) + j[None, :])
    zz = gl.full([BLOCK_N, 1], 0x43084308, gl.int32, layout=WL)
    a = wg._unpack_operand(words, zz, BLOCK_N, KS, True, False, OP)
    an = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, OP))
    ak = gl.arange(0, KS, layout=gl.SliceLayout(0, OP))
    gl.store(out_ptr + an[:, None] * KS + ak[None, :], a)


@gluon.jit
def _probe_dot(a_ptr, x_ptr, out_ptr, BLOCK_N: gl.constexpr, KS: gl.constexpr, BLOCK_M: gl.constexpr):
    NW: gl.constexpr = gl.num_warps()
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1], instr_shape=[16, BLOCK_M, 16])
    OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    XL: gl.constexpr = wg._x_layout(BLOCK_M, KS, NW)
    XS: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, KS], gl.bfloat16)
    an = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, OP))
    ak = gl.arange(0, KS, layout=gl.SliceLayout(0, OP))
    a = gl.load(a_ptr + an[:, None] * KS + ak[None, :])
    xm = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, XL))
    xk = gl.arange(0, KS, layout=gl.SliceLayout(0, XL))
    xv = gl.load(x_ptr + xm[:, None] * KS + xk[None, :])
    xs = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_M, KS], XS)
    xs.store(wg._x_dot_order(xv, BLOCK_M, KS))
    wg.fence_async_shared()
    gl.thread_barrier()
    d = wg.warpgroup_mma(a, xs.permute((1, 0)), gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=MMA), use_acc=False)
    on = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))
    om = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, MMA))
    gl.store(out_ptr + on[:, None] * BLOCK_M + om[None, :], d)


def _err(a, b):
    return float((a.double() - b.double()).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    torch.manual_seed(0)
    res: dict = {}
    BN, KS, BM = 64, 128, 16
    J = KS // 8
    # words: value = 1000 j + n, in the [K/8, N] storage (N-contiguous)
    tile = (torch.arange(J, device="cuda")[:, None] * 1000 + torch.arange(BN, device="cuda")[None, :]).to(torch.int32)
    layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)
    desc = wg.TensorDescriptor.from_tensor(tile, [J, BN], layout)
    for variant in (0, 1):
        out = torch.full((BN, J), -1, dtype=torch.int32, device="cuda")
        plain = torch.full((J, BN), -1, dtype=torch.int32, device="cuda")
        _probe_words[(1,)](desc, out, plain, BLOCK_N=BN, KS=KS, VARIANT=variant, num_warps=4)
        res[f"words{variant}_bad"] = int((out != tile.t()).sum())
        res[f"words{variant}_plain_bad"] = int((plain != tile).sum())
        res[f"words{variant}_sample"] = {"got_row0": out[0].tolist(), "want_row0": tile.t()[0].tolist()}
    # unpack: random words, the operand in the dot's order (symmetric: q - 8)
    words = torch.randint(-2**31, 2**31 - 1, (BN, J), dtype=torch.int32, device="cuda")
    a = torch.full((BN, KS), float("nan"), dtype=torch.bfloat16, device="cuda")
    _probe_unpack[(1,)](words, a, BLOCK_N=BN, KS=KS, BLOCK_M=BM, num_warps=4)
    want = (wg._emulate_operand(words.long(), KS) - 8).to(torch.bfloat16)
    res["unpack_bad"] = int((a != want).sum())
    res["unpack_sample"] = {"got": a[0, :16].float().tolist(), "want": want[0, :16].float().tolist()}
    # dot: an operand of small integers, x in natural order
    a_in = torch.randint(-8, 8, (BN, KS), device="cuda").to(torch.bfloat16)
    x = torch.randint(-4, 5, (BM, KS), device="cuda").to(torch.bfloat16)
    d = torch.full((BN, BM), float("nan"), dtype=torch.float32, device="cuda")
    _probe_dot[(1,)](a_in, x, d, BLOCK_N=BN, KS=KS, BLOCK_M=BM, num_warps=4)
    want_d = a_in.float() @ wg._emulate_x(x, KS).float().t()
    res["dot_err"] = _err(d, want_d)
    res["dot_err_natural_order"] = _err(d, a_in.float() @ x.float().t())
    # whole launcher, structured: nibble value = row index n % 16 / = k % 16; x one-hot
    N, K, g = 128, 256, 128
    s = torch.ones(K // g, N, dtype=torch.bfloat16, device="cuda").t()
    cfg = {"impl": "wgr", "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 1, "num_warps": 4, "num_stages": 4}
    for name, codes in (("rows", torch.arange(N, device="cuda")[:, None].expand(N, K) % 16),
                        ("kmod16", torch.arange(K, device="cuda")[None, :].expand(N, K) % 16),
                        ("kdiv8", (torch.arange(K, device="cuda")[None, :].expand(N, K) // 8) % 16)):
        c = codes.reshape(N, K // 8, 8).long()
        w = (c << (4 * torch.arange(8, device="cuda"))).sum(-1)
        w = torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)
        qw = w.t().contiguous().t()
        x = torch.zeros(16, K, dtype=torch.bfloat16, device="cuda")
        ks_hot = torch.arange(16, device="cuda") * 13 % K
        x[torch.arange(16), ks_hot] = 1
        o = int4_gemm(x, qw, s, None, g, config=cfg)
        ref = int4_gemm_ref(x.double(), qw, s, None, g)
        res[f"kernel_{name}_err"] = _err(o, ref)
        res[f"kernel_{name}_got_row0"] = o[:, 0].float().tolist()
        res[f"kernel_{name}_want_row0"] = ref[:, 0].float().tolist()
    qw = torch.randint(-2**31, 2**31 - 1, (K // 8, N), dtype=torch.int32, device="cuda").t()
    x = torch.randn(16, K, dtype=torch.bfloat16, device="cuda")
    res["kernel_random_err"] = _err(int4_gemm(x, qw, s, None, g, config=cfg), int4_gemm_ref(x.double(), qw, s, None, g))
    print(json.dumps(res, indent=1))
    import datetime

    import triton
    doc = {"suite": "wgr_probe", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": triton.__version__, "kernopt_commit": os.environ.get("KERNOPT_COMMIT", ""),
           "date": datetime.date.today().isoformat(), "results": res}
    with open(os.path.join(args.out, "wgr_probe.json"), "w") as f:
        json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
