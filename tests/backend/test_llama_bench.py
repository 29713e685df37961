"""The llama suite's plumbing on CPU (`kernopt bench llama --device cpu --shapes tiny`), before GPU time is spent.

The smoke run goes through the CLI, runs HF's static cache + Inductor, kernopt (static cache) and kernopt int4
end to end on the tiny shape, and checks the JSON: every system's numbers, no errors, the device, and Dynamo's
counts: each compiled system compiled its decode step during the first `generate`, and the timed calls after it
compiled nothing (the bug where every `generate` recompiled was found only on the GPU). A second run breaks
the decode compile the way that bug did and checks that the suite reports it as an error.
kernopt's systems compile the rest of the graph with `--inner eager` here: the plumbing is the same, and
Inductor's C++ compiles on CPU would make this test minutes long; the baseline keeps Inductor.
"""
import functools
import json
import os
import re
import sys
import time

import pytest
import torch

pytest.importorskip("transformers")

import kernopt.hf  # noqa: E402
from kernopt import cli, llama_bench  # noqa: E402
from kernopt.benchmark import RESULTS_DIR  # noqa: E402

SMOKE = ["--device", "cpu", "--shapes", "tiny", "--batch-sizes", "1", "--new", "3", "--prompt", "4",
         "--prefill", "8", "--inner", "eager"]
COMPILED = ("hf_static_inductor", "kernopt", "kernopt_int4")


@pytest.fixture
def no_cuda_calls(monkeypatch):
    """A CPU run must not touch torch.cuda: make any such call fail loudly."""
    def refuse(*args, **kwargs):
        raise AssertionError("torch.cuda called in a --device cpu run")

    for name in ("synchronize", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, refuse)


def _rows(path):
    data = json.loads(path.read_text())
    return data, {r["case"]: r for r in data["rows"]}


