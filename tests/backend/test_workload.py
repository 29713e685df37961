"""Scenario classification and the tuned-config cache (JSON, atomic, merged under a lock, corrupt files ignored)."""
import json
import subprocess
import sys

import pytest

from kernopt import workload
from kernopt.workload import ConfigCache, classify, resolve_scenario


@pytest.mark.parametrize("tokens,q_len,batch,expected", [
    (1, 1, 1, "single-stream"),
    (8, 1, 8, "interactive"),
    (16, 1, 16, "interactive"),
    (64, 1, 64, "server"),
    (2048, 2048, 1, "server"),
    (16384, 2048, 8, "offline"),
])
def test_classify(tokens, q_len, batch, expected):
    assert classify(tokens, q_len, batch) == expected


def test_scenario_for_activation():
    from kernopt.workload import scenario_for_activation as sfa
    assert sfa("auto", (1, 16, 4096)) == "server"          # a 16-token prompt, not 16 decoding sequences
    assert sfa("auto", (16, 1, 4096)) == "interactive"     # 16 sequences decoding
    assert sfa("auto", (1, 1, 4096)) == "single-stream"
    assert sfa("auto", (8, 2048, 4096)) == "offline"
    assert sfa("offline", (1, 1, 4096)) == "offline"


def test_scenario_override_and_error():
    assert resolve_scenario("offline", 1, 1, 1) == "offline"
    with pytest.raises(ValueError, match="valid: 'auto', 'offline'"):
        resolve_scenario("fast", 1)


def test_bucket():
    assert [workload.bucket(n) for n in (1, 2, 3, 16, 17, 4000)] == [1, 2, 4, 16, 32, 4096]
    assert workload.gemm_bucket(3, 4096, 14336, "silu") == "M4-N4096-K14336-silu"


def test_cache_round_trip(tmp_path):
    c = ConfigCache(tmp_path, device="NVIDIA H100 80GB HBM3", triton="3.6.0")
    c.put("gemm", "M16-N4096-K4096", {"BLOCK_M": 16, "num_warps": 4})
    again = ConfigCache(tmp_path, device="NVIDIA H100 80GB HBM3", triton="3.6.0")
    assert again.get("gemm", "M16-N4096-K4096") == {"BLOCK_M": 16, "num_warps": 4}
    data = json.loads(again.path.read_text())
    assert data["device"] == "NVIDIA H100 80GB HBM3" and data["triton"] == "3.6.0" and data["format"] == 1
    assert not list(tmp_path.glob("*.tmp"))


def test_corrupt_cache_is_ignored_with_warning_and_kept_aside(tmp_path):
    c = ConfigCache(tmp_path, device="dev", triton="3.6.0")
    c.path.parent.mkdir(parents=True, exist_ok=True)
    c.path.write_text("{ not json")
    with pytest.warns(UserWarning, match="ignoring tuned-config cache"):
        assert c.get("gemm", "x") is None
    assert list(tmp_path.glob("*.bad-*.json"))  # the user's file is moved aside, not destroyed
    c.put("gemm", "x", {"a": 1})
    assert ConfigCache(tmp_path, device="dev", triton="3.6.0").get("gemm", "x") == {"a": 1}


def test_foreign_cache_is_ignored(tmp_path):
    c = ConfigCache(tmp_path, device="dev", triton="3.6.0")
    c.path.parent.mkdir(parents=True, exist_ok=True)
    c.path.write_text(json.dumps({"format": 1, "device": "other GPU", "triton": "3.6.0",
                                  "entries": {"gemm|x": {"a": 1}}}))
    with pytest.warns(UserWarning, match="written for 'other GPU'"):
        assert c.get("gemm", "x") is None


_WRITER = """
import sys
from kernopt.workload import ConfigCache
c = ConfigCache(sys.argv[1], device="dev", triton="3.6.0")
for j in range(10):
    c.put("gemm", f"p{sys.argv[2]}-{j}", {"i": int(sys.argv[2]), "j": j})
"""


def test_concurrent_writers_lose_nothing(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), str(i)]) for i in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    entries = ConfigCache(tmp_path, device="dev", triton="3.6.0").entries()
    assert len(entries) == 40


def test_env_var_moves_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KERNOPT_CACHE_DIR", str(tmp_path))
    assert workload.config_cache().directory == tmp_path


