"""Every kernel family compiles for the H100/H200 (sm_90a) offline, on a CPU: no GPU, Triton's bundled ptxas.

tests/kernels/sm90_offline.py calls the public launchers at real model shapes with the configs a GPU run uses,
captures the launches instead of running them, specialises them as triton's JITFunction.run does on a device
(alignment attributes, host TensorDescriptor signatures) and compiles them for sm_90a. It runs in a
subprocess because this process imported triton in interpreter mode (tests/conftest.py). The assertions:
every kernel compiles; the configs select_config picks do not spill registers; shared memory fits an H100
block (227 KB); the PTX uses the Hopper instructions the configs rely on (wgmma, wgmma on e4m3, TMA); the
spill detection itself sees the spills of a config known to spill. ``pytest -s`` prints the table (kernel,
config, registers, spills, shared memory).
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "sm90_offline.py"
ROOT = HERE.parents[1]

_spec = importlib.util.spec_from_file_location("kernopt_tests_sm90_offline", SCRIPT)
sm90 = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = sm90  # dataclasses look their module up there
_spec.loader.exec_module(sm90)  # for the case table only: the module imports torch and triton lazily


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """The JSON of one sm90_offline.py run over every case (the table is printed; visible with -s)."""
    out = tmp_path_factory.mktemp("sm90") / "sm90.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "KERNOPT_CPU")}
    try:
        proc = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=1200)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"sm90_offline.py ran over {e.timeout} s:\n{(e.stdout or '')[-3000:]}")
    print(proc.stdout)
    if not out.exists():
        pytest.fail(f"sm90_offline.py wrote no JSON (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-6000:]}")
    data = json.loads(out.read_text())
    if "skip" in data:
        pytest.skip(f"cannot compile for sm_90 offline: {data['skip']}")
    return data


def _records(data, case):
    return [r for r in data["records"] if r["case"] == case.name]


def _spills(rec):
    return (rec["spill_stores"], rec["spill_loads"], rec["stack"] or 0)  # stack: None without cuobjdump


@pytest.mark.parametrize("case", sm90.CASES, ids=[c.name.replace(" ", "_") for c in sm90.CASES])
def test_compiles_for_sm90(compiled, case):
    err = compiled["capture_errors"].get(case.name)
    assert err is None, f"{case.name}: the launcher failed before any compile:\n{err}"
    recs = _records(compiled, case)
    assert recs, f"{case.name}: no kernel launched"
    launched = {r["kernel"] for r in recs}
    assert set(case.expect) <= launched, f"{case.name}: expected {sorted(case.expect)} to launch, got {launched}"
    for r in recs:
        what = f"{case.name} / {r['kernel']} {r['config']}"
        assert not r.get("error"), f"{what} does not compile for sm_90:\n{r['error']}\n{r.get('traceback', '')}"
        # ptxas -v reported on this kernel (else "no spills" below would hold vacuously)
        assert r["ptxas_regs"] is not None and r["spill_stores"] is not None, f"{what}: no ptxas log parsed"
        assert r["regs"] == r["ptxas_regs"], f"{what}: cuobjdump {r['regs']} vs ptxas {r['ptxas_regs']} registers"
        assert r["shared"] <= sm90.SMEM_LIMIT, f"{what}: {r['shared']} B shared memory > {sm90.SMEM_LIMIT}"
        warps = r.get("warps_launched") or r["num_warps"]  # a warp-specialised kernel launches more warps
        assert r["regs"] * 32 * warps <= sm90.REGISTERS, f"{what}: {r['regs']} registers x {warps} warps do not fit"
        if case.selected or case.no_spill:
            assert _spills(r) == (0, 0, 0), f"{what}: spills (stores, loads, stack bytes) = {_spills(r)}"
        for check in case.expect.get(r["kernel"], ()):
            assert r[check], f"{what}: the PTX/TTGIR lacks {check} (wgmma shapes: {r['wgmma_shapes']})"


def test_spill_detection_sees_a_spilling_config(compiled):
    canaries = [c for c in sm90.CASES if c.canary]
    assert canaries
    for case in canaries:
        for r in _records(compiled, case):
            assert not r.get("error"), r["error"]
            assert r["spill_stores"] > 0 and (r["stack"] is None or r["stack"] > 0), (
                f"{case.name} no longer spills ({_spills(r)}): the no-spill assertions are unproven; "
                "pick a config that spills as the canary")
