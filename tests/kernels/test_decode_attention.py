"""Decode attention (contiguous and paged) vs a float64 reference that gathers pages and runs softmax attention.

On CPU the Triton kernels run under the interpreter (fp16/fp32, small shapes); bf16 and suite shapes on the GPU.
Outputs are NaN-poisoned before the kernel writes; unused page slots and spare pages of the pool are NaN too, so
a kernel that reads past a sequence's length (or multiplies a zero weight by garbage) fails.
"""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from kernopt.kernels import decode_attention as da
from kernopt.tolerance import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.float32]


def small_config(block_n=16, splits=1, block_m=16):
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "SPLITS": splits, "num_warps": 4, "num_stages": 1}


def make_paged(k, v, lens, page_size, spare=3, poison=True):
    """Scatter contiguous k/v [B, Hkv, S, D] into a shuffled NaN-poisoned pool; table padded with junk ids."""
    B, hkv, S, D = k.shape
    lens = lens.tolist() if torch.is_tensor(lens) else list(lens)
    pages_per_seq = [max(1, math.ceil(int(n) / page_size)) for n in lens]
    num_pages = sum(pages_per_seq) + spare
    fill = float("nan") if poison else 0.0
    kp = torch.full((num_pages, page_size, hkv, D), fill, dtype=k.dtype, device=k.device)
    vp = torch.full_like(kp, fill)
    perm = torch.randperm(num_pages).tolist()
    max_pages = max(pages_per_seq) + 1  # one junk column: never read
    table = torch.full((B, max_pages), 10 ** 6, dtype=torch.int32)
    at = 0
    for b in range(B):
        n = int(lens[b])
        for p in range(pages_per_seq[b]):
            page = perm[at]
            at += 1
            table[b, p] = page
            lo, hi = p * page_size, min((p + 1) * page_size, n)
            if hi > lo:
                kp[page, : hi - lo] = k[b, :, lo:hi].transpose(0, 1)
                vp[page, : hi - lo] = v[b, :, lo:hi].transpose(0, 1)
    return kp, vp, table.to(k.device)


def rand_case(B, hq, hkv, sq, S, D, dtype):
    q = torch.randn(B, hq, sq, D, dtype=dtype, device=DEVICE)
    k = torch.randn(B, hkv, S, D, dtype=dtype, device=DEVICE)
    v = torch.randn(B, hkv, S, D, dtype=dtype, device=DEVICE)
    return q, k, v


def poisoned_out(q):
    return torch.full_like(q, float("nan"))