def test_cpu_smoke_runs_every_system_without_recompiles(tmp_path, capsys, no_cuda_calls):
    rc = cli.main(["bench", "llama", *SMOKE, "--systems", ",".join(COMPILED), "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    data, rows = _rows(tmp_path / "llama-cpu.json")
    assert data["suite"] == "llama" and data["device"] == "cpu" and data["dtype"] == "float32"
    assert set(rows) == {"tiny decode bs1", "tiny prefill b1 s8", "tiny first-call s", "tiny generate 1 token bs1",
                         "tiny decode step bs1"}
    for case, row in rows.items():
        assert "errors" not in row and "warnings" not in row, (case, row)
        assert set(row["results"]) == set(COMPILED), (case, row["results"])
        # the decode step is a difference of two timings (generate of N tokens minus generate of 1), clipped at 0:
        # on a loaded CPU it can come out 0 (seen once, 2026-11-30, with other test runs beside it)
        floor_ok = (lambda v: v >= 0) if case.endswith("decode step bs1") else (lambda v: v > 0)
        assert all(floor_ok(v) for v in row["results"].values()), (case, row["results"])
    decode = rows["tiny decode bs1"]["dynamo"]
    for system in COMPILED:
        # The decode step was compiled in the first generate call (else "no recompiles" would prove nothing) ...
        assert decode[system]["first_call_graphs"] >= 1, (system, decode[system])
        # ... and the timed calls after it compiled nothing.
        calls = llama_bench.DECODE_TIMED_CALLS
        assert decode[system]["timed_graphs"] == [0] * calls and decode[system]["timed_frames"] == [0] * calls, decode
        assert len(decode[system]["timed_s"]) == calls and all(t > 0 for t in decode[system]["timed_s"]), decode
        prefill = rows["tiny prefill b1 s8"]["dynamo"][system]
        assert prefill["compile_graphs"] >= 1 and not any(prefill["timed_graphs"] + prefill["timed_frames"])
    cos = rows["tiny prefill b1 s8"]["prefill_logits_cosine_vs_reference"]
    assert set(cos) == {"kernopt", "kernopt_int4"} and min(cos.values()) >= llama_bench.MIN_COSINE
    # the decode steps' logits (compiled step, decode kernels) against the reference on the same tokens
    dcos = rows["tiny prefill b1 s8"]["decode_logits_cosine_vs_reference"]
    assert set(dcos) == {"kernopt", "kernopt_int4"} and min(dcos.values()) >= llama_bench.MIN_COSINE, dcos
    assert not any("decode logits check" in w for ws in rows["tiny prefill b1 s8"].get("warnings", {}).values()
                   for w in ws)
    # quantized systems also record how far their reference is from the unquantized model (the check's floor)
    assert set(rows["tiny prefill b1 s8"]["reference_logits_cosine_vs_float"]) == {"kernopt_int4"}
    first = rows["tiny first-call s"]
    assert set(first["first_call_overhead_s"]) == set(COMPILED)
    assert first["cache_state"]["tuned_configs"] == 0 and "inductor_cache_dir" in first["cache_state"]
    # The plot: a PNG where matplotlib is installed, else a message saying why not (never a crash).
    png = tmp_path / "llama-cpu.png"
    assert png.exists() or "no plot (llama-cpu.png): matplotlib is not installed" in out


def _partial_backend_prepare(prepare):
    """prepare(), then the decode compile's backend as a functools.partial: the bug the GPU run found
    (transformers deep-copies the CompileConfig per generate call; a copied partial fails Dynamo's
    backend-match guard, so every call recompiles)."""
    from kernopt.backend import kernopt_backend

    def broken(system, model, device="cuda", inner="inductor"):
        model = prepare(system, model, device, inner)
        model.generation_config.compile_config.backend = functools.partial(kernopt_backend)
        return model

    return broken


def test_recompiling_timed_calls_are_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(llama_bench, "prepare", _partial_backend_prepare(llama_bench.prepare))
    run = llama_bench.main([*SMOKE, "--systems", "kernopt", "--out", str(tmp_path), "--no-plot",
                            "--cold-compile-caches"])
    err = run["results"]["tiny"]["kernopt"]["error"]
    assert "decode_bs1: timed calls recompiled" in err, err
    _, rows = _rows(run["path"])
    row = rows["tiny decode bs1"]
    assert "kernopt" not in row["results"] and "recompiled" in row["errors"]
    assert all(g >= 1 for g in row["dynamo"]["kernopt"]["timed_graphs"]), row["dynamo"]
    assert llama_bench.errors(run["results"]) == [f"tiny kernopt: {err}"]
    assert rows["tiny first-call s"]["cache_state"]["compile_caches"] == "fresh per system"


def test_cold_compile_caches_are_fresh_directories_inductor_uses(tmp_path, monkeypatch):
    from torch._inductor.runtime.cache_dir_utils import cache_dir, triton_cache_dir

    monkeypatch.setenv("TRITON_CACHE_DIR", "/somewhere/else")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    with llama_bench._compile_caches(tmp_path, "tiny-kernopt"):
        assert cache_dir() == str(tmp_path / "tiny-kernopt" / "inductor")
        assert triton_cache_dir(0) == str(tmp_path / "tiny-kernopt" / "triton")
    assert os.environ["TRITON_CACHE_DIR"] == "/somewhere/else" and "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    with llama_bench._compile_caches(None, "tiny-kernopt"):
        assert os.environ["TRITON_CACHE_DIR"] == "/somewhere/else"


def test_cpu_results_stay_out_of_benchmarks_results(tmp_path):
    default = llama_bench.output_dir("cpu", None)
    assert default.is_dir() and default.resolve() != RESULTS_DIR.resolve() and not any(default.iterdir())
    default.rmdir()
    assert llama_bench.output_dir("cpu", str(tmp_path)) == tmp_path
    with pytest.raises(SystemExit, match="CPU smoke-test numbers"):
        llama_bench.output_dir("cpu", str(RESULTS_DIR))
    assert llama_bench.output_dir("cuda", None) == RESULTS_DIR


def test_cuda_run_without_a_gpu_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device"):
        llama_bench.main(["--shapes", "tiny"])


def test_bad_names_list_the_valid_ones():
    with pytest.raises(SystemExit, match="valid: tiny, 1B, 8B"):
        llama_bench.main(["--device", "cpu", "--shapes", "3B"])
    with pytest.raises(SystemExit, match=r"unknown systems \['vllm'\]; valid: eager, hf_static_inductor"):
        llama_bench.main(["--device", "cpu", "--shapes", "tiny", "--systems", "eager+vllm"])
    assert llama_bench.names("kernopt+kernopt_int4") == llama_bench.names("kernopt,kernopt_int4,") == [
        "kernopt", "kernopt_int4"]


def test_cli_models_are_the_suite_shapes():
    assert set(cli.MODELS) == set(llama_bench.LLAMA)


def test_plot_without_matplotlib_skips_with_a_message(tmp_path, monkeypatch, capsys):
    from kernopt.benchmark import Suite

    suite = Suite("llama")
    suite.add("tiny decode bs1", "tok/s", True, {"kernopt": 2.0, "eager": 1.0})
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    path = llama_bench.write(suite, tmp_path, plot=True)
    assert json.loads(path.read_text())["rows"][0]["results"] == {"kernopt": 2.0, "eager": 1.0}
    assert not path.with_suffix(".png").exists()
    assert "matplotlib is not installed" in capsys.readouterr().out


def test_plot_with_matplotlib_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from kernopt.benchmark import Suite

    suite = Suite("llama")
    suite.add("tiny decode bs1", "tok/s", True, {"kernopt": 2.0, "eager": 1.0})
    path = llama_bench.write(suite, tmp_path, plot=True)
    assert path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_merge_keeps_earlier_numbers_of_systems_not_rerun(tmp_path):
    from kernopt.benchmark import Suite

    def suite(device, commit, rows):
        s = Suite("llama")
        s.device = s.header["device"] = device
        s.header["kernopt_commit"] = commit
        for case, results in rows.items():
            s.add(case, "tok/s", True, results, dynamo={k: {"timed_graphs": [0, 0]} for k in results})
        return s

    def load(name="llama-h200.json"):
        return {r["case"]: r for r in json.loads((tmp_path / name).read_text())["rows"]}

    first = suite("NVIDIA H200", "aaa", {"1B decode bs1": {"eager": 1.0, "kernopt": 2.0}})
    first.write(tmp_path)
    # Another shape, and a split by system: kernopt_int4 alone for 1B.
    later = suite("NVIDIA H200", "bbb", {"8B decode bs1": {"kernopt": 5.0}, "1B decode bs1": {"kernopt_int4": 3.0}})
    llama_bench.merge_earlier(later, tmp_path)
    later.write(tmp_path)
    rows = load()
    assert rows["8B decode bs1"]["results"] == {"kernopt": 5.0} and "from_run" not in rows["8B decode bs1"]
    one_b = rows["1B decode bs1"]
    # this run measured kernopt at 8B only (e.g. cut short before its 1B): the earlier 1B number is kept
    assert one_b["results"] == {"kernopt_int4": 3.0, "eager": 1.0, "kernopt": 2.0}
    assert set(one_b["dynamo"]) == {"kernopt_int4", "eager", "kernopt"}
    aaa = {"kernopt_commit": "aaa", "date": first.header["date"]}
    assert one_b["from_run"] == {"eager": aaa, "kernopt": aaa}
    # A system that failed in this run's case replaces the earlier number too (the failure is the news).
    fourth = suite("NVIDIA H200", "ddd", {"1B decode bs1": {"eager": 1.5}})
    fourth.rows[0]["system_errors"] = {"kernopt": "boom"}
    llama_bench.merge_earlier(fourth, tmp_path)
    one_b4 = {r["case"]: r for r in fourth.rows}["1B decode bs1"]
    assert "kernopt" not in one_b4["results"] and one_b4["results"]["kernopt_int4"] == 3.0
    # The table gives a kernopt ratio only against systems of the same run.
    t = Suite("llama")
    t.add("same", "tok/s", True, {"kernopt": 2.0, "eager": 1.0})
    t.add("merged", "tok/s", True, {"kernopt": 2.0, "eager": 1.0}, from_run={"eager": {"kernopt_commit": "aaa"}})
    t.add("both", "tok/s", True, {"kernopt": 2.0, "eager": 1.0},
          from_run={"eager": {"kernopt_commit": "aaa"}, "kernopt": {"kernopt_commit": "aaa"}})
    assert [line.split()[-1] for line in t.table().splitlines()[2:]] == ["2.00", "-", "2.00"]
    # Against a baseline (the llama suite's hf_static_inductor): every kernopt system's ratio, lower-is-better too.
    b = Suite("llama")
    b.add("8B decode bs1", "tok/s", True, {"hf_static_inductor": 100.0, "kernopt": 150.0, "kernopt_int4": 250.0})
    b.add("8B prefill b1 s2048", "ms", False, {"hf_static_inductor": 60.0, "kernopt": 50.0, "kernopt_int4": 75.0})
    b.add("8B first-call s", "s", False, {"hf_static_inductor": 30.0, "kernopt": 60.0, "kernopt_int4": 40.0},
          from_run={"kernopt_int4": {"kernopt_commit": "aaa"}})
    lines = b.table(baseline="hf_static_inductor").splitlines()
    assert "speedup vs hf_static_inductor (kernopt/kernopt_int4)" in lines[0]
    assert [line.split()[-2:] for line in lines[2:]] == [["1.50", "2.50"], ["1.20", "0.80"], ["0.50", "-"]]
    assert b.table(baseline="eager") == b.table()  # a baseline the suite lacks: kernopt against the others
    # A third run re-measures eager for 1B only; the 8B row and 1B kernopt_int4 stay, eager is replaced.
    again = suite("NVIDIA H200", "ccc", {"1B decode bs1": {"eager": 9.0}})
    llama_bench.merge_earlier(again, tmp_path)
    again.write(tmp_path)
    rows = load()
    assert rows["1B decode bs1"]["results"] == {"eager": 9.0, "kernopt_int4": 3.0, "kernopt": 2.0}
    assert rows["1B decode bs1"]["from_run"] == {"kernopt_int4": {"kernopt_commit": "bbb", "date": later.header["date"]},
                                                 "kernopt": aaa}
    assert rows["8B decode bs1"]["results"] == {"kernopt": 5.0} and rows["8B decode bs1"]["from_run"]["kernopt"]
    # A foreign device's file is never merged.
    (tmp_path / "llama-h100.json").write_text((tmp_path / "llama-h200.json").read_text())
    other = suite("NVIDIA H100 80GB HBM3", "ddd", {"1B decode bs1": {"eager": 4.0}})
    llama_bench.merge_earlier(other, tmp_path)
    assert [(r["case"], r["results"]) for r in other.rows] == [("1B decode bs1", {"eager": 4.0})]


def test_merge_rebuilds_the_errors_of_kept_systems(tmp_path):
    from kernopt.benchmark import Suite

    first = Suite("llama")
    first.add("1B decode bs1", "tok/s", True, {"eager": 1.0}, errors="kernopt: boom; x",
              system_errors={"kernopt": "boom; x"})
    first.write(tmp_path)
    second = Suite("llama")
    second.add("1B decode bs1", "tok/s", True, {"eager": 2.0})
    llama_bench.merge_earlier(second, tmp_path)
    assert second.rows[0]["errors"] == "kernopt: boom; x" and second.rows[0]["results"] == {"eager": 2.0}


def test_cli_explain_tiny_on_cpu(capsys):
    assert cli.main(["explain", "--model", "tiny", "--quantize", "int4", "--seq", "8"]) == 0
    out = capsys.readouterr().out
    linears = 7 * llama_bench.LLAMA["tiny"]["num_hidden_layers"]  # q k v o gate up down; lm_head is skipped
    assert "1 graph(s)" in out and len(re.findall(r"kernopt\.int4_linear(?!_)", out)) == linears, out
    # q/k/v and gate/up read one x each: the int4 pass groups them (kernopt.int4_linear_group)
    assert out.count("kernopt.int4_linear_group") == 2 * llama_bench.LLAMA["tiny"]["num_hidden_layers"], out


def test_cli_tune_without_a_gpu_says_so(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["tune", "--model", "tiny"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_linear_shapes_include_the_grouped_int4_launches():
    """`kernopt tune --quantize int4` tunes the widths the grouped launches run (q+k+v, gate+up), besides each
    linear's own (what an eager call of one linear runs)."""
    from kernopt.int4 import linears_sharing_input

    model = cli._llama("1B", "meta", torch.float32)  # meta: shapes only, no memory
    cfg = model.config
    hidden, heads, kv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    plain = cli.linear_shapes(model)
    grouped = cli.linear_shapes(model, linears_sharing_input(model))
    qkv = ((heads + 2 * kv) * head_dim, hidden)
    gate_up = (2 * cfg.intermediate_size, hidden)
    assert qkv not in plain and gate_up not in plain
    assert set(grouped) == set(plain) | {qkv, gate_up}


def test_int4_tuning_times_the_x_dtype_the_compiled_launch_gets(monkeypatch):
    """GEMV rows on the fp32 path (fp16 x; bf16 under KERNOPT_INT4_GEMV=fp32) get x.float() from the int4 pass, so
    `kernopt tune` times (and keys) them in float32; bf16 GEMV rows (PAIRS) keep bf16."""
    import torch

    from kernopt import cli
    from kernopt.kernels.int4_gemm import GEMV_MAX_M, GEMV_VARIANT_ENV

    assert cli.int4_x_dtype(GEMV_MAX_M, 4096, 4096, 128, torch.float16) == torch.float32
    assert cli.int4_x_dtype(GEMV_MAX_M, 4096, 4096, 128, torch.bfloat16) == torch.bfloat16
    assert cli.int4_x_dtype(GEMV_MAX_M + 1, 4096, 4096, 128, torch.float16) == torch.float16
    assert cli.int4_x_dtype(1, 4096, 4096, 128, torch.float32) == torch.float32
    monkeypatch.setenv(GEMV_VARIANT_ENV, "fp32")
    assert cli.int4_x_dtype(GEMV_MAX_M, 4096, 4096, 128, torch.bfloat16) == torch.float32
    monkeypatch.setenv("KERNOPT_INT4_FLOAT_X", "0")
    assert cli.int4_x_dtype(GEMV_MAX_M, 4096, 4096, 128, torch.bfloat16) == torch.bfloat16


def test_experiment_systems_set_their_switches_for_their_run_only(monkeypatch):
    from kernopt.kernels.int4_gemm import GEMV_VARIANT_ENV, GEMV_VARIANTS
    from kernopt.passes.int4 import PROMPT_ENV

    gemv = {env[GEMV_VARIANT_ENV] for env in llama_bench.SYSTEM_ENV.values() if GEMV_VARIANT_ENV in env}
    assert gemv == set(GEMV_VARIANTS)
    assert {name for env in llama_bench.SYSTEM_ENV.values() for name in env} == {GEMV_VARIANT_ENV, PROMPT_ENV,
                                                                             "KERNOPT_PREFILL_CUDA_GRAPHS",
                                                                             "KERNOPT_INT4_SWIGLU",
                                                                             "KERNOPT_INDUCTOR_COMBO",
                                                                             "KERNOPT_DECODE_APPEND", "KERNOPT_PDL", "KERNOPT_MASK_FOLD", "KERNOPT_MASK_BOUNDS",
                                                                             "KERNOPT_INT4_LANE", "KERNOPT_FP8_PROMPT",
                                                                             "KERNOPT_FP8_GEMV", "KERNOPT_FP8_GROUP",
                                                                             "KERNOPT_INT4_LDMMA"}
    assert set(llama_bench.SYSTEM_ENV) <= set(llama_bench.EXTRA_SYSTEMS)
    assert llama_bench.quantize_of("kernopt_noappend") is None and llama_bench.quantize_of("kernopt_int4_noappend") == "int4"
    monkeypatch.setenv(GEMV_VARIANT_ENV, "planes")
    with llama_bench.system_env("kernopt_int4_tcasm"):
        assert os.environ[GEMV_VARIANT_ENV] == "tcasm" and PROMPT_ENV not in os.environ
    with llama_bench.system_env("kernopt_int4_prompt_inductor"):
        assert os.environ[PROMPT_ENV] == "inductor" and GEMV_VARIANT_ENV not in os.environ
    with llama_bench.system_env("kernopt_int4_prompt_nographs"):
        assert os.environ["KERNOPT_PREFILL_CUDA_GRAPHS"] == "0" and not kernopt.hf.prefill_cuda_graphs_enabled()
    with llama_bench.system_env("kernopt_int4"):
        assert GEMV_VARIANT_ENV not in os.environ  # the table's GEMV for the plain system
    from kernopt import fp8 as fp8_mod
    from kernopt.kernels import fp8_gemm
    from kernopt.passes import fp8 as fp8_pass

    assert llama_bench.quantize_of("kernopt_fp8_nogemv") == llama_bench.quantize_of("kernopt_fp8_prompt_kernel") == "fp8"
    with llama_bench.system_env("kernopt_fp8_nogemv"):
        assert not fp8_gemm.gemv_enabled() and fp8_gemm.select_config(1, 4096, 4096)["SWAP_AB"]
    with llama_bench.system_env("kernopt_fp8_prompt_kernel"):
        assert fp8_pass.prompt_mode() == "kernel" and fp8_gemm.gemv_enabled()
    with llama_bench.system_env("kernopt_fp8_nogroup"):
        assert not fp8_mod.grouping_enabled() and fp8_gemm.gemv_enabled()
    with llama_bench.system_env("kernopt_fp8"):
        assert fp8_pass.prompt_mode() == "auto" and fp8_gemm.select_config(1, 4096, 4096)["impl"] == "gemv"
        assert fp8_mod.grouping_enabled()
    assert os.environ[GEMV_VARIANT_ENV] == "planes" and PROMPT_ENV not in os.environ


def _fake_smi(tmp_path, monkeypatch, body: str):
    """An `nvidia-smi` on PATH that prints `body` and then waits to be terminated, as `-lms` sampling does."""
    exe = tmp_path / "nvidia-smi"
    exe.write_text("#!/bin/sh\ncat <<'END'\n" + body + "END\nexec sleep 30\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")


def test_gpu_sampler_summarises_what_nvidia_smi_printed(tmp_path, monkeypatch):
    _fake_smi(tmp_path, monkeypatch, "1980, 3201, 41, 350.5, 0x0000000000000000, 100\n"
                                     "1755, 3201, 44, 612.25, 0x0000000000000004, 84\n"
                                     "1980, 2619, 43, 400.0, 0x0000000000000000, 95\n")
    with llama_bench.GpuSampler("0") as s:
        time.sleep(0.5)
    assert s.summary() == {"sm_mhz": [1755.0, 1980.0], "mem_mhz": [2619.0, 3201.0], "max_temp_c": 44.0,
                           "max_power_w": 612.25, "throttle": ["0x0000000000000000", "0x0000000000000004"],
                           "util_pct": [84.0, 93.0], "samples": 3}
    assert s.proc.returncode is not None  # the sampler was stopped, not left running


def test_gpu_sampler_reports_what_it_cannot_read(tmp_path, monkeypatch):
    _fake_smi(tmp_path, monkeypatch, "Field \"clocks_throttle_reasons.active\" is not a valid field to query.\n")
    with llama_bench.GpuSampler("0") as s:
        time.sleep(0.3)
    assert "not a valid field" in s.summary()["error"]
    _fake_smi(tmp_path, monkeypatch, "1980, 3201, 41, 350.5, 0x0000000000000000\n")  # a field short: not a guess
    with llama_bench.GpuSampler("0") as s:
        time.sleep(0.3)
    assert s.summary()["error"].startswith("1980, 3201, 41")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with llama_bench.GpuSampler("0") as s:
        pass
    assert s.summary() is None


def test_gpu_sampler_uses_the_visible_devices_entry(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1234, 3")
    assert llama_bench._smi_index() == "GPU-1234"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert llama_bench._smi_index() == "0"