def test_config_for_prefers_cache_then_first_use_tuning(tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("KERNOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(workload, "_AUTOTUNE_TRIED", set())
    calls = []

    def fake_autotune(kernel, key, candidates, run, save=True, check=None, timer=None):
        calls.append((kernel, key, check, timer))
        best = min(candidates, key=lambda c: c["t"])
        run(best)
        workload.config_cache().put(kernel, key, best)
        return best, {}

    monkeypatch.setattr(workload, "autotune", fake_autotune)
    cands = lambda: [{"t": 3}, {"t": 1}, {"t": 2}]  # noqa: E731
    ran, kits = [], []
    kit = lambda: kits.append(1) or ("the check", "the timer")  # noqa: E731
    # off by default: the kernel's table decides
    monkeypatch.delenv("KERNOPT_AUTOTUNE", raising=False)
    assert workload.config_for("gemm", "M1-N8-K8", cands, ran.append, kit) is None
    # on, but no GPU here: still the table
    monkeypatch.setenv("KERNOPT_AUTOTUNE", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert workload.config_for("gemm", "M1-N8-K8", cands, ran.append, kit) is None
    # on a GPU, outside capture: tuned once with the kit's check and timer, stored, then read from the cache
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert workload.config_for("gemm", "M1-N8-K8", cands, ran.append, kit) == {"t": 1}
    assert workload.config_for("gemm", "M1-N8-K8", cands, ran.append, kit) == {"t": 1}
    assert calls == [("gemm", "M1-N8-K8", "the check", "the timer")] and ran == [{"t": 1}]
    assert kits == [1]  # built for the tuning only, not on every call


def test_config_for_failed_tuning_falls_back_once(tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("KERNOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("KERNOPT_AUTOTUNE", "1")
    monkeypatch.setattr(workload, "_AUTOTUNE_TRIED", set())
    workload.config_cache()  # opened for this (CPU) machine before the GPU is faked below
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    attempts = []

    def broken(*a, **k):
        attempts.append(1)
        raise RuntimeError("no candidate ran")

    monkeypatch.setattr(workload, "autotune", broken)
    with pytest.warns(UserWarning, match="autotuning gemm.M2-N8-K8 failed"):
        assert workload.config_for("gemm", "M2-N8-K8", lambda: [{}], lambda c: None) is None
    assert workload.config_for("gemm", "M2-N8-K8", lambda: [{}], lambda c: None) is None
    assert attempts == [1]  # not retried on every call


def test_autotune_never_stores_a_wrong_config_and_times_with_the_timer(tmp_path, monkeypatch):
    """A candidate whose output fails the check is never timed or stored, nor one that fails it after timing
    (a single-pass kernel that leaves its counters armed); the timer, when given, is the clock."""
    import collections
    import json

    monkeypatch.setenv("KERNOPT_CACHE_DIR", str(tmp_path))
    times = {"slow": 3.0, "fast": 2.0, "wrong_fastest": 0.5, "wrong_after_timing": 1.0, "raises": 0.1}
    runs = collections.Counter()
    timed = []

    def run(cfg):
        name = cfg["name"]
        runs[name] += 1
        if name == "raises":
            raise RuntimeError("out of shared memory")
        return 2.0 if name == "wrong_fastest" or (name == "wrong_after_timing" and runs[name] > 1) else 1.0

    def timer(cfg):
        timed.append(cfg["name"])
        return times[cfg["name"]]

    best, timings = workload.autotune("gemm", "M1-N8-K8", [{"name": n} for n in times], run,
                                      check=lambda out: None if out == 1.0 else f"got {out}", timer=timer)
    assert best == {"name": "fast"}
    assert "wrong_fastest" not in timed and "raises" not in timed
    for name in ("wrong_fastest", "wrong_after_timing", "raises"):
        assert timings[json.dumps({"name": name})] == float("inf")
    assert timings[json.dumps({"name": "slow"})] == 3.0
    assert workload.config_cache().get("gemm", "M1-N8-K8") == best


def test_tuning_kit_checks_outputs_against_the_reference():
    import torch

    from kernopt import ops

    x, w = torch.randn(3, 64, dtype=torch.float16), torch.randn(32, 64, dtype=torch.float16)
    check, _ = ops.tuning_kit(lambda cfg, x, w: x @ w.t(), (x, w), lambda x, w: (x.double() @ w.double().t()))
    assert check(x @ w.t()) is None
    assert "beyond" in check((x @ w.t()) * 1.1)