def check_paged(q, k, v, lens, page_size, config, dtype):
    kp, vp, table = make_paged(k, v, lens, page_size)
    lens_t = torch.tensor(lens, dtype=torch.int32, device=DEVICE) if not torch.is_tensor(lens) else lens
    out = poisoned_out(q)
    got = da.paged_decode_attention(q, kp, vp, table, lens_t, config=config, out=out)
    assert got.data_ptr() == out.data_ptr()
    # The reference gathers the (poisoned) pages itself; it must agree with the contiguous reference.
    ref = da.paged_decode_attention_ref(q.double(), kp.double(), vp.double(), table, lens_t)
    ref_contig = da.decode_attention_ref(q.double(), k.double(), v.double(), lens_t)
    assert_close(ref, ref_contig, dtype=torch.float64)
    assert_close(got, ref, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# Paged: lengths around page boundaries, GQA ratios 1/4/8, fp16/fp32
# ---------------------------------------------------------------------------------------------------------------
PAGE = 16


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv", [(3, 3), (8, 2), (8, 1)])
@pytest.mark.parametrize("length", [1, PAGE - 1, PAGE, PAGE + 1, 5 * PAGE + 3])
def test_paged_lengths_gqa(dtype, hq, hkv, length):
    q, k, v = rand_case(2, hq, hkv, 1, length, 24, dtype)
    lens = [length, max(1, length - 2)]
    # splits=2 so that short sequences also exercise empty splits and the merge.
    check_paged(q, k, v, lens, PAGE, small_config(block_n=16, splits=2), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sq", [1, 3, 8])
def test_paged_ragged_batch_speculative(dtype, sq):
    lens = [1, 7, 16, 17, 70, 0]
    S = max(lens)
    q, k, v = rand_case(len(lens), 8, 2, sq, S, 32, dtype)
    check_paged(q, k, v, lens, PAGE, small_config(block_n=16, splits=3), dtype)


@pytest.mark.parametrize("page_size,block_n", [(8, 16), (32, 16), (16, 32), (12, 16), (64, 16)])
def test_paged_page_size_vs_tile(page_size, block_n):
    """Tile inside one page (page % BLOCK_N == 0) and tiles spanning pages (row-wise table lookups).

    The table entries are prefetched one tile ahead; (64, 16) starts a split in the middle of a page (45 keys,
    2 splits: the second starts at key 32), so the first prefetch is not at a page boundary."""
    lens = [45, 9, 64]
    q, k, v = rand_case(3, 4, 2, 2, max(lens), 16, torch.float16)
    check_paged(q, k, v, lens, page_size, small_config(block_n=block_n, splits=2), torch.float16)


def test_paged_default_config():
    lens = [33, 100]
    q, k, v = rand_case(2, 8, 2, 1, max(lens), 32, torch.float32)
    check_paged(q, k, v, lens, 64, None, torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# Contiguous cache (HF static/dynamic layout)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sq", [1, 4])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("with_lens", [False, True])
def test_contiguous(dtype, sq, splits, with_lens):
    B, hq, hkv, S, D = 3, 8, 2, 53, 40  # D not a power of two: padded and masked
    q, k, v = rand_case(B, hq, hkv, sq, S, D, dtype)
    lens = torch.tensor([53, 20, 1], dtype=torch.int32, device=DEVICE) if with_lens else None
    if with_lens:  # garbage past each length must not be read
        for b, n in enumerate(lens.tolist()):
            k[b, :, n:] = float("nan")
            v[b, :, n:] = float("nan")
    out = poisoned_out(q)
    got = da.decode_attention(q, k, v, lens, config=small_config(splits=splits), out=out)
    ref = da.decode_attention_ref(q.double(), k.double(), v.double(), lens)
    assert_close(got, ref, dtype=dtype)


def test_contiguous_strided_like_hf():
    """q and k/v as transposes of [B, S, H, D] (what HF projections give), scale given explicitly."""
    B, hq, hkv, S, D = 2, 4, 4, 30, 16
    q = torch.randn(B, 2, hq, D, device=DEVICE).transpose(1, 2)
    k = torch.randn(B, S, hkv, D, device=DEVICE).transpose(1, 2)
    v = torch.randn(B, S, hkv, D, device=DEVICE).transpose(1, 2)
    got = da.decode_attention(q, k, v, sm_scale=0.3, config=small_config(splits=2))
    ref = da.decode_attention_ref(q.double(), k.double(), v.double(), sm_scale=0.3)
    assert_close(got, ref, dtype=torch.float32)


def test_custom_op_seam_matches_reference():
    import kernopt.ops  # noqa: F401  (registers torch.ops.kernopt.*)

    lens = [20, 5]
    q, k, v = rand_case(2, 4, 1, 1, max(lens), 16, torch.float32)
    kp, vp, table = make_paged(k, v, lens, 8)
    lens_t = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    got = torch.ops.kernopt.paged_decode_attention(q, kp, vp, table, lens_t, 0.25)
    assert_close(got, da.decode_attention_ref(q.double(), k.double(), v.double(), lens_t, 0.25), dtype=torch.float32)
    got = torch.ops.kernopt.decode_attention(q, k, v, lens_t, 0.25)
    assert_close(got, da.decode_attention_ref(q.double(), k.double(), v.double(), lens_t, 0.25), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# Hypothesis: lengths, page sizes, GQA ratios, query lengths and splits together
# ---------------------------------------------------------------------------------------------------------------
@settings(max_examples=12, deadline=None)
@given(
    lens=st.lists(st.integers(0, 50), min_size=1, max_size=3),
    hkv=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 4, 8]),
    sq=st.integers(1, 4),
    page_size=st.sampled_from([4, 8, 16]),
    splits=st.integers(1, 4),
    dtype=st.sampled_from(DTYPES),
)
def test_paged_hypothesis(lens, hkv, group, sq, page_size, splits, dtype):
    torch.manual_seed(len(lens) * 1000 + sum(lens))
    q, k, v = rand_case(len(lens), hkv * group, hkv, sq, max(max(lens), 1), 16, dtype)
    check_paged(q, k, v, lens, page_size, small_config(block_n=16, splits=splits), dtype)


# ---------------------------------------------------------------------------------------------------------------
# Input checks and the config table
# ---------------------------------------------------------------------------------------------------------------
def test_rejects_bad_inputs():
    q, k, v = rand_case(1, 4, 2, 1, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="query length"):
        da.decode_attention(torch.randn(1, 4, 9, 16, device=DEVICE), k, v)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        da.decode_attention(torch.randn(1, 3, 1, 16, device=DEVICE), k, v)
    with pytest.raises(ValueError, match="dtypes differ"):
        da.decode_attention(q.half(), k, v)
    with pytest.raises(ValueError, match="block_table"):
        da.paged_decode_attention(q, k.new_zeros(2, 4, 2, 16), v.new_zeros(2, 4, 2, 16),
                                  torch.zeros(2, 2, dtype=torch.int32), torch.ones(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="out must be"):
        da.decode_attention(q, k, v, out=torch.empty(1, 4, 1, 8, device=DEVICE))


def test_select_config_table():
    # B1 S8192 Hkv8: 8 programs can't fill 132 SMs -> split; each split keeps >= 4 tiles.
    cfg = da.select_config(1, 8, 32, 8192, 128, 132)
    assert cfg["SPLITS"] > 8 and 8192 / cfg["SPLITS"] >= 4 * cfg["BLOCK_N"]
    assert 64 <= cfg["BLOCK_N"] <= 128 and 2 <= cfg["num_stages"] <= 4
    # B128 Hkv8: 1024 programs already fill the GPU.
    assert da.select_config(128, 8, 32, 2048, 128, 132)["SPLITS"] == 1
    # short sequences are not split into sub-tile chunks
    assert da.select_config(1, 8, 32, 64, 128, 132)["SPLITS"] == 1
    # speculative verification with a wide group pads the query tile
    assert da.select_config(1, 1, 8, 1024, 64, 132, q_len=8)["BLOCK_M"] == 64
    for c in da.candidate_configs(1, 8, 32, 8192, 128, 132):
        assert c["SPLITS"] >= 1 and c["BLOCK_N"] in (32, 64, 128)
    # Rows from the H100 sweep: paged at B1 S8192 (128-token tiles, 8 warps, 2 stages, 64 one-tile splits) ...
    paged = da.select_config(1, 8, 32, 8192, 128, 132, paged=True)
    assert (paged["BLOCK_N"], paged["SPLITS"], paged["num_warps"], paged["num_stages"]) == (128, 64, 8, 2)
    assert da.select_config(1, 8, 32, 8192, 128, 132)["BLOCK_N"] == 64  # contiguous B1 keeps the default row
    # ... contiguous B8 S32768 (128-token tiles, 4 splits); paged B8 keeps the default row.
    contig = da.select_config(8, 8, 32, 32768, 128, 132)
    assert (contig["BLOCK_N"], contig["SPLITS"]) == (128, 4)
    assert da.select_config(8, 8, 32, 32768, 128, 132, paged=True)["BLOCK_N"] == 64
    assert any(c["BLOCK_N"] == 64 and c["num_stages"] == 3 for c in da.candidate_configs(1, 8, 32, 8192, 128,
                                                                                          paged=True))


class _LaunchSpy:
    """Stands in for a @triton.jit kernel: records each launch grid, then launches the real kernel."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("paged", [False, True])
def test_one_split_is_one_launch(monkeypatch, paged):
    """SPLITS == 1 writes the output from the attention kernel itself; only SPLITS > 1 launches the merge."""
    spy = _LaunchSpy(da._merge_splits_kernel)
    monkeypatch.setattr(da, "_merge_splits_kernel", spy)
    lens = [37, 20]
    q, k, v = rand_case(2, 4, 2, 1, max(lens), 16, torch.float32)
    for splits, merges in ((1, 0), (3, 1)):
        spy.grids.clear()
        if paged:
            check_paged(q, k, v, lens, 8, small_config(splits=splits), torch.float32)
        else:
            lens_t = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
            got = da.decode_attention(q, k, v, lens_t, config=small_config(splits=splits), out=poisoned_out(q))
            assert_close(got, da.decode_attention_ref(q.double(), k.double(), v.double(), lens_t), dtype=torch.float32)
        assert len(spy.grids) == merges


# ---------------------------------------------------------------------------------------------------------------
# GPU: bf16 and the decode-suite shapes (default configs, splits and the merge on real hardware)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("B,S", [(1, 8192), (4, 3000), (32, 1025)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sq", [1, 4])
def test_gpu_suite_shapes(B, S, dtype, sq):
    q, k, v = rand_case(B, 32, 8, sq, S, 128, dtype)
    lens = torch.randint(max(1, S // 2), S + 1, (B,), dtype=torch.int32, device=DEVICE)
    lens[0] = S
    ref = da.decode_attention_ref(q.double(), k.double(), v.double(), lens)
    assert_close(da.decode_attention(q, k, v, lens, out=poisoned_out(q)), ref, dtype=dtype)
    kp, vp, table = make_paged(k, v, lens.cpu(), 64)
    got = da.paged_decode_attention(q, kp, vp, table, lens, out=poisoned_out(q))
    assert_close(got, ref, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("block_n,stages,warps", [(32, 3, 4), (64, 3, 4), (64, 4, 4), (128, 2, 8), (128, 3, 4)])
@pytest.mark.parametrize("splits", [1, 32])
def test_gpu_paged_prefetch_pipelined(block_n, stages, warps, splits):
    """The block-table prefetch under Triton's software pipeliner (the interpreter runs no pipeline): 64-token
    pages, tiles inside a page (32, 64) and spanning pages (128), split starts inside pages, ragged lengths."""
    q, k, v = rand_case(2, 32, 8, 1, 8192, 128, torch.bfloat16)
    lens = torch.tensor([8192, 5000 + 37], dtype=torch.int32, device=DEVICE)
    ref = da.decode_attention_ref(q.double(), k.double(), v.double(), lens)
    kp, vp, table = make_paged(k, v, lens.cpu(), 64)
    cfg = {"BLOCK_M": 16, "BLOCK_N": block_n, "SPLITS": splits, "num_warps": warps, "num_stages": stages}
    got = da.paged_decode_attention(q, kp, vp, table, lens, config=cfg, out=poisoned_out(q))
    assert_close(got, ref, dtype=torch.bfloat16)
