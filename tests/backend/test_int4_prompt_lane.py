"""kernopt.ops' prompt lane: an int4 launch whose operand signature int4_gemm already accepted and resolved to
dequantize + cuBLAS goes straight to `dequant_cublas` (no tuned-config lookup, table or operand checks), while the
tuned-config cache and the variables config_for reads stay as they were (workload.config_epoch); anything else takes
the full path. Interpreter on CPU (fp16); on a machine with a GPU the same tests run the kernels (not `-m gpu`)."""
import pytest
import torch

from kernopt import ops, workload
from kernopt.kernels import int4_gemm as q4
from kernopt.kernels.int4_gemm import DEQUANT_CUBLAS_MIN_M, dequantize_int4
from kernopt.tolerance import mismatch, rms

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DT = torch.float16
M, N, K, G = DEQUANT_CUBLAS_MIN_M + 9, 45, 256, 32  # N not a multiple of the dequant kernel's BLOCK_N


def _weights(n=N, asym=True):
    qweight = torch.randint(-2**31, 2**31 - 1, (K // 8, n), dtype=torch.int32, device=DEV).t()
    scales = (torch.rand(K // G, n, device=DEV) * 0.02 + 0.005).to(DT).t()
    zeros = torch.randint(0, 16, (K // G, n), device=DEV).to(DT).t() if asym else None
    return qweight, scales, zeros


def _expected(x, qweight, scales, zeros, bias=None):
    y = x.double() @ dequantize_int4(qweight, scales, zeros, G, torch.float64).t()
    return y + bias.double() if bias is not None else y


@pytest.fixture
def calls(monkeypatch, tmp_path):
    """An empty lane and tuned-config cache; counts of int4_gemm's and dequant_cublas' calls (full path / lane)."""
    monkeypatch.setenv("KERNOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("KERNOPT_NO_CACHE", raising=False)
    monkeypatch.delenv("KERNOPT_AUTOTUNE", raising=False)
    monkeypatch.delenv(ops.LANE_ENV, raising=False)
    monkeypatch.setattr(ops, "_DEQUANT_LANE", {})
    seen = {"int4_gemm": 0, "dequant_cublas": 0}
    for name in seen:
        real = getattr(q4, name)

        def counting(*args, _real=real, _name=name, **kwargs):
            seen[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(q4, name, counting)
    return seen


def assert_close(actual, expected, dtype=DT, scale=2.0):
    """fp16 tolerance with atol scaled to the outputs' RMS: K-long sums, and a CPU fp16 mm as the reference's."""
    problem = mismatch(actual, expected, dtype, scale=scale, magnitude=rms(expected))
    assert problem is None, problem


def _linear(x, qweight, scales, zeros, bias=None):
    return torch.ops.kernopt.int4_linear(x, qweight, scales, zeros, G, bias)


def test_a_known_signature_takes_the_lane_with_fresh_values(calls):
    qweight, scales, zeros = _weights()
    x = torch.randn(M, K, dtype=DT, device=DEV)
    assert_close(_linear(x, qweight, scales, zeros), _expected(x, qweight, scales, zeros), DT)
    assert calls == {"int4_gemm": 1, "dequant_cublas": 1} and len(ops._DEQUANT_LANE) == 1
    for _ in range(2):  # new values in the same shapes: the lane, and the right answer for them
        qweight, scales, zeros = _weights()
        x = torch.randn(M, K, dtype=DT, device=DEV)
        assert_close(_linear(x, qweight, scales, zeros), _expected(x, qweight, scales, zeros), DT)
    assert calls == {"int4_gemm": 1, "dequant_cublas": 3}
    bias = torch.randn(N, dtype=DT, device=DEV)  # another signature: the full path once, then the lane
    for _ in range(2):
        assert_close(_linear(x, qweight, scales, zeros, bias), _expected(x, qweight, scales, zeros, bias), DT)
    assert calls == {"int4_gemm": 2, "dequant_cublas": 5} and len(ops._DEQUANT_LANE) == 2


def test_the_lane_follows_the_tuned_config_cache_and_its_variables(calls, monkeypatch):
    qweight, scales, zeros = _weights(asym=False)
    x = torch.randn(M, K, dtype=DT, device=DEV)
    _linear(x, qweight, scales, zeros)
    _linear(x, qweight, scales, zeros)
    assert calls == {"int4_gemm": 1, "dequant_cublas": 2}
    monkeypatch.setenv("KERNOPT_NO_CACHE", "1")  # config_for's answer may differ now: the full path again
    _linear(x, qweight, scales, zeros)
    assert calls["int4_gemm"] == 2
    monkeypatch.delenv("KERNOPT_NO_CACHE")
    _linear(x, qweight, scales, zeros)  # the full path once more under the restored variables, then the lane
    _linear(x, qweight, scales, zeros)
    assert calls == {"int4_gemm": 3, "dequant_cublas": 5}
    # a tuned config stored for this bucket wins over the lane's: the tiled kernel, every call after
    bucket = workload.gemm_bucket(M, N, K, ops.int4_bucket_tag(G, True), DT)
    tiled = {"impl": "tiled", "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 1, "GROUP_M": 2}
    workload.config_cache().put("int4_gemm", bucket, tiled)
    before = dict(calls)
    for _ in range(2):
        assert_close(_linear(x, qweight, scales, zeros), _expected(x, qweight, scales, zeros), DT)
    assert calls == {"int4_gemm": before["int4_gemm"] + 2, "dequant_cublas": before["dequant_cublas"]}
    home = workload.cache_dir()
    monkeypatch.setenv("KERNOPT_CACHE_DIR", str(home / "elsewhere"))  # another cache (empty): the table, then the lane
    _linear(x, qweight, scales, zeros)
    _linear(x, qweight, scales, zeros)
    assert calls == {"int4_gemm": before["int4_gemm"] + 3, "dequant_cublas": before["dequant_cublas"] + 2}
    monkeypatch.setenv("KERNOPT_CACHE_DIR", str(home))  # back to the one with the tiled config: its answer again
    assert_close(_linear(x, qweight, scales, zeros), _expected(x, qweight, scales, zeros))
    assert calls == {"int4_gemm": before["int4_gemm"] + 4, "dequant_cublas": before["dequant_cublas"] + 2}


def test_the_lane_switched_off(calls, monkeypatch):
    monkeypatch.setenv(ops.LANE_ENV, "0")
    qweight, scales, zeros = _weights()
    x = torch.randn(M, K, dtype=DT, device=DEV)
    for _ in range(2):
        assert_close(_linear(x, qweight, scales, zeros), _expected(x, qweight, scales, zeros))
    assert calls == {"int4_gemm": 2, "dequant_cublas": 2} and not ops._DEQUANT_LANE


def test_small_m_and_refused_operands_never_enter_the_lane(calls):
    qweight, scales, zeros = _weights()
    x = torch.randn(3, K, dtype=DT, device=DEV)  # the tiled kernels' rows
    for _ in range(2):
        _linear(x, qweight, scales, zeros)
    assert calls == {"int4_gemm": 2, "dequant_cublas": 0} and not ops._DEQUANT_LANE
    x = torch.randn(M, K, dtype=DT, device=DEV)
    for _ in range(2):  # scales one group short: int4_gemm refuses, every time
        with pytest.raises(ValueError, match="scales must be"):
            _linear(x, qweight, scales[:, 1:], zeros)
    assert not ops._DEQUANT_LANE
    empty = torch.randn(M, K, dtype=DT, device=DEV)
    q0, s0, z0 = _weights(n=0)  # no columns: nothing launched, nothing memoised
    assert _linear(empty, q0, s0, z0).shape == (M, 0) and not ops._DEQUANT_LANE


@pytest.mark.parametrize("bias", [False, True])
def test_gated_and_strided_out_through_the_lane(calls, bias):
    """int4_swiglu's fused launch (gated: the product, then silu_mul) and a grouped launch's column slice of a
    NaN-poisoned output, on the full path and then the lane, with new values each time."""
    n = 37
    for i in range(2):
        qweight, scales, zeros = _weights(n=2 * n)
        b = torch.randn(2 * n, dtype=DT, device=DEV) if bias else None
        x = torch.randn(M, K, dtype=DT, device=DEV)
        y = _expected(x, qweight, scales, zeros, b)
        out = torch.full((M, n), float("nan"), dtype=DT, device=DEV)
        assert ops._int4_gemm_tuned(x, qweight, scales, zeros, G, b, out=out, gated=True) is out
        assert_close(out, torch.nn.functional.silu(y[:, :n]) * y[:, n:])
        wide = torch.full((M, 2 * n + 9), float("nan"), dtype=DT, device=DEV)
        ops._int4_gemm_tuned(x, qweight, scales, zeros, G, b, out=wide[:, 4:4 + 2 * n])
        assert_close(wide[:, 4:4 + 2 * n], y, DT)
        assert wide[:, :4].isnan().all() and wide[:, 4 + 2 * n:].isnan().all()
        assert calls["int4_gemm"] == 2  # the two signatures' first calls only
    assert calls["dequant_cublas"] == 4 and len(ops._DEQUANT_LANE) == 2
