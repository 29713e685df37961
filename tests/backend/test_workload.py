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
